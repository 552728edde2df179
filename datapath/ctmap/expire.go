package ctmap

import (
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
)

// Candidate is an entry to delete only if it is unchanged: its key, and the
// last_seen it had when it was read.
type Candidate struct {
	Key      Key
	LastSeen uint64
}

// Outcome says what Expirer.Delete did with a Candidate.
type Outcome uint8

const (
	// Deleted: the entry still had the candidate's last_seen, and is gone.
	Deleted = Outcome(bpf.CtexpireExpireOutcomeEXPIRE_DELETED)
	// Refreshed: the entry's last_seen changed since it was read (a packet
	// refreshed it, or the datapath created it anew): it was kept.
	Refreshed = Outcome(bpf.CtexpireExpireOutcomeEXPIRE_REFRESHED)
	// Missing: there was no entry (evicted or deleted meanwhile).
	Missing = Outcome(bpf.CtexpireExpireOutcomeEXPIRE_MISSING)
)

// ExpireBatch is how many candidates one run of the expire program decides:
// BPF_PROG_TEST_RUN takes a TC program's input as one page, less the skb's
// head- and tailroom.
const ExpireBatch = int(bpf.CtexpireExpireLimitEXPIRE_BATCH)

// record is one candidate as the expire program reads it and writes back
// its outcome (struct expire_rec in bpf/ctexpire.c).
type record = bpf.CtexpireExpireRec

const recSize = int(unsafe.Sizeof(record{}))

// Expirer deletes conntrack entries only while they are unchanged, with a
// small BPF program run by BPF_PROG_TEST_RUN: for each candidate it looks
// the entry up, compares its last_seen with the candidate's and deletes it
// if they are equal, all in the kernel, with no system call between the
// comparison and the deletion. A packet that refreshed the entry at any
// time before the comparison keeps it.
type Expirer struct {
	prog *ebpf.Program
	buf  []byte
}

// NewExpirer loads the expire program (bpf/ctexpire.c) for m. Close
// releases it.
func (m *Map) NewExpirer() (*Expirer, error) {
	spec, err := bpf.LoadCtexpire()
	if err != nil {
		return nil, fmt.Errorf("load conntrack expire program: %w", err)
	}
	var objs bpf.CtexpireObjects
	repl := map[string]*ebpf.Map{
		bpf.CtexpireMapCt4V2: m.t.Confirmed4, bpf.CtexpireMapCt6V2: m.t.Confirmed6,
		bpf.CtexpireMapCt4UnconfirmedV2: m.t.Unconfirmed4, bpf.CtexpireMapCt6UnconfirmedV2: m.t.Unconfirmed6,
	}
	if err := loadAgainst(spec, repl, &objs); err != nil {
		return nil, fmt.Errorf("load conntrack expire program: %w", err)
	}
	objs.CtexpireMaps.Close() // the replacements: m's tables stay open
	return &Expirer{prog: objs.CtdCtExpire, buf: make([]byte, ExpireBatch*recSize)}, nil
}

// Close unloads the program.
func (x *Expirer) Close() error { return x.prog.Close() }

// Delete decides up to ExpireBatch candidates in one program run and
// writes what it did with cands[i] to outcomes[i].
func (x *Expirer) Delete(cands []Candidate, outcomes []Outcome) error {
	if len(cands) > ExpireBatch || len(outcomes) < len(cands) {
		return fmt.Errorf("expire conntrack entries: %d candidates (at most %d) for %d outcomes", len(cands), ExpireBatch, len(outcomes))
	}
	if len(cands) == 0 {
		return nil
	}
	buf := x.buf[:len(cands)*recSize]
	recs := unsafe.Slice((*record)(unsafe.Pointer(unsafe.SliceData(buf))), len(cands))
	for i := range cands {
		recs[i] = record{LastSeen: cands[i].LastSeen}
		recs[i].Key.Key, recs[i].Key.Family = cands[i].Key.anyKey(), cands[i].Key.Family
	}
	if _, err := x.prog.Run(&ebpf.RunOptions{Data: buf, DataOut: buf}); err != nil {
		return fmt.Errorf("expire conntrack entries: %w", err)
	}
	for i := range cands {
		o := Outcome(recs[i].Outcome)
		if o < Deleted || o > Missing {
			return fmt.Errorf("expire conntrack entries: the program left candidate %d undecided (%d)", i, o)
		}
		outcomes[i] = o
	}
	return nil
}

// loadAgainst loads spec into objs with the maps named in repl replaced by
// the live ones, whatever their sizes.
func loadAgainst(spec *ebpf.CollectionSpec, repl map[string]*ebpf.Map, objs any) error {
	for name, m := range repl {
		spec.Maps[name].MaxEntries = m.MaxEntries()
	}
	return spec.LoadAndAssign(objs, &ebpf.CollectionOptions{MapReplacements: repl})
}
