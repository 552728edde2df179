package loader

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
)

func testPinPath(t *testing.T) string {
	t.Helper()
	p := filepath.Join("/sys/fs/bpf", "ctdtest-loader-"+filepath.Base(t.TempDir()))
	t.Cleanup(func() { os.RemoveAll(p) })
	return p
}

func TestLoadPinsAndReuses(t *testing.T) {
	pin := testPinPath(t)
	opts := Options{PinPath: pin, CTMax: 1024, IPCacheMax: 1024}

	dp, err := Load(opts)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	defer dp.Close()
	for _, name := range MapNames {
		if _, err := os.Stat(filepath.Join(pin, name)); err != nil {
			t.Errorf("map %s not pinned: %v", name, err)
		}
	}

	key := bpf.CtdPolicyKey{Identity: 42, Port: 80, Proto: 6}
	if err := dp.Policy().Put(key, bpf.CtdPolicyValue{Verdict: 1}); err != nil {
		t.Fatal(err)
	}

	again, err := Load(opts)
	if err != nil {
		t.Fatalf("second Load: %v", err)
	}
	defer again.Close()
	var v bpf.CtdPolicyValue
	if err := again.Policy().Lookup(key, &v); err != nil || v.Verdict != 1 {
		t.Fatalf("second Load did not reuse the pinned policy map: %v %+v", err, v)
	}
}

func TestLoadRefusesIncompatiblePin(t *testing.T) {
	pin := testPinPath(t)
	dp, err := Load(Options{PinPath: pin, CTMax: 1024, IPCacheMax: 1024})
	if err != nil {
		t.Fatal(err)
	}
	dp.Close()

	_, err = Load(Options{PinPath: pin, CTMax: 2048, IPCacheMax: 1024})
	var inc *IncompatibleError
	if !errors.As(err, &inc) || inc.Map != CT4Map || !errors.Is(err, ebpf.ErrMapIncompatible) {
		t.Fatalf("want IncompatibleError for ct4_v2, got %v", err)
	}
}

func TestOpenPinnedMissing(t *testing.T) {
	pin := testPinPath(t)
	if _, err := OpenPinned(pin); err == nil || !strings.Contains(err.Error(), "no ctd datapath at "+pin) {
		t.Fatalf("OpenPinned on an empty pin path: %v, want no ctd datapath", err)
	}
	// A datapath pinned by an older ctd lacks the maps a newer one adds.
	maps, err := OpenMaps(Options{PinPath: pin, CTMax: 1024, IPCacheMax: 1024})
	if err != nil {
		t.Fatal(err)
	}
	maps.Close()
	if err := os.Remove(filepath.Join(pin, ListenerMap)); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenPinned(pin); err == nil || !strings.Contains(err.Error(), "lacks map evlisten_v1, which this version of ctd adds") {
		t.Fatalf("OpenPinned on an older datapath: %v", err)
	}
}

func TestOptionsValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Options
		ok   bool
	}{
		{"defaults", Options{}.WithDefaults(), true},
		{"ringbuf not power of two", Options{CTMax: 1, IPCacheMax: 1, RingBufSize: 5000}, false},
		{"ringbuf too small", Options{CTMax: 1, IPCacheMax: 1, RingBufSize: 1024}, false},
		{"zero ct", Options{IPCacheMax: 1, RingBufSize: 4096}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.o.Validate(); (err == nil) != tc.ok {
				t.Fatalf("Validate() = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

func TestSplitName(t *testing.T) {
	for _, tc := range []struct {
		name    string
		table   string
		version int
		ok      bool
	}{
		{"ct_v1", "ct", 1, true},
		{"ipcache4_v12", "ipcache4", 12, true},
		{"ct_v1~migrating", "", 0, false},
		{"ct", "", 0, false},
		{"_v1", "", 0, false},
		{"ct_v01", "", 0, false},
		{"ct_v", "", 0, false},
		{".bss", "", 0, false},
	} {
		table, version, ok := SplitName(tc.name)
		if table != tc.table || version != tc.version || ok != tc.ok {
			t.Errorf("SplitName(%q) = %q, %d, %v; want %q, %d, %v", tc.name, table, version, ok, tc.table, tc.version, tc.ok)
		}
	}
}

func TestLoadRefusesOtherLayout(t *testing.T) {
	for _, tc := range []struct {
		pinned string // the only map pinned
		want   string // the map refused
	}{
		{"ct4_v9", CT4Map},    // another version of the table
		{CTV1Map, CT4Map},     // the table this build converts into ct4_v2
		{"ct_v9", CTGuardMap}, // another version of the guard's table
	} {
		t.Run(tc.pinned, func(t *testing.T) {
			pin := testPinPath(t)
			if err := os.MkdirAll(pin, 0o700); err != nil {
				t.Fatal(err)
			}
			m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.LRUHash, KeySize: 40, ValueSize: 80, MaxEntries: 16})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if err := m.Pin(filepath.Join(pin, tc.pinned)); err != nil {
				t.Fatal(err)
			}
			_, err = Load(Options{PinPath: pin, CTMax: 1024, IPCacheMax: 1024})
			var inc *IncompatibleError
			if !errors.As(err, &inc) || inc.Map != tc.want || !strings.Contains(err.Error(), "pinned as "+tc.pinned) {
				t.Fatalf("want IncompatibleError for %s pinned as %s, got %v", tc.want, tc.pinned, err)
			}
			for _, name := range MapNames {
				if _, err := os.Stat(filepath.Join(pin, name)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("Load pinned %s beside %s", name, tc.pinned)
				}
			}
		})
	}
}

func TestNewConfigLimitsEvents(t *testing.T) {
	maps, err := OpenMaps(Options{PinPath: testPinPath(t), CTMax: 1024, IPCacheMax: 1024})
	if err != nil {
		t.Fatal(err)
	}
	defer maps.Close()
	cfg, err := maps.Config().Read()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.EventsRate != DefaultEventsRate || cfg.EventsBurst != DefaultEventsRate {
		t.Fatalf("new config_v1 = %+v, want the event rate limit %d on", cfg, DefaultEventsRate)
	}
}
