package main

import (
	"fmt"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/events"
)

func newEventsCmd(a *app) *cobra.Command {
	c := &cobra.Command{
		Use:   "events",
		Short: "Configure the datapath's events",
		Args:  cobra.NoArgs,
	}
	c.AddCommand(newEventsRateCmd(a))
	return c
}

func newEventsRateCmd(a *app) *cobra.Command {
	var burst uint32
	c := &cobra.Command{
		Use:   "rate [EVENTS_PER_SECOND] [--burst N]",
		Short: "Show or set the per-CPU event rate limit",
		Long: fmt.Sprintf(`Show the datapath's event rate limit, or set it: each CPU may emit at
most EVENTS_PER_SECOND events per second, in bursts of up to --burst
(default: as many as the rate), so that a flood cannot starve the consumer.
Suppressed events are counted (events-ratelimited in 'ctd metrics').
0 removes the limit. %d is a good start.`, events.DefaultRate),
		Args: cobra.MaximumNArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			var lim events.RateLimit
			if len(args) == 1 {
				n, err := strconv.ParseUint(args[0], 10, 32)
				if err != nil {
					return fmt.Errorf("invalid rate %q: give events per second per CPU, 0 to 4294967295 (0: unlimited)", args[0])
				}
				lim = events.RateLimit{Rate: uint32(n), Burst: burst}
				if lim.Rate == 0 && lim.Burst != 0 {
					return fmt.Errorf("invalid --burst %d: rate 0 means unlimited, which takes no burst", burst)
				}
			} else if c.Flags().Changed("burst") {
				return fmt.Errorf("--burst needs a rate: ctd events rate EVENTS_PER_SECOND --burst %d", burst)
			}
			maps, err := a.openPinnedMaps(nil)
			if err != nil {
				return err
			}
			defer maps.Close()
			if len(args) == 1 {
				if err := events.SetRateLimit(maps.Config(), lim); err != nil {
					return err
				}
			}
			cur, err := events.GetRateLimit(maps.Config())
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(c.OutOrStdout(), "event rate limit: %s\n", cur)
			return err
		},
	}
	c.Flags().Uint32Var(&burst, "burst", 0, "events a CPU may emit at once (default: the rate)")
	return c
}
