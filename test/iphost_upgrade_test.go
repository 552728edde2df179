package test

import (
	"encoding/json"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/datapath/loader"
)

// TestAttachMovesIPCacheHosts upgrades a datapath attached by the first
// release, whose ipcache holds its host entries (/32, /128) in the LPM
// tries, by this build's attach, under ingress default deny: B's host
// entries give it identity 42, which a rule allows, inside a /24 and a /64
// of identity 7, which none does. While B opens a new connection to A every
// 20 ms across the upgrade, every one is allowed (an address that resolved
// through the covering CIDR for a moment would be dropped), and afterwards
// the host entries are in the host hashes, not in the tries, and ipcache
// get still names them.
func TestAttachMovesIPCacheHosts(t *testing.T) {
	pair, first, ctd := upgradeCLIs(t)
	a, b := pair.A, pair.B

	const port = 9097
	first.run("attach", "--iface", a.Iface)
	first.run("policy", "default", "ingress", "deny")
	hosts := []netip.Prefix{netip.PrefixFrom(b.IPv4, 32), netip.PrefixFrom(b.IPv6, 128)}
	for _, p := range hosts {
		first.run("ipcache", "add", p.String(), "id=42")
	}
	first.run("ipcache", "add", netip.PrefixFrom(b.IPv4, 24).Masked().String(), "id=7")
	first.run("ipcache", "add", netip.PrefixFrom(b.IPv6, 64).Masked().String(), "id=7")
	first.run("policy", "add", "ingress", "id=42", "tcp/9097", "allow")
	targets := []netip.AddrPort{netip.AddrPortFrom(a.IPv4, port), netip.AddrPortFrom(a.IPv6, port)}
	for _, to := range targets {
		echoServer(t, a, to)
		mustConnect(t, b, "before the upgrade", to)
	}
	dropsBefore := first.counters()["policy"]

	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		opened   int
		failures []string
	)
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			to := targets[i%2]
			c, err := dial(b, to)
			if err == nil {
				err = echo(c, "during the upgrade")
				c.Close()
			}
			mu.Lock()
			opened++
			if err != nil {
				failures = append(failures, to.String()+": "+err.Error())
			}
			mu.Unlock()
		}
	}()
	time.Sleep(200 * time.Millisecond)
	out := ctd.run("attach", "--iface", a.Iface)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()

	if !strings.Contains(out, "moved 2 ipcache host entries") {
		t.Errorf("attach over the first release's datapath said %q, want it to report 2 host entries moved", out)
	}
	for _, f := range failures {
		t.Errorf("a new connection from B across the upgrade failed: %s", f)
	}
	if drops := ctd.counters()["policy"] - dropsBefore; drops != 0 {
		t.Errorf("%d packets dropped by policy across the upgrade, want 0", drops)
	}

	maps, err := loader.OpenPinned(ctd.pin)
	if err != nil {
		t.Fatal(err)
	}
	defer maps.Close()
	for _, p := range hosts {
		tm, hm := maps.IPCache4(), maps.IPHost4()
		var tk, hk any
		if p.Addr().Is4() {
			tk, hk = &[8]byte{32, 0, 0, 0}, p.Addr().As4()
			copy(tk.(*[8]byte)[4:], p.Addr().AsSlice())
		} else {
			tm, hm = maps.IPCache6(), maps.IPHost6()
			k := [20]byte{128}
			copy(k[4:], p.Addr().AsSlice())
			tk, hk = &k, p.Addr().As16()
		}
		var v [8]byte
		if err := hm.Lookup(hk, &v); err != nil || v[0] != 42 {
			t.Errorf("%v after the upgrade: %s lookup = %v, %v; want identity 42", p, hm, v, err)
		}
		// An exact lookup of the trie now returns the covering CIDR's 7.
		if err := tm.Lookup(tk, &v); err != nil || v[0] != 7 {
			t.Errorf("%v after the upgrade: %s resolves it to %v, %v; want the CIDR's 7 (host entry moved out)", p, tm, v, err)
		}
		var got struct {
			CIDR     string `json:"cidr"`
			Identity uint32 `json:"identity"`
		}
		if err := json.Unmarshal([]byte(ctd.quiet("ipcache", "get", p.Addr().String(), "-o", "json")), &got); err != nil {
			t.Fatal(err)
		}
		if got.CIDR != p.String() || got.Identity != 42 {
			t.Errorf("ipcache get %v after the upgrade = %+v, want %v identity 42", p.Addr(), got, p)
		}
	}
	for _, to := range targets {
		mustConnect(t, b, "after the upgrade", to)
	}
	t.Logf("upgrade moved B's host entries into the host hashes; %d new connections from B across it, %d failed", opened, len(failures))
}
