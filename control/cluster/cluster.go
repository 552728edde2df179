// Package cluster runs a node of a ctd cluster inside the daemon: it
// applies the cluster's state from etcd to the node's store and maps, and
// publishes the node's endpoints under its lease.
package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/ctd-dev/ctd/control/daemon"
	"github.com/ctd-dev/ctd/control/kvstore"
)

// DefaultLeaseTTL is how long a node's endpoints outlive the node.
const DefaultLeaseTTL = 15 * time.Second

// Config configures a node.
type Config struct {
	Client   *kvstore.Client
	Node     string
	StateDir string
	LeaseTTL time.Duration // 0 means DefaultLeaseTTL
	Logger   *slog.Logger
	// PollInterval is how often the node's endpoints file is read; 0 means 1s.
	PollInterval time.Duration
}

// Agent is one node.
type Agent struct {
	cfg    Config
	syncer *kvstore.Syncer
	log    *slog.Logger
	apply  func(kvstore.Update) error // set by Run before the syncer starts

	mu         sync.Mutex
	publishing bool // Publish runs
	lease      clientv3.LeaseID
	published  int
	conflicts  []kvstore.Conflict
	kick       chan struct{} // conflicts changed
}

// New checks cfg and returns an agent; Run runs it.
func New(cfg Config) (*Agent, error) {
	if err := kvstore.CheckNodeName(cfg.Node); err != nil {
		return nil, err
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.LeaseTTL < 2*time.Second || cfg.LeaseTTL%time.Second != 0 {
		return nil, fmt.Errorf("invalid --kvstore-lease-ttl %v: must be whole seconds, at least 2s (e.g. 15s)", cfg.LeaseTTL)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = time.Second
	}
	a := &Agent{cfg: cfg, log: cfg.Logger.With("node", cfg.Node), kick: make(chan struct{}, 1)}
	a.syncer = kvstore.NewSyncer(kvstore.SyncConfig{
		Client:      cfg.Client,
		Logger:      a.log,
		Apply:       func(u kvstore.Update) error { return a.apply(u) },
		OnConflicts: a.onConflicts,
	})
	return a, nil
}

// Component is the agent as a daemon component.
func (a *Agent) Component() daemon.Component {
	return daemon.Component{Name: "cluster", Run: a.Run}
}

// Run syncs and publishes until ctx ends. etcd being away is never an
// error: the node keeps enforcing what it synced last.
func (a *Agent) Run(ctx context.Context, env *daemon.Env) error {
	maps := &env.Datapath.Maps
	a.apply = func(u kvstore.Update) error {
		t0 := time.Now()
		from, to, err := Apply(env.Store, maps, u)
		if to != 0 && env.Advance != nil {
			env.Advance(from, to)
		}
		if u.Full {
			a.log.Info("applied the cluster state", "revision", u.Revision, "ipcache", len(u.IPCache), "rules", len(u.Policy), "took", time.Since(t0), "err", err)
		}
		return err
	}
	var wg sync.WaitGroup
	wg.Go(func() { _ = a.syncer.Run(ctx) })
	wg.Go(func() { a.Publish(ctx) })
	wg.Go(func() { a.statusLoop(ctx) })
	wg.Wait()
	return nil
}

// onConflicts logs each address several nodes publish and hands the set
// to the publish loop, which reports this node's lost addresses as events.
func (a *Agent) onConflicts(cs []kvstore.Conflict) {
	for _, c := range cs {
		losers := make([]string, 0, len(c.Losers))
		for _, l := range c.Losers {
			losers = append(losers, l.Node)
		}
		a.log.Warn("endpoint address published by more than one node; the earliest keeps it",
			"ip", c.IP, "winner", c.Winner.Node, "winner_identity", c.Winner.Identity, "losers", losers)
	}
	a.mu.Lock()
	a.conflicts = cs
	a.mu.Unlock()
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// ConflictEvent is the event a node writes for an address it publishes
// that another node won.
type ConflictEvent struct {
	Time           time.Time `json:"time"`
	Type           string    `json:"type"` // endpoint-conflict
	IP             string    `json:"ip"`
	Node           string    `json:"node"`
	Identity       uint32    `json:"identity"`
	Winner         string    `json:"winner"`
	WinnerIdentity uint32    `json:"winner_identity"`
}

// Publish holds the node's lease and keeps its endpoints (and conflict
// events) in etcd equal to the local ones until ctx ends. Run does it too,
// unless Publish runs already: a daemon calls it before it loads its
// datapath, because the node's endpoints and the programs its previous
// daemon attached stay in place throughout a restart, and a load slower
// than the lease TTL (seconds on a busy node) must not take the endpoints
// out of every node's ipcache meanwhile.
func (a *Agent) Publish(ctx context.Context) {
	a.mu.Lock()
	if a.publishing {
		a.mu.Unlock()
		return
	}
	a.publishing = true
	a.mu.Unlock()
	a.publishLoop(ctx)
}

func (a *Agent) publishLoop(ctx context.Context) {
	for ctx.Err() == nil {
		lease, err := a.takeLease(ctx)
		if err != nil {
			a.log.Warn("cannot take a kvstore lease; retrying", "err", err)
			sleep(ctx, time.Second)
			continue
		}
		a.mu.Lock()
		a.lease = lease
		a.mu.Unlock()
		a.keepPublished(ctx, lease)
	}
}

// takeLease takes up the lease recorded in the state directory if it is
// still alive, else grants a new one and records it.
//
// The recorded lease is taken up with a keepalive, not a TimeToLive: one
// request both tells whether it lives and gives it its whole TTL back. A
// lease with less than a second left (TimeToLive rounds that to 0) is
// still alive, and a restarted or reconnected node must not let it run
// out between looking at it and keeping it alive: its endpoints would
// leave every node's ipcache and come back under a new lease.
func (a *Agent) takeLease(ctx context.Context) (clientv3.LeaseID, error) {
	cli := a.cfg.Client.Etcd()
	path := filepath.Join(a.cfg.StateDir, LeaseFile)
	ttl := int64(a.cfg.LeaseTTL / time.Second)
	var rec leaseRecord
	if b, err := os.ReadFile(path); err == nil && json.Unmarshal(b, &rec) == nil && rec.ID != 0 && rec.Node == a.cfg.Node && rec.TTL == ttl {
		rctx, cancel := context.WithTimeout(ctx, a.cfg.Client.Timeout())
		_, err := cli.KeepAliveOnce(rctx, clientv3.LeaseID(rec.ID))
		cancel()
		switch {
		case err == nil:
			a.log.Info("took up the recorded kvstore lease", "lease", strconv.FormatInt(rec.ID, 16))
			return clientv3.LeaseID(rec.ID), nil
		case errors.Is(rpctypes.Error(err), rpctypes.ErrLeaseNotFound):
			a.log.Warn("the recorded kvstore lease expired (the node was gone longer than its TTL): its endpoints left the cluster; granting a new lease",
				"lease", strconv.FormatInt(rec.ID, 16), "ttl", a.cfg.LeaseTTL)
		default:
			return 0, fmt.Errorf("refresh the recorded lease %x: %w", rec.ID, err)
		}
	}
	rctx, cancel := context.WithTimeout(ctx, a.cfg.Client.Timeout())
	resp, err := cli.Grant(rctx, ttl)
	cancel()
	if err != nil {
		return 0, err
	}
	if err := writeJSONFile(path, leaseRecord{ID: int64(resp.ID), TTL: ttl, Node: a.cfg.Node}); err != nil {
		return 0, err
	}
	a.log.Info("granted a kvstore lease", "lease", strconv.FormatInt(int64(resp.ID), 16), "ttl", a.cfg.LeaseTTL)
	return resp.ID, nil
}

// keepPublished keeps lease alive and the endpoints published under it,
// until the lease is lost (expired while etcd was away) or ctx ends.
func (a *Agent) keepPublished(ctx context.Context, lease clientv3.LeaseID) {
	kctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ka, err := a.cfg.Client.Etcd().KeepAlive(kctx, lease)
	if err != nil {
		a.log.Warn("keep the kvstore lease alive", "err", err)
		return
	}
	var (
		done      []LocalEndpoint
		doneConfl []kvstore.Conflict
		dirty     = true
	)
	tick := time.NewTicker(a.cfg.PollInterval)
	defer tick.Stop()
	for {
		eps, err := ReadEndpoints(a.cfg.StateDir)
		if err != nil {
			a.log.Warn("read the node's endpoints", "err", err)
		} else if dirty || !reflect.DeepEqual(eps, done) {
			if err := a.publish(ctx, lease, eps); err != nil {
				a.log.Warn("publish the node's endpoints; retrying", "err", err)
				dirty = true
			} else {
				done, dirty = eps, false
				a.mu.Lock()
				a.published = len(eps)
				a.mu.Unlock()
			}
		}
		a.mu.Lock()
		cs := a.conflicts
		a.mu.Unlock()
		if !reflect.DeepEqual(cs, doneConfl) {
			if err := a.reportConflicts(ctx, lease, cs); err == nil {
				doneConfl = cs
			}
		}
		select {
		case <-ctx.Done():
			a.refreshOnStop(lease)
			return
		case _, ok := <-ka:
			if !ok {
				a.log.Warn("no kvstore lease keepalive answered within the TTL; taking the lease up again, or a new one if it expired")
				return
			}
		case <-a.kick:
		case <-tick.C:
		}
	}
}

// refreshOnStop gives the lease its whole TTL once more as the agent stops,
// so that the node's endpoints outlive it by the TTL (what --kvstore-lease-ttl
// promises), not by whatever was left since the last periodic keepalive
// (as little as two thirds of it): a daemon restarted within the TTL, its
// datapath load included, takes the lease up again and its endpoints never
// leave. It waits at most a second.
func (a *Agent) refreshOnStop(lease clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), min(a.cfg.Client.Timeout(), time.Second))
	defer cancel()
	if _, err := a.cfg.Client.Etcd().KeepAliveOnce(ctx, lease); err != nil {
		a.log.Warn("refresh the kvstore lease on stop", "lease", strconv.FormatInt(int64(lease), 16), "err", err)
	}
}

// publish makes the node's keys in etcd equal to eps, under lease.
func (a *Agent) publish(ctx context.Context, lease clientv3.LeaseID, eps []LocalEndpoint) error {
	c, l := a.cfg.Client, a.cfg.Client.Layout()
	rctx, cancel := context.WithTimeout(ctx, c.Timeout())
	defer cancel()
	resp, err := c.Etcd().Get(rctx, l.NodeEndpoints(a.cfg.Node), clientv3.WithPrefix())
	if err != nil {
		return err
	}
	want := make(map[string]string, len(eps))
	for _, e := range eps {
		b, _ := json.Marshal(kvstore.EndpointValue{Identity: e.Identity})
		want[l.EndpointKey(a.cfg.Node, e.IP)] = string(b)
	}
	var ops []clientv3.Op
	node, _ := json.Marshal(map[string]any{"lease": strconv.FormatInt(int64(lease), 16), "ttl_s": int64(a.cfg.LeaseTTL / time.Second)})
	ops = append(ops, clientv3.OpPut(l.NodeKey(a.cfg.Node), string(node), clientv3.WithLease(lease)))
	have := make(map[string]bool)
	for _, kv := range resp.Kvs {
		have[string(kv.Key)] = true
		if _, ok := want[string(kv.Key)]; !ok {
			ops = append(ops, clientv3.OpDelete(string(kv.Key)))
		}
	}
	for k, v := range maps.All(want) {
		ops = append(ops, clientv3.OpPut(k, v, clientv3.WithLease(lease)))
	}
	for chunk := range slices.Chunk(ops, 128) {
		if _, err := c.Etcd().Txn(rctx).Then(chunk...).Commit(); err != nil {
			return err
		}
	}
	return nil
}

// reportConflicts writes an event for each address this node lost to
// another node, and removes the events of conflicts that ended.
func (a *Agent) reportConflicts(ctx context.Context, lease clientv3.LeaseID, cs []kvstore.Conflict) error {
	c, l := a.cfg.Client, a.cfg.Client.Layout()
	rctx, cancel := context.WithTimeout(ctx, c.Timeout())
	defer cancel()
	dir := l.EventKey(a.cfg.Node, "endpoint-conflict", "")
	resp, err := c.Etcd().Get(rctx, dir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return err
	}
	want := make(map[string]ConflictEvent)
	for _, cf := range cs {
		for _, lo := range cf.Losers {
			if lo.Node == a.cfg.Node {
				want[dir+cf.IP.String()] = ConflictEvent{Time: time.Now().UTC(), Type: "endpoint-conflict", IP: cf.IP.String(),
					Node: a.cfg.Node, Identity: lo.Identity, Winner: cf.Winner.Node, WinnerIdentity: cf.Winner.Identity}
			}
		}
	}
	var errs []error
	for _, kv := range resp.Kvs {
		if _, ok := want[string(kv.Key)]; !ok {
			_, err := c.Etcd().Delete(rctx, string(kv.Key))
			errs = append(errs, err)
		}
	}
	for k, ev := range want {
		b, _ := json.Marshal(ev)
		_, err := c.Etcd().Put(rctx, k, string(b), clientv3.WithLease(lease))
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Status is the node's status now.
func (a *Agent) Status() StatusReport {
	st := a.syncer.Status()
	a.mu.Lock()
	defer a.mu.Unlock()
	conflicts := []string{}
	for _, c := range st.Conflicts {
		conflicts = append(conflicts, c.IP.String())
	}
	return StatusReport{
		Node:           a.cfg.Node,
		Connected:      st.Connected,
		Synced:         st.Synced,
		Revision:       st.Revision,
		IPCacheEntries: st.IPCache,
		PolicyRules:    st.Rules,
		LeaseTTL:       int64(a.cfg.LeaseTTL / time.Second),
		LeaseID:        strconv.FormatInt(int64(a.lease), 16),
		Endpoints:      a.published,
		Conflicts:      conflicts,
		PID:            os.Getpid(),
	}
}

// statusLoop writes the node's status to the state directory whenever it
// changes, and at least every statusHeartbeat.
func (a *Agent) statusLoop(ctx context.Context) {
	path := filepath.Join(a.cfg.StateDir, StatusFile)
	var last StatusReport
	var written time.Time
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			st := a.Status()
			st.Connected, st.Synced, st.PID, st.Updated = false, false, 0, time.Now().UTC()
			_ = writeJSONFile(path, st)
			return
		case <-t.C:
		}
		st := a.Status()
		if reflect.DeepEqual(st, last) && time.Since(written) < statusHeartbeat {
			continue
		}
		last = st
		st.Updated = time.Now().UTC()
		if err := writeJSONFile(path, st); err != nil {
			a.log.Warn("write the cluster status", "err", err)
			continue
		}
		written = time.Now()
	}
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
