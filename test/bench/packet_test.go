package bench

import (
	"encoding/binary"
	"fmt"
	mrand "math/rand/v2"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/pins"
	"github.com/ctd-dev/ctd/test/nettest"
)

const (
	// passVerdict is TC_ACT_UNSPEC as BPF_PROG_TEST_RUN returns it.
	passVerdict = 0xffffffff
	// roundSize is how many packets a round runs through each program.
	roundSize = 2048
	// hotRepeat is the in-kernel repeat count of one hot run.
	hotRepeat = 2048
)

// TCP flags.
const (
	tcpSYN = 0x02
	tcpACK = 0x10
)

func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

// frame builds an Ethernet frame carrying an IP packet from src to dst with
// the L4 header and payload l4. Checksums other than IPv4's are left zero:
// ctd does not read them.
func frame(buf []byte, src, dst netip.Addr, proto uint8, l4 []byte) []byte {
	buf = append(buf[:0],
		0x02, 0, 0, 0, 0, 2, // destination MAC
		0x02, 0, 0, 0, 0, 1, // source MAC
	)
	if src.Is4() {
		buf = binary.BigEndian.AppendUint16(buf, unix.ETH_P_IP)
		ip := len(buf)
		buf = append(buf, 0x45, 0)
		buf = binary.BigEndian.AppendUint16(buf, uint16(20+len(l4)))
		buf = append(buf, 0, 0, 0x40, 0, 64, proto, 0, 0) // id, DF, ttl, proto, checksum
		buf = append(buf, src.AsSlice()...)
		buf = append(buf, dst.AsSlice()...)
		binary.BigEndian.PutUint16(buf[ip+10:], checksum(buf[ip:ip+20]))
	} else {
		buf = binary.BigEndian.AppendUint16(buf, unix.ETH_P_IPV6)
		buf = append(buf, 0x60, 0, 0, 0)
		buf = binary.BigEndian.AppendUint16(buf, uint16(len(l4)))
		buf = append(buf, proto, 64)
		buf = append(buf, src.AsSlice()...)
		buf = append(buf, dst.AsSlice()...)
	}
	return append(buf, l4...)
}

func tcpHeader(sport, dport uint16, flags uint8) []byte {
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:], sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint32(h[4:], 1000)
	if flags&tcpACK != 0 {
		binary.BigEndian.PutUint32(h[8:], 2000)
	}
	h[12] = 5 << 4
	h[13] = flags
	binary.BigEndian.PutUint16(h[14:], 65535)
	return h
}

func udpDatagram(sport, dport uint16) []byte {
	h := make([]byte, 8+18)
	binary.BigEndian.PutUint16(h[0:], sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint16(h[4:], uint16(len(h)))
	return h
}

func icmpEcho(id uint16) []byte {
	h := make([]byte, 8+32)
	h[0] = 8 // echo request
	binary.BigEndian.PutUint16(h[4:], id)
	binary.BigEndian.PutUint16(h[6:], 1)
	binary.BigEndian.PutUint16(h[2:], checksum(h))
	return h
}

// packetSource yields the packets of one case and the program they go
// through; for new flows it also yields the conntrack key each one creates.
type packetSource struct {
	f    *fixture
	c    PacketCase
	prog *ebpf.Program
	rnd  *mrand.Rand
	buf  []byte
	// v1 and v1prog are the first release's datapath and program, run on
	// the same packets when the case is measured beside it (PacketCase.V1).
	v1     *v1Datapath
	v1prog *ebpf.Program
	// last is the flow of the last new-flow packet.
	last flow
}

func newPacketSource(f *fixture, c PacketCase) (*packetSource, error) {
	s := &packetSource{f: f, c: c, rnd: mrand.New(mrand.NewPCG(uint64(c.Kind), uint64(c.Flows)))}
	switch c.Kind {
	case TCPEstablishedReply, TCP6EstablishedReply, TCPNew, TCP6New:
		s.prog = f.dp.CtdIngress
	default:
		s.prog = f.dp.CtdEgress
	}
	if !c.Kind.New() && f.perClass == 0 {
		return nil, fmt.Errorf("case %s: the fixture has no prefilled flows of its class", c.Name)
	}
	return s, nil
}

// packet returns the i-th packet of a round. New flows get source port
// newPortBase+i, so a round's flows are distinct until they are deleted.
func (s *packetSource) packet(i int) ([]byte, ctmap.Key) {
	var (
		fl    flow
		class int
	)
	switch s.c.Kind {
	case TCPEstablishedOrig, TCPEstablishedReply:
		class = classTCP4
	case UDPEstablished:
		class = classUDP4
	case ICMPEstablished:
		class = classICMP4
	case TCP6EstablishedOrig, TCP6EstablishedReply:
		class = classTCP6
	case TCPNew, TCP6New:
		src := s.f.sources4
		srv := server4
		if s.c.Kind == TCP6New {
			src, srv = s.f.sources6, server6
		}
		client := src[s.rnd.IntN(len(src))]
		sport := uint16(newPortBase + i)
		s.buf = frame(s.buf, client, srv, unix.IPPROTO_TCP, tcpHeader(sport, newPort, tcpSYN))
		s.last = flow{unix.IPPROTO_TCP, client, sport, srv, newPort}
		k, _ := ctmap.KeyOf(unix.IPPROTO_TCP, client, sport, srv, newPort)
		return s.buf, k
	}
	j := 0
	if s.c.Hot {
		j = s.f.perClass / 2
	} else {
		j = s.rnd.IntN(s.f.perClass)
	}
	fl = flowOf(class, j)
	switch s.c.Kind {
	case TCPEstablishedOrig, TCP6EstablishedOrig:
		s.buf = frame(s.buf, fl.client, fl.server, fl.proto, tcpHeader(fl.cport, fl.sport, tcpACK))
	case TCPEstablishedReply, TCP6EstablishedReply:
		s.buf = frame(s.buf, fl.server, fl.client, fl.proto, tcpHeader(fl.sport, fl.cport, tcpACK))
	case UDPEstablished:
		s.buf = frame(s.buf, fl.client, fl.server, fl.proto, udpDatagram(fl.cport, fl.sport))
	case ICMPEstablished:
		s.buf = frame(s.buf, fl.client, fl.server, fl.proto, icmpEcho(fl.cport))
	}
	return s.buf, ctmap.Key{}
}

// run runs prog once over pkt repeat times and returns the time per run.
func run(prog *ebpf.Program, pkt []byte, repeat int) (float64, error) {
	ret, d, err := prog.Benchmark(pkt, repeat, nil)
	if err != nil {
		return 0, err
	}
	if ret != passVerdict {
		return 0, fmt.Errorf("program %s returned %d, want TC_ACT_UNSPEC (pass)", prog, int32(ret))
	}
	return float64(d) / float64(time.Nanosecond), nil
}

// roundResult is one round's median time per packet of each program.
type roundResult struct{ ctd, floor, v1 float64 }

// coldRound runs n packets, each a different flow, once through each
// program (ctd's, the floor, and the first release's when the case has it),
// rotating which goes first. New flows are deleted afterwards.
func coldRound(s *packetSource, n int) (roundResult, error) {
	progs := []*ebpf.Program{s.prog, s.f.floor}
	if s.v1 != nil {
		progs = append(progs, s.v1prog)
	}
	times := make([][]float64, len(progs))
	var (
		keys  []ctmap.Key
		flows []flow
	)
	for i := range n {
		pkt, k := s.packet(i)
		if s.c.Kind.New() {
			keys = append(keys, k)
			flows = append(flows, s.last)
		}
		for r := range progs {
			j := (i + r) % len(progs)
			d, err := run(progs[j], pkt, 1)
			if err != nil {
				return roundResult{}, err
			}
			times[j] = append(times[j], d)
		}
	}
	if s.v1 != nil && s.c.Kind.New() {
		if err := s.v1.forget(flows); err != nil {
			return roundResult{}, err
		}
	}
	if s.c.Owner == OwnerListener {
		// Proof that the case measures what it says: the flows are the
		// listener's, this process's.
		e, err := s.f.ct.Lookup(&keys[0])
		if err != nil {
			return roundResult{}, err
		}
		fl := ctmap.FlowOf(&keys[0], &e)
		if fl.Pid != uint32(os.Getpid()) {
			return roundResult{}, fmt.Errorf("a new flow to the listener has owner pid %d, want this process (%d)", fl.Pid, os.Getpid())
		}
	}
	if s.c.Kind.New() {
		deleted, err := s.f.ct.Delete(keys)
		if err != nil {
			return roundResult{}, err
		}
		if deleted != len(keys) {
			return roundResult{}, fmt.Errorf("%d SYNs of distinct new flows left %d conntrack entries, want one each", len(keys), deleted)
		}
		if err := s.f.drainEvents(); err != nil {
			return roundResult{}, err
		}
	}
	r := roundResult{ctd: Median(times[0]), floor: Median(times[1])}
	if s.v1 != nil {
		r.v1 = Median(times[2])
	}
	return r, nil
}

// hotRound runs one packet n times inside one BPF_PROG_TEST_RUN per program.
func hotRound(s *packetSource, n int) (roundResult, error) {
	pkt, _ := s.packet(0)
	ctd, err := run(s.prog, pkt, n)
	if err != nil {
		return roundResult{}, err
	}
	floor, err := run(s.f.floor, pkt, n)
	if err != nil {
		return roundResult{}, err
	}
	return roundResult{ctd: ctd, floor: floor}, nil
}

// BenchmarkPacket measures ctd's programs per packet with BPF_PROG_TEST_RUN
// for every case of PacketCases. b.N is the number of packets each program
// runs; they are split into rounds, and every round runs ctd and the empty
// TC program interleaved on the same packets. Reported: the medians over
// rounds of ctd's time (ns/op), the floor's (floor-ns/op) and their
// difference (over-ns/op).
//
// Except for Hot cases, every run is one syscall with repeat 1 on a flow
// drawn at random from the whole table, so the figures include the cache
// misses a table of that size costs; the kernel times only the program and
// one clock read, which the floor has too. New-flow cases send SYNs of
// distinct flows and delete the entries they create after each round
// (outside the timed runs), draining the flow-new events as ctd monitor
// would when the case registers an event consumer (Listener).
func BenchmarkPacket(b *testing.B) {
	nettest.RequireRoot(b)
	var keys []fixtureKey
	for _, c := range PacketCases {
		k := fixtureKey{c.Flows, c.Prefixes, c.Policy, c.Flood}
		if !slices.Contains(keys, k) {
			keys = append(keys, k)
		}
	}
	for _, k := range keys {
		var (
			f    *fixture
			ferr error
		)
		get := func(b *testing.B) *fixture {
			if f == nil && ferr == nil {
				f, ferr = newFixture(k)
			}
			if ferr != nil {
				b.Fatal(ferr)
			}
			return f
		}
		for _, c := range PacketCases {
			if (fixtureKey{c.Flows, c.Prefixes, c.Policy, c.Flood}) != k {
				continue
			}
			b.Run(c.Name, func(b *testing.B) { benchCase(b, get(b), c) })
		}
		if f != nil {
			if err := f.Close(); err != nil {
				b.Error(err)
			}
		}
	}
}

func benchCase(b *testing.B, f *fixture, c PacketCase) {
	s, err := newPacketSource(f, c)
	if err != nil {
		b.Fatal(err)
	}
	if c.Listener {
		stop, err := f.listen()
		if err != nil {
			b.Fatal(err)
		}
		defer func() {
			if err := stop(); err != nil {
				b.Error(err)
			}
		}()
	}
	if c.V1 && c.Hot {
		b.Fatalf("case %s: the first release runs beside cold cases only", c.Name)
	}
	if c.V1 && *packetV1 {
		if s.v1, err = f.v1Twin(b); err != nil {
			b.Fatal(err)
		}
		s.v1prog = s.v1.program(f, s.prog)
	}
	switch c.Owner {
	case OwnerOff:
		if err := f.setOwnerOff(1); err != nil {
			b.Fatal(err)
		}
		defer func() {
			if err := f.setOwnerOff(0); err != nil {
				b.Error(err)
			}
		}()
	}
	before, err := f.created()
	if err != nil {
		b.Fatal(err)
	}
	var v1Before uint64
	if s.v1 != nil {
		if v1Before, err = s.v1.created(); err != nil {
			b.Fatal(err)
		}
	}
	size := roundSize
	if c.Hot {
		size = hotRepeat
	}
	var ctd, floor, over, v1, v1Over []float64
	packets := 0
	rounds := func() error {
		for done := 0; done < b.N; {
			n := min(size, b.N-done)
			var (
				r   roundResult
				err error
			)
			if c.Hot {
				r, err = hotRound(s, n)
			} else {
				r, err = coldRound(s, n)
			}
			if err != nil {
				return fmt.Errorf("case %s: %w", c.Name, err)
			}
			ctd = append(ctd, r.ctd)
			floor = append(floor, r.floor)
			over = append(over, r.ctd-r.floor)
			v1 = append(v1, r.v1)
			v1Over = append(v1Over, r.v1-r.floor)
			done += n
			packets += n
		}
		return nil
	}
	if c.Owner == OwnerListener {
		err = f.withListener(rounds)
	} else {
		err = rounds()
	}
	if err != nil {
		b.Fatal(err)
	}
	after, err := f.created()
	if err != nil {
		b.Fatal(err)
	}
	want := uint64(0)
	if c.Kind.New() {
		want = uint64(packets)
	}
	if got := after - before; got != want {
		b.Fatalf("case %s: %d packets created %d conntrack entries, want %d", c.Name, packets, got, want)
	}
	if s.v1 != nil {
		v1After, err := s.v1.created()
		if err != nil {
			b.Fatal(err)
		}
		if got := v1After - v1Before; got != want {
			b.Fatalf("case %s: %d packets created %d conntrack entries in the first release's datapath, want %d", c.Name, packets, got, want)
		}
		b.ReportMetric(Median(v1), UnitV1)
		b.ReportMetric(Median(v1Over), UnitV1Over)
	}
	b.ReportMetric(Median(ctd), "ns/op")
	b.ReportMetric(Median(floor), UnitFloor)
	b.ReportMetric(Median(over), UnitOver)
}

// setOwnerOff switches the attribution of new flows off (1) or on (0).
func (f *fixture) setOwnerOff(off uint8) error {
	return f.dp.Config().Update(func(v *config.Values) { v.OwnerOff = off })
}

// withListener runs fn on a thread of its own in a new network namespace
// where a TCP socket listens on the port of the new flows on every address,
// made while the fixture's socket owner programs were attached, so that
// the SYNs' socket lookup finds it and its owner. The thread ends with fn
// (it is never unlocked), and its namespace with it.
func (f *fixture) withListener(fn func() error) error {
	dir := pins.New(f.pin)
	if _, err := dir.AttachOwner(&f.dp.CtdPrograms); err != nil {
		return err
	}
	defer dir.DetachOwner()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
			return
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
		if err != nil {
			errc <- fmt.Errorf("listening socket: %w", err)
			return
		}
		defer unix.Close(fd)
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: newPort}); err != nil {
			errc <- fmt.Errorf("bind to port %d: %w", newPort, err)
			return
		}
		if err := unix.Listen(fd, 16); err != nil {
			errc <- fmt.Errorf("listen: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}
