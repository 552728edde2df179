package pins_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/pins"
	"github.com/ctd-dev/ctd/test/dptest"
	"github.com/ctd-dev/ctd/test/nettest"
)

// ownerOf reads the owner that owner_v1 holds for the socket of c (a
// net.Listener or net.PacketConn); ok is false if it holds none.
func ownerOf(t *testing.T, m *ebpf.Map, c syscall.Conn) (bpf.CtdOwner, bool) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var (
		o      bpf.CtdOwner
		lookup error
	)
	if err := rc.Control(func(fd uintptr) { lookup = m.Lookup(int32(fd), &o) }); err != nil {
		t.Fatal(err)
	}
	if errors.Is(lookup, ebpf.ErrKeyNotExist) {
		return o, false
	}
	if lookup != nil {
		t.Fatal(lookup)
	}
	return o, true
}

// selfOwner is the owner the program must record for sockets of this process.
func selfOwner(t *testing.T) (pid uint32, comm string, cgroup uint64) {
	t.Helper()
	cgroup, _ = dptest.SelfCgroup(t)
	c, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Fatal(err)
	}
	return uint32(os.Getpid()), string(bytes.TrimSpace(c)), cgroup
}

// TestAttachOwner: the socket owner program of two datapaths runs side by
// side on the cgroup v2 root; each records the creator of a TCP and a UDP
// socket, of either family, in its own owner_v1; attaching again updates
// the pinned link in place; DetachOwner and Teardown remove it.
func TestAttachOwner(t *testing.T) {
	pid, comm, cgroup := selfOwner(t)
	type datapath struct {
		dir pins.Dir
		dp  *loader.Datapath
	}
	var dps []datapath
	for range 2 {
		dir := pins.New(nettest.PinPath(t))
		dp, err := loader.Load(loader.Options{PinPath: dir.Path(), CTMax: 1024, CTUnconfirmedMax: 1024, IPCacheMax: 64, RingBufSize: 4096})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dp.Close() })
		created, err := dir.AttachOwner(&dp.CtdPrograms)
		if err != nil || !created {
			t.Fatalf("AttachOwner = %v, %v; want a new link", created, err)
		}
		t.Cleanup(func() { dir.DetachOwner() })
		dps = append(dps, datapath{dir, dp})
	}
	// Again: the pinned link is updated, not attached twice.
	if created, err := dps[0].dir.AttachOwner(&dps[0].dp.CtdPrograms); err != nil || created {
		t.Fatalf("second AttachOwner = %v, %v; want the pinned link updated", created, err)
	}
	for _, d := range dps {
		for i, prog := range []*ebpf.Program{d.dp.CtdSockCreate, d.dp.CtdPostBind4, d.dp.CtdPostBind6} {
			info, err := prog.Info()
			if err != nil {
				t.Fatal(err)
			}
			want, _ := info.ID()
			pin := d.dir.CgroupLinks()[i]
			if got, err := attach.CgroupProgram(pin); err != nil || got != want {
				t.Errorf("program of %s = %d, %v; want %d", pin, got, err, want)
			}
		}
	}

	var socks []syscall.Conn
	// Plain TCP: Go's listeners are MPTCP by default, and the descriptor
	// of an MPTCP socket is not the TCP subflow whose owner the post_bind
	// programs record (the end-to-end tests in test/ check those).
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	for _, s := range []struct{ network, addr string }{{"tcp4", "127.0.0.1:0"}, {"tcp6", "[::1]:0"}} {
		l, err := lc.Listen(context.Background(), s.network, s.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		socks = append(socks, l.(*net.TCPListener))
	}
	for _, s := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}} {
		c, err := net.ListenPacket(s.network, s.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		socks = append(socks, c.(*net.UDPConn))
	}
	for i, d := range dps {
		for j, s := range socks {
			o, ok := ownerOf(t, d.dp.Owner(), s)
			if !ok {
				t.Errorf("datapath %d, socket %d: no owner recorded", i, j)
				continue
			}
			if o.Pid != pid || ctmap.CommFrom(o.Comm).String() != comm || o.CgroupId != cgroup {
				t.Errorf("datapath %d, socket %d: owner pid %d comm %q cgroup %d; want %d %q %d",
					i, j, o.Pid, ctmap.CommFrom(o.Comm), o.CgroupId, pid, comm, cgroup)
			}
		}
	}

	// Detached: sockets made afterwards get no owner from it; the other
	// datapath's program still runs.
	if err := dps[0].dir.DetachOwner(); err != nil {
		t.Fatal(err)
	}
	for _, pin := range dps[0].dir.CgroupLinks() {
		if _, err := os.Lstat(pin); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after DetachOwner: %v, want it gone", pin, err)
		}
	}
	late, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer late.Close()
	if _, ok := ownerOf(t, dps[0].dp.Owner(), late.(*net.UDPConn)); ok {
		t.Error("a socket made after DetachOwner has an owner in that datapath")
	}
	if _, ok := ownerOf(t, dps[1].dp.Owner(), late.(*net.UDPConn)); !ok {
		t.Error("the other datapath's program stopped when one was detached")
	}

	td, err := dps[1].dir.Teardown()
	if err != nil || !td.Existed {
		t.Fatalf("Teardown = %+v, %v", td, err)
	}
	for _, pin := range dps[1].dir.CgroupLinks() {
		if _, err := os.Lstat(pin); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after Teardown: %v, want it gone", pin, err)
		}
	}
}

// TestLoadAndAttachUndoesOwner: an attach that fails after the socket
// owner program was attached takes the cgroup link back.
func TestLoadAndAttachUndoesOwner(t *testing.T) {
	pair := nettest.NewPair(t)
	dir := pins.New(nettest.PinPath(t))
	err := pair.A.Do(func() error {
		_, err := dir.LoadAndAttach(pair.A.Iface, attach.Mode("bogus"), loader.Options{CTMax: 1024, CTUnconfirmedMax: 1024, IPCacheMax: 64, RingBufSize: 4096}, loader.Load)
		return err
	})
	if err == nil || !strings.Contains(err.Error(), `invalid mode "bogus"`) {
		t.Fatalf("LoadAndAttach with mode bogus = %v, want the invalid mode named", err)
	}
	for _, pin := range dir.CgroupLinks() {
		if _, err := os.Lstat(pin); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after a failed attach: %v, want it gone", pin, err)
		}
	}
}
