package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/bpffs"
	"github.com/ctd-dev/ctd/datapath/loader"
)

func newTeardownCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "teardown",
		Short: "Detach ctd everywhere and remove every pin under the pin path",
		Long: `Detach ctd from every interface it is attached to: the TCX links pinned
below <pin-path>/links and, in the current network namespace, the tc filters
whose programs use this pin path's maps. Then remove every pin of ctd's below
the pin path, and the directory itself (unmounting the bpffs ctd mounted
there) if ctd created it and nothing else is in it. The conntrack table and
all other state are gone afterwards. Running it again, or where nothing is
set up, does nothing.

tc filters in other network namespaces cannot be seen from here: run teardown
in each namespace where ctd was attached in tc mode (e.g. via nsenter --net).`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := requireRoot(); err != nil {
				return err
			}
			if err := checkPinPath(a.pinPath); err != nil {
				return err
			}
			return a.teardown(c.OutOrStdout())
		},
	}
}

func (a *app) teardown(w io.Writer) error {
	if _, err := os.Lstat(a.pinPath); errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(w, "nothing to tear down: %s does not exist\n", a.pinPath)
		return nil
	}
	ok, err := bpffs.IsBPFFS(a.pinPath)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("pin path %s is not on a bpffs, so it holds no ctd pins: refusing to remove it", a.pinPath)
	}

	// Detach first: if that fails, the pins stay so that a retry finds
	// every attachment again.
	ifaces, err := a.attachedIfaces()
	if err != nil {
		return fmt.Errorf("teardown: %w", err)
	}
	for _, iface := range ifaces {
		if err := attach.Detach(iface, a.linkDir()); err != nil {
			return fmt.Errorf("teardown: %w", err)
		}
		fmt.Fprintf(w, "detached ctd from %s\n", iface)
	}

	if err := removePins(a.pinPath); err != nil {
		return fmt.Errorf("teardown: %w", err)
	}
	kept, err := bpffs.Release(a.pinPath)
	if err != nil {
		return fmt.Errorf("teardown: %w", err)
	}
	if kept != "" {
		fmt.Fprintf(w, "removed ctd's pins; kept %s: %s\n", a.pinPath, kept)
		return nil
	}
	fmt.Fprintf(w, "removed %s\n", a.pinPath)
	return nil
}

// attachedIfaces names every interface with a pin directory below the link
// directory (attached or stale) and every interface of the current network
// namespace that this datapath is attached to.
func (a *app) attachedIfaces() ([]string, error) {
	var names []string
	entries, err := os.ReadDir(a.linkDir())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("read link pin directory: %w", err)
	}
	for _, e := range entries {
		if e.IsDir() {
			names = append(names, e.Name())
		}
	}
	ats, err := a.attachments()
	if err != nil {
		return nil, err
	}
	for _, at := range ats {
		names = append(names, at.Iface)
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}

// removePins removes ctd's pins from dir: every map pin of any layout
// version (migrations' temporary pins included) and the link directory.
// Entries ctd does not name so are left.
func removePins(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read pin path: %w", err)
	}
	for _, e := range entries {
		name, _, _ := strings.Cut(e.Name(), "~") // "ct_v1~migrating"
		if _, _, ok := loader.SplitName(name); !ok && e.Name() != linksDir {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("remove pin: %w", err)
		}
	}
	return nil
}
