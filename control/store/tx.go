package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"go.etcd.io/bbolt"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/policymap"
)

// Direction and Verdict are the datapath's own (bpf/common.h), as the
// policy map names them: the store keeps them with the same numbers.
type (
	Direction = bpf.Direction
	Verdict   = policymap.Verdict
)

const (
	Ingress      = bpf.Ingress
	Egress       = bpf.Egress
	VerdictUnset = policymap.VerdictUnset // never set: the datapath allows
	Allow        = policymap.Allow
	Deny         = policymap.Deny
)

// RuleKey selects a policy rule: direction, remote identity (0 = any),
// IP protocol (0 = any) and destination port (0 = any).
type RuleKey struct {
	Dir      Direction
	Identity uint32
	Proto    uint8
	Port     uint16
}

// State is the whole desired state.
type State struct {
	Generation uint64
	Interfaces map[string]string       // interface name -> attach mode
	IPCache    map[netip.Prefix]uint32 // prefix -> identity
	Policy     map[RuleKey]Verdict
	Defaults   [2]Verdict // by Direction; VerdictUnset where never set
}

// Tx is one store transaction. It is valid only inside the function given
// to Update or View (or a Change's Record).
type Tx struct {
	tx       *bbolt.Tx
	path     string
	writable bool
	wrote    bool // the desired state changed: the generation goes up
	// undo, when not nil, collects how to restore what the transaction
	// overwrites (Change reverts a change whose maps part failed).
	undo *[]undoOp
}

// undoOp restores one key: value nil deletes it.
type undoOp struct {
	bucket, key, value []byte
}

func (t *Tx) checkSchema() error {
	meta := t.tx.Bucket(bucketMeta)
	if meta == nil {
		return fmt.Errorf("state store %s is not a ctd store (no meta bucket)", t.path)
	}
	if v := meta.Get(keySchema); len(v) != 8 || binary.BigEndian.Uint64(v) != schemaVersion {
		return fmt.Errorf("state store %s has an unknown schema (this ctd reads schema %d): it was written by another ctd version", t.path, schemaVersion)
	}
	for _, b := range allBuckets {
		if t.tx.Bucket(b) == nil {
			return &CorruptError{Path: t.path, Why: "bucket " + string(b) + " is missing"}
		}
	}
	return nil
}

// checkPinPath refuses a store that belongs to another datapath than
// pinPath, and binds an unbound store to pinPath in a write transaction.
func (t *Tx) checkPinPath(pinPath string) error {
	if pinPath == "" {
		return nil
	}
	meta := t.tx.Bucket(bucketMeta)
	have := meta.Get(keyPinPath)
	switch {
	case have == nil && t.writable:
		if err := meta.Put(keyPinPath, []byte(pinPath)); err != nil {
			return fmt.Errorf("state store %s: record the pin path: %w", t.path, err)
		}
	case have != nil && string(have) != pinPath:
		return fmt.Errorf("state store %s belongs to the datapath at %s, not to --pin-path %s: give that pin path, or another --state-dir for this datapath", t.path, have, pinPath)
	}
	return nil
}

// logUndo records the current value of bucket/key, when undo is collected.
func (t *Tx) logUndo(bucket, key []byte) {
	if t.undo == nil {
		return
	}
	var old []byte
	if v := t.tx.Bucket(bucket).Get(key); v != nil {
		old = slices.Clone(v)
	}
	*t.undo = append(*t.undo, undoOp{bucket: bucket, key: slices.Clone(key), value: old})
}

// revert applies undo, last first.
func (t *Tx) revert(undo []undoOp) error {
	for _, op := range slices.Backward(undo) {
		var err error
		if op.value == nil {
			err = t.del(op.bucket, op.key)
		} else {
			err = t.put(op.bucket, op.key, op.value)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// Generation is the store's generation as this transaction sees it (before
// its own write, if any).
func (t *Tx) Generation() uint64 {
	v := t.tx.Bucket(bucketMeta).Get(keyGeneration)
	if len(v) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}

func (t *Tx) put(bucket, k, v []byte) error {
	if !t.writable {
		return errors.New("state store: write in a read-only transaction")
	}
	t.logUndo(bucket, k)
	if err := t.tx.Bucket(bucket).Put(k, v); err != nil {
		return fmt.Errorf("state store: write %s: %w", bucket, err)
	}
	t.wrote = true
	return nil
}

func (t *Tx) del(bucket, k []byte) error {
	if !t.writable {
		return errors.New("state store: write in a read-only transaction")
	}
	b := t.tx.Bucket(bucket)
	if b.Get(k) == nil {
		return nil
	}
	t.logUndo(bucket, k)
	if err := b.Delete(k); err != nil {
		return fmt.Errorf("state store: delete from %s: %w", bucket, err)
	}
	t.wrote = true
	return nil
}

// Interfaces: key = interface name, value = attach mode (as --mode spells it).

// PutInterface records that ctd runs on iface in the given attach mode.
func (t *Tx) PutInterface(iface, mode string) error {
	if iface == "" {
		return errors.New("state store: empty interface name")
	}
	if v := t.tx.Bucket(bucketInterfaces).Get([]byte(iface)); string(v) == mode && v != nil {
		return nil
	}
	return t.put(bucketInterfaces, []byte(iface), []byte(mode))
}

// DeleteInterface forgets iface.
func (t *Tx) DeleteInterface(iface string) error {
	return t.del(bucketInterfaces, []byte(iface))
}

// Interfaces returns the recorded interfaces and their attach modes.
func (t *Tx) Interfaces() map[string]string {
	out := make(map[string]string)
	_ = t.tx.Bucket(bucketInterfaces).ForEach(func(k, v []byte) error {
		out[string(k)] = string(v)
		return nil
	})
	return out
}

// IPCache: key = netip.Prefix.MarshalBinary (address bytes, then the
// prefix length), value = identity as 4 bytes big endian.

func prefixKey(p netip.Prefix) ([]byte, error) {
	if !p.IsValid() || p != p.Masked() {
		return nil, fmt.Errorf("state store: invalid ipcache prefix %s: must be valid with no host bits set", p)
	}
	return p.MarshalBinary()
}

// PutIPCache records prefix -> identity. The prefix must be masked and the
// identity non-zero.
func (t *Tx) PutIPCache(p netip.Prefix, identity uint32) error {
	k, err := prefixKey(p)
	if err != nil {
		return err
	}
	if identity == 0 {
		return fmt.Errorf("state store: invalid identity 0 for %s: identities are 1-4294967295", p)
	}
	v := binary.BigEndian.AppendUint32(nil, identity)
	if old := t.tx.Bucket(bucketIPCache).Get(k); string(old) == string(v) {
		return nil
	}
	return t.put(bucketIPCache, k, v)
}

// DeleteIPCache forgets a prefix. A prefix not recorded is not an error.
func (t *Tx) DeleteIPCache(p netip.Prefix) error {
	k, err := prefixKey(p)
	if err != nil {
		return err
	}
	return t.del(bucketIPCache, k)
}

// ClearIPCache forgets every prefix (for a load that replaces the table).
func (t *Tx) ClearIPCache() error {
	if !t.writable {
		return errors.New("state store: write in a read-only transaction")
	}
	if k, _ := t.tx.Bucket(bucketIPCache).Cursor().First(); k == nil {
		return nil
	}
	if t.undo != nil {
		if err := t.tx.Bucket(bucketIPCache).ForEach(func(k, _ []byte) error {
			t.logUndo(bucketIPCache, k)
			return nil
		}); err != nil {
			return err
		}
	}
	if err := t.tx.DeleteBucket(bucketIPCache); err != nil {
		return fmt.Errorf("state store: clear ipcache: %w", err)
	}
	if _, err := t.tx.CreateBucket(bucketIPCache); err != nil {
		return fmt.Errorf("state store: clear ipcache: %w", err)
	}
	t.wrote = true
	return nil
}

// LookupIPCache returns the identity recorded for exactly p.
func (t *Tx) LookupIPCache(p netip.Prefix) (uint32, bool) {
	k, err := prefixKey(p)
	if err != nil {
		return 0, false
	}
	v := t.tx.Bucket(bucketIPCache).Get(k)
	if len(v) != 4 {
		return 0, false
	}
	return binary.BigEndian.Uint32(v), true
}

// ForEachIPCache calls fn for every recorded prefix, in key order, and stops
// at the first error.
func (t *Tx) ForEachIPCache(fn func(p netip.Prefix, identity uint32) error) error {
	return t.tx.Bucket(bucketIPCache).ForEach(func(k, v []byte) error {
		var p netip.Prefix
		if err := p.UnmarshalBinary(k); err != nil || len(v) != 4 {
			return fmt.Errorf("state store %s: corrupt ipcache entry %x=%x", t.path, k, v)
		}
		return fn(p, binary.BigEndian.Uint32(v))
	})
}

// Policy: key = direction (1 byte), identity (4 bytes big endian), protocol
// (1 byte), port (2 bytes big endian); value = verdict (1 byte).

func ruleKeyBytes(k RuleKey) []byte {
	b := []byte{byte(k.Dir)}
	b = binary.BigEndian.AppendUint32(b, k.Identity)
	b = append(b, k.Proto)
	return binary.BigEndian.AppendUint16(b, k.Port)
}

func checkRule(k RuleKey, v Verdict) error {
	if k.Dir != Ingress && k.Dir != Egress {
		return fmt.Errorf("state store: invalid policy direction %d: valid are ingress (0), egress (1)", k.Dir)
	}
	if v != Allow && v != Deny {
		return fmt.Errorf("state store: invalid policy verdict %d: valid are allow (1), deny (2)", v)
	}
	return nil
}

// PutRule records a policy rule.
func (t *Tx) PutRule(k RuleKey, v Verdict) error {
	if err := checkRule(k, v); err != nil {
		return err
	}
	kb := ruleKeyBytes(k)
	if old := t.tx.Bucket(bucketPolicy).Get(kb); len(old) == 1 && Verdict(old[0]) == v {
		return nil
	}
	return t.put(bucketPolicy, kb, []byte{byte(v)})
}

// DeleteRule forgets a policy rule. A rule not recorded is not an error.
func (t *Tx) DeleteRule(k RuleKey) error {
	return t.del(bucketPolicy, ruleKeyBytes(k))
}

// Rules returns every recorded policy rule.
func (t *Tx) Rules() (map[RuleKey]Verdict, error) {
	out := make(map[RuleKey]Verdict)
	err := t.tx.Bucket(bucketPolicy).ForEach(func(k, v []byte) error {
		if len(k) != 8 || len(v) != 1 {
			return fmt.Errorf("state store %s: corrupt policy entry %x=%x", t.path, k, v)
		}
		rk := RuleKey{
			Dir:      Direction(k[0]),
			Identity: binary.BigEndian.Uint32(k[1:5]),
			Proto:    k[5],
			Port:     binary.BigEndian.Uint16(k[6:8]),
		}
		out[rk] = Verdict(v[0])
		return nil
	})
	return out, err
}

// Defaults: key = direction name, value = verdict (1 byte).

// SetDefault records a direction's default verdict; VerdictUnset forgets it.
func (t *Tx) SetDefault(d Direction, v Verdict) error {
	if d != Ingress && d != Egress {
		return fmt.Errorf("state store: invalid policy direction %d: valid are ingress (0), egress (1)", d)
	}
	k := []byte(d.String())
	switch v {
	case VerdictUnset:
		return t.del(bucketDefaults, k)
	case Allow, Deny:
		if old := t.tx.Bucket(bucketDefaults).Get(k); len(old) == 1 && Verdict(old[0]) == v {
			return nil
		}
		return t.put(bucketDefaults, k, []byte{byte(v)})
	}
	return fmt.Errorf("state store: invalid default verdict %d: valid are allow (1), deny (2)", v)
}

// Defaults returns the default verdicts by direction.
func (t *Tx) Defaults() [2]Verdict {
	var out [2]Verdict
	b := t.tx.Bucket(bucketDefaults)
	for _, d := range []Direction{Ingress, Egress} {
		if v := b.Get([]byte(d.String())); len(v) == 1 {
			out[d] = Verdict(v[0])
		}
	}
	return out
}

// PutState records all of st (its generation aside) on top of what the store
// holds.
func (t *Tx) PutState(st *State) error {
	for name, mode := range st.Interfaces {
		if err := t.PutInterface(name, mode); err != nil {
			return err
		}
	}
	for p, id := range st.IPCache {
		if err := t.PutIPCache(p, id); err != nil {
			return err
		}
	}
	for k, v := range st.Policy {
		if err := t.PutRule(k, v); err != nil {
			return err
		}
	}
	for d, v := range st.Defaults {
		if err := t.SetDefault(Direction(d), v); err != nil {
			return err
		}
	}
	return nil
}

// State reads the whole desired state.
func (t *Tx) State() (*State, error) {
	st := &State{
		Generation: t.Generation(),
		Interfaces: t.Interfaces(),
		IPCache:    make(map[netip.Prefix]uint32, t.tx.Bucket(bucketIPCache).Stats().KeyN),
		Defaults:   t.Defaults(),
	}
	err := t.ForEachIPCache(func(p netip.Prefix, id uint32) error {
		st.IPCache[p] = id
		return nil
	})
	if err != nil {
		return nil, err
	}
	if st.Policy, err = t.Rules(); err != nil {
		return nil, err
	}
	return st, nil
}
