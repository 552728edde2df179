package migrate

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/bpffs"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/pins"
)

// migration is the state of one Load.
type migration struct {
	cfg   config
	spec  *ebpf.CollectionSpec
	pins  pins.Dir
	rep   *Report
	atts  []attach.Attachment
	plans []*mapPlan
	stale []string // pins of older layouts to retire
}

func (m *migration) run() (*ebpf.Collection, error) {
	if err := bpffs.Prepare(m.pins.Path()); err != nil {
		return nil, err
	}
	atts, err := m.cfg.ifs.Attached()
	if err != nil {
		return nil, fmt.Errorf("list the interfaces ctd is attached to: %w", err)
	}
	m.atts = atts
	if err := m.recover(); err != nil {
		return nil, err
	}
	defer func() {
		for _, p := range m.plans {
			p.close()
		}
	}()
	if err := m.plan(); err != nil {
		return nil, err
	}
	if !m.migrating() {
		return m.loadInPlace()
	}
	return m.migrate()
}

func (m *migration) migrating() bool {
	for _, p := range m.plans {
		if p.migrates() {
			return true
		}
	}
	return false
}

// finalMaps are the maps the new programs use, by name.
func (m *migration) finalMaps() map[string]*ebpf.Map {
	out := make(map[string]*ebpf.Map, len(m.plans))
	for _, p := range m.plans {
		out[p.name] = p.final()
	}
	return out
}

// load loads the programs against the final maps.
func (m *migration) load() (*ebpf.Collection, attach.Programs, error) {
	coll, err := ebpf.NewCollectionWithOptions(m.spec, ebpf.CollectionOptions{MapReplacements: m.finalMaps()})
	if err != nil {
		return nil, attach.Programs{}, fmt.Errorf("load datapath programs: %w", err)
	}
	progs := attach.Programs{Ingress: coll.Programs[bpf.CtdProgCtdIngress], Egress: coll.Programs[bpf.CtdProgCtdEgress]}
	if progs.Ingress == nil || progs.Egress == nil {
		coll.Close()
		return nil, attach.Programs{}, fmt.Errorf("load datapath programs: the spec lacks %s or %s", bpf.CtdProgCtdIngress, bpf.CtdProgCtdEgress)
	}
	return coll, progs, nil
}

// createMaps creates the maps that nothing pinned stands for.
func (m *migration) createMaps() error {
	for _, p := range m.plans {
		if p.action != create && p.action != recreate {
			continue
		}
		nm, err := ebpf.NewMap(p.spec)
		if err != nil {
			return fmt.Errorf("create map %s: %w", p.name, err)
		}
		p.new = nm
	}
	return nil
}

// pinCreated pins the created maps under their names. If a pin fails (say
// another process pinned the same name meanwhile), the pins made here are
// removed again.
func (m *migration) pinCreated() error {
	var pinned []*mapPlan
	for _, p := range m.plans {
		if p.action != create {
			continue
		}
		if err := p.new.Pin(m.pins.Map(p.name)); err != nil {
			for _, q := range pinned {
				q.new.Unpin()
			}
			return fmt.Errorf("pin map %s: %w", p.name, err)
		}
		pinned = append(pinned, p)
	}
	return nil
}

// loadInPlace loads the programs when no map migrates.
func (m *migration) loadInPlace() (*ebpf.Collection, error) {
	if err := m.createMaps(); err != nil {
		return nil, err
	}
	coll, _, err := m.load()
	if err != nil {
		return nil, err
	}
	if err := m.pinCreated(); err != nil {
		coll.Close()
		return nil, err
	}
	if err := m.retireStale(); err != nil {
		coll.Close()
		return nil, err
	}
	return coll, nil
}

// migrate runs the sequence described in the package documentation.
func (m *migration) migrate() (*ebpf.Collection, error) {
	coll, progs, err := m.prepare()
	if err != nil {
		return nil, err
	}
	if err := m.pinTemps(); err != nil {
		coll.Close()
		return nil, err
	}
	if restored, err := m.switchPrograms(progs); err != nil {
		// Where an interface could not be switched back, its programs use
		// the new maps: keep their temporary pins for the next Load.
		if restored {
			m.unpinTemps()
		}
		coll.Close()
		return nil, err
	}

	// Switched: from here on the new datapath is live and only moves forward.
	if err := m.commit(); err != nil {
		coll.Close()
		return nil, fmt.Errorf("complete the migration after switching the programs (the next start finishes it): %w", err)
	}
	return coll, nil
}

// prepare creates the new maps, loads the programs against them and runs
// pass 1 last, so that little time passes between pass 1 and the switch.
// It changes nothing visible.
func (m *migration) prepare() (*ebpf.Collection, attach.Programs, error) {
	for _, p := range m.plans {
		if !p.copies() {
			continue
		}
		nm, err := ebpf.NewMap(p.spec)
		if err != nil {
			return nil, attach.Programs{}, fmt.Errorf("create map %s: %w", p.name, err)
		}
		p.new = nm
		if loader.IsConntrackTable(p.table) { // written by the datapath
			mg, err := newCTMerger(p.new, p.spec)
			if err != nil {
				return nil, attach.Programs{}, fmt.Errorf("map %s: %w", p.name, err)
			}
			p.merger = mg
		}
	}
	if err := m.createMaps(); err != nil {
		return nil, attach.Programs{}, err
	}
	coll, progs, err := m.load()
	if err != nil {
		return nil, attach.Programs{}, err
	}
	for _, p := range m.plans {
		if p.copies() {
			if err := m.copyFirst(p); err != nil {
				coll.Close()
				return nil, attach.Programs{}, err
			}
		}
	}
	if h := m.cfg.hooks.afterCopy; h != nil {
		if err := h(); err != nil {
			coll.Close()
			return nil, attach.Programs{}, err
		}
	}
	return coll, progs, nil
}

// pinTemps pins the new maps under temporary names, so that an interrupted
// migration can be completed or undone by the next Load.
func (m *migration) pinTemps() error {
	for _, p := range m.plans {
		if !p.migrates() {
			continue
		}
		if err := p.new.Pin(m.pins.Temp(p.name)); err != nil {
			m.unpinTemps()
			return fmt.Errorf("pin new map %s: %w", p.name, err)
		}
	}
	return nil
}

func (m *migration) unpinTemps() {
	for _, p := range m.plans {
		if p.migrates() {
			os.Remove(m.pins.Temp(p.name))
		}
	}
}

// commit finishes a migration whose programs are switched: wait until no
// old program runs, swap the pins, catch up with pass 2.
func (m *migration) commit() error {
	if err := quiesce(); err != nil {
		return err
	}
	if h := m.cfg.hooks.afterSwitch; h != nil {
		nm := make(map[string]*ebpf.Map)
		for _, p := range m.plans {
			if p.migrates() {
				nm[p.name] = p.new
			}
		}
		if err := h(nm); err != nil {
			return err
		}
	}
	if err := m.pinCreated(); err != nil {
		return err
	}
	for _, p := range m.plans {
		if !p.migrates() {
			continue
		}
		if err := os.Rename(m.pins.Temp(p.name), m.pins.Map(p.name)); err != nil {
			return fmt.Errorf("pin new map %s: %w", p.name, err)
		}
		if p.oldName != p.name {
			if err := os.Remove(m.pins.Map(p.oldName)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("retire pin of %s: %w", p.oldName, err)
			}
		}
	}
	if err := m.retireStale(); err != nil {
		return err
	}
	var errs []error
	for _, p := range m.plans {
		if p.copies() {
			n, err := m.catchUp(p)
			p.report.CaughtUp = n
			if err != nil {
				errs = append(errs, fmt.Errorf("map %s: entries written during the copy may be missing: %w", p.name, err))
			}
		}
		if p.migrates() {
			m.rep.Maps = append(m.rep.Maps, p.report)
		}
	}
	return errors.Join(errs...)
}

// retireStale removes pins of older layouts that no program uses.
func (m *migration) retireStale() error {
	for _, name := range m.stale {
		pin := m.pins.Map(name)
		if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("retire stale pin %s: %w", pin, err)
		}
		m.rep.Retired = append(m.rep.Retired, name)
	}
	return nil
}
