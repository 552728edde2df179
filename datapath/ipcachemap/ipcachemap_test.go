package ipcachemap

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
)

// newTestMap creates unpinned ipcache tries of the given size; they go away
// with the test.
func newTestMap(t testing.TB, size uint32) *Map {
	t.Helper()
	spec, err := bpf.LoadCtd()
	if err != nil {
		t.Fatal(err)
	}
	var maps []*ebpf.Map
	for _, name := range []string{bpf.CtdMapIpcache4V1, bpf.CtdMapIpcache6V1, bpf.CtdMapIphost4V1, bpf.CtdMapIphost6V1} {
		ms := spec.Maps[name].Copy()
		ms.MaxEntries = size
		m, err := ebpf.NewMap(ms)
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		t.Cleanup(func() { m.Close() })
		maps = append(maps, m)
	}
	return New(maps[0], maps[1], maps[2], maps[3])
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func TestPutLookupDelete(t *testing.T) {
	m := newTestMap(t, 64)
	for _, e := range []Entry{
		{pfx("10.0.0.0/8"), 10},
		{pfx("10.1.0.0/16"), 11},
		{pfx("10.1.2.3/32"), 12},
		{pfx("0.0.0.0/1"), 13},
		{pfx("fd00::/8"), 20},
		{pfx("fd00:1::/32"), 21},
		{pfx("fd00:1::5/128"), 22},
	} {
		if err := m.Put(e.Prefix, e.Identity); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		addr  string
		want  string // "" = no match
		ident uint32
	}{
		{"10.1.2.3", "10.1.2.3/32", 12},
		{"10.1.2.4", "10.1.0.0/16", 11},
		{"10.2.0.1", "10.0.0.0/8", 10},
		{"11.0.0.1", "0.0.0.0/1", 13},
		{"128.0.0.1", "", IdentityWorld},
		{"fd00:1::5", "fd00:1::5/128", 22},
		{"fd00:1::6", "fd00:1::/32", 21},
		{"fd00:2::1", "fd00::/8", 20},
		{"fe80::1", "", IdentityWorld},
	} {
		e, found, err := m.Lookup(netip.MustParseAddr(tc.addr))
		if err != nil {
			t.Fatalf("Lookup(%s): %v", tc.addr, err)
		}
		if found != (tc.want != "") || e.Identity != tc.ident || (found && e.Prefix != pfx(tc.want)) {
			t.Errorf("Lookup(%s) = %v %d found=%v, want %q %d", tc.addr, e.Prefix, e.Identity, found, tc.want, tc.ident)
		}
	}

	for _, tc := range []struct {
		p  string
		id uint32 // 0: not a key
	}{
		{"10.0.0.0/8", 10},
		{"10.1.2.3/32", 12},
		{"10.1.0.0/16", 11},
		{"10.1.2.0/24", 0}, // covered by keys, not one itself
		{"0.0.0.0/0", 0},
		{"fd00:1::/32", 21},
		{"fd00:1::/33", 0},
	} {
		id, ok, err := m.Get(pfx(tc.p))
		if err != nil || ok != (tc.id != 0) || id != tc.id {
			t.Errorf("Get(%s) = %d, %v, %v; want %d", tc.p, id, ok, err, tc.id)
		}
	}

	if err := m.Delete(pfx("10.1.0.0/16")); err != nil {
		t.Fatal(err)
	}
	if e, _, _ := m.Lookup(netip.MustParseAddr("10.1.2.4")); e.Prefix != pfx("10.0.0.0/8") {
		t.Errorf("after deleting 10.1.0.0/16, 10.1.2.4 resolves to %v, want 10.0.0.0/8", e.Prefix)
	}
	if err := m.Delete(pfx("10.1.0.0/16")); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleting a missing prefix: %v, want ErrNotFound", err)
	}
	// Delete is exact: a covered prefix that is not a key is not found.
	if err := m.Delete(pfx("10.9.0.0/16")); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleting 10.9.0.0/16 (covered by 10.0.0.0/8): %v, want ErrNotFound", err)
	}
}

func TestPutRejects(t *testing.T) {
	m := newTestMap(t, 8)
	for _, tc := range []struct {
		p  netip.Prefix
		id uint32
	}{
		{pfx("10.0.0.1/8"), 5},
		{netip.Prefix{}, 5},
		{pfx("10.0.0.0/8"), 0},
	} {
		if err := m.Put(tc.p, tc.id); err == nil {
			t.Errorf("Put(%v, %d) succeeded", tc.p, tc.id)
		}
	}
	if got, err := m.List(); err != nil || len(got) != 0 {
		t.Errorf("map not empty after rejected puts: %v %v", got, err)
	}
}

func TestLookupEmptyAndSingle(t *testing.T) {
	m := newTestMap(t, 8)
	e, found, err := m.Lookup(netip.MustParseAddr("1.2.3.4"))
	if err != nil || found || e.Identity != IdentityWorld {
		t.Fatalf("empty map: %v %v %v", e, found, err)
	}
	// A single key is both the first and the last key of the trie.
	if err := m.Put(pfx("0.0.0.0/0"), 7); err != nil {
		t.Fatal(err)
	}
	e, found, err = m.Lookup(netip.MustParseAddr("1.2.3.4"))
	if err != nil || !found || e.Prefix != pfx("0.0.0.0/0") || e.Identity != 7 {
		t.Fatalf("only 0.0.0.0/0: %v %v %v", e, found, err)
	}
}

func TestBatchUpdateListDelete(t *testing.T) {
	const n = 3*BatchSize + 17 // several batches per family
	m := newTestMap(t, 2*n)
	rng := rand.New(rand.NewPCG(1, 2))
	set := map[netip.Prefix]uint32{}
	for len(set) < 2*n {
		var p netip.Prefix
		if len(set)%2 == 0 {
			p, _ = netip.AddrFrom4([4]byte{10, byte(rng.IntN(256)), byte(rng.IntN(256)), byte(rng.IntN(256))}).Prefix(8 + rng.IntN(25))
		} else {
			var b [16]byte
			b[0] = 0xfd
			for i := 1; i < 16; i++ {
				b[i] = byte(rng.IntN(256))
			}
			p, _ = netip.AddrFrom16(b).Prefix(8 + rng.IntN(121))
		}
		set[p] = 1 + rng.Uint32N(1<<31)
	}
	var entries []Entry
	for p, id := range set {
		entries = append(entries, Entry{p, id})
	}
	if n, err := m.BatchUpdate(entries); err != nil || n != len(entries) {
		t.Fatalf("BatchUpdate = %d, %v; want %d", n, err, len(entries))
	}
	got, err := m.List()
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(entries, Compare)
	if !slices.Equal(got, entries) {
		t.Fatalf("List returned %d entries, want %d (or contents differ)", len(got), len(entries))
	}

	// Delete half, plus some that are not there (skipped).
	var del []netip.Prefix
	for _, e := range entries[:len(entries)/2] {
		del = append(del, e.Prefix)
	}
	del = append(del, pfx("203.0.113.0/24"), pfx("fd00:dead::/32"))
	if n, err := m.BatchDelete(del); err != nil || n != len(entries)/2 {
		t.Fatalf("BatchDelete = %d, %v; want %d", n, err, len(entries)/2)
	}
	got, err = m.List()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, entries[len(entries)/2:]) {
		t.Fatalf("after BatchDelete List returned %d entries, want %d", len(got), len(entries)-len(entries)/2)
	}
}

func TestBatchUpdateFull(t *testing.T) {
	m := newTestMap(t, 4)
	var entries []Entry
	for i := range 6 {
		entries = append(entries, Entry{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(i), 0}), 24), 5})
	}
	n, err := m.BatchUpdate(entries)
	if !errors.Is(err, ErrFull) || n != 4 {
		t.Fatalf("BatchUpdate of 6 into a map of 4 = %d, %v; want 4 and ErrFull", n, err)
	}
	if err := m.Put(pfx("10.9.0.0/16"), 5); !errors.Is(err, ErrFull) {
		t.Fatalf("Put into a full map: %v, want ErrFull", err)
	}
	// Replacing an existing prefix needs no room.
	if err := m.Put(entries[0].Prefix, 6); err != nil {
		t.Fatalf("Put of an existing prefix into a full map: %v", err)
	}
}

// refLookup is the straightforward longest-prefix match.
func refLookup(entries map[netip.Prefix]uint32, a netip.Addr) (Entry, bool) {
	best, found := Entry{Identity: IdentityWorld}, false
	for p, id := range entries {
		if p.Contains(a) && (!found || p.Bits() > best.Prefix.Bits()) {
			best, found = Entry{p, id}, true
		}
	}
	return best, found
}

// randAddr returns an address in a small space (10.0.0.0/20 or fd00::/116)
// so that random prefixes nest and overlap often.
func randAddr(rng *rand.Rand, v6 bool) netip.Addr {
	if v6 {
		var b [16]byte
		b[0], b[1] = 0xfd, 0x00
		b[14], b[15] = byte(rng.IntN(16)), byte(rng.IntN(256))
		return netip.AddrFrom16(b)
	}
	return netip.AddrFrom4([4]byte{10, 0, byte(rng.IntN(16)), byte(rng.IntN(256))})
}

func TestLookupMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	m := newTestMap(t, 4096)
	entries := map[netip.Prefix]uint32{}
	for range 1500 {
		v6 := rng.IntN(2) == 1
		a := randAddr(rng, v6)
		bits := a.BitLen() - rng.IntN(13) // /20../32, /116../128
		p, _ := a.Prefix(bits)
		entries[p] = 1 + rng.Uint32N(1000)
	}
	var list []Entry
	for p, id := range entries {
		list = append(list, Entry{p, id})
	}
	if _, err := m.BatchUpdate(list); err != nil {
		t.Fatal(err)
	}
	for range 3000 {
		v6 := rng.IntN(2) == 1
		a := randAddr(rng, v6)
		if rng.IntN(10) == 0 { // outside every prefix
			a = netip.MustParseAddr("203.0.113.7")
			if v6 {
				a = netip.MustParseAddr("fd01::7")
			}
		}
		got, gotOK, err := m.Lookup(a)
		if err != nil {
			t.Fatal(err)
		}
		want, wantOK := refLookup(entries, a)
		if got != want || gotOK != wantOK {
			t.Fatalf("Lookup(%v) = %v %v, reference %v %v", a, got, gotOK, want, wantOK)
		}
	}
}
