package bpf_test

import (
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/bpf/nodryrun"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

// verify loads the datapath of spec (its maps sized as dptest sizes them)
// and returns what the verifier reported for each TC program.
func verify(tb testing.TB, load func() (*ebpf.CollectionSpec, error)) map[string]verifierRun {
	tb.Helper()
	spec, err := load()
	if err != nil {
		tb.Fatal(err)
	}
	loader.Options{CTMax: 1024, CTUnconfirmedMax: 256, IPCacheMax: 16384, RingBufSize: 4096}.WithDefaults().SizeSpec(spec)
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats},
	})
	if err != nil {
		tb.Fatalf("load: %v", err)
	}
	defer coll.Close()
	runs := map[string]verifierRun{}
	for _, name := range []string{"ctd_ingress", "ctd_egress"} {
		r, err := parseVerifierLog(coll.Programs[name].VerifierLog)
		if err != nil {
			tb.Fatalf("%s: %v", name, err)
		}
		runs[name] = r
	}
	return runs
}

// TestDryRunVerifierCost holds the instructions the verifier processes for
// each TC program to at most 10% more than for the same sources without
// ctd explain's dry run (bpf/nodryrun). A request the verifier can follow
// (bpf/explain.h: a pointer or flag in a register, a word in the stack it
// tracks) makes it verify every path twice, once as a real packet and once
// as a dry run: 53% and 63% more, and a slower load of every datapath.
func TestDryRunVerifierCost(t *testing.T) {
	nettest.RequireRoot(t)
	with, without := verify(t, bpf.LoadCtd), verify(t, nodryrun.LoadCtd)
	for name, w := range with {
		wo := without[name]
		t.Logf("%s: %d instructions verified, %d without the dry run (%+.1f%%)", name, w.insns, wo.insns, 100*float64(w.insns-wo.insns)/float64(wo.insns))
		if w.insns*10 > wo.insns*11 {
			t.Errorf("%s: the verifier processed %d instructions, %d without the dry run: more than 10%% more, it follows the dry-run request (bpf/explain.h: struct explain)",
				name, w.insns, wo.insns)
		}
	}
}
