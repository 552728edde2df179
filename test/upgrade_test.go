package test

import (
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// TestAttachUpgradesFirstRelease: 'ctd attach' of this build over a
// datapath attached by the first release (test/first-release.commit) under
// ingress default deny replaces its programs live: connections the
// protected side opened keep working throughout, the peer's first word
// after the upgrade passes (its entry was kept), nothing is dropped, and
// every flow keeps its entry, its counters growing. Attaching the first
// release again (a downgrade) keeps the confirmed flows too.
func TestAttachUpgradesFirstRelease(t *testing.T) {
	pair, first, ctd := upgradeCLIs(t)
	a, b := pair.A, pair.B

	first.run("attach", "--iface", a.Iface)
	first.run("policy", "default", "ingress", "deny")
	const bPort = 9096
	lb, err := b.Listen("tcp", netip.AddrPortFrom(b.IPv4, bPort).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lb.Close() })
	conns := make([]*heldConn, 4)
	for i := range conns {
		conns[i] = dialFrom(t, "connection "+strconv.Itoa(i), a, lb, netip.AddrPortFrom(b.IPv4, bPort))
	}
	active, quiet := conns[:2], conns[2:]
	flowsBefore := map[uint16]uint64{}
	for _, c := range conns {
		n, _ := first.flowPackets(c.aPort, bPort)
		flowsBefore[c.aPort] = n
	}
	dropsBefore := first.counters()["policy"]

	stop := chatter(active, 10*time.Millisecond)
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	ctd.run("attach", "--iface", a.Iface)
	took := time.Since(start)
	time.Sleep(300 * time.Millisecond)
	if _, err := os.Stat(filepath.Join(ctd.pin, "ct_unconfirmed_v1")); err != nil {
		t.Errorf("after the upgrade: %v", err)
	}
	broken := map[string]bool{}
	for _, c := range quiet {
		// The peer speaks first: under default deny only a kept entry lets it in.
		if err := send(c.b, c.a, "B first"); err != nil {
			t.Errorf("%s: B -> A after the upgrade: %v", c.name, err)
			broken[c.name] = true
			continue
		}
		c.mustPass(t)
	}
	for _, c := range conns {
		n, _ := ctd.flowPackets(c.aPort, bPort)
		if n <= flowsBefore[c.aPort] {
			t.Errorf("%s: %d packets counted after the upgrade, %d before: want its entry kept and growing", c.name, n, flowsBefore[c.aPort])
		}
	}

	// Downgrade: the first release's attach over this build's pins.
	first.run("attach", "--iface", a.Iface)
	time.Sleep(300 * time.Millisecond)
	errs, _ := stop()
	for i, err := range errs {
		if err != nil {
			t.Errorf("active connection %d broke across the upgrade and downgrade: %v", i, err)
			broken[active[i].name] = true
		}
	}
	for _, c := range quiet {
		if err := send(c.b, c.a, "B first again"); err != nil {
			t.Errorf("%s: B -> A after the downgrade: %v", c.name, err)
			broken[c.name] = true
		}
	}
	drops := ctd.counters()["policy"] - dropsBefore
	if drops != 0 {
		t.Errorf("%d packets dropped by policy across the upgrade and downgrade, want 0", drops)
	}
	t.Logf("upgrade from the first release by ctd attach took %v; connections kept across the upgrade and the downgrade: %d of %d (2 active, 2 where the peer spoke first after each); policy drops: %d",
		took.Round(time.Millisecond), len(conns)-len(broken), len(conns), drops)
}
