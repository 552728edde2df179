// Package metricsmap reads the datapath's per-CPU counters (metrics_v1).
package metricsmap

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
)

// Reason is what a counter counts (enum metric_reason in bpf/common.h).
type Reason uint8

const (
	FwdEstablished = Reason(bpf.CtdMetricReasonM_FWD_ESTABLISHED)
	FwdNew         = Reason(bpf.CtdMetricReasonM_FWD_NEW)
	FwdRelated     = Reason(bpf.CtdMetricReasonM_FWD_RELATED)
	FwdUntracked   = Reason(bpf.CtdMetricReasonM_FWD_UNTRACKED)
	FwdUnparseable = Reason(bpf.CtdMetricReasonM_FWD_UNPARSEABLE)

	DropPolicy   = Reason(bpf.CtdMetricReasonM_DROP_POLICY)
	DropInvalid  = Reason(bpf.CtdMetricReasonM_DROP_INVALID)
	DropCTInsert = Reason(bpf.CtdMetricReasonM_DROP_CT_INSERT)
	DropParse    = Reason(bpf.CtdMetricReasonM_DROP_PARSE)
	DropRevoked  = Reason(bpf.CtdMetricReasonM_DROP_REVOKED)

	CTCreated         = Reason(bpf.CtdMetricReasonM_CT_CREATED)
	CTUpdateFailed    = Reason(bpf.CtdMetricReasonM_CT_UPDATE_FAILED)
	EventsLost        = Reason(bpf.CtdMetricReasonM_EVENTS_LOST)
	EventsRateLimited = Reason(bpf.CtdMetricReasonM_EVENTS_RATELIMITED)
	Fragments         = Reason(bpf.CtdMetricReasonM_FRAGMENTS)
	CTConfirmed       = Reason(bpf.CtdMetricReasonM_CT_CONFIRMED)
	CTMidstreamMiss   = Reason(bpf.CtdMetricReasonM_CT_MIDSTREAM_MISS)
	OwnerFailed       = Reason(bpf.CtdMetricReasonM_OWNER_FAILED)

	// ReasonsPerDirection is METRIC_MAX: the map's index is dir*64 + reason.
	ReasonsPerDirection = int(bpf.CtdMetricReasonMETRIC_MAX)
)

// Kind groups reasons: a packet is either forwarded or dropped once; other
// counters count events beside the verdict.
type Kind string

const (
	Forwarded Kind = "forwarded"
	Dropped   Kind = "dropped"
	Counter   Kind = "counter"
)

type reasonInfo struct {
	name string
	kind Kind
}

var reasons = map[Reason]reasonInfo{
	FwdEstablished:    {"established", Forwarded},
	FwdNew:            {"new", Forwarded},
	FwdRelated:        {"related", Forwarded},
	FwdUntracked:      {"untracked", Forwarded},
	FwdUnparseable:    {"unparseable", Forwarded},
	DropPolicy:        {"policy", Dropped},
	DropInvalid:       {"invalid", Dropped},
	DropCTInsert:      {"ct-insert-failed", Dropped},
	DropParse:         {"parse-error", Dropped},
	DropRevoked:       {"revoked", Dropped},
	CTCreated:         {"ct-created", Counter},
	CTUpdateFailed:    {"ct-update-failed", Counter},
	EventsLost:        {"events-lost", Counter},
	EventsRateLimited: {"events-ratelimited", Counter},
	Fragments:         {"fragments", Counter},
	CTConfirmed:       {"ct-confirmed", Counter},
	CTMidstreamMiss:   {"ct-midstream-miss", Counter},
	OwnerFailed:       {"owner-failed", Counter},
}

// Reasons lists every reason the datapath counts, in index order.
var Reasons = []Reason{
	FwdEstablished, FwdNew, FwdRelated, FwdUntracked, FwdUnparseable,
	DropPolicy, DropInvalid, DropCTInsert, DropParse, DropRevoked,
	CTCreated, CTUpdateFailed, EventsLost, EventsRateLimited, Fragments, CTConfirmed, CTMidstreamMiss, OwnerFailed,
}

// String names the reason as ctd prints it, e.g. "ct-insert-failed".
func (r Reason) String() string {
	if ri, ok := reasons[r]; ok {
		return ri.name
	}
	return "reason" + strconv.Itoa(int(r))
}

// Kind says whether r counts forwarded or dropped packets, or neither.
func (r Reason) Kind() Kind {
	if ri, ok := reasons[r]; ok {
		return ri.kind
	}
	return Counter
}

// Value is a counter's packets and bytes, summed over CPUs. Counters that
// are not verdicts count packets (or events) only, except Fragments.
type Value struct {
	Packets uint64
	Bytes   uint64
}

// Add returns the sum of v and w.
func (v Value) Add(w Value) Value {
	return Value{Packets: v.Packets + w.Packets, Bytes: v.Bytes + w.Bytes}
}

// Snapshot is every counter at one moment, summed over CPUs.
type Snapshot struct {
	v [2][ReasonsPerDirection]Value
}

// Get returns one counter.
func (s *Snapshot) Get(d bpf.Direction, r Reason) Value {
	if int(d) >= len(s.v) || int(r) >= ReasonsPerDirection {
		return Value{}
	}
	return s.v[d][r]
}

// Total returns a counter summed over both directions.
func (s *Snapshot) Total(r Reason) Value {
	return s.Get(bpf.Ingress, r).Add(s.Get(bpf.Egress, r))
}

// Sample is one counter of a Snapshot.
type Sample struct {
	Dir    bpf.Direction
	Reason Reason
	Value
}

// Samples lists every known counter, ingress first, in index order.
func (s *Snapshot) Samples() []Sample {
	out := make([]Sample, 0, 2*len(Reasons))
	for _, d := range []bpf.Direction{bpf.Ingress, bpf.Egress} {
		for _, r := range Reasons {
			out = append(out, Sample{Dir: d, Reason: r, Value: s.Get(d, r)})
		}
	}
	return out
}

// Map is the datapath's metrics map.
type Map struct {
	m *ebpf.Map
}

// New wraps the metrics_v1 map.
func New(m *ebpf.Map) *Map { return &Map{m: m} }

// Read reads every counter of every CPU with one batch lookup and sums
// them. Counters keep counting while it runs: each is exact as of its read.
func (m *Map) Read() (Snapshot, error) {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return Snapshot{}, fmt.Errorf("read metrics: %w", err)
	}
	n := int(m.m.MaxEntries())
	if n > 2*ReasonsPerDirection {
		n = 2 * ReasonsPerDirection
	}
	keys := make([]uint32, n)
	vals := make([]bpf.CtdMetricValue, n*cpus)
	var (
		s      Snapshot
		cursor ebpf.MapBatchCursor
	)
	for {
		got, err := m.m.BatchLookup(&cursor, keys, vals, nil)
		for i := range got {
			d, r := keys[i]/uint32(ReasonsPerDirection), keys[i]%uint32(ReasonsPerDirection)
			if d >= uint32(len(s.v)) {
				continue
			}
			for _, v := range vals[i*cpus : (i+1)*cpus] {
				s.v[d][r].Packets += v.Packets
				s.v[d][r].Bytes += v.Bytes
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) || (err == nil && got == 0) {
			return s, nil
		}
		if err != nil {
			return Snapshot{}, fmt.Errorf("read metrics: %w", err)
		}
	}
}
