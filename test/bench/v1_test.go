package bench

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

// packetV1 turns the first release's column off: a profile of ctd's
// program must not sample the first release's programs of the same name.
var packetV1 = flag.Bool("packet.v1", true, "BenchmarkPacket: run the first release's datapath beside the cases marked V1")

// The first release's layouts and constants (bpf/common.h at that commit),
// written here because this build's generated types are of its own layout.
const (
	v1MetricMax      = 64 // METRIC_MAX: index = dir * METRIC_MAX + reason
	v1MetricCreated  = 32 // M_CT_CREATED
	v1StateSynSent   = 2  // CT_SYN_SENT
	v1FlagOpenedIngr = 1  // CT_F_OPENED_INGRESS
)

// v1Key is ct_key of the first release: one table for both families.
type v1Key struct {
	AddrA, AddrB [16]byte
	PortA, PortB uint16 // network order, as stored
	Proto        uint8
	Family       uint8
	Pad          [2]uint8
}

// v1Entry is ct_entry of the first release.
type v1Entry struct {
	PacketsOrig, BytesOrig, PacketsReply, BytesReply uint64
	FirstSeen, LastSeen                              uint64
	SrcIdentity, DstIdentity, Ifindex                uint32
	State, OrigIsB, TCPFlagsOrig, TCPFlagsReply      uint8
	Flags                                            uint8
	Pad                                              [7]uint8
}

// v1KeyOf is the first release's canonical key of a flow: endpoint a is the
// lower (address, port), addresses compared as two host-order 64-bit words,
// ports as stored; origIsB says that the originator is endpoint b.
func v1KeyOf(fl flow) (k v1Key, origIsB bool) {
	k = v1Key{Proto: fl.proto, Family: 6}
	if fl.client.Is4() {
		k.Family = 4
	}
	var cb, sb [16]byte
	copy(cb[:], fl.client.AsSlice())
	copy(sb[:], fl.server.AsSlice())
	cp, sp := swap16(fl.cport), swap16(fl.sport)
	c := 0
	for i := 0; i < 16 && c == 0; i += 8 {
		x, y := binary.LittleEndian.Uint64(cb[i:]), binary.LittleEndian.Uint64(sb[i:])
		if x != y {
			c = map[bool]int{true: -1, false: 1}[x < y]
		}
	}
	origIsB = c > 0 || c == 0 && cp > sp
	if origIsB {
		k.AddrA, k.AddrB, k.PortA, k.PortB = sb, cb, sp, cp
	} else {
		k.AddrA, k.AddrB, k.PortA, k.PortB = cb, sb, cp, sp
	}
	return k, origIsB
}

// swap16 stores a port in network order in a little-endian uint16.
func swap16(v uint16) uint16 { return v>>8 | v<<8 }

// v1Datapath is the first release's datapath: its programs, loaded from the
// object committed at test/first-release.commit, and maps of its own (not
// pinned), sized and filled as the fixture sizes and fills this build's.
type v1Datapath struct {
	coll            *ebpf.Collection
	ingress, egress *ebpf.Program
	ct, metrics     *ebpf.Map
	events          *ringbuf.Reader
}

// newV1Datapath loads the first release's datapath for the fixture f: its
// one conntrack table sized as f's confirmed table and filled with the same
// established flows (and, for a flood fixture, as many half-open flows as
// f's IPv4 unconfirmed table holds), its tries with the same prefixes (host
// entries too: v1 has no hashes), and its configuration as its loader
// created it (default allow, the default event rate limit).
func newV1Datapath(tb testing.TB, f *fixture, set ipcacheSet) (v *v1Datapath, err error) {
	spec := nettest.FirstReleaseSpec(tb)
	ct, ok := spec.Maps["ct_v1"]
	if !ok {
		return nil, errors.New("the first release's datapath has no ct_v1")
	}
	ct.MaxEntries = ctMax(f.key.flows)
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		return nil, fmt.Errorf("load the first release's datapath: %w", err)
	}
	v = &v1Datapath{coll: coll, ingress: coll.Programs["ctd_ingress"], egress: coll.Programs["ctd_egress"],
		ct: coll.Maps["ct_v1"], metrics: coll.Maps["metrics_v1"]}
	defer func() {
		if err != nil {
			v.Close()
		}
	}()
	for name, m := range map[string]any{"ctd_ingress": v.ingress, "ctd_egress": v.egress, "ct_v1": v.ct, "metrics_v1": v.metrics,
		"config_v1": coll.Maps["config_v1"], "ipcache4_v1": coll.Maps["ipcache4_v1"], "ipcache6_v1": coll.Maps["ipcache6_v1"]} {
		if m == (*ebpf.Program)(nil) || m == (*ebpf.Map)(nil) {
			return v, fmt.Errorf("the first release's datapath has no %s", name)
		}
	}
	err = config.New(coll.Maps["config_v1"], "").Update(func(c *config.Values) {
		c.EventsRate, c.EventsBurst = loader.DefaultEventsRate, loader.DefaultEventsRate
	})
	if err != nil {
		return v, fmt.Errorf("first release's config: %w", err)
	}
	if v.events, err = ringbuf.NewReader(coll.Maps["events_v1"]); err != nil {
		return v, fmt.Errorf("first release's events ring buffer: %w", err)
	}
	if err := v.fillConntrack(f); err != nil {
		return v, err
	}
	if err := set.writeTries(coll.Maps["ipcache4_v1"], coll.Maps["ipcache6_v1"]); err != nil {
		return v, fmt.Errorf("first release's ipcache: %w", err)
	}
	return v, nil
}

// fillConntrack writes the fixture's established flows, and for a flood
// fixture its half-open flows, into the one table.
func (v *v1Datapath) fillConntrack(f *fixture) error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &ts); err != nil {
		return err
	}
	now := uint64(ts.Nano())
	var (
		keys []v1Key
		vals []v1Entry
	)
	for i := range f.key.flows {
		fl := flowOf(i%classes, i/classes)
		k, origIsB := v1KeyOf(fl)
		e := v1Entry{PacketsOrig: 1, BytesOrig: 64, PacketsReply: 1, BytesReply: 64, FirstSeen: now, LastSeen: now,
			SrcIdentity: hostIdentity0, DstIdentity: serverIdentity, Ifindex: 1, State: stateEstablished}
		if origIsB {
			e.OrigIsB = 1
		}
		if fl.proto == unix.IPPROTO_TCP {
			e.TCPFlagsOrig, e.TCPFlagsReply = 0x12, 0x12
		}
		keys, vals = append(keys, k), append(vals, e)
	}
	if f.key.flood {
		for _, fl := range floodFlows(int(f.dp.CT4Unconfirmed().MaxEntries())) {
			k, origIsB := v1KeyOf(fl)
			e := v1Entry{PacketsOrig: 1, BytesOrig: 54, FirstSeen: now, LastSeen: now,
				SrcIdentity: hostIdentity0, DstIdentity: serverIdentity, Ifindex: 1,
				State: v1StateSynSent, TCPFlagsOrig: 0x02, Flags: v1FlagOpenedIngr}
			if origIsB {
				e.OrigIsB = 1
			}
			keys, vals = append(keys, k), append(vals, e)
		}
	}
	for len(keys) > 0 {
		n := min(len(keys), 1<<16)
		done, err := v.ct.BatchUpdate(keys[:n], vals[:n], nil)
		if err != nil {
			return fmt.Errorf("fill the first release's conntrack table: %w", err)
		}
		if done != n {
			return fmt.Errorf("fill the first release's conntrack table: wrote %d of %d entries", done, n)
		}
		keys, vals = keys[n:], vals[n:]
	}
	return nil
}

// program returns the first release's program of the hook prog is for.
func (v *v1Datapath) program(f *fixture, prog *ebpf.Program) *ebpf.Program {
	if prog == f.dp.CtdIngress {
		return v.ingress
	}
	return v.egress
}

// forget deletes the entries the new flows of a round created and drains
// the events they wrote.
func (v *v1Datapath) forget(flows []flow) error {
	keys := make([]v1Key, len(flows))
	for i, fl := range flows {
		keys[i], _ = v1KeyOf(fl)
	}
	n, err := v.ct.BatchDelete(keys, nil)
	if err != nil {
		return fmt.Errorf("first release: delete the round's new flows: %w", err)
	}
	if n != len(keys) {
		return fmt.Errorf("first release: %d SYNs of distinct new flows left %d conntrack entries, want one each", len(keys), n)
	}
	return drain(v.events)
}

// created is the first release's count of conntrack entries created.
func (v *v1Datapath) created() (uint64, error) {
	var total uint64
	for _, dir := range []uint32{0, 1} {
		var per []struct{ Packets, Bytes uint64 }
		if err := v.metrics.Lookup(dir*v1MetricMax+v1MetricCreated, &per); err != nil {
			return 0, fmt.Errorf("read the first release's metrics: %w", err)
		}
		for _, c := range per {
			total += c.Packets
		}
	}
	return total, nil
}

// Close releases the datapath.
func (v *v1Datapath) Close() error {
	var errs []error
	if v.events != nil {
		errs = append(errs, v.events.Close())
	}
	v.coll.Close()
	return errors.Join(errs...)
}
