package conntrack

import (
	"encoding/json"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/control/ifnames"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

func TestParseFilter(t *testing.T) {
	for _, tc := range []struct {
		proto, addr, port string
		want              Filter
		wantErr           string // substring; the bad value must be named
	}{
		{want: Filter{}},
		{proto: "tcp", want: Filter{Proto: unix.IPPROTO_TCP}},
		{proto: "UDP", want: Filter{Proto: unix.IPPROTO_UDP}},
		{proto: "icmpv6", want: Filter{Proto: unix.IPPROTO_ICMPV6}},
		{proto: "sctp", want: Filter{Proto: unix.IPPROTO_SCTP}},
		{proto: "47", want: Filter{Proto: 47}},
		{proto: "gre", want: Filter{Proto: 47}},
		{proto: "SCTP", want: Filter{Proto: unix.IPPROTO_SCTP}},
		{addr: "198.51.100.1", want: Filter{Addr: netip.MustParseAddr("198.51.100.1")}},
		{addr: "::ffff:198.51.100.1", want: Filter{Addr: netip.MustParseAddr("198.51.100.1")}},
		{addr: "fd00:c7d::2", want: Filter{Addr: netip.MustParseAddr("fd00:c7d::2")}},
		{port: "8080", want: Filter{Port: 8080}},
		{port: "65535", want: Filter{Port: 65535}},
		{proto: "sctpx", wantErr: `invalid --proto "sctpx"`},
		{proto: "0", wantErr: `invalid --proto "0"`},
		{proto: "256", wantErr: `invalid --proto "256"`},
		{addr: "198.51.100", wantErr: `invalid --addr "198.51.100"`},
		{addr: "fe80::1%eth0", wantErr: `invalid --addr "fe80::1%eth0"`},
		{addr: "198.51.100.0/24", wantErr: `invalid --addr "198.51.100.0/24"`},
		{port: "0", wantErr: `invalid --port "0"`},
		{port: "65536", wantErr: `invalid --port "65536"`},
		{port: "-1", wantErr: `invalid --port "-1"`},
		{port: "http", wantErr: `invalid --port "http"`},
	} {
		got, err := ParseFilter(tc.proto, tc.addr, tc.port)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || strings.Contains(err.Error(), "\n") {
				t.Errorf("ParseFilter(%q, %q, %q) = %v, want one-line error containing %q", tc.proto, tc.addr, tc.port, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseFilter(%q, %q, %q) = %+v, %v, want %+v", tc.proto, tc.addr, tc.port, got, err, tc.want)
		}
	}
}

var (
	a4 = netip.MustParseAddr("198.51.100.1")
	b4 = netip.MustParseAddr("198.51.100.2")
	a6 = netip.MustParseAddr("fd00:c7d::1")
	b6 = netip.MustParseAddr("fd00:c7d::2")
)

// testFlows are distinct flows; the originator is first.
var testFlows = []ctmap.Flow{
	{Proto: unix.IPPROTO_TCP, Src: a4, Sport: 40000, Dst: b4, Dport: 8080},
	{Proto: unix.IPPROTO_TCP, Src: b4, Sport: 40001, Dst: a4, Dport: 22},
	{Proto: unix.IPPROTO_UDP, Src: a4, Sport: 53000, Dst: b4, Dport: 53},
	{Proto: unix.IPPROTO_UDP, Src: a6, Sport: 53001, Dst: b6, Dport: 8080},
	{Proto: unix.IPPROTO_ICMP, Src: a4, Sport: 77, Dst: b4},
	{Proto: unix.IPPROTO_ICMPV6, Src: b6, Sport: 78, Dst: a6},
	{Proto: 47, Src: b4, Dst: a4},
}

func TestFilterMatch(t *testing.T) {
	for _, tc := range []struct {
		f    Filter
		want []int // indexes into testFlows
	}{
		{Filter{}, []int{0, 1, 2, 3, 4, 5, 6}},
		{Filter{Proto: unix.IPPROTO_TCP}, []int{0, 1}},
		{Filter{Proto: 47}, []int{6}},
		{Filter{Addr: a4}, []int{0, 1, 2, 4, 6}},
		{Filter{Addr: b6}, []int{3, 5}},
		{Filter{Port: 8080}, []int{0, 3}},
		{Filter{Port: 78}, []int{5}},
		{Filter{Proto: unix.IPPROTO_UDP, Port: 8080}, []int{3}},
		{Filter{Proto: unix.IPPROTO_UDP, Addr: a4, Port: 8080}, nil},
		{Filter{Addr: a4, Port: 22}, []int{1}},
	} {
		var got []int
		for i, fl := range testFlows {
			if tc.f.Match(fl) {
				got = append(got, i)
			}
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%+v matches flows %v, want %v", tc.f, got, tc.want)
		}
	}
}

func TestFlagNames(t *testing.T) {
	for _, tc := range []struct {
		f    uint8
		want []string
	}{
		{0, []string{}},
		{ctmap.FlagOpenedIngress, []string{"opened_ingress"}},
		{ctmap.FlagPickup | ctmap.FlagRelated, []string{"pickup", "related"}},
		{ctmap.FlagRelated | 0x80, []string{"related", "0x80"}},
	} {
		if got := FlagNames(tc.f); !slices.Equal(got, tc.want) {
			t.Errorf("FlagNames(%#x) = %q, want %q", tc.f, got, tc.want)
		}
	}
}

func TestRowJSONKeys(t *testing.T) {
	fl := testFlows[0]
	fl.FirstSeen, fl.LastSeen = time.Second, 2*time.Second
	b, err := json.Marshal(RowOf(fl, ctmap.Now(), ifnames.New(), nil))
	if err != nil {
		t.Fatal(err)
	}
	var obj map[string]any
	if err := json.Unmarshal(b, &obj); err != nil {
		t.Fatal(err)
	}
	want := []string{"proto", "src", "sport", "dst", "dport", "state", "packets_orig", "bytes_orig",
		"packets_reply", "bytes_reply", "first_seen", "last_seen", "iface", "src_identity", "dst_identity", "flags"}
	for _, k := range want {
		if _, ok := obj[k]; !ok {
			t.Errorf("row %s lacks key %q", b, k)
		}
	}
	if len(obj) != len(want) {
		t.Errorf("row %s has %d keys, want %d", b, len(obj), len(want))
	}
	for _, k := range []string{"first_seen", "last_seen"} {
		if _, err := time.Parse(time.RFC3339Nano, obj[k].(string)); err != nil {
			t.Errorf("%s = %v: not RFC 3339: %v", k, obj[k], err)
		}
	}
	first, _ := time.Parse(time.RFC3339Nano, obj["first_seen"].(string))
	last, _ := time.Parse(time.RFC3339Nano, obj["last_seen"].(string))
	if d := last.Sub(first); d != time.Second {
		t.Errorf("last_seen - first_seen = %v, want 1s", d)
	}
}

// newTable creates an unpinned conntrack table with the datapath's layout
// and fills it with testFlows.
func newTable(t *testing.T) *ctmap.Map {
	t.Helper()
	ct := newEmptyTable(t, 64)
	for i, fl := range testFlows {
		k, origIsB := ctmap.KeyOf(fl.Proto, fl.Src, fl.Sport, fl.Dst, fl.Dport)
		e := ctmap.Entry{PacketsOrig: uint64(i + 1), State: uint8(ctmap.StateEstablished)}
		if origIsB {
			e.OrigIsB = 1
		}
		if err := ct.Put(&k, &e); err != nil {
			t.Fatal(err)
		}
	}
	return ct
}

// newEmptyTable creates an unpinned, empty conntrack table of size entries
// with the datapath's layout.
func newEmptyTable(t *testing.T, size uint32) *ctmap.Map {
	t.Helper()
	nettest.RequireRoot(t)
	ct, closeCT, err := loader.NewConntrack(loader.Options{CTMax: size})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(closeCT)
	return ct
}

func flowIndexes(t *testing.T, m *ctmap.Map, f Filter) []int {
	t.Helper()
	var got []int
	err := List(m, f, func(fl ctmap.Flow) error {
		got = append(got, int(fl.PacketsOrig)-1)
		// The originator must survive the canonical key.
		want := testFlows[fl.PacketsOrig-1]
		if fl.Src != want.Src || fl.Sport != want.Sport || fl.Dst != want.Dst || fl.Dport != want.Dport {
			t.Errorf("flow %d listed as %s:%d -> %s:%d, want %s:%d -> %s:%d", fl.PacketsOrig-1,
				fl.Src, fl.Sport, fl.Dst, fl.Dport, want.Src, want.Sport, want.Dst, want.Dport)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	return got
}

func TestListAndFlush(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flush Filter
		want  []int // flows left
	}{
		{"all", Filter{}, nil},
		{"udp", Filter{Proto: unix.IPPROTO_UDP}, []int{0, 1, 4, 5, 6}},
		{"addr", Filter{Addr: b6}, []int{0, 1, 2, 4, 6}},
		{"port", Filter{Port: 8080}, []int{1, 2, 4, 5, 6}},
		{"none", Filter{Proto: unix.IPPROTO_SCTP}, []int{0, 1, 2, 3, 4, 5, 6}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newTable(t)
			if got := flowIndexes(t, m, Filter{}); len(got) != len(testFlows) {
				t.Fatalf("listed flows %v, want all %d", got, len(testFlows))
			}
			n, err := Flush(m, tc.flush)
			if err != nil {
				t.Fatal(err)
			}
			if want := len(testFlows) - len(tc.want); n != want {
				t.Errorf("Flush(%+v) deleted %d, want %d", tc.flush, n, want)
			}
			if got := flowIndexes(t, m, Filter{}); !slices.Equal(got, tc.want) {
				t.Errorf("after Flush(%+v) flows %v remain, want %v", tc.flush, got, tc.want)
			}
		})
	}
}

func TestListStopsAtError(t *testing.T) {
	m := newTable(t)
	calls := 0
	stop := os.ErrClosed
	err := List(m, Filter{}, func(ctmap.Flow) error { calls++; return stop })
	if err != stop || calls != 1 {
		t.Errorf("List returned %v after %d calls, want %v after 1", err, calls, stop)
	}
}

func TestLine(t *testing.T) {
	fl := testFlows[0]
	fl.State = ctmap.StateEstablished
	fl.PacketsOrig, fl.BytesOrig, fl.PacketsReply, fl.BytesReply = 5, 400, 4, 300
	fl.SrcIdentity, fl.DstIdentity, fl.Ifindex = 2, 2, 1
	fl.Flags = ctmap.FlagOpenedIngress
	want := "tcp ESTABLISHED src=198.51.100.1 dst=198.51.100.2 sport=40000 dport=8080 packets=5 bytes=400 | packets=4 bytes=300 id=2->2 iface=lo flags=opened_ingress"
	if got := Line(fl, ifnames.New(), nil); got != want {
		t.Errorf("Line =\n%s\nwant\n%s", got, want)
	}
}
