// Package ctmap reads and edits the conntrack tables (ct_v1, ct_unconfirmed_v1) as flows.
package ctmap

import (
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

// Key and Entry are the map's raw layout.
type (
	Key   = bpf.CtdCtKey
	Entry = bpf.CtdCtEntry
)

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

// Map is the conntrack table: the confirmed flows (ct_v1) and those not
// yet confirmed (ct_unconfirmed_v1), one layout. A flow is in one of them
// (for an instant, while the datapath promotes it, in both).
type Map struct {
	m           *ebpf.Map // confirmed
	unconfirmed *ebpf.Map
}

// New wraps the confirmed and unconfirmed tables.
func New(confirmed, unconfirmed *ebpf.Map) *Map { return &Map{m: confirmed, unconfirmed: unconfirmed} }

// Confirmed is the confirmed table's map.
func (m *Map) Confirmed() *ebpf.Map { return m.m }

func (m *Map) tables() [2]*ebpf.Map { return [2]*ebpf.Map{m.m, m.unconfirmed} }

// BatchSize is how many entries one batch syscall moves.
const BatchSize = 4096

// Iterate calls fn for every entry, reading the table in batches. Entries
// that appear or vanish while it runs may or may not be seen. fn returning
// false stops the walk.
//
// The next batch is read in the kernel while fn works through the current
// one: on a million entries the syscalls and the caller's work (decoding,
// printing) take about as long as each other, and overlap on two CPUs.
func (m *Map) Iterate(fn func(k *Key, e *Entry) bool) error {
	type batch struct {
		keys []Key
		vals []Entry
		n    int
	}
	const inFlight = 2
	free := make(chan *batch, inFlight)
	full := make(chan *batch, inFlight) // never blocks: at most inFlight batches exist
	for range inFlight {
		free <- &batch{keys: make([]Key, BatchSize), vals: make([]Entry, BatchSize)}
	}
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		defer close(full)
		for _, table := range m.tables() {
			var cursor ebpf.MapBatchCursor
			for {
				var b *batch
				select {
				case b = <-free:
				case <-stop:
					done <- nil
					return
				}
				n, err := table.BatchLookup(&cursor, b.keys, b.vals, nil)
				if b.n = n; n > 0 {
					full <- b
				} else {
					free <- b
				}
				if errors.Is(err, ebpf.ErrKeyNotExist) {
					break
				}
				if err != nil {
					done <- fmt.Errorf("read conntrack table %s: %w", m.tableName(table), err)
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

// Delete removes keys from the table that holds each, in batches; keys
// already gone (evicted or deleted meanwhile) are not an error. It returns
// how many it deleted.
//
// A key a table lacks costs a system call of its own (a batch stops at the
// first missing key), so each key is tried in one table and, only if it
// is missing there, in the other. The unconfirmed table goes first: the
// keys deleted in bulk right after their creation (the benchmark's new
// flows) are all there.
func (m *Map) Delete(keys []Key) (int, error) {
	deleted := 0
	for _, table := range [2]*ebpf.Map{m.unconfirmed, m.m} {
		n, missing, err := deleteFrom(table, keys)
		deleted += n
		if err != nil {
			return deleted, fmt.Errorf("delete conntrack entries from %s: %w", m.tableName(table), err)
		}
		keys = missing
	}
	return deleted, nil
}

// deleteFrom deletes keys from table and returns the keys it lacks.
func deleteFrom(table *ebpf.Map, keys []Key) (deleted int, missing []Key, err error) {
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

// Put writes an entry into the confirmed table (for tests and migrations).
func (m *Map) Put(k *Key, e *Entry) error {
	if err := m.m.Put(k, e); err != nil {
		return fmt.Errorf("write conntrack entry: %w", err)
	}
	return nil
}

// Lookup reads one entry, from the confirmed table or else the unconfirmed one.
func (m *Map) Lookup(k *Key) (Entry, error) {
	var e Entry
	err := m.m.Lookup(k, &e)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		err = m.unconfirmed.Lookup(k, &e)
	}
	return e, err
}

// PutBatch writes entries into the confirmed table in batches (for tests,
// benchmarks and migrations).
func (m *Map) PutBatch(keys []Key, entries []Entry) error {
	if len(keys) != len(entries) {
		return fmt.Errorf("write conntrack entries: %d keys but %d entries", len(keys), len(entries))
	}
	for len(keys) > 0 {
		n := min(len(keys), BatchSize)
		if _, err := m.m.BatchUpdate(keys[:n], entries[:n], nil); err != nil {
			return fmt.Errorf("write conntrack entries: %w", err)
		}
		keys, entries = keys[n:], entries[n:]
	}
	return nil
}

// MaxEntries is the confirmed table's capacity.
func (m *Map) MaxEntries() uint32 { return m.m.MaxEntries() }

// UnconfirmedMaxEntries is the unconfirmed table's capacity.
func (m *Map) UnconfirmedMaxEntries() uint32 { return m.unconfirmed.MaxEntries() }

func (m *Map) tableName(t *ebpf.Map) string {
	if t == m.m {
		return bpf.CtdMapCtV1
	}
	return bpf.CtdMapCtUnconfirmedV1
}

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
