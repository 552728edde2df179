package bpf_test

import (
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

// ipv6Ext is one IPv6 extension header in wire format with the given next
// header, body length 8*(units+1) bytes.
func ipv6Ext(kind, next layers.IPProtocol, units int) []byte {
	if kind == layers.IPProtocolAH {
		// AH dptest.Counts 4-byte units minus 2: 12 bytes header + 4 ICV.
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
	ip, nl := dptest.IPHeader(src.Addr(), dst.Addr(), first)
	var ext dptest.RawLayer
	for i, k := range kinds {
		next := layers.IPProtocolTCP
		if i+1 < len(kinds) {
			next = kinds[i+1]
		}
		ext = append(ext, ipv6Ext(k, next, i%3)...)
	}
	tcp := dptest.TCPLayer(src, dst, flags)
	tcp.SetNetworkLayerForChecksum(nl)
	return dptest.Serialize(tb, dptest.Ethernet(src.Addr()), ip, ext, tcp, gopacket.Payload(dptest.Payload(32)))
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
			d := dptest.New(t)
			m := newModel(t, unix.IPPROTO_TCP, pair{orig: orig, resp: resp}, openers[0])
			syn := ipv6WithExts(t, orig, resp, tc.kinds, dptest.SYN)
			d.Expect(t, egress, syn, dptest.Pass, dptest.NewFlow(egress))
			m.account(fromOrig, len(syn), dptest.SYN)
			m.want.State = ctmap.StateSynSent
			d.OnlyFlow(t, m.want)

			// The reply without extension headers finds the same entry.
			synack := dptest.TCP(t, resp, orig, dptest.SYN|dptest.ACK, nil)
			d.Expect(t, ingress, synack, dptest.Pass, dptest.Hit(ingress))
			m.account(fromResp, len(synack), dptest.SYN|dptest.ACK)
			m.want.State = ctmap.StateSynRecv
			d.OnlyFlow(t, m.want)
		})
	}

	// More extension headers than the datapath walks: refused, not guessed.
	t.Run("too many", func(t *testing.T) {
		d := dptest.New(t)
		frame := ipv6WithExts(t, orig, resp, []layers.IPProtocol{hbh, dst, rt, frag, ah, dst, dst}, dptest.SYN)
		d.Expect(t, egress, frame, dptest.Pass, dptest.One(dptest.Key{Dir: egress, Reason: metricsmap.FwdUnparseable}))
		d.NoFlows(t)
	})
}

func TestIPv6Fragments(t *testing.T) {
	orig, resp := netip.MustParseAddrPort("[fd00:c7d::1]:5353"), netip.MustParseAddrPort("[fd00:c7d::2]:53")
	fragFrame := func(t *testing.T, offset uint16, more bool, body gopacket.SerializableLayer) []byte {
		ip, nl := dptest.IPHeader(orig.Addr(), resp.Addr(), layers.IPProtocolIPv6Fragment)
		frag := &layers.IPv6Fragment{NextHeader: layers.IPProtocolUDP, FragmentOffset: offset, MoreFragments: more, Identification: 0xc7d}
		if udp, ok := body.(*layers.UDP); ok {
			udp.SetNetworkLayerForChecksum(nl)
			return dptest.Serialize(t, dptest.Ethernet(orig.Addr()), ip, frag, udp, gopacket.Payload(dptest.Payload(1200)))
		}
		return dptest.Serialize(t, dptest.Ethernet(orig.Addr()), ip, frag, body)
	}
	d := dptest.New(t)

	// The first fragment carries the UDP header: tracked with its ports.
	first := fragFrame(t, 0, true, &layers.UDP{SrcPort: layers.UDPPort(orig.Port()), DstPort: layers.UDPPort(resp.Port())})
	d.Expect(t, egress, first, dptest.Pass, dptest.NewFlow(egress))
	m := newModel(t, unix.IPPROTO_UDP, pair{orig: orig, resp: resp}, openers[0])
	m.account(fromOrig, len(first), 0)
	m.want.State = ctmap.StateNew
	d.OnlyFlow(t, m.want)

	// A later fragment whose data looks like a UDP header to other ports:
	// never parsed as ports, no entry, counted as a fragment.
	d.ResetCT(t)
	fake := dptest.RawLayer{0x11, 0x11, 0x22, 0x22, 0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8}
	for _, dir := range []bpf.Direction{egress, ingress} {
		d.Expect(t, dir, fragFrame(t, 151, false, fake), dptest.Pass, dptest.One(dptest.Key{Dir: dir, Reason: metricsmap.Fragments}, dptest.Key{Dir: dir, Reason: metricsmap.FwdUntracked}))
		d.NoFlows(t)
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
				d := dptest.New(t)
				ip, nl := dptest.IPHeader(orig.Addr(), resp.Addr(), layers.IPProtocolTCP)
				ip.(*layers.IPv4).Options = tc.opts
				tcp := dptest.TCPLayer(orig, resp, dptest.SYN)
				tcp.SetNetworkLayerForChecksum(nl)
				syn := dptest.Serialize(t, dptest.Ethernet(orig.Addr()), ip, tcp)
				d.Expect(t, egress, syn, dptest.Pass, dptest.NewFlow(egress))
				m := newModel(t, unix.IPPROTO_TCP, pair{orig: orig, resp: resp}, openers[0])
				m.account(fromOrig, len(syn), dptest.SYN)
				m.want.State = ctmap.StateSynSent
				d.OnlyFlow(t, m.want)

				synack := dptest.TCP(t, resp, orig, dptest.SYN|dptest.ACK, nil)
				d.Expect(t, ingress, synack, dptest.Pass, dptest.Hit(ingress))
			})
		}
	})

	fragment := func(t *testing.T, offset uint16, more bool, body ...gopacket.SerializableLayer) []byte {
		ip, nl := dptest.IPHeader(orig.Addr(), resp.Addr(), layers.IPProtocolTCP)
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
		return dptest.Serialize(t, append([]gopacket.SerializableLayer{dptest.Ethernet(orig.Addr()), ip}, body...)...)
	}

	t.Run("first fragment", func(t *testing.T) {
		d := dptest.New(t)
		first := fragment(t, 0, true, dptest.TCPLayer(orig, resp, dptest.SYN), gopacket.Payload(dptest.Payload(1000)))
		d.Expect(t, egress, first, dptest.Pass, dptest.NewFlow(egress))
		m := newModel(t, unix.IPPROTO_TCP, pair{orig: orig, resp: resp}, openers[0])
		m.account(fromOrig, len(first), dptest.SYN)
		m.want.State = ctmap.StateSynSent
		d.OnlyFlow(t, m.want)
	})

	t.Run("later fragment", func(t *testing.T) {
		d := dptest.New(t)
		// Its data is a TCP SYN to another port, as an attacker would craft it.
		fake := dptest.TCP(t, netip.AddrPortFrom(orig.Addr(), 1111), netip.AddrPortFrom(resp.Addr(), 22), dptest.SYN, nil)[14+20:]
		for _, more := range []bool{true, false} {
			for _, dir := range []bpf.Direction{egress, ingress} {
				d.Expect(t, dir, fragment(t, 185, more, dptest.RawLayer(fake)), dptest.Pass, dptest.One(dptest.Key{Dir: dir, Reason: metricsmap.Fragments}, dptest.Key{Dir: dir, Reason: metricsmap.FwdUntracked}))
				d.NoFlows(t)
			}
		}
	})
}

func TestVLAN(t *testing.T) {
	for _, p := range pairs {
		t.Run(p.name, func(t *testing.T) {
			d := dptest.New(t)
			ip, nl := dptest.IPHeader(p.orig.Addr(), p.resp.Addr(), layers.IPProtocolTCP)
			eth := dptest.Ethernet(p.orig.Addr())
			tag := &layers.Dot1Q{VLANIdentifier: 100, Type: eth.EthernetType}
			eth.EthernetType = layers.EthernetTypeDot1Q
			tcp := dptest.TCPLayer(p.orig, p.resp, dptest.SYN)
			tcp.SetNetworkLayerForChecksum(nl)
			syn := dptest.Serialize(t, eth, tag, ip, tcp)

			d.Expect(t, egress, syn, dptest.Pass, dptest.NewFlow(egress))
			m := newModel(t, unix.IPPROTO_TCP, p, openers[0])
			m.account(fromOrig, len(syn), dptest.SYN)
			m.want.State = ctmap.StateSynSent
			d.OnlyFlow(t, m.want)

			// The reply, its tag stripped by the device, finds the same entry.
			synack := dptest.TCP(t, p.resp, p.orig, dptest.SYN|dptest.ACK, nil)
			d.Expect(t, ingress, synack, dptest.Pass, dptest.Hit(ingress))
			m.account(fromResp, len(synack), dptest.SYN|dptest.ACK)
			m.want.State = ctmap.StateSynRecv
			d.OnlyFlow(t, m.want)

			// Two tags (QinQ) are more than the datapath parses: passed untracked.
			d.ResetCT(t)
			outer := &layers.Dot1Q{VLANIdentifier: 200, Type: layers.EthernetTypeDot1Q}
			eth.EthernetType = layers.EthernetTypeQinQ
			qinq := dptest.Serialize(t, eth, outer, tag, ip, tcp)
			d.Expect(t, egress, qinq, dptest.Pass, dptest.One(dptest.Key{Dir: egress, Reason: metricsmap.FwdUntracked}))
			d.NoFlows(t)
		})
	}
}
