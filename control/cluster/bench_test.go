package cluster_test

import (
	"context"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/control/cluster"
	"github.com/ctd-dev/ctd/control/kvstore"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/ipcachemap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/etcdtest"
	"github.com/ctd-dev/ctd/test/nettest"
)

func benchClient(b *testing.B, ec *etcdtest.Cluster) *kvstore.Client {
	c, err := kvstore.New(kvstore.Config{Endpoints: ec.Endpoints(), Timeout: 30 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// benchNode is a node's datapath maps and store, fresh.
type benchNode struct {
	ipcache *ipcachemap.Map
	apply   func(kvstore.Update) error
}

func newBenchNode(b *testing.B) benchNode {
	m, err := loader.OpenMaps(loader.Options{PinPath: nettest.PinPath(b)}.WithDefaults())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	s, err := store.Open(filepath.Join(b.TempDir(), "state"), nil)
	if err != nil {
		b.Fatal(err)
	}
	return benchNode{ipcache: m.IPCache(), apply: func(u kvstore.Update) error {
		_, _, err := cluster.Apply(s, m, u)
		return err
	}}
}

// run runs a syncer for n until the benchmark ends.
func run(b *testing.B, s *kvstore.Syncer) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Run(ctx) }()
	b.Cleanup(func() { cancel(); <-done })
}

// BenchmarkConverge100k measures a new node joining a cluster whose
// ipcache holds 100k prefixes (50k per family): from the start of its sync
// to synced, the whole state listed from a three-member etcd and written
// into its (empty) maps and store. Reports converge-ms.
func BenchmarkConverge100k(b *testing.B) {
	ec := etcdtest.StartWith(b, etcdtest.Options{Members: 3, Fsync: true})
	c := benchClient(b, ec)
	if _, err := c.IPCacheLoad(context.Background(), etcdtest.HostPrefixes(100000), true); err != nil {
		b.Fatal(err)
	}
	var total time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		n := newBenchNode(b)
		synced := make(chan struct{})
		var once sync.Once
		s := kvstore.NewSyncer(kvstore.SyncConfig{Client: c, Apply: func(u kvstore.Update) error {
			err := n.apply(u)
			if u.Full && len(u.IPCache) == 100000 && err == nil {
				once.Do(func() { close(synced) })
			}
			return err
		}})
		b.StartTimer()
		t0 := time.Now()
		run(b, s)
		<-synced
		for !s.Status().Synced {
			time.Sleep(time.Millisecond)
		}
		total += time.Since(t0)
	}
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "converge-ms")
}

// BenchmarkChange10Nodes measures how long one cluster change (an ipcache
// add) takes to reach ten nodes, each a syncer applying to its own maps and
// store in this process, against a three-member etcd with 1k prefixes.
// Each change is timed from the write's start until the last node's
// datapath resolves it (its ipcache map, looked up from outside as the
// datapath does), and until the last node also committed it to its store.
// Reports medians and 99th percentiles over 200 changes.
func BenchmarkChange10Nodes(b *testing.B) {
	const nodes, changes = 10, 200
	ec := etcdtest.StartWith(b, etcdtest.Options{Members: 3, Fsync: true})
	w := benchClient(b, ec)
	if _, err := w.IPCacheLoad(context.Background(), etcdtest.HostPrefixes(1000), true); err != nil {
		b.Fatal(err)
	}
	type applied struct {
		mu sync.Mutex
		at map[netip.Prefix]time.Time
	}
	var all []*applied
	var tries []*ipcachemap.Map
	var syncers []*kvstore.Syncer
	for range nodes {
		n := newBenchNode(b)
		a := &applied{at: make(map[netip.Prefix]time.Time)}
		all, tries = append(all, a), append(tries, n.ipcache)
		s := kvstore.NewSyncer(kvstore.SyncConfig{Client: benchClient(b, ec), Apply: func(u kvstore.Update) error {
			err := n.apply(u)
			now := time.Now()
			a.mu.Lock()
			for p := range u.IPCache {
				a.at[p] = now
			}
			a.mu.Unlock()
			return err
		}})
		syncers = append(syncers, s)
		run(b, s)
	}
	for _, s := range syncers {
		for !s.Status().Synced {
			time.Sleep(10 * time.Millisecond)
		}
	}
	var enforced, stored []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for j := range changes {
			p := netip.PrefixFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(j)}), 32)
			id := uint32(5000 + i*changes + j)
			t0 := time.Now()
			if _, err := w.IPCacheAdd(context.Background(), p, id); err != nil {
				b.Fatal(err)
			}
			pending := slices.Clone(tries)
			for len(pending) > 0 {
				pending = slices.DeleteFunc(pending, func(m *ipcachemap.Map) bool {
					e, ok, err := m.Lookup(p.Addr())
					return err == nil && ok && e.Identity == id
				})
				if len(pending) > 0 {
					time.Sleep(50 * time.Microsecond)
				}
			}
			enforced = append(enforced, time.Since(t0))
			var last time.Time
			for _, a := range all {
				for {
					a.mu.Lock()
					at, ok := a.at[p]
					a.mu.Unlock()
					if ok && at.After(t0) {
						if at.After(last) {
							last = at
						}
						break
					}
					time.Sleep(100 * time.Microsecond)
				}
			}
			stored = append(stored, last.Sub(t0))
		}
	}
	pct := func(d []time.Duration, q int) float64 {
		d = slices.Clone(d)
		slices.Sort(d)
		return float64(d[len(d)*q/100].Microseconds()) / 1000
	}
	b.ReportMetric(pct(enforced, 50), "p50-ms")
	b.ReportMetric(pct(enforced, 99), "p99-ms")
	b.ReportMetric(pct(stored, 50), "p50-stored-ms")
	b.ReportMetric(pct(stored, 99), "p99-stored-ms")
}
