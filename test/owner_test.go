package test

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/datapath/cgroupv2"
	"github.com/ctd-dev/ctd/test/nettest"
)

// ownerRoleEnv makes the test binary an owner process (see runOwnerRole)
// instead of running the tests.
const ownerRoleEnv = "CTD_TEST_OWNER_ROLE"

func TestMain(m *testing.M) {
	if role := os.Getenv(ownerRoleEnv); role != "" {
		if err := runOwnerRole(role, os.Args[1:]); err != nil {
			fmt.Fprintf(os.Stderr, "owner %s: %v\n", role, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runOwnerRole is the test binary run as an owner process, until its
// standard input closes:
//
//	server NETWORK ADDR        listen (TCP: Go's default, MPTCP) and echo
//	client NETWORK ADDR N      open N connections (UDP: sockets) to ADDR,
//	                           exchange a message on each, print their
//	                           local ports, hold them
//
// It prints "ready" and the ports on one line once set up.
func runOwnerRole(role string, args []string) error {
	switch {
	case role == "server" && len(args) == 2:
		if strings.HasPrefix(args[0], "udp") {
			c, err := net.ListenPacket(args[0], args[1])
			if err != nil {
				return err
			}
			go echoPackets(c)
		} else {
			l, err := net.Listen(args[0], args[1])
			if err != nil {
				return err
			}
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					go io.Copy(c, c)
				}
			}()
		}
		fmt.Println("ready")
	case role == "client" && len(args) == 3:
		n, err := strconv.Atoi(args[2])
		if err != nil {
			return err
		}
		ports := []string{"ready"}
		for range n {
			c, err := net.DialTimeout(args[0], args[1], 10*time.Second)
			if err != nil {
				return err
			}
			if err := exchange(c, "hello"); err != nil {
				return err
			}
			ports = append(ports, strconv.Itoa(int(netip.MustParseAddrPort(c.LocalAddr().String()).Port())))
		}
		fmt.Println(strings.Join(ports, " "))
	default:
		return fmt.Errorf("unknown role or arguments %q", args)
	}
	_, err := io.Copy(io.Discard, os.Stdin)
	return err
}

// exchange sends msg on c and waits for it to come back.
func exchange(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo: got %q, want %q", buf, msg)
	}
	return nil
}

// testCgroup creates a cgroup below the cgroup v2 mount for the test and
// removes it in cleanup (after the processes in it, which the test's
// cleanups started later stop first). It returns the path as ct list shows
// it and an open descriptor of its directory, for clone3 (CLONE_INTO_CGROUP).
func testCgroup(t *testing.T, parent, name string) (path string, fd int) {
	t.Helper()
	root, err := cgroupv2.Mount()
	if err != nil {
		t.Fatal(err)
	}
	path = parent + "/" + name
	dir := filepath.Join(root, path)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup %s: %v", dir, err)
	}
	t.Cleanup(func() {
		// A cgroup whose processes just exited may stay busy for a moment.
		var err error
		for range 50 {
			if err = os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("remove cgroup %s: %v", dir, err)
	})
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return path, int(f.Fd())
}

// ownerProc is an owner process the test started.
type ownerProc struct {
	cmd   *exec.Cmd
	pid   int
	comm  string
	ports []uint16 // client: the local ports of its connections
}

// startOwner runs the test binary as an owner process named comm (a
// symlink, so that the kernel's command name is comm) in h's network
// namespace and in the cgroup cgroupFD, and waits until it is ready. The
// process is stopped in cleanup.
func startOwner(t *testing.T, h *nettest.Host, comm string, cgroupFD int, role string, args ...string) *ownerProc {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), comm)
	if err := os.Symlink(self, link); err != nil {
		t.Fatal(err)
	}
	cmd := h.Command(link, args...)
	cmd.Env = append(os.Environ(), ownerRoleEnv+"="+role)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgroupFD}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", comm, err)
	}
	exited := make(chan struct{})
	t.Cleanup(func() {
		stdin.Close()
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- s
		io.Copy(io.Discard, stdout)
		cmd.Wait()
		close(exited)
	}()
	p := &ownerProc{cmd: cmd, pid: cmd.Process.Pid, comm: comm}
	select {
	case s := <-line:
		f := strings.Fields(s)
		if len(f) == 0 || f[0] != "ready" {
			t.Fatalf("%s %s %v did not get ready: %q", comm, role, args, s)
		}
		for _, ps := range f[1:] {
			n, err := strconv.ParseUint(ps, 10, 16)
			if err != nil {
				t.Fatalf("%s: bad port %q", comm, ps)
			}
			p.ports = append(p.ports, uint16(n))
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("%s %s %v: not ready after 20s", comm, role, args)
	}
	return p
}

// ownerRow is an object of ct list -o json with the owner keys.
type ownerRow struct {
	ctRow
	Pid      uint32 `json:"pid"`
	Comm     string `json:"comm"`
	Cgroup   string `json:"cgroup"`
	CgroupID uint64 `json:"cgroup_id"`
	RTT      uint32 `json:"rtt_us"`
}

func (c *coreCLI) ownerList(args ...string) []ownerRow {
	c.t.Helper()
	out := c.must(append([]string{"ct", "list", "-o", "json"}, args...)...)
	var rows []ownerRow
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		c.t.Fatalf("ct list -o json: %v\n%s", err, out)
	}
	return rows
}

func randomName(t *testing.T) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "ctdtest-owner-" + hex.EncodeToString(b)
}

// TestOwnerAndRTT: flows to and from local processes carry their owner
// (pid, command name, cgroup) in both families, TCP and UDP, for the
// connections the host opened (client) and those it accepted (server, a Go
// listener: MPTCP); a flow to a port without a socket has none; TCP flows
// carry the handshake's round trip, 20 ms more than it takes on the veth
// (a relay between A and B delays frames, nettest.NewDelayedPair); ct list filters by --comm and --cgroup, and ct top counts by comm
// and cgroup.
func TestOwnerAndRTT(t *testing.T) {
	bin := nettest.BuildCtd(t)
	// 10 ms each way between A and B: a round trip takes 20 ms more.
	pair := nettest.NewDelayedPair(t, 10*time.Millisecond)
	a, b := pair.A, pair.B
	ctd := &coreCLI{t: t, bin: bin, pin: nettest.PinPath(t), host: a}
	ctd.must("attach", "--iface", a.Iface)
	mon := startMonitor(t, bin, ctd.pin, a, "--type", "flow")

	parent := randomName(t)
	testCgroup(t, "", parent)
	srvCg, srvFD := testCgroup(t, "/"+parent, "server")
	cliCg, cliFD := testCgroup(t, "/"+parent, "client")

	type want struct {
		src, dst     netip.AddrPort
		proto        string
		pid          int
		comm, cgroup string
	}
	var wants []want
	const clientConns, serverConns = 3, 2
	for _, fam := range []struct{ a, b netip.Addr }{{a.IPv4, b.IPv4}, {a.IPv6, b.IPv6}} {
		for _, proto := range []string{"tcp", "udp"} {
			// A's client, to an echo server in B.
			peer := netip.AddrPortFrom(fam.b, 9201)
			if proto == "tcp" {
				echoServer(t, b, peer)
			} else {
				udpEcho(t, b, peer)
			}
			n := clientConns
			if proto == "udp" {
				n = 1
			}
			cli := startOwner(t, a, "ctdo-client", cliFD, "client", proto, peer.String(), strconv.Itoa(n))
			for _, p := range cli.ports {
				wants = append(wants, want{netip.AddrPortFrom(fam.a, p), peer, proto, cli.pid, "ctdo-client", cliCg})
			}

			// A's server, and B's connections to it.
			srvAddr := netip.AddrPortFrom(fam.a, 9301)
			srv := startOwner(t, a, "ctdo-server", srvFD, "server", proto, srvAddr.String())
			n = serverConns
			if proto == "udp" {
				n = 1
			}
			for range n {
				c, err := b.Dial(proto, srvAddr.String())
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				if err := exchange(c, "hello"); err != nil {
					t.Fatalf("B to A's %s server %v: %v", proto, srvAddr, err)
				}
				wants = append(wants, want{netip.MustParseAddrPort(c.LocalAddr().String()), srvAddr, proto, srv.pid, "ctdo-server", srvCg})
			}
		}
		// No socket on A's port: a flow without owner.
		c, err := b.Dial("udp", netip.AddrPortFrom(fam.a, 9399).String())
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("anyone?"))
		c.Close()
		wants = append(wants, want{netip.MustParseAddrPort(c.LocalAddr().String()), netip.AddrPortFrom(fam.a, 9399), "udp", 0, "", ""})
	}

	rows := ctd.ownerList()
	find := func(w want) (ownerRow, bool) {
		for _, r := range rows {
			if r.Proto == w.proto && r.Src == w.src.Addr().String() && r.Sport == w.src.Port() &&
				r.Dst == w.dst.Addr().String() && r.Dport == w.dst.Port() {
				return r, true
			}
		}
		return ownerRow{}, false
	}
	for _, w := range wants {
		r, ok := find(w)
		if !ok {
			t.Errorf("no flow %s %v -> %v in ct list", w.proto, w.src, w.dst)
			continue
		}
		if int(r.Pid) != w.pid || r.Comm != w.comm || r.Cgroup != w.cgroup || (r.CgroupID == 0) != (w.cgroup == "") {
			t.Errorf("flow %s %v -> %v: pid %d comm %q cgroup %q (id %d); want pid %d comm %q cgroup %q",
				w.proto, w.src, w.dst, r.Pid, r.Comm, r.Cgroup, r.CgroupID, w.pid, w.comm, w.cgroup)
		}
		if w.proto == "tcp" && (r.RTT < 20000 || r.RTT > 60000) {
			t.Errorf("flow %s %v -> %v: rtt_us %d, want 20000..60000 (the relay adds 20 ms)", w.proto, w.src, w.dst, r.RTT)
		}
		if w.proto == "udp" && r.RTT != 0 {
			t.Errorf("flow %s %v -> %v: rtt_us %d, want none for UDP", w.proto, w.src, w.dst, r.RTT)
		}
	}

	// monitor's flow-new events carry the owner.
	for _, w := range wants {
		ev := mon.waitFor(fmt.Sprintf("flow-new %s %v -> %v", w.proto, w.src, w.dst), func(ev monitorEvent) bool {
			return ev.Type == "flow-new" && ev.Proto == w.proto && ev.Src == w.src.Addr().String() && ev.Sport == w.src.Port() &&
				ev.Dst == w.dst.Addr().String() && ev.Dport == w.dst.Port()
		})
		if int(ev.Pid) != w.pid || ev.Comm != w.comm || ev.Cgroup != w.cgroup {
			t.Errorf("monitor: flow-new %s %v -> %v: pid %d comm %q cgroup %q; want %d %q %q",
				w.proto, w.src, w.dst, ev.Pid, ev.Comm, ev.Cgroup, w.pid, w.comm, w.cgroup)
		}
	}

	// The filters select exactly the owner's flows.
	for _, f := range []struct {
		args []string
		comm string
	}{
		{[]string{"--comm", "ctdo-client"}, "ctdo-client"},
		{[]string{"--cgroup", srvCg}, "ctdo-server"},
	} {
		got := ctd.ownerList(f.args...)
		wantN := 0
		for _, w := range wants {
			if w.comm == f.comm {
				wantN++
			}
		}
		if len(got) != wantN {
			t.Errorf("ct list %v: %d flows, want %d", f.args, len(got), wantN)
		}
		for _, r := range got {
			if r.Comm != f.comm {
				t.Errorf("ct list %v lists a flow of %q: %v", f.args, r.Comm, r.ctRow)
			}
		}
	}

	// The text form.
	text := ctd.must("ct", "list", "--comm", "ctdo-server", "--proto", "tcp")
	t.Logf("$ ctd ct list --comm ctdo-server --proto tcp\n%s", text)
	if !strings.Contains(text, " comm=ctdo-server cgroup="+srvCg+" rtt=") {
		t.Errorf("ct list text lacks comm=ctdo-server cgroup=%s rtt=...:\n%s", srvCg, text)
	}

	// ct top on known shares: TCP flows, 3 per family from the client and
	// 2 per family to the server.
	total := 2 * (clientConns + serverConns)
	for _, by := range []struct {
		by           string
		client, serv string
	}{{"comm", "ctdo-client", "ctdo-server"}, {"cgroup", cliCg, srvCg}} {
		out := ctd.must("ct", "top", "--by", by.by, "--proto", "tcp", "-o", "json")
		var top []struct {
			Value string  `json:"value"`
			Flows int     `json:"flows"`
			Share float64 `json:"share"`
		}
		if err := json.Unmarshal([]byte(out), &top); err != nil {
			t.Fatalf("ct top --by %s -o json: %v\n%s", by.by, err, out)
		}
		if len(top) != 2 || top[0].Value != by.client || top[0].Flows != 2*clientConns ||
			top[1].Value != by.serv || top[1].Flows != 2*serverConns ||
			math.Abs(top[0].Share-float64(2*clientConns)/float64(total)) > 1e-9 {
			t.Errorf("ct top --by %s --proto tcp = %+v, want %s %d flows (share %d/%d), %s %d flows",
				by.by, top, by.client, 2*clientConns, 2*clientConns, total, by.serv, 2*serverConns)
		}
		t.Logf("$ ctd ct top --by %s --proto tcp\n%s", by.by, ctd.must("ct", "top", "--by", by.by, "--proto", "tcp"))
	}
}

// udpEcho echoes UDP datagrams on addr in h's namespace until the test ends.
func udpEcho(t *testing.T, h *nettest.Host, addr netip.AddrPort) {
	t.Helper()
	c, err := h.ListenPacket("udp", addr.String())
	if err != nil {
		t.Fatalf("listen on %v in %s: %v", addr, h.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	go echoPackets(c)
}

// echoPackets sends every datagram back to its sender until c is closed.
func echoPackets(c net.PacketConn) {
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		c.WriteTo(buf[:n], from)
	}
}

// TestOwnerForwarded: a flow that A forwards (from B to C, a host routed
// behind A) has no owner, even though a process in A listens on the
// wildcard address on its destination port, which a socket lookup of the
// flow's tuple finds; a flow from B to A's own address on that port, which
// that process accepts, has it for its owner. Both families, TCP and UDP.
func TestOwnerForwarded(t *testing.T) {
	bin := nettest.BuildCtd(t)
	pair := nettest.NewPair(t)
	a, b := pair.A, pair.B
	c := pair.RoutedBehindA(t)
	ctd := &coreCLI{t: t, bin: bin, pin: nettest.PinPath(t), host: a}
	ctd.must("attach", "--iface", a.Iface)

	parent := randomName(t)
	testCgroup(t, "", parent)
	cg, cgFD := testCgroup(t, "/"+parent, "router")
	const port = 9401
	type want struct {
		src, dst netip.AddrPort
		proto    string
		pid      int
		comm, cg string
	}
	var wants []want
	for _, proto := range []string{"tcp", "udp"} {
		srv := startOwner(t, a, "ctdo-router", cgFD, "server", proto, fmt.Sprintf("[::]:%d", port))
		for _, fam := range []struct{ local, routed netip.Addr }{{a.IPv4, c.IPv4}, {a.IPv6, c.IPv6}} {
			routed := netip.AddrPortFrom(fam.routed, port)
			if proto == "tcp" {
				echoServer(t, c, routed)
			} else {
				udpEcho(t, c, routed)
			}
			for _, dst := range []netip.AddrPort{routed, netip.AddrPortFrom(fam.local, port)} {
				conn, err := b.Dial(proto, dst.String())
				if err != nil {
					t.Fatalf("B to %s %v: %v", proto, dst, err)
				}
				t.Cleanup(func() { conn.Close() })
				if err := exchange(conn, "hello"); err != nil {
					t.Fatalf("B to %s %v: %v", proto, dst, err)
				}
				w := want{src: netip.MustParseAddrPort(conn.LocalAddr().String()), dst: dst, proto: proto}
				if dst.Addr() == fam.local {
					w.pid, w.comm, w.cg = srv.pid, "ctdo-router", cg
				}
				wants = append(wants, w)
			}
		}
	}

	rows := ctd.ownerList()
	for _, w := range wants {
		var (
			r     ownerRow
			found bool
		)
		for _, row := range rows {
			if row.Proto == w.proto && row.Src == w.src.Addr().String() && row.Sport == w.src.Port() &&
				row.Dst == w.dst.Addr().String() && row.Dport == w.dst.Port() {
				r, found = row, true
			}
		}
		if !found {
			t.Errorf("no flow %s %v -> %v in ct list", w.proto, w.src, w.dst)
			continue
		}
		if int(r.Pid) != w.pid || r.Comm != w.comm || r.Cgroup != w.cg {
			t.Errorf("flow %s %v -> %v: pid %d comm %q cgroup %q; want pid %d comm %q cgroup %q",
				w.proto, w.src, w.dst, r.Pid, r.Comm, r.Cgroup, w.pid, w.comm, w.cg)
		}
	}
}
