package migrate

import (
	"fmt"
	"slices"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/datapath/loader"
)

// action is what becomes of one map of the spec.
type action int

const (
	keep     action = iota // the pinned map fits: use it
	create                 // nothing pinned: a new, empty map
	resize                 // same layout, another size: copy
	upgrade                // an older layout is pinned: convert
	recreate               // a ring buffer of another size: new, empty
)

// mapPlan is what Load does with one map of the spec.
type mapPlan struct {
	name    string // name this build uses
	table   string // name without its version, e.g. "ct4"
	spec    *ebpf.MapSpec
	action  action
	oldName string            // pinned name replaced (resize, upgrade, recreate)
	old     *ebpf.Map         // the pinned map (keep: the map used)
	conv    *loader.Converter // upgrade only

	new    *ebpf.Map         // the map replacing old, or created
	snap   map[string]string // pass 1: old key -> old value
	merger *ctMerger         // conntrack tables: merges pass 2 atomically
	report MapReport
}

// migrates reports whether the map's contents move to a new map.
func (p *mapPlan) migrates() bool {
	return p.action == resize || p.action == upgrade || p.action == recreate
}

// copies reports whether the map's entries are copied.
func (p *mapPlan) copies() bool { return p.action == resize || p.action == upgrade }

// final is the map the new programs use.
func (p *mapPlan) final() *ebpf.Map {
	if p.action == keep {
		return p.old
	}
	return p.new
}

// convert turns an old entry into one of this build's layout; a nil key
// means that the entry does not go into this map (it goes into another
// the old table feeds).
func (p *mapPlan) convert(k, v []byte) ([]byte, []byte, error) {
	if p.conv == nil {
		return k, v, nil
	}
	nk, nv, err := p.conv.Convert(k, v)
	if err != nil {
		return nil, nil, fmt.Errorf("convert %s entry to %s: %w", p.oldName, p.name, err)
	}
	if nk == nil {
		return nil, nil, nil
	}
	if len(nk) != int(p.spec.KeySize) || len(nv) != int(p.spec.ValueSize) {
		return nil, nil, fmt.Errorf("convert %s entry to %s: converter returned a %d-byte key and %d-byte value, want %d and %d",
			p.oldName, p.name, len(nk), len(nv), p.spec.KeySize, p.spec.ValueSize)
	}
	return nk, nv, nil
}

func (p *mapPlan) close() {
	for _, m := range []*ebpf.Map{p.old, p.new} {
		if m != nil {
			m.Close()
		}
	}
	if p.merger != nil {
		p.merger.Close()
	}
}

// plan decides what to do with every versioned map of the spec. It changes
// nothing; an error means that some pinned map cannot be migrated.
func (m *migration) plan() error {
	pinned, err := m.pins.MapNames()
	if err != nil {
		return err
	}
	var names []string
	for name := range m.spec.Maps {
		if _, _, ok := loader.SplitName(name); ok {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		table, _, _ := loader.SplitName(name)
		p := &mapPlan{name: name, table: table, spec: m.spec.Maps[name]}
		m.plans = append(m.plans, p)
		others := loader.OtherLayouts(name, pinned, m.cfg.converters)
		if slices.Contains(pinned, name) {
			if err := m.planPinned(p, others); err != nil {
				return err
			}
			continue
		}
		switch len(others) {
		case 0:
			p.action = create
		case 1:
			if err := m.planOther(p, others[0]); err != nil {
				return err
			}
		default:
			return &Error{Map: name, Pin: m.pins.Map(others[0]),
				Reason: fmt.Sprintf("several layouts of table %s are pinned (%s): remove the stale ones", table, strings.Join(others, ", "))}
		}
	}
	return nil
}

// planPinned plans a map whose name is pinned. Pins of other layouts of the
// same table beside it are left over from a migration that was interrupted
// after its switch; they are retired unless a program still uses them.
func (m *migration) planPinned(p *mapPlan, others []string) error {
	pin := m.pins.Map(p.name)
	old, err := m.pins.OpenMap(p.name, nil)
	if err != nil {
		return err
	}
	p.old, p.oldName = old, p.name
	for _, o := range others {
		used, err := m.pinUsed(o)
		if err != nil {
			return err
		}
		if used {
			return &Error{Map: p.name, Pin: m.pins.Map(o),
				Reason: fmt.Sprintf("both %s and %s are pinned and the attached programs use %s", o, p.name, o)}
		}
		m.stale = append(m.stale, o)
	}

	if p.spec.Compatible(old) == nil {
		p.action = keep
		return nil
	}
	if diff := layoutDiff(old, p.spec); diff != "" {
		return &Error{Map: p.name, Pin: pin, Reason: diff + " under the same name: a layout change needs a new map name and a converter"}
	}
	p.report = MapReport{Map: p.name, From: p.name, OldMaxEntries: old.MaxEntries(), MaxEntries: p.spec.MaxEntries}
	switch old.Type() {
	case ebpf.Hash, ebpf.LRUHash, ebpf.LPMTrie:
		p.action, p.report.Action = resize, Resize
	case ebpf.Array:
		if old.MaxEntries() > p.spec.MaxEntries {
			return &Error{Map: p.name, Pin: pin, Reason: fmt.Sprintf("max_entries %d pinned, this build wants %d: an array cannot shrink", old.MaxEntries(), p.spec.MaxEntries)}
		}
		p.action, p.report.Action = resize, Resize
	case ebpf.RingBuf:
		p.action, p.report.Action = recreate, Recreate
	default:
		return &Error{Map: p.name, Pin: pin, Reason: fmt.Sprintf("max_entries %d pinned, this build wants %d: the size of a %s is fixed by the build", old.MaxEntries(), p.spec.MaxEntries, old.Type())}
	}
	return nil
}

// planOther plans a map of which another layout is pinned.
func (m *migration) planOther(p *mapPlan, other string) error {
	pin := m.pins.Map(other)
	old, err := m.pins.OpenMap(other, nil)
	if err != nil {
		return err
	}
	p.old, p.oldName = old, other
	p.report = MapReport{Map: p.name, From: other, OldMaxEntries: old.MaxEntries(), MaxEntries: p.spec.MaxEntries}
	if old.Type() == ebpf.RingBuf && p.spec.Type == ebpf.RingBuf {
		p.action, p.report.Action = recreate, Recreate
		return nil
	}
	for i, c := range m.cfg.converters {
		if c.From == other && c.To == p.name {
			p.conv = &m.cfg.converters[i]
		}
	}
	if p.conv == nil {
		return &Error{Map: p.name, Pin: pin, Reason: fmt.Sprintf("this build has no converter from %s to %s (it converts %s)", other, p.name, converterList(m.cfg.converters))}
	}
	switch old.Type() {
	case ebpf.Hash, ebpf.LRUHash, ebpf.LPMTrie, ebpf.Array:
	default:
		return &Error{Map: p.name, Pin: pin, Reason: fmt.Sprintf("entries of a %s cannot be copied", old.Type())}
	}
	p.action, p.report.Action = upgrade, Upgrade
	return nil
}

// layoutDiff describes how a pinned map's layout differs from spec, ignoring
// its size; "" if only the size differs.
func layoutDiff(m *ebpf.Map, spec *ebpf.MapSpec) string {
	var d []string
	if m.Type() != spec.Type {
		d = append(d, fmt.Sprintf("type %s pinned, this build wants %s", m.Type(), spec.Type))
	}
	if m.KeySize() != spec.KeySize {
		d = append(d, fmt.Sprintf("key size %d pinned, this build wants %d", m.KeySize(), spec.KeySize))
	}
	if m.ValueSize() != spec.ValueSize {
		d = append(d, fmt.Sprintf("value size %d pinned, this build wants %d", m.ValueSize(), spec.ValueSize))
	}
	if m.Flags() != spec.Flags {
		d = append(d, fmt.Sprintf("flags %#x pinned, this build wants %#x", m.Flags(), spec.Flags))
	}
	return strings.Join(d, ", ")
}

func converterList(cs []loader.Converter) string {
	if len(cs) == 0 {
		return "nothing"
	}
	var s []string
	for _, c := range cs {
		s = append(s, c.From+" to "+c.To)
	}
	return strings.Join(s, ", ")
}

// pinUsed reports whether an attached program uses the map pinned as name.
func (m *migration) pinUsed(name string) (bool, error) {
	id, err := m.pins.MapID(name)
	if err != nil || id == 0 {
		return false, err
	}
	return usedBy(id, m.atts)
}
