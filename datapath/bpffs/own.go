package bpffs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// The record Prepare keeps in a pin path of what it did there: empty
// directories (bpffs allows no dots in names, so they cannot be hidden),
// which nothing else in ctd reads as a map pin.
const (
	markCreated = "created-by-ctd" // ctd created the pin path's directory
	markMounted = "mounted-by-ctd" // ctd mounted the bpffs on the pin path
)

func isMark(name string) bool { return name == markCreated || name == markMounted }

// Prepare makes pinPath ready as Ensure does, and records in it what it did
// (created its directory, mounted the bpffs on it), so that Release takes
// back exactly that and never a directory or mount ctd did not make.
func Prepare(pinPath string) error {
	abs, did, err := ensure(pinPath)
	if err != nil {
		return err
	}
	for _, m := range []struct {
		did  bool
		name string
	}{{did.created, markCreated}, {did.mounted, markMounted}} {
		if !m.did {
			continue
		}
		if err := os.Mkdir(filepath.Join(abs, m.name), dirMode); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("pin path %s: record that ctd set it up: %w", abs, unwrapPath(err))
		}
	}
	return nil
}

// Release takes back what Prepare recorded in pinPath once the caller has
// removed its pins: it unmounts the bpffs Prepare mounted there and removes
// the directory if Prepare created it. It returns why it kept the directory
// ("" when it removed it): entries ctd did not make, or no record that ctd
// created it.
func Release(pinPath string) (kept string, err error) {
	names, err := dirNames(pinPath)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read pin path %s: %w", pinPath, err)
	}
	mountPoint, err := isMountRoot(pinPath)
	if err != nil {
		return "", err
	}
	others := slices.DeleteFunc(slices.Clone(names), func(n string) bool {
		return isMark(n) || (mountPoint && isPreloaded(n))
	})
	if len(others) > 0 {
		return fmt.Sprintf("it holds %s, which ctd did not create", listNames(others)), nil
	}
	created, mounted := slices.Contains(names, markCreated), slices.Contains(names, markMounted)
	for _, m := range []string{markMounted, markCreated} {
		if err := os.Remove(filepath.Join(pinPath, m)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("remove %s: %w", filepath.Join(pinPath, m), unwrapPath(err))
		}
	}
	if mounted && mountPoint {
		if err := unix.Unmount(pinPath, unix.MNT_DETACH); err != nil {
			return "", fmt.Errorf("unmount the bpffs ctd mounted on %s: %w", pinPath, err)
		}
	}
	if !created {
		return "ctd did not create it (or created it before ctd recorded that)", nil
	}
	if err := os.Remove(pinPath); err != nil {
		return "", fmt.Errorf("remove pin path %s: %w", pinPath, unwrapPath(err))
	}
	return "", nil
}

// Before is what a pin path held before a command that may set it up and
// pin maps in it; Undo takes back what the command added, when it failed.
type Before struct {
	path      string
	existed   bool            // the directory existed
	onBPFFS   bool            // and was on a bpffs
	entries   map[string]bool // its entries
	rootBPFFS bool            // /sys/fs/bpf was a bpffs
}

// Note records what pinPath holds now.
func Note(pinPath string) Before {
	b := Before{path: pinPath, entries: map[string]bool{}}
	b.rootBPFFS, _ = IsBPFFS(DefaultRoot)
	names, err := dirNames(pinPath)
	if err != nil {
		return b
	}
	b.existed = true
	b.onBPFFS, _ = IsBPFFS(pinPath)
	for _, n := range names {
		b.entries[n] = true
	}
	return b
}

// Undo removes what was added to the pin path since Note: new pins and new
// empty directories at its top level, then, if the pin path was not set up
// before, the bpffs mounted on it and its directory (as Release does); and a
// bpffs mounted on /sys/fs/bpf since Note that is empty again.
func (b Before) Undo() error {
	names, _ := dirNames(b.path)
	var errs []error
	for _, n := range names {
		if b.entries[n] || isMark(n) || isPreloaded(n) {
			continue
		}
		if err := os.Remove(filepath.Join(b.path, n)); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", filepath.Join(b.path, n), unwrapPath(err)))
		}
	}
	if !b.existed || !b.onBPFFS {
		if _, err := Release(b.path); err != nil {
			errs = append(errs, err)
		}
	}
	if !b.rootBPFFS {
		if ok, _ := IsBPFFS(DefaultRoot); ok {
			if names, err := dirNames(DefaultRoot); err == nil && !slices.ContainsFunc(names, func(n string) bool { return !isPreloaded(n) }) {
				if err := unix.Unmount(DefaultRoot, unix.MNT_DETACH); err != nil {
					errs = append(errs, fmt.Errorf("unmount the bpffs mounted on %s: %w", DefaultRoot, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// isPreloaded reports whether name is one of the iterators the kernel places
// at the root of every bpffs mount (bpf_preload); they cannot be unlinked.
func isPreloaded(name string) bool { return name == "maps.debug" || name == "progs.debug" }

// isMountRoot reports whether dir is on another filesystem than its parent.
func isMountRoot(dir string) (bool, error) {
	var st, pst unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return false, fmt.Errorf("stat %s: %w", dir, err)
	}
	parent := filepath.Dir(filepath.Clean(dir))
	if err := unix.Stat(parent, &pst); err != nil {
		return false, fmt.Errorf("stat %s: %w", parent, err)
	}
	return st.Dev != pst.Dev, nil
}
