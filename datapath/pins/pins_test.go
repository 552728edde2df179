package pins_test

import (
	"errors"
	"os"
	"slices"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/pins"
	"github.com/ctd-dev/ctd/test/nettest"
)

// TestLayout pins a datapath's maps and reads them back through Dir: names,
// sizes, IDs, a temporary pin, and teardown.
func TestLayout(t *testing.T) {
	dir := pins.New(nettest.PinPath(t))
	if _, err := dir.OpenMap(loader.CT4Map, nil); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("OpenMap before anything is pinned: %v, want a NotPinnedError", err)
	}
	maps, err := loader.OpenMaps(loader.Options{PinPath: dir.Path(), CTMax: 1024, IPCacheMax: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer maps.Close()

	names, err := dir.MapNames()
	if err != nil {
		t.Fatal(err)
	}
	if want := slices.Sorted(slices.Values(loader.MapNames)); !slices.Equal(names, want) {
		t.Errorf("MapNames = %v, want %v", names, want)
	}
	if n, err := dir.MaxEntries(loader.CT4Map); err != nil || n != 1024 {
		t.Errorf("MaxEntries(%s) = %d, %v; want 1024", loader.CT4Map, n, err)
	}
	if n, err := dir.MaxEntries("ct_v9"); err != nil || n != 0 {
		t.Errorf("MaxEntries of a map not pinned = %d, %v; want 0", n, err)
	}

	// A temporary pin counts as ours, under its map's name.
	temp, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer temp.Close()
	if err := temp.Pin(dir.Temp(loader.CT4Map)); err != nil {
		t.Fatal(err)
	}
	if temps, err := dir.TempNames(); err != nil || !slices.Equal(temps, []string{loader.CT4Map}) {
		t.Errorf("TempNames = %v, %v; want [%s]", temps, err, loader.CT4Map)
	}
	ids, err := dir.MapIDs()
	if err != nil {
		t.Fatal(err)
	}
	tempID, err := pins.MapID(temp)
	if err != nil {
		t.Fatal(err)
	}
	ctID, err := pins.MapID(maps.CT4())
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != len(loader.MapNames)+1 || !slices.Contains(ids, tempID) || !slices.Contains(ids, ctID) {
		t.Errorf("MapIDs = %v: want the %d maps and the temporary pin %d", ids, len(loader.MapNames), tempID)
	}

	td, err := dir.Teardown()
	if err != nil || !td.Existed || len(td.Detached) != 0 {
		t.Fatalf("Teardown = %+v, %v; want the directory removed, nothing detached", td, err)
	}
	if _, err := os.Lstat(dir.Path()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s still exists after Teardown: %v", dir.Path(), err)
	}
	if td, err := dir.Teardown(); err != nil || td.Existed {
		t.Fatalf("second Teardown = %+v, %v; want nothing to do", td, err)
	}
}
