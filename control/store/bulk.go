package store

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"fmt"
	"net/netip"
)

// A bulk change of the ipcache (ipcache load) is written to the store in
// transactions of at most stageChunk entries, into a staging bucket that is
// not part of the desired state, so that the memory a load needs does not
// grow with its size. The change's committing transaction then swaps the
// staged table in for the old one (moving buckets, whatever their size) and
// keeps the old one aside until the intent mark is cleared, so that a
// failed Apply swaps it back. A writer killed while staging leaves the
// desired state as it was; the next load drops the stale staging bucket.
var (
	bucketStaging = []byte("staging") // holds the ipcache being written
	bucketUndo    = []byte("undo")    // holds the ipcache a swap replaced
)

// stageChunk bounds the entries of one staging transaction (bbolt keeps
// about 100 bytes per entry of a transaction in memory).
const stageChunk = 100000

// IPCacheLoad is a bulk change of the ipcache.
type IPCacheLoad struct {
	// Len entries; At returns entry i. Entries come in key order
	// (ComparePrefixKeys), each prefix once, masked, identity non-zero.
	Len int
	At  func(i int) (netip.Prefix, uint32)
	// Replace makes the stored ipcache exactly the entries; otherwise
	// they are merged into it (an entry replaces a prefix's identity).
	Replace bool
}

// ComparePrefixKeys orders prefixes as the store keys them (and as an
// IPCacheLoad gives them): by the bytes of netip.Prefix.MarshalBinary.
func ComparePrefixKeys(a, b netip.Prefix) int {
	ka, kb := sortKeyOf(a), sortKeyOf(b)
	if c := cmp.Compare(ka.hi, kb.hi); c != 0 {
		return c
	}
	if c := cmp.Compare(ka.lo, kb.lo); c != 0 {
		return c
	}
	return cmp.Compare(ka.tail, kb.tail)
}

// sortKey is a prefix's store key (address bytes, then the length) as
// numbers: its first 16 bytes, zero-padded, then the 17th byte and the
// key's length. Comparing sortKeys compares the keys' bytes, without
// building them.
type sortKey struct {
	hi, lo uint64
	tail   uint16 // 17th byte << 8 | key length
}

func sortKeyOf(p netip.Prefix) sortKey {
	a := p.Addr()
	if a.Is4() {
		b := a.As4()
		return sortKey{hi: uint64(binary.BigEndian.Uint32(b[:]))<<32 | uint64(p.Bits())<<24, tail: 5}
	}
	b := a.As16()
	return sortKey{hi: binary.BigEndian.Uint64(b[:8]), lo: binary.BigEndian.Uint64(b[8:]), tail: uint16(p.Bits())<<8 | 17}
}

// stage writes the new ipcache into the staging bucket, in transactions of
// at most stageChunk entries: the entries, merged with the stored ipcache
// unless l.Replace.
func (ss *session) stage(l *IPCacheLoad) error {
	var (
		next    int    // next entry to write
		lastOld []byte // last key taken from the stored ipcache
		oldDone = l.Replace
	)
	for first := true; first || next < l.Len || !oldDone; first = false {
		err := ss.tx(true, func(tx *Tx) error {
			if first {
				if err := newStaging(tx); err != nil {
					return err
				}
			}
			b := tx.tx.Bucket(bucketStaging).Bucket(bucketIPCache)
			b.FillPercent = 1 // keys come in order: fill every page
			var ok, ov []byte
			cur := tx.tx.Bucket(bucketIPCache).Cursor()
			if !oldDone {
				if lastOld == nil {
					ok, ov = cur.First()
				} else if ok, ov = cur.Seek(lastOld); bytes.Equal(ok, lastOld) {
					ok, ov = cur.Next()
				}
			}
			var kbuf [17]byte
			for n := 0; n < stageChunk; n++ {
				var k, v []byte
				haveEntry := next < l.Len
				if ok == nil {
					oldDone = true
				}
				if !haveEntry && oldDone {
					return nil
				}
				var p netip.Prefix
				var id uint32
				if haveEntry {
					p, id = l.At(next)
					k, _ = p.AppendBinary(kbuf[:0])
				}
				switch c := bytes.Compare(ok, k); {
				case !oldDone && (!haveEntry || c < 0):
					k, v = ok, ov
					lastOld = append(lastOld[:0], ok...)
					ok, ov = cur.Next()
				default:
					if !oldDone && c == 0 { // the entry replaces the stored one
						lastOld = append(lastOld[:0], ok...)
						ok, ov = cur.Next()
					}
					if !p.IsValid() || p != p.Masked() || id == 0 {
						return fmt.Errorf("state store: invalid ipcache entry %v id=%d", p, id)
					}
					v = binary.BigEndian.AppendUint32(nil, id)
					next++
				}
				if err := b.Put(k, v); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("state store %s: stage the ipcache: %w", ss.s.path, err)
		}
	}
	return nil
}

// newStaging creates an empty staging bucket, dropping a stale one.
func newStaging(t *Tx) error {
	if t.tx.Bucket(bucketStaging) != nil {
		if err := t.tx.DeleteBucket(bucketStaging); err != nil {
			return err
		}
	}
	st, err := t.tx.CreateBucket(bucketStaging)
	if err != nil {
		return err
	}
	_, err = st.CreateBucket(bucketIPCache)
	return err
}

// swap puts the staged ipcache in place of the stored one, which it keeps
// aside until clearIntent (or unswap) drops it.
func (t *Tx) swap() error {
	undo, err := t.tx.CreateBucket(bucketUndo)
	if err == nil {
		err = t.tx.MoveBucket(bucketIPCache, nil, undo)
	}
	if err == nil {
		err = t.tx.MoveBucket(bucketIPCache, t.tx.Bucket(bucketStaging), nil)
	}
	if err == nil {
		err = t.tx.DeleteBucket(bucketStaging)
	}
	if err != nil {
		return fmt.Errorf("state store %s: swap in the staged ipcache: %w", t.path, err)
	}
	t.wrote = true
	return nil
}

// unswap puts back the ipcache swap replaced.
func (t *Tx) unswap() error {
	err := t.tx.DeleteBucket(bucketIPCache)
	if err == nil {
		err = t.tx.MoveBucket(bucketIPCache, t.tx.Bucket(bucketUndo), nil)
	}
	if err == nil {
		err = t.tx.DeleteBucket(bucketUndo)
	}
	if err != nil {
		return fmt.Errorf("state store %s: put back the previous ipcache: %w", t.path, err)
	}
	t.wrote = true
	return nil
}

// dropAside deletes what a bulk change left: the replaced ipcache and a
// staging bucket.
func (t *Tx) dropAside() error {
	for _, b := range [][]byte{bucketUndo, bucketStaging} {
		if t.tx.Bucket(b) == nil {
			continue
		}
		if err := t.tx.DeleteBucket(b); err != nil {
			return fmt.Errorf("state store %s: drop %s: %w", t.path, b, err)
		}
	}
	return nil
}
