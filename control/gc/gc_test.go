package gc

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

// testNow is the CLOCK_MONOTONIC_COARSE instant the pass tests run at: far enough
// from boot that every lifetime fits before it.
const testNow = 100 * time.Hour

// newCT creates an unpinned conntrack table with the datapath's layout.
func newCT(tb testing.TB, maxEntries uint32) *ctmap.Map {
	tb.Helper()
	nettest.RequireRoot(tb)
	ct, closeCT, err := loader.NewConntrack(loader.Options{CTMax: maxEntries})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(closeCT)
	return ct
}

// flowKey returns a distinct key of protocol proto for each i.
func flowKey(proto uint8, i int) ctmap.Key {
	src := netip.AddrFrom4([4]byte{198, 51, 100, byte(1 + i%200)})
	dst := netip.AddrFrom4([4]byte{203, 0, 113, byte(1 + i/200%200)})
	k, _ := ctmap.KeyOf(proto, src, uint16(10000+i/40000), dst, uint16(1+i%40000))
	return k
}

func entry(state ctmap.State, lastSeen time.Duration) ctmap.Entry {
	return ctmap.Entry{
		PacketsOrig: 3, BytesOrig: 300,
		FirstSeen: uint64(lastSeen - time.Second),
		LastSeen:  uint64(lastSeen),
		State:     uint8(state),
	}
}

type stateCase struct {
	name     string
	proto    uint8
	state    ctmap.State
	lifetime func(Lifetimes) time.Duration
}

var stateCases = []stateCase{
	{"tcp syn-sent", unix.IPPROTO_TCP, ctmap.StateSynSent, func(l Lifetimes) time.Duration { return l.TCPSynSent }},
	{"tcp syn-recv", unix.IPPROTO_TCP, ctmap.StateSynRecv, func(l Lifetimes) time.Duration { return l.TCPSynRecv }},
	{"tcp established", unix.IPPROTO_TCP, ctmap.StateEstablished, func(l Lifetimes) time.Duration { return l.TCPEstablished }},
	{"tcp fin-wait", unix.IPPROTO_TCP, ctmap.StateFinWait, func(l Lifetimes) time.Duration { return l.TCPFinWait }},
	{"tcp closed", unix.IPPROTO_TCP, ctmap.StateClosed, func(l Lifetimes) time.Duration { return l.TCPClosed }},
	{"udp new", unix.IPPROTO_UDP, ctmap.StateNew, func(l Lifetimes) time.Duration { return l.UDPNew }},
	{"udp established", unix.IPPROTO_UDP, ctmap.StateEstablished, func(l Lifetimes) time.Duration { return l.UDPEstablished }},
	{"icmp new", unix.IPPROTO_ICMP, ctmap.StateNew, func(l Lifetimes) time.Duration { return l.ICMP }},
	{"icmpv6 established", unix.IPPROTO_ICMPV6, ctmap.StateEstablished, func(l Lifetimes) time.Duration { return l.ICMP }},
	{"gre new", 47, ctmap.StateNew, func(l Lifetimes) time.Duration { return l.Other }},
	{"sctp established", 132, ctmap.StateEstablished, func(l Lifetimes) time.Duration { return l.Other }},
}

// TestPassDeletesExactlyTheExpired puts, for every state, entries idle just
// under, exactly at, and just over the state's lifetime, and checks that one
// pass deletes exactly those over it, with default and with custom lifetimes.
func TestPassDeletesExactlyTheExpired(t *testing.T) {
	custom := Lifetimes{
		TCPSynSent: 3 * time.Second, TCPSynRecv: 4 * time.Second, TCPEstablished: 5 * time.Second,
		TCPFinWait: 6 * time.Second, TCPClosed: 7 * time.Second, UDPNew: 8 * time.Second,
		UDPEstablished: 9 * time.Second, ICMP: 11 * time.Second, Other: 12 * time.Second,
	}
	for _, lt := range []struct {
		name string
		lt   Lifetimes
	}{{"defaults", DefaultLifetimes()}, {"custom", custom}} {
		t.Run(lt.name, func(t *testing.T) {
			ct := newCT(t, 4096)
			type put struct {
				k       ctmap.Key
				e       ctmap.Entry
				expired bool
				what    string
			}
			var puts []put
			i := 0
			for _, sc := range stateCases {
				life := sc.lifetime(lt.lt)
				for _, idle := range []struct {
					d       time.Duration
					expired bool
				}{
					{0, false},
					{life - time.Millisecond, false},
					{life, false}, // last_seen + lifetime == now: not yet
					{life + time.Nanosecond, true},
					{life + time.Hour, true},
				} {
					p := put{flowKey(sc.proto, i), entry(sc.state, testNow-idle.d), idle.expired,
						fmt.Sprintf("%s idle %v (lifetime %v)", sc.name, idle.d, life)}
					i++
					if err := ct.Put(&p.k, &p.e); err != nil {
						t.Fatal(err)
					}
					puts = append(puts, p)
				}
			}
			// An entry stamped after now (refreshed since now was read) is live.
			future := put{flowKey(unix.IPPROTO_TCP, i), entry(ctmap.StateClosed, testNow+time.Second), false, "stamped after now"}
			if err := ct.Put(&future.k, &future.e); err != nil {
				t.Fatal(err)
			}
			puts = append(puts, future)

			res, err := Pass(ct, lt.lt, testNow)
			if err != nil {
				t.Fatalf("Pass: %v", err)
			}
			wantDeleted := 0
			for _, p := range puts {
				_, err := ct.Lookup(&p.k)
				gone := errors.Is(err, ebpf.ErrKeyNotExist)
				if err != nil && !gone {
					t.Fatal(err)
				}
				if gone != p.expired {
					t.Errorf("%s: deleted=%v, want %v", p.what, gone, p.expired)
				}
				if p.expired {
					wantDeleted++
				}
			}
			if res.Scanned != len(puts) || res.Deleted != wantDeleted || res.Refreshed != 0 || res.Vanished != 0 {
				t.Errorf("Result %+v, want Scanned %d Deleted %d", res, len(puts), wantDeleted)
			}
			again, err := Pass(ct, lt.lt, testNow)
			if err != nil || again.Deleted != 0 || again.Scanned != len(puts)-wantDeleted {
				t.Errorf("second pass: %+v, %v; want nothing more deleted of %d", again, err, len(puts)-wantDeleted)
			}
		})
	}
}

// TestPassRace drives the datapath's races with a pass through its hook,
// between the scan's read of an expired entry and its deletion: an entry
// refreshed by a packet, one evicted and created anew by the datapath, one
// evicted, and an untouched expired one.
func TestPassRace(t *testing.T) {
	lt := DefaultLifetimes()
	ct := newCT(t, 1024)
	x, err := ct.NewExpirer()
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	stale := testNow - lt.TCPClosed - time.Minute
	keys := map[string]ctmap.Key{}
	for i, name := range []string{"refreshed", "recreated", "evicted", "expired", "live"} {
		k := flowKey(unix.IPPROTO_TCP, i)
		e := entry(ctmap.StateClosed, stale)
		if name == "live" {
			e = entry(ctmap.StateEstablished, testNow-time.Second)
		}
		if err := ct.Put(&k, &e); err != nil {
			t.Fatal(err)
		}
		keys[name] = k
	}
	nameOf := func(k *ctmap.Key) string {
		for n, kk := range keys {
			if kk == *k {
				return n
			}
		}
		return "?"
	}
	// What the datapath writes: a refresh (a SYN reusing the closed tuple
	// makes a new SYN_SENT flow), and a new entry after an eviction.
	refresh := entry(ctmap.StateSynSent, testNow+time.Millisecond)
	recreate := entry(ctmap.StateSynSent, testNow+2*time.Millisecond)
	recreate.PacketsOrig = 1

	var seen []string
	res, err := pass(ct, x, lt, testNow, hooks{beforeDelete: func(k *ctmap.Key, _ *ctmap.Entry) {
		n := nameOf(k)
		seen = append(seen, n)
		switch n {
		case "refreshed":
			if err := ct.Put(k, &refresh); err != nil {
				t.Error(err)
			}
		case "recreated", "evicted":
			if _, err := ct.Delete([]ctmap.Key{*k}); err != nil {
				t.Error(err)
			}
			if n == "recreated" {
				if err := ct.Put(k, &recreate); err != nil {
					t.Error(err)
				}
			}
		}
	}})
	if err != nil {
		t.Fatalf("pass: %v", err)
	}
	want := Result{Scanned: 5, Deleted: 1, Refreshed: 2, Vanished: 1}
	res.Duration = 0
	if res != want {
		t.Errorf("Result %+v, want %+v", res, want)
	}
	if len(seen) != 4 {
		t.Errorf("hook saw %v; want the 4 expired entries", seen)
	}
	for name, want := range map[string]*ctmap.Entry{
		"refreshed": &refresh,
		"recreated": &recreate,
		"evicted":   nil,
		"expired":   nil,
	} {
		k := keys[name]
		got, err := ct.Lookup(&k)
		switch {
		case want == nil && !errors.Is(err, ebpf.ErrKeyNotExist):
			t.Errorf("%s: still present (%v)", name, err)
		case want != nil && err != nil:
			t.Errorf("%s: deleted although refreshed during the pass: %v", name, err)
		case want != nil && got != *want:
			t.Errorf("%s: entry %+v, want %+v", name, got, *want)
		}
	}
	k := keys["live"]
	if _, err := ct.Lookup(&k); err != nil {
		t.Errorf("live entry: %v", err)
	}
}

// TestPassManyBatches runs a pass over more expired entries than one run
// of the expire program takes, refreshing every seventh during the pass.
func TestPassManyBatches(t *testing.T) {
	lt := DefaultLifetimes()
	ct := newCT(t, 4096)
	x, err := ct.NewExpirer()
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	const n = 3*ctmap.ExpireBatch + 5
	for i := range n {
		k := flowKey(unix.IPPROTO_UDP, i)
		e := entry(ctmap.StateEstablished, testNow-lt.UDPEstablished-time.Second)
		if err := ct.Put(&k, &e); err != nil {
			t.Fatal(err)
		}
	}
	calls, refreshed := 0, 0
	res, err := pass(ct, x, lt, testNow, hooks{beforeDelete: func(k *ctmap.Key, _ *ctmap.Entry) {
		calls++
		if calls%7 == 0 {
			e := entry(ctmap.StateEstablished, testNow)
			if err := ct.Put(k, &e); err != nil {
				t.Error(err)
			}
			refreshed++
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Scanned != n || res.Deleted != n-refreshed || res.Refreshed != refreshed || refreshed == 0 {
		t.Errorf("Result %+v, want %d scanned, %d deleted, %d refreshed", res, n, n-refreshed, refreshed)
	}
	if left, err := ct.Count(); err != nil || left != refreshed {
		t.Errorf("%d entries left (%v), want the %d refreshed", left, err, refreshed)
	}
}

func TestLifetimesFlags(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		want    func(*Lifetimes)
		wantErr string
	}{
		{nil, func(*Lifetimes) {}, ""},
		{[]string{"--ct-lifetime-tcp-closed=5s", "--ct-lifetime-udp-new=1m"}, func(l *Lifetimes) {
			l.TCPClosed, l.UDPNew = 5*time.Second, time.Minute
		}, ""},
		{[]string{"--ct-lifetime-tcp-established=24h", "--ct-lifetime-other=2m", "--ct-lifetime-icmp=1s"}, func(l *Lifetimes) {
			l.TCPEstablished, l.Other, l.ICMP = 24*time.Hour, 2*time.Minute, time.Second
		}, ""},
		{[]string{"--ct-lifetime-udp-established=0"}, nil, "invalid --ct-lifetime-udp-established 0s"},
		{[]string{"--ct-lifetime-tcp-syn-sent=-1s"}, nil, "invalid --ct-lifetime-tcp-syn-sent -1s"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			lt := DefaultLifetimes()
			fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
			lt.AddFlags(fs)
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			err := lt.Validate()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Validate() = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := DefaultLifetimes()
			tc.want(&want)
			if lt != want {
				t.Errorf("parsed %+v, want %+v", lt, want)
			}
		})
	}
}

func TestLifetimesOf(t *testing.T) {
	lt := DefaultLifetimes()
	for _, sc := range stateCases {
		if got, want := lt.Of(sc.proto, sc.state), sc.lifetime(lt); got != want {
			t.Errorf("%s: lifetime %v, want %v", sc.name, got, want)
		}
	}
	// States a protocol never takes err on the long side.
	if got := lt.Of(unix.IPPROTO_TCP, ctmap.StateNew); got != lt.TCPEstablished {
		t.Errorf("tcp NEW: %v, want the longest TCP lifetime %v", got, lt.TCPEstablished)
	}
	if got := lt.Of(unix.IPPROTO_UDP, ctmap.StateClosed); got != lt.UDPEstablished {
		t.Errorf("udp CLOSED: %v, want the longest UDP lifetime %v", got, lt.UDPEstablished)
	}
}

func TestNextInterval(t *testing.T) {
	cfg := RunnerConfig{MinInterval: time.Second, MaxInterval: time.Minute, FillThreshold: 0.8}
	for _, tc := range []struct {
		name string
		cur  time.Duration
		res  Result
		fill float64
		want time.Duration
	}{
		{"idle stretches", 10 * time.Second, Result{Scanned: 100}, 0.1, 15 * time.Second},
		{"empty table stretches", 10 * time.Second, Result{}, 0, 15 * time.Second},
		{"few deletions stretch", 10 * time.Second, Result{Scanned: 100, Deleted: 4}, 0.1, 15 * time.Second},
		{"some deletions keep", 10 * time.Second, Result{Scanned: 100, Deleted: 10}, 0.1, 10 * time.Second},
		{"many deletions halve", 10 * time.Second, Result{Scanned: 100, Deleted: 25}, 0.1, 5 * time.Second},
		{"filling halves", 10 * time.Second, Result{Scanned: 100}, 0.85, 5 * time.Second},
		{"bounded below", 1500 * time.Millisecond, Result{Scanned: 100, Deleted: 90}, 0.1, time.Second},
		{"bounded above", 50 * time.Second, Result{Scanned: 100}, 0.1, time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := nextInterval(tc.cur, tc.res, tc.fill, cfg); got != tc.want {
				t.Errorf("nextInterval(%v, %+v, %v) = %v, want %v", tc.cur, tc.res, tc.fill, got, tc.want)
			}
		})
	}
}

func TestEstimateFill(t *testing.T) {
	for _, tc := range []struct {
		entries int
		created uint64
		max     uint32
		want    float64
	}{
		{0, 0, 100, 0},
		{50, 30, 100, 0.8},
		{90, 30, 100, 1},
		{10, 0, 0, 0},
	} {
		if got := EstimateFill(tc.entries, tc.created, tc.max); got != tc.want {
			t.Errorf("EstimateFill(%d, %d, %d) = %v, want %v", tc.entries, tc.created, tc.max, got, tc.want)
		}
	}
}

func TestRunnerConfigInvalid(t *testing.T) {
	ct := newCT(t, 16)
	for _, tc := range []struct {
		cfg  RunnerConfig
		want string
	}{
		{RunnerConfig{MinInterval: time.Minute, MaxInterval: time.Second}, "maximum interval"},
		{RunnerConfig{Interval: time.Hour}, "invalid GC interval 1h0m0s"},
		{RunnerConfig{FillThreshold: 1.5}, "fill threshold"},
		{RunnerConfig{Lifetimes: Lifetimes{TCPClosed: time.Second}}, "invalid --ct-lifetime-tcp-syn-sent"},
	} {
		if _, err := NewRunner(ct, tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewRunner(%+v) = %v, want an error with %q", tc.cfg, err, tc.want)
		}
	}
}

// waitFor polls cond until it holds or a generous deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRunnerWakes checks that a Runner passes at start, then early on Wake,
// on a failed insert and on an estimated fill over the threshold, although
// its regular interval is an hour.
func TestRunnerWakes(t *testing.T) {
	ct := newCT(t, 1000)
	var created, failed atomic.Uint64
	r, err := NewRunner(ct, RunnerConfig{
		Interval: time.Hour, MinInterval: 10 * time.Millisecond, MaxInterval: time.Hour,
		Signals: func() (Signals, error) {
			return Signals{Created: created.Load(), InsertFailed: failed.Load()}, nil
		},
		SignalInterval: 5 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	startRunner(t, r)

	runs := func(n uint64) func() bool { return func() bool { return r.Stats().Runs >= n } }
	waitFor(t, "the pass at start", runs(1))

	// An expired entry put now is deleted by the woken pass.
	now := ctmap.Now().Mono()
	k := flowKey(unix.IPPROTO_UDP, 1)
	e := entry(ctmap.StateNew, now-DefaultLifetimes().UDPNew-time.Second)
	if err := ct.Put(&k, &e); err != nil {
		t.Fatal(err)
	}
	r.Wake()
	waitFor(t, "a pass after Wake", runs(2))
	if st := r.Stats(); st.Deleted != 1 || st.Last.Deleted != 1 || st.Wakes != 1 {
		t.Errorf("after Wake: %+v, want one entry deleted by one woken pass", st)
	}

	failed.Add(1)
	waitFor(t, "a pass after an insert failure", runs(3))

	// 850 entries created since the last pass in a table of 1000: 85% > 80%.
	created.Add(850)
	if f := r.EstimatedFill(created.Load()); f != 0.85 {
		t.Errorf("EstimatedFill = %v, want 0.85", f)
	}
	waitFor(t, "a pass after the fill estimate crossed 80%", runs(4))
	if f := r.EstimatedFill(created.Load()); f != 0 {
		t.Errorf("EstimatedFill after the pass = %v, want 0 (the pass counted the table)", f)
	}
	time.Sleep(50 * time.Millisecond)
	if st := r.Stats(); st.Runs != 4 || st.Wakes != 3 || st.Errors != 0 {
		t.Errorf("Stats %+v: want exactly 4 passes, 3 of them woken, no errors", st)
	}
}

// censusRecorder is a Census that records what a Runner tells it.
type censusRecorder struct {
	mu     sync.Mutex
	begins int
	flows  []ctmap.Flow
	ends   []bool
}

func (c *censusRecorder) Begin() { c.mu.Lock(); c.begins++; c.flows = nil; c.mu.Unlock() }
func (c *censusRecorder) Add(fl ctmap.Flow) {
	c.mu.Lock()
	c.flows = append(c.flows, fl)
	c.mu.Unlock()
}
func (c *censusRecorder) End(ok bool) { c.mu.Lock(); c.ends = append(c.ends, ok); c.mu.Unlock() }

// TestRunnerCensus: a pass shows its census every flow it keeps, and none
// it deletes.
func TestRunnerCensus(t *testing.T) {
	ct := newCT(t, 1000)
	now := ctmap.Now().Mono()
	lt := DefaultLifetimes()
	for i := range 10 {
		idle := time.Duration(0)
		if i%2 == 1 {
			idle = lt.UDPNew + time.Second
		}
		k, e := flowKey(unix.IPPROTO_UDP, i), entry(ctmap.StateNew, now-idle)
		if err := ct.Put(&k, &e); err != nil {
			t.Fatal(err)
		}
	}
	census := &censusRecorder{}
	r, err := NewRunner(ct, RunnerConfig{Interval: time.Hour, MaxInterval: time.Hour, Census: census})
	if err != nil {
		t.Fatal(err)
	}
	startRunner(t, r)
	waitFor(t, "the pass at start", func() bool { return r.Stats().Runs >= 1 })

	census.mu.Lock()
	defer census.mu.Unlock()
	if census.begins != 1 || !slices.Equal(census.ends, []bool{true}) || len(census.flows) != 5 {
		t.Fatalf("census: %d begins, ends %v, %d flows; want 1 begin, one complete end, the 5 live flows", census.begins, census.ends, len(census.flows))
	}
	for _, fl := range census.flows {
		if fl.Proto != unix.IPPROTO_UDP || fl.State != ctmap.StateNew {
			t.Errorf("census saw %+v, want a UDP flow in state NEW", fl)
		}
	}
}

// startRunner runs r until the test ends.
func startRunner(t *testing.T, r *Runner) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := r.Run(ctx); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
}
