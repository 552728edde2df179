package migrate

import (
	"errors"
	"fmt"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/datapath/attach"
)

// switchPrograms attaches progs wherever ctd is attached. If one interface
// fails, the interfaces switched so far (and the failing one, which may be
// half switched) get their old programs back, which still use the old maps;
// restored reports whether that worked everywhere.
func (m *migration) switchPrograms(progs attach.Programs) (restored bool, err error) {
	type previous struct {
		at    attach.Attachment
		progs attach.Programs
	}
	var prev []previous
	defer func() {
		for _, p := range prev {
			p.progs.Ingress.Close()
			p.progs.Egress.Close()
		}
	}()
	for _, at := range m.atts {
		if at.Mode == "" {
			continue // listed, but nothing attached
		}
		if at.IngressProgID == 0 || at.EgressProgID == 0 {
			return true, fmt.Errorf("switch programs on %s: ctd is attached there in one direction only: run 'ctd attach --iface %s' first", at.Iface, at.Iface)
		}
		in, err := ebpf.NewProgramFromID(at.IngressProgID)
		if err != nil {
			return true, fmt.Errorf("switch programs on %s: open attached ingress program %d: %w", at.Iface, at.IngressProgID, err)
		}
		eg, err := ebpf.NewProgramFromID(at.EgressProgID)
		if err != nil {
			in.Close()
			return true, fmt.Errorf("switch programs on %s: open attached egress program %d: %w", at.Iface, at.EgressProgID, err)
		}
		prev = append(prev, previous{at, attach.Programs{Ingress: in, Egress: eg}})
	}

	for i, p := range prev {
		err := m.switchOne(p.at, progs)
		if err == nil {
			m.rep.Switched = append(m.rep.Switched, p.at.Iface)
			continue
		}
		errs := []error{fmt.Errorf("switch programs on %s: %w", p.at.Iface, err)}
		for j := i; j >= 0; j-- {
			back := prev[j]
			if _, err := m.pins.Attach(back.at.Iface, back.at.Mode, back.progs); err != nil {
				errs = append(errs, fmt.Errorf("switch %s back to its old programs: %w", back.at.Iface, err))
			}
		}
		m.rep.Switched = nil
		return len(errs) == 1, errors.Join(errs...)
	}
	return true, nil
}

func (m *migration) switchOne(at attach.Attachment, progs attach.Programs) error {
	if h := m.cfg.hooks.beforeSwitch; h != nil {
		if err := h(at.Iface); err != nil {
			return err
		}
	}
	_, err := m.pins.Attach(at.Iface, at.Mode, progs)
	return err
}

// quiesce returns once no BPF program that started before the call is still
// running: updating a map-in-map from userspace makes the kernel wait for an
// RCU grace period (maybe_wait_bpf_programs in kernel/bpf/syscall.c), and TC
// programs run inside RCU read-side sections.
func quiesce() error {
	inner := &ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1}
	outer, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.ArrayOfMaps, KeySize: 4, ValueSize: 4, MaxEntries: 1, InnerMap: inner})
	if err != nil {
		return fmt.Errorf("wait for the old programs to finish: %w", err)
	}
	defer outer.Close()
	im, err := ebpf.NewMap(inner)
	if err != nil {
		return fmt.Errorf("wait for the old programs to finish: %w", err)
	}
	defer im.Close()
	if err := outer.Put(uint32(0), im); err != nil {
		return fmt.Errorf("wait for the old programs to finish: %w", err)
	}
	return nil
}

// usedBy reports whether a program attached in atts uses the map with ID id.
func usedBy(id ebpf.MapID, atts []attach.Attachment) (bool, error) {
	for _, at := range atts {
		for _, pid := range []ebpf.ProgramID{at.IngressProgID, at.EgressProgID} {
			ids, err := attach.ProgramMaps(pid)
			if err != nil {
				return false, fmt.Errorf("program attached to %s: %w", at.Iface, err)
			}
			if slices.Contains(ids, id) {
				return true, nil
			}
		}
	}
	return false, nil
}
