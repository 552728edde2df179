package metricsmap_test

import (
	"net/netip"
	"runtime"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
	"github.com/ctd-dev/ctd/test/nettest"
)

// onCPU runs fn on a thread bound to cpu, so that the datapath counts on
// that CPU's slot of the per-CPU map.
func onCPU(t *testing.T, cpu int, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var orig, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &orig); err != nil {
		t.Fatal(err)
	}
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		t.Fatalf("bind to CPU %d: %v", cpu, err)
	}
	defer func() {
		if err := unix.SchedSetaffinity(0, &orig); err != nil {
			t.Fatalf("restore CPU affinity: %v", err)
		}
	}()
	fn()
}

// TestReadSumsWhatWasSent sends frames through both programs on every CPU
// and checks that Read reports, for every (direction, reason), exactly the
// packets and bytes sent, and zero elsewhere.
func TestReadSumsWhatWasSent(t *testing.T) {
	dp := dptest.Load(t, nettest.PinPath(t))
	m := metricsmap.New(dp.Maps.Metrics())
	dp.SetDefault(t, bpf.Ingress, 2) // ingress default deny

	a := netip.MustParseAddr("198.51.100.1")
	b := netip.MustParseAddr("198.51.100.2")
	c := netip.MustParseAddr("203.0.113.9")
	a6 := netip.MustParseAddr("fd00:c7d::1")
	b6 := netip.MustParseAddr("fd00:c7d::2")

	type send struct {
		dir    bpf.Direction
		frame  []byte
		reason metricsmap.Reason
	}
	want := map[[2]uint8]metricsmap.Value{}
	count := func(d bpf.Direction, r metricsmap.Reason, packets, bytes uint64) {
		k := [2]uint8{uint8(d), uint8(r)}
		want[k] = want[k].Add(metricsmap.Value{Packets: packets, Bytes: bytes})
	}
	cpus := runtime.NumCPU()
	for cpu := range cpus {
		sport := uint16(40000 + cpu)
		ap, bp := netip.AddrPortFrom(a, sport), netip.AddrPortFrom(b, 80)
		a6p, b6p := netip.AddrPortFrom(a6, sport), netip.AddrPortFrom(b6, 53)
		sends := []send{
			{bpf.Egress, dptest.TCP(t, ap, bp, dptest.SYN, nil), metricsmap.FwdNew},
			{bpf.Ingress, dptest.TCP(t, bp, ap, dptest.SYN|dptest.ACK, nil), metricsmap.FwdEstablished},
			{bpf.Egress, dptest.TCP(t, ap, bp, dptest.ACK|dptest.PSH, make([]byte, 100+cpu)), metricsmap.FwdEstablished},
			{bpf.Ingress, dptest.TCP(t, bp, ap, dptest.ACK|dptest.PSH, make([]byte, 1000)), metricsmap.FwdEstablished},
			{bpf.Egress, dptest.UDP(t, a6p, b6p, make([]byte, 33)), metricsmap.FwdNew},
			{bpf.Ingress, dptest.UDP(t, b6p, a6p, make([]byte, 77)), metricsmap.FwdEstablished},
			// A new flow from outside: ingress default deny drops it.
			{bpf.Ingress, dptest.TCP(t, netip.AddrPortFrom(c, sport), netip.AddrPortFrom(a, 22), dptest.SYN, nil), metricsmap.DropPolicy},
			// No flags at all: invalid.
			{bpf.Egress, dptest.TCP(t, ap, bp, 0, nil), metricsmap.DropInvalid},
		}
		onCPU(t, cpu, func() {
			for i, s := range sends {
				v := dp.Run(t, s.dir, s.frame)
				wantVerdict := dptest.Pass
				if s.reason.Kind() == metricsmap.Dropped {
					wantVerdict = dptest.Drop
				}
				if v != wantVerdict {
					t.Fatalf("CPU %d, frame %d (%s): verdict %#x, want %#x", cpu, i, s.reason, v, wantVerdict)
				}
				count(s.dir, s.reason, 1, uint64(len(s.frame)))
			}
		})
		count(bpf.Egress, metricsmap.CTCreated, 2, 0) // the TCP and the UDP flow
		// Both confirmed by their first reply: the TCP flow by its SYN/ACK
		// then the ACK, the UDP flow by its reply.
		count(bpf.Egress, metricsmap.CTConfirmed, 1, 0)
		count(bpf.Ingress, metricsmap.CTConfirmed, 1, 0)
	}

	snap, err := m.Read()
	if err != nil {
		t.Fatal(err)
	}
	got := map[[2]uint8]metricsmap.Value{}
	for _, s := range snap.Samples() {
		if s.Value != (metricsmap.Value{}) {
			got[[2]uint8{uint8(s.Dir), uint8(s.Reason)}] = s.Value
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("counters (-sent +read) over %d CPUs:\n%s", cpus, diff)
	}
	if tot := snap.Total(metricsmap.FwdEstablished); tot != snap.Get(bpf.Ingress, metricsmap.FwdEstablished).Add(snap.Get(bpf.Egress, metricsmap.FwdEstablished)) {
		t.Errorf("Total(established) = %+v, not the sum of both directions", tot)
	}
}

func TestReasonNames(t *testing.T) {
	seen := map[string]bool{}
	for _, r := range metricsmap.Reasons {
		n := r.String()
		if seen[n] {
			t.Errorf("reason name %q used twice", n)
		}
		seen[n] = true
	}
	for _, tc := range []struct {
		r    metricsmap.Reason
		name string
		kind metricsmap.Kind
	}{
		{metricsmap.FwdEstablished, "established", metricsmap.Forwarded},
		{metricsmap.FwdUnparseable, "unparseable", metricsmap.Forwarded},
		{metricsmap.DropPolicy, "policy", metricsmap.Dropped},
		{metricsmap.DropCTInsert, "ct-insert-failed", metricsmap.Dropped},
		{metricsmap.DropParse, "parse-error", metricsmap.Dropped},
		{metricsmap.DropRevoked, "revoked", metricsmap.Dropped},
		{metricsmap.EventsLost, "events-lost", metricsmap.Counter},
		{metricsmap.EventsRateLimited, "events-ratelimited", metricsmap.Counter},
		{metricsmap.Reason(50), "reason50", metricsmap.Counter},
	} {
		if tc.r.String() != tc.name || tc.r.Kind() != tc.kind {
			t.Errorf("reason %d: %q %s, want %q %s", tc.r, tc.r.String(), tc.r.Kind(), tc.name, tc.kind)
		}
	}
}
