package bpf_test

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/bpf/nodryrun"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

// The statistics at the end of a verifier log (LogLevelStats).
var (
	verifierTime  = regexp.MustCompile(`verification time (\d+) usec`)
	verifierInsns = regexp.MustCompile(`processed (\d+) insns \(limit \d+\) max_states_per_insn \d+ total_states (\d+)`)
)

// verifierRun is what the verifier reported for one program.
type verifierRun struct {
	usec, insns, states int
}

func parseVerifierLog(log string) (verifierRun, error) {
	t, n := verifierTime.FindStringSubmatch(log), verifierInsns.FindStringSubmatch(log)
	if t == nil || n == nil {
		return verifierRun{}, fmt.Errorf("no statistics in the verifier's log:\n%s", log)
	}
	var r verifierRun
	r.usec, _ = strconv.Atoi(t[1])
	r.insns, _ = strconv.Atoi(n[1])
	r.states, _ = strconv.Atoi(n[2])
	return r, nil
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if n := len(s); n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[len(s)/2]
}

// BenchmarkLoadDatapath loads the datapath (programs and maps, sized as
// dptest sizes them), as most tests of this package do, alternately this
// build and the same sources without ctd explain's dry run (bpf/nodryrun,
// the floor of what the dry run costs the verifier), and reports for each
// (prefix nodryrun- for the latter) the median wall time of a load
// (ms/load) and, for each TC program, what its verifier reported: the
// instructions it processed (-insns), the states it kept (-states) and the
// median of its verification time (-verify-ms). dryrun-ms/load is the
// median over rounds of the difference of the two loads.
//
//	go test -run '^$' -bench LoadDatapath -benchtime 20x ./bpf/
func BenchmarkLoadDatapath(b *testing.B) {
	nettest.RequireRoot(b)
	builds := []struct {
		prefix string
		load   func() (*ebpf.CollectionSpec, error)
	}{
		{"", bpf.LoadCtd},
		{"nodryrun-", nodryrun.LoadCtd},
	}
	progs := []string{"ctd_ingress", "ctd_egress"}
	took := make([][]float64, len(builds))
	verify := map[string][]float64{}
	last := map[string]verifierRun{}
	var diff []float64
	for b.Loop() {
		for i, build := range builds {
			spec, err := build.load()
			if err != nil {
				b.Fatal(err)
			}
			loader.Options{CTMax: 1024, CTUnconfirmedMax: 256, IPCacheMax: 16384, RingBufSize: 4096}.WithDefaults().SizeSpec(spec)
			t0 := time.Now()
			coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
				Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats},
			})
			took[i] = append(took[i], float64(time.Since(t0))/float64(time.Millisecond))
			if err != nil {
				b.Fatalf("load %sctd: %v", build.prefix, err)
			}
			for _, name := range progs {
				r, err := parseVerifierLog(coll.Programs[name].VerifierLog)
				coll.Programs[name].VerifierLog = ""
				if err != nil {
					b.Fatalf("%s%s: %v", build.prefix, name, err)
				}
				verify[build.prefix+name] = append(verify[build.prefix+name], float64(r.usec)/1000)
				last[build.prefix+name] = r
			}
			coll.Close()
		}
		diff = append(diff, took[0][len(took[0])-1]-took[1][len(took[1])-1])
	}
	var summary []string
	for i, build := range builds {
		b.ReportMetric(median(took[i]), build.prefix+"ms/load")
		line := fmt.Sprintf("%sctd: load %.0f ms (min %.0f, max %.0f)", build.prefix, median(took[i]), slices.Min(took[i]), slices.Max(took[i]))
		for _, name := range progs {
			r, v := last[build.prefix+name], verify[build.prefix+name]
			b.ReportMetric(float64(r.insns), build.prefix+name+"-insns")
			b.ReportMetric(float64(r.states), build.prefix+name+"-states")
			b.ReportMetric(median(v), build.prefix+name+"-verify-ms")
			line += fmt.Sprintf("; %s %d insns, %d states, verified in %.0f ms (min %.0f, max %.0f)",
				name, r.insns, r.states, median(v), slices.Min(v), slices.Max(v))
		}
		summary = append(summary, line)
	}
	b.ReportMetric(median(diff), "dryrun-ms/load")
	b.Logf("over %d rounds:\n%s", len(diff), strings.Join(summary, "\n"))
}
