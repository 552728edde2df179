// Package bench measures ctd's cost per packet, on real traffic and in the control plane, next to baselines measured in the same run.
//
// The measurements are Go benchmarks (BenchmarkPacket, BenchmarkTraffic) that
// report medians of interleaved, repeated runs through b.ReportMetric; the
// driver in cmd/benchtable runs them with `go test -bench`, together with the
// control-plane benchmarks of other packages, and turns the output into the
// table in docs/benchmarks.md. This package holds what the benchmarks and the
// driver share: which figures exist, their names, baselines and goals.
package bench
