package migrate

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/pins"
)

// recover deals with the temporary pins of a migration that was
// interrupted. If no attached program uses the map, the migration stopped
// before its switch: the old maps are still the live ones and the pin is
// removed. Otherwise it stopped after the switch: the map is moved to its
// final name, after inserting what the map it replaces holds and it lacks.
func (m *migration) recover() error {
	names, err := m.pins.TempNames()
	if err != nil {
		return err
	}
	for _, name := range names {
		if err := m.recoverPin(name); err != nil {
			return fmt.Errorf("complete interrupted migration of %s: %w", name, err)
		}
	}
	return nil
}

func (m *migration) recoverPin(name string) error {
	temp := m.pins.Temp(name)
	used, err := m.pinUsed(name + pins.TempSuffix)
	if err != nil {
		return err
	}
	if !used {
		if err := os.Remove(temp); err != nil {
			return err
		}
		m.rep.Recovered = append(m.rep.Recovered, fmt.Sprintf("removed %s: its migration stopped before the switch", filepath.Base(temp)))
		return nil
	}

	oldName, err := m.replacedBy(name)
	if err != nil {
		return err
	}
	caught := 0
	if oldName != "" {
		if caught, err = m.insertMissing(oldName, name); err != nil {
			return err
		}
	}
	if err := os.Rename(temp, m.pins.Map(name)); err != nil {
		return err
	}
	if oldName != "" && oldName != name {
		if err := os.Remove(m.pins.Map(oldName)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	m.rep.Recovered = append(m.rep.Recovered, fmt.Sprintf("completed %s: pinned it as %s after inserting %d entries missing from it", filepath.Base(temp), name, caught))
	return nil
}

// replacedBy returns the pinned map that the map named name replaces: name
// itself (a resize) or the one pinned other layout of its table, or "".
func (m *migration) replacedBy(name string) (string, error) {
	pinned, err := m.pins.MapNames()
	if err != nil {
		return "", err
	}
	if slices.Contains(pinned, name) {
		return name, nil
	}
	others := loader.OtherLayouts(name, pinned, m.cfg.converters)
	if len(others) > 1 {
		table, _, _ := loader.SplitName(name)
		return "", fmt.Errorf("several layouts of table %s are pinned (%s)", table, strings.Join(others, ", "))
	}
	if len(others) == 1 {
		return others[0], nil
	}
	return "", nil
}

// insertMissing copies the entries of the map pinned as oldName that the
// temporary pin of name lacks. Counters of entries both hold are not
// merged: the snapshot of pass 1 that would tell their growth died with
// the process.
func (m *migration) insertMissing(oldName, name string) (int, error) {
	old, err := m.pins.OpenMap(oldName, nil)
	if err != nil {
		return 0, err
	}
	defer old.Close()
	nm, err := m.pins.OpenMap(name+pins.TempSuffix, nil)
	if err != nil {
		return 0, err
	}
	defer nm.Close()
	if old.Type() == ebpf.RingBuf || nm.Type() == ebpf.RingBuf {
		return 0, nil
	}
	p := &mapPlan{name: name, oldName: oldName, spec: &ebpf.MapSpec{KeySize: nm.KeySize(), ValueSize: nm.ValueSize()}}
	if oldName != name {
		for i, c := range m.cfg.converters {
			if c.From == oldName && c.To == name {
				p.conv = &m.cfg.converters[i]
			}
		}
		if p.conv == nil {
			return 0, fmt.Errorf("this build has no converter from %s to %s", oldName, name)
		}
	}
	cur, err := readAll(old)
	if err != nil {
		return 0, fmt.Errorf("map %s: %w", oldName, err)
	}
	inserted := 0
	for i := range cur.len() {
		nk, nv, err := p.convert(cur.key(i), cur.value(i))
		if err != nil {
			return inserted, err
		}
		if nk == nil {
			continue
		}
		err = nm.Update(nk, nv, ebpf.UpdateNoExist)
		if errors.Is(err, ebpf.ErrKeyExist) {
			continue
		}
		if err != nil {
			return inserted, fmt.Errorf("write map %s: %w", name, err)
		}
		inserted++
	}
	return inserted, nil
}
