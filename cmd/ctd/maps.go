package main

import (
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/mapinfo"
	"github.com/ctd-dev/ctd/datapath/loader"
)

func newMapsCmd(a *app) *cobra.Command {
	var out string
	c := &cobra.Command{
		Use:   "maps [-o json]",
		Short: "List ctd's maps: type, sizes, live entries, fill, memlock and pin",
		Long: `List every map ctd pins, like 'bpftool map show' but readable: type
(as bpftool names it), key and value size, max entries, live entries, fill
in percent, the memory the kernel charges for it (memlock), and the pin.

Entries are counted exactly: hash maps with batch lookups, LPM tries by
walking their keys. Arrays always hold max entries. For the ring buffer,
entries are the bytes written by the datapath and not yet read by a
consumer ('ctd monitor'), and max entries its size in bytes.

A warning goes to stderr for each map more than 80% full. With -o json the
output is an array with one object per map (fill in percent).`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			infos, err := a.inspectMaps(&out)
			if err != nil {
				return err
			}
			if out == "json" {
				err = writeJSON(c.OutOrStdout(), infos)
			} else {
				err = writeMapsText(c.OutOrStdout(), infos)
			}
			for _, i := range infos {
				if w := i.Warning(); w != "" {
					fmt.Fprintln(c.ErrOrStderr(), "warning: "+w)
				}
			}
			return err
		},
	}
	outputFlag(c, &out)
	return c
}

// openPinnedMaps runs the preamble (out: the output format, nil for none)
// and opens every map pinned at the pin path; it never creates anything.
func (a *app) openPinnedMaps(out *string) (*loader.Maps, error) {
	if err := a.preamble(out); err != nil {
		return nil, err
	}
	return loader.OpenPinned(a.pinPath)
}

func (a *app) inspectMaps(out *string) ([]mapinfo.Info, error) {
	maps, err := a.openPinnedMaps(out)
	if err != nil {
		return nil, err
	}
	defer maps.Close()
	ms, err := mapinfo.Of(maps, a.pinPath)
	if err != nil {
		return nil, err
	}
	return mapinfo.InspectAll(ms)
}

func writeMapsText(w io.Writer, infos []mapinfo.Info) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tTYPE\tKEY\tVALUE\tMAX ENTRIES\tENTRIES\tFILL\tMEMLOCK\tPIN")
	for _, i := range infos {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%.1f%%\t%s\t%s\n",
			i.Name, i.Type, i.KeySize, i.ValueSize, i.MaxEntries, i.Entries, i.Fill, iec(i.Memlock), i.Pin)
	}
	t := mapinfo.Sum(infos)
	fmt.Fprintf(tw, "total\t%d maps\t\t\t\t\t\t%s\t\n", t.Maps, iec(t.Memlock))
	return tw.Flush()
}

// iec formats a byte count with binary units: 512 B, 1.5 KiB, 33.1 MiB.
func iec(n uint64) string {
	if n < 1024 {
		return strconv.FormatUint(n, 10) + " B"
	}
	v, unit := float64(n), ""
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB"} {
		v, unit = v/1024, u
		if v < 1024 {
			break
		}
	}
	return fmt.Sprintf("%.1f %s", v, unit)
}
