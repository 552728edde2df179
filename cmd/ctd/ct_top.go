package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/control/ifnames"
)

func newCTTopCmd(a *app) *cobra.Command {
	var (
		out, by string
		n       int
		ff      filterFlags
	)
	bys := make([]string, len(conntrack.Bys))
	for i, b := range conntrack.Bys {
		bys[i] = string(b)
	}
	c := &cobra.Command{
		Use:   "top [--by " + strings.Join(bys, "|") + "] [-n N] [-o json]",
		Short: "What fills the conntrack table: flows counted by identity, port, protocol, state, interface, cgroup or command",
		Long: `Count the flows in the conntrack table by one dimension and print the
largest values first, with their share of the flows counted. --by identity
counts a flow once for each distinct identity at its ends (so the shares
can add up to more than 100%); src-identity is the originator's, dst-identity
the responder's; dport is the protocol and destination port (tcp/443), or
the protocol alone for flows without ports; cgroup and comm are the local
owner's (see ct list), "-" for flows without one. The flow filters
(--proto, --addr, --port, --comm, --cgroup) narrow what is counted.

With -o json the output is an array of {"value", "flows", "share"}.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			dim, err := conntrack.ParseBy(by)
			if err != nil {
				return err
			}
			if n < 0 {
				return fmt.Errorf("invalid -n %d: valid is a number of rows, 0 for all", n)
			}
			f, err := ff.parse()
			if err != nil {
				return err
			}
			m, closeCT, err := a.openCT(&out)
			if err != nil {
				return err
			}
			defer closeCT()

			top, err := conntrack.Top(m, f, dim, n, ifnames.New(), cgroupNames())
			if err != nil {
				return err
			}
			if out == "json" {
				return writeJSON(c.OutOrStdout(), top.Rows)
			}
			return writeTop(c.OutOrStdout(), top)
		},
	}
	outputFlag(c, &out)
	ff.register(c)
	c.Flags().StringVar(&by, "by", string(conntrack.ByIdentity), "dimension: "+strings.Join(bys, ", "))
	c.Flags().IntVarP(&n, "top", "n", 10, "show the N largest values (0: all)")
	_ = c.RegisterFlagCompletionFunc("by", cobra.FixedCompletions(bys, cobra.ShellCompDirectiveNoFileComp))
	return c
}

func writeTop(w io.Writer, top conntrack.TopTable) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintf(tw, "%s\tFLOWS\tSHARE\n", strings.ToUpper(string(top.By)))
	for _, r := range top.Rows {
		fmt.Fprintf(tw, "%s\t%d\t%.1f%%\n", r.Value, r.Flows, 100*r.Share)
	}
	fmt.Fprintf(tw, "total\t%d\t\n", top.Total)
	return tw.Flush()
}
