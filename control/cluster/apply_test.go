package cluster_test

import (
	"maps"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/ctd-dev/ctd/control/cluster"
	"github.com/ctd-dev/ctd/control/kvstore"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/policymap"
	"github.com/ctd-dev/ctd/test/nettest"
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// node is a datapath's maps and a store, as a daemon has them.
func node(t *testing.T) (*store.Store, *loader.Maps) {
	t.Helper()
	m, err := loader.OpenMaps(loader.Options{PinPath: nettest.PinPath(t), IPCacheMax: 1024}.WithDefaults())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	s, err := store.Open(filepath.Join(t.TempDir(), "state"), nil)
	if err != nil {
		t.Fatal(err)
	}
	return s, m
}

// check requires the store and the maps to hold exactly ipc, rules and
// defaults.
func check(t *testing.T, when string, s *store.Store, m *loader.Maps, ipc map[netip.Prefix]uint32, rules map[store.RuleKey]store.Verdict, defaults [2]store.Verdict) {
	t.Helper()
	st, err := s.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(st.IPCache, ipc) || !maps.Equal(st.Policy, rules) || st.Defaults != defaults {
		t.Errorf("%s: store holds %v %v %v, want %v %v %v", when, st.IPCache, st.Policy, st.Defaults, ipc, rules, defaults)
	}
	entries, err := m.IPCache().List()
	if err != nil {
		t.Fatal(err)
	}
	have := make(map[netip.Prefix]uint32)
	for _, e := range entries {
		have[e.Prefix] = e.Identity
	}
	if !maps.Equal(have, ipc) {
		t.Errorf("%s: ipcache maps hold %v, want %v", when, have, ipc)
	}
	pm := policymap.New(m.Policy(), m.Config())
	list, err := pm.List()
	if err != nil {
		t.Fatal(err)
	}
	haveRules := make(map[store.RuleKey]store.Verdict)
	for _, r := range list {
		haveRules[store.RuleKey{Dir: r.Dir, Identity: r.Identity, Proto: r.Proto, Port: r.Port}] = r.Verdict
	}
	if !maps.Equal(haveRules, rules) {
		t.Errorf("%s: policy map holds %v, want %v", when, haveRules, rules)
	}
	d, err := pm.Defaults()
	if err != nil {
		t.Fatal(err)
	}
	for dir := range d {
		if d[dir].Effective() != defaults[dir].Effective() {
			t.Errorf("%s: %v default %v, want %v", when, store.Direction(dir), d[dir], defaults[dir])
		}
	}
	if n, err := pm.RuleCount(); err != nil || int(n) != len(rules) {
		t.Errorf("%s: rule count %d (%v), want %d", when, n, err, len(rules))
	}
}

func TestApply(t *testing.T) {
	s, m := node(t)
	// What the node held before: a local entry the cluster does not have.
	err := s.Update(func(tx *store.Tx) error { return tx.PutIPCache(pfx("10.0.0.0/8"), 9) })
	if err != nil {
		t.Fatal(err)
	}
	if err := m.IPCache().Put(pfx("10.0.0.0/8"), 9); err != nil {
		t.Fatal(err)
	}

	allow := store.RuleKey{Dir: store.Ingress, Identity: 300, Proto: 6, Port: 80}
	deny := store.RuleKey{Dir: store.Egress, Identity: 0, Proto: 17}
	full := kvstore.Update{Full: true, Revision: 5,
		IPCache:  map[netip.Prefix]uint32{pfx("198.51.100.0/24"): 300, pfx("fd00::/64"): 301, pfx("203.0.113.7/32"): 302},
		Policy:   map[store.RuleKey]store.Verdict{allow: store.Allow, deny: store.Deny},
		Defaults: [2]store.Verdict{store.Deny, store.VerdictUnset},
	}
	if _, _, err := cluster.Apply(s, m, full); err != nil {
		t.Fatal(err)
	}
	check(t, "after a full update", s, m, full.IPCache, full.Policy, full.Defaults)

	delta := kvstore.Update{Revision: 6,
		IPCache: map[netip.Prefix]uint32{pfx("198.51.100.0/24"): 303, pfx("fd00:1::/64"): 304},
		Removed: []netip.Prefix{pfx("203.0.113.7/32")},
	}
	gen, err := s.Generation()
	if err != nil {
		t.Fatal(err)
	}
	from, to, err := cluster.Apply(s, m, delta)
	if err != nil {
		t.Fatal(err)
	}
	if now, _ := s.Generation(); from != gen || to != gen+1 || now != to {
		t.Errorf("a delta reported generations %d -> %d; the store went from %d to %d", from, to, gen, now)
	}
	if from, to, err := cluster.Apply(s, m, delta); err != nil || from != 0 || to != 0 {
		t.Errorf("the same delta again reported %d -> %d (%v), want no change", from, to, err)
	}
	want := map[netip.Prefix]uint32{pfx("198.51.100.0/24"): 303, pfx("fd00::/64"): 301, pfx("fd00:1::/64"): 304}
	check(t, "after a delta", s, m, want, full.Policy, full.Defaults)

	policy := kvstore.Update{Revision: 7, IPCache: map[netip.Prefix]uint32{},
		Policy:   map[store.RuleKey]store.Verdict{allow: store.Deny},
		Defaults: [2]store.Verdict{store.Allow, store.Deny},
	}
	if _, _, err := cluster.Apply(s, m, policy); err != nil {
		t.Fatal(err)
	}
	check(t, "after a policy change", s, m, want, policy.Policy, policy.Defaults)

	// A full update sweeps what the cluster no longer has.
	sweep := kvstore.Update{Full: true, Revision: 9, IPCache: map[netip.Prefix]uint32{pfx("fd00::/64"): 301}, Policy: map[store.RuleKey]store.Verdict{}}
	if _, _, err := cluster.Apply(s, m, sweep); err != nil {
		t.Fatal(err)
	}
	check(t, "after a sweeping full update", s, m, sweep.IPCache, sweep.Policy, sweep.Defaults)
}
