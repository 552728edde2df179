// Package store keeps ctd's desired state, kept across reboots: the
// interfaces, ipcache entries, policy rules and default verdicts ctd was told
// about, in a bbolt file under the state directory.
//
// The store is shared by every ctd process: CLI commands write it, the daemon
// reads it to restore and reconcile the maps. The store never keeps the file
// open: every operation takes the lock file next to it (flock, shared to
// read, exclusive to write; waiting at most LockTimeout), opens the file,
// runs its transactions and closes it again. Every transaction has a
// deadline, and a panic of bbolt (a corrupted file) becomes an ErrCorrupt
// error instead of a crash or a stuck lock.
//
// Changes to the desired state and the maps are made crash-consistent by
// Change (see intent.go): the new desired state is committed with an intent
// mark, then the maps are changed, then the mark is cleared. A process that
// finds a mark left by a writer that died finishes the change (makes the maps
// equal to the store) before anything else. Every committed change of the
// desired state increments the store's generation, which the daemon polls to
// see changes cheaply.
package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"golang.org/x/sys/unix"
)

// Defaults.
const (
	DefaultDir         = "/var/lib/ctd"
	FileName           = "state.db"
	DefaultLockTimeout = 5 * time.Second
	// DefaultDeadline bounds one transaction (commit and fsync included).
	DefaultDeadline = 30 * time.Second

	// lockName is the lock file next to the store: it, not the store file,
	// is what serialises ctd processes, so that the store file can be
	// replaced (compacted, moved aside) under the lock.
	lockName = FileName + ".lock"

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
	keyIntent     = []byte("intent")
	keyPinPath    = []byte("pin-path")

	allBuckets = [][]byte{bucketMeta, bucketInterfaces, bucketIPCache, bucketPolicy, bucketDefaults}
)

// schemaVersion is the version of the store's encoding.
const schemaVersion = 1

// ErrCorrupt is matched (errors.Is) by the errors of a store file that is
// not a valid ctd store: empty, truncated, or with damaged pages.
var ErrCorrupt = errors.New("state store is corrupted")

// ErrStuck is matched by the error of a store operation that missed its
// deadline; the operation may still hold the file, so a long-running
// process should stop.
var ErrStuck = errors.New("state store operation is stuck")

// CorruptError says which store is corrupted, why, and the way out.
type CorruptError struct {
	Path string
	Why  string
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("state store %s is corrupted (%s): ctd will not guess the desired state; run 'ctd state rebuild --from-pins' to rebuild it from the datapath (the bad file is moved aside, not deleted)", e.Path, e.Why)
}

func (e *CorruptError) Is(target error) bool { return target == ErrCorrupt }

// corrupt returns the CorruptError of this store, quoting at most 80
// characters of why.
func (s *Store) corrupt(why string) error {
	why = strings.Join(strings.Fields(why), " ")
	if len(why) > 80 {
		why = why[:77] + "..."
	}
	return &CorruptError{Path: s.path, Why: why}
}

// Options tune Open. The zero value (or nil) uses the defaults.
type Options struct {
	// LockTimeout bounds the wait for another process's operation.
	// Zero means DefaultLockTimeout.
	LockTimeout time.Duration
	// Deadline bounds each transaction. Zero means DefaultDeadline.
	Deadline time.Duration
	// PinPath is the datapath the store belongs to. A store that records
	// another pin path is refused; one that records none is bound to
	// PinPath at its next write. Empty: not checked.
	PinPath string
}

// Store is the desired-state file. It holds no open file between calls and
// is safe for concurrent use by goroutines and processes.
type Store struct {
	path     string
	timeout  time.Duration
	deadline time.Duration
	pinPath  string
}

// Open returns the store in dir, creating dir (mode 0700) and the store file
// (mode 0600) where missing: a missing file is a new install, which starts
// empty. An existing file must be a ctd store, of the pin path in o if it
// records one: an empty (0-byte) or damaged file is ErrCorrupt, never taken
// for a new install. An existing directory keeps its mode.
func Open(dir string, o *Options) (*Store, error) {
	if dir == "" {
		return nil, errors.New("state directory is empty: give a directory for ctd's state, e.g. " + DefaultDir)
	}
	s := newStore(dir, o)
	if err := makeDir(dir); err != nil {
		return nil, err
	}
	if err := s.init(); err != nil {
		return nil, err
	}
	return s, nil
}

func newStore(dir string, o *Options) *Store {
	s := &Store{path: filepath.Join(dir, FileName), timeout: DefaultLockTimeout, deadline: DefaultDeadline}
	if o != nil {
		if o.LockTimeout > 0 {
			s.timeout = o.LockTimeout
		}
		if o.Deadline > 0 {
			s.deadline = o.Deadline
		}
		if o.PinPath != "" {
			s.pinPath = filepath.Clean(o.PinPath)
		}
	}
	return s
}

// Exists reports whether dir holds a store file (of any content).
func Exists(dir string) bool {
	_, err := os.Lstat(filepath.Join(dir, FileName))
	return err == nil
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

// init creates the file where missing (under the exclusive lock, through a
// temporary file renamed into place, so that no process ever sees a
// half-created store), and checks the schema and the pin path.
func (s *Store) init() error {
	if _, err := os.Lstat(s.path); err == nil {
		return s.View(func(*Tx) error { return nil })
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("state store %s: %w", s.path, unwrapPath(err))
	}
	unlock, err := s.lock(true)
	if err != nil {
		return err
	}
	defer unlock()
	if _, err := os.Lstat(s.path); err == nil {
		return nil // another process created it meanwhile
	}
	return s.create()
}

// create creates the store file, empty, through a temporary file renamed
// into place. The caller holds the exclusive lock.
func (s *Store) create() error {
	tmp := s.path + ".new"
	_ = os.Remove(tmp) // left by a creator that died
	err := s.run("create", func() error {
		db, err := bbolt.Open(tmp, fileMode, &bbolt.Options{Timeout: s.timeout})
		if err != nil {
			return err
		}
		err = db.Update(func(btx *bbolt.Tx) error {
			for _, b := range allBuckets {
				if _, err := btx.CreateBucketIfNotExists(b); err != nil {
					return err
				}
			}
			return btx.Bucket(bucketMeta).Put(keySchema, be64(schemaVersion))
		})
		return errors.Join(err, db.Close())
	})
	if err == nil {
		err = os.Chmod(tmp, fileMode)
	}
	if err == nil {
		err = os.Rename(tmp, s.path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("create state store %s: %w", s.path, unwrapPath(err))
	}
	return syncDir(filepath.Dir(s.path))
}

// Path is the store file's path.
func (s *Store) Path() string { return s.path }

// lock takes the store's lock file, shared or exclusive, waiting at most the
// lock timeout, and returns the function that releases it.
func (s *Store) lock(exclusive bool) (func(), error) {
	path := filepath.Join(filepath.Dir(s.path), lockName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, fileMode)
	if err != nil {
		return nil, fmt.Errorf("state store lock %s: %w", path, unwrapPath(err))
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	deadline := time.Now().Add(s.timeout)
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("state store lock %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("state store %s is busy: another ctd process held it for more than %v; retry", s.path, s.timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// run runs fn with the store's deadline, turning a panic (bbolt panics on
// damaged pages) into ErrCorrupt. When the deadline passes, run returns
// ErrStuck and leaves fn running: it cannot be stopped.
func (s *Store) run(op string, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				done <- s.corrupt(fmt.Sprintf("%s: %v", op, r))
			}
		}()
		done <- fn()
	}()
	t := time.NewTimer(s.deadline)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		return fmt.Errorf("state store %s: %s did not finish within %v (is its filesystem hung?): %w", s.path, op, s.deadline, ErrStuck)
	}
}

// session is the store opened under its lock, for one or more transactions.
type session struct {
	s  *Store
	db *bbolt.DB
}

// open takes the lock and opens the file; a missing, empty or damaged file is
// an error (only init creates the file). Call the returned function to close
// the file and release the lock.
func (s *Store) open(writable bool) (*session, func(), error) {
	unlock, err := s.lock(writable)
	if err != nil {
		return nil, nil, err
	}
	return s.openLocked(writable, unlock)
}

// openLocked opens the file under the lock that unlock releases.
func (s *Store) openLocked(writable bool, unlock func()) (*session, func(), error) {
	fi, err := os.Stat(s.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		unlock()
		return nil, nil, fmt.Errorf("state store %s has disappeared: restore it, or run 'ctd state rebuild --from-pins'", s.path)
	case err != nil:
		unlock()
		return nil, nil, fmt.Errorf("state store %s: %w", s.path, unwrapPath(err))
	case fi.Size() == 0:
		unlock()
		return nil, nil, s.corrupt("the file is empty, 0 bytes")
	}
	var db *bbolt.DB
	err = s.run("open", func() (err error) {
		db, err = bbolt.Open(s.path, fileMode, &bbolt.Options{Timeout: s.timeout, ReadOnly: !writable})
		return err
	})
	switch {
	case err == nil:
	case errors.Is(err, bolterrors.ErrTimeout):
		unlock()
		return nil, nil, fmt.Errorf("state store %s is busy: another process held it for more than %v; retry", s.path, s.timeout)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum),
		errors.Is(err, bolterrors.ErrVersionMismatch), errors.Is(err, bolterrors.ErrInvalidMapping):
		unlock()
		return nil, nil, s.corrupt(err.Error())
	case errors.Is(err, ErrStuck):
		return nil, nil, err // the lock stays with the stuck open
	default:
		unlock()
		if errors.Is(err, ErrCorrupt) {
			return nil, nil, err
		}
		return nil, nil, fmt.Errorf("open state store %s: %w", s.path, unwrapPath(err))
	}
	return &session{s: s, db: db}, func() {
		// A close stuck behind a transaction that missed its deadline
		// keeps the file; the lock goes with it.
		if s.run("close", db.Close) == nil {
			unlock()
		}
	}, nil
}

// tx runs fn in one transaction of the session, within the deadline and
// with a bbolt panic turned into ErrCorrupt. A write transaction that wrote
// the desired state increments the generation; one that fails is rolled
// back.
func (ss *session) tx(writable bool, fn func(tx *Tx) error) error {
	s := ss.s
	return s.run("transaction", func() error {
		btx, err := ss.db.Begin(writable)
		if err != nil {
			return fmt.Errorf("state store %s: begin transaction: %w", s.path, err)
		}
		committed := false
		defer func() {
			if !committed {
				// Rolling back releases bbolt's writer lock, also after
				// a panic, so that closing the file does not hang.
				_ = btx.Rollback()
			}
		}()
		tx := &Tx{tx: btx, writable: writable, path: s.path}
		if err := tx.checkSchema(); err != nil {
			return err
		}
		if err := tx.checkPinPath(s.pinPath); err != nil {
			return err
		}
		if err := fn(tx); err != nil {
			return err
		}
		if !writable {
			return nil
		}
		if tx.wrote {
			if err := btx.Bucket(bucketMeta).Put(keyGeneration, be64(tx.Generation()+1)); err != nil {
				return fmt.Errorf("state store %s: %w", s.path, err)
			}
		}
		committed = true
		if err := btx.Commit(); err != nil {
			return fmt.Errorf("state store %s: commit: %w", s.path, err)
		}
		return nil
	})
}

// Update runs fn in one write transaction, holding the store's exclusive
// lock. If fn wrote anything, the generation is incremented. If fn fails or
// the commit fails, nothing of fn's writes is kept. Update is for changes
// of the store alone; a change of the store and the maps goes through
// Change.
func (s *Store) Update(fn func(tx *Tx) error) error {
	ss, done, err := s.open(true)
	if err != nil {
		return err
	}
	defer done()
	return ss.tx(true, fn)
}

// View runs fn in a read-only transaction, holding the store's shared lock:
// writers wait until fn returns, so fn sees the store and can act on it
// (e.g. reconcile the maps) without a writer interleaving.
func (s *Store) View(fn func(tx *Tx) error) error {
	ss, done, err := s.open(false)
	if err != nil {
		return err
	}
	defer done()
	return ss.tx(false, fn)
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

// Check reads every page of the store and reports the first inconsistency
// as ErrCorrupt: what 'ctd daemon' does before it trusts the file.
func (s *Store) Check() error {
	return s.View(func(tx *Tx) error {
		var first error
		for err := range tx.tx.Check() { // drained: the checker sends until done
			if first == nil {
				first = err
			}
		}
		if first != nil {
			return s.corrupt(first.Error())
		}
		// Decode every entry, too.
		_, err := tx.State()
		return err
	})
}

func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("state directory %s: %w", dir, unwrapPath(err))
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("state directory %s: sync: %w", dir, err)
	}
	return nil
}

// unwrapPath strips the *os.PathError wrapper, whose path our messages
// already name, so errors stay one short line.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
