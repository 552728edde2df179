package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/gc"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// gcReport is one pass as 'ctd ct gc -o json' prints it.
type gcReport struct {
	Scanned   int     `json:"scanned"`
	Deleted   int     `json:"deleted"`
	Refreshed int     `json:"refreshed"` // expired when read, refreshed before deletion: kept
	Vanished  int     `json:"vanished"`  // expired when read, gone before deletion
	Duration  float64 `json:"duration_seconds"`
}

func newCTGCCmd(a *app) *cobra.Command {
	var out string
	lt := gc.DefaultLifetimes()
	c := &cobra.Command{
		Use:   "gc [-o json] [--ct-lifetime-STATE DURATION...]",
		Short: "Run one conntrack GC pass: delete the flows idle longer than their state's lifetime",
		Long: `Run one garbage-collection pass over the conntrack table, as the daemon
does periodically: every entry whose last packet is older than its state's
lifetime is deleted. An entry that sees a packet while the pass runs is
kept. Prints how many entries the pass read (scanned) and deleted, and how
long it took.

Default lifetimes (as Cilium, and nf_conntrack where Cilium has none):
TCP SYN_SENT 60s, SYN_RECV 60s, ESTABLISHED 6h, FIN_WAIT 2m, CLOSED 10s;
UDP without reply 30s, with reply 60s; ICMP 30s; other protocols 60s.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := lt.Validate(); err != nil {
				return err
			}
			m, closeCT, err := a.openCT(&out)
			if err != nil {
				return err
			}
			defer closeCT()
			res, err := gc.Pass(m, lt, ctmap.Now().Mono())
			if err != nil {
				return err
			}
			if out == "json" {
				return writeJSON(c.OutOrStdout(), gcReport{res.Scanned, res.Deleted, res.Refreshed, res.Vanished, res.Duration.Seconds()})
			}
			_, err = fmt.Fprintf(c.OutOrStdout(), "scanned %d, deleted %d, duration %v", res.Scanned, res.Deleted, res.Duration.Round(time.Microsecond))
			if err == nil && res.Refreshed+res.Vanished > 0 {
				_, err = fmt.Fprintf(c.OutOrStdout(), " (kept %d refreshed during the pass, %d already gone)", res.Refreshed, res.Vanished)
			}
			if err == nil {
				_, err = fmt.Fprintln(c.OutOrStdout())
			}
			return err
		},
	}
	outputFlag(c, &out)
	lt.AddFlags(c.Flags())
	return c
}
