package gc

import (
	"fmt"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// Lifetimes is how long an entry may stay idle (since its last packet) in
// each state before GC deletes it.
//
// The defaults follow Cilium (TCP 6 h, SYN 60 s, close 10 s, non-TCP 60 s)
// and, where Cilium has no state of its own, Linux nf_conntrack
// (nf_conntrack_tcp_timeout_fin_wait 120 s, nf_conntrack_udp_timeout 30 s for
// an unreplied UDP flow, nf_conntrack_icmp_timeout 30 s):
//
//	state                      default   Cilium   nf_conntrack
//	TCP SYN_SENT                  60s      60s     120s
//	TCP SYN_RECV                  60s      60s      60s
//	TCP ESTABLISHED                6h       6h       5d
//	TCP FIN_WAIT (half closed)     2m       10s     120s
//	TCP CLOSED (both FIN, RST)    10s      10s      10s
//	UDP NEW (no reply yet)        30s      60s      30s
//	UDP ESTABLISHED (replied)     60s      60s     120s
//	ICMP, ICMPv6                  30s      60s      30s
//	other protocols               60s      60s     600s
//
// A half-closed TCP connection may still carry data one way, so FIN_WAIT
// keeps nf_conntrack's 2 minutes rather than Cilium's close timeout.
type Lifetimes struct {
	TCPSynSent     time.Duration
	TCPSynRecv     time.Duration
	TCPEstablished time.Duration
	TCPFinWait     time.Duration
	TCPClosed      time.Duration
	UDPNew         time.Duration
	UDPEstablished time.Duration
	ICMP           time.Duration
	Other          time.Duration
}

// DefaultLifetimes returns the documented defaults.
func DefaultLifetimes() Lifetimes {
	return Lifetimes{
		TCPSynSent:     60 * time.Second,
		TCPSynRecv:     60 * time.Second,
		TCPEstablished: 6 * time.Hour,
		TCPFinWait:     2 * time.Minute,
		TCPClosed:      10 * time.Second,
		UDPNew:         30 * time.Second,
		UDPEstablished: 60 * time.Second,
		ICMP:           30 * time.Second,
		Other:          60 * time.Second,
	}
}

// flag is one lifetime's command-line flag.
type flag struct {
	name, usage string
	field       func(*Lifetimes) *time.Duration
}

var flags = []flag{
	{"ct-lifetime-tcp-syn-sent", "idle lifetime of a TCP flow that sent a SYN but saw no SYN-ACK", func(l *Lifetimes) *time.Duration { return &l.TCPSynSent }},
	{"ct-lifetime-tcp-syn-recv", "idle lifetime of a TCP flow between SYN-ACK and the handshake's ACK", func(l *Lifetimes) *time.Duration { return &l.TCPSynRecv }},
	{"ct-lifetime-tcp-established", "idle lifetime of an established TCP connection", func(l *Lifetimes) *time.Duration { return &l.TCPEstablished }},
	{"ct-lifetime-tcp-fin-wait", "idle lifetime of a TCP connection after one side's FIN", func(l *Lifetimes) *time.Duration { return &l.TCPFinWait }},
	{"ct-lifetime-tcp-closed", "lifetime of a TCP connection after both FINs or an RST", func(l *Lifetimes) *time.Duration { return &l.TCPClosed }},
	{"ct-lifetime-udp-new", "idle lifetime of a UDP flow that saw no reply", func(l *Lifetimes) *time.Duration { return &l.UDPNew }},
	{"ct-lifetime-udp-established", "idle lifetime of a UDP flow that saw a reply", func(l *Lifetimes) *time.Duration { return &l.UDPEstablished }},
	{"ct-lifetime-icmp", "idle lifetime of an ICMP or ICMPv6 echo flow", func(l *Lifetimes) *time.Duration { return &l.ICMP }},
	{"ct-lifetime-other", "idle lifetime of a flow of any other protocol", func(l *Lifetimes) *time.Duration { return &l.Other }},
}

// AddFlags adds one --ct-lifetime-* flag per field to fs, with lt's current
// values as defaults; parsing fs writes into lt. Call Validate after parsing.
func (lt *Lifetimes) AddFlags(fs *pflag.FlagSet) {
	for _, f := range flags {
		fs.DurationVar(f.field(lt), f.name, *f.field(lt), f.usage)
	}
}

// Validate rejects lifetimes that are not positive, naming the flag.
func (lt Lifetimes) Validate() error {
	for _, f := range flags {
		if d := *f.field(&lt); d <= 0 {
			return fmt.Errorf("invalid --%s %v: must be a positive duration, e.g. 30s or 6h", f.name, d)
		}
	}
	return nil
}

// Of returns the lifetime of an entry of protocol proto in state s. A state
// that the protocol never takes (or an unknown one) gets the protocol's
// longest lifetime, so that GC errs on the side of keeping an entry.
func (lt Lifetimes) Of(proto uint8, s ctmap.State) time.Duration {
	switch proto {
	case unix.IPPROTO_TCP:
		switch s {
		case ctmap.StateSynSent:
			return lt.TCPSynSent
		case ctmap.StateSynRecv:
			return lt.TCPSynRecv
		case ctmap.StateEstablished:
			return lt.TCPEstablished
		case ctmap.StateFinWait:
			return lt.TCPFinWait
		case ctmap.StateClosed:
			return lt.TCPClosed
		}
		return max(lt.TCPEstablished, lt.TCPSynSent, lt.TCPSynRecv, lt.TCPFinWait, lt.TCPClosed)
	case unix.IPPROTO_UDP:
		if s == ctmap.StateNew {
			return lt.UDPNew
		}
		if s == ctmap.StateEstablished {
			return lt.UDPEstablished
		}
		return max(lt.UDPNew, lt.UDPEstablished)
	case unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6:
		return lt.ICMP
	}
	return lt.Other
}

// Expired reports whether an entry of protocol proto has been idle longer
// than its state's lifetime at now (CLOCK_MONOTONIC_COARSE): last_seen + lifetime <
// now. An entry stamped after now (refreshed since now was read) is live.
func (lt Lifetimes) Expired(proto uint8, e *ctmap.Entry, now time.Duration) bool {
	last := time.Duration(e.LastSeen)
	if e.LastSeen > uint64(1<<63-1) || last >= now {
		return false
	}
	return now-last > lt.Of(proto, ctmap.State(e.State))
}
