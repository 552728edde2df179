// Package nettest provides test topologies of network namespaces and veth pairs.
package nettest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const (
	// NetnsDir is where named network namespaces are registered (as ip-netns does).
	NetnsDir = "/var/run/netns"
	// NamePrefix prefixes every namespace name created by this package.
	NamePrefix = "ctdt-"
	// BPFFSRoot is the bpffs mount point that pin paths live under.
	BPFFSRoot = "/sys/fs/bpf"
	// PinPrefix prefixes every pin path returned by PinPath.
	PinPrefix = "ctdtest-"

	// IfaceA and IfaceB are the veth ends' names inside namespaces A and B.
	IfaceA = "ctd0"
	IfaceB = "ctd1"

	readyTimeout = 10 * time.Second
	dialTimeout  = 10 * time.Second
)

var (
	// Prefix4 and Prefix6 are the subnets configured on the veth pair.
	// 198.51.100.0/24 is TEST-NET-2 (RFC 5737); fd00:c7d::/64 is ULA space.
	Prefix4 = netip.MustParsePrefix("198.51.100.0/24")
	Prefix6 = netip.MustParsePrefix("fd00:c7d::/64")

	addrA4 = netip.MustParseAddr("198.51.100.1")
	addrB4 = netip.MustParseAddr("198.51.100.2")
	addrA6 = netip.MustParseAddr("fd00:c7d::1")
	addrB6 = netip.MustParseAddr("fd00:c7d::2")
)

// Host is one end of a Pair: a named network namespace holding one veth end.
type Host struct {
	Name    string           // network namespace name, e.g. "ctdt-1a2b3c4d"
	NSPath  string           // /var/run/netns/<Name>
	Iface   string           // veth end inside the namespace ("ctd0" or "ctd1")
	IfIndex int              // ifindex of Iface inside the namespace
	MAC     net.HardwareAddr // hardware address of Iface
	IPv4    netip.Addr       // address on Iface, inside Prefix4
	IPv6    netip.Addr       // address on Iface, inside Prefix6 (configured nodad)
	Handle  netns.NsHandle   // open handle on the namespace, closed by cleanup
}

// Pair is two network namespaces connected by a veth pair:
// A (ctd0, 198.51.100.1/24, fd00:c7d::1/64) <-> B (ctd1, 198.51.100.2/24, fd00:c7d::2/64).
type Pair struct {
	A, B *Host
}

// NewPair creates two fresh network namespaces joined by a veth pair, with
// lo and both veth ends up and IPv4 and IPv6 (nodad) addresses assigned. It
// returns once both links are operationally up. Both namespaces (and with
// them the veth) are deleted by t.Cleanup, also when the test fails.
//
// The namespaces are registered under /var/run/netns exactly like
// `ip netns add` does, so tools reach them with `nsenter --net=NSPath` or
// `ip -n NAME`. Nothing is configured in the root network namespace: the veth
// is created inside A with its peer placed directly into B. Needs root.
func NewPair(t testing.TB) *Pair {
	t.Helper()
	RequireRoot(t)

	a := newHost(t, IfaceA, addrA4, addrA6)
	b := newHost(t, IfaceB, addrB4, addrB6)

	if err := createVeth(a, b); err != nil {
		t.Fatalf("nettest: creating veth %s/%s between %s and %s: %v", a.Iface, b.Iface, a.Name, b.Name, err)
	}
	for _, h := range []*Host{a, b} {
		if err := h.configure(); err != nil {
			t.Fatalf("nettest: configuring %s in %s: %v", h.Iface, h.Name, err)
		}
	}
	for _, h := range []*Host{a, b} {
		if err := h.waitReady(readyTimeout); err != nil {
			t.Fatalf("nettest: %s in %s not ready: %v", h.Iface, h.Name, err)
		}
	}
	return &Pair{A: a, B: b}
}

// Peer returns the other host of the pair.
func (p *Pair) Peer(h *Host) *Host {
	if h == p.A {
		return p.B
	}
	return p.A
}

// newHost creates a named network namespace and registers its removal.
func newHost(t testing.TB, iface string, v4, v6 netip.Addr) *Host {
	t.Helper()
	var (
		name string
		h    netns.NsHandle
		err  error
	)
	for range 5 { // retry on the (unlikely) name collision
		name = NamePrefix + randomHex(4)
		h, err = addNamedNetns(name)
		if !errors.Is(err, os.ErrExist) {
			break
		}
	}
	if err != nil {
		t.Fatalf("nettest: creating network namespace %s: %v", name, err)
	}
	host := &Host{
		Name:   name,
		NSPath: filepath.Join(NetnsDir, name),
		Iface:  iface,
		IPv4:   v4,
		IPv6:   v6,
		Handle: h,
	}
	t.Cleanup(func() {
		if err := host.Handle.Close(); err != nil {
			t.Errorf("nettest: closing handle of %s: %v", host.Name, err)
		}
		if err := deleteNamedNetns(host.Name); err != nil {
			t.Errorf("nettest: deleting network namespace %s: %v", host.Name, err)
		}
	})
	return host
}

// ensureNetnsDir makes NetnsDir a shared mount point, as `ip netns add` does,
// so that namespace bind mounts propagate to other mount namespaces.
func ensureNetnsDir() error {
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return err
	}
	madeMount := false
	for {
		err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EINVAL) || madeMount {
			return fmt.Errorf("mount --make-rshared %s: %w", NetnsDir, err)
		}
		// Not a mount point yet: bind mount it onto itself, then retry.
		if err := unix.Mount(NetnsDir, NetnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("mount --rbind %s %s: %w", NetnsDir, NetnsDir, err)
		}
		madeMount = true
	}
}

// addNamedNetns creates a new network namespace and bind mounts it at
// NetnsDir/name. The calling goroutine's namespace is not changed.
func addNamedNetns(name string) (netns.NsHandle, error) {
	if err := ensureNetnsDir(); err != nil {
		return netns.None(), err
	}
	path := filepath.Join(NetnsDir, name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return netns.None(), err
	}
	f.Close()

	errc := make(chan error, 1)
	go func() {
		// This thread's namespace is changed for good: never unlock it, so
		// the runtime terminates the thread when this goroutine exits.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
			return
		}
		self := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind mount %s on %s: %w", self, path, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return netns.None(), err
	}
	h, err := netns.GetFromPath(path)
	if err != nil {
		_ = deleteNamedNetns(name)
		return netns.None(), err
	}
	return h, nil
}

// deleteNamedNetns is `ip netns delete NAME`: the namespace is freed by the
// kernel once nothing else (process, socket, open handle) refers to it.
func deleteNamedNetns(name string) error {
	path := filepath.Join(NetnsDir, name)
	var errs []error
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("umount %s: %w", path, err))
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// netlinkHandle returns a netlink handle bound to the host's namespace.
func (h *Host) netlinkHandle() (*netlink.Handle, error) {
	return netlink.NewHandleAt(h.Handle, unix.NETLINK_ROUTE)
}

// createVeth creates the veth pair inside a's namespace with its peer placed
// directly into b's namespace, so it never appears in the root namespace.
func createVeth(a, b *Host) error {
	nl, err := a.netlinkHandle()
	if err != nil {
		return err
	}
	defer nl.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: a.Iface},
		PeerName:      b.Iface,
		PeerNamespace: netlink.NsFd(int(b.Handle)),
	}
	return nl.LinkAdd(veth)
}

// configure brings lo and the veth end up and assigns the addresses.
func (h *Host) configure() error { return h.configureIn(Prefix4, Prefix6) }

// waitReady waits until the veth end is operationally up and its IPv6
// address is not tentative.
func (h *Host) waitReady(timeout time.Duration) error {
	nl, err := h.netlinkHandle()
	if err != nil {
		return err
	}
	defer nl.Close()
	deadline := time.Now().Add(timeout)
	for {
		state, err := h.readiness(nl)
		if err != nil {
			return err
		}
		if state == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %v: %s", timeout, state)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// readiness returns "" when ready, or what is still missing.
func (h *Host) readiness(nl *netlink.Handle) (string, error) {
	link, err := nl.LinkByIndex(h.IfIndex)
	if err != nil {
		return "", err
	}
	if op := link.Attrs().OperState; op != netlink.OperUp {
		return "operstate " + op.String(), nil
	}
	addrs, err := nl.AddrList(link, netlink.FAMILY_V6)
	if err != nil {
		return "", err
	}
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		if ip == h.IPv6 {
			if a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) != 0 {
				return fmt.Sprintf("%s tentative (flags %#x)", ip, a.Flags), nil
			}
			return "", nil
		}
	}
	return fmt.Sprintf("%s not configured", h.IPv6), nil
}

// Do runs fn on a fresh OS thread switched into the host's network namespace
// and returns its error. Sockets created inside fn stay in that namespace.
// The thread's namespace is restored afterwards; if that fails, the thread
// stays locked so the runtime discards it. A panic in fn is re-raised in the
// caller, and runtime.Goexit (t.FailNow) in fn exits the caller's goroutine.
func (h *Host) Do(fn func() error) error {
	type result struct {
		err      error
		panicked bool
		panicVal any
		goexit   bool
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("nettest: get current netns: %w", err)}
			return
		}
		defer orig.Close()
		if err := netns.Set(h.Handle); err != nil {
			// setns failed, so the thread is still in its original namespace.
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("nettest: enter netns %s: %w", h.Name, err)}
			return
		}
		var res result
		returned := false
		defer func() {
			if !returned {
				if p := recover(); p != nil {
					res.panicked, res.panicVal = true, p
				} else {
					res.goexit = true
				}
			}
			if err := netns.Set(orig); err == nil {
				runtime.UnlockOSThread()
			} else if res.err == nil && !res.panicked && !res.goexit {
				// Leave the thread locked: it is terminated with this goroutine.
				res.err = fmt.Errorf("nettest: restore netns after %s: %w", h.Name, err)
			}
			done <- res
		}()
		res.err = fn()
		returned = true
	}()
	res := <-done
	switch {
	case res.panicked:
		panic(res.panicVal)
	case res.goexit:
		runtime.Goexit()
	}
	return res.err
}

// Listen is net.Listen inside the host's namespace.
func (h *Host) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := h.Do(func() (err error) {
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// ListenPacket is net.ListenPacket inside the host's namespace.
func (h *Host) ListenPacket(network, addr string) (net.PacketConn, error) {
	var c net.PacketConn
	err := h.Do(func() (err error) {
		c, err = net.ListenPacket(network, addr)
		return err
	})
	return c, err
}

// Dial is net.Dial (with a 10s timeout) from inside the host's namespace.
func (h *Host) Dial(network, addr string) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func() (err error) {
		d := net.Dialer{Timeout: dialTimeout}
		c, err = d.Dial(network, addr)
		return err
	})
	return c, err
}

// Command returns a command that runs name with args inside the host's
// network namespace via `nsenter --net=NSPath -- name args...`. Unlike
// `ip netns exec` it keeps the root mount namespace (and so /sys/fs/bpf).
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=" + h.NSPath, "--", name}, args...)...)
}

// CommandContext is Command with a context that kills the process.
func (h *Host) CommandContext(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + h.NSPath, "--", name}, args...)...)
}

// Ping sends count echo requests from the host to dst with the ping binary
// and fails the test unless all of them are answered.
func (h *Host) Ping(t testing.TB, dst netip.Addr, count int) {
	t.Helper()
	RequireTool(t, "ping", "iputils-ping")
	RequireTool(t, "nsenter", "util-linux")
	if count < 1 {
		count = 1
	}
	deadline := 5 + count // seconds; generous for a 0.2s interval
	cmd := h.Command("ping", "-n", "-q", "-c", strconv.Itoa(count), "-i", "0.2",
		"-W", "2", "-w", strconv.Itoa(deadline), dst.String())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nettest: ping -c %d %s from %s failed: %v\n%s", count, dst, h.Name, err, bytes.TrimSpace(out))
	}
}

// RequireTool fails the test if the binary is not in PATH, telling the
// developer to run `make deps` (which installs pkg).
func RequireTool(t testing.TB, binary, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(binary); err != nil {
		t.Fatalf("nettest: %s not found in PATH (Debian package %s): run `make deps`", binary, pkg)
	}
}

// RequireRoot fails (never skips: CI runs as root, and a skipped test would
// hide a gap) unless the test runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("nettest: this test needs root (BPF maps and programs, network namespaces, bpffs); run it as root, e.g. `sudo make test` (euid is %d)", os.Geteuid())
	}
}

// buildCtd builds cmd/ctd at most once per test process.
var buildCtd = sync.OnceValues(func() (string, error) {
	sweepStaleBuildDirs()
	dir, err := os.MkdirTemp("", fmt.Sprintf("%s%d-", buildDirPrefix, os.Getpid()))
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "ctd")
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.Command(goBin, "build", "-o", bin, "github.com/ctd-dev/ctd/cmd/ctd")
	if out, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("go build github.com/ctd-dev/ctd/cmd/ctd: %v\n%s", err, bytes.TrimSpace(out))
	}
	return bin, nil
})

const buildDirPrefix = "ctdtest-bin-"

// sweepStaleBuildDirs removes build directories left by earlier test
// processes that are gone (a process cannot clean up after itself at exit).
func sweepStaleBuildDirs() {
	matches, _ := filepath.Glob(filepath.Join(os.TempDir(), buildDirPrefix+"*"))
	for _, m := range matches {
		rest := strings.TrimPrefix(filepath.Base(m), buildDirPrefix)
		pidStr, _, ok := strings.Cut(rest, "-")
		if !ok {
			continue
		}
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid <= 0 || pid == os.Getpid() {
			continue
		}
		if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
			os.RemoveAll(m)
		}
	}
}

// BuildCtd returns the path of a ctd binary: $CTD_BIN if set, otherwise one
// built from this module's cmd/ctd once per test process.
func BuildCtd(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("CTD_BIN"); p != "" {
		abs, err := filepath.Abs(p)
		if err != nil {
			t.Fatalf("nettest: CTD_BIN=%q: %v", p, err)
		}
		fi, err := os.Stat(abs)
		if err != nil {
			t.Fatalf("nettest: CTD_BIN=%q: %v", p, err)
		}
		if fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
			t.Fatalf("nettest: CTD_BIN=%q is not an executable file", p)
		}
		return abs
	}
	bin, err := buildCtd()
	if err != nil {
		t.Fatalf("nettest: building ctd: %v", err)
	}
	return bin
}

// PinPath returns a fresh, not yet existing pin path under /sys/fs/bpf
// (mounting bpffs there first if it is not mounted). It is removed
// recursively by t.Cleanup.
func PinPath(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	if err := EnsureBPFFS(); err != nil {
		t.Fatalf("nettest: %v", err)
	}
	var p string
	for {
		p = filepath.Join(BPFFSRoot, PinPrefix+randomHex(4))
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			break
		}
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(p); err != nil {
			t.Errorf("nettest: removing pin path %s: %v", p, err)
		}
	})
	return p
}

// MountedAt reports whether a filesystem is mounted on path (as
// /proc/self/mountinfo lists it).
func MountedAt(tb testing.TB, path string) bool {
	tb.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		tb.Fatal(err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == path {
			return true
		}
	}
	return false
}

// EnsureBPFFS mounts bpffs on /sys/fs/bpf unless it is mounted already.
func EnsureBPFFS() error {
	var st unix.Statfs_t
	if err := unix.Statfs(BPFFSRoot, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(BPFFSRoot, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", BPFFSRoot, err)
	}
	if err := unix.Mount("bpf", BPFFSRoot, "bpf", 0, "mode=0700"); err != nil {
		// Lost a race with another mounter? Then it is fine now.
		if err2 := unix.Statfs(BPFFSRoot, &st); err2 == nil && st.Type == unix.BPF_FS_MAGIC {
			return nil
		}
		return fmt.Errorf("mounting bpffs on %s: %w", BPFFSRoot, err)
	}
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand.Read does not fail on Linux
	}
	return hex.EncodeToString(b)
}
