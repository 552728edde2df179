package bpf_test

import (
	"maps"
	"slices"
	"testing"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/bpf/upgradetest"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

// TestParsersAgree runs every seed frame, whole and cut at every length, in
// both directions, through the production build, which reads linear skbs
// directly, and through bpf/upgradetest, which reads every header with
// bpf_skb_load_bytes as the production build does for non-linear skbs; it
// requires the same verdicts, counters and conntrack entries from both.
func TestParsersAgree(t *testing.T) {
	direct := dptest.New(t)
	spec, err := upgradetest.LoadCtd()
	if err != nil {
		t.Fatal(err)
	}
	skbLoad := dptest.NewFrom(t, spec)

	flows := func(d *dptest.Datapath) []ctmap.Flow {
		fs := d.Flows(t)
		for i := range fs {
			fs[i].FirstSeen, fs[i].LastSeen = 0, 0
		}
		return fs
	}
	runs := 0
	for name, frame := range seedFrames(t) {
		for n := len(frame); n >= 0; n-- {
			for _, dir := range []bpf.Direction{ingress, egress} {
				mDirect, mSkb := direct.Counters(t), skbLoad.Counters(t)
				v1, err1 := direct.RunCtx(t, dir, frame[:n], nil)
				v2, err2 := skbLoad.RunCtx(t, dir, frame[:n], nil)
				if (err1 == nil) != (err2 == nil) {
					t.Fatalf("%s cut to %d bytes, %s: test run errors differ: %v / %v", name, n, dir, err1, err2)
				}
				if err1 != nil {
					continue
				}
				runs++
				if v1 != v2 {
					t.Fatalf("%s cut to %d bytes, %s: verdict %s with direct reads, %s with skb loads",
						name, n, dir, dptest.VerdictName(v1), dptest.VerdictName(v2))
				}
				d1, d2 := dptest.Delta(mDirect, direct.Counters(t)), dptest.Delta(mSkb, skbLoad.Counters(t))
				if !maps.Equal(d1, d2) {
					t.Fatalf("%s cut to %d bytes, %s: counters %v with direct reads, %v with skb loads", name, n, dir, d1, d2)
				}
				f1, f2 := flows(direct), flows(skbLoad)
				if !slices.Equal(f1, f2) {
					t.Fatalf("%s cut to %d bytes, %s: entries\n%+v with direct reads\n%+v with skb loads", name, n, dir, f1, f2)
				}
				if len(f1) > 0 {
					direct.ResetCT(t)
					skbLoad.ResetCT(t)
				}
			}
		}
	}
	t.Logf("%d frames agreed", runs)
}
