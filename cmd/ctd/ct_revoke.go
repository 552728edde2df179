package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/datapath/loader"
)

func newCTRevokeCmd(a *app) *cobra.Command {
	var (
		ff  filterFlags
		out string
	)
	c := &cobra.Command{
		Use:   "revoke [--proto P] [--addr IP] [--port N] [-o json]",
		Short: "Cut the tracked flows that the policy in force denies",
		Long: `Judge every tracked flow (all, or those the filters select) again against
the policy in force, as its first packet would be judged now, and cut those
it denies: the entry is marked revoked (not deleted), the datapath drops
both directions of a revoked flow with drop reason 'revoked', and no pickup
re-creates it. A revoked entry goes at the end of its lifetime (every
dropped packet refreshes it), or when a SYN that the policy allows opens a
new connection on its tuple. Flows the policy still allows are untouched.

'revoked' counts the selected flows that are cut, including those cut
before; 'kept' those still allowed.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			f, err := ff.parse()
			if err != nil {
				return err
			}
			maps, err := a.openPinnedMaps(&out)
			if err != nil {
				return err
			}
			defer maps.Close()
			res, err := revokeFlows(maps, f)
			if err != nil {
				return err
			}
			return writeRevoked(c.OutOrStdout(), res, out)
		},
	}
	ff.register(c)
	outputFlag(c, &out)
	return c
}

// revokeFlows cuts the flows f selects that the policy in force denies.
func revokeFlows(maps *loader.Maps, f conntrack.Filter) (conntrack.Revoked, error) {
	ct := maps.Conntrack()
	rv, err := ct.NewRevoker(maps.Policy(), maps.ByName()[loader.ConfigMap])
	if err != nil {
		return conntrack.Revoked{}, err
	}
	defer rv.Close()
	return conntrack.Revoke(ct, rv, f)
}

func writeRevoked(w io.Writer, res conntrack.Revoked, out string) error {
	if out == "json" {
		return writeJSON(w, res)
	}
	_, err := fmt.Fprintf(w, "revoked %d, kept %d\n", res.Revoked, res.Kept)
	return err
}
