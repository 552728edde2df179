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

// checkSizeFlags rejects the map size flags of c given as 0 (which, unset,
// stand for the pinned size or the default), and a ring buffer size given
// that the kernel would refuse.
func checkSizeFlags(c *cobra.Command, ringBufSize uint32) error {
	for _, f := range []string{"ct-max", "ct-unconfirmed-max", "ipcache-max"} {
		if fl := c.Flags().Lookup(f); fl.Changed && fl.Value.String() == "0" {
			return fmt.Errorf("invalid --%s 0: must be at least 1", f)
		}
	}
	if fl := c.Flags().Lookup("ringbuf-size"); fl.Changed {
		o := loader.Options{CTMax: 1, CTUnconfirmedMax: 1, IPCacheMax: 1, RingBufSize: ringBufSize}
		return o.Validate()
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
// opens the pinned conntrack tables; it never creates anything.
func (a *app) openCT(out *string) (*ctmap.Map, func(), error) {
	if err := a.preamble(out); err != nil {
		return nil, nil, err
	}
	return loader.OpenConntrack(func(name string) (*ebpf.Map, error) {
		m, err := a.pins().OpenMap(name, &ebpf.LoadPinOptions{})
		var np *loader.NotPinnedError
		if errors.As(err, &np) && (name != loader.ConntrackMaps[0] || a.pins().Pinned(loader.CTV1Map)) {
			np.Older = true // another conntrack table is pinned
		}
		return m, err
	})
}
