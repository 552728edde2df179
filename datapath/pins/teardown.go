package pins

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/bpffs"
)

// Teardown is what Dir.Teardown did.
type Teardown struct {
	Existed  bool     // false: there was nothing to tear down
	Detached []string // interfaces ctd was detached from, in order
}

// Teardown detaches the datapath everywhere it can see (every interface
// with links pinned below Links, attached or stale, and every interface of
// the calling thread's network namespace this datapath is attached to),
// then removes every pin and the directory. A directory that does not
// exist is not an error. If detaching fails, the pins stay, so that a retry
// finds every attachment again; the interfaces detached so far are in the
// result.
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
	if err := removeDir(d.path); err != nil {
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

// removeDir removes everything below dir, unmounts dir if a bpffs is
// mounted on it (as bpffs.Ensure does for pin paths outside /sys/fs/bpf),
// and removes dir.
func removeDir(dir string) error {
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
