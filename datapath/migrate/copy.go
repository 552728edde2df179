package migrate

import (
	"errors"
	"fmt"
	"reflect"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/loader"
)

// batchSize is how many entries one batch syscall moves.
const batchSize = 4096

// rows is n fixed-size records back to back in buf, also typed as a slice
// of [size]byte in v, which the batch syscalls take without copying.
type rows struct {
	size int
	buf  []byte
	v    reflect.Value
}

func newRows(n, size int) rows {
	v := reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(size, reflect.TypeFor[byte]())), n, n)
	return rows{size: size, buf: unsafe.Slice((*byte)(v.UnsafePointer()), n*size), v: v}
}

// first returns the first n records as a slice for a batch syscall.
func (r rows) first(n int) any { return r.v.Slice(0, n).Interface() }

// entries are a map's keys and values, raw, in the map's order.
type entries struct {
	keySize, valueSize int
	keys, values       []byte
}

func (e *entries) len() int { return len(e.keys) / e.keySize }

func (e *entries) key(i int) []byte {
	return e.keys[i*e.keySize : (i+1)*e.keySize : (i+1)*e.keySize]
}

func (e *entries) value(i int) []byte {
	return e.values[i*e.valueSize : (i+1)*e.valueSize : (i+1)*e.valueSize]
}

func (e *entries) add(k, v []byte) {
	e.keys = append(e.keys, k...)
	e.values = append(e.values, v...)
}

// readAll reads every entry of m with batch lookups, or by iterating where
// the map type has no batch operations. Entries written meanwhile may or
// may not be seen.
func readAll(m *ebpf.Map) (*entries, error) {
	e := &entries{keySize: int(m.KeySize()), valueSize: int(m.ValueSize())}
	size := batchSize
	keys, values := newRows(size, e.keySize), newRows(size, e.valueSize)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys.first(size), values.first(size), nil)
		e.keys = append(e.keys, keys.buf[:n*e.keySize]...)
		e.values = append(e.values, values.buf[:n*e.valueSize]...)
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return e, nil
		case errors.Is(err, ebpf.ErrNotSupported) && e.len() == 0:
			return iterateAll(m, e)
		case errors.Is(err, unix.ENOSPC) && size < 1<<20:
			// A hash bucket holds more entries than one batch.
			size *= 2
			keys, values = newRows(size, e.keySize), newRows(size, e.valueSize)
		case err != nil:
			return nil, fmt.Errorf("read map: %w", err)
		}
	}
}

func iterateAll(m *ebpf.Map, e *entries) (*entries, error) {
	k, v := make([]byte, e.keySize), make([]byte, e.valueSize)
	it := m.Iterate()
	for it.Next(k, v) {
		e.add(k, v)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read map: %w", err)
	}
	return e, nil
}

// writeAll writes every entry into m with batch updates, or one by one
// where the map type has no batch operations.
func writeAll(m *ebpf.Map, e *entries) error {
	n := e.len()
	keys, values := newRows(min(n, batchSize), e.keySize), newRows(min(n, batchSize), e.valueSize)
	for off := 0; off < n; {
		cnt := min(batchSize, n-off)
		copy(keys.buf, e.keys[off*e.keySize:(off+cnt)*e.keySize])
		copy(values.buf, e.values[off*e.valueSize:(off+cnt)*e.valueSize])
		_, err := m.BatchUpdate(keys.first(cnt), values.first(cnt), nil)
		if errors.Is(err, ebpf.ErrNotSupported) {
			for i := off; i < n; i++ {
				if err := m.Update(e.key(i), e.value(i), ebpf.UpdateAny); err != nil {
					return fmt.Errorf("write map: %w", err)
				}
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("write map: %w", err)
		}
		off += cnt
	}
	return nil
}

// hashLike reports whether t holds only the entries written to it, up to
// max_entries (as opposed to an array, which always holds all).
func hashLike(t ebpf.MapType) bool {
	return t == ebpf.Hash || t == ebpf.LRUHash || t == ebpf.LPMTrie
}

// copyFirst is pass 1: it copies every live entry of p.old into the new,
// empty map and remembers what it copied. The new map is not visible to
// anyone yet.
func (m *migration) copyFirst(p *mapPlan) error {
	old, err := readAll(p.old)
	if err != nil {
		return fmt.Errorf("map %s: %w", p.oldName, err)
	}
	conv := &entries{keySize: int(p.spec.KeySize), valueSize: int(p.spec.ValueSize)}
	p.snap = make(map[string]string, old.len())
	for i := range old.len() {
		k, v := old.key(i), old.value(i)
		if _, dup := p.snap[string(k)]; dup {
			continue // seen twice while the map changed: the first will do, pass 2 does the rest
		}
		p.snap[string(k)] = string(v)
		nk, nv, err := p.convert(k, v)
		if err != nil {
			return err
		}
		if nk != nil {
			conv.add(nk, nv)
		}
	}
	n := conv.len()
	if hashLike(p.spec.Type) && n > int(p.spec.MaxEntries) {
		return &Error{Map: p.name, Pin: m.pins.Map(p.oldName),
			Reason: fmt.Sprintf("%d live entries do not fit in max_entries %d: choose %s %d or more", n, p.spec.MaxEntries, loader.SizeFlag(p.table), n)}
	}

	nm := p.new
	if err := writeAll(nm, conv); err != nil {
		return fmt.Errorf("copy %s into new map %s: %w", p.oldName, p.name, err)
	}
	if hashLike(p.spec.Type) {
		got, err := readAll(nm)
		if err != nil {
			return fmt.Errorf("map %s: %w", p.name, err)
		}
		if got.len() != conv.len() {
			return &Error{Map: p.name, Pin: m.pins.Map(p.oldName),
				Reason: fmt.Sprintf("the new map kept %d of %d live entries (an LRU map evicts before it is full): choose %s larger than %d",
					got.len(), conv.len(), loader.SizeFlag(p.table), p.spec.MaxEntries)}
		}
	}
	p.report.Copied = n
	return nil
}

// catchUp is pass 2: it brings into p.new what was written to p.old after
// pass 1 read it. It runs once no old program runs any more.
func (m *migration) catchUp(p *mapPlan) (int, error) {
	cur, err := readAll(p.old)
	if err != nil {
		return 0, fmt.Errorf("map %s: %w", p.oldName, err)
	}
	if p.merger != nil {
		return p.mergeDatapath(cur)
	}
	return p.replay(cur)
}

// replay catches up a map that only the control plane writes: entries
// changed since pass 1 are written again, entries deleted since are deleted.
func (p *mapPlan) replay(cur *entries) (int, error) {
	changed := 0
	seen := make(map[string]bool, cur.len())
	for i := range cur.len() {
		k, v := cur.key(i), cur.value(i)
		seen[string(k)] = true
		if s, ok := p.snap[string(k)]; ok && s == string(v) {
			continue
		}
		nk, nv, err := p.convert(k, v)
		if err != nil {
			return changed, err
		}
		if nk == nil {
			continue
		}
		if err := p.new.Update(nk, nv, ebpf.UpdateAny); err != nil {
			return changed, fmt.Errorf("write map %s: %w", p.name, err)
		}
		changed++
	}
	if !hashLike(p.spec.Type) {
		return changed, nil
	}
	for k, v := range p.snap {
		if seen[k] {
			continue
		}
		nk, _, err := p.convert([]byte(k), []byte(v))
		if err != nil {
			return changed, err
		}
		if nk == nil {
			continue
		}
		if err := p.new.Delete(nk); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return changed, fmt.Errorf("delete from map %s: %w", p.name, err)
		}
		changed++
	}
	return changed, nil
}

// mergeDatapath catches up the conntrack table, which the programs write:
// what the new map lacks is inserted, what both have is merged atomically.
// Entries deleted from the old map since pass 1 (expired, evicted) stay:
// garbage collection treats them in the new map as it would have in the old.
func (p *mapPlan) mergeDatapath(cur *entries) (int, error) {
	changed := 0
	for i := range cur.len() {
		k, v := cur.key(i), cur.value(i)
		s, had := p.snap[string(k)]
		if had && s == string(v) {
			continue
		}
		nk, nv, err := p.convert(k, v)
		if err != nil {
			return changed, err
		}
		if nk == nil {
			continue
		}
		var ns []byte
		if had {
			if _, ns, err = p.convert(k, []byte(s)); err != nil {
				return changed, err
			}
		}
		if err := p.insertOrMerge(nk, nv, ns); err != nil {
			return changed, err
		}
		changed++
	}
	return changed, nil
}

// insertOrMerge inserts the entry unless the new map has it, else merges
// into it. An entry evicted between the two is inserted again.
func (p *mapPlan) insertOrMerge(k, v, snap []byte) error {
	for range 3 {
		err := p.new.Update(k, v, ebpf.UpdateNoExist)
		if err == nil {
			return nil
		}
		if !errors.Is(err, ebpf.ErrKeyExist) {
			return fmt.Errorf("write map %s: %w", p.name, err)
		}
		merged, err := p.merger.merge(k, v, snap)
		if err != nil {
			return fmt.Errorf("merge into map %s: %w", p.name, err)
		}
		if merged {
			return nil
		}
	}
	return fmt.Errorf("merge into map %s: the entry keeps appearing and vanishing", p.name)
}
