package explain_test

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"reflect"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/google/go-cmp/cmp"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/bpf/nodryrun"
	"github.com/ctd-dev/ctd/control/explain"
	"github.com/ctd-dev/ctd/control/ipproto"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/datapath/policymap"
	"github.com/ctd-dev/ctd/test/dptest"
)

func TestParseFlags(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint8
		err  bool
	}{
		{"SYN", explain.SYN, false},
		{"syn,ack", explain.SYN | explain.ACK, false},
		{"PSH+ACK", explain.PSH | explain.ACK, false},
		{"FIN, ACK", explain.FIN | explain.ACK, false},
		{"rst", explain.RST, false},
		{"urg", explain.URG, false},
		{"", 0, true},
		{",", 0, true},
		{"SYN,XMAS", 0, true},
		{"S", 0, true},
	} {
		got, err := explain.ParseFlags(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseFlags(%q) = %#x, %v; want %#x, error %v", tc.in, got, err, tc.want, tc.err)
		}
		if err == nil {
			if back, _ := explain.ParseFlags(explain.FlagsString(got)); back != got {
				t.Errorf("FlagsString(%#x) = %q reads back as %#x", got, explain.FlagsString(got), back)
			}
		}
	}
}

func TestCheck(t *testing.T) {
	v4a, v4b := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.2")
	v6a, v6b := netip.MustParseAddr("fd00:c7d::1"), netip.MustParseAddr("fd00:c7d::2")
	for _, tc := range []struct {
		name string
		p    explain.Packet
		err  string // "" if valid
	}{
		{"tcp", explain.Packet{Proto: ipproto.TCP, Src: v4a, Dst: v4b, Sport: 1, Dport: 80, Flags: explain.SYN}, ""},
		{"udp6", explain.Packet{Proto: ipproto.UDP, Src: v6a, Dst: v6b, Sport: 1, Dport: 53}, ""},
		{"icmp echo id", explain.Packet{Proto: ipproto.ICMP, Src: v4a, Dst: v4b, Sport: 7}, ""},
		{"icmpv6", explain.Packet{Proto: ipproto.ICMPv6, Src: v6a, Dst: v6b}, ""},
		{"gre", explain.Packet{Proto: 47, Src: v4a, Dst: v4b}, ""},
		{"no src", explain.Packet{Proto: ipproto.TCP, Dst: v4b, Dport: 80}, "both --src and --dst are required"},
		{"families", explain.Packet{Proto: ipproto.TCP, Src: v4a, Dst: v6b, Dport: 80}, "--src 198.51.100.1 and --dst fd00:c7d::2 are of different address families: give two IPv4 or two IPv6 addresses"},
		{"icmp on v6", explain.Packet{Proto: ipproto.ICMP, Src: v6a, Dst: v6b}, "icmp is IPv4's: for IPv6 addresses use --proto icmpv6"},
		{"icmpv6 on v4", explain.Packet{Proto: ipproto.ICMPv6, Src: v4a, Dst: v4b}, "icmpv6 is IPv6's: for IPv4 addresses use --proto icmp"},
		{"flags on udp", explain.Packet{Proto: ipproto.UDP, Src: v4a, Dst: v4b, Dport: 53, Flags: explain.SYN}, "--flags SYN: TCP flags go only with --proto tcp, not udp"},
		{"no dport", explain.Packet{Proto: ipproto.SCTP, Src: v4a, Dst: v4b, Sport: 1}, "--dport is required for sctp: a port 1-65535"},
		{"port on gre", explain.Packet{Proto: 47, Src: v4a, Dst: v4b, Dport: 1}, "gre has no ports: --sport and --dport go only with tcp, udp and sctp (--sport is the echo identifier for icmp and icmpv6)"},
		{"dport on icmp", explain.Packet{Proto: ipproto.ICMP, Src: v4a, Dst: v4b, Dport: 1}, "icmp has no ports: --sport and --dport go only with tcp, udp and sctp (--sport is the echo identifier for icmp and icmpv6)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.p.Check()
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tc.err {
				t.Errorf("Check() = %q, want %q", got, tc.err)
			}
			if _, ferr := tc.p.Frame(); (ferr == nil) != (tc.err == "") {
				t.Errorf("Frame() error %v, Check() %q", ferr, tc.err)
			}
		})
	}
}

// Addresses and identities of TestDryRun: a client and a server with
// identities, and a host the ipcache does not know (world).
var (
	client4 = netip.MustParseAddr("198.51.100.10")
	server4 = netip.MustParseAddr("198.51.100.20")
	world4  = netip.MustParseAddr("203.0.113.5")
	client6 = netip.MustParseAddr("fd00:c7d::10")
	server6 = netip.MustParseAddr("fd00:c7d::20")
)

const (
	clientID = 1000
	serverID = 2000
)

// newPolicyDatapath is a datapath with an ipcache, ingress default deny, a
// rule allowing the client to the server's tcp/80, events rate limited and
// a consumer registered, so that every side effect a packet can have is on.
func newPolicyDatapath(t *testing.T) *dptest.Datapath {
	dp := dptest.New(t)
	for a, id := range map[netip.Addr]uint32{client4: clientID, client6: clientID, server4: serverID, server6: serverID} {
		dp.SetIdentity(t, netip.PrefixFrom(a, a.BitLen()), id)
	}
	dp.SetConfig(t, bpf.CtdConfig{DefaultVerdict: dptest.DenyIn(bpf.Ingress), EventsRate: 1000, EventsBurst: 1000})
	pm := policymap.New(dp.Policy(), dp.Config())
	if err := pm.Put(policymap.Rule{Dir: bpf.Ingress, Identity: clientID, Proto: ipproto.TCP, Port: 80, Verdict: policymap.Allow}); err != nil {
		t.Fatal(err)
	}
	dp.Listen(t)
	return dp
}

// events reads the records in the ring buffer until none arrives for a
// while.
func events(t *testing.T, rd *ringbuf.Reader) int {
	t.Helper()
	n := 0
	for {
		rd.SetDeadline(time.Now().Add(50 * time.Millisecond))
		_, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return n
		}
		if err != nil {
			t.Fatalf("read events: %v", err)
		}
		n++
	}
}

func tcp(src netip.Addr, sport uint16, dst netip.Addr, dport uint16, flags uint8) explain.Packet {
	return explain.Packet{Proto: ipproto.TCP, Src: src, Sport: sport, Dst: dst, Dport: dport, Flags: flags}
}

func TestDryRun(t *testing.T) {
	dp := newPolicyDatapath(t)
	rd, err := ringbuf.NewReader(dp.Events())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rd.Close() })
	lo := int(dptest.LoIfindex(t))

	// An established flow, by real packets: client:40001 -> server:80,
	// and one whose handshake lacks its last ACK: client:40002.
	const estPort, halfPort = 40001, 40002
	for _, step := range []struct {
		dir   bpf.Direction
		p     explain.Packet
		count dptest.Counts
	}{
		{bpf.Ingress, tcp(client4, estPort, server4, 80, explain.SYN), dptest.NewFlow(bpf.Ingress)},
		{bpf.Egress, tcp(server4, 80, client4, estPort, explain.SYN|explain.ACK), dptest.Hit(bpf.Egress)},
		{bpf.Ingress, tcp(client4, estPort, server4, 80, explain.ACK), dptest.Hit(bpf.Ingress)},
		{bpf.Ingress, tcp(client4, halfPort, server4, 80, explain.SYN), dptest.NewFlow(bpf.Ingress)},
		{bpf.Egress, tcp(server4, 80, client4, halfPort, explain.SYN|explain.ACK), dptest.Hit(bpf.Egress)},
	} {
		dp.Expect(t, step.dir, frame(t, step.p), dptest.Pass, step.count)
	}
	if n := events(t, rd); n == 0 {
		t.Fatal("the flow's first packet wrote no event: the event stream cannot show a change")
	}

	allowRule := "ingress id=1000 tcp/80 allow"
	cases := []struct {
		name string
		dir  bpf.Direction
		p    explain.Packet
		want explain.Answer
		// real is what the packet does when it runs for real afterwards.
		real dptest.Counts
	}{
		{"allowed by rule", bpf.Ingress, tcp(client4, 40000, server4, 80, explain.SYN),
			explain.Answer{Verdict: "allow", Reason: "new", SrcIdentity: clientID, DstIdentity: serverID, Rule: allowRule, CTState: "new"},
			dptest.NewFlow(bpf.Ingress)},
		{"allowed by rule, IPv6", bpf.Ingress, tcp(client6, 40000, server6, 80, explain.SYN),
			explain.Answer{Verdict: "allow", Reason: "new", SrcIdentity: clientID, DstIdentity: serverID, Rule: allowRule, CTState: "new"},
			dptest.NewFlow(bpf.Ingress)},
		{"denied by default: port", bpf.Ingress, tcp(client4, 40000, server4, 81, explain.SYN),
			explain.Answer{Verdict: "drop", Reason: "policy", SrcIdentity: clientID, DstIdentity: serverID, Rule: "ingress default deny", CTState: "new"},
			dptest.One(dptest.Key{Dir: bpf.Ingress, Reason: metricsmap.DropPolicy})},
		{"denied by default: world", bpf.Ingress, tcp(world4, 40000, server4, 80, explain.SYN),
			explain.Answer{Verdict: "drop", Reason: "policy", SrcIdentity: 2, DstIdentity: serverID, Rule: "ingress default deny", CTState: "new"},
			dptest.One(dptest.Key{Dir: bpf.Ingress, Reason: metricsmap.DropPolicy})},
		{"denied by default: icmpv6", bpf.Ingress, explain.Packet{Proto: ipproto.ICMPv6, Src: client6, Dst: server6, Sport: 9},
			explain.Answer{Verdict: "drop", Reason: "policy", SrcIdentity: clientID, DstIdentity: serverID, Rule: "ingress default deny", CTState: "new"},
			dptest.One(dptest.Key{Dir: bpf.Ingress, Reason: metricsmap.DropPolicy})},
		{"egress: allowed by default", bpf.Egress, explain.Packet{Proto: ipproto.UDP, Src: server4, Sport: 5353, Dst: world4, Dport: 53},
			explain.Answer{Verdict: "allow", Reason: "new", SrcIdentity: serverID, DstIdentity: 2, Rule: "egress default allow", CTState: "new"},
			dptest.NewFlow(bpf.Egress)},
		{"established, originator", bpf.Ingress, tcp(client4, estPort, server4, 80, explain.ACK),
			explain.Answer{Verdict: "allow", Reason: "established", SrcIdentity: clientID, DstIdentity: serverID, CTState: "ESTABLISHED", CTTable: "confirmed", CTFlags: []string{"opened_ingress"}},
			dptest.Hit(bpf.Ingress)},
		{"established, reply", bpf.Egress, tcp(server4, 80, client4, estPort, explain.ACK),
			explain.Answer{Verdict: "allow", Reason: "established", SrcIdentity: serverID, DstIdentity: clientID, CTState: "ESTABLISHED", CTTable: "confirmed", CTFlags: []string{"opened_ingress"}},
			dptest.Hit(bpf.Egress)},
		{"completing a handshake (would promote the flow)", bpf.Ingress, tcp(client4, halfPort, server4, 80, explain.ACK),
			explain.Answer{Verdict: "allow", Reason: "established", SrcIdentity: clientID, DstIdentity: serverID, CTState: "SYN_RECV", CTTable: "unconfirmed", CTFlags: []string{"opened_ingress"}},
			dptest.Hit(bpf.Ingress)},
		{"mid-stream, no entry", bpf.Ingress, tcp(client4, 40003, server4, 80, explain.ACK),
			explain.Answer{Verdict: "allow", Reason: "new", SrcIdentity: clientID, DstIdentity: serverID, Rule: allowRule, CTState: "new"},
			dptest.NewFlow(bpf.Ingress)},
		{"RST, no entry", bpf.Ingress, tcp(client4, 40004, server4, 80, explain.RST),
			explain.Answer{Verdict: "allow", Reason: "new", SrcIdentity: clientID, DstIdentity: serverID, Rule: allowRule, CTState: "new"},
			dptest.One(dptest.Key{Dir: bpf.Ingress, Reason: metricsmap.FwdNew})},
		{"invalid flags", bpf.Ingress, tcp(client4, 40000, server4, 80, explain.SYN|explain.FIN),
			explain.Answer{Verdict: "drop", Reason: "invalid", CTState: "untracked"},
			dptest.One(dptest.Key{Dir: bpf.Ingress, Reason: metricsmap.DropInvalid})},
	}

	// The dry runs, all of them before any of the real runs: they must
	// leave every map and the event stream as they were.
	before := dptest.State(t, dp.ByName())
	for _, tc := range cases {
		prog := dp.CtdIngress
		if tc.dir == bpf.Egress {
			prog = dp.CtdEgress
		}
		r, err := explain.Run(prog, lo, frame(t, tc.p))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		got := explain.AnswerOf(explain.Request{Dir: tc.dir, Packet: tc.p}, r)
		tc.want.Dir = tc.dir.String()
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("%s: answer (-want +got):\n%s", tc.name, diff)
		}
	}
	if diff := cmp.Diff(before, dptest.State(t, dp.ByName())); diff != "" {
		t.Errorf("the dry runs changed maps (-before +after):\n%s", diff)
	}
	if n := events(t, rd); n != 0 {
		t.Errorf("the dry runs wrote %d events", n)
	}

	// The same packets for real: the verdicts the dry runs gave, the
	// counters and the events a packet moves.
	for _, tc := range cases {
		verdict := dptest.Pass
		if tc.want.Verdict == "drop" {
			verdict = dptest.Drop
		}
		dp.Expect(t, tc.dir, frame(t, tc.p), verdict, tc.real)
	}
	if n := events(t, rd); n == 0 {
		t.Error("the real packets wrote no event")
	}
}

// TestDryRunRevoked: a packet of a revoked flow is dropped, and its dry
// run does not refresh the entry as the real packet does.
func TestDryRunRevoked(t *testing.T) {
	dp := newPolicyDatapath(t)
	syn := tcp(client4, 40001, server4, 80, explain.SYN)
	dp.Expect(t, bpf.Ingress, frame(t, syn), dptest.Pass, dptest.NewFlow(bpf.Ingress))
	pm := policymap.New(dp.Policy(), dp.Config())
	if err := pm.Delete(policymap.Rule{Dir: bpf.Ingress, Identity: clientID, Proto: ipproto.TCP, Port: 80}); err != nil {
		t.Fatal(err)
	}
	if revoked, _ := dp.Revoke(t); revoked != 1 {
		t.Fatalf("revoked %d flows, want 1", revoked)
	}
	time.Sleep(10 * time.Millisecond) // a real packet would move last_seen

	ack := tcp(client4, 40001, server4, 80, explain.ACK)
	before := dptest.State(t, dp.ByName())
	r, err := explain.Run(dp.CtdIngress, int(dptest.LoIfindex(t)), frame(t, ack))
	if err != nil {
		t.Fatal(err)
	}
	want := explain.Answer{Dir: "ingress", Verdict: "drop", Reason: "revoked", SrcIdentity: clientID, DstIdentity: serverID,
		CTState: "SYN_SENT", CTTable: "unconfirmed", CTFlags: []string{"opened_ingress", "revoked"}}
	if diff := cmp.Diff(want, explain.AnswerOf(explain.Request{Dir: bpf.Ingress, Packet: ack}, r)); diff != "" {
		t.Errorf("answer (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(before, dptest.State(t, dp.ByName())); diff != "" {
		t.Errorf("the dry run changed maps (-before +after):\n%s", diff)
	}
	dp.Expect(t, bpf.Ingress, frame(t, ack), dptest.Drop, dptest.One(dptest.Key{Dir: bpf.Ingress, Reason: metricsmap.DropRevoked}))
	if diff := cmp.Diff(before, dptest.State(t, dp.ByName())); diff == "" {
		t.Error("the real packet changed no map either: the comparison cannot fail")
	}
}

func frame(t *testing.T, p explain.Packet) []byte {
	t.Helper()
	f, err := p.Frame()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// TestCheckBuild: Check accepts this build's programs and refuses the same
// sources built without the dry run (bpf/nodryrun), as it would an older
// ctd's programs, which would take the packet for real.
func TestCheckBuild(t *testing.T) {
	dp := dptest.New(t)
	for name, p := range map[string]*ebpf.Program{"ctd_ingress": dp.CtdIngress, "ctd_egress": dp.CtdEgress} {
		if err := explain.Check(p, name); err != nil {
			t.Errorf("this build's %s: %v", name, err)
		}
	}
	spec, err := nodryrun.LoadCtd()
	if err != nil {
		t.Fatal(err)
	}
	without := dptest.NewFrom(t, spec)
	var ob *explain.OtherBuildError
	if err := explain.Check(without.CtdIngress, "ctd_ingress"); !errors.As(err, &ob) {
		t.Errorf("a build without the dry run: got %v, want an OtherBuildError", err)
	}
}

// TestResultLayoutAndMagic pins struct explain_result's layout to the
// magic: a program answers in the layout its magic names, so a change of
// one without the other fails here (change the magic in bpf/explain.h,
// then both figures below).
func TestResultLayoutAndMagic(t *testing.T) {
	type layout struct {
		Size     int
		Magic    [2]uint32
		Fields   int
		Reason   uintptr
		CtFlags  uintptr
		RulePort uintptr
	}
	var r bpf.CtdExplainResult
	got := layout{
		Size:     binary.Size(r),
		Magic:    [2]uint32{uint32(bpf.CtdExplainMagicEXPLAIN_MAGIC_LO), uint32(bpf.CtdExplainMagicEXPLAIN_MAGIC_HI)},
		Fields:   reflect.TypeOf(r).NumField(),
		Reason:   unsafe.Offsetof(r.Reason),
		CtFlags:  unsafe.Offsetof(r.CtFlags),
		RulePort: unsafe.Offsetof(r.RulePort),
	}
	want := layout{Size: 20, Magic: [2]uint32{0x6c707865, 0x3a647463}, Fields: 11, Reason: 16, CtFlags: 19, RulePort: 12}
	if got != want {
		t.Errorf("explain_result and its magic: got %+v, want %+v", got, want)
	}
}
