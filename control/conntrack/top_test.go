package conntrack

import (
	"net/netip"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/control/ifnames"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// topFlows fills a table with known shares: 60 TCP flows to port 443 from
// identity 100 to 300, 30 UDP flows to port 53 from identity 200 to 300, 10
// ICMP echo flows from identity 300 to itself.
func topTable(t *testing.T) *ctmap.Map {
	t.Helper()
	m := newEmptyTable(t, 1024)
	put := func(i int, proto uint8, dport uint16, src, dst uint32, state ctmap.State) {
		s := netip.AddrFrom4([4]byte{198, 51, 100, byte(i)})
		d := netip.AddrFrom4([4]byte{203, 0, 113, 1})
		sport := uint16(40000 + i)
		k, origIsB := ctmap.KeyOf(proto, s, sport, d, dport)
		e := ctmap.Entry{State: uint8(state), SrcIdentity: src, DstIdentity: dst, Ifindex: 1}
		if origIsB {
			e.OrigIsB = 1
		}
		if err := m.Put(&k, &e); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 100 {
		switch {
		case i < 60:
			put(i, unix.IPPROTO_TCP, 443, 100, 300, ctmap.StateEstablished)
		case i < 90:
			put(i, unix.IPPROTO_UDP, 53, 200, 300, ctmap.StateNew)
		default:
			put(i, unix.IPPROTO_ICMP, 0, 300, 300, ctmap.StateEstablished)
		}
	}
	return m
}

func TestTop(t *testing.T) {
	m := topTable(t)
	for _, tc := range []struct {
		by     By
		n      int
		filter Filter
		want   []TopRow
		total  int
	}{
		{by: BySrcIdentity, want: []TopRow{{"100", 60, .6}, {"200", 30, .3}, {"300", 10, .1}}},
		{by: ByDstIdentity, want: []TopRow{{"300", 100, 1}}},
		// A flow counts once for each distinct identity at its ends.
		{by: ByIdentity, want: []TopRow{{"300", 100, 1}, {"100", 60, .6}, {"200", 30, .3}}},
		{by: ByDport, want: []TopRow{{"tcp/443", 60, .6}, {"udp/53", 30, .3}, {"icmp", 10, .1}}},
		{by: ByProto, want: []TopRow{{"tcp", 60, .6}, {"udp", 30, .3}, {"icmp", 10, .1}}},
		{by: ByState, want: []TopRow{{"ESTABLISHED", 70, .7}, {"NEW", 30, .3}}},
		{by: BySrcIdentity, n: 2, want: []TopRow{{"100", 60, .6}, {"200", 30, .3}}},
		// Shares are of the flows the filter selects.
		{by: BySrcIdentity, filter: Filter{Proto: unix.IPPROTO_UDP}, want: []TopRow{{"200", 30, 1}}, total: 30},
	} {
		t.Run(string(tc.by), func(t *testing.T) {
			got, err := Top(m, tc.filter, tc.by, tc.n, ifnames.New(), nil)
			if err != nil {
				t.Fatal(err)
			}
			total := tc.total
			if total == 0 {
				total = 100
			}
			if got.Total != total {
				t.Errorf("Top total %d, want %d", got.Total, total)
			}
			if !reflect.DeepEqual(got.Rows, tc.want) {
				t.Errorf("Top(--by %s -n %d) = %v, want %v", tc.by, tc.n, got.Rows, tc.want)
			}
		})
	}
}

func TestTopIface(t *testing.T) {
	got, err := Top(topTable(t), Filter{}, ByIface, 0, ifnames.New(), nil)
	if err != nil {
		t.Fatal(err)
	}
	// Every flow was first seen on ifindex 1, the loopback interface.
	if want := []TopRow{{"lo", 100, 1}}; !reflect.DeepEqual(got.Rows, want) {
		t.Errorf("Top(--by iface) = %v, want %v", got.Rows, want)
	}
}

func TestParseBy(t *testing.T) {
	for _, b := range Bys {
		if got, err := ParseBy(string(b)); err != nil || got != b {
			t.Errorf("ParseBy(%q) = %q, %v", b, got, err)
		}
	}
	_, err := ParseBy("owner")
	if err == nil || !strings.Contains(err.Error(), `"owner"`) || !strings.Contains(err.Error(), "src-identity") {
		t.Errorf("ParseBy(owner) = %v, want an error naming the value and the valid ones", err)
	}
}

func TestTopCensus(t *testing.T) {
	c := NewTopCensus(2, BySrcIdentity, ByProto)
	if got := c.Tables(); got != nil {
		t.Errorf("Tables before the first pass = %v, want nil", got)
	}
	m := topTable(t)
	pass := func(ok bool) {
		c.Begin()
		if err := List(m, Filter{}, func(fl ctmap.Flow) error { c.Add(fl); return nil }); err != nil {
			t.Fatal(err)
		}
		c.End(ok)
	}
	want := []TopTable{
		{By: BySrcIdentity, Total: 100, Rows: []TopRow{{"100", 60, .6}, {"200", 30, .3}}},
		{By: ByProto, Total: 100, Rows: []TopRow{{"tcp", 60, .6}, {"udp", 30, .3}}},
	}
	pass(true)
	if got := c.Tables(); !reflect.DeepEqual(got, want) {
		t.Errorf("Tables after a pass = %v, want %v", got, want)
	}
	// A pass that did not read the whole table publishes nothing.
	if _, err := Flush(m, Filter{Proto: unix.IPPROTO_TCP}); err != nil {
		t.Fatal(err)
	}
	pass(false)
	if got := c.Tables(); !reflect.DeepEqual(got, want) {
		t.Errorf("Tables after a failed pass = %v, want the last complete pass's %v", got, want)
	}
	pass(true)
	if got := c.Tables(); got[1].Total != 40 || got[1].Rows[0] != (TopRow{"udp", 30, .75}) {
		t.Errorf("Tables after the flush = %v, want 40 flows, udp first", got)
	}
}

// BenchmarkTallyAdd: what counting one flow costs in the census's
// dimensions without and with the owner's (cgroup, comm), on flows of 50
// owners.
func BenchmarkTallyAdd(b *testing.B) {
	flows := make([]ctmap.Flow, 4096)
	for i := range flows {
		fl := &flows[i]
		fl.Proto, fl.Dport, fl.State, fl.Ifindex = unix.IPPROTO_TCP, uint16(i%100), ctmap.StateEstablished, 2
		fl.SrcIdentity, fl.DstIdentity = uint32(i%300), 2
		fl.CgroupID = uint64(1000 + i%50)
		fl.Comm, _ = ctmap.CommOf("proc" + strconv.Itoa(i%50))
	}
	base := []By{BySrcIdentity, ByDstIdentity, ByDport, ByProto, ByState, ByIface}
	for _, bc := range []struct {
		name string
		bys  []By
	}{{"census-without-owner", base}, {"census", CensusBys}, {"cgroup", []By{ByCgroup}}, {"comm", []By{ByComm}}} {
		b.Run(bc.name, func(b *testing.B) {
			t, err := NewTally(bc.bys...)
			if err != nil {
				b.Fatal(err)
			}
			i := 0
			for b.Loop() {
				t.Add(flows[i%len(flows)])
				i++
			}
		})
	}
}
