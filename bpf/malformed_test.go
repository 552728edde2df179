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
)

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
				d := newDatapath(t)
				// The full frame parses: the truncations below fail for
				// their length alone. Cuts into the Ethernet trailer gopacket
				// pads short frames with leave the IP packet whole.
				before := d.metrics(t)
				if v := d.run(t, egress, full); v != verdictPass || delta(before, d.metrics(t))[metricKey{egress, metricsmap.FwdUnparseable}] != 0 {
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
					for _, dir := range []bpf.Direction{ingress, egress} {
						d.expect(t, dir, frame, verdictPass, one(metricKey{dir, metricsmap.FwdUnparseable}))
					}
					d.setConfig(t, bpf.CtdConfig{DefaultVerdict: denyIn(deny)})
					d.expect(t, deny, frame, verdictDrop, one(metricKey{deny, metricsmap.DropParse}))
					d.expect(t, reverse(deny), frame, verdictPass, one(metricKey{reverse(deny), metricsmap.FwdUnparseable}))
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
			for _, dir := range []bpf.Direction{ingress, egress} {
				d.expect(t, dir, tc.frame, verdictPass, one(metricKey{dir, metricsmap.FwdUnparseable}))
			}
			d.setConfig(t, bpf.CtdConfig{DefaultVerdict: denyIn(ingress)})
			d.expect(t, ingress, tc.frame, verdictDrop, one(metricKey{ingress, metricsmap.DropParse}))
			d.noFlows(t)
		})
	}

	// Not IP at all: passed untracked, never judged, whatever the default.
	for _, typ := range []uint16{0x0806, 0x88cc, 0xffff, 0x0000} {
		t.Run(fmt.Sprintf("ethertype %#04x", typ), func(t *testing.T) {
			d := newDatapath(t)
			d.setConfig(t, bpf.CtdConfig{DefaultVerdict: denyIn(ingress)})
			d.expect(t, ingress, eth(typ, make([]byte, 46)...), verdictPass, one(metricKey{ingress, metricsmap.FwdUntracked}))
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
			d.expect(t, egress, frame, verdictPass, one(metricKey{egress, metricsmap.FwdUnparseable}))
			d.noFlows(t)

			before := d.metrics(t)
			v, err := d.runCtx(t, egress, frame, &skbContext{GSOSegs: 2, GSOSize: 1000})
			if err != nil || v != verdictPass {
				t.Fatalf("BIG TCP packet: verdict %s, err %v", verdictName(v), err)
			}
			if diff := delta(before, d.metrics(t)); len(diff) != 2 || diff[metricKey{egress, metricsmap.FwdNew}] != 1 {
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
