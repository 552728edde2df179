package conntrack

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/ctd-dev/ctd/control/ifnames"
	"github.com/ctd-dev/ctd/datapath/cgroupv2"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

func comm(t *testing.T, s string) ctmap.Comm {
	t.Helper()
	c, ok := ctmap.CommOf(s)
	if !ok {
		t.Fatalf("CommOf(%q) refused", s)
	}
	return c
}

// ownedFlows are testFlows[:4] with owners: two of nginx in cgroup 7, one
// of curl in cgroup 8, one forwarded (none).
func ownedFlows(t *testing.T) []ctmap.Flow {
	fl := append([]ctmap.Flow(nil), testFlows[:4]...)
	fl[0].Pid, fl[0].Comm, fl[0].CgroupID = 10, comm(t, "nginx"), 7
	fl[1].Pid, fl[1].Comm, fl[1].CgroupID = 10, comm(t, "nginx"), 7
	fl[2].Pid, fl[2].Comm, fl[2].CgroupID = 20, comm(t, "curl"), 8
	return fl
}

func TestFilterMatchOwner(t *testing.T) {
	flows := ownedFlows(t)
	for _, tc := range []struct {
		f    Filter
		want []int
	}{
		{Filter{Comm: comm(t, "nginx")}, []int{0, 1}},
		{Filter{Comm: comm(t, "curl")}, []int{2}},
		{Filter{Comm: comm(t, "ngin")}, nil},
		{Filter{CgroupID: 8}, []int{2}},
		{Filter{CgroupID: 7, Port: 22}, []int{1}},
		{Filter{CgroupID: 9}, nil},
	} {
		var got []int
		for i, fl := range flows {
			if tc.f.Match(fl) {
				got = append(got, i)
			}
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%+v matches flows %v, want %v", tc.f, got, tc.want)
		}
	}
}

func TestParseOwner(t *testing.T) {
	root, err := cgroupv2.Mount()
	if err != nil {
		t.Fatal(err)
	}
	rootID, err := cgroupv2.ID(root)
	if err != nil {
		t.Fatal(err)
	}
	var f Filter
	if err := f.ParseOwner("nginx", "/"); err != nil {
		t.Fatal(err)
	}
	if f.Comm != comm(t, "nginx") || f.CgroupID != rootID {
		t.Errorf("ParseOwner(nginx, /) = %+v, want comm nginx and cgroup %d", f, rootID)
	}
	for _, tc := range []struct{ comm, cgroup, want string }{
		{"sixteen-bytes-xx", "", `invalid --comm "sixteen-bytes-xx": valid is a command name of 1 to 15 bytes`},
		{"", "system.slice", `invalid --cgroup "system.slice": valid is a cgroup's path below ` + root + " starting with /"},
		{"", "/no-such-cgroup-ctd", `invalid --cgroup "/no-such-cgroup-ctd": no such cgroup below ` + root},
	} {
		var f Filter
		err := f.ParseOwner(tc.comm, tc.cgroup)
		if err == nil || !strings.HasPrefix(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("ParseOwner(%q, %q) = %v, want one line starting %q", tc.comm, tc.cgroup, err, tc.want)
		}
	}
}

func TestLineOwner(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "system.slice", "web.service")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	id, err := cgroupv2.ID(dir)
	if err != nil {
		t.Fatal(err)
	}
	fl := testFlows[0]
	fl.State = ctmap.StateEstablished
	fl.SrcIdentity, fl.DstIdentity, fl.Ifindex = 2, 2, 1
	fl.Pid, fl.Comm, fl.CgroupID, fl.RTT = 812, comm(t, "curl"), id, 20113
	want := "tcp ESTABLISHED src=198.51.100.1 dst=198.51.100.2 sport=40000 dport=8080 packets=0 bytes=0 | packets=0 bytes=0 id=2->2 iface=lo pid=812 comm=curl cgroup=/system.slice/web.service rtt=20.113ms"
	if got := Line(fl, ifnames.New(), cgroupv2.NewNames(root)); got != want {
		t.Errorf("Line =\n%s\nwant\n%s", got, want)
	}
	// A cgroup gone, and no resolver: the id.
	if got := Line(fl, ifnames.New(), nil); !strings.Contains(got, " cgroup=id:") {
		t.Errorf("Line without a resolver = %s, want cgroup=id:N", got)
	}
	row := RowOf(fl, ctmap.Now(), ifnames.New(), cgroupv2.NewNames(root))
	if row.Pid != 812 || row.Comm != "curl" || row.Cgroup != "/system.slice/web.service" || row.CgroupID != id || row.RTT != 20113 {
		t.Errorf("RowOf = %+v, want the owner and rtt_us 20113", row)
	}
}

func TestTallyOwner(t *testing.T) {
	tally, err := NewTally(ByComm, ByCgroup)
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		for _, fl := range ownedFlows(t) {
			tally.Add(fl)
		}
	}
	got := tally.Tables(0, ifnames.New(), nil)
	want := []TopTable{
		{By: ByComm, Total: 20, Rows: []TopRow{{"nginx", 10, .5}, {NoOwner, 5, .25}, {"curl", 5, .25}}},
		{By: ByCgroup, Total: 20, Rows: []TopRow{{"id:7", 10, .5}, {NoOwner, 5, .25}, {"id:8", 5, .25}}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Tables = %v, want %v", got, want)
	}
}
