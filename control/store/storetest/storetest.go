// Package storetest damages state store files for tests of how ctd
// handles them.
package storetest

import (
	"encoding/binary"
	"os"
)

// DamageRootPage overwrites the page of the bbolt file at path that holds
// its top-level buckets, which every transaction reads, with garbage: one
// bad page of state.db, as a disk or a careless tool leaves it.
func DamageRootPage(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// The two meta pages: the one with the higher txid is current; its
	// root bucket's page id is at offset 32, the txid at 64 (bbolt's
	// page header, then magic, version, page size, flags, root).
	var root, txid uint64
	pageSize := int64(0)
	for i := range int64(2) {
		buf := make([]byte, 80)
		off := i * 4096
		if pageSize != 0 {
			off = i * pageSize
		}
		if _, err := f.ReadAt(buf, off); err != nil {
			return err
		}
		if pageSize == 0 {
			pageSize = int64(binary.LittleEndian.Uint32(buf[24:]))
		}
		if t := binary.LittleEndian.Uint64(buf[64:]); t >= txid {
			txid, root = t, binary.LittleEndian.Uint64(buf[32:])
		}
	}
	garbage := make([]byte, pageSize)
	for i := range garbage {
		garbage[i] = byte(i*7 + 3)
	}
	_, err = f.WriteAt(garbage, int64(root)*pageSize)
	return err
}
