// Package daemon is ctd's long-running agent: it adopts the pinned datapath,
// restores and reconciles the desired state, replaces the programs
// atomically and keeps the maps in line with the store.
//
// Start brings the datapath to the desired state in this order, so that no
// interface is ever without a program and no program without its state:
//
//  1. open the pinned maps (re-pinning them from the attached programs if
//     their pins were removed) and load this binary's programs against them;
//  2. reconcile the store into the maps: upsert first, delete after, holding
//     the store's shared lock so that no CLI write interleaves; when the maps
//     were just created (bpffs empty after a reboot) this restores them;
//  3. attach the programs to every interface, replacing what ran there
//     atomically (TCX link update, tc filter replace);
//  4. record the interfaces in the store and log "ready".
//
// Run then keeps the maps reconciled with the store (polling its
// generation) and runs the components (GC, metrics) until its context ends.
// Stopping never detaches anything: the programs stay attached and the maps
// pinned, and the next Start picks them up, after a SIGKILL as well.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/bpffs"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/migrate"
)

// Defaults of Config.
const (
	DefaultPollInterval   = time.Second
	DefaultResyncInterval = 5 * time.Minute
)

// Config is what the daemon is asked to run.
type Config struct {
	// Interfaces to attach to, with Mode. Interfaces recorded in the store
	// are attached as well, in the mode recorded for them.
	Interfaces []string
	Mode       attach.Mode

	// PinPath holds the pinned maps, and the pinned TCX links below
	// migrate.LinkDir(PinPath).
	PinPath string
	// StateDir holds the desired-state store.
	StateDir string

	// Map sizes. Zero keeps the size of the pinned map, or uses the
	// loader's default when nothing is pinned; a size that differs from
	// the pinned map's is a resize.
	CTMax, IPCacheMax, RingBufSize uint32

	// PollInterval is how often the store's generation is checked;
	// ResyncInterval how often the maps are reconciled even without a
	// change to the store (repairing writes that bypassed it).
	PollInterval, ResyncInterval time.Duration

	// Logger receives the daemon's log; nil means slog.Default().
	Logger *slog.Logger

	// Components run beside the reconcile loop once the daemon is ready.
	Components []Component

	// Spec returns the datapath to load; nil means the one built into
	// package bpf. Test builds use it to run another build of the programs.
	Spec func() (*ebpf.CollectionSpec, error)
}

// Component is a loop the daemon runs once it is ready, such as conntrack
// GC or the metrics server. Run must return when ctx is done; returning an
// error before that stops the daemon with that error.
type Component struct {
	Name string
	Run  func(ctx context.Context, env *Env) error
}

// Env is what components get: the loaded datapath and where it lives.
type Env struct {
	Datapath   *loader.Datapath
	PinPath    string
	LinkDir    string
	Interfaces []string // the interfaces the daemon attached to
	Store      *store.Store
	Logger     *slog.Logger
	// Advance tells the daemon that the component itself changed the maps
	// exactly as the store transaction that took the store from
	// generation from to to: the reconcile loop need not redo it.
	Advance func(from, to uint64)
}

// Ready reports what Start did and how long each step took.
type Ready struct {
	Load      time.Duration // open or migrate the maps, load the programs
	Reconcile time.Duration // store -> maps
	Attach    time.Duration
	Total     time.Duration

	Restored   bool           // the maps were created empty and filled from the store
	Migration  migrate.Report // maps resized or upgraded to this build's layout
	Repinned   []string       // maps whose pins were missing, re-pinned from the attached programs
	Adopted    bool           // the store was empty and took over the maps' ipcache and policy
	Sync       SyncStats
	Attached   []attach.Attachment
	Generation uint64 // store generation the maps match
}

// Daemon is one run of the agent.
type Daemon struct {
	cfg     Config
	linkDir string
	log     *slog.Logger
	store   *store.Store
	lock    *os.File // LockFile, held until Close
	dp      *loader.Datapath

	mu     sync.Mutex // guards gen and ifaces against concurrent syncs
	gen    uint64
	ifaces map[string]attach.Mode // attached interfaces and their modes
}

// New checks cfg, opens the store and takes the state directory's lock
// (one daemon per state); Close releases it.
func New(cfg Config) (*Daemon, error) {
	if cfg.Mode == "" {
		cfg.Mode = attach.ModeAuto
	}
	if _, err := attach.ParseMode(string(cfg.Mode)); err != nil {
		return nil, err
	}
	if cfg.PinPath == "" {
		cfg.PinPath = loader.DefaultPinPath
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.ResyncInterval <= 0 {
		cfg.ResyncInterval = DefaultResyncInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	seen := make(map[string]bool)
	for _, iface := range cfg.Interfaces {
		if seen[iface] {
			return nil, fmt.Errorf("interface %q given twice", iface)
		}
		seen[iface] = true
	}
	s, err := store.Open(cfg.StateDir, nil)
	if err != nil {
		return nil, err
	}
	lock, err := lockStateDir(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	return &Daemon{
		cfg:     cfg,
		linkDir: migrate.LinkDir(cfg.PinPath),
		log:     cfg.Logger,
		store:   s,
		lock:    lock,
		ifaces:  make(map[string]attach.Mode),
	}, nil
}

// LockFile is the file in the state directory that a daemon holds locked
// (flock) while it runs; it contains the daemon's pid.
const LockFile = "daemon.lock"

// lockStateDir makes sure that one daemon at a time acts on a desired state:
// two would migrate and reconcile the same maps against each other. The
// kernel drops the lock when the process dies, so a SIGKILL leaves no stale
// lock behind.
func lockStateDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, LockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("daemon lock %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			pid, _ := os.ReadFile(path)
			return nil, fmt.Errorf("another ctd daemon (pid %s) runs with the state directory %s: stop it first, one daemon acts on a state at a time", strings.TrimSpace(string(pid)), dir)
		}
		return nil, fmt.Errorf("daemon lock %s: %w", path, err)
	}
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}

// Start loads the datapath, restores and reconciles the desired state,
// attaches the programs and records the interfaces, in that order. When it
// fails, whatever ran before keeps running: it never detaches.
func (d *Daemon) Start() (Ready, error) {
	var r Ready
	t0 := time.Now()

	if err := bpffs.Ensure(d.cfg.PinPath); err != nil {
		return r, err
	}
	opts, err := d.options()
	if err != nil {
		return r, err
	}
	if r.Repinned, err = d.repinFromAttached(); err != nil {
		return r, err
	}
	existed := slices.ContainsFunc(loader.MapNames, func(n string) bool { return pinned(d.cfg.PinPath, n) })
	dp, rep, err := d.load(opts)
	r.Migration = rep
	if err != nil {
		return r, err
	}
	d.dp = dp
	r.Restored = !existed
	r.Load = time.Since(t0)

	t1 := time.Now()
	gen, err := d.store.Generation()
	if err != nil {
		return r, err
	}
	if gen == 0 && existed {
		if r.Adopted, err = adopt(d.store, &dp.CtdMaps); err != nil {
			return r, err
		}
	}
	var st *store.State
	err = d.store.View(func(tx *store.Tx) error {
		var err error
		if st, err = tx.State(); err != nil {
			return err
		}
		r.Sync, err = Sync(st, &dp.CtdMaps)
		return err
	})
	if err != nil {
		return r, fmt.Errorf("reconcile desired state into the maps: %w", err)
	}
	r.Reconcile = time.Since(t1)

	t2 := time.Now()
	if r.Attached, err = d.attachAll(st.Interfaces, true); err != nil {
		return r, err
	}
	gen, err = d.record(st.Generation)
	if err != nil {
		return r, err
	}
	r.Attach = time.Since(t2)

	d.mu.Lock()
	d.gen = gen
	d.mu.Unlock()
	r.Generation = gen
	r.Total = time.Since(t0)
	return r, nil
}

// options resolves the map sizes: what was asked, else what is pinned,
// else the defaults.
func (d *Daemon) options() (loader.Options, error) {
	o := loader.Options{
		PinPath:     d.cfg.PinPath,
		CTMax:       d.cfg.CTMax,
		IPCacheMax:  d.cfg.IPCacheMax,
		RingBufSize: d.cfg.RingBufSize,
	}
	for _, f := range []struct {
		size *uint32
		name string
	}{
		{&o.CTMax, bpf.CtdMapCtV1},
		{&o.IPCacheMax, bpf.CtdMapIpcache4V1},
		{&o.RingBufSize, bpf.CtdMapEventsV1},
	} {
		if *f.size != 0 {
			continue
		}
		n, err := pinnedMaxEntries(filepath.Join(d.cfg.PinPath, f.name))
		if err != nil {
			return o, err
		}
		*f.size = n
	}
	o = o.WithDefaults()
	return o, o.Validate()
}

func pinnedMaxEntries(pin string) (uint32, error) {
	m, err := ebpf.LoadPinnedMap(pin, &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("open pinned map %s: %w", pin, err)
	}
	defer m.Close()
	return m.MaxEntries(), nil
}

func pinned(pinPath, name string) bool {
	_, err := os.Lstat(filepath.Join(pinPath, name))
	return err == nil
}

// load opens the pinned maps, migrates those whose layout or size differs
// from what this build wants (switching the programs on every attached
// interface to the new maps, see package migrate), and loads this build's
// programs against them.
func (d *Daemon) load(o loader.Options) (*loader.Datapath, migrate.Report, error) {
	specFn := d.cfg.Spec
	if specFn == nil {
		specFn = bpf.LoadCtd
	}
	spec, err := specFn()
	if err != nil {
		return nil, migrate.Report{}, fmt.Errorf("load datapath spec: %w", err)
	}
	coll, rep, err := migrate.LoadSpec(o, spec, migrate.Interfaces{LinkDir: d.linkDir})
	if err != nil {
		return nil, rep, fmt.Errorf("load datapath: %w", err)
	}
	defer coll.Close()
	dp := &loader.Datapath{}
	if err := coll.Assign(&dp.CtdMaps); err != nil {
		return nil, rep, fmt.Errorf("load datapath: assign maps: %w", err)
	}
	if err := coll.Assign(&dp.CtdPrograms); err != nil {
		dp.CtdMaps.Close()
		return nil, rep, fmt.Errorf("load datapath: assign programs: %w", err)
	}
	return dp, rep, nil
}

// repinFromAttached re-pins maps whose pins are missing while ctd's programs
// still run on one of the daemon's interfaces (e.g. a pin removed by hand, or
// tc filters that outlived the pin directory), so that Start adopts the live
// state instead of creating empty maps under running traffic.
func (d *Daemon) repinFromAttached() ([]string, error) {
	var missing []string
	for _, name := range loader.MapNames {
		if !pinned(d.cfg.PinPath, name) {
			missing = append(missing, name)
		}
	}
	if len(missing) == 0 {
		return nil, nil
	}
	var repinned []string
	for _, iface := range d.cfg.Interfaces {
		at, err := attach.Status(iface, d.linkDir)
		if errors.Is(err, attach.ErrInterfaceNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, id := range []ebpf.ProgramID{at.IngressProgID, at.EgressProgID} {
			if id == 0 {
				continue
			}
			names, err := repinProgramMaps(id, d.cfg.PinPath, missing)
			if err != nil {
				return nil, fmt.Errorf("adopt the maps of the program attached to %s: %w", iface, err)
			}
			repinned = append(repinned, names...)
			missing = slices.DeleteFunc(missing, func(n string) bool { return slices.Contains(names, n) })
		}
	}
	for _, n := range repinned {
		d.log.Warn("map pin was missing; re-pinned the map the attached program uses", "map", n, "pin", filepath.Join(d.cfg.PinPath, n))
	}
	return repinned, nil
}

// repinProgramMaps pins those maps of program id whose names are in want.
func repinProgramMaps(id ebpf.ProgramID, pinPath string, want []string) ([]string, error) {
	ids, err := attach.ProgramMaps(id)
	if err != nil {
		return nil, err
	}
	var done []string
	for _, mid := range ids {
		m, err := ebpf.NewMapFromID(mid)
		if err != nil {
			continue // freed meanwhile
		}
		mi, err := m.Info()
		if err == nil && slices.Contains(want, mi.Name) && !slices.Contains(done, mi.Name) {
			if err := m.Pin(filepath.Join(pinPath, mi.Name)); err != nil {
				m.Close()
				return done, fmt.Errorf("pin map %s: %w", mi.Name, err)
			}
			done = append(done, mi.Name)
		}
		m.Close()
	}
	return done, nil
}

// attachAll attaches the programs to the configured interfaces and to those
// recorded in the store. A configured interface that fails is an error; a
// recorded one that is missing from this host is logged and skipped.
func (d *Daemon) attachAll(stored map[string]string, strict bool) ([]attach.Attachment, error) {
	want := make(map[string]attach.Mode)
	for name, mode := range stored {
		m, err := attach.ParseMode(mode)
		if err != nil {
			d.log.Warn("stored interface has an invalid mode; using auto", "iface", name, "mode", mode)
			m = attach.ModeAuto
		}
		want[name] = m
	}
	for _, name := range d.cfg.Interfaces {
		want[name] = d.cfg.Mode
	}
	progs := attach.Programs{Ingress: d.dp.CtdIngress, Egress: d.dp.CtdEgress}
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range want {
			if !yield(n) {
				return
			}
		}
	})
	var out []attach.Attachment
	for _, name := range names {
		at, err := attach.Attach(name, want[name], progs, d.linkDir)
		if err != nil {
			if strict && slices.Contains(d.cfg.Interfaces, name) {
				return out, err
			}
			d.log.Warn("cannot attach to a stored interface; skipping it", "iface", name, "err", err)
			continue
		}
		d.mu.Lock()
		d.ifaces[name] = want[name]
		d.mu.Unlock()
		out = append(out, at)
	}
	return out, nil
}

// record writes the configured interfaces to the store. synced is the
// generation the maps were reconciled to; record returns the generation
// they match afterwards: past its own write when no other writer came in
// between, else synced, so that the reconcile loop catches up.
func (d *Daemon) record(synced uint64) (uint64, error) {
	if len(d.cfg.Interfaces) == 0 {
		return synced, nil
	}
	var before, expect uint64
	err := d.store.Update(func(tx *store.Tx) error {
		before = tx.Generation()
		expect = before
		have := tx.Interfaces()
		for _, name := range d.cfg.Interfaces {
			if m, ok := have[name]; ok && m == string(d.cfg.Mode) {
				continue
			}
			expect = before + 1
			if err := tx.PutInterface(name, string(d.cfg.Mode)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return synced, fmt.Errorf("record the interfaces in the state store: %w", err)
	}
	if before != synced {
		return synced, nil
	}
	after, err := d.store.Generation()
	if err != nil || after != expect {
		return synced, nil
	}
	return after, nil
}

// Run runs the components and the reconcile loop until ctx is done, then
// returns nil; it returns early with the error of a failing component or a
// broken store. Start must have succeeded.
func (d *Daemon) Run(ctx context.Context) error {
	if d.dp == nil {
		return errors.New("daemon: Run before a successful Start")
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	env := &Env{
		Datapath:   d.dp,
		PinPath:    d.cfg.PinPath,
		LinkDir:    d.linkDir,
		Interfaces: d.attached(),
		Store:      d.store,
		Logger:     d.log,
		Advance:    d.advance,
	}
	var wg sync.WaitGroup
	for _, c := range d.cfg.Components {
		wg.Go(func() {
			err := c.Run(ctx, env)
			if err != nil && ctx.Err() == nil {
				cancel(fmt.Errorf("%s: %w", c.Name, err))
			}
		})
	}
	wg.Go(func() {
		if err := d.reconcileLoop(ctx); err != nil {
			cancel(err)
		}
	})
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// advance moves the generation the maps match from from to to, unless the
// daemon's own view moved meanwhile (then the reconcile loop catches up).
func (d *Daemon) advance(from, to uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gen == from {
		d.gen = to
	}
}

func (d *Daemon) attached() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Sorted(func(yield func(string) bool) {
		for n := range d.ifaces {
			if !yield(n) {
				return
			}
		}
	})
}

// reconcileLoop polls the store's generation and reconciles the maps when it
// changed, and every ResyncInterval regardless. A failed poll or reconcile
// is logged and retried at the next tick; the datapath keeps running.
func (d *Daemon) reconcileLoop(ctx context.Context) error {
	poll := time.NewTicker(d.cfg.PollInterval)
	defer poll.Stop()
	lastSync := time.Now()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-poll.C:
		}
		gen, err := d.store.Generation()
		if err != nil {
			d.log.Warn("read store generation", "err", err)
			continue
		}
		d.mu.Lock()
		changed := gen != d.gen
		d.mu.Unlock()
		if !changed && time.Since(lastSync) < d.cfg.ResyncInterval {
			continue
		}
		lastSync = time.Now()
		if _, err := d.Reconcile(); err != nil {
			d.log.Warn("reconcile", "err", err)
		}
	}
}

// Reconcile brings the maps and attachments in line with the store once,
// as the reconcile loop does on a change.
func (d *Daemon) Reconcile() (SyncStats, error) {
	t0 := time.Now()
	var (
		st    *store.State
		stats SyncStats
	)
	err := d.store.View(func(tx *store.Tx) error {
		var err error
		if st, err = tx.State(); err != nil {
			return err
		}
		stats, err = Sync(st, &d.dp.CtdMaps)
		return err
	})
	if err != nil {
		return stats, err
	}
	d.mu.Lock()
	var newIfaces map[string]string
	for name, mode := range st.Interfaces {
		if m, ok := d.ifaces[name]; !ok || string(m) != mode {
			if newIfaces == nil {
				newIfaces = make(map[string]string)
			}
			newIfaces[name] = mode
		}
	}
	d.gen = st.Generation
	d.mu.Unlock()
	if newIfaces != nil {
		if _, err := d.attachAll(newIfaces, false); err != nil {
			return stats, err
		}
	}
	if stats.Changed() || newIfaces != nil {
		d.log.Info("reconciled", "generation", st.Generation, "took", time.Since(t0), "changes", stats, "new_ifaces", len(newIfaces))
	}
	return stats, nil
}

// Close releases the datapath's file descriptors. Programs stay attached
// and maps pinned.
func (d *Daemon) Close() error {
	var errs []error
	if d.dp != nil {
		errs = append(errs, d.dp.Close())
		d.dp = nil
	}
	if d.lock != nil {
		errs = append(errs, d.lock.Close()) // releases the flock
		d.lock = nil
	}
	return errors.Join(errs...)
}

// LogReady logs the ready line for r.
func LogReady(log *slog.Logger, r Ready) {
	ifaces := make([]string, 0, len(r.Attached))
	for _, a := range r.Attached {
		ifaces = append(ifaces, a.Iface+"/"+string(a.Mode))
	}
	log.Info("ready",
		"took", r.Total.Round(time.Microsecond),
		"load", r.Load.Round(time.Microsecond),
		"reconcile", r.Reconcile.Round(time.Microsecond),
		"attach", r.Attach.Round(time.Microsecond),
		"restored", r.Restored,
		"adopted", r.Adopted,
		"repinned", r.Repinned,
		"migrated", migrated(r.Migration),
		"generation", r.Generation,
		"changes", r.Sync,
		"ifaces", ifaces)
}

// migrated summarises a migration report for the log.
func migrated(rep migrate.Report) []string {
	var out []string
	for _, m := range rep.Maps {
		out = append(out, fmt.Sprintf("%s %s->%s %d->%d entries max, %d copied, %d caught up",
			m.Action, m.From, m.Map, m.OldMaxEntries, m.MaxEntries, m.Copied, m.CaughtUp))
	}
	return out
}
