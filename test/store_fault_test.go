package test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/control/store/storetest"
	"github.com/ctd-dev/ctd/test/nettest"
)

// oneLineFailure runs ctd (in h's network namespace when h is set), killed
// after 20 s, and requires a non-zero exit with one line on stderr that
// contains each of want.
func (e *crashEnv) oneLineFailure(h *nettest.Host, sub []string, want ...string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.bin, e.args(sub...)...)
	if h != nil {
		cmd = h.CommandContext(ctx, e.bin, e.args(sub...)...)
	}
	out, err := cmd.CombinedOutput()
	msg := strings.TrimSpace(string(out))
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		e.t.Fatalf("ctd %s hung: killed after 20 s\n%s", strings.Join(sub, " "), msg)
	case !errors.As(err, &ee) || ee.ExitCode() == 0:
		e.t.Fatalf("ctd %s: %v, want a non-zero exit\n%s", strings.Join(sub, " "), err, msg)
	case ee.ExitCode() != 1:
		e.t.Errorf("ctd %s exited %d (a crash?), want 1:\n%.2000s", strings.Join(sub, " "), ee.ExitCode(), msg)
	}
	if strings.Contains(msg, "\n") {
		e.t.Errorf("ctd %s said %d lines, want one:\n%.2000s", strings.Join(sub, " "), strings.Count(msg, "\n")+1, msg)
	}
	for _, w := range want {
		if !strings.Contains(msg, w) {
			e.t.Errorf("ctd %s said %q, want it to contain %q", strings.Join(sub, " "), msg, w)
		}
	}
}

// TestDamagedStore: one page of state.db overwritten. 'ctd ipcache add'
// fails at once with one line naming the file and the way out, changes no
// map, and leaves the store usable by the next process (no stuck lock);
// 'ctd daemon' refuses the file likewise instead of crashing; 'ctd state
// rebuild --from-pins' moves it aside and rebuilds the store from the maps.
func TestDamagedStore(t *testing.T) {
	e := newCrashEnv(t)
	set := makeSet(t, "set", 2000, 0, 1)
	e.must("ipcache", "load", set.file)
	e.must("policy", "default", "ingress", "deny")
	before := e.ipcache()
	db := filepath.Join(e.state, store.FileName)
	if err := storetest.DamageRootPage(db); err != nil {
		t.Fatal(err)
	}

	for range 2 { // the second one finds the lock free
		e.oneLineFailure(nil, []string{"ipcache", "add", "198.51.100.0/24", "id=7"}, db, "corrupted", "ctd state rebuild --from-pins")
	}
	if got := e.ipcache(); !sameSet(got, before) {
		t.Errorf("the failed add changed the ipcache: %d prefixes, was %d", len(got), len(before))
	}

	pair := nettest.NewPair(t)
	e.oneLineFailure(pair.A, []string{"daemon", "--iface", pair.A.Iface}, db, "corrupted", "ctd state rebuild --from-pins")

	out := e.must("state", "rebuild", "--from-pins")
	aside, _ := filepath.Glob(db + ".bad-*")
	if len(aside) != 1 {
		t.Fatalf("rebuild kept %v aside, want the damaged file:\n%s", aside, out)
	}
	e.must("state", "check")
	e.must("ipcache", "add", "198.51.100.0/24", "id=7")
	if got, _ := e.stored(); len(got) != len(before)+1 {
		t.Errorf("rebuilt store holds %d prefixes, want %d", len(got), len(before)+1)
	}
}

// TestEmptyStoreAfterReboot: a reboot (no pins) with a 0-byte state.db.
// The daemon must refuse to start, not come up with an empty ipcache and
// default allow; a new install (no file) starts, closed where asked.
func TestEmptyStoreAfterReboot(t *testing.T) {
	e := newCrashEnv(t)
	pair := nettest.NewPair(t)
	if err := os.MkdirAll(e.state, 0o700); err != nil {
		t.Fatal(err)
	}
	db := filepath.Join(e.state, store.FileName)
	if err := os.WriteFile(db, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	e.oneLineFailure(pair.A, []string{"daemon", "--iface", pair.A.Iface}, db, "0 bytes", "ctd state rebuild --from-pins")
	if _, err := os.Lstat(filepath.Join(e.pin, "policy_v1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused daemon created maps (%v)", err)
	}

	// A new install: no file. --default-ingress deny is recorded.
	os.Remove(db)
	stop := e.daemon(pair.A, "--iface", pair.A.Iface, "--default-ingress", "deny")
	defer stop()
	if out := e.must("policy", "list"); !strings.Contains(out, "default ingress deny") || !strings.Contains(out, "default egress allow") {
		t.Errorf("new install with --default-ingress deny: policy list says\n%s", out)
	}
}

// daemon starts 'ctd daemon' in h's namespace and waits for it to be ready;
// stop sends SIGTERM and waits.
func (e *crashEnv) daemon(h *nettest.Host, args ...string) (stop func()) {
	e.t.Helper()
	cmd := h.Command(e.bin, e.args(append([]string{"daemon"}, args...)...)...)
	var log syncBuffer
	cmd.Stderr = &log
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}
	e.t.Cleanup(stop)
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(log.String(), "msg=ready"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) || cmd.ProcessState != nil {
			stop()
			e.t.Fatalf("daemon %v not ready:\n%s", args, log.String())
		}
	}
	return stop
}

// TestSecondDaemonSamePinPath: a daemon on a pin path another daemon owns
// is refused, naming the owner's pid, even with another state directory;
// and a store refuses a pin path other than its own.
func TestSecondDaemonSamePinPath(t *testing.T) {
	e := newCrashEnv(t)
	pair := nettest.NewPair(t)
	cmd := pair.A.Command(e.bin, e.args("daemon", "--iface", pair.A.Iface)...)
	var log syncBuffer
	cmd.Stderr = &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(log.String(), "msg=ready"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("first daemon not ready:\n%s", log.String())
		}
	}

	second := *e
	second.state = filepath.Join(t.TempDir(), "other-state")
	second.oneLineFailure(pair.A, []string{"daemon", "--iface", pair.A.Iface}, fmt.Sprintf("pid %d", cmd.Process.Pid), e.pin)

	other := *e
	other.pin = nettest.PinPath(t)
	other.oneLineFailure(nil, []string{"ipcache", "add", "198.51.100.0/24", "id=7"}, "belongs to the datapath at "+e.pin)
}

// TestStoreCompaction: 500k prefixes, then 3. The file stays as big as the
// 500k made it until it is compacted, by 'ctd state compact' or at a
// daemon start.
func TestStoreCompaction(t *testing.T) {
	e := newCrashEnv(t)
	big := makeSet(t, "big", 500000, 0, 1)
	small := makeSet(t, "small", 3, 0, 1)
	size := func() int64 {
		t.Helper()
		fi, err := os.Stat(filepath.Join(e.state, store.FileName))
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	for _, compact := range []string{"state compact", "daemon start"} {
		e.must("ipcache", "load", big.file, "--replace")
		e.must("ipcache", "load", small.file, "--replace")
		bloated := size()
		if bloated < 8<<20 {
			t.Fatalf("after 500k prefixes, then 3, the store is only %d bytes: the test needs a bloated one", bloated)
		}
		if compact == "state compact" {
			e.must("state", "compact")
		} else {
			pair := nettest.NewPair(t)
			e.daemon(pair.A, "--iface", pair.A.Iface)()
		}
		if got := size(); got > 1<<20 {
			t.Errorf("%s: the store is %d bytes, was %d; want it compacted below 1 MiB", compact, got, bloated)
		}
		if got, _ := e.stored(); !sameSet(got, small.entries) {
			t.Errorf("%s: the store holds %d prefixes, want the 3", compact, len(got))
		}
	}
}
