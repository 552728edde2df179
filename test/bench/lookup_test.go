package bench

import (
	"fmt"
	mrand "math/rand/v2"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/ctd-dev/ctd/datapath/ipcachemap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

// addrOffset is where a lookup program reads the address in its packet
// (right after an Ethernet header, the least BPF_PROG_TEST_RUN takes).
const addrOffset = 14

// lookupProgram returns a TC program that reads an address of bits bits
// from its packet and resolves it as the datapath's identity_of does: in
// hash first when hash is not nil (found: done), then in trie with the
// full-length key.
func lookupProgram(bits int, hash, trie *ebpf.Map) (*ebpf.Program, error) {
	const hashKey, trieKey = -40, -24 // stack: hash key (16 bytes), trie key (4 + 16)
	words := bits / 32
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, 76, asm.Word), // skb->data
		asm.LoadMem(asm.R3, asm.R1, 80, asm.Word), // skb->data_end
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, int32(addrOffset+4*words)),
		asm.JGT.Reg(asm.R4, asm.R3, "out"),
		asm.StoreImm(asm.RFP, trieKey, int64(bits), asm.Word),
	}
	for w := range words {
		insns = append(insns,
			asm.LoadMem(asm.R5, asm.R2, int16(addrOffset+4*w), asm.Word),
			asm.StoreMem(asm.RFP, int16(trieKey+4+4*w), asm.R5, asm.Word),
			asm.StoreMem(asm.RFP, int16(hashKey+4*w), asm.R5, asm.Word),
		)
	}
	if hash != nil {
		insns = append(insns,
			asm.LoadMapPtr(asm.R1, hash.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, hashKey),
			asm.FnMapLookupElem.Call(),
			asm.JNE.Imm(asm.R0, 0, "out"),
		)
	}
	insns = append(insns,
		asm.LoadMapPtr(asm.R1, trie.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, trieKey),
		asm.FnMapLookupElem.Call(),
		asm.Mov.Imm(asm.R0, -1).WithSymbol("out"), // TC_ACT_UNSPEC
		asm.Return(),
	)
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "ipcache_lookup", Type: ebpf.SchedCLS, Instructions: insns, License: "GPL"})
	if err != nil {
		return nil, fmt.Errorf("load lookup program: %w", err)
	}
	return p, nil
}

// lookupMaps creates the maps of one family as the loader sizes them (the
// default --ipcache-max): a trie of every prefix (the first release's
// layout), and the host hash and trie of CIDRs (this build's), filled with
// entries.
func lookupMaps(tb testing.TB, is4 bool, entries []ipcachemap.Entry) (all, hosts, cidrs *ebpf.Map) {
	tb.Helper()
	spec, err := loader.Options{}.WithDefaults().Spec()
	if err != nil {
		tb.Fatal(err)
	}
	trieName, hashName := loader.IPCache4Map, loader.IPHost4Map
	if !is4 {
		trieName, hashName = loader.IPCache6Map, loader.IPHost6Map
	}
	mk := func(name string) *ebpf.Map {
		m, err := ebpf.NewMap(spec.Maps[name])
		if err != nil {
			tb.Fatalf("create %s: %v", name, err)
		}
		tb.Cleanup(func() { m.Close() })
		return m
	}
	all, hosts, cidrs = mk(trieName), mk(hashName), mk(trieName)
	var fam []ipcachemap.Entry
	for _, e := range entries {
		if e.Prefix.Addr().Is4() == is4 {
			fam = append(fam, e)
		}
	}
	set := ipcacheSet{entries: fam}
	if is4 {
		err = set.writeTries(all, nil)
	} else {
		err = set.writeTries(nil, all)
	}
	if err != nil {
		tb.Fatal(err)
	}
	// This build's pair, written as ipcachemap writes it.
	pair := ipcachemap.New(cidrs, cidrs, hosts, hosts)
	if n, err := pair.BatchUpdate(fam); err != nil || n != len(fam) {
		tb.Fatalf("fill host hash and CIDR trie: %d of %d, %v", n, len(fam), err)
	}
	return all, hosts, cidrs
}

// underCIDRs returns an address inside each CIDR of entries that no host
// entry covers.
func underCIDRs(entries []ipcachemap.Entry, is4 bool) []netip.Addr {
	hosts := map[netip.Addr]bool{}
	for _, e := range entries {
		if ipcachemap.IsHost(e.Prefix) {
			hosts[e.Prefix.Addr()] = true
		}
	}
	var out []netip.Addr
	for _, e := range entries {
		if a := e.Prefix.Addr().Next(); e.Prefix.Addr().Is4() == is4 && !ipcachemap.IsHost(e.Prefix) && e.Prefix.Contains(a) && !hosts[a] {
			out = append(out, a)
		}
	}
	return out
}

// BenchmarkIPCacheLookup measures identity resolution alone, per lookup,
// in each of LookupVariants: a small program that reads an address from
// its packet and resolves it as the datapath does, against maps filled with
// the per-packet benchmark's ipcache (80% host entries), each interleaved
// with the empty TC program run by run in rotating order, one BPF_PROG_TEST_RUN
// with repeat 1 on an address drawn at random per run (host entries, or
// addresses under the CIDRs). Reported: each variant's median over rounds
// of its time over the floor.
func BenchmarkIPCacheLookup(b *testing.B) {
	nettest.RequireRoot(b)
	floor, err := emptyProgram()
	if err != nil {
		b.Fatal(err)
	}
	defer floor.Close()
	sets := map[int]ipcacheSet{}
	for _, c := range LookupCases {
		set, ok := sets[c.Prefixes]
		if !ok {
			if set, err = newIPCacheSet(c.Prefixes); err != nil {
				b.Fatal(err)
			}
			sets[c.Prefixes] = set
		}
		b.Run(c.Name, func(b *testing.B) { benchLookup(b, floor, set, c.IPv4) })
	}
}

func benchLookup(b *testing.B, floor *ebpf.Program, set ipcacheSet, is4 bool) {
	all, hosts, cidrs := lookupMaps(b, is4, set.entries)
	bits := 128
	sources := set.sources6
	if is4 {
		bits, sources = 32, set.sources4
	}
	under := underCIDRs(set.entries, is4)
	trieOnly, err := lookupProgram(bits, nil, all)
	if err != nil {
		b.Fatal(err)
	}
	defer trieOnly.Close()
	hashFirst, err := lookupProgram(bits, hosts, cidrs)
	if err != nil {
		b.Fatal(err)
	}
	defer hashFirst.Close()
	type variant struct {
		prog  *ebpf.Program
		addrs []netip.Addr
	}
	variants := []variant{{trieOnly, sources}, {hashFirst, sources}, {trieOnly, under}, {hashFirst, under}}
	rnd := mrand.New(mrand.NewPCG(uint64(len(set.entries)), uint64(bits)))
	pkt := make([]byte, 64)
	over := make([][]float64, len(variants))
	for done := 0; done < b.N; {
		n := min(roundSize, b.N-done)
		// Each variant runs beside the floor alone, as the per-packet rows
		// run ctd's program: every program more in the rotation would evict
		// more of the others' cache lines between runs.
		for j, v := range variants {
			progs := []*ebpf.Program{v.prog, floor}
			times := make([][]float64, len(progs))
			for i := range n {
				copy(pkt[addrOffset:], v.addrs[rnd.IntN(len(v.addrs))].AsSlice())
				for r := range progs {
					k := (i + r) % len(progs)
					d, err := run(progs[k], pkt, 1)
					if err != nil {
						b.Fatal(err)
					}
					times[k] = append(times[k], d)
				}
			}
			over[j] = append(over[j], Median(times[0])-Median(times[1]))
		}
		done += n
	}
	for j, v := range LookupVariants {
		b.ReportMetric(Median(over[j]), v.Unit)
	}
	b.ReportMetric(0, "ns/op") // the figures are the variants'
}
