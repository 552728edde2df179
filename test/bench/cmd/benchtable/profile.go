package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/ctd-dev/ctd/test/bench"
)

// A profile says where the time of one per-packet case goes: perf samples
// the CPU (cpu-clock, with call chains) while the case runs, and every
// sample whose chain passes through a ctd program is put in the category
// of the function the program called (a helper or an inlined map lookup's
// callee), or the program body when the sample is in the JIT code itself.
type profile struct {
	Case    bench.PacketCase
	Row     packetRow
	Samples int // samples inside ctd's program
	Shares  []share
	Err     string
}

type share struct {
	What     string
	Fraction float64
}

// categories maps the function a ctd program calls to what it does.
var categories = []struct {
	what string
	re   *regexp.Regexp
}{
	{"ipcache LPM trie lookups, CIDRs (trie_lookup_elem)", regexp.MustCompile(`^trie_lookup_elem`)},
	{"conntrack insert (htab_lru_map_update_elem: LRU free-list pop, copy, link)", regexp.MustCompile(`^htab_lru_map_update_elem|^bpf_lru_|^prealloc_lru_pop`)},
	{"hash lookups (conntrack, ipcache host entries, and policy when rules exist: jhash of the key, bucket walk)", regexp.MustCompile(`^__htab_map_lookup_elem|^htab_.*lookup|^htab_map_hash|^lookup_nulls_elem_raw`)},
	{"packet reads (bpf_skb_load_bytes)", regexp.MustCompile(`skb_load_bytes|skb_header_pointer`)},
	{"clock (bpf_ktime_get_*)", regexp.MustCompile(`ktime_get|read_tsc`)},
	{"events (ring buffer reserve/submit)", regexp.MustCompile(`ringbuf|irq_work`)},
	{"array lookups (config, metrics, rate limit)", regexp.MustCompile(`^(percpu_)?array_map_lookup`)},
}

const bodyCategory = "program body (JIT code: parsing, key building, state machine, counters and atomics)"

var ctdProg = regexp.MustCompile(`^bpf_prog_[0-9a-f]+_ctd_(ingress|egress)`)

// profileCase runs one per-packet case under perf and categorises its samples.
func profileCase(g *goTest, s *scratch, p plan, row packetRow) profile {
	pr := profile{Case: row.Case, Row: row}
	perf, err := exec.LookPath("perf")
	if err != nil {
		pr.Err = "no profile: perf is not installed (Debian package linux-perf)"
		return pr
	}
	testBin := filepath.Join(s.dir, "bench.test")
	build := exec.Command("go", "test", "-c", "-o", testBin, "./test/bench")
	build.Dir = g.root
	if out, err := build.CombinedOutput(); err != nil {
		pr.Err = fmt.Sprintf("no profile: go test -c ./test/bench: %v: %s", err, lastLines(out, 3))
		return pr
	}
	data := filepath.Join(s.dir, "perf.data")
	parts := strings.Split(row.Case.Name, "/")
	pat := "^BenchmarkPacket$"
	for _, part := range parts {
		pat += "/^" + regexp.QuoteMeta(part) + "$"
	}
	rec := exec.Command(perf, "record", "-q", "-e", "cpu-clock", "-F", "10000", "-g", "-o", data, "--",
		testBin, "-test.run", "^$", "-test.bench", pat, "-test.benchtime", strconv.Itoa(p.profileSamples)+"x", "-test.count", "1",
		"-packet.v1=false") // the first release's programs have the same names
	rec.Dir = filepath.Join(g.root, "test", "bench")
	fmt.Fprintf(g.log, "+ perf record ... %s -test.bench %s\n", filepath.Base(testBin), pat)
	if out, err := rec.CombinedOutput(); err != nil {
		pr.Err = fmt.Sprintf("no profile: perf record: %v: %s", err, lastLines(out, 3))
		return pr
	}
	script := exec.Command(perf, "script", "-i", data, "-F", "ip,sym")
	var out bytes.Buffer
	script.Stdout = &out
	if err := script.Run(); err != nil {
		pr.Err = fmt.Sprintf("no profile: perf script: %v", err)
		return pr
	}
	pr.Samples, pr.Shares = categorise(&out)
	if pr.Samples == 0 {
		pr.Err = "no profile: perf took no sample inside ctd's program (are BPF JIT symbols exported? net.core.bpf_jit_kallsyms)"
	}
	return pr
}

// categorise reads `perf script -F ip,sym` output: one block per sample,
// one frame per line from the leaf up, blocks separated by blank lines.
func categorise(r io.Reader) (int, []share) {
	counts := map[string]int{}
	total := 0
	var frames []string
	flush := func() {
		defer func() { frames = frames[:0] }()
		at := -1
		for i, f := range frames {
			if ctdProg.MatchString(f) {
				at = i
				break
			}
		}
		if at < 0 {
			return
		}
		total++
		if at == 0 {
			counts[bodyCategory]++
			return
		}
		// Attribute the sample to the function the program called.
		callee := frames[at-1]
		for _, c := range categories {
			if c.re.MatchString(callee) {
				counts[c.what]++
				return
			}
		}
		counts["other: "+callee]++
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			flush()
			continue
		}
		// "ffffffff81234567 symbol+0x12" or "ffffffff81234567 [unknown]"
		_, sym, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		sym = strings.TrimSpace(sym)
		if i := strings.IndexByte(sym, '+'); i > 0 {
			sym = sym[:i]
		}
		frames = append(frames, sym)
	}
	flush()
	var shares []share
	other := 0
	for what, n := range counts {
		f := float64(n) / float64(max(total, 1))
		if strings.HasPrefix(what, "other: ") && f < 0.02 {
			other += n
			continue
		}
		shares = append(shares, share{What: what, Fraction: f})
	}
	if other > 0 {
		shares = append(shares, share{What: "other (each under 2%)", Fraction: float64(other) / float64(total)})
	}
	sort.Slice(shares, func(i, j int) bool { return shares[i].Fraction > shares[j].Fraction })
	return total, shares
}
