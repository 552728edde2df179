package test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/test/nettest"
)

// blockedAfter is how long a connection attempt or an answer may take
// before the test calls it dropped. On a veth between two namespaces an
// answer takes well under a millisecond.
const blockedAfter = 1500 * time.Millisecond

// policyCLI runs the ctd binary in host's network namespace against one
// pin path and state directory, and logs every step as a transcript.
type policyCLI struct {
	t        *testing.T
	bin      string
	pin      string
	stateDir string
	host     *nettest.Host
}

// run runs `ctd args...`, logs the command and its output, and fails the
// test unless it exits 0.
func (c *policyCLI) run(args ...string) string {
	c.t.Helper()
	return c.exec(true, args...)
}

// quiet is run without logging the output (for reads of counters).
func (c *policyCLI) quiet(args ...string) string {
	c.t.Helper()
	return c.exec(false, args...)
}

func (c *policyCLI) exec(logOutput bool, args ...string) string {
	c.t.Helper()
	stdout, stderr, err := c.start(logOutput, args...)
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		c.t.Fatalf("ctd %s: exit %d: %s", strings.Join(args, " "), ee.ExitCode(), strings.TrimSpace(stderr))
	}
	if err != nil {
		c.t.Fatalf("run ctd %s: %v", strings.Join(args, " "), err)
	}
	return stdout
}

// fails runs ctd with args, which must exit with an error, and returns
// what it wrote to stderr.
func (c *policyCLI) fails(args ...string) string {
	c.t.Helper()
	_, stderr, err := c.start(true, args...)
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		c.t.Fatalf("ctd %s: %v, want it to exit with an error", strings.Join(args, " "), err)
	}
	return stderr
}

// start runs ctd with args (for at most a minute) and returns its output.
func (c *policyCLI) start(logOutput bool, args ...string) (stdout, stderr string, err error) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	full := append([]string{"--pin-path", c.pin, "--state-dir", c.stateDir}, args...)
	cmd := c.host.CommandContext(ctx, c.bin, full...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	if logOutput {
		c.t.Logf("$ ctd %s\n%s%s", strings.Join(args, " "), out.String(), errOut.String())
	}
	return out.String(), errOut.String(), err
}

// echoServer accepts TCP connections on addr in h's namespace and echoes
// what they send, until the test ends.
func echoServer(t *testing.T, h *nettest.Host, addr netip.AddrPort) {
	t.Helper()
	l, err := h.Listen("tcp", addr.String())
	if err != nil {
		t.Fatalf("listen on %v in %s: %v", addr, h.Name, err)
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

// dial connects from h to addr, giving up after blockedAfter.
func dial(h *nettest.Host, addr netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func() (err error) {
		d := net.Dialer{Timeout: blockedAfter}
		c, err = d.Dial("tcp", addr.String())
		return err
	})
	return c, err
}

// echo sends a line on c and waits up to blockedAfter for it to come back.
func echo(c net.Conn, msg string) error {
	if err := c.SetDeadline(time.Now().Add(blockedAfter)); err != nil {
		return err
	}
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return err
	}
	buf := make([]byte, len(msg)+1)
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg+"\n" {
		return fmt.Errorf("echo returned %q, want %q", buf, msg+"\n")
	}
	return nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// mustConnect opens a connection from `from` to addr and checks that it
// carries data both ways.
func mustConnect(t *testing.T, from *nettest.Host, name string, addr netip.AddrPort) net.Conn {
	t.Helper()
	c, err := dial(from, addr)
	if err != nil {
		t.Fatalf("%s: connect to %v: %v", name, addr, err)
	}
	t.Cleanup(func() { c.Close() })
	if err := echo(c, "hello from "+name); err != nil {
		t.Fatalf("%s: echo over %v: %v", name, addr, err)
	}
	t.Logf("%s: connected to %v, echo ok", name, addr)
	return c
}

// mustBeDropped checks that a connection from `from` to addr is not
// established: the SYN is dropped, so the dial times out (a refusal would
// mean a RST passed, which is not what a drop looks like).
func mustBeDropped(t *testing.T, from *nettest.Host, name string, addr netip.AddrPort) {
	t.Helper()
	start := time.Now()
	c, err := dial(from, addr)
	if err == nil {
		c.Close()
		t.Fatalf("%s: connection to %v succeeded, want it dropped", name, addr)
	}
	if !isTimeout(err) {
		t.Fatalf("%s: connection to %v failed with %v, want a timeout (dropped SYN)", name, addr, err)
	}
	t.Logf("%s: connect to %v timed out after %v (dropped)", name, addr, time.Since(start).Round(time.Millisecond))
}

// ctFlow is the part of a `ctd ct list -o json` row this test reads.
type ctFlow struct {
	Proto       string `json:"proto"`
	Src         string `json:"src"`
	Dst         string `json:"dst"`
	Dport       uint16 `json:"dport"`
	State       string `json:"state"`
	SrcIdentity uint32 `json:"src_identity"`
	DstIdentity uint32 `json:"dst_identity"`
}

// TestPolicyScenario is issue 3's integration scenario, in IPv4 and IPv6.
// ctd runs on A's interface (A is the protected side) with ingress default
// deny. Connections A opens work: their replies pass by conntrack. B's
// connections to A are dropped until B's address gets identity 42 and a
// rule allows identity 42 to the port. An established connection survives
// removing the rule (established flows are not re-judged) and dies with
// `ct flush` (its next packet is judged as a new flow, and denied).
func TestPolicyScenario(t *testing.T) {
	bin := nettest.BuildCtd(t)
	pair := nettest.NewPair(t)
	a, b := pair.A, pair.B
	ctd := &policyCLI{t: t, bin: bin, pin: nettest.PinPath(t), stateDir: t.TempDir(), host: a}

	ctd.run("attach", "--iface", a.Iface)
	ctd.run("policy", "default", "ingress", "deny")

	for _, fam := range []struct {
		name   string
		aAddr  netip.Addr
		bAddr  netip.Addr
		port   uint16
		ident  string
		family string
	}{
		{"ipv4", a.IPv4, b.IPv4, 8080, "42", "/32"},
		{"ipv6", a.IPv6, b.IPv6, 8081, "43", "/128"},
	} {
		parent := ctd.t
		t.Run(fam.name, func(t *testing.T) {
			ctd.t = t // log and fail in the subtest
			defer func() { ctd.t = parent }()
			port := strconv.Itoa(int(fam.port))
			onA := netip.AddrPortFrom(fam.aAddr, fam.port)
			onB := netip.AddrPortFrom(fam.bAddr, fam.port)
			echoServer(t, a, onA)
			echoServer(t, b, onB)

			// From the protected side out: allowed on egress (default
			// allow), and the replies pass by conntrack.
			mustConnect(t, a, "A -> B", onB)
			// From the peer in: no rule, ingress default deny.
			mustBeDropped(t, b, "B -> A", onA)

			ctd.run("ipcache", "add", fam.bAddr.String()+fam.family, "id="+fam.ident)
			ctd.run("ipcache", "get", fam.bAddr.String())
			ctd.run("policy", "add", "ingress", "id="+fam.ident, "tcp/"+port, "allow")
			ctd.run("policy", "list")

			conn := mustConnect(t, b, "B -> A", onA)
			var flows []ctFlow
			if err := json.Unmarshal([]byte(ctd.run("ct", "list", "-o", "json", "--proto", "tcp", "--port", port)), &flows); err != nil {
				t.Fatal(err)
			}
			found := false
			for _, f := range flows {
				if f.Src == fam.bAddr.String() && f.Dst == fam.aAddr.String() && f.Dport == fam.port {
					found = true
					if strconv.Itoa(int(f.SrcIdentity)) != fam.ident || f.DstIdentity != 2 {
						t.Errorf("flow B -> A carries identities %d -> %d, want %s -> 2 (world)", f.SrcIdentity, f.DstIdentity, fam.ident)
					}
				}
			}
			if !found {
				t.Fatalf("no conntrack entry for B -> A:%d in %+v", fam.port, flows)
			}

			// Removing the rule does not re-judge the established flow,
			// but new ones are dropped again.
			ctd.run("policy", "del", "ingress", "id="+fam.ident, "tcp/"+port)
			if err := echo(conn, "still here"); err != nil {
				t.Fatalf("established B -> A connection broke after the rule was deleted: %v", err)
			}
			t.Logf("B -> A: established connection still echoes after policy del")
			mustBeDropped(t, b, "B -> A (new)", onA)

			// Without its conntrack entry, the next packet of the flow is
			// judged as a new flow: denied.
			ctd.run("ct", "flush")
			err := echo(conn, "after flush")
			if err == nil {
				t.Fatal("established B -> A connection still works after ct flush, want it cut")
			}
			if !isTimeout(err) {
				t.Fatalf("after ct flush the B -> A connection failed with %v, want no answer (timeout)", err)
			}
			t.Logf("B -> A: after ct flush the next send got no answer within %v (dropped)", blockedAfter)
			mustBeDropped(t, b, "B -> A (new)", onA)
			// The protected side still connects out.
			mustConnect(t, a, "A -> B", onB)
		})
	}
}
