package ctmap_test

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

func newTable(t *testing.T) *ctmap.Map {
	t.Helper()
	nettest.RequireRoot(t)
	ct, closeCT, err := loader.NewConntrack(loader.Options{CTMax: 1024})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(closeCT)
	return ct
}

// TestExpirer decides a full batch of candidates: a third unchanged (deleted),
// a third refreshed since they were read (kept), a third gone.
func TestExpirer(t *testing.T) {
	ct := newTable(t)
	x, err := ct.NewExpirer()
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()

	var cands []ctmap.Candidate
	want := map[ctmap.Key]ctmap.Outcome{}
	for i := range ctmap.ExpireBatch {
		k, _ := ctmap.KeyOf(unix.IPPROTO_UDP, netip.MustParseAddr("198.51.100.1"), uint16(1000+i), netip.MustParseAddr("fd00::1"), 53)
		e := ctmap.Entry{LastSeen: uint64(1000 + i), PacketsOrig: uint64(i)}
		c := ctmap.Candidate{Key: k, LastSeen: e.LastSeen}
		switch i % 3 {
		case 0:
			want[k] = ctmap.Deleted
		case 1:
			e.LastSeen++ // refreshed after the read
			want[k] = ctmap.Refreshed
		case 2:
			want[k] = ctmap.Missing
		}
		if i%3 != 2 {
			if err := ct.Put(&k, &e); err != nil {
				t.Fatal(err)
			}
		}
		cands = append(cands, c)
	}
	outcomes := make([]ctmap.Outcome, len(cands))
	if err := x.Delete(cands, outcomes); err != nil {
		t.Fatal(err)
	}
	for i, c := range cands {
		if outcomes[i] != want[c.Key] {
			t.Errorf("candidate %d: outcome %d, want %d", i, outcomes[i], want[c.Key])
		}
		e, err := ct.Lookup(&c.Key)
		present := err == nil
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatal(err)
		}
		if present != (want[c.Key] == ctmap.Refreshed) {
			t.Errorf("candidate %d (outcome %d): present=%v", i, want[c.Key], present)
		}
		if present && e.LastSeen != c.LastSeen+1 {
			t.Errorf("candidate %d: kept entry changed: %+v", i, e)
		}
	}

	if err := x.Delete(nil, nil); err != nil {
		t.Errorf("no candidates: %v", err)
	}
	if err := x.Delete(make([]ctmap.Candidate, ctmap.ExpireBatch+1), make([]ctmap.Outcome, ctmap.ExpireBatch+1)); err == nil {
		t.Error("a batch over ExpireBatch was accepted")
	}
}
