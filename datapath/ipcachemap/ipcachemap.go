// Package ipcachemap gives typed access to the ipcache: host entries in hashes (iphost4_v1, iphost6_v1), CIDRs in LPM tries (ipcache4_v1, ipcache6_v1).
package ipcachemap

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
)

// Reserved identities (IDENTITY_* in bpf/common.h). 0 is never a valid
// identity in the ipcache.
const (
	IdentityHost  = uint32(bpf.CtdReservedIdentityIDENTITY_HOST)
	IdentityWorld = uint32(bpf.CtdReservedIdentityIDENTITY_WORLD) // what an address with no matching prefix resolves to
)

// Raw layouts of the maps.
type (
	Key4     = bpf.CtdIpcache4Key
	Key6     = bpf.CtdIpcache6Key
	HostKey4 = bpf.CtdIphost4Key
	HostKey6 = bpf.CtdIphost6Key
	Value    = bpf.CtdIpcacheValue
)

// Entry is one prefix of the ipcache and its identity.
type Entry struct {
	Prefix   netip.Prefix
	Identity uint32
}

// Errors matched with errors.Is.
var (
	// ErrNotFound: Delete of a prefix that is not in the map.
	ErrNotFound = errors.New("prefix not in the ipcache")
	// ErrFull: a new prefix did not fit (the trie holds max_entries prefixes).
	ErrFull = errors.New("ipcache is full")
)

// wrapFull names a full map, which the kernel reports as ENOSPC (trie) or
// E2BIG (hash).
func wrapFull(tm *ebpf.Map, err error) error {
	if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.E2BIG) {
		return fmt.Errorf("%w: %s holds at most %d prefixes (--ipcache-max)", ErrFull, tm, tm.MaxEntries())
	}
	return err
}

// BatchSize is how many entries one batch syscall moves.
const BatchSize = 4096

// Map is the ipcache: per family, a hash of host entries (/32, /128), which
// the datapath consults first, and an LPM trie of CIDRs, walked on a hash
// miss. Every method routes a prefix to the map that holds it and reads both
// as one table.
//
// A datapath pinned before the hashes existed holds its host entries in the
// tries, where they resolve the same (the trie's /32 is the longest match).
// MoveHosts moves them into the hashes; until then every method also finds
// them there: Get and Lookup fall back to the trie, Delete removes a host
// entry from both, and List shows it once (the hash's identity, which the
// datapath sees first, when both hold it).
type Map struct {
	v4, v6         *ebpf.Map // LPM tries: CIDRs
	hosts4, hosts6 *ebpf.Map // hashes: host entries
}

// New wraps the tries ipcache4_v1 and ipcache6_v1 and the hashes iphost4_v1
// and iphost6_v1.
func New(v4, v6, hosts4, hosts6 *ebpf.Map) *Map {
	return &Map{v4: v4, v6: v6, hosts4: hosts4, hosts6: hosts6}
}

// IsHost reports whether p is a host entry (/32 or /128), which the hashes hold.
func IsHost(p netip.Prefix) bool { return p.Bits() == p.Addr().BitLen() }

// Tables is the number of maps the ipcache is split into; TableOf numbers them.
const Tables = 4

// TableOf returns the index (0 to Tables-1) of the map that holds p.
func TableOf(p netip.Prefix) int {
	t := 0
	if !p.Addr().Is4() {
		t = 1
	}
	if IsHost(p) {
		t += 2
	}
	return t
}

// TableName names a table of TableOf for messages.
func TableName(t int) string {
	return [Tables]string{"IPv4 CIDR", "IPv6 CIDR", "IPv4 host", "IPv6 host"}[t]
}

// MaxEntries returns the capacity of each table, by TableOf.
func (m *Map) MaxEntries() [Tables]uint32 {
	return [Tables]uint32{m.v4.MaxEntries(), m.v6.MaxEntries(), m.hosts4.MaxEntries(), m.hosts6.MaxEntries()}
}

// hostMap returns the hash of a's family and the key of a.
func (m *Map) hostMap(a netip.Addr) (*ebpf.Map, any) {
	if a.Is4() {
		return m.hosts4, &HostKey4{Addr: a.As4()}
	}
	return m.hosts6, &HostKey6{Addr: a.As16()}
}

// lookupHost returns the identity of host entry a in the hash.
func (m *Map) lookupHost(a netip.Addr) (uint32, bool, error) {
	hm, k := m.hostMap(a)
	var v Value
	err := hm.Lookup(k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("look up %v in %s: %w", a, hm, err)
	}
	return v.Identity, true, nil
}

// checkPrefix accepts what the trie can hold as given: a valid prefix
// without host bits, of an IPv4 or plain IPv6 address.
func checkPrefix(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return fmt.Errorf("invalid prefix %v", p)
	case p.Addr().Zone() != "":
		return fmt.Errorf("prefix %v: zones are not allowed", p)
	case p.Masked() != p:
		return fmt.Errorf("prefix %v has host bits set (%v)", p, p.Masked())
	}
	return nil
}

func key4(p netip.Prefix) Key4 {
	return Key4{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As4()}
}

func key6(p netip.Prefix) Key6 {
	return Key6{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As16()}
}

func prefix4(k *Key4) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4(k.Addr), int(k.Prefixlen))
}

func prefix6(k *Key6) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom16(k.Addr), int(k.Prefixlen))
}

// trie returns the map and the kernel key of p.
func (m *Map) trie(p netip.Prefix) (*ebpf.Map, any) {
	if p.Addr().Is4() {
		k := key4(p)
		return m.v4, &k
	}
	k := key6(p)
	return m.v6, &k
}

// Put inserts or replaces the identity of p. An update of an existing
// prefix is atomic for the datapath: a lookup sees the old or the new
// identity, never no match.
func (m *Map) Put(p netip.Prefix, identity uint32) error {
	if err := checkPrefix(p); err != nil {
		return err
	}
	if identity == 0 {
		return fmt.Errorf("put %v: identity 0 is not valid", p)
	}
	tm, k := m.trie(p)
	if IsHost(p) {
		tm, k = m.hostMap(p.Addr())
	}
	if err := tm.Put(k, &Value{Identity: identity}); err != nil {
		return fmt.Errorf("put %v: %w", p, wrapFull(tm, err))
	}
	return nil
}

// Delete removes exactly p (not the prefixes it covers); it wraps
// ErrNotFound when p is not in the map. A host entry goes from the hash
// first, then from the trie, where an older datapath may have left it.
func (m *Map) Delete(p netip.Prefix) error {
	if err := checkPrefix(p); err != nil {
		return err
	}
	found := false
	if IsHost(p) {
		hm, k := m.hostMap(p.Addr())
		ok, err := deleteKey(hm, k)
		if err != nil {
			return fmt.Errorf("delete %v from %s: %w", p, hm, err)
		}
		found = ok
	}
	tm, k := m.trie(p)
	ok, err := deleteKey(tm, k)
	if err != nil {
		return fmt.Errorf("delete %v from %s: %w", p, tm, err)
	}
	if !found && !ok {
		return fmt.Errorf("delete %v: %w", p, ErrNotFound)
	}
	return nil
}

// deleteKey deletes k from tm; ok is false when it was not there.
func deleteKey(tm *ebpf.Map, k any) (bool, error) {
	err := tm.Delete(k)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, nil
	}
	return err == nil, err
}

// Lookup resolves an address as the datapath does: its host entry in the
// hash, else the kernel's longest-prefix-match answer of the trie for the
// full-length key (/32 or /128). found is false when no prefix matches; the address then belongs to
// IdentityWorld, which Lookup returns with an invalid Prefix.
//
// The kernel's LPM lookup returns only a value, so the matching prefix is
// derived separately, from longest to shortest candidate (the address
// masked to 32, 31, ... 0 bits), with an exact-existence test per
// candidate. The test uses the trie's documented BPF_MAP_GET_NEXT_KEY
// behaviour: a key with an exact match yields its successor (or ENOENT if
// it is the last), any other key yields the first key of the trie. The
// first candidate that exists is the longest matching prefix. If the table
// changes meanwhile so that the derived prefix no longer carries the
// kernel's identity, Lookup retries a few times and then fails.
func (m *Map) Lookup(a netip.Addr) (e Entry, found bool, err error) {
	if !a.IsValid() || a.Zone() != "" {
		return Entry{}, false, fmt.Errorf("invalid address %v", a)
	}
	tm := m.v6
	if a.Is4() {
		tm = m.v4
	}
	for range 5 {
		// In the loop: a host entry moved from the trie into the hash
		// (MoveHosts) meanwhile is found there.
		if id, ok, err := m.lookupHost(a); err != nil || ok {
			return Entry{Prefix: netip.PrefixFrom(a, a.BitLen()), Identity: id}, ok, err
		}
		id, ok, err := lookupLPM(tm, netip.PrefixFrom(a, a.BitLen()))
		if err != nil {
			return Entry{}, false, err
		}
		if !ok {
			return Entry{Identity: IdentityWorld}, false, nil
		}
		p, ok, err := m.longestExact(tm, a)
		if err != nil {
			return Entry{}, false, err
		}
		if !ok {
			continue // the match was deleted meanwhile
		}
		// The prefix's own value: an LPM lookup with its length returns
		// the prefix itself, since it exists.
		pid, ok, err := lookupLPM(tm, p)
		if err != nil {
			return Entry{}, false, err
		}
		if ok && pid == id {
			return Entry{Prefix: p, Identity: id}, true, nil
		}
	}
	return Entry{}, false, fmt.Errorf("look up %v in %s: the table kept changing during the lookup, try again", a, tm)
}

// lookupLPM is the kernel's longest-prefix match for p's first p.Bits() bits.
func lookupLPM(tm *ebpf.Map, p netip.Prefix) (uint32, bool, error) {
	var (
		v   Value
		err error
	)
	if p.Addr().Is4() {
		k := key4(p)
		err = tm.Lookup(&k, &v)
	} else {
		k := key6(p)
		err = tm.Lookup(&k, &v)
	}
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("look up %v in %s: %w", p, tm, err)
	}
	return v.Identity, true, nil
}

// longestExact returns the longest prefix of a that is a key of the trie.
func (m *Map) longestExact(tm *ebpf.Map, a netip.Addr) (netip.Prefix, bool, error) {
	first, ok, err := nextKey(tm, a.Is4(), nil)
	if err != nil || !ok {
		return netip.Prefix{}, false, err // empty trie
	}
	for bits := a.BitLen(); bits >= 0; bits-- {
		c, _ := a.Prefix(bits)
		ok, err := isKey(tm, c, first)
		if err != nil || ok {
			return c, ok, err
		}
	}
	return netip.Prefix{}, false, nil
}

// isKey reports whether p is a key of the non-empty trie whose first key is
// first: only an existing key can be the last one, or be followed by a key
// other than the first.
func isKey(tm *ebpf.Map, p, first netip.Prefix) (bool, error) {
	next, ok, err := nextKey(tm, p.Addr().Is4(), &p)
	if err != nil {
		return false, err
	}
	return !ok || next != first, nil
}

// Get returns the identity stored for exactly p (not for a prefix covering
// it); ok is false when p is not a key. It uses the exact-existence test
// described at Lookup.
func (m *Map) Get(p netip.Prefix) (identity uint32, ok bool, err error) {
	if err := checkPrefix(p); err != nil {
		return 0, false, err
	}
	if IsHost(p) {
		if id, ok, err := m.lookupHost(p.Addr()); err != nil || ok {
			return id, ok, err
		}
	}
	tm, _ := m.trie(p)
	for range 5 {
		first, ok, err := nextKey(tm, p.Addr().Is4(), nil)
		if err != nil || !ok {
			return 0, false, err
		}
		if ok, err := isKey(tm, p, first); err != nil || !ok {
			return 0, false, err
		}
		// p exists, so the LPM lookup with its own length returns it.
		id, ok, err := lookupLPM(tm, p)
		if err != nil || ok {
			return id, ok, err
		}
		// Deleted meanwhile: ask again.
	}
	return 0, false, fmt.Errorf("look up %v in %s: the table kept changing during the lookup, try again", p, tm)
}

// nextKey wraps BPF_MAP_GET_NEXT_KEY; ok is false at the end (ENOENT).
func nextKey(tm *ebpf.Map, is4 bool, after *netip.Prefix) (netip.Prefix, bool, error) {
	var err error
	var out netip.Prefix
	if is4 {
		var k, next Key4
		var in any
		if after != nil {
			k = key4(*after)
			in = &k
		}
		err = tm.NextKey(in, &next)
		out = prefix4(&next)
	} else {
		var k, next Key6
		var in any
		if after != nil {
			k = key6(*after)
			in = &k
		}
		err = tm.NextKey(in, &next)
		out = prefix6(&next)
	}
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return netip.Prefix{}, false, nil
	}
	if err != nil {
		return netip.Prefix{}, false, fmt.Errorf("next key of %s: %w", tm, err)
	}
	return out, true, nil
}

// List returns every entry, IPv4 before IPv6, each family ordered by
// address and then prefix length. It reads with batch lookups where the
// kernel supports them for the map type, else with BPF_MAP_GET_NEXT_KEY
// iteration. Entries changed while it runs may or may not be seen.
func (m *Map) List() ([]Entry, error) {
	var out []Entry
	err := listMap(m.hosts4, func(k *HostKey4, v *Value) {
		out = append(out, Entry{Prefix: netip.PrefixFrom(netip.AddrFrom4(k.Addr), 32), Identity: v.Identity})
	})
	if err != nil {
		return nil, err
	}
	err = listMap(m.hosts6, func(k *HostKey6, v *Value) {
		out = append(out, Entry{Prefix: netip.PrefixFrom(netip.AddrFrom16(k.Addr), 128), Identity: v.Identity})
	})
	if err != nil {
		return nil, err
	}
	err = listMap(m.v4, func(k *Key4, v *Value) {
		out = append(out, Entry{Prefix: prefix4(k), Identity: v.Identity})
	})
	if err != nil {
		return nil, err
	}
	err = listMap(m.v6, func(k *Key6, v *Value) {
		out = append(out, Entry{Prefix: prefix6(k), Identity: v.Identity})
	})
	if err != nil {
		return nil, err
	}
	// Stable: of a host entry both a hash and a trie hold, the hash's
	// (listed first) stays. An iteration that restarted (a key deleted
	// under it) repeats keys.
	slices.SortStableFunc(out, Compare)
	return slices.CompactFunc(out, func(a, b Entry) bool { return a.Prefix == b.Prefix }), nil
}

// Compare orders entries as List does.
func Compare(a, b Entry) int {
	return ComparePrefix(a.Prefix, b.Prefix)
}

// ComparePrefix orders prefixes IPv4 first, then by address, then by length.
func ComparePrefix(a, b netip.Prefix) int {
	if c := cmp.Compare(a.Addr().BitLen(), b.Addr().BitLen()); c != 0 {
		return c
	}
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

func listMap[K any](tm *ebpf.Map, fn func(*K, *Value)) error {
	keys := make([]K, BatchSize)
	vals := make([]Value, BatchSize)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := tm.BatchLookup(&cursor, keys, vals, nil)
		if errors.Is(err, ebpf.ErrNotSupported) {
			break // no batch ops for LPM tries on this kernel: iterate
		}
		for i := range n {
			fn(&keys[i], &vals[i])
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", tm, err)
		}
	}
	var (
		k K
		v Value
	)
	it := tm.Iterate()
	for it.Next(&k, &v) {
		fn(&k, &v)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read %s: %w", tm, err)
	}
	return nil
}

// Count returns the number of IPv4 and of IPv6 entries.
func (m *Map) Count() (v4, v6 int, err error) {
	all, err := m.List()
	if err != nil {
		return 0, 0, err
	}
	for _, e := range all {
		if e.Prefix.Addr().Is4() {
			v4++
		} else {
			v6++
		}
	}
	return v4, v6, nil
}

// BatchUpdate inserts or replaces entries with batch updates, falling back
// to one update per entry where the kernel has no batch ops for LPM tries.
// It is not atomic: on error, the returned count says how many entries
// were written (table by table in TableOf's order, each in the order given).
func (m *Map) BatchUpdate(entries []Entry) (int, error) {
	var (
		k4 []Key4
		k6 []Key6
		h4 []HostKey4
		h6 []HostKey6
		v  [Tables][]Value
	)
	for _, e := range entries {
		if err := checkPrefix(e.Prefix); err != nil {
			return 0, err
		}
		if e.Identity == 0 {
			return 0, fmt.Errorf("put %v: identity 0 is not valid", e.Prefix)
		}
		t := TableOf(e.Prefix)
		v[t] = append(v[t], Value{Identity: e.Identity})
		switch a := e.Prefix.Addr(); t {
		case 0:
			k4 = append(k4, key4(e.Prefix))
		case 1:
			k6 = append(k6, key6(e.Prefix))
		case 2:
			h4 = append(h4, HostKey4{Addr: a.As4()})
		default:
			h6 = append(h6, HostKey6{Addr: a.As16()})
		}
	}
	done := 0
	for _, put := range []func() (int, error){
		func() (int, error) { return batchUpdate(m.v4, k4, v[0]) },
		func() (int, error) { return batchUpdate(m.v6, k6, v[1]) },
		func() (int, error) { return batchUpdate(m.hosts4, h4, v[2]) },
		func() (int, error) { return batchUpdate(m.hosts6, h6, v[3]) },
	} {
		n, err := put()
		done += n
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

func batchUpdate[K any](tm *ebpf.Map, keys []K, vals []Value) (int, error) {
	done := 0
	for done < len(keys) {
		end := min(done+BatchSize, len(keys))
		n, err := tm.BatchUpdate(keys[done:end], vals[done:end], nil)
		if errors.Is(err, ebpf.ErrNotSupported) {
			for i := done; i < len(keys); i++ {
				if err := tm.Put(&keys[i], &vals[i]); err != nil {
					return i, fmt.Errorf("update %s: %w", tm, wrapFull(tm, err))
				}
			}
			return len(keys), nil
		}
		done += n
		if err != nil {
			return done, fmt.Errorf("batch update %s: %w", tm, wrapFull(tm, err))
		}
	}
	return done, nil
}

// BatchDelete removes exactly the given prefixes with batch deletes,
// falling back to one delete per prefix where the kernel has no batch ops
// for the map type. Prefixes already gone are skipped, not an error. It
// returns how many it deleted.
func (m *Map) BatchDelete(prefixes []netip.Prefix) (int, error) {
	var (
		k4 []Key4
		k6 []Key6
		h4 []HostKey4
		h6 []HostKey6
	)
	for _, p := range prefixes {
		if err := checkPrefix(p); err != nil {
			return 0, err
		}
		switch a := p.Addr(); TableOf(p) {
		case 0:
			k4 = append(k4, key4(p))
		case 1:
			k6 = append(k6, key6(p))
		case 2:
			h4 = append(h4, HostKey4{Addr: a.As4()})
		default:
			h6 = append(h6, HostKey6{Addr: a.As16()})
		}
	}
	// Host entries missing from the hash may be in the trie, where an
	// older datapath left them.
	var (
		missing4 []HostKey4
		missing6 []HostKey6
	)
	deleted := 0
	for _, del := range []func() (int, error){
		func() (n int, err error) { n, missing4, err = batchDelete(m.hosts4, h4); return },
		func() (n int, err error) { n, missing6, err = batchDelete(m.hosts6, h6); return },
		func() (int, error) {
			for _, k := range missing4 {
				k4 = append(k4, Key4{Prefixlen: 32, Addr: k.Addr})
			}
			for _, k := range missing6 {
				k6 = append(k6, Key6{Prefixlen: 128, Addr: k.Addr})
			}
			return 0, nil
		},
		func() (n int, err error) { n, _, err = batchDelete(m.v4, k4); return },
		func() (n int, err error) { n, _, err = batchDelete(m.v6, k6); return },
	} {
		n, err := del()
		deleted += n
		if err != nil {
			return deleted, err
		}
	}
	return deleted, nil
}

// batchDelete deletes keys from tm and returns how many it deleted and the
// keys that were not there.
func batchDelete[K any](tm *ebpf.Map, keys []K) (deleted int, missing []K, err error) {
	for len(keys) > 0 {
		chunk := keys[:min(len(keys), BatchSize)]
		n, err := tm.BatchDelete(chunk, nil)
		switch {
		case errors.Is(err, ebpf.ErrNotSupported):
			for i := range keys {
				err := tm.Delete(&keys[i])
				if errors.Is(err, ebpf.ErrKeyNotExist) {
					missing = append(missing, keys[i])
					continue
				}
				if err != nil {
					return deleted, missing, fmt.Errorf("delete from %s: %w", tm, err)
				}
				deleted++
			}
			return deleted, missing, nil
		case errors.Is(err, ebpf.ErrKeyNotExist):
			// The batch stops at the first missing key: skip it, go on.
			deleted += n
			missing = append(missing, keys[n])
			keys = keys[n+1:]
		case err != nil:
			return deleted + n, missing, fmt.Errorf("batch delete from %s: %w", tm, err)
		default:
			deleted += n
			keys = keys[len(chunk):]
		}
	}
	return deleted, missing, nil
}

// MoveHosts moves the host entries that a datapath pinned before the hashes
// existed holds in the tries into the hashes, and returns how many it
// moved. Call it only once every program attached over these maps reads
// the hashes: a program of such a datapath reads only the tries.
//
// First every entry is put into its hash, unless the hash already has it
// (then the hash's identity was written later and is the one in force);
// then, after hashWait, every one is deleted from its trie. A program
// resolves an address with the hash lookup and then the trie lookup, a few
// hundred nanoseconds apart, so none can have missed the hash before the
// first phase and still read the trie after the second: an address
// resolves to the same identity at every moment. It may be run again:
// after a crash it moves the rest.
func (m *Map) MoveHosts() (int, error) {
	var moved []Entry
	collect := func(p netip.Prefix, v *Value) {
		if IsHost(p) {
			moved = append(moved, Entry{Prefix: p, Identity: v.Identity})
		}
	}
	if err := listMap(m.v4, func(k *Key4, v *Value) { collect(prefix4(k), v) }); err != nil {
		return 0, err
	}
	if err := listMap(m.v6, func(k *Key6, v *Value) { collect(prefix6(k), v) }); err != nil {
		return 0, err
	}
	if len(moved) == 0 {
		return 0, nil
	}
	for _, e := range moved {
		hm, hk := m.hostMap(e.Prefix.Addr())
		err := hm.Update(hk, &Value{Identity: e.Identity}, ebpf.UpdateNoExist)
		if err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
			return 0, fmt.Errorf("move %v into %s: %w", e.Prefix, hm, wrapFull(hm, err))
		}
	}
	time.Sleep(hashWait)
	for i, e := range moved {
		tm, k := m.trie(e.Prefix)
		if _, err := deleteKey(tm, k); err != nil {
			return i, fmt.Errorf("move %v: delete it from %s: %w", e.Prefix, tm, err)
		}
	}
	return len(moved), nil
}

// hashWait separates MoveHosts' two phases: far longer than a program's run.
const hashWait = 10 * time.Millisecond
