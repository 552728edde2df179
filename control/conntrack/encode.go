package conntrack

import (
	"encoding/json"
	"math"
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
// An Encoder is for one listing: it is not safe for concurrent use.
type Encoder struct {
	names *ifnames.Cache
	cg    *cgroupv2.Names

	// The clock's two readings (see ctmap.Clock): the wall time, as Unix
	// seconds and nanoseconds, at datapath stamp mono.
	mono     time.Duration
	wallSec  int64
	wallNsec int64

	// The formatted date ("2006-01-02T") of one day since the Unix epoch,
	// reused while stamps fall on that day.
	day    int64
	dayFmt []byte
}

// NewEncoder returns an encoder that converts stamps with bt, names
// interfaces with names and cgroups with cg.
func NewEncoder(bt ctmap.Clock, names *ifnames.Cache, cg *cgroupv2.Names) *Encoder {
	mono := bt.Mono()
	wall := bt.Wall(mono) // the wall reading itself
	return &Encoder{names: names, cg: cg, mono: mono, wallSec: wall.Unix(), wallNsec: int64(wall.Nanosecond()),
		day: math.MinInt64}
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
	b = appendFlags(b, fl.Flags, `"`, `","`, `"`)
	b = append(b, ']')
	if fl.Pid != 0 {
		b = append(b, `,"pid":`...)
		b = strconv.AppendUint(b, uint64(fl.Pid), 10)
	}
	if fl.Comm != (ctmap.Comm{}) {
		b = append(b, `,"comm":`...)
		b = appendComm(b, &fl.Comm)
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
		b = appendFlags(b, fl.Flags, "", ",", "")
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

// appendFlags appends the names FlagNames gives for f, sep between two,
// open before the first and close after the last: "", "," and "" in text;
// `"`, `","` and `"` in JSON, as the names need no escaping.
func appendFlags(b []byte, f uint8, open, sep, close string) []byte {
	if f == 0 {
		return b
	}
	b = append(b, open...)
	first := true
	for _, fn := range flagNames {
		if f&fn.bit != 0 {
			if !first {
				b = append(b, sep...)
			}
			first = false
			b = append(b, fn.name...)
			f &^= fn.bit
		}
	}
	if f != 0 { // unknown bits, as fmt's %#x
		if !first {
			b = append(b, sep...)
		}
		b = append(b, "0x"...)
		b = strconv.AppendUint(b, uint64(f), 16)
	}
	return append(b, close...)
}

// appendTime appends the wall time of a CLOCK_MONOTONIC_COARSE stamp in RFC 3339
// with nanoseconds, UTC, as bt.Wall(d).UTC().Format(time.RFC3339Nano) gives it.
func (e *Encoder) appendTime(b []byte, d time.Duration) []byte {
	// time.Time.Add's arithmetic on the clock's wall reading.
	delta := d - e.mono
	sec := e.wallSec + int64(delta/time.Second)
	nsec := e.wallNsec + int64(delta%time.Second)
	if nsec >= 1e9 {
		sec++
		nsec -= 1e9
	} else if nsec < 0 {
		sec--
		nsec += 1e9
	}
	day, tod := sec/86400, sec%86400 // UTC has no leap seconds
	if tod < 0 {
		day, tod = day-1, tod+86400
	}
	if day != e.day {
		e.day = day
		e.dayFmt = time.Unix(day*86400, 0).UTC().AppendFormat(e.dayFmt[:0], "2006-01-02T")
	}
	b = append(b, e.dayFmt...)
	t := uint32(tod) // unsigned: cheaper division
	h, m, s := t/3600, t/60%60, t%60
	b = append(b, byte('0'+h/10), byte('0'+h%10), ':', byte('0'+m/10), byte('0'+m%10), ':', byte('0'+s/10), byte('0'+s%10))
	if nsec != 0 {
		var frac [10]byte
		frac[0] = '.'
		for i, v := 9, uint32(nsec); i > 0; i-- {
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

// appendComm appends c as a JSON string, as appendString(c.String()).
func appendComm(b []byte, c *ctmap.Comm) []byte {
	n := 0
	for n < len(c) && c[n] != 0 {
		if !jsonSafe(c[n]) {
			return appendString(b, c.String())
		}
		n++
	}
	b = append(b, '"')
	b = append(b, c[:n]...)
	return append(b, '"')
}

// jsonSafe reports whether encoding/json writes c in a string as it is.
func jsonSafe(c byte) bool {
	return c >= 0x20 && c < 0x80 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&'
}

// appendString appends s as a JSON string as encoding/json writes it.
func appendString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if !jsonSafe(s[i]) {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
