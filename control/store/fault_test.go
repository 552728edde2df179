package store

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/control/store/storetest"
)

func prefixN(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 32)
}

func fill(t *testing.T, s *Store, n int) {
	t.Helper()
	err := s.Update(func(tx *Tx) error {
		for i := range n {
			if err := tx.PutIPCache(prefixN(i), uint32(i+1)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestDamagedPage: a damaged page makes every operation fail with one line
// that names the file and the way out; none panics, none hangs, and the
// lock is free again afterwards.
func TestDamagedPage(t *testing.T) {
	s := openTemp(t, &Options{Deadline: 10 * time.Second})
	fill(t, s, 2000)
	if err := storetest.DamageRootPage(s.Path()); err != nil {
		t.Fatal(err)
	}
	ops := map[string]func() error{
		"update":     func() error { return s.Update(func(tx *Tx) error { return tx.PutIPCache(prefixN(5000), 9) }) },
		"view":       func() error { _, err := s.Snapshot(); return err },
		"generation": func() error { _, err := s.Generation(); return err },
		"check":      s.Check,
		"change": func() error {
			return s.Change(Change{What: "test", Record: func(tx *Tx) error { return tx.PutIPCache(prefixN(5001), 9) }, Apply: func() error {
				t.Error("Apply ran on a corrupted store")
				return nil
			}}, nil)
		},
		"open": func() error { _, err := Open(filepath.Dir(s.Path()), nil); return err },
	}
	for name, op := range ops {
		t.Run(name, func(t *testing.T) {
			err := op()
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("got %v, want ErrCorrupt", err)
			}
			msg := err.Error()
			if strings.Contains(msg, "\n") || !strings.Contains(msg, s.Path()) || !strings.Contains(msg, "ctd state rebuild --from-pins") {
				t.Errorf("error %q: want one line naming %s and 'ctd state rebuild --from-pins'", msg, s.Path())
			}
		})
	}
	// The lock is free: a rebuild gets it at once.
	s2, aside, err := Rebuild(filepath.Dir(s.Path()), &Options{LockTimeout: time.Second}, func(tx *Tx) error { return tx.PutIPCache(prefixN(1), 1) })
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(aside); err != nil {
		t.Errorf("the damaged file was not kept aside: %v", err)
	}
	if st, err := s2.Snapshot(); err != nil || len(st.IPCache) != 1 {
		t.Errorf("rebuilt store: %v, %v", st, err)
	}
}

// TestEmptyFileIsCorrupt: a 0-byte store is corruption, not a new install;
// a missing one is a new install.
func TestEmptyFileIsCorrupt(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, FileName), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Open(dir, nil)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "0 bytes") {
		t.Fatalf("Open of a 0-byte store: %v, want ErrCorrupt naming 0 bytes", err)
	}
	if fi, err := os.Stat(filepath.Join(dir, FileName)); err != nil || fi.Size() != 0 {
		t.Errorf("the empty file was changed: %v %v", fi, err)
	}
	s, err := Open(t.TempDir(), nil)
	if err != nil {
		t.Fatalf("new install: %v", err)
	}
	if st, err := s.Snapshot(); err != nil || st.Generation != 0 || len(st.IPCache) != 0 {
		t.Errorf("new store: %+v, %v; want empty", st, err)
	}
	// A store deleted under a running process is not recreated empty.
	os.Remove(s.Path())
	if _, err := s.Generation(); err == nil || !strings.Contains(err.Error(), "disappeared") {
		t.Errorf("store removed: %v, want an error", err)
	}
}

func TestPinPathBinding(t *testing.T) {
	dir := t.TempDir()
	a, err := Open(dir, &Options{PinPath: "/sys/fs/bpf/a"})
	if err != nil {
		t.Fatal(err)
	}
	// Open alone does not bind; the first write does.
	if _, err := Open(dir, &Options{PinPath: "/sys/fs/bpf/b"}); err != nil {
		t.Fatalf("unbound store refused: %v", err)
	}
	if err := a.Update(func(tx *Tx) error { return tx.PutInterface("eth0", "auto") }); err != nil {
		t.Fatal(err)
	}
	_, err = Open(dir, &Options{PinPath: "/sys/fs/bpf/b"})
	if err == nil || !strings.Contains(err.Error(), "belongs to the datapath at /sys/fs/bpf/a, not to --pin-path /sys/fs/bpf/b") {
		t.Fatalf("store of /sys/fs/bpf/a opened for /sys/fs/bpf/b: %v", err)
	}
	if _, err := Open(dir, &Options{PinPath: "/sys/fs/bpf/a"}); err != nil {
		t.Errorf("own pin path: %v", err)
	}
}

// TestChange follows the intent protocol through success, a failed Apply
// and a writer killed between its transactions.
func TestChange(t *testing.T) {
	s := openTemp(t, nil)
	fill(t, s, 10)
	noFinish := func(*State) error { t.Error("nothing to finish, but the finisher ran"); return nil }

	// Success: the store holds the change, no mark, generation +1.
	applied := false
	err := s.Change(Change{What: "add", Record: func(tx *Tx) error {
		return tx.PutIPCache(prefixN(100), 7)
	}, Apply: func() error {
		applied = true
		return nil
	}}, noFinish)
	if err != nil || !applied {
		t.Fatalf("Change: %v, applied %v", err, applied)
	}
	st := snapshot(t, s)
	if st.IPCache[prefixN(100)] != 7 || st.Generation != 2 {
		t.Errorf("after Change: %d prefixes, generation %d", len(st.IPCache), st.Generation)
	}
	if in, _ := s.Pending(); in != nil {
		t.Errorf("mark left after a finished change: %+v", in)
	}

	// A failed Apply reverts the store, a replace included.
	boom := errors.New("map full")
	err = s.Change(Change{What: "replace", Record: func(tx *Tx) error {
		if err := tx.ClearIPCache(); err != nil {
			return err
		}
		return errors.Join(tx.PutIPCache(prefixN(3), 99), tx.PutIPCache(prefixN(200), 1), tx.SetDefault(Ingress, Deny))
	}, Apply: func() error { return boom }}, noFinish)
	if !errors.Is(err, boom) {
		t.Fatalf("Change with a failing Apply: %v", err)
	}
	after := snapshot(t, s)
	if fmt.Sprint(after.IPCache) != fmt.Sprint(st.IPCache) || after.Defaults != st.Defaults {
		t.Errorf("store not reverted:\n got %v %v\nwant %v %v", after.IPCache, after.Defaults, st.IPCache, st.Defaults)
	}
	if in, _ := s.Pending(); in != nil {
		t.Errorf("mark left after a reverted change: %+v", in)
	}

	// A writer killed after its first transaction: the next one finishes
	// its change first, with the store's state.
	if err := s.Update(func(tx *Tx) error {
		return errors.Join(tx.PutIPCache(prefixN(300), 3), tx.setIntent("killed"))
	}); err != nil {
		t.Fatal(err)
	}
	var finished *State
	err = s.Change(Change{What: "next", Record: func(tx *Tx) error {
		if finished == nil {
			t.Error("Record ran before the unfinished change was finished")
		}
		return tx.PutIPCache(prefixN(301), 4)
	}, Apply: func() error { return nil }}, func(st *State) error { finished = st; return nil })
	if err != nil {
		t.Fatal(err)
	}
	if finished == nil || finished.IPCache[prefixN(300)] != 3 || finished.IPCache[prefixN(301)] != 0 {
		t.Errorf("finisher got %v, want the killed writer's state", finished)
	}

	// Finish alone, and a finisher that fails keeps the mark.
	if err := s.Update(func(tx *Tx) error { return tx.setIntent("killed again") }); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Finish(func(*State) error { return boom }); !errors.Is(err, boom) {
		t.Errorf("Finish with a failing finisher: %v", err)
	}
	in, err := s.Finish(func(*State) error { return nil })
	if err != nil || in == nil || in.What != "killed again" {
		t.Errorf("Finish: %+v, %v", in, err)
	}
	if in, _ := s.Pending(); in != nil {
		t.Errorf("mark left after Finish: %+v", in)
	}
}

func snapshot(t *testing.T, s *Store) *State {
	t.Helper()
	st, err := s.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestCompact: a store that held many prefixes and now holds 3 stays big
// until compacted; CompactIfBloated compacts it, and only then.
func TestCompact(t *testing.T) {
	s := openTemp(t, nil)
	fill(t, s, 100000)
	if got, err := s.CompactIfBloated(); err != nil || got != [2]int64{} {
		t.Fatalf("a store full of live data was compacted: %v, %v", got, err)
	}
	err := s.Update(func(tx *Tx) error {
		if err := tx.ClearIPCache(); err != nil {
			return err
		}
		return errors.Join(tx.PutIPCache(prefixN(1), 1), tx.PutIPCache(prefixN(2), 2), tx.PutIPCache(prefixN(3), 3))
	})
	if err != nil {
		t.Fatal(err)
	}
	file, live, err := s.Size()
	if err != nil {
		t.Fatal(err)
	}
	if file < BloatMinSize || file < BloatFactor*live {
		t.Fatalf("after deleting: file %d, live %d: the test needs a bloated store", file, live)
	}
	got, err := s.CompactIfBloated()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("compacted %d -> %d bytes (live data %d)", got[0], got[1], live)
	if got[0] != file || got[1] >= BloatMinSize {
		t.Errorf("compacted %v, want from %d to below %d", got, file, BloatMinSize)
	}
	if st := snapshot(t, s); len(st.IPCache) != 3 || st.Generation != 2 {
		t.Errorf("after compaction: %d prefixes, generation %d", len(st.IPCache), st.Generation)
	}
}

// TestChangeBulk stages an ipcache load in several transactions: merged or
// replacing, committed or reverted, and after a writer died while staging.
func TestChangeBulk(t *testing.T) {
	s := openTemp(t, nil)
	fill(t, s, 10) // prefixes 0-9, identity i+1
	load := func(from, n int, id uint32, replace bool) *IPCacheLoad {
		return &IPCacheLoad{Len: n, Replace: replace, At: func(i int) (netip.Prefix, uint32) { return prefixN(from + i), id }}
	}
	ok := func() error { return nil }

	// Merge 5-(5+2.5 chunks): 0-4 keep their identities.
	n := stageChunk*5/2 + 1
	if err := s.Change(Change{What: "merge", IPCache: load(5, n, 7, false), Apply: ok}, nil); err != nil {
		t.Fatal(err)
	}
	st := snapshot(t, s)
	if len(st.IPCache) != 5+n || st.IPCache[prefixN(4)] != 5 || st.IPCache[prefixN(5)] != 7 || st.IPCache[prefixN(5+n-1)] != 7 {
		t.Fatalf("after a merging load: %d prefixes", len(st.IPCache))
	}

	// A replace whose Apply fails leaves the store as it was.
	boom := errors.New("boom")
	if err := s.Change(Change{What: "replace", IPCache: load(1, 3, 9, true), Apply: func() error { return boom }}, nil); !errors.Is(err, boom) {
		t.Fatalf("failing replace: %v", err)
	}
	if after := snapshot(t, s); len(after.IPCache) != len(st.IPCache) || after.IPCache[prefixN(4)] != 5 {
		t.Fatalf("after a reverted replace: %d prefixes, want %d", len(after.IPCache), len(st.IPCache))
	}

	// A writer killed while staging: its staging bucket is no part of the
	// desired state, and the next load drops it.
	ss, done, err := s.open(true)
	if err != nil {
		t.Fatal(err)
	}
	if err := ss.tx(true, newStaging); err != nil {
		t.Fatal(err)
	}
	if err := ss.tx(true, func(tx *Tx) error {
		return tx.tx.Bucket(bucketStaging).Bucket(bucketIPCache).Put([]byte("junk"), []byte{1})
	}); err != nil {
		t.Fatal(err)
	}
	done()
	if err := s.Change(Change{What: "replace", IPCache: load(1, 3, 9, true), Apply: ok}, nil); err != nil {
		t.Fatal(err)
	}
	st = snapshot(t, s)
	if len(st.IPCache) != 3 || st.IPCache[prefixN(1)] != 9 {
		t.Fatalf("after a replace: %v", st.IPCache)
	}
	err = s.View(func(tx *Tx) error {
		if tx.tx.Bucket(bucketStaging) != nil || tx.tx.Bucket(bucketUndo) != nil {
			t.Error("staging or undo bucket left after the change")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
