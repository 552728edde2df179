package daemon

import (
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/ipcachemap"
)

const benchEntries = 100_000

// prefill writes n conntrack entries into the pinned table and n /32
// prefixes into both the store and the pinned ipcache, so that a start has
// the maps of a busy node to open and the store to compare them with.
func prefill(b *testing.B, e *testEnv, n int) {
	b.Helper()
	s := e.store(b)
	err := s.Update(func(tx *store.Tx) error {
		for i := range n {
			if err := tx.PutIPCache(benchPrefix(i), uint32(i+100)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	// The first start restores the ipcache from the store.
	d, _ := e.start(b, e.config())
	defer d.Close()

	keys := make([]ctmap.Key, 0, n)
	vals := make([]ctmap.Entry, 0, n)
	src, dst := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("203.0.113.1")
	for i := range n {
		k, srcIsB := ctmap.KeyOf(6, src, uint16(1024+i%60000), dst, uint16(80+i/60000))
		e := ctmap.Entry{PacketsOrig: 10, BytesOrig: 1000, State: uint8(ctmap.StateEstablished)}
		if srcIsB {
			e.OrigIsB = 1
		}
		keys, vals = append(keys, k), append(vals, e)
	}
	if err := d.dp.Conntrack().PutBatch(keys, vals); err != nil {
		b.Fatal(err)
	}
	if c, err := d.dp.Conntrack().Count(); err != nil || c != n {
		b.Fatalf("conntrack holds %d entries (%v), want %d", c, err, n)
	}
}

func benchPrefix(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 32)
}

// BenchmarkStartReady measures the daemon's start up to its ready line
// (open maps, load programs, reconcile the store, attach, record).
//
// restart: over a live datapath with 100k conntrack entries and 100k
// ipcache prefixes pinned and the same 100k prefixes in the store.
// reboot: on an empty bpffs, restoring the 100k prefixes from the store.
func BenchmarkStartReady(b *testing.B) {
	b.Run("restart", func(b *testing.B) {
		e := newTestEnv(b)
		prefill(b, e, benchEntries)
		cfg := e.config()
		var sum Ready
		b.ResetTimer()
		for b.Loop() {
			d, r := e.start(b, cfg)
			d.Close()
			if r.Sync.Changed() || r.Restored {
				b.Fatalf("restart changed the maps: %+v", r)
			}
			addReady(&sum, r)
		}
		reportReady(b, sum)
	})
	b.Run("reboot", func(b *testing.B) {
		e := newTestEnv(b)
		prefill(b, e, benchEntries)
		cfg := e.config()
		var sum Ready
		b.ResetTimer()
		for b.Loop() {
			b.StopTimer()
			// A reboot empties bpffs and detaches everything.
			if err := os.RemoveAll(e.pinPath); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			d, r := e.start(b, cfg)
			b.StopTimer()
			n, _, err := ipcacheCount(d)
			d.Close()
			if err != nil || n != benchEntries || !r.Restored {
				b.Fatalf("reboot restored %d prefixes (%v), restored=%v; want %d", n, err, r.Restored, benchEntries)
			}
			addReady(&sum, r)
			b.StartTimer()
		}
		reportReady(b, sum)
	})
}

func ipcacheCount(d *Daemon) (int, int, error) {
	return ipcachemap.New(d.dp.IPCache4(), d.dp.IPCache6()).Count()
}

func addReady(sum *Ready, r Ready) {
	sum.Load += r.Load
	sum.Reconcile += r.Reconcile
	sum.Attach += r.Attach
	sum.Total += r.Total
}

func reportReady(b *testing.B, sum Ready) {
	n := time.Duration(b.N)
	b.ReportMetric(float64((sum.Load/n).Microseconds())/1000, "load-ms")
	b.ReportMetric(float64((sum.Reconcile/n).Microseconds())/1000, "reconcile-ms")
	b.ReportMetric(float64((sum.Attach/n).Microseconds())/1000, "attach-ms")
	b.ReportMetric(float64((sum.Total/n).Microseconds())/1000, "ready-ms")
}
