package main

import (
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/ctd-dev/ctd/test/bench"
)

// report is everything the table shows.
type report struct {
	Env      environment
	Plan     plan
	Packet   []packetRow
	Floor    []floorRow
	Lookup   []lookupRow
	Traffic  []trafficRow
	TGoals   []trafficGoal
	Control  []controlRow
	Profiles []profile
	Errors   []string // runs that failed
	Took     time.Duration
}

func count(n int) string {
	switch {
	case n >= 1000000 && n%1000000 == 0:
		return fmt.Sprintf("%dM", n/1000000)
	case n >= 1000 && n%1000 == 0:
		return fmt.Sprintf("%dk", n/1000)
	}
	return fmt.Sprint(n)
}

func ns(v float64) string { return fmt.Sprintf("%.0f", v) }

// nsRange is a median with the range it was taken over.
func nsRange(median, lo, hi float64) string {
	return fmt.Sprintf("%s (%s–%s)", ns(median), ns(lo), ns(hi))
}

func seconds(v float64) string {
	if v < 1 {
		return fmt.Sprintf("%.0f ms", v*1000)
	}
	return fmt.Sprintf("%.2f s", v)
}

func controlValue(r controlRow) string {
	if r.Case.Unit == "s" {
		return seconds(r.Value)
	}
	return fmt.Sprintf("%.0f %s", r.Value, r.Case.Unit)
}

func packetResult(r packetRow) string {
	if r.Case.Goal == 0 {
		return "—"
	}
	_, s := atMost(r.Over, float64(r.Case.Goal.Nanoseconds()), func(v float64) string { return fmt.Sprintf("%.0f ns", v) })
	return s
}

func packetTitle(c bench.PacketCase) string {
	return fmt.Sprintf("%s, %s flows, %s prefixes", c.Title, count(c.Flows), count(c.Prefixes))
}

// cell escapes a table cell.
func cell(s string) string { return strings.ReplaceAll(s, "|", `\|`) }

func (rep *report) markdown() string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	e := rep.Env

	p("# ctd benchmarks\n\n")
	if rep.Plan.smoke {
		p("**Smoke run**: every measurement ran only briefly; the figures below show that the harness works, not what ctd costs.\n\n")
	}
	p("Written by `make bench` (`go run ./test/bench/cmd/benchtable`, as root) on %s in %s.\n\n", e.Date, rep.Took.Round(time.Second))
	p("| | |\n|---|---|\n")
	p("| kernel | %s |\n| CPU | %s, %d cores |\n| Go | %s |\n| commit | %s |\n| load average at start | %s |\n", e.Kernel, e.CPU, e.Cores, e.GoVersion, e.Commit, e.Load)
	for _, m := range e.Mitigations {
		p("| %s | %s |\n", m[0], cell(m[1]))
	}
	p("\nEvery figure stands next to a baseline measured in the same run, interleaved with it; the machine is shared and noisy, so each figure is a median over repeated runs. Goals are issue 6's and issue 11's. No timing is asserted in `go test`: this table is the only judge.\n\n")

	p("## Goals\n\n| goal | measured | result |\n|---|---|---|\n")
	for _, r := range rep.Packet {
		if r.Case.Goal == 0 {
			continue
		}
		desc := fmt.Sprintf("%s: ≤ %d ns over the empty TC program", packetTitle(r.Case), r.Case.Goal.Nanoseconds())
		if r.Err != "" {
			p("| %s | %s | not measured |\n", cell(desc), cell(r.Err))
			continue
		}
		measured := ns(r.Over) + " ns"
		if r.V1 > 0 {
			measured += fmt.Sprintf(" (first release: %s ns)", ns(r.V1Over))
		}
		res := packetResult(r)
		if f, ok := floorOf(rep.Floor, r.Case.Name); ok && !r.Met() && f.Over > float64(r.Case.Goal.Nanoseconds()) {
			res += fmt.Sprintf("; its map operations alone cost %s ns (see Map operations alone)", ns(f.Over))
		}
		p("| %s | %s | %s |\n", cell(desc), measured, res)
	}
	for _, g := range rep.TGoals {
		p("| %s: %s | %s | %s |\n", cell(g.Setup.Title), cell(g.Desc), cell(g.Measured), g.Result)
	}
	for _, r := range rep.Control {
		if r.Case.Goal == 0 {
			continue
		}
		desc := fmt.Sprintf("%s ≤ %s", r.Case.Title, seconds(r.Case.Goal.Seconds()))
		if r.Err != "" {
			p("| %s | %s | not measured |\n", cell(desc), cell(r.Err))
			continue
		}
		_, res := atMost(r.Value, r.Case.Goal.Seconds(), seconds)
		p("| %s | %s | %s |\n", cell(desc), controlValue(r), res)
	}

	p("\n## Per packet (BPF_PROG_TEST_RUN)\n\n")
	p("The real `ctd_ingress`/`ctd_egress` programs, loaded by `loader.Load` against maps pinned for the run, and an empty TC program (`r0 = -1; exit`: TC_ACT_UNSPEC, as ctd passes) run on the same packets, interleaved packet by packet; the figure is ctd's time over that floor. ")
	p("Unless marked \"repeated in-kernel\", every run is one `BPF_PROG_TEST_RUN` with repeat 1 on a flow drawn at random from the whole table, so the figures include the cache and TLB misses a table of that size costs; the kernel times the program plus one clock read, which the floor has too. ")
	p("New-flow rows send SYNs of flows ctd has not seen (distinct source ports from /32 ipcache hosts, to a server covered by a /24): conntrack miss, both identities through the ipcache (the source's host entry in its hash; the server's address misses the hash and matches its CIDR in the trie), policy, insert, counters and a flow-new event; after every %d packets the entries they created are deleted and the events drained, outside the timed runs. ", 2048)
	p("The datapath runs in its default configuration (config_v1 as `loader.Load` creates it: default allow, no rules, the default event rate limit, so in a long run most flow-new events are rate-limited, as in a burst of new flows), except where a row says otherwise. ")
	p("Conntrack tables are sized as an operator would (`--ct-max` the default 262144, or twice the flows) and prefilled with synthetic established flows with batch updates; the ipcache holds the given number of prefixes per family (80%% host entries, the rest CIDRs) in 198.18.0.0/15 and fd00:bec::/32. ")
	p("Rows with a first-release column also run the datapath of ctd's first release (%s, layout v1: one conntrack table for both families and for unconfirmed flows, host entries in the LPM tries), loaded from its object in git history with maps of its own, filled with the same flows and prefixes (a flood's half-open flows go into its one table), on the same packets, interleaved with ctd's and the floor's, packet by packet in rotating order; the goal judges ctd's figure. ", rep.Env.FirstRelease)
	p("Each row: median over %s of %d packets per program (each run the median of rounds of 2048), with the range over runs in brackets.\n\n", plural(rep.Plan.packetCount, "run"), rep.Plan.packetSamples)
	p("| figure | conntrack flows | ipcache prefixes | ctd (ns/packet) | empty TC (ns/packet) | ctd over floor (ns) | first release over floor (ns) | goal | result |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rep.Packet {
		c := r.Case
		title := c.Title
		goal := "—"
		if c.Goal > 0 {
			goal = fmt.Sprintf("≤ %d", c.Goal.Nanoseconds())
		}
		if r.Err != "" {
			p("| %s | %s | %s | %s | | | | %s | not measured |\n", cell(title), count(c.Flows), count(c.Prefixes), cell(r.Err), goal)
			continue
		}
		v1 := "—"
		if r.V1 > 0 {
			v1 = nsRange(r.V1Over, r.V1OverMin, r.V1OverMax)
		}
		p("| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", cell(title), count(c.Flows), count(c.Prefixes), ns(r.Ctd), ns(r.Floor),
			nsRange(r.Over, r.OverMin, r.OverMax), v1, goal, packetResult(r))
	}

	p("\n## Map operations alone (per packet)\n\n")
	p("What the kernel's map operations cost by themselves, measured as the per-packet rows are: a small TC program (built in the benchmark, never shipped) reads a conntrack key, and for the identity rows two addresses, from its packet and does only the map operations its row names, on maps created as the loader creates them (default sizes: %d-entry confirmed tables, the default unconfirmed tables and ipcache), with no parsing, state, policy, counters or events; it passes only when every lookup found what it should, so a run that measured something else fails. ", 262144)
	p("It and the empty TC program run interleaved, one `BPF_PROG_TEST_RUN` with repeat 1 per run on a flow drawn at random (a hit: one of 1k flows in the confirmed table; a new flow: a key no table holds, its entry deleted after each round of 2048, outside the timed runs). ")
	p("Each row: median over %s of %d packets per program, with the range over runs in brackets. A per-packet goal below its row's figure here cannot be met by any datapath that keeps its flows in the kernel's hash maps, measured this way on this machine.\n\n", plural(rep.Plan.packetCount, "run"), rep.Plan.packetSamples)
	p("| map operations | over floor (ns) | per-packet row that includes them | that row over floor (ns) | its goal |\n|---|---|---|---|---|\n")
	for _, f := range rep.Floor {
		fam := "IPv4"
		if f.Case.IPv6 {
			fam = "IPv6"
		}
		title := f.Case.Title
		if f.Case.Bounds != "" {
			title = fam + ": " + title
		}
		if f.Err != "" {
			p("| %s | %s | | | |\n", cell(title), cell(f.Err))
			continue
		}
		row, ctd, goal := "—", "—", "—"
		for _, r := range rep.Packet {
			if f.Case.Bounds == "" || r.Case.Name != f.Case.Bounds {
				continue
			}
			row = packetTitle(r.Case)
			if r.Err == "" {
				ctd = ns(r.Over)
			}
			if r.Case.Goal > 0 {
				goal = fmt.Sprintf("≤ %d", r.Case.Goal.Nanoseconds())
			}
		}
		p("| %s | %s | %s | %s | %s |\n", cell(title), nsRange(f.Over, f.OverMin, f.OverMax), cell(row), ctd, goal)
	}

	p("\n## Identity resolution (per lookup)\n\n")
	p("What resolving one address costs, apart from the rest of a new flow: a small TC program reads an address from its packet and resolves it as the datapath does (this build: its host hash, and on a miss the full-length key in the trie of CIDRs; the first release: the full-length key in one LPM trie of every prefix), against maps created as the loader creates them (`--ipcache-max` the default) and filled with the per-packet rows' ipcache (80%% host entries). ")
	p("Every run is one `BPF_PROG_TEST_RUN` with repeat 1 on an address drawn at random (a host entry's, or one under a CIDR that no host entry covers), each of the four lookups interleaved with the empty TC program alone, run by run in rotating order, in rounds of 2048 (more programs in one rotation would evict more of each other's cache lines between runs, and inflate every figure); the figure is the median over %s of %d lookups each of the time over the floor (ns).\n\n", plural(rep.Plan.packetCount, "run"), rep.Plan.lookupSamples)
	p("| family | ipcache prefixes |")
	for _, v := range bench.LookupVariants {
		p(" %s |", cell(v.Title))
	}
	p("\n|---|---|%s\n", strings.Repeat("---|", len(bench.LookupVariants)))
	for _, r := range rep.Lookup {
		fam := "IPv6"
		if r.Case.IPv4 {
			fam = "IPv4"
		}
		p("| %s | %s |", fam, count(r.Case.Prefixes))
		if r.Err != "" {
			p(" %s |%s\n", cell(r.Err), strings.Repeat(" |", len(bench.LookupVariants)-1))
			continue
		}
		for _, v := range r.Over {
			p(" %s |", ns(v))
		}
		p("\n")
	}

	p("\n## Real traffic over a veth pair\n\n")
	p("Two network namespaces joined by a veth pair; A sends, B receives. Set-ups, on B's veth end: no program; ctd attached with `ctd attach` (TCX), default allow; ctd with `ctd policy default ingress deny` and `ctd policy add` rules allowing A's identity to the benchmark ports; Linux nf_conntrack through nftables input/output chains with `ct state established,related accept; ct state new accept`. ")
	p("%s; each round builds every set-up on fresh namespaces, then runs each measurement on all of them back to back, in an order that rotates from round to round; each measurement counts for %s after %s of warm-up. ", plural(rep.Plan.trafficRounds, "round"), rep.Plan.trafficDuration, rep.Plan.trafficWarmup)
	p("TCP throughput: one connection, 128 KiB writes, bytes counted by the receiver. Connection rate: %d parallel clients, each connect, 64-byte request, 64-byte response, server closes, client closes (like netperf TCP_CRR). UDP: 64-byte datagrams sent with sendmmsg in batches of 64; on veth the receive path (and B's ingress program) runs in the sender's context, so the rate is that of packets crossing the set-up; B's socket is not read during the run. ", 4)
	p("Figures are medians over rounds; ratios are medians of the per-round ratio to no program in the same round, with the quartiles of those per-round ratios (how far this machine's noise carries one round); overhead is 1 − ratio.\n\n")
	p("| set-up |")
	for _, t := range bench.TrafficTests {
		p(" %s (%s) | ratio (quartiles) | overhead |", t.Title, t.Unit)
	}
	p("\n|---|")
	for range bench.TrafficTests {
		p("---|---|---|")
	}
	p("\n")
	for _, r := range rep.Traffic {
		p("| %s |", cell(r.Setup.Title))
		if r.Err != "" {
			p(" %s |", cell(r.Err))
			for range len(bench.TrafficTests)*3 - 1 {
				p(" |")
			}
			p("\n")
			continue
		}
		for _, t := range bench.TrafficTests {
			c, ok := r.Cells[t.Name]
			if !ok {
				p(" not measured | | |")
				continue
			}
			if r.Setup.Name == bench.Baseline {
				p(" %.0f | 1 | — |", c.Median)
				continue
			}
			q := ""
			if c.Rounds >= 4 {
				q = fmt.Sprintf(" (%.3f–%.3f)", c.Q1, c.Q3)
			}
			p(" %.0f | %.3f%s | %s |", c.Median, c.Ratio, q, overhead(c.Ratio))
		}
		p("\n")
	}

	p("\n## Control plane\n\n| figure | measured | goal | result | how |\n|---|---|---|---|---|\n")
	for _, r := range rep.Control {
		goal, res := "—", "—"
		if r.Case.Goal > 0 {
			goal = "≤ " + seconds(r.Case.Goal.Seconds())
		}
		if r.Err != "" {
			p("| %s | %s | %s | not measured | %s |\n", cell(r.Case.Title), cell(r.Err), goal, cell(r.How))
			continue
		}
		if r.Case.Goal > 0 {
			_, res = atMost(r.Value, r.Case.Goal.Seconds(), seconds)
		}
		runs := ""
		if r.Runs > 1 {
			runs = fmt.Sprintf(" (median of %d)", r.Runs)
		}
		p("| %s | %s%s | %s | %s | %s |\n", cell(r.Case.Title), controlValue(r), runs, goal, res, cell(r.How))
	}

	if len(rep.Profiles) > 0 {
		p("\n## Where the time goes\n\n")
		p("For every per-packet goal missed: `perf record -e cpu-clock -g` while the case runs (`bpftool prog profile` needs a bpftool built with skeletons, and this VM has no hardware cycle counter), each sample inside ctd's program put in the category of the function the program called, or the program body when it was in the JIT code itself. The ns column spreads the row's cost over the floor by these shares.\n\n")
		if e.callsCostExtra() {
			p("This kernel mitigates spectre_v2 with retpolines and SRSO with safe RET (see the top of the page): every indirect call and every return costs extra, so the program's helper calls (packet reads, clock, map operations) cost more here than on a kernel without these mitigations, and part of that shows as program body.\n\n")
		}
		for _, pr := range rep.Profiles {
			p("### %s\n\n", packetTitle(pr.Case))
			if pr.Row.Err == "" {
				p("%s ns over the floor against a goal of %d ns: %s.", ns(pr.Row.Over), pr.Case.Goal.Nanoseconds(), packetResult(pr.Row))
				if hot, ok := rep.hotTwin(pr.Case); ok {
					p(" The same kind of packet repeated in-kernel on one flow (warm caches, no syscall between runs) costs %s ns over its floor; the difference, %s ns, is what running cold costs: the cache, TLB and branch-predictor misses of a run that follows a syscall and touches a flow at random.", ns(hot.Over), ns(pr.Row.Over-hot.Over))
				}
				p("\n\n")
			}
			if pr.Err != "" {
				p("%s\n\n", pr.Err)
				continue
			}
			if len(pr.Shares) > 0 && pr.Row.Err == "" {
				top := pr.Shares[0]
				p("Dominated by %s: %.0f%% of the samples, ≈ %.0f ns.\n\n", top.What, 100*top.Fraction, top.Fraction*pr.Row.Over)
			}
			p("| share of %d samples | ≈ ns | where |\n|---|---|---|\n", pr.Samples)
			for _, s := range pr.Shares {
				p("| %.1f%% | %.0f | %s |\n", 100*s.Fraction, s.Fraction*pr.Row.Over, cell(s.What))
			}
			p("\n")
		}
	}
	if len(rep.Errors) > 0 {
		p("\n## Failures\n\n")
		for _, e := range rep.Errors {
			p("- %s\n", e)
		}
	}
	return b.String()
}

func overhead(ratio float64) string {
	if math.IsNaN(ratio) {
		return "—"
	}
	return fmt.Sprintf("%+.1f%%", 100*(1-ratio))
}

// jsonReport is the machine-readable form of the table (-json).
type jsonReport struct {
	Smoke   bool          `json:"smoke"`
	Packet  []jsonPacket  `json:"packet"`
	Floor   []jsonFloor   `json:"map_floor"`
	Traffic []jsonTraffic `json:"traffic"`
	Control []jsonControl `json:"control"`
	Errors  []string      `json:"errors"`
}

type jsonPacket struct {
	Name     string  `json:"name"`
	CtdNs    float64 `json:"ctd_ns"`
	FloorNs  float64 `json:"floor_ns"`
	OverNs   float64 `json:"over_ns"`
	V1Ns     float64 `json:"first_release_ns,omitempty"`
	V1OverNs float64 `json:"first_release_over_ns,omitempty"`
	GoalNs   int64   `json:"goal_ns,omitempty"`
	Met      *bool   `json:"met,omitempty"`
	Error    string  `json:"error,omitempty"`
}

type jsonFloor struct {
	Name   string  `json:"name"`
	OverNs float64 `json:"over_ns"`
	Bounds string  `json:"bounds,omitempty"`
	Error  string  `json:"error,omitempty"`
}

type jsonTraffic struct {
	Setup string                     `json:"setup"`
	Tests map[string]jsonTrafficCell `json:"tests"`
	Error string                     `json:"error,omitempty"`
}

type jsonTrafficCell struct {
	Unit   string  `json:"unit"`
	Median float64 `json:"median"`
	Ratio  float64 `json:"ratio"`
	Rounds int     `json:"rounds"`
}

type jsonControl struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Unit  string  `json:"unit"`
	Met   *bool   `json:"met,omitempty"`
	Error string  `json:"error,omitempty"`
}

func (rep *report) json() jsonReport {
	out := jsonReport{Smoke: rep.Plan.smoke, Errors: rep.Errors}
	for _, r := range rep.Packet {
		j := jsonPacket{Name: r.Case.Name, CtdNs: r.Ctd, FloorNs: r.Floor, OverNs: r.Over, V1Ns: r.V1, V1OverNs: r.V1Over,
			GoalNs: r.Case.Goal.Nanoseconds(), Error: r.Err}
		if r.Case.Goal > 0 && r.Err == "" {
			met := r.Met()
			j.Met = &met
		}
		out.Packet = append(out.Packet, j)
	}
	for _, r := range rep.Floor {
		out.Floor = append(out.Floor, jsonFloor{Name: r.Case.Name, OverNs: r.Over, Bounds: r.Case.Bounds, Error: r.Err})
	}
	for _, r := range rep.Traffic {
		j := jsonTraffic{Setup: r.Setup.Name, Tests: map[string]jsonTrafficCell{}, Error: r.Err}
		for _, t := range bench.TrafficTests {
			if c, ok := r.Cells[t.Name]; ok && !math.IsNaN(c.Median) {
				ratio := c.Ratio
				if math.IsNaN(ratio) {
					ratio = 0
				}
				j.Tests[t.Name] = jsonTrafficCell{Unit: t.Unit, Median: c.Median, Ratio: ratio, Rounds: c.Rounds}
			}
		}
		out.Traffic = append(out.Traffic, j)
	}
	for _, r := range rep.Control {
		j := jsonControl{Name: r.Case.Name, Value: r.Value, Unit: r.Case.Unit, Error: r.Err}
		if r.Case.Goal > 0 && r.Err == "" {
			met := r.Met()
			j.Met = &met
		}
		out.Control = append(out.Control, j)
	}
	return out
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// hotTwin finds the measured "repeated in-kernel" row of the same kind and
// table sizes as c.
func (rep *report) hotTwin(c bench.PacketCase) (packetRow, bool) {
	for _, r := range rep.Packet {
		h := r.Case
		if h.Hot && !c.Hot && h.Kind == c.Kind && h.Flows == c.Flows && h.Prefixes == c.Prefixes && h.Policy == c.Policy && h.Listener == c.Listener && h.Flood == c.Flood && h.Owner == c.Owner && r.Err == "" {
			return r, true
		}
	}
	return packetRow{}, false
}

// callsCostExtra reports whether the kernel's mitigations make calls and
// returns expensive.
func (e environment) callsCostExtra() bool {
	for _, m := range e.Mitigations {
		if strings.Contains(m[1], "Retpolines") || strings.Contains(m[1], "Safe RET") {
			return true
		}
	}
	return false
}
