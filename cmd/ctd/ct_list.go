package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

func newCTListCmd(a *app) *cobra.Command {
	var (
		out string
		ff  filterFlags
	)
	c := &cobra.Command{
		Use:   "list [-o json] [--proto P] [--addr IP] [--port N]",
		Short: "List tracked flows, one line (or JSON object) per flow, originator first",
		Long: `List the flows in the conntrack table. Each flow is shown from its
originator, the endpoint that sent the first packet ctd saw: src/sport
opened the flow to dst/dport. Counters before "|" are the originator's
direction, after it the reply direction's; bytes are frame lengths as TC
sees them (Ethernet header included), packets count GSO segments.

With -o json the output is one JSON array, written as the table is read.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := checkOutput(out); err != nil {
				return err
			}
			f, err := ff.parse()
			if err != nil {
				return err
			}
			if err := requireRoot(); err != nil {
				return err
			}
			m, closeCT, err := a.openCT()
			if err != nil {
				return err
			}
			defer closeCT()

			w := bufio.NewWriter(c.OutOrStdout())
			if out == "json" {
				err = listJSON(w, m, f)
			} else {
				err = listText(w, m, f)
			}
			if ferr := w.Flush(); err == nil {
				err = ferr
			}
			return err
		},
	}
	outputFlag(c, &out)
	ff.register(c)
	return c
}

func listText(w io.Writer, m *ctmap.Map, f conntrack.Filter) error {
	names := conntrack.NewNames()
	return conntrack.List(m, f, func(fl ctmap.Flow) error {
		_, err := fmt.Fprintln(w, conntrack.Line(fl, names))
		return err
	})
}

// listJSON streams a JSON array: "[", the objects separated by ",", "]".
func listJSON(w io.Writer, m *ctmap.Map, f conntrack.Filter) error {
	names := conntrack.NewNames()
	bt := ctmap.Now()
	sep := "\n"
	if _, err := io.WriteString(w, "["); err != nil {
		return err
	}
	err := conntrack.List(m, f, func(fl ctmap.Flow) error {
		b, err := json.Marshal(conntrack.RowOf(fl, bt, names))
		if err != nil {
			return err
		}
		if _, err := io.WriteString(w, sep); err != nil {
			return err
		}
		sep = ",\n"
		_, err = w.Write(b)
		return err
	})
	if err != nil {
		return err
	}
	if sep == "\n" {
		_, err = io.WriteString(w, "]\n")
	} else {
		_, err = io.WriteString(w, "\n]\n")
	}
	return err
}
