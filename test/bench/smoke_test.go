package bench

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/ctd-dev/ctd/test/nettest"
)

// smokeReport is the part of benchtable's -json output the smoke test reads.
type smokeReport struct {
	Smoke  bool `json:"smoke"`
	Packet []struct {
		Name  string  `json:"name"`
		CtdNs float64 `json:"ctd_ns"`
		V1Ns  float64 `json:"first_release_ns"`
		Error string  `json:"error"`
	} `json:"packet"`
	Floor []struct {
		Name   string  `json:"name"`
		OverNs float64 `json:"over_ns"`
		Error  string  `json:"error"`
	} `json:"map_floor"`
	Traffic []struct {
		Setup string                     `json:"setup"`
		Tests map[string]json.RawMessage `json:"tests"`
		Error string                     `json:"error"`
	} `json:"traffic"`
	Control []struct {
		Name  string `json:"name"`
		Error string `json:"error"`
	} `json:"control"`
	Errors []string `json:"errors"`
}

// TestSmoke runs `benchtable -smoke` end to end, as `make bench
// BENCH_SMOKE=1` does, and checks that the table has every row and that
// every figure this package measures has a value. It asserts no timing.
func TestSmoke(t *testing.T) {
	nettest.RequireRoot(t)
	nettest.RequireTool(t, "nft", "nftables")
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	dir := t.TempDir()
	md, js := filepath.Join(dir, "benchmarks.md"), filepath.Join(dir, "benchmarks.json")
	cmd := exec.Command(goBin, "run", "./cmd/benchtable", "-smoke", "-q", "-out", md, "-json", js)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("benchtable -smoke: %v\nstderr:\n%s\nstdout:\n%s", err, stderr.Bytes(), stdout.Bytes())
	}
	doc, err := os.ReadFile(md)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(doc, stdout.Bytes()) {
		t.Errorf("benchtable printed something else than it wrote to %s", md)
	}
	raw, err := os.ReadFile(js)
	if err != nil {
		t.Fatal(err)
	}
	var rep smokeReport
	if err := json.Unmarshal(raw, &rep); err != nil {
		t.Fatalf("benchtable -json: %v", err)
	}
	if !rep.Smoke || len(rep.Errors) > 0 {
		t.Errorf("smoke %v, errors %q", rep.Smoke, rep.Errors)
	}

	// Every row, in the table and in the JSON.
	text := string(doc)
	for _, want := range []string{"## Goals", "## Per packet", "## Map operations alone", "## Identity resolution", "## Real traffic", "## Control plane", "| kernel |", "| CPU |"} {
		if !strings.Contains(text, want) {
			t.Errorf("the table has no %q", want)
		}
	}
	if len(rep.Packet) != len(PacketCases) {
		t.Fatalf("%d per-packet rows, want %d", len(rep.Packet), len(PacketCases))
	}
	for i, c := range PacketCases {
		r := rep.Packet[i]
		if r.Name != c.Name || r.Error != "" || r.CtdNs <= 0 {
			t.Errorf("per-packet row %d: %+v, want %s measured", i, r, c.Name)
		}
		if c.V1 != (r.V1Ns > 0) {
			t.Errorf("per-packet row %d (%s): first release %v ns, want a figure exactly for the rows marked V1", i, c.Name, r.V1Ns)
		}
		if !strings.Contains(text, "| "+c.Title+" |") {
			t.Errorf("the table has no row %q", c.Title)
		}
	}
	if len(rep.Floor) != len(FloorCases) {
		t.Fatalf("%d map-operation rows, want %d", len(rep.Floor), len(FloorCases))
	}
	for i, c := range FloorCases {
		if r := rep.Floor[i]; r.Name != c.Name || r.Error != "" {
			t.Errorf("map-operation row %d: %+v, want %s measured", i, r, c.Name)
		}
	}
	if strings.Contains(text, "BenchmarkIPCacheLookup/") {
		t.Errorf("an identity resolution row was not measured")
	}
	if len(rep.Traffic) != len(Setups) {
		t.Fatalf("%d traffic rows, want %d", len(rep.Traffic), len(Setups))
	}
	for i, s := range Setups {
		r := rep.Traffic[i]
		if r.Setup != s.Name || r.Error != "" || len(r.Tests) != len(TrafficTests) {
			t.Errorf("traffic row %d: %+v, want %s with %d figures", i, r, s.Name, len(TrafficTests))
		}
		if !strings.Contains(text, "| "+s.Title+" |") {
			t.Errorf("the table has no row %q", s.Title)
		}
	}
	if len(rep.Control) != len(ControlCases) {
		t.Fatalf("%d control-plane rows, want %d", len(rep.Control), len(ControlCases))
	}
	for i, c := range ControlCases {
		r := rep.Control[i]
		// A figure another package has not landed yet is a row that says so.
		if r.Name != c.Name || (r.Error != "" && !strings.HasPrefix(r.Error, "not measured: ")) {
			t.Errorf("control-plane row %d: %+v, want %s", i, r, c.Name)
		}
		if !strings.Contains(text, "| "+c.Title+" |") {
			t.Errorf("the table has no row %q", c.Title)
		}
	}
}
