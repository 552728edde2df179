// Package gc expires conntrack entries by state lifetime.
package gc

import (
	"errors"
	"fmt"
	"time"

	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// Result is what one pass did.
type Result struct {
	Scanned   int // entries read
	Deleted   int // expired entries deleted
	Left6     int // IPv6 entries read and not deleted (the rest of Scanned - Deleted are IPv4)
	Refreshed int // expired when read, refreshed before their deletion: kept
	Vanished  int // expired when read, gone before their deletion (LRU eviction, flush)
	Duration  time.Duration
}

// Pass deletes every entry of m that has been idle longer than its state's
// lifetime at now (CLOCK_MONOTONIC_COARSE, as ctmap.Now().Mono() reads it): an entry
// expires when last_seen + lifetime(proto, state) < now. It loads a small
// BPF program for the pass; a Runner loads it once.
//
// A pass never deletes an entry that the datapath refreshed after the pass
// read it. It reads the table with batch lookups and collects the expired
// entries with the last_seen it read; every ctmap.ExpireBatch of them go to
// ctmap.Expirer, whose BPF program looks each entry up again in the kernel,
// compares its last_seen with the one read, and deletes it only if they are
// equal. A packet that refreshed the entry (or made a new entry for the
// flow) at any time between the read and that comparison changed last_seen,
// and the entry stays. Entries that vanish before their deletion (LRU
// eviction, a flush) are counted, not an error.
//
// What remains, and no GC can close without a lock shared with the
// datapath: the datapath updates an entry in place through the pointer its
// lookup returned, without the bucket lock. A packet whose update lands
// between the program's comparison and the unlink (a few tens of
// nanoseconds), or that looked the entry up just before the unlink and
// updates it just after, is lost with the entry: the flow's next packet
// finds no entry and is judged as a new flow. That takes a packet within
// nanoseconds of the deletion, of a flow that was idle for its whole
// lifetime.
func Pass(m *ctmap.Map, lt Lifetimes, now time.Duration) (Result, error) {
	x, err := m.NewExpirer()
	if err != nil {
		return Result{}, fmt.Errorf("conntrack GC: %w", err)
	}
	defer x.Close()
	return pass(m, x, lt, now, hooks{})
}

// hooks are what a pass calls besides its own work; nil fields are skipped.
type hooks struct {
	// keep sees every flow the pass reads and keeps (not expired).
	keep func(ctmap.Flow)
	// beforeDelete runs for tests after an expired entry was read and
	// before it is handed to the expirer, so that they can refresh,
	// re-create or evict it there as the datapath would.
	beforeDelete func(k *ctmap.Key, seen *ctmap.Entry)
}

// pass is Pass with the expirer loaded, and hooks.
func pass(m *ctmap.Map, x *ctmap.Expirer, lt Lifetimes, now time.Duration, h hooks) (Result, error) {
	start := time.Now()
	var (
		res      Result
		delErr   error
		cands    = make([]ctmap.Candidate, 0, ctmap.ExpireBatch)
		outcomes = make([]ctmap.Outcome, ctmap.ExpireBatch)
	)
	flush := func() error {
		if err := x.Delete(cands, outcomes); err != nil {
			return err
		}
		for i, o := range outcomes[:len(cands)] {
			switch o {
			case ctmap.Deleted:
				res.Deleted++
				if cands[i].Key.Family == 6 {
					res.Left6--
				}
			case ctmap.Refreshed:
				res.Refreshed++
			case ctmap.Missing:
				res.Vanished++
			}
		}
		cands = cands[:0]
		return nil
	}
	err := m.Iterate(func(k *ctmap.Key, e *ctmap.Entry) bool {
		res.Scanned++
		if k.Family == 6 {
			res.Left6++
		}
		if !lt.Expired(k.Proto, e, now) {
			if h.keep != nil {
				h.keep(ctmap.FlowOf(k, e))
			}
			return true
		}
		if h.beforeDelete != nil {
			h.beforeDelete(k, e)
		}
		cands = append(cands, ctmap.Candidate{Key: *k, LastSeen: e.LastSeen})
		if len(cands) == cap(cands) {
			delErr = flush()
		}
		return delErr == nil
	})
	if err == nil && delErr == nil {
		delErr = flush()
	}
	res.Duration = time.Since(start)
	if err = errors.Join(delErr, err); err != nil {
		return res, fmt.Errorf("conntrack GC: %w", err)
	}
	return res, nil
}
