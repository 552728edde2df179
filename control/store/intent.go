package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"
)

// The intent protocol. A change of the desired state and of the maps is
// made in three steps, all under the store's exclusive lock:
//
//  1. one transaction records the new desired state and an intent mark;
//  2. the maps are changed to follow it;
//  3. a second transaction clears the mark.
//
// A writer killed after 1 leaves the mark behind with the lock released.
// Whoever takes the lock next and finds the mark knows its writer is gone
// (a live writer would still hold the lock) and finishes the change by
// making the maps equal to the store (a Finisher), then clears the mark:
// every ctd command before it does anything else, and the daemon at its next
// poll. A writer killed before 1 changed nothing. So after any kill the
// maps become wholly the old state or wholly the new one, equal to the
// store.

// Intent is the mark of a change whose maps part may be unfinished.
type Intent struct {
	What    string    `json:"what"` // e.g. "ipcache load"
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
}

// Finisher makes the maps equal to the desired state st; it finishes a
// change whose writer died between its two transactions.
type Finisher func(st *State) error

// Change is one change of the desired state and the maps.
type Change struct {
	// What names the change in the intent mark.
	What string
	// IPCache, when set, is a bulk change of the ipcache, staged before
	// Record runs and swapped in with it.
	IPCache *IPCacheLoad
	// Record writes the new desired state (nil: nothing beyond IPCache).
	// It may read the maps, not write them; an error leaves everything as
	// it was.
	Record func(tx *Tx) error
	// Apply changes the maps to follow. When it fails it must leave the
	// maps as they were: the store is then reverted too.
	Apply func() error
}

// Change makes c crash-consistent (see the protocol above). finish finishes
// a change another writer left unfinished, before c is made. If c.Apply
// fails, the store is reverted and both errors are returned.
func (s *Store) Change(c Change, finish Finisher) error {
	ss, done, err := s.open(true)
	if err != nil {
		return err
	}
	defer done()
	if _, err := ss.finish(finish); err != nil {
		return err
	}
	if c.IPCache != nil {
		if err := ss.stage(c.IPCache); err != nil {
			return err
		}
	}
	var undo []undoOp
	err = ss.tx(true, func(tx *Tx) error {
		if c.IPCache != nil {
			if err := tx.swap(); err != nil {
				return err
			}
		}
		tx.undo = &undo
		if c.Record != nil {
			if err := c.Record(tx); err != nil {
				return err
			}
		}
		tx.undo = nil
		return tx.setIntent(c.What)
	})
	if err != nil {
		return err
	}
	if aerr := c.Apply(); aerr != nil {
		rerr := ss.tx(true, func(tx *Tx) error {
			if err := tx.revert(undo); err != nil {
				return err
			}
			if c.IPCache != nil {
				if err := tx.unswap(); err != nil {
					return err
				}
			}
			return tx.clearIntent()
		})
		if rerr != nil {
			return fmt.Errorf("%w; reverting the state store failed too (the next ctd command or the daemon makes the maps follow the store): %v", aerr, rerr)
		}
		return aerr
	}
	return ss.tx(true, func(tx *Tx) error { return tx.clearIntent() })
}

// Finish finishes a change whose writer died, if the store holds its mark:
// finish makes the maps equal to the store, then the mark is cleared. It
// returns the mark it cleared, or nil. It only reads the store when there
// is no mark.
func (s *Store) Finish(finish Finisher) (*Intent, error) {
	in, err := s.Pending()
	if in == nil || err != nil {
		return nil, err
	}
	ss, done, err := s.open(true)
	if err != nil {
		return nil, err
	}
	defer done()
	return ss.finish(finish)
}

// Pending returns the intent mark the store holds, or nil.
func (s *Store) Pending() (*Intent, error) {
	var in *Intent
	err := s.View(func(tx *Tx) (err error) {
		in, err = tx.Intent()
		return err
	})
	return in, err
}

// finish finishes a pending change in the session (which holds the
// exclusive lock, so its writer is gone).
func (ss *session) finish(finish Finisher) (*Intent, error) {
	var in *Intent
	err := ss.tx(true, func(tx *Tx) error {
		var err error
		if in, err = tx.Intent(); in == nil || err != nil {
			return err
		}
		st, err := tx.State()
		if err != nil {
			return err
		}
		if finish == nil {
			return fmt.Errorf("state store %s holds the unfinished change %q of pid %d: run any ctd command on its datapath to finish it", ss.s.path, in.What, in.PID)
		}
		if err := finish(st); err != nil {
			return fmt.Errorf("finish the change %q that pid %d left unfinished: %w", in.What, in.PID, err)
		}
		return tx.clearIntent()
	})
	if err != nil {
		return nil, err
	}
	return in, nil
}

// Intent returns the intent mark the store holds, or nil.
func (t *Tx) Intent() (*Intent, error) {
	v := t.tx.Bucket(bucketMeta).Get(keyIntent)
	if v == nil {
		return nil, nil
	}
	in := new(Intent)
	if err := json.Unmarshal(v, in); err != nil {
		return nil, &CorruptError{Path: t.path, Why: "unreadable intent mark"}
	}
	return in, nil
}

func (t *Tx) setIntent(what string) error {
	if !t.writable {
		return errors.New("state store: write in a read-only transaction")
	}
	v, err := json.Marshal(Intent{What: what, PID: os.Getpid(), Started: time.Now().UTC()})
	if err != nil {
		return err
	}
	return t.tx.Bucket(bucketMeta).Put(keyIntent, v)
}

// clearIntent clears the mark and drops what the change kept aside.
func (t *Tx) clearIntent() error {
	if err := t.dropAside(); err != nil {
		return err
	}
	return t.tx.Bucket(bucketMeta).Delete(keyIntent)
}
