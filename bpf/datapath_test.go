package bpf_test

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// An originator and a responder. The pairs cover both canonical key orders
// (the originator as endpoint a or b) in both families, and a pair on one
// address that only the ports tell apart.
type pair struct {
	name       string
	orig, resp netip.AddrPort
}

var pairs = []pair{
	{"v4 low to high", netip.MustParseAddrPort("198.51.100.1:40000"), netip.MustParseAddrPort("203.0.113.7:80")},
	{"v4 high to low", netip.MustParseAddrPort("203.0.113.7:40000"), netip.MustParseAddrPort("198.51.100.1:80")},
	{"v4 one address", netip.MustParseAddrPort("198.51.100.1:40000"), netip.MustParseAddrPort("198.51.100.1:80")},
	{"v6 low to high", netip.MustParseAddrPort("[fd00:c7d::1]:40000"), netip.MustParseAddrPort("[fd00:c7d::2]:443")},
	{"v6 high to low", netip.MustParseAddrPort("[fd00:c7d::2]:40000"), netip.MustParseAddrPort("[fd00:c7d::1]:443")},
}

// How a flow meets the datapath: opened by a local process, its originator's
// packets leave on egress and the replies come in on ingress; opened from
// outside, the other way round.
type opener struct {
	name    string
	origDir direction
	respDir direction
	ctFlags uint8
}

var openers = []opener{
	{name: "opened inside", origDir: egress, respDir: ingress},
	{name: "opened outside", origDir: ingress, respDir: egress, ctFlags: ctmap.FlagOpenedIngress},
}

type side int

const (
	fromOrig side = iota
	fromResp
)

func (s side) String() string {
	if s == fromOrig {
		return "orig"
	}
	return "resp"
}

// flowModel is what the entry of the flow under test must hold.
type flowModel struct {
	want ctmap.Flow
}

func newModel(tb testing.TB, proto uint8, p pair, o opener) *flowModel {
	return &flowModel{want: ctmap.Flow{
		Proto: proto,
		Src:   p.orig.Addr(), Sport: p.orig.Port(),
		Dst: p.resp.Addr(), Dport: p.resp.Port(),
		SrcIdentity: 2, DstIdentity: 2, // world: the ipcache is empty
		Ifindex: loIfindex(tb),
		Flags:   o.ctFlags,
	}}
}

func (m *flowModel) account(s side, n int, tcpFlags uint8) {
	if s == fromOrig {
		m.want.PacketsOrig++
		m.want.BytesOrig += uint64(n)
		m.want.TCPFlagsOrig |= tcpFlags
	} else {
		m.want.PacketsReply++
		m.want.BytesReply += uint64(n)
		m.want.TCPFlagsReply |= tcpFlags
	}
}

type tcpStep struct {
	from  side
	flags uint8
	data  int
	state ctmap.State
}

func TestTCPStates(t *testing.T) {
	S, SA, A, PA, FA, R, RA := tcpSYN, tcpSYN|tcpACK, tcpACK, tcpPSH|tcpACK, tcpFIN|tcpACK, tcpRST, tcpRST|tcpACK
	handshake := []tcpStep{
		{fromOrig, S, 0, ctmap.StateSynSent},
		{fromResp, SA, 0, ctmap.StateSynRecv},
		{fromOrig, A, 0, ctmap.StateEstablished},
	}
	with := func(steps ...tcpStep) []tcpStep { return append(append([]tcpStep{}, handshake...), steps...) }
	for _, seq := range []struct {
		name  string
		steps []tcpStep
	}{
		{"data then originator closes", with(
			tcpStep{fromOrig, PA, 100, ctmap.StateEstablished},
			tcpStep{fromResp, PA, 1300, ctmap.StateEstablished},
			tcpStep{fromOrig, A, 0, ctmap.StateEstablished},
			tcpStep{fromOrig, FA, 0, ctmap.StateFinWait},
			tcpStep{fromResp, A, 0, ctmap.StateFinWait},
			tcpStep{fromResp, FA, 0, ctmap.StateClosed},
			tcpStep{fromOrig, A, 0, ctmap.StateClosed},
		)},
		{"responder closes", with(
			tcpStep{fromResp, PA, 20, ctmap.StateEstablished},
			tcpStep{fromResp, FA, 0, ctmap.StateFinWait},
			tcpStep{fromOrig, PA, 10, ctmap.StateFinWait},
			tcpStep{fromOrig, FA, 0, ctmap.StateClosed},
			tcpStep{fromResp, A, 0, ctmap.StateClosed},
		)},
		{"originator resets", with(
			tcpStep{fromOrig, PA, 5, ctmap.StateEstablished},
			tcpStep{fromOrig, R, 0, ctmap.StateClosed},
		)},
		{"responder resets", with(
			tcpStep{fromResp, RA, 0, ctmap.StateClosed},
			tcpStep{fromOrig, A, 0, ctmap.StateClosed},
		)},
		{"connection refused", []tcpStep{
			{fromOrig, S, 0, ctmap.StateSynSent},
			{fromResp, RA, 0, ctmap.StateClosed},
		}},
		{"reset while closing", with(
			tcpStep{fromOrig, FA, 0, ctmap.StateFinWait},
			tcpStep{fromResp, R, 0, ctmap.StateClosed},
		)},
	} {
		t.Run(seq.name, func(t *testing.T) {
			for _, o := range openers {
				for _, p := range pairs {
					t.Run(o.name+"/"+p.name, func(t *testing.T) {
						runTCP(t, newDatapath(t), p, o, seq.steps)
					})
				}
			}
		})
	}
}

// runTCP plays steps through the datapath and checks the verdict, the
// counters and the entry after each one.
func runTCP(t *testing.T, d *testDatapath, p pair, o opener, steps []tcpStep) *flowModel {
	t.Helper()
	m := newModel(t, unix.IPPROTO_TCP, p, o)
	start := ctmap.Now().Mono()
	var first ctmap.Flow
	for i, s := range steps {
		src, dst, dir := p.orig, p.resp, o.origDir
		if s.from == fromResp {
			src, dst, dir = p.resp, p.orig, o.respDir
		}
		frame := tcpFrame(t, src, dst, s.flags, s.data)
		want := hit(dir)
		if i == 0 {
			want = newFlow(dir)
		}
		d.expect(t, dir, frame, verdictPass, want)
		m.account(s.from, len(frame), s.flags)
		m.want.State = s.state
		got := d.onlyFlow(t, m.want)
		checkTimes(t, got, start, ctmap.Now().Mono())
		if i == 0 {
			first = got
		} else if got.FirstSeen != first.FirstSeen {
			t.Errorf("step %d (%s %s): first_seen moved from %v to %v", i, s.from, tcpFlagString(s.flags), first.FirstSeen, got.FirstSeen)
		}
		if t.Failed() {
			t.Fatalf("after step %d: %s %s", i, s.from, tcpFlagString(s.flags))
		}
	}
	return m
}

func TestTCPSynOnClosedOpensNewFlow(t *testing.T) {
	S, SA, A, FA := tcpSYN, tcpSYN|tcpACK, tcpACK, tcpFIN|tcpACK
	closed := []tcpStep{
		{fromOrig, S, 0, ctmap.StateSynSent},
		{fromResp, SA, 0, ctmap.StateSynRecv},
		{fromOrig, A, 0, ctmap.StateEstablished},
		{fromOrig, FA, 0, ctmap.StateFinWait},
		{fromResp, FA, 0, ctmap.StateClosed},
	}
	for _, o := range openers {
		for _, p := range pairs {
			for _, reopener := range []side{fromOrig, fromResp} {
				t.Run(fmt.Sprintf("%s/%s/reopened by %s", o.name, p.name, reopener), func(t *testing.T) {
					d := newDatapath(t)
					runTCP(t, d, p, o, closed)

					// A SYN-ACK does not open a connection: it is counted on the closed entry.
					d.expect(t, o.respDir, tcpFrame(t, p.resp, p.orig, SA, 0), verdictPass, hit(o.respDir))
					if f := d.flows(t); len(f) != 1 || f[0].State != ctmap.StateClosed {
						t.Fatalf("after a SYN-ACK on the closed flow: %+v, want the closed entry", f)
					}

					np, no := p, o
					if reopener == fromResp {
						np = pair{p.name, p.resp, p.orig}
						no = opener{origDir: o.respDir, respDir: o.origDir, ctFlags: ctmap.FlagOpenedIngress}
						if o.respDir == egress {
							no.ctFlags = 0
						}
					}
					runTCP(t, d, np, no, []tcpStep{
						{fromOrig, S, 0, ctmap.StateSynSent},
						{fromResp, SA, 0, ctmap.StateSynRecv},
						{fromOrig, A, 0, ctmap.StateEstablished},
					})
				})
			}
		}
	}
}

func TestTCPMidStreamPickup(t *testing.T) {
	for _, o := range openers {
		for _, p := range pairs {
			for _, flags := range []uint8{tcpACK, tcpPSH | tcpACK, tcpFIN | tcpACK} {
				t.Run(fmt.Sprintf("%s/%s/%s", o.name, p.name, tcpFlagString(flags)), func(t *testing.T) {
					d := newDatapath(t)
					m := newModel(t, unix.IPPROTO_TCP, p, o)
					m.want.Flags |= ctmap.FlagPickup

					frame := tcpFrame(t, p.orig, p.resp, flags, 200)
					d.expect(t, o.origDir, frame, verdictPass, newFlow(o.origDir))
					m.account(fromOrig, len(frame), flags)
					m.want.State = ctmap.StateEstablished
					if flags&tcpFIN != 0 {
						m.want.State = ctmap.StateFinWait
					}
					d.onlyFlow(t, m.want)

					reply := tcpFrame(t, p.resp, p.orig, tcpACK, 0)
					d.expect(t, o.respDir, reply, verdictPass, hit(o.respDir))
					m.account(fromResp, len(reply), tcpACK)
					d.onlyFlow(t, m.want)
				})
			}
		}
	}
}

func TestTCPInvalidFlags(t *testing.T) {
	invalid := []uint8{
		tcpSYN | tcpFIN,
		tcpSYN | tcpFIN | tcpACK,
		tcpSYN | tcpRST,
		0,
		tcpPSH,
		tcpURG,
		tcpPSH | tcpURG,
	}
	for _, o := range openers {
		for _, p := range pairs {
			for _, flags := range invalid {
				t.Run(fmt.Sprintf("%s/%s/%s", o.name, p.name, tcpFlagString(flags)), func(t *testing.T) {
					d := newDatapath(t)
					// Without an entry: dropped, nothing created.
					d.expect(t, o.origDir, tcpFrame(t, p.orig, p.resp, flags, 0), verdictDrop, one(metricKey{o.origDir, dropInvalid}))
					d.noFlows(t)

					// On an established flow: dropped, the entry untouched.
					m := runTCP(t, d, p, o, []tcpStep{
						{fromOrig, tcpSYN, 0, ctmap.StateSynSent},
						{fromResp, tcpSYN | tcpACK, 0, ctmap.StateSynRecv},
						{fromOrig, tcpACK, 0, ctmap.StateEstablished},
					})
					d.expect(t, o.origDir, tcpFrame(t, p.orig, p.resp, flags, 0), verdictDrop, one(metricKey{o.origDir, dropInvalid}))
					d.expect(t, o.respDir, tcpFrame(t, p.resp, p.orig, flags, 0), verdictDrop, one(metricKey{o.respDir, dropInvalid}))
					d.onlyFlow(t, m.want)
				})
			}
		}
	}
}

func TestTCPResetWithoutEntry(t *testing.T) {
	for _, o := range openers {
		for _, p := range pairs {
			t.Run(o.name+"/"+p.name, func(t *testing.T) {
				d := newDatapath(t)
				// An RST for a connection ctd never saw needs no entry.
				d.expect(t, o.origDir, tcpFrame(t, p.orig, p.resp, tcpRST|tcpACK, 0), verdictPass, one(metricKey{o.origDir, fwdNew}))
				d.noFlows(t)
			})
		}
	}
}

// A GRO'd (or GSO) skb is one packet to the program and gso_segs segments on
// the wire: the flow counts segments, and bytes as the skb's length.
func TestTCPAggregateCountsSegments(t *testing.T) {
	for _, o := range openers {
		for _, p := range pairs {
			t.Run(o.name+"/"+p.name, func(t *testing.T) {
				d := newDatapath(t)
				m := runTCP(t, d, p, o, []tcpStep{
					{fromOrig, tcpSYN, 0, ctmap.StateSynSent},
					{fromResp, tcpSYN | tcpACK, 0, ctmap.StateSynRecv},
					{fromOrig, tcpACK, 0, ctmap.StateEstablished},
				})
				for _, s := range []side{fromOrig, fromResp} {
					src, dst, dir := p.orig, p.resp, o.origDir
					if s == fromResp {
						src, dst, dir = p.resp, p.orig, o.respDir
					}
					const segs = 4
					// 800-byte segments: the test run takes at most a page of data.
					frame := tcpFrame(t, src, dst, tcpPSH|tcpACK, segs*800)
					v, err := d.runCtx(t, dir, frame, &skbContext{GSOSegs: segs})
					if err != nil || v != verdictPass {
						t.Fatalf("%s aggregate: verdict %s, err %v", s, verdictName(v), err)
					}
					m.account(s, len(frame), tcpPSH|tcpACK)
					if s == fromOrig {
						m.want.PacketsOrig += segs - 1
					} else {
						m.want.PacketsReply += segs - 1
					}
					d.onlyFlow(t, m.want)
				}
			})
		}
	}
}

// UDP and SCTP flows are keyed by their ports: NEW until the first reply,
// then ESTABLISHED; another source port is another flow.
func TestPortProtocols(t *testing.T) {
	for _, proto := range []struct {
		name  string
		num   uint8
		frame func(tb testing.TB, src, dst netip.AddrPort, n int) []byte
	}{
		{"udp", unix.IPPROTO_UDP, udpFrame},
		{"sctp", unix.IPPROTO_SCTP, sctpFrame},
	} {
		for _, o := range openers {
			for _, p := range pairs {
				t.Run(proto.name+"/"+o.name+"/"+p.name, func(t *testing.T) {
					d := newDatapath(t)
					m := newModel(t, proto.num, p, o)
					for i, s := range []struct {
						from  side
						data  int
						state ctmap.State
					}{
						{fromOrig, 40, ctmap.StateNew},
						{fromOrig, 60, ctmap.StateNew},
						{fromResp, 500, ctmap.StateEstablished},
						{fromOrig, 0, ctmap.StateEstablished},
						{fromResp, 1, ctmap.StateEstablished},
					} {
						src, dst, dir := p.orig, p.resp, o.origDir
						if s.from == fromResp {
							src, dst, dir = p.resp, p.orig, o.respDir
						}
						frame := proto.frame(t, src, dst, s.data)
						want := hit(dir)
						if i == 0 {
							want = newFlow(dir)
						}
						d.expect(t, dir, frame, verdictPass, want)
						m.account(s.from, len(frame), 0)
						m.want.State = s.state
						d.onlyFlow(t, m.want)
					}
					other := netip.AddrPortFrom(p.orig.Addr(), p.orig.Port()+1)
					d.expect(t, o.origDir, proto.frame(t, other, p.resp, 0), verdictPass, newFlow(o.origDir))
					if n := len(d.flows(t)); n != 2 {
						t.Fatalf("%d flows after another source port, want 2", n)
					}
				})
			}
		}
	}
}

func TestICMPEcho(t *testing.T) {
	type endpoints struct {
		name       string
		orig, resp netip.Addr
		proto      uint8
	}
	for _, o := range openers {
		for _, e := range []endpoints{
			{"v4", netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("203.0.113.7"), unix.IPPROTO_ICMP},
			{"v4 reverse", netip.MustParseAddr("203.0.113.7"), netip.MustParseAddr("198.51.100.1"), unix.IPPROTO_ICMP},
			{"v6", netip.MustParseAddr("fd00:c7d::1"), netip.MustParseAddr("fd00:c7d::2"), unix.IPPROTO_ICMPV6},
			{"v6 reverse", netip.MustParseAddr("fd00:c7d::2"), netip.MustParseAddr("fd00:c7d::1"), unix.IPPROTO_ICMPV6},
		} {
			t.Run(o.name+"/"+e.name, func(t *testing.T) {
				d := newDatapath(t)
				const id = 0x1234
				// The id stands in for the port: the request carries it as
				// its source, the reply as its destination.
				m := newModel(t, e.proto, pair{orig: netip.AddrPortFrom(e.orig, id), resp: netip.AddrPortFrom(e.resp, 0)}, o)

				req := echoFrame(t, e.orig, e.resp, id, false)
				d.expect(t, o.origDir, req, verdictPass, newFlow(o.origDir))
				m.account(fromOrig, len(req), 0)
				m.want.State = ctmap.StateNew
				d.onlyFlow(t, m.want)

				reply := echoFrame(t, e.resp, e.orig, id, true)
				d.expect(t, o.respDir, reply, verdictPass, hit(o.respDir))
				m.account(fromResp, len(reply), 0)
				m.want.State = ctmap.StateEstablished
				d.onlyFlow(t, m.want)

				d.expect(t, o.origDir, req, verdictPass, hit(o.origDir))
				m.account(fromOrig, len(req), 0)
				d.onlyFlow(t, m.want)

				// Another id is another flow.
				d.expect(t, o.origDir, echoFrame(t, e.orig, e.resp, id+1, false), verdictPass, newFlow(o.origDir))
				if n := len(d.flows(t)); n != 2 {
					t.Fatalf("after a second echo id: %d entries, want 2", n)
				}
			})
		}
	}
}

func TestICMPv6NeighbourDiscoveryUntracked(t *testing.T) {
	src, dst := netip.MustParseAddr("fd00:c7d::1"), netip.MustParseAddr("ff02::1:ff00:2")
	target := netip.MustParseAddr("fd00:c7d::2")
	ip, nl := ipHeader(src, dst, layers.IPProtocolICMPv6)
	ip.(*layers.IPv6).HopLimit = 255
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeNeighborSolicitation, 0)}
	icmp.SetNetworkLayerForChecksum(nl)
	ns := mustSerialize(t, ethernet(src), ip, icmp, &layers.ICMPv6NeighborSolicitation{
		TargetAddress: target.AsSlice(),
		Options:       layers.ICMPv6Options{{Type: layers.ICMPv6OptSourceAddress, Data: macA}},
	})
	for _, dir := range []direction{ingress, egress} {
		t.Run(dir.String(), func(t *testing.T) {
			d := newDatapath(t)
			// Even under default deny: IPv6 cannot work without it.
			d.setConfig(t, bpf.CtdConfig{DefaultVerdict: [2]uint8{verdictDeny, verdictDeny}})
			d.expect(t, dir, ns, verdictPass, one(metricKey{dir, fwdUntracked}))
			d.noFlows(t)
		})
	}
}

func TestICMPErrorRelated(t *testing.T) {
	router4, router6 := netip.MustParseAddr("198.51.100.254"), netip.MustParseAddr("fd00:c7d::fe")
	routerFor := func(a netip.Addr) netip.Addr {
		if a.Is4() {
			return router4
		}
		return router6
	}
	for _, o := range openers {
		for _, p := range pairs {
			for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
				t.Run(fmt.Sprintf("%s/%s/%s", o.name, p.name, ctmap.ProtoName(proto)), func(t *testing.T) {
					d := newDatapath(t)
					var m *flowModel
					var origPkt, respPkt []byte
					if proto == unix.IPPROTO_TCP {
						m = runTCP(t, d, p, o, []tcpStep{
							{fromOrig, tcpSYN, 0, ctmap.StateSynSent},
							{fromResp, tcpSYN | tcpACK, 0, ctmap.StateSynRecv},
							{fromOrig, tcpACK, 0, ctmap.StateEstablished},
						})
						origPkt = tcpFrame(t, p.orig, p.resp, tcpPSH|tcpACK, 1400)
						respPkt = tcpFrame(t, p.resp, p.orig, tcpPSH|tcpACK, 1400)
					} else {
						m = newModel(t, proto, p, o)
						req := udpFrame(t, p.orig, p.resp, 30)
						d.expect(t, o.origDir, req, verdictPass, newFlow(o.origDir))
						m.account(fromOrig, len(req), 0)
						m.want.State = ctmap.StateNew
						origPkt = udpFrame(t, p.orig, p.resp, 1400)
						respPkt = udpFrame(t, p.resp, p.orig, 1400)
					}
					m.want.Flags |= ctmap.FlagRelated

					// A router on the way to the responder answers the
					// originator's packet: it arrives where replies do.
					errFrame := icmpErrorFrame(t, routerFor(p.orig.Addr()), p.orig.Addr(), origPkt)
					d.expect(t, o.respDir, errFrame, verdictPass, one(metricKey{o.respDir, fwdRelated}))
					d.onlyFlow(t, m.want)

					// The originator's host answers a reply: it leaves where
					// the originator's packets do.
					errFrame = icmpErrorFrame(t, p.orig.Addr(), p.resp.Addr(), respPkt)
					d.expect(t, o.origDir, errFrame, verdictPass, one(metricKey{o.origDir, fwdRelated}))
					d.onlyFlow(t, m.want)
				})
			}
		}
	}
}

func TestICMPErrorQuotingEcho(t *testing.T) {
	for _, e := range []struct{ orig, resp, router netip.Addr }{
		{netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("203.0.113.7"), netip.MustParseAddr("198.51.100.254")},
		{netip.MustParseAddr("fd00:c7d::1"), netip.MustParseAddr("fd00:c7d::2"), netip.MustParseAddr("fd00:c7d::fe")},
	} {
		t.Run(e.orig.String(), func(t *testing.T) {
			d := newDatapath(t)
			req := echoFrame(t, e.orig, e.resp, 77, false)
			d.expect(t, egress, req, verdictPass, newFlow(egress))
			d.expect(t, ingress, icmpErrorFrame(t, e.router, e.orig, req), verdictPass, one(metricKey{ingress, fwdRelated}))
			if f := d.flows(t); len(f) != 1 || f[0].Flags&ctmap.FlagRelated == 0 {
				t.Fatalf("want the echo flow marked related, got %+v", f)
			}
		})
	}
}

func TestICMPErrorUnrelated(t *testing.T) {
	for _, p := range pairs {
		t.Run(p.name, func(t *testing.T) {
			d := newDatapath(t)
			router := netip.MustParseAddr("198.51.100.254")
			if !p.orig.Addr().Is4() {
				router = netip.MustParseAddr("fd00:c7d::fe")
			}
			// Quoting a flow ctd does not track: judged as new (default allow), no entry.
			errFrame := icmpErrorFrame(t, router, p.orig.Addr(), tcpFrame(t, p.orig, p.resp, tcpSYN, 0))
			d.expect(t, ingress, errFrame, verdictPass, one(metricKey{ingress, fwdNew}))
			d.noFlows(t)
		})
	}
}

// ipv6Ext is one IPv6 extension header in wire format with the given next
// header, body length 8*(units+1) bytes.
func ipv6Ext(kind, next layers.IPProtocol, units int) []byte {
	if kind == layers.IPProtocolAH {
		// AH counts 4-byte units minus 2: 12 bytes header + 4 ICV.
		b := make([]byte, 16)
		b[0], b[1] = byte(next), 2
		return b
	}
	if kind == layers.IPProtocolIPv6Fragment {
		// An atomic fragment: offset 0, no more fragments.
		b := make([]byte, 8)
		b[0] = byte(next)
		b[4], b[7] = 0xc7, 0x01
		return b
	}
	b := make([]byte, 8*(units+1))
	b[0], b[1] = byte(next), byte(units)
	if kind != layers.IPProtocolIPv6Routing {
		b[2], b[3] = 1, byte(len(b)-4) // PadN over the rest
	} else {
		b[2] = 4 // segment routing header type, segments left 0
	}
	return b
}

// ipv6WithExts is an IPv6 frame src -> dst whose extension headers kinds
// precede a TCP header with flags.
func ipv6WithExts(tb testing.TB, src, dst netip.AddrPort, kinds []layers.IPProtocol, flags uint8) []byte {
	tb.Helper()
	first := layers.IPProtocolTCP
	if len(kinds) > 0 {
		first = kinds[0]
	}
	ip, nl := ipHeader(src.Addr(), dst.Addr(), first)
	var ext rawLayer
	for i, k := range kinds {
		next := layers.IPProtocolTCP
		if i+1 < len(kinds) {
			next = kinds[i+1]
		}
		ext = append(ext, ipv6Ext(k, next, i%3)...)
	}
	tcp := tcpLayer(src, dst, flags)
	tcp.SetNetworkLayerForChecksum(nl)
	return mustSerialize(tb, ethernet(src.Addr()), ip, ext, tcp, payload(32))
}

func TestIPv6ExtensionHeaders(t *testing.T) {
	orig, resp := netip.MustParseAddrPort("[fd00:c7d::1]:40000"), netip.MustParseAddrPort("[fd00:c7d::2]:443")
	hbh, dst, rt, frag, ah := layers.IPProtocolIPv6HopByHop, layers.IPProtocolIPv6Destination,
		layers.IPProtocolIPv6Routing, layers.IPProtocolIPv6Fragment, layers.IPProtocolAH
	for _, tc := range []struct {
		name  string
		kinds []layers.IPProtocol
	}{
		{"none", nil},
		{"hop-by-hop", []layers.IPProtocol{hbh}},
		{"hop-by-hop, destination, routing", []layers.IPProtocol{hbh, dst, rt}},
		{"hop-by-hop, destination, routing, destination", []layers.IPProtocol{hbh, dst, rt, dst}},
		{"hop-by-hop, routing, atomic fragment, AH", []layers.IPProtocol{hbh, rt, frag, ah}},
		// RFC 8200 4.1's order, all but ESP: six headers.
		{"hop-by-hop, destination, routing, fragment, AH, destination", []layers.IPProtocol{hbh, dst, rt, frag, ah, dst}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDatapath(t)
			m := newModel(t, unix.IPPROTO_TCP, pair{orig: orig, resp: resp}, openers[0])
			syn := ipv6WithExts(t, orig, resp, tc.kinds, tcpSYN)
			d.expect(t, egress, syn, verdictPass, newFlow(egress))
			m.account(fromOrig, len(syn), tcpSYN)
			m.want.State = ctmap.StateSynSent
			d.onlyFlow(t, m.want)

			// The reply without extension headers finds the same entry.
			synack := tcpFrame(t, resp, orig, tcpSYN|tcpACK, 0)
			d.expect(t, ingress, synack, verdictPass, hit(ingress))
			m.account(fromResp, len(synack), tcpSYN|tcpACK)
			m.want.State = ctmap.StateSynRecv
			d.onlyFlow(t, m.want)
		})
	}

	// More extension headers than the datapath walks: refused, not guessed.
	t.Run("too many", func(t *testing.T) {
		d := newDatapath(t)
		frame := ipv6WithExts(t, orig, resp, []layers.IPProtocol{hbh, dst, rt, frag, ah, dst, dst}, tcpSYN)
		d.expect(t, egress, frame, verdictPass, one(metricKey{egress, fwdUnparseable}))
		d.noFlows(t)
	})
}

func TestIPv6Fragments(t *testing.T) {
	orig, resp := netip.MustParseAddrPort("[fd00:c7d::1]:5353"), netip.MustParseAddrPort("[fd00:c7d::2]:53")
	fragFrame := func(t *testing.T, offset uint16, more bool, body gopacket.SerializableLayer) []byte {
		ip, nl := ipHeader(orig.Addr(), resp.Addr(), layers.IPProtocolIPv6Fragment)
		frag := &layers.IPv6Fragment{NextHeader: layers.IPProtocolUDP, FragmentOffset: offset, MoreFragments: more, Identification: 0xc7d}
		if udp, ok := body.(*layers.UDP); ok {
			udp.SetNetworkLayerForChecksum(nl)
			return mustSerialize(t, ethernet(orig.Addr()), ip, frag, udp, payload(1200))
		}
		return mustSerialize(t, ethernet(orig.Addr()), ip, frag, body)
	}
	d := newDatapath(t)

	// The first fragment carries the UDP header: tracked with its ports.
	first := fragFrame(t, 0, true, &layers.UDP{SrcPort: layers.UDPPort(orig.Port()), DstPort: layers.UDPPort(resp.Port())})
	d.expect(t, egress, first, verdictPass, newFlow(egress))
	m := newModel(t, unix.IPPROTO_UDP, pair{orig: orig, resp: resp}, openers[0])
	m.account(fromOrig, len(first), 0)
	m.want.State = ctmap.StateNew
	d.onlyFlow(t, m.want)

	// A later fragment whose data looks like a UDP header to other ports:
	// never parsed as ports, no entry, counted as a fragment.
	d.resetCT(t)
	fake := rawLayer{0x11, 0x11, 0x22, 0x22, 0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8}
	for _, dir := range []direction{egress, ingress} {
		d.expect(t, dir, fragFrame(t, 151, false, fake), verdictPass, one(metricKey{dir, fragments}, metricKey{dir, fwdUntracked}))
		d.noFlows(t)
	}
}

func TestIPv4OptionsAndFragments(t *testing.T) {
	orig, resp := netip.MustParseAddrPort("198.51.100.1:40000"), netip.MustParseAddrPort("203.0.113.7:80")

	t.Run("options", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			opts []layers.IPv4Option
		}{
			{"router alert", []layers.IPv4Option{{OptionType: 148, OptionLength: 4, OptionData: []byte{0, 0}}}},
			{"nop, record route", []layers.IPv4Option{{OptionType: 1}, {OptionType: 7, OptionLength: 11, OptionData: []byte{4, 0, 0, 0, 0, 0, 0, 0, 0}}}},
			{"timestamp, the largest header", []layers.IPv4Option{{OptionType: 68, OptionLength: 40, OptionData: append([]byte{5, 0}, make([]byte, 36)...)}}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				d := newDatapath(t)
				ip, nl := ipHeader(orig.Addr(), resp.Addr(), layers.IPProtocolTCP)
				ip.(*layers.IPv4).Options = tc.opts
				tcp := tcpLayer(orig, resp, tcpSYN)
				tcp.SetNetworkLayerForChecksum(nl)
				syn := mustSerialize(t, ethernet(orig.Addr()), ip, tcp)
				d.expect(t, egress, syn, verdictPass, newFlow(egress))
				m := newModel(t, unix.IPPROTO_TCP, pair{orig: orig, resp: resp}, openers[0])
				m.account(fromOrig, len(syn), tcpSYN)
				m.want.State = ctmap.StateSynSent
				d.onlyFlow(t, m.want)

				synack := tcpFrame(t, resp, orig, tcpSYN|tcpACK, 0)
				d.expect(t, ingress, synack, verdictPass, hit(ingress))
			})
		}
	})

	fragment := func(t *testing.T, offset uint16, more bool, body ...gopacket.SerializableLayer) []byte {
		ip, nl := ipHeader(orig.Addr(), resp.Addr(), layers.IPProtocolTCP)
		ip4 := ip.(*layers.IPv4)
		ip4.Flags, ip4.FragOffset, ip4.Id = 0, offset, 0xc7d
		if more {
			ip4.Flags = layers.IPv4MoreFragments
		}
		for _, l := range body {
			if tcp, ok := l.(*layers.TCP); ok {
				tcp.SetNetworkLayerForChecksum(nl)
			}
		}
		return mustSerialize(t, append([]gopacket.SerializableLayer{ethernet(orig.Addr()), ip}, body...)...)
	}

	t.Run("first fragment", func(t *testing.T) {
		d := newDatapath(t)
		first := fragment(t, 0, true, tcpLayer(orig, resp, tcpSYN), payload(1000))
		d.expect(t, egress, first, verdictPass, newFlow(egress))
		m := newModel(t, unix.IPPROTO_TCP, pair{orig: orig, resp: resp}, openers[0])
		m.account(fromOrig, len(first), tcpSYN)
		m.want.State = ctmap.StateSynSent
		d.onlyFlow(t, m.want)
	})

	t.Run("later fragment", func(t *testing.T) {
		d := newDatapath(t)
		// Its data is a TCP SYN to another port, as an attacker would craft it.
		fake := tcpFrame(t, netip.AddrPortFrom(orig.Addr(), 1111), netip.AddrPortFrom(resp.Addr(), 22), tcpSYN, 0)[14+20:]
		for _, more := range []bool{true, false} {
			for _, dir := range []direction{egress, ingress} {
				d.expect(t, dir, fragment(t, 185, more, rawLayer(fake)), verdictPass, one(metricKey{dir, fragments}, metricKey{dir, fwdUntracked}))
				d.noFlows(t)
			}
		}
	})
}

func TestVLAN(t *testing.T) {
	for _, p := range pairs {
		t.Run(p.name, func(t *testing.T) {
			d := newDatapath(t)
			ip, nl := ipHeader(p.orig.Addr(), p.resp.Addr(), layers.IPProtocolTCP)
			eth := ethernet(p.orig.Addr())
			tag := &layers.Dot1Q{VLANIdentifier: 100, Type: eth.EthernetType}
			eth.EthernetType = layers.EthernetTypeDot1Q
			tcp := tcpLayer(p.orig, p.resp, tcpSYN)
			tcp.SetNetworkLayerForChecksum(nl)
			syn := mustSerialize(t, eth, tag, ip, tcp)

			d.expect(t, egress, syn, verdictPass, newFlow(egress))
			m := newModel(t, unix.IPPROTO_TCP, p, openers[0])
			m.account(fromOrig, len(syn), tcpSYN)
			m.want.State = ctmap.StateSynSent
			d.onlyFlow(t, m.want)

			// The reply, its tag stripped by the device, finds the same entry.
			synack := tcpFrame(t, p.resp, p.orig, tcpSYN|tcpACK, 0)
			d.expect(t, ingress, synack, verdictPass, hit(ingress))
			m.account(fromResp, len(synack), tcpSYN|tcpACK)
			m.want.State = ctmap.StateSynRecv
			d.onlyFlow(t, m.want)

			// Two tags (QinQ) are more than the datapath parses: passed untracked.
			d.resetCT(t)
			outer := &layers.Dot1Q{VLANIdentifier: 200, Type: layers.EthernetTypeDot1Q}
			eth.EthernetType = layers.EthernetTypeQinQ
			qinq := mustSerialize(t, eth, outer, tag, ip, tcp)
			d.expect(t, egress, qinq, verdictPass, one(metricKey{egress, fwdUntracked}))
			d.noFlows(t)
		})
	}
}

// validFrames are full frames whose every strict prefix is malformed.
func validFrames(tb testing.TB) map[string][]byte {
	tb.Helper()
	orig4, resp4 := netip.MustParseAddrPort("198.51.100.1:40000"), netip.MustParseAddrPort("203.0.113.7:80")
	orig6, resp6 := netip.MustParseAddrPort("[fd00:c7d::1]:40000"), netip.MustParseAddrPort("[fd00:c7d::2]:80")

	ip, nl := ipHeader(orig4.Addr(), resp4.Addr(), layers.IPProtocolTCP)
	ip.(*layers.IPv4).Options = []layers.IPv4Option{{OptionType: 148, OptionLength: 4, OptionData: []byte{0, 0}}}
	tcp := tcpLayer(orig4, resp4, tcpPSH|tcpACK)
	tcp.Options = []layers.TCPOption{{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: make([]byte, 8)}}
	tcp.SetNetworkLayerForChecksum(nl)
	eth := ethernet(orig4.Addr())
	tag := &layers.Dot1Q{VLANIdentifier: 7, Type: eth.EthernetType}
	tagged := *eth
	tagged.EthernetType = layers.EthernetTypeDot1Q

	ip6, nl6 := ipHeader(orig6.Addr(), resp6.Addr(), layers.IPProtocolTCP)
	tcp6 := tcpLayer(orig6, resp6, tcpSYN|tcpACK)
	tcp6.SetNetworkLayerForChecksum(nl6)
	tag6 := &layers.Dot1Q{VLANIdentifier: 7, Type: layers.EthernetTypeIPv6}

	return map[string][]byte{
		"tcp4 with options and data":  mustSerialize(tb, eth, ip, tcp, payload(40)),
		"tcp4 syn":                    tcpFrame(tb, orig4, resp4, tcpSYN, 0),
		"tcp4 in vlan":                mustSerialize(tb, &tagged, tag, ip, tcp, payload(3)),
		"udp4":                        udpFrame(tb, orig4, resp4, 16),
		"tcp6 with extension headers": ipv6WithExts(tb, orig6, resp6, []layers.IPProtocol{layers.IPProtocolIPv6HopByHop, layers.IPProtocolIPv6Routing}, tcpSYN),
		"udp6":                        udpFrame(tb, orig6, resp6, 16),
		"tcp6 in vlan":                mustSerialize(tb, &tagged, tag6, ip6, tcp6, payload(3)),
		"icmp echo":                   echoFrame(tb, orig4.Addr(), resp4.Addr(), 9, false),
		"icmpv6 echo":                 echoFrame(tb, orig6.Addr(), resp6.Addr(), 9, false),
		"icmp error quoting tcp":      icmpErrorFrame(tb, resp4.Addr(), orig4.Addr(), tcpFrame(tb, orig4, resp4, tcpSYN, 0)),
		"icmpv6 error quoting tcp":    icmpErrorFrame(tb, resp6.Addr(), orig6.Addr(), tcpFrame(tb, orig6, resp6, tcpSYN, 0)),
		"sctp4":                       sctpFrame(tb, orig4, resp4, 8),
		"sctp6":                       sctpFrame(tb, orig6, resp6, 8),
		"icmp error quoting sctp":     icmpErrorFrame(tb, resp4.Addr(), orig4.Addr(), sctpFrame(tb, orig4, resp4, 0)),
	}
}

// testRunRefuses reports whether BPF_PROG_TEST_RUN refuses to build an skb
// from frame: shorter than an Ethernet header, or an untagged IPv4 or IPv6
// frame shorter than the fixed IP header (the kernel pulls it). The
// VLAN-tagged frames cover those truncations.
func testRunRefuses(frame []byte) bool {
	if len(frame) < 14 {
		return true
	}
	switch uint16(frame[12])<<8 | uint16(frame[13]) {
	case 0x0800:
		return len(frame) < 14+20
	case 0x86dd:
		return len(frame) < 14+40
	}
	return false
}

// ipPacketEnd is where the IP packet of frame ends, before any trailer.
func ipPacketEnd(tb testing.TB, frame []byte) int {
	tb.Helper()
	off := 0
	for _, l := range gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.Default).Layers() {
		switch ip := l.(type) {
		case *layers.IPv4:
			return off + int(ip.Length)
		case *layers.IPv6:
			return off + 40 + int(ip.Length)
		}
		off += len(l.LayerContents())
	}
	tb.Fatalf("no IP packet in % x", frame)
	return 0
}

func TestTruncatedFrames(t *testing.T) {
	for name, full := range validFrames(t) {
		t.Run(name, func(t *testing.T) {
			for _, deny := range []direction{ingress, egress} {
				d := newDatapath(t)
				// The full frame parses: the truncations below fail for
				// their length alone. Cuts into the Ethernet trailer gopacket
				// pads short frames with leave the IP packet whole.
				before := d.metrics(t)
				if v := d.run(t, egress, full); v != verdictPass || delta(before, d.metrics(t))[metricKey{egress, fwdUnparseable}] != 0 {
					t.Fatalf("full frame: %s, metrics %v", verdictName(v), delta(before, d.metrics(t)))
				}
				d.resetCT(t)
				for n := range ipPacketEnd(t, full) {
					frame := full[:n]
					if testRunRefuses(frame) {
						if _, err := d.runCtx(t, ingress, frame, nil); !errors.Is(err, unix.EINVAL) {
							t.Fatalf("%d bytes: test run error %v, want EINVAL", n, err)
						}
						continue
					}
					d.setConfig(t, bpf.CtdConfig{})
					for _, dir := range []direction{ingress, egress} {
						d.expect(t, dir, frame, verdictPass, one(metricKey{dir, fwdUnparseable}))
					}
					d.setConfig(t, bpf.CtdConfig{DefaultVerdict: denyIn(deny)})
					d.expect(t, deny, frame, verdictDrop, one(metricKey{deny, dropParse}))
					d.expect(t, deny.reverse(), frame, verdictPass, one(metricKey{deny.reverse(), fwdUnparseable}))
					d.noFlows(t)
					if t.Failed() {
						t.Fatalf("truncated to %d of %d bytes: % x", n, len(full), frame)
					}
				}
			}
		})
	}
}

func TestGarbageFrames(t *testing.T) {
	eth := func(typ uint16, rest ...byte) []byte {
		return append(append(append([]byte{}, macB...), macA...), append([]byte{byte(typ >> 8), byte(typ)}, rest...)...)
	}
	ipv4 := func(first byte, totLen uint16, n int) []byte {
		h := make([]byte, n)
		h[0], h[2], h[3], h[9] = first, byte(totLen>>8), byte(totLen), unix.IPPROTO_TCP
		return h
	}
	good := tcpFrame(t, netip.MustParseAddrPort("198.51.100.1:1"), netip.MustParseAddrPort("198.51.100.2:2"), tcpSYN, 0)
	good6 := tcpFrame(t, netip.MustParseAddrPort("[fd00::1]:1"), netip.MustParseAddrPort("[fd00::2]:2"), tcpSYN, 0)
	withByte := func(f []byte, i int, b byte) []byte {
		f = append([]byte{}, f...)
		f[i] = b
		return f
	}
	for _, tc := range []struct {
		name  string
		frame []byte
	}{
		{"ipv4 ethertype, ipv6 header", append(eth(0x0800), good6[14:]...)},
		{"ipv6 ethertype, ipv4 header", append(eth(0x86dd), good[14:]...)},
		{"ipv4 version 0", eth(0x0800, ipv4(0x05, 40, 40)...)},
		{"ipv4 header length 4", eth(0x0800, ipv4(0x44, 40, 40)...)},
		{"ipv4 header length 0", withByte(good, 14, 0x40)},
		{"ipv4 header longer than the packet", withByte(good, 14, 0x4f)},
		{"ipv4 total length beyond the frame", withByte(good, 16, 0x10)},
		{"ipv4 total length shorter than its header", withByte(withByte(good, 16, 0), 17, 16)},
		{"ipv6 payload length beyond the frame", withByte(good6, 18, 0x10)},
		{"ipv6 version 4", withByte(good6, 14, 0x40)},
		{"vlan tag cut", eth(0x8100, 0, 7)},
		{"vlan then ipv4 garbage", eth(0x8100, 0, 7, 0x08, 0x00, 0xff, 0xff, 0xff)},
		{"zeros after an ipv4 ethertype", eth(0x0800, make([]byte, 46)...)},
		{"ones after an ipv6 ethertype", eth(0x86dd, bytes.Repeat([]byte{0xff}, 60)...)},
		{"ipv6 header only, next header tcp", good6[:14+40]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDatapath(t)
			for _, dir := range []direction{ingress, egress} {
				d.expect(t, dir, tc.frame, verdictPass, one(metricKey{dir, fwdUnparseable}))
			}
			d.setConfig(t, bpf.CtdConfig{DefaultVerdict: denyIn(ingress)})
			d.expect(t, ingress, tc.frame, verdictDrop, one(metricKey{ingress, dropParse}))
			d.noFlows(t)
		})
	}

	// Not IP at all: passed untracked, never judged, whatever the default.
	for _, typ := range []uint16{0x0806, 0x88cc, 0xffff, 0x0000} {
		t.Run(fmt.Sprintf("ethertype %#04x", typ), func(t *testing.T) {
			d := newDatapath(t)
			d.setConfig(t, bpf.CtdConfig{DefaultVerdict: denyIn(ingress)})
			d.expect(t, ingress, eth(typ, make([]byte, 46)...), verdictPass, one(metricKey{ingress, fwdUntracked}))
			d.noFlows(t)
		})
	}
}

// A length field of 0 is the rest of the frame in a BIG TCP GSO packet (an
// IPv4 total length or IPv6 payload length cannot hold more than 64k), and
// outside GSO malformed for IPv4, an empty payload for IPv6.
func TestLengthZero(t *testing.T) {
	for _, p := range []pair{pairs[0], pairs[3]} {
		t.Run(p.name, func(t *testing.T) {
			frame := tcpFrame(t, p.orig, p.resp, tcpPSH|tcpACK, 2000)
			lenField := 14 + 2 // IPv4 total length
			if !p.orig.Addr().Is4() {
				lenField = 14 + 4 // IPv6 payload length
			}
			frame[lenField], frame[lenField+1] = 0, 0

			d := newDatapath(t)
			d.expect(t, egress, frame, verdictPass, one(metricKey{egress, fwdUnparseable}))
			d.noFlows(t)

			before := d.metrics(t)
			v, err := d.runCtx(t, egress, frame, &skbContext{GSOSegs: 2, GSOSize: 1000})
			if err != nil || v != verdictPass {
				t.Fatalf("BIG TCP packet: verdict %s, err %v", verdictName(v), err)
			}
			if diff := delta(before, d.metrics(t)); len(diff) != 2 || diff[metricKey{egress, fwdNew}] != 1 {
				t.Fatalf("BIG TCP packet counted as %v, want a new flow", diff)
			}
			m := newModel(t, unix.IPPROTO_TCP, p, openers[0])
			m.want.Flags |= ctmap.FlagPickup
			m.account(fromOrig, len(frame), tcpPSH|tcpACK)
			m.want.PacketsOrig = 2
			m.want.State = ctmap.StateEstablished
			d.onlyFlow(t, m.want)
		})
	}

	t.Run("ipv6 empty payload", func(t *testing.T) {
		d := newDatapath(t)
		ip, _ := ipHeader(pairs[3].orig.Addr(), pairs[3].resp.Addr(), layers.IPProtocolNoNextHeader)
		frame := mustSerialize(t, ethernet(pairs[3].orig.Addr()), ip)
		d.expect(t, egress, frame, verdictPass, newFlow(egress))
		f := d.flows(t)
		if len(f) != 1 || f[0].Proto != uint8(layers.IPProtocolNoNextHeader) || f[0].Src != pairs[3].orig.Addr() {
			t.Fatalf("want one no-next-header flow from %s: %+v", pairs[3].orig.Addr(), f)
		}
	})
}
