package events_test

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/events"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
	"github.com/ctd-dev/ctd/test/nettest"
)

var (
	addrA = netip.MustParseAddr("198.51.100.1")
	addrB = netip.MustParseAddr("198.51.100.2")
	addrC = netip.MustParseAddr("203.0.113.9")
)

func setIdentity(t *testing.T, dp *dptest.Datapath, a netip.Addr, id uint32) {
	t.Helper()
	k := bpf.CtdIpcache4Key{Prefixlen: 32, Addr: a.As4()}
	if err := dp.Maps.IPCache4().Put(&k, &bpf.CtdIpcacheValue{Identity: id}); err != nil {
		t.Fatal(err)
	}
}

// newReader registers the test as the event consumer and reads the ring.
func newReader(t *testing.T, dp *dptest.Datapath) *events.Reader {
	t.Helper()
	dp.Listen(t)
	r, err := events.NewReader(dp.Maps.Events())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// next reads one event, failing the test if none comes within a second.
func next(t *testing.T, r *events.Reader) events.Event {
	t.Helper()
	r.SetDeadline(time.Now().Add(time.Second))
	ev, err := r.Read()
	if err != nil {
		t.Fatalf("read event: %v", err)
	}
	return ev
}

// expectNone fails the test if an event is pending.
func expectNone(t *testing.T, r *events.Reader) {
	t.Helper()
	r.SetDeadline(time.Now().Add(50 * time.Millisecond))
	if ev, err := r.Read(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("unexpected event %+v (%v)", ev, err)
	}
}

var ignoreTime = cmp.Options{
	cmpopts.IgnoreFields(events.Event{}, "Time", "Stamp", "Iface", "Ifindex"),
	cmpopts.EquateComparable(netip.Addr{}),
}

// TestPolicyDrop: a connection denied by ingress policy yields one drop
// event with reason policy and both identities.
func TestPolicyDrop(t *testing.T) {
	dp := dptest.Load(t, nettest.PinPath(t))
	dp.SetDefault(t, bpf.Ingress, 2)
	setIdentity(t, dp, addrC, 1234)
	setIdentity(t, dp, addrA, 5678)
	r := newReader(t, dp)

	before := time.Now()
	syn := dptest.TCP(t, netip.AddrPortFrom(addrC, 40000), netip.AddrPortFrom(addrA, 22), dptest.SYN, nil)
	if v := dp.Run(t, bpf.Ingress, syn); v != dptest.Drop {
		t.Fatalf("verdict %#x, want drop", v)
	}
	ev := next(t, r)
	want := events.Event{
		Type: "drop", Reason: "policy", Proto: "tcp",
		Src: addrC, Sport: 40000, Dst: addrA, Dport: 22,
		SrcIdentity: 1234, DstIdentity: 5678, Dir: "ingress", Kind: events.Drop,
	}
	if diff := cmp.Diff(want, ev, ignoreTime); diff != "" {
		t.Errorf("drop event (-want +got):\n%s", diff)
	}
	if ev.Time.Before(before.Add(-time.Second)) || ev.Time.After(time.Now().Add(time.Second)) {
		t.Errorf("event time %v, want about %v", ev.Time, before)
	}
	if ev.Iface == "" || ev.Ifindex == 0 {
		t.Errorf("event without interface: %q %d", ev.Iface, ev.Ifindex)
	}
	expectNone(t, r)
}

// TestFlowNewAndClosed runs a whole TCP connection through both programs
// and checks the flow-new event and the flow-closed event's final counters.
func TestFlowNewAndClosed(t *testing.T) {
	dp := dptest.Load(t, nettest.PinPath(t))
	setIdentity(t, dp, addrB, 42)
	r := newReader(t, dp)

	a, b := netip.AddrPortFrom(addrA, 41000), netip.AddrPortFrom(addrB, 80)
	steps := []struct {
		dir     bpf.Direction
		from    netip.AddrPort
		flags   uint8
		payload int
	}{
		{bpf.Egress, a, dptest.SYN, 0},
		{bpf.Ingress, b, dptest.SYN | dptest.ACK, 0},
		{bpf.Egress, a, dptest.ACK, 0},
		{bpf.Egress, a, dptest.ACK | dptest.PSH, 100},
		{bpf.Ingress, b, dptest.ACK | dptest.PSH, 1400},
		{bpf.Ingress, b, dptest.ACK | dptest.PSH, 600},
		{bpf.Egress, a, dptest.FIN | dptest.ACK, 0},
		{bpf.Ingress, b, dptest.FIN | dptest.ACK, 0}, // both FINs seen: closed
		{bpf.Egress, a, dptest.ACK, 0},               // after the close: not in the event
	}
	var want events.Counters
	for i, s := range steps {
		to := b
		if s.from == b {
			to = a
		}
		f := dptest.TCP(t, s.from, to, s.flags, make([]byte, s.payload))
		if v := dp.Run(t, s.dir, f); v != dptest.Pass {
			t.Fatalf("step %d: verdict %#x, want pass", i, v)
		}
		if i < len(steps)-1 {
			if s.from == a {
				want.PacketsOrig++
				want.BytesOrig += uint64(len(f))
			} else {
				want.PacketsReply++
				want.BytesReply += uint64(len(f))
			}
		}
	}

	// The test run's egress packets have a socket of this process without
	// owner storage: the flow gets this process's cgroup (bpf/owner.h).
	cgID, cgPath := dptest.SelfCgroup(t)
	flowNew := events.Event{
		Type: "flow-new", Proto: "tcp", Src: addrA, Sport: 41000, Dst: addrB, Dport: 80,
		SrcIdentity: 2, DstIdentity: 42, Dir: "egress", State: "SYN_SENT", Kind: events.FlowNew,
		CgroupID: cgID, Cgroup: cgPath,
	}
	if diff := cmp.Diff(flowNew, next(t, r), ignoreTime); diff != "" {
		t.Errorf("flow-new event (-want +got):\n%s", diff)
	}
	closed := events.Event{
		Type: "flow-closed", Proto: "tcp", Src: addrA, Sport: 41000, Dst: addrB, Dport: 80,
		SrcIdentity: 2, DstIdentity: 42, Dir: "ingress", State: "CLOSED", Kind: events.FlowClosed,
		Counters: &want, CgroupID: cgID, Cgroup: cgPath,
	}
	got := next(t, r)
	if diff := cmp.Diff(closed, got, ignoreTime, cmpopts.IgnoreFields(events.Event{}, "RTT")); diff != "" {
		t.Errorf("flow-closed event (-want +got):\n%s", diff)
	}
	if got.RTT == 0 {
		t.Error("flow-closed event without rtt_us: the handshake was seen")
	}
	expectNone(t, r)
}

func TestJSONKeys(t *testing.T) {
	ev := events.Event{
		Time: time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC), Type: "flow-closed", Proto: "udp",
		Src: addrA, Sport: 1, Dst: addrB, Dport: 2, Iface: "eth0", Ifindex: 2, Dir: "egress",
		State: "ESTABLISHED", Counters: &events.Counters{PacketsOrig: 1, BytesOrig: 2},
	}
	for _, tc := range []struct {
		ev   events.Event
		want []string
	}{
		{ev, []string{"time", "type", "proto", "src", "sport", "dst", "dport", "src_identity", "dst_identity",
			"iface", "ifindex", "dir", "state", "packets_orig", "bytes_orig", "packets_reply", "bytes_reply"}},
		{events.Event{Type: "drop", Reason: "policy", Src: addrA, Dst: addrB}, []string{"time", "type", "reason", "proto",
			"src", "sport", "dst", "dport", "src_identity", "dst_identity", "iface", "ifindex", "dir"}},
	} {
		b, err := json.Marshal(tc.ev)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		var keys []string
		for k := range m {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		slices.Sort(tc.want)
		if !slices.Equal(keys, tc.want) {
			t.Errorf("%s: JSON keys %v, want %v", b, keys, tc.want)
		}
		if tc.ev.Type == "flow-closed" && !strings.Contains(string(b), `"time":"2026-01-02T03:04:05.000000006Z"`) {
			t.Errorf("time not RFC 3339: %s", b)
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	d := events.NewDecoder()
	if _, err := d.Decode(make([]byte, 10)); err == nil {
		t.Error("short record decoded")
	}
	raw := make([]byte, binary.Size(bpf.CtdEvent{}))
	raw[8] = 9 // type
	if _, err := d.Decode(raw); err == nil || !strings.Contains(err.Error(), "unknown type 9") {
		t.Errorf("unknown type: %v", err)
	}
}

// TestRateLimit: with a burst of 2, five new flows in a row on one CPU give
// two events and three rate-limited counts; the limit leaves the rest of
// config_v1 alone.
func TestRateLimit(t *testing.T) {
	dp := dptest.Load(t, nettest.PinPath(t))
	dp.SetDefault(t, bpf.Ingress, 2)
	r := newReader(t, dp)
	lim := events.RateLimit{Rate: 1, Burst: 2}
	if err := events.SetRateLimit(dp.Maps.Config(), lim); err != nil {
		t.Fatal(err)
	}
	if got, err := events.GetRateLimit(dp.Maps.Config()); err != nil || got != lim {
		t.Fatalf("GetRateLimit = %+v, %v; want %+v", got, err, lim)
	}
	if c, err := dp.Maps.Config().Read(); err != nil || c.DefaultVerdict[0] != 2 {
		t.Fatalf("SetRateLimit changed the default verdict: %+v, %v", c, err)
	}

	onCPU0(t) // one CPU's bucket
	for i := range 5 {
		f := dptest.UDP(t, netip.AddrPortFrom(addrA, uint16(5000+i)), netip.AddrPortFrom(addrB, 53), nil)
		dp.Run(t, bpf.Egress, f)
	}
	for range 2 {
		if ev := next(t, r); ev.Type != "flow-new" {
			t.Errorf("event %+v, want flow-new", ev)
		}
	}
	expectNone(t, r)
	snap, err := metricsmap.New(dp.Maps.Metrics()).Read()
	if err != nil {
		t.Fatal(err)
	}
	if got := snap.Total(metricsmap.EventsRateLimited).Packets; got != 3 {
		t.Errorf("rate-limited events = %d, want 3", got)
	}

	if err := events.SetRateLimit(dp.Maps.Config(), events.RateLimit{Burst: 5}); err == nil {
		t.Error("a burst without a rate was accepted")
	}
}

// onCPU0 runs the rest of the test on CPU 0, so that the datapath's per-CPU
// event bucket under test is one bucket.
func onCPU0(t *testing.T) {
	runtime.LockOSThread()
	var set, orig unix.CPUSet
	set.Set(0)
	if err := unix.SchedGetaffinity(0, &orig); err != nil {
		t.Fatal(err)
	}
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unix.SchedSetaffinity(0, &orig)
		runtime.UnlockOSThread()
	})
}

// TestRateLimitLowered: a bucket filled under a high limit holds no more
// than the new burst once the limit is lowered.
func TestRateLimitLowered(t *testing.T) {
	dp := dptest.Load(t, nettest.PinPath(t))
	r := newReader(t, dp)
	onCPU0(t)
	flow := func(i int) {
		dp.Run(t, bpf.Egress, dptest.UDP(t, netip.AddrPortFrom(addrA, uint16(6000+i)), netip.AddrPortFrom(addrB, 53), nil))
	}
	if err := events.SetRateLimit(dp.Maps.Config(), events.RateLimit{Rate: 10000}); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		flow(i)
		next(t, r)
	}
	if err := events.SetRateLimit(dp.Maps.Config(), events.RateLimit{Rate: 1, Burst: 1}); err != nil {
		t.Fatal(err)
	}
	before, err := metricsmap.New(dp.Maps.Metrics()).Read()
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		flow(10 + i)
	}
	next(t, r)
	expectNone(t, r)
	after, err := metricsmap.New(dp.Maps.Metrics()).Read()
	if err != nil {
		t.Fatal(err)
	}
	if got := after.Total(metricsmap.EventsRateLimited).Packets - before.Total(metricsmap.EventsRateLimited).Packets; got != 2 {
		t.Errorf("after lowering the limit to 1/s, burst 1: %d of 3 events rate-limited, want 2", got)
	}
}

// Listen registers a consumer for ListenTTL, a refresh extends it, and
// Unlisten ends only the caller's own registration.
func TestListen(t *testing.T) {
	dp := dptest.Load(t, nettest.PinPath(t))
	m := dp.Listener()
	if l, err := events.GetListener(m); err != nil || l.Active(ctmap.Now().Mono()) {
		t.Fatalf("a new datapath has a listener: %+v, %v", l, err)
	}
	if err := events.Listen(m, 4242); err != nil {
		t.Fatal(err)
	}
	now := ctmap.Now().Mono()
	l, err := events.GetListener(m)
	if err != nil || l.PID != 4242 || !l.Active(now) || l.Active(now+events.ListenTTL+time.Second) {
		t.Fatalf("after Listen: %+v, %v; want pid 4242, active now and not after %v", l, err, events.ListenTTL)
	}
	if err := events.Unlisten(m, 1); err != nil {
		t.Fatal(err)
	}
	if l, _ := events.GetListener(m); l.PID != 4242 {
		t.Fatalf("Unlisten of another pid ended the registration: %+v", l)
	}
	if err := events.Unlisten(m, 4242); err != nil {
		t.Fatal(err)
	}
	if l, _ := events.GetListener(m); l.Active(ctmap.Now().Mono()) {
		t.Fatalf("after Unlisten: %+v, want nobody", l)
	}
}
