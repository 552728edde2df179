package bench

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/control/gc"
	"github.com/ctd-dev/ctd/control/mapinfo"
	"github.com/ctd-dev/ctd/control/metrics"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
)

// Scrape figures: ScrapeClients concurrent scrapes of the daemon's metrics
// over a conntrack table of ScrapeFlows entries.
const (
	ScrapeClients = 20
	ScrapeFlows   = 1_000_000
	// UnitScrapeCPU is the process CPU time (user and system) per scrape.
	UnitScrapeCPU = "cpu-ms/scrape"
)

// cpuTime is the CPU time the process has used so far.
func cpuTime(tb testing.TB) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkScrape measures the CPU a metrics scrape costs with a million
// conntrack entries, ScrapeClients scrapes at a time, reported in
// UnitScrapeCPU. "daemon" is the daemon's collector: the conntrack table's
// entries from GC's last pass, the other maps' from counts kept in the
// background (their cost is in the figure when it falls into the run).
// "count-per-scrape" counts every map on every scrape, as ctd did before.
func BenchmarkScrape(b *testing.B) {
	f, err := newFixture(fixtureKey{flows: ScrapeFlows, prefixes: DefaultPrefixes})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	maps, err := mapinfo.Of(&f.dp.Maps, f.pin)
	if err != nil {
		b.Fatal(err)
	}
	// What the GC pass at the daemon's start reports for this table.
	gcStats := func() gc.Stats { return gc.Stats{Runs: 1, Entries: ScrapeFlows, LastEnd: time.Now()} }

	for _, tc := range []struct {
		name    string
		entries func(ctx context.Context) func(mapinfo.Map) (uint64, bool)
	}{
		{"daemon", func(ctx context.Context) func(mapinfo.Map) (uint64, bool) {
			return metrics.DatapathEntries(ctx, maps, f.dp.CT4(), f.dp.CT6(), gcStats)
		}},
		{"count-per-scrape", func(context.Context) func(mapinfo.Map) (uint64, bool) {
			return func(m mapinfo.Map) (uint64, bool) {
				n, err := mapinfo.Count(m.Map)
				return n, err == nil
			}
		}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			col := metrics.NewCollector(metrics.Sources{
				Metrics: metricsmap.New(f.dp.Metrics()),
				Maps:    maps,
				Entries: tc.entries(ctx),
				GC:      gcStats,
				Build:   metrics.ReadBuildInfo(),
			})
			srv := httptest.NewServer(col.Handler())
			defer srv.Close()
			scrape := func() {
				resp, err := http.Get(srv.URL)
				if err != nil {
					b.Error(err)
					return
				}
				defer resp.Body.Close()
				if _, err := io.Copy(io.Discard, resp.Body); err != nil || resp.StatusCode != http.StatusOK {
					b.Errorf("scrape: %s, %v", resp.Status, err)
				}
			}
			scrape() // starts the background counts, as Prometheus's first scrape does
			var cpu time.Duration
			for b.Loop() {
				before := cpuTime(b)
				var wg sync.WaitGroup
				for range ScrapeClients {
					wg.Go(scrape)
				}
				wg.Wait()
				cpu += cpuTime(b) - before
			}
			b.ReportMetric(float64(cpu.Microseconds())/1000/float64(b.N*ScrapeClients), UnitScrapeCPU)
		})
	}
}
