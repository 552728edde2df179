package test

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/test/nettest"
)

// TestAttachUpgradesFirstRelease: 'ctd attach' of this build over a
// datapath attached by the first release (test/first-release.commit, layout
// v1) under ingress default deny migrates it live to layout v2: connections
// the protected side opened keep working throughout, the peer's first word
// after the upgrade passes (its entry was kept), nothing is dropped, and
// every flow keeps its entry, its counters growing. The first release's
// attach and daemon over the v2 datapath (a downgrade) refuse in one line
// and change nothing: the flows go on.
func TestAttachUpgradesFirstRelease(t *testing.T) {
	firstBin := buildFirstRelease(t)
	bin := nettest.BuildCtd(t)
	pair := nettest.NewPair(t)
	a, b := pair.A, pair.B
	first := &policyCLI{t: t, bin: firstBin, pin: nettest.PinPath(t), stateDir: t.TempDir(), host: a}
	ctd := *first
	ctd.bin = bin

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
	for _, name := range []string{"ct4_v2", "ct6_v2", "ct4_unconfirmed_v2", "ct6_unconfirmed_v2", "ct_v2"} {
		if _, err := os.Stat(filepath.Join(ctd.pin, name)); err != nil {
			t.Errorf("after the upgrade: %v", err)
		}
	}
	if _, err := os.Stat(filepath.Join(ctd.pin, "ct_v1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after the upgrade ct_v1 is still pinned (%v)", err)
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

	// Downgrade: the first release's attach and daemon over this build's
	// pins find ct_v2 beside the table they know as ct_v1 and refuse,
	// changing nothing.
	pinsBefore := pinNames(t, ctd.pin)
	progsBefore := ctd.run("status")
	for _, args := range [][]string{{"attach", "--iface", a.Iface}, {"daemon", "--iface", a.Iface}} {
		msg := strings.TrimSpace(first.fails(args...))
		if !strings.Contains(msg, "ct_v2") || strings.Count(msg, "\n") > 0 {
			t.Errorf("first release's %s over the v2 datapath: %q, want one line naming ct_v2", args[0], msg)
		}
	}
	if got := pinNames(t, ctd.pin); !slices.Equal(got, pinsBefore) {
		t.Errorf("the refused downgrade changed the pins from %v to %v", pinsBefore, got)
	}
	if got := ctd.run("status"); got != progsBefore {
		t.Errorf("the refused downgrade changed the status from\n%s\nto\n%s", progsBefore, got)
	}
	time.Sleep(300 * time.Millisecond)
	errs, _ := stop()
	for i, err := range errs {
		if err != nil {
			t.Errorf("active connection %d broke across the upgrade and the refused downgrade: %v", i, err)
			broken[active[i].name] = true
		}
	}
	for _, c := range quiet {
		if err := send(c.b, c.a, "B first again"); err != nil {
			t.Errorf("%s: B -> A after the refused downgrade: %v", c.name, err)
			broken[c.name] = true
		}
	}
	drops := ctd.counters()["policy"] - dropsBefore
	if drops != 0 {
		t.Errorf("%d packets dropped by policy across the upgrade and the refused downgrade, want 0", drops)
	}
	t.Logf("upgrade from the first release by ctd attach took %v; connections kept across the upgrade and the refused downgrade: %d of %d (2 active, 2 where the peer spoke first after each); policy drops: %d",
		took.Round(time.Millisecond), len(conns)-len(broken), len(conns), drops)
}

// pinNames lists the pins in dir (not the links directory), sorted.
func pinNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if !e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out
}
