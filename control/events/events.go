// Package events decodes and streams datapath events.
//
// The datapath writes flow-new, flow-closed, drop, ct-insert-failed and
// ct-midstream-miss records to the ring buffer events_v2, but only while a
// consumer is registered in evlisten_v1 (Listen): with nobody listening it
// reserves nothing and counts nothing as lost, so events-lost means that a
// consumer fell behind. A ring buffer has one consumer: two readers would
// each get a share of the records. ctd's consumer is 'ctd monitor', for as
// long as it runs; the daemon never reads events (it learns what it needs
// from the counters of metrics_v1) and never registers. A Reader skips what was
// written before it started (see Reader.SkipBefore).
package events

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/ifnames"
	"github.com/ctd-dev/ctd/control/ipproto"
	"github.com/ctd-dev/ctd/datapath/byteorder"
	"github.com/ctd-dev/ctd/datapath/cgroupv2"
	"github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
)

// Type is an event's kind (enum event_type in bpf/common.h).
type Type uint8

const (
	FlowNew        = Type(bpf.CtdEventTypeEV_FLOW_NEW)
	FlowClosed     = Type(bpf.CtdEventTypeEV_FLOW_CLOSED)
	Drop           = Type(bpf.CtdEventTypeEV_DROP)
	CTInsertFailed = Type(bpf.CtdEventTypeEV_CT_INSERT_FAILED)
	// CTMidstreamMiss: a TCP packet other than SYN or RST found no
	// conntrack entry; its flow was lost to the LRU (or flushed, or is
	// older than ctd).
	CTMidstreamMiss = Type(bpf.CtdEventTypeEV_CT_MIDSTREAM_MISS)
)

// recordSize is the size of struct event.
const recordSize = int(unsafe.Sizeof(bpf.CtdEvent{}))

func (t Type) String() string {
	switch t {
	case FlowNew:
		return "flow-new"
	case FlowClosed:
		return "flow-closed"
	case Drop:
		return "drop"
	case CTInsertFailed:
		return "ct-insert-failed"
	case CTMidstreamMiss:
		return "ct-midstream-miss"
	}
	return "type" + strconv.Itoa(int(t))
}

// IsFlow reports whether t is about a flow's life: flow-new, flow-closed,
// ct-midstream-miss.
func (t Type) IsFlow() bool { return t == FlowNew || t == FlowClosed || t == CTMidstreamMiss }

// IsDrop reports whether t is about a dropped packet: drop, ct-insert-failed.
func (t Type) IsDrop() bool { return t == Drop || t == CTInsertFailed }

// Event is one datapath event as ctd prints it.
type Event struct {
	Time        time.Time  `json:"time"`             // wall clock, RFC 3339
	Type        string     `json:"type"`             // flow-new, flow-closed, drop, ct-insert-failed, ct-midstream-miss
	Reason      string     `json:"reason,omitempty"` // drops: policy, ct-insert-failed
	Proto       string     `json:"proto"`
	Src         netip.Addr `json:"src"` // flow events: the originator; drops: the packet's source
	Sport       uint16     `json:"sport"`
	Dst         netip.Addr `json:"dst"`
	Dport       uint16     `json:"dport"`
	SrcIdentity uint32     `json:"src_identity"`
	DstIdentity uint32     `json:"dst_identity"`
	Iface       string     `json:"iface"` // name, or the ifindex where no interface has it
	Ifindex     uint32     `json:"ifindex"`
	Dir         string     `json:"dir"`             // the hook that saw the packet: ingress, egress
	State       string     `json:"state,omitempty"` // flow events: the flow's state
	*Counters              // flow-closed: the flow's final counters
	// Flow events: the local socket's owner and the handshake RTT, where
	// known (see ctd ct list).
	Pid      uint32        `json:"pid,omitempty"`
	Comm     string        `json:"comm,omitempty"`
	Cgroup   string        `json:"cgroup,omitempty"`
	CgroupID uint64        `json:"cgroup_id,omitempty"`
	RTT      uint32        `json:"rtt_us,omitempty"`
	Kind     Type          `json:"-"`
	Stamp    time.Duration `json:"-"` // Time as the datapath stamped it (CLOCK_MONOTONIC_COARSE)
}

// Counters are a flow's counters, per direction of the flow.
type Counters struct {
	PacketsOrig  uint64 `json:"packets_orig"`
	BytesOrig    uint64 `json:"bytes_orig"`
	PacketsReply uint64 `json:"packets_reply"`
	BytesReply   uint64 `json:"bytes_reply"`
}

// Decoder turns raw ring buffer records into Events. It resolves interface
// names in the calling thread's network namespace and caches them.
type Decoder struct {
	clock   ctmap.Clock
	names   *ifnames.Cache
	cgroups *cgroupv2.Names // nil without a cgroup v2 mount: ids
}

// NewDecoder returns a Decoder that converts times with a fresh reading of
// the clocks.
func NewDecoder() *Decoder {
	d := &Decoder{clock: ctmap.Now(), names: ifnames.New()}
	if root, err := cgroupv2.Mount(); err == nil {
		d.cgroups = cgroupv2.NewNames(root)
	}
	return d
}

// Resync reads the clocks again (after the wall clock was stepped) and
// forgets cached interface names.
func (d *Decoder) Resync() {
	d.clock = ctmap.Now()
	d.names.Forget()
}

// Decode decodes one record.
func (d *Decoder) Decode(raw []byte) (Event, error) {
	var r bpf.CtdEvent
	if len(raw) < recordSize {
		return Event{}, fmt.Errorf("decode event: record of %d bytes, want %d", len(raw), recordSize)
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&r)), recordSize), raw)
	t := Type(r.Type)
	if t < FlowNew || t > CTInsertFailed {
		return Event{}, fmt.Errorf("decode event: unknown type %d", r.Type)
	}
	stamp := time.Duration(r.Time)
	ev := Event{
		Time:        d.clock.Wall(stamp),
		Type:        t.String(),
		Proto:       ipproto.Name(r.Proto),
		Src:         byteorder.Addr(r.Src, r.Family),
		Sport:       byteorder.Swap16(r.Sport),
		Dst:         byteorder.Addr(r.Dst, r.Family),
		Dport:       byteorder.Swap16(r.Dport),
		SrcIdentity: r.SrcIdentity,
		DstIdentity: r.DstIdentity,
		Iface:       d.names.Name(r.Ifindex),
		Ifindex:     r.Ifindex,
		Dir:         bpf.Direction(r.Dir).String(),
		Kind:        t,
		Stamp:       stamp,
	}
	if t.IsDrop() {
		ev.Reason = metricsmap.Reason(r.Reason).String()
	}
	if t.IsFlow() {
		ev.State = ctmap.State(r.State).String()
		ev.Pid, ev.CgroupID, ev.RTT = r.Pid, r.CgroupId, r.RttUs
		ev.Comm = ctmap.CommFrom(r.Comm).String()
		if r.CgroupId != 0 {
			ev.Cgroup = d.cgroups.Name(r.CgroupId)
		}
	}
	if t == FlowClosed {
		ev.Counters = &Counters{
			PacketsOrig:  r.PacketsOrig,
			BytesOrig:    r.BytesOrig,
			PacketsReply: r.PacketsReply,
			BytesReply:   r.BytesReply,
		}
	}
	return ev, nil
}

// ErrClosed is returned by Read after Close.
var ErrClosed = ringbuf.ErrClosed

// Reader streams events from the ring buffer. Only one Reader should read
// a ring at a time (see the package documentation).
type Reader struct {
	rd   *ringbuf.Reader
	dec  *Decoder
	rec  ringbuf.Record
	skip time.Duration
}

// NewReader opens a reader on the events_v2 ring buffer.
func NewReader(events *ebpf.Map) (*Reader, error) {
	rd, err := ringbuf.NewReader(events)
	if err != nil {
		return nil, fmt.Errorf("open event ring buffer: %w", err)
	}
	return &Reader{rd: rd, dec: NewDecoder()}, nil
}

// SkipBefore makes Read drop events stamped before t (CLOCK_MONOTONIC_COARSE),
// such as those that piled up while nobody read.
func (r *Reader) SkipBefore(t time.Duration) { r.skip = t }

// Decoder returns the reader's decoder, e.g. to Resync it.
func (r *Reader) Decoder() *Decoder { return r.dec }

// Read blocks until the next event, Close (ErrClosed), or the deadline
// (os.ErrDeadlineExceeded). It is not safe for concurrent use, except with
// Close and SetDeadline.
func (r *Reader) Read() (Event, error) {
	for {
		if err := r.rd.ReadInto(&r.rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) {
				return Event{}, ErrClosed
			}
			return Event{}, fmt.Errorf("read event: %w", err)
		}
		ev, err := r.dec.Decode(r.rec.RawSample)
		if err != nil {
			return Event{}, err
		}
		if ev.Stamp < r.skip {
			continue
		}
		return ev, nil
	}
}

// SetDeadline makes a blocked or later Read return at t.
func (r *Reader) SetDeadline(t time.Time) { r.rd.SetDeadline(t) }

// Close stops the reader and interrupts a blocked Read.
func (r *Reader) Close() error { return r.rd.Close() }

// DefaultRate is the per-CPU event rate ctd suggests: events per second
// per CPU, with a burst of as many.
const DefaultRate = loader.DefaultEventsRate

// RateLimit is the datapath's per-CPU token bucket for events.
type RateLimit struct {
	Rate  uint32 // events per second per CPU; 0: unlimited
	Burst uint32 // bucket depth per CPU; 0: as many as Rate
}

func (l RateLimit) String() string {
	if l.Rate == 0 {
		return "unlimited"
	}
	burst := l.Burst
	if burst == 0 {
		burst = l.Rate
	}
	return fmt.Sprintf("%d events/s per CPU, burst %d", l.Rate, burst)
}

// GetRateLimit reads the event rate limit from the configuration.
func GetRateLimit(cfg *config.Map) (RateLimit, error) {
	c, err := cfg.Read()
	return RateLimit{Rate: c.EventsRate, Burst: c.EventsBurst}, err
}

// SetRateLimit writes the event rate limit to the configuration, keeping
// its other fields (config.Map serialises it with other writers).
func SetRateLimit(cfg *config.Map, l RateLimit) error {
	if l.Rate == 0 && l.Burst != 0 {
		return fmt.Errorf("invalid event burst %d: a burst needs a rate (rate 0 means unlimited)", l.Burst)
	}
	return cfg.Update(func(c *config.Values) { c.EventsRate, c.EventsBurst = l.Rate, l.Burst })
}

// Listener is the consumer registered in evlisten_v1: the datapath writes
// events only while one is (until its registration expires).
type Listener struct {
	Until time.Duration // CLOCK_MONOTONIC_COARSE (ctmap.Clock.Mono); 0: none
	PID   uint32
}

// Active reports whether l is registered at now (ctmap.Clock.Mono).
func (l Listener) Active(now time.Duration) bool { return l.Until != 0 && now <= l.Until }

// ListenTTL is how long a registration lasts: a consumer refreshes it every
// second (ctd monitor does), so that the datapath stops writing events
// within seconds of the consumer's end, however it ended.
const ListenTTL = 3 * time.Second

// Listen registers process pid as the consumer of the events until ListenTTL
// from now, replacing any other registration. Call it again to refresh.
func Listen(evlisten *ebpf.Map, pid int) error {
	l := bpf.CtdEvlisten{Until: uint64(ctmap.Now().Mono() + ListenTTL), Pid: uint32(pid)}
	if err := evlisten.Put(uint32(0), &l); err != nil {
		return fmt.Errorf("register as the event consumer in evlisten_v1: %w", err)
	}
	return nil
}

// Unlisten ends pid's registration, unless another consumer holds it now.
func Unlisten(evlisten *ebpf.Map, pid int) error {
	l, err := GetListener(evlisten)
	if err != nil || l.PID != uint32(pid) {
		return err
	}
	if err := evlisten.Put(uint32(0), &bpf.CtdEvlisten{}); err != nil {
		return fmt.Errorf("unregister the event consumer in evlisten_v1: %w", err)
	}
	return nil
}

// GetListener reads the registration in evlisten_v1.
func GetListener(evlisten *ebpf.Map) (Listener, error) {
	var l bpf.CtdEvlisten
	if err := evlisten.Lookup(uint32(0), &l); err != nil {
		return Listener{}, fmt.Errorf("read evlisten_v1: %w", err)
	}
	return Listener{Until: time.Duration(l.Until), PID: l.Pid}, nil
}

// String is a readable one-line rendering of e, e.g.
//
//	2026-01-02T03:04:05.123456Z flow-closed tcp 198.51.100.1:41000 -> 198.51.100.2:80 ingress ctd0 id 2 -> 42 CLOSED orig 4 pkts 400 B, reply 3 pkts 2200 B
func (e Event) String() string {
	var b strings.Builder
	b.WriteString(e.Time.Format("2006-01-02T15:04:05.000000Z07:00"))
	b.WriteByte(' ')
	b.WriteString(e.Type)
	if e.Reason != "" {
		fmt.Fprintf(&b, " (%s)", e.Reason)
	}
	fmt.Fprintf(&b, " %s %s -> %s %s %s id %d -> %d", e.Proto,
		netip.AddrPortFrom(e.Src, e.Sport), netip.AddrPortFrom(e.Dst, e.Dport),
		e.Dir, e.Iface, e.SrcIdentity, e.DstIdentity)
	if e.State != "" {
		b.WriteString(" " + e.State)
	}
	if c := e.Counters; c != nil {
		fmt.Fprintf(&b, " orig %d pkts %d B, reply %d pkts %d B", c.PacketsOrig, c.BytesOrig, c.PacketsReply, c.BytesReply)
	}
	if e.Pid != 0 {
		fmt.Fprintf(&b, " pid=%d", e.Pid)
	}
	if c, ok := ctmap.CommOf(e.Comm); ok {
		b.WriteString(" comm=" + c.Text())
	}
	if e.Cgroup != "" {
		b.WriteString(" cgroup=" + e.Cgroup)
	}
	if e.RTT != 0 {
		fmt.Fprintf(&b, " rtt=%v", time.Duration(e.RTT)*time.Microsecond)
	}
	return b.String()
}
