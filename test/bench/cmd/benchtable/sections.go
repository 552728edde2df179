package main

import (
	"fmt"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ctd-dev/ctd/test/bench"
)

// plan is how long and how often each measurement runs.
type plan struct {
	smoke           bool
	packetSamples   int // packets per program per case and run (-benchtime Nx)
	packetCount     int // runs per case (-count)
	lookupSamples   int // lookups per variant per ipcache and run
	trafficRounds   int
	trafficDuration time.Duration
	trafficWarmup   time.Duration
	controlCount    int // runs of each control-plane benchmark
	ctListRuns      int
	profileSamples  int
	benchTimeout    time.Duration
}

func fullPlan() plan {
	return plan{
		packetSamples: 65536, packetCount: 5, lookupSamples: 16384,
		trafficRounds: 12, trafficDuration: time.Second, trafficWarmup: 200 * time.Millisecond,
		controlCount: 3, ctListRuns: 3, profileSamples: 524288,
		benchTimeout: 20 * time.Minute,
	}
}

func smokePlan() plan {
	return plan{
		smoke:         true,
		packetSamples: 2048, packetCount: 1, lookupSamples: 2048,
		trafficRounds: 1, trafficDuration: 300 * time.Millisecond, trafficWarmup: 100 * time.Millisecond,
		controlCount: 1, ctListRuns: 1, profileSamples: 4096,
		benchTimeout: 10 * time.Minute,
	}
}

// ---- per packet ----

type packetRow struct {
	Case             bench.PacketCase
	Ctd, Floor, Over float64 // medians over runs, ns
	OverMin, OverMax float64 // the runs' range of Over
	// V1 and V1Over are the first release's figures on the same packets
	// (bench.PacketCase.V1), with the runs' range of V1Over; 0 without.
	V1, V1Over, V1OverMin, V1OverMax float64
	Runs                             int
	Err                              string // why the row has no figures
}

// Met reports whether the row has a goal and meets it.
func (r packetRow) Met() bool { return r.Err == "" && r.Over <= float64(r.Case.Goal.Nanoseconds()) }

func packetSection(g *goTest, p plan) ([]packetRow, error) {
	res, runErr := g.bench("./test/bench", "^BenchmarkPacket$", strconv.Itoa(p.packetSamples)+"x", p.packetCount, p.benchTimeout)
	rows := make([]packetRow, len(bench.PacketCases))
	for i, c := range bench.PacketCases {
		rows[i].Case = c
		var ctd, floor, over, v1, v1Over []float64
		for _, r := range res {
			if r.Base() != "BenchmarkPacket/"+c.Name {
				continue
			}
			ctd = append(ctd, r.Metrics["ns/op"])
			floor = append(floor, r.Metrics[bench.UnitFloor])
			over = append(over, r.Metrics[bench.UnitOver])
			if _, ok := r.Metrics[bench.UnitV1]; ok {
				v1 = append(v1, r.Metrics[bench.UnitV1])
				v1Over = append(v1Over, r.Metrics[bench.UnitV1Over])
			}
		}
		if len(ctd) == 0 {
			rows[i].Err = "not measured: BenchmarkPacket/" + c.Name + " reported nothing"
			if runErr != nil {
				rows[i].Err += " (the run failed, see below)"
			}
			continue
		}
		rows[i].Ctd, rows[i].Floor, rows[i].Over = bench.Median(ctd), bench.Median(floor), bench.Median(over)
		rows[i].OverMin, rows[i].OverMax = slices.Min(over), slices.Max(over)
		if len(v1) > 0 {
			rows[i].V1, rows[i].V1Over = bench.Median(v1), bench.Median(v1Over)
			rows[i].V1OverMin, rows[i].V1OverMax = slices.Min(v1Over), slices.Max(v1Over)
		}
		rows[i].Runs = len(ctd)
	}
	return rows, runErr
}

// ---- identity resolution ----

type lookupRow struct {
	Case bench.LookupCase
	Over []float64 // by bench.LookupVariants: medians over runs, ns over the floor
	Runs int
	Err  string
}

func lookupSection(g *goTest, p plan) ([]lookupRow, error) {
	res, runErr := g.bench("./test/bench", "^BenchmarkIPCacheLookup$", strconv.Itoa(p.lookupSamples)+"x", p.packetCount, p.benchTimeout)
	rows := make([]lookupRow, len(bench.LookupCases))
	for i, c := range bench.LookupCases {
		rows[i].Case = c
		over := make([][]float64, len(bench.LookupVariants))
		for _, r := range res {
			if r.Base() != "BenchmarkIPCacheLookup/"+c.Name {
				continue
			}
			rows[i].Runs++
			for j, v := range bench.LookupVariants {
				over[j] = append(over[j], r.Metrics[v.Unit])
			}
		}
		if rows[i].Runs == 0 {
			rows[i].Err = "not measured: BenchmarkIPCacheLookup/" + c.Name + " reported nothing"
			continue
		}
		for _, o := range over {
			rows[i].Over = append(rows[i].Over, bench.Median(o))
		}
	}
	return rows, runErr
}

// ---- map operations alone ----

type floorRow struct {
	Case             bench.FloorCase
	Over             float64 // median over runs, ns over the floor
	OverMin, OverMax float64 // the runs' range
	Runs             int
	Err              string
}

func floorSection(g *goTest, p plan) ([]floorRow, error) {
	res, runErr := g.bench("./test/bench", "^BenchmarkMapFloor$", strconv.Itoa(p.packetSamples)+"x", p.packetCount, p.benchTimeout)
	rows := make([]floorRow, len(bench.FloorCases))
	for i, c := range bench.FloorCases {
		rows[i].Case = c
		var over []float64
		for _, r := range res {
			if r.Base() == "BenchmarkMapFloor/"+c.Name {
				over = append(over, r.Metrics[bench.UnitOver])
			}
		}
		if len(over) == 0 {
			rows[i].Err = "not measured: BenchmarkMapFloor/" + c.Name + " reported nothing"
			continue
		}
		rows[i].Over, rows[i].OverMin, rows[i].OverMax = bench.Median(over), slices.Min(over), slices.Max(over)
		rows[i].Runs = len(over)
	}
	return rows, runErr
}

// floorOf returns the largest measured floor of the map operations that
// the per-packet case named name includes, and whether there is one.
func floorOf(rows []floorRow, name string) (floorRow, bool) {
	var best floorRow
	found := false
	for _, r := range rows {
		if r.Err == "" && r.Case.Bounds == name && (!found || r.Over > best.Over) {
			best, found = r, true
		}
	}
	return best, found
}

// ---- real traffic ----

type trafficCell struct {
	Median float64 // of the set-up's figures over rounds
	Ratio  float64 // median over rounds of figure / baseline's figure in the same round
	// Q1 and Q3 are the quartiles of the per-round ratios: how far the
	// noise carries one round's ratio.
	Q1, Q3 float64
	Rounds int
}

type trafficRow struct {
	Setup bench.Setup
	Cells map[string]trafficCell // by TrafficTest.Name
	Err   string
}

type trafficGoal struct {
	Desc     string // "TCP connection rate ≥ 0.95 × no program"
	Setup    bench.Setup
	Measured string
	Met      bool
	Result   string
}

func trafficSection(g *goTest, p plan) ([]trafficRow, []trafficGoal, error) {
	res, runErr := g.bench("./test/bench", "^BenchmarkTraffic$", "1x", 1, p.benchTimeout,
		"-traffic.rounds="+strconv.Itoa(p.trafficRounds),
		"-traffic.duration="+p.trafficDuration.String(),
		"-traffic.warmup="+p.trafficWarmup.String())
	rows, goals := trafficTables(res)
	return rows, goals, runErr
}

// trafficTables turns BenchmarkTraffic's results into the table's rows and
// the goals' verdicts.
func trafficTables(res []result) ([]trafficRow, []trafficGoal) {
	// values[setup][test][round]; results are named round=R/SETUP/TEST.
	values := map[string]map[string]map[int]float64{}
	for _, r := range res {
		f := strings.Split(strings.TrimPrefix(r.Base(), "BenchmarkTraffic/"), "/")
		if len(f) != 3 || !strings.HasPrefix(f[0], "round=") {
			continue
		}
		round, err := strconv.Atoi(strings.TrimPrefix(f[0], "round="))
		if err != nil {
			continue
		}
		setup, test := f[1], f[2]
		for _, t := range bench.TrafficTests {
			v, ok := r.Metrics[t.Unit]
			if t.Name != test || !ok {
				continue
			}
			if values[setup] == nil {
				values[setup] = map[string]map[int]float64{}
			}
			if values[setup][test] == nil {
				values[setup][test] = map[int]float64{}
			}
			values[setup][test][round] = v
		}
	}
	// ratios pairs the rounds in which both set-ups were measured.
	ratios := func(setup, other, test string) []float64 {
		var out []float64
		for round, a := range values[setup][test] {
			if b, ok := values[other][test][round]; ok && b > 0 {
				out = append(out, a/b)
			}
		}
		return out
	}
	all := func(setup, test string) []float64 {
		var out []float64
		for _, v := range values[setup][test] {
			out = append(out, v)
		}
		return out
	}
	rows := make([]trafficRow, len(bench.Setups))
	for i, s := range bench.Setups {
		rows[i] = trafficRow{Setup: s, Cells: map[string]trafficCell{}}
		if len(values[s.Name]) == 0 {
			rows[i].Err = "not measured: BenchmarkTraffic/" + s.Name + " reported nothing"
			continue
		}
		for _, t := range bench.TrafficTests {
			v := all(s.Name, t.Name)
			if len(v) == 0 {
				continue
			}
			rs := ratios(s.Name, bench.Baseline, t.Name)
			rows[i].Cells[t.Name] = trafficCell{Median: bench.Median(v), Ratio: bench.Median(rs),
				Q1: bench.Quantile(rs, 0.25), Q3: bench.Quantile(rs, 0.75), Rounds: len(v)}
		}
	}
	var goals []trafficGoal
	for _, t := range bench.TrafficTests {
		for _, s := range bench.Setups {
			if !strings.HasPrefix(s.Name, "ctd") {
				continue
			}
			if t.MinRatio > 0 {
				rs := ratios(s.Name, bench.Baseline, t.Name)
				r := bench.Median(rs)
				g := trafficGoal{Desc: fmt.Sprintf("%s ≥ %.2f × no program", t.Title, t.MinRatio), Setup: s}
				g.Measured = ratioText(r) + " ×" + spread(rs)
				g.Met, g.Result = atLeast(r, t.MinRatio)
				goals = append(goals, g)
			}
			if t.NotBelow != "" {
				rs := ratios(s.Name, t.NotBelow, t.Name)
				r := bench.Median(rs)
				g := trafficGoal{Desc: fmt.Sprintf("%s ≥ %s", t.Title, setupTitle(t.NotBelow)), Setup: s}
				g.Measured = ratioText(r) + " × " + setupTitle(t.NotBelow) + spread(rs)
				g.Met, g.Result = atLeast(r, 1)
				goals = append(goals, g)
			}
		}
	}
	return rows, goals
}

// spread shows the quartiles of per-round ratios.
func spread(rs []float64) string {
	if len(rs) < 4 {
		return ""
	}
	return fmt.Sprintf(" (rounds' quartiles %.3f–%.3f)", bench.Quantile(rs, 0.25), bench.Quantile(rs, 0.75))
}

// ratioText shows a ratio with enough digits that one just below a goal
// never reads as equal to it.
func ratioText(r float64) string {
	s := fmt.Sprintf("%.3f", r)
	if t := fmt.Sprintf("%.4f", r); t[len(t)-1] != '0' {
		s = t
	}
	return s
}

func setupTitle(name string) string {
	for _, s := range bench.Setups {
		if s.Name == name {
			return s.Title
		}
	}
	return name
}

// atLeast words a ratio against its lower bound.
func atLeast(v, goal float64) (bool, string) {
	if math.IsNaN(v) {
		return false, "not measured"
	}
	if v >= goal {
		return true, "met"
	}
	if goal-v < 0.0005 {
		return false, fmt.Sprintf("missed by less than 0.001 (%.3f%%)", 100*(goal-v)/goal)
	}
	return false, fmt.Sprintf("missed by %.3f (%.1f%%)", goal-v, 100*(goal-v)/goal)
}

// atMost words a cost against its upper bound.
func atMost(v, goal float64, format func(float64) string) (bool, string) {
	if v <= goal {
		return true, "met"
	}
	return false, "missed by " + format(v-goal)
}

// ---- control plane ----

type controlRow struct {
	Case  bench.ControlCase
	Value float64 // seconds, or the case's unit
	Runs  int
	How   string
	Err   string
	// Failed is set when a measurement that exists failed (as opposed to
	// one whose code has not landed yet).
	Failed bool
}

func (r controlRow) Met() bool {
	return r.Err == "" && r.Case.Goal > 0 && r.Value <= r.Case.Goal.Seconds()
}

// source is a control-plane figure that another package's benchmark measures.
type source struct {
	pkg, bench, sub string
	metric          string  // unit to read
	scale           float64 // to seconds
	how             string
}

var sources = map[string]source{
	"ipcache-load": {pkg: "./control/ipcache", bench: "BenchmarkLoad100kTotal", sub: "maps+store", metric: "ns/op", scale: 1e-9,
		how: "`control/ipcache` BenchmarkLoad100kTotal/maps+store: 100k random prefixes (50k per family) parsed, validated and written with batch updates to the tries and the state store, as `ctd ipcache load` does"},
	"ipcache-load-per-family": {pkg: "./control/ipcache", bench: "BenchmarkLoad100k", sub: "maps+store", metric: "ns/op", scale: 1e-9,
		how: "`control/ipcache` BenchmarkLoad100k/maps+store: as above with 100k prefixes per family (200k in all), the benchmark issue 3 asks for"},
	"gc-pass": {pkg: "./control/gc", bench: "BenchmarkPass", metric: "ns/op", scale: 1e-9,
		how: "`control/gc` BenchmarkPass: one pass with batch lookups and deletes over 1M TCP and UDP entries, every other one expired"},
	"metrics-scrape": {pkg: "./test/bench", bench: "BenchmarkScrape", sub: "daemon", metric: "cpu-ms/scrape", scale: 1e-3,
		how: "`test/bench` BenchmarkScrape/daemon: process CPU (user + system) of 20 concurrent scrapes of the daemon's collector over 1M conntrack entries, per scrape; the table's entries come from GC's last pass, the other maps' from counts kept in the background at most 5 s old"},
	"metrics-scrape-counted": {pkg: "./test/bench", bench: "BenchmarkScrape", sub: "count-per-scrape", metric: "cpu-ms/scrape", scale: 1e-3,
		how: "`test/bench` BenchmarkScrape/count-per-scrape: the same with every map counted on every scrape, as ctd did before"},
	"daemon-ready": {pkg: "./control/daemon", bench: "BenchmarkStartReady", sub: "restart", metric: "ready-ms", scale: 1e-3,
		how: "`control/daemon` BenchmarkStartReady/restart: the daemon's own start → ready time over a live datapath with 100k conntrack entries and 100k ipcache prefixes pinned and in the store"},
	"cluster-ipcache-load": {pkg: "./control/kvstore", bench: "BenchmarkIPCacheLoad100k", metric: "ns/op", scale: 1e-9,
		how: "`control/kvstore` BenchmarkIPCacheLoad100k: 100k prefixes (50k per family) written as a new ipcache generation into a three-member etcd (embedded, on this machine, fsyncing) and switched to, as `ctd ipcache load --replace` does in cluster mode"},
	"cluster-converge": {pkg: "./control/cluster", bench: "BenchmarkConverge100k", metric: "converge-ms", scale: 1e-3,
		how: "`control/cluster` BenchmarkConverge100k: a new node's sync against a three-member etcd holding 100k prefixes, from its start to synced: listed, and written into its empty maps and state store"},
	"cluster-change-p99": {pkg: "./control/cluster", bench: "BenchmarkChange10Nodes", metric: "p99-ms", scale: 1e-3,
		how: "`control/cluster` BenchmarkChange10Nodes: 200 ipcache adds, each timed from the write's start until the datapath of the last of 10 nodes (syncers in one process, each with its own maps and store) resolves it, looked up in its ipcache map; p99 over the changes (the benchmark also reports the time until every node committed it to its store, p99-stored-ms)"},
}

func pattern(name, sub string) string {
	p := "^" + regexp.QuoteMeta(name) + "$"
	if sub != "" {
		p += "/^" + regexp.QuoteMeta(sub) + "$"
	}
	return p
}

// fromBenchmark measures a control-plane case with another package's benchmark.
func fromBenchmark(g *goTest, p plan, c bench.ControlCase) controlRow {
	row := controlRow{Case: c}
	s, ok := sources[c.Name]
	if !ok {
		row.Err, row.Failed = "not measured: no source for "+c.Name, true
		return row
	}
	row.How = s.how
	if err := g.hasBenchmark(s.pkg, s.bench); err != nil {
		row.Err = err.Error()
		return row
	}
	res, err := g.bench(s.pkg, pattern(s.bench, s.sub), "1x", p.controlCount, p.benchTimeout)
	want := s.bench
	if s.sub != "" {
		want += "/" + s.sub
	}
	var vals []float64
	for _, r := range res {
		if r.Base() != want {
			continue
		}
		if v, ok := r.Metrics[s.metric]; ok {
			vals = append(vals, v*s.scale)
		}
	}
	if err != nil {
		row.Err, row.Failed = "not measured: "+err.Error(), true
		return row
	}
	if len(vals) == 0 {
		row.Err = fmt.Sprintf("not measured: %s in %s reported no %s yet", want, s.pkg, s.metric)
		return row
	}
	row.Value, row.Runs = bench.Median(vals), len(vals)
	return row
}
