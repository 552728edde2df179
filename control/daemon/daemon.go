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
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/bpffs"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/migrate"
	"github.com/ctd-dev/ctd/datapath/pins"
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

	// PinPath holds the pinned maps and links (see package pins).
	PinPath string
	// StateDir holds the desired-state store.
	StateDir string

	// Map sizes. Zero keeps the size of the pinned map, or uses the
	// loader's default when nothing is pinned; a size that differs from
	// the pinned map's is a resize.
	CTMax, CTUnconfirmedMax, IPCacheMax, RingBufSize uint32

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

	// Defaults are the default verdicts by direction to record in the
	// store where it holds none (VerdictUnset: none given), before the
	// maps are restored: a new install can start closed.
	Defaults [2]store.Verdict
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
	Pins       pins.Dir
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
	Finished   *store.Intent  // a change a killed writer left unfinished, finished now
	Compacted  [2]int64       // store size before and after compaction; zero when not compacted
	Migration  migrate.Report // maps resized or upgraded to this build's layout
	Repinned   []string       // maps whose pins were missing, re-pinned from the attached programs
	Adopted    bool           // the store was empty and took over the maps' ipcache and policy
	HostsMoved int            // ipcache host entries moved from the tries into the host hashes
	// HostsWaiting says why host entries an older datapath left in the
	// tries stay there (a program that predates the hashes is attached).
	HostsWaiting string
	Sync         SyncStats
	Attached     []attach.Attachment
	Generation   uint64 // store generation the maps match
}

// Daemon is one run of the agent.
type Daemon struct {
	cfg     Config
	pins    pins.Dir
	log     *slog.Logger
	store   *store.Store
	lock    *os.File // LockFile, held until Close
	pinLock *os.File // the pin path directory, flocked by Start until Close
	dp      *loader.Datapath

	mu     sync.Mutex // guards gen and ifaces against concurrent syncs
	gen    uint64
	ifaces map[string]attach.Mode // attached interfaces and their modes
}

// New checks cfg, takes the state directory's lock (one daemon per state),
// and opens and checks the store: a corrupted store (an empty file
// included) is refused, as is a store that belongs to another pin path.
// Close releases the lock.
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
	s, err := store.Open(cfg.StateDir, &store.Options{PinPath: cfg.PinPath})
	if err != nil {
		return nil, err
	}
	lock, err := lockStateDir(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	if err := s.Check(); err != nil {
		lock.Close()
		return nil, err
	}
	return &Daemon{
		cfg:    cfg,
		pins:   pins.New(cfg.PinPath),
		log:    cfg.Logger,
		store:  s,
		lock:   lock,
		ifaces: make(map[string]attach.Mode),
	}, nil
}

// LockFile is the file in the state directory that a daemon holds locked
// (flock) while it runs; it contains the daemon's pid.
const LockFile = "daemon.lock"

// lockStateDir makes sure that one daemon at a time acts on a desired state:
// two would migrate and reconcile the same maps against each other.
func lockStateDir(dir string) (*os.File, error) {
	f, owner, err := lockPID(filepath.Join(dir, LockFile))
	if owner != "" {
		return nil, fmt.Errorf("another ctd daemon (pid %s) runs with the state directory %s: stop it first, one daemon acts on a state at a time", owner, dir)
	}
	return f, err
}

// Start loads the datapath, restores and reconciles the desired state,
// attaches the programs and records the interfaces, in that order. When it
// fails, whatever ran before keeps running: it never detaches.
func (d *Daemon) Start() (Ready, error) {
	var (
		r   Ready
		err error
	)
	t0 := time.Now()

	if err := bpffs.Prepare(d.cfg.PinPath); err != nil {
		return r, err
	}
	if d.pinLock, err = lockPinPath(d.cfg.PinPath); err != nil {
		return r, err
	}
	if r.Compacted, err = d.store.CompactIfBloated(); err != nil {
		return r, err
	}
	opts, err := d.options()
	if err != nil {
		return r, err
	}
	if r.Repinned, err = d.repinFromAttached(); err != nil {
		return r, err
	}
	existed := slices.ContainsFunc(loader.MapNames, d.pins.Pinned)
	dp, rep, err := d.load(opts)
	r.Migration = rep
	if err != nil {
		return r, err
	}
	d.dp = dp
	r.Restored = !existed
	r.Load = time.Since(t0)

	t1 := time.Now()
	if r.Finished, err = d.store.Finish(d.finish); err != nil {
		return r, err
	}
	gen, err := d.store.Generation()
	if err != nil {
		return r, err
	}
	if gen == 0 && existed {
		if r.Adopted, err = adopt(d.store, &dp.Maps); err != nil {
			return r, err
		}
	}
	if err := d.recordDefaults(); err != nil {
		return r, err
	}
	var st *store.State
	err = d.store.View(func(tx *store.Tx) error {
		var err error
		if st, err = tx.State(); err != nil {
			return err
		}
		r.Sync, err = Sync(st, &dp.Maps)
		return err
	})
	if err != nil {
		return r, fmt.Errorf("reconcile desired state into the maps: %w", err)
	}
	r.Reconcile = time.Since(t1)

	t2 := time.Now()
	if _, err := d.pins.AttachOwner(&d.dp.CtdPrograms); err != nil {
		return r, err
	}
	if r.Attached, err = d.attachAll(st.Interfaces, true); err != nil {
		return r, err
	}
	// Now that this build's programs run, the host entries an older
	// datapath left in the ipcache tries can move into the hashes; under
	// the store's lock, so that no ipcache change interleaves.
	err = d.store.View(func(*store.Tx) (err error) {
		r.HostsMoved, r.HostsWaiting, err = d.pins.MoveHosts(&dp.Maps)
		return err
	})
	if err != nil {
		return r, fmt.Errorf("move the ipcache's host entries into the host hashes: %w", err)
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

// finish makes the maps equal to the desired state: it finishes a change
// whose writer was killed (see store.Change).
func (d *Daemon) finish(st *store.State) error {
	_, err := Sync(st, &d.dp.Maps)
	return err
}

// recordDefaults records the configured default verdicts in the store for
// the directions where it holds none.
func (d *Daemon) recordDefaults() error {
	if d.cfg.Defaults == [2]store.Verdict{} {
		return nil
	}
	err := d.store.Update(func(tx *store.Tx) error {
		have := tx.Defaults()
		for dir, v := range d.cfg.Defaults {
			if v != store.VerdictUnset && have[dir] == store.VerdictUnset {
				if err := tx.SetDefault(store.Direction(dir), v); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("record the default verdicts in the state store: %w", err)
	}
	return nil
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
		at, err := d.pins.Attach(name, want[name], progs)
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
