package loader

import (
	"errors"
	"os"
	"path/filepath"
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
	if err := dp.PolicyV1.Put(key, bpf.CtdPolicyValue{Verdict: 1}); err != nil {
		t.Fatal(err)
	}

	again, err := Load(opts)
	if err != nil {
		t.Fatalf("second Load: %v", err)
	}
	defer again.Close()
	var v bpf.CtdPolicyValue
	if err := again.PolicyV1.Lookup(key, &v); err != nil || v.Verdict != 1 {
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
	if !errors.As(err, &inc) || inc.Map != bpf.CtdMapCtV1 || !errors.Is(err, ebpf.ErrMapIncompatible) {
		t.Fatalf("want IncompatibleError for ct_v1, got %v", err)
	}
}

func TestOpenPinnedMissing(t *testing.T) {
	if _, err := OpenPinned(testPinPath(t)); err == nil {
		t.Fatal("OpenPinned on an empty pin path succeeded")
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
