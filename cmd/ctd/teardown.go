package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/bpffs"
)

func newTeardownCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:         "teardown",
		Short:       "Detach ctd everywhere and remove every pin under the pin path",
		Annotations: map[string]string{annotationNoFinish: "yes"},
		Long: `Detach ctd from every interface it is attached to: the TCX links pinned
below <pin-path>/links and, in the current network namespace, the tc filters
whose programs use this pin path's maps. Then remove every pin below the pin
path and the directory itself. The conntrack table and all other state are
gone afterwards. Running it again, or where nothing is set up, does nothing.

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

	if err := removePinDir(a.pinPath); err != nil {
		return fmt.Errorf("teardown: %w", err)
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

// removePinDir removes everything below dir, unmounts dir if a bpffs is
// mounted on it (as bpffs.Ensure does for pin paths outside /sys/fs/bpf),
// and removes dir.
func removePinDir(dir string) error {
	mounted, err := isMountPoint(dir)
	if err != nil {
		return err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read pin path: %w", err)
	}
	for _, e := range entries {
		if mounted && isPreloaded(e.Name()) {
			continue // goes with the unmount
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("remove pin: %w", err)
		}
	}
	if mounted {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount bpffs at %s: %w", dir, err)
		}
	}
	if err := os.Remove(dir); err != nil {
		return fmt.Errorf("remove pin path: %w", err)
	}
	return nil
}

// isPreloaded reports whether name is one of the iterators the kernel places
// at the root of every bpffs mount (bpf_preload); they cannot be unlinked.
func isPreloaded(name string) bool { return name == "maps.debug" || name == "progs.debug" }

// isMountPoint reports whether dir is on another filesystem than its parent.
func isMountPoint(dir string) (bool, error) {
	var st, pst unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return false, fmt.Errorf("stat %s: %w", dir, err)
	}
	parent := filepath.Dir(filepath.Clean(dir))
	if err := unix.Stat(parent, &pst); err != nil {
		return false, fmt.Errorf("stat %s: %w", parent, err)
	}
	return st.Dev != pst.Dev, nil
}
