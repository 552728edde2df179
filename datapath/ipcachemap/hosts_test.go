package ipcachemap

import (
	"errors"
	"net/netip"
	"slices"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
)

// trieKey is p's key in its family's trie.
func trieKey(p netip.Prefix) any {
	if p.Addr().Is4() {
		k := key4(p)
		return &k
	}
	k := key6(p)
	return &k
}

// inTrie and inHash report where p is stored.
func (m *Map) inTrie(t *testing.T, p netip.Prefix) bool {
	t.Helper()
	tm, _ := m.trie(p)
	ok, err := isKeyOf(tm, p)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

func isKeyOf(tm *ebpf.Map, p netip.Prefix) (bool, error) {
	first, ok, err := nextKey(tm, p.Addr().Is4(), nil)
	if err != nil || !ok {
		return false, err
	}
	return isKey(tm, p, first)
}

func (m *Map) inHash(t *testing.T, p netip.Prefix) bool {
	t.Helper()
	_, ok, err := m.lookupHost(p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// putTrie writes p into its family's trie, host entries too, as a datapath
// pinned before the hashes holds them.
func (m *Map) putTrie(t *testing.T, p netip.Prefix, id uint32) {
	t.Helper()
	tm, _ := m.trie(p)
	if err := tm.Put(trieKey(p), &Value{Identity: id}); err != nil {
		t.Fatal(err)
	}
}

func TestHostEntriesInHashes(t *testing.T) {
	m := newTestMap(t, 64)
	entries := []Entry{
		{pfx("10.0.0.0/8"), 10},
		{pfx("10.1.2.3/32"), 12},
		{pfx("fd00::/8"), 20},
		{pfx("fd00::5/128"), 22},
	}
	if _, err := m.BatchUpdate(entries[:2]); err != nil {
		t.Fatal(err)
	}
	for _, e := range entries[2:] {
		if err := m.Put(e.Prefix, e.Identity); err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range entries {
		if IsHost(e.Prefix) != m.inHash(t, e.Prefix) || IsHost(e.Prefix) == m.inTrie(t, e.Prefix) {
			t.Errorf("%v: in the hash %v, in the trie %v; want host entries in the hash only, CIDRs in the trie only",
				e.Prefix, m.inHash(t, e.Prefix), m.inTrie(t, e.Prefix))
		}
		if id, ok, err := m.Get(e.Prefix); err != nil || !ok || id != e.Identity {
			t.Errorf("Get(%v) = %d %v %v, want %d", e.Prefix, id, ok, err, e.Identity)
		}
	}
	if got, err := m.List(); err != nil || !slices.Equal(got, entries) {
		t.Fatalf("List = %v, %v; want %v", got, err, entries)
	}
	if err := m.Delete(pfx("10.1.2.3/32")); err != nil {
		t.Fatal(err)
	}
	if n, err := m.BatchDelete([]netip.Prefix{pfx("fd00::5/128"), pfx("fd00::6/128")}); err != nil || n != 1 {
		t.Fatalf("BatchDelete = %d, %v; want 1", n, err)
	}
	if got, err := m.List(); err != nil || !slices.Equal(got, []Entry{entries[0], entries[2]}) {
		t.Fatalf("after the deletes List = %v, %v", got, err)
	}
	if err := m.Delete(pfx("10.1.2.3/32")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Delete of a host entry already gone: %v, want ErrNotFound", err)
	}
}

func TestHostsFull(t *testing.T) {
	m := newTestMap(t, 2)
	hosts := []Entry{{pfx("10.0.0.1/32"), 5}, {pfx("10.0.0.2/32"), 5}, {pfx("10.0.0.3/32"), 5}}
	if n, err := m.BatchUpdate(hosts); !errors.Is(err, ErrFull) || n != 2 {
		t.Fatalf("BatchUpdate of 3 host entries into a hash of 2 = %d, %v; want 2 and ErrFull", n, err)
	}
	// The tries are apart: a CIDR still fits.
	if err := m.Put(pfx("10.0.0.0/24"), 6); err != nil {
		t.Fatal(err)
	}
}

// A datapath pinned before the hashes holds host entries in the tries:
// every method sees them, and the hash's entry wins where both hold one.
func TestHostEntriesLeftInTries(t *testing.T) {
	m := newTestMap(t, 64)
	m.putTrie(t, pfx("10.0.0.0/24"), 3)
	m.putTrie(t, pfx("10.0.0.1/32"), 5)
	m.putTrie(t, pfx("10.0.0.2/32"), 6)
	m.putTrie(t, pfx("fd00::1/128"), 8)
	if err := m.Put(pfx("10.0.0.2/32"), 7); err != nil {
		t.Fatal(err)
	}
	want := []Entry{{pfx("10.0.0.0/24"), 3}, {pfx("10.0.0.1/32"), 5}, {pfx("10.0.0.2/32"), 7}, {pfx("fd00::1/128"), 8}}
	if got, err := m.List(); err != nil || !slices.Equal(got, want) {
		t.Fatalf("List = %v, %v; want %v", got, err, want)
	}
	for _, e := range want {
		got, found, err := m.Lookup(e.Prefix.Addr())
		if err != nil || !found || got != e {
			t.Errorf("Lookup(%v) = %v %v %v, want %v", e.Prefix.Addr(), got, found, err, e)
		}
	}
	// Deleting a host entry held by both leaves neither: the address
	// falls back to the /24, not to the trie's older identity.
	if err := m.Delete(pfx("10.0.0.2/32")); err != nil {
		t.Fatal(err)
	}
	if e, _, err := m.Lookup(netip.MustParseAddr("10.0.0.2")); err != nil || e.Identity != 3 {
		t.Fatalf("after Delete 10.0.0.2 resolves to %v, %v; want 3 (the /24)", e, err)
	}
	// A batch delete finds the entries the hash does not have in the trie.
	if n, err := m.BatchDelete([]netip.Prefix{pfx("10.0.0.1/32"), pfx("fd00::1/128")}); err != nil || n != 2 {
		t.Fatalf("BatchDelete of host entries left in the tries = %d, %v; want 2", n, err)
	}
	if got, err := m.List(); err != nil || !slices.Equal(got, want[:1]) {
		t.Fatalf("after the deletes List = %v, %v", got, err)
	}
}

// MoveHosts moves host entries out of the tries without a moment at which
// an address resolves to another identity, and may be run again.
func TestMoveHosts(t *testing.T) {
	const n = 3000
	m := newTestMap(t, 2*n)
	want := map[netip.Addr]uint32{}
	var hosts []netip.Prefix
	for i := range n {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 1})
		if i%2 == 1 {
			a = netip.AddrFrom16([16]byte{0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, byte(i >> 8), byte(i)})
		}
		m.putTrie(t, netip.PrefixFrom(a, a.BitLen()), uint32(100+i))
		hosts = append(hosts, netip.PrefixFrom(a, a.BitLen()))
		want[a] = uint32(100 + i)
	}
	m.putTrie(t, pfx("10.0.0.0/8"), 9)
	m.putTrie(t, pfx("fd00::/16"), 19)
	// One host entry the hash already has, written later: it stays.
	if err := m.Put(hosts[0], 99); err != nil {
		t.Fatal(err)
	}
	want[hosts[0].Addr()] = 99

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var bad []string
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			p := hosts[(i*7919)%len(hosts)]
			e, _, err := m.Lookup(p.Addr())
			if err != nil || e.Identity != want[p.Addr()] {
				bad = append(bad, p.String())
			}
		}
	}()
	moved, err := m.MoveHosts()
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if moved != n {
		t.Errorf("MoveHosts moved %d, want %d", moved, n)
	}
	if len(bad) > 0 {
		t.Errorf("during MoveHosts %d lookups resolved otherwise (first %s)", len(bad), bad[0])
	}
	for _, p := range hosts {
		if m.inTrie(t, p) || !m.inHash(t, p) {
			t.Fatalf("%v after MoveHosts: in the trie %v, in the hash %v", p, m.inTrie(t, p), m.inHash(t, p))
		}
		if id, _, err := m.Get(p); err != nil || id != want[p.Addr()] {
			t.Fatalf("%v after MoveHosts: identity %d, %v; want %d", p, id, err, want[p.Addr()])
		}
	}
	if again, err := m.MoveHosts(); err != nil || again != 0 {
		t.Fatalf("MoveHosts again = %d, %v; want 0", again, err)
	}
	if all, err := m.List(); err != nil || len(all) != n+2 {
		t.Fatalf("List after MoveHosts: %d entries, %v; want %d", len(all), err, n+2)
	}
}
