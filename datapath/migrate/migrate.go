// Package migrate migrates pinned maps to the layout and size this build wants, without losing entries.
//
// # What migrates
//
// Every map name carries its layout version (ct4_v2). Load compares each map
// of this build's spec with what is pinned and, where they differ, migrates:
//
//   - resize: same name, other max_entries (--ct-max, --ipcache-max). Hash,
//     LRU hash and LPM trie maps are copied into a map of the new size; a
//     size below the number of live entries is refused. Arrays may grow.
//   - upgrade: an older layout of the table is pinned (ct_v1 while this build
//     uses ct4_v2 and ct6_v2). Entries are copied through the
//     loader.Converter for that pair, which the build of the new layout
//     provides (LoadSpec); an old table may feed several new ones, each
//     converter taking the entries of its own (ct_v1's IPv4 flows go into
//     ct4_v2, its IPv6 flows into ct6_v2).
//   - recreate: the events ring buffer changes size. A ring buffer cannot be
//     copied: a new one replaces it and the events not yet read from the old
//     one, or written to it until the switch, are lost. Readers (ctd monitor)
//     must reopen the pin.
//
// Per-CPU arrays (metrics, evlimit) have a size fixed by the build and are
// kept as they are pinned. Everything else that differs (type, key or value
// size or flags under one name, a layout without a converter, a downgrade)
// is an *Error naming the map and what differs, returned before anything is
// changed: a map is never silently emptied.
//
// # The sequence, and why nothing is lost
//
// While the old programs keep running on the old maps:
//
//  1. The new maps are created empty and the new programs are loaded
//     against them (and against the pinned maps that stay as they are).
//  2. Pass 1 reads every entry of the old map with batch lookups, checks that
//     they fit, converts them and writes them into the new map with batch
//     updates, then checks that the new map holds all of them (an LRU map
//     close to full could otherwise evict some silently). It runs last, so
//     that little happens between it and the switch.
//  3. The new maps are pinned under temporary names (<name>~migrating) in the
//     pin directory.
//
// Up to here nothing visible has changed; any failure closes the new maps,
// removes the temporary pins and returns the error.
//
//  4. Switch: on every interface where ctd is attached, attach.Attach
//     replaces the programs atomically (TCX link update, tc filter replace).
//     If one interface fails, those already switched are switched back to
//     their old programs, which still use the old maps, and the temporary
//     pins are removed: the old datapath runs on as before. (Should switching
//     back fail as well, the temporary pins stay, for the next Load to
//     complete the migration.)
//  5. Quiesce: an update of a map-in-map makes the kernel wait for an RCU
//     grace period (the kernel's own selftests rely on this), after which no
//     old program is still running, so the old maps no longer change.
//  6. Pins: each temporary pin is renamed over the final name (rename(2) on
//     bpffs replaces the old pin atomically: a reader always finds a map),
//     and the pin of an older layout is removed.
//  7. Pass 2 catches up with what the old programs (and the CLI) wrote
//     between pass 1 and the switch, comparing the old map with the
//     snapshot pass 1 took:
//     - conntrack (written by the datapath): an entry missing from the new
//     map is inserted (BPF_NOEXIST). An entry the new programs already hold
//     is merged by a small BPF program run through BPF_PROG_TEST_RUN that
//     adds the counters' growth since pass 1 with atomic adds, ORs the TCP
//     flags, keeps the later last_seen and takes the old state unless the
//     new programs changed it. The atomic adds compose with the datapath's
//     own __sync_fetch_and_add on the same counters, so counters only grow
//     and no packet counted meanwhile is lost, which a read-modify-write
//     from userspace could not promise.
//     - ipcache, policy, config (written by the control plane): entries
//     changed since pass 1 are written again and entries deleted since pass
//     1 are deleted, so a removed rule is not resurrected.
//
// A second copy pass was chosen over double writes (which would need every
// program to know both layouts) and over a freeze (a program cannot be made
// to wait). Its one window: a flow whose first packet passes the old
// program after pass 1 read its bucket, and whose next packet reaches the
// new program before pass 2, is not yet known to the new map; under a
// default-deny policy that packet is judged as a new flow. Pass 2 follows the
// switch within milliseconds, and long-lived flows, which exist at pass 1,
// are never affected.
//
// # Failures after the switch
//
// After step 4 the new datapath is live and is never rolled back. If a
// step before the pins are renamed fails, Load returns the error and leaves
// the temporary pins; the next Load finds them, sees that the attached
// programs use them, and completes the migration (inserting what the old map
// has that the new one lacks; the growth of counters since pass 1 is not
// known any more). Temporary pins that no attached program uses are the
// remains of a migration interrupted before its switch, and are removed. If
// pass 2 fails, the error names the map that may miss entries written during
// the copy.
//
// Control-plane writers that opened a pin before step 6 and write after pass
// 2 write to the retired map; the daemon's reconcile from the desired-state
// store repairs that. Load must not run concurrently with another Load on
// the same pin path.
package migrate

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/pins"
)

// Interfaces says where the datapath's programs are attached, so that a
// migration can switch them.
type Interfaces struct {
	// Attached lists the interfaces where this datapath's programs are
	// attached, in the network namespace of the calling thread. Nil means
	// every interface with a pinned TCX link below LinkDir, and every ctd
	// tc filter whose programs use one of the maps pinned at PinPath.
	Attached func() ([]attach.Attachment, error)
}

// Action is what a migration does to one map.
type Action string

const (
	// Resize copies a map into one of another size under the same name.
	Resize Action = "resize"
	// Upgrade converts a map of an older layout into this build's layout.
	Upgrade Action = "upgrade"
	// Recreate replaces a ring buffer: its unread events are lost.
	Recreate Action = "recreate"
)

// MapReport describes the migration of one map.
type MapReport struct {
	Map           string // name this build uses, e.g. "ct4_v2"
	From          string // name that was pinned, e.g. "ct_v1"; Map for a resize
	Action        Action
	OldMaxEntries uint32
	MaxEntries    uint32
	Copied        int // entries copied before the switch (pass 1)
	CaughtUp      int // entries inserted, merged or deleted after the switch (pass 2)
}

// Report says what Load changed.
type Report struct {
	Maps      []MapReport
	Switched  []string // interfaces whose programs were switched to the new maps
	Recovered []string // what was done with the remains of an interrupted migration
	Retired   []string // stale pins of older layouts that were removed
}

// Migrated reports whether any map was migrated.
func (r Report) Migrated() bool { return len(r.Maps) > 0 }

// Error says why a pinned map cannot be migrated. Nothing was changed.
type Error struct {
	Map    string // map name this build uses
	Pin    string // path of the pinned map in the way
	Reason string
}

func (e *Error) Error() string {
	return fmt.Sprintf("cannot migrate pinned map %s to %s: %s", e.Pin, e.Map, e.Reason)
}

// Load opens the pinned maps at opts.PinPath, migrates every map whose
// layout or size differs from what this build wants, and returns the
// datapath loaded against the resulting maps. When it migrated, the
// programs on every attached interface were switched to the returned ones
// (Report.Switched), in the calling thread's network namespace; otherwise
// Load attaches nothing and the caller attaches the returned programs as
// usual. An error leaves the old maps, pins and programs in place, except
// an error after the switch, which says so (see the package documentation).
func Load(opts loader.Options, ifs Interfaces) (*loader.Datapath, Report, error) {
	opts = opts.WithDefaults()
	spec, err := bpf.LoadCtd()
	if err != nil {
		return nil, Report{}, fmt.Errorf("load datapath spec: %w", err)
	}
	coll, rep, err := LoadSpec(opts, spec, ifs, loader.Converters()...)
	if err != nil {
		return nil, rep, err
	}
	defer coll.Close()
	dp, err := loader.FromCollection(coll, opts.PinPath)
	return dp, rep, err
}

// LoadSpec is Load for any build of the datapath: spec names the maps and
// layouts wanted and is sized by opts (spec itself is not modified), and
// convs convert older layouts of its tables into its own (ctd's own build:
// loader.Converters). The collection holds the programs
// and every map by name.
func LoadSpec(opts loader.Options, spec *ebpf.CollectionSpec, ifs Interfaces, convs ...loader.Converter) (*ebpf.Collection, Report, error) {
	return run(config{opts: opts, spec: spec, ifs: ifs, converters: convs})
}

// config is one run of Load, with the test hooks.
type config struct {
	opts       loader.Options
	spec       *ebpf.CollectionSpec
	ifs        Interfaces
	converters []loader.Converter
	hooks      hooks
}

// hooks let tests act between the steps. Nil hooks do nothing.
type hooks struct {
	// afterCopy runs after pass 1, before the switch.
	afterCopy func() error
	// beforeSwitch runs before the programs of iface are switched.
	beforeSwitch func(iface string) error
	// afterSwitch runs after the switch and the quiesce, before the pins
	// are swapped and pass 2 runs; it gets the new maps by name.
	afterSwitch func(newMaps map[string]*ebpf.Map) error
}

func run(c config) (*ebpf.Collection, Report, error) {
	var rep Report
	c.opts = c.opts.WithDefaults()
	if err := c.opts.Validate(); err != nil {
		return nil, rep, err
	}
	spec := c.spec.Copy()
	c.opts.SizeSpec(spec)
	dir := pins.New(c.opts.PinPath)
	if c.ifs.Attached == nil {
		c.ifs.Attached = dir.Attachments
	}

	m := &migration{cfg: c, spec: spec, pins: dir, rep: &rep}
	coll, err := m.run()
	if err != nil {
		return nil, rep, err
	}
	return coll, rep, nil
}

// closeMaps closes every map of ms.
func closeMaps(ms map[string]*ebpf.Map) {
	for _, m := range ms {
		m.Close()
	}
}
