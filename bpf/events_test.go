package bpf_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/mapinfo"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

// The datapath writes events only while a consumer is registered in
// evlisten_v1: with nobody listening, new flows reserve nothing in the ring
// and count nothing as lost, however many there are; with a consumer that
// does not read, the ring fills and the rest is counted lost; a lapsed
// registration is nobody.
func TestEventsOnlyWithListener(t *testing.T) {
	d := dptest.New(t)
	const flows = 100 // flow-new events of 112 bytes: more than the 4 KiB ring holds
	next := 0
	newFlows := func() {
		t.Helper()
		for range flows {
			src := netip.AddrPortFrom(netip.MustParseAddr("198.51.100.1"), uint16(10000+next))
			next++
			if v := d.Run(t, egress, dptest.TCP(t, src, netip.MustParseAddrPort("203.0.113.7:80"), dptest.SYN, nil)); v != dptest.Pass {
				t.Fatalf("SYN %d: verdict %s", next, dptest.VerdictName(v))
			}
		}
	}
	pending := func() uint64 {
		t.Helper()
		n, err := mapinfo.Count(d.Events())
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	listen := func(until time.Duration) {
		t.Helper()
		if err := d.Listener().Put(uint32(0), bpf.CtdEvlisten{Until: uint64(until), Pid: 1}); err != nil {
			t.Fatal(err)
		}
	}
	lost, created := dptest.Key{Dir: egress, Reason: metricsmap.EventsLost}, dptest.Key{Dir: egress, Reason: metricsmap.CTCreated}

	newFlows()
	if p, m := pending(), d.Counters(t); p != 0 || m[lost] != 0 || m[created] != flows {
		t.Fatalf("no consumer, %d new flows: %d bytes in the ring, %d events lost, %d created; want 0, 0, %d", flows, p, m[lost], m[created], flows)
	}

	listen(ctmap.Now().Mono() + time.Minute)
	newFlows()
	held, lostWith := pending(), d.Counters(t)[lost]
	if held == 0 || lostWith == 0 || lostWith >= flows {
		t.Fatalf("a consumer that does not read, %d new flows: %d bytes in the ring, %d lost; want some written and the rest lost", flows, held, lostWith)
	}

	listen(ctmap.Now().Mono() - time.Second) // lapsed
	newFlows()
	if p, l := pending(), d.Counters(t)[lost]; p != held || l != lostWith {
		t.Fatalf("lapsed registration: %d bytes in the ring, %d lost; want %d and %d as before", p, l, held, lostWith)
	}
}
