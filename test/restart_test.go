package test

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/nettest"
)

// The proof of issue 4: connections through a default-deny interface survive
// every way the daemon can go away and come back.
const (
	restartTCPConns    = 50
	restartTCPInterval = 50 * time.Millisecond // per connection, between exchanges
	restartUDPRate     = 1000                  // datagrams per second
	restartICMPEvery   = 100 * time.Millisecond
	restartDwell       = 1500 * time.Millisecond // traffic under each daemon run
	restartMaxStall    = time.Second
	restartResizeCTMax = 131072 // the default is 262144
	restartUpgradeTag  = "ctd_upgradetest"
	restartMetricsAddr = "127.0.0.1:9464" // inside A's namespace
)

// TestRestartKeepsConnections runs TCP, UDP and ICMP traffic from the
// protected side A (ingress default deny, so replies pass only through
// conntrack) while the daemon on A's interface, started from the first
// release (built from git history, test/first-release.commit), is upgraded
// to this build, stopped by SIGTERM 5 times and by SIGKILL twice, upgraded
// to a different build of the programs once, and restarted with another
// --ct-max once. No connection may reset
// or stall for a second, no datagram or echo may be lost, and every
// conntrack entry of before must be there after with counters that only
// grew.
func TestRestartKeepsConnections(t *testing.T) {
	pair := nettest.NewPair(t)
	nettest.RequireTool(t, "nsenter", "util-linux")
	bin := nettest.BuildCtd(t)
	upgradeBin := buildCtdWithTags(t, restartUpgradeTag)
	firstBin := buildFirstRelease(t)
	d := &restartDaemon{
		t:        t,
		host:     pair.A,
		pinPath:  nettest.PinPath(t),
		stateDir: filepath.Join(t.TempDir(), "state"),
	}
	t.Cleanup(d.kill)

	d.start(firstBin, "--metrics-addr", restartMetricsAddr)
	requireMetrics(t, pair.A)
	d.cli(firstBin, "policy", "default", "ingress", "deny")
	requireDenied(t, pair, "before traffic")

	dropsBefore := d.drops()
	tr := startTraffic(t, pair)
	time.Sleep(restartDwell)
	before := d.ctList(firstBin)
	progsFirst := d.progTags()
	var progsBefore [2]string // this build's

	type step struct {
		name string
		do   func()
	}
	sigterm := func() { d.stop(syscall.SIGTERM); d.start(bin) }
	sigkill := func() { d.stop(syscall.SIGKILL); d.start(bin) }
	steps := []step{
		{"upgrade from the first release", func() {
			d.stop(syscall.SIGTERM)
			d.start(bin)
			if progsBefore = d.progTags(); progsBefore == progsFirst {
				t.Errorf("upgrade from the first release: the attached programs still have tags %v", progsBefore)
			}
			// Layout v1's one conntrack table became layout v2's table per family.
			for _, name := range []string{"ct4_v2", "ct6_v2", "ct4_unconfirmed_v2", "ct6_unconfirmed_v2"} {
				if _, err := os.Stat(filepath.Join(d.pinPath, name)); err != nil {
					t.Errorf("upgrade from the first release: %v", err)
				}
			}
			if _, err := os.Stat(filepath.Join(d.pinPath, "ct_v1")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("upgrade from the first release: ct_v1 still pinned (%v)", err)
			}
		}},
		{"SIGTERM 1", sigterm},
		{"SIGKILL 1", sigkill},
		{"SIGTERM 2", sigterm},
		{"upgrade", func() {
			d.stop(syscall.SIGTERM)
			d.start(upgradeBin)
			if after := d.progTags(); after == progsBefore {
				t.Errorf("upgrade: the attached programs still have tags %v: not a different build", after)
			}
		}},
		{"SIGTERM 3", func() {
			// Back to this build: a downgrade is a program swap too.
			d.stop(syscall.SIGTERM)
			d.start(bin)
			if after := d.progTags(); after != progsBefore {
				t.Errorf("after downgrade: program tags %v, want %v", after, progsBefore)
			}
		}},
		{"SIGKILL 2", sigkill},
		{"resize", func() {
			d.stop(syscall.SIGTERM)
			d.start(bin, "--ct-max", strconv.Itoa(restartResizeCTMax))
			if got := d.ctMax(); got != restartResizeCTMax {
				t.Errorf("resize: ct4_v2 holds %d entries at most, want %d", got, restartResizeCTMax)
			}
		}},
		{"SIGTERM 4", sigterm},
		{"SIGTERM 5", sigterm},
	}
	for _, s := range steps {
		s.do()
		t.Logf("%-10s ready in %v (daemon start to ready line %v)", s.name, d.lastReady, d.lastReadyLog)
		time.Sleep(restartDwell)
	}

	after := d.ctList(bin)
	res := tr.stop()
	drops := d.drops() - dropsBefore
	requireDenied(t, pair, "after the restarts")
	d.stop(syscall.SIGTERM)

	t.Logf("TCP: %d connections, %d messages echoed, %d resets, %d other errors, longest stall %v, %d retransmissions",
		restartTCPConns, res.tcpMessages, res.tcpResets, len(res.tcpErrors), res.tcpLongestStall, res.tcpRetrans)
	t.Logf("UDP: %d datagrams sent, %d echoed, %d lost", res.udpSent, res.udpEchoed, res.udpLost)
	t.Logf("ICMP: %d echo requests, %d replies, %d lost", res.icmpSent, res.icmpReplied, res.icmpLost)
	t.Logf("daemon: %d starts, longest start to ready %v; datapath drops meanwhile: %d", d.starts, d.longestReady, drops)

	if res.tcpResets != 0 {
		t.Errorf("%d TCP connection resets, want 0", res.tcpResets)
	}
	for _, err := range res.tcpErrors {
		t.Errorf("TCP: %v", err)
	}
	if res.tcpLongestStall >= restartMaxStall {
		t.Errorf("longest TCP stall %v, want under %v", res.tcpLongestStall, restartMaxStall)
	}
	if res.udpLost != 0 || res.udpSent == 0 {
		t.Errorf("UDP: %d of %d datagrams lost, want 0 of many", res.udpLost, res.udpSent)
	}
	if res.icmpLost != 0 || res.icmpSent == 0 {
		t.Errorf("ICMP: %d of %d echo requests unanswered, want 0 of many", res.icmpLost, res.icmpSent)
	}
	if drops != 0 {
		t.Errorf("the datapath dropped %d packets during the restarts (policy, invalid, insert failed, parse): want 0", drops)
	}
	compareConntrack(t, before, after)
}

// requireDenied checks that ingress default deny is in force: B cannot
// open a connection to A. Without it, lost conntrack state would go
// unnoticed.
func requireDenied(t *testing.T, pair *nettest.Pair, when string) {
	t.Helper()
	l, err := pair.A.Listen("tcp", net.JoinHostPort(pair.A.IPv4.String(), "7100"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	err = pair.B.Do(func() error {
		d := net.Dialer{Timeout: 500 * time.Millisecond}
		c, err := d.Dial("tcp", l.Addr().String())
		if err == nil {
			c.Close()
		}
		return err
	})
	if err == nil {
		t.Fatalf("%s: B connected to A although A's ingress default is deny", when)
	}
}

// requireMetrics scrapes the daemon's Prometheus endpoint in A's namespace
// and checks that it reports the attachment and the conntrack table.
func requireMetrics(t *testing.T, h *nettest.Host) {
	t.Helper()
	// Dial in the namespace: http.Get would dial from another thread.
	c, err := h.Dial("tcp", restartMetricsAddr)
	if err != nil {
		t.Fatalf("scrape the daemon's metrics: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /metrics HTTP/1.0\r\nHost: ctd\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("scrape the daemon's metrics: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s, %v\n%s", resp.Status, err, body)
	}
	for _, want := range []string{
		fmt.Sprintf(`ctd_interface_attached{iface=%q,mode="tcx"} 1`, h.Iface),
		`ctd_map_max_entries{map="ct_v1",type="lru_hash"} 262144`, // the first release's daemon
		`ctd_gc_runs_total`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

// buildCtdWithTags builds cmd/ctd with build tags into the test's temp dir.
func buildCtdWithTags(t *testing.T, tags string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "ctd-"+tags)
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out, err := exec.Command(goBin, "build", "-tags", tags, "-o", bin, "github.com/ctd-dev/ctd/cmd/ctd").CombinedOutput()
	if err != nil {
		t.Fatalf("go build -tags %s ./cmd/ctd: %v\n%s", tags, err, out)
	}
	return bin
}

// restartDaemon runs `ctd daemon` in a host's namespace, one process at a
// time.
type restartDaemon struct {
	t                 *testing.T
	host              *nettest.Host
	pinPath, stateDir string

	cmd  *exec.Cmd
	done chan error // Wait's result

	starts                  int
	lastReady, lastReadyLog time.Duration
	longestReady            time.Duration
}

func (d *restartDaemon) args(sub ...string) []string {
	return append([]string{"--pin-path", d.pinPath, "--state-dir", d.stateDir}, sub...)
}

// start runs the daemon and waits for its ready line.
func (d *restartDaemon) start(bin string, extra ...string) {
	d.t.Helper()
	args := d.args(append([]string{"daemon", "--iface", d.host.Iface, "--log-format", "json"}, extra...)...)
	cmd := d.host.Command(bin, args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		d.t.Fatal(err)
	}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		d.t.Fatalf("start ctd daemon: %v", err)
	}
	d.cmd, d.done = cmd, make(chan error, 1)
	d.starts++

	ready := make(chan time.Duration, 1)
	var logMu sync.Mutex
	var logLines []string
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			logMu.Lock()
			logLines = append(logLines, line)
			logMu.Unlock()
			var rec struct {
				Msg  string `json:"msg"`
				Took int64  `json:"took"`
			}
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "ready" {
				ready <- time.Duration(rec.Took)
			}
		}
		d.done <- cmd.Wait()
	}()
	select {
	case took := <-ready:
		d.lastReady, d.lastReadyLog = time.Since(t0), took
		d.longestReady = max(d.longestReady, d.lastReady)
	case err := <-d.done:
		logMu.Lock()
		defer logMu.Unlock()
		d.cmd = nil
		d.t.Fatalf("ctd daemon exited before ready (%v):\n%s", err, strings.Join(logLines, "\n"))
	case <-time.After(30 * time.Second):
		d.kill()
		logMu.Lock()
		defer logMu.Unlock()
		d.t.Fatalf("ctd daemon not ready after 30s:\n%s", strings.Join(logLines, "\n"))
	}
}

// stop signals the daemon and waits for it; SIGTERM must exit 0. Either
// way the programs must stay attached.
func (d *restartDaemon) stop(sig syscall.Signal) {
	d.t.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil {
		d.t.Fatalf("signal ctd daemon: %v", err)
	}
	var err error
	select {
	case err = <-d.done:
	case <-time.After(10 * time.Second):
		d.kill()
		d.t.Fatalf("ctd daemon did not exit within 10s of %v", sig)
	}
	d.cmd = nil
	if sig == syscall.SIGTERM && err != nil {
		d.t.Errorf("ctd daemon after SIGTERM: %v, want exit 0", err)
	}
	if tags := d.progTags(); tags == [2]string{} {
		d.t.Fatalf("no program attached to %s after the daemon got %v", d.host.Iface, sig)
	}
}

func (d *restartDaemon) kill() {
	if d.cmd != nil && d.cmd.Process != nil {
		d.cmd.Process.Kill()
		<-d.done
		d.cmd = nil
	}
}

// cli runs a ctd command against the daemon's pin path and state.
func (d *restartDaemon) cli(bin string, args ...string) string {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var stderr strings.Builder
	cmd := d.host.CommandContext(ctx, bin, d.args(args...)...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		d.t.Fatalf("ctd %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

// restartFlow is one object of `ctd ct list -o json`.
type restartFlow struct {
	Proto        string `json:"proto"`
	Src          string `json:"src"`
	Sport        uint16 `json:"sport"`
	Dst          string `json:"dst"`
	Dport        uint16 `json:"dport"`
	State        string `json:"state"`
	PacketsOrig  uint64 `json:"packets_orig"`
	BytesOrig    uint64 `json:"bytes_orig"`
	PacketsReply uint64 `json:"packets_reply"`
	BytesReply   uint64 `json:"bytes_reply"`
}

func (f restartFlow) key() string {
	return fmt.Sprintf("%s %s:%d -> %s:%d", f.Proto, f.Src, f.Sport, f.Dst, f.Dport)
}

func (d *restartDaemon) ctList(bin string) map[string]restartFlow {
	d.t.Helper()
	var flows []restartFlow
	out := d.cli(bin, "ct", "list", "-o", "json")
	if err := json.Unmarshal([]byte(out), &flows); err != nil {
		d.t.Fatalf("ct list -o json: %v\n%s", err, out)
	}
	m := make(map[string]restartFlow, len(flows))
	for _, f := range flows {
		m[f.key()] = f
	}
	return m
}

// progTags returns the tags of the programs attached to the interface
// (ingress, egress), or zero strings when none is.
func (d *restartDaemon) progTags() [2]string {
	d.t.Helper()
	var tags [2]string
	err := d.host.Do(func() error {
		at, err := attach.Status(d.host.Iface, filepath.Join(d.pinPath, "links"))
		if err != nil {
			return err
		}
		for i, id := range []ebpf.ProgramID{at.IngressProgID, at.EgressProgID} {
			if id == 0 {
				continue
			}
			p, err := ebpf.NewProgramFromID(id)
			if err != nil {
				return err
			}
			info, err := p.Info()
			p.Close()
			if err != nil {
				return err
			}
			tags[i] = info.Tag
		}
		return nil
	})
	if err != nil {
		d.t.Fatal(err)
	}
	return tags
}

// drops returns the packets the datapath has dropped so far, for any
// reason, in both directions: a packet that lost its conntrack entry is
// judged as a new flow and dropped by the ingress default deny.
func (d *restartDaemon) drops() uint64 {
	d.t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(d.pinPath, "metrics_v1"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		d.t.Fatal(err)
	}
	defer m.Close()
	snap, err := metricsmap.New(m).Read()
	if err != nil {
		d.t.Fatal(err)
	}
	var n uint64
	for _, r := range []metricsmap.Reason{metricsmap.DropPolicy, metricsmap.DropInvalid, metricsmap.DropCTInsert, metricsmap.DropParse, metricsmap.DropRevoked} {
		n += snap.Total(r).Packets
	}
	return n
}

func (d *restartDaemon) ctMax() uint32 {
	d.t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(d.pinPath, "ct4_v2"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		d.t.Fatal(err)
	}
	defer m.Close()
	return m.MaxEntries()
}

func compareConntrack(t *testing.T, before, after map[string]restartFlow) {
	t.Helper()
	if len(before) < restartTCPConns+2 {
		t.Errorf("conntrack held %d flows before the restarts, want at least %d (TCP, UDP, ICMP)", len(before), restartTCPConns+2)
	}
	grew := 0
	for k, b := range before {
		a, ok := after[k]
		if !ok {
			t.Errorf("conntrack entry lost: %s", k)
			continue
		}
		if a.PacketsOrig < b.PacketsOrig || a.BytesOrig < b.BytesOrig || a.PacketsReply < b.PacketsReply || a.BytesReply < b.BytesReply {
			t.Errorf("conntrack counters of %s shrank: packets %d/%d -> %d/%d, bytes %d/%d -> %d/%d", k,
				b.PacketsOrig, b.PacketsReply, a.PacketsOrig, a.PacketsReply, b.BytesOrig, b.BytesReply, a.BytesOrig, a.BytesReply)
		}
		if a.PacketsOrig > b.PacketsOrig {
			grew++
		}
	}
	t.Logf("conntrack: %d entries before, %d after; all %d original entries present, %d with grown counters", len(before), len(after), len(before), grew)
}

// ---- traffic ----

type traffic struct {
	stopping  atomic.Bool
	wg        sync.WaitGroup
	closersMu sync.Mutex
	closers   []io.Closer

	tcpMessages atomic.Int64
	tcpResets   atomic.Int64
	tcpRetrans  atomic.Int64
	mu          sync.Mutex
	tcpErrors   []error
	longest     time.Duration

	udpSent  atomic.Int64
	udpSeen  []atomic.Bool
	icmpSent atomic.Int64
	icmpSeen []atomic.Bool
}

type trafficResult struct {
	tcpMessages     int64
	tcpResets       int64
	tcpRetrans      int64
	tcpErrors       []error
	tcpLongestStall time.Duration

	udpSent, udpEchoed, udpLost     int64
	icmpSent, icmpReplied, icmpLost int64
}

func (tr *traffic) addCloser(c io.Closer) {
	tr.closersMu.Lock()
	tr.closers = append(tr.closers, c)
	tr.closersMu.Unlock()
}

func (tr *traffic) fail(err error) {
	if tr.stopping.Load() {
		return
	}
	if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		tr.tcpResets.Add(1)
	}
	tr.mu.Lock()
	tr.tcpErrors = append(tr.tcpErrors, err)
	tr.mu.Unlock()
}

func startTraffic(t *testing.T, pair *nettest.Pair) *traffic {
	t.Helper()
	tr := &traffic{
		udpSeen:  make([]atomic.Bool, 60*restartUDPRate*5),
		icmpSeen: make([]atomic.Bool, 65536),
	}
	t.Cleanup(func() { tr.stop() })
	tr.startTCP(t, pair)
	tr.startUDP(t, pair)
	tr.startICMP(t, pair)
	return tr
}

// startTCP opens the connections from A to an echo server on B. Each side
// checks that the messages arrive numbered in order.
func (tr *traffic) startTCP(t *testing.T, pair *nettest.Pair) {
	l, err := pair.B.Listen("tcp", net.JoinHostPort(pair.B.IPv4.String(), "7000"))
	if err != nil {
		t.Fatal(err)
	}
	tr.addCloser(l)
	tr.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			tr.addCloser(c)
			tr.wg.Go(func() { tr.echoTCP(c) })
		}
	})
	var conns []net.Conn
	for range restartTCPConns {
		c, err := pair.A.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatalf("dial %s from A: %v", l.Addr(), err)
		}
		conns = append(conns, c)
	}
	for i, c := range conns {
		tr.wg.Go(func() { tr.clientTCP(i, c) })
	}
}

func (tr *traffic) echoTCP(c net.Conn) {
	defer c.Close()
	var buf [8]byte
	for want := uint64(0); ; want++ {
		if _, err := io.ReadFull(c, buf[:]); err != nil {
			if !errors.Is(err, io.EOF) {
				tr.fail(fmt.Errorf("server side of %s: read: %w", c.RemoteAddr(), err))
			}
			return
		}
		if got := binary.BigEndian.Uint64(buf[:]); got != want {
			tr.fail(fmt.Errorf("server side of %s: message %d arrived, want %d", c.RemoteAddr(), got, want))
			return
		}
		if _, err := c.Write(buf[:]); err != nil {
			tr.fail(fmt.Errorf("server side of %s: write: %w", c.RemoteAddr(), err))
			return
		}
	}
}

func (tr *traffic) clientTCP(i int, c net.Conn) {
	defer c.Close()
	defer tr.countRetrans(c)
	var out, in [8]byte
	for seq := uint64(0); !tr.stopping.Load(); seq++ {
		binary.BigEndian.PutUint64(out[:], seq)
		sent := time.Now()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(out[:]); err != nil {
			tr.fail(fmt.Errorf("connection %d: write message %d: %w", i, seq, err))
			return
		}
		if _, err := io.ReadFull(c, in[:]); err != nil {
			tr.fail(fmt.Errorf("connection %d: read echo %d: %w", i, seq, err))
			return
		}
		if got := binary.BigEndian.Uint64(in[:]); got != seq {
			tr.fail(fmt.Errorf("connection %d: echo %d arrived, want %d", i, got, seq))
			return
		}
		// A message's stall is the time its echo took: a segment dropped
		// for want of conntrack state shows as a retransmission delay.
		rtt := time.Since(sent)
		tr.tcpMessages.Add(1)
		tr.mu.Lock()
		tr.longest = max(tr.longest, rtt)
		tr.mu.Unlock()
		time.Sleep(restartTCPInterval)
	}
}

// countRetrans adds the connection's TCP retransmissions, as the kernel
// counted them, to the total: a segment the datapath dropped must be
// retransmitted, whereas a stall from CPU starvation on a busy machine
// retransmits nothing.
func (tr *traffic) countRetrans(c net.Conn) {
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			tr.tcpRetrans.Add(int64(info.Total_retrans))
		}
	})
}

// startUDP sends sequence-numbered datagrams from A at restartUDPRate to an
// echo on B and records which echoes come back.
func (tr *traffic) startUDP(t *testing.T, pair *nettest.Pair) {
	srv, err := pair.B.ListenPacket("udp", net.JoinHostPort(pair.B.IPv4.String(), "7001"))
	if err != nil {
		t.Fatal(err)
	}
	tr.addCloser(srv)
	if err := bigBuffers(srv.(syscall.Conn)); err != nil {
		t.Fatal(err)
	}
	tr.wg.Go(func() {
		buf := make([]byte, 64)
		for {
			n, from, err := srv.ReadFrom(buf)
			if err != nil {
				return
			}
			srv.WriteTo(buf[:n], from)
		}
	})
	c, err := pair.A.Dial("udp", srv.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	tr.addCloser(c)
	if err := bigBuffers(c.(syscall.Conn)); err != nil {
		t.Fatal(err)
	}
	tr.wg.Go(func() {
		buf := make([]byte, 64)
		for {
			n, err := c.Read(buf)
			if err != nil {
				if tr.stopping.Load() || errors.Is(err, net.ErrClosed) {
					return
				}
				continue // e.g. ECONNREFUSED: the echo is judged by the count
			}
			if n == 8 {
				if seq := binary.BigEndian.Uint64(buf); seq < uint64(len(tr.udpSeen)) {
					tr.udpSeen[seq].Store(true)
				}
			}
		}
	})
	tr.wg.Go(func() {
		start := time.Now()
		var out [8]byte
		for seq := 0; seq < len(tr.udpSeen) && !tr.stopping.Load(); seq++ {
			// Pace by the clock, not by sleeps, to hold the average rate.
			if d := time.Until(start.Add(time.Duration(seq) * time.Second / restartUDPRate)); d > 0 {
				time.Sleep(d)
			}
			binary.BigEndian.PutUint64(out[:], uint64(seq))
			if _, err := c.Write(out[:]); err != nil {
				tr.fail(fmt.Errorf("UDP: send %d: %w", seq, err))
				return
			}
			tr.udpSent.Add(1)
		}
	})
}

// bigBuffers gives a UDP socket 8 MiB buffers (as root, past rmem_max), so
// that seconds of CPU starvation on this small shared machine overflow no
// socket: the test counts what the datapath loses, not what the scheduler
// does.
func bigBuffers(c syscall.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		for _, opt := range []int{unix.SO_RCVBUFFORCE, unix.SO_SNDBUFFORCE} {
			if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt, 8<<20); err != nil {
				serr = fmt.Errorf("set socket buffer: %w", err)
			}
		}
	})
	return errors.Join(err, serr)
}

// startICMP sends echo requests from A to B every restartICMPEvery.
func (tr *traffic) startICMP(t *testing.T, pair *nettest.Pair) {
	var c *icmp.PacketConn
	if err := pair.A.Do(func() (err error) {
		c, err = icmp.ListenPacket("ip4:icmp", pair.A.IPv4.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	tr.addCloser(c)
	id := os.Getpid() & 0xffff
	dst := &net.IPAddr{IP: pair.B.IPv4.AsSlice()}
	tr.wg.Go(func() {
		buf := make([]byte, 1500)
		for {
			n, _, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			m, err := icmp.ParseMessage(1, buf[:n])
			if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
				continue
			}
			if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id && e.Seq < len(tr.icmpSeen) {
				tr.icmpSeen[e.Seq].Store(true)
			}
		}
	})
	tr.wg.Go(func() {
		tick := time.NewTicker(restartICMPEvery)
		defer tick.Stop()
		for seq := 0; seq < len(tr.icmpSeen) && !tr.stopping.Load(); seq++ {
			msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte("ctd-restart")}}
			b, _ := msg.Marshal(nil)
			if _, err := c.WriteTo(b, dst); err != nil {
				tr.fail(fmt.Errorf("ICMP: send %d: %w", seq, err))
				return
			}
			tr.icmpSent.Add(1)
			<-tick.C
		}
	})
}

// stop ends the traffic, waits for the last echoes and counts.
func (tr *traffic) stop() trafficResult {
	if !tr.stopping.CompareAndSwap(false, true) {
		return trafficResult{}
	}
	// Senders stop first; the answers to what was sent get a second.
	time.Sleep(time.Second)
	tr.closersMu.Lock()
	for _, c := range tr.closers {
		c.Close()
	}
	tr.closersMu.Unlock()
	tr.wg.Wait()

	var r trafficResult
	r.tcpMessages, r.tcpResets, r.tcpRetrans = tr.tcpMessages.Load(), tr.tcpResets.Load(), tr.tcpRetrans.Load()
	tr.mu.Lock()
	r.tcpErrors, r.tcpLongestStall = tr.tcpErrors, tr.longest
	tr.mu.Unlock()
	r.udpSent = tr.udpSent.Load()
	for i := range r.udpSent {
		if tr.udpSeen[i].Load() {
			r.udpEchoed++
		}
	}
	r.udpLost = r.udpSent - r.udpEchoed
	r.icmpSent = tr.icmpSent.Load()
	for i := range r.icmpSent {
		if tr.icmpSeen[i].Load() {
			r.icmpReplied++
		}
	}
	r.icmpLost = r.icmpSent - r.icmpReplied
	return r
}
