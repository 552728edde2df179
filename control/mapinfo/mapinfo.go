// Package mapinfo inspects ctd's maps like bpftool, readable.
package mapinfo

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/pins"
)

// WarnFill is the fill, in percent, above which a map that can run full
// gets a warning.
const WarnFill = 80.0

// Map is one of ctd's maps and where it is pinned.
type Map struct {
	Name string
	Pin  string
	Map  *ebpf.Map
}

// Of lists the maps of a datapath pinned at pinPath, in loader.MapNames
// order. The maps stay owned by maps.
func Of(maps *loader.Maps, pinPath string) ([]Map, error) {
	byName := maps.ByName()
	out := make([]Map, 0, len(loader.MapNames))
	for _, name := range loader.MapNames {
		m := byName[name]
		if m == nil {
			return nil, fmt.Errorf("map %s is not open", name)
		}
		out = append(out, Map{Name: name, Pin: pins.New(pinPath).Map(name), Map: m})
	}
	return out, nil
}

// Info describes one map. Entries is what the map holds now:
//   - hash, LRU hash (and their per-CPU kinds): live entries, counted
//     exactly by reading the map with batch lookups;
//   - LPM trie: live entries, counted exactly by walking its keys (LPM tries
//     have no batch lookup);
//   - array, per-CPU array: max_entries, since every slot always exists;
//   - ring buffer: bytes written by the datapath and not yet consumed
//     (max_entries is its size in bytes).
//
// Fill is Entries over MaxEntries in percent (100 for arrays, which are
// preallocated and never run out); Memlock is the kernel's memlock charge
// as /proc/self/fdinfo reports it for the map's file descriptor.
type Info struct {
	Name       string  `json:"name"`
	Type       string  `json:"type"` // as bpftool names it: lru_hash, lpm_trie, ...
	KeySize    uint32  `json:"key_size"`
	ValueSize  uint32  `json:"value_size"`
	MaxEntries uint32  `json:"max_entries"`
	Entries    uint64  `json:"entries"`
	Fill       float64 `json:"fill"` // percent
	Memlock    uint64  `json:"memlock"`
	Pin        string  `json:"pin"`

	kind ebpf.MapType
}

// CanFill reports whether the map can run full: arrays cannot, nor
// socket storage (one value per socket, without a maximum).
func (i Info) CanFill() bool {
	switch i.kind {
	case ebpf.Array, ebpf.PerCPUArray, ebpf.SkStorage:
		return false
	}
	return true
}

// Warning returns a one-line warning when the map is fuller than WarnFill,
// or "".
func (i Info) Warning() string {
	if !i.CanFill() || i.Fill <= WarnFill {
		return ""
	}
	what := "entries"
	hint := ""
	switch i.kind {
	case ebpf.LRUHash, ebpf.LRUCPUHash:
		hint = ": it evicts the least recently used entries when full; raise its size or shorten the GC lifetimes"
	case ebpf.RingBuf:
		what = "bytes pending"
		hint = ": the consumer ('ctd monitor') falls behind and events will be lost"
	default:
		hint = ": inserts fail when it is full"
	}
	return fmt.Sprintf("map %s is %.1f%% full (%d of %d %s)%s", i.Name, i.Fill, i.Entries, i.MaxEntries, what, hint)
}

// Inspect describes one map, counting its entries.
func Inspect(m Map) (Info, error) {
	info, err := Describe(m)
	if err != nil {
		return Info{}, err
	}
	n, err := Count(m.Map)
	if err != nil {
		return Info{}, fmt.Errorf("inspect map %s: %w", m.Name, err)
	}
	return info.WithEntries(n), nil
}

// Describe describes one map without counting its entries (Entries and
// Fill are zero): one system call, whatever the map holds.
func Describe(m Map) (Info, error) {
	mi, err := m.Map.Info()
	if err != nil {
		return Info{}, fmt.Errorf("inspect map %s: %w", m.Name, err)
	}
	memlock, _ := mi.Memlock()
	return Info{
		Name:       m.Name,
		Type:       TypeName(mi.Type),
		KeySize:    mi.KeySize,
		ValueSize:  mi.ValueSize,
		MaxEntries: mi.MaxEntries,
		Memlock:    memlock,
		Pin:        m.Pin,
		kind:       mi.Type,
	}, nil
}

// WithEntries returns i with Entries n and the Fill they make.
func (i Info) WithEntries(n uint64) Info {
	i.Entries = n
	if i.MaxEntries > 0 {
		i.Fill = 100 * float64(n) / float64(i.MaxEntries)
	}
	return i
}

// InspectAll describes every map, in order.
func InspectAll(ms []Map) ([]Info, error) {
	out := make([]Info, 0, len(ms))
	for _, m := range ms {
		i, err := Inspect(m)
		if err != nil {
			return nil, err
		}
		out = append(out, i)
	}
	return out, nil
}

// Total sums what adds up over maps.
type Total struct {
	Maps    int
	Memlock uint64
}

// Sum totals infos.
func Sum(infos []Info) Total {
	t := Total{Maps: len(infos)}
	for _, i := range infos {
		t.Memlock += i.Memlock
	}
	return t
}

// Walks reports whether Count reads every entry of a map of type t (hash
// maps, LPM tries), rather than answering at once (arrays, ring buffers,
// socket storage).
func Walks(t ebpf.MapType) bool {
	switch t {
	case ebpf.Array, ebpf.PerCPUArray, ebpf.RingBuf, ebpf.SkStorage:
		return false
	}
	return true
}

// Count returns what a map holds now, as Info.Entries describes it. Socket
// storage cannot be walked from userspace (its keys are sockets): it
// counts 0.
func Count(m *ebpf.Map) (uint64, error) {
	switch m.Type() {
	case ebpf.SkStorage:
		return 0, nil
	case ebpf.Array, ebpf.PerCPUArray:
		return uint64(m.MaxEntries()), nil
	case ebpf.RingBuf:
		return ringPending(m)
	case ebpf.Hash, ebpf.LRUHash, ebpf.PerCPUHash, ebpf.LRUCPUHash:
		return countBatch(m)
	}
	return countKeys(m)
}

// batchEntries is how many entries one batch lookup reads.
const batchEntries = 4096

// countBatch counts a hash map's entries with batch lookups into buffers of
// raw keys and values.
func countBatch(m *ebpf.Map) (uint64, error) {
	valueSlots := batchEntries
	if m.Type() == ebpf.PerCPUHash || m.Type() == ebpf.LRUCPUHash {
		cpus, err := ebpf.PossibleCPU()
		if err != nil {
			return 0, err
		}
		valueSlots *= cpus
	}
	keys := byteArrays(int(m.KeySize()), batchEntries)
	vals := byteArrays(int(m.ValueSize()), valueSlots)
	var (
		cursor ebpf.MapBatchCursor
		total  uint64
	)
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		total += uint64(n)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return total, nil
		}
		if err != nil {
			return 0, fmt.Errorf("count entries: %w", err)
		}
		if n == 0 {
			return total, nil
		}
	}
}

// byteArrays returns a slice of n [size]byte, the shape BatchLookup wants.
func byteArrays(size, n int) any {
	return reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(size, reflect.TypeFor[byte]())), n, n).Interface()
}

// countKeys counts entries by walking the keys, for maps without batch
// lookups. A key deleted under the walk restarts it from the first key, as
// the kernel does; the count is then of the map as the walk found it.
func countKeys(m *ebpf.Map) (uint64, error) {
	var (
		key   []byte
		next  = make([]byte, m.KeySize())
		total uint64
	)
	for {
		var prev any
		if key != nil {
			prev = key
		}
		err := m.NextKey(prev, next)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return total, nil
		}
		if err != nil {
			return 0, fmt.Errorf("count entries: %w", err)
		}
		total++
		if key == nil {
			key = make([]byte, m.KeySize())
		}
		copy(key, next)
	}
}

// ringPending returns the bytes a ring buffer holds that its consumer has
// not read: producer position minus consumer position, read from the
// first two pages of the map, mapped read-only (which consumes nothing).
func ringPending(m *ebpf.Map) (uint64, error) {
	page := os.Getpagesize()
	mem, err := unix.Mmap(m.FD(), 0, 2*page, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return 0, fmt.Errorf("map ring buffer positions: %w", err)
	}
	defer unix.Munmap(mem)
	cons := atomic.LoadUint64((*uint64)(unsafe.Pointer(&mem[0])))
	prod := atomic.LoadUint64((*uint64)(unsafe.Pointer(&mem[page])))
	if prod < cons {
		return 0, nil
	}
	return prod - cons, nil
}

// TypeName names a map type as bpftool does.
func TypeName(t ebpf.MapType) string {
	if n, ok := typeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("type %d", uint32(t))
}

var typeNames = map[ebpf.MapType]string{
	ebpf.Hash:                "hash",
	ebpf.Array:               "array",
	ebpf.ProgramArray:        "prog_array",
	ebpf.PerfEventArray:      "perf_event_array",
	ebpf.PerCPUHash:          "percpu_hash",
	ebpf.PerCPUArray:         "percpu_array",
	ebpf.StackTrace:          "stack_trace",
	ebpf.CGroupArray:         "cgroup_array",
	ebpf.LRUHash:             "lru_hash",
	ebpf.LRUCPUHash:          "lru_percpu_hash",
	ebpf.LPMTrie:             "lpm_trie",
	ebpf.ArrayOfMaps:         "array_of_maps",
	ebpf.HashOfMaps:          "hash_of_maps",
	ebpf.DevMap:              "devmap",
	ebpf.SockMap:             "sockmap",
	ebpf.CPUMap:              "cpumap",
	ebpf.XSKMap:              "xskmap",
	ebpf.SockHash:            "sockhash",
	ebpf.CGroupStorage:       "cgroup_storage",
	ebpf.ReusePortSockArray:  "reuseport_sockarray",
	ebpf.PerCPUCGroupStorage: "percpu_cgroup_storage",
	ebpf.Queue:               "queue",
	ebpf.Stack:               "stack",
	ebpf.SkStorage:           "sk_storage",
	ebpf.DevMapHash:          "devmap_hash",
	ebpf.StructOpsMap:        "struct_ops",
	ebpf.RingBuf:             "ringbuf",
	ebpf.InodeStorage:        "inode_storage",
	ebpf.TaskStorage:         "task_storage",
	ebpf.BloomFilter:         "bloom_filter",
	ebpf.UserRingbuf:         "user_ringbuf",
	ebpf.CgroupStorage:       "cgrp_storage",
	ebpf.Arena:               "arena",
}
