package main

import (
	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/datapath/cgroupv2"
)

func newCTCmd(a *app) *cobra.Command {
	c := &cobra.Command{
		Use:   "ct",
		Short: "List, flush and revoke the conntrack table's flows",
		Args:  cobra.NoArgs,
	}
	c.AddCommand(newCTListCmd(a), newCTTopCmd(a), newCTFlushCmd(a), newCTRevokeCmd(a), newCTGCCmd(a))
	return c
}

// filterFlags are the flow selectors shared by ct list and ct flush.
type filterFlags struct {
	proto, addr, port string
	comm, cgroup      string
}

func (f *filterFlags) register(c *cobra.Command) {
	c.Flags().StringVar(&f.proto, "proto", "", "only flows of this protocol: a name (tcp, udp, icmp, icmpv6, sctp, gre, ...) or a number")
	c.Flags().StringVar(&f.addr, "addr", "", "only flows with this address at either end")
	c.Flags().StringVar(&f.port, "port", "", "only flows with this port at either end (ICMP echo: the identifier)")
	_ = c.RegisterFlagCompletionFunc("proto", cobra.FixedCompletions(
		[]string{"tcp", "udp", "icmp", "icmpv6", "sctp"}, cobra.ShellCompDirectiveNoFileComp))
	_ = c.RegisterFlagCompletionFunc("addr", cobra.NoFileCompletions)
	c.Flags().StringVar(&f.comm, "comm", "", "only flows whose local owner has this command name")
	c.Flags().StringVar(&f.cgroup, "cgroup", "", "only flows whose local owner is in this cgroup: its path below the cgroup v2 mount, e.g. /system.slice/nginx.service")
	_ = c.RegisterFlagCompletionFunc("port", cobra.NoFileCompletions)
	_ = c.RegisterFlagCompletionFunc("comm", cobra.NoFileCompletions)
	_ = c.RegisterFlagCompletionFunc("cgroup", cobra.NoFileCompletions)
}

func (f *filterFlags) parse() (conntrack.Filter, error) {
	flt, err := conntrack.ParseFilter(f.proto, f.addr, f.port)
	if err != nil {
		return conntrack.Filter{}, err
	}
	if err := flt.ParseOwner(f.comm, f.cgroup); err != nil {
		return conntrack.Filter{}, err
	}
	return flt, nil
}

// cgroupNames names cgroups by their ids below the cgroup v2 mount; nil
// (ids are shown) where none is mounted.
func cgroupNames() *cgroupv2.Names {
	root, err := cgroupv2.Mount()
	if err != nil {
		return nil
	}
	return cgroupv2.NewNames(root)
}
