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

// Apply makes the node's store and maps enforce a sync update, in one
// store transaction: the store is the cache the node enforces from while
// etcd is away and across restarts, and the daemon's reconcile keeps the
// maps equal to it. A full update replaces the store's ipcache, rules and
// defaults (mark and sweep) and then syncs the maps to it, inserting before
// deleting; a delta changes just the prefixes it names. If the store cannot
// commit, the maps are put back to what the store holds.
//
// For a delta that changed the store, Apply reports the store generations
// it took the store from and to (both zero otherwise): the maps changed
// exactly as the store did (see daemon.Env.Advance).
func Apply(s *store.Store, maps *loader.Maps, u kvstore.Update) (from, to uint64, err error) {
	if u.Full {
		return 0, 0, s.Update(func(tx *store.Tx) error {
			st, err := replaceStore(tx, u)
			if err != nil {
				return err
			}
			_, err = daemon.Sync(st, maps)
			return err
		})
	}
	m := ipcachemap.New(maps.IPCache4(), maps.IPCache6())
	var before uint64
	var changed bool
	err = s.Update(func(tx *store.Tx) error {
		before, changed = tx.Generation(), deltaChanges(tx, u)
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
		tx.OnAbort(func() error { return restorePrefixes(tx, m, touched) })
		if _, err := m.BatchUpdate(upserts); err != nil {
			return fmt.Errorf("write ipcache: %w", err)
		}
		if _, err := m.BatchDelete(u.Removed); err != nil {
			return fmt.Errorf("delete from ipcache: %w", err)
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
		if err := replacePolicy(tx, u); err != nil {
			return err
		}
		_, err := daemon.SyncPolicy(&store.State{Policy: u.Policy, Defaults: u.Defaults}, maps)
		return err
	})
	if err != nil || !changed {
		return 0, 0, err
	}
	return before, before + 1, nil
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

// restorePrefixes puts the maps' prefixes back to what the store holds.
func restorePrefixes(tx *store.Tx, m *ipcachemap.Map, ps []netip.Prefix) error {
	var put []ipcachemap.Entry
	var del []netip.Prefix
	for _, p := range ps {
		if id, ok := tx.LookupIPCache(p); ok {
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
