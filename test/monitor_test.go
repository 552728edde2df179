package test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/test/nettest"
)

// monitorEvent is one line of `ctd monitor -o json`: the keys issue 5 names.
type monitorEvent struct {
	Time         string  `json:"time"`
	Type         string  `json:"type"`
	Reason       string  `json:"reason"`
	Proto        string  `json:"proto"`
	Src          string  `json:"src"`
	Sport        uint16  `json:"sport"`
	Dst          string  `json:"dst"`
	Dport        uint16  `json:"dport"`
	SrcIdentity  uint32  `json:"src_identity"`
	DstIdentity  uint32  `json:"dst_identity"`
	Iface        string  `json:"iface"`
	Dir          string  `json:"dir"`
	PacketsOrig  *uint64 `json:"packets_orig"`
	BytesOrig    *uint64 `json:"bytes_orig"`
	PacketsReply *uint64 `json:"packets_reply"`
	BytesReply   *uint64 `json:"bytes_reply"`
	Pid          uint32  `json:"pid"`
	Comm         string  `json:"comm"`
	Cgroup       string  `json:"cgroup"`
	RTT          uint32  `json:"rtt_us"`
}

// monitorProc is a running `ctd monitor -o json` and what it printed.
type monitorProc struct {
	t         *testing.T
	cmd       *exec.Cmd
	stdoutEOF chan struct{}

	mu     sync.Mutex
	lines  []string
	events []monitorEvent
	stderr strings.Builder
}

// startMonitor starts `ctd monitor -o json` with args in h's namespace and
// returns once it is reading events. It is killed when the test ends.
func startMonitor(t *testing.T, bin, pin string, h *nettest.Host, args ...string) *monitorProc {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	m := &monitorProc{t: t, stdoutEOF: make(chan struct{})}
	m.cmd = h.CommandContext(ctx, bin, append([]string{"--pin-path", pin, "monitor", "-o", "json"}, args...)...)
	stdout, err := m.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := m.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := m.cmd.Start(); err != nil {
		t.Fatalf("start ctd monitor: %v", err)
	}
	t.Cleanup(func() {
		if m.cmd.ProcessState == nil {
			m.cmd.Process.Kill()
			m.cmd.Wait()
		}
	})
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		readyOnce := sync.OnceFunc(func() { close(ready) })
		defer readyOnce()
		for sc.Scan() {
			m.mu.Lock()
			m.stderr.WriteString(sc.Text() + "\n")
			m.mu.Unlock()
			if strings.Contains(sc.Text(), "streaming the events") {
				readyOnce()
			}
		}
	}()
	go func() {
		defer close(m.stdoutEOF)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var ev monitorEvent
			err := json.Unmarshal(sc.Bytes(), &ev)
			m.mu.Lock()
			m.lines = append(m.lines, sc.Text())
			if err == nil {
				m.events = append(m.events, ev)
			} else {
				m.stderr.WriteString(fmt.Sprintf("test: stdout line is not one JSON object (%v): %s\n", err, sc.Text()))
			}
			m.mu.Unlock()
		}
	}()
	select {
	case <-ready:
	case <-time.After(30 * time.Second):
		t.Fatalf("ctd monitor did not start within 30s; stderr:\n%s", m.Stderr())
	}
	if m.cmd.ProcessState != nil || strings.Contains(m.Stderr(), "ctd: ") {
		t.Fatalf("ctd monitor failed to start; stderr:\n%s", m.Stderr())
	}
	return m
}

func (m *monitorProc) Stderr() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stderr.String()
}

// waitFor returns the first event that matches, waiting up to 10s.
func (m *monitorProc) waitFor(what string, match func(monitorEvent) bool) monitorEvent {
	m.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m.mu.Lock()
		for _, ev := range m.events {
			if match(ev) {
				m.mu.Unlock()
				return ev
			}
		}
		lines := strings.Join(m.lines, "\n")
		m.mu.Unlock()
		if time.Now().After(deadline) {
			m.t.Fatalf("ctd monitor printed no %s within 10s; it printed:\n%s\nstderr:\n%s", what, lines, m.Stderr())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop interrupts the monitor as an operator's Ctrl-C does and checks that
// it exits 0.
func (m *monitorProc) stop(sig syscall.Signal) {
	m.t.Helper()
	if err := m.cmd.Process.Signal(sig); err != nil {
		m.t.Fatal(err)
	}
	select {
	case <-m.stdoutEOF:
	case <-time.After(10 * time.Second):
		m.t.Fatalf("ctd monitor did not exit within 10s of %v", sig)
	}
	if err := m.cmd.Wait(); err != nil {
		m.t.Errorf("ctd monitor exited with %v after %v; stderr:\n%s", err, sig, m.Stderr())
	}
}

func (m *monitorProc) Lines() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.lines...)
}

// TestMonitor runs `ctd monitor -o json` on B while real traffic crosses
// ctd on B's interface (ingress default deny): B's connection to A yields
// flow-new and flow-closed (with counters that match the conntrack table),
// A's connection to B a policy drop with both identities. Then a monitor
// filtered to drops on B's interface sees the next drop but no flow, and a
// tight rate limit makes monitor report suppressed events. The ring buffer
// has one consumer, so the monitors run one after the other.
func TestMonitor(t *testing.T) {
	bin := nettest.BuildCtd(t)
	pin := nettest.PinPath(t)
	pair := nettest.NewPair(t)
	cli := &coreCLI{t: t, bin: bin, pin: pin, host: pair.B}
	state := []string{"--state-dir", t.TempDir()}
	cli.must("attach", "--iface", pair.B.Iface)
	cli.must(append(state, "policy", "default", "ingress", "deny")...)
	cli.must(append(state, "ipcache", "add", pair.A.IPv4.String()+"/32", "id=100")...)
	cli.must(append(state, "ipcache", "add", pair.B.IPv4.String()+"/32", "id=200")...)
	a, b := pair.A.IPv4.String(), pair.B.IPv4.String()

	// 1. Everything, until SIGINT.
	mon := startMonitor(t, bin, pin, pair.B)
	cport, sport := tcpExchange(t, pair.B, pair.A, pair.A.IPv4, 1000, 3000)
	isFlow := func(typ string) func(monitorEvent) bool {
		return func(ev monitorEvent) bool {
			return ev.Type == typ && ev.Proto == "tcp" && ev.Src == b && ev.Sport == cport && ev.Dst == a && ev.Dport == sport
		}
	}
	mustBeDropped(t, pair.A, "A to B", netip.AddrPortFrom(pair.B.IPv4, 8022))

	fnew := mon.waitFor("flow-new of B's connection", isFlow("flow-new"))
	if fnew.Dir != "egress" || fnew.Iface != pair.B.Iface || fnew.SrcIdentity != 200 || fnew.DstIdentity != 100 || fnew.PacketsOrig != nil {
		t.Errorf("flow-new %+v: want egress on %s, identities 200 -> 100, no counters", fnew, pair.B.Iface)
	}
	closed := mon.waitFor("flow-closed of B's connection", isFlow("flow-closed"))
	if closed.PacketsOrig == nil || closed.BytesOrig == nil || closed.PacketsReply == nil || closed.BytesReply == nil {
		t.Fatalf("flow-closed without counters: %+v", closed)
	}
	// The table's entry counts on after the close: the originator's last ACK.
	var row ctRow
	for _, r := range cli.ctList("--proto", "tcp", "--port", fmt.Sprint(cport)) {
		if r.Src == b && r.Sport == cport {
			row = r
		}
	}
	if row.Src == "" {
		t.Fatalf("ct list has no entry for %s:%d", b, cport)
	}
	if *closed.PacketsReply != row.PacketsReply || *closed.BytesReply != row.BytesReply ||
		*closed.PacketsOrig > row.PacketsOrig || row.PacketsOrig-*closed.PacketsOrig > 1 ||
		*closed.BytesOrig < 1000 || *closed.BytesReply < 3000 {
		t.Errorf("flow-closed counters orig %d/%d B reply %d/%d B; the table has %v: want the same reply counters, at most the final ACK more from the originator, and at least the 1000 and 3000 bytes sent",
			*closed.PacketsOrig, *closed.BytesOrig, *closed.PacketsReply, *closed.BytesReply, row)
	}
	drop := mon.waitFor("policy drop of A's connection", func(ev monitorEvent) bool {
		return ev.Type == "drop" && ev.Dport == 8022
	})
	if drop.Reason != "policy" || drop.Proto != "tcp" || drop.Src != a || drop.Dst != b || drop.Dir != "ingress" ||
		drop.SrcIdentity != 100 || drop.DstIdentity != 200 || drop.Iface != pair.B.Iface || drop.PacketsOrig != nil {
		t.Errorf("drop %+v: want reason policy, tcp %s -> %s:8022, ingress on %s, identities 100 -> 200", drop, a, b, pair.B.Iface)
	}
	if _, err := time.Parse(time.RFC3339Nano, drop.Time); err != nil {
		t.Errorf("time %q is not RFC 3339: %v", drop.Time, err)
	}
	mon.stop(syscall.SIGINT)
	for _, l := range mon.Lines() {
		t.Logf("ctd monitor -o json: %s", l)
	}

	// 2. Only drops on B's interface, until SIGTERM.
	drops := startMonitor(t, bin, pin, pair.B, "--type", "drop", "--iface", pair.B.Iface)
	tcpExchange(t, pair.B, pair.A, pair.A.IPv4, 10, 10)
	mustBeDropped(t, pair.A, "A to B again", netip.AddrPortFrom(pair.B.IPv4, 8023))
	drops.waitFor("the second drop", func(ev monitorEvent) bool { return ev.Type == "drop" && ev.Dport == 8023 })
	drops.stop(syscall.SIGTERM)
	for _, l := range drops.Lines() {
		if !strings.Contains(l, `"type":"drop"`) {
			t.Errorf("monitor --type drop printed another event: %s", l)
		}
	}

	// 3. A rate limit of one event per second with a burst of one: of three
	// flows in a row, at most the first is reported and monitor says so.
	if out := cli.must("events", "rate", "1", "--burst", "1"); !strings.Contains(out, "1 events/s per CPU, burst 1") {
		t.Errorf("ctd events rate 1 --burst 1 printed %q", out)
	}
	limited := startMonitor(t, bin, pin, pair.B)
	for range 3 {
		tcpExchange(t, pair.B, pair.A, pair.A.IPv4, 10, 10)
	}
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(limited.Stderr(), "suppressed by the rate limit") {
		if time.Now().After(deadline) {
			t.Fatalf("monitor did not report rate-limited events within 15s; stderr:\n%s", limited.Stderr())
		}
		time.Sleep(100 * time.Millisecond)
	}
	limited.stop(syscall.SIGINT)
	cli.must("events", "rate", "0")
}

func TestMonitorBadFlags(t *testing.T) {
	bin := nettest.BuildCtd(t)
	pin := nettest.PinPath(t)
	pair := nettest.NewPair(t)
	cli := &coreCLI{t: t, bin: bin, pin: pin, host: pair.B}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"monitor", "--type", "flows"}, `invalid --type "flows": valid types are flow`},
		{[]string{"monitor", "--iface", "nosuch0"}, `invalid --iface "nosuch0": no such interface in this network namespace`},
		{[]string{"monitor", "-o", "yaml"}, `invalid --output "yaml"`},
		{[]string{"monitor"}, "no ctd datapath at " + pin},
		{[]string{"events", "rate", "fast"}, `invalid rate "fast"`},
		{[]string{"events", "rate", "--burst", "5"}, "--burst needs a rate"},
		{[]string{"maps", "-o", "xml"}, `invalid --output "xml"`},
		{[]string{"metrics"}, "no ctd datapath at " + pin},
		{[]string{"ct", "gc", "--ct-lifetime-tcp-closed", "0s"}, "invalid --ct-lifetime-tcp-closed 0s: must be a positive duration"},
	} {
		r := cli.run(tc.args...)
		checkOneLineError(t, r, tc.want)
	}
}
