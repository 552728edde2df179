package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/control/cluster"
	"github.com/ctd-dev/ctd/test/etcdtest"
	"github.com/ctd-dev/ctd/test/nettest"
)

// clusterNode is one node of the cluster scenario: a namespace on the
// bridge, its own pin path and state directory, and its daemon.
type clusterNode struct {
	t        *testing.T
	name     string
	host     *nettest.Host
	bin      string
	pin      string
	state    string
	eps      string
	identity uint32

	cmd  *exec.Cmd
	done chan error
	log  *syncBuffer
}

func (n *clusterNode) base() []string {
	return []string{"--pin-path", n.pin, "--state-dir", n.state, "--kvstore-endpoints", n.eps, "--kvstore-timeout", "2s"}
}

// start runs the node's daemon.
func (n *clusterNode) start() {
	n.t.Helper()
	args := append(n.base(), "daemon", "--iface", nettest.NodeIface, "--node-name", n.name, "--kvstore-lease-ttl", "4s")
	n.cmd = n.host.Command(n.bin, args...)
	n.log = &syncBuffer{}
	n.cmd.Stderr = n.log
	if err := n.cmd.Start(); err != nil {
		n.t.Fatalf("%s: start daemon: %v", n.name, err)
	}
	n.done = make(chan error, 1)
	go func(cmd *exec.Cmd, done chan error) { done <- cmd.Wait() }(n.cmd, n.done)
}

// stop signals the daemon by its pid and waits for it.
func (n *clusterNode) stop(sig syscall.Signal) {
	n.t.Helper()
	if n.cmd == nil {
		return
	}
	_ = n.cmd.Process.Signal(sig)
	select {
	case <-n.done:
	case <-time.After(10 * time.Second):
		_ = n.cmd.Process.Kill()
		<-n.done
		n.t.Errorf("%s: daemon did not exit within 10s of %v", n.name, sig)
	}
	n.cmd = nil
}

// ctl runs a ctd command as this node (its namespace, pins, state, etcd).
func (n *clusterNode) ctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	cmd := n.host.CommandContext(ctx, n.bin, append(n.base(), args...)...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return strings.TrimSpace(errb.String()), fmt.Errorf("ctd %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func (n *clusterNode) must(args ...string) string {
	n.t.Helper()
	out, err := n.ctl(args...)
	if err != nil {
		n.t.Fatalf("%s: %v", n.name, err)
	}
	return out
}

func (n *clusterNode) status() cluster.StatusReport {
	n.t.Helper()
	var st cluster.StatusReport
	out, err := n.ctl("cluster", "status", "-o", "json")
	if err == nil {
		err = json.Unmarshal([]byte(out), &st)
	}
	if err != nil && !strings.Contains(err.Error(), "no cluster status") {
		n.t.Fatalf("%s: cluster status: %v", n.name, err)
	}
	return st
}

// lookup is the identity the node's datapath resolves ip to.
func (n *clusterNode) lookup(ip string) uint32 {
	n.t.Helper()
	var res struct{ Identity uint32 }
	if err := json.Unmarshal([]byte(n.must("ipcache", "get", ip, "-o", "json")), &res); err != nil {
		n.t.Fatal(err)
	}
	return res.Identity
}

func eventually(t *testing.T, what string, timeout time.Duration, cond func() bool) time.Duration {
	t.Helper()
	t0 := time.Now()
	for !cond() {
		if time.Since(t0) > timeout {
			t.Fatalf("not within %v: %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(t0)
}

// TestClusterScenario runs three nodes against a three-member etcd: the
// scenario of cluster mode from the README, end to end.
func TestClusterScenario(t *testing.T) {
	topo := nettest.NewBridged(t, 3)
	ec := etcdtest.Start(t, 3, topo.HostAddr.String())
	bin := nettest.BuildCtd(t)
	eps := strings.Join(ec.Endpoints(), ",")
	nodes := make([]*clusterNode, 3)
	for i := range nodes {
		n := &clusterNode{t: t, name: fmt.Sprintf("node%d", i), host: topo.Nodes[i], bin: bin,
			pin: nettest.PinPath(t), state: filepath.Join(t.TempDir(), "state"), eps: eps}
		nodes[i] = n
		t.Cleanup(func() {
			n.stop(syscall.SIGKILL)
			_, _ = n.ctl("teardown")
			if t.Failed() && n.log != nil {
				t.Logf("%s daemon log:\n%s", n.name, n.log.String())
			}
		})
		n.start()
	}
	synced := func(n *clusterNode) func() bool {
		return func() bool { st := n.status(); return st.Synced && st.Connected }
	}
	for _, n := range nodes {
		eventually(t, n.name+" synced", 30*time.Second, synced(n))
	}

	// Identities allocated from two nodes agree.
	for i, n := range nodes {
		var id struct {
			Identity uint32
			Labels   map[string]string
		}
		out := nodes[i%2].must("identity", "allocate", fmt.Sprintf("node=%s,app=ctd", n.name), "-o", "json")
		if err := json.Unmarshal([]byte(out), &id); err != nil {
			t.Fatal(err)
		}
		again := nodes[(i+1)%2].must("identity", "allocate", fmt.Sprintf("app=ctd,node=%s", n.name), "-o", "json")
		if !strings.Contains(again, fmt.Sprintf(`"identity": %d`, id.Identity)) || id.Identity < 256 {
			t.Fatalf("identity of %s: %d from one node, %s from another", n.name, id.Identity, again)
		}
		n.identity = id.Identity
	}

	// Each node's endpoint is seen by the others.
	for i, n := range nodes {
		n.must("endpoint", "add", n.host.IPv4.String(), fmt.Sprintf("id=%d", n.identity))
		for _, o := range nodes {
			eventually(t, fmt.Sprintf("%s sees %s's endpoint", o.name, n.name), 5*time.Second, func() bool {
				return o.lookup(nodes[i].host.IPv4.String()) == n.identity
			})
		}
	}

	// A cluster write reaches every node within 2 s.
	t0 := time.Now()
	nodes[2].must("ipcache", "add", "203.0.113.0/24", "id=4000")
	for _, n := range nodes {
		eventually(t, n.name+" has the cluster write", 2*time.Second-time.Since(t0), func() bool { return n.lookup("203.0.113.9") == 4000 })
	}
	t.Logf("a cluster write reached 3 nodes in %v", time.Since(t0))

	// Cluster policy: ingress default deny, allow node1's identity: node1
	// gets into node0, node2 stays out.
	nodes[0].must("policy", "add", "ingress", fmt.Sprintf("id=%d", nodes[1].identity), "allow")
	nodes[0].must("policy", "default", "ingress", "deny")
	for _, n := range nodes {
		eventually(t, n.name+" has the policy", 2*time.Second, func() bool {
			out := n.must("policy", "list")
			return strings.Contains(out, "default ingress deny") && strings.Contains(out, fmt.Sprintf("id=%d", nodes[1].identity))
		})
	}
	tcpAddr := netip.AddrPortFrom(nodes[0].host.IPv4, 8080)
	udpAddr := netip.AddrPortFrom(nodes[0].host.IPv4, 8081)
	echoServer(t, nodes[0].host, tcpAddr)
	udpEchoServer(t, nodes[0].host, udpAddr)
	conn := mustConnect(t, nodes[1].host, "node1", tcpAddr)
	mustBeDropped(t, nodes[2].host, "node2", tcpAddr)

	// Cross-node TCP and UDP traffic through everything below.
	traffic := startClusterTraffic(t, nodes[1].host, conn, udpAddr)

	// A rolling restart of every node's daemon loses nothing, and keeps
	// each node's lease.
	for _, n := range nodes {
		lease := n.status().LeaseID
		n.stop(syscall.SIGTERM)
		n.start()
		eventually(t, n.name+" synced after its restart", 20*time.Second, synced(n))
		if got := n.status().LeaseID; got != lease {
			t.Errorf("%s: lease %s after a restart, had %s: its endpoints flapped", n.name, got, lease)
		}
	}
	traffic.check("the rolling restart")

	// An etcd member killed changes nothing.
	ec.Stop(0)
	t0 = time.Now()
	nodes[1].must("ipcache", "add", "203.0.113.0/24", "id=4001")
	for _, n := range nodes {
		eventually(t, n.name+" has the write with a member down", 5*time.Second, func() bool { return n.lookup("203.0.113.9") == 4001 })
	}
	t.Logf("with one member down a write reached 3 nodes in %v", time.Since(t0))
	traffic.check("one etcd member down")

	// All members down: the datapath keeps enforcing, new allowed
	// connections pass, a CLI write fails in one line, and a daemon
	// restarted meanwhile comes back with its state.
	ec.StopAll()
	for _, n := range nodes {
		eventually(t, n.name+" notices etcd is away", 10*time.Second, func() bool { return !n.status().Connected })
	}
	mustConnect(t, nodes[1].host, "node1 during the outage", tcpAddr)
	mustBeDropped(t, nodes[2].host, "node2 during the outage", tcpAddr)
	t0 = time.Now()
	msg, err := nodes[0].ctl("ipcache", "add", "203.0.113.0/24", "id=4002")
	if err == nil || strings.Count(msg, "\n") != 0 || !strings.Contains(msg, "did not answer within 2s") {
		t.Errorf("a write with etcd away: %v %q, want one line saying etcd did not answer", err, msg)
	}
	if took := time.Since(t0); took > 10*time.Second {
		t.Errorf("a write with etcd away took %v with --kvstore-timeout 2s", took)
	}
	nodes[0].stop(syscall.SIGTERM)
	nodes[0].start()
	time.Sleep(2 * time.Second) // the restarted daemon is up and cannot reach etcd
	if st := nodes[0].status(); st.Synced {
		t.Errorf("node0 restarted with etcd away reports synced")
	}
	if id := nodes[0].lookup("203.0.113.9"); id != 4001 {
		t.Errorf("node0 restarted with etcd away resolves 203.0.113.9 to %d, want 4001 (its last synced state)", id)
	}
	mustBeDropped(t, nodes[2].host, "node2 after node0's restart during the outage", tcpAddr)
	mustConnect(t, nodes[1].host, "node1 after node0's restart during the outage", tcpAddr)
	traffic.check("etcd away")

	// etcd returns: everything converges.
	ec.RestartAll()
	for _, n := range nodes {
		eventually(t, n.name+" synced after etcd returned", 30*time.Second, synced(n))
	}
	nodes[2].must("ipcache", "add", "203.0.113.0/24", "id=4003")
	for _, n := range nodes {
		eventually(t, n.name+" converges after the outage", 5*time.Second, func() bool { return n.lookup("203.0.113.9") == 4003 })
	}
	traffic.stop("etcd's return")

	// A node killed for good loses its endpoints everywhere after its TTL.
	nodes[2].stop(syscall.SIGKILL)
	gone := nodes[2].host.IPv4.String()
	for _, n := range nodes[:2] {
		eventually(t, n.name+" drops the dead node's endpoint", 15*time.Second, func() bool { return n.lookup(gone) != nodes[2].identity })
	}
	for _, n := range nodes[:2] {
		if st := n.status(); !st.Synced {
			t.Errorf("%s not synced at the end: %+v", n.name, st)
		}
	}
}

// udpEchoServer echoes datagrams on addr in h's namespace until the test ends.
func udpEchoServer(t *testing.T, h *nettest.Host, addr netip.AddrPort) {
	t.Helper()
	pc, err := h.ListenPacket("udp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:n], from)
		}
	}()
}

// clusterTraffic keeps a TCP connection and a UDP flow busy (50 exchanges
// per second each) and counts what went wrong.
type clusterTraffic struct {
	t            *testing.T
	stopc        chan struct{}
	wg           sync.WaitGroup
	tcpOK, udpOK atomic.Int64
	mu           sync.Mutex
	errs         []string
}

func startClusterTraffic(t *testing.T, from *nettest.Host, tcp net.Conn, udp netip.AddrPort) *clusterTraffic {
	ct := &clusterTraffic{t: t, stopc: make(chan struct{})}
	var uc net.Conn
	if err := from.Do(func() (err error) { uc, err = net.Dial("udp", udp.String()); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { uc.Close() })
	fail := func(s string) {
		ct.mu.Lock()
		ct.errs = append(ct.errs, s)
		ct.mu.Unlock()
	}
	ct.wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-ct.stopc:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if err := echo(tcp, fmt.Sprintf("tcp %d", i)); err != nil {
				fail(fmt.Sprintf("tcp exchange %d: %v", i, err))
				return
			}
			ct.tcpOK.Add(1)
		}
	})
	ct.wg.Go(func() {
		buf := make([]byte, 64)
		for i := 0; ; i++ {
			select {
			case <-ct.stopc:
				return
			case <-time.After(20 * time.Millisecond):
			}
			msg := fmt.Sprintf("udp %d", i)
			_ = uc.SetDeadline(time.Now().Add(blockedAfter))
			if _, err := uc.Write([]byte(msg)); err != nil {
				fail(fmt.Sprintf("udp send %d: %v", i, err))
				continue
			}
			n, err := uc.Read(buf)
			if err != nil || string(buf[:n]) != msg {
				fail(fmt.Sprintf("udp exchange %d: %v %q", i, err, buf[:n]))
				continue
			}
			ct.udpOK.Add(1)
		}
	})
	return ct
}

// check fails the test if an exchange failed so far.
func (ct *clusterTraffic) check(when string) {
	ct.t.Helper()
	ct.mu.Lock()
	defer ct.mu.Unlock()
	if len(ct.errs) > 0 {
		ct.t.Fatalf("traffic failed during %s: %v", when, ct.errs)
	}
	ct.t.Logf("after %s: %d TCP and %d UDP exchanges, none lost", when, ct.tcpOK.Load(), ct.udpOK.Load())
}

func (ct *clusterTraffic) stop(when string) {
	ct.t.Helper()
	close(ct.stopc)
	ct.wg.Wait()
	ct.check(when)
}
