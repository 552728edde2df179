package daemon

import (
	"fmt"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/migrate"
)

// Recovery and sizing: what Start finds pinned decides the map sizes, and
// maps whose pins are gone are taken back from the programs that run.

// options resolves the map sizes: what was asked, else what is pinned,
// else the defaults (migrate.PinnedSizes).
func (d *Daemon) options() (loader.Options, error) {
	o, err := migrate.PinnedSizes(loader.Options{
		PinPath:          d.cfg.PinPath,
		CTMax:            d.cfg.CTMax,
		CTUnconfirmedMax: d.cfg.CTUnconfirmedMax,
		IPCacheMax:       d.cfg.IPCacheMax,
		RingBufSize:      d.cfg.RingBufSize,
	})
	if err != nil {
		return o, err
	}
	return o, o.Validate()
}

// load opens the pinned maps, migrates those whose layout or size differs
// from what this build wants (switching the programs on every attached
// interface to the new maps, see package migrate), and loads this build's
// programs against them.
func (d *Daemon) load(o loader.Options) (*loader.Datapath, migrate.Report, error) {
	specFn := d.cfg.Spec
	if specFn == nil {
		specFn = bpf.LoadCtd
	}
	spec, err := specFn()
	if err != nil {
		return nil, migrate.Report{}, fmt.Errorf("load datapath spec: %w", err)
	}
	coll, rep, err := migrate.LoadSpec(o, spec, migrate.Interfaces{}, loader.Converters()...)
	if err != nil {
		return nil, rep, fmt.Errorf("load datapath: %w", err)
	}
	defer coll.Close()
	dp, err := loader.FromCollection(coll, o.PinPath)
	if err != nil {
		return nil, rep, fmt.Errorf("load datapath: %w", err)
	}
	return dp, rep, nil
}

// repinFromAttached re-pins maps whose pins are missing while ctd's programs
// still run on one of the daemon's interfaces (see pins.Dir.Repin).
func (d *Daemon) repinFromAttached() ([]string, error) {
	repinned, err := d.pins.Repin(d.cfg.Interfaces)
	for _, n := range repinned {
		d.log.Warn("map pin was missing; re-pinned the map the attached program uses", "map", n, "pin", d.pins.Map(n))
	}
	return repinned, err
}
