package migrate

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/ctmap"
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
		{"ct grows", [2]uint32{1024, 4096}, [2]uint32{1024, 1024}, 1200, 100,
			[]string{loader.CT4Map, loader.CT6Map}, []string{bpf.CtdMapIpcache4V1, bpf.CtdMapPolicyV1, bpf.CtdMapMetricsV1, loader.CT4UnconfirmedMap}},
		{"ct shrinks", [2]uint32{4096, 2048}, [2]uint32{1024, 1024}, 2000, 100,
			[]string{loader.CT4Map, loader.CT6Map}, []string{bpf.CtdMapIpcache4V1, bpf.CtdMapConfigV1, loader.CTGuardMap}},
		{"ipcache grows", [2]uint32{1024, 1024}, [2]uint32{1024, 4096}, 1000, 1000,
			[]string{bpf.CtdMapIpcache4V1, bpf.CtdMapIpcache6V1, bpf.CtdMapIphost4V1, bpf.CtdMapIphost6V1}, []string{loader.CT4Map, loader.CT6Map, bpf.CtdMapEvlimitV1}},
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

			if got := dp.CT4().MaxEntries(); got != tc.ct[1] {
				t.Errorf("ct4_v2 has max_entries %d, want %d", got, tc.ct[1])
			}
			if got := dp.CT6().MaxEntries(); got != tc.ct[1] {
				t.Errorf("ct6_v2 has max_entries %d, want %d", got, tc.ct[1])
			}
			if got := dp.IPCache4().MaxEntries(); got != tc.ip[1] {
				t.Errorf("ipcache4_v1 has max_entries %d, want %d", got, tc.ip[1])
			}
			checkCT(t, conntrack(t, o.PinPath), wantCT)
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
	want := fillCT(t, o.PinPath, 200) // 100 of each family
	before := pinnedIDs(t, o.PinPath)

	o.CTMax = 16
	dp, _, err := Load(o, none)
	if err == nil {
		dp.Close()
		t.Fatal("Load migrated 100 live entries into a table of 16")
	}
	var me *Error
	if !errors.As(err, &me) || me.Map != loader.CT4Map {
		t.Fatalf("want *Error for %s, got %v", loader.CT4Map, err)
	}
	for _, s := range []string{"ct4_v2", "100 live entries", "max_entries 16", "--ct-max 100"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not mention %q", err, s)
		}
	}
	t.Log(err)

	checkUnchanged(t, o.PinPath, before)
	ct := conntrack(t, o.PinPath)
	if ct.MaxEntries() != 4096 {
		t.Errorf("ct4_v2 has max_entries %d after a refused resize, want 4096", ct.MaxEntries())
	}
	checkCT(t, ct, want)
}

// TestUpgradeV1ToV2 upgrades the conntrack tables of layout v1 (ct_v1,
// ct_unconfirmed_v1: one table for both families) to layout v2 (a table
// per family) with this build's own converters, and checks that every
// entry keeps every field and its table (confirmed or not); then that the
// first release refuses the result.
func TestUpgradeV1ToV2(t *testing.T) {
	o := setupV1(t, loader.Options{CTMax: 1024, IPCacheMax: 1024})
	want := fillCTv1(t, o.PinPath, 500)
	unconfirmed := openPinned(t, o.PinPath, loader.CTUnconfirmedV1Map)
	r := rand.New(rand.NewPCG(1, 2))
	wantUnconfirmed := map[ctmap.Key]bool{}
	for i := 2000; i < 2020; i++ {
		k := ctKey(i)
		e, conv := v1Entry(ctEntry(r))
		if err := unconfirmed.Put(v1Key(k), e); err != nil {
			t.Fatal(err)
		}
		want[k], wantUnconfirmed[k] = conv, true
	}
	wantIP := fillIPCache(t, o.PinPath, 50)
	before := pinnedIDs(t, o.PinPath)

	dp, rep, err := Load(o, none)
	if err != nil {
		t.Fatalf("Load (v1 to v2): %v", err)
	}
	defer dp.Close()
	um, cm := uint32(loader.DefaultCTUnconfirmedMax), uint32(1024)
	wantRep := []MapReport{
		{Map: loader.CT4UnconfirmedMap, From: loader.CTUnconfirmedV1Map, Action: Upgrade, OldMaxEntries: um, MaxEntries: um, Copied: 10},
		{Map: loader.CT4Map, From: loader.CTV1Map, Action: Upgrade, OldMaxEntries: cm, MaxEntries: cm, Copied: 250},
		{Map: loader.CT6UnconfirmedMap, From: loader.CTUnconfirmedV1Map, Action: Upgrade, OldMaxEntries: um, MaxEntries: um, Copied: 10},
		{Map: loader.CT6Map, From: loader.CTV1Map, Action: Upgrade, OldMaxEntries: cm, MaxEntries: cm, Copied: 250},
	}
	if !slices.Equal(rep.Maps, wantRep) {
		t.Errorf("report %+v, want %+v", rep.Maps, wantRep)
	}

	after := pinnedIDs(t, o.PinPath)
	for _, name := range []string{loader.CTV1Map, loader.CTUnconfirmedV1Map} {
		if _, ok := after[name]; ok {
			t.Errorf("old pin %s not retired", name)
		}
	}
	for _, name := range append(loader.ConntrackMaps[:], loader.CTGuardMap) {
		if _, ok := after[name]; !ok {
			t.Errorf("%s not pinned", name)
		}
	}
	for name, id := range before {
		if name != loader.CTV1Map && name != loader.CTUnconfirmedV1Map && after[name] != id {
			t.Errorf("%s was replaced although its layout did not change", name)
		}
	}
	checkNoTempPins(t, o.PinPath)

	ct := dp.Conntrack()
	checkCT(t, ct, want)
	for k := range want {
		c, u, err := ct.Where(&k)
		if err != nil {
			t.Fatal(err)
		}
		if c == wantUnconfirmed[k] || u != wantUnconfirmed[k] {
			t.Fatalf("entry %v in the confirmed table %v, the unconfirmed %v; want it where v1 had it", k, c, u)
		}
	}
	if gotIP := readIPCache(t, openPinned(t, o.PinPath, bpf.CtdMapIpcache4V1)); !mapsEqual(gotIP, wantIP) {
		t.Errorf("ipcache4_v1 changed across the upgrade")
	}

	// A downgrade: the first release's datapath (layout v1) over these pins
	// finds ct_v2, another layout of its table ct, and refuses before
	// changing anything, instead of creating an empty ct_v1.
	before = pinnedIDs(t, o.PinPath)
	_, _, err = LoadSpec(o, nettest.FirstReleaseSpec(t), none)
	var me *Error
	if !errors.As(err, &me) || !strings.Contains(err.Error(), "no converter from ct_v2 to ct_v1") {
		t.Errorf("first release over v2 pins: want *Error about the missing converter, got %v", err)
	}
	t.Logf("first release over v2 pins: %v", err)
	checkUnchanged(t, o.PinPath, before)
}

func TestCannotMigrate(t *testing.T) {
	for _, tc := range []struct {
		name string
		pin  map[string]*ebpf.MapSpec // maps pinned by hand instead of loader's
		want string
	}{
		{
			name: "value size changed under one name",
			pin:  map[string]*ebpf.MapSpec{loader.CT4Map: {Type: ebpf.LRUHash, KeySize: 16, ValueSize: 120, MaxEntries: 64}},
			want: "cannot migrate pinned map " + "%s/ct4_v2 to ct4_v2: value size 120 pinned, this build wants 112 under the same name: a layout change needs a new map name and a converter",
		},
		{
			name: "key size changed under one name",
			pin:  map[string]*ebpf.MapSpec{bpf.CtdMapPolicyV1: {Type: ebpf.Hash, KeySize: 12, ValueSize: 4, MaxEntries: 64}},
			want: "key size 12 pinned, this build wants 8",
		},
		{
			name: "unknown layout",
			pin:  map[string]*ebpf.MapSpec{"ct4_v1": {Type: ebpf.LRUHash, KeySize: 16, ValueSize: 72, MaxEntries: 64}},
			want: "this build has no converter from ct4_v1 to ct4_v2 (it converts ct_v1 to ct4_v2, ct_v1 to ct6_v2, ct_unconfirmed_v1 to ct4_unconfirmed_v2, ct_unconfirmed_v1 to ct6_unconfirmed_v2)",
		},
		{
			name: "several layouts",
			pin: map[string]*ebpf.MapSpec{
				"ct6_v0": {Type: ebpf.LRUHash, KeySize: 40, ValueSize: 72, MaxEntries: 64},
				"ct6_v7": {Type: ebpf.LRUHash, KeySize: 40, ValueSize: 72, MaxEntries: 64},
			},
			want: "several layouts of table ct6 are pinned (ct6_v0, ct6_v7)",
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

			dp, _, err := Load(loader.Options{PinPath: pin, CTMax: 1024, IPCacheMax: 1024}, none)
			if err == nil {
				dp.Close()
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
	oldCT := conntrack(t, o.PinPath)
	oldIP := openPinned(t, o.PinPath, bpf.CtdMapIpcache4V1)

	const grown, fresh = 0, 1000 // key indexes: grown is in base, fresh is not (both IPv4)
	var (
		want   = make(map[ctmap.Key]ctmap.Entry)
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
		e, k := base[ctKey(grown)], ctKey(grown)
		e.PacketsOrig += 10
		e.BytesOrig += 1000
		e.PacketsReply += 5
		e.LastSeen += 1e9
		e.State = 1
		e.TcpFlagsReply |= 0x10
		if err := oldCT.Put(&k, &e); err != nil {
			return err
		}
		for i := fresh; i < fresh+20; i++ {
			e, k := ctmap.Entry{PacketsOrig: uint64(i), BytesOrig: 100, FirstSeen: 50, LastSeen: 60, State: 0, OrigIsB: 0}, ctKey(i)
			if err := oldCT.Put(&k, &e); err != nil {
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
		ct := ctmap.New(ctmap.Tables{Confirmed4: newMaps[loader.CT4Map], Confirmed6: newMaps[loader.CT6Map]})
		// The new datapath counts the grown flow from its pass-1 copy on,
		// without changing its state...
		e, k := base[ctKey(grown)], ctKey(grown)
		e.PacketsOrig += 3
		e.BytesOrig += 300
		e.LastSeen += 2e9
		if err := ct.Put(&k, &e); err != nil {
			return err
		}
		// ...and sees a reply of a fresh flow it does not know yet, so it
		// creates the entry from the other end.
		k = ctKey(fresh)
		return ct.Put(&k, &ctmap.Entry{PacketsOrig: 1, BytesOrig: 64, FirstSeen: 70, LastSeen: 70, OrigIsB: 1, TcpFlagsOrig: 0x12})
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
		want[ctKey(i)] = ctmap.Entry{PacketsOrig: uint64(i), BytesOrig: 100, FirstSeen: 50, LastSeen: 60}
	}
	// The entry the new datapath made keeps its orientation; the old
	// counters are added to its other end.
	want[ctKey(fresh)] = ctmap.Entry{PacketsOrig: 1, BytesOrig: 64, PacketsReply: fresh, BytesReply: 100,
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

	checkCT(t, conntrack(t, o.PinPath), want)
	if got := readIPCache(t, openPinned(t, o.PinPath, bpf.CtdMapIpcache4V1)); !mapsEqual(got, wantIP) {
		t.Errorf("ipcache4_v1 = %d entries, want %d: pass 2 missed a change", len(got), len(wantIP))
	}
	for _, m := range rep.Maps {
		// IPv4: the grown flow and the 10 fresh ones of even index; IPv6: the 10 others.
		want := map[string]int{loader.CT4Map: 11, loader.CT6Map: 10, bpf.CtdMapIpcache4V1: 3, bpf.CtdMapIpcache6V1: 0}[m.Map]
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
	checkCT(t, conntrack(t, o.PinPath), want)
	checkNoTempPins(t, o.PinPath)
}
