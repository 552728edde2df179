package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/bench"
)

// ctListEntries is the table size `ct list` is measured on.
const ctListEntries = 1_000_000

// scratch holds what the driver creates outside go test (a built ctd, a
// pin path) and removes it again.
type scratch struct {
	dir  string // temporary directory
	pins []string
}

func newScratch() (*scratch, error) {
	dir, err := os.MkdirTemp("", "benchtable-")
	if err != nil {
		return nil, err
	}
	return &scratch{dir: dir}, nil
}

// pinPath returns a fresh pin path below /sys/fs/bpf, removed by cleanup.
func (s *scratch) pinPath() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	p := filepath.Join("/sys/fs/bpf", "ctdtest-bench-"+hex.EncodeToString(b[:]))
	s.pins = append(s.pins, p)
	return p
}

func (s *scratch) cleanup() {
	for _, p := range s.pins {
		os.RemoveAll(p)
	}
	os.RemoveAll(s.dir)
}

// buildCtd builds cmd/ctd once.
func (s *scratch) buildCtd(g *goTest) (string, error) {
	bin := filepath.Join(s.dir, "ctd")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/ctd")
	cmd.Dir = g.root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/ctd: %v: %s", err, lastLines(out, 3))
	}
	return bin, nil
}

// countingWriter counts bytes and lines written to it.
// countingWriter counts what is written to it, and keeps it if keep is set.
type countingWriter struct {
	bytes, lines int
	keep         bool
	kept         []byte
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.bytes += len(p)
	w.lines += bytes.Count(p, []byte{'\n'})
	if w.keep {
		w.kept = append(w.kept, p...)
	}
	return len(p), nil
}

// measureCTCommands measures `ctd ct list`, `ctd ct list -o json` and
// `ctd ct top` with the built binary over a pinned table of a million
// entries, wall clock from exec to exit with the output read through a
// pipe. The rows come back in that order.
func measureCTCommands(g *goTest, s *scratch, p plan, cases map[string]bench.ControlCase) []controlRow {
	type command struct {
		row  controlRow
		args []string
		// check says why out is not the output of the whole table, or "".
		check func(out *countingWriter) string
	}
	// Every entry must have been printed: at least a line each in text, at
	// least ~100 bytes each in JSON.
	listed := func(minLines int) func(*countingWriter) string {
		return func(out *countingWriter) string {
			if out.lines < minLines || out.bytes < 100*ctListEntries {
				return fmt.Sprintf("printed %d lines, %d bytes for %d entries", out.lines, out.bytes, ctListEntries)
			}
			return ""
		}
	}
	cmds := []*command{
		{controlRow{Case: cases["ct-list"], How: "the built `ctd ct list` over a pinned table of 1M entries (a quarter each TCP, UDP, ICMP over IPv4 and TCP over IPv6), wall clock from exec to exit, output read through a pipe"},
			[]string{"ct", "list"}, listed(ctListEntries)},
		{controlRow{Case: cases["ct-list-json"], How: "as above, `ctd ct list -o json`"},
			[]string{"ct", "list", "-o", "json"}, listed(0)},
		{controlRow{Case: cases["ct-top"], How: "as above, `ctd ct top --by dport -o json` (every flow counted)"},
			[]string{"ct", "top", "--by", "dport", "-n", "0", "-o", "json"},
			func(out *countingWriter) string {
				var rows []struct{ Flows int }
				if err := json.Unmarshal(out.kept, &rows); err != nil {
					return "printed no JSON array: " + err.Error()
				}
				n := 0
				for _, r := range rows {
					n += r.Flows
				}
				if n != ctListEntries {
					return fmt.Sprintf("counted %d flows of %d", n, ctListEntries)
				}
				return ""
			}},
	}
	rows := func() []controlRow {
		out := make([]controlRow, len(cmds))
		for i, c := range cmds {
			out[i] = c.row
		}
		return out
	}
	fail := func(msg string, failed bool) []controlRow {
		for _, c := range cmds {
			c.row.Err, c.row.Failed = msg, failed
		}
		return rows()
	}
	bin, err := s.buildCtd(g)
	if err != nil {
		return fail("not measured: "+err.Error(), true)
	}
	pin := s.pinPath()
	maps, err := loader.OpenMaps(loader.Options{PinPath: pin, CTMax: 2 * ctListEntries})
	if err != nil {
		return fail("not measured: "+err.Error(), true)
	}
	err = bench.FillConntrack(maps.Conntrack(), ctListEntries)
	maps.Close()
	if err != nil {
		return fail("not measured: "+err.Error(), true)
	}
	defer os.RemoveAll(pin)
	for _, c := range cmds {
		name := strings.Join(c.args, " ")
		if out, err := exec.Command(bin, append(c.args[:2:2], "--help")...).CombinedOutput(); err != nil {
			c.row.Err = fmt.Sprintf("not measured: ctd has no '%s' command yet (%s)", strings.Join(c.args[:2], " "), lastLines(out, 1))
			continue
		}
		var times []float64
		for range p.ctListRuns {
			out := countingWriter{keep: c.row.Case.Name == "ct-top"}
			var stderr bytes.Buffer
			cmd := exec.Command(bin, append([]string{"--pin-path", pin}, c.args...)...)
			cmd.Stdout, cmd.Stderr = &out, &stderr
			start := time.Now()
			err := cmd.Run()
			d := time.Since(start)
			if err != nil {
				c.row.Err, c.row.Failed = fmt.Sprintf("not measured: ctd %s: %v: %s", name, err, strings.TrimSpace(stderr.String())), true
				break
			}
			if why := c.check(&out); why != "" {
				c.row.Err, c.row.Failed = fmt.Sprintf("not measured: ctd %s %s", name, why), true
				break
			}
			times = append(times, d.Seconds())
		}
		if c.row.Err == "" {
			c.row.Value, c.row.Runs = bench.Median(times), len(times)
		}
	}
	return rows()
}

// memlockPerEntry creates ct4_v2 as the loader specifies it with a million
// entries and divides the memlock the kernel reports (fdinfo) by its size.
// The LRU hash is preallocated, so the figure is the same empty or full.
func memlockPerEntry(c bench.ControlCase) controlRow {
	row := controlRow{Case: c, How: "memlock of ct4_v2 created as the loader specifies it with max_entries 1M (fdinfo), divided by max_entries; the LRU hash is preallocated, so empty and full cost the same", Runs: 1}
	spec, err := loader.Options{}.WithDefaults().Spec()
	if err != nil {
		row.Err, row.Failed = "not measured: "+err.Error(), true
		return row
	}
	ms := spec.Maps[loader.CT4Map].Copy()
	ms.MaxEntries = ctListEntries
	ms.Pinning = ebpf.PinNone
	m, err := ebpf.NewMap(ms)
	if err != nil {
		row.Err, row.Failed = fmt.Sprintf("not measured: create %s with %d entries: %v", ms.Name, ms.MaxEntries, err), true
		return row
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		row.Err, row.Failed = "not measured: map info: "+err.Error(), true
		return row
	}
	memlock, ok := info.Memlock()
	if !ok {
		row.Err, row.Failed = "not measured: the kernel reports no memlock for maps", true
		return row
	}
	row.Value = float64(memlock) / float64(ms.MaxEntries)
	row.How += fmt.Sprintf(" (key %d B + value %d B)", ms.KeySize, ms.ValueSize)
	return row
}
