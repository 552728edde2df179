// Package gc expires conntrack entries by state lifetime.
package gc

import (
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// Result is what one pass did.
type Result struct {
	Scanned   int // entries read
	Deleted   int // expired entries deleted
	Refreshed int // expired when read, refreshed before their deletion: kept
	Vanished  int // expired when read, gone before their deletion (LRU eviction, flush)
	Duration  time.Duration
}

// Pass deletes every entry of m that has been idle longer than its state's
// lifetime at now (CLOCK_BOOTTIME, as ctmap.Now().Boot() reads it): an entry
// expires when last_seen + lifetime(proto, state) < now.
//
// It reads the table in batches and handles each batch's expired entries
// before reading the next, so at most one batch's work lies between an
// entry's read and its deletion. A pass never deletes an entry that the
// datapath refreshed after the pass read it: each expired entry is deleted
// with BPF_MAP_LOOKUP_AND_DELETE_ELEM, which returns the entry as it was at
// the moment of deletion (atomically, under the bucket lock); if that copy's
// last_seen differs from what the scan read, or it is no longer expired, the
// entry was refreshed in between, and Pass writes the copy back with
// BPF_NOEXIST. If the datapath created a new entry for the key in the
// meantime, the datapath's entry wins and the copy is dropped. Entries that
// vanish before their deletion (LRU eviction, a flush) are counted, not an
// error.
//
// What remains, and no userspace GC can close without a lock in the
// datapath:
//   - The datapath updates an entry in place through the pointer its lookup
//     returned, without the bucket lock. A packet whose update lands between
//     the kernel's copy and its unlink is lost with the entry: the next packet
//     of the flow finds no entry and is judged as a new flow. This takes a
//     packet within the same few hundred nanoseconds as the deletion, of a
//     flow that was idle for its whole lifetime.
//   - A refreshed entry is absent between its deletion and its restore (a
//     few microseconds). A packet in that window is judged as a new flow; the
//     entry it creates is kept and the restore dropped, so the flow's counters
//     start again from that packet.
//   - Counters added to the copy's entry between the copy and the restore
//     are lost (at most the packets of those microseconds).
func Pass(m *ctmap.Map, lt Lifetimes, now time.Duration) (Result, error) {
	return pass(m, lt, now, hooks{})
}

// hooks let tests act as the datapath at the two points where it races
// with a pass: after an expired entry was read and before it is deleted
// (refresh, evict), and after a refreshed entry was deleted and before it is
// restored (re-create).
type hooks struct {
	beforeDelete  func(k *ctmap.Key, seen *ctmap.Entry)
	beforeRestore func(k *ctmap.Key, deleted *ctmap.Entry)
}

func pass(m *ctmap.Map, lt Lifetimes, now time.Duration, h hooks) (Result, error) {
	start := time.Now()
	var (
		res    Result
		delErr error
	)
	err := m.Iterate(func(k *ctmap.Key, e *ctmap.Entry) bool {
		res.Scanned++
		if !lt.Expired(k.Proto, e, now) {
			return true
		}
		if h.beforeDelete != nil {
			h.beforeDelete(k, e)
		}
		delErr = expire(m, lt, now, k, e, &res, h)
		return delErr == nil
	})
	res.Duration = time.Since(start)
	if err = errors.Join(delErr, err); err != nil {
		return res, fmt.Errorf("conntrack GC: %w", err)
	}
	return res, nil
}

// expire deletes one entry that the scan saw expired, unless it was
// refreshed since.
func expire(m *ctmap.Map, lt Lifetimes, now time.Duration, k *ctmap.Key, seen *ctmap.Entry, res *Result, h hooks) error {
	got, err := m.LookupAndDelete(k)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		res.Vanished++
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete entry: %w", err)
	}
	if got.LastSeen == seen.LastSeen && lt.Expired(k.Proto, &got, now) {
		res.Deleted++
		return nil
	}
	// Refreshed between the scan and the deletion: put it back, unless the
	// datapath has created a newer entry for the key meanwhile.
	if h.beforeRestore != nil {
		h.beforeRestore(k, &got)
	}
	if err := m.Insert(k, &got); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("restore entry refreshed during GC: %w", err)
	}
	res.Refreshed++
	return nil
}
