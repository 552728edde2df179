package ctmap

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
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
	Deleted Outcome = 1
	// Refreshed: the entry's last_seen changed since it was read (a packet
	// refreshed it, or the datapath created it anew): it was kept.
	Refreshed Outcome = 2
	// Missing: there was no entry (evicted or deleted meanwhile).
	Missing Outcome = 3
)

// ExpireBatch is how many candidates one run of the expire program decides:
// BPF_PROG_TEST_RUN takes a TC program's input as one page, less the skb's
// head- and tailroom.
const ExpireBatch = 64

// A record of the expire program's input: the key, the expected last_seen,
// the outcome the program writes back.
const (
	recKeySize  = int(unsafe.Sizeof(Key{}))
	recLastSeen = (recKeySize + 7) &^ 7
	recOutcome  = recLastSeen + 8
	recSize     = recOutcome + 8
)

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

// NewExpirer loads the expire program for m. Close releases it.
func (m *Map) NewExpirer() (*Expirer, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "ctd_ct_expire",
		Type:         ebpf.SchedCLS,
		License:      "Dual BSD/GPL",
		Instructions: expireInstructions(m.m.FD()),
	})
	if err != nil {
		return nil, fmt.Errorf("load conntrack expire program: %w", err)
	}
	return &Expirer{prog: prog, buf: make([]byte, ExpireBatch*recSize)}, nil
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
	clear(buf)
	for i := range cands {
		rec := buf[i*recSize:]
		copy(rec, unsafe.Slice((*byte)(unsafe.Pointer(&cands[i].Key)), recKeySize))
		binary.NativeEndian.PutUint64(rec[recLastSeen:], cands[i].LastSeen)
	}
	if _, err := x.prog.Run(&ebpf.RunOptions{Data: buf, DataOut: buf}); err != nil {
		return fmt.Errorf("expire conntrack entries: %w", err)
	}
	for i := range cands {
		o := Outcome(buf[i*recSize+recOutcome])
		if o < Deleted || o > Missing {
			return fmt.Errorf("expire conntrack entries: the program left candidate %d undecided (%d)", i, o)
		}
		outcomes[i] = o
	}
	return nil
}

// expireInstructions builds the program: for each of ExpireBatch records
// that the input holds, in straight-line code (no loop for the verifier to
// bound):
//
//	e = lookup(ct, &rec.key)
//	if !e                          { rec.outcome = Missing;   continue }
//	if e->last_seen != rec.last    { rec.outcome = Refreshed; continue }
//	if delete(ct, &rec.key) != 0   { rec.outcome = Missing;   continue }
//	rec.outcome = Deleted
//
// r7 = packet start, r8 = packet end, r9 = the current record.
func expireInstructions(mapFD int) asm.Instructions {
	const (
		skbData    = 76 // offsetof(struct __sk_buff, data)
		skbDataEnd = 80 // offsetof(struct __sk_buff, data_end)
	)
	lastSeen := int16(unsafe.Offsetof(Entry{}.LastSeen))
	insns := asm.Instructions{
		asm.LoadMem(asm.R7, asm.R1, skbData, asm.Word),
		asm.LoadMem(asm.R8, asm.R1, skbDataEnd, asm.Word),
	}
	for i := range ExpireBatch {
		label := func(s string) string { return fmt.Sprintf("%s_%d", s, i) }
		insns = append(insns,
			asm.Mov.Reg(asm.R9, asm.R7),
			asm.Add.Imm(asm.R9, int32(i*recSize)),
			asm.Mov.Reg(asm.R2, asm.R9),
			asm.Add.Imm(asm.R2, int32(recSize)),
			asm.JGT.Reg(asm.R2, asm.R8, "exit"),

			asm.LoadMapPtr(asm.R1, mapFD),
			asm.Mov.Reg(asm.R2, asm.R9),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, label("missing")),
			asm.LoadMem(asm.R1, asm.R0, lastSeen, asm.DWord),
			asm.LoadMem(asm.R2, asm.R9, int16(recLastSeen), asm.DWord),
			asm.JNE.Reg(asm.R1, asm.R2, label("refreshed")),
			asm.LoadMapPtr(asm.R1, mapFD),
			asm.Mov.Reg(asm.R2, asm.R9),
			asm.FnMapDeleteElem.Call(),
			asm.JNE.Imm(asm.R0, 0, label("missing")),
			asm.StoreImm(asm.R9, int16(recOutcome), int64(Deleted), asm.Byte),
			asm.Ja.Label(label("next")),
			asm.StoreImm(asm.R9, int16(recOutcome), int64(Refreshed), asm.Byte).WithSymbol(label("refreshed")),
			asm.Ja.Label(label("next")),
			asm.StoreImm(asm.R9, int16(recOutcome), int64(Missing), asm.Byte).WithSymbol(label("missing")),
			asm.Mov.Imm(asm.R0, 0).WithSymbol(label("next")),
		)
	}
	return append(insns,
		asm.Mov.Imm(asm.R0, 0).WithSymbol("exit"),
		asm.Return(),
	)
}
