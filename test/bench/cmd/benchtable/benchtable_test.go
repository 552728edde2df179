package main

import (
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseResults(t *testing.T) {
	out := `goos: linux
goarch: amd64
pkg: github.com/ctd-dev/ctd/test/bench
cpu: AMD EPYC
BenchmarkPacket/tcp-est-orig/flows=1k-2         	   20480	       270.5 ns/op	        70.00 floor-ns/op	       200.5 over-ns/op
BenchmarkTraffic/ctd-allow#01-2          	       1	     21166 Mbit/s	      8678 conn/s	    261558 pkt/s
BenchmarkLoad100k/maps+store-2         	       1	 856000000 ns/op	  5.1 MB/s	 233644 prefixes/s
BenchmarkPass
    gc_bench_test.go:90: GC pass over 1000000 entries (500000 expired): 526ms
BenchmarkX-2 --- FAIL: something
PASS
ok  	github.com/ctd-dev/ctd/test/bench	1.528s
`
	got, err := parseResults(strings.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	want := []result{
		{Name: "BenchmarkPacket/tcp-est-orig/flows=1k", N: 20480, Metrics: map[string]float64{"ns/op": 270.5, "floor-ns/op": 70, "over-ns/op": 200.5}},
		{Name: "BenchmarkTraffic/ctd-allow#01", N: 1, Metrics: map[string]float64{"Mbit/s": 21166, "conn/s": 8678, "pkt/s": 261558}},
		{Name: "BenchmarkLoad100k/maps+store", N: 1, Metrics: map[string]float64{"ns/op": 856000000, "MB/s": 5.1, "prefixes/s": 233644}},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("parseResults (-want +got):\n%s", diff)
	}
	if b := got[1].Base(); b != "BenchmarkTraffic/ctd-allow" {
		t.Errorf("Base() = %q", b)
	}
	if b := got[0].Base(); b != got[0].Name {
		t.Errorf("Base() of a name without #NN = %q", b)
	}
	if _, err := parseResults(strings.NewReader("BenchmarkY-2 10 abc ns/op\n")); err == nil {
		t.Error("a result line with a value that is no number parsed")
	}
}

func TestWording(t *testing.T) {
	for _, tc := range []struct {
		name    string
		met     bool
		result  string
		measure func() (bool, string)
	}{
		{"cost under goal", true, "met", func() (bool, string) { return atMost(40, 60, ns) }},
		{"cost at goal", true, "met", func() (bool, string) { return atMost(60, 60, ns) }},
		{"cost over goal", false, "missed by 140", func() (bool, string) { return atMost(200, 60, ns) }},
		{"duration over goal", false, "missed by 356 ms", func() (bool, string) { return atMost(0.856, 0.5, seconds) }},
		{"ratio above goal", true, "met", func() (bool, string) { return atLeast(0.97, 0.95) }},
		{"ratio below goal", false, "missed by 0.050 (5.3%)", func() (bool, string) { return atLeast(0.9, 0.95) }},
		{"ratio just below goal", false, "missed by less than 0.001 (0.011%)", func() (bool, string) { return atLeast(0.9499, 0.95) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			met, result := tc.measure()
			if met != tc.met || result != tc.result {
				t.Errorf("got %v %q, want %v %q", met, result, tc.met, tc.result)
			}
		})
	}
}

func TestCategorise(t *testing.T) {
	script := `
	ffffffff81111111 trie_lookup_elem+0x20
	ffffffffa0000000 bpf_prog_0123abcd_ctd_ingress+0x100
	ffffffff82222222 bpf_test_run+0x50

	ffffffff81333333 __pi_memcpy+0x1
	ffffffff81444444 bpf_skb_load_bytes+0x10
	ffffffffa0000000 bpf_prog_0123abcd_ctd_ingress+0x10

	ffffffffa0000000 bpf_prog_0123abcd_ctd_ingress+0x30
	ffffffff82222222 bpf_test_run+0x50

	ffffffff81555555 htab_map_hash+0x5
	ffffffff81666666 __htab_map_lookup_elem+0x5
	ffffffffa0000000 bpf_prog_0123abcd_ctd_egress+0x30

	ffffffffa1111111 bpf_prog_99999999_empty_tc+0x4
	ffffffff82222222 bpf_test_run+0x50
`
	n, shares := categorise(strings.NewReader(script))
	if n != 4 {
		t.Fatalf("%d samples inside ctd, want 4", n)
	}
	got := map[string]float64{}
	for _, s := range shares {
		got[s.What] = s.Fraction
	}
	want := map[string]float64{
		categories[0].what: 0.25, // trie
		categories[3].what: 0.25, // skb_load_bytes (the callee, not memcpy)
		categories[2].what: 0.25, // hash lookup
		bodyCategory:       0.25,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("categorise (-want +got):\n%s", diff)
	}
}

func TestTrafficTables(t *testing.T) {
	var res []result
	add := func(round int, setup, test, unit string, v float64) {
		res = append(res, result{Name: fmt.Sprintf("BenchmarkTraffic/round=%d/%s/%s", round, setup, test), N: 1, Metrics: map[string]float64{unit: v, "ns/op": 0}})
	}
	// Two rounds; the second is 10% faster for everyone. ctd-allow is 0.9
	// of none in round 1 and 0.96 in round 2; nf-conntrack 0.95 in both.
	for r, scale := range []float64{1, 1.1} {
		add(r+1, "none", "tcp_crr", "conn/s", 1000*scale)
		add(r+1, "nf-conntrack", "tcp_crr", "conn/s", 950*scale)
		add(r+1, "ctd-deny-rule", "tcp_crr", "conn/s", 1000*scale)
		for _, tt := range []struct{ test, unit string }{{"tcp_stream", "Mbit/s"}, {"udp_small", "pkt/s"}} {
			for _, s := range []string{"none", "ctd-allow", "ctd-deny-rule", "nf-conntrack"} {
				add(r+1, s, tt.test, tt.unit, 100*scale)
			}
		}
	}
	add(1, "ctd-allow", "tcp_crr", "conn/s", 900)
	add(2, "ctd-allow", "tcp_crr", "conn/s", 1056)
	rows, goals := trafficTables(res)
	if len(rows) != 4 {
		t.Fatalf("%d rows", len(rows))
	}
	allow := rows[1]
	if allow.Setup.Name != "ctd-allow" || allow.Err != "" {
		t.Fatalf("row 1: %+v", allow)
	}
	crr := allow.Cells["tcp_crr"]
	if crr.Rounds != 2 || crr.Median != (900+1056)/2.0 || math.Abs(crr.Ratio-0.93) > 1e-9 {
		t.Errorf("ctd-allow tcp_crr: %+v, want median 978 and ratio 0.93 (median of 0.90 and 0.96)", crr)
	}
	results := map[string]string{}
	for _, g := range goals {
		results[g.Setup.Name+": "+g.Desc] = g.Result
	}
	for goal, want := range map[string]string{
		"ctd-allow: TCP connection rate (connect, request, response, close) ≥ 0.95 × no program":                          "missed by 0.020 (2.1%)",
		"ctd-allow: TCP connection rate (connect, request, response, close) ≥ nf_conntrack (nftables ct state rules)":     "missed by 0.021 (2.1%)",
		"ctd-deny-rule: TCP connection rate (connect, request, response, close) ≥ nf_conntrack (nftables ct state rules)": "met",
		"ctd-deny-rule: single-stream TCP throughput ≥ 0.95 × no program":                                                 "met",
	} {
		if got := results[goal]; got != want {
			t.Errorf("%s: %q, want %q", goal, got, want)
		}
	}
}
