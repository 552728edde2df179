package kvstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/ctd-dev/ctd/control/store"
)

// Update is what a sync step asks the node to enforce.
type Update struct {
	// Full: IPCache is the whole desired ipcache and everything else is to
	// be removed (the first sync, and every list after a compaction or a
	// reconnect: mark and sweep). Otherwise IPCache holds the prefixes to
	// set and Removed those to remove.
	Full     bool
	Revision int64
	IPCache  map[netip.Prefix]uint32
	Removed  []netip.Prefix
	// Policy is the whole desired policy when it changed (always on a
	// full update); nil when it did not.
	Policy   map[store.RuleKey]store.Verdict
	Defaults [2]store.Verdict
}

// Status is what a Syncer reports.
type Status struct {
	Connected bool  // the last request to etcd was answered
	Synced    bool  // the first full sync since start is done and the watch is live
	Revision  int64 // the etcd revision the node's state matches
	IPCache   int   // prefixes in the desired ipcache
	Rules     int   // policy rules
	Conflicts []Conflict
}

// SyncConfig configures a Syncer.
type SyncConfig struct {
	Client *Client
	Logger *slog.Logger
	// Apply makes the node enforce an update. An error makes the Syncer
	// list again and hand a full update.
	Apply func(Update) error
	// OnConflicts is called when the set of conflicting endpoint addresses
	// changes (may be nil).
	OnConflicts func([]Conflict)
	// PingInterval is how often etcd is asked whether it answers; 0 means 1s.
	PingInterval time.Duration
}

// fullAbove is the number of changed prefixes above which a change is
// handed as a full update (one diff instead of many single writes).
const fullAbove = 1024

// Syncer mirrors the cluster state the way a kvstore client operators
// trust does: it lists every key at one revision and hands a full update,
// then watches from that revision + 1 and hands the changes. After a
// compaction, a broken watch or a reconnect (etcd stopped answering and
// answers again) it lists again and hands a full update, which the node
// applies as a mark and sweep: whatever it holds that the list does not
// have goes. Nothing is handed before the first list succeeded, so a node
// started while etcd is away keeps enforcing what it had.
type Syncer struct {
	cfg SyncConfig

	mu        sync.Mutex
	status    Status
	relist    context.CancelFunc // ends the current watch
	conflicts string             // the last conflicts handed to OnConflicts
}

// NewSyncer returns a Syncer; Run starts it.
func NewSyncer(cfg SyncConfig) *Syncer {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.PingInterval <= 0 {
		cfg.PingInterval = time.Second
	}
	return &Syncer{cfg: cfg}
}

// Status returns the current status.
func (s *Syncer) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.status
	st.Conflicts = slices.Clone(st.Conflicts)
	return st
}

// Run syncs until ctx ends; it returns nil then. etcd errors are logged
// and retried, never returned: the node keeps enforcing its last state.
func (s *Syncer) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { s.pingLoop(ctx) })
	const firstBackoff, maxBackoff = 200 * time.Millisecond, 5 * time.Second
	backoff := firstBackoff
	for ctx.Err() == nil {
		listed, err := s.listAndWatch(ctx)
		if ctx.Err() != nil {
			return nil
		}
		s.mu.Lock()
		s.status.Synced = false
		s.mu.Unlock()
		if listed {
			backoff = firstBackoff // it worked for a while: retry at once
		}
		s.cfg.Logger.Warn("kvstore sync interrupted; listing again", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
	return nil
}

// pingLoop keeps Connected up to date and, when etcd answers again after
// it did not, ends the watch so that Run lists again (mark and sweep).
func (s *Syncer) pingLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		_, err := s.cfg.Client.Ping(ctx)
		s.mu.Lock()
		was := s.status.Connected
		s.status.Connected = err == nil
		if err != nil {
			s.status.Synced = false
		}
		relist := s.relist
		s.mu.Unlock()
		switch {
		case err != nil && was:
			s.cfg.Logger.Warn("kvstore unreachable; enforcing the last synced state", "err", err)
		case err == nil && !was && relist != nil:
			s.cfg.Logger.Info("kvstore reachable again; resyncing")
			relist()
		}
	}
}

// listAndWatch lists, applies and watches until the watch ends; listed
// reports whether it got as far as a full sync.
func (s *Syncer) listAndWatch(ctx context.Context) (listed bool, err error) {
	c := s.cfg.Client
	m := newMirror(c.layout)
	var d dirty
	rev, err := c.get(ctx, c.layout.Root(), func(k, v []byte, cr int64) { m.put(string(k), v, cr, &d) })
	if err != nil {
		s.setConnected(false)
		return false, err
	}
	s.setConnected(true)
	if err := s.applyFull(m, rev); err != nil {
		return false, err
	}

	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	s.mu.Lock()
	s.relist = cancel
	s.status.Synced = true
	s.mu.Unlock()
	s.cfg.Logger.Info("kvstore synced", "revision", rev, "ipcache", m.ipcacheLen(), "endpoints", len(m.endpoints), "rules", len(m.rules))

	wch := c.cli.Watch(wctx, c.layout.Root(), clientv3.WithPrefix(), clientv3.WithRev(rev+1), clientv3.WithProgressNotify())
	for resp := range wch {
		if resp.CompactRevision != 0 {
			return true, fmt.Errorf("watch from revision %d: compacted at %d", rev+1, resp.CompactRevision)
		}
		if err := resp.Err(); err != nil {
			return true, fmt.Errorf("watch: %w", err)
		}
		if !resp.IsProgressNotify() {
			var d dirty
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypeDelete {
					m.del(string(ev.Kv.Key), &d)
				} else {
					m.put(string(ev.Kv.Key), ev.Kv.Value, ev.Kv.CreateRevision, &d)
				}
			}
			rev = resp.Header.Revision
			if err := s.applyDelta(m, &d, rev); err != nil {
				return true, err
			}
			continue
		}
		rev = resp.Header.Revision
		s.setRevision(m, rev)
	}
	if ctx.Err() != nil {
		return true, nil
	}
	if wctx.Err() != nil {
		return true, errors.New("reconnected to etcd")
	}
	return true, errors.New("watch closed")
}

func (s *Syncer) setConnected(ok bool) {
	s.mu.Lock()
	s.status.Connected = ok
	s.mu.Unlock()
}

func (s *Syncer) applyFull(m *mirror, rev int64) error {
	d := m.desired()
	u := Update{Full: true, Revision: rev, IPCache: d.IPCache, Policy: d.Policy, Defaults: d.Defaults}
	if err := s.cfg.Apply(u); err != nil {
		return fmt.Errorf("apply the cluster state at revision %d: %w", rev, err)
	}
	s.setRevision(m, rev)
	return nil
}

func (s *Syncer) applyDelta(m *mirror, d *dirty, rev int64) error {
	if len(d.prefixes) > fullAbove {
		return s.applyFull(m, rev)
	}
	if len(d.prefixes) == 0 && !d.policy {
		s.setRevision(m, rev)
		return nil
	}
	u := Update{Revision: rev, IPCache: make(map[netip.Prefix]uint32, len(d.prefixes))}
	for p := range d.prefixes {
		if id, ok := m.lookup(p); ok {
			u.IPCache[p] = id
		} else {
			u.Removed = append(u.Removed, p)
		}
	}
	if d.policy {
		u.Policy, u.Defaults = maps.Clone(m.rules), m.defaults
	}
	if err := s.cfg.Apply(u); err != nil {
		return fmt.Errorf("apply the cluster change at revision %d: %w", rev, err)
	}
	s.setRevision(m, rev)
	return nil
}

// setRevision records that the node matches the mirror at rev, and hands
// changed conflicts on.
func (s *Syncer) setRevision(m *mirror, rev int64) {
	n := m.ipcacheLen()
	for ip := range m.endpoints {
		if _, ok := m.inIPCache(netip.PrefixFrom(ip, ip.BitLen())); !ok {
			n++
		}
	}
	conflicts := m.conflicts()
	key := fmt.Sprint(conflicts)
	s.mu.Lock()
	s.status.Revision, s.status.IPCache, s.status.Rules, s.status.Conflicts = rev, n, len(m.rules), conflicts
	changed := key != s.conflicts
	s.conflicts = key
	s.mu.Unlock()
	if changed && s.cfg.OnConflicts != nil {
		s.cfg.OnConflicts(conflicts)
	}
}
