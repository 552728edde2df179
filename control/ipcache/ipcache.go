// Package ipcache validates and applies ipcache changes.
package ipcache

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/ipcachemap"
)

// Entry is one prefix and its identity.
type Entry = ipcachemap.Entry

// Reserved identity names.
var identityNames = map[string]uint32{
	"host":  ipcachemap.IdentityHost,
	"world": ipcachemap.IdentityWorld,
}

// ParseIdentity parses the value of id=: a number 1-4294967295, world (2)
// or host (1).
func ParseIdentity(s string) (uint32, error) {
	if id, ok := identityNames[s]; ok {
		return id, nil
	}
	const valid = "want a number 1-4294967295, world or host"
	if s == "" {
		return 0, fmt.Errorf("empty identity in id=: %s", valid)
	}
	if s[0] == '-' {
		return 0, fmt.Errorf("invalid identity %q: negative; %s", s, valid)
	}
	n, err := strconv.ParseUint(s, 10, 64)
	switch {
	case errors.Is(err, strconv.ErrRange) || err == nil && n > math.MaxUint32:
		return 0, fmt.Errorf("invalid identity %q: out of range; %s", s, valid)
	case err != nil:
		return 0, fmt.Errorf("invalid identity %q: %s", s, valid)
	case n == 0:
		return 0, fmt.Errorf("invalid identity 0: 0 is never a valid identity; %s", valid)
	}
	return uint32(n), nil
}

// IdentityName returns the reserved name of id ("world", "host") or "".
func IdentityName(id uint32) string {
	for name, v := range identityNames {
		if v == id {
			return name
		}
	}
	return ""
}

// ParseAddr parses a plain IPv4 or IPv6 address (no prefix length, no zone,
// no IPv4-mapped IPv6 form).
func ParseAddr(s string) (netip.Addr, error) {
	if strings.Contains(s, "/") {
		return netip.Addr{}, fmt.Errorf("invalid address %q: give an address without a prefix length", s)
	}
	a, why := parseAddr(s)
	if why != "" {
		return netip.Addr{}, fmt.Errorf("invalid address %q: %s", s, why)
	}
	return a, nil
}

// parseAddr returns the address or why s is not one.
func parseAddr(s string) (netip.Addr, string) {
	if strings.Contains(s, "%") {
		return netip.Addr{}, "zones (%...) are not allowed"
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Sprintf("%q is not an IPv4 or IPv6 address", s)
	}
	if a.Is4In6() {
		return netip.Addr{}, fmt.Sprintf("IPv4-mapped IPv6 addresses are not accepted, write %v", a.Unmap())
	}
	return a, ""
}

// ParsePrefix parses a CIDR; a bare address means /32 or /128. Host bits
// are rejected, not cleared: 10.0.0.1/8 is an error that suggests
// 10.0.0.0/8.
func ParsePrefix(s string) (netip.Prefix, error) {
	addr, bits, hasBits := strings.Cut(s, "/")
	a, why := parseAddr(addr)
	if why != "" {
		return netip.Prefix{}, fmt.Errorf("invalid CIDR %q: %s", s, why)
	}
	if !hasBits {
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	family := "IPv4"
	if a.Is6() {
		family = "IPv6"
	}
	n, err := strconv.Atoi(bits)
	if err != nil || bits[0] == '+' || bits[0] == '-' || (len(bits) > 1 && bits[0] == '0') {
		return netip.Prefix{}, fmt.Errorf("invalid CIDR %q: prefix length %q is not a number 0-%d", s, bits, a.BitLen())
	}
	if n > a.BitLen() {
		return netip.Prefix{}, fmt.Errorf("invalid CIDR %q: prefix length %d is out of range for %s (0-%d)", s, n, family, a.BitLen())
	}
	p := netip.PrefixFrom(a, n)
	if m := p.Masked(); m != p {
		return netip.Prefix{}, fmt.Errorf("%s has host bits set: did you mean %v? (ctd rejects host bits rather than clearing them)", s, m)
	}
	return p, nil
}

// ParseEntry parses the fields of one "CIDR id=N" entry.
func ParseEntry(fields []string) (Entry, error) {
	switch {
	case len(fields) == 0:
		return Entry{}, errors.New(`missing CIDR and identity: want "CIDR id=N"`)
	case len(fields) == 1:
		return Entry{}, fmt.Errorf(`missing id=N after %q: want "CIDR id=N"`, fields[0])
	case len(fields) > 2:
		return Entry{}, fmt.Errorf(`unexpected %q after %q: want "CIDR id=N"`, strings.Join(fields[2:], " "), strings.Join(fields[:2], " "))
	}
	p, err := ParsePrefix(fields[0])
	if err != nil {
		return Entry{}, err
	}
	v, ok := strings.CutPrefix(fields[1], "id=")
	if !ok {
		return Entry{}, fmt.Errorf(`missing id=N after %q: got %q, want "CIDR id=N"`, fields[0], fields[1])
	}
	id, err := ParseIdentity(v)
	if err != nil {
		return Entry{}, err
	}
	return Entry{Prefix: p, Identity: id}, nil
}

// Parse reads a whole ipcache file: one "CIDR id=N" per line; blank lines
// and everything after a # are ignored. It fails, naming the line, on the
// first bad line, on a prefix given twice with different identities, and on
// a file without entries. A prefix given twice with the same identity counts
// once.
//
// Parse streams its input: it keeps only the parsed entries (no line
// text), and finds duplicates by sorting them, not in a map. The entries
// come back in the store's key order (store.ComparePrefixKeys).
func Parse(r io.Reader) ([]Entry, error) {
	var s byKey
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for n := 1; sc.Scan(); n++ {
		text, _, _ := strings.Cut(sc.Text(), "#")
		fields := strings.Fields(text)
		if len(fields) == 0 {
			continue
		}
		e, err := ParseEntry(fields)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		s.entries = append(s.entries, e)
		s.lines = append(s.lines, int32(n))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	if len(s.entries) == 0 {
		return nil, errors.New(`no entries: the file must have at least one "CIDR id=N" line`)
	}
	// By key, and each prefix's lines in file order: the first occurrence
	// of a prefix comes first, and a conflict is reported at the earliest
	// line that contradicts an earlier one.
	sort.Sort(s)
	out := s.entries[:0]
	var conflict struct {
		e           Entry
		line, first int32
		was         uint32
	}
	for i, e := range s.entries {
		if n := len(out); n > 0 && out[n-1].Prefix == e.Prefix {
			if out[n-1].Identity != e.Identity && (conflict.line == 0 || s.lines[i] < conflict.line) {
				conflict.e, conflict.line, conflict.first, conflict.was = e, s.lines[i], s.lines[n-1], out[n-1].Identity
			}
			continue
		}
		s.lines[len(out)] = s.lines[i]
		out = append(out, e)
	}
	if c := conflict; c.line != 0 {
		return nil, fmt.Errorf("line %d: %v id=%d conflicts with id=%d on line %d", c.line, c.e.Prefix, c.e.Identity, c.was, c.first)
	}
	return slices.Clip(out), nil
}

// byKey sorts entries in store key order, and entries of one prefix by line.
type byKey struct {
	entries []Entry
	lines   []int32
}

func (s byKey) Len() int { return len(s.entries) }
func (s byKey) Less(i, j int) bool {
	if c := store.ComparePrefixKeys(s.entries[i].Prefix, s.entries[j].Prefix); c != 0 {
		return c < 0
	}
	return s.lines[i] < s.lines[j]
}
func (s byKey) Swap(i, j int) {
	s.entries[i], s.entries[j] = s.entries[j], s.entries[i]
	s.lines[i], s.lines[j] = s.lines[j], s.lines[i]
}

// Result counts what an Apply changed.
type Result struct {
	Added     int // prefixes that were not in the table
	Updated   int // prefixes whose identity changed
	Unchanged int // prefixes already there with the same identity
	Deleted   int // prefixes removed (replace only)
}

// Options control Apply.
type Options struct {
	// Replace makes the table equal to the entries: prefixes not among
	// them are deleted.
	Replace bool
}

// Table is the ipcache as operators change it: the datapath's tries and,
// when Store is set, the desired-state store, which the daemon restores
// and reconciles the tries from. Each change goes through Store.Change:
// recorded in the store with an intent mark, then applied to the tries, so
// that a change killed midway is finished by the next ctd process; if the
// tries refuse it, neither keeps it.
type Table struct {
	Map   *ipcachemap.Map
	Store *store.Store // nil: the tries only
	// Finish makes the maps equal to the store: it finishes a change
	// another ctd process left unfinished (see store.Change).
	Finish store.Finisher
}

// change records a change with record (run with a nil Tx without a store)
// and applies it with apply.
func (t Table) change(what string, record func(tx *store.Tx) error, apply func() error) error {
	if t.Store == nil {
		if err := record(nil); err != nil {
			return err
		}
		return apply()
	}
	return t.Store.Change(store.Change{What: what, Record: record, Apply: apply}, t.Finish)
}

// Load parses a whole ipcache file from r and applies it; nothing is
// applied unless every line is valid.
func (t Table) Load(r io.Reader, o Options) (Result, error) {
	entries, err := Parse(r)
	if err != nil {
		return Result{}, err
	}
	return t.Apply(entries, o)
}

// Apply writes validated entries to the tries with batch operations, and
// records them in the store (with Replace, the store's ipcache becomes
// exactly the entries).
//
// New and changed prefixes are written first (an update of a prefix is
// atomic for the datapath), then, with Replace, the prefixes not among the
// entries are deleted: a prefix present before and after is never missing.
// Only when the union of old and new prefixes would not fit in a trie are
// that family's stale prefixes deleted first (common prefixes still never
// go missing; other addresses may briefly resolve through a shorter prefix).
//
// Before anything is written, Apply checks that the result fits. If the
// kernel still fails midway, Apply restores the table as it read it and
// reports both. Apply is meant to be the table's only writer while it runs.
func (t Table) Apply(entries []Entry, o Options) (Result, error) {
	entries, err := keyOrder(entries)
	if err != nil {
		return Result{}, err
	}
	what := "ipcache load"
	if o.Replace {
		what += " --replace"
	}
	var res Result
	apply := func() (err error) {
		res, err = apply(t.Map, entries, o)
		return err
	}
	if t.Store == nil {
		return res, apply()
	}
	load := &store.IPCacheLoad{
		Len:     len(entries),
		At:      func(i int) (netip.Prefix, uint32) { return entries[i].Prefix, entries[i].Identity },
		Replace: o.Replace,
	}
	if err := t.Store.Change(store.Change{What: what, IPCache: load, Apply: apply}, t.Finish); err != nil {
		return Result{}, err
	}
	return res, nil
}

// keyOrder returns entries in the store's key order (Parse's order: then
// entries is returned as is), and fails on a prefix given twice.
func keyOrder(entries []Entry) ([]Entry, error) {
	cmp := func(a, b Entry) int { return store.ComparePrefixKeys(a.Prefix, b.Prefix) }
	if !slices.IsSortedFunc(entries, cmp) {
		entries = slices.SortedFunc(slices.Values(entries), cmp)
	}
	for i := 1; i < len(entries); i++ {
		if entries[i].Prefix == entries[i-1].Prefix {
			return nil, fmt.Errorf("%v is given twice", entries[i].Prefix)
		}
	}
	return entries, nil
}

// apply changes the tries; when it fails it leaves them as they were.
func apply(m *ipcachemap.Map, entries []Entry, o Options) (Result, error) {
	var res Result
	for _, e := range entries {
		if !e.Prefix.IsValid() || e.Prefix.Masked() != e.Prefix || e.Identity == 0 {
			return res, fmt.Errorf("invalid entry %v id=%d", e.Prefix, e.Identity)
		}
	}
	// before is in List's order, entries in key order: look up by binary
	// search rather than in maps, which would cost more memory than the
	// entries themselves.
	before, err := m.List()
	if err != nil {
		return res, err
	}
	oldID := func(p netip.Prefix) (uint32, bool) { return lookup(before, p) }
	wanted := func(p netip.Prefix) bool {
		_, ok := slices.BinarySearchFunc(entries, p, func(e Entry, p netip.Prefix) int { return store.ComparePrefixKeys(e.Prefix, p) })
		return ok
	}
	// upserts is entries itself until an unchanged entry is met.
	var (
		upserts []Entry
		copied  bool
		added   [ipcachemap.Tables]int // by table (ipcachemap.TableOf)
	)
	for i, e := range entries {
		switch id, ok := oldID(e.Prefix); {
		case !ok:
			res.Added++
			added[ipcachemap.TableOf(e.Prefix)]++
		case id != e.Identity:
			res.Updated++
		default:
			res.Unchanged++
			if !copied {
				upserts, copied = slices.Clone(entries[:i]), true
			}
			continue
		}
		if copied {
			upserts = append(upserts, e)
		}
	}
	if !copied {
		upserts = entries
	}
	var stale []netip.Prefix
	if o.Replace {
		for _, e := range before {
			if !wanted(e.Prefix) {
				stale = append(stale, e.Prefix)
			}
		}
	}

	// Capacity, per table (the host entries' hash and the CIDRs' trie of
	// each family): the peak is old+added, unless stale prefixes are
	// deleted first.
	var nOld, nStale [ipcachemap.Tables]int
	for _, e := range before {
		nOld[ipcachemap.TableOf(e.Prefix)]++
	}
	for _, p := range stale {
		nStale[ipcachemap.TableOf(p)]++
	}
	var staleFirst [ipcachemap.Tables]bool
	for t, limit := range m.MaxEntries() {
		if end := nOld[t] + added[t] - nStale[t]; end > int(limit) {
			return Result{}, fmt.Errorf("the %s ipcache holds at most %d prefixes (--ipcache-max) but would need %d: nothing was changed", ipcachemap.TableName(t), limit, end)
		}
		staleFirst[t] = nOld[t]+added[t] > int(limit)
	}

	var firstDel, lastDel []netip.Prefix
	for _, p := range stale {
		if staleFirst[ipcachemap.TableOf(p)] {
			firstDel = append(firstDel, p)
		} else {
			lastDel = append(lastDel, p)
		}
	}
	n, err := m.BatchDelete(firstDel)
	res.Deleted += n
	if err == nil {
		_, err = m.BatchUpdate(upserts)
	}
	if err == nil {
		n, err = m.BatchDelete(lastDel)
		res.Deleted += n
	}
	if err != nil {
		if rerr := restore(m, before, upserts, stale); rerr != nil {
			return Result{}, fmt.Errorf("apply ipcache changes: %w; restoring the previous table failed too: %v", err, rerr)
		}
		return Result{}, fmt.Errorf("apply ipcache changes: %w (the previous table was restored)", err)
	}
	return res, nil
}

// lookup finds p's identity in entries sorted as List returns them.
func lookup(entries []Entry, p netip.Prefix) (uint32, bool) {
	i, ok := slices.BinarySearchFunc(entries, p, func(e Entry, p netip.Prefix) int { return ipcachemap.ComparePrefix(e.Prefix, p) })
	if !ok {
		return 0, false
	}
	return entries[i].Identity, true
}

// restore undoes a partial Apply: prefixes it wrote or deleted get their
// identity in before (sorted as List returns it) back, prefixes it added
// are deleted.
func restore(m *ipcachemap.Map, before []Entry, upserts []Entry, stale []netip.Prefix) error {
	var put []Entry
	var del []netip.Prefix
	for _, e := range upserts {
		if id, ok := lookup(before, e.Prefix); ok {
			put = append(put, Entry{Prefix: e.Prefix, Identity: id})
		} else {
			del = append(del, e.Prefix)
		}
	}
	for _, p := range stale {
		id, _ := lookup(before, p)
		put = append(put, Entry{Prefix: p, Identity: id})
	}
	_, derr := m.BatchDelete(del)
	_, perr := m.BatchUpdate(put)
	return errors.Join(derr, perr)
}

// Add inserts or updates one prefix and reports the identity it had in the
// tries before (0 when it was new).
func (t Table) Add(e Entry) (previous uint32, err error) {
	if e.Identity == 0 {
		return 0, fmt.Errorf("invalid identity 0 for %v", e.Prefix)
	}
	record := func(tx *store.Tx) error {
		if tx == nil {
			return nil
		}
		return tx.PutIPCache(e.Prefix, e.Identity)
	}
	apply := func() error {
		prev, _, err := t.Map.Get(e.Prefix)
		if err != nil {
			return err
		}
		previous = prev
		return t.Map.Put(e.Prefix, e.Identity)
	}
	return previous, t.change("ipcache add", record, apply)
}

// Delete removes exactly p (not the prefixes it covers) and returns the
// identity it had. It fails when p is neither in the tries nor in the store.
func (t Table) Delete(p netip.Prefix) (identity uint32, err error) {
	var inMap bool
	check := func(tx *store.Tx) error {
		var err error
		if identity, inMap, err = t.Map.Get(p); err != nil {
			return err
		}
		inStore := false
		if tx != nil {
			var sid uint32
			if sid, inStore = tx.LookupIPCache(p); !inMap {
				identity = sid
			}
		}
		if !inMap && !inStore {
			return fmt.Errorf("%v is not in the ipcache (del removes exactly the prefix given; see 'ctd ipcache list')", p)
		}
		if tx == nil {
			return nil
		}
		return tx.DeleteIPCache(p)
	}
	apply := func() error {
		if !inMap {
			return nil
		}
		if err := t.Map.Delete(p); errors.Is(err, ipcachemap.ErrNotFound) {
			return fmt.Errorf("%v is not in the ipcache (deleted meanwhile)", p)
		} else if err != nil {
			return err
		}
		return nil
	}
	return identity, t.change("ipcache del", check, apply)
}
