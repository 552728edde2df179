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
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

// validFrames are full frames whose every strict prefix is malformed.
func validFrames(tb testing.TB) map[string][]byte {
	tb.Helper()
	orig4, resp4 := netip.MustParseAddrPort("198.51.100.1:40000"), netip.MustParseAddrPort("203.0.113.7:80")
	orig6, resp6 := netip.MustParseAddrPort("[fd00:c7d::1]:40000"), netip.MustParseAddrPort("[fd00:c7d::2]:80")

	ip, nl := dptest.IPHeader(orig4.Addr(), resp4.Addr(), layers.IPProtocolTCP)
	ip.(*layers.IPv4).Options = []layers.IPv4Option{{OptionType: 148, OptionLength: 4, OptionData: []byte{0, 0}}}
	tcp := dptest.TCPLayer(orig4, resp4, dptest.PSH|dptest.ACK)
	tcp.Options = []layers.TCPOption{{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: make([]byte, 8)}}
	tcp.SetNetworkLayerForChecksum(nl)
	eth := dptest.Ethernet(orig4.Addr())
	tag := &layers.Dot1Q{VLANIdentifier: 7, Type: eth.EthernetType}
	tagged := *eth
	tagged.EthernetType = layers.EthernetTypeDot1Q

	ip6, nl6 := dptest.IPHeader(orig6.Addr(), resp6.Addr(), layers.IPProtocolTCP)
	tcp6 := dptest.TCPLayer(orig6, resp6, dptest.SYN|dptest.ACK)
	tcp6.SetNetworkLayerForChecksum(nl6)
	tag6 := &layers.Dot1Q{VLANIdentifier: 7, Type: layers.EthernetTypeIPv6}

	return map[string][]byte{
		"tcp4 with options and data":  dptest.Serialize(tb, eth, ip, tcp, gopacket.Payload(dptest.Payload(40))),
		"tcp4 syn":                    dptest.TCP(tb, orig4, resp4, dptest.SYN, nil),
		"tcp4 in vlan":                dptest.Serialize(tb, &tagged, tag, ip, tcp, gopacket.Payload(dptest.Payload(3))),
		"udp4":                        dptest.UDP(tb, orig4, resp4, dptest.Payload(16)),
		"tcp6 with extension headers": ipv6WithExts(tb, orig6, resp6, []layers.IPProtocol{layers.IPProtocolIPv6HopByHop, layers.IPProtocolIPv6Routing}, dptest.SYN),
		"udp6":                        dptest.UDP(tb, orig6, resp6, dptest.Payload(16)),
		"tcp6 in vlan":                dptest.Serialize(tb, &tagged, tag6, ip6, tcp6, gopacket.Payload(dptest.Payload(3))),
		"icmp echo":                   dptest.Echo(tb, orig4.Addr(), resp4.Addr(), 9, false),
		"icmpv6 echo":                 dptest.Echo(tb, orig6.Addr(), resp6.Addr(), 9, false),
		"icmp error quoting tcp":      dptest.ICMPError(tb, resp4.Addr(), orig4.Addr(), dptest.TCP(tb, orig4, resp4, dptest.SYN, nil)),
		"icmpv6 error quoting tcp":    dptest.ICMPError(tb, resp6.Addr(), orig6.Addr(), dptest.TCP(tb, orig6, resp6, dptest.SYN, nil)),
		"sctp4":                       dptest.SCTP(tb, orig4, resp4, dptest.Payload(8)),
		"sctp6":                       dptest.SCTP(tb, orig6, resp6, dptest.Payload(8)),
		"icmp error quoting sctp":     dptest.ICMPError(tb, resp4.Addr(), orig4.Addr(), dptest.SCTP(tb, orig4, resp4, nil)),
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
			for _, deny := range []bpf.Direction{ingress, egress} {
				d := dptest.New(t)
				// The full frame parses: the truncations below fail for
				// their length alone. Cuts into the Ethernet trailer gopacket
				// pads short frames with leave the IP packet whole.
				before := d.Counters(t)
				if v := d.Run(t, egress, full); v != dptest.Pass || dptest.Delta(before, d.Counters(t))[dptest.Key{Dir: egress, Reason: metricsmap.FwdUnparseable}] != 0 {
					t.Fatalf("full frame: %s, metrics %v", dptest.VerdictName(v), dptest.Delta(before, d.Counters(t)))
				}
				d.ResetCT(t)
				for n := range ipPacketEnd(t, full) {
					frame := full[:n]
					if testRunRefuses(frame) {
						if _, err := d.RunCtx(t, ingress, frame, nil); !errors.Is(err, unix.EINVAL) {
							t.Fatalf("%d bytes: test run error %v, want EINVAL", n, err)
						}
						continue
					}
					d.SetConfig(t, bpf.CtdConfig{})
					for _, dir := range []bpf.Direction{ingress, egress} {
						d.Expect(t, dir, frame, dptest.Pass, dptest.One(dptest.Key{Dir: dir, Reason: metricsmap.FwdUnparseable}))
					}
					d.SetConfig(t, bpf.CtdConfig{DefaultVerdict: dptest.DenyIn(deny)})
					d.Expect(t, deny, frame, dptest.Drop, dptest.One(dptest.Key{Dir: deny, Reason: metricsmap.DropParse}))
					d.Expect(t, reverse(deny), frame, dptest.Pass, dptest.One(dptest.Key{Dir: reverse(deny), Reason: metricsmap.FwdUnparseable}))
					d.NoFlows(t)
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
		return append(append(append([]byte{}, dptest.MACB...), dptest.MACA...), append([]byte{byte(typ >> 8), byte(typ)}, rest...)...)
	}
	ipv4 := func(first byte, totLen uint16, n int) []byte {
		h := make([]byte, n)
		h[0], h[2], h[3], h[9] = first, byte(totLen>>8), byte(totLen), unix.IPPROTO_TCP
		return h
	}
	good := dptest.TCP(t, netip.MustParseAddrPort("198.51.100.1:1"), netip.MustParseAddrPort("198.51.100.2:2"), dptest.SYN, nil)
	good6 := dptest.TCP(t, netip.MustParseAddrPort("[fd00::1]:1"), netip.MustParseAddrPort("[fd00::2]:2"), dptest.SYN, nil)
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
			d := dptest.New(t)
			for _, dir := range []bpf.Direction{ingress, egress} {
				d.Expect(t, dir, tc.frame, dptest.Pass, dptest.One(dptest.Key{Dir: dir, Reason: metricsmap.FwdUnparseable}))
			}
			d.SetConfig(t, bpf.CtdConfig{DefaultVerdict: dptest.DenyIn(ingress)})
			d.Expect(t, ingress, tc.frame, dptest.Drop, dptest.One(dptest.Key{Dir: ingress, Reason: metricsmap.DropParse}))
			d.NoFlows(t)
		})
	}

	// Not IP at all: passed untracked, never judged, whatever the default.
	for _, typ := range []uint16{0x0806, 0x88cc, 0xffff, 0x0000} {
		t.Run(fmt.Sprintf("ethertype %#04x", typ), func(t *testing.T) {
			d := dptest.New(t)
			d.SetConfig(t, bpf.CtdConfig{DefaultVerdict: dptest.DenyIn(ingress)})
			d.Expect(t, ingress, eth(typ, make([]byte, 46)...), dptest.Pass, dptest.One(dptest.Key{Dir: ingress, Reason: metricsmap.FwdUntracked}))
			d.NoFlows(t)
		})
	}
}

// A length field of 0 is the rest of the frame in a BIG TCP GSO packet (an
// IPv4 total length or IPv6 payload length cannot hold more than 64k), and
// outside GSO malformed for IPv4, an empty payload for IPv6.
func TestLengthZero(t *testing.T) {
	for _, p := range []pair{pairs[0], pairs[3]} {
		t.Run(p.name, func(t *testing.T) {
			frame := dptest.TCP(t, p.orig, p.resp, dptest.PSH|dptest.ACK, dptest.Payload(2000))
			lenField := 14 + 2 // IPv4 total length
			if !p.orig.Addr().Is4() {
				lenField = 14 + 4 // IPv6 payload length
			}
			frame[lenField], frame[lenField+1] = 0, 0

			d := dptest.New(t)
			d.Expect(t, egress, frame, dptest.Pass, dptest.One(dptest.Key{Dir: egress, Reason: metricsmap.FwdUnparseable}))
			d.NoFlows(t)

			before := d.Counters(t)
			v, err := d.RunCtx(t, egress, frame, &dptest.SKBContext{GSOSegs: 2, GSOSize: 1000})
			if err != nil || v != dptest.Pass {
				t.Fatalf("BIG TCP packet: verdict %s, err %v", dptest.VerdictName(v), err)
			}
			if diff := dptest.Delta(before, d.Counters(t)); len(diff) != 2 || diff[dptest.Key{Dir: egress, Reason: metricsmap.FwdNew}] != 1 {
				t.Fatalf("BIG TCP packet counted as %v, want a new flow", diff)
			}
			m := newModel(t, unix.IPPROTO_TCP, p, openers[0])
			m.want.Flags |= ctmap.FlagPickup
			m.account(fromOrig, len(frame), dptest.PSH|dptest.ACK)
			m.want.PacketsOrig = 2
			m.want.State = ctmap.StateEstablished
			d.OnlyFlow(t, m.want)
		})
	}

	t.Run("ipv6 empty payload", func(t *testing.T) {
		d := dptest.New(t)
		ip, _ := dptest.IPHeader(pairs[3].orig.Addr(), pairs[3].resp.Addr(), layers.IPProtocolNoNextHeader)
		frame := dptest.Serialize(t, dptest.Ethernet(pairs[3].orig.Addr()), ip)
		d.Expect(t, egress, frame, dptest.Pass, dptest.NewFlow(egress))
		f := d.Flows(t)
		if len(f) != 1 || f[0].Proto != uint8(layers.IPProtocolNoNextHeader) || f[0].Src != pairs[3].orig.Addr() {
			t.Fatalf("want one no-next-header flow from %s: %+v", pairs[3].orig.Addr(), f)
		}
	})
}
