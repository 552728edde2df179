package pins

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/bpffs"
	"github.com/ctd-dev/ctd/datapath/loader"
)

// Teardown is what Dir.Teardown did.
type Teardown struct {
	Existed  bool     // false: there was nothing to tear down
	Detached []string // interfaces ctd was detached from, in order
	Kept     string   // why the directory was kept ("" when it was removed)
}

// Teardown detaches the datapath everywhere it can see (every interface
// with links pinned below Links, attached or stale, every interface of
// the calling thread's network namespace this datapath is attached to,
// and the cgroup v2 root),
// then removes ctd's pins, and the directory and its bpffs mount where ctd
// made them (bpffs.Release): entries of other tools, and a directory or
// mount ctd did not make, stay. A directory that does not exist is not an
// error. If detaching fails, the pins stay, so that a retry finds every
// attachment again; the interfaces detached so far are in the result.
func (d Dir) Teardown() (Teardown, error) {
	var t Teardown
	if _, err := os.Lstat(d.path); errors.Is(err, os.ErrNotExist) {
		return t, nil
	}
	t.Existed = true
	ok, err := bpffs.IsBPFFS(d.path)
	if err != nil {
		return t, err
	}
	if !ok {
		return t, fmt.Errorf("pin path %s is not on a bpffs, so it holds no ctd pins: refusing to remove it", d.path)
	}

	ifaces, err := d.attachedIfaces()
	if err != nil {
		return t, fmt.Errorf("teardown: %w", err)
	}
	for _, iface := range ifaces {
		if err := d.Detach(iface); err != nil {
			return t, fmt.Errorf("teardown: %w", err)
		}
		t.Detached = append(t.Detached, iface)
	}
	if err := d.DetachOwner(); err != nil {
		return t, fmt.Errorf("teardown: %w", err)
	}
	if err := d.removePins(); err != nil {
		return t, fmt.Errorf("teardown: %w", err)
	}
	if t.Kept, err = bpffs.Release(d.path); err != nil {
		return t, fmt.Errorf("teardown: %w", err)
	}
	return t, nil
}

// attachedIfaces names every interface with a pin directory below Links
// (attached or stale) and every interface of the current network namespace
// that this datapath is attached to.
func (d Dir) attachedIfaces() ([]string, error) {
	names, err := attach.PinnedIfaces(d.Links())
	if err != nil {
		return nil, err
	}
	ats, err := d.Attachments()
	if err != nil {
		return nil, err
	}
	for _, at := range ats {
		names = append(names, at.Iface)
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}

// removePins removes ctd's pins: every map pin of any layout version,
// temporary pins included, and the links directory (the cgroup link is
// gone already). Entries ctd does not name so are left.
func (d Dir) removePins() error {
	entries, err := os.ReadDir(d.path)
	if err != nil {
		return fmt.Errorf("read pin path: %w", err)
	}
	for _, e := range entries {
		name := strings.TrimSuffix(e.Name(), TempSuffix)
		if _, _, ok := loader.SplitName(name); !ok && e.Name() != filepath.Base(d.Links()) {
			continue
		}
		if err := os.RemoveAll(filepath.Join(d.path, e.Name())); err != nil {
			return fmt.Errorf("remove pin: %w", err)
		}
	}
	return nil
}
