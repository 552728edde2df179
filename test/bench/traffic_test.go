package bench

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

var (
	trafficRounds   = flag.Int("traffic.rounds", 5, "BenchmarkTraffic rounds; each measures every set-up once per test, in rotated order")
	trafficDuration = flag.Duration("traffic.duration", 3*time.Second, "how long each real-traffic measurement counts")
	trafficWarmup   = flag.Duration("traffic.warmup", 300*time.Millisecond, "how long each real-traffic measurement runs before it counts")
)

// Ports of the real-traffic servers in namespace B, and one that the
// deny set-up must refuse.
const (
	portStream  = 5201
	portCRR     = 5202
	portUDP     = 5203
	portRefused = 5209

	crrClients   = 4
	udpBatch     = 64
	udpPayload   = 64
	peerIdentity = 1000
)

// nftRules is nf_conntrack on B: every packet in and out of B's sockets goes
// through conntrack, established and new flows are accepted.
const nftRules = `table inet ctdbench {
	chain in {
		type filter hook input priority 0; policy accept;
		ct state established,related accept
		ct state new accept
	}
	chain out {
		type filter hook output priority 0; policy accept;
		ct state established,related accept
		ct state new accept
	}
}
`

// BenchmarkTraffic measures real traffic from namespace A to namespace B
// over a veth pair in every set-up of Setups: ctd is attached to B's veth
// end, nf_conntrack runs in B. Every round builds each set-up on a fresh
// pair of namespaces and then runs each measurement of TrafficTests on all
// of them back to back, in an order that rotates from round to round, so
// that the figures compared with each other are measured close together
// and no set-up always goes first. A sub-benchmark
// round=R/SETUP/TEST reports one figure in the test's unit: single-stream
// TCP throughput, connections per second (connect, 64-byte request,
// 64-byte response, close, by several parallel clients), or 64-byte UDP
// datagrams per second sent with sendmmsg (the datapath runs in the
// sender's context on veth). Run it with -benchtime 1x.
func BenchmarkTraffic(b *testing.B) {
	nettest.RequireRoot(b)
	nettest.RequireTool(b, "nft", "nftables")
	nettest.RequireTool(b, "nsenter", "util-linux")
	for r := range *trafficRounds {
		b.Run(fmt.Sprintf("round=%d", r+1), func(b *testing.B) { trafficRound(b, r) })
	}
}

func trafficRound(b *testing.B, r int) {
	pairs := make([]*nettest.Pair, len(Setups))
	checks := make([]func() error, len(Setups))
	for i, s := range Setups {
		pairs[i] = nettest.NewPair(b)
		checks[i] = setUp(b, pairs[i], s)
	}
	for ti, t := range TrafficTests {
		for k := range Setups {
			i := (k + r + ti) % len(Setups)
			s, p := Setups[i], pairs[i]
			b.Run(s.Name+"/"+t.Name, func(b *testing.B) {
				v, err := measure(p, t)
				if err != nil {
					b.Fatalf("set-up %s: %s: %v", s.Name, t.Name, err)
				}
				b.ReportMetric(v, t.Unit)
				b.ReportMetric(0, "ns/op")
			})
		}
	}
	for i, s := range Setups {
		if err := checks[i](); err != nil {
			b.Errorf("set-up %s: %v", s.Name, err)
		}
	}
}

func measure(p *nettest.Pair, t TrafficTest) (float64, error) {
	switch t.Name {
	case "tcp_stream":
		return tcpStream(p)
	case "tcp_crr":
		return tcpCRR(p)
	case "udp_small":
		return udpSmall(p)
	}
	return 0, fmt.Errorf("no measurement for %q", t.Name)
}

// setUp configures B for s and returns a check, run after the traffic,
// that the set-up was really in the path.
func setUp(b *testing.B, p *nettest.Pair, s Setup) func() error {
	switch s.Name {
	case "none":
		return func() error { return nil }
	case "ctd-allow", "ctd-deny-rule":
		return setUpCtd(b, p, s.Name == "ctd-deny-rule")
	case "nf-conntrack":
		return setUpNFT(b, p)
	}
	b.Fatalf("unknown set-up %q", s.Name)
	return nil
}

// setUpCtd attaches ctd to B's veth end with the ctd binary, as an operator
// would; with deny, it first sets ingress default deny and rules that allow
// the peer's identity to the benchmark ports (ctd ipcache, ctd policy).
func setUpCtd(b *testing.B, p *nettest.Pair, deny bool) func() error {
	ctd := nettest.BuildCtd(b)
	pin := nettest.PinPath(b)
	global := []string{"--pin-path", pin, "--state-dir", b.TempDir()}
	run := func(h *nettest.Host, args ...string) {
		b.Helper()
		cmd := h.Command(ctd, append(global, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("ctd %s in %s: %v\n%s", strings.Join(args, " "), h.Name, err, bytes.TrimSpace(out))
		}
	}
	b.Cleanup(func() {
		cmd := p.B.Command(ctd, append(global, "teardown")...)
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Errorf("ctd teardown in %s: %v\n%s", p.B.Name, err, bytes.TrimSpace(out))
		}
	})
	if deny {
		id := "id=" + strconv.Itoa(peerIdentity)
		run(p.B, "ipcache", "add", p.A.IPv4.String(), id)
		run(p.B, "policy", "add", "ingress", id, "tcp/"+strconv.Itoa(portStream), "allow")
		run(p.B, "policy", "add", "ingress", id, "tcp/"+strconv.Itoa(portCRR), "allow")
		run(p.B, "policy", "add", "ingress", id, "udp/"+strconv.Itoa(portUDP), "allow")
		run(p.B, "policy", "default", "ingress", "deny")
	}
	run(p.B, "attach", "--iface", p.B.Iface)
	if deny {
		// The set-up must refuse what its rules do not allow.
		l, err := p.B.Listen("tcp4", netip.AddrPortFrom(p.B.IPv4, portRefused).String())
		if err != nil {
			b.Fatal(err)
		}
		defer l.Close()
		err = p.A.Do(func() error {
			c, err := net.DialTimeout("tcp4", l.Addr().String(), 300*time.Millisecond)
			if err == nil {
				c.Close()
				return fmt.Errorf("ingress default deny let a connection to port %d through", portRefused)
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	return func() error {
		maps, err := loader.OpenPinned(pin)
		if err != nil {
			return err
		}
		defer maps.Close()
		n, err := maps.Conntrack().Count()
		if err != nil {
			return err
		}
		if n == 0 {
			return errors.New("ctd tracked no flow: was it attached?")
		}
		return nil
	}
}

func setUpNFT(b *testing.B, p *nettest.Pair) func() error {
	cmd := p.B.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(nftRules)
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("nft -f in %s: %v\n%s", p.B.Name, err, bytes.TrimSpace(out))
	}
	return func() error {
		var n int
		err := p.B.Do(func() error {
			raw, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_count")
			if err != nil {
				return err
			}
			n, err = strconv.Atoi(strings.TrimSpace(string(raw)))
			return err
		})
		if err != nil {
			return fmt.Errorf("read nf_conntrack_count in %s: %w", p.B.Name, err)
		}
		if n == 0 {
			return errors.New("nf_conntrack tracked no flow: are the nftables rules loaded?")
		}
		return nil
	}
}

// rate runs the load (already started) for the warm-up, then returns how
// much count grew per second over the measured duration.
func rate(count *atomic.Int64) float64 {
	time.Sleep(*trafficWarmup)
	c0, t0 := count.Load(), time.Now()
	time.Sleep(*trafficDuration)
	c1, t1 := count.Load(), time.Now()
	return float64(c1-c0) / t1.Sub(t0).Seconds()
}

// pinThread locks the calling goroutine to its thread and the thread to
// one CPU (modulo the CPUs there are), so that sender and receiver do not
// trade places from one measurement to the next; the returned func undoes it.
func pinThread(cpu int) func() {
	runtime.LockOSThread()
	var old, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		return runtime.UnlockOSThread
	}
	set.Set(cpu % runtime.NumCPU())
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return runtime.UnlockOSThread
	}
	return func() {
		unix.SchedSetaffinity(0, &old)
		runtime.UnlockOSThread()
	}
}

// tcpStream returns the throughput in Mbit/s of one TCP connection from A
// to B, counted by the receiver.
func tcpStream(p *nettest.Pair) (float64, error) {
	l, err := p.B.Listen("tcp4", netip.AddrPortFrom(p.B.IPv4, portStream).String())
	if err != nil {
		return 0, err
	}
	defer l.Close()
	var received atomic.Int64
	srv := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			srv <- err
			return
		}
		defer c.Close()
		defer pinThread(1)()
		buf := make([]byte, 256<<10)
		for {
			n, err := c.Read(buf)
			received.Add(int64(n))
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = nil
				}
				srv <- err
				return
			}
		}
	}()
	c, err := p.A.Dial("tcp4", l.Addr().String())
	if err != nil {
		return 0, err
	}
	var stop atomic.Bool
	cli := make(chan error, 1)
	go func() {
		defer pinThread(0)()
		buf := make([]byte, 128<<10)
		for !stop.Load() {
			if _, err := c.Write(buf); err != nil {
				cli <- err
				return
			}
		}
		cli <- c.Close()
	}()
	r := rate(&received)
	stop.Store(true)
	if err := <-cli; err != nil {
		return 0, fmt.Errorf("sender: %w", err)
	}
	if err := <-srv; err != nil {
		return 0, fmt.Errorf("receiver: %w", err)
	}
	return r * 8 / 1e6, nil
}

// tcpCRR returns connections per second: each of crrClients clients in A
// connects, sends 64 bytes, reads B's 64-byte answer and B's close, closes.
func tcpCRR(p *nettest.Pair) (float64, error) {
	l, err := p.B.Listen("tcp4", netip.AddrPortFrom(p.B.IPv4, portCRR).String())
	if err != nil {
		return 0, err
	}
	var served sync.WaitGroup
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return // closed
			}
			served.Add(1)
			go func() {
				defer served.Done()
				defer c.Close()
				var msg [udpPayload]byte
				if _, err := io.ReadFull(c, msg[:]); err != nil {
					return
				}
				c.Write(msg[:])
			}()
		}
	}()
	var (
		done, failed atomic.Int64
		stop         atomic.Bool
		clients      sync.WaitGroup
		firstErr     atomic.Value
	)
	addr := l.Addr().String()
	for range crrClients {
		clients.Add(1)
		go func() {
			defer clients.Done()
			// Every socket of this client is created on a thread in A.
			err := p.A.Do(func() error {
				var msg [udpPayload]byte
				for !stop.Load() {
					if err := crrOnce(addr, msg[:]); err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, err)
						continue
					}
					done.Add(1)
				}
				return nil
			})
			if err != nil {
				firstErr.CompareAndSwap(nil, err)
			}
		}()
	}
	r := rate(&done)
	stop.Store(true)
	clients.Wait()
	l.Close()
	served.Wait()
	// A lost SYN or a reset here and there is traffic; many are a broken set-up.
	if f, d := failed.Load(), done.Load(); f > d/1000 {
		return 0, fmt.Errorf("%d of %d connections failed, first: %v", f, f+d, firstErr.Load())
	}
	return r, nil
}

func crrOnce(addr string, msg []byte) error {
	c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, msg); err != nil {
		return err
	}
	if n, err := c.Read(msg[:1]); n != 0 || !errors.Is(err, io.EOF) {
		return fmt.Errorf("want the server's close after its answer, got %d bytes, %v", n, err)
	}
	return nil
}

// udpSmall returns datagrams per second that A sends to B in batches of
// udpBatch with sendmmsg. On veth the receive path, and so B's ingress
// program, runs in the sender's context, so this is the rate at which
// packets cross the set-up on one CPU. B's socket is not read while the
// sender runs: every datagram goes through B's whole receive path up to
// the socket's queue (where, once it is full, it is dropped), without the
// wake-ups of a reader on the other CPU that make the rate swing with
// whatever else the machine runs.
func udpSmall(p *nettest.Pair) (float64, error) {
	pc, err := p.B.ListenPacket("udp4", netip.AddrPortFrom(p.B.IPv4, portUDP).String())
	if err != nil {
		return 0, err
	}
	defer pc.Close()
	c, err := p.A.Dial("udp4", pc.LocalAddr().String())
	if err != nil {
		return 0, err
	}
	defer c.Close()
	var (
		sent atomic.Int64
		stop atomic.Bool
	)
	errc := make(chan error, 1)
	go func() {
		defer pinThread(0)()
		wc := ipv4.NewPacketConn(c.(*net.UDPConn))
		msgs := make([]ipv4.Message, udpBatch)
		for i := range msgs {
			msgs[i].Buffers = [][]byte{make([]byte, udpPayload)}
		}
		for !stop.Load() {
			n, err := wc.WriteBatch(msgs, 0)
			if err != nil && !errors.Is(err, unix.ENOBUFS) {
				errc <- err
				return
			}
			sent.Add(int64(n))
		}
		errc <- nil
	}()
	r := rate(&sent)
	stop.Store(true)
	if err := <-errc; err != nil {
		return 0, fmt.Errorf("sender: %w", err)
	}
	// The datagrams reached B's socket.
	pc.SetReadDeadline(time.Now().Add(time.Second))
	var buf [2048]byte
	if n, _, err := pc.ReadFrom(buf[:]); err != nil || n != udpPayload {
		return 0, fmt.Errorf("B's socket holds no %d-byte datagram: %d bytes, %v", udpPayload, n, err)
	}
	return r, nil
}
