package bench

import (
	"encoding/binary"
	"fmt"
	mrand "math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

// Where a floor program reads its inputs in its packet, after the Ethernet
// header BPF_PROG_TEST_RUN requires: the conntrack key, then the source
// and destination addresses to resolve.
const floorKeyOffset = 14

// Stack slots of a floor program (offsets from the frame pointer).
const (
	floorKeySlot   = -40                // conntrack key, up to 40 bytes
	floorEntrySlot = floorKeySlot - 112 // the entry an insert writes
	floorHashSlot  = floorEntrySlot - 16
	floorTrieSlot  = floorHashSlot - 20 // prefix length + address
)

// floorOps are the map operations a floor program does, in this order.
type floorOps struct {
	keyLen int
	// miss are tables the key must not be in.
	miss []*ebpf.Map
	// hit is a table the key is in; the program adds to two of the entry's
	// counters, as an established packet does.
	hit *ebpf.Map
	// insert is a table the key is written into with an entry from the stack.
	insert *ebpf.Map
	// hosts and cidrs, when set, resolve the packet's two addresses of
	// addrBits bits as identity_of does: host hash first, trie of CIDRs on a miss.
	hosts, cidrs *ebpf.Map
	addrBits     int
	// array is an array of one entry the program adds to, a lookup the
	// verifier inlines.
	array *ebpf.Map
	// table is an array of arrayTableSlots slots the program finds the key
	// in itself (arrayTableSlot), and adds to the entry's counters.
	table *ebpf.Map
}

// The table of FloorArrayTable: slots of a 16-byte key and an entry.
const (
	arrayTableBits  = 18
	arrayTableSlots = 1 << arrayTableBits
	arrayTableKey   = 16
)

// Multipliers of arrayTableSlot's hash (odd 32-bit constants of xxhash).
var arrayTableMul = [4]uint64{0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F}

// arrayTableSlot is the slot of a 16-byte key: a multiplicative hash of its
// four words (as the program loads them, host order), its top bits.
func arrayTableSlot(k []byte) uint32 {
	var h uint64
	for i, m := range arrayTableMul {
		h += uint64(binary.NativeEndian.Uint32(k[4*i:])) * m
	}
	return uint32(h>>(40-arrayTableBits)) & (arrayTableSlots - 1)
}

// floorProgram builds the TC program of ops. It passes (TC_ACT_UNSPEC) only
// when every operation found what it expects, and drops otherwise, so that
// a run that measured something else fails.
func floorProgram(ops floorOps) (*ebpf.Program, error) {
	addrBytes := ops.addrBits / 8
	need := floorKeyOffset + ops.keyLen + 2*addrBytes
	lookup := func(m *ebpf.Map, key int16) asm.Instructions {
		return asm.Instructions{
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, int32(key)),
			asm.FnMapLookupElem.Call(),
		}
	}
	insns := asm.Instructions{
		asm.LoadMem(asm.R6, asm.R1, 76, asm.Word), // skb->data
		asm.LoadMem(asm.R3, asm.R1, 80, asm.Word), // skb->data_end
		asm.Mov.Reg(asm.R4, asm.R6),
		asm.Add.Imm(asm.R4, int32(need)),
		asm.JGT.Reg(asm.R4, asm.R3, "drop"),
	}
	for off := 0; off < ops.keyLen; off += 4 {
		insns = append(insns,
			asm.LoadMem(asm.R5, asm.R6, int16(floorKeyOffset+off), asm.Word),
			asm.StoreMem(asm.RFP, int16(floorKeySlot+off), asm.R5, asm.Word),
		)
	}
	for _, m := range ops.miss {
		insns = append(insns, lookup(m, floorKeySlot)...)
		insns = append(insns, asm.JNE.Imm(asm.R0, 0, "drop"))
	}
	if ops.hit != nil {
		var e bpf.CtdCtEntry
		insns = append(insns, lookup(ops.hit, floorKeySlot)...)
		insns = append(insns,
			asm.JEq.Imm(asm.R0, 0, "drop"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord), // packets_orig
			asm.Mov.Imm(asm.R1, 64),
			asm.Mov.Reg(asm.R2, asm.R0),
			asm.Add.Imm(asm.R2, int32(unsafe.Offsetof(e.BytesOrig))),
			asm.StoreXAdd(asm.R2, asm.R1, asm.DWord),
		)
	}
	if ops.hosts != nil {
		for i := range 2 {
			at := int16(floorKeyOffset + ops.keyLen + i*addrBytes)
			label := fmt.Sprintf("resolved%d", i)
			insns = append(insns, asm.StoreImm(asm.RFP, floorTrieSlot, int64(ops.addrBits), asm.Word))
			for off := 0; off < addrBytes; off += 4 {
				insns = append(insns,
					asm.LoadMem(asm.R5, asm.R6, at+int16(off), asm.Word),
					asm.StoreMem(asm.RFP, int16(floorHashSlot+off), asm.R5, asm.Word),
					asm.StoreMem(asm.RFP, int16(floorTrieSlot+4+off), asm.R5, asm.Word),
				)
			}
			insns = append(insns, lookup(ops.hosts, floorHashSlot)...)
			insns = append(insns, asm.JNE.Imm(asm.R0, 0, label))
			insns = append(insns, lookup(ops.cidrs, floorTrieSlot)...)
			insns = append(insns, asm.JEq.Imm(asm.R0, 0, "drop"))
			insns = append(insns, asm.Mov.Imm(asm.R0, 0).WithSymbol(label))
		}
	}
	if ops.insert != nil {
		insns = append(insns, asm.Mov.Imm(asm.R1, 0))
		for off := int16(floorEntrySlot); off < floorEntrySlot+112; off += 8 {
			insns = append(insns, asm.StoreMem(asm.RFP, off, asm.R1, asm.DWord))
		}
		insns = append(insns,
			asm.LoadMapPtr(asm.R1, ops.insert.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, floorKeySlot),
			asm.Mov.Reg(asm.R3, asm.RFP),
			asm.Add.Imm(asm.R3, floorEntrySlot),
			asm.Mov.Imm(asm.R4, 0), // BPF_ANY, as ct_new inserts
			asm.FnMapUpdateElem.Call(),
			asm.JNE.Imm(asm.R0, 0, "drop"),
		)
	}
	if ops.table != nil {
		var e bpf.CtdCtEntry
		insns = append(insns, asm.Mov.Imm(asm.R7, 0))
		for i, m := range arrayTableMul {
			insns = append(insns,
				asm.LoadMem(asm.R1, asm.RFP, int16(floorKeySlot+4*i), asm.Word),
				asm.LoadImm(asm.R2, int64(m), asm.DWord),
				asm.Mul.Reg(asm.R1, asm.R2),
				asm.Add.Reg(asm.R7, asm.R1),
			)
		}
		insns = append(insns,
			asm.RSh.Imm(asm.R7, 40-arrayTableBits),
			asm.And.Imm(asm.R7, arrayTableSlots-1),
			asm.StoreMem(asm.RFP, floorHashSlot, asm.R7, asm.Word),
		)
		insns = append(insns, lookup(ops.table, floorHashSlot)...)
		insns = append(insns,
			asm.JEq.Imm(asm.R0, 0, "drop"),
			asm.LoadMem(asm.R1, asm.R0, 0, asm.DWord),
			asm.LoadMem(asm.R2, asm.RFP, floorKeySlot, asm.DWord),
			asm.JNE.Reg(asm.R1, asm.R2, "drop"),
			asm.LoadMem(asm.R1, asm.R0, 8, asm.DWord),
			asm.LoadMem(asm.R2, asm.RFP, floorKeySlot+8, asm.DWord),
			asm.JNE.Reg(asm.R1, asm.R2, "drop"),
			asm.Mov.Imm(asm.R1, 1),
			asm.Mov.Reg(asm.R2, asm.R0),
			asm.Add.Imm(asm.R2, int32(arrayTableKey+unsafe.Offsetof(e.PacketsOrig))),
			asm.StoreXAdd(asm.R2, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R1, 64),
			asm.Mov.Reg(asm.R2, asm.R0),
			asm.Add.Imm(asm.R2, int32(arrayTableKey+unsafe.Offsetof(e.BytesOrig))),
			asm.StoreXAdd(asm.R2, asm.R1, asm.DWord),
		)
	}
	if ops.array != nil {
		insns = append(insns, asm.StoreImm(asm.RFP, floorHashSlot, 0, asm.Word))
		insns = append(insns, lookup(ops.array, floorHashSlot)...)
		insns = append(insns,
			asm.JEq.Imm(asm.R0, 0, "drop"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		)
	}
	insns = append(insns,
		asm.Mov.Imm(asm.R0, -1), // TC_ACT_UNSPEC, as ctd passes
		asm.Return(),
		asm.Mov.Imm(asm.R0, 2).WithSymbol("drop"), // TC_ACT_SHOT
		asm.Return(),
	)
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "map_floor", Type: ebpf.SchedCLS, Instructions: insns, License: "GPL"})
	if err != nil {
		return nil, fmt.Errorf("load floor program: %w", err)
	}
	return p, nil
}

// floorMaps are the maps the floor programs use, created as the loader
// specifies them (default sizes) and, for the hits, filled with flows.
type floorMaps struct {
	ct, unconfirmed map[int]*ebpf.Map // by key length
	hosts, cidrs    map[int]*ebpf.Map // by address bits
	array, hash1    *ebpf.Map
	table           *ebpf.Map
	keys            map[int][][]byte // the entries of ct, by key length
	// tableKeys are the keys in table, each alone in its slot.
	tableKeys [][]byte
	// sources are host entries of the ipcache and server the address under
	// its CIDR that the per-packet new flows go to, by address bits.
	sources map[int][]netip.Addr
	server  map[int]netip.Addr
}

func newFloorMaps(tb testing.TB) *floorMaps {
	tb.Helper()
	spec, err := loader.Options{}.WithDefaults().Spec()
	if err != nil {
		tb.Fatal(err)
	}
	mk := func(s *ebpf.MapSpec) *ebpf.Map {
		m, err := ebpf.NewMap(s)
		if err != nil {
			tb.Fatalf("create %s: %v", s.Name, err)
		}
		tb.Cleanup(func() { m.Close() })
		return m
	}
	fm := &floorMaps{
		ct:          map[int]*ebpf.Map{16: mk(spec.Maps[loader.CT4Map]), 40: mk(spec.Maps[loader.CT6Map])},
		unconfirmed: map[int]*ebpf.Map{16: mk(spec.Maps[loader.CT4UnconfirmedMap]), 40: mk(spec.Maps[loader.CT6UnconfirmedMap])},
		hosts:       map[int]*ebpf.Map{},
		cidrs:       map[int]*ebpf.Map{},
		array:       mk(&ebpf.MapSpec{Name: "floor_array", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1}),
		hash1:       mk(&ebpf.MapSpec{Name: "floor_hash1", Type: ebpf.Hash, KeySize: 16, ValueSize: 8, MaxEntries: 1}),
		table: mk(&ebpf.MapSpec{Name: "floor_table", Type: ebpf.Array, KeySize: 4,
			ValueSize: uint32(arrayTableKey + unsafe.Sizeof(bpf.CtdCtEntry{})), MaxEntries: arrayTableSlots}),
		keys:    map[int][][]byte{},
		sources: map[int][]netip.Addr{},
		server:  map[int]netip.Addr{},
	}
	rnd := mrand.New(mrand.NewPCG(16, 40))
	var entry [unsafe.Sizeof(bpf.CtdCtEntry{})]byte
	for _, kl := range []int{16, 40} {
		for range DefaultFlows {
			k := randomKey(rnd, kl)
			if err := fm.ct[kl].Put(k, entry[:]); err != nil {
				tb.Fatalf("fill conntrack table: %v", err)
			}
			fm.keys[kl] = append(fm.keys[kl], k)
		}
	}
	used := map[uint32]bool{}
	for len(fm.tableKeys) < DefaultFlows {
		k := randomKey(rnd, arrayTableKey)
		slot := arrayTableSlot(k)
		if used[slot] {
			continue // one probe: each key alone in its slot
		}
		used[slot] = true
		if err := fm.table.Put(slot, append(slices.Clone(k), entry[:]...)); err != nil {
			tb.Fatalf("fill array table: %v", err)
		}
		fm.tableKeys = append(fm.tableKeys, k)
	}
	if err := fm.hash1.Put(make([]byte, 16), uint64(0)); err != nil {
		tb.Fatal(err)
	}
	set, err := newIPCacheSet(10000)
	if err != nil {
		tb.Fatal(err)
	}
	for _, is4 := range []bool{true, false} {
		bits, srcs, dst := 128, set.sources6, server6
		if is4 {
			bits, srcs, dst = 32, set.sources4, server4
		}
		_, fm.hosts[bits], fm.cidrs[bits] = lookupMaps(tb, is4, set.entries)
		fm.sources[bits], fm.server[bits] = srcs, dst
	}
	return fm
}

// randomKey returns a key of n bytes no flow of the floor maps has: its
// first byte is never 0 (the one-entry hash holds the zero key).
func randomKey(rnd *mrand.Rand, n int) []byte {
	k := make([]byte, n)
	for i := range k {
		k[i] = byte(rnd.Uint32())
	}
	k[0] |= 1
	return k
}

// ops returns the operations of case c over fm.
func (fm *floorMaps) ops(c FloorCase) floorOps {
	kl, bits := 16, 32
	if c.IPv6 {
		kl, bits = 40, 128
	}
	switch c.Ops {
	case FloorHit:
		return floorOps{keyLen: kl, hit: fm.ct[kl]}
	case FloorNew:
		return floorOps{keyLen: kl, miss: []*ebpf.Map{fm.ct[kl], fm.unconfirmed[kl]}, insert: fm.unconfirmed[kl]}
	case FloorNewIdentities:
		return floorOps{keyLen: kl, miss: []*ebpf.Map{fm.ct[kl], fm.unconfirmed[kl]}, insert: fm.unconfirmed[kl],
			hosts: fm.hosts[bits], cidrs: fm.cidrs[bits], addrBits: bits}
	case FloorArrayTable:
		return floorOps{keyLen: arrayTableKey, table: fm.table}
	case FloorHashMiss:
		return floorOps{keyLen: 16, miss: []*ebpf.Map{fm.hash1}}
	default:
		return floorOps{keyLen: 16, array: fm.array}
	}
}

// BenchmarkMapFloor measures what the kernel's map operations alone cost,
// per packet, in ctd's per-packet method: for each of FloorCases, a small
// TC program that reads a conntrack key (and two addresses) from its packet
// and does only the map operations the case names, on maps created as the
// loader creates them (default sizes), and the empty TC program, interleaved
// run by run in rotating order, one BPF_PROG_TEST_RUN with repeat 1 per run
// on a flow drawn at random (a hit: one of 1k flows in the confirmed table;
// a new flow: a key no table holds, whose insert is deleted after the round,
// outside the timed runs). Reported: the median over rounds of the program's
// time over the floor's, as over-ns/op.
func BenchmarkMapFloor(b *testing.B) {
	nettest.RequireRoot(b)
	floor, err := emptyProgram()
	if err != nil {
		b.Fatal(err)
	}
	defer floor.Close()
	fm := newFloorMaps(b)
	for _, c := range FloorCases {
		b.Run(c.Name, func(b *testing.B) { benchFloor(b, floor, fm, c) })
	}
}

func benchFloor(b *testing.B, floor *ebpf.Program, fm *floorMaps, c FloorCase) {
	ops := fm.ops(c)
	prog, err := floorProgram(ops)
	if err != nil {
		b.Fatal(err)
	}
	defer prog.Close()
	rnd := mrand.New(mrand.NewPCG(uint64(c.Ops), uint64(ops.keyLen)))
	pkt := make([]byte, floorKeyOffset+ops.keyLen+2*16)
	progs := []*ebpf.Program{prog, floor}
	var over []float64
	for done := 0; done < b.N; {
		n := min(roundSize, b.N-done)
		times := make([][]float64, len(progs))
		var inserted [][]byte
		for i := range n {
			var k []byte
			switch {
			case ops.hit != nil:
				k = fm.keys[ops.keyLen][rnd.IntN(len(fm.keys[ops.keyLen]))]
			case ops.table != nil:
				k = fm.tableKeys[rnd.IntN(len(fm.tableKeys))]
			default:
				k = randomKey(rnd, ops.keyLen)
			}
			copy(pkt[floorKeyOffset:], k)
			if ops.hosts != nil {
				at := floorKeyOffset + ops.keyLen
				srcs := fm.sources[ops.addrBits]
				copy(pkt[at:], srcs[rnd.IntN(len(srcs))].AsSlice())
				copy(pkt[at+ops.addrBits/8:], fm.server[ops.addrBits].AsSlice())
			}
			if ops.insert != nil {
				inserted = append(inserted, k)
			}
			for r := range progs {
				j := (i + r) % len(progs)
				d, err := run(progs[j], pkt, 1)
				if err != nil {
					b.Fatalf("case %s: %v", c.Name, err)
				}
				times[j] = append(times[j], d)
			}
		}
		for _, k := range inserted {
			if err := ops.insert.Delete(k); err != nil {
				b.Fatalf("case %s: delete the entry a run inserted: %v", c.Name, err)
			}
		}
		over = append(over, Median(times[0])-Median(times[1]))
		done += n
	}
	b.ReportMetric(Median(over), UnitOver)
	b.ReportMetric(0, "ns/op") // the figure is over-ns/op
}
