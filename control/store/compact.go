package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"go.etcd.io/bbolt"
)

// Compaction: bbolt never shrinks its file; pages freed by deletions are
// reused but stay in the file. CompactIfBloated rewrites a store that is
// more than BloatFactor times its live data (and at least BloatMinSize)
// into a new file that replaces it.
const (
	BloatFactor  = 4
	BloatMinSize = 1 << 20
	// compactTxSize bounds the memory of one compaction transaction.
	compactTxSize = 16 << 20
)

// Size returns the store file's size and its live data: the bytes of the
// pages that hold buckets, keys and values (the meta and freelist pages
// included), as a compacted copy would need.
func (s *Store) Size() (file, live int64, err error) {
	err = s.View(func(tx *Tx) error {
		fi, err := os.Stat(s.path)
		if err != nil {
			return fmt.Errorf("state store %s: %w", s.path, unwrapPath(err))
		}
		file = fi.Size()
		pageSize := int64(tx.tx.DB().Info().PageSize)
		live = 4 * pageSize // two meta pages, the freelist, the root
		return tx.tx.ForEach(func(_ []byte, b *bbolt.Bucket) error {
			st := b.Stats()
			live += int64(st.BranchAlloc + st.LeafAlloc)
			if st.BranchPageN+st.LeafPageN == 0 {
				live += pageSize / 16 // an inline bucket
			}
			return nil
		})
	})
	return file, live, err
}

// CompactIfBloated compacts the store when its file is more than
// BloatFactor times its live data and at least BloatMinSize. It returns the
// sizes before and after, or zeros when it did not compact.
func (s *Store) CompactIfBloated() ([2]int64, error) {
	file, live, err := s.Size()
	if err != nil {
		return [2]int64{}, err
	}
	if file < BloatMinSize || file <= BloatFactor*live {
		return [2]int64{}, nil
	}
	return s.Compact()
}

// Compact rewrites the store into a new file with full pages and no free
// ones, which replaces it (rename, under the exclusive lock, so that no
// process writes the old file meanwhile). It returns the sizes before and
// after.
func (s *Store) Compact() ([2]int64, error) {
	unlock, err := s.lock(true)
	if err != nil {
		return [2]int64{}, err
	}
	defer unlock()
	fi, err := os.Stat(s.path)
	if err != nil {
		return [2]int64{}, fmt.Errorf("state store %s: %w", s.path, unwrapPath(err))
	}
	if fi.Size() == 0 {
		return [2]int64{}, s.corrupt("the file is empty, 0 bytes")
	}
	tmp := s.path + ".compact"
	_ = os.Remove(tmp) // left by a compaction that died
	err = s.run("compact", func() error {
		src, err := bbolt.Open(s.path, fileMode, &bbolt.Options{Timeout: s.timeout, ReadOnly: true})
		if err != nil {
			return err
		}
		defer src.Close()
		dst, err := bbolt.Open(tmp, fileMode, &bbolt.Options{Timeout: s.timeout})
		if err != nil {
			return err
		}
		return errors.Join(bbolt.Compact(dst, src, compactTxSize), dst.Sync(), dst.Close())
	})
	var after os.FileInfo
	if err == nil {
		after, err = os.Stat(tmp)
	}
	if err == nil {
		err = os.Rename(tmp, s.path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return [2]int64{}, fmt.Errorf("compact state store %s: %w", s.path, unwrapPath(err))
	}
	return [2]int64{fi.Size(), after.Size()}, syncDir(filepath.Dir(s.path))
}
