// Package metrics serves ctd's Prometheus metrics.
//
// A scrape reads the datapath's per-CPU counters (summed over CPUs), the GC
// runner's totals, the attach state and each map's description, but never
// walks a map: the entries of maps that would have to be walked (hash maps,
// LPM tries) come from Sources.Entries, which the daemon answers from the
// last GC pass (the conntrack table) and from counts kept at most a few
// seconds old (mapinfo.Counts), so that many scrapes of a million-entry
// table cost no more than one.
package metrics

import (
	"context"
	"fmt"
	"net/http"
	"runtime"
	"runtime/debug"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/control/gc"
	"github.com/ctd-dev/ctd/control/mapinfo"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
)

// BuildInfo describes the running binary.
type BuildInfo struct {
	Version   string // module version, "(devel)" for a local build
	Revision  string // VCS revision, "" when unknown
	GoVersion string
}

// ReadBuildInfo returns the running binary's build information.
func ReadBuildInfo() BuildInfo {
	b := BuildInfo{Version: "(devel)", GoVersion: runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" {
			b.Version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				b.Revision = s.Value
			}
		}
	}
	return b
}

// Sources are what a Collector reads on each scrape. Nil fields leave their
// metrics out.
type Sources struct {
	Metrics     *metricsmap.Map                     // the datapath's counters
	Maps        []mapinfo.Map                       // maps to report entries, size and pressure of
	GC          func() gc.Stats                     // e.g. (*gc.Runner).Stats
	Attachments func() ([]attach.Attachment, error) // the interfaces ctd manages; Mode "" = not attached
	Build       BuildInfo

	// Top gives the conntrack table's top values by dimension as the last
	// GC pass counted them (e.g. (*conntrack.TopCensus).Tables).
	Top func() []conntrack.TopTable

	// Entries gives the entry count of a map that would have to be walked
	// to count (mapinfo.Walks), e.g. DatapathEntries; without an answer
	// (nil, or ok false) the map's entries and pressure are left out. Other
	// maps are counted on the scrape, which costs nothing.
	Entries func(mapinfo.Map) (n uint64, ok bool)
}

// Collector is a prometheus.Collector of ctd's metrics.
type Collector struct {
	src Sources
}

// NewCollector returns a Collector reading src.
func NewCollector(src Sources) *Collector { return &Collector{src: src} }

var (
	labelsDirReason = []string{"direction", "reason"}

	forwardedPackets = desc("forwarded_packets_total", "Packets passed by the datapath, by direction and reason.", labelsDirReason...)
	forwardedBytes   = desc("forwarded_bytes_total", "Bytes passed by the datapath (skb length, L2 included), by direction and reason.", labelsDirReason...)
	droppedPackets   = desc("dropped_packets_total", "Packets dropped by the datapath, by direction and reason.", labelsDirReason...)
	droppedBytes     = desc("dropped_bytes_total", "Bytes dropped by the datapath (skb length, L2 included), by direction and reason.", labelsDirReason...)
	ctCreated        = desc("conntrack_created_total", "Conntrack entries created by the datapath.", "direction")
	ctUpdateFailed   = desc("conntrack_update_failed_total", "Conntrack map updates that failed in the datapath.", "direction")
	ctConfirmed      = desc("conntrack_confirmed_total", "Flows promoted from the unconfirmed to the confirmed conntrack table.", "direction")
	ctMidstreamMiss  = desc("conntrack_midstream_miss_total", "TCP packets other than SYN or RST that found no conntrack entry: flows lost to the LRU (or flushed, or older than ctd).", "direction")
	ownerFailed      = desc("owner_failed_total", "Sockets whose owner (process, cgroup) could not be recorded: their flows have none.", "direction")
	eventsLost       = desc("events_lost_total", "Events the datapath could not write because the ring buffer was full.", "direction")
	eventsLimited    = desc("events_ratelimited_total", "Events the datapath suppressed by its per-CPU rate limit.", "direction")
	fragments        = desc("fragments_total", "Later IP fragments seen (passed untracked).", "direction")

	mapEntries = desc("map_entries", "Entries in a map: the conntrack table's as its last GC pass left it, other hash maps and LPM tries counted exactly at most a few seconds ago; arrays: max entries; ring buffer: bytes not yet consumed.", "map", "type")
	mapMax     = desc("map_max_entries", "A map's capacity (ring buffer: its size in bytes).", "map", "type")
	mapFill    = desc("map_pressure", "A map's fill ratio, entries over max entries (0-1), for maps that can run full (not arrays).", "map", "type")
	mapMemlock = desc("map_memlock_bytes", "Memory the kernel charges for a map.", "map", "type")

	gcRuns      = desc("gc_runs_total", "Conntrack GC passes run.")
	gcErrors    = desc("gc_errors_total", "Conntrack GC passes that failed.")
	gcWakes     = desc("gc_wakes_total", "Conntrack GC passes run early: woken by the daemon or by datapath signals.")
	gcScanned   = desc("gc_scanned_entries_total", "Conntrack entries read by GC passes.")
	gcDeleted   = desc("gc_deleted_entries_total", "Expired conntrack entries deleted by GC.")
	gcRefreshed = desc("gc_refreshed_entries_total", "Conntrack entries that expired but were refreshed during a GC pass, and kept.")
	gcDuration  = desc("gc_duration_seconds", "Time spent in conntrack GC passes.")
	gcInterval  = desc("gc_interval_seconds", "The adaptive interval until the next regular GC pass.")

	topFlows = desc("conntrack_top_flows", "Flows in the conntrack table that have this value in this dimension, for the largest values of each dimension, as the last complete GC pass counted them.", "by", "value")

	attached  = desc("interface_attached", "1 when ctd's programs are attached to the interface, else 0.", "iface", "mode")
	buildInfo = desc("build_info", "Always 1; the labels describe the running binary.", "version", "revision", "goversion")
)

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("ctd_"+name, help, labels, nil)
}

// Describe sends every metric's description.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		forwardedPackets, forwardedBytes, droppedPackets, droppedBytes, ctCreated, ctUpdateFailed, ctConfirmed, ctMidstreamMiss, ownerFailed,
		eventsLost, eventsLimited, fragments, mapEntries, mapMax, mapFill, mapMemlock,
		gcRuns, gcErrors, gcWakes, gcScanned, gcDeleted, gcRefreshed, gcDuration, gcInterval,
		topFlows, attached, buildInfo,
	} {
		ch <- d
	}
}

// Collect reads every source and sends the metrics. A source that fails
// makes its metrics invalid, so the scrape reports the error.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	if c.src.Metrics != nil {
		c.collectDatapath(ch)
	}
	if c.src.Maps != nil {
		c.collectMaps(ch)
	}
	if c.src.GC != nil {
		c.collectGC(ch)
	}
	if c.src.Top != nil {
		for _, t := range c.src.Top() {
			for _, r := range t.Rows {
				ch <- gauge(topFlows, float64(r.Flows), string(t.By), r.Value)
			}
		}
	}
	if c.src.Attachments != nil {
		c.collectAttachments(ch)
	}
	b := c.src.Build
	ch <- prometheus.MustNewConstMetric(buildInfo, prometheus.GaugeValue, 1, b.Version, b.Revision, b.GoVersion)
}

func (c *Collector) collectDatapath(ch chan<- prometheus.Metric) {
	snap, err := c.src.Metrics.Read()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(forwardedPackets, err)
		return
	}
	counters := map[metricsmap.Reason]*prometheus.Desc{
		metricsmap.CTCreated:         ctCreated,
		metricsmap.CTUpdateFailed:    ctUpdateFailed,
		metricsmap.CTConfirmed:       ctConfirmed,
		metricsmap.CTMidstreamMiss:   ctMidstreamMiss,
		metricsmap.OwnerFailed:       ownerFailed,
		metricsmap.EventsLost:        eventsLost,
		metricsmap.EventsRateLimited: eventsLimited,
		metricsmap.Fragments:         fragments,
	}
	for _, s := range snap.Samples() {
		dir, reason := s.Dir.String(), s.Reason.String()
		switch s.Reason.Kind() {
		case metricsmap.Forwarded:
			ch <- counter(forwardedPackets, s.Packets, dir, reason)
			ch <- counter(forwardedBytes, s.Bytes, dir, reason)
		case metricsmap.Dropped:
			ch <- counter(droppedPackets, s.Packets, dir, reason)
			ch <- counter(droppedBytes, s.Bytes, dir, reason)
		default:
			if d, ok := counters[s.Reason]; ok {
				ch <- counter(d, s.Packets, dir)
			}
		}
	}
}

func counter(d *prometheus.Desc, v uint64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
}

func gauge(d *prometheus.Desc, v float64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

func (c *Collector) collectMaps(ch chan<- prometheus.Metric) {
	for _, m := range c.src.Maps {
		info, err := mapinfo.Describe(m)
		if err != nil {
			ch <- prometheus.NewInvalidMetric(mapEntries, err)
			continue
		}
		ch <- gauge(mapMax, float64(info.MaxEntries), info.Name, info.Type)
		ch <- gauge(mapMemlock, float64(info.Memlock), info.Name, info.Type)
		n, ok, err := c.entries(m)
		if err != nil {
			ch <- prometheus.NewInvalidMetric(mapEntries, err)
			continue
		}
		if !ok {
			continue
		}
		info = info.WithEntries(n)
		ch <- gauge(mapEntries, float64(info.Entries), info.Name, info.Type)
		if info.CanFill() {
			ch <- gauge(mapFill, info.Fill/100, info.Name, info.Type)
		}
	}
}

// entries counts a map that needs no walk, and asks Sources.Entries for
// the others.
func (c *Collector) entries(m mapinfo.Map) (uint64, bool, error) {
	if !mapinfo.Walks(m.Map.Type()) {
		n, err := mapinfo.Count(m.Map)
		if err != nil {
			return 0, false, fmt.Errorf("count entries of %s: %w", m.Name, err)
		}
		return n, true, nil
	}
	if c.src.Entries == nil {
		return 0, false, nil
	}
	n, ok := c.src.Entries(m)
	return n, ok, nil
}

func (c *Collector) collectGC(ch chan<- prometheus.Metric) {
	st := c.src.GC()
	ch <- counter(gcRuns, st.Runs)
	ch <- counter(gcErrors, st.Errors)
	ch <- counter(gcWakes, st.Wakes)
	ch <- counter(gcScanned, st.Scanned)
	ch <- counter(gcDeleted, st.Deleted)
	ch <- counter(gcRefreshed, st.Refreshed)
	ch <- prometheus.MustNewConstSummary(gcDuration, st.Runs, st.Duration.Seconds(), nil)
	ch <- gauge(gcInterval, st.Interval.Seconds())
}

func (c *Collector) collectAttachments(ch chan<- prometheus.Metric) {
	ats, err := c.src.Attachments()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(attached, fmt.Errorf("list attachments: %w", err))
		return
	}
	for _, a := range ats {
		v, mode := 1.0, string(a.Mode)
		if a.Mode == "" {
			v, mode = 0, "none"
		}
		ch <- gauge(attached, v, a.Iface, mode)
	}
}

// Handler serves c's metrics, and the Go runtime's and the process's, in
// the Prometheus exposition format, from a registry of its own.
func (c *Collector) Handler() http.Handler {
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// CountAge is how old the daemon lets the entry counts of maps other than
// the conntrack table get while Prometheus scrapes.
const CountAge = 5 * time.Second

// DatapathEntries answers Sources.Entries as the daemon does: the conntrack
// tables ct4 and ct6 from its GC's last pass (gcStats; no answer before the
// first successful pass; each counts its family's flows, confirmed or not),
// every other map of maps that must be walked from counts at most CountAge
// old (mapinfo.Counts), until ctx is done. The confirmed conntrack tables
// are never walked for a scrape.
func DatapathEntries(ctx context.Context, maps []mapinfo.Map, ct4, ct6 *ebpf.Map, gcStats func() gc.Stats) func(mapinfo.Map) (uint64, bool) {
	var walked []mapinfo.Map
	for _, m := range maps {
		if m.Map != ct4 && m.Map != ct6 && mapinfo.Walks(m.Map.Type()) {
			walked = append(walked, m)
		}
	}
	counts := mapinfo.NewCounts(ctx, walked, CountAge)
	return func(m mapinfo.Map) (uint64, bool) {
		if m.Map == ct4 || m.Map == ct6 {
			st := gcStats()
			n := st.Entries6
			if m.Map == ct4 {
				n = st.Entries - st.Entries6
			}
			return uint64(n), st.Runs > st.Errors
		}
		return counts.Entries(m.Name)
	}
}
