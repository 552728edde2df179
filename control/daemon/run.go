package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/migrate"
)

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
		Pins:       d.pins,
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
// changed, and every ResyncInterval regardless; four times per poll it
// finishes a change whose writer was killed, if there is one. A failed poll
// or reconcile is logged and retried at the next tick; the datapath keeps
// running. A store operation stuck past its deadline stops the daemon: it
// may hold the store's lock, which no other ctd process could then take.
func (d *Daemon) reconcileLoop(ctx context.Context) error {
	// A killed writer's mark is looked for intentPolls times per poll: a
	// change it left half-applied is finished well within PollInterval.
	const intentPolls = 4
	tick := time.NewTicker(max(d.cfg.PollInterval/intentPolls, time.Millisecond))
	defer tick.Stop()
	lastSync, lastPoll := time.Now(), time.Now()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		in, err := d.store.Finish(d.finish)
		if errors.Is(err, store.ErrStuck) {
			return err
		}
		if err != nil {
			d.log.Warn("finish an unfinished change", "err", err)
			continue
		}
		if in != nil {
			d.log.Warn("finished a change its writer left unfinished", "change", in.What, "pid", in.PID, "started", in.Started)
		}
		if time.Since(lastPoll) < d.cfg.PollInterval*(intentPolls-1)/intentPolls {
			continue
		}
		lastPoll = time.Now()
		gen, err := d.store.Generation()
		if errors.Is(err, store.ErrStuck) {
			return err
		}
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
		if _, err := d.Reconcile(); errors.Is(err, store.ErrStuck) {
			return err
		} else if err != nil {
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
		stats, err = Sync(st, &d.dp.Maps)
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
	if d.pinLock != nil {
		errs = append(errs, unlockPinPath(d.pinLock))
		d.pinLock = nil
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
		"finished", finished(r.Finished),
		"compacted", r.Compacted[0] != 0,
		"adopted", r.Adopted,
		"repinned", r.Repinned,
		"ipcache_hosts_moved", r.HostsMoved,
		"ipcache_hosts_waiting", r.HostsWaiting,
		"migrated", migrated(r.Migration),
		"generation", r.Generation,
		"changes", r.Sync,
		"ifaces", ifaces)
}

// finished names the change Start finished, or "".
func finished(in *store.Intent) string {
	if in == nil {
		return ""
	}
	return fmt.Sprintf("%s (pid %d, %s)", in.What, in.PID, in.Started.Format(time.RFC3339))
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
