package config_test

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

// TestUpdatesDoNotLoseEachOther runs writers that change different fields
// at once, each through its own Map on the pinned config, as separate ctd
// processes would (flock serialises open files, not processes): every
// change must survive.
func TestUpdatesDoNotLoseEachOther(t *testing.T) {
	dir := nettest.PinPath(t)
	spec, err := bpf.LoadCtd()
	if err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMapWithOptions(spec.Maps[loader.ConfigMap], ebpf.MapOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(filepath.Join(mkdir(t, dir), loader.ConfigMap)); err != nil {
		t.Fatal(err)
	}

	const rounds = 300
	fields := []func(*config.Values){
		func(v *config.Values) { v.PolicyRules++ },
		func(v *config.Values) { v.EventsRate++ },
		func(v *config.Values) { v.EventsBurst++ },
		func(v *config.Values) { v.DefaultVerdict[0]++ },
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(fields))
	for _, fn := range fields {
		c := config.New(m, dir)
		wg.Go(func() {
			for range rounds {
				if err := c.Update(fn); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got, err := config.New(m, dir).Read()
	if err != nil {
		t.Fatal(err)
	}
	want := config.Values{PolicyRules: rounds, EventsRate: rounds, EventsBurst: rounds, DefaultVerdict: [2]uint8{rounds % 256, 0}}
	if got != want {
		t.Fatalf("after %d updates of each field by concurrent writers: %+v, want %+v", rounds, got, want)
	}
}

func mkdir(t *testing.T, dir string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}
