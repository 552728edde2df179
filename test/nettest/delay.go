package nettest

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Interfaces of the relay namespace of NewDelayedPair.
const (
	relayToA = "dly0"
	relayToB = "dly1"
)

// NewDelayedPair is NewPair with a third network namespace between A and
// B, whose relay (a goroutine of the test with a packet socket on each of
// its two veth ends) passes every frame on after delay, each way: a round
// trip between A and B takes 2 × delay more. It exists because the
// kernels ctd is tested on may lack netem. Checksum offload is off on A's
// and B's veth ends (the relay copies frames as they are), and only frames
// up to 2048 bytes cross it: enough for tests that exchange small messages.
// Everything is removed by t.Cleanup.
func NewDelayedPair(t testing.TB, delay time.Duration) *Pair {
	t.Helper()
	RequireRoot(t)

	a := newHost(t, IfaceA, addrA4, addrA6)
	b := newHost(t, IfaceB, addrB4, addrB6)
	m := newHost(t, relayToA, netip.Addr{}, netip.Addr{})
	mB := *m
	mB.Iface = relayToB
	if err := createVeth(a, m); err != nil {
		t.Fatalf("nettest: creating veth %s/%s: %v", a.Iface, m.Iface, err)
	}
	if err := createVeth(&mB, b); err != nil {
		t.Fatalf("nettest: creating veth %s/%s: %v", mB.Iface, b.Iface, err)
	}
	if err := m.linksUp(relayToA, relayToB); err != nil {
		t.Fatalf("nettest: relay namespace %s: %v", m.Name, err)
	}
	r, err := startRelay(m, delay)
	if err != nil {
		t.Fatalf("nettest: relay in %s: %v", m.Name, err)
	}
	t.Cleanup(r.stop) // before the namespaces go (cleanups run last first)
	for _, h := range []*Host{a, b} {
		if err := h.configure(); err != nil {
			t.Fatalf("nettest: configuring %s in %s: %v", h.Iface, h.Name, err)
		}
		if err := h.Do(func() error { return txChecksumOff(h.Iface) }); err != nil {
			t.Fatalf("nettest: %s in %s: %v", h.Iface, h.Name, err)
		}
	}
	for _, h := range []*Host{a, b} {
		if err := h.waitReady(readyTimeout); err != nil {
			t.Fatalf("nettest: %s in %s not ready: %v", h.Iface, h.Name, err)
		}
	}
	return &Pair{A: a, B: b}
}

// linksUp brings lo and the named links up.
func (h *Host) linksUp(names ...string) error {
	nl, err := h.netlinkHandle()
	if err != nil {
		return err
	}
	defer nl.Close()
	for _, name := range append([]string{"lo"}, names...) {
		l, err := nl.LinkByName(name)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if err := nl.LinkSetUp(l); err != nil {
			return fmt.Errorf("set %s up: %w", name, err)
		}
	}
	return nil
}

// txChecksumOff switches transmit checksum offload off on iface (in the
// calling thread's namespace), as `ethtool -K iface tx off` does, so that
// the frames it sends carry complete checksums.
func txChecksumOff(iface string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ev := struct{ cmd, data uint32 }{cmd: unix.ETHTOOL_STXCSUM}
	var ifr struct {
		name [unix.IFNAMSIZ]byte
		data uintptr
		_    [16]byte
	}
	copy(ifr.name[:], iface)
	ifr.data = uintptr(unsafe.Pointer(&ev))
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr))); errno != 0 {
		return fmt.Errorf("switch tx checksum offload off: %w", errno)
	}
	return nil
}

// relay forwards frames between the relay namespace's two veth ends.
type relay struct {
	fds  [2]int
	quit chan struct{}
	wg   sync.WaitGroup
}

// startRelay opens a packet socket on each of m's veth ends and forwards
// what arrives on one out of the other after delay, in order.
func startRelay(m *Host, delay time.Duration) (*relay, error) {
	r := &relay{quit: make(chan struct{})}
	err := m.Do(func() error {
		for i, name := range []string{relayToA, relayToB} {
			fd, err := packetSocket(name)
			if err != nil {
				for _, f := range r.fds[:i] {
					unix.Close(f)
				}
				return fmt.Errorf("packet socket on %s: %w", name, err)
			}
			r.fds[i] = fd
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for i := range 2 {
		r.wg.Add(1)
		go r.forward(r.fds[i], r.fds[1-i], delay)
	}
	return r, nil
}

// packetSocket is a packet socket bound to iface for every protocol, with
// a receive timeout so that its reader notices stop.
func packetSocket(iface string) (int, error) {
	ifi, err := net.InterfaceByName(iface)
	if err != nil {
		return -1, err
	}
	proto := int(htons(unix.ETH_P_ALL))
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return -1, err
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		return -1, err
	}
	tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// forward reads frames from in (not those the relay itself sent) and
// writes each to out once delay has passed since it arrived.
func (r *relay) forward(in, out int, delay time.Duration) {
	defer r.wg.Done()
	type frame struct {
		due  time.Time
		data []byte
	}
	queue := make(chan frame, 4096)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for f := range queue {
			time.Sleep(time.Until(f.due))
			unix.Write(out, f.data)
		}
	}()
	defer func() { close(queue); <-done }()
	buf := make([]byte, 2048)
	for {
		select {
		case <-r.quit:
			return
		default:
		}
		n, from, err := unix.Recvfrom(in, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		select {
		case queue <- frame{due: time.Now().Add(delay), data: append([]byte(nil), buf[:n]...)}:
		default: // a full queue drops, as a link would
		}
	}
}

// stop ends the relay and closes its sockets.
func (r *relay) stop() {
	close(r.quit)
	r.wg.Wait()
	for _, fd := range r.fds {
		unix.Close(fd)
	}
}
