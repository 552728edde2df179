package mapinfo_test

import (
	"encoding/json"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/mapinfo"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/dptest"
	"github.com/ctd-dev/ctd/test/nettest"
)

const (
	nCT    = 1234
	nPol   = 17
	nIP4   = 300
	nIP6   = 5
	evSize = 8 + 136 // ring buffer record header + struct event (events_v2)
)

// fill puts known numbers of entries into a test datapath's maps and one
// flow-new event into its ring buffer (whose flow, not confirmed, is the
// one entry of the unconfirmed table).
func fill(t *testing.T, dp *dptest.Datapath) {
	t.Helper()
	f := dptest.UDP(t, netip.MustParseAddrPort("198.51.100.1:5000"), netip.MustParseAddrPort("198.51.100.2:53"), nil)
	if v := dp.Run(t, bpf.Egress, f); v != dptest.Pass {
		t.Fatalf("verdict %#x", v)
	}
	ct := dp.Maps.Conntrack()
	keys := make([]ctmap.Key, nCT-1)
	vals := make([]ctmap.Entry, nCT-1)
	for i := range keys {
		keys[i], _ = ctmap.KeyOf(unix.IPPROTO_TCP, netip.MustParseAddr("203.0.113.1"), uint16(1000+i),
			netip.MustParseAddr("203.0.113.2"), 443)
		vals[i].LastSeen = uint64(i)
	}
	if err := ct.PutBatch(keys, vals); err != nil {
		t.Fatal(err)
	}
	for i := range nPol {
		k := bpf.CtdPolicyKey{Identity: uint32(100 + i), Port: 80, Proto: 6}
		if err := dp.Maps.Policy().Put(&k, &bpf.CtdPolicyValue{Verdict: 1}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range nIP4 {
		// Distinct in their first 24 bits, so no two are the same prefix.
		k := bpf.CtdIpcache4Key{Prefixlen: uint32(24 + i%9), Addr: [4]byte{10, byte(i / 256), byte(i), 0}}
		if err := dp.Maps.IPCache4().Put(&k, &bpf.CtdIpcacheValue{Identity: uint32(i + 1)}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range nIP6 {
		k := bpf.CtdIpcache6Key{Prefixlen: 64, Addr: netip.MustParseAddr("fd00::").As16()}
		k.Addr[7] = byte(i)
		if err := dp.Maps.IPCache6().Put(&k, &bpf.CtdIpcacheValue{Identity: uint32(i + 1)}); err != nil {
			t.Fatal(err)
		}
	}
}

func inspect(t *testing.T, dp *dptest.Datapath, pin string) map[string]mapinfo.Info {
	t.Helper()
	ms, err := mapinfo.Of(&dp.Maps, pin)
	if err != nil {
		t.Fatal(err)
	}
	infos, err := mapinfo.InspectAll(ms)
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != len(loader.MapNames) {
		t.Fatalf("%d maps inspected, want %d", len(infos), len(loader.MapNames))
	}
	out := map[string]mapinfo.Info{}
	for i, info := range infos {
		if info.Name != loader.MapNames[i] {
			t.Errorf("map %d is %s, want %s (loader.MapNames order)", i, info.Name, loader.MapNames[i])
		}
		out[info.Name] = info
	}
	return out
}

// TestEntriesExact checks every map's entry count after known inserts.
func TestEntriesExact(t *testing.T) {
	pin := nettest.PinPath(t)
	dp := dptest.Load(t, pin)
	dp.Listen(t) // so that the flow-new event is written
	fill(t, dp)
	infos := inspect(t, dp, pin)
	for name, want := range map[string]uint64{
		loader.CT4Map:            nCT - 1,
		loader.CT4UnconfirmedMap: 1,
		loader.PolicyMap:         nPol,
		loader.IPCache4Map:       nIP4,
		loader.IPCache6Map:       nIP6,
		loader.ConfigMap:         1, // arrays: every slot
		loader.MetricsMap:        128,
		loader.EventLimitMap:     1,
		loader.ListenerMap:       1,
		loader.EventsMap:         evSize, // one flow-new event pending
	} {
		info := infos[name]
		if info.Entries != want {
			t.Errorf("%s: %d entries, want %d", name, info.Entries, want)
		}
		if wantFill := 100 * float64(want) / float64(info.MaxEntries); info.Fill != wantFill {
			t.Errorf("%s: fill %v%%, want %v%%", name, info.Fill, wantFill)
		}
		if info.Pin != filepath.Join(pin, name) {
			t.Errorf("%s: pin %s", name, info.Pin)
		}
		if info.Warning() != "" {
			t.Errorf("%s: unexpected warning %q", name, info.Warning())
		}
	}
	if tot := mapinfo.Sum(slicesOf(infos)); tot.Maps != len(loader.MapNames) || tot.Memlock == 0 {
		t.Errorf("total %+v", tot)
	}
}

func slicesOf(m map[string]mapinfo.Info) []mapinfo.Info {
	var out []mapinfo.Info
	for _, i := range m {
		out = append(out, i)
	}
	return out
}

// TestAgreesWithBpftool compares type names, sizes and memlock with what
// bpftool reports for each pinned map.
func TestAgreesWithBpftool(t *testing.T) {
	nettest.RequireTool(t, "bpftool", "bpftool")
	pin := nettest.PinPath(t)
	dp := dptest.Load(t, pin)
	for name, info := range inspect(t, dp, pin) {
		out, err := exec.Command("bpftool", "-j", "map", "show", "pinned", info.Pin).Output()
		if err != nil {
			t.Fatalf("bpftool map show pinned %s: %v", info.Pin, err)
		}
		var bt struct {
			Type         string `json:"type"`
			BytesKey     uint32 `json:"bytes_key"`
			BytesValue   uint32 `json:"bytes_value"`
			MaxEntries   uint32 `json:"max_entries"`
			BytesMemlock uint64 `json:"bytes_memlock"`
		}
		if err := json.Unmarshal(out, &bt); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, out)
		}
		got := [...]any{info.Type, info.KeySize, info.ValueSize, info.MaxEntries, info.Memlock}
		want := [...]any{bt.Type, bt.BytesKey, bt.BytesValue, bt.MaxEntries, bt.BytesMemlock}
		if got != want {
			t.Errorf("%s: type, key, value, max, memlock = %v; bpftool says %v", name, got, want)
		}
	}
}

// TestBpftoolDumpsFieldNames: the pinned maps carry BTF, so bpftool prints
// the conntrack entry's fields by name.
func TestBpftoolDumpsFieldNames(t *testing.T) {
	nettest.RequireTool(t, "bpftool", "bpftool")
	pin := nettest.PinPath(t)
	dp := dptest.Load(t, pin)
	k, _ := ctmap.KeyOf(unix.IPPROTO_UDP, netip.MustParseAddr("198.51.100.7"), 7777, netip.MustParseAddr("198.51.100.8"), 53)
	e := ctmap.Entry{PacketsOrig: 3, LastSeen: 123456789, State: uint8(ctmap.StateEstablished)}
	if err := dp.Maps.Conntrack().Put(&k, &e); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(pin, loader.CT4Map)
	out, err := exec.Command("bpftool", "-j", "map", "dump", "pinned", path).Output()
	if err != nil {
		t.Fatalf("bpftool map dump pinned %s: %v", path, err)
	}
	var dump []struct {
		Formatted struct {
			Key   map[string]any `json:"key"`
			Value map[string]any `json:"value"`
		} `json:"formatted"`
	}
	if err := json.Unmarshal(out, &dump); err != nil || len(dump) != 1 {
		t.Fatalf("bpftool dump: %v, %d entries\n%s", err, len(dump), out)
	}
	f := dump[0].Formatted
	if f.Value["last_seen"] != float64(123456789) || f.Value["packets_orig"] != float64(3) || f.Value["state"] != float64(1) {
		t.Errorf("formatted value %v: want last_seen 123456789, packets_orig 3, state 1", f.Value)
	}
	if f.Key["proto"] != float64(unix.IPPROTO_UDP) || f.Key["port_a"] == nil || f.Key["addr_b"] == nil {
		t.Errorf("formatted key %v: want proto 17, port_a and addr_b", f.Key)
	}
	// And plain output names the fields too.
	plain, err := exec.Command("bpftool", "map", "dump", "pinned", path).Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(plain), `"last_seen": 123456789`) {
		t.Errorf("plain dump lacks the named field last_seen:\n%s", plain)
	}
}

// TestWarnings: a map that can run full warns above 80%; arrays never do.
func TestWarnings(t *testing.T) {
	spec, err := loader.Options{}.WithDefaults().Spec()
	if err != nil {
		t.Fatal(err)
	}
	ps := spec.Maps[loader.PolicyMap].Copy()
	ps.MaxEntries = 10
	pm, err := ebpf.NewMap(ps)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	cm, err := ebpf.NewMap(spec.Maps[loader.ConfigMap])
	if err != nil {
		t.Fatal(err)
	}
	defer cm.Close()
	for i := range 9 {
		if i == 8 {
			info, err := mapinfo.Inspect(mapinfo.Map{Name: "policy_v1", Map: pm})
			if err != nil || info.Entries != 8 || info.Warning() != "" {
				t.Errorf("at 80%%: %+v, %v, warning %q; want none", info, err, info.Warning())
			}
		}
		if err := pm.Put(&bpf.CtdPolicyKey{Identity: uint32(i + 1)}, &bpf.CtdPolicyValue{Verdict: 1}); err != nil {
			t.Fatal(err)
		}
	}
	info, err := mapinfo.Inspect(mapinfo.Map{Name: "policy_v1", Map: pm})
	if err != nil {
		t.Fatal(err)
	}
	if w := info.Warning(); !strings.Contains(w, "policy_v1 is 90.0% full (9 of 10 entries)") {
		t.Errorf("warning %q", w)
	}
	ai, err := mapinfo.Inspect(mapinfo.Map{Name: "config_v1", Map: cm})
	if err != nil {
		t.Fatal(err)
	}
	if ai.Fill != 100 || ai.CanFill() || ai.Warning() != "" {
		t.Errorf("array: %+v, warning %q; want fill 100 and no warning", ai, ai.Warning())
	}
}
