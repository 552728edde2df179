package attach

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/bpffs"
)

func pinPath(linkDir, iface string, d direction) string {
	return filepath.Join(linkDir, iface, d.String())
}

// attachTCX makes prog the program of ctd's TCX link for iface/d: the pinned
// link is updated in place if it is still attached to ifindex, otherwise a
// stale pin is discarded and a new link is attached at the tail and pinned.
func attachTCX(ifindex int, d direction, prog *ebpf.Program, linkDir, iface string) error {
	pin := pinPath(linkDir, iface, d)

	l, err := loadPinned(pin)
	if err != nil {
		return err
	}
	if l != nil {
		live, err := liveOn(l, ifindex, d)
		if err != nil {
			l.Close()
			return fmt.Errorf("pinned link %s: %w", pin, err)
		}
		if live {
			err := l.Update(prog)
			if err == nil {
				return l.Close()
			}
			if !errors.Is(err, unix.ENOLINK) {
				l.Close()
				return fmt.Errorf("update pinned link %s: %w", pin, err)
			}
			// Severed between Info and Update: replace it below.
		}
		if err := discard(l); err != nil {
			return fmt.Errorf("remove stale pinned link %s: %w", pin, err)
		}
	}

	if err := bpffs.Ensure(linkDir); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
		return fmt.Errorf("create link pin directory: %w", err)
	}
	nl, err := link.AttachTCX(link.TCXOptions{
		Interface: ifindex,
		Program:   prog,
		Attach:    d.tcx,
		Anchor:    link.Tail(),
	})
	if err != nil {
		return err
	}
	if err := nl.Pin(pin); err != nil {
		nl.Close() // not pinned: closing detaches it again
		return fmt.Errorf("pin tcx link to %s: %w", pin, err)
	}
	return nl.Close() // the pin keeps it attached
}

// detachTCX detaches and unpins ctd's TCX links of iface, then removes the
// interface's pin directory. Missing pins are fine.
func detachTCX(linkDir, iface string) error {
	var errs []error
	for _, d := range directions() {
		pin := pinPath(linkDir, iface, d)
		l, err := loadPinned(pin)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if l == nil {
			continue
		}
		if err := discard(l); err != nil {
			errs = append(errs, fmt.Errorf("remove tcx %s link %s: %w", d, pin, err))
		}
	}
	if err := os.Remove(filepath.Join(linkDir, iface)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// tcxProgram returns the ID of the program of ctd's pinned TCX link for
// iface/d, or 0 if there is none or it is not attached to ifindex.
func tcxProgram(linkDir, iface string, d direction, ifindex int) (ebpf.ProgramID, error) {
	if linkDir == "" {
		return 0, nil
	}
	pin := pinPath(linkDir, iface, d)
	l, err := loadPinned(pin)
	if err != nil || l == nil {
		return 0, err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return 0, fmt.Errorf("pinned link %s: %w", pin, err)
	}
	if t := info.TCX(); t == nil || int(t.Ifindex) != ifindex || ebpf.AttachType(t.AttachType) != d.tcx {
		return 0, nil
	}
	return info.Program, nil
}

// loadPinned loads a pinned link, returning nil if there is no pin.
func loadPinned(pin string) (link.Link, error) {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	return l, nil
}

// liveOn reports whether l is a TCX link of direction d still attached to
// ifindex. A severed link reports ifindex 0.
func liveOn(l link.Link, ifindex int, d direction) (bool, error) {
	info, err := l.Info()
	if err != nil {
		return false, err
	}
	t := info.TCX()
	if t == nil {
		return false, fmt.Errorf("not a tcx link (type %d)", info.Type)
	}
	return int(t.Ifindex) == ifindex && ebpf.AttachType(t.AttachType) == d.tcx, nil
}

// discard detaches l even if other file descriptors keep it alive, removes
// its pin and closes it.
func discard(l link.Link) error {
	defer l.Close()
	if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
		return err
	}
	return l.Unpin()
}

// PinnedIfaces returns the interface names that have a pin directory in
// linkDir: attached, or stale pins of an interface that is gone.
func PinnedIfaces(linkDir string) ([]string, error) {
	if linkDir == "" {
		return nil, nil
	}
	entries, err := os.ReadDir(linkDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read link pin directory: %w", err)
	}
	var names []string
	for _, e := range entries {
		if e.IsDir() && checkIfaceName(e.Name()) == nil {
			names = append(names, e.Name())
		}
	}
	return names, nil
}
