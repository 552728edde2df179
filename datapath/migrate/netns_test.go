package migrate

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/attach"
	cfgmap "github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/pins"
	"github.com/ctd-dev/ctd/test/nettest"
)

// secondIface is a second interface in host A, one end of a veth pair
// there; its name sorts after nettest.IfaceA.
const secondIface = "ctdz0"

// attachedDatapath loads this build's datapath and attaches it in host h:
// TCX on the veth end, tc on a second veth added beside it.
func attachedDatapath(t *testing.T, h *nettest.Host, o loader.Options) (loader.Options, *loader.Datapath) {
	t.Helper()
	o.PinPath = nettest.PinPath(t)
	dp, err := loader.Load(o)
	if err != nil {
		t.Fatalf("loader.Load: %v", err)
	}
	t.Cleanup(func() { dp.Close() })
	attachIn(t, h, o.PinPath, attach.Programs{Ingress: dp.CtdIngress, Egress: dp.CtdEgress})
	return o, dp
}

// attachedFirstRelease loads the first release's datapath (layout v1,
// nettest.FirstReleaseSpec) with its maps pinned at a new pin path, ct_v1
// sized by o.CTMax, and attaches it in host h as attachedDatapath does. It
// returns the collection and its spec.
func attachedFirstRelease(t *testing.T, h *nettest.Host, o loader.Options) (loader.Options, *ebpf.Collection, *ebpf.CollectionSpec) {
	t.Helper()
	o.PinPath = nettest.PinPath(t)
	spec := nettest.FirstReleaseSpec(t)
	spec.Maps[loader.CTV1Map].MaxEntries = o.CTMax
	if err := os.MkdirAll(o.PinPath, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, ms := range spec.Maps {
		if _, _, ok := loader.SplitName(name); ok {
			ms.Pinning = ebpf.PinByName
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: o.PinPath}})
	if err != nil {
		t.Fatalf("load the first release's datapath: %v", err)
	}
	t.Cleanup(func() { coll.Close() })
	attachIn(t, h, o.PinPath, attach.Programs{Ingress: coll.Programs[bpf.CtdProgCtdIngress], Egress: coll.Programs[bpf.CtdProgCtdEgress]})
	return o, coll, spec
}

// attachIn attaches progs in host h: TCX on the veth end, tc on a second
// veth added beside it.
func attachIn(t *testing.T, h *nettest.Host, pinPath string, progs attach.Programs) {
	t.Helper()
	err := h.Do(func() error {
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: secondIface}, PeerName: secondIface + "p"}
		if err := netlink.LinkAdd(v); err != nil {
			return fmt.Errorf("add veth %s: %w", secondIface, err)
		}
		if err := netlink.LinkSetUp(v); err != nil {
			return err
		}
		if _, err := attach.Attach(h.Iface, attach.ModeTCX, progs, pins.New(pinPath).Links()); err != nil {
			return err
		}
		_, err := attach.Attach(secondIface, attach.ModeTC, progs, pins.New(pinPath).Links())
		return err
	})
	if err != nil {
		t.Fatalf("attach in %s: %v", h.Name, err)
	}
}

// status returns what is attached to the interfaces, in h.
func status(t *testing.T, h *nettest.Host, linkDir string, ifaces ...string) []attach.Attachment {
	t.Helper()
	var out []attach.Attachment
	err := h.Do(func() error {
		for _, iface := range ifaces {
			a, err := attach.Status(iface, linkDir)
			if err != nil {
				return err
			}
			out = append(out, a)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	return out
}

func progUsesMap(t *testing.T, progID ebpf.ProgramID, mapID ebpf.MapID) bool {
	t.Helper()
	ids, err := attach.ProgramMaps(progID)
	if err != nil {
		t.Fatal(err)
	}
	return slices.Contains(ids, mapID)
}

// TestRollbackWhenSwitchFails fails the switch on the second of two
// interfaces and checks that the first is switched back and that the old
// maps, pins and programs stay; then migrates for real.
func TestRollbackWhenSwitchFails(t *testing.T) {
	pair := nettest.NewPair(t)
	a := pair.A
	o, _ := attachedDatapath(t, a, loader.Options{CTMax: 1024, IPCacheMax: 1024})
	want := fillCT(t, o.PinPath, 300)
	ifaces := []string{a.Iface, secondIface}
	linkDir := pins.New(o.PinPath).Links()
	old := status(t, a, linkDir, ifaces...)
	if old[0].Mode != attach.ModeTCX || old[1].Mode != attach.ModeTC {
		t.Fatalf("attached %+v, want tcx on %s and tc on %s", old, a.Iface, secondIface)
	}
	before := pinnedIDs(t, o.PinPath)

	o.CTMax = 4096
	spec, err := o.Spec()
	if err != nil {
		t.Fatal(err)
	}
	var firstWasSwitched bool
	injected := errors.New("injected switch failure")
	beforeSwitch := func(iface string) error {
		if iface != secondIface {
			return nil
		}
		// The first interface runs the new programs by now.
		st, err := attach.Status(a.Iface, linkDir)
		firstWasSwitched = err == nil && st.IngressProgID != old[0].IngressProgID
		return injected
	}
	err = a.Do(func() error {
		coll, _, err := run(config{opts: o, spec: spec, hooks: hooks{beforeSwitch: beforeSwitch}})
		if err == nil {
			coll.Close()
		}
		return err
	})
	if !errors.Is(err, injected) || !strings.Contains(err.Error(), secondIface) {
		t.Fatalf("migration with a failing switch: got %v, want the injected failure on %s", err, secondIface)
	}
	if !firstWasSwitched {
		t.Fatalf("%s was not switched before %s failed: the rollback went untested", a.Iface, secondIface)
	}
	if got := status(t, a, linkDir, ifaces...); !slices.Equal(got, old) {
		t.Fatalf("after the rollback: attached %+v, want the old programs %+v", got, old)
	}
	checkUnchanged(t, o.PinPath, before)
	checkNoTempPins(t, o.PinPath)
	ct := conntrack(t, o.PinPath)
	if ct.MaxEntries() != 1024 {
		t.Errorf("ct4_v2 has max_entries %d after the rollback, want 1024", ct.MaxEntries())
	}
	checkCT(t, ct, want)

	// Without the failure, both interfaces move to programs on the new map.
	var rep Report
	err = a.Do(func() error {
		dp, r, err := Load(o, Interfaces{})
		if err == nil {
			dp.Close()
		}
		rep = r
		return err
	})
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if !slices.Equal(rep.Switched, ifaces) {
		t.Errorf("switched %v, want %v", rep.Switched, ifaces)
	}
	newCT := pinnedIDs(t, o.PinPath)[loader.CT4Map]
	for _, st := range status(t, a, linkDir, ifaces...) {
		for _, id := range []ebpf.ProgramID{st.IngressProgID, st.EgressProgID} {
			if !progUsesMap(t, id, newCT) {
				t.Errorf("%s: program %d does not use the new ct4_v2 (map %d)", st.Iface, id, newCT)
			}
		}
	}
	checkCT(t, conntrack(t, o.PinPath), want)
}

// TestMigrateUnderTraffic migrates while a UDP request/echo stream and a
// ping cross a veth whose ingress is default deny, so that a conntrack
// entry missing for a moment drops replies.
func TestMigrateUnderTraffic(t *testing.T) {
	nettest.RequireTool(t, "ping", "iputils-ping")
	nettest.RequireTool(t, "nsenter", "util-linux")
	for _, tc := range []struct {
		name  string
		ctMax uint32
		first bool // from the first release's datapath (layout v1)
	}{
		{"resize", 4096, false},
		{"upgrade from the first release", 1024, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pair := nettest.NewPair(t)
			a, b := pair.A, pair.B
			// The old datapath: its conntrack table (and spec) and the maps
			// the test reads and writes.
			var (
				o                            loader.Options
				oldCT, oldConfig, oldMetrics *ebpf.Map
				oldCTSpec                    *ebpf.MapSpec
				convs                        []loader.Converter
			)
			if tc.first {
				var coll *ebpf.Collection
				var spec *ebpf.CollectionSpec
				o, coll, spec = attachedFirstRelease(t, a, loader.Options{CTMax: 1024, IPCacheMax: 1024})
				oldCT, oldCTSpec = coll.Maps[loader.CTV1Map], spec.Maps[loader.CTV1Map]
				oldConfig, oldMetrics = coll.Maps[loader.ConfigMap], coll.Maps[loader.MetricsMap]
				convs = loader.Converters()
			} else {
				var dp *loader.Datapath
				o, dp = attachedDatapath(t, a, loader.Options{CTMax: 1024, IPCacheMax: 1024})
				spec, err := o.Spec()
				if err != nil {
					t.Fatal(err)
				}
				oldCT, oldCTSpec = dp.CT4(), spec.Maps[loader.CT4Map]
				oldConfig, oldMetrics = dp.ByName()[loader.ConfigMap], dp.Metrics()
			}
			cfg := bpf.CtdConfig{DefaultVerdict: [2]uint8{2, 0}} // ingress: deny
			if err := cfgmap.New(oldConfig, o.PinPath).Update(func(c *bpf.CtdConfig) { *c = cfg }); err != nil {
				t.Fatal(err)
			}
			checkIngressDenied(t, a, b)

			srv, err := b.ListenPacket("udp4", netip.AddrPortFrom(b.IPv4, 0).String())
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Close()
			go echo(srv)
			conn, err := a.Dial("udp4", srv.LocalAddr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			key, _ := ctmap.KeyOf(17, a.IPv4, uint16(conn.LocalAddr().(*net.UDPAddr).Port),
				b.IPv4, uint16(srv.LocalAddr().(*net.UDPAddr).Port))

			ping := a.Command("ping", "-n", "-q", "-c", "15", "-i", "0.2", "-W", "2", b.IPv4.String())
			pingOut := make(chan error, 1)
			var pingText []byte
			go func() {
				var err error
				pingText, err = ping.CombinedOutput()
				pingOut <- err
			}()

			s := stream(conn, time.Millisecond)
			time.Sleep(time.Second)

			before, ok := readRaw(t, oldCT, oldCTSpec, key)
			if !ok || before.packetsOrig == 0 {
				t.Fatalf("no conntrack entry for the UDP stream before the migration")
			}
			spec, err := bpf.LoadCtd()
			if err != nil {
				t.Fatal(err)
			}
			o.CTMax = tc.ctMax
			// Between pass 1 and the switch the stream goes on for a while
			// and a new flow starts: pass 2 must bring both over.
			var late net.Conn
			afterCopy := func() error {
				var err error
				if late, err = a.Dial("udp4", srv.LocalAddr().String()); err != nil {
					return err
				}
				if err := roundTrip(late); err != nil {
					return fmt.Errorf("new flow before the switch: %w", err)
				}
				time.Sleep(100 * time.Millisecond)
				return nil
			}
			var rep Report
			var coll *ebpf.Collection
			start := time.Now()
			err = a.Do(func() (err error) {
				coll, rep, err = run(config{opts: o, spec: spec, converters: convs, hooks: hooks{afterCopy: afterCopy}})
				return err
			})
			if late != nil {
				defer late.Close()
			}
			if err != nil {
				t.Fatalf("migration under traffic: %v", err)
			}
			defer coll.Close()
			t.Logf("migration took %v: %+v", time.Since(start), rep)
			if !slices.Equal(rep.Switched, []string{a.Iface, secondIface}) {
				t.Errorf("switched %v, want %s and %s", rep.Switched, a.Iface, secondIface)
			}

			ct := slices.IndexFunc(rep.Maps, func(r MapReport) bool { return r.Map == loader.CT4Map })
			if ct < 0 || rep.Maps[ct].CaughtUp < 2 {
				t.Errorf("pass 2 caught up %+v, want the stream's and the new flow's entries in %s", rep.Maps, loader.CT4Map)
			}
			if err := roundTrip(late); err != nil {
				t.Errorf("the flow that started during the copy broke after the switch: %v", err)
			}

			res := s.wait()
			if err := <-pingOut; err != nil {
				t.Errorf("ping across the migration failed: %v\n%s", err, pingText)
			}
			t.Logf("UDP: %d sent, %d echoed", res.sent, res.received)
			if res.sent < 1000 || res.received != res.sent {
				t.Errorf("UDP stream: %d datagrams sent, %d echoed: lost %v", res.sent, res.received, res.missing())
			}

			newCT := coll.Maps[loader.CT4Map]
			after, ok := readRaw(t, newCT, spec.Maps[loader.CT4Map], key)
			if !ok {
				t.Fatalf("the UDP stream's conntrack entry is missing from %s", loader.CT4Map)
			}
			if after.packetsOrig < before.packetsOrig || after.packetsReply < before.packetsReply ||
				after.bytesOrig < before.bytesOrig || after.bytesReply < before.bytesReply {
				t.Errorf("counters shrank: before %+v, after %+v", before, after)
			}
			// Every datagram crossed the egress hook once and every echo the
			// ingress hook: the counters lost none of them in the move.
			if after.packetsOrig != uint64(res.sent) || after.packetsReply != uint64(res.received) {
				t.Errorf("counters after the migration: %d orig, %d reply packets; the stream sent %d and got %d",
					after.packetsOrig, after.packetsReply, res.sent, res.received)
			}
			if drops := ingressDrops(t, oldMetrics); drops != 1 {
				t.Errorf("%d packets dropped at ingress, want only the 1 probe of checkIngressDenied", drops)
			}
		})
	}
}

// checkIngressDenied proves the policy: a new flow from b to a is dropped.
func checkIngressDenied(t *testing.T, a, b *nettest.Host) {
	t.Helper()
	l, err := a.ListenPacket("udp4", netip.AddrPortFrom(a.IPv4, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := b.Dial("udp4", l.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("probe")); err != nil {
		t.Fatal(err)
	}
	l.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, _, err := l.ReadFrom(make([]byte, 16)); err == nil {
		t.Fatal("a new flow passed ingress although its default verdict is deny")
	}
}

// roundTrip sends one datagram and waits for its echo.
func roundTrip(c net.Conn) error {
	if _, err := c.Write([]byte("late")); err != nil {
		return err
	}
	c.SetReadDeadline(time.Now().Add(time.Second))
	_, err := c.Read(make([]byte, 16))
	return err
}

func echo(c net.PacketConn) {
	buf := make([]byte, 64)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		c.WriteTo(buf[:n], from)
	}
}

type streamResult struct {
	sent, received int
	got            map[uint64]bool
}

func (r streamResult) missing() []uint64 {
	var m []uint64
	for i := range uint64(r.sent) {
		if !r.got[i] && len(m) < 20 {
			m = append(m, i)
		}
	}
	return m
}

type udpStream struct {
	stop chan struct{}
	done chan streamResult
}

// wait stops the stream and returns what it sent and got back.
func (s udpStream) wait() streamResult {
	close(s.stop)
	return <-s.done
}

// stream sends sequence-numbered datagrams every interval until wait, and
// counts the distinct echoes, waiting a second for late ones. It runs
// however long what it measures takes on a loaded machine.
func stream(conn net.Conn, interval time.Duration) udpStream {
	s := udpStream{stop: make(chan struct{}), done: make(chan streamResult, 1)}
	var (
		mu  sync.Mutex
		got = make(map[uint64]bool)
	)
	go func() {
		buf := make([]byte, 64)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			if n == 8 {
				mu.Lock()
				got[binary.BigEndian.Uint64(buf)] = true
				mu.Unlock()
			}
		}
	}()
	go func() {
		tick := time.NewTicker(interval)
		defer tick.Stop()
		sent := 0
	send:
		for {
			select {
			case <-s.stop:
				break send
			case <-tick.C:
			}
			if _, err := conn.Write(binary.BigEndian.AppendUint64(nil, uint64(sent))); err != nil {
				break
			}
			sent++
		}
		deadline := time.Now().Add(time.Second)
		for time.Now().Before(deadline) {
			mu.Lock()
			n := len(got)
			mu.Unlock()
			if n == sent {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		conn.SetReadDeadline(time.Now())
		mu.Lock()
		defer mu.Unlock()
		s.done <- streamResult{sent: sent, received: len(got), got: maps.Clone(got)}
	}()
	return s
}

// ingressDrops sums the ingress drop counters over all CPUs.
func ingressDrops(t *testing.T, metrics *ebpf.Map) uint64 {
	t.Helper()
	var total uint64
	for reason := uint32(16); reason < 32; reason++ {
		var per []bpf.CtdMetricValue
		if err := metrics.Lookup(reason, &per); err != nil {
			t.Fatalf("read metric %d: %v", reason, err)
		}
		for _, v := range per {
			total += v.Packets
		}
	}
	return total
}

// TestRecoverInterrupted leaves the remains of interrupted migrations and
// checks that the next Load undoes or completes them.
func TestRecoverInterrupted(t *testing.T) {
	t.Run("before the switch", func(t *testing.T) {
		o := setup(t, loader.Options{CTMax: 1024, IPCacheMax: 1024})
		want := fillCT(t, o.PinPath, 100)
		before := pinnedIDs(t, o.PinPath)
		spec, err := o.Spec()
		if err != nil {
			t.Fatal(err)
		}
		spec.Maps[loader.CT4Map].MaxEntries = 4096
		orphan, err := ebpf.NewMap(spec.Maps[loader.CT4Map])
		if err != nil {
			t.Fatal(err)
		}
		defer orphan.Close()
		if err := orphan.Pin(filepath.Join(o.PinPath, loader.CT4Map+pins.TempSuffix)); err != nil {
			t.Fatal(err)
		}

		dp, rep, err := Load(o, none)
		if err != nil {
			t.Fatalf("Load: %v", err)
		}
		dp.Close()
		if len(rep.Recovered) != 1 || !strings.Contains(rep.Recovered[0], "removed") {
			t.Errorf("recovered %q, want the orphaned pin removed", rep.Recovered)
		}
		checkUnchanged(t, o.PinPath, before)
		checkCT(t, conntrack(t, o.PinPath), want)
	})

	t.Run("after the switch", func(t *testing.T) {
		pair := nettest.NewPair(t)
		a := pair.A
		o, _ := attachedDatapath(t, a, loader.Options{CTMax: 1024, IPCacheMax: 1024})
		want := fillCT(t, o.PinPath, 100)
		oldCT := conntrack(t, o.PinPath)
		// Written by the old programs after pass 1: the completion must
		// insert it although pass 2 never ran.
		lateKey, lateEntry := ctKey(5000), ctmap.Entry{PacketsOrig: 9, FirstSeen: 1, LastSeen: 2}
		want[lateKey] = lateEntry

		o.CTMax = 4096
		spec, err := o.Spec()
		if err != nil {
			t.Fatal(err)
		}
		crash := errors.New("injected crash after the switch")
		err = a.Do(func() error {
			coll, _, err := run(config{opts: o, spec: spec, hooks: hooks{
				afterCopy:   func() error { return oldCT.Put(&lateKey, &lateEntry) },
				afterSwitch: func(map[string]*ebpf.Map) error { return crash },
			}})
			if err == nil {
				coll.Close()
			}
			return err
		})
		if !errors.Is(err, crash) {
			t.Fatalf("got %v, want the injected failure", err)
		}
		temp := pinnedIDs(t, o.PinPath)[loader.CT4Map+pins.TempSuffix]
		if temp == 0 {
			t.Fatal("no temporary pin left after a failure past the switch")
		}

		var rep Report
		err = a.Do(func() error {
			dp, r, err := Load(o, Interfaces{})
			if err == nil {
				dp.Close()
			}
			rep = r
			return err
		})
		if err != nil {
			t.Fatalf("Load after the interrupted migration: %v", err)
		}
		// Both conntrack tables were resized: both temporary pins are completed.
		if len(rep.Recovered) != 2 || !strings.Contains(rep.Recovered[0], "completed") || rep.Migrated() {
			t.Errorf("report %+v, want the migration completed and nothing migrated again", rep)
		}
		after := pinnedIDs(t, o.PinPath)
		if after[loader.CT4Map] != temp {
			t.Errorf("ct4_v2 is map %d, want the map the programs switched to (%d)", after[loader.CT4Map], temp)
		}
		checkNoTempPins(t, o.PinPath)
		ct := conntrack(t, o.PinPath)
		if ct.MaxEntries() != 4096 {
			t.Errorf("ct4_v2 has max_entries %d, want 4096", ct.MaxEntries())
		}
		checkCT(t, ct, want)
		for _, st := range status(t, a, pins.New(o.PinPath).Links(), a.Iface, secondIface) {
			if !progUsesMap(t, st.IngressProgID, temp) {
				t.Errorf("%s runs program %d, which does not use ct4_v2", st.Iface, st.IngressProgID)
			}
		}
	})
}
