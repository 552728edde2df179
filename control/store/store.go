// Package store keeps ctd's desired state, kept across reboots: the
// interfaces, ipcache entries, policy rules and default verdicts ctd was told
// about, in a bbolt file under the state directory.
//
// The store is shared by every ctd process: CLI commands write it, the daemon
// reads it to restore and reconcile the maps. bbolt locks the whole file
// (flock) while a database is open, so the store never keeps it open: every
// Update and View opens the file, runs one transaction and closes it again,
// waiting at most LockTimeout for the lock.
//
// Changes to the maps and to the store are made as one unit with Update: the
// caller changes a map inside the write transaction and registers the undo
// with Tx.OnAbort, then records the change in the store. The transaction holds
// the file's exclusive lock, so concurrent CLI processes (and the daemon's
// reconcile, which holds the shared lock) never interleave their map and store
// writes. If anything fails before the commit lands, the undo puts the map
// back. Every committed write increments the store's generation, which the
// daemon polls to see changes cheaply.
package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Defaults.
const (
	DefaultDir         = "/var/lib/ctd"
	FileName           = "state.db"
	DefaultLockTimeout = 5 * time.Second

	dirMode  = 0o700
	fileMode = 0o600
)

// Bucket and key names. The encoding of each bucket is documented at its
// accessors in tx.go; it is the store's own and independent of map layouts.
var (
	bucketMeta       = []byte("meta")
	bucketInterfaces = []byte("interfaces")
	bucketIPCache    = []byte("ipcache")
	bucketPolicy     = []byte("policy")
	bucketDefaults   = []byte("defaults")

	keyGeneration = []byte("generation")
	keySchema     = []byte("schema")

	allBuckets = [][]byte{bucketMeta, bucketInterfaces, bucketIPCache, bucketPolicy, bucketDefaults}
)

// schemaVersion is the version of the store's encoding.
const schemaVersion = 1

// Options tune Open. The zero value (or nil) uses the defaults.
type Options struct {
	// LockTimeout bounds the wait for another process's transaction.
	// Zero means DefaultLockTimeout.
	LockTimeout time.Duration
}

// Store is the desired-state file. It holds no open file between calls and
// is safe for concurrent use by goroutines and processes.
type Store struct {
	path    string
	timeout time.Duration
}

// Open returns the store in dir, creating dir (mode 0700) and the store file
// (mode 0600) where missing. An existing directory keeps its mode.
func Open(dir string, o *Options) (*Store, error) {
	if dir == "" {
		return nil, errors.New("state directory is empty: give a directory for ctd's state, e.g. " + DefaultDir)
	}
	s := &Store{path: filepath.Join(dir, FileName), timeout: DefaultLockTimeout}
	if o != nil && o.LockTimeout > 0 {
		s.timeout = o.LockTimeout
	}
	if err := makeDir(dir); err != nil {
		return nil, err
	}
	if err := s.init(); err != nil {
		return nil, err
	}
	return s, nil
}

// makeDir creates dir with mode 0700 (regardless of the umask) if it is
// missing, and checks that it is a directory.
func makeDir(dir string) error {
	fi, err := os.Stat(dir)
	switch {
	case err == nil:
		if !fi.IsDir() {
			return fmt.Errorf("state directory %s is not a directory", dir)
		}
		return nil
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("state directory %s: %w", dir, unwrapPath(err))
	}
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return fmt.Errorf("create state directory %s: %w", dir, unwrapPath(err))
	}
	if err := os.Chmod(dir, dirMode); err != nil {
		return fmt.Errorf("state directory %s: set mode 0700: %w", dir, unwrapPath(err))
	}
	return nil
}

// init creates the file and its buckets where missing, and checks the schema.
func (s *Store) init() error {
	fi, err := os.Stat(s.path)
	if err == nil && fi.Size() > 0 {
		return s.View(func(tx *Tx) error { return tx.checkSchema() })
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("state store %s: %w", s.path, unwrapPath(err))
	}
	db, err := s.open(false)
	if err != nil {
		return err
	}
	defer db.Close()
	if err := os.Chmod(s.path, fileMode); err != nil {
		return fmt.Errorf("state store %s: set mode 0600: %w", s.path, unwrapPath(err))
	}
	err = db.Update(func(btx *bbolt.Tx) error {
		for _, b := range allBuckets {
			if _, err := btx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		meta := btx.Bucket(bucketMeta)
		if meta.Get(keySchema) == nil {
			return meta.Put(keySchema, be64(schemaVersion))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("initialise state store %s: %w", s.path, err)
	}
	return nil
}

// Path is the store file's path.
func (s *Store) Path() string { return s.path }

func (s *Store) open(readOnly bool) (*bbolt.DB, error) {
	db, err := bbolt.Open(s.path, fileMode, &bbolt.Options{Timeout: s.timeout, ReadOnly: readOnly})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("state store %s is busy: another ctd process held it for more than %v; retry", s.path, s.timeout)
	case err != nil:
		return nil, fmt.Errorf("open state store %s: %w", s.path, unwrapPath(err))
	}
	return db, nil
}

// Update runs fn in one write transaction, holding the store's exclusive
// lock. If fn wrote anything, the generation is incremented. If fn fails or
// the commit fails, the transaction is rolled back and the functions
// registered with Tx.OnAbort run, last first, so that the maps fn changed
// are put back; their errors are joined to the returned error.
func (s *Store) Update(fn func(tx *Tx) error) error {
	db, err := s.open(false)
	if err != nil {
		return err
	}
	defer db.Close()

	btx, err := db.Begin(true)
	if err != nil {
		return fmt.Errorf("state store %s: begin transaction: %w", s.path, err)
	}
	tx := &Tx{tx: btx, writable: true}
	abort := func(err error) error {
		_ = btx.Rollback()
		return errors.Join(err, tx.runUndo())
	}
	if err := tx.checkSchema(); err != nil {
		return abort(err)
	}
	if err := fn(tx); err != nil {
		return abort(err)
	}
	if tx.wrote {
		meta := btx.Bucket(bucketMeta)
		if err := meta.Put(keyGeneration, be64(tx.Generation()+1)); err != nil {
			return abort(fmt.Errorf("state store %s: %w", s.path, err))
		}
	}
	if err := btx.Commit(); err != nil {
		return errors.Join(fmt.Errorf("state store %s: commit: %w", s.path, err), tx.runUndo())
	}
	return nil
}

// View runs fn in a read-only transaction, holding the store's shared lock:
// writers wait until fn returns, so fn sees the store and can act on it
// (e.g. reconcile the maps) without a writer interleaving.
func (s *Store) View(fn func(tx *Tx) error) error {
	db, err := s.open(true)
	if err != nil {
		return err
	}
	defer db.Close()
	return db.View(func(btx *bbolt.Tx) error {
		tx := &Tx{tx: btx}
		if err := tx.checkSchema(); err != nil {
			return err
		}
		return fn(tx)
	})
}

// Generation returns the number of write transactions that changed the
// store since it was created: a cheap way to see whether anything changed.
func (s *Store) Generation() (uint64, error) {
	var g uint64
	err := s.View(func(tx *Tx) error {
		g = tx.Generation()
		return nil
	})
	return g, err
}

// Snapshot reads the whole desired state.
func (s *Store) Snapshot() (*State, error) {
	var st *State
	err := s.View(func(tx *Tx) (err error) {
		st, err = tx.State()
		return err
	})
	return st, err
}

func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// unwrapPath strips the *os.PathError wrapper, whose path our messages
// already name, so errors stay one short line.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
