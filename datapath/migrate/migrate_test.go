package migrate

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/bpf/v2test"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

func TestResize(t *testing.T) {
	for _, tc := range []struct {
		name             string
		ct, ip           [2]uint32 // --ct-max, --ipcache-max: before, after
		ctLive, ipLive   int
		wantMigrated     []string
		wantUnchangedMap []string
	}{
		{"ct grows", [2]uint32{1024, 4096}, [2]uint32{1024, 1024}, 600, 100,
			[]string{bpf.CtdMapCtV1}, []string{bpf.CtdMapIpcache4V1, bpf.CtdMapPolicyV1, bpf.CtdMapMetricsV1}},
		{"ct shrinks", [2]uint32{4096, 2048}, [2]uint32{1024, 1024}, 1000, 100,
			[]string{bpf.CtdMapCtV1}, []string{bpf.CtdMapIpcache4V1, bpf.CtdMapConfigV1}},
		{"ipcache grows", [2]uint32{1024, 1024}, [2]uint32{1024, 4096}, 500, 1000,
			[]string{bpf.CtdMapIpcache4V1, bpf.CtdMapIpcache6V1}, []string{bpf.CtdMapCtV1, bpf.CtdMapEvlimitV1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := setup(t, loader.Options{CTMax: tc.ct[0], IPCacheMax: tc.ip[0]})
			wantCT := fillCT(t, o.PinPath, tc.ctLive)
			wantIP := fillIPCache(t, o.PinPath, tc.ipLive)
			before := pinnedIDs(t, o.PinPath)

			o.CTMax, o.IPCacheMax = tc.ct[1], tc.ip[1]
			dp, rep, err := Load(o, none)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			defer dp.Close()

			var migrated []string
			for _, m := range rep.Maps {
				migrated = append(migrated, m.Map)
				if m.Action != Resize || m.From != m.Map {
					t.Errorf("report %+v: want a resize", m)
				}
			}
			if !slices.Equal(migrated, tc.wantMigrated) {
				t.Errorf("migrated %v, want %v", migrated, tc.wantMigrated)
			}
			if len(rep.Switched) != 0 {
				t.Errorf("switched %v with nothing attached", rep.Switched)
			}

			if got := dp.CT().MaxEntries(); got != tc.ct[1] {
				t.Errorf("ct_v1 has max_entries %d, want %d", got, tc.ct[1])
			}
			if got := dp.IPCache4().MaxEntries(); got != tc.ip[1] {
				t.Errorf("ipcache4_v1 has max_entries %d, want %d", got, tc.ip[1])
			}
			checkCT(t, openPinned(t, o.PinPath, bpf.CtdMapCtV1), wantCT)
			if got := readIPCache(t, openPinned(t, o.PinPath, bpf.CtdMapIpcache4V1)); !mapsEqual(got, wantIP) {
				t.Errorf("ipcache4_v1 holds %d entries, want the %d written before", len(got), len(wantIP))
			}

			after := pinnedIDs(t, o.PinPath)
			for _, name := range tc.wantMigrated {
				if after[name] == before[name] {
					t.Errorf("%s is still the old map", name)
				}
			}
			for _, name := range tc.wantUnchangedMap {
				if after[name] != before[name] {
					t.Errorf("%s was replaced although it did not change", name)
				}
			}
			checkNoTempPins(t, o.PinPath)

			// The CLI's loader accepts the migrated pins as they are.
			again, err := loader.Load(o)
			if err != nil {
				t.Fatalf("loader.Load after the migration: %v", err)
			}
			again.Close()
		})
	}
}

func mapsEqual[K, V comparable](a, b map[K]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestRefuseTooSmall(t *testing.T) {
	o := setup(t, loader.Options{CTMax: 4096, IPCacheMax: 1024})
	want := fillCT(t, o.PinPath, 100)
	before := pinnedIDs(t, o.PinPath)

	o.CTMax = 16
	dp, _, err := Load(o, none)
	if err == nil {
		dp.Close()
		t.Fatal("Load migrated 100 live entries into a table of 16")
	}
	var me *Error
	if !errors.As(err, &me) || me.Map != bpf.CtdMapCtV1 {
		t.Fatalf("want *Error for %s, got %v", bpf.CtdMapCtV1, err)
	}
	for _, s := range []string{"ct_v1", "100 live entries", "max_entries 16", "--ct-max 100"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not mention %q", err, s)
		}
	}
	t.Log(err)

	checkUnchanged(t, o.PinPath, before)
	ct := openPinned(t, o.PinPath, bpf.CtdMapCtV1)
	if ct.MaxEntries() != 4096 {
		t.Errorf("ct_v1 has max_entries %d after a refused resize, want 4096", ct.MaxEntries())
	}
	checkCT(t, ct, want)
}

func TestUpgradeV1ToV2(t *testing.T) {
	o := setup(t, loader.Options{CTMax: 1024, IPCacheMax: 1024})
	want := fillCT(t, o.PinPath, 500)
	wantIP := fillIPCache(t, o.PinPath, 50)
	before := pinnedIDs(t, o.PinPath)

	spec, err := v2test.LoadCtd()
	if err != nil {
		t.Fatal(err)
	}
	coll, rep, err := LoadSpec(o, spec, none, v2test.Converters()...)
	if err != nil {
		t.Fatalf("LoadSpec(v2): %v", err)
	}
	defer coll.Close()
	wantRep := []MapReport{
		{Map: v2test.CtdMapCtUnconfirmedV2, From: bpf.CtdMapCtUnconfirmedV1, Action: Upgrade, OldMaxEntries: loader.DefaultCTUnconfirmedMax, MaxEntries: loader.DefaultCTUnconfirmedMax},
		{Map: v2test.CtdMapCtV2, From: bpf.CtdMapCtV1, Action: Upgrade, OldMaxEntries: 1024, MaxEntries: 1024, Copied: 500},
	}
	if !slices.Equal(rep.Maps, wantRep) {
		t.Errorf("report %+v, want %+v", rep.Maps, wantRep)
	}

	after := pinnedIDs(t, o.PinPath)
	for _, name := range []string{bpf.CtdMapCtV1, bpf.CtdMapCtUnconfirmedV1} {
		if _, ok := after[name]; ok {
			t.Errorf("old pin %s not retired", name)
		}
	}
	for name, id := range before {
		if name != bpf.CtdMapCtV1 && name != bpf.CtdMapCtUnconfirmedV1 && after[name] != id {
			t.Errorf("%s was replaced although its layout did not change", name)
		}
	}
	checkNoTempPins(t, o.PinPath)

	got := readCTv2(t, openPinned(t, o.PinPath, v2test.CtdMapCtV2))
	if len(got) != len(want) {
		t.Errorf("ct_v2 holds %d entries, want %d", len(got), len(want))
	}
	for k, e := range want {
		nk, ne := v2test.CtV1ToV2(k, e)
		if ne.Origin != 1 {
			t.Fatalf("converter did not mark the entry as converted: %+v", ne)
		}
		g, ok := got[nk]
		if !ok || g != ne {
			t.Fatalf("entry %v = %+v (present %v), want %+v", nk, g, ok, ne)
		}
		if g.PacketsOrig != e.PacketsOrig || g.BytesReply != e.BytesReply || g.State != e.State || g.OrigIsB != e.OrigIsB {
			t.Fatalf("entry %v: v2 %+v does not carry v1 %+v", nk, g, e)
		}
	}
	if gotIP := readIPCache(t, openPinned(t, o.PinPath, bpf.CtdMapIpcache4V1)); !mapsEqual(gotIP, wantIP) {
		t.Errorf("ipcache4_v1 changed across the upgrade")
	}

	// The v1 CLI now refuses the v2 pins and points to the daemon.
	_, err = loader.Load(o)
	var inc *loader.IncompatibleError
	if !errors.As(err, &inc) || !strings.Contains(err.Error(), "ct_v2") {
		t.Errorf("loader.Load (v1) on v2 pins: want IncompatibleError naming ct_v2, got %v", err)
	}
	// And there is no way back: no converter from v2 to v1 (the first
	// table planned, in name order, says so).
	_, _, err = Load(o, none)
	var me *Error
	if !errors.As(err, &me) || !strings.Contains(err.Error(), "no converter from ct_unconfirmed_v2 to ct_unconfirmed_v1") {
		t.Errorf("downgrade: want *Error about the missing converter, got %v", err)
	}
}

func TestCannotMigrate(t *testing.T) {
	for _, tc := range []struct {
		name string
		pin  map[string]*ebpf.MapSpec // maps pinned by hand instead of loader's
		want string
	}{
		{
			name: "value size changed under one name",
			pin:  map[string]*ebpf.MapSpec{bpf.CtdMapCtV1: {Type: ebpf.LRUHash, KeySize: 40, ValueSize: 80, MaxEntries: 64}},
			want: "cannot migrate pinned map " + "%s/ct_v1 to ct_v1: value size 80 pinned, this build wants 72 under the same name: a layout change needs a new map name and a converter",
		},
		{
			name: "key size changed under one name",
			pin:  map[string]*ebpf.MapSpec{bpf.CtdMapPolicyV1: {Type: ebpf.Hash, KeySize: 12, ValueSize: 4, MaxEntries: 64}},
			want: "key size 12 pinned, this build wants 8",
		},
		{
			name: "unknown layout",
			pin:  map[string]*ebpf.MapSpec{"ct_v0": {Type: ebpf.LRUHash, KeySize: 40, ValueSize: 72, MaxEntries: 64}},
			want: "this build has no converter from ct_v0 to ct_v1 (it converts ct_v1 to ct_v2, ct_unconfirmed_v1 to ct_unconfirmed_v2)",
		},
		{
			name: "several layouts",
			pin: map[string]*ebpf.MapSpec{
				"ct_v0": {Type: ebpf.LRUHash, KeySize: 40, ValueSize: 72, MaxEntries: 64},
				"ct_v7": {Type: ebpf.LRUHash, KeySize: 40, ValueSize: 72, MaxEntries: 64},
			},
			want: "several layouts of table ct are pinned (ct_v0, ct_v7)",
		},
		{
			name: "per-CPU array resized",
			pin:  map[string]*ebpf.MapSpec{bpf.CtdMapMetricsV1: {Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 16, MaxEntries: 64}},
			want: "max_entries 64 pinned, this build wants 128: the size of a PerCPUArray is fixed by the build",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pin := nettest.PinPath(t)
			if err := os.MkdirAll(pin, 0o700); err != nil {
				t.Fatal(err)
			}
			for name, spec := range tc.pin {
				m, err := ebpf.NewMap(spec)
				if err != nil {
					t.Fatal(err)
				}
				if err := m.Pin(filepath.Join(pin, name)); err != nil {
					t.Fatal(err)
				}
				m.Close()
			}
			before := pinnedIDs(t, pin)

			// With the converters of the test layout, so that the error
			// names what a build with converters offers.
			spec, err := bpf.LoadCtd()
			if err != nil {
				t.Fatal(err)
			}
			coll, _, err := LoadSpec(loader.Options{PinPath: pin, CTMax: 1024, IPCacheMax: 1024}, spec, none, v2test.Converters()...)
			if err == nil {
				coll.Close()
				t.Fatal("Load succeeded")
			}
			var me *Error
			want := tc.want
			if strings.Contains(want, "%s") {
				want = fmt.Sprintf(want, pin)
			}
			if !errors.As(err, &me) || !strings.Contains(err.Error(), want) {
				t.Fatalf("got error %q, want *Error containing %q", err, want)
			}
			checkUnchanged(t, pin, before)
		})
	}
}

// TestCatchUp writes to the old maps between pass 1 and the switch, and to
// the new conntrack table between the switch and pass 2 (as the new
// programs would), and checks that pass 2 brings all of it together.
func TestCatchUp(t *testing.T) {
	o := setup(t, loader.Options{CTMax: 1024, IPCacheMax: 1024})
	base := fillCT(t, o.PinPath, 600)
	baseIP := fillIPCache(t, o.PinPath, 100)
	oldCT := openPinned(t, o.PinPath, bpf.CtdMapCtV1)
	oldIP := openPinned(t, o.PinPath, bpf.CtdMapIpcache4V1)

	const grown, fresh = 0, 1000 // key indexes: grown is in base, fresh is not
	var (
		want   = make(map[bpf.CtdCtKey]bpf.CtdCtEntry)
		wantIP = make(map[bpf.CtdIpcache4Key]bpf.CtdIpcacheValue)
	)
	for k, e := range base {
		want[k] = e
	}
	for k, v := range baseIP {
		wantIP[k] = v
	}

	afterCopy := func() error {
		// The old datapath keeps counting an existing flow and moves it
		// on, and creates new flows.
		e := base[ctKey(grown)]
		e.PacketsOrig += 10
		e.BytesOrig += 1000
		e.PacketsReply += 5
		e.LastSeen += 1e9
		e.State = 1
		e.TcpFlagsReply |= 0x10
		if err := oldCT.Put(ctKey(grown), e); err != nil {
			return err
		}
		for i := fresh; i < fresh+20; i++ {
			e := bpf.CtdCtEntry{PacketsOrig: uint64(i), BytesOrig: 100, FirstSeen: 50, LastSeen: 60, State: 0, OrigIsB: 0}
			if err := oldCT.Put(ctKey(i), e); err != nil {
				return err
			}
		}
		// The control plane adds, changes and deletes ipcache entries.
		if err := oldIP.Put(ipcacheKey(500), bpf.CtdIpcacheValue{Identity: 77}); err != nil {
			return err
		}
		if err := oldIP.Put(ipcacheKey(1), bpf.CtdIpcacheValue{Identity: 78}); err != nil {
			return err
		}
		return oldIP.Delete(ipcacheKey(2))
	}
	afterSwitch := func(newMaps map[string]*ebpf.Map) error {
		ct := newMaps[bpf.CtdMapCtV1]
		// The new datapath counts the grown flow from its pass-1 copy on,
		// without changing its state...
		e := base[ctKey(grown)]
		e.PacketsOrig += 3
		e.BytesOrig += 300
		e.LastSeen += 2e9
		if err := ct.Put(ctKey(grown), e); err != nil {
			return err
		}
		// ...and sees a reply of a fresh flow it does not know yet, so it
		// creates the entry from the other end.
		return ct.Put(ctKey(fresh), bpf.CtdCtEntry{PacketsOrig: 1, BytesOrig: 64, FirstSeen: 70, LastSeen: 70, OrigIsB: 1, TcpFlagsOrig: 0x12})
	}

	g := base[ctKey(grown)]
	g.PacketsOrig += 10 + 3
	g.BytesOrig += 1000 + 300
	g.PacketsReply += 5
	g.LastSeen += 2e9
	g.State = 1
	g.TcpFlagsReply |= 0x10
	want[ctKey(grown)] = g
	for i := fresh; i < fresh+20; i++ {
		want[ctKey(i)] = bpf.CtdCtEntry{PacketsOrig: uint64(i), BytesOrig: 100, FirstSeen: 50, LastSeen: 60}
	}
	// The entry the new datapath made keeps its orientation; the old
	// counters are added to its other end.
	want[ctKey(fresh)] = bpf.CtdCtEntry{PacketsOrig: 1, BytesOrig: 64, PacketsReply: fresh, BytesReply: 100,
		FirstSeen: 50, LastSeen: 70, OrigIsB: 1, TcpFlagsOrig: 0x12}
	wantIP[ipcacheKey(500)] = bpf.CtdIpcacheValue{Identity: 77}
	wantIP[ipcacheKey(1)] = bpf.CtdIpcacheValue{Identity: 78}
	delete(wantIP, ipcacheKey(2))

	o.CTMax, o.IPCacheMax = 2048, 2048
	spec, err := o.Spec()
	if err != nil {
		t.Fatal(err)
	}
	coll, rep, err := run(config{opts: o, spec: spec, ifs: none, hooks: hooks{afterCopy: afterCopy, afterSwitch: afterSwitch}})
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	defer coll.Close()

	checkCT(t, openPinned(t, o.PinPath, bpf.CtdMapCtV1), want)
	if got := readIPCache(t, openPinned(t, o.PinPath, bpf.CtdMapIpcache4V1)); !mapsEqual(got, wantIP) {
		t.Errorf("ipcache4_v1 = %d entries, want %d: pass 2 missed a change", len(got), len(wantIP))
	}
	for _, m := range rep.Maps {
		want := map[string]int{bpf.CtdMapCtV1: 21, bpf.CtdMapIpcache4V1: 3, bpf.CtdMapIpcache6V1: 0}[m.Map]
		if m.CaughtUp != want {
			t.Errorf("%s: pass 2 caught up %d entries, want %d", m.Map, m.CaughtUp, want)
		}
	}
}

func TestRecreateRingBuf(t *testing.T) {
	o := setup(t, loader.Options{CTMax: 1024, IPCacheMax: 1024, RingBufSize: 4096})
	want := fillCT(t, o.PinPath, 10)
	before := pinnedIDs(t, o.PinPath)

	o.RingBufSize = 16384
	dp, rep, err := Load(o, none)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	defer dp.Close()
	wantRep := []MapReport{{Map: bpf.CtdMapEventsV2, From: bpf.CtdMapEventsV2, Action: Recreate, OldMaxEntries: 4096, MaxEntries: 16384}}
	if !slices.Equal(rep.Maps, wantRep) {
		t.Errorf("report %+v, want %+v", rep.Maps, wantRep)
	}
	after := pinnedIDs(t, o.PinPath)
	for name, id := range before {
		if changed := after[name] != id; changed != (name == bpf.CtdMapEventsV2) {
			t.Errorf("%s replaced: %v", name, changed)
		}
	}
	if got := openPinned(t, o.PinPath, bpf.CtdMapEventsV2).MaxEntries(); got != 16384 {
		t.Errorf("events_v2 has max_entries %d, want 16384", got)
	}
	checkCT(t, openPinned(t, o.PinPath, bpf.CtdMapCtV1), want)
	checkNoTempPins(t, o.PinPath)
}
