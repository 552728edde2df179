package mapinfo

import (
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// Counts answers from its last count at once and counts again in the
// background while asked; it stops when its context is done.
func TestCounts(t *testing.T) {
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 16})
	if err != nil {
		t.Skipf("create a hash map (needs root): %v", err)
	}
	defer m.Close()
	c := NewCounts(t.Context(), []Map{{Name: "h", Map: m}}, 20*time.Millisecond)
	wait := func(want uint64) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			if n, ok := c.Entries("h"); ok && n == want {
				return
			}
			if time.Now().After(deadline) {
				n, ok := c.Entries("h")
				t.Fatalf("Entries = %d, %v; want %d within 5s", n, ok, want)
			}
		}
	}
	if _, ok := c.Entries("h"); ok {
		t.Error("a count before the first one finished")
	}
	wait(0)
	for i := range uint32(3) {
		if err := m.Put(i, i); err != nil {
			t.Fatal(err)
		}
	}
	wait(3)
	if _, ok := c.Entries("other"); ok {
		t.Error("a count of a map Counts does not hold")
	}
}
