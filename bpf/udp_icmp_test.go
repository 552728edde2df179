package bpf_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/ipproto"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

// UDP and SCTP flows are keyed by their ports: NEW until the first reply,
// then ESTABLISHED; another source port is another flow.
func TestPortProtocols(t *testing.T) {
	for _, proto := range []struct {
		name  string
		num   uint8
		frame func(tb testing.TB, src, dst netip.AddrPort, payload []byte) []byte
	}{
		{"udp", unix.IPPROTO_UDP, dptest.UDP},
		{"sctp", unix.IPPROTO_SCTP, dptest.SCTP},
	} {
		for _, o := range openers {
			for _, p := range pairs {
				t.Run(proto.name+"/"+o.name+"/"+p.name, func(t *testing.T) {
					d := dptest.New(t)
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
						frame := proto.frame(t, src, dst, dptest.Payload(s.data))
						want := dptest.Hit(dir)
						if i == 0 {
							want = dptest.NewFlow(dir)
						}
						d.Expect(t, dir, frame, dptest.Pass, want)
						m.account(s.from, len(frame), 0)
						m.want.State = s.state
						d.OnlyFlow(t, m.want)
					}
					other := netip.AddrPortFrom(p.orig.Addr(), p.orig.Port()+1)
					d.Expect(t, o.origDir, proto.frame(t, other, p.resp, nil), dptest.Pass, dptest.NewFlow(o.origDir))
					if n := len(d.Flows(t)); n != 2 {
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
				d := dptest.New(t)
				const id = 0x1234
				// The id stands in for the port: the request carries it as
				// its source, the reply as its destination.
				m := newModel(t, e.proto, pair{orig: netip.AddrPortFrom(e.orig, id), resp: netip.AddrPortFrom(e.resp, 0)}, o)

				req := dptest.Echo(t, e.orig, e.resp, id, false)
				d.Expect(t, o.origDir, req, dptest.Pass, dptest.NewFlow(o.origDir))
				m.account(fromOrig, len(req), 0)
				m.want.State = ctmap.StateNew
				d.OnlyFlow(t, m.want)

				reply := dptest.Echo(t, e.resp, e.orig, id, true)
				d.Expect(t, o.respDir, reply, dptest.Pass, dptest.Hit(o.respDir))
				m.account(fromResp, len(reply), 0)
				m.want.State = ctmap.StateEstablished
				d.OnlyFlow(t, m.want)

				d.Expect(t, o.origDir, req, dptest.Pass, dptest.Hit(o.origDir))
				m.account(fromOrig, len(req), 0)
				d.OnlyFlow(t, m.want)

				// Another id is another flow.
				d.Expect(t, o.origDir, dptest.Echo(t, e.orig, e.resp, id+1, false), dptest.Pass, dptest.NewFlow(o.origDir))
				if n := len(d.Flows(t)); n != 2 {
					t.Fatalf("after a second echo id: %d entries, want 2", n)
				}
			})
		}
	}
}

func TestICMPv6NeighbourDiscoveryUntracked(t *testing.T) {
	src, dst := netip.MustParseAddr("fd00:c7d::1"), netip.MustParseAddr("ff02::1:ff00:2")
	target := netip.MustParseAddr("fd00:c7d::2")
	ip, nl := dptest.IPHeader(src, dst, layers.IPProtocolICMPv6)
	ip.(*layers.IPv6).HopLimit = 255
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeNeighborSolicitation, 0)}
	icmp.SetNetworkLayerForChecksum(nl)
	ns := dptest.Serialize(t, dptest.Ethernet(src), ip, icmp, &layers.ICMPv6NeighborSolicitation{
		TargetAddress: target.AsSlice(),
		Options:       layers.ICMPv6Options{{Type: layers.ICMPv6OptSourceAddress, Data: dptest.MACA}},
	})
	for _, dir := range []bpf.Direction{ingress, egress} {
		t.Run(dir.String(), func(t *testing.T) {
			d := dptest.New(t)
			// Even under default deny: IPv6 cannot work without it.
			d.SetConfig(t, bpf.CtdConfig{DefaultVerdict: [2]uint8{dptest.Deny, dptest.Deny}})
			d.Expect(t, dir, ns, dptest.Pass, dptest.One(dptest.Key{Dir: dir, Reason: metricsmap.FwdUntracked}))
			d.NoFlows(t)
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
				t.Run(fmt.Sprintf("%s/%s/%s", o.name, p.name, ipproto.Name(proto)), func(t *testing.T) {
					d := dptest.New(t)
					var m *flowModel
					var origPkt, respPkt []byte
					if proto == unix.IPPROTO_TCP {
						m = runTCP(t, d, p, o, []tcpStep{
							{fromOrig, dptest.SYN, 0, ctmap.StateSynSent},
							{fromResp, dptest.SYN | dptest.ACK, 0, ctmap.StateSynRecv},
							{fromOrig, dptest.ACK, 0, ctmap.StateEstablished},
						})
						origPkt = dptest.TCP(t, p.orig, p.resp, dptest.PSH|dptest.ACK, dptest.Payload(1400))
						respPkt = dptest.TCP(t, p.resp, p.orig, dptest.PSH|dptest.ACK, dptest.Payload(1400))
					} else {
						m = newModel(t, proto, p, o)
						req := dptest.UDP(t, p.orig, p.resp, dptest.Payload(30))
						d.Expect(t, o.origDir, req, dptest.Pass, dptest.NewFlow(o.origDir))
						m.account(fromOrig, len(req), 0)
						m.want.State = ctmap.StateNew
						origPkt = dptest.UDP(t, p.orig, p.resp, dptest.Payload(1400))
						respPkt = dptest.UDP(t, p.resp, p.orig, dptest.Payload(1400))
					}
					m.want.Flags |= ctmap.FlagRelated

					// A router on the way to the responder answers the
					// originator's packet: it arrives where replies do.
					errFrame := dptest.ICMPError(t, routerFor(p.orig.Addr()), p.orig.Addr(), origPkt)
					d.Expect(t, o.respDir, errFrame, dptest.Pass, dptest.One(dptest.Key{Dir: o.respDir, Reason: metricsmap.FwdRelated}))
					d.OnlyFlow(t, m.want)

					// The originator's host answers a reply: it leaves where
					// the originator's packets do.
					errFrame = dptest.ICMPError(t, p.orig.Addr(), p.resp.Addr(), respPkt)
					d.Expect(t, o.origDir, errFrame, dptest.Pass, dptest.One(dptest.Key{Dir: o.origDir, Reason: metricsmap.FwdRelated}))
					d.OnlyFlow(t, m.want)
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
			d := dptest.New(t)
			req := dptest.Echo(t, e.orig, e.resp, 77, false)
			d.Expect(t, egress, req, dptest.Pass, dptest.NewFlow(egress))
			d.Expect(t, ingress, dptest.ICMPError(t, e.router, e.orig, req), dptest.Pass, dptest.One(dptest.Key{Dir: ingress, Reason: metricsmap.FwdRelated}))
			if f := d.Flows(t); len(f) != 1 || f[0].Flags&ctmap.FlagRelated == 0 {
				t.Fatalf("want the echo flow marked related, got %+v", f)
			}
		})
	}
}

func TestICMPErrorUnrelated(t *testing.T) {
	for _, p := range pairs {
		t.Run(p.name, func(t *testing.T) {
			d := dptest.New(t)
			router := netip.MustParseAddr("198.51.100.254")
			if !p.orig.Addr().Is4() {
				router = netip.MustParseAddr("fd00:c7d::fe")
			}
			// Quoting a flow ctd does not track: judged as new (default allow), no entry.
			errFrame := dptest.ICMPError(t, router, p.orig.Addr(), dptest.TCP(t, p.orig, p.resp, dptest.SYN, nil))
			d.Expect(t, ingress, errFrame, dptest.Pass, dptest.One(dptest.Key{Dir: ingress, Reason: metricsmap.FwdNew}))
			d.NoFlows(t)
		})
	}
}
