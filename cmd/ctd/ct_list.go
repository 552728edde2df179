package main

import (
	"bufio"
	"io"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

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

			growPipe(c.OutOrStdout())
			w := bufio.NewWriterSize(c.OutOrStdout(), listBuffer)
			enc := conntrack.NewEncoder(ctmap.Now(), ifnames.New(), cgroupNames())
			each := func(fn func(ctmap.Flow) error) error { return conntrack.List(m, f, fn) }
			if out == "json" {
				err = listJSON(w, enc, each)
			} else {
				err = listText(w, enc, each)
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

// listBuffer is the size of ct list's output buffer. A million flows are
// 130 MB of text or 330 MB of JSON: the larger the writes, the fewer the
// system calls and pipe wake-ups, which cost more than the encoding. Each
// flow is encoded straight into the buffer's free space.
const listBuffer = 1 << 20

// growPipe raises the capacity of out, where it is a smaller pipe, to
// listBuffer (the most an unprivileged process may ask for by default), so
// that the writer and the reader of a large listing wake each other up a
// sixteenth as often as with the default 64 KiB. It is a hint: where out is
// no pipe, or the limits refuse, nothing changes.
func growPipe(out io.Writer) {
	f, ok := out.(*os.File)
	if !ok {
		return
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		if n, err := unix.FcntlInt(fd, unix.F_GETPIPE_SZ, 0); err == nil && n < listBuffer {
			_, _ = unix.FcntlInt(fd, unix.F_SETPIPE_SZ, listBuffer)
		}
	})
}

// listText writes a line per flow that each calls its function with.
func listText(w *bufio.Writer, enc *conntrack.Encoder, each func(func(ctmap.Flow) error) error) error {
	return each(func(fl ctmap.Flow) error {
		_, err := w.Write(append(enc.AppendLine(w.AvailableBuffer(), fl), '\n'))
		return err
	})
}

// listJSON writes the flows that each calls its function with as a JSON
// array, streamed: "[", the objects separated by ",", "]".
func listJSON(w *bufio.Writer, enc *conntrack.Encoder, each func(func(ctmap.Flow) error) error) error {
	sep := "[\n"
	err := each(func(fl ctmap.Flow) error {
		_, err := w.Write(enc.AppendJSON(append(w.AvailableBuffer(), sep...), fl))
		sep = ",\n"
		return err
	})
	if err != nil {
		return err
	}
	if sep == "[\n" {
		_, err = w.WriteString("[]\n")
	} else {
		_, err = w.WriteString("\n]\n")
	}
	return err
}
