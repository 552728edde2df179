package conntrack

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

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
