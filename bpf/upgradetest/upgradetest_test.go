package upgradetest

import (
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
)

// TestSameLayoutsOtherPrograms checks what the restart test relies on: this
// build has exactly the maps of package bpf (name, type, key and value
// size, max entries, flags), its programs are different instructions, and
// the kernel's verifier accepts them.
func TestSameLayoutsOtherPrograms(t *testing.T) {
	want, err := bpf.LoadCtd()
	if err != nil {
		t.Fatal(err)
	}
	got, err := LoadCtd()
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Maps) != len(want.Maps) {
		t.Errorf("%d maps, package bpf has %d", len(got.Maps), len(want.Maps))
	}
	for name, w := range want.Maps {
		g, ok := got.Maps[name]
		if !ok {
			t.Errorf("map %s missing", name)
			continue
		}
		if g.Type != w.Type || g.KeySize != w.KeySize || g.ValueSize != w.ValueSize || g.MaxEntries != w.MaxEntries || g.Flags != w.Flags {
			t.Errorf("map %s: %v key %d value %d max %d flags %#x; package bpf: %v key %d value %d max %d flags %#x",
				name, g.Type, g.KeySize, g.ValueSize, g.MaxEntries, g.Flags, w.Type, w.KeySize, w.ValueSize, w.MaxEntries, w.Flags)
		}
	}
	for name, w := range want.Programs {
		g, ok := got.Programs[name]
		if !ok {
			t.Errorf("program %s missing", name)
			continue
		}
		if g.Instructions.String() == w.Instructions.String() {
			t.Errorf("program %s: same instructions as package bpf's", name)
		}
	}

	// Load with small maps to keep the test light; the verifier is the point.
	for _, m := range got.Maps {
		if m.Type == ebpf.LRUHash || m.Type == ebpf.LPMTrie || m.Type == ebpf.Hash {
			m.MaxEntries = 64
		}
	}
	coll, err := ebpf.NewCollection(got)
	if err != nil {
		t.Fatalf("load the -mcpu=v2 datapath: %v", err)
	}
	defer coll.Close()
	for name := range want.Programs {
		if coll.Programs[name] == nil {
			t.Errorf("program %s not loaded", name)
		}
	}
}
