package daemon

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/ipcachemap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/policymap"
)

// SyncStats counts what Sync changed in the maps.
type SyncStats struct {
	IPCacheAdded, IPCacheChanged, IPCacheRemoved int
	RulesAdded, RulesChanged, RulesRemoved       int
	DefaultsChanged                              int
}

// Changed reports whether Sync changed anything.
func (s SyncStats) Changed() bool { return s != SyncStats{} }

// LogValue logs the counts as a group.
func (s SyncStats) LogValue() slog.Value {
	return slog.GroupValue(
		slog.Int("ipcache_added", s.IPCacheAdded),
		slog.Int("ipcache_changed", s.IPCacheChanged),
		slog.Int("ipcache_removed", s.IPCacheRemoved),
		slog.Int("rules_added", s.RulesAdded),
		slog.Int("rules_changed", s.RulesChanged),
		slog.Int("rules_removed", s.RulesRemoved),
		slog.Int("defaults_changed", s.DefaultsChanged),
	)
}

// Sync makes the maps' ipcache, policy rules and default verdicts equal to
// the desired state st without a moment in which a desired entry is
// missing: it first inserts what is missing and updates what differs (an
// update is atomic for the datapath), and only then deletes what st does
// not have. Call it holding the store's lock (inside Store.View) so that no
// CLI write interleaves.
func Sync(st *store.State, maps *loader.Maps) (SyncStats, error) {
	var s SyncStats
	if err := syncIPCache(st, maps.IPCache(), &s); err != nil {
		return s, err
	}
	if err := syncPolicy(st, policymap.New(maps.Policy(), maps.Config()), &s); err != nil {
		return s, err
	}
	return s, nil
}

// SyncPolicy is Sync for the policy rules and default verdicts alone.
func SyncPolicy(st *store.State, maps *loader.Maps) (SyncStats, error) {
	var s SyncStats
	err := syncPolicy(st, policymap.New(maps.Policy(), maps.Config()), &s)
	return s, err
}

func syncIPCache(st *store.State, m *ipcachemap.Map, s *SyncStats) error {
	have, err := m.List()
	if err != nil {
		return err
	}
	current := make(map[netip.Prefix]uint32, len(have))
	for _, e := range have {
		current[e.Prefix] = e.Identity
	}
	var upsert []ipcachemap.Entry
	for p, id := range st.IPCache {
		old, ok := current[p]
		switch {
		case !ok:
			s.IPCacheAdded++
		case old != id:
			s.IPCacheChanged++
		default:
			continue
		}
		upsert = append(upsert, ipcachemap.Entry{Prefix: p, Identity: id})
	}
	// Sorted: the same input always writes in the same order.
	slices.SortFunc(upsert, ipcachemap.Compare)
	if _, err := m.BatchUpdate(upsert); err != nil {
		return fmt.Errorf("restore ipcache: %w", err)
	}
	var stale []netip.Prefix
	for _, e := range have {
		if _, ok := st.IPCache[e.Prefix]; !ok {
			stale = append(stale, e.Prefix)
		}
	}
	n, err := m.BatchDelete(stale)
	s.IPCacheRemoved += n
	if err != nil {
		return fmt.Errorf("remove ipcache entries not in the store: %w", err)
	}
	return nil
}

func ruleOf(k store.RuleKey, v store.Verdict) policymap.Rule {
	return policymap.Rule{Dir: bpf.Direction(k.Dir), Identity: k.Identity, Proto: k.Proto, Port: k.Port, Verdict: policymap.Verdict(v)}
}

func keyOf(r policymap.Rule) store.RuleKey {
	return store.RuleKey{Dir: store.Direction(r.Dir), Identity: r.Identity, Proto: r.Proto, Port: r.Port}
}

func syncPolicy(st *store.State, m *policymap.Map, s *SyncStats) error {
	have, err := m.List()
	if err != nil {
		return err
	}
	current := make(map[store.RuleKey]store.Verdict, len(have))
	for _, r := range have {
		current[keyOf(r)] = store.Verdict(r.Verdict)
	}
	keys := make([]store.RuleKey, 0, len(st.Policy))
	for k := range st.Policy {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b store.RuleKey) int {
		return policymap.Compare(ruleOf(a, store.Allow), ruleOf(b, store.Allow))
	})
	for _, k := range keys {
		v := st.Policy[k]
		old, ok := current[k]
		if ok && old == v {
			continue
		}
		if err := m.Put(ruleOf(k, v)); err != nil {
			return fmt.Errorf("restore policy rule: %w", err)
		}
		if ok {
			s.RulesChanged++
		} else {
			s.RulesAdded++
		}
	}

	defaults, err := m.Defaults()
	if err != nil {
		return err
	}
	for _, d := range []bpf.Direction{bpf.Ingress, bpf.Egress} {
		want := policymap.Verdict(st.Defaults[d]).Effective()
		if defaults[d].Effective() == want {
			continue
		}
		if err := m.SetDefault(d, want); err != nil {
			return fmt.Errorf("restore %s default verdict: %w", d, err)
		}
		s.DefaultsChanged++
	}

	for _, r := range have {
		if _, ok := st.Policy[keyOf(r)]; ok {
			continue
		}
		err := m.Delete(r)
		if errors.Is(err, policymap.ErrNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("remove policy rule not in the store: %w", err)
		}
		s.RulesRemoved++
	}
	// Correct a rule count another writer left wrong (the datapath skips
	// rule lookups while it is 0).
	return m.SyncRuleCount()
}

// MapsState reads the desired-state part of the maps: ipcache, policy rules
// and default verdicts (no interfaces, generation 0).
func MapsState(maps *loader.Maps) (*store.State, error) {
	entries, err := maps.IPCache().List()
	if err != nil {
		return nil, err
	}
	pm := policymap.New(maps.Policy(), maps.Config())
	rules, err := pm.List()
	if err != nil {
		return nil, err
	}
	defaults, err := pm.Defaults()
	if err != nil {
		return nil, err
	}
	st := &store.State{
		IPCache:  make(map[netip.Prefix]uint32, len(entries)),
		Policy:   make(map[store.RuleKey]store.Verdict, len(rules)),
		Defaults: defaults,
	}
	for _, e := range entries {
		st.IPCache[e.Prefix] = e.Identity
	}
	for _, r := range rules {
		st.Policy[keyOf(r)] = r.Verdict
	}
	return st, nil
}

// adopt fills an empty store from the maps' ipcache, policy rules and
// default verdicts: when a datapath that ran without a store (an older ctd,
// or a lost state directory) meets the daemon, its state is taken over
// rather than deleted. It reports whether anything was adopted.
func adopt(s *store.Store, maps *loader.Maps) (bool, error) {
	st, err := MapsState(maps)
	if err != nil {
		return false, err
	}
	adopted := false
	err = s.Update(func(tx *store.Tx) error {
		adopted = false
		if tx.Generation() != 0 {
			return nil // another process wrote the store meanwhile: it rules
		}
		if err := tx.PutState(st); err != nil {
			return err
		}
		adopted = len(st.IPCache)+len(st.Policy) > 0 || st.Defaults != [2]store.Verdict{}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("adopt the pinned ipcache and policy into the empty store: %w", err)
	}
	return adopted, nil
}
