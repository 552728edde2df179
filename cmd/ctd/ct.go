package main

import (
	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/conntrack"
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
}

func (f *filterFlags) register(c *cobra.Command) {
	c.Flags().StringVar(&f.proto, "proto", "", "only flows of this protocol: a name (tcp, udp, icmp, icmpv6, sctp, gre, ...) or a number")
	c.Flags().StringVar(&f.addr, "addr", "", "only flows with this address at either end")
	c.Flags().StringVar(&f.port, "port", "", "only flows with this port at either end (ICMP echo: the identifier)")
	_ = c.RegisterFlagCompletionFunc("proto", cobra.FixedCompletions(
		[]string{"tcp", "udp", "icmp", "icmpv6", "sctp"}, cobra.ShellCompDirectiveNoFileComp))
	_ = c.RegisterFlagCompletionFunc("addr", cobra.NoFileCompletions)
	_ = c.RegisterFlagCompletionFunc("port", cobra.NoFileCompletions)
}

func (f *filterFlags) parse() (conntrack.Filter, error) {
	return conntrack.ParseFilter(f.proto, f.addr, f.port)
}
