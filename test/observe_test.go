package test

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
	"github.com/ctd-dev/ctd/test/nettest"
)

// obsCLI runs the ctd binary against one pin path in the test's own
// namespace: maps, metrics and ct gc touch no interface.
func obsCLI(t *testing.T, bin, pin string, args ...string) cliResult {
	t.Helper()
	return runCmd(t, exec.Command(bin, append([]string{"--pin-path", pin}, args...)...))
}

func obsMust(t *testing.T, bin, pin string, args ...string) string {
	t.Helper()
	r := obsCLI(t, bin, pin, args...)
	if r.exitCode != 0 {
		t.Fatalf("ctd %s: exit %d\nstderr: %s", strings.Join(args, " "), r.exitCode, r.stderr)
	}
	return r.stdout
}

// putFlows adds n UDP entries to the conntrack table, last seen at lastSeen.
func putFlows(t *testing.T, ct *ctmap.Map, first, n int, lastSeen time.Duration) {
	t.Helper()
	keys := make([]ctmap.Key, n)
	vals := make([]ctmap.Entry, n)
	for i := range n {
		j := first + i
		keys[i], _ = ctmap.KeyOf(unix.IPPROTO_UDP, netip.AddrFrom4([4]byte{203, 0, 113, byte(j / 50000)}), uint16(10000+j%50000),
			netip.MustParseAddr("198.51.100.53"), 53)
		vals[i] = ctmap.Entry{PacketsOrig: 1, FirstSeen: uint64(lastSeen), LastSeen: uint64(lastSeen), State: uint8(ctmap.StateNew)}
	}
	if err := ct.PutBatch(keys, vals); err != nil {
		t.Fatal(err)
	}
}

// mapsJSON runs `ctd maps -o json`, checks every object's keys and returns
// the objects by name, and stderr.
func mapsJSON(t *testing.T, bin, pin string) (map[string]map[string]any, string) {
	t.Helper()
	r := obsCLI(t, bin, pin, "maps", "-o", "json")
	if r.exitCode != 0 {
		t.Fatalf("ctd maps -o json: exit %d: %s", r.exitCode, r.stderr)
	}
	var objs []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &objs); err != nil {
		t.Fatalf("ctd maps -o json is not a JSON array: %v\n%s", err, r.stdout)
	}
	wantKeys := []string{"entries", "fill", "key_size", "max_entries", "memlock", "name", "pin", "type", "value_size"}
	out := map[string]map[string]any{}
	var names []string
	for _, o := range objs {
		var keys []string
		for k := range o {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		if !slices.Equal(keys, wantKeys) {
			t.Errorf("ctd maps -o json object has keys %v, want %v", keys, wantKeys)
		}
		name, _ := o["name"].(string)
		names = append(names, name)
		out[name] = o
	}
	if !slices.Equal(names, loader.MapNames) {
		t.Errorf("ctd maps lists %v, want %v", names, loader.MapNames)
	}
	return out, r.stderr
}

// TestObservabilityCLI drives `ctd maps`, `ctd metrics` and `ctd ct gc`
// against a datapath whose traffic and table contents the test controls:
// frames through the pinned programs (Program.Run) and entries put with
// known timestamps.
func TestObservabilityCLI(t *testing.T) {
	bin := nettest.BuildCtd(t)
	pin := nettest.PinPath(t)
	dp := dptest.Load(t, pin)
	ct := dp.Maps.Conntrack()
	ctMax := int(dp.Maps.CT4().MaxEntries())

	// ctd maps: exactly N after N inserts, at every step.
	for _, n := range []int{0, 1, 1000, 3000} {
		if have, err := ct.Count(); err != nil || have > n {
			t.Fatalf("table holds %d (%v), more than %d", have, err, n)
		} else {
			putFlows(t, ct, have, n-have, ctmap.Now().Mono())
		}
		maps, stderr := mapsJSON(t, bin, pin)
		got := maps["ct4_v2"]
		if got["entries"] != float64(n) || got["type"] != "lru_hash" || got["max_entries"] != float64(ctMax) ||
			got["fill"] != 100*float64(n)/float64(ctMax) || got["pin"] != pin+"/ct4_v2" {
			t.Errorf("after %d inserts ctd maps says %v", n, got)
		}
		if stderr != "" {
			t.Errorf("after %d inserts, unexpected stderr %q", n, stderr)
		}
	}
	// Above 80% full: a warning on stderr, in both formats.
	putFlows(t, ct, 3000, 500, ctmap.Now().Mono()) // 3500 of 4096: 85.4%
	_, stderr := mapsJSON(t, bin, pin)
	if !strings.Contains(stderr, "warning: map ct4_v2 is 85.4% full (3500 of 4096 entries)") {
		t.Errorf("ctd maps at 85%% full: stderr %q", stderr)
	}
	text := obsCLI(t, bin, pin, "maps")
	if !strings.Contains(text.stderr, "warning: map ct4_v2 is 85.4% full") || !strings.Contains(text.stdout, "total") {
		t.Errorf("ctd maps (text):\n%s\nstderr: %s", text.stdout, text.stderr)
	}
	t.Logf("ctd maps:\n%s", text.stdout)

	// ctd ct gc: 3500 entries; expire 1200 of them by giving them an old
	// last_seen, and run a pass with a UDP NEW lifetime of 10s.
	putFlows(t, ct, 0, 1200, ctmap.Now().Mono()-time.Minute)
	var res struct {
		Scanned, Deleted, Refreshed, Vanished int
		Duration                              float64 `json:"duration_seconds"`
	}
	out := obsMust(t, bin, pin, "ct", "gc", "-o", "json", "--ct-lifetime-udp-new", "10s")
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("ct gc -o json: %v\n%s", err, out)
	}
	if res.Scanned != 3500 || res.Deleted != 1200 || res.Duration <= 0 {
		t.Errorf("ct gc: %+v, want 3500 scanned, 1200 deleted", res)
	}
	if n, err := ct.Count(); err != nil || n != 2300 {
		t.Errorf("after ct gc the table holds %d entries (%v), want 2300", n, err)
	}
	gcText := obsMust(t, bin, pin, "ct", "gc")
	if !strings.HasPrefix(gcText, "scanned 2300, deleted 0, duration ") {
		t.Errorf("ct gc printed %q", gcText)
	}
	t.Logf("ctd ct gc: %s", gcText)

	// ctd metrics: exactly the frames sent through the pinned programs.
	dp.SetDefault(t, bpf.Ingress, 2)
	a, b := netip.MustParseAddrPort("198.51.100.1:41000"), netip.MustParseAddrPort("198.51.100.2:80")
	syn := dptest.TCP(t, a, b, dptest.SYN, nil)
	synack := dptest.TCP(t, b, a, dptest.SYN|dptest.ACK, nil)
	data := dptest.TCP(t, a, b, dptest.ACK|dptest.PSH, make([]byte, 700))
	denied := dptest.TCP(t, netip.MustParseAddrPort("203.0.113.7:5555"), netip.MustParseAddrPort("198.51.100.1:22"), dptest.SYN, nil)
	for _, f := range []struct {
		dir   bpf.Direction
		frame []byte
	}{{bpf.Egress, syn}, {bpf.Ingress, synack}, {bpf.Egress, data}, {bpf.Ingress, denied}} {
		dp.Run(t, f.dir, f.frame)
	}
	want := map[string][2]uint64{
		"egress/forwarded/new":          {1, uint64(len(syn))},
		"ingress/forwarded/established": {1, uint64(len(synack))},
		"egress/forwarded/established":  {1, uint64(len(data))},
		"ingress/dropped/policy":        {1, uint64(len(denied))},
		"egress/counter/ct-created":     {1, 0},
		"egress/counter/ct-confirmed":   {1, 0}, // by the ACK after the SYN/ACK
	}
	var rows []struct {
		Dir, Kind, Reason string
		Packets, Bytes    uint64
	}
	out = obsMust(t, bin, pin, "metrics", "-o", "json")
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("metrics -o json: %v\n%s", err, out)
	}
	if len(rows) != 2*len(metricsmap.Reasons) {
		t.Errorf("ctd metrics -o json has %d rows, want %d", len(rows), 2*len(metricsmap.Reasons))
	}
	for _, r := range rows {
		k := fmt.Sprintf("%s/%s/%s", r.Dir, r.Kind, r.Reason)
		if got := [2]uint64{r.Packets, r.Bytes}; got != want[k] {
			t.Errorf("ctd metrics: %s = %d packets %d bytes, want %v", k, r.Packets, r.Bytes, want[k])
		}
	}
	metricsText := obsMust(t, bin, pin, "metrics")
	if !strings.Contains(metricsText, "ingress  dropped    policy") {
		t.Errorf("ctd metrics (text):\n%s", metricsText)
	}
	t.Logf("ctd metrics:\n%s", metricsText)
}
