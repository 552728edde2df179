package test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

// crashEnv is a pin path and a state directory that ctd commands run
// against, from the test's own network namespace.
type crashEnv struct {
	t          *testing.T
	bin        string
	pin, state string
}

func newCrashEnv(t *testing.T) *crashEnv {
	return &crashEnv{t: t, bin: nettest.BuildCtd(t), pin: nettest.PinPath(t), state: filepath.Join(t.TempDir(), "state")}
}

func (e *crashEnv) args(sub ...string) []string {
	return append([]string{"--pin-path", e.pin, "--state-dir", e.state}, sub...)
}

// run runs ctd, killed after 60 s, and returns its combined output.
func (e *crashEnv) run(sub ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, e.bin, e.args(sub...)...).CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("still running after 60 s (killed): %w", err)
	}
	return string(out), err
}

func (e *crashEnv) must(sub ...string) string {
	e.t.Helper()
	out, err := e.run(sub...)
	if err != nil {
		e.t.Fatalf("ctd %s: %v\n%s", strings.Join(sub, " "), err, out)
	}
	return out
}

// ipcache reads the pinned tries.
func (e *crashEnv) ipcache() map[netip.Prefix]uint32 {
	e.t.Helper()
	maps, err := loader.OpenPinned(e.pin)
	if err != nil {
		e.t.Fatal(err)
	}
	defer maps.Close()
	entries, err := maps.IPCache().List()
	if err != nil {
		e.t.Fatal(err)
	}
	out := make(map[netip.Prefix]uint32, len(entries))
	for _, en := range entries {
		out[en.Prefix] = en.Identity
	}
	return out
}

// stored reads the store's ipcache and intent mark, as any process can.
func (e *crashEnv) stored() (map[netip.Prefix]uint32, bool) {
	e.t.Helper()
	s, err := store.Open(e.state, &store.Options{LockTimeout: 30 * time.Second})
	if err != nil {
		e.t.Fatal(err)
	}
	var (
		ipc     map[netip.Prefix]uint32
		pending bool
	)
	err = s.View(func(tx *store.Tx) error {
		st, err := tx.State()
		ipc = st.IPCache
		pending = intentPending(tx)
		return err
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return ipc, pending
}

// pending reports whether the store holds an intent mark.
func (e *crashEnv) pending() bool {
	e.t.Helper()
	s, err := store.Open(e.state, &store.Options{LockTimeout: 30 * time.Second})
	if err != nil {
		e.t.Fatal(err)
	}
	var p bool
	if err := s.View(func(tx *store.Tx) error { p = intentPending(tx); return nil }); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// intentPending reports whether the store holds an intent mark. An older
// store has none: Pending fails on it, which counts as no mark.
func intentPending(tx *store.Tx) bool {
	in, err := tx.Intent()
	return err == nil && in != nil
}

// ipcacheSet is a load file and the table it makes.
type ipcacheSet struct {
	file    string
	entries map[netip.Prefix]uint32
}

// makeSet writes n prefixes, half IPv4 and half IPv6, the first shared
// ones with identity id0+i.
func makeSet(t *testing.T, name string, n, shift int, id0 uint32) ipcacheSet {
	s := ipcacheSet{file: filepath.Join(t.TempDir(), name), entries: make(map[netip.Prefix]uint32, n)}
	var b strings.Builder
	for i := range n {
		j := i + shift
		var p netip.Prefix
		if i%2 == 0 {
			p = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(j >> 16), byte(j >> 8), byte(j)}), 32)
		} else {
			p = netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, 0xc7, 0xd, 10: byte(j >> 16), 11: byte(j >> 8), 12: byte(j)}), 128)
		}
		s.entries[p] = id0 + uint32(i)
		fmt.Fprintf(&b, "%v id=%d\n", p, id0+uint32(i))
	}
	if err := os.WriteFile(s.file, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

func sameSet(a, b map[netip.Prefix]uint32) bool {
	if len(a) != len(b) {
		return false
	}
	for p, id := range a {
		if got, ok := b[p]; !ok || got != id {
			return false
		}
	}
	return true
}

// TestKillLoadReplace SIGKILLs 'ctd ipcache load --replace' (100k -> 150k
// prefixes) at 20 random moments, without and with a daemon. Afterwards the
// ipcache must be wholly the old set or wholly the new one, and equal to
// the store: at the next ctd command, or within 2 s with the daemon.
func TestKillLoadReplace(t *testing.T) {
	const kills = 20
	for _, withDaemon := range []bool{false, true} {
		name := "without daemon"
		if withDaemon {
			name = "with daemon"
		}
		t.Run(name, func(t *testing.T) {
			e := newCrashEnv(t)
			seed := uint64(time.Now().UnixNano())
			rng := rand.New(rand.NewPCG(seed, 0))
			t.Logf("seed %d", seed)
			// 75k shared prefixes, whose identities change.
			oldSet := makeSet(t, "old", 100000, 0, 1)
			newSet := makeSet(t, "new", 150000, 25000, 1000000)

			e.must("ipcache", "load", oldSet.file, "--replace")
			t0 := time.Now()
			e.must("ipcache", "load", newSet.file, "--replace")
			full := time.Since(t0)
			e.must("ipcache", "load", oldSet.file, "--replace")
			t.Logf("an unkilled load --replace takes about %v", full.Round(time.Millisecond))

			var daemonLog *syncBuffer
			if withDaemon {
				pair := nettest.NewPair(t)
				cmd := pair.A.Command(e.bin, e.args("daemon", "--iface", pair.A.Iface)...)
				daemonLog = &syncBuffer{}
				cmd.Stderr = daemonLog
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					cmd.Process.Signal(syscall.SIGTERM)
					cmd.Wait()
				})
				for deadline := time.Now().Add(30 * time.Second); !strings.Contains(daemonLog.String(), "msg=ready"); time.Sleep(20 * time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatalf("daemon not ready:\n%s", daemonLog.String())
					}
				}
			}

			outcomes := map[string]int{}
			var slowest time.Duration
			for i := range kills {
				// Kill at a random moment from a quarter into the load
				// (process start and parsing change nothing) to a
				// quarter past its usual end.
				after := full/4 + time.Duration(rng.Int64N(int64(full)))
				cmd := exec.Command(e.bin, e.args("ipcache", "load", newSet.file, "--replace")...)
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				time.Sleep(after)
				cmd.Process.Signal(syscall.SIGKILL)
				killedAt := time.Now()
				err := cmd.Wait()
				killed := false
				var ee *exec.ExitError
				if errors.As(err, &ee) {
					if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
						killed = true
					}
				}

				// Recovery: the daemon within 2 s, or the next command.
				var (
					got, want map[netip.Prefix]uint32
					pending   bool
					took      time.Duration
				)
				if withDaemon {
					// Wait for the mark to go, then compare.
					for pending = e.pending(); e.pending(); time.Sleep(20 * time.Millisecond) {
						if time.Since(killedAt) > 5*time.Second {
							break
						}
					}
					took = time.Since(killedAt)
					if took > 2*time.Second {
						t.Errorf("kill %d: the daemon took %v to finish the change, want at most 2s", i+1, took)
					}
				} else {
					_, pending = e.stored()
					t1 := time.Now()
					e.must("ipcache", "get", "198.51.100.1") // any command
					took = time.Since(t1)
				}
				got = e.ipcache()
				want, _ = e.stored()
				slowest = max(slowest, took)

				var outcome string
				switch {
				case !sameSet(got, want):
					outcome = "FAIL: maps differ from the store"
				case sameSet(got, oldSet.entries):
					outcome = "old set"
				case sameSet(got, newSet.entries):
					outcome = "new set"
				default:
					outcome = "FAIL: neither the old nor the new set"
				}
				switch {
				case !killed:
					outcome += " (the load had finished)"
				case pending:
					outcome += " (killed while applying: finished)"
				default:
					outcome += " (killed before recording)"
				}
				outcomes[outcome]++
				t.Logf("kill %2d after %v: %s, %d prefixes, recovered in %v", i+1, after.Round(time.Millisecond), outcome, len(got), took.Round(time.Millisecond))
				if strings.HasPrefix(outcome, "FAIL") {
					t.Errorf("kill %d after %v: %s (map %d prefixes, store %d)", i+1, after, outcome, len(got), len(want))
					e.must("ipcache", "load", oldSet.file, "--replace") // go on from a known state
					continue
				}
				if !sameSet(got, oldSet.entries) {
					e.must("ipcache", "load", oldSet.file, "--replace")
				}
			}
			t.Logf("%s: %d kills, slowest recovery %v", name, kills, slowest.Round(time.Millisecond))
			for o, n := range outcomes {
				t.Logf("  %2d  %s", n, o)
			}
			if withDaemon && t.Failed() {
				t.Logf("daemon log:\n%s", daemonLog.String())
			}
		})
	}
}
