package kvstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/control/kvstore"
	"github.com/ctd-dev/ctd/test/etcdtest"
)

// BenchmarkIPCacheLoad100k loads 100k prefixes into a three-member etcd
// that fsyncs, as `ctd ipcache load --replace` does: a new generation in
// transactions of 128 puts, then the switch, then the old one dropped.
func BenchmarkIPCacheLoad100k(b *testing.B) {
	ec := etcdtest.StartWith(b, etcdtest.Options{Members: 3, Fsync: true})
	c, err := kvstore.New(kvstore.Config{Endpoints: ec.Endpoints(), Timeout: 30 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	entries := etcdtest.HostPrefixes(100000)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// Each load replaces the last one with other identities.
		for p := range entries {
			entries[p]++
		}
		res, err := c.IPCacheLoad(context.Background(), entries, true)
		if err != nil {
			b.Fatal(err)
		}
		if res.Added+res.Updated != len(entries) {
			b.Fatalf("load %+v, want %d prefixes written", res, len(entries))
		}
	}
}
