package cluster_test

import (
	"context"
	"encoding/json"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/ctd-dev/ctd/control/cluster"
	"github.com/ctd-dev/ctd/control/daemon"
	"github.com/ctd-dev/ctd/control/kvstore"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/etcdtest"
)

// agentNode is a node's maps, store and state directory, and its agent
// when running.
type agentNode struct {
	t     *testing.T
	name  string
	dir   string
	env   *daemon.Env
	kv    *kvstore.Client
	agent *cluster.Agent
	stop  func()
}

func newAgentNode(t *testing.T, name string, eps []string) *agentNode {
	t.Helper()
	s, m := node(t)
	kv, err := kvstore.New(kvstore.Config{Endpoints: eps, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kv.Close() })
	n := &agentNode{t: t, name: name, dir: filepath.Dir(s.Path()), kv: kv,
		env: &daemon.Env{Datapath: &loader.Datapath{Maps: *m}, Store: s}}
	t.Cleanup(func() {
		if n.stop != nil {
			n.stop()
		}
	})
	return n
}

func (n *agentNode) start() {
	n.t.Helper()
	a, err := cluster.New(cluster.Config{Client: n.kv, Node: n.name, StateDir: n.dir, LeaseTTL: 3 * time.Second, PollInterval: 50 * time.Millisecond})
	if err != nil {
		n.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = a.Run(ctx, n.env) }()
	n.agent = a
	n.stop = func() { cancel(); <-done; n.stop = nil }
}

func (n *agentNode) lookup(ip string) uint32 {
	n.t.Helper()
	e, ok, err := n.env.Datapath.IPCache().Lookup(netip.MustParseAddr(ip))
	if err != nil {
		n.t.Fatal(err)
	}
	if !ok {
		return 0
	}
	return e.Identity
}

func (n *agentNode) addEndpoint(ip string, id uint32) {
	n.t.Helper()
	err := cluster.ChangeEndpoints(n.dir, func(eps []cluster.LocalEndpoint) ([]cluster.LocalEndpoint, error) {
		return append(eps, cluster.LocalEndpoint{IP: netip.MustParseAddr(ip), Identity: id}), nil
	})
	if err != nil {
		n.t.Fatal(err)
	}
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestAgentEndpoints checks endpoints across two nodes: published and
// mapped everywhere, a conflict resolved the same way on both with an
// event from the loser, the lease taken up again by a restarted agent
// (the endpoint never leaves), and a node gone for good losing its
// endpoints after the TTL.
func TestAgentEndpoints(t *testing.T) {
	ec := etcdtest.Start(t, 1, "")
	a, b := newAgentNode(t, "node-a", ec.Endpoints()), newAgentNode(t, "node-b", ec.Endpoints())
	a.start()
	b.start()
	b.addEndpoint("198.51.100.2", 300)
	for _, n := range []*agentNode{a, b} {
		waitFor(t, n.name+" maps node-b's endpoint", 5*time.Second, func() bool { return n.lookup("198.51.100.2") == 300 })
	}

	// node-a publishes the same address later: node-b keeps it everywhere.
	a.addEndpoint("198.51.100.2", 400)
	a.addEndpoint("198.51.100.1", 401)
	waitFor(t, "node-a's own endpoint", 5*time.Second, func() bool { return b.lookup("198.51.100.1") == 401 })
	ev := a.kv.Layout().EventKey("node-a", "endpoint-conflict", "198.51.100.2")
	waitFor(t, "node-a's conflict event", 5*time.Second, func() bool {
		resp, err := a.kv.Etcd().Get(context.Background(), ev)
		if err != nil || len(resp.Kvs) == 0 {
			return false
		}
		var e cluster.ConflictEvent
		return json.Unmarshal(resp.Kvs[0].Value, &e) == nil && e.Winner == "node-b" && e.Identity == 400 && e.WinnerIdentity == 300
	})
	for _, n := range []*agentNode{a, b} {
		// The syncer reports the conflict only after it applied the change
		// that made it to the maps: wait for the report, then check that
		// the maps hold node-b's identity for the address.
		waitFor(t, n.name+" reports the conflict", 5*time.Second, func() bool {
			st := n.agent.Status()
			return len(st.Conflicts) == 1 && st.Conflicts[0] == "198.51.100.2"
		})
		if id := n.lookup("198.51.100.2"); id != 300 {
			t.Errorf("%s maps the conflicting address to %d, want node-b's 300", n.name, id)
		}
	}

	// A restart within the TTL takes the same lease up: node-b's endpoint
	// stays in etcd throughout.
	lease := b.agent.Status().LeaseID
	key := b.kv.Layout().EndpointKey("node-b", netip.MustParseAddr("198.51.100.2"))
	watch := a.kv.Etcd().Watch(context.Background(), key, clientv3.WithFilterPut())
	b.stop()
	time.Sleep(time.Second)
	b.start()
	waitFor(t, "node-b synced after its restart", 5*time.Second, func() bool { return b.agent.Status().Synced && b.agent.Status().Endpoints == 1 })
	if got := b.agent.Status().LeaseID; got != lease {
		t.Errorf("node-b's lease %s after a restart, was %s", got, lease)
	}
	select {
	case ev := <-watch:
		t.Errorf("node-b's endpoint was deleted during its restart: %v", ev.Events)
	case <-time.After(4 * time.Second): // past the TTL
	}

	// node-b gone for good: after its TTL its endpoint leaves node-a, and
	// node-a's own claim on the address takes over.
	b.stop()
	waitFor(t, "node-b's endpoint to leave node-a", 10*time.Second, func() bool { return a.lookup("198.51.100.2") == 400 })
	waitFor(t, "the conflict to end", 5*time.Second, func() bool { return len(a.agent.Status().Conflicts) == 0 })
	// The status drops the conflict first; the publish loop then deletes
	// the event.
	waitFor(t, "node-a's conflict event to go with the conflict", 5*time.Second, func() bool {
		resp, err := a.kv.Etcd().Get(context.Background(), ev)
		return err == nil && len(resp.Kvs) == 0
	})
	st, err := a.env.Store.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if st.IPCache[netip.MustParsePrefix("198.51.100.2/32")] != 400 {
		t.Errorf("node-a's store holds %v", st.IPCache)
	}
}
