package migrate

import (
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
)

// ctLayout holds the offsets of the conntrack entry fields that pass 2
// merges, read from the BTF of the map's value, so that one merger serves
// every layout that keeps the field names.
type ctLayout struct {
	packetsOrig, bytesOrig, packetsReply, bytesReply int // u64, atomic add
	firstSeen, lastSeen                              int // u64, min and max
	state, origIsB, tcpFlagsOrig, tcpFlagsReply      int // u8
	flags                                            int // u8, OR
}

func ctLayoutOf(spec *ebpf.MapSpec) (ctLayout, error) {
	var l ctLayout
	st, ok := btf.UnderlyingType(spec.Value).(*btf.Struct)
	if !ok {
		return l, fmt.Errorf("no BTF struct describes the values of %s", spec.Name)
	}
	fields := []struct {
		name string
		size int
		off  *int
	}{
		{"packets_orig", 8, &l.packetsOrig}, {"bytes_orig", 8, &l.bytesOrig},
		{"packets_reply", 8, &l.packetsReply}, {"bytes_reply", 8, &l.bytesReply},
		{"first_seen", 8, &l.firstSeen}, {"last_seen", 8, &l.lastSeen},
		{"state", 1, &l.state}, {"orig_is_b", 1, &l.origIsB},
		{"tcp_flags_orig", 1, &l.tcpFlagsOrig}, {"tcp_flags_reply", 1, &l.tcpFlagsReply},
		{"flags", 1, &l.flags},
	}
	for _, f := range fields {
		i := -1
		for j, m := range st.Members {
			if m.Name == f.name {
				i = j
			}
		}
		if i < 0 {
			return l, fmt.Errorf("value struct %s of %s has no field %s to merge", st.Name, spec.Name, f.name)
		}
		m := st.Members[i]
		size, err := btf.Sizeof(m.Type)
		if err != nil || size != f.size || m.Offset%8 != 0 || m.BitfieldSize != 0 {
			return l, fmt.Errorf("field %s of %s is not a plain %d-byte field", f.name, st.Name, f.size)
		}
		*f.off = int(m.Offset.Bytes())
	}
	return l, nil
}

// The merge record follows the key in the program's input, 8-byte aligned.
const (
	recDeltas    = 0  // 4 x u64: packets_orig, bytes_orig, packets_reply, bytes_reply
	recLastSeen  = 32 // u64: max
	recFirstSeen = 40 // u64: min, 0 leaves it
	recOrigIsB   = 48 // u8: orientation of the deltas and flags
	recTCPOrig   = 49 // u8: OR
	recTCPReply  = 50 // u8: OR
	recFlags     = 51 // u8: OR
	recSetState  = 52 // u8: 1 to set state to recStateNew if it still is recStateOld
	recStateOld  = 53
	recStateNew  = 54
	recSize      = 56
)

// Merge program return values.
const (
	mergeDone    = 0
	mergeMissing = 1
	mergeShort   = 2
)

// ctMerger merges entries into a conntrack map that the datapath writes at
// the same time, with a BPF program run by BPF_PROG_TEST_RUN: its atomic
// adds compose with the datapath's own atomic adds on the counters.
type ctMerger struct {
	prog    *ebpf.Program
	layout  ctLayout
	keySize int
	recOff  int
}

func newCTMerger(m *ebpf.Map, spec *ebpf.MapSpec) (*ctMerger, error) {
	l, err := ctLayoutOf(spec)
	if err != nil {
		return nil, err
	}
	c := &ctMerger{layout: l, keySize: int(spec.KeySize), recOff: (int(spec.KeySize) + 7) &^ 7}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "ctd_ct_merge",
		Type:         ebpf.SchedCLS,
		License:      "Dual BSD/GPL",
		Instructions: c.instructions(m.FD()),
	})
	if err != nil {
		return nil, fmt.Errorf("load conntrack merge program: %w", err)
	}
	c.prog = prog
	return c, nil
}

func (c *ctMerger) Close() error { return c.prog.Close() }

// instructions build the merge program: look up the key at the start of
// the packet and apply the record after it to the entry found.
//
//	r7 = packet, r9 = entry
func (c *ctMerger) instructions(mapFD int) asm.Instructions {
	l, rec := c.layout, int16(c.recOff)
	const (
		skbData    = 76 // offsetof(struct __sk_buff, data)
		skbDataEnd = 80
	)
	in := func(off int16, size asm.Size, dst asm.Register) asm.Instruction {
		return asm.LoadMem(dst, asm.R7, rec+off, size)
	}
	add := func(recOff int16, field int) asm.Instructions {
		return asm.Instructions{
			in(recOff, asm.DWord, asm.R1),
			asm.AddAtomic.Mem(asm.R9, asm.R1, asm.DWord, int16(field)),
		}
	}
	or := func(recOff int16, field int) asm.Instructions {
		return asm.Instructions{
			in(recOff, asm.Byte, asm.R1),
			asm.LoadMem(asm.R2, asm.R9, int16(field), asm.Byte),
			asm.Or.Reg(asm.R2, asm.R1),
			asm.StoreMem(asm.R9, int16(field), asm.R2, asm.Byte),
		}
	}
	// The deltas and TCP flags are given in the old entry's orientation:
	// if the new entry sees the flow from the other end, orig and reply swap.
	same := concat(
		add(recDeltas, l.packetsOrig), add(recDeltas+8, l.bytesOrig),
		add(recDeltas+16, l.packetsReply), add(recDeltas+24, l.bytesReply),
		or(recTCPOrig, l.tcpFlagsOrig), or(recTCPReply, l.tcpFlagsReply),
	)
	swapped := concat(
		add(recDeltas, l.packetsReply), add(recDeltas+8, l.bytesReply),
		add(recDeltas+16, l.packetsOrig), add(recDeltas+24, l.bytesOrig),
		or(recTCPOrig, l.tcpFlagsReply), or(recTCPReply, l.tcpFlagsOrig),
	)
	swapped[0] = swapped[0].WithSymbol("swapped")
	flags := or(recFlags, l.flags)
	flags[0] = flags[0].WithSymbol("flags")

	return concat(
		asm.Instructions{
			asm.LoadMem(asm.R7, asm.R1, skbData, asm.Word),
			asm.LoadMem(asm.R8, asm.R1, skbDataEnd, asm.Word),
			asm.Mov.Reg(asm.R1, asm.R7),
			asm.Add.Imm(asm.R1, int32(c.recOff+recSize)),
			asm.JGT.Reg(asm.R1, asm.R8, "short"),
			asm.LoadMapPtr(asm.R1, mapFD),
			asm.Mov.Reg(asm.R2, asm.R7),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "missing"),
			asm.Mov.Reg(asm.R9, asm.R0),
			in(recOrigIsB, asm.Byte, asm.R1),
			asm.LoadMem(asm.R2, asm.R9, int16(l.origIsB), asm.Byte),
			asm.JNE.Reg(asm.R1, asm.R2, "swapped"),
		},
		same,
		asm.Instructions{asm.Ja.Label("common")},
		swapped,
		asm.Instructions{
			// last_seen = max(last_seen, rec)
			in(recLastSeen, asm.DWord, asm.R1).WithSymbol("common"),
			asm.LoadMem(asm.R2, asm.R9, int16(l.lastSeen), asm.DWord),
			asm.JLE.Reg(asm.R1, asm.R2, "first_seen"),
			asm.StoreMem(asm.R9, int16(l.lastSeen), asm.R1, asm.DWord),
			// first_seen = min(first_seen, rec) unless rec is 0
			in(recFirstSeen, asm.DWord, asm.R1).WithSymbol("first_seen"),
			asm.JEq.Imm(asm.R1, 0, "flags"),
			asm.LoadMem(asm.R2, asm.R9, int16(l.firstSeen), asm.DWord),
			asm.JGE.Reg(asm.R1, asm.R2, "flags"),
			asm.StoreMem(asm.R9, int16(l.firstSeen), asm.R1, asm.DWord),
		},
		flags,
		asm.Instructions{
			// state = new if state == old
			in(recSetState, asm.Byte, asm.R1),
			asm.JEq.Imm(asm.R1, 0, "done"),
			in(recStateOld, asm.Byte, asm.R1),
			asm.LoadMem(asm.R2, asm.R9, int16(l.state), asm.Byte),
			asm.JNE.Reg(asm.R1, asm.R2, "done"),
			in(recStateNew, asm.Byte, asm.R1),
			asm.StoreMem(asm.R9, int16(l.state), asm.R1, asm.Byte),
			asm.Mov.Imm(asm.R0, mergeDone).WithSymbol("done"),
			asm.Return(),
			asm.Mov.Imm(asm.R0, mergeMissing).WithSymbol("missing"),
			asm.Return(),
			asm.Mov.Imm(asm.R0, mergeShort).WithSymbol("short"),
			asm.Return(),
		},
	)
}

func concat(parts ...asm.Instructions) asm.Instructions {
	var out asm.Instructions
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// merge applies to the new map's entry at key what the old map's entry cur
// gained since pass 1 copied snap (both in the new layout). Without a
// snapshot (the entry appeared after pass 1, or was recreated since), all of
// cur is added. It reports false if the new map has no entry at key.
func (c *ctMerger) merge(key, cur, snap []byte) (bool, error) {
	l, ne := c.layout, binary.NativeEndian
	counters := []int{l.packetsOrig, l.bytesOrig, l.packetsReply, l.bytesReply}
	grown := snap != nil
	for _, off := range counters {
		if grown && ne.Uint64(cur[off:]) < ne.Uint64(snap[off:]) {
			grown = false // deleted and created again since pass 1
		}
	}

	in := make([]byte, c.recOff+recSize)
	copy(in, key)
	rec := in[c.recOff:]
	for i, off := range counters {
		d := ne.Uint64(cur[off:])
		if grown {
			d -= ne.Uint64(snap[off:])
		}
		ne.PutUint64(rec[recDeltas+8*i:], d)
	}
	ne.PutUint64(rec[recLastSeen:], ne.Uint64(cur[l.lastSeen:]))
	if !grown {
		ne.PutUint64(rec[recFirstSeen:], ne.Uint64(cur[l.firstSeen:]))
	}
	rec[recOrigIsB] = cur[l.origIsB]
	rec[recTCPOrig] = cur[l.tcpFlagsOrig]
	rec[recTCPReply] = cur[l.tcpFlagsReply]
	rec[recFlags] = cur[l.flags]
	if grown {
		rec[recSetState], rec[recStateOld], rec[recStateNew] = 1, snap[l.state], cur[l.state]
	}

	ret, err := c.prog.Run(&ebpf.RunOptions{Data: in})
	if err != nil {
		return false, err
	}
	switch ret {
	case mergeDone:
		return true, nil
	case mergeMissing:
		return false, nil
	}
	return false, fmt.Errorf("merge program returned %d", ret)
}
