package migrate

import (
	"encoding/binary"
	"errors"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/bpf/v2test"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/pins"
	"github.com/ctd-dev/ctd/test/nettest"
)

// none is an Interfaces with nothing attached.
var none = Interfaces{Attached: func() ([]attach.Attachment, error) { return nil, nil }}

// setup loads a v1 datapath at a fresh pin path and closes it again: the
// maps stay pinned.
func setup(t *testing.T, o loader.Options) loader.Options {
	t.Helper()
	o.PinPath = nettest.PinPath(t)
	dp, err := loader.Load(o)
	if err != nil {
		t.Fatalf("loader.Load: %v", err)
	}
	dp.Close()
	return o
}

func openPinned(t *testing.T, pinPath, name string) *ebpf.Map {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, name), nil)
	if err != nil {
		t.Fatalf("open pinned %s: %v", name, err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// pinnedIDs maps each pin in pinPath (not the links directory) to the ID of
// the map pinned there.
func pinnedIDs(t *testing.T, pinPath string) map[string]ebpf.MapID {
	t.Helper()
	entries, err := os.ReadDir(pinPath)
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]ebpf.MapID)
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, e.Name()), nil)
		if err != nil {
			t.Fatalf("open pin %s: %v", e.Name(), err)
		}
		id, err := pins.MapID(m)
		m.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = id
	}
	return out
}

// ctKey returns a distinct key for i.
func ctKey(i int) bpf.CtdCtKey {
	k := bpf.CtdCtKey{Proto: 6, Family: 4, PortA: uint16(1024 + i%50000), PortB: 80}
	k.AddrA[0], k.AddrA[1], k.AddrA[2], k.AddrA[3] = 10, byte(i>>16), byte(i>>8), byte(i)
	k.AddrB[0], k.AddrB[3] = 10, 1
	if i%3 == 0 {
		k.Proto = 17
	}
	return k
}

// ctEntry returns an entry with every field set, different for each i.
func ctEntry(r *rand.Rand) bpf.CtdCtEntry {
	first := r.Uint64N(1 << 40)
	return bpf.CtdCtEntry{
		PacketsOrig:   r.Uint64N(1 << 20),
		BytesOrig:     r.Uint64N(1 << 30),
		PacketsReply:  r.Uint64N(1 << 20),
		BytesReply:    r.Uint64N(1 << 30),
		FirstSeen:     first,
		LastSeen:      first + r.Uint64N(1<<30),
		SrcIdentity:   r.Uint32(),
		DstIdentity:   r.Uint32(),
		Ifindex:       r.Uint32N(100),
		State:         uint8(r.UintN(6)),
		OrigIsB:       uint8(r.UintN(2)),
		TcpFlagsOrig:  uint8(r.UintN(32)),
		TcpFlagsReply: uint8(r.UintN(32)),
		Flags:         uint8(r.UintN(8)),
	}
}

// fillCT writes n entries into the v1 conntrack table at pinPath.
func fillCT(t *testing.T, pinPath string, n int) map[bpf.CtdCtKey]bpf.CtdCtEntry {
	t.Helper()
	m := openPinned(t, pinPath, bpf.CtdMapCtV1)
	r := rand.New(rand.NewPCG(uint64(n), 7))
	want := make(map[bpf.CtdCtKey]bpf.CtdCtEntry, n)
	for i := range n {
		k, e := ctKey(i), ctEntry(r)
		if err := m.Put(k, e); err != nil {
			t.Fatalf("put conntrack entry %d: %v", i, err)
		}
		want[k] = e
	}
	// An LRU hash evicts before it is full (its free nodes sit in per-CPU
	// lists): keep fills well below capacity, and say so if one was not.
	if got := len(readCT(t, m)); got != n {
		t.Fatalf("filled %d conntrack entries into max_entries %d, the LRU kept %d: fill less", n, m.MaxEntries(), got)
	}
	return want
}

// readCT reads a v1 conntrack table.
func readCT(t *testing.T, m *ebpf.Map) map[bpf.CtdCtKey]bpf.CtdCtEntry {
	t.Helper()
	got := make(map[bpf.CtdCtKey]bpf.CtdCtEntry)
	var (
		k bpf.CtdCtKey
		e bpf.CtdCtEntry
	)
	it := m.Iterate()
	for it.Next(&k, &e) {
		got[k] = e
	}
	if err := it.Err(); err != nil {
		t.Fatalf("read conntrack table: %v", err)
	}
	return got
}

// readCTv2 reads a v2 conntrack table.
func readCTv2(t *testing.T, m *ebpf.Map) map[v2test.CtdCtKey]v2test.CtdCtEntry {
	t.Helper()
	got := make(map[v2test.CtdCtKey]v2test.CtdCtEntry)
	var (
		k v2test.CtdCtKey
		e v2test.CtdCtEntry
	)
	it := m.Iterate()
	for it.Next(&k, &e) {
		got[k] = e
	}
	if err := it.Err(); err != nil {
		t.Fatalf("read conntrack table: %v", err)
	}
	return got
}

func checkCT(t *testing.T, m *ebpf.Map, want map[bpf.CtdCtKey]bpf.CtdCtEntry) {
	t.Helper()
	got := readCT(t, m)
	if len(got) != len(want) {
		t.Errorf("conntrack table holds %d entries, want %d", len(got), len(want))
	}
	bad := 0
	for k, w := range want {
		g, ok := got[k]
		switch {
		case !ok:
			t.Errorf("entry %v missing", k)
		case g != w:
			t.Errorf("entry %v = %+v, want %+v", k, g, w)
		default:
			continue
		}
		if bad++; bad > 5 {
			t.Fatal("too many differences")
		}
	}
}

// ipcacheKey returns a distinct /32 for i.
func ipcacheKey(i int) bpf.CtdIpcache4Key {
	return bpf.CtdIpcache4Key{Prefixlen: 32, Addr: [4]uint8{203, 0, byte(i >> 8), byte(i)}}
}

func fillIPCache(t *testing.T, pinPath string, n int) map[bpf.CtdIpcache4Key]bpf.CtdIpcacheValue {
	t.Helper()
	m := openPinned(t, pinPath, bpf.CtdMapIpcache4V1)
	want := make(map[bpf.CtdIpcache4Key]bpf.CtdIpcacheValue, n)
	for i := range n {
		k, v := ipcacheKey(i), bpf.CtdIpcacheValue{Identity: uint32(1000 + i)}
		if err := m.Put(k, v); err != nil {
			t.Fatalf("put ipcache entry %d: %v", i, err)
		}
		want[k] = v
	}
	return want
}

func readIPCache(t *testing.T, m *ebpf.Map) map[bpf.CtdIpcache4Key]bpf.CtdIpcacheValue {
	t.Helper()
	got := make(map[bpf.CtdIpcache4Key]bpf.CtdIpcacheValue)
	var (
		k bpf.CtdIpcache4Key
		v bpf.CtdIpcacheValue
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		got[k] = v
	}
	if err := it.Err(); err != nil {
		t.Fatalf("read ipcache: %v", err)
	}
	return got
}

// checkNoTempPins fails if a temporary pin is left in pinPath.
func checkNoTempPins(t *testing.T, pinPath string) {
	t.Helper()
	for name := range pinnedIDs(t, pinPath) {
		if strings.HasSuffix(name, pins.TempSuffix) {
			t.Errorf("temporary pin %s left behind", name)
		}
	}
}

// checkUnchanged fails unless the pins in pinPath are the same maps as before.
func checkUnchanged(t *testing.T, pinPath string, before map[string]ebpf.MapID) {
	t.Helper()
	if after := pinnedIDs(t, pinPath); !maps.Equal(before, after) {
		t.Errorf("pins changed from %v to %v", before, after)
	}
}

// ctRaw reads one conntrack entry in whatever layout the map has, as the
// merger's layout sees it.
type ctRaw struct {
	packetsOrig, packetsReply, bytesOrig, bytesReply uint64
	state                                            uint8
}

func readRaw(t *testing.T, m *ebpf.Map, spec *ebpf.MapSpec, key bpf.CtdCtKey) (ctRaw, bool) {
	t.Helper()
	l, err := ctLayoutOf(spec)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := binary.Append(nil, binary.NativeEndian, key)
	if err != nil {
		t.Fatal(err)
	}
	v := make([]byte, m.ValueSize())
	if err := m.Lookup(kb, v); errors.Is(err, ebpf.ErrKeyNotExist) {
		return ctRaw{}, false
	} else if err != nil {
		t.Fatalf("look up conntrack entry: %v", err)
	}
	ne := binary.NativeEndian
	return ctRaw{
		packetsOrig:  ne.Uint64(v[l.packetsOrig:]),
		packetsReply: ne.Uint64(v[l.packetsReply:]),
		bytesOrig:    ne.Uint64(v[l.bytesOrig:]),
		bytesReply:   ne.Uint64(v[l.bytesReply:]),
		state:        v[l.state],
	}, true
}
