package test

import (
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/test/nettest"
)

// heldConn is one TCP connection between A (the protected side) and B
// with both ends in hand, so that the test can make either side send.
type heldConn struct {
	name         string
	a, b         net.Conn // A's end, B's end
	aPort, bPort uint16
}

// connect opens a connection from host `from` to the listener l at `to`
// and returns both ends: the dialled one and the accepted one.
func connect(t *testing.T, name string, from *nettest.Host, l net.Listener, to netip.AddrPort) (dialled, accepted net.Conn) {
	t.Helper()
	acc := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			acc <- c
		}
		close(acc)
	}()
	dialled, err := dial(from, to)
	if err != nil {
		t.Fatalf("%s: connect to %v: %v", name, to, err)
	}
	accepted, ok := <-acc
	if !ok {
		dialled.Close()
		t.Fatalf("%s: accept on %v failed", name, to)
	}
	t.Cleanup(func() { dialled.Close(); accepted.Close() })
	return dialled, accepted
}

func port(c net.Conn) uint16 { return netip.MustParseAddrPort(c.LocalAddr().String()).Port() }

// acceptFrom opens a connection from B to A's listener l.
func acceptFrom(t *testing.T, name string, b *nettest.Host, l net.Listener, to netip.AddrPort) *heldConn {
	t.Helper()
	cb, ca := connect(t, name, b, l, to)
	hc := &heldConn{name: name, a: ca, b: cb, aPort: to.Port(), bPort: port(cb)}
	hc.mustPass(t)
	return hc
}

// dialFrom opens a connection from A to B's listener l.
func dialFrom(t *testing.T, name string, a *nettest.Host, l net.Listener, to netip.AddrPort) *heldConn {
	t.Helper()
	ca, cb := connect(t, name, a, l, to)
	hc := &heldConn{name: name, a: ca, b: cb, aPort: port(ca), bPort: to.Port()}
	hc.mustPass(t)
	return hc
}

// chatter makes each of conns exchange a message both ways every interval
// until the returned stop is called, which returns each connection's first
// error (nil while it worked) and the number of exchanges in all.
func chatter(conns []*heldConn, interval time.Duration) (stop func() ([]error, int)) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	errs := make([]error, len(conns))
	rounds := make([]int, len(conns))
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-done:
					return
				default:
				}
				if errs[i] = send(c.a, c.b, "a"); errs[i] != nil {
					return
				}
				if errs[i] = send(c.b, c.a, "b"); errs[i] != nil {
					return
				}
				rounds[i]++
				time.Sleep(interval)
			}
		}()
	}
	return func() ([]error, int) {
		close(done)
		wg.Wait()
		n := 0
		for _, r := range rounds {
			n += r
		}
		return errs, n
	}
}

// send writes msg on from and waits up to blockedAfter for it on to.
func send(from, to net.Conn, msg string) error {
	if err := to.SetReadDeadline(time.Now().Add(blockedAfter)); err != nil {
		return err
	}
	if _, err := io.WriteString(from, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	_, err := io.ReadFull(to, buf)
	return err
}

// mustPass checks that data passes both ways.
func (c *heldConn) mustPass(t *testing.T) {
	t.Helper()
	if err := send(c.b, c.a, "ping"); err != nil {
		t.Fatalf("%s: B -> A: %v", c.name, err)
	}
	if err := send(c.a, c.b, "pong"); err != nil {
		t.Fatalf("%s: A -> B: %v", c.name, err)
	}
}

// mustBeCut checks that nothing passes in either direction: A's data
// (which A's stack retransmits meanwhile) and B's data time out.
func (c *heldConn) mustBeCut(t *testing.T) {
	t.Helper()
	if err := send(c.a, c.b, "from A"); !isTimeout(err) {
		t.Fatalf("%s: A -> B after the revoke: %v, want no data within %v", c.name, err, blockedAfter)
	}
	if err := send(c.b, c.a, "from B"); !isTimeout(err) {
		t.Fatalf("%s: B -> A after the revoke: %v, want no data within %v", c.name, err, blockedAfter)
	}
}

// flowPackets returns the packets conntrack counted on the flow from B's
// port to A's port, and its flags.
func (ctd *policyCLI) flowPackets(bPort, aPort uint16) (uint64, []string) {
	ctd.t.Helper()
	var rows []struct {
		Sport, Dport uint16
		Orig         uint64 `json:"packets_orig"`
		Reply        uint64 `json:"packets_reply"`
		Flags        []string
	}
	if err := json.Unmarshal([]byte(ctd.run("ct", "list", "-o", "json", "--port", strconv.Itoa(int(aPort)))), &rows); err != nil {
		ctd.t.Fatal(err)
	}
	for _, r := range rows {
		if r.Sport == bPort && r.Dport == aPort {
			return r.Orig + r.Reply, r.Flags
		}
	}
	ctd.t.Fatalf("no conntrack entry for port %d -> %d", bPort, aPort)
	return 0, nil
}

// revokedDrops returns the packets dropped with reason revoked, by direction.
func (ctd *policyCLI) revokedDrops() map[string]uint64 {
	ctd.t.Helper()
	var rows []struct {
		Dir, Reason string
		Packets     uint64
	}
	if err := json.Unmarshal([]byte(ctd.quiet("metrics", "-o", "json")), &rows); err != nil {
		ctd.t.Fatal(err)
	}
	out := map[string]uint64{}
	for _, r := range rows {
		if r.Reason == "revoked" {
			out[r.Dir] = r.Packets
		}
	}
	return out
}

// TestRevoke is issue 11's revocation test: with ingress default deny, a
// connection allowed by a rule is cut in both directions when the rule is
// deleted with --revoke (the protected side's retransmissions included,
// and no pickup re-creates it), while a connection allowed by another
// rule goes on; then 'ct revoke' after a plain 'policy del' does the same.
func TestRevoke(t *testing.T) {
	bin := nettest.BuildCtd(t)
	pair := nettest.NewPair(t)
	a, b := pair.A, pair.B
	ctd := &policyCLI{t: t, bin: bin, pin: nettest.PinPath(t), stateDir: t.TempDir(), host: a}

	ctd.run("attach", "--iface", a.Iface)
	ctd.run("policy", "default", "ingress", "deny")
	ctd.run("ipcache", "add", b.IPv4.String()+"/32", "id=42")
	const cutPort, keptPort = 8090, 8091
	listen := func(port uint16) (net.Listener, netip.AddrPort) {
		addr := netip.AddrPortFrom(a.IPv4, port)
		l, err := a.Listen("tcp", addr.String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		ctd.run("policy", "add", "ingress", "id=42", "tcp/"+strconv.Itoa(int(port)), "allow")
		return l, addr
	}
	lCut, toCut := listen(cutPort)
	lKept, toKept := listen(keptPort)
	kept := acceptFrom(t, "kept", b, lKept, toKept)

	for _, step := range []struct {
		name   string
		revoke func() string
	}{
		{"policy del --revoke", func() string {
			return ctd.run("policy", "del", "ingress", "id=42", "tcp/"+strconv.Itoa(cutPort), "--revoke")
		}},
		{"policy del, then ct revoke", func() string {
			ctd.run("policy", "del", "ingress", "id=42", "tcp/"+strconv.Itoa(cutPort))
			out := ctd.run("ct", "revoke", "-o", "json")
			// Cut: this step's flow and the previous step's, which stays
			// revoked; kept: the other rule's flow.
			var res struct{ Revoked, Kept int }
			if err := json.Unmarshal([]byte(out), &res); err != nil || res.Revoked != 2 || res.Kept != 1 {
				ctd.t.Fatalf("ct revoke -o json printed %q (%v), want revoked 2, kept 1", out, err)
			}
			return out
		}},
	} {
		parent := ctd.t
		t.Run(step.name, func(t *testing.T) {
			ctd.t = t
			defer func() { ctd.t = parent }()
			cut := acceptFrom(t, "cut", b, lCut, toCut)
			before := ctd.revokedDrops()
			start := time.Now()
			out := step.revoke()
			took := time.Since(start)
			pkts, _ := ctd.flowPackets(cut.bPort, cut.aPort)
			cut.mustBeCut(t)
			// A's stack retransmitted its data meanwhile; none of it passed.
			time.Sleep(time.Second)
			after, flags := ctd.flowPackets(cut.bPort, cut.aPort)
			if after != pkts {
				t.Errorf("the revoked flow counted %d packets after the revoke, want none", after-pkts)
			}
			if !slices.Contains(flags, "revoked") {
				t.Errorf("the cut flow's flags are %v, want revoked", flags)
			}
			drops := ctd.revokedDrops()
			in, eg := drops["ingress"]-before["ingress"], drops["egress"]-before["egress"]
			if in == 0 || eg == 0 {
				t.Errorf("drops with reason revoked: ingress %d, egress %d, want both above 0", in, eg)
			}
			t.Logf("%s: command took %v (%q); then dropped as revoked: %d ingress, %d egress (A's retransmissions), 0 packets passed",
				step.name, took.Round(time.Millisecond), out, in, eg)
			kept.mustPass(t)
			mustBeDropped(t, b, "B -> A (new)", toCut)
			// Allowed again: new connections work, the revoked tuple stays cut.
			ctd.run("policy", "add", "ingress", "id=42", "tcp/"+strconv.Itoa(cutPort), "allow")
		})
	}
}
