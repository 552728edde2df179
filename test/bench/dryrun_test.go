package bench

import (
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf/nodryrun"
	"github.com/ctd-dev/ctd/test/nettest"
)

// BenchmarkDryRunCheck measures what ctd explain's dry-run request costs
// real packets (bpf/explain.h: two context loads and compares, and the
// not-taken tests of the request on the way): this build's programs
// against the same sources built without it (bpf/nodryrun), loaded on the
// same maps and run on the same packets, interleaved as BenchmarkPacket
// interleaves ctd and the empty program. Reported: the medians over rounds
// of this build's time (ns/op), the build without the check's
// (without-ns/op), and of their difference per round (check-ns/op).
func BenchmarkDryRunCheck(b *testing.B) {
	nettest.RequireRoot(b)
	f, err := newFixture(fixtureKey{flows: DefaultFlows, prefixes: DefaultPrefixes})
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		if err := f.Close(); err != nil {
			b.Error(err)
		}
	}()
	spec, err := nodryrun.LoadCtd()
	if err != nil {
		b.Fatal(err)
	}
	var without nodryrun.CtdPrograms
	if err := spec.LoadAndAssign(&without, &ebpf.CollectionOptions{MapReplacements: f.dp.ByName()}); err != nil {
		b.Fatalf("load the build without the dry run on the fixture's maps: %v", err)
	}
	defer without.Close()

	for _, c := range []PacketCase{
		{Name: "tcp-est-orig/flows=1k", Kind: TCPEstablishedOrig, Flows: DefaultFlows},
		{Name: "tcp-est-reply/flows=1k", Kind: TCPEstablishedReply, Flows: DefaultFlows},
		{Name: "tcp-est-orig-hot/flows=1k", Kind: TCPEstablishedOrig, Flows: DefaultFlows, Hot: true},
	} {
		b.Run(c.Name, func(b *testing.B) {
			// The fixture as BenchmarkPacket uses it, with the build
			// without the check as the program to compare with.
			g := *f
			g.floor = without.CtdEgress
			if c.Kind == TCPEstablishedReply {
				g.floor = without.CtdIngress
			}
			s, err := newPacketSource(&g, c)
			if err != nil {
				b.Fatal(err)
			}
			size := roundSize
			if c.Hot {
				size = hotRepeat
			}
			var with, base, check []float64
			for done := 0; done < b.N; {
				n := min(size, b.N-done)
				var r roundResult
				if c.Hot {
					r, err = hotRound(s, n)
				} else {
					r, err = coldRound(s, n)
				}
				if err != nil {
					b.Fatalf("case %s: %v", c.Name, err)
				}
				with = append(with, r.ctd)
				base = append(base, r.floor)
				check = append(check, r.ctd-r.floor)
				done += n
			}
			b.ReportMetric(Median(with), "ns/op")
			b.ReportMetric(Median(base), "without-ns/op")
			b.ReportMetric(Median(check), "check-ns/op")
		})
	}
}
