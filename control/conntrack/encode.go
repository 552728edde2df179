package conntrack

import (
	"encoding/json"
	"strconv"
	"time"

	"github.com/ctd-dev/ctd/control/ifnames"
	"github.com/ctd-dev/ctd/control/ipproto"
	"github.com/ctd-dev/ctd/datapath/cgroupv2"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// Encoder appends flows as JSON objects or text lines without reflection or
// per-flow allocations: `ct list` of a million flows is dominated by this.
// Its output is byte for byte what json.Marshal(RowOf(...)) and Line give.
type Encoder struct {
	bt    ctmap.Clock
	names *ifnames.Cache
	cg    *cgroupv2.Names

	// The formatted date and time of one wall-clock second, reused while
	// consecutive stamps fall in the same second.
	sec    int64
	secFmt []byte
}

// NewEncoder returns an encoder that converts stamps with bt, names
// interfaces with names and cgroups with cg.
func NewEncoder(bt ctmap.Clock, names *ifnames.Cache, cg *cgroupv2.Names) *Encoder {
	return &Encoder{bt: bt, names: names, cg: cg, sec: -1}
}

// AppendJSON appends fl as one JSON object (the keys of Row, in its order).
func (e *Encoder) AppendJSON(b []byte, fl ctmap.Flow) []byte {
	b = append(b, `{"proto":`...)
	b = appendString(b, ipproto.Name(fl.Proto))
	b = append(b, `,"src":"`...)
	b = fl.Src.AppendTo(b)
	b = append(b, `","sport":`...)
	b = strconv.AppendUint(b, uint64(fl.Sport), 10)
	b = append(b, `,"dst":"`...)
	b = fl.Dst.AppendTo(b)
	b = append(b, `","dport":`...)
	b = strconv.AppendUint(b, uint64(fl.Dport), 10)
	b = append(b, `,"state":`...)
	b = appendString(b, fl.State.String())
	b = append(b, `,"packets_orig":`...)
	b = strconv.AppendUint(b, fl.PacketsOrig, 10)
	b = append(b, `,"bytes_orig":`...)
	b = strconv.AppendUint(b, fl.BytesOrig, 10)
	b = append(b, `,"packets_reply":`...)
	b = strconv.AppendUint(b, fl.PacketsReply, 10)
	b = append(b, `,"bytes_reply":`...)
	b = strconv.AppendUint(b, fl.BytesReply, 10)
	b = append(b, `,"first_seen":"`...)
	b = e.appendTime(b, fl.FirstSeen)
	b = append(b, `","last_seen":"`...)
	b = e.appendTime(b, fl.LastSeen)
	b = append(b, `","iface":`...)
	b = appendString(b, e.names.Name(fl.Ifindex))
	b = append(b, `,"src_identity":`...)
	b = strconv.AppendUint(b, uint64(fl.SrcIdentity), 10)
	b = append(b, `,"dst_identity":`...)
	b = strconv.AppendUint(b, uint64(fl.DstIdentity), 10)
	b = append(b, `,"flags":[`...)
	for i, name := range FlagNames(fl.Flags) {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendString(b, name)
	}
	b = append(b, ']')
	if fl.Pid != 0 {
		b = append(b, `,"pid":`...)
		b = strconv.AppendUint(b, uint64(fl.Pid), 10)
	}
	if fl.Comm != (ctmap.Comm{}) {
		b = append(b, `,"comm":`...)
		b = appendString(b, fl.Comm.String())
	}
	if fl.CgroupID != 0 {
		b = append(b, `,"cgroup":`...)
		b = appendString(b, e.cg.Name(fl.CgroupID))
		b = append(b, `,"cgroup_id":`...)
		b = strconv.AppendUint(b, fl.CgroupID, 10)
	}
	if fl.RTT != 0 {
		b = append(b, `,"rtt_us":`...)
		b = strconv.AppendUint(b, uint64(fl.RTT), 10)
	}
	return append(b, '}')
}

// AppendLine appends fl in the text form of Line.
func (e *Encoder) AppendLine(b []byte, fl ctmap.Flow) []byte {
	b = append(b, ipproto.Name(fl.Proto)...)
	b = append(b, ' ')
	b = append(b, fl.State.String()...)
	b = append(b, " src="...)
	b = fl.Src.AppendTo(b)
	b = append(b, " dst="...)
	b = fl.Dst.AppendTo(b)
	b = append(b, " sport="...)
	b = strconv.AppendUint(b, uint64(fl.Sport), 10)
	b = append(b, " dport="...)
	b = strconv.AppendUint(b, uint64(fl.Dport), 10)
	b = append(b, " packets="...)
	b = strconv.AppendUint(b, fl.PacketsOrig, 10)
	b = append(b, " bytes="...)
	b = strconv.AppendUint(b, fl.BytesOrig, 10)
	b = append(b, " | packets="...)
	b = strconv.AppendUint(b, fl.PacketsReply, 10)
	b = append(b, " bytes="...)
	b = strconv.AppendUint(b, fl.BytesReply, 10)
	b = append(b, " id="...)
	b = strconv.AppendUint(b, uint64(fl.SrcIdentity), 10)
	b = append(b, "->"...)
	b = strconv.AppendUint(b, uint64(fl.DstIdentity), 10)
	b = append(b, " iface="...)
	b = append(b, e.names.Name(fl.Ifindex)...)
	if fl.Flags != 0 {
		b = append(b, " flags="...)
		for i, name := range FlagNames(fl.Flags) {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, name...)
		}
	}
	if fl.Pid != 0 {
		b = append(b, " pid="...)
		b = strconv.AppendUint(b, uint64(fl.Pid), 10)
	}
	if fl.Comm != (ctmap.Comm{}) {
		b = append(b, " comm="...)
		b = append(b, fl.Comm.Text()...)
	}
	if fl.CgroupID != 0 {
		b = append(b, " cgroup="...)
		b = append(b, e.cg.Name(fl.CgroupID)...)
	}
	if fl.RTT != 0 {
		b = append(b, " rtt="...)
		b = append(b, RTTText(fl.RTT)...)
	}
	return b
}

// appendTime appends the wall time of a CLOCK_MONOTONIC_COARSE stamp in RFC 3339
// with nanoseconds, UTC, as time.RFC3339Nano formats it.
func (e *Encoder) appendTime(b []byte, d time.Duration) []byte {
	t := e.bt.Wall(d).UTC()
	if s := t.Unix(); s != e.sec {
		e.sec = s
		e.secFmt = t.Truncate(time.Second).AppendFormat(e.secFmt[:0], "2006-01-02T15:04:05")
	}
	b = append(b, e.secFmt...)
	if ns := t.Nanosecond(); ns != 0 {
		var frac [10]byte
		frac[0] = '.'
		for i, v := 9, ns; i > 0; i-- {
			frac[i] = byte('0' + v%10)
			v /= 10
		}
		n := 10
		for frac[n-1] == '0' {
			n--
		}
		b = append(b, frac[:n]...)
	}
	return append(b, 'Z')
}

// appendString appends s as a JSON string as encoding/json writes it.
func appendString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x80 || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
