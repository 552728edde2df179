package main

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/bpffs"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
)

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

// openCT runs the preamble (out: the output format, nil for none) and
// opens the pinned conntrack table; it never creates anything.
func (a *app) openCT(out *string) (*ctmap.Map, func(), error) {
	if err := a.preamble(out); err != nil {
		return nil, nil, err
	}
	m, err := a.pins().OpenMap(loader.CTMap, &ebpf.LoadPinOptions{})
	if err != nil {
		return nil, nil, err
	}
	u, err := a.pins().OpenMap(loader.CTUnconfirmedMap, &ebpf.LoadPinOptions{})
	if err != nil {
		m.Close()
		var np *loader.NotPinnedError
		if errors.As(err, &np) {
			np.Older = true // ct_v1 is pinned
		}
		return nil, nil, err
	}
	return ctmap.New(m, u), func() { m.Close(); u.Close() }, nil
}
