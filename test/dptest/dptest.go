// Package dptest runs crafted frames through ctd's datapath programs in tests: it loads a datapath, builds frames, runs them and reads back verdicts, counters and conntrack entries.
package dptest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/datapath/cgroupv2"
	"github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/nettest"
)

// Verdicts as Program.Run reports them.
const (
	Pass = ^uint32(0) // TC_ACT_UNSPEC (-1)
	Drop = uint32(2)  // TC_ACT_SHOT
)

// VerdictName names a verdict as Run returns it.
func VerdictName(v uint32) string {
	switch v {
	case Pass:
		return "pass"
	case Drop:
		return "drop"
	}
	return fmt.Sprintf("verdict %d", int32(v))
}

// testedReasons are the counters the tests read: every reason. The events
// counters (lost, rate limited) move only while an event consumer is
// registered (Listen), so every Expect of a test that does not listen
// checks that they stay.
var testedReasons = []metricsmap.Reason{
	metricsmap.FwdEstablished, metricsmap.FwdNew, metricsmap.FwdRelated, metricsmap.FwdUntracked, metricsmap.FwdUnparseable,
	metricsmap.DropPolicy, metricsmap.DropInvalid, metricsmap.DropCTInsert, metricsmap.DropParse, metricsmap.DropRevoked,
	metricsmap.CTCreated, metricsmap.CTUpdateFailed, metricsmap.EventsLost, metricsmap.EventsRateLimited, metricsmap.Fragments,
}

// IsVerdict reports whether r is one of the per-packet verdict reasons, of
// which every packet counts exactly one.
func IsVerdict(r metricsmap.Reason) bool { return r.Kind() != metricsmap.Counter }

// Key names one counter of metrics_v1.
type Key struct {
	Dir    bpf.Direction
	Reason metricsmap.Reason
}

func (k Key) String() string { return k.Dir.String() + "/" + k.Reason.String() }

// Counts are packets per counter.
type Counts map[Key]uint64

// Datapath is a loaded datapath: its programs and maps, and the
// conntrack table as flows.
type Datapath struct {
	*loader.Datapath
	ct *ctmap.Map
}

// Map sizes of New's datapath: small, but roomy enough for the property test.
const (
	testCTMax       = 1024
	testCTUnconfMax = 256
	testIPCacheMax  = 16384
)

// New loads the datapath's programs with maps of their own, not pinned,
// sized like the loader sizes them, and closes them when the test ends.
func New(tb testing.TB) *Datapath {
	tb.Helper()
	spec, err := bpf.LoadCtd()
	if err != nil {
		tb.Fatal(err)
	}
	return NewFrom(tb, spec)
}

// NewFrom is New for another build of the programs.
func NewFrom(tb testing.TB, spec *ebpf.CollectionSpec) *Datapath {
	tb.Helper()
	nettest.RequireRoot(tb)
	loader.Options{CTMax: testCTMax, CTUnconfirmedMax: testCTUnconfMax, IPCacheMax: testIPCacheMax, RingBufSize: 4096}.WithDefaults().SizeSpec(spec)
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		tb.Fatalf("dptest: load datapath: %v", err)
	}
	defer coll.Close()
	dp, err := loader.FromCollection(coll, "")
	if err != nil {
		tb.Fatalf("dptest: load datapath: %v", err)
	}
	return wrap(tb, dp)
}

// Load loads the datapath pinned at pinPath (created there if missing) with
// small tables; everything is closed when the test ends. The caller owns
// pinPath's removal (nettest.PinPath does it).
func Load(tb testing.TB, pinPath string) *Datapath {
	tb.Helper()
	nettest.RequireRoot(tb)
	dp, err := loader.Load(loader.Options{PinPath: pinPath, CTMax: 4096, IPCacheMax: 1024, RingBufSize: 1 << 16})
	if err != nil {
		tb.Fatalf("dptest: load datapath at %s: %v", pinPath, err)
	}
	return wrap(tb, dp)
}

func wrap(tb testing.TB, dp *loader.Datapath) *Datapath {
	tb.Cleanup(func() { dp.Close() })
	return &Datapath{Datapath: dp, ct: dp.Conntrack()}
}

// Listen registers the test as the consumer of events for as long as the
// datapath is loaded: the datapath writes events only while one is
// registered (as ctd monitor does, refreshing it every second).
func (d *Datapath) Listen(tb testing.TB) {
	tb.Helper()
	if err := d.Listener().Put(uint32(0), bpf.CtdEvlisten{Until: ^uint64(0), Pid: uint32(os.Getpid())}); err != nil {
		tb.Fatalf("dptest: register as the event consumer: %v", err)
	}
}

// SKBContext is the prefix of struct __sk_buff, up to gso_size, that
// BPF_PROG_TEST_RUN takes as input; the blank fields must be zero.
type SKBContext struct {
	_       [10]uint32 // len .. ingress_ifindex (mark and priority unused here)
	Ifindex uint32     // offset 40
	_       [30]uint32 // tc_index .. wire_len
	GSOSegs uint32     // offset 164
	_       [2]uint32  // sk
	GSOSize uint32     // offset 176
}

// RunCtx runs frame through the program for dir with an optional context
// and returns the verdict.
func (d *Datapath) RunCtx(tb testing.TB, dir bpf.Direction, frame []byte, ctx *SKBContext) (uint32, error) {
	tb.Helper()
	prog := d.CtdIngress
	if dir == bpf.Egress {
		prog = d.CtdEgress
	}
	opts := &ebpf.RunOptions{Data: frame}
	if ctx != nil {
		opts.Context = *ctx
	}
	return prog.Run(opts)
}

func (d *Datapath) Run(tb testing.TB, dir bpf.Direction, frame []byte) uint32 {
	tb.Helper()
	v, err := d.RunCtx(tb, dir, frame, nil)
	if err != nil {
		tb.Fatalf("run %s on a %d-byte frame: %v", dir, len(frame), err)
	}
	return v
}

// Counters reads metrics_v1, summed over the CPUs (packets).
func (d *Datapath) Counters(tb testing.TB) Counts {
	tb.Helper()
	snap := d.snapshot(tb)
	c := Counts{}
	for _, dir := range []bpf.Direction{bpf.Ingress, bpf.Egress} {
		for _, r := range testedReasons {
			if n := snap.Get(dir, r).Packets; n != 0 {
				c[Key{Dir: dir, Reason: r}] = n
			}
		}
	}
	return c
}

// MetricBytes is the byte count of one counter, summed over the CPUs.
func (d *Datapath) MetricBytes(tb testing.TB, dir bpf.Direction, r metricsmap.Reason) uint64 {
	tb.Helper()
	return d.snapshot(tb).Get(dir, r).Bytes
}

func (d *Datapath) snapshot(tb testing.TB) *metricsmap.Snapshot {
	tb.Helper()
	snap, err := metricsmap.New(d.Maps.Metrics()).Read()
	if err != nil {
		tb.Fatalf("read metrics: %v", err)
	}
	return &snap
}

// Delta is after minus before, without the counters that did not change.
func Delta(before, after Counts) Counts {
	d := Counts{}
	for k, v := range after {
		if v != before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}

// Expect runs frame through dir and checks the verdict and that exactly the
// counters in want moved, by the packets given.
func (d *Datapath) Expect(tb testing.TB, dir bpf.Direction, frame []byte, verdict uint32, want Counts) {
	tb.Helper()
	before := d.Counters(tb)
	got := d.Run(tb, dir, frame)
	if got != verdict {
		tb.Errorf("%s: verdict %s, want %s", dir, VerdictName(got), VerdictName(verdict))
	}
	if diff := cmp.Diff(want, Delta(before, d.Counters(tb))); diff != "" {
		tb.Errorf("%s: metrics changed other than expected (-want +got):\n%s", dir, diff)
	}
}

// one is a Counts literal helper: one packet on each key.
func One(keys ...Key) Counts {
	c := Counts{}
	for _, k := range keys {
		c[k]++
	}
	return c
}

// NewFlow is what a packet that opens a flow Counts.
func NewFlow(dir bpf.Direction) Counts {
	return One(Key{Dir: dir, Reason: metricsmap.FwdNew}, Key{Dir: dir, Reason: metricsmap.CTCreated})
}

// hit is what a packet of a tracked flow Counts.
func Hit(dir bpf.Direction) Counts { return One(Key{Dir: dir, Reason: metricsmap.FwdEstablished}) }

// flows reads the whole conntrack table.
func (d *Datapath) Flows(tb testing.TB) []ctmap.Flow {
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
func (d *Datapath) Keys(tb testing.TB) []ctmap.Key {
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

// FlowCmp compares flows without their timestamps, owner and handshake
// RTT (checked on their own: BPF_PROG_TEST_RUN gives egress packets a
// socket of the calling process, and RTTs are times).
var FlowCmp = cmp.Options{
	cmpopts.IgnoreFields(ctmap.Flow{}, "FirstSeen", "LastSeen", "Pid", "Comm", "CgroupID", "RTT"),
	cmpopts.EquateComparable(netip.Addr{}),
}

// OnlyFlow asserts that the table holds exactly want (timestamps aside) and
// returns the entry as read.
func (d *Datapath) OnlyFlow(tb testing.TB, want ctmap.Flow) ctmap.Flow {
	tb.Helper()
	got := d.Flows(tb)
	if len(got) != 1 {
		tb.Fatalf("conntrack holds %d entries, want 1: %+v", len(got), got)
	}
	if diff := cmp.Diff(want, got[0], FlowCmp); diff != "" {
		tb.Fatalf("conntrack entry (-want +got):\n%s", diff)
	}
	return got[0]
}

// NoFlows asserts an empty conntrack table.
func (d *Datapath) NoFlows(tb testing.TB) {
	tb.Helper()
	if got := d.Flows(tb); len(got) != 0 {
		tb.Fatalf("conntrack holds %d entries, want none: %+v", len(got), got)
	}
}

// ResetCT empties the conntrack table.
func (d *Datapath) ResetCT(tb testing.TB) {
	tb.Helper()
	if _, err := d.ct.Delete(d.Keys(tb)); err != nil {
		tb.Fatal(err)
	}
}

// SetConfig writes config_v1.
func (d *Datapath) SetConfig(tb testing.TB, c bpf.CtdConfig) {
	tb.Helper()
	if err := d.Config().Update(func(v *config.Values) { *v = c }); err != nil {
		tb.Fatalf("write config: %v", err)
	}
}

// SetIdentity maps a prefix to an identity in the ipcache as ctd writes
// it: a host entry into its family's hash, a CIDR into its family's trie.
func (d *Datapath) SetIdentity(tb testing.TB, p netip.Prefix, id uint32) {
	tb.Helper()
	if err := d.IPCache().Put(p, id); err != nil {
		tb.Fatalf("ipcache add %s id=%d: %v", p, id, err)
	}
}

// SetTrieIdentity maps a prefix to an identity in its family's LPM trie,
// host entries too, as a datapath pinned before the host hashes holds them.
func (d *Datapath) SetTrieIdentity(tb testing.TB, p netip.Prefix, id uint32) {
	tb.Helper()
	v := bpf.CtdIpcacheValue{Identity: id}
	var err error
	if p.Addr().Is4() {
		err = d.IPCache4().Put(bpf.CtdIpcache4Key{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As4()}, v)
	} else {
		err = d.IPCache6().Put(bpf.CtdIpcache6Key{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As16()}, v)
	}
	if err != nil {
		tb.Fatalf("ipcache add %s id=%d to the trie: %v", p, id, err)
	}
}

// LoIfindex is the interface BPF_PROG_TEST_RUN runs on without a context.
func LoIfindex(tb testing.TB) uint32 {
	tb.Helper()
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		tb.Fatalf("loopback interface: %v", err)
	}
	return uint32(lo.Index)
}

// CheckTimes asserts first <= last within [from, to] (CLOCK_MONOTONIC_COARSE).
func CheckTimes(tb testing.TB, f ctmap.Flow, from, to time.Duration) {
	tb.Helper()
	if f.FirstSeen < from || f.LastSeen > to || f.FirstSeen > f.LastSeen {
		tb.Errorf("first_seen %v, last_seen %v: want from %v <= first <= last <= %v", f.FirstSeen, f.LastSeen, from, to)
	}
}

// ---- frames ----

var (
	MACA = net.HardwareAddr{0x02, 0xc7, 0xd0, 0, 0, 0x0a}
	MACB = net.HardwareAddr{0x02, 0xc7, 0xd0, 0, 0, 0x0b}
)

// TCP flags as in byte 13 of the header.
const (
	FIN uint8 = 0x01
	SYN uint8 = 0x02
	RST uint8 = 0x04
	PSH uint8 = 0x08
	ACK uint8 = 0x10
	URG uint8 = 0x20
)

func FlagString(f uint8) string {
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

func Serialize(tb testing.TB, ls ...gopacket.SerializableLayer) []byte {
	tb.Helper()
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		tb.Fatalf("serialize %v: %v", ls, err)
	}
	return slices.Clone(buf.Bytes())
}

// Ethernet is an untagged Ethernet header for the address family.
func Ethernet(family netip.Addr) *layers.Ethernet {
	t := layers.EthernetTypeIPv4
	if !family.Is4() {
		t = layers.EthernetTypeIPv6
	}
	return &layers.Ethernet{SrcMAC: MACA, DstMAC: MACB, EthernetType: t}
}

// IPHeader is the IP header of src -> dst carrying proto.
func IPHeader(src, dst netip.Addr, proto layers.IPProtocol) (gopacket.SerializableLayer, gopacket.NetworkLayer) {
	if src.Is4() {
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: proto, Flags: layers.IPv4DontFragment,
			SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
		return ip, ip
	}
	ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
	return ip, ip
}

// Payload is n bytes of payload.
func Payload(n int) []byte { return bytes.Repeat([]byte{0xc7}, n) }

func TCPLayer(src, dst netip.AddrPort, flags uint8) *layers.TCP {
	return &layers.TCP{
		SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()),
		Seq: 1000, Ack: 2000, Window: 65535,
		FIN: flags&FIN != 0, SYN: flags&SYN != 0, RST: flags&RST != 0,
		PSH: flags&PSH != 0, ACK: flags&ACK != 0, URG: flags&URG != 0,
	}
}

// TCP is an Ethernet/IP/TCP frame from src to dst carrying payload.
func TCP(tb testing.TB, src, dst netip.AddrPort, flags uint8, payload []byte) []byte {
	tb.Helper()
	ip, nl := IPHeader(src.Addr(), dst.Addr(), layers.IPProtocolTCP)
	tcp := TCPLayer(src, dst, flags)
	tcp.SetNetworkLayerForChecksum(nl)
	return Serialize(tb, Ethernet(src.Addr()), ip, tcp, gopacket.Payload(payload))
}

// UDP is an Ethernet/IP/UDP frame from src to dst carrying payload.
func UDP(tb testing.TB, src, dst netip.AddrPort, payload []byte) []byte {
	tb.Helper()
	ip, nl := IPHeader(src.Addr(), dst.Addr(), layers.IPProtocolUDP)
	udp := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
	udp.SetNetworkLayerForChecksum(nl)
	return Serialize(tb, Ethernet(src.Addr()), ip, udp, gopacket.Payload(payload))
}

// SCTP is an Ethernet/IP/SCTP frame: the 12-byte common header (ports,
// verification tag, checksum; not computed: the datapath does not check it)
// and one DATA chunk carrying payload.
func SCTP(tb testing.TB, src, dst netip.AddrPort, payload []byte) []byte {
	tb.Helper()
	ip, _ := IPHeader(src.Addr(), dst.Addr(), layers.IPProtocolSCTP)
	hdr := make([]byte, 12+16)
	binary.BigEndian.PutUint16(hdr[0:], src.Port())
	binary.BigEndian.PutUint16(hdr[2:], dst.Port())
	binary.BigEndian.PutUint32(hdr[4:], 0xc7dc7d)
	binary.BigEndian.PutUint16(hdr[12+2:], uint16(16+len(payload))) // DATA chunk (type 0) length
	return Serialize(tb, Ethernet(src.Addr()), ip, RawLayer(hdr), gopacket.Payload(payload))
}

// Echo is an ICMP (v4) or ICMPv6 echo request or reply with id.
func Echo(tb testing.TB, src, dst netip.Addr, id uint16, reply bool) []byte {
	tb.Helper()
	if src.Is4() {
		ip, _ := IPHeader(src, dst, layers.IPProtocolICMPv4)
		typ := uint8(layers.ICMPv4TypeEchoRequest)
		if reply {
			typ = layers.ICMPv4TypeEchoReply
		}
		icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(typ, 0), Id: id, Seq: 7}
		return Serialize(tb, Ethernet(src), ip, icmp, gopacket.Payload(Payload(56)))
	}
	ip, nl := IPHeader(src, dst, layers.IPProtocolICMPv6)
	typ := uint8(layers.ICMPv6TypeEchoRequest)
	if reply {
		typ = layers.ICMPv6TypeEchoReply
	}
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(typ, 0)}
	icmp.SetNetworkLayerForChecksum(nl)
	return Serialize(tb, Ethernet(src), ip, icmp, &layers.ICMPv6Echo{Identifier: id, SeqNumber: 7}, gopacket.Payload(Payload(56)))
}

// ICMPError is an ICMP error from src to dst quoting the IP packet of
// quotedFrame (an Ethernet frame): destination unreachable (port) for IPv4,
// packet too big for IPv6.
func ICMPError(tb testing.TB, src, dst netip.Addr, quotedFrame []byte) []byte {
	tb.Helper()
	quoted := quotedFrame[14:]
	if src.Is4() {
		// RFC 792: the IP header and the first 8 bytes of the datagram.
		ihl := int(quoted[0]&0x0f) * 4
		quoted = quoted[:min(len(quoted), ihl+8)]
		ip, _ := IPHeader(src, dst, layers.IPProtocolICMPv4)
		icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeDestinationUnreachable, layers.ICMPv4CodePort)}
		return Serialize(tb, Ethernet(src), ip, icmp, gopacket.Payload(quoted))
	}
	ip, nl := IPHeader(src, dst, layers.IPProtocolICMPv6)
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypePacketTooBig, 0)}
	icmp.SetNetworkLayerForChecksum(nl)
	mtu := []byte{0, 0, 0x05, 0x00} // 1280
	return Serialize(tb, Ethernet(src), ip, icmp, gopacket.Payload(append(mtu, quoted...)))
}

// RawLayer serializes as the bytes it holds: extension headers and payloads
// that gopacket cannot write, or must not fix up.
type RawLayer []byte

func (r RawLayer) SerializeTo(b gopacket.SerializeBuffer, _ gopacket.SerializeOptions) error {
	out, err := b.PrependBytes(len(r))
	if err != nil {
		return err
	}
	copy(out, r)
	return nil
}

func (r RawLayer) LayerType() gopacket.LayerType { return gopacket.LayerTypePayload }

// Policy verdicts (VERDICT_* in bpf/common.h).
const (
	Allow = uint8(bpf.CtdVerdictVERDICT_ALLOW)
	Deny  = uint8(bpf.CtdVerdictVERDICT_DENY)
)

// DenyIn is a config default verdict denying dir and allowing the other.
func DenyIn(dir bpf.Direction) [2]uint8 {
	var v [2]uint8
	v[dir] = Deny
	return v
}

// SetDefault sets the default verdict of a direction (Allow, Deny),
// keeping the other fields of the configuration.
func (d *Datapath) SetDefault(tb testing.TB, dir bpf.Direction, verdict uint8) {
	tb.Helper()
	if err := d.Config().Update(func(c *config.Values) { c.DefaultVerdict[dir] = verdict }); err != nil {
		tb.Fatal(err)
	}
}

// Revoke judges every flow again against the policy in force (as 'ctd ct
// revoke' does) and returns how many it revoked and kept.
func (d *Datapath) Revoke(tb testing.TB) (revoked, kept int) {
	tb.Helper()
	rv, err := d.ct.NewRevoker(d.Policy(), d.ByName()[loader.ConfigMap])
	if err != nil {
		tb.Fatal(err)
	}
	defer rv.Close()
	res, err := conntrack.Revoke(d.ct, rv, conntrack.Filter{})
	if err != nil {
		tb.Fatal(err)
	}
	return res.Revoked, res.Kept
}

// MapState is the content of maps, by name, raw: every key and value in
// hex, the per-CPU values of every CPU. Ring buffers are left out (read
// them as an event stream).
type MapState map[string]map[string]string

// State reads maps as MapState.
func State(tb testing.TB, maps map[string]*ebpf.Map) MapState {
	tb.Helper()
	s := MapState{}
	for name, m := range maps {
		if m.Type() == ebpf.RingBuf || m.Type() == ebpf.SkStorage {
			continue
		}
		s[name] = dump(tb, m)
	}
	return s
}

func dump(tb testing.TB, m *ebpf.Map) map[string]string {
	tb.Helper()
	out := map[string]string{}
	var k []byte
	it := m.Iterate()
	switch m.Type() {
	case ebpf.PerCPUArray, ebpf.PerCPUHash, ebpf.LRUCPUHash:
		var v [][]byte
		for it.Next(&k, &v) {
			out[fmt.Sprintf("%x", k)] = fmt.Sprintf("%x", v)
		}
	default:
		var v []byte
		for it.Next(&k, &v) {
			out[fmt.Sprintf("%x", k)] = fmt.Sprintf("%x", v)
		}
	}
	if err := it.Err(); err != nil {
		tb.Fatalf("dump %v: %v", m, err)
	}
	return out
}

// SelfCgroup returns the cgroup v2 id and path (below the mount) of the
// calling process: the owner BPF_PROG_TEST_RUN's egress packets get, their
// socket being one of this process without owner storage (bpf/owner.h).
func SelfCgroup(tb testing.TB) (uint64, string) {
	tb.Helper()
	root, err := cgroupv2.Mount()
	if err != nil {
		tb.Fatal(err)
	}
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		tb.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rel, ok := strings.CutPrefix(line, "0::"); ok {
			id, err := cgroupv2.ID(filepath.Join(root, rel))
			if err != nil {
				tb.Fatal(err)
			}
			return id, rel
		}
	}
	tb.Fatal("/proc/self/cgroup has no cgroup v2 line")
	return 0, ""
}
