package metrics_test

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/control/gc"
	"github.com/ctd-dev/ctd/control/mapinfo"
	"github.com/ctd-dev/ctd/control/metrics"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
	"github.com/ctd-dev/ctd/test/nettest"
)

// scrape GETs url and returns every sample as `name{label="value",...}`
// (labels sorted) → value; summaries contribute name_sum and name_count.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse scrape: %v", err)
	}
	out := map[string]float64{}
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			slices.Sort(ls)
			key := name
			if len(ls) > 0 {
				key += "{" + strings.Join(ls, ",") + "}"
			}
			switch {
			case m.Counter != nil:
				out[key] = m.Counter.GetValue()
			case m.Gauge != nil:
				out[key] = m.Gauge.GetValue()
			case m.Summary != nil:
				out[name+"_sum"] = m.Summary.GetSampleSum()
				out[name+"_count"] = float64(m.Summary.GetSampleCount())
			case m.Untyped != nil:
				out[key] = m.Untyped.GetValue()
			}
		}
	}
	return out
}

// TestScrape sends traffic through the datapath and scrapes the handler.
func TestScrape(t *testing.T) {
	pin := nettest.PinPath(t)
	dp := dptest.Load(t, pin)
	dp.Listen(t) // so that the events are written: they fill events_v2
	dp.SetDefault(t, bpf.Ingress, 2)

	a, b := netip.MustParseAddrPort("198.51.100.1:40000"), netip.MustParseAddrPort("198.51.100.2:80")
	syn := dptest.TCP(t, a, b, dptest.SYN, nil)
	synack := dptest.TCP(t, b, a, dptest.SYN|dptest.ACK, nil)
	data := dptest.TCP(t, a, b, dptest.ACK|dptest.PSH, make([]byte, 500))
	denied := dptest.TCP(t, netip.MustParseAddrPort("203.0.113.5:1234"), netip.MustParseAddrPort("198.51.100.1:22"), dptest.SYN, nil)
	dp.Run(t, bpf.Egress, syn)
	dp.Run(t, bpf.Ingress, synack)
	dp.Run(t, bpf.Egress, data)
	dp.Run(t, bpf.Ingress, denied)
	dp.Run(t, bpf.Ingress, denied)

	maps, err := mapinfo.Of(&dp.Maps, pin)
	if err != nil {
		t.Fatal(err)
	}
	gcStats := func() gc.Stats {
		return gc.Stats{Runs: 3, Errors: 1, Wakes: 2, Scanned: 30, Deleted: 7, Refreshed: 1,
			Duration: 1500 * time.Millisecond, Interval: 20 * time.Second, Entries: 1}
	}
	// The census as a GC pass fills it: with the table's one flow.
	census := conntrack.NewTopCensus(conntrack.CensusN, conntrack.CensusBys...)
	census.Begin()
	if err := conntrack.List(dp.Conntrack(), conntrack.Filter{}, func(fl ctmap.Flow) error {
		census.Add(fl)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	census.End(true)
	c := metrics.NewCollector(metrics.Sources{
		Metrics: metricsmap.New(dp.Maps.Metrics()),
		Maps:    maps,
		Entries: metrics.DatapathEntries(t.Context(), maps, dp.CT4(), dp.CT6(), gcStats),
		GC:      gcStats,
		Top:     census.Tables,
		Attachments: func() ([]attach.Attachment, error) {
			return []attach.Attachment{{Iface: "ctd0", Mode: attach.ModeTCX}, {Iface: "ctd1"}}, nil
		},
		Build: metrics.BuildInfo{Version: "v1.2.3", Revision: "abc", GoVersion: "go1.26"},
	})
	srv := httptest.NewServer(c.Handler())
	defer srv.Close()
	got := scrapeUntil(t, srv.URL+"/metrics", `ctd_map_entries{map="policy_v1",type="hash"}`, `ctd_map_entries{map="ipcache4_v1",type="lpm_trie"}`)

	ctMax := float64(dp.Maps.CT4().MaxEntries())
	for series, want := range map[string]float64{
		`ctd_forwarded_packets_total{direction="egress",reason="new"}`:            1,
		`ctd_forwarded_bytes_total{direction="egress",reason="new"}`:              float64(len(syn)),
		`ctd_forwarded_packets_total{direction="egress",reason="established"}`:    1,
		`ctd_forwarded_bytes_total{direction="egress",reason="established"}`:      float64(len(data)),
		`ctd_forwarded_packets_total{direction="ingress",reason="established"}`:   1,
		`ctd_forwarded_bytes_total{direction="ingress",reason="established"}`:     float64(len(synack)),
		`ctd_forwarded_packets_total{direction="ingress",reason="new"}`:           0,
		`ctd_dropped_packets_total{direction="ingress",reason="policy"}`:          2,
		`ctd_dropped_bytes_total{direction="ingress",reason="policy"}`:            float64(2 * len(denied)),
		`ctd_dropped_packets_total{direction="egress",reason="ct-insert-failed"}`: 0,
		`ctd_conntrack_created_total{direction="egress"}`:                         1,
		`ctd_events_lost_total{direction="ingress"}`:                              0,
		`ctd_events_ratelimited_total{direction="egress"}`:                        0,
		`ctd_map_entries{map="ct4_v2",type="lru_hash"}`:                           1,
		`ctd_map_max_entries{map="ct4_v2",type="lru_hash"}`:                       ctMax,
		`ctd_map_pressure{map="ct4_v2",type="lru_hash"}`:                          1 / ctMax,
		`ctd_map_entries{map="policy_v1",type="hash"}`:                            0,
		`ctd_map_entries{map="ipcache4_v1",type="lpm_trie"}`:                      0,
		`ctd_map_entries{map="metrics_v1",type="percpu_array"}`:                   128,
		`ctd_map_entries{map="events_v2",type="ringbuf"}`:                         3 * (8 + 136), // flow-new, 2 drops
		`ctd_gc_runs_total`:                                                  3,
		`ctd_gc_errors_total`:                                                1,
		`ctd_gc_wakes_total`:                                                 2,
		`ctd_gc_deleted_entries_total`:                                       7,
		`ctd_gc_scanned_entries_total`:                                       30,
		`ctd_gc_refreshed_entries_total`:                                     1,
		`ctd_gc_duration_seconds_sum`:                                        1.5,
		`ctd_gc_duration_seconds_count`:                                      3,
		`ctd_gc_interval_seconds`:                                            20,
		`ctd_conntrack_top_flows{by="dport",value="tcp/80"}`:                 1,
		`ctd_conntrack_top_flows{by="src-identity",value="2"}`:               1,
		`ctd_conntrack_top_flows{by="state",value="ESTABLISHED"}`:            1,
		`ctd_conntrack_top_flows{by="proto",value="tcp"}`:                    1,
		`ctd_interface_attached{iface="ctd0",mode="tcx"}`:                    1,
		`ctd_interface_attached{iface="ctd1",mode="none"}`:                   0,
		`ctd_build_info{goversion="go1.26",revision="abc",version="v1.2.3"}`: 1,
	} {
		v, ok := got[series]
		switch {
		case !ok:
			t.Errorf("series %s missing", series)
		case v != want:
			t.Errorf("%s = %v, want %v", series, v, want)
		}
	}
	if _, ok := got[`ctd_map_pressure{map="config_v1",type="array"}`]; ok {
		t.Error("arrays have no pressure, but config_v1 reports one")
	}
	if _, ok := got[`ctd_map_memlock_bytes{map="ct4_v2",type="lru_hash"}`]; !ok {
		t.Error("ctd_map_memlock_bytes of ct4_v2 missing")
	}
	if _, ok := got["go_goroutines"]; !ok {
		t.Error("Go runtime metrics missing")
	}
}

// scrapeUntil scrapes url until series is in the scrape (the entry counts
// of maps other than the conntrack table come a moment after the first
// scrape asked for them), at most 10s.
// scrapeUntil scrapes until every one of series is exported (the maps are
// counted in the background, one after the other), or 10 s have passed.
func scrapeUntil(t *testing.T, url string, series ...string) map[string]float64 {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		got := scrape(t, url)
		all := true
		for _, s := range series {
			_, ok := got[s]
			all = all && ok
		}
		if all || time.Now().After(deadline) {
			return got
		}
	}
}

// TestScrapeNeverWalksMaps: a scrape takes the conntrack table's entries
// from GC's last pass (none before it) and every other hash map's and LPM
// trie's from counts at most metrics.CountAge old, never counting them
// itself.
func TestScrapeNeverWalksMaps(t *testing.T) {
	pin := nettest.PinPath(t)
	dp := dptest.Load(t, pin)
	dp.Run(t, bpf.Egress, dptest.TCP(t, netip.MustParseAddrPort("198.51.100.1:40000"), netip.MustParseAddrPort("198.51.100.2:80"), dptest.SYN, nil))
	maps, err := mapinfo.Of(&dp.Maps, pin)
	if err != nil {
		t.Fatal(err)
	}
	var stats gc.Stats // no pass yet
	c := metrics.NewCollector(metrics.Sources{
		Maps:    maps,
		Entries: metrics.DatapathEntries(t.Context(), maps, dp.CT4(), dp.CT6(), func() gc.Stats { return stats }),
	})
	srv := httptest.NewServer(c.Handler())
	defer srv.Close()
	const ct, policy = `ctd_map_entries{map="ct4_v2",type="lru_hash"}`, `ctd_map_entries{map="policy_v1",type="hash"}`

	got := scrapeUntil(t, srv.URL, policy)
	if v, ok := got[ct]; ok {
		t.Errorf("before any GC pass %s = %v: the scrape counted the table itself", ct, v)
	}
	if _, ok := got[`ctd_map_max_entries{map="ct4_v2",type="lru_hash"}`]; !ok {
		t.Error("ct4_v2's max entries missing")
	}
	stats = gc.Stats{Runs: 1, Entries: 5, LastEnd: time.Now()} // what the pass left, not what the map holds (1)
	if got := scrape(t, srv.URL); got[ct] != 5 {
		t.Errorf("after a GC pass that left 5 entries, %s = %v, want 5", ct, got[ct])
	}
}

// TestScrapeReportsFailures: a source that fails fails the scrape's series
// without hiding the others.
func TestScrapeReportsFailures(t *testing.T) {
	c := metrics.NewCollector(metrics.Sources{
		Attachments: func() ([]attach.Attachment, error) { return nil, fmt.Errorf("netlink: boom") },
		Build:       metrics.ReadBuildInfo(),
	})
	srv := httptest.NewServer(c.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	body := string(b)
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "ctd_build_info{") {
		t.Errorf("scrape with a failing source: %s\n%s", resp.Status, body)
	}
	if strings.Contains(body, "ctd_interface_attached{") {
		t.Errorf("failed source still produced series:\n%s", body)
	}
}
