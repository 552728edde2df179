// Package pins owns the layout of a datapath's pin directory: where its maps and links are pinned, what it has attached, and removing it all.
//
//	<dir>/ct4_v2, ipcache4_v1, ...  the maps, by name (loader.MapNames)
//	<dir>/<map>~migrating           a map a migration has not yet moved to its name
//	<dir>/links/<iface>/ingress     TCX links (attach pins them there)
//	<dir>/links/<iface>/egress
//	<dir>/cgroup_sock_create        the links of the socket owner programs (cgroup v2 root)
//	<dir>/cgroup_post_bind4, cgroup_post_bind6
//	<dir>/created-by-ctd, mounted-by-ctd   what ctd set up here (bpffs.Prepare)
//
// Everything outside package loader that needs a path below the directory
// asks a Dir for it; loader, which opens and creates the maps (and which
// this package builds on), pins them by name the same way.
package pins

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/bpffs"
	"github.com/ctd-dev/ctd/datapath/cgroupv2"
	"github.com/ctd-dev/ctd/datapath/loader"
)

// TempSuffix marks the pin of a map a migration created, until it moves the
// map to its name. bpffs refuses names with dots; "~" cannot occur in a map
// name.
const TempSuffix = "~migrating"

// Dir is a datapath's pin directory.
type Dir struct {
	path string
}

// New returns the pin directory at path; "" is loader.DefaultPinPath.
func New(path string) Dir {
	if path == "" {
		path = loader.DefaultPinPath
	}
	return Dir{path: path}
}

// Path is the directory itself.
func (d Dir) Path() string { return d.path }

// Links is the directory below which attach pins the TCX links.
func (d Dir) Links() string { return filepath.Join(d.path, "links") }

// ownerHooks are the cgroup hooks of the socket owner programs (see
// bpf/owner.h), each with the name of its link's pin: not a map name (no
// version suffix).
var ownerHooks = []struct {
	pin    string
	attach ebpf.AttachType
	prog   func(*bpf.CtdPrograms) *ebpf.Program
}{
	{"cgroup_sock_create", ebpf.AttachCGroupInetSockCreate, func(p *bpf.CtdPrograms) *ebpf.Program { return p.CtdSockCreate }},
	{"cgroup_post_bind4", ebpf.AttachCGroupInet4PostBind, func(p *bpf.CtdPrograms) *ebpf.Program { return p.CtdPostBind4 }},
	{"cgroup_post_bind6", ebpf.AttachCGroupInet6PostBind, func(p *bpf.CtdPrograms) *ebpf.Program { return p.CtdPostBind6 }},
}

// CgroupLinks are the pins of the links that attach the datapath's socket
// owner programs (which record each socket's owner) to the cgroup v2 root.
func (d Dir) CgroupLinks() []string {
	out := make([]string, len(ownerHooks))
	for i, h := range ownerHooks {
		out[i] = filepath.Join(d.path, h.pin)
	}
	return out
}

// AttachOwner attaches the socket owner programs of progs to the root of
// the cgroup v2 hierarchy through the links pinned at CgroupLinks (updated
// in place where pinned). It reports whether it created a link; if it
// fails, the links it created are removed again.
func (d Dir) AttachOwner(progs *bpf.CtdPrograms) (created bool, err error) {
	root, err := cgroupv2.Mount()
	if err != nil {
		return false, fmt.Errorf("attach the socket owner programs: %w", err)
	}
	var made []string
	for _, h := range ownerHooks {
		pin := filepath.Join(d.path, h.pin)
		c, err := attach.AttachCgroup(root, h.attach, h.prog(progs), pin)
		if err != nil {
			for _, p := range made {
				if derr := attach.DetachCgroup(p); derr != nil {
					err = errors.Join(err, derr)
				}
			}
			return false, err
		}
		if c {
			made = append(made, pin)
		}
	}
	return len(made) > 0, nil
}

// DetachOwner detaches the socket owner programs; nothing attached is not
// an error.
func (d Dir) DetachOwner() error {
	var errs []error
	for _, pin := range d.CgroupLinks() {
		errs = append(errs, attach.DetachCgroup(pin))
	}
	return errors.Join(errs...)
}

// Map is the pin of the map named name.
func (d Dir) Map(name string) string { return filepath.Join(d.path, name) }

// Temp is the temporary pin of the map named name during a migration.
func (d Dir) Temp(name string) string { return filepath.Join(d.path, name+TempSuffix) }

// Pinned reports whether a map is pinned as name.
func (d Dir) Pinned(name string) bool {
	_, err := os.Lstat(d.Map(name))
	return err == nil
}

// OpenMap opens the map pinned as name (a pin name: a temporary pin
// included); a *loader.NotPinnedError if there is none.
func (d Dir) OpenMap(name string, opts *ebpf.LoadPinOptions) (*ebpf.Map, error) {
	pin := filepath.Join(d.path, name)
	m, err := ebpf.LoadPinnedMap(pin, opts)
	if errors.Is(err, os.ErrNotExist) {
		return nil, &loader.NotPinnedError{Dir: d.path, Map: name}
	}
	if err != nil {
		return nil, fmt.Errorf("open pinned map %s: %w", pin, err)
	}
	return m, nil
}

// MaxEntries returns the max_entries of the map pinned as name, or 0 if
// none is.
func (d Dir) MaxEntries(name string) (uint32, error) {
	var n uint32
	err := d.inspect(name, func(m *ebpf.Map) error {
		n = m.MaxEntries()
		return nil
	})
	return n, err
}

// inspect runs fn on the map pinned as name, opened read-only; nothing if
// none is pinned.
func (d Dir) inspect(name string, fn func(*ebpf.Map) error) error {
	m, err := d.OpenMap(name, &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer m.Close()
	return fn(m)
}

// MapNames lists the maps pinned in the directory: versioned names only,
// so neither the links directory nor temporary pins.
func (d Dir) MapNames() ([]string, error) {
	return d.scan(func(name string) (string, bool) {
		_, _, ok := loader.SplitName(name)
		return name, ok
	})
}

// TempNames lists the maps pinned under temporary names, by map name.
func (d Dir) TempNames() ([]string, error) {
	return d.scan(func(name string) (string, bool) { return strings.CutSuffix(name, TempSuffix) })
}

// scan lists the pins (not directories) that keep accepts, as it names them.
func (d Dir) scan(keep func(name string) (string, bool)) ([]string, error) {
	entries, err := os.ReadDir(d.path)
	if err != nil {
		return nil, fmt.Errorf("read pin directory: %w", err)
	}
	var out []string
	for _, e := range entries {
		if name, ok := keep(e.Name()); ok && !e.IsDir() {
			out = append(out, name)
		}
	}
	return out, nil
}

// MapID returns the ID of the map pinned as name (a pin name), or 0 if
// none is.
func (d Dir) MapID(name string) (ebpf.MapID, error) {
	var id ebpf.MapID
	err := d.inspect(name, func(m *ebpf.Map) (err error) {
		if id, err = MapID(m); err != nil {
			return fmt.Errorf("pinned map %s: %w", d.Map(name), err)
		}
		return nil
	})
	return id, err
}

// MapID returns the kernel's ID of m.
func MapID(m *ebpf.Map) (ebpf.MapID, error) {
	info, err := m.Info()
	if err != nil {
		return 0, err
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("the kernel reports no map ID")
	}
	return id, nil
}

// MapIDs returns the IDs of the maps pinned in the directory, temporary
// pins included: what "this datapath's maps" means.
func (d Dir) MapIDs() ([]ebpf.MapID, error) {
	names, err := d.MapNames()
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	temps, err := d.TempNames()
	if err != nil {
		return nil, err
	}
	for _, t := range temps {
		names = append(names, t+TempSuffix)
	}
	var ids []ebpf.MapID
	for _, name := range names {
		id, err := d.MapID(name)
		if err != nil {
			return nil, err
		}
		if id != 0 {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// Attachments lists what this datapath has attached in the calling thread's
// network namespace: every interface with a TCX link pinned below Links,
// and every ctd tc filter whose programs use one of the maps pinned here
// (the tc filters of a ctd pinned elsewhere are left out).
func (d Dir) Attachments() ([]attach.Attachment, error) {
	ours, err := d.MapIDs()
	if err != nil {
		return nil, err
	}
	return attach.ListUsing(d.Links(), ours)
}

// Status reports what this datapath has attached to iface.
func (d Dir) Status(iface string) (attach.Attachment, error) { return attach.Status(iface, d.Links()) }

// Detach removes this datapath's programs from iface (see attach.Detach).
func (d Dir) Detach(iface string) error { return attach.Detach(iface, d.Links()) }

// HasLinks reports whether TCX links of iface are pinned here (also when
// the interface is gone).
func (d Dir) HasLinks(iface string) bool {
	_, err := os.Lstat(filepath.Join(d.Links(), iface))
	return err == nil
}

// Attach attaches progs to iface (see attach.Attach), pinning TCX links
// below Links.
func (d Dir) Attach(iface string, mode attach.Mode, progs attach.Programs) (attach.Attachment, error) {
	return attach.Attach(iface, mode, progs, d.Links())
}

// LoadAndAttach loads the datapath with load against the maps pinned here
// (loader.Load, or a migration that also switches the programs where they
// are attached), attaches its socket owner programs to the cgroup v2 root
// (AttachOwner) and its TC programs to iface. If it fails, the attachment
// of an interface that had none is removed again, cgroup links it created
// too, and so is what this call set up (bpffs.Before.Undo): new pins, and
// the mount and directory where the directory was not set up before.
func (d Dir) LoadAndAttach(iface string, mode attach.Mode, opts loader.Options, load func(loader.Options) (*loader.Datapath, error)) (at attach.Attachment, err error) {
	before, err := d.Status(iface)
	if err != nil {
		return attach.Attachment{}, err
	}
	setup := bpffs.Note(d.path)
	defer func() {
		if err != nil {
			if uerr := setup.Undo(); uerr != nil {
				err = fmt.Errorf("%w (and taking back its set-up failed: %v)", err, uerr)
			}
		}
	}()

	opts.PinPath = d.path
	dp, err := load(opts)
	if err != nil {
		return attach.Attachment{}, err
	}
	defer dp.Close()

	created, err := d.AttachOwner(&dp.CtdPrograms)
	if err != nil {
		return attach.Attachment{}, err
	}
	at, err = d.Attach(iface, mode, attach.Programs{Ingress: dp.CtdIngress, Egress: dp.CtdEgress})
	if err != nil {
		if before.Mode == "" {
			if derr := d.Detach(iface); derr != nil {
				err = errors.Join(err, derr)
			}
		}
		if created {
			if derr := d.DetachOwner(); derr != nil {
				err = errors.Join(err, derr)
			}
		}
		return attach.Attachment{}, err
	}
	return at, nil
}

// Repin pins again those of this datapath's maps whose pins are missing
// while ctd's programs still run on one of ifaces (a pin removed by hand,
// or tc filters that outlived the pin directory), taking each map from an
// attached program, so that a start adopts the live state instead of
// creating empty maps under running traffic. It returns the names of the
// maps it pinned; a missing interface is skipped.
func (d Dir) Repin(ifaces []string) ([]string, error) {
	var missing []string
	for _, name := range loader.MapNames {
		if !d.Pinned(name) {
			missing = append(missing, name)
		}
	}
	if len(missing) == 0 {
		return nil, nil
	}
	var repinned []string
	for _, iface := range ifaces {
		at, err := d.Status(iface)
		if errors.Is(err, attach.ErrInterfaceNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, id := range []ebpf.ProgramID{at.IngressProgID, at.EgressProgID} {
			if id == 0 {
				continue
			}
			names, err := d.repinProgramMaps(id, missing)
			if err != nil {
				return nil, fmt.Errorf("adopt the maps of the program attached to %s: %w", iface, err)
			}
			repinned = append(repinned, names...)
			missing = slices.DeleteFunc(missing, func(n string) bool { return slices.Contains(names, n) })
		}
	}
	return repinned, nil
}

// repinProgramMaps pins those maps of program id whose names are in want.
func (d Dir) repinProgramMaps(id ebpf.ProgramID, want []string) ([]string, error) {
	ids, err := attach.ProgramMaps(id)
	if err != nil {
		return nil, err
	}
	var done []string
	for _, mid := range ids {
		m, err := ebpf.NewMapFromID(mid)
		if err != nil {
			continue // freed meanwhile
		}
		mi, err := m.Info()
		if err == nil && slices.Contains(want, mi.Name) && !slices.Contains(done, mi.Name) {
			if err := m.Pin(d.Map(mi.Name)); err != nil {
				m.Close()
				return done, fmt.Errorf("pin map %s: %w", mi.Name, err)
			}
			done = append(done, mi.Name)
		}
		m.Close()
	}
	return done, nil
}

// MoveHosts moves the ipcache's host entries that a datapath pinned before
// the host hashes existed left in the tries into the hashes
// (ipcachemap.Map.MoveHosts), once every program this datapath has
// attached reads the hashes. While one does not (an older ctd still
// attached to another interface), it moves nothing and says so with
// waiting: the entries resolve the same where they are, only slower.
func (d Dir) MoveHosts(m *loader.Maps) (moved int, waiting string, err error) {
	var want [2]ebpf.MapID
	for i, hm := range []*ebpf.Map{m.IPHost4(), m.IPHost6()} {
		if want[i], err = MapID(hm); err != nil {
			return 0, "", fmt.Errorf("ID of map %s: %w", hm, err)
		}
	}
	ats, err := d.Attachments()
	if err != nil {
		return 0, "", err
	}
	for _, at := range ats {
		for _, id := range []ebpf.ProgramID{at.IngressProgID, at.EgressProgID} {
			if id == 0 {
				continue
			}
			ids, err := attach.ProgramMaps(id)
			if err != nil {
				return 0, "", err
			}
			if !slices.Contains(ids, want[0]) || !slices.Contains(ids, want[1]) {
				return 0, fmt.Sprintf("the programs attached to %s predate the host hashes", at.Iface), nil
			}
		}
	}
	moved, err = m.IPCache().MoveHosts()
	return moved, "", err
}
