package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/bpffs"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
)

// linksDir is the directory below the pin path that holds pinned TCX links.
const linksDir = "links"

// checkPinPath rejects pin paths that cannot be ctd's own directory.
func checkPinPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("invalid --pin-path \"\": give a directory on a bpffs, e.g. %s", loader.DefaultPinPath)
	case !filepath.IsAbs(p):
		return fmt.Errorf("invalid --pin-path %q: must be an absolute path, e.g. %s", p, loader.DefaultPinPath)
	case filepath.Clean(p) == "/" || filepath.Clean(p) == bpffs.DefaultRoot:
		return fmt.Errorf("invalid --pin-path %q: ctd needs a directory of its own below the bpffs root, e.g. %s", p, loader.DefaultPinPath)
	}
	return nil
}

func (a *app) linkDir() string { return filepath.Join(a.pinPath, linksDir) }

// lookupIface checks that iface exists in the current network namespace.
func lookupIface(iface string) (netlink.Link, error) {
	if iface == "" {
		return nil, errors.New("missing --iface: name the interface, e.g. --iface eth0")
	}
	if len(iface) >= unix.IFNAMSIZ || strings.ContainsAny(iface, "/ \t\n:") || iface == "." || iface == ".." {
		return nil, fmt.Errorf("invalid --iface %q: not a valid interface name", iface)
	}
	l, err := netlink.LinkByName(iface)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
		return nil, fmt.Errorf("interface %q not found in this network namespace (see 'ip link')", iface)
	}
	if err != nil {
		return nil, fmt.Errorf("look up interface %q: %w", iface, err)
	}
	return l, nil
}

// completeIfaces completes --iface with the interfaces of the current
// network namespace.
func completeIfaces(*cobra.Command, []string, string) ([]cobra.Completion, cobra.ShellCompDirective) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, cobra.ShellCompDirectiveError
	}
	names := make([]cobra.Completion, 0, len(ifs))
	for _, i := range ifs {
		names = append(names, i.Name)
	}
	return names, cobra.ShellCompDirectiveNoFileComp
}

// openCT opens the pinned conntrack table; it never creates anything.
func (a *app) openCT() (*ctmap.Map, func(), error) {
	if err := checkPinPath(a.pinPath); err != nil {
		return nil, nil, err
	}
	pin := filepath.Join(a.pinPath, loader.CTMap)
	m, err := ebpf.LoadPinnedMap(pin, &ebpf.LoadPinOptions{})
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, fmt.Errorf("no ctd datapath at %s (map %s is not pinned): run 'ctd attach' first", a.pinPath, loader.CTMap)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("open pinned map %s: %w", pin, err)
	}
	return ctmap.New(m), func() { m.Close() }, nil
}

// attachments lists what this datapath (the one pinned at the pin path) has
// attached in the current network namespace: every interface with a pinned
// TCX link in its link directory, and every tc filter of ctd's whose programs
// use this datapath's conntrack table. tc filters of a ctd with another pin
// path are left out.
func (a *app) attachments() ([]attach.Attachment, error) {
	ctID, err := pinnedMapID(filepath.Join(a.pinPath, loader.CTMap))
	if err != nil {
		return nil, err
	}
	var ours []ebpf.MapID
	if ctID != 0 {
		ours = append(ours, ctID)
	}
	return attach.ListUsing(a.linkDir(), ours)
}

// pinnedMapID returns the ID of the map pinned at pin, or 0 if none is.
func pinnedMapID(pin string) (ebpf.MapID, error) {
	m, err := ebpf.LoadPinnedMap(pin, &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("open pinned map %s: %w", pin, err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		return 0, fmt.Errorf("pinned map %s: %w", pin, err)
	}
	id, ok := info.ID()
	if !ok {
		return 0, fmt.Errorf("pinned map %s: the kernel reports no map ID", pin)
	}
	return id, nil
}
