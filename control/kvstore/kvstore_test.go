package kvstore_test

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/ctd-dev/ctd/control/kvstore"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/test/etcdtest"
)

// node is what a Syncer's updates build: the state a node enforces.
type node struct {
	mu       sync.Mutex
	ipcache  map[netip.Prefix]uint32
	policy   map[store.RuleKey]store.Verdict
	defaults [2]store.Verdict
	fulls    int
	check    func(map[netip.Prefix]uint32) error // called after every update
	errs     []error
}

func (n *node) apply(u kvstore.Update) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if u.Full {
		n.fulls++
		n.ipcache = maps.Clone(u.IPCache)
	} else {
		maps.Copy(n.ipcache, u.IPCache)
		for _, p := range u.Removed {
			delete(n.ipcache, p)
		}
	}
	if u.Policy != nil {
		n.policy, n.defaults = maps.Clone(u.Policy), u.Defaults
	}
	if n.check != nil {
		if err := n.check(n.ipcache); err != nil {
			n.errs = append(n.errs, err)
		}
	}
	return nil
}

func (n *node) snapshot() map[netip.Prefix]uint32 {
	n.mu.Lock()
	defer n.mu.Unlock()
	return maps.Clone(n.ipcache)
}

func newClient(t *testing.T, eps []string) *kvstore.Client {
	t.Helper()
	c, err := kvstore.New(kvstore.Config{Endpoints: eps, Prefix: "/ctd/v1", Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func startSyncer(t *testing.T, c *kvstore.Client, n *node) *kvstore.Syncer {
	t.Helper()
	s := kvstore.NewSyncer(kvstore.SyncConfig{Client: c, Apply: n.apply, PingInterval: 100 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return s
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func TestSyncListWatch(t *testing.T) {
	ec := etcdtest.Start(t, 3, "")
	w := newClient(t, ec.Endpoints())
	ctx := context.Background()
	if _, err := w.IPCacheAdd(ctx, pfx("198.51.100.0/24"), 100); err != nil {
		t.Fatal(err)
	}
	rule := store.RuleKey{Dir: store.Ingress, Identity: 100, Proto: 6, Port: 80}
	if _, err := w.PolicyAdd(ctx, rule, store.Allow); err != nil {
		t.Fatal(err)
	}
	if _, err := w.PolicyDefault(ctx, store.Ingress, store.Deny); err != nil {
		t.Fatal(err)
	}

	n := &node{}
	s := startSyncer(t, newClient(t, ec.Endpoints()), n)
	waitFor(t, "the first sync", 10*time.Second, func() bool { return s.Status().Synced })
	if got := n.snapshot(); len(got) != 1 || got[pfx("198.51.100.0/24")] != 100 {
		t.Fatalf("after the first sync the node has %v, want 198.51.100.0/24=100", got)
	}
	if n.policy[rule] != store.Allow || n.defaults[store.Ingress] != store.Deny {
		t.Fatalf("policy %v defaults %v after the first sync", n.policy, n.defaults)
	}

	for _, c := range []struct {
		name string
		do   func() error
		want map[netip.Prefix]uint32
	}{
		{"add", func() error { _, err := w.IPCacheAdd(ctx, pfx("203.0.113.7/32"), 200); return err },
			map[netip.Prefix]uint32{pfx("198.51.100.0/24"): 100, pfx("203.0.113.7/32"): 200}},
		{"update", func() error { _, err := w.IPCacheAdd(ctx, pfx("203.0.113.7/32"), 201); return err },
			map[netip.Prefix]uint32{pfx("198.51.100.0/24"): 100, pfx("203.0.113.7/32"): 201}},
		{"del", func() error { _, err := w.IPCacheDelete(ctx, pfx("198.51.100.0/24")); return err },
			map[netip.Prefix]uint32{pfx("203.0.113.7/32"): 201}},
		{"load merge", func() error {
			_, err := w.IPCacheLoad(ctx, map[netip.Prefix]uint32{pfx("fd00::/64"): 300}, false)
			return err
		}, map[netip.Prefix]uint32{pfx("203.0.113.7/32"): 201, pfx("fd00::/64"): 300}},
		{"load replace", func() error {
			_, err := w.IPCacheLoad(ctx, map[netip.Prefix]uint32{pfx("fd00::/64"): 301, pfx("198.51.100.128/25"): 5}, true)
			return err
		}, map[netip.Prefix]uint32{pfx("fd00::/64"): 301, pfx("198.51.100.128/25"): 5}},
	} {
		if err := c.do(); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		waitFor(t, c.name+" to reach the node", 2*time.Second, func() bool { return maps.Equal(n.snapshot(), c.want) })
	}
	if _, err := w.IPCacheDelete(ctx, pfx("10.0.0.0/8")); err == nil {
		t.Error("deleting a prefix the cluster does not have succeeded")
	}
	if _, err := w.PolicyDelete(ctx, rule, store.Deny, "ingress id=100 tcp/80"); err == nil {
		t.Error("deleting an allow rule as deny succeeded")
	}
	if _, err := w.PolicyDelete(ctx, rule, store.VerdictUnset, "ingress id=100 tcp/80"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the rule's deletion", 2*time.Second, func() bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		return len(n.policy) == 0
	})
}

// TestLoadReplaceIsWhole checks that every update a node applies during a
// load --replace leaves it with the old table or the new one, never a mix,
// both when the change arrives as a delta and as a full update.
func TestLoadReplaceIsWhole(t *testing.T) {
	ec := etcdtest.Start(t, 3, "")
	w := newClient(t, ec.Endpoints())
	ctx := context.Background()
	for _, size := range []int{300, 3000} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			table := func(id uint32, offset int) map[netip.Prefix]uint32 {
				m := make(map[netip.Prefix]uint32)
				for i := range size {
					a := netip.AddrFrom4([4]byte{10, byte((i + offset) >> 8), byte(i + offset), 0})
					m[netip.PrefixFrom(a, 24)] = id
				}
				return m
			}
			a, b := table(1, 0), table(2, size/2)
			if _, err := w.IPCacheLoad(ctx, a, true); err != nil {
				t.Fatal(err)
			}
			n := &node{}
			s := startSyncer(t, newClient(t, ec.Endpoints()), n)
			waitFor(t, "the first sync", 10*time.Second, func() bool { return s.Status().Synced && maps.Equal(n.snapshot(), a) })
			n.mu.Lock()
			n.check = func(have map[netip.Prefix]uint32) error {
				if !maps.Equal(have, a) && !maps.Equal(have, b) {
					return fmt.Errorf("the node applied a mix of two loads: %d prefixes", len(have))
				}
				return nil
			}
			n.mu.Unlock()
			if _, err := w.IPCacheLoad(ctx, b, true); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the replace", 5*time.Second, func() bool { return maps.Equal(n.snapshot(), b) })
			n.mu.Lock()
			defer n.mu.Unlock()
			for _, err := range n.errs {
				t.Error(err)
			}
			// The old generation is gone from etcd.
			resp, err := w.Etcd().Get(ctx, "/ctd/v1/ipcache/", clientv3.WithPrefix(), clientv3.WithCountOnly())
			if err != nil {
				t.Fatal(err)
			}
			buckets := make(map[uint32]bool)
			for p := range b {
				buckets[kvstore.BucketOf(p)] = true
			}
			if resp.Count != int64(len(buckets))+2 { // + current + next
				t.Errorf("etcd holds %d ipcache keys after the replace, want %d (the new generation's buckets, current and next)", resp.Count, len(buckets)+2)
			}
		})
	}
}

// TestResyncAfterReconnect cuts a node off its etcd member while the
// cluster changes and compacts, and checks that the node then lists again
// and sweeps what was deleted meanwhile.
func TestResyncAfterReconnect(t *testing.T) {
	ec := etcdtest.Start(t, 3, "")
	eps := ec.Endpoints()
	w := newClient(t, eps[1:])
	ctx := context.Background()
	for _, p := range []string{"198.51.100.1/32", "198.51.100.2/32"} {
		if _, err := w.IPCacheAdd(ctx, pfx(p), 7); err != nil {
			t.Fatal(err)
		}
	}
	n := &node{}
	s := startSyncer(t, newClient(t, eps[:1]), n)
	waitFor(t, "the first sync", 10*time.Second, func() bool { return s.Status().Synced && len(n.snapshot()) == 2 })
	fulls := n.fulls

	ec.Stop(0)
	waitFor(t, "the node to notice", 10*time.Second, func() bool { return !s.Status().Connected })
	if _, err := w.IPCacheDelete(ctx, pfx("198.51.100.1/32")); err != nil {
		t.Fatal(err)
	}
	if _, err := w.IPCacheAdd(ctx, pfx("198.51.100.3/32"), 8); err != nil {
		t.Fatal(err)
	}
	resp, err := w.Etcd().Get(ctx, "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Etcd().Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	if got := n.snapshot(); len(got) != 2 {
		t.Fatalf("while cut off the node changed to %v", got)
	}
	ec.Restart(0)
	want := map[netip.Prefix]uint32{pfx("198.51.100.2/32"): 7, pfx("198.51.100.3/32"): 8}
	waitFor(t, "the resync", 20*time.Second, func() bool { return s.Status().Synced && maps.Equal(n.snapshot(), want) })
	if n.fulls == fulls {
		t.Error("the node caught up without a full list (mark and sweep)")
	}
}

func TestEndpointConflictWinner(t *testing.T) {
	ec := etcdtest.Start(t, 1, "")
	w := newClient(t, ec.Endpoints())
	ctx := context.Background()
	l := w.Layout()
	ip := netip.MustParseAddr("198.51.100.9")
	// node-b publishes first, then node-a: the earlier one wins whatever the names.
	for _, c := range []struct {
		node string
		id   uint32
	}{{"node-b", 300}, {"node-a", 400}} {
		if _, err := w.Etcd().Put(ctx, l.EndpointKey(c.node, ip), fmt.Sprintf(`{"identity":%d}`, c.id)); err != nil {
			t.Fatal(err)
		}
	}
	var got []kvstore.Conflict
	var mu sync.Mutex
	n := &node{}
	s := kvstore.NewSyncer(kvstore.SyncConfig{Client: w, Apply: n.apply, OnConflicts: func(c []kvstore.Conflict) {
		mu.Lock()
		got = c
		mu.Unlock()
	}})
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); s.Run(cctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, "the first sync", 10*time.Second, func() bool { return s.Status().Synced })
	if id := n.snapshot()[netip.PrefixFrom(ip, 32)]; id != 300 {
		t.Errorf("the node maps %v to %d, want 300 (node-b published first)", ip, id)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || got[0].Winner.Node != "node-b" || len(got[0].Losers) != 1 || got[0].Losers[0].Node != "node-a" {
		t.Errorf("conflicts %+v, want node-b winning over node-a", got)
	}
}
