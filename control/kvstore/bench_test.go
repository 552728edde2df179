package kvstore_test

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/control/kvstore"
	"github.com/ctd-dev/ctd/test/etcdtest"
)

// Prefixes100k is 100k distinct prefixes, 50k per family, as the ipcache
// load benchmarks use.
func prefixes100k() map[netip.Prefix]uint32 {
	m := make(map[netip.Prefix]uint32, 100000)
	for i := range 50000 {
		a4 := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		m[netip.PrefixFrom(a4, 32)] = uint32(1000 + i%5000)
		var a6 [16]byte
		a6[0], a6[1], a6[13], a6[14], a6[15] = 0xfd, 0x00, byte(i>>16), byte(i>>8), byte(i)
		m[netip.PrefixFrom(netip.AddrFrom16(a6), 128)] = uint32(1000 + i%5000)
	}
	return m
}

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
	entries := prefixes100k()
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
