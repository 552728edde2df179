package main

import (
	"bufio"
	"io"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/control/ifnames"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

func newCTListCmd(a *app) *cobra.Command {
	var (
		out string
		ff  filterFlags
	)
	c := &cobra.Command{
		Use:   "list [-o json] [--proto P] [--addr IP] [--port N] [--comm NAME] [--cgroup PATH]",
		Short: "List tracked flows, one line (or JSON object) per flow, originator first",
		Long: `List the flows in the conntrack table. Each flow is shown from its
originator, the endpoint that sent the first packet ctd saw: src/sport
opened the flow to dst/dport. Counters before "|" are the originator's
direction, after it the reply direction's; bytes are frame lengths as TC
sees them (Ethernet header included), packets count GSO segments.

A flow to or from a local socket shows its owner: pid and comm of the
process that created the socket (for an accepted connection, the one that
created its listener) and its cgroup, the path below the cgroup v2 mount
(id:N for a cgroup that is gone). Sockets created before the datapath was
attached show their cgroup only; forwarded flows have no owner. TCP flows
whose handshake ctd saw show rtt, the time from the SYN to the ACK that
completed the handshake as seen where ctd is attached. In JSON: pid,
comm, cgroup, cgroup_id, rtt_us, present only when known.

With -o json the output is one JSON array, written as the table is read.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			f, err := ff.parse()
			if err != nil {
				return err
			}
			m, closeCT, err := a.openCT(&out)
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
	enc := conntrack.NewEncoder(ctmap.Now(), ifnames.New(), cgroupNames())
	var buf []byte
	return conntrack.List(m, f, func(fl ctmap.Flow) error {
		buf = append(enc.AppendLine(buf[:0], fl), '\n')
		_, err := w.Write(buf)
		return err
	})
}

// listJSON streams a JSON array: "[", the objects separated by ",", "]".
func listJSON(w io.Writer, m *ctmap.Map, f conntrack.Filter) error {
	enc := conntrack.NewEncoder(ctmap.Now(), ifnames.New(), cgroupNames())
	buf := []byte("[")
	sep := "\n"
	err := conntrack.List(m, f, func(fl ctmap.Flow) error {
		buf = enc.AppendJSON(append(buf, sep...), fl)
		sep = ",\n"
		_, err := w.Write(buf)
		buf = buf[:0]
		return err
	})
	if err != nil {
		return err
	}
	if sep == "\n" {
		buf = append(buf, "]\n"...)
	} else {
		buf = append(buf, "\n]\n"...)
	}
	_, err = w.Write(buf)
	return err
}
