package bpf_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
)

func TestUDP(t *testing.T) {
	for _, o := range openers {
		for _, p := range pairs {
			t.Run(o.name+"/"+p.name, func(t *testing.T) {
				d := newDatapath(t)
				m := newModel(t, unix.IPPROTO_UDP, p, o)
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
					frame := udpFrame(t, src, dst, s.data)
					want := hit(dir)
					if i == 0 {
						want = newFlow(dir)
					}
					d.expect(t, dir, frame, verdictPass, want)
					m.account(s.from, len(frame), 0)
					m.want.State = s.state
					d.onlyFlow(t, m.want)
				}
			})
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
	for _, dir := range []bpf.Direction{ingress, egress} {
		t.Run(dir.String(), func(t *testing.T) {
			d := newDatapath(t)
			// Even under default deny: IPv6 cannot work without it.
			d.setConfig(t, bpf.CtdConfig{DefaultVerdict: [2]uint8{verdictDeny, verdictDeny}})
			d.expect(t, dir, ns, verdictPass, one(metricKey{dir, metricsmap.FwdUntracked}))
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
					d.expect(t, o.respDir, errFrame, verdictPass, one(metricKey{o.respDir, metricsmap.FwdRelated}))
					d.onlyFlow(t, m.want)

					// The originator's host answers a reply: it leaves where
					// the originator's packets do.
					errFrame = icmpErrorFrame(t, p.orig.Addr(), p.resp.Addr(), respPkt)
					d.expect(t, o.origDir, errFrame, verdictPass, one(metricKey{o.origDir, metricsmap.FwdRelated}))
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
			d.expect(t, ingress, icmpErrorFrame(t, e.router, e.orig, req), verdictPass, one(metricKey{ingress, metricsmap.FwdRelated}))
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
			d.expect(t, ingress, errFrame, verdictPass, one(metricKey{ingress, metricsmap.FwdNew}))
			d.noFlows(t)
		})
	}
}
