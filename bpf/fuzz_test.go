package bpf_test

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

// The largest frame the fuzz target hands to the test run, which takes at
// most a page including the skb's headroom and shared info.
const maxFuzzFrame = 3000

// FuzzDatapath pushes raw frames through both programs and checks what can
// be checked of any input: the verdict is pass or drop, every packet dptest.Counts
// exactly one verdict reason that agrees with it, and the conntrack table
// holds nothing but the one entry the frame itself may open.
func FuzzDatapath(f *testing.F) {
	d := dptest.New(f)
	f.Fuzz(func(t *testing.T, frame []byte) {
		frame = frame[:min(len(frame), maxFuzzFrame)]
		d.ResetCT(t)
		if testRunRefuses(frame) {
			if _, err := d.RunCtx(t, ingress, frame, nil); !errors.Is(err, unix.EINVAL) {
				t.Fatalf("test run of a %d-byte frame: %v, want EINVAL", len(frame), err)
			}
			return
		}
		want, tracked := expectedKey(frame)
		for _, dir := range []bpf.Direction{ingress, egress} {
			before := d.Counters(t)
			v := d.Run(t, dir, frame)
			if v != dptest.Pass && v != dptest.Drop {
				t.Fatalf("%s: verdict %s, want pass or drop", dir, dptest.VerdictName(v))
			}
			var verdicts []metricsmap.Reason
			for k, n := range dptest.Delta(before, d.Counters(t)) {
				if !dptest.IsVerdict(k.Reason) {
					continue
				}
				if k.Dir != dir || n != 1 {
					t.Fatalf("%s: counted %d on %s", dir, n, k)
				}
				verdicts = append(verdicts, k.Reason)
			}
			if len(verdicts) != 1 || (verdicts[0] < metricsmap.DropPolicy) != (v == dptest.Pass) {
				t.Fatalf("%s: verdict %s counted as %v, want exactly one reason of that verdict", dir, dptest.VerdictName(v), verdicts)
			}
			for _, k := range d.Keys(t) {
				if !tracked {
					t.Fatalf("%s: entry %+v for a frame that opens none", dir, ctmap.FlowOf(&k, &ctmap.Entry{}))
				}
				if k != want {
					t.Fatalf("%s: entry %+v, the frame's own is %+v", dir, ctmap.FlowOf(&k, &ctmap.Entry{}), ctmap.FlowOf(&want, &ctmap.Entry{}))
				}
			}
		}
	})
}

// expectedKey is the conntrack key frame may open, when it may open one at
// all: a well-formed IPv4 or IPv6 packet, as gopacket decodes it, that is not
// a later fragment, an ICMP error or neighbour discovery, and whose transport
// header lies whole within the packet. The datapath may open none (policy,
// invalid TCP flags, its limit on extension headers), never another.
//
// gopacket is stricter than the datapath in two documented ways, which are
// taken out before asking it: the datapath validates neither IPv4 options nor
// the options of the IPv6 hop-by-hop header (the stack does, later), and
// gopacket takes an IPv6 payload length of 0 for a jumbogram, refusing it
// without a jumbo option, where outside GSO (and the fuzzed frames are not
// GSO) it is an empty payload, valid by RFC 8200 and what the stack makes of
// it. The other way round, gopacket takes an IPv4 total length of 0 for TSO;
// outside GSO the datapath refuses it, which the subset check allows.
func expectedKey(frame []byte) (ctmap.Key, bool) {
	var eth layers.Ethernet
	if eth.DecodeFromBytes(frame, gopacket.NilDecodeFeedback) != nil {
		return ctmap.Key{}, false
	}
	off, typ := 14, eth.EthernetType
	if typ == layers.EthernetTypeDot1Q || typ == layers.EthernetTypeQinQ {
		var tag layers.Dot1Q
		if tag.DecodeFromBytes(frame[off:], gopacket.NilDecodeFeedback) != nil {
			return ctmap.Key{}, false
		}
		off, typ = off+4, tag.Type
	}
	pkt := slices.Clone(frame[off:])

	var (
		src, dst netip.Addr
		proto    layers.IPProtocol
		l4, end  int
	)
	var fb truncated
	switch typ {
	case layers.EthernetTypeIPv4:
		if len(pkt) >= 20 {
			ihl := int(pkt[0]&0x0f) * 4
			for i := 20; i < min(ihl, len(pkt)); i++ {
				pkt[i] = 1 // NOP
			}
		}
		var ip layers.IPv4
		if ip.DecodeFromBytes(pkt, &fb) != nil || fb || ip.Version != 4 {
			return ctmap.Key{}, false
		}
		if ip.FragOffset != 0 {
			return ctmap.Key{}, false
		}
		src, _ = netip.AddrFromSlice(ip.SrcIP)
		dst, _ = netip.AddrFromSlice(ip.DstIP)
		proto, l4, end = ip.Protocol, int(ip.IHL)*4, int(ip.Length)
	case layers.EthernetTypeIPv6:
		emptyPayload := len(pkt) >= 40 && binary.BigEndian.Uint16(pkt[4:]) == 0
		if emptyPayload {
			// Let gopacket check the rest of the fixed header as if there
			// were a payload byte.
			pkt = append(pkt[:40], 0)
			pkt[4], pkt[5], pkt[6] = 0, 1, byte(layers.IPProtocolNoNextHeader)
		}
		if len(pkt) >= 42 && pkt[6] == byte(layers.IPProtocolIPv6HopByHop) {
			padOptions(pkt[42:min(40+8*(int(pkt[41])+1), len(pkt))])
		}
		var ip layers.IPv6
		if ip.DecodeFromBytes(pkt, &fb) != nil || fb || ip.Version != 6 {
			return ctmap.Key{}, false
		}
		src, _ = netip.AddrFromSlice(ip.SrcIP)
		dst, _ = netip.AddrFromSlice(ip.DstIP)
		proto, l4, end = ip.NextHeader, 40, 40+int(ip.Length)
		if emptyPayload {
			proto, end = layers.IPProtocol(frame[off+6]), 40
		}
		var ok bool
		if proto, l4, ok = walkIPv6Extensions(pkt, proto, l4, end); !ok {
			return ctmap.Key{}, false
		}
	default:
		return ctmap.Key{}, false
	}

	var sport, dport uint16
	hdr := pkt[l4:end]
	need := map[layers.IPProtocol]int{layers.IPProtocolTCP: 20, layers.IPProtocolUDP: 8, layers.IPProtocolSCTP: 12,
		layers.IPProtocolICMPv4: 8, layers.IPProtocolICMPv6: 8}[proto]
	if len(hdr) < need {
		return ctmap.Key{}, false
	}
	switch proto {
	case layers.IPProtocolTCP, layers.IPProtocolUDP, layers.IPProtocolSCTP:
		sport, dport = binary.BigEndian.Uint16(hdr), binary.BigEndian.Uint16(hdr[2:])
	case layers.IPProtocolICMPv4:
		switch hdr[0] {
		case layers.ICMPv4TypeEchoRequest:
			sport = binary.BigEndian.Uint16(hdr[4:])
		case layers.ICMPv4TypeEchoReply:
			dport = binary.BigEndian.Uint16(hdr[4:])
		case layers.ICMPv4TypeDestinationUnreachable, layers.ICMPv4TypeSourceQuench, layers.ICMPv4TypeRedirect,
			layers.ICMPv4TypeTimeExceeded, layers.ICMPv4TypeParameterProblem:
			return ctmap.Key{}, false
		}
	case layers.IPProtocolICMPv6:
		switch t := hdr[0]; {
		case t == layers.ICMPv6TypeEchoRequest:
			sport = binary.BigEndian.Uint16(hdr[4:])
		case t == layers.ICMPv6TypeEchoReply:
			dport = binary.BigEndian.Uint16(hdr[4:])
		case t >= 1 && t <= 4, t >= 130 && t <= 137, t == 143: // errors, MLD, neighbour discovery
			return ctmap.Key{}, false
		}
	}
	k, _ := ctmap.KeyOf(uint8(proto), src, sport, dst, dport)
	return k, true
}

// padOptions overwrites b with IPv6 padding options (PadN, Pad1).
func padOptions(b []byte) {
	for len(b) > 0 {
		if len(b) == 1 {
			b[0] = 0 // Pad1
			return
		}
		n := min(len(b)-2, 255)
		if len(b)-2-n == 1 {
			n-- // leave two bytes, not one, for the next option
		}
		b[0], b[1] = 1, byte(n)
		clear(b[2 : 2+n])
		b = b[2+n:]
	}
}

// walkIPv6Extensions follows the extension headers from off to the
// upper-layer header; each must lie whole within the packet. A later
// fragment has no upper-layer header.
func walkIPv6Extensions(pkt []byte, next layers.IPProtocol, off, end int) (layers.IPProtocol, int, bool) {
	for {
		var n int
		switch next {
		case layers.IPProtocolIPv6HopByHop, layers.IPProtocolIPv6Routing, layers.IPProtocolIPv6Destination:
			if off+2 > end {
				return 0, 0, false
			}
			n = 8 * (int(pkt[off+1]) + 1)
		case layers.IPProtocolAH:
			if off+2 > end {
				return 0, 0, false
			}
			n = 4 * (int(pkt[off+1]) + 2)
		case layers.IPProtocolIPv6Fragment:
			if off+8 > end || binary.BigEndian.Uint16(pkt[off+2:])&0xfff8 != 0 {
				return 0, 0, false
			}
			n = 8
		default:
			return next, off, true
		}
		if off+n > end {
			return 0, 0, false
		}
		next, off = layers.IPProtocol(pkt[off]), off+n
	}
}

// truncated records gopacket's truncation feedback.
type truncated bool

func (t *truncated) SetTruncated() { *t = true }

var updateSeeds = flag.Bool("update-fuzz-seeds", false, "rewrite the FuzzDatapath seed corpus in testdata")

// seedFrames are the seed corpus of FuzzDatapath: the frames of the unit
// tests, and some malformed ones.
func seedFrames(tb testing.TB) map[string][]byte {
	tb.Helper()
	seeds := map[string][]byte{}
	for name, frame := range validFrames(tb) {
		seeds[name] = frame
	}
	o4, r4 := netip.MustParseAddrPort("198.51.100.1:40000"), netip.MustParseAddrPort("203.0.113.7:80")
	o6, r6 := netip.MustParseAddrPort("[fd00:c7d::1]:40000"), netip.MustParseAddrPort("[fd00:c7d::2]:80")
	for _, fl := range []uint8{dptest.SYN, dptest.SYN | dptest.ACK, dptest.ACK, dptest.FIN | dptest.ACK, dptest.RST, dptest.SYN | dptest.FIN, 0} {
		seeds["tcp4 "+dptest.FlagString(fl)] = dptest.TCP(tb, o4, r4, fl, nil)
		seeds["tcp6 "+dptest.FlagString(fl)] = dptest.TCP(tb, o6, r6, fl, dptest.Payload(10))
	}
	seeds["icmp echo reply"] = dptest.Echo(tb, r4.Addr(), o4.Addr(), 9, true)
	seeds["icmpv6 echo reply"] = dptest.Echo(tb, r6.Addr(), o6.Addr(), 9, true)
	seeds["icmp error quoting udp"] = dptest.ICMPError(tb, r4.Addr(), o4.Addr(), dptest.UDP(tb, o4, r4, dptest.Payload(8)))
	seeds["icmpv6 error quoting udp"] = dptest.ICMPError(tb, r6.Addr(), o6.Addr(), dptest.UDP(tb, o6, r6, dptest.Payload(8)))
	seeds["icmp error quoting echo"] = dptest.ICMPError(tb, r4.Addr(), o4.Addr(), dptest.Echo(tb, o4.Addr(), r4.Addr(), 3, false))

	hbh, dst, rt, frag, ah := layers.IPProtocolIPv6HopByHop, layers.IPProtocolIPv6Destination,
		layers.IPProtocolIPv6Routing, layers.IPProtocolIPv6Fragment, layers.IPProtocolAH
	seeds["tcp6 six extension headers"] = ipv6WithExts(tb, o6, r6, []layers.IPProtocol{hbh, dst, rt, frag, ah, dst}, dptest.SYN)
	seeds["tcp6 seven extension headers"] = ipv6WithExts(tb, o6, r6, []layers.IPProtocol{hbh, dst, rt, frag, ah, dst, dst}, dptest.SYN)

	ip6, nl6 := dptest.IPHeader(o6.Addr(), r6.Addr(), layers.IPProtocolIPv6Fragment)
	udp6 := &layers.UDP{SrcPort: layers.UDPPort(o6.Port()), DstPort: layers.UDPPort(r6.Port())}
	udp6.SetNetworkLayerForChecksum(nl6)
	seeds["udp6 first fragment"] = dptest.Serialize(tb, dptest.Ethernet(o6.Addr()), ip6,
		&layers.IPv6Fragment{NextHeader: layers.IPProtocolUDP, MoreFragments: true, Identification: 1}, udp6, gopacket.Payload(dptest.Payload(64)))
	seeds["udp6 later fragment"] = dptest.Serialize(tb, dptest.Ethernet(o6.Addr()), ip6,
		&layers.IPv6Fragment{NextHeader: layers.IPProtocolUDP, FragmentOffset: 9, Identification: 1}, gopacket.Payload(dptest.Payload(64)))

	ip4, nl4 := dptest.IPHeader(o4.Addr(), r4.Addr(), layers.IPProtocolUDP)
	ip4.(*layers.IPv4).Flags = layers.IPv4MoreFragments
	udp4 := &layers.UDP{SrcPort: layers.UDPPort(o4.Port()), DstPort: layers.UDPPort(r4.Port())}
	udp4.SetNetworkLayerForChecksum(nl4)
	seeds["udp4 first fragment"] = dptest.Serialize(tb, dptest.Ethernet(o4.Addr()), ip4, udp4, gopacket.Payload(dptest.Payload(64)))
	later, _ := dptest.IPHeader(o4.Addr(), r4.Addr(), layers.IPProtocolUDP)
	later.(*layers.IPv4).FragOffset = 9
	seeds["udp4 later fragment"] = dptest.Serialize(tb, dptest.Ethernet(o4.Addr()), later, gopacket.Payload(dptest.Payload(64)))

	nsIP, nsNL := dptest.IPHeader(o6.Addr(), netip.MustParseAddr("ff02::1:ff00:2"), layers.IPProtocolICMPv6)
	ns := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeNeighborSolicitation, 0)}
	ns.SetNetworkLayerForChecksum(nsNL)
	seeds["icmpv6 neighbour solicitation"] = dptest.Serialize(tb, dptest.Ethernet(o6.Addr()), nsIP, ns,
		&layers.ICMPv6NeighborSolicitation{TargetAddress: r6.Addr().AsSlice()})

	gre := dptest.TCP(tb, o4, r4, dptest.SYN, nil)
	gre[14+9] = 47
	seeds["gre4"] = gre
	seeds["arp"] = append(append(append([]byte{}, dptest.MACB...), dptest.MACA...), append([]byte{0x08, 0x06}, make([]byte, 46)...)...)
	long := dptest.TCP(tb, o4, r4, dptest.SYN, nil)
	long[16] = 0x10 // total length beyond the frame
	seeds["ipv4 total length beyond the frame"] = long
	return seeds
}

// TestFuzzSeedCorpus keeps the committed seed corpus equal to seedFrames:
// run with -update-fuzz-seeds to rewrite it.
func TestFuzzSeedCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzDatapath")
	for name, frame := range seedFrames(t) {
		file := filepath.Join(dir, seedFileName(name))
		want := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", frame)
		if *updateSeeds {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(file, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(file)
		if err != nil || string(got) != want {
			t.Errorf("seed %s is missing or stale (%v): run go test ./bpf/ -run TestFuzzSeedCorpus -update-fuzz-seeds", file, err)
		}
	}
}

func seedFileName(name string) string {
	b := []byte("seed-" + strings.ToLower(name))
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			b[i] = '-'
		}
	}
	return string(b)
}

// TestFuzzOracle checks expectedKey against the datapath on the seeds, so
// that the fuzz target's check cannot pass by expecting nothing: every seed
// the oracle says may open a flow opens exactly that one, except those the
// datapath refuses for reasons the oracle leaves to it.
func TestFuzzOracle(t *testing.T) {
	refused := map[string]bool{ // invalid TCP flags, RST without entry
		"tcp4 none": true, "tcp6 none": true, "tcp4 FS": true, "tcp6 FS": true, "tcp4 R": true, "tcp6 R": true,
		// Beyond the extension headers the datapath walks.
		"tcp6 seven extension headers": true,
	}
	tracked := 0
	for name, frame := range seedFrames(t) {
		t.Run(name, func(t *testing.T) {
			d := dptest.New(t)
			want, ok := expectedKey(frame)
			d.Run(t, egress, frame)
			keys := d.Keys(t)
			switch {
			case len(keys) > 1:
				t.Fatalf("%d entries", len(keys))
			case len(keys) == 1 && (!ok || keys[0] != want):
				t.Fatalf("entry %+v, oracle says %+v (may open: %v)", keys[0], want, ok)
			case len(keys) == 0 && ok && !refused[name]:
				t.Fatalf("no entry, oracle says %+v", ctmap.FlowOf(&want, &ctmap.Entry{}))
			case len(keys) == 1:
				tracked++
			}
		})
	}
	if tracked < 15 {
		t.Fatalf("only %d seeds open a flow", tracked)
	}
}
