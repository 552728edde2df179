package gc

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
)

// Defaults of RunnerConfig.
const (
	DefaultInterval       = 10 * time.Second
	DefaultMinInterval    = 2 * time.Second
	DefaultMaxInterval    = time.Minute
	DefaultFillThreshold  = 0.8
	DefaultSignalInterval = time.Second
)

// How a pass's outcome moves the interval: a pass that deletes at least
// busyShare of what it scanned, or leaves the table fuller than the fill
// threshold, halves it; one that deletes less than idleShare stretches it by
// half. The interval stays within [MinInterval, MaxInterval].
const (
	busyShare = 0.25
	idleShare = 0.05
)

// Signals are the datapath's cumulative counters that call for an early
// pass (summed over CPUs and directions).
type Signals struct {
	Created      uint64 // conntrack entries created (M_CT_CREATED)
	InsertFailed uint64 // packets dropped because an insert failed (M_DROP_CT_INSERT)
}

// SignalsFrom reads Signals from the datapath's metrics map.
func SignalsFrom(m *metricsmap.Map) func() (Signals, error) {
	return func() (Signals, error) {
		s, err := m.Read()
		if err != nil {
			return Signals{}, err
		}
		return Signals{
			Created:      s.Total(metricsmap.CTCreated).Packets,
			InsertFailed: s.Total(metricsmap.DropCTInsert).Packets,
		}, nil
	}
}

// EstimateFill estimates a table's fill between two exact counts: the
// entries the last count found plus every entry created since, over the
// capacity. It is an upper bound (entries that were evicted or deleted since
// are not subtracted), capped at 1.
func EstimateFill(entries int, createdSince uint64, maxEntries uint32) float64 {
	if maxEntries == 0 {
		return 0
	}
	f := (float64(entries) + float64(createdSince)) / float64(maxEntries)
	return min(f, 1)
}

// RunnerConfig tunes a Runner. Zero fields take the defaults.
type RunnerConfig struct {
	Lifetimes     Lifetimes     // zero: DefaultLifetimes()
	Interval      time.Duration // the first interval after the pass at start
	MinInterval   time.Duration // the shortest time between two pass starts, also when woken
	MaxInterval   time.Duration // the longest time between two passes
	FillThreshold float64       // fill (0-1) above which GC runs early and more often

	// Signals, when set, is polled every SignalInterval; GC wakes when an
	// insert failed since the last pass, or when the fill estimated from the
	// entries created since crosses FillThreshold.
	Signals        func() (Signals, error)
	SignalInterval time.Duration

	// Census, when set, counts the flows each pass keeps.
	Census Census

	Logger *slog.Logger // nil: no logging
}

// A Census counts what the table holds as a pass reads it: Begin when a
// pass starts, Add for every flow it keeps (reads and does not expire), End
// when it is over, ok when it read the whole table.
type Census interface {
	Begin()
	Add(ctmap.Flow)
	End(ok bool)
}

func (c RunnerConfig) withDefaults() RunnerConfig {
	if c.Lifetimes == (Lifetimes{}) {
		c.Lifetimes = DefaultLifetimes()
	}
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.MinInterval == 0 {
		c.MinInterval = DefaultMinInterval
	}
	if c.MaxInterval == 0 {
		c.MaxInterval = DefaultMaxInterval
	}
	if c.FillThreshold == 0 {
		c.FillThreshold = DefaultFillThreshold
	}
	if c.SignalInterval == 0 {
		c.SignalInterval = DefaultSignalInterval
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

func (c RunnerConfig) validate() error {
	if err := c.Lifetimes.Validate(); err != nil {
		return err
	}
	switch {
	case c.MinInterval <= 0:
		return fmt.Errorf("invalid GC minimum interval %v: must be positive", c.MinInterval)
	case c.MaxInterval < c.MinInterval:
		return fmt.Errorf("invalid GC maximum interval %v: must be at least the minimum interval %v", c.MaxInterval, c.MinInterval)
	case c.Interval < c.MinInterval || c.Interval > c.MaxInterval:
		return fmt.Errorf("invalid GC interval %v: must lie between %v and %v", c.Interval, c.MinInterval, c.MaxInterval)
	case c.FillThreshold <= 0 || c.FillThreshold > 1:
		return fmt.Errorf("invalid GC fill threshold %v: must lie in (0, 1]", c.FillThreshold)
	case c.SignalInterval <= 0:
		return fmt.Errorf("invalid GC signal interval %v: must be positive", c.SignalInterval)
	}
	return nil
}

// Stats are a Runner's totals since it started.
type Stats struct {
	Runs      uint64        // passes run, failed ones included
	Errors    uint64        // passes that failed
	Wakes     uint64        // passes run early: Wake or a datapath signal
	Scanned   uint64        // entries read, over all passes
	Deleted   uint64        // entries deleted, over all passes
	Refreshed uint64        // expired entries kept because they were refreshed during a pass
	Duration  time.Duration // time spent in passes
	Last      Result        // the last pass
	LastEnd   time.Time     // when the last pass ended; zero before the first
	Interval  time.Duration // the interval until the next regular pass
	Fill      float64       // the table's fill (0-1) after the last pass
	Entries   int           // entries the last successful pass left (scanned - deleted)
	Entries6  int           // of those, IPv6 flows
}

// Runner runs GC passes over a conntrack table at an interval that adapts to
// what the passes find, and early when woken.
type Runner struct {
	m    *ctmap.Map
	cfg  RunnerConfig
	wake chan struct{}

	mu       sync.Mutex
	stats    Stats
	left     int     // entries the last pass left
	baseline Signals // Signals when the last pass started
}

// NewRunner returns a Runner over m; nothing runs before Run.
func NewRunner(m *ctmap.Map, cfg RunnerConfig) (*Runner, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Runner{
		m:     m,
		cfg:   cfg,
		wake:  make(chan struct{}, 1),
		stats: Stats{Interval: cfg.Interval},
	}, nil
}

// Wake asks for a pass as soon as MinInterval since the last pass's start
// allows. It never blocks; wakes before that pass coalesce into it.
func (r *Runner) Wake() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Stats returns a copy of the totals.
func (r *Runner) Stats() Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stats
}

// EstimatedFill estimates the table's fill now from the datapath's
// cumulative count of created entries (Signals.Created).
func (r *Runner) EstimatedFill(created uint64) float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return EstimateFill(r.left, created-min(created, r.baseline.Created), r.m.MaxEntries())
}

// Run runs a pass at once, then one per interval, until ctx is done. A
// failed pass is logged and counted; the next one runs as planned. Run fails
// only if it cannot load GC's BPF program.
func (r *Runner) Run(ctx context.Context) error {
	x, err := r.m.NewExpirer()
	if err != nil {
		return fmt.Errorf("conntrack GC: %w", err)
	}
	defer x.Close()
	var poll <-chan time.Time
	if r.cfg.Signals != nil {
		t := time.NewTicker(r.cfg.SignalInterval)
		defer t.Stop()
		poll = t.C
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	var lastStart time.Time
	due := time.Now()
	early := func(why string) {
		at := lastStart.Add(r.cfg.MinInterval)
		if now := time.Now(); at.Before(now) {
			at = now
		}
		if at.Before(due) {
			r.cfg.Logger.Debug("conntrack GC woken", "why", why)
			due = at
			timer.Reset(time.Until(due))
		}
	}
	woken := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.wake:
			woken = true
			early("woken")
			continue
		case <-poll:
			if why := r.signalled(); why != "" {
				woken = true
				early(why)
			}
			continue
		case <-timer.C:
		}
		lastStart = time.Now()
		next := r.runPass(x, woken)
		woken = false
		due = time.Now().Add(next)
		timer.Reset(next)
	}
}

// signalled polls the datapath's counters and says why GC should run early,
// or "".
func (r *Runner) signalled() string {
	s, err := r.cfg.Signals()
	if err != nil {
		r.cfg.Logger.Warn("conntrack GC: read datapath counters", "error", err)
		return ""
	}
	r.mu.Lock()
	base, passed := r.baseline, !r.stats.LastEnd.IsZero()
	r.mu.Unlock()
	if !passed {
		return ""
	}
	if s.InsertFailed > base.InsertFailed {
		return "conntrack insert failed"
	}
	if f := r.EstimatedFill(s.Created); f >= r.cfg.FillThreshold {
		return fmt.Sprintf("conntrack table estimated %.0f%% full", 100*f)
	}
	return ""
}

// runPass runs one pass, records it, and returns the next interval.
func (r *Runner) runPass(x *ctmap.Expirer, woken bool) time.Duration {
	var base Signals
	if r.cfg.Signals != nil {
		s, err := r.cfg.Signals()
		if err != nil {
			r.cfg.Logger.Warn("conntrack GC: read datapath counters", "error", err)
		}
		base = s
	}
	var h hooks
	if c := r.cfg.Census; c != nil {
		c.Begin()
		h.keep = c.Add
	}
	res, err := pass(r.m, x, r.cfg.Lifetimes, ctmap.Now().Mono(), h)
	if c := r.cfg.Census; c != nil {
		c.End(err == nil)
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	st := &r.stats
	st.Runs++
	if woken {
		st.Wakes++
	}
	st.Scanned += uint64(res.Scanned)
	st.Deleted += uint64(res.Deleted)
	st.Refreshed += uint64(res.Refreshed)
	st.Duration += res.Duration
	st.Last = res
	st.LastEnd = time.Now()
	r.baseline = base
	if err != nil {
		st.Errors++
		r.cfg.Logger.Warn("conntrack GC pass failed", "error", err, "scanned", res.Scanned, "deleted", res.Deleted)
		return st.Interval
	}
	r.left = res.Scanned - res.Deleted
	st.Entries = r.left
	st.Entries6 = res.Left6
	st.Fill = EstimateFill(r.left, 0, r.m.MaxEntries())
	st.Interval = nextInterval(st.Interval, res, st.Fill, r.cfg)
	r.cfg.Logger.Debug("conntrack GC pass", "scanned", res.Scanned, "deleted", res.Deleted,
		"refreshed", res.Refreshed, "vanished", res.Vanished, "duration", res.Duration,
		"fill", st.Fill, "next", st.Interval)
	return st.Interval
}

// nextInterval adapts the interval to a pass's outcome.
func nextInterval(cur time.Duration, res Result, fill float64, cfg RunnerConfig) time.Duration {
	share := 0.0
	if res.Scanned > 0 {
		share = float64(res.Deleted) / float64(res.Scanned)
	}
	next := cur
	switch {
	case fill >= cfg.FillThreshold || share >= busyShare:
		next = cur / 2
	case share < idleShare:
		next = cur + cur/2
	}
	return min(max(next, cfg.MinInterval), cfg.MaxInterval)
}
