package nettest

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// netnsList returns the names printed by `ip netns list`.
func netnsList(t *testing.T) map[string]bool {
	t.Helper()
	RequireTool(t, "ip", "iproute2")
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v\n%s", err, out)
	}
	names := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) > 0 {
			names[f[0]] = true
		}
	}
	return names
}

// rootIfaces returns the interface names of the test process's namespace.
func rootIfaces(t *testing.T) map[string]bool {
	t.Helper()
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, i := range ifs {
		names[i.Name] = true
	}
	return names
}

// echoOnce accepts one connection on l and echoes everything back.
func echoOnce(t *testing.T, l net.Listener) {
	t.Helper()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
}

func checkTCP(t *testing.T, from, to *Host, dst netip.Addr) {
	t.Helper()
	l, err := to.Listen("tcp", netip.AddrPortFrom(dst, 0).String())
	if err != nil {
		t.Fatalf("listen in %s: %v", to.Name, err)
	}
	defer l.Close()
	echoOnce(t, l)

	c, err := from.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatalf("dial %s from %s: %v", l.Addr(), from.Name, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	local := netip.MustParseAddrPort(c.LocalAddr().String()).Addr()
	if local != from.IPv4 && local != from.IPv6 {
		t.Errorf("connection's local address %s is not %s's veth address", local, from.Name)
	}
	msg := []byte("hello from " + from.Name)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo = %q, want %q", got, msg)
	}
}

func TestPair(t *testing.T) {
	RequireRoot(t)
	before := rootIfaces(t)
	var names, paths []string

	t.Run("lifecycle", func(t *testing.T) {
		p := NewPair(t)
		names = []string{p.A.Name, p.B.Name}
		paths = []string{p.A.NSPath, p.B.NSPath}
		if p.A.Name == p.B.Name {
			t.Fatalf("both namespaces are named %s", p.A.Name)
		}
		if p.Peer(p.A) != p.B || p.Peer(p.B) != p.A {
			t.Error("Peer does not return the other host")
		}
		listed := netnsList(t)
		for _, h := range []*Host{p.A, p.B} {
			if !strings.HasPrefix(h.Name, NamePrefix) {
				t.Errorf("namespace %q lacks prefix %q", h.Name, NamePrefix)
			}
			if h.NSPath != "/var/run/netns/"+h.Name {
				t.Errorf("NSPath = %q", h.NSPath)
			}
			if !listed[h.Name] {
				t.Errorf("%s not in `ip netns list`: %v", h.Name, listed)
			}
			if h.IfIndex == 0 || len(h.MAC) != 6 {
				t.Errorf("%s: IfIndex %d, MAC %v", h.Name, h.IfIndex, h.MAC)
			}
		}
		if p.A.IPv4 != netip.MustParseAddr("198.51.100.1") || p.B.IPv4 != netip.MustParseAddr("198.51.100.2") ||
			p.A.IPv6 != netip.MustParseAddr("fd00:c7d::1") || p.B.IPv6 != netip.MustParseAddr("fd00:c7d::2") {
			t.Errorf("unexpected addresses: A %s %s, B %s %s", p.A.IPv4, p.A.IPv6, p.B.IPv4, p.B.IPv6)
		}

		t.Run("root netns untouched", func(t *testing.T) {
			after := rootIfaces(t)
			for n := range after {
				if !before[n] {
					t.Errorf("interface %s appeared in the root namespace", n)
				}
			}
		})

		t.Run("Do switches namespace and restores", func(t *testing.T) {
			self, err := netns.Get()
			if err != nil {
				t.Fatal(err)
			}
			defer self.Close()
			for _, h := range []*Host{p.A, p.B} {
				var ifaces []string
				err := h.Do(func() error {
					cur, err := netns.Get()
					if err != nil {
						return err
					}
					defer cur.Close()
					if !cur.Equal(h.Handle) {
						return errors.New("not in the host's namespace")
					}
					ifs, err := net.Interfaces()
					for _, i := range ifs {
						ifaces = append(ifaces, i.Name)
					}
					return err
				})
				if err != nil {
					t.Fatalf("Do in %s: %v", h.Name, err)
				}
				if strings.Join(ifaces, ",") != "lo,"+h.Iface {
					t.Errorf("interfaces in %s = %v, want [lo %s]", h.Name, ifaces, h.Iface)
				}
			}
			sentinel := errors.New("sentinel")
			if err := p.A.Do(func() error { return sentinel }); err != sentinel {
				t.Errorf("Do returned %v, want the fn's error", err)
			}
			func() {
				defer func() {
					if r := recover(); r != "boom" {
						t.Errorf("recovered %v, want the fn's panic", r)
					}
				}()
				p.A.Do(func() error { panic("boom") })
			}()
			cur, err := netns.Get()
			if err != nil {
				t.Fatal(err)
			}
			defer cur.Close()
			if !cur.Equal(self) {
				t.Error("test goroutine's namespace changed")
			}
		})

		t.Run("TCP over IPv4", func(t *testing.T) {
			checkTCP(t, p.A, p.B, p.B.IPv4)
			checkTCP(t, p.B, p.A, p.A.IPv4)
		})
		t.Run("TCP over IPv6", func(t *testing.T) {
			checkTCP(t, p.A, p.B, p.B.IPv6)
			checkTCP(t, p.B, p.A, p.A.IPv6)
		})

		t.Run("UDP over IPv6", func(t *testing.T) {
			pc, err := p.B.ListenPacket("udp", "[fd00:c7d::2]:0")
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			c, err := p.A.Dial("udp", pc.LocalAddr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			pc.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 16)
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				t.Fatal(err)
			}
			if string(buf[:n]) != "ping" || netip.MustParseAddrPort(from.String()).Addr() != p.A.IPv6 {
				t.Errorf("got %q from %s", buf[:n], from)
			}
		})

		t.Run("ping", func(t *testing.T) {
			p.A.Ping(t, p.B.IPv4, 2)
			p.A.Ping(t, p.B.IPv6, 2)
			p.B.Ping(t, p.A.IPv4, 1)
			p.B.Ping(t, p.A.IPv6, 1)
		})

		t.Run("Command runs inside the namespace", func(t *testing.T) {
			out, err := p.B.Command("ip", "-br", "addr", "show", "dev", p.B.Iface).CombinedOutput()
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			for _, want := range []string{"198.51.100.2/24", "fd00:c7d::2/64", "UP"} {
				if !strings.Contains(string(out), want) {
					t.Errorf("`ip -br addr` in %s = %q, missing %q", p.B.Name, out, want)
				}
			}
		})
	})

	// The subtest's cleanups have run: both namespaces must be gone.
	if len(names) != 2 {
		t.Fatal("lifecycle subtest did not create a pair")
	}
	listed := netnsList(t)
	for i, n := range names {
		if listed[n] {
			t.Errorf("namespace %s still in `ip netns list` after cleanup", n)
		}
		if _, err := os.Lstat(paths[i]); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after cleanup (err %v)", paths[i], err)
		}
	}
}

// TestIndependentPairs checks that pairs do not clash (same addresses and
// interface names live in different namespaces).
func TestIndependentPairs(t *testing.T) {
	p1 := NewPair(t)
	p2 := NewPair(t)
	seen := map[string]bool{}
	for _, n := range []string{p1.A.Name, p1.B.Name, p2.A.Name, p2.B.Name} {
		if seen[n] {
			t.Fatalf("namespace name %s reused", n)
		}
		seen[n] = true
	}
	checkTCP(t, p1.A, p1.B, p1.B.IPv4)
	checkTCP(t, p2.B, p2.A, p2.A.IPv6)
}

func TestPinPath(t *testing.T) {
	var p string
	t.Run("create", func(t *testing.T) {
		p = PinPath(t)
		if filepath.Dir(p) != BPFFSRoot || !strings.HasPrefix(filepath.Base(p), PinPrefix) {
			t.Fatalf("PinPath = %q", p)
		}
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("PinPath %s exists already (err %v)", p, err)
		}
		if q := PinPath(t); q == p {
			t.Fatalf("PinPath returned %s twice", p)
		}
		// Simulate ctd pinning into a nested directory.
		if err := os.MkdirAll(filepath.Join(p, "maps"), 0o700); err != nil {
			t.Fatal(err)
		}
	})
	if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin path %s still exists after cleanup (err %v)", p, err)
	}
}

func TestBuildCtdHonoursCTDBIN(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "ctd")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CTD_BIN", bin)
	if got := BuildCtd(t); got != bin {
		t.Errorf("BuildCtd = %q, want $CTD_BIN %q", got, bin)
	}
}
