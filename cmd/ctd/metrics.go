package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/datapath/metricsmap"
)

// metricRow is one counter as 'ctd metrics -o json' prints it.
type metricRow struct {
	Dir     string `json:"dir"`
	Kind    string `json:"kind"` // forwarded, dropped, counter
	Reason  string `json:"reason"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

func newMetricsCmd(a *app) *cobra.Command {
	var out string
	c := &cobra.Command{
		Use:   "metrics [-o json]",
		Short: "Show the datapath's counters: packets and bytes by direction and verdict or reason",
		Long: `Show the datapath's counters, summed over CPUs, for each direction:
packets and bytes forwarded (established, new, related, untracked,
unparseable) and dropped (policy, invalid, ct-insert-failed, parse-error,
revoked), and the counters beside the verdicts: conntrack entries created
(ct-created), failed conntrack updates (ct-update-failed), events the ring
buffer had no room for (events-lost) or the rate limit suppressed
(events-ratelimited), and later IP fragments (fragments). Bytes are frame
lengths as TC sees them (Ethernet header included); counters beside the
verdicts count no bytes, except fragments.

The counters count from the moment the maps were created; they survive
restarts and re-attachments.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			maps, err := a.openPinnedMaps(&out)
			if err != nil {
				return err
			}
			defer maps.Close()
			snap, err := metricsmap.New(maps.Metrics()).Read()
			if err != nil {
				return err
			}
			var rows []metricRow
			for _, s := range snap.Samples() {
				rows = append(rows, metricRow{s.Dir.String(), string(s.Reason.Kind()), s.Reason.String(), s.Packets, s.Bytes})
			}
			if out == "json" {
				return writeJSON(c.OutOrStdout(), rows)
			}
			tw := tabwriter.NewWriter(c.OutOrStdout(), 0, 8, 2, ' ', 0)
			fmt.Fprintln(tw, "DIR\tKIND\tREASON\tPACKETS\tBYTES")
			for _, r := range rows {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\n", r.Dir, r.Kind, r.Reason, r.Packets, r.Bytes)
			}
			return tw.Flush()
		},
	}
	outputFlag(c, &out)
	return c
}
