package migrate

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/loader"
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

	linkDir := m.cfg.ifs.LinkDir
	for i, p := range prev {
		err := m.switchOne(p.at, progs, linkDir)
		if err == nil {
			m.rep.Switched = append(m.rep.Switched, p.at.Iface)
			continue
		}
		errs := []error{fmt.Errorf("switch programs on %s: %w", p.at.Iface, err)}
		for j := i; j >= 0; j-- {
			back := prev[j]
			if _, err := attach.Attach(back.at.Iface, back.at.Mode, back.progs, linkDir); err != nil {
				errs = append(errs, fmt.Errorf("switch %s back to its old programs: %w", back.at.Iface, err))
			}
		}
		m.rep.Switched = nil
		return len(errs) == 1, errors.Join(errs...)
	}
	return true, nil
}

func (m *migration) switchOne(at attach.Attachment, progs attach.Programs, linkDir string) error {
	if h := m.cfg.hooks.beforeSwitch; h != nil {
		if err := h(at.Iface); err != nil {
			return err
		}
	}
	_, err := attach.Attach(at.Iface, at.Mode, progs, linkDir)
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

func mapID(m *ebpf.Map) (ebpf.MapID, error) {
	info, err := m.Info()
	if err != nil {
		return 0, err
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("the kernel reports no map ID")
	}
	return id, nil
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

// defaultAttached lists what the datapath at pinPath has attached in the
// calling thread's network namespace: every interface with a pinned TCX
// link below linkDir, and every ctd tc filter whose programs use
// one of the maps pinned at pinPath (tc filters of a ctd with another pin
// path are left out).
func defaultAttached(pinPath, linkDir string) func() ([]attach.Attachment, error) {
	return func() ([]attach.Attachment, error) {
		ours, err := pinnedMapIDs(pinPath)
		if err != nil {
			return nil, err
		}
		return attach.ListUsing(linkDir, ours)
	}
}

// pinnedMapIDs returns the IDs of the maps pinned at pinPath, temporary
// pins included.
func pinnedMapIDs(pinPath string) ([]ebpf.MapID, error) {
	entries, err := os.ReadDir(pinPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read pin directory: %w", err)
	}
	var ids []ebpf.MapID
	for _, e := range entries {
		name := strings.TrimSuffix(e.Name(), tempSuffix)
		if _, _, ok := loader.SplitName(name); !ok || e.IsDir() {
			continue
		}
		pin := filepath.Join(pinPath, e.Name())
		pm, err := ebpf.LoadPinnedMap(pin, &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil, fmt.Errorf("open pinned map %s: %w", pin, err)
		}
		id, err := mapID(pm)
		pm.Close()
		if err != nil {
			return nil, fmt.Errorf("pinned map %s: %w", pin, err)
		}
		ids = append(ids, id)
	}
	return ids, nil
}
