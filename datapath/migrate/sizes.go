package migrate

import (
	"errors"
	"os"

	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/pins"
)

// PinnedSizes resolves the map sizes of o that are zero: the size of the
// map pinned at o.PinPath, or else of the older layout it replaces (so
// that an upgrade keeps the operator's --ct-max), else the default.
func PinnedSizes(o loader.Options) (loader.Options, error) {
	dir := pins.New(o.WithDefaults().PinPath)
	pinned, err := dir.MapNames()
	if err != nil && !errors.Is(err, os.ErrNotExist) { // no pin directory yet: nothing pinned
		return o, err
	}
	for _, f := range []struct {
		size *uint32
		name string
	}{
		{&o.CTMax, loader.CT4Map},
		{&o.CTUnconfirmedMax, loader.CT4UnconfirmedMap},
		{&o.IPCacheMax, loader.IPCache4Map},
		{&o.RingBufSize, loader.EventsMap},
	} {
		if *f.size != 0 {
			continue
		}
		for _, name := range append([]string{f.name}, loader.OtherLayouts(f.name, pinned, loader.Converters())...) {
			n, err := dir.MaxEntries(name)
			if err != nil {
				return o, err
			}
			if n != 0 {
				*f.size = n
				break
			}
		}
	}
	return o.WithDefaults(), nil
}
