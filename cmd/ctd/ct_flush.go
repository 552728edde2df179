package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/conntrack"
)

func newCTFlushCmd(a *app) *cobra.Command {
	var ff filterFlags
	c := &cobra.Command{
		Use:   "flush [--proto P] [--addr IP] [--port N]",
		Short: "Delete tracked flows (all, or those the filters select)",
		Long: `Delete flows from the conntrack table: all of them, or those that the
filters select. A deleted flow that still carries traffic is tracked again
from its next packet, as if picked up mid-stream.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			f, err := ff.parse()
			if err != nil {
				return err
			}
			m, closeCT, err := a.openCT(nil)
			if err != nil {
				return err
			}
			defer closeCT()
			n, err := conntrack.Flush(m, f)
			if err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "deleted %d conntrack %s\n", n, plural(n, "entry", "entries"))
			return nil
		},
	}
	ff.register(c)
	return c
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
