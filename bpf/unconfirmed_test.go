package bpf_test

import (
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

// table says which conntrack table holds the flow between src and dst:
// "confirmed", "unconfirmed", "both" or "none".
func table(t *testing.T, d *dptest.Datapath, proto uint8, src, dst netip.AddrPort) string {
	t.Helper()
	k, _ := ctmap.KeyOf(proto, src.Addr(), src.Port(), dst.Addr(), dst.Port())
	c, u, err := d.Conntrack().Where(&k)
	if err != nil {
		t.Fatal(err)
	}
	switch {
	case c && u:
		return "both"
	case c:
		return "confirmed"
	case u:
		return "unconfirmed"
	}
	return "none"
}

// counter is r's packets, both directions.
func counter(t *testing.T, d *dptest.Datapath, r metricsmap.Reason) uint64 {
	t.Helper()
	snap, err := metricsmap.New(d.Metrics()).Read()
	if err != nil {
		t.Fatal(err)
	}
	return snap.Total(r).Packets
}

// TestConfirmation: a flow lives in the unconfirmed table until both sides
// spoke and, for TCP, the handshake completed; then it is promoted, once.
func TestConfirmation(t *testing.T) {
	a := netip.MustParseAddrPort("198.51.100.1:40000")
	b := netip.MustParseAddrPort("203.0.113.7:80")
	type step struct {
		fromA bool
		flags uint8 // TCP only
		want  string
	}
	S, SA, A, PA, FA := dptest.SYN, dptest.SYN|dptest.ACK, dptest.ACK, dptest.PSH|dptest.ACK, dptest.FIN|dptest.ACK
	for _, tc := range []struct {
		name     string
		proto    uint8
		steps    []step
		midMiss  uint64
		promoted uint64
	}{
		{"tcp handshake", unix.IPPROTO_TCP, []step{
			{true, S, "unconfirmed"}, {false, SA, "unconfirmed"}, {true, A, "confirmed"},
			{false, PA, "confirmed"}, {true, FA, "confirmed"},
		}, 0, 1},
		{"tcp refused", unix.IPPROTO_TCP, []step{
			{true, S, "unconfirmed"}, {false, dptest.RST | dptest.ACK, "unconfirmed"},
		}, 0, 0},
		{"tcp syn flood victim", unix.IPPROTO_TCP, []step{
			{true, S, "unconfirmed"}, {false, SA, "unconfirmed"}, {true, S, "unconfirmed"},
		}, 0, 0},
		{"tcp pickup", unix.IPPROTO_TCP, []step{
			{true, PA, "unconfirmed"}, {true, PA, "unconfirmed"}, {false, A, "confirmed"},
		}, 1, 1},
		{"udp", unix.IPPROTO_UDP, []step{
			{true, 0, "unconfirmed"}, {true, 0, "unconfirmed"}, {false, 0, "confirmed"}, {true, 0, "confirmed"},
		}, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := dptest.New(t)
			for i, s := range tc.steps {
				src, dst, dir := a, b, bpf.Egress
				if !s.fromA {
					src, dst, dir = b, a, bpf.Ingress
				}
				frame := dptest.UDP(t, src, dst, dptest.Payload(10))
				if tc.proto == unix.IPPROTO_TCP {
					frame = dptest.TCP(t, src, dst, s.flags, nil)
				}
				if v := d.Run(t, dir, frame); v != dptest.Pass {
					t.Fatalf("step %d: verdict %s, want pass", i, dptest.VerdictName(v))
				}
				if got := table(t, d, tc.proto, a, b); got != s.want {
					t.Fatalf("step %d: the flow is in %s, want %s", i, got, s.want)
				}
			}
			if got := counter(t, d, metricsmap.CTConfirmed); got != tc.promoted {
				t.Errorf("ct-confirmed %d, want %d", got, tc.promoted)
			}
			if got := counter(t, d, metricsmap.CTMidstreamMiss); got != tc.midMiss {
				t.Errorf("ct-midstream-miss %d, want %d", got, tc.midMiss)
			}
			if f := d.Flows(t); len(f) != 1 {
				t.Errorf("%d flows listed, want 1: %+v", len(f), f)
			}
		})
	}
}

// TestFloodEvictsOnlyUnconfirmed fills the unconfirmed table many times
// over with SYNs: every confirmed flow stays and still passes, also under
// ingress default deny where a lost entry would be fatal.
func TestFloodEvictsOnlyUnconfirmed(t *testing.T) {
	d := policyDatapath(t)
	setPolicy(t, d, dptest.DenyIn(ingress), rule{ingress, peerID, unix.IPPROTO_TCP, 80, dptest.Allow})
	server := netip.AddrPortFrom(local, 80)
	var conns []netip.AddrPort
	for i := range 20 {
		c := netip.AddrPortFrom(peer, uint16(30000+i))
		d.Expect(t, ingress, dptest.TCP(t, c, server, dptest.SYN, nil), dptest.Pass, dptest.NewFlow(ingress))
		d.Expect(t, egress, dptest.TCP(t, server, c, dptest.SYN|dptest.ACK, nil), dptest.Pass, dptest.Hit(egress))
		d.Expect(t, ingress, dptest.TCP(t, c, server, dptest.ACK, nil), dptest.Pass, dptest.Hit(ingress))
		conns = append(conns, c)
	}
	unconfMax := d.CT4Unconfirmed().MaxEntries()
	for i := range 10 * unconfMax { // distinct ports: 10 x 256 < 25000
		c := netip.AddrPortFrom(peer, uint16(40000+i))
		if v := d.Run(t, ingress, dptest.TCP(t, c, server, dptest.SYN, nil)); v != dptest.Pass {
			t.Fatalf("flood SYN %d: verdict %s", i, dptest.VerdictName(v))
		}
	}
	for _, c := range conns {
		if got := table(t, d, unix.IPPROTO_TCP, c, server); got != "confirmed" {
			t.Fatalf("after the flood the connection from %v is in %s, want confirmed", c, got)
		}
		// The remote side speaks first after the flood.
		d.Expect(t, ingress, dptest.TCP(t, c, server, dptest.PSH|dptest.ACK, dptest.Payload(10)), dptest.Pass, dptest.Hit(ingress))
	}
	if n := counter(t, d, metricsmap.CTMidstreamMiss); n != 0 {
		t.Errorf("ct-midstream-miss %d after the flood, want 0", n)
	}
}
