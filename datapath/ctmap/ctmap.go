// Package ctmap reads and edits the conntrack tables (ct4_v2, ct6_v2 and their unconfirmed tables) as flows.
package ctmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/byteorder"
)

// State is a flow's connection state (enum ct_state in bpf/common.h).
type State uint8

const (
	StateNew         = State(bpf.CtdCtStateCT_NEW)
	StateEstablished = State(bpf.CtdCtStateCT_ESTABLISHED)
	StateSynSent     = State(bpf.CtdCtStateCT_SYN_SENT)
	StateSynRecv     = State(bpf.CtdCtStateCT_SYN_RECV)
	StateFinWait     = State(bpf.CtdCtStateCT_FIN_WAIT)
	StateClosed      = State(bpf.CtdCtStateCT_CLOSED)
)

var stateNames = [...]string{"NEW", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT", "CLOSED"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "STATE_" + strconv.Itoa(int(s))
}

// Entry flags (enum ct_flag in bpf/common.h).
const (
	FlagOpenedIngress = uint8(bpf.CtdCtFlagCT_F_OPENED_INGRESS)
	FlagPickup        = uint8(bpf.CtdCtFlagCT_F_PICKUP)
	FlagRelated       = uint8(bpf.CtdCtFlagCT_F_RELATED)
	FlagRevoked       = uint8(bpf.CtdCtFlagCT_F_REVOKED)
)

// Key is a flow's canonical key in either family: the datapath's ct4_key or
// ct6_key with its family. Addresses are held as the datapath's tuples hold
// them (IPv4 in the first 4 bytes, the rest zero), ports in network order.
type Key struct {
	AddrA, AddrB [16]byte
	PortA, PortB uint16
	Proto        uint8
	Family       uint8 // 4 or 6
}

// Entry is the tables' raw value layout (struct ct_entry).
type Entry = bpf.CtdCtEntry

// The raw keys of the family tables.
type (
	key4 = bpf.CtdCt4Key
	key6 = bpf.CtdCt6Key
)

func (k *Key) raw4() key4 {
	return key4{AddrA: binary.NativeEndian.Uint32(k.AddrA[:4]), AddrB: binary.NativeEndian.Uint32(k.AddrB[:4]),
		PortA: k.PortA, PortB: k.PortB, Proto: k.Proto}
}

func (k *Key) raw6() key6 {
	return key6{AddrA: k.AddrA, AddrB: k.AddrB, PortA: k.PortA, PortB: k.PortB, Proto: k.Proto}
}

func fromRaw4(r *key4) Key {
	k := Key{PortA: r.PortA, PortB: r.PortB, Proto: r.Proto, Family: 4}
	binary.NativeEndian.PutUint32(k.AddrA[:4], r.AddrA)
	binary.NativeEndian.PutUint32(k.AddrB[:4], r.AddrB)
	return k
}

func fromRaw6(r *key6) Key {
	return Key{AddrA: r.AddrA, AddrB: r.AddrB, PortA: r.PortA, PortB: r.PortB, Proto: r.Proto, Family: 6}
}

// anyKey is k as the programs run by BPF_PROG_TEST_RUN take it
// (struct ct_any_key): the family's raw key, zero-padded.
func (k *Key) anyKey() (raw [40]byte) {
	ne := binary.NativeEndian
	if k.Family == 4 {
		copy(raw[0:4], k.AddrA[:4])
		copy(raw[4:8], k.AddrB[:4])
		ne.PutUint16(raw[8:], k.PortA)
		ne.PutUint16(raw[10:], k.PortB)
		raw[12] = k.Proto
		return raw
	}
	copy(raw[0:16], k.AddrA[:])
	copy(raw[16:32], k.AddrB[:])
	ne.PutUint16(raw[32:], k.PortA)
	ne.PutUint16(raw[34:], k.PortB)
	raw[36] = k.Proto
	return raw
}

// Flow is one conntrack entry, seen from its originator: Src and Sport sent
// the first packet ctd saw.
type Flow struct {
	Proto         uint8
	Src, Dst      netip.Addr
	Sport, Dport  uint16
	State         State
	PacketsOrig   uint64
	BytesOrig     uint64
	PacketsReply  uint64
	BytesReply    uint64
	FirstSeen     time.Duration // CLOCK_MONOTONIC_COARSE
	LastSeen      time.Duration // CLOCK_MONOTONIC_COARSE
	SrcIdentity   uint32
	DstIdentity   uint32
	Ifindex       uint32
	Flags         uint8
	TCPFlagsOrig  uint8
	TCPFlagsReply uint8
	// The local socket's owner, zero for a flow without one (forwarded).
	Pid      uint32
	Comm     Comm
	CgroupID uint64 // cgroup v2 id (see datapath/cgroupv2)
	RTT      uint32 // TCP handshake round trip in µs as seen here; 0: unknown
}

// Comm is a command name as the kernel keeps it: at most 15 bytes, NUL
// padded.
type Comm [16]byte

// CommOf converts a command name; ok is false if it is empty or longer
// than the kernel keeps (15 bytes) or holds a NUL.
func CommOf(s string) (c Comm, ok bool) {
	if s == "" || len(s) > len(c)-1 || strings.IndexByte(s, 0) >= 0 {
		return Comm{}, false
	}
	copy(c[:], s)
	return c, true
}

// CommFrom converts a command name as the generated types hold it (C char).
func CommFrom(c [16]int8) Comm {
	var out Comm
	for i, b := range c {
		out[i] = byte(b)
	}
	return out
}

// Text is the name as the text forms show it: as it is, or quoted (Go
// syntax) if it holds a space, "=", a quote or a byte that is not
// printable ASCII.
func (c Comm) Text() string {
	s := c.String()
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f || s[i] == '=' || s[i] == '"' {
			return strconv.Quote(s)
		}
	}
	return s
}

// String is the name without its padding.
func (c Comm) String() string {
	n := 0
	for n < len(c) && c[n] != 0 {
		n++
	}
	return string(c[:n])
}

// FlowOf decodes a raw key and entry.
func FlowOf(k *Key, e *Entry) Flow {
	f := Flow{
		Proto:         k.Proto,
		State:         State(e.State),
		PacketsOrig:   e.PacketsOrig,
		BytesOrig:     e.BytesOrig,
		PacketsReply:  e.PacketsReply,
		BytesReply:    e.BytesReply,
		FirstSeen:     time.Duration(e.FirstSeen),
		LastSeen:      time.Duration(e.LastSeen),
		SrcIdentity:   e.SrcIdentity,
		DstIdentity:   e.DstIdentity,
		Ifindex:       e.Ifindex,
		Flags:         e.Flags,
		TCPFlagsOrig:  e.TcpFlagsOrig,
		TCPFlagsReply: e.TcpFlagsReply,
		Pid:           e.Pid,
		Comm:          CommFrom(e.Comm),
		CgroupID:      e.CgroupId,
		RTT:           e.RttUs,
	}
	a, b := byteorder.Addr(k.AddrA, k.Family), byteorder.Addr(k.AddrB, k.Family)
	pa, pb := byteorder.Swap16(k.PortA), byteorder.Swap16(k.PortB)
	if e.OrigIsB != 0 {
		f.Src, f.Sport, f.Dst, f.Dport = b, pb, a, pa
	} else {
		f.Src, f.Sport, f.Dst, f.Dport = a, pa, b, pb
	}
	return f
}

// KeyOf builds the canonical key of a flow, as the datapath does, and
// reports whether the originator is endpoint b.
func KeyOf(proto uint8, src netip.Addr, sport uint16, dst netip.Addr, dport uint16) (Key, bool) {
	k := Key{Proto: proto, Family: 6}
	if src.Is4() {
		k.Family = 4
	}
	sb, db := byteorder.Bytes(src), byteorder.Bytes(dst)
	sp, dp := byteorder.Swap16(sport), byteorder.Swap16(dport)
	// The datapath compares the addresses as two host-order (little-endian)
	// 64-bit words, then the ports as stored (network order).
	srcIsB := false
	if c := compareWords(sb, db); c != 0 {
		srcIsB = c > 0
	} else {
		srcIsB = sp > dp
	}
	if srcIsB {
		k.AddrA, k.AddrB, k.PortA, k.PortB = db, sb, dp, sp
	} else {
		k.AddrA, k.AddrB, k.PortA, k.PortB = sb, db, sp, dp
	}
	return k, srcIsB
}

func compareWords(a, b [16]byte) int {
	for i := 0; i < 16; i += 8 {
		x, y := le64(a[i:]), le64(b[i:])
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return 0
}

func le64(b []byte) uint64 {
	var v uint64
	for i := 7; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

// Tables are the conntrack tables: per family, the confirmed flows and
// those not yet confirmed.
type Tables struct {
	Confirmed4, Confirmed6, Unconfirmed4, Unconfirmed6 *ebpf.Map
}

// Map is the conntrack table: its four tables as one set of flows. A flow
// is in one table of its family (for an instant, while the datapath
// promotes it, in both).
type Map struct {
	t Tables
}

// New wraps the tables.
func New(t Tables) *Map { return &Map{t: t} }

// Tables returns the wrapped tables.
func (m *Map) Tables() Tables { return m.t }

// table is one of the four, with what it holds.
type table struct {
	m         *ebpf.Map
	family    uint8
	confirmed bool
}

// tables lists the four tables, the confirmed ones first.
func (m *Map) tables() [4]table {
	return [4]table{
		{m.t.Confirmed4, 4, true}, {m.t.Confirmed6, 6, true},
		{m.t.Unconfirmed4, 4, false}, {m.t.Unconfirmed6, 6, false},
	}
}

func (t table) name() string {
	switch {
	case t.family == 4 && t.confirmed:
		return bpf.CtdMapCt4V2
	case t.family == 6 && t.confirmed:
		return bpf.CtdMapCt6V2
	case t.family == 4:
		return bpf.CtdMapCt4UnconfirmedV2
	}
	return bpf.CtdMapCt6UnconfirmedV2
}

// BatchSize is how many entries one batch syscall moves.
const BatchSize = 4096

// Iterate calls fn for every entry, reading the tables in batches. Entries
// that appear or vanish while it runs may or may not be seen. fn returning
// false stops the walk.
//
// The next batch is read in the kernel while fn works through the current
// one: on a million entries the syscalls and the caller's work (decoding,
// printing) take about as long as each other, and overlap on two CPUs.
func (m *Map) Iterate(fn func(k *Key, e *Entry) bool) error {
	type batch struct {
		raw4 []key4
		raw6 []key6
		keys []Key
		vals []Entry
		n    int
	}
	const inFlight = 2
	free := make(chan *batch, inFlight)
	full := make(chan *batch, inFlight) // never blocks: at most inFlight batches exist
	for range inFlight {
		free <- &batch{raw4: make([]key4, BatchSize), raw6: make([]key6, BatchSize),
			keys: make([]Key, BatchSize), vals: make([]Entry, BatchSize)}
	}
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		defer close(full)
		for _, t := range m.tables() {
			var cursor ebpf.MapBatchCursor
			for {
				var b *batch
				select {
				case b = <-free:
				case <-stop:
					done <- nil
					return
				}
				var (
					n   int
					err error
				)
				if t.family == 4 {
					n, err = t.m.BatchLookup(&cursor, b.raw4, b.vals, nil)
					for i := range n {
						b.keys[i] = fromRaw4(&b.raw4[i])
					}
				} else {
					n, err = t.m.BatchLookup(&cursor, b.raw6, b.vals, nil)
					for i := range n {
						b.keys[i] = fromRaw6(&b.raw6[i])
					}
				}
				if b.n = n; n > 0 {
					full <- b
				} else {
					free <- b
				}
				if errors.Is(err, ebpf.ErrKeyNotExist) {
					break
				}
				if err != nil {
					done <- fmt.Errorf("read conntrack table %s: %w", t.name(), err)
					return
				}
			}
		}
		done <- nil
	}()
	for b := range full {
		for i := range b.n {
			if !fn(&b.keys[i], &b.vals[i]) {
				close(stop)
				for range full {
				}
				<-done
				return nil
			}
		}
		free <- b
	}
	return <-done
}

// Count returns the number of live entries.
func (m *Map) Count() (int, error) {
	n := 0
	err := m.Iterate(func(*Key, *Entry) bool { n++; return true })
	return n, err
}

// byFamily splits keys into the raw keys of each family, in order.
func byFamily(keys []Key) ([]key4, []key6) {
	var k4 []key4
	var k6 []key6
	for i := range keys {
		if keys[i].Family == 4 {
			k4 = append(k4, keys[i].raw4())
		} else {
			k6 = append(k6, keys[i].raw6())
		}
	}
	return k4, k6
}

// Delete removes keys from the table that holds each, in batches; keys
// already gone (evicted or deleted meanwhile) are not an error. It returns
// how many it deleted.
//
// A key a table lacks costs a system call of its own (a batch stops at the
// first missing key), so each key is tried in one table of its family and,
// only if it is missing there, in the other. The unconfirmed table goes
// first: the keys deleted in bulk right after their creation (the
// benchmark's new flows) are all there.
func (m *Map) Delete(keys []Key) (int, error) {
	k4, k6 := byFamily(keys)
	n4, err := deleteFamily(table{m.t.Unconfirmed4, 4, false}, table{m.t.Confirmed4, 4, true}, k4)
	if err != nil {
		return n4, err
	}
	n6, err := deleteFamily(table{m.t.Unconfirmed6, 6, false}, table{m.t.Confirmed6, 6, true}, k6)
	return n4 + n6, err
}

func deleteFamily[K any](first, second table, keys []K) (int, error) {
	deleted := 0
	for _, t := range [2]table{first, second} {
		n, missing, err := deleteFrom(t.m, keys)
		deleted += n
		if err != nil {
			return deleted, fmt.Errorf("delete conntrack entries from %s: %w", t.name(), err)
		}
		keys = missing
	}
	return deleted, nil
}

// deleteFrom deletes keys from table and returns the keys it lacks.
func deleteFrom[K any](table *ebpf.Map, keys []K) (deleted int, missing []K, err error) {
	for len(keys) > 0 {
		chunk := keys[:min(len(keys), BatchSize)]
		n, err := table.BatchDelete(chunk, nil)
		deleted += n
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			// The batch stops at the first missing key: skip it, go on.
			missing = append(missing, keys[n])
			keys = keys[n+1:]
			continue
		}
		if err != nil {
			return deleted, missing, err
		}
		keys = keys[len(chunk):]
	}
	return deleted, missing, nil
}

// Put writes an entry into the confirmed table of its family (for tests
// and migrations).
func (m *Map) Put(k *Key, e *Entry) error {
	var err error
	if k.Family == 4 {
		r := k.raw4()
		err = m.t.Confirmed4.Put(&r, e)
	} else {
		r := k.raw6()
		err = m.t.Confirmed6.Put(&r, e)
	}
	if err != nil {
		return fmt.Errorf("write conntrack entry: %w", err)
	}
	return nil
}

// Lookup reads one entry, from the confirmed table of its family or else
// the unconfirmed one.
func (m *Map) Lookup(k *Key) (Entry, error) {
	var e Entry
	if k.Family == 4 {
		r := k.raw4()
		err := m.t.Confirmed4.Lookup(&r, &e)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			err = m.t.Unconfirmed4.Lookup(&r, &e)
		}
		return e, err
	}
	r := k.raw6()
	err := m.t.Confirmed6.Lookup(&r, &e)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		err = m.t.Unconfirmed6.Lookup(&r, &e)
	}
	return e, err
}

// Where reports which of its family's tables hold k: the confirmed, the
// unconfirmed, or (for an instant, while the datapath promotes the flow)
// both.
func (m *Map) Where(k *Key) (confirmed, unconfirmed bool, err error) {
	in := func(t *ebpf.Map) (bool, error) {
		var e Entry
		var err error
		if k.Family == 4 {
			r := k.raw4()
			err = t.Lookup(&r, &e)
		} else {
			r := k.raw6()
			err = t.Lookup(&r, &e)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return false, nil
		}
		return err == nil, err
	}
	c, u := m.t.Confirmed4, m.t.Unconfirmed4
	if k.Family != 4 {
		c, u = m.t.Confirmed6, m.t.Unconfirmed6
	}
	if confirmed, err = in(c); err != nil {
		return false, false, fmt.Errorf("look up conntrack entry: %w", err)
	}
	if unconfirmed, err = in(u); err != nil {
		return false, false, fmt.Errorf("look up conntrack entry: %w", err)
	}
	return confirmed, unconfirmed, nil
}

// PutBatch writes entries into the confirmed tables in batches (for tests,
// benchmarks and migrations).
func (m *Map) PutBatch(keys []Key, entries []Entry) error {
	return putFamilies(m.t.Confirmed4, m.t.Confirmed6, keys, entries)
}

// PutUnconfirmedBatch writes entries into the unconfirmed tables in
// batches (for tests and benchmarks: a flood's half-open flows).
func (m *Map) PutUnconfirmedBatch(keys []Key, entries []Entry) error {
	return putFamilies(m.t.Unconfirmed4, m.t.Unconfirmed6, keys, entries)
}

func putFamilies(t4, t6 *ebpf.Map, keys []Key, entries []Entry) error {
	if len(keys) != len(entries) {
		return fmt.Errorf("write conntrack entries: %d keys but %d entries", len(keys), len(entries))
	}
	var (
		k4     []key4
		k6     []key6
		e4, e6 []Entry
	)
	for i := range keys {
		if keys[i].Family == 4 {
			k4, e4 = append(k4, keys[i].raw4()), append(e4, entries[i])
		} else {
			k6, e6 = append(k6, keys[i].raw6()), append(e6, entries[i])
		}
	}
	if err := putBatch(t4, k4, e4); err != nil {
		return err
	}
	return putBatch(t6, k6, e6)
}

func putBatch[K any](t *ebpf.Map, keys []K, entries []Entry) error {
	for len(keys) > 0 {
		n := min(len(keys), BatchSize)
		if _, err := t.BatchUpdate(keys[:n], entries[:n], nil); err != nil {
			return fmt.Errorf("write conntrack entries: %w", err)
		}
		keys, entries = keys[n:], entries[n:]
	}
	return nil
}

// MaxEntries is the capacity of each family's confirmed table.
func (m *Map) MaxEntries() uint32 { return m.t.Confirmed4.MaxEntries() }

// UnconfirmedMaxEntries is the capacity of each family's unconfirmed table.
func (m *Map) UnconfirmedMaxEntries() uint32 { return m.t.Unconfirmed4.MaxEntries() }

// Clock converts the datapath's timestamps to wall-clock time. The datapath
// stamps with bpf_ktime_get_coarse_ns: CLOCK_MONOTONIC_COARSE, a tick-granular
// monotonic clock that costs a fraction of a precise read per packet and, like
// nf_conntrack's jiffies, stands still while the machine is suspended.
type Clock struct {
	wall time.Time
	mono time.Duration
}

// Now samples both clocks.
func Now() Clock {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &ts)
	return Clock{wall: time.Now(), mono: time.Duration(ts.Nano())}
}

// Mono returns the datapath clock's reading (CLOCK_MONOTONIC_COARSE).
func (c Clock) Mono() time.Duration { return c.mono }

// Wall converts a datapath timestamp to wall-clock time.
func (c Clock) Wall(d time.Duration) time.Time { return c.wall.Add(d - c.mono) }
