package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// Rebuild replaces the store in dir by a new one that fill fills, in one
// step under the exclusive lock: the old file, if there is one, is moved
// aside to state.db.bad-<UTC time> (never deleted), whatever its state. It
// returns the new store and where the old file went ("" when there was
// none).
func Rebuild(dir string, o *Options, fill func(tx *Tx) error) (*Store, string, error) {
	if dir == "" {
		return nil, "", errors.New("state directory is empty: give a directory for ctd's state, e.g. " + DefaultDir)
	}
	if err := makeDir(dir); err != nil {
		return nil, "", err
	}
	s := newStore(dir, o)
	unlock, err := s.lock(true)
	if err != nil {
		return nil, "", err
	}
	aside := ""
	if _, err := os.Lstat(s.path); err == nil {
		aside = s.path + ".bad-" + time.Now().UTC().Format("20060102T150405.000000000Z")
		if err := os.Rename(s.path, aside); err != nil {
			unlock()
			return nil, "", fmt.Errorf("move the state store %s aside: %w", s.path, unwrapPath(err))
		}
	}
	if err := s.create(); err != nil {
		unlock()
		return nil, aside, err
	}
	ss, done, err := s.openLocked(true, unlock)
	if err != nil {
		return nil, aside, err
	}
	defer done()
	if err := ss.tx(true, fill); err != nil {
		return nil, aside, fmt.Errorf("fill the rebuilt state store %s: %w", s.path, err)
	}
	return s, aside, syncDir(filepath.Dir(s.path))
}
