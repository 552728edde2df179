package attach

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	tc "github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/byteorder"
)

// ctd's cls_bpf filters are identified by priority and handle in both clsact
// directions (protocol ETH_P_ALL, chain 0). Another filter that happens to
// use the same priority and handle would be replaced.
const (
	// TCPriority is the priority ("pref") of ctd's tc filters. 0xc7d reads
	// "ctd" and stays clear of the low priorities other tools pick by default.
	TCPriority uint16 = 0xc7d
	// TCHandle is the handle of ctd's tc filters.
	TCHandle uint32 = 0x1
)

// clsactHandle is the handle of a clsact qdisc, ffff:0000.
const clsactHandle = 0xffff0000

// filterInfo is tcm_info for ctd's filters: priority in the upper 16 bits,
// protocol (network byte order) in the lower.
func filterInfo() uint32 {
	return uint32(TCPriority)<<16 | uint32(byteorder.Swap16(unix.ETH_P_ALL))
}

func clsactParent(d direction) uint32 { return core.BuildHandle(tc.HandleRoot, d.clsactMin) }

// ensureClsact adds a clsact qdisc to ifindex unless it already has one.
func (s *session) ensureClsact(ifindex int, iface string) error {
	qdiscs, err := s.tc.Qdisc().Get()
	if err != nil {
		return fmt.Errorf("list qdiscs: %w", err)
	}
	for _, q := range qdiscs {
		if int(q.Ifindex) != ifindex {
			continue
		}
		switch q.Kind {
		case "clsact":
			return nil
		case "ingress":
			return fmt.Errorf("an ingress qdisc occupies the clsact slot; remove it with: tc qdisc del dev %s ingress", iface)
		}
	}
	err = s.tc.Qdisc().Add(&tc.Object{
		Msg: tc.Msg{
			Family:  unix.AF_UNSPEC,
			Ifindex: uint32(ifindex),
			Handle:  clsactHandle,
			Parent:  tc.HandleIngress, // TC_H_CLSACT
		},
		Attribute: tc.Attribute{Kind: "clsact"},
	})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add clsact qdisc: %w", err)
	}
	return nil
}

// replaceFilter creates ctd's filter for d or atomically swaps its program.
// go-tc's Replace sends RTM_NEWTFILTER with NLM_F_CREATE and without
// NLM_F_EXCL; for an existing priority/handle the kernel then replaces the
// filter in place (cls_bpf_change, list_replace_rcu), so packets always see
// either the old or the new program.
func (s *session) replaceFilter(ifindex int, d direction, prog *ebpf.Program) error {
	fd := uint32(prog.FD())
	name := d.filter
	flags := uint32(tc.BpfActDirect)
	err := s.tc.Filter().Replace(&tc.Object{
		Msg: tc.Msg{
			Family:  unix.AF_UNSPEC,
			Ifindex: uint32(ifindex),
			Handle:  TCHandle,
			Parent:  clsactParent(d),
			Info:    filterInfo(),
		},
		Attribute: tc.Attribute{
			Kind: "bpf",
			BPF:  &tc.Bpf{FD: &fd, Name: &name, Flags: &flags},
		},
	})
	if err != nil {
		return fmt.Errorf("replace tc filter: %w", err)
	}
	return nil
}

// filters returns ctd's cls_bpf filters of direction d on ifindex (at most
// one in practice). No clsact qdisc means no filters.
func (s *session) filters(ifindex int, d direction) ([]tc.Object, error) {
	objs, err := s.tc.Filter().Get(&tc.Msg{
		Family:  unix.AF_UNSPEC,
		Ifindex: uint32(ifindex),
		Parent:  clsactParent(d),
		Info:    uint32(TCPriority) << 16, // the kernel filters the dump by priority
	})
	if err != nil {
		return nil, err
	}
	var out []tc.Object
	for _, o := range objs {
		if o.Kind == "bpf" && o.Handle == TCHandle && uint16(o.Info>>16) == TCPriority && o.BPF != nil {
			out = append(out, o)
		}
	}
	return out, nil
}

// removeTC deletes ctd's filters from ifindex, leaving the qdisc alone.
func (s *session) removeTC(ifindex int) error {
	for _, d := range directions() {
		fs, err := s.filters(ifindex, d)
		if err != nil {
			return fmt.Errorf("list %s tc filters: %w", d, err)
		}
		for _, f := range fs {
			err := s.tc.Filter().Delete(&tc.Object{
				Msg: tc.Msg{
					Family:  unix.AF_UNSPEC,
					Ifindex: uint32(ifindex),
					Handle:  TCHandle,
					Parent:  clsactParent(d),
					Info:    f.Info,
				},
				Attribute: tc.Attribute{Kind: "bpf"},
			})
			if err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("delete %s tc filter: %w", d, err)
			}
		}
	}
	return nil
}

// tcIfaces returns the names of the interfaces with a ctd tc filter.
func (s *session) tcIfaces() ([]string, error) {
	qdiscs, err := s.tc.Qdisc().Get()
	if err != nil {
		return nil, fmt.Errorf("list qdiscs: %w", err)
	}
	var names []string
	for _, q := range qdiscs {
		if q.Kind != "clsact" {
			continue
		}
		for _, d := range directions() {
			fs, err := s.filters(int(q.Ifindex), d)
			if err != nil {
				return nil, fmt.Errorf("list %s tc filters of ifindex %d: %w", d, q.Ifindex, err)
			}
			if len(fs) == 0 {
				continue
			}
			l, err := s.nl.LinkByIndex(int(q.Ifindex))
			if err != nil {
				return nil, fmt.Errorf("look up ifindex %d: %w", q.Ifindex, err)
			}
			names = append(names, l.Attrs().Name)
			break
		}
	}
	return names, nil
}
