package attach

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// AttachCgroup makes prog (a cgroup socket program of attach type at) the
// program of the link pinned at pin, which attaches it to the cgroup at cgroup: a
// pinned link is updated in place, otherwise a new link is attached beside
// whatever else is attached there (links are multi-attach, so datapaths of
// other pin paths keep theirs) and pinned. It reports whether it created
// the link (so that a caller undoing its work knows to remove it).
func AttachCgroup(cgroup string, at ebpf.AttachType, prog *ebpf.Program, pin string) (created bool, err error) {
	l, err := loadPinned(pin)
	if err != nil {
		return false, err
	}
	if l != nil {
		err := l.Update(prog)
		if err == nil {
			return false, l.Close()
		}
		if !errors.Is(err, unix.ENOLINK) {
			l.Close()
			return false, fmt.Errorf("update pinned cgroup link %s: %w", pin, err)
		}
		// Its cgroup is gone: replace it below.
		if err := discard(l); err != nil {
			return false, fmt.Errorf("remove stale pinned cgroup link %s: %w", pin, err)
		}
	}
	nl, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: at, Program: prog})
	if err != nil {
		return false, fmt.Errorf("attach %s program to cgroup %s: %w", at, cgroup, err)
	}
	if err := nl.Pin(pin); err != nil {
		nl.Close() // not pinned: closing detaches it again
		return false, fmt.Errorf("pin cgroup link to %s: %w", pin, err)
	}
	return true, nl.Close() // the pin keeps it attached
}

// DetachCgroup detaches and unpins the cgroup link pinned at pin; no pin is
// not an error.
func DetachCgroup(pin string) error {
	l, err := loadPinned(pin)
	if err != nil || l == nil {
		return err
	}
	if err := discard(l); err != nil {
		return fmt.Errorf("remove cgroup link %s: %w", pin, err)
	}
	return nil
}

// CgroupProgram returns the ID of the program of the cgroup link pinned at
// pin, or 0 if there is none.
func CgroupProgram(pin string) (ebpf.ProgramID, error) {
	l, err := loadPinned(pin)
	if err != nil || l == nil {
		return 0, err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return 0, fmt.Errorf("pinned cgroup link %s: %w", pin, err)
	}
	return info.Program, nil
}
