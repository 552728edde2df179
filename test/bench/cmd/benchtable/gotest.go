package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// result is one line of `go test -bench` output.
type result struct {
	// Name is the benchmark's full name without the GOMAXPROCS suffix,
	// e.g. "BenchmarkPacket/tcp-new/prefixes=10k" or, for a repeated
	// sub-benchmark name, "BenchmarkTraffic/none#01".
	Name    string
	N       int
	Metrics map[string]float64 // by unit: "ns/op", "floor-ns/op", ...
}

// Base is Name without the "#NN" that go test appends to a repeated
// sub-benchmark name.
func (r result) Base() string {
	if i := strings.LastIndexByte(r.Name, '#'); i > 0 && isDigits(r.Name[i+1:]) {
		return r.Name[:i]
	}
	return r.Name
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// parseResults reads the benchmark result lines of `go test -bench` output
// in the standard format (name, iterations, then value-unit pairs) and
// ignores every other line.
func parseResults(r io.Reader) ([]result, error) {
	var out []result
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		res, ok, err := parseLine(sc.Text())
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, res)
		}
	}
	return out, sc.Err()
}

func parseLine(line string) (result, bool, error) {
	f := strings.Fields(line)
	if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") || len(f)%2 != 0 {
		return result{}, false, nil
	}
	n, err := strconv.Atoi(f[1])
	if err != nil {
		return result{}, false, nil // e.g. "BenchmarkX --- FAIL"
	}
	name := f[0]
	if i := strings.LastIndexByte(name, '-'); i > 0 && isDigits(name[i+1:]) {
		name = name[:i]
	}
	res := result{Name: name, N: n, Metrics: map[string]float64{}}
	for i := 2; i+1 < len(f); i += 2 {
		v, err := strconv.ParseFloat(f[i], 64)
		if err != nil {
			return result{}, false, fmt.Errorf("benchmark line %q: value %q is not a number", line, f[i])
		}
		res.Metrics[f[i+1]] = v
	}
	return res, true, nil
}

// goTest runs go commands in the module root and logs their output.
type goTest struct {
	root string    // module root
	log  io.Writer // progress: the commands and their output
}

// bench runs `go test -run '^$' -bench pattern -benchtime benchtime -count
// count pkg -args args...` and returns the parsed results. A failing run
// returns its results so far and an error that quotes the failure.
func (g *goTest) bench(pkg, pattern, benchtime string, count int, timeout time.Duration, args ...string) ([]result, error) {
	cmdArgs := []string{"test", "-run", "^$", "-bench", pattern, "-benchtime", benchtime,
		"-count", strconv.Itoa(count), "-timeout", timeout.String(), pkg}
	if len(args) > 0 {
		cmdArgs = append(append(cmdArgs, "-args"), args...)
	}
	var out bytes.Buffer
	cmd := exec.Command("go", cmdArgs...)
	cmd.Dir = g.root
	cmd.Stdout = io.MultiWriter(&out, g.log)
	cmd.Stderr = io.MultiWriter(&out, g.log)
	fmt.Fprintf(g.log, "+ go %s\n", strings.Join(cmdArgs, " "))
	runErr := cmd.Run()
	res, err := parseResults(bytes.NewReader(out.Bytes()))
	if err != nil {
		return nil, err
	}
	if runErr != nil {
		return res, fmt.Errorf("go test -bench %s %s: %v: %s", pattern, pkg, runErr, failure(out.Bytes()))
	}
	return res, nil
}

// failure picks the lines that say why a go test run failed.
func failure(out []byte) string {
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		t := strings.TrimSpace(l)
		if strings.Contains(t, "FAIL") || strings.HasPrefix(t, "panic:") || fileLine.MatchString(t) {
			keep = append(keep, t)
		}
	}
	if len(keep) > 6 {
		keep = keep[:6]
	}
	if len(keep) == 0 {
		return "no output says why"
	}
	return strings.Join(keep, "; ")
}

// fileLine matches a test's failure message, "name_test.go:12: ...".
var fileLine = regexp.MustCompile(`^\S+\.go:\d+: `)

// errNoPackage and errNoBenchmark say what is missing for a figure that
// comes from another package's benchmark.
var (
	errNoPackage   = errors.New("package does not exist yet")
	errNoBenchmark = errors.New("benchmark does not exist yet")
)

// hasBenchmark reports whether pkg (a "./dir" path in the module) has a
// top-level benchmark called name.
func (g *goTest) hasBenchmark(pkg, name string) error {
	dir := filepath.Join(g.root, filepath.FromSlash(strings.TrimPrefix(pkg, "./")))
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return fmt.Errorf("not measured: package %s %w", pkg, errNoPackage)
	}
	cmd := exec.Command("go", "test", "-list", "^"+regexp.QuoteMeta(name)+"$", pkg)
	cmd.Dir = g.root
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("not measured: go test -list %s failed: %v: %s", pkg, err, strings.TrimSpace(lastLines(out, 3)))
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.TrimSpace(l) == name {
			return nil
		}
	}
	return fmt.Errorf("not measured: package %s has no benchmark %s yet (%w)", pkg, name, errNoBenchmark)
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "; ")
}

// moduleRoot finds the directory of the go.mod that holds this module.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the ctd module: run benchtable from the repository (e.g. make bench)")
	}
	return filepath.Dir(mod), nil
}
