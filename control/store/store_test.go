package store

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

func openTemp(t *testing.T, o *Options) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "state"), o)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestOpenModes(t *testing.T) {
	old := umask(0o022)
	defer umask(old)

	dir := filepath.Join(t.TempDir(), "a", "state")
	s, err := Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path string
		want os.FileMode
	}{
		{dir, 0o700 | os.ModeDir},
		{s.Path(), 0o600},
	} {
		fi, err := os.Stat(c.path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != c.want {
			t.Errorf("%s: mode %v, want %v", c.path, fi.Mode(), c.want)
		}
	}

	// Reopening an existing store keeps its contents.
	if err := s.Update(func(tx *Tx) error { return tx.PutInterface("eth0", "tcx") }); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	st, err := s2.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if st.Interfaces["eth0"] != "tcx" || st.Generation != 1 {
		t.Errorf("reopened store: interfaces %v generation %d, want eth0=tcx generation 1", st.Interfaces, st.Generation)
	}
}

func TestOpenErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	foreign := t.TempDir()
	db, err := bbolt.Open(filepath.Join(foreign, FileName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucket(bucketMeta)
		if err != nil {
			return err
		}
		return b.Put(keySchema, be64(schemaVersion+1))
	}); err != nil {
		t.Fatal(err)
	}
	db.Close()

	for _, c := range []struct {
		name, dir, want string
	}{
		{"empty", "", "state directory is empty"},
		{"not a directory", file, "is not a directory"},
		{"newer schema", foreign, "unknown schema"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Open(c.dir, nil)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Open(%q) = %v, want error containing %q", c.dir, err, c.want)
			}
		})
	}
}

func TestRoundTrip(t *testing.T) {
	s := openTemp(t, nil)
	p4 := netip.MustParsePrefix("10.0.0.0/8")
	p6 := netip.MustParsePrefix("fd00::/64")
	h4 := netip.MustParsePrefix("198.51.100.7/32")
	r1 := RuleKey{Dir: Ingress, Identity: 42, Proto: 6, Port: 80}
	r2 := RuleKey{Dir: Egress}

	err := s.Update(func(tx *Tx) error {
		return errors.Join(
			tx.PutInterface("eth0", "auto"),
			tx.PutInterface("eth1", "tc"),
			tx.PutIPCache(p4, 100),
			tx.PutIPCache(p6, 200),
			tx.PutIPCache(h4, 300),
			tx.PutRule(r1, Allow),
			tx.PutRule(r2, Deny),
			tx.SetDefault(Ingress, Deny),
		)
	})
	if err != nil {
		t.Fatal(err)
	}
	err = s.Update(func(tx *Tx) error {
		return errors.Join(
			tx.DeleteInterface("eth1"),
			tx.DeleteIPCache(h4),
			tx.PutIPCache(p4, 101),
			tx.DeleteRule(r2),
		)
	})
	if err != nil {
		t.Fatal(err)
	}

	st, err := s.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	want := &State{
		Generation: 2,
		Interfaces: map[string]string{"eth0": "auto"},
		IPCache:    map[netip.Prefix]uint32{p4: 101, p6: 200},
		Policy:     map[RuleKey]Verdict{r1: Allow},
		Defaults:   [2]Verdict{Deny, VerdictUnset},
	}
	if fmt.Sprint(st) != fmt.Sprint(want) {
		t.Errorf("snapshot\n got %+v\nwant %+v", st, want)
	}
	err = s.View(func(tx *Tx) error {
		if id, ok := tx.LookupIPCache(p6); !ok || id != 200 {
			t.Errorf("LookupIPCache(%s) = %d, %v; want 200, true", p6, id, ok)
		}
		if _, ok := tx.LookupIPCache(h4); ok {
			t.Errorf("LookupIPCache(%s) found a deleted prefix", h4)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestGeneration checks that the generation counts exactly the transactions
// that changed something.
func TestGeneration(t *testing.T) {
	s := openTemp(t, nil)
	p := netip.MustParsePrefix("203.0.113.0/24")
	steps := []struct {
		name string
		fn   func(tx *Tx) error
		want uint64
	}{
		{"add", func(tx *Tx) error { return tx.PutIPCache(p, 7) }, 1},
		{"same value", func(tx *Tx) error { return tx.PutIPCache(p, 7) }, 1},
		{"new value", func(tx *Tx) error { return tx.PutIPCache(p, 8) }, 2},
		{"delete missing", func(tx *Tx) error { return tx.DeleteRule(RuleKey{Identity: 9}) }, 2},
		{"set default", func(tx *Tx) error { return tx.SetDefault(Egress, Allow) }, 3},
		{"same default", func(tx *Tx) error { return tx.SetDefault(Egress, Allow) }, 3},
		{"unset default", func(tx *Tx) error { return tx.SetDefault(Egress, VerdictUnset) }, 4},
		{"clear", func(tx *Tx) error { return tx.ClearIPCache() }, 5},
		{"clear empty", func(tx *Tx) error { return tx.ClearIPCache() }, 5},
		{"read only", func(tx *Tx) error { tx.Interfaces(); return nil }, 5},
	}
	for _, step := range steps {
		if err := s.Update(step.fn); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		g, err := s.Generation()
		if err != nil {
			t.Fatal(err)
		}
		if g != step.want {
			t.Errorf("after %s: generation %d, want %d", step.name, g, step.want)
		}
	}
}

func TestInvalidInput(t *testing.T) {
	s := openTemp(t, nil)
	for _, c := range []struct {
		name string
		fn   func(tx *Tx) error
		want string
	}{
		{"host bits", func(tx *Tx) error { return tx.PutIPCache(netip.MustParsePrefix("10.0.0.1/8"), 1) }, "no host bits"},
		{"invalid prefix", func(tx *Tx) error { return tx.PutIPCache(netip.Prefix{}, 1) }, "invalid ipcache prefix"},
		{"identity 0", func(tx *Tx) error { return tx.PutIPCache(netip.MustParsePrefix("10.0.0.0/8"), 0) }, "invalid identity 0"},
		{"rule verdict", func(tx *Tx) error { return tx.PutRule(RuleKey{}, VerdictUnset) }, "invalid policy verdict"},
		{"rule direction", func(tx *Tx) error { return tx.PutRule(RuleKey{Dir: 2}, Allow) }, "invalid policy direction"},
		{"default verdict", func(tx *Tx) error { return tx.SetDefault(Ingress, 3) }, "invalid default verdict"},
		{"empty interface", func(tx *Tx) error { return tx.PutInterface("", "auto") }, "empty interface name"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := s.Update(c.fn)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want error containing %q", err, c.want)
			}
		})
	}
	if g, err := s.Generation(); err != nil || g != 0 {
		t.Errorf("generation after failed updates = %d, %v; want 0", g, err)
	}
	err := s.View(func(tx *Tx) error { return tx.PutInterface("eth0", "auto") })
	if err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("write in View: got %v, want a read-only error", err)
	}
}

// TestLockTimeout checks that a writer waiting longer than LockTimeout gets
// one clear error, and that readers and writers wait for each other.
func TestLockTimeout(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	s, err := Open(dir, &Options{LockTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	held := make(chan struct{})
	release := make(chan struct{})
	done := make(chan error)
	go func() {
		done <- s.View(func(*Tx) error {
			close(held)
			<-release
			return nil
		})
	}()
	<-held
	err = s.Update(func(tx *Tx) error { return tx.PutInterface("eth0", "auto") })
	if err == nil || !strings.Contains(err.Error(), "is busy") {
		t.Errorf("Update while a reader holds the store: %v, want a busy error", err)
	}
	// Readers share the lock.
	if _, err := s.Generation(); err != nil {
		t.Errorf("second reader: %v", err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := s.Update(func(tx *Tx) error { return tx.PutInterface("eth0", "auto") }); err != nil {
		t.Errorf("Update after the reader left: %v", err)
	}
}

const helperEnv = "CTD_STORE_TEST_HELPER"

// TestConcurrentWriters has several processes and goroutines add prefixes
// at once; every write must land and the generation must count them all.
func TestConcurrentWriters(t *testing.T) {
	const procs, goroutines, perWriter = 3, 3, 30
	dir := filepath.Join(t.TempDir(), "state")
	s, err := Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}

	var wg sync.WaitGroup
	errs := make(chan error, procs+goroutines)
	for i := range procs {
		wg.Go(func() {
			cmd := exec.Command(os.Args[0], "-test.run=^TestHelperWriter$", "-test.count=1")
			cmd.Env = append(os.Environ(), helperEnv+"="+dir+","+strconv.Itoa(i)+","+strconv.Itoa(perWriter))
			if out, err := cmd.CombinedOutput(); err != nil {
				errs <- fmt.Errorf("writer process %d: %v\n%s", i, err, out)
			}
		})
	}
	for i := range goroutines {
		wg.Go(func() {
			if err := writePrefixes(dir, procs+i, perWriter); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	st, err := s.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	writers := procs + goroutines
	if len(st.IPCache) != writers*perWriter || st.Generation != uint64(writers*perWriter) {
		t.Errorf("%d prefixes at generation %d, want %d and %d", len(st.IPCache), st.Generation, writers*perWriter, writers*perWriter)
	}
	for w := range writers {
		for j := range perWriter {
			p := writerPrefix(w, j)
			if st.IPCache[p] != uint32(w*1000+j+1) {
				t.Errorf("prefix %s: identity %d, want %d", p, st.IPCache[p], w*1000+j+1)
			}
		}
	}
}

func writerPrefix(w, j int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(w), byte(j), 0}), 24)
}

// writePrefixes adds perWriter prefixes, one transaction each, from a
// store opened on its own (as a separate CLI process would).
func writePrefixes(dir string, w, perWriter int) error {
	s, err := Open(dir, &Options{LockTimeout: 30 * time.Second})
	if err != nil {
		return err
	}
	for j := range perWriter {
		if err := s.Update(func(tx *Tx) error { return tx.PutIPCache(writerPrefix(w, j), uint32(w*1000+j+1)) }); err != nil {
			return fmt.Errorf("writer %d: %w", w, err)
		}
	}
	return nil
}

// TestHelperWriter is the child process of TestConcurrentWriters.
func TestHelperWriter(t *testing.T) {
	arg := os.Getenv(helperEnv)
	if arg == "" {
		return // not a child: nothing to do
	}
	parts := strings.Split(arg, ",")
	w, _ := strconv.Atoi(parts[1])
	n, _ := strconv.Atoi(parts[2])
	if err := writePrefixes(parts[0], w, n); err != nil {
		t.Fatal(err)
	}
}

func umask(m int) int { return unix.Umask(m) }
