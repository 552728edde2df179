package bpf_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
)

// Verdicts as Program.Run reports them.
const (
	verdictPass = ^uint32(0) // TC_ACT_UNSPEC (-1)
	verdictDrop = uint32(2)  // TC_ACT_SHOT
)

func verdictName(v uint32) string {
	switch v {
	case verdictPass:
		return "pass"
	case verdictDrop:
		return "drop"
	}
	return fmt.Sprintf("verdict %d", int32(v))
}

// direction is DIR_INGRESS or DIR_EGRESS in bpf/common.h.
type direction uint32

const (
	ingress direction = 0
	egress  direction = 1
)

func (d direction) String() string {
	if d == ingress {
		return "ingress"
	}
	return "egress"
}

func (d direction) reverse() direction { return 1 - d }

// reason mirrors enum metric_reason in bpf/common.h.
type reason uint32

const (
	fwdEstablished reason = 0
	fwdNew         reason = 1
	fwdRelated     reason = 2
	fwdUntracked   reason = 3
	fwdUnparseable reason = 4
	dropPolicy     reason = 16
	dropInvalid    reason = 17
	dropCTInsert   reason = 18
	dropParse      reason = 19
	ctCreated      reason = 32
	ctUpdateFailed reason = 33
	eventsLost     reason = 34
	eventsLimited  reason = 35
	fragments      reason = 36
	metricMax             = 64
)

var reasonNames = map[reason]string{
	fwdEstablished: "fwd_established", fwdNew: "fwd_new", fwdRelated: "fwd_related",
	fwdUntracked: "fwd_untracked", fwdUnparseable: "fwd_unparseable",
	dropPolicy: "drop_policy", dropInvalid: "drop_invalid", dropCTInsert: "drop_ct_insert",
	dropParse: "drop_parse", ctCreated: "ct_created", ctUpdateFailed: "ct_update_failed",
	eventsLost: "events_lost", eventsLimited: "events_ratelimited",
	fragments: "fragments",
}

func (r reason) String() string {
	if n, ok := reasonNames[r]; ok {
		return n
	}
	return fmt.Sprintf("reason_%d", uint32(r))
}

// isVerdict reports whether r is one of the per-packet verdict reasons, of
// which every packet counts exactly one.
func (r reason) isVerdict() bool { return r < 32 }

// metricKey names one counter of metrics_v1.
type metricKey struct {
	dir    direction
	reason reason
}

func (k metricKey) String() string { return k.dir.String() + "/" + k.reason.String() }

// counts are packets per counter. The events counters (lost, rate limited)
// move only while an event consumer is registered, which these tests do not
// do unless they say so: every expect checks that they stay.
type counts map[metricKey]uint64

// testDatapath is a freshly loaded, unpinned datapath.
type testDatapath struct {
	bpf.CtdObjects
	ct *ctmap.Map
}

// Map sizes of the test datapath: small, but roomy enough for the property test.
const (
	testCTMax      = 1024
	testIPCacheMax = 16384
)

// newDatapath loads the datapath's programs with their own maps, sized like
// the loader sizes them, and closes them when the test ends.
func newDatapath(tb testing.TB) *testDatapath {
	tb.Helper()
	spec, err := bpf.LoadCtd()
	if err != nil {
		tb.Fatal(err)
	}
	return newDatapathFrom(tb, spec)
}

// newDatapathFrom is newDatapath for another build of the programs.
func newDatapathFrom(tb testing.TB, spec *ebpf.CollectionSpec) *testDatapath {
	tb.Helper()
	loader.Options{CTMax: testCTMax, IPCacheMax: testIPCacheMax, RingBufSize: 4096}.WithDefaults().SizeSpec(spec)
	d := &testDatapath{}
	if err := spec.LoadAndAssign(&d.CtdObjects, nil); err != nil {
		tb.Fatalf("load datapath: %v", err)
	}
	tb.Cleanup(func() { d.Close() })
	d.ct = ctmap.New(d.CtV1)
	return d
}

// skbContext is the prefix of struct __sk_buff, up to gso_size, that
// BPF_PROG_TEST_RUN takes as input; the blank fields must be zero.
type skbContext struct {
	_       [10]uint32 // len .. ingress_ifindex (mark and priority unused here)
	Ifindex uint32     // offset 40
	_       [30]uint32 // tc_index .. wire_len
	GSOSegs uint32     // offset 164
	_       [2]uint32  // sk
	GSOSize uint32     // offset 176
}

// runCtx runs frame through the program for dir with an optional context
// and returns the verdict.
func (d *testDatapath) runCtx(tb testing.TB, dir direction, frame []byte, ctx *skbContext) (uint32, error) {
	tb.Helper()
	prog := d.CtdIngress
	if dir == egress {
		prog = d.CtdEgress
	}
	opts := &ebpf.RunOptions{Data: frame}
	if ctx != nil {
		opts.Context = *ctx
	}
	return prog.Run(opts)
}

func (d *testDatapath) run(tb testing.TB, dir direction, frame []byte) uint32 {
	tb.Helper()
	v, err := d.runCtx(tb, dir, frame, nil)
	if err != nil {
		tb.Fatalf("run %s on a %d-byte frame: %v", dir, len(frame), err)
	}
	return v
}

// metrics sums metrics_v1 over the CPUs.
func (d *testDatapath) metrics(tb testing.TB) counts {
	tb.Helper()
	c := counts{}
	for _, dir := range []direction{ingress, egress} {
		for r := range reasonNames {
			var per []bpf.CtdMetricValue
			if err := d.MetricsV1.Lookup(uint32(dir)*metricMax+uint32(r), &per); err != nil {
				tb.Fatalf("read metric %s: %v", metricKey{dir, r}, err)
			}
			var n uint64
			for _, v := range per {
				n += v.Packets
			}
			if n != 0 {
				c[metricKey{dir, r}] = n
			}
		}
	}
	return c
}

// metricBytes is the byte count of one counter, summed over the CPUs.
func (d *testDatapath) metricBytes(tb testing.TB, dir direction, r reason) uint64 {
	tb.Helper()
	var per []bpf.CtdMetricValue
	if err := d.MetricsV1.Lookup(uint32(dir)*metricMax+uint32(r), &per); err != nil {
		tb.Fatalf("read metric %s: %v", metricKey{dir, r}, err)
	}
	var n uint64
	for _, v := range per {
		n += v.Bytes
	}
	return n
}

// delta is after minus before, without the counters that did not change.
func delta(before, after counts) counts {
	d := counts{}
	for k, v := range after {
		if v != before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}

// expect runs frame through dir and checks the verdict and that exactly the
// counters in want moved, by the packets given.
func (d *testDatapath) expect(tb testing.TB, dir direction, frame []byte, verdict uint32, want counts) {
	tb.Helper()
	before := d.metrics(tb)
	got := d.run(tb, dir, frame)
	if got != verdict {
		tb.Errorf("%s: verdict %s, want %s", dir, verdictName(got), verdictName(verdict))
	}
	if diff := cmp.Diff(want, delta(before, d.metrics(tb))); diff != "" {
		tb.Errorf("%s: metrics changed other than expected (-want +got):\n%s", dir, diff)
	}
}

// one is a counts literal helper: one packet on each key.
func one(keys ...metricKey) counts {
	c := counts{}
	for _, k := range keys {
		c[k]++
	}
	return c
}

// newFlow is what a packet that opens a flow counts.
func newFlow(dir direction) counts {
	return one(metricKey{dir, fwdNew}, metricKey{dir, ctCreated})
}

// hit is what a packet of a tracked flow counts.
func hit(dir direction) counts { return one(metricKey{dir, fwdEstablished}) }

// flows reads the whole conntrack table.
func (d *testDatapath) flows(tb testing.TB) []ctmap.Flow {
	tb.Helper()
	var out []ctmap.Flow
	if err := d.ct.Iterate(func(k *ctmap.Key, e *ctmap.Entry) bool {
		out = append(out, ctmap.FlowOf(k, e))
		return true
	}); err != nil {
		tb.Fatal(err)
	}
	return out
}

// keys reads the conntrack table's keys.
func (d *testDatapath) keys(tb testing.TB) []ctmap.Key {
	tb.Helper()
	var out []ctmap.Key
	if err := d.ct.Iterate(func(k *ctmap.Key, _ *ctmap.Entry) bool {
		out = append(out, *k)
		return true
	}); err != nil {
		tb.Fatal(err)
	}
	return out
}

// flowCmp compares flows without their timestamps (checked on their own).
var flowCmp = cmp.Options{cmpopts.IgnoreFields(ctmap.Flow{}, "FirstSeen", "LastSeen"), cmpopts.EquateComparable(netip.Addr{})}

// onlyFlow asserts that the table holds exactly want (timestamps aside) and
// returns the entry as read.
func (d *testDatapath) onlyFlow(tb testing.TB, want ctmap.Flow) ctmap.Flow {
	tb.Helper()
	got := d.flows(tb)
	if len(got) != 1 {
		tb.Fatalf("conntrack holds %d entries, want 1: %+v", len(got), got)
	}
	if diff := cmp.Diff(want, got[0], flowCmp); diff != "" {
		tb.Fatalf("conntrack entry (-want +got):\n%s", diff)
	}
	return got[0]
}

// noFlows asserts an empty conntrack table.
func (d *testDatapath) noFlows(tb testing.TB) {
	tb.Helper()
	if got := d.flows(tb); len(got) != 0 {
		tb.Fatalf("conntrack holds %d entries, want none: %+v", len(got), got)
	}
}

// resetCT empties the conntrack table.
func (d *testDatapath) resetCT(tb testing.TB) {
	tb.Helper()
	if _, err := d.ct.Delete(d.keys(tb)); err != nil {
		tb.Fatal(err)
	}
}

// setConfig writes config_v1.
func (d *testDatapath) setConfig(tb testing.TB, c bpf.CtdConfig) {
	tb.Helper()
	if err := d.ConfigV1.Put(uint32(0), c); err != nil {
		tb.Fatalf("write config: %v", err)
	}
}

// setIdentity maps a prefix to an identity in the ipcache of its family.
func (d *testDatapath) setIdentity(tb testing.TB, p netip.Prefix, id uint32) {
	tb.Helper()
	v := bpf.CtdIpcacheValue{Identity: id}
	var err error
	if p.Addr().Is4() {
		err = d.Ipcache4V1.Put(bpf.CtdIpcache4Key{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As4()}, v)
	} else {
		err = d.Ipcache6V1.Put(bpf.CtdIpcache6Key{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As16()}, v)
	}
	if err != nil {
		tb.Fatalf("ipcache add %s id=%d: %v", p, id, err)
	}
}

// loIfindex is the interface BPF_PROG_TEST_RUN runs on without a context.
func loIfindex(tb testing.TB) uint32 {
	tb.Helper()
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		tb.Fatalf("loopback interface: %v", err)
	}
	return uint32(lo.Index)
}

// checkTimes asserts first <= last within [from, to] (CLOCK_MONOTONIC_COARSE).
func checkTimes(tb testing.TB, f ctmap.Flow, from, to time.Duration) {
	tb.Helper()
	if f.FirstSeen < from || f.LastSeen > to || f.FirstSeen > f.LastSeen {
		tb.Errorf("first_seen %v, last_seen %v: want from %v <= first <= last <= %v", f.FirstSeen, f.LastSeen, from, to)
	}
}

// ---- frames ----

var (
	macA = net.HardwareAddr{0x02, 0xc7, 0xd0, 0, 0, 0x0a}
	macB = net.HardwareAddr{0x02, 0xc7, 0xd0, 0, 0, 0x0b}
)

// TCP flags as in byte 13 of the header.
const (
	tcpFIN uint8 = 0x01
	tcpSYN uint8 = 0x02
	tcpRST uint8 = 0x04
	tcpPSH uint8 = 0x08
	tcpACK uint8 = 0x10
	tcpURG uint8 = 0x20
)

func tcpFlagString(f uint8) string {
	var b []byte
	for i, c := range "FSRPAU" {
		if f&(1<<i) != 0 {
			b = append(b, byte(c))
		}
	}
	if len(b) == 0 {
		return "none"
	}
	return string(b)
}

func mustSerialize(tb testing.TB, ls ...gopacket.SerializableLayer) []byte {
	tb.Helper()
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		tb.Fatalf("serialize %v: %v", ls, err)
	}
	return slices.Clone(buf.Bytes())
}

// ethernet is an untagged Ethernet header for the address family.
func ethernet(family netip.Addr) *layers.Ethernet {
	t := layers.EthernetTypeIPv4
	if !family.Is4() {
		t = layers.EthernetTypeIPv6
	}
	return &layers.Ethernet{SrcMAC: macA, DstMAC: macB, EthernetType: t}
}

// ipHeader is the IP header of src -> dst carrying proto.
func ipHeader(src, dst netip.Addr, proto layers.IPProtocol) (gopacket.SerializableLayer, gopacket.NetworkLayer) {
	if src.Is4() {
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: proto, Flags: layers.IPv4DontFragment,
			SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
		return ip, ip
	}
	ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
	return ip, ip
}

func payload(n int) gopacket.Payload {
	return gopacket.Payload(bytes.Repeat([]byte{0xc7}, n))
}

func tcpLayer(src, dst netip.AddrPort, flags uint8) *layers.TCP {
	return &layers.TCP{
		SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()),
		Seq: 1000, Ack: 2000, Window: 65535,
		FIN: flags&tcpFIN != 0, SYN: flags&tcpSYN != 0, RST: flags&tcpRST != 0,
		PSH: flags&tcpPSH != 0, ACK: flags&tcpACK != 0, URG: flags&tcpURG != 0,
	}
}

// tcpFrame is an Ethernet/IP/TCP frame with n bytes of payload.
func tcpFrame(tb testing.TB, src, dst netip.AddrPort, flags uint8, n int) []byte {
	tb.Helper()
	ip, nl := ipHeader(src.Addr(), dst.Addr(), layers.IPProtocolTCP)
	tcp := tcpLayer(src, dst, flags)
	tcp.SetNetworkLayerForChecksum(nl)
	return mustSerialize(tb, ethernet(src.Addr()), ip, tcp, payload(n))
}

// udpFrame is an Ethernet/IP/UDP frame with n bytes of payload.
func udpFrame(tb testing.TB, src, dst netip.AddrPort, n int) []byte {
	tb.Helper()
	ip, nl := ipHeader(src.Addr(), dst.Addr(), layers.IPProtocolUDP)
	udp := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
	udp.SetNetworkLayerForChecksum(nl)
	return mustSerialize(tb, ethernet(src.Addr()), ip, udp, payload(n))
}

// sctpFrame is an Ethernet/IP/SCTP frame: the 12-byte common header
// (ports, verification tag, checksum; not computed: the datapath does not
// check it) and one DATA chunk header with n bytes of payload.
func sctpFrame(tb testing.TB, src, dst netip.AddrPort, n int) []byte {
	tb.Helper()
	ip, _ := ipHeader(src.Addr(), dst.Addr(), layers.IPProtocolSCTP)
	hdr := make([]byte, 12+16)
	binary.BigEndian.PutUint16(hdr[0:], src.Port())
	binary.BigEndian.PutUint16(hdr[2:], dst.Port())
	binary.BigEndian.PutUint32(hdr[4:], 0xc7dc7d)
	binary.BigEndian.PutUint16(hdr[12+2:], uint16(16+n)) // DATA chunk (type 0) length
	return mustSerialize(tb, ethernet(src.Addr()), ip, rawLayer(hdr), payload(n))
}

// echoFrame is an ICMP (v4) or ICMPv6 echo request or reply with id.
func echoFrame(tb testing.TB, src, dst netip.Addr, id uint16, reply bool) []byte {
	tb.Helper()
	if src.Is4() {
		ip, _ := ipHeader(src, dst, layers.IPProtocolICMPv4)
		typ := uint8(layers.ICMPv4TypeEchoRequest)
		if reply {
			typ = layers.ICMPv4TypeEchoReply
		}
		icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(typ, 0), Id: id, Seq: 7}
		return mustSerialize(tb, ethernet(src), ip, icmp, payload(56))
	}
	ip, nl := ipHeader(src, dst, layers.IPProtocolICMPv6)
	typ := uint8(layers.ICMPv6TypeEchoRequest)
	if reply {
		typ = layers.ICMPv6TypeEchoReply
	}
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(typ, 0)}
	icmp.SetNetworkLayerForChecksum(nl)
	return mustSerialize(tb, ethernet(src), ip, icmp, &layers.ICMPv6Echo{Identifier: id, SeqNumber: 7}, payload(56))
}

// icmpErrorFrame is an ICMP error from src to dst quoting the IP packet of
// quotedFrame (an Ethernet frame): destination unreachable (port) for IPv4,
// packet too big for IPv6.
func icmpErrorFrame(tb testing.TB, src, dst netip.Addr, quotedFrame []byte) []byte {
	tb.Helper()
	quoted := quotedFrame[14:]
	if src.Is4() {
		// RFC 792: the IP header and the first 8 bytes of the datagram.
		ihl := int(quoted[0]&0x0f) * 4
		quoted = quoted[:min(len(quoted), ihl+8)]
		ip, _ := ipHeader(src, dst, layers.IPProtocolICMPv4)
		icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeDestinationUnreachable, layers.ICMPv4CodePort)}
		return mustSerialize(tb, ethernet(src), ip, icmp, gopacket.Payload(quoted))
	}
	ip, nl := ipHeader(src, dst, layers.IPProtocolICMPv6)
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypePacketTooBig, 0)}
	icmp.SetNetworkLayerForChecksum(nl)
	mtu := []byte{0, 0, 0x05, 0x00} // 1280
	return mustSerialize(tb, ethernet(src), ip, icmp, gopacket.Payload(append(mtu, quoted...)))
}

// rawLayer serializes as the bytes it holds: extension headers and payloads
// that gopacket cannot write, or must not fix up.
type rawLayer []byte

func (r rawLayer) SerializeTo(b gopacket.SerializeBuffer, _ gopacket.SerializeOptions) error {
	out, err := b.PrependBytes(len(r))
	if err != nil {
		return err
	}
	copy(out, r)
	return nil
}

func (r rawLayer) LayerType() gopacket.LayerType { return gopacket.LayerTypePayload }

// Policy verdicts (VERDICT_* in bpf/common.h).
const (
	verdictAllow uint8 = 1
	verdictDeny  uint8 = 2
)

// denyIn is a config default verdict denying dir and allowing the other.
func denyIn(dir direction) [2]uint8 {
	var v [2]uint8
	v[dir] = verdictDeny
	return v
}
