package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
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
type countingWriter struct{ bytes, lines int }

func (w *countingWriter) Write(p []byte) (int, error) {
	w.bytes += len(p)
	w.lines += bytes.Count(p, []byte{'\n'})
	return len(p), nil
}

// ctList measures `ctd ct list` and `ctd ct list -o json` with the built
// binary over a pinned table of a million entries, wall clock from exec to
// exit with the output read through a pipe.
func measureCTList(g *goTest, s *scratch, p plan, cases map[string]bench.ControlCase) []controlRow {
	text := controlRow{Case: cases["ct-list"], How: "the built `ctd ct list` over a pinned table of 1M entries (a quarter each TCP, UDP, ICMP over IPv4 and TCP over IPv6), wall clock from exec to exit, output read through a pipe"}
	json := controlRow{Case: cases["ct-list-json"], How: "as above, `ctd ct list -o json`"}
	fail := func(msg string, failed bool) []controlRow {
		text.Err, text.Failed = msg, failed
		json.Err, json.Failed = msg, failed
		return []controlRow{text, json}
	}
	bin, err := s.buildCtd(g)
	if err != nil {
		return fail("not measured: "+err.Error(), true)
	}
	if out, err := exec.Command(bin, "ct", "list", "--help").CombinedOutput(); err != nil {
		return fail(fmt.Sprintf("not measured: ctd has no 'ct list' command yet (%s)", lastLines(out, 1)), false)
	}
	pin := s.pinPath()
	maps, err := loader.OpenMaps(loader.Options{PinPath: pin, CTMax: 2 * ctListEntries})
	if err != nil {
		return fail("not measured: "+err.Error(), true)
	}
	err = bench.FillConntrack(maps.CT(), ctListEntries)
	maps.Close()
	if err != nil {
		return fail("not measured: "+err.Error(), true)
	}
	for _, row := range []*controlRow{&text, &json} {
		args := []string{"--pin-path", pin, "ct", "list"}
		if row == &json {
			args = append(args, "-o", "json")
		}
		var times []float64
		for range p.ctListRuns {
			var out countingWriter
			var stderr bytes.Buffer
			cmd := exec.Command(bin, args...)
			cmd.Stdout, cmd.Stderr = &out, &stderr
			start := time.Now()
			err := cmd.Run()
			d := time.Since(start)
			if err != nil {
				row.Err, row.Failed = fmt.Sprintf("not measured: ctd %s: %v: %s", strings.Join(args[2:], " "), err, strings.TrimSpace(stderr.String())), true
				break
			}
			// Every entry must have been printed: at least a line each in
			// text, at least ~100 bytes each in JSON.
			if (row == &text && out.lines < ctListEntries) || out.bytes < 100*ctListEntries {
				row.Err, row.Failed = fmt.Sprintf("not measured: ctd %s printed %d lines, %d bytes for %d entries", strings.Join(args[2:], " "), out.lines, out.bytes, ctListEntries), true
				break
			}
			times = append(times, d.Seconds())
		}
		if row.Err == "" {
			row.Value, row.Runs = bench.Median(times), len(times)
		}
	}
	os.RemoveAll(pin)
	return []controlRow{text, json}
}

// memlockPerEntry creates ct_v1 as the loader specifies it with a million
// entries and divides the memlock the kernel reports (fdinfo) by its size.
// The LRU hash is preallocated, so the figure is the same empty or full.
func memlockPerEntry(c bench.ControlCase) controlRow {
	row := controlRow{Case: c, How: "memlock of ct_v1 created as the loader specifies it with max_entries 1M (fdinfo), divided by max_entries; the LRU hash is preallocated, so empty and full cost the same", Runs: 1}
	spec, err := loader.Options{}.WithDefaults().Spec()
	if err != nil {
		row.Err, row.Failed = "not measured: "+err.Error(), true
		return row
	}
	ms := spec.Maps[loader.CTMap].Copy()
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
