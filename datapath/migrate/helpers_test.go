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
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/ctmap"
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

// setupV1 pins a datapath as the first release left it: the maps of this
// build that layout v1 shares, and the conntrack table of layout v1,
// ct_v1, with ct_unconfirmed_v1 beside it as later v1 builds added it.
func setupV1(t *testing.T, o loader.Options) loader.Options {
	t.Helper()
	o = setup(t, o)
	for _, name := range append(loader.ConntrackMaps[:], loader.CTGuardMap) {
		if err := os.Remove(filepath.Join(o.PinPath, name)); err != nil {
			t.Fatal(err)
		}
	}
	o = o.WithDefaults()
	for name, size := range map[string]uint32{loader.CTV1Map: o.CTMax, loader.CTUnconfirmedV1Map: o.CTUnconfirmedMax} {
		m, err := ebpf.NewMap(&ebpf.MapSpec{Name: name, Type: ebpf.LRUHash, KeySize: uint32(binary.Size(bpf.CtdCtV1Key{})),
			ValueSize: uint32(binary.Size(bpf.CtdCtV1Entry{})), MaxEntries: size})
		if err != nil {
			t.Fatal(err)
		}
		err = m.Pin(filepath.Join(o.PinPath, name))
		m.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	return o
}

// ctKey returns a distinct key for i: IPv4 for even i, IPv6 for odd.
func ctKey(i int) ctmap.Key {
	k := ctmap.Key{Proto: 6, Family: 4, PortA: uint16(1024 + i%50000), PortB: 80}
	k.AddrA[0], k.AddrA[1], k.AddrA[2], k.AddrA[3] = 10, byte(i>>16), byte(i>>8), byte(i)
	k.AddrB[0], k.AddrB[3] = 10, 1
	if i%2 == 1 {
		k.Family = 6
		k.AddrA[0], k.AddrB[0], k.AddrA[15], k.AddrB[15] = 0xfd, 0xfd, 7, 8
	}
	if i%3 == 0 {
		k.Proto = 17
	}
	return k
}

// v1Key is k in layout v1.
func v1Key(k ctmap.Key) bpf.CtdCtV1Key {
	return bpf.CtdCtV1Key{AddrA: k.AddrA, AddrB: k.AddrB, PortA: k.PortA, PortB: k.PortB, Proto: k.Proto, Family: k.Family}
}

// v1Entry is e in layout v1, and e as a conversion from it leaves it (the
// fields v2 adds zero).
func v1Entry(e ctmap.Entry) (bpf.CtdCtV1Entry, ctmap.Entry) {
	v1 := bpf.CtdCtV1Entry{
		PacketsOrig: e.PacketsOrig, BytesOrig: e.BytesOrig, PacketsReply: e.PacketsReply, BytesReply: e.BytesReply,
		FirstSeen: e.FirstSeen, LastSeen: e.LastSeen, SrcIdentity: e.SrcIdentity, DstIdentity: e.DstIdentity,
		Ifindex: e.Ifindex, State: e.State, OrigIsB: e.OrigIsB, TcpFlagsOrig: e.TcpFlagsOrig,
		TcpFlagsReply: e.TcpFlagsReply, Flags: e.Flags,
	}
	e.RttUs, e.SynNs, e.CgroupId, e.Pid, e.Comm = 0, 0, 0, 0, [16]int8{}
	return v1, e
}

// ctEntry returns an entry with every field set, different for each call.
func ctEntry(r *rand.Rand) ctmap.Entry {
	first := r.Uint64N(1 << 40)
	e := ctmap.Entry{
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
		RttUs:         r.Uint32(),
		SynNs:         r.Uint64(),
		CgroupId:      r.Uint64(),
		Pid:           r.Uint32(),
	}
	copy(e.Comm[:], []int8{'c', 't', 'd', int8(r.UintN(100))})
	return e
}

// conntrack opens the pinned conntrack tables of this build.
func conntrack(t *testing.T, pinPath string) *ctmap.Map {
	t.Helper()
	maps, err := loader.OpenPinned(pinPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { maps.Close() })
	return maps.Conntrack()
}

// fillCT writes n entries, of both families, into the conntrack tables at
// pinPath.
func fillCT(t *testing.T, pinPath string, n int) map[ctmap.Key]ctmap.Entry {
	t.Helper()
	ct := conntrack(t, pinPath)
	r := rand.New(rand.NewPCG(uint64(n), 7))
	want := make(map[ctmap.Key]ctmap.Entry, n)
	for i := range n {
		k, e := ctKey(i), ctEntry(r)
		if err := ct.Put(&k, &e); err != nil {
			t.Fatalf("put conntrack entry %d: %v", i, err)
		}
		want[k] = e
	}
	// An LRU hash evicts before it is full (its free nodes sit in per-CPU
	// lists): keep fills well below capacity, and say so if one was not.
	if got := len(readCT(t, ct)); got != n {
		t.Fatalf("filled %d conntrack entries into max_entries %d, the LRU kept %d: fill less", n, ct.MaxEntries(), got)
	}
	return want
}

// fillCTv1 writes n entries, of both families, into the v1 conntrack
// table ct_v1 at pinPath, and returns them as the conversion to v2 leaves
// them.
func fillCTv1(t *testing.T, pinPath string, n int) map[ctmap.Key]ctmap.Entry {
	t.Helper()
	m := openPinned(t, pinPath, loader.CTV1Map)
	r := rand.New(rand.NewPCG(uint64(n), 7))
	want := make(map[ctmap.Key]ctmap.Entry, n)
	for i := range n {
		k := ctKey(i)
		e, conv := v1Entry(ctEntry(r))
		if err := m.Put(v1Key(k), e); err != nil {
			t.Fatalf("put v1 conntrack entry %d: %v", i, err)
		}
		want[k] = conv
	}
	return want
}

// readCT reads the conntrack tables.
func readCT(t *testing.T, ct *ctmap.Map) map[ctmap.Key]ctmap.Entry {
	t.Helper()
	got := make(map[ctmap.Key]ctmap.Entry)
	if err := ct.Iterate(func(k *ctmap.Key, e *ctmap.Entry) bool {
		got[*k] = *e
		return true
	}); err != nil {
		t.Fatalf("read conntrack table: %v", err)
	}
	return got
}

func checkCT(t *testing.T, ct *ctmap.Map, want map[ctmap.Key]ctmap.Entry) {
	t.Helper()
	got := readCT(t, ct)
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

// rawKey is key as a map of spec's key size holds it: layout v1's key, or
// v2's of the key's family.
func rawKey(t *testing.T, spec *ebpf.MapSpec, key ctmap.Key) []byte {
	t.Helper()
	var raw any
	switch spec.KeySize {
	case uint32(binary.Size(bpf.CtdCtV1Key{})):
		raw = v1Key(key)
	case uint32(binary.Size(bpf.CtdCt4Key{})):
		raw = bpf.CtdCt4Key{AddrA: binary.NativeEndian.Uint32(key.AddrA[:4]), AddrB: binary.NativeEndian.Uint32(key.AddrB[:4]),
			PortA: key.PortA, PortB: key.PortB, Proto: key.Proto}
	default:
		raw = bpf.CtdCt6Key{AddrA: key.AddrA, AddrB: key.AddrB, PortA: key.PortA, PortB: key.PortB, Proto: key.Proto}
	}
	kb, err := binary.Append(nil, binary.NativeEndian, raw)
	if err != nil {
		t.Fatal(err)
	}
	return kb
}

func readRaw(t *testing.T, m *ebpf.Map, spec *ebpf.MapSpec, key ctmap.Key) (ctRaw, bool) {
	t.Helper()
	l, err := ctLayoutOf(spec)
	if err != nil {
		t.Fatal(err)
	}
	v := make([]byte, m.ValueSize())
	if err := m.Lookup(rawKey(t, spec, key), v); errors.Is(err, ebpf.ErrKeyNotExist) {
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
