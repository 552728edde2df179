package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/bpf/upgradetest"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/ipcachemap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/migrate"
	"github.com/ctd-dev/ctd/datapath/policymap"
	"github.com/ctd-dev/ctd/test/nettest"
)

// testEnv is a namespace pair whose A side the daemon runs on, a pin path
// and a state directory of its own.
type testEnv struct {
	pair     *nettest.Pair
	pinPath  string
	stateDir string
}

func newTestEnv(tb testing.TB) *testEnv {
	tb.Helper()
	return &testEnv{
		pair:     nettest.NewPair(tb),
		pinPath:  nettest.PinPath(tb),
		stateDir: filepath.Join(tb.TempDir(), "state"),
	}
}

func (e *testEnv) config() Config {
	return Config{
		Interfaces: []string{e.pair.A.Iface},
		Mode:       attach.ModeAuto,
		PinPath:    e.pinPath,
		StateDir:   e.stateDir,
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
}

// start creates a daemon with cfg and starts it in namespace A. The caller
// closes it.
func (e *testEnv) start(tb testing.TB, cfg Config) (*Daemon, Ready) {
	tb.Helper()
	d, err := New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	var r Ready
	if err := e.pair.A.Do(func() (err error) {
		r, err = d.Start()
		return err
	}); err != nil {
		d.Close()
		tb.Fatalf("Start: %v", err)
	}
	return d, r
}

func (e *testEnv) store(tb testing.TB) *store.Store {
	tb.Helper()
	s, err := store.Open(e.stateDir, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

func (e *testEnv) status(tb testing.TB) attach.Attachment {
	tb.Helper()
	var at attach.Attachment
	if err := e.pair.A.Do(func() (err error) {
		at, err = attach.Status(e.pair.A.Iface, filepath.Join(e.pinPath, "links"))
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	return at
}

var (
	p4a = netip.MustParsePrefix("10.0.0.0/8")
	p4b = netip.MustParsePrefix("198.51.100.2/32")
	p6a = netip.MustParsePrefix("fd00:c7d::/64")
	r1  = store.RuleKey{Dir: store.Ingress, Identity: 42, Proto: 6, Port: 443}
	r2  = store.RuleKey{Dir: store.Egress, Proto: 17}
)

func desired(tb testing.TB, s *store.Store) {
	tb.Helper()
	err := s.Update(func(tx *store.Tx) error {
		return errors.Join(
			tx.PutIPCache(p4a, 100),
			tx.PutIPCache(p4b, 42),
			tx.PutIPCache(p6a, 600),
			tx.PutRule(r1, store.Allow),
			tx.PutRule(r2, store.Deny),
			tx.SetDefault(store.Ingress, store.Deny),
		)
	})
	if err != nil {
		tb.Fatal(err)
	}
}

// mapState reads the maps' ipcache, rules and defaults as a store.State.
func mapState(tb testing.TB, maps *loader.Maps) *store.State {
	tb.Helper()
	st, count := readMapState(tb, maps)
	if int(count) != len(st.Policy) {
		tb.Errorf("config_v1 policy_rules = %d; want %d", count, len(st.Policy))
	}
	return st
}

// readMapState is mapState without the check of config_v1's rule count,
// which it returns: while a daemon runs, the count is above the number of
// rules for a moment whenever a rule is inserted or deleted.
func readMapState(tb testing.TB, maps *loader.Maps) (*store.State, uint32) {
	tb.Helper()
	st := &store.State{IPCache: map[netip.Prefix]uint32{}, Policy: map[store.RuleKey]store.Verdict{}}
	entries, err := ipcachemap.New(maps.IPCache4(), maps.IPCache6()).List()
	if err != nil {
		tb.Fatal(err)
	}
	for _, e := range entries {
		st.IPCache[e.Prefix] = e.Identity
	}
	pm := policymap.New(maps.Policy(), maps.Config())
	rules, err := pm.List()
	if err != nil {
		tb.Fatal(err)
	}
	for _, r := range rules {
		st.Policy[keyOf(r)] = store.Verdict(r.Verdict)
	}
	d, err := pm.Defaults()
	if err != nil {
		tb.Fatal(err)
	}
	st.Defaults = [2]store.Verdict{store.Verdict(d[0]), store.Verdict(d[1])}
	n, err := pm.RuleCount()
	if err != nil {
		tb.Fatal(err)
	}
	return st, n
}

func sameDesired(tb testing.TB, got, want *store.State) {
	tb.Helper()
	eff := func(v store.Verdict) store.Verdict {
		if v == store.VerdictUnset {
			return store.Allow
		}
		return v
	}
	if fmt.Sprint(got.IPCache) != fmt.Sprint(want.IPCache) {
		tb.Errorf("ipcache in the maps %v, want %v", got.IPCache, want.IPCache)
	}
	if fmt.Sprint(got.Policy) != fmt.Sprint(want.Policy) {
		tb.Errorf("policy in the maps %v, want %v", got.Policy, want.Policy)
	}
	for d := range 2 {
		if eff(got.Defaults[d]) != eff(want.Defaults[d]) {
			tb.Errorf("%s default in the maps %v, want %v", store.Direction(d), got.Defaults[d], want.Defaults[d])
		}
	}
}

// TestStartRestoresAfterReboot starts on an empty bpffs with a filled store:
// the maps must hold the desired state, the programs must be attached and
// the interface recorded.
func TestStartRestoresAfterReboot(t *testing.T) {
	e := newTestEnv(t)
	s := e.store(t)
	desired(t, s)

	d, r := e.start(t, e.config())
	defer d.Close()
	if !r.Restored || r.Adopted {
		t.Errorf("Ready: restored %v adopted %v, want restored and not adopted", r.Restored, r.Adopted)
	}
	want := SyncStats{IPCacheAdded: 3, RulesAdded: 2, DefaultsChanged: 1}
	if r.Sync != want {
		t.Errorf("Ready.Sync = %+v, want %+v", r.Sync, want)
	}
	st, err := s.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	sameDesired(t, mapState(t, &d.dp.Maps), st)
	if st.Interfaces[e.pair.A.Iface] != string(attach.ModeAuto) {
		t.Errorf("stored interfaces %v, want %s=auto", st.Interfaces, e.pair.A.Iface)
	}
	at := e.status(t)
	if at.Mode == "" || len(r.Attached) != 1 || r.Attached[0].IngressProgID != at.IngressProgID {
		t.Errorf("attachment %+v, Ready.Attached %+v: want ctd attached to %s", at, r.Attached, e.pair.A.Iface)
	}
	if r.Total <= 0 || r.Total < r.Load+r.Reconcile+r.Attach-time.Millisecond {
		t.Errorf("Ready timings inconsistent: %+v", r)
	}
}

// TestRestartKeepsState restarts the daemon over a live datapath: the
// conntrack entries survive, stale ipcache and policy entries go, missing
// ones come back, and the programs are replaced in place.
func TestRestartKeepsState(t *testing.T) {
	e := newTestEnv(t)
	s := e.store(t)
	desired(t, s)
	d, _ := e.start(t, e.config())
	before := e.status(t)

	// Conntrack entries and drift in the maps, as if written by hand.
	ct := d.dp.Conntrack()
	var keys []ctmap.Key
	for i := range 100 {
		k, _ := ctmap.KeyOf(6, netip.MustParseAddr("198.51.100.1"), uint16(10000+i), netip.MustParseAddr("198.51.100.2"), 80)
		if err := ct.Put(&k, &ctmap.Entry{PacketsOrig: uint64(i + 1), State: uint8(ctmap.StateEstablished)}); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	ipc := ipcachemap.New(d.dp.IPCache4(), d.dp.IPCache6())
	pm := policymap.New(d.dp.Policy(), d.dp.Config())
	if err := errors.Join(
		ipc.Put(netip.MustParsePrefix("203.0.113.0/24"), 7), // stale
		ipc.Delete(p6a),   // missing
		ipc.Put(p4a, 101), // changed
		pm.Put(policymap.Rule{Dir: bpf.Ingress, Identity: 9, Verdict: policymap.Allow}), // stale
		pm.SetDefault(bpf.Ingress, policymap.Allow),                                     // changed
	); err != nil {
		t.Fatal(err)
	}
	d.Close()

	d, r := e.start(t, e.config())
	defer d.Close()
	if r.Restored {
		t.Error("Ready.Restored on a restart over pinned maps")
	}
	want := SyncStats{IPCacheAdded: 1, IPCacheChanged: 1, IPCacheRemoved: 1, RulesRemoved: 1, DefaultsChanged: 1}
	if r.Sync != want {
		t.Errorf("Ready.Sync = %+v, want %+v", r.Sync, want)
	}
	st, err := s.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	sameDesired(t, mapState(t, &d.dp.Maps), st)

	ct = d.dp.Conntrack()
	for i, k := range keys {
		got, err := ct.Lookup(&k)
		if err != nil || got.PacketsOrig != uint64(i+1) {
			t.Fatalf("conntrack entry %d after restart: %+v, %v", i, got, err)
		}
	}
	after := e.status(t)
	if after.Mode != before.Mode || after.IngressProgID == before.IngressProgID || after.EgressProgID == before.EgressProgID {
		t.Errorf("attachment before %+v, after %+v: want the same mode with new programs", before, after)
	}
}

// TestSyncNeverMissesDesired runs Sync over a large diff while a reader
// checks the desired prefixes the whole time: none may ever be missing.
func TestSyncNeverMissesDesired(t *testing.T) {
	nettest.RequireRoot(t)
	pin := nettest.PinPath(t)
	maps, err := loader.OpenMaps(loader.Options{PinPath: pin, IPCacheMax: 1 << 16})
	if err != nil {
		t.Fatal(err)
	}
	defer maps.Close()
	ipc := ipcachemap.New(maps.IPCache4(), maps.IPCache6())

	const n = 20000
	st := &store.State{IPCache: map[netip.Prefix]uint32{}}
	var old []ipcachemap.Entry
	var watched []netip.Prefix
	for i := range n {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24)
		st.IPCache[p] = uint32(i + 1000)                                        // desired: new identity
		old = append(old, ipcachemap.Entry{Prefix: p, Identity: uint32(i + 1)}) // current: old identity
		stale := netip.PrefixFrom(netip.AddrFrom4([4]byte{11, byte(i >> 8), byte(i), 0}), 24)
		old = append(old, ipcachemap.Entry{Prefix: stale, Identity: 5})
		if i%97 == 0 {
			watched = append(watched, p)
		}
	}
	if _, err := ipc.BatchUpdate(old); err != nil {
		t.Fatal(err)
	}

	var misses, reads atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, p := range watched {
				if _, ok, err := ipc.Get(p); err != nil || !ok {
					misses.Add(1)
				}
				reads.Add(1)
			}
		}
	}()
	stats, err := Sync(st, maps)
	close(stop)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	if stats.IPCacheChanged != n || stats.IPCacheRemoved != n {
		t.Errorf("Sync stats %+v, want %d changed and %d removed", stats, n, n)
	}
	if misses.Load() != 0 {
		t.Errorf("%d of %d lookups of desired prefixes missed during Sync", misses.Load(), reads.Load())
	}
	if reads.Load() < int64(len(watched)) {
		t.Errorf("reader did only %d lookups: the check did not overlap Sync", reads.Load())
	}
	got := mapState(t, maps)
	if len(got.IPCache) != n || fmt.Sprint(got.IPCache) != fmt.Sprint(st.IPCache) {
		t.Errorf("ipcache after Sync has %d entries, want the %d desired", len(got.IPCache), n)
	}
}

// TestAdoptIntoEmptyStore starts with pinned maps that hold ipcache and
// policy but an empty store: the daemon takes them over instead of
// deleting them.
func TestAdoptIntoEmptyStore(t *testing.T) {
	e := newTestEnv(t)
	maps, err := loader.OpenMaps(loader.Options{PinPath: e.pinPath})
	if err != nil {
		t.Fatal(err)
	}
	ipc := ipcachemap.New(maps.IPCache4(), maps.IPCache6())
	pm := policymap.New(maps.Policy(), maps.Config())
	if err := errors.Join(
		ipc.Put(p4b, 42),
		pm.Put(policymap.Rule{Dir: bpf.Ingress, Identity: 42, Proto: 6, Port: 443, Verdict: policymap.Allow}),
		pm.SetDefault(bpf.Ingress, policymap.Deny),
	); err != nil {
		t.Fatal(err)
	}
	maps.Close()

	d, r := e.start(t, e.config())
	defer d.Close()
	if !r.Adopted || r.Sync.Changed() {
		t.Errorf("Ready: adopted %v, sync %+v; want adopted with no changes", r.Adopted, r.Sync)
	}
	st, err := e.store(t).Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	want := &store.State{
		IPCache:  map[netip.Prefix]uint32{p4b: 42},
		Policy:   map[store.RuleKey]store.Verdict{r1: store.Allow},
		Defaults: [2]store.Verdict{store.Deny, store.VerdictUnset},
	}
	sameDesired(t, st, want)
	sameDesired(t, mapState(t, &d.dp.Maps), want)
}

// TestRepinFromAttached removes the conntrack pin under a running datapath:
// the next start must find the live table through the attached program,
// not create an empty one.
func TestRepinFromAttached(t *testing.T) {
	e := newTestEnv(t)
	d, _ := e.start(t, e.config())
	k, _ := ctmap.KeyOf(17, netip.MustParseAddr("198.51.100.1"), 5353, netip.MustParseAddr("198.51.100.2"), 53)
	if err := d.dp.Conntrack().Put(&k, &ctmap.Entry{PacketsOrig: 77}); err != nil {
		t.Fatal(err)
	}
	d.Close()
	if err := os.Remove(filepath.Join(e.pinPath, loader.CT4Map)); err != nil {
		t.Fatal(err)
	}

	d, r := e.start(t, e.config())
	defer d.Close()
	if !slices.Equal(r.Repinned, []string{loader.CT4Map}) || r.Restored {
		t.Errorf("Ready: repinned %v restored %v; want [%s] and not restored", r.Repinned, r.Restored, loader.CT4Map)
	}
	got, err := d.dp.Conntrack().Lookup(&k)
	if err != nil || got.PacketsOrig != 77 {
		t.Errorf("conntrack entry after re-pinning: %+v, %v; want packets_orig 77", got, err)
	}
}

// TestRunReconcilesStoreChanges writes only the store while the daemon
// runs: the maps must follow within a few polls.
func TestRunReconcilesStoreChanges(t *testing.T) {
	e := newTestEnv(t)
	cfg := e.config()
	cfg.PollInterval = 20 * time.Millisecond
	d, _ := e.start(t, cfg)
	defer d.Close()

	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- d.Run(ctx) }()

	s := e.store(t)
	desired(t, s)
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := s.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		got, count := readMapState(t, &d.dp.Maps)
		if fmt.Sprint(got.IPCache) == fmt.Sprint(st.IPCache) && fmt.Sprint(got.Policy) == fmt.Sprint(st.Policy) &&
			got.Defaults == st.Defaults && int(count) == len(got.Policy) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("maps did not follow the store within 5s: maps %+v (rule count %d), store %+v", got, count, st)
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-errc; err != nil {
		t.Errorf("Run after cancel = %v, want nil", err)
	}
}

// TestRunComponents checks that components get the datapath, stop with
// the context, and that a failing one stops the daemon with its error.
func TestRunComponents(t *testing.T) {
	e := newTestEnv(t)
	boom := errors.New("boom")
	started := make(chan *Env, 1)
	cfg := e.config()
	cfg.Components = []Component{
		{Name: "waiter", Run: func(ctx context.Context, env *Env) error {
			started <- env
			<-ctx.Done()
			return nil
		}},
		{Name: "failer", Run: func(ctx context.Context, env *Env) error {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(50 * time.Millisecond):
				return boom
			}
		}},
	}
	d, _ := e.start(t, cfg)
	defer d.Close()
	err := d.Run(context.Background())
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "failer") {
		t.Errorf("Run = %v, want the failer's error", err)
	}
	env := <-started
	if env.Datapath == nil || env.Datapath.CT4() == nil || !slices.Equal(env.Interfaces, []string{e.pair.A.Iface}) {
		t.Errorf("component env %+v: want the datapath and [%s]", env, e.pair.A.Iface)
	}
}

func TestNewErrors(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	for _, c := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"mode", Config{Mode: "xdp", StateDir: dir}, `invalid --mode "xdp"`},
		{"twice", Config{Interfaces: []string{"a", "a"}, StateDir: dir}, `"a" given twice`},
		{"state dir", Config{}, "state directory is empty"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := New(c.cfg)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("New = %v, want error containing %q", err, c.want)
			}
		})
	}
}

// TestPinnedSizesKept checks that unset sizes keep the pinned maps' sizes
// rather than resetting them to the defaults.
func TestPinnedSizesKept(t *testing.T) {
	e := newTestEnv(t)
	cfg := e.config()
	cfg.CTMax, cfg.IPCacheMax = 4096, 2048
	d, _ := e.start(t, cfg)
	d.Close()

	cfg.CTMax, cfg.IPCacheMax = 0, 0
	d, _ = e.start(t, cfg)
	defer d.Close()
	for _, c := range []struct {
		m    *ebpf.Map
		want uint32
	}{{d.dp.CT4(), 4096}, {d.dp.IPCache4(), 2048}, {d.dp.IPCache6(), 2048}} {
		if c.m.MaxEntries() != c.want {
			t.Errorf("%v: max entries %d, want %d", c.m, c.m.MaxEntries(), c.want)
		}
	}
}

// TestResizeAndUpgrade restarts with another --ct-max, then with another
// build of the programs: conntrack entries survive both, the resize is
// reported as a migration, and the upgrade attaches different programs.
func TestResizeAndUpgrade(t *testing.T) {
	e := newTestEnv(t)
	cfg := e.config()
	cfg.CTMax = 4096
	d, _ := e.start(t, cfg)
	ct := d.dp.Conntrack()
	var keys []ctmap.Key
	for i := range 1000 {
		k, _ := ctmap.KeyOf(6, netip.MustParseAddr("198.51.100.1"), uint16(20000+i), netip.MustParseAddr("198.51.100.2"), 443)
		if err := ct.Put(&k, &ctmap.Entry{PacketsOrig: uint64(i + 1), State: uint8(ctmap.StateEstablished)}); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	d.Close()
	check := func(step string, d *Daemon) {
		t.Helper()
		ct := d.dp.Conntrack()
		for i, k := range keys {
			got, err := ct.Lookup(&k)
			if err != nil || got.PacketsOrig != uint64(i+1) {
				t.Fatalf("%s: conntrack entry %d: %+v, %v", step, i, got, err)
			}
		}
	}

	cfg.CTMax = 8192
	d, r := e.start(t, cfg)
	check("resize", d)
	// Both families' confirmed tables are resized; the flows are IPv4.
	if d.dp.CT4().MaxEntries() != 8192 || len(r.Migration.Maps) != 2 || r.Migration.Maps[0].Action != migrate.Resize ||
		r.Migration.Maps[0].Map != loader.CT4Map || r.Migration.Maps[0].Copied != len(keys) {
		t.Errorf("resize: max entries %d, migration %+v; want 8192 and a resize of %s with %d entries", d.dp.CT4().MaxEntries(), r.Migration, loader.CT4Map, len(keys))
	}
	d.Close()
	tags := progTags(t, e)

	cfg.CTMax = 0 // keep the pinned size
	cfg.Spec = upgradetest.LoadCtd
	d, r = e.start(t, cfg)
	defer d.Close()
	check("upgrade", d)
	if r.Migration.Migrated() || d.dp.CT4().MaxEntries() != 8192 {
		t.Errorf("upgrade to the same layouts migrated %+v (max entries %d)", r.Migration, d.dp.CT4().MaxEntries())
	}
	if got := progTags(t, e); got[0] == tags[0] || got[1] == tags[1] {
		t.Errorf("upgrade: program tags %v, before %v: want different programs", got, tags)
	}
}

func progTags(t *testing.T, e *testEnv) [2]string {
	t.Helper()
	at := e.status(t)
	var tags [2]string
	for i, id := range []ebpf.ProgramID{at.IngressProgID, at.EgressProgID} {
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			t.Fatal(err)
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			t.Fatal(err)
		}
		tags[i] = info.Tag
	}
	return tags
}

// TestOneDaemonPerState checks that a second daemon on the same state
// directory is refused, naming the first one, until the first one closes.
func TestOneDaemonPerState(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	cfg := Config{StateDir: dir, Logger: slog.New(slog.DiscardHandler)}
	d1, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	_, err = New(cfg)
	if want := fmt.Sprintf("another ctd daemon (pid %d) runs with the state directory %s", os.Getpid(), dir); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("second New = %v, want an error containing %q", err, want)
	}
	if err := d1.Close(); err != nil {
		t.Fatal(err)
	}
	d2, err := New(cfg)
	if err != nil {
		t.Fatalf("New after the first daemon closed: %v", err)
	}
	d2.Close()
}

// TestStartMatchesOwnWrite checks that recording the interfaces at start
// does not make the reconcile loop see a change it made itself.
func TestStartMatchesOwnWrite(t *testing.T) {
	e := newTestEnv(t)
	d, r := e.start(t, e.config())
	defer d.Close()
	g, err := e.store(t).Generation()
	if err != nil {
		t.Fatal(err)
	}
	if r.Generation != g || g != 1 {
		t.Errorf("Ready.Generation %d, store generation %d: want both 1 (the interface record)", r.Generation, g)
	}
}
