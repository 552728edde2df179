// Package loader opens or creates ctd's pinned maps and loads the TC programs that use them.
package loader

import (
	"errors"
	"fmt"
	stdmaps "maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/bpffs"
	"github.com/ctd-dev/ctd/datapath/config"
)

// Defaults for Options.
const (
	DefaultPinPath          = "/sys/fs/bpf/ctd"
	DefaultCTMax            = 262144
	DefaultCTUnconfirmedMax = 65536
	DefaultIPCacheMax       = 512000
	DefaultRingBufSize      = 8 << 20
)

// Options size the datapath's maps and say where they are pinned. Sizes are
// what the operator asked for, never derived from anything that can change
// between runs, so a restart reopens the same maps.
type Options struct {
	PinPath          string
	CTMax            uint32
	CTUnconfirmedMax uint32
	IPCacheMax       uint32
	RingBufSize      uint32
}

// WithDefaults fills zero fields with their defaults.
func (o Options) WithDefaults() Options {
	if o.PinPath == "" {
		o.PinPath = DefaultPinPath
	}
	if o.CTMax == 0 {
		o.CTMax = DefaultCTMax
	}
	if o.CTUnconfirmedMax == 0 {
		o.CTUnconfirmedMax = DefaultCTUnconfirmedMax
	}
	if o.IPCacheMax == 0 {
		o.IPCacheMax = DefaultIPCacheMax
	}
	if o.RingBufSize == 0 {
		o.RingBufSize = DefaultRingBufSize
	}
	return o
}

// Validate checks the sizes the kernel would otherwise reject obscurely.
func (o Options) Validate() error {
	if o.CTMax < 1 {
		return fmt.Errorf("invalid --ct-max %d: must be at least 1", o.CTMax)
	}
	if o.CTUnconfirmedMax < 1 {
		return fmt.Errorf("invalid --ct-unconfirmed-max %d: must be at least 1", o.CTUnconfirmedMax)
	}
	if o.IPCacheMax < 1 {
		return fmt.Errorf("invalid --ipcache-max %d: must be at least 1", o.IPCacheMax)
	}
	if n := o.RingBufSize; n < 4096 || n&(n-1) != 0 {
		return fmt.Errorf("invalid --ringbuf-size %d: must be a power of two of at least 4096", n)
	}
	return nil
}

// Spec returns the datapath's collection spec with the maps sized by o.
func (o Options) Spec() (*ebpf.CollectionSpec, error) {
	spec, err := bpf.LoadCtd()
	if err != nil {
		return nil, fmt.Errorf("load datapath spec: %w", err)
	}
	o.SizeSpec(spec)
	return spec, nil
}

// SizeSpec sizes the maps of spec as o says, whatever their layout version:
// ct4_vN and ct6_vN by CTMax, ct4_unconfirmed_vN and ct6_unconfirmed_vN by
// CTUnconfirmedMax, ipcache4_vN, ipcache6_vN, iphost4_vN and iphost6_vN by
// IPCacheMax, events_vN by
// RingBufSize. Other maps keep the size they were built with.
func (o Options) SizeSpec(spec *ebpf.CollectionSpec) {
	for name, ms := range spec.Maps {
		table, _, ok := SplitName(name)
		if !ok {
			continue
		}
		if size := o.sizeOf(table); size != 0 {
			ms.MaxEntries = size
		}
	}
}

// sizeOf is the size o gives the maps of table (0: the build's).
func (o Options) sizeOf(table string) uint32 {
	switch table {
	case "ct4", "ct6":
		return o.CTMax
	case "ct4_unconfirmed", "ct6_unconfirmed":
		return o.CTUnconfirmedMax
	case "ipcache4", "ipcache6", "iphost4", "iphost6":
		return o.IPCacheMax
	case "events":
		return o.RingBufSize
	}
	return 0
}

// SizeFlag names the option that sizes the maps of table, for messages.
func SizeFlag(table string) string {
	switch table {
	case "ct4", "ct6", "ct":
		return "--ct-max"
	case "ct4_unconfirmed", "ct6_unconfirmed", "ct_unconfirmed":
		return "--ct-unconfirmed-max"
	case "ipcache4", "ipcache6", "iphost4", "iphost6":
		return "--ipcache-max"
	case "events":
		return "--ringbuf-size"
	}
	return "max_entries"
}

// IsConntrackTable reports whether table is a conntrack table, which the
// datapath writes (any layout).
func IsConntrackTable(table string) bool {
	f := SizeFlag(table)
	return f == "--ct-max" || f == "--ct-unconfirmed-max"
}

// SplitName splits a map name into the table it holds and the version of
// its layout: "ct_v1" is ("ct", 1, true). Names without a version suffix
// return ok false.
func SplitName(name string) (table string, version int, ok bool) {
	i := strings.LastIndex(name, "_v")
	if i < 1 {
		return "", 0, false
	}
	v, err := strconv.Atoi(name[i+2:])
	if err != nil || v < 0 || strconv.Itoa(v) != name[i+2:] {
		return "", 0, false
	}
	return name[:i], v, true
}

// NotPinnedError says that a map the caller needs is not pinned: there is
// no datapath here (yet), or one of an older build (Older). It matches
// os.ErrNotExist.
type NotPinnedError struct {
	Dir, Map string
	// Older: other maps are pinned, so this is the datapath of an older
	// ctd that lacks a map this version adds.
	Older bool
}

func (e *NotPinnedError) Error() string {
	if e.Older {
		return fmt.Sprintf("the datapath at %s lacks map %s, which this version of ctd adds: restart 'ctd daemon' (or run 'ctd attach') to add it", e.Dir, e.Map)
	}
	return fmt.Sprintf("no ctd datapath at %s (map %s is not pinned): run 'ctd attach' first", e.Dir, e.Map)
}

func (e *NotPinnedError) Is(target error) bool { return target == os.ErrNotExist }

// IncompatibleError says that a pinned map differs from what this build wants.
type IncompatibleError struct {
	Map  string
	Pin  string
	Diff error
}

func (e *IncompatibleError) Error() string {
	return fmt.Sprintf("pinned map %s at %s differs from this build (%v): run 'ctd daemon' to migrate it, or 'ctd teardown' to start empty", e.Map, e.Pin, e.Diff)
}

func (e *IncompatibleError) Unwrap() error { return ebpf.ErrMapIncompatible }

// Datapath is the loaded programs and the pinned maps they use.
type Datapath struct {
	Maps
	bpf.CtdPrograms
}

// Close releases the file descriptors; pinned objects stay in the kernel.
func (d *Datapath) Close() error {
	return errors.Join(d.CtdPrograms.Close(), d.Maps.Close())
}

// FromCollection takes the programs and maps of a loaded collection of the
// datapath whose maps are pinned at pinPath; coll keeps what it does not
// hand over and must still be closed.
func FromCollection(coll *ebpf.Collection, pinPath string) (*Datapath, error) {
	dp := &Datapath{}
	if err := dp.assign(coll, pinPath); err != nil {
		return nil, err
	}
	if err := coll.Assign(&dp.CtdPrograms); err != nil {
		dp.Maps.Close()
		return nil, fmt.Errorf("assign programs: %w", err)
	}
	return dp, nil
}

// Load opens the pinned maps (creating and pinning any that are missing) and
// loads the programs against them. Nothing is pinned unless everything loaded.
func Load(o Options) (*Datapath, error) { return open(o, true) }

// OpenMaps opens the pinned maps, creating and pinning any that are missing,
// without loading programs: for commands that fill the maps before or without
// an attached datapath.
func OpenMaps(o Options) (*Maps, error) {
	dp, err := open(o, false)
	if err != nil {
		return nil, err
	}
	return &dp.Maps, nil
}

// open is Load, or OpenMaps without programs.
func open(o Options, withPrograms bool) (*Datapath, error) {
	o = o.WithDefaults()
	spec, err := o.Spec()
	if err != nil {
		return nil, err
	}
	maps, created, err := openOrCreate(o.PinPath, spec)
	if err != nil {
		return nil, err
	}
	dp := &Datapath{}
	if withPrograms {
		if err := spec.LoadAndAssign(&dp.CtdPrograms, &ebpf.CollectionOptions{MapReplacements: maps}); err != nil {
			closeAll(maps)
			return nil, fmt.Errorf("load datapath programs: %w", err)
		}
	}
	if err := assignMaps(&dp.Maps, maps, o.PinPath); err != nil {
		dp.CtdPrograms.Close()
		closeAll(maps)
		return nil, err
	}
	if err := pinCreated(o.PinPath, maps, created); err != nil {
		dp.Close()
		return nil, err
	}
	return dp, nil
}

// OpenPinned opens the maps that are pinned at pinPath, whatever their size,
// and fails if the datapath was never set up there.
func OpenPinned(pinPath string) (*Maps, error) {
	if pinPath == "" {
		pinPath = DefaultPinPath
	}
	maps := make(map[string]*ebpf.Map, len(MapNames))
	for _, name := range MapNames {
		pin := filepath.Join(pinPath, name)
		m, err := ebpf.LoadPinnedMap(pin, nil)
		if err != nil {
			partial := len(maps) > 0 // an older ctd's datapath
			closeAll(maps)
			if errors.Is(err, os.ErrNotExist) {
				return nil, &NotPinnedError{Dir: pinPath, Map: name, Older: partial}
			}
			return nil, fmt.Errorf("open pinned map %s: %w", pin, err)
		}
		maps[name] = m
	}
	var out Maps
	if err := assignMaps(&out, maps, pinPath); err != nil {
		closeAll(maps)
		return nil, err
	}
	return &out, nil
}

// openOrCreate returns every map of spec: the pinned one where it exists and is
// compatible, else a new unpinned one (listed in created).
func openOrCreate(pinPath string, spec *ebpf.CollectionSpec) (map[string]*ebpf.Map, map[string]bool, error) {
	if err := bpffs.Prepare(pinPath); err != nil {
		return nil, nil, err
	}
	maps := make(map[string]*ebpf.Map, len(MapNames))
	created := make(map[string]bool)
	for _, name := range MapNames {
		ms := spec.Maps[name]
		pin := filepath.Join(pinPath, name)
		m, err := ebpf.LoadPinnedMap(pin, nil)
		switch {
		case err == nil:
			if diff := ms.Compatible(m); diff != nil {
				m.Close()
				closeAll(maps)
				return nil, nil, &IncompatibleError{Map: name, Pin: pin, Diff: diff}
			}
		case errors.Is(err, os.ErrNotExist):
			if other := otherLayout(pinPath, name); other != "" {
				closeAll(maps)
				return nil, nil, &IncompatibleError{Map: name, Pin: filepath.Join(pinPath, other),
					Diff: fmt.Errorf("pinned as %s, this build uses %s", other, name)}
			}
			m, err = newMap(ms)
			if err != nil {
				closeAll(maps)
				return nil, nil, fmt.Errorf("create map %s: %w", name, err)
			}
			created[name] = true
		default:
			closeAll(maps)
			return nil, nil, fmt.Errorf("open pinned map %s: %w", pin, err)
		}
		maps[name] = m
	}
	return maps, created, nil
}

// otherLayout returns the name of a map pinned in pinPath that holds the
// same table as name in another layout version (or a table this build
// converts into name), or "".
func otherLayout(pinPath, name string) string {
	pinned, _ := os.ReadDir(pinPath)
	var names []string
	for _, e := range pinned {
		names = append(names, e.Name())
	}
	if others := OtherLayouts(name, names, Converters()); len(others) > 0 {
		return others[0]
	}
	return ""
}

// OtherLayouts returns those of the pinned map names that hold the table
// of the map named name in another layout: the maps convs convert into
// it, and other versions of its table that convs do not convert into
// another (ct_v1 is converted into ct4_v2 and ct6_v2, not into the
// downgrade guard ct_v2).
func OtherLayouts(name string, pinned []string, convs []Converter) []string {
	table, _, ok := SplitName(name)
	if !ok {
		return nil
	}
	from := replaces(name, convs)
	var out []string
	for _, n := range pinned {
		if n == name {
			continue
		}
		t, _, ok := SplitName(n)
		if slices.Contains(from, n) || (ok && t == table && !converted(n, convs)) {
			out = append(out, n)
		}
	}
	return out
}

// DefaultEventsRate is the per-CPU event rate limit (events per second, and
// the burst) a new datapath starts with, so that a flood of new flows cannot
// starve the event consumer. `ctd events rate` changes it.
const DefaultEventsRate = 10000

// newMap creates a map with its initial contents: config_v1 starts with the
// event rate limit on; every other map starts empty (or zeroed).
func newMap(ms *ebpf.MapSpec) (*ebpf.Map, error) {
	m, err := ebpf.NewMap(ms)
	if err != nil || ms.Name != ConfigMap {
		return m, err
	}
	// Not pinned yet: no other process can write it.
	err = config.New(m, "").Update(func(v *config.Values) {
		v.EventsRate, v.EventsBurst = DefaultEventsRate, DefaultEventsRate
	})
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("initialise %s: %w", ms.Name, err)
	}
	return m, nil
}

// pinCreated pins the maps this process created. If another process pinned
// the same name meanwhile, or a pin fails, the pins made here are undone.
func pinCreated(pinPath string, maps map[string]*ebpf.Map, created map[string]bool) error {
	var pinned []*ebpf.Map
	for _, name := range MapNames {
		if !created[name] {
			continue
		}
		if err := maps[name].Pin(filepath.Join(pinPath, name)); err != nil {
			for _, m := range pinned {
				m.Unpin()
			}
			return fmt.Errorf("pin map %s: %w", name, err)
		}
		pinned = append(pinned, maps[name])
	}
	return nil
}

func assignMaps(out *Maps, maps map[string]*ebpf.Map, pinPath string) error {
	// Assign takes ownership by deleting what it assigns: give it a copy.
	return out.assign(&ebpf.Collection{Maps: stdmaps.Clone(maps)}, pinPath)
}

func closeAll(maps map[string]*ebpf.Map) {
	for _, m := range maps {
		m.Close()
	}
}
