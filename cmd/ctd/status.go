package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"text/tabwriter"

	"github.com/cilium/ebpf"
	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/mapinfo"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/pins"
)

type statusReport struct {
	PinPath    string        `json:"pin_path"`
	Interfaces []ifaceStatus `json:"interfaces"`
	Maps       []mapStatus   `json:"maps"`
}

type ifaceStatus struct {
	Name          string `json:"name"`
	Ifindex       int    `json:"ifindex"`
	Mode          string `json:"mode"`
	IngressProgID uint32 `json:"ingress_prog_id"`
	EgressProgID  uint32 `json:"egress_prog_id"`
}

type mapStatus struct {
	Name   string `json:"name"`
	Pinned bool   `json:"pinned"`
	Type   string `json:"type,omitempty"`
	// Entries is the number of entries in use; arrays always have all of
	// them, and a ring buffer has none (omitted).
	Entries *int `json:"entries,omitempty"`
	// MaxEntries is the map's capacity; for a ring buffer its size in bytes.
	MaxEntries uint32 `json:"max_entries,omitempty"`
}

func newStatusCmd(a *app) *cobra.Command {
	var out string
	c := &cobra.Command{
		Use:   "status [-o json]",
		Short: "Show the interfaces ctd is attached to and how full its maps are",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := a.preamble(&out); err != nil {
				return err
			}
			if err := a.checkDatapath(); err != nil {
				return &exitError{code: exitNoDatapath, err: err}
			}
			r, err := a.status()
			if err != nil {
				return err
			}
			if out == "json" {
				return writeJSON(c.OutOrStdout(), r)
			}
			return r.writeText(c.OutOrStdout())
		},
	}
	outputFlag(c, &out)
	return c
}

// exitNoDatapath is status's exit code when the pin path holds no ctd
// datapath: 3, "not running", as LSB init scripts' status action has it.
const exitNoDatapath = 3

// checkDatapath fails when the pin path holds no map of ctd's: a mistyped
// --pin-path must not look like a healthy, idle datapath.
func (a *app) checkDatapath() error {
	fi, err := os.Stat(a.pinPath)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("no ctd datapath at %s: the directory does not exist (check --pin-path or CTD_PIN_PATH; 'ctd attach' creates it)", a.pinPath)
	case err != nil:
		return fmt.Errorf("no ctd datapath at %s: %w", a.pinPath, err)
	case !fi.IsDir():
		return fmt.Errorf("no ctd datapath at %s: not a directory (check --pin-path or CTD_PIN_PATH)", a.pinPath)
	}
	for _, name := range loader.MapNames {
		if a.pins().Pinned(name) {
			return nil
		}
	}
	return fmt.Errorf("no ctd datapath at %s: no map of ctd's is pinned there (check --pin-path or CTD_PIN_PATH; 'ctd attach' creates one)", a.pinPath)
}

func (a *app) status() (*statusReport, error) {
	r := &statusReport{PinPath: a.pinPath, Interfaces: []ifaceStatus{}, Maps: []mapStatus{}}
	ats, err := a.pins().Attachments()
	if err != nil {
		return nil, err
	}
	for _, at := range ats {
		r.Interfaces = append(r.Interfaces, ifaceStatus{
			Name:          at.Iface,
			Ifindex:       at.Ifindex,
			Mode:          string(at.Mode),
			IngressProgID: uint32(at.IngressProgID),
			EgressProgID:  uint32(at.EgressProgID),
		})
	}
	for _, name := range loader.MapNames {
		s, err := pinnedMapStatus(a.pins(), name)
		if err != nil {
			return nil, err
		}
		r.Maps = append(r.Maps, s)
	}
	return r, nil
}

func pinnedMapStatus(dir pins.Dir, name string) (mapStatus, error) {
	m, err := dir.OpenMap(name, &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, os.ErrNotExist) {
		return mapStatus{Name: name}, nil
	}
	if err != nil {
		return mapStatus{}, err
	}
	defer m.Close()

	s := mapStatus{Name: name, Pinned: true, Type: mapinfo.TypeName(m.Type()), MaxEntries: m.MaxEntries()}
	if m.Type() == ebpf.RingBuf {
		return s, nil
	}
	c, err := mapinfo.Count(m)
	if err != nil {
		return mapStatus{}, fmt.Errorf("count entries of %s: %w", dir.Map(name), err)
	}
	n := int(c)
	s.Entries = &n
	return s, nil
}

func (r *statusReport) writeText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintf(tw, "pin path:\t%s\n", r.PinPath)
	if len(r.Interfaces) == 0 {
		fmt.Fprintln(tw, "interfaces:\tnone attached")
	} else {
		fmt.Fprintln(tw, "interfaces:")
		fmt.Fprintln(tw, "  NAME\tIFINDEX\tMODE\tINGRESS PROG\tEGRESS PROG")
		for _, i := range r.Interfaces {
			fmt.Fprintf(tw, "  %s\t%d\t%s\t%d\t%d\n", i.Name, i.Ifindex, i.Mode, i.IngressProgID, i.EgressProgID)
		}
	}
	fmt.Fprintln(tw, "maps:")
	fmt.Fprintln(tw, "  NAME\tTYPE\tENTRIES\tMAX")
	for _, m := range r.Maps {
		switch {
		case !m.Pinned:
			fmt.Fprintf(tw, "  %s\t-\tnot pinned\t-\n", m.Name)
		case m.Entries == nil:
			fmt.Fprintf(tw, "  %s\t%s\t-\t%d bytes\n", m.Name, m.Type, m.MaxEntries)
		default:
			fmt.Fprintf(tw, "  %s\t%s\t%d\t%d\n", m.Name, m.Type, *m.Entries, m.MaxEntries)
		}
	}
	return tw.Flush()
}
