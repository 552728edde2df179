package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newDetachCmd(a *app) *cobra.Command {
	var iface string
	c := &cobra.Command{
		Use:         "detach --iface NAME",
		Short:       "Remove ctd's programs from one interface; the maps and other interfaces stay",
		Args:        cobra.NoArgs,
		Annotations: map[string]string{annotationStore: "yes"},
		RunE: func(c *cobra.Command, _ []string) error {
			if err := a.preamble(nil); err != nil {
				return err
			}
			_, lookupErr := lookupIface(iface)
			if lookupErr != nil {
				// A deleted interface may have left pinned links behind:
				// remove those, else the name is simply wrong.
				if !a.pins().HasLinks(iface) {
					return lookupErr
				}
				if err := a.detachAndForget(iface); err != nil {
					return err
				}
				fmt.Fprintf(c.OutOrStdout(), "interface %s is gone: removed its pinned ctd links\n", iface)
				return nil
			}
			before, err := a.pins().Status(iface)
			if err != nil {
				return err
			}
			if err := a.detachAndForget(iface); err != nil {
				return err
			}
			if before.Mode == "" {
				fmt.Fprintf(c.OutOrStdout(), "ctd was not attached to %s: nothing to do\n", iface)
				return nil
			}
			fmt.Fprintf(c.OutOrStdout(), "detached ctd from %s (%s)\n", iface, before.Mode)
			return nil
		},
	}
	c.Flags().StringVar(&iface, "iface", "", "interface to detach from (required)")
	_ = c.MarkFlagRequired("iface")
	_ = c.RegisterFlagCompletionFunc("iface", completeIfaces)
	return c
}
