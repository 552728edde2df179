package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/ctd-dev/ctd/control/daemon"
	"github.com/ctd-dev/ctd/control/kvstore"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/ipcachemap"
	"github.com/ctd-dev/ctd/datapath/loader"
)

// Apply makes the node's store and maps enforce a sync update, as one
// crash-consistent change (store.Change: the store first, with an intent
// mark, then the maps): the store is the cache the node enforces from while
// etcd is away and across restarts, and the daemon's reconcile keeps the
// maps equal to it. A full update replaces the store's ipcache, rules and
// defaults (mark and sweep) and then syncs the maps to it, inserting before
// deleting; a delta changes just the prefixes it names. If the maps refuse
// a delta, they are put back to what the store held, and the store too.
//
// For a delta that changed the store, Apply reports the store generations
// it took the store from and to (both zero otherwise): the maps changed
// exactly as the store did (see daemon.Env.Advance).
func Apply(s *store.Store, maps *loader.Maps, u kvstore.Update) (from, to uint64, err error) {
	finish := func(st *store.State) error {
		_, err := daemon.Sync(st, maps)
		return err
	}
	if u.Full {
		var st *store.State
		return 0, 0, s.Change(store.Change{
			What:   "cluster full update",
			Record: func(tx *store.Tx) (err error) { st, err = replaceStore(tx, u); return err },
			Apply:  func() error { return finish(st) },
		}, finish)
	}
	m := maps.IPCache()
	upserts := make([]ipcachemap.Entry, 0, len(u.IPCache))
	for p, id := range u.IPCache {
		upserts = append(upserts, ipcachemap.Entry{Prefix: p, Identity: id})
	}
	slices.SortFunc(upserts, ipcachemap.Compare)
	touched := make([]netip.Prefix, 0, len(upserts)+len(u.Removed))
	for _, e := range upserts {
		touched = append(touched, e.Prefix)
	}
	touched = append(touched, u.Removed...)

	var (
		before    uint64
		changed   bool
		old       *store.State // what the store held of the touched prefixes and the policy
		oldPolicy bool
	)
	record := func(tx *store.Tx) error {
		before, changed = tx.Generation(), deltaChanges(tx, u)
		old = &store.State{IPCache: make(map[netip.Prefix]uint32, len(touched)), Defaults: tx.Defaults()}
		for _, p := range touched {
			if id, ok := tx.LookupIPCache(p); ok {
				old.IPCache[p] = id
			}
		}
		for _, e := range upserts {
			if err := tx.PutIPCache(e.Prefix, e.Identity); err != nil {
				return err
			}
		}
		for _, p := range u.Removed {
			if err := tx.DeleteIPCache(p); err != nil {
				return err
			}
		}
		if u.Policy == nil {
			return nil
		}
		var err error
		if old.Policy, err = tx.Rules(); err != nil {
			return err
		}
		oldPolicy = true
		return replacePolicy(tx, u)
	}
	apply := func() error {
		err := applyDelta(m, maps, upserts, u)
		if err == nil {
			return nil
		}
		rerr := restorePrefixes(m, old.IPCache, touched)
		if oldPolicy {
			_, perr := daemon.SyncPolicy(old, maps)
			rerr = errors.Join(rerr, perr)
		}
		if rerr != nil {
			return fmt.Errorf("%w; putting the maps back failed too: %v", err, rerr)
		}
		return err
	}
	if err := s.Change(store.Change{What: "cluster delta", Record: record, Apply: apply}, finish); err != nil || !changed {
		return 0, 0, err
	}
	return before, before + 1, nil
}

// applyDelta writes a delta into the maps.
func applyDelta(m *ipcachemap.Map, maps *loader.Maps, upserts []ipcachemap.Entry, u kvstore.Update) error {
	if _, err := m.BatchUpdate(upserts); err != nil {
		return fmt.Errorf("write ipcache: %w", err)
	}
	if _, err := m.BatchDelete(u.Removed); err != nil {
		return fmt.Errorf("delete from ipcache: %w", err)
	}
	if u.Policy == nil {
		return nil
	}
	_, err := daemon.SyncPolicy(&store.State{Policy: u.Policy, Defaults: u.Defaults}, maps)
	return err
}

// deltaChanges reports whether applying delta u changes the store.
func deltaChanges(tx *store.Tx, u kvstore.Update) bool {
	for p, id := range u.IPCache {
		if have, ok := tx.LookupIPCache(p); !ok || have != id {
			return true
		}
	}
	for _, p := range u.Removed {
		if _, ok := tx.LookupIPCache(p); ok {
			return true
		}
	}
	if u.Policy == nil {
		return false
	}
	rules, err := tx.Rules()
	return err != nil || !maps.Equal(rules, u.Policy) || tx.Defaults() != u.Defaults
}

// restorePrefixes puts the maps' prefixes ps back to the identities in old
// (deleting those old does not have).
func restorePrefixes(m *ipcachemap.Map, old map[netip.Prefix]uint32, ps []netip.Prefix) error {
	var put []ipcachemap.Entry
	var del []netip.Prefix
	for _, p := range ps {
		if id, ok := old[p]; ok {
			put = append(put, ipcachemap.Entry{Prefix: p, Identity: id})
		} else {
			del = append(del, p)
		}
	}
	_, perr := m.BatchUpdate(put)
	_, derr := m.BatchDelete(del)
	return errors.Join(perr, derr)
}

// replaceStore makes the store's ipcache, rules and defaults equal to a
// full update and returns the state the maps are to match.
func replaceStore(tx *store.Tx, u kvstore.Update) (*store.State, error) {
	var stale []netip.Prefix
	err := tx.ForEachIPCache(func(p netip.Prefix, _ uint32) error {
		if _, ok := u.IPCache[p]; !ok {
			stale = append(stale, p)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, p := range stale {
		if err := tx.DeleteIPCache(p); err != nil {
			return nil, err
		}
	}
	// In the store's key order, so that bbolt appends instead of moving keys.
	type keyed struct {
		k  []byte
		p  netip.Prefix
		id uint32
	}
	ks := make([]keyed, 0, len(u.IPCache))
	for p, id := range u.IPCache {
		k, _ := p.MarshalBinary()
		ks = append(ks, keyed{k, p, id})
	}
	slices.SortFunc(ks, func(a, b keyed) int { return bytes.Compare(a.k, b.k) })
	for _, e := range ks {
		if err := tx.PutIPCache(e.p, e.id); err != nil {
			return nil, err
		}
	}
	if err := replacePolicy(tx, u); err != nil {
		return nil, err
	}
	return &store.State{IPCache: u.IPCache, Policy: u.Policy, Defaults: u.Defaults}, nil
}

func replacePolicy(tx *store.Tx, u kvstore.Update) error {
	have, err := tx.Rules()
	if err != nil {
		return err
	}
	for k := range have {
		if _, ok := u.Policy[k]; !ok {
			if err := tx.DeleteRule(k); err != nil {
				return err
			}
		}
	}
	for k, v := range u.Policy {
		if err := tx.PutRule(k, v); err != nil {
			return err
		}
	}
	for _, d := range []store.Direction{store.Ingress, store.Egress} {
		if err := tx.SetDefault(d, u.Defaults[d]); err != nil {
			return err
		}
	}
	return nil
}
