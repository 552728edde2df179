package conntrack

import (
	"encoding/json"
	"math"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/control/ifnames"
	"github.com/ctd-dev/ctd/datapath/cgroupv2"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// TestEncoderMatchesReference checks the hand-written encoder against
// json.Marshal(RowOf(...)) and Line, byte for byte.
func TestEncoderMatchesReference(t *testing.T) {
	bt := ctmap.Now()
	names := ifnames.New()
	flows := append([]ctmap.Flow(nil), testFlows...)
	boot := bt.Mono()
	for i, d := range []time.Duration{
		boot,                         // now
		boot - 3*time.Second,         // a whole number of seconds ago
		boot - 1500*time.Millisecond, // trailing zeros in the fraction
		boot - time.Hour - 7*time.Nanosecond,
		boot - 999999999,
	} {
		fl := testFlows[i%len(testFlows)]
		fl.FirstSeen, fl.LastSeen = d-time.Minute, d
		fl.Flags = uint8(i) | 0x80*uint8(i%2)
		fl.Ifindex = uint32(1000 + i)
		fl.PacketsOrig, fl.BytesReply = uint64(i)*12345678901, ^uint64(0)
		flows = append(flows, fl)
	}
	flows = append(flows, ctmap.Flow{Proto: 132, Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"), State: 9})

	// Owners: a cgroup the resolver knows (a directory standing in for the
	// cgroup v2 mount), one it does not, odd command names, an RTT.
	root := t.TempDir()
	if err := os.Mkdir(filepath.Join(root, "svc"), 0o755); err != nil {
		t.Fatal(err)
	}
	svc, err := cgroupv2.ID(filepath.Join(root, "svc"))
	if err != nil {
		t.Fatal(err)
	}
	cg := cgroupv2.NewNames(root)
	for i, c := range []string{"nginx", "with space", `q"uote`, "a=b", "ünï", ""} {
		fl := testFlows[i%len(testFlows)]
		fl.Pid, fl.CgroupID, fl.RTT = uint32(100+i), svc, uint32(i*12345)
		fl.Comm, _ = ctmap.CommOf(c)
		if i%2 == 1 {
			fl.CgroupID = 1 << 40 // no such cgroup
		}
		flows = append(flows, fl)
	}

	enc := NewEncoder(bt, names, cg)
	for _, fl := range flows {
		want, err := json.Marshal(RowOf(fl, bt, names, cg))
		if err != nil {
			t.Fatal(err)
		}
		if got := enc.AppendJSON(nil, fl); string(got) != string(want) {
			t.Errorf("AppendJSON:\n got %s\nwant %s", got, want)
		}
		if got, want := string(enc.AppendLine(nil, fl)), Line(fl, names, cg); got != want {
			t.Errorf("AppendLine:\n got %s\nwant %s", got, want)
		}
	}
}

// TestEncoderMatchesReferenceVaried checks the encoder against
// json.Marshal(RowOf(...)) and Line, byte for byte, on flows of every kind:
// each protocol ct list names and some it does not, IPv4 and IPv6 (with and
// without zero runs, IPv4-mapped), every flag bit (revoked among them) and
// unknown ones, unknown states, counters up to 2^64-1, stamps around now,
// days and centuries away and at the ends of the clock, interfaces that
// exist or not, and owners present, partial or absent, with command names
// JSON must escape.
func TestEncoderMatchesReferenceVaried(t *testing.T) {
	root := t.TempDir()
	var known []uint64 // cgroups the resolver finds
	for _, dir := range []string{"system.slice", "system.slice/web.service", "a&b<c>"} {
		if err := os.Mkdir(filepath.Join(root, dir), 0o755); err != nil {
			t.Fatal(err)
		}
		id, err := cgroupv2.ID(filepath.Join(root, dir))
		if err != nil {
			t.Fatal(err)
		}
		known = append(known, id)
	}
	bt := ctmap.Now()
	now := bt.Mono()
	rng := rand.New(rand.NewPCG(1, 2))
	pick := func(n int) int { return rng.IntN(n) }

	protos := []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP, unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6, unix.IPPROTO_SCTP, 47, 0, 255}
	addr := func(v6 bool) netip.Addr {
		if !v6 {
			return netip.AddrFrom4([4]byte{198, 51, 100, byte(rng.Uint32())})
		}
		var a [16]byte
		switch pick(4) {
		case 0: // fd00::/8 with a run of zeros
			a[0], a[15] = 0xfd, byte(rng.Uint32())
		case 1: // no zero group
			for i := range a {
				a[i] = byte(rng.Uint32() | 1)
			}
			a[0] = 0xfd
		case 2: // IPv4-mapped
			a[10], a[11], a[12], a[13], a[14], a[15] = 0xff, 0xff, 203, 0, 113, byte(rng.Uint32())
		default: // zeros here and there
			for i := range a {
				if pick(2) == 0 {
					a[i] = byte(rng.Uint32())
				}
			}
			a[0] = 0xfd
		}
		return netip.AddrFrom16(a)
	}
	count := func() uint64 {
		switch pick(4) {
		case 0:
			return 0
		case 1:
			return uint64(pick(100))
		case 2:
			return ^uint64(0) - uint64(pick(3))
		}
		return rng.Uint64() >> uint(pick(64))
	}
	stamp := func() time.Duration {
		switch pick(8) {
		case 0:
			return now
		case 1:
			return now - time.Duration(pick(1000))*time.Second // whole seconds
		case 2:
			return now - time.Duration(pick(1e6))*time.Millisecond // trailing zeros
		case 3:
			return now - time.Duration(rng.Int64N(int64(400*24*time.Hour))) // any time in the last 400 days
		case 4:
			return now + time.Duration(rng.Int64N(int64(48*time.Hour))) // ahead of the clock
		case 5:
			return []time.Duration{0, 1, 999999999, 1e9, math.MaxInt64, math.MinInt64, math.MinInt64 + 1, -1}[pick(8)]
		case 6:
			return time.Duration(rng.Uint64()) // any raw stamp
		}
		return now - time.Duration(pick(86400))*time.Second - time.Duration(pick(1e9)) // across midnight
	}
	comms := []string{"curl", "nginx", "with space", `q"uote`, `back\slash`, "a=b", "ünï", "<script>", "x<y", "x>y", "x&y", "tab\there", "\x7f", "\xff\xfe", "fifteen-bytes-x"}

	flows := append([]ctmap.Flow(nil), testFlows...)
	for f := range 256 { // every flags byte
		fl := testFlows[f%len(testFlows)]
		fl.Flags = uint8(f)
		flows = append(flows, fl)
	}
	for range 20000 {
		v6 := pick(2) == 0
		fl := ctmap.Flow{
			Proto: protos[pick(len(protos))], Src: addr(v6), Dst: addr(v6),
			Sport: uint16(rng.Uint32()), Dport: uint16(rng.Uint32()),
			State:       ctmap.State(pick(8)),
			PacketsOrig: count(), BytesOrig: count(), PacketsReply: count(), BytesReply: count(),
			FirstSeen: stamp(), LastSeen: stamp(),
			SrcIdentity: uint32(count()), DstIdentity: uint32(count()),
			Ifindex: []uint32{1, 0, 1 << 31, ^uint32(0), uint32(pick(100))}[pick(5)],
			Flags:   []uint8{0, ctmap.FlagRevoked, ctmap.FlagOpenedIngress | ctmap.FlagRevoked, ctmap.FlagPickup | ctmap.FlagRelated, uint8(rng.Uint32())}[pick(5)],
		}
		if pick(2) == 0 {
			fl.State = ctmap.State(rng.Uint32())
		}
		if pick(4) == 0 { // a flow of one clock tick
			fl.LastSeen = fl.FirstSeen
		}
		if pick(2) == 0 { // an owner, or parts of one
			if pick(4) > 0 {
				fl.Pid = uint32(count())
			}
			if pick(4) > 0 {
				fl.Comm, _ = ctmap.CommOf(comms[pick(len(comms))])
			}
			switch pick(4) {
			case 0:
				fl.CgroupID = known[pick(len(known))]
			case 1:
				fl.CgroupID = rng.Uint64()
			case 2:
				fl.CgroupID = 1
			}
			if pick(2) == 0 {
				fl.RTT = uint32(count())
			}
		}
		flows = append(flows, fl)
	}

	names, cg := ifnames.New(), cgroupv2.NewNames(root)
	enc := NewEncoder(bt, names, cg)
	var got []byte
	for _, fl := range flows {
		want, err := json.Marshal(RowOf(fl, bt, names, cg))
		if err != nil {
			t.Fatal(err)
		}
		if got = enc.AppendJSON(got[:0], fl); string(got) != string(want) {
			t.Fatalf("AppendJSON(%+v):\n got %s\nwant %s", fl, got, want)
		}
		if got, want := string(enc.AppendLine(nil, fl)), Line(fl, names, cg); got != want {
			t.Fatalf("AppendLine(%+v):\n got %s\nwant %s", fl, got, want)
		}
	}
	// Appending after what is there leaves it alone.
	b := enc.AppendJSON([]byte("prefix"), flows[0])
	if want, _ := json.Marshal(RowOf(flows[0], bt, names, cg)); string(b) != "prefix"+string(want) {
		t.Errorf("AppendJSON after a prefix = %s", b)
	}
}

func TestAppendString(t *testing.T) {
	for _, s := range []string{"", "ctd0", `a"b`, `back\slash`, "tab\t", "<&>", "ünï"} {
		want, _ := json.Marshal(s)
		if got := appendString(nil, s); string(got) != string(want) {
			t.Errorf("appendString(%q) = %s, want %s", s, got, want)
		}
	}
}

func BenchmarkEncoderJSON(b *testing.B) {
	enc := NewEncoder(ctmap.Now(), ifnames.New(), nil)
	fl := testFlows[0]
	fl.FirstSeen, fl.LastSeen = 5*time.Second+123, 6*time.Second+456789
	var buf []byte
	for b.Loop() {
		buf = enc.AppendJSON(buf[:0], fl)
	}
}

// benchFlows is a batch of flows like the bench's table: a quarter each
// TCP, UDP, ICMP over IPv4 and TCP over IPv6, one stamp for all.
func benchFlows() []ctmap.Flow {
	now := ctmap.Now().Mono()
	fls := make([]ctmap.Flow, 4096)
	for i := range fls {
		fl := ctmap.Flow{Proto: unix.IPPROTO_TCP, Src: netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), Dst: netip.AddrFrom4([4]byte{10, 2, 0, 1}),
			Sport: uint16(30000 + i), Dport: 8080, State: ctmap.StateEstablished, PacketsOrig: 1, BytesOrig: 64, PacketsReply: 1, BytesReply: 64,
			FirstSeen: now, LastSeen: now, SrcIdentity: 2, DstIdentity: 70000, Ifindex: 1}
		switch i % 4 {
		case 1:
			fl.Proto = unix.IPPROTO_UDP
		case 2:
			fl.Proto, fl.Dport = unix.IPPROTO_ICMP, 0
		case 3:
			fl.Src = netip.AddrFrom16([16]byte{0xfd, 0, 0, 1, 14: byte(i >> 8), 15: byte(i)})
			fl.Dst = netip.MustParseAddr("fd00:2::1")
		}
		fls[i] = fl
	}
	return fls
}

// BenchmarkEncoderJSON measures the bench's flows (benchFlows) and, as
// "varied", those flows as a live table holds them: stamps spread over the
// last hour in hash order, a third with a local owner, some flagged.
func BenchmarkEncoderJSONMix(b *testing.B) {
	b.Run("bench", func(b *testing.B) { benchmarkJSON(b, benchFlows()) })
	fls := benchFlows()
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range fls {
		fl := &fls[i]
		fl.FirstSeen -= time.Duration(rng.Int64N(int64(time.Hour)))
		fl.LastSeen = fl.FirstSeen + time.Duration(rng.Int64N(int64(time.Minute)))
		if i%3 == 0 {
			fl.Pid, fl.CgroupID, fl.RTT = 1234, 1<<40, 150
			fl.Comm, _ = ctmap.CommOf("nginx")
		}
		if i%10 == 0 {
			fl.Flags = ctmap.FlagOpenedIngress
		}
	}
	b.Run("varied", func(b *testing.B) { benchmarkJSON(b, fls) })
}

func benchmarkJSON(b *testing.B, fls []ctmap.Flow) {
	enc := NewEncoder(ctmap.Now(), ifnames.New(), nil)
	var buf []byte
	for b.Loop() {
		for _, fl := range fls {
			buf = enc.AppendJSON(buf[:0], fl)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(fls)), "ns/flow")
}
