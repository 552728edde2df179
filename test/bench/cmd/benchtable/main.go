// Command benchtable runs ctd's benchmarks and writes the table of docs/benchmarks.md.
//
// It runs the Go benchmarks of test/bench (per packet with
// BPF_PROG_TEST_RUN, real traffic between network namespaces) and the
// control-plane benchmarks of other packages with `go test -bench`, parses
// their output, measures what no benchmark covers (ct list of a million
// entries through the built binary, memlock per conntrack entry), profiles
// the per-packet goals it misses with perf, and prints the result as
// markdown. It needs root. With -smoke (or BENCH_SMOKE=1) every measurement
// runs briefly and nothing is written unless -out says where.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/test/bench"
)

func main() {
	smokeEnv := os.Getenv("BENCH_SMOKE")
	smoke := flag.Bool("smoke", smokeEnv != "" && smokeEnv != "0", "run every measurement briefly (also BENCH_SMOKE=1); writes nothing unless -out is given")
	out := flag.String("out", "", "markdown file to write (default docs/benchmarks.md in the module; none in smoke mode)")
	jsonOut := flag.String("json", "", "also write the figures as JSON to this file")
	quiet := flag.Bool("q", false, "do not echo the benchmarks' output while they run")
	flag.Parse()
	if err := run(*smoke, *out, *jsonOut, *quiet); err != nil {
		fmt.Fprintln(os.Stderr, "benchtable:", err)
		os.Exit(1)
	}
}

func run(smoke bool, out, jsonOut string, quiet bool) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (BPF, network namespaces, bpffs); run it as root, e.g. sudo make bench (euid is %d)", os.Geteuid())
	}
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	if out == "" && !smoke {
		out = filepath.Join(root, "docs", "benchmarks.md")
	}
	p := fullPlan()
	if smoke {
		p = smokePlan()
	}
	var log io.Writer = os.Stderr
	if quiet {
		log = io.Discard
	}
	g := &goTest{root: root, log: log}
	s, err := newScratch()
	if err != nil {
		return err
	}
	defer s.cleanup()
	// An interrupt must not leave pins behind; the go test children get the
	// same signal from the terminal and clean up after themselves.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		sig := <-sigs
		s.cleanup()
		fmt.Fprintf(os.Stderr, "benchtable: %v: stopped\n", sig)
		os.Exit(130)
	}()

	start := time.Now()
	rep := &report{Env: probeEnvironment(root), Plan: p}
	fail := func(what string, err error) {
		if err != nil {
			rep.Errors = append(rep.Errors, fmt.Sprintf("%s: %v", what, err))
		}
	}

	var perr error
	rep.Packet, perr = packetSection(g, p)
	fail("per packet", perr)

	var ferr error
	rep.Floor, ferr = floorSection(g, p)
	fail("map operations alone", ferr)

	var lerr error
	rep.Lookup, lerr = lookupSection(g, p)
	fail("identity resolution", lerr)

	var terr error
	rep.Traffic, rep.TGoals, terr = trafficSection(g, p)
	fail("real traffic", terr)

	cases := map[string]bench.ControlCase{}
	for _, c := range bench.ControlCases {
		cases[c.Name] = c
	}
	var ctRows []controlRow
	for _, c := range bench.ControlCases {
		var row controlRow
		switch c.Name {
		case "ct-list", "ct-list-json", "ct-top":
			if ctRows == nil {
				ctRows = measureCTCommands(g, s, p, cases)
			}
			row = ctRows[map[string]int{"ct-list": 0, "ct-list-json": 1, "ct-top": 2}[c.Name]]
		case "ct-memlock":
			row = memlockPerEntry(c)
		default:
			row = fromBenchmark(g, p, c)
		}
		if row.Failed {
			rep.Errors = append(rep.Errors, c.Title+": "+row.Err)
		}
		rep.Control = append(rep.Control, row)
	}

	for _, r := range rep.Packet {
		if r.Case.Goal > 0 && r.Err == "" && !r.Met() {
			rep.Profiles = append(rep.Profiles, profileCase(g, s, p, r))
		}
	}
	rep.Took = time.Since(start)

	doc := rep.markdown()
	fmt.Print(doc)
	if out != "" {
		if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(out, []byte(doc), 0o644); err != nil {
			return fmt.Errorf("write %s: %w", out, err)
		}
		fmt.Fprintf(os.Stderr, "benchtable: wrote %s\n", out)
	}
	if jsonOut != "" {
		b, err := json.MarshalIndent(rep.json(), "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(jsonOut, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("write %s: %w", jsonOut, err)
		}
	}
	if len(rep.Errors) > 0 {
		return fmt.Errorf("%d measurement(s) failed: %s", len(rep.Errors), strings.Join(rep.Errors, "; "))
	}
	return nil
}

// environment is what the figures were measured on.
type environment struct {
	Date, Kernel, CPU, GoVersion, Commit, Load string
	FirstRelease                               string // the commit the first-release column measures
	Cores                                      int
	Mitigations                                [][2]string // name, state
}

func probeEnvironment(root string) environment {
	e := environment{
		Date:      time.Now().UTC().Format("2006-01-02 15:04 UTC"),
		GoVersion: runtime.Version(),
		Cores:     runtime.NumCPU(),
		CPU:       "unknown",
		Commit:    "unknown",
		Load:      "unknown",
	}
	if b, err := os.ReadFile(filepath.Join(root, "test", "first-release.commit")); err == nil {
		if c := strings.TrimSpace(string(b)); len(c) >= 7 {
			e.FirstRelease = c[:7]
		}
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		e.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				e.CPU = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) >= 3 {
			e.Load = strings.Join(f[:3], " ")
		}
	}
	if out, err := gitOutput(root, "rev-parse", "--short", "HEAD"); err == nil {
		e.Commit = out
		if st, err := gitOutput(root, "status", "--porcelain", "--untracked-files=no"); err == nil && st != "" {
			e.Commit += " (with uncommitted changes)"
		}
	}
	// meltdown's PTI without the CPU's pcid flag flushes the TLB at every
	// system call, so every BPF_PROG_TEST_RUN starts with an empty one.
	for _, name := range []string{"spectre_v2", "spec_rstack_overflow", "meltdown"} {
		if b, err := os.ReadFile("/sys/devices/system/cpu/vulnerabilities/" + name); err == nil {
			e.Mitigations = append(e.Mitigations, [2]string{"mitigation " + name, strings.TrimSpace(string(b))})
		}
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		pcid := "no"
		if regexp.MustCompile(`(?m)^flags\s*:.*\bpcid\b`).Match(b) {
			pcid = "yes"
		}
		e.Mitigations = append(e.Mitigations, [2]string{"CPU flag pcid", pcid})
	}
	return e
}

func gitOutput(dir string, args ...string) (string, error) {
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	out, err := cmd.Output()
	return strings.TrimSpace(string(out)), err
}
