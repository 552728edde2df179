package test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/dptest"
	"github.com/ctd-dev/ctd/test/nettest"
)

// explainAnswer is `ctd explain -o json`: the keys issue 13 names.
type explainAnswer struct {
	Verdict     string `json:"verdict"`
	Reason      string `json:"reason"`
	SrcIdentity uint32 `json:"src_identity"`
	DstIdentity uint32 `json:"dst_identity"`
	Rule        string `json:"rule"`
	CTState     string `json:"ct_state"`
}

// quietLink keeps the veth between a and b silent unless the test speaks:
// no IPv6 (router and neighbour discovery, MLD) and permanent IPv4
// neighbours (no ARP), so that every packet ctd counts is the test's own.
func quietLink(t *testing.T, a, b *nettest.Host) {
	t.Helper()
	for _, h := range []struct{ self, peer *nettest.Host }{{a, b}, {b, a}} {
		for _, args := range [][]string{
			{"sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"},
			{"ip", "neigh", "replace", h.peer.IPv4.String(), "lladdr", h.peer.MAC.String(), "dev", h.self.Iface, "nud", "permanent"},
		} {
			if out, err := h.self.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
				t.Fatalf("%s in %s: %v: %s", strings.Join(args, " "), h.self.Name, err, out)
			}
		}
	}
}

// quietEcho serves echo on addr in h's namespace, without TCP keepalives
// (which would refresh conntrack entries while the test compares them).
func quietEcho(t *testing.T, h *nettest.Host, addr netip.AddrPort) {
	t.Helper()
	var l net.Listener
	if err := h.Do(func() (err error) {
		l, err = (&net.ListenConfig{KeepAlive: -1}).Listen(context.Background(), "tcp", addr.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			go io.Copy(c, c)
		}
	}()
}

// TestExplain runs `ctd explain` on the datapath attached to A's interface
// (ingress default deny, a rule allowing B's identity to tcp/8080) for an
// allowed packet, a denied one and one of an established connection, with
// `ctd monitor` registered: every map of the datapath (conntrack, counters,
// rate-limit tokens, ...) is unchanged afterwards and the monitor printed
// nothing. Then real traffic finds the verdicts explain gave.
func TestExplain(t *testing.T) {
	bin := nettest.BuildCtd(t)
	pair := nettest.NewPair(t)
	a, b := pair.A, pair.B
	quietLink(t, a, b)
	pin := nettest.PinPath(t)
	ctd := &policyCLI{t: t, bin: bin, pin: pin, stateDir: t.TempDir(), host: a}

	ctd.run("attach", "--iface", a.Iface)
	ctd.run("policy", "default", "ingress", "deny")
	ctd.run("ipcache", "add", b.IPv4.String()+"/32", "id=42")
	ctd.run("ipcache", "add", a.IPv4.String()+"/32", "id=7")
	ctd.run("policy", "add", "ingress", "id=42", "tcp/8080", "allow")
	open, closed := netip.AddrPortFrom(a.IPv4, 8080), netip.AddrPortFrom(a.IPv4, 8081)
	quietEcho(t, a, open)
	quietEcho(t, a, closed)

	mon := startMonitor(t, bin, pin, a)
	var held net.Conn
	if err := b.Do(func() (err error) {
		held, err = (&net.Dialer{Timeout: blockedAfter, KeepAlive: -1}).Dial("tcp", open.String())
		return err
	}); err != nil {
		t.Fatalf("B -> A:8080 (allowed): %v", err)
	}
	t.Cleanup(func() { held.Close() })
	if err := echo(held, "held"); err != nil {
		t.Fatal(err)
	}
	heldPort := uint16(held.LocalAddr().(*net.TCPAddr).Port)
	mon.waitFor("flow-new of the held connection", func(ev monitorEvent) bool {
		return ev.Type == "flow-new" && ev.Dport == 8080
	})
	time.Sleep(300 * time.Millisecond) // delayed ACKs
	printed := len(mon.Lines())

	maps, err := loader.OpenPinned(pin)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { maps.Close() })
	// evlisten_v1 is the monitor's: it refreshes its registration there.
	state := func() dptest.MapState {
		s := dptest.State(t, maps.ByName())
		delete(s, loader.ListenerMap)
		return s
	}
	before := state()

	src, dst := b.IPv4.String(), a.IPv4.String()
	for _, tc := range []struct {
		name string
		args []string
		want explainAnswer
	}{
		{"allowed", []string{"--proto", "tcp", "--src", src, "--dst", dst, "--dport", "8080"},
			explainAnswer{"allow", "new", 42, 7, "ingress id=42 tcp/8080 allow", "new"}},
		{"denied", []string{"--proto", "tcp", "--src", src, "--dst", dst, "--dport", "8081", "--flags", "SYN"},
			explainAnswer{"drop", "policy", 42, 7, "ingress default deny", "new"}},
		{"established", []string{"--proto", "tcp", "--src", src, "--sport", strconv.Itoa(int(heldPort)), "--dst", dst, "--dport", "8080", "--flags", "ACK"},
			explainAnswer{"allow", "established", 42, 7, "", "ESTABLISHED"}},
	} {
		out := ctd.run(append([]string{"explain", "--iface", a.Iface, "--dir", "ingress", "-o", "json"}, tc.args...)...)
		var got explainAnswer
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("%s: %v: %s", tc.name, err, out)
		}
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("%s: explain (-want +got):\n%s", tc.name, diff)
		}
		ctd.run(append([]string{"explain", "--iface", a.Iface, "--dir", "ingress"}, tc.args...)...)
	}

	time.Sleep(time.Second) // the monitor polls the ring buffer
	if diff := cmp.Diff(before, state()); diff != "" {
		t.Errorf("explain changed the datapath's maps (-before +after):\n%s", diff)
	}
	if lines := mon.Lines(); len(lines) != printed {
		t.Errorf("ctd monitor printed events during explain:\n%s", strings.Join(lines[printed:], "\n"))
	}

	// Real traffic as explain said: the allowed port connects, the other
	// is dropped (and the monitor sees the drop), the held connection
	// still carries data.
	mustConnect(t, b, "B -> A:8080", open)
	mustBeDropped(t, b, "B -> A:8081", closed)
	mon.waitFor("the policy drop of B -> A:8081", func(ev monitorEvent) bool {
		return ev.Type == "drop" && ev.Reason == "policy" && ev.Dport == 8081
	})
	if err := echo(held, "still there"); err != nil {
		t.Errorf("held connection after explain: %v", err)
	}
}

// TestExplainErrors: bad input is refused in one line naming it, and an
// interface that exists but has no ctd, or none that exists, is named.
func TestExplainErrors(t *testing.T) {
	bin := nettest.BuildCtd(t)
	pair := nettest.NewPair(t)
	a := pair.A
	pin := nettest.PinPath(t)
	ctd := &policyCLI{t: t, bin: bin, pin: pin, stateDir: t.TempDir(), host: a}
	ctd.run("attach", "--iface", a.Iface)

	base := []string{"--pin-path", pin, "--state-dir", t.TempDir(), "explain", "--dir", "ingress", "--proto", "tcp",
		"--src", pair.B.IPv4.String(), "--dst", a.IPv4.String(), "--dport", "80"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--iface", "lo"}, `ctd: invalid --iface "lo": the ctd datapath at ` + pin + ` is not attached to it (it is attached to ` + a.Iface + `)`},
		{[]string{"--iface", "nosuch0"}, `ctd: invalid --iface "nosuch0": no such interface in this network namespace`},
		{[]string{"--iface", a.Iface, "--proto", "udp", "--flags", "SYN"}, "ctd: --flags SYN: TCP flags go only with --proto tcp, not udp"},
		{[]string{"--iface", a.Iface, "--dst", "fd00:c7d::1"}, "ctd: --src " + pair.B.IPv4.String() + " and --dst fd00:c7d::1 are of different address families: give two IPv4 or two IPv6 addresses"},
		{[]string{"--iface", a.Iface, "--dport", "0"}, `ctd: invalid --dport "0": want a number 1-65535`},
		{[]string{"--iface", a.Iface, "--proto", "nosuchproto"}, `ctd: --proto: invalid protocol "nosuchproto": want a name from /etc/protocols (tcp, udp, icmp, icmpv6, sctp, gre, esp, ...) or a number 1-255`},
	} {
		cmd := a.Command(bin, append(append([]string{}, base...), tc.args...)...)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Errorf("explain %v: %v, want exit 1; output: %s", tc.args, err, out)
			continue
		}
		if got := strings.TrimSpace(string(out)); got != tc.want {
			t.Errorf("explain %v:\n got %s\nwant %s", tc.args, got, tc.want)
		}
	}
}
