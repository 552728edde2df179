package bench

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/events"
	"github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/nettest"
)

// Values of bpf/common.h used here.
const (
	dirIngress   = uint8(bpf.Ingress)
	verdictAllow = uint8(bpf.CtdVerdictVERDICT_ALLOW)
	verdictDeny  = uint8(bpf.CtdVerdictVERDICT_DENY)
)

type fixtureKey struct {
	flows, prefixes int
	policy          bool
	flood           bool // the unconfirmed table is full
}

func (k fixtureKey) String() string {
	return fmt.Sprintf("%d flows, %d prefixes, policy %v, flood %v", k.flows, k.prefixes, k.policy, k.flood)
}

// fixture is a loaded ctd datapath with prefilled tables, pinned under its
// own path, and the empty TC program that is the floor.
type fixture struct {
	key    fixtureKey
	pin    string
	dp     *loader.Datapath
	floor  *ebpf.Program
	events *ringbuf.Reader
	ct     *ctmap.Map
	// perClass is the number of prefilled flows of each class.
	perClass int
	// sources4 and sources6 are the ipcache host entries new flows come from.
	sources4, sources6 []netip.Addr
}

// ctMax sizes the conntrack table for a number of flows as an operator
// would: the default, or twice the flows when that is more.
func ctMax(flows int) uint32 {
	return uint32(max(loader.DefaultCTMax, 2*flows))
}

func newFixture(k fixtureKey) (f *fixture, err error) {
	if err := nettest.EnsureBPFFS(); err != nil {
		return nil, err
	}
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	f = &fixture{key: k, pin: filepath.Join(nettest.BPFFSRoot, nettest.PinPrefix+"bench-"+hex.EncodeToString(rnd[:]))}
	defer func() {
		if err != nil {
			f.Close()
			err = fmt.Errorf("fixture with %v: %w", k, err)
		}
	}()
	f.dp, err = loader.Load(loader.Options{PinPath: f.pin, CTMax: ctMax(k.flows)})
	if err != nil {
		return f, err
	}
	f.ct = f.dp.Conntrack()
	f.floor, err = ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "empty_tc",
		Type: ebpf.SchedCLS,
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, -1), // TC_ACT_UNSPEC, as ctd passes
			asm.Return(),
		},
		License: "GPL",
	})
	if err != nil {
		return f, fmt.Errorf("load empty TC program: %w", err)
	}
	f.events, err = ringbuf.NewReader(f.dp.Events())
	if err != nil {
		return f, fmt.Errorf("open events ring buffer: %w", err)
	}
	f.perClass = k.flows / classes
	if err := FillConntrack(f.dp.Conntrack(), k.flows); err != nil {
		return f, err
	}
	if k.flood {
		if err := FillFlood(f.dp.Conntrack(), int(f.dp.CT4Unconfirmed().MaxEntries())); err != nil {
			return f, err
		}
	}
	if err := f.fillIPCache(); err != nil {
		return f, err
	}
	if k.policy {
		if err := f.setPolicy(); err != nil {
			return f, err
		}
	}
	return f, nil
}

// Close releases everything and removes the pins.
func (f *fixture) Close() error {
	var errs []error
	if f.events != nil {
		errs = append(errs, f.events.Close())
	}
	if f.floor != nil {
		errs = append(errs, f.floor.Close())
	}
	if f.dp != nil {
		errs = append(errs, f.dp.Close())
	}
	if err := os.RemoveAll(f.pin); err != nil {
		errs = append(errs, fmt.Errorf("remove pin path %s: %w", f.pin, err))
	}
	*f = fixture{pin: f.pin}
	return errors.Join(errs...)
}

// prefixSet draws n distinct prefixes inside space: 80% host entries, the
// rest CIDRs of random lengths, plus the server's CIDR. It returns the
// prefixes with their identities and the host addresses in draw order.
func prefixSet(n int, space, serverNet netip.Prefix, cidrMin, cidrMax int, rnd *mrand.Rand) (map[netip.Prefix]uint32, []netip.Addr, error) {
	out := make(map[netip.Prefix]uint32, n)
	tries := 0
	tooMany := func() error {
		if tries++; tries > 20*n+1000 {
			return fmt.Errorf("cannot draw %d distinct prefixes in %s", n, space)
		}
		return nil
	}
	out[serverNet] = serverIdentity
	hostBits := space.Addr().BitLen()
	random := func(bits int) netip.Prefix {
		b := space.Addr().AsSlice()
		for i := space.Bits(); i < len(b)*8; i++ {
			if rnd.IntN(2) == 1 {
				b[i/8] |= 0x80 >> (i % 8)
			}
		}
		a, _ := netip.AddrFromSlice(b)
		return netip.PrefixFrom(a, bits).Masked()
	}
	hosts := make([]netip.Addr, 0, n*8/10)
	for len(hosts) < n*8/10 {
		if err := tooMany(); err != nil {
			return nil, nil, err
		}
		p := random(hostBits)
		if _, dup := out[p]; dup {
			continue
		}
		out[p] = hostIdentity0 + uint32(len(hosts)%hostIdentities)
		hosts = append(hosts, p.Addr())
	}
	for k := 0; len(out) < n; {
		if err := tooMany(); err != nil {
			return nil, nil, err
		}
		// Lengths are drawn in proportion to how many prefixes of each
		// length the space holds (capped), so that no length runs out.
		bits := cidrMax
		for bits > cidrMin && rnd.IntN(2) == 0 {
			bits--
		}
		p := random(bits)
		if _, dup := out[p]; dup {
			continue
		}
		out[p] = cidrIdentity0 + uint32(k%256)
		k++
	}
	return out, hosts, nil
}

// putAll writes keys and values with one batch update, or one by one where
// the map type has no batch operations.
func putAll(m *ebpf.Map, keys, vals any, n int) error {
	done, err := m.BatchUpdate(keys, vals, nil)
	if errors.Is(err, ebpf.ErrNotSupported) {
		return putEach(m, keys, vals)
	}
	if err != nil {
		return err
	}
	if done != n {
		return fmt.Errorf("wrote %d of %d entries", done, n)
	}
	return nil
}

func putEach(m *ebpf.Map, keys, vals any) error {
	switch ks := keys.(type) {
	case []bpf.CtdIpcache4Key:
		for i := range ks {
			if err := m.Put(&ks[i], &vals.([]bpf.CtdIpcacheValue)[i]); err != nil {
				return err
			}
		}
	case []bpf.CtdIpcache6Key:
		for i := range ks {
			if err := m.Put(&ks[i], &vals.([]bpf.CtdIpcacheValue)[i]); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("no per-element fallback for %T", keys)
	}
	return nil
}

// fillIPCache writes key.prefixes prefixes into each family's trie.
func (f *fixture) fillIPCache() error {
	rnd := mrand.New(mrand.NewPCG(uint64(f.key.prefixes), 4))
	set4, hosts4, err := prefixSet(f.key.prefixes, space4, serverNet4, 18, 30, rnd)
	if err != nil {
		return err
	}
	set6, hosts6, err := prefixSet(f.key.prefixes, space6, serverNet6, 48, 120, rnd)
	if err != nil {
		return err
	}

	var k4 []bpf.CtdIpcache4Key
	var v4 []bpf.CtdIpcacheValue
	for p, id := range set4 {
		k4 = append(k4, bpf.CtdIpcache4Key{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As4()})
		v4 = append(v4, bpf.CtdIpcacheValue{Identity: id})
	}
	if err := putAll(f.dp.IPCache4(), k4, v4, len(k4)); err != nil {
		return fmt.Errorf("prefill ipcache4: %w", err)
	}
	var k6 []bpf.CtdIpcache6Key
	var v6 []bpf.CtdIpcacheValue
	for p, id := range set6 {
		k6 = append(k6, bpf.CtdIpcache6Key{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As16()})
		v6 = append(v6, bpf.CtdIpcacheValue{Identity: id})
	}
	if err := putAll(f.dp.IPCache6(), k6, v6, len(k6)); err != nil {
		return fmt.Errorf("prefill ipcache6: %w", err)
	}

	f.sources4, f.sources6 = hosts4, hosts6
	if len(f.sources4) == 0 || len(f.sources6) == 0 {
		return fmt.Errorf("prefill ipcache: no host entries to send new flows from (%d prefixes)", f.key.prefixes)
	}
	return nil
}

// setPolicy makes ingress default deny with one rule per host identity
// that allows it to the new flows' port, so every SYN is allowed by the
// first policy lookup.
func (f *fixture) setPolicy() error {
	for id := uint32(hostIdentity0); id < hostIdentity0+hostIdentities; id++ {
		k := bpf.CtdPolicyKey{Identity: id, Port: newPort, Proto: unix.IPPROTO_TCP, Dir: dirIngress}
		if err := f.dp.Policy().Put(&k, &bpf.CtdPolicyValue{Verdict: verdictAllow}); err != nil {
			return fmt.Errorf("write policy rule: %w", err)
		}
	}
	// Change only the defaults and the rule count: the rest (the event rate
	// limit) stays as the loader created it.
	err := f.dp.Config().Update(func(cfg *config.Values) {
		cfg.DefaultVerdict[dirIngress] = verdictDeny
		cfg.PolicyRules = hostIdentities
	})
	if err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	return nil
}

// created returns the datapath's count of conntrack entries created, over
// both directions and all CPUs.
func (f *fixture) created() (uint64, error) {
	var total uint64
	for _, dir := range []uint32{0, 1} {
		var per []bpf.CtdMetricValue
		if err := f.dp.Metrics().Lookup(dir*uint32(metricsmap.ReasonsPerDirection)+uint32(metricsmap.CTCreated), &per); err != nil {
			return 0, fmt.Errorf("read metrics: %w", err)
		}
		for _, v := range per {
			total += v.Packets
		}
	}
	return total, nil
}

// listen registers the benchmark as the event consumer, as ctd monitor
// does, with the event rate limit off so that every event is written; stop
// puts both back.
func (f *fixture) listen() (stop func() error, err error) {
	lim, err := events.GetRateLimit(f.dp.Config())
	if err != nil {
		return nil, err
	}
	if err := events.SetRateLimit(f.dp.Config(), events.RateLimit{}); err != nil {
		return nil, err
	}
	if err := f.dp.Listener().Put(uint32(0), bpf.CtdEvlisten{Until: ^uint64(0), Pid: uint32(os.Getpid())}); err != nil {
		return nil, fmt.Errorf("register as the event consumer: %w", err)
	}
	return func() error {
		return errors.Join(events.Unlisten(f.dp.Listener(), os.Getpid()), events.SetRateLimit(f.dp.Config(), lim))
	}, nil
}

// drainEvents reads what the ring buffer holds, as ctd monitor would, so
// that reservations never start failing.
func (f *fixture) drainEvents() error {
	f.events.SetDeadline(time.Now())
	var rec ringbuf.Record
	for {
		err := f.events.ReadInto(&rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("drain events: %w", err)
		}
	}
}
