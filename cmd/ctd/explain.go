package main

import (
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/explain"
	"github.com/ctd-dev/ctd/control/ipcache"
	"github.com/ctd-dev/ctd/control/ipproto"
	"github.com/ctd-dev/ctd/control/policy"
)

func newExplainCmd(a *app) *cobra.Command {
	var (
		out, iface, dir, proto, src, dst, sport, dport, flags string
	)
	c := &cobra.Command{
		Use:   "explain --iface NAME --dir ingress|egress --proto P --src IP [--sport N] --dst IP [--dport N] [--flags SYN] [-o json]",
		Short: "Why a packet would pass or be dropped: a dry run of the attached program on it",
		Long: `Build the packet, run the program ctd attached to the interface for that
direction on it (BPF_PROG_TEST_RUN) against the live maps, and print what
it decided: the verdict (allow or drop), the reason (as 'ctd metrics' names
it), the identities of source and destination, the policy rule or default
that decided, and the conntrack entry the packet hits (its state) or new.

The run is a dry run: the program decides as it would for this packet and
changes nothing (no conntrack entry, counter, event or rate-limit token).
It is the program attached now, so the answer is that of this datapath,
not of a model of it; it runs only a program with this build's dry run.

--flags takes TCP flags joined by commas (SYN, ACK, FIN, RST, PSH, URG);
without it a TCP packet is a SYN. --dport is required for tcp, udp and
sctp; --sport defaults to ` + strconv.Itoa(defaultSport) + `, and is the echo identifier for icmp and
icmpv6 (an echo request). Run it in the interface's network namespace.

With -o json the keys are verdict, reason, src_identity, dst_identity,
rule, ct_state (and iface, dir, ct_table, ct_flags).`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			req, err := parseExplain(iface, dir, proto, src, dst, sport, dport, flags)
			if err != nil {
				return err
			}
			if err := a.preamble(&out); err != nil {
				return err
			}
			if err := a.checkDatapath(); err != nil {
				return err
			}
			ans, err := explain.Explain(a.pins(), req)
			if err != nil {
				return err
			}
			if out == "json" {
				return writeJSON(c.OutOrStdout(), ans)
			}
			return writeExplain(c.OutOrStdout(), req, ans)
		},
	}
	outputFlag(c, &out)
	f := c.Flags()
	f.StringVar(&iface, "iface", "", "interface ctd is attached to (required)")
	f.StringVar(&dir, "dir", "", "direction: ingress or egress (required)")
	f.StringVar(&proto, "proto", "", "IP protocol: tcp, udp, icmp, icmpv6, sctp, or any name of /etc/protocols or number (required)")
	f.StringVar(&src, "src", "", "source address (required)")
	f.StringVar(&dst, "dst", "", "destination address (required)")
	f.StringVar(&sport, "sport", "", "source port (tcp, udp, sctp; default "+strconv.Itoa(defaultSport)+"), or echo identifier (icmp, icmpv6)")
	f.StringVar(&dport, "dport", "", "destination port (tcp, udp, sctp: required)")
	f.StringVar(&flags, "flags", "", "TCP flags, e.g. SYN, ACK, SYN,ACK (default SYN)")
	_ = c.RegisterFlagCompletionFunc("dir", cobra.FixedCompletions([]string{"ingress", "egress"}, cobra.ShellCompDirectiveNoFileComp))
	return c
}

// defaultSport is the source port of a packet for which none is given: the
// first of the dynamic ports (RFC 6335).
const defaultSport = 49152

// parseExplain reads explain's flags; every error is one line naming the
// flag.
func parseExplain(iface, dir, proto, src, dst, sport, dport, flags string) (explain.Request, error) {
	var req explain.Request
	for _, f := range []struct{ name, v string }{{"iface", iface}, {"dir", dir}, {"proto", proto}, {"src", src}, {"dst", dst}} {
		if f.v == "" {
			return req, fmt.Errorf("--%s is required (see 'ctd explain --help')", f.name)
		}
	}
	req.Iface = iface
	var err error
	if req.Dir, err = policy.ParseDirection(dir); err != nil {
		return req, fmt.Errorf("--dir: %w", err)
	}
	protos, err := ipproto.Load(ipproto.File)
	if err != nil {
		return req, err
	}
	if req.Proto, err = protos.Parse(proto); err != nil {
		return req, fmt.Errorf("--proto: %w", err)
	}
	if req.Src, err = ipcache.ParseAddr(src); err != nil {
		return req, fmt.Errorf("--src: %w", err)
	}
	if req.Dst, err = ipcache.ParseAddr(dst); err != nil {
		return req, fmt.Errorf("--dst: %w", err)
	}
	if req.Sport, err = parsePort("sport", sport); err != nil {
		return req, err
	}
	if req.Dport, err = parsePort("dport", dport); err != nil {
		return req, err
	}
	if sport == "" && ipproto.HasPorts(req.Proto) {
		req.Sport = defaultSport
	}
	if flags != "" {
		if req.Flags, err = explain.ParseFlags(flags); err != nil {
			return req, err
		}
	} else if req.Proto == ipproto.TCP {
		req.Flags = explain.SYN
	}
	return req, req.Check()
}

// parsePort reads --NAME: empty is 0 (not given).
func parsePort(name, s string) (uint16, error) {
	if s == "" {
		return 0, nil
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 || s[0] == '+' {
		return 0, fmt.Errorf("invalid --%s %q: want a number 1-65535", name, s)
	}
	return uint16(n), nil
}

func writeExplain(w io.Writer, req explain.Request, a explain.Answer) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	pkt := ipproto.Name(req.Proto)
	if req.Proto == ipproto.TCP {
		pkt += " " + explain.FlagsString(req.Flags)
	}
	fmt.Fprintf(tw, "packet:\t%s %s -> %s on %s %s\n", pkt, endpoint(req.Src, req.Sport, req.Proto), endpoint(req.Dst, req.Dport, req.Proto), a.Iface, a.Dir)
	fmt.Fprintf(tw, "verdict:\t%s\n", a.Verdict)
	fmt.Fprintf(tw, "reason:\t%s\n", a.Reason)
	fmt.Fprintf(tw, "src identity:\t%s\n", identityText(a.SrcIdentity))
	fmt.Fprintf(tw, "dst identity:\t%s\n", identityText(a.DstIdentity))
	rule := a.Rule
	if rule == "" {
		rule = "none: no policy judged this packet"
		if a.CTTable != "" {
			rule += " (a tracked flow's packet passes without)"
		}
	}
	fmt.Fprintf(tw, "rule:\t%s\n", rule)
	ct := a.CTState
	switch {
	case a.CTTable != "":
		ct += " (an entry in the " + a.CTTable + " table"
		if len(a.CTFlags) > 0 {
			ct += ", flags " + strings.Join(a.CTFlags, ",")
		}
		ct += ")"
	case a.CTState == "new":
		ct += " (no entry: the packet opens a flow)"
	}
	fmt.Fprintf(tw, "ct state:\t%s\n", ct)
	return tw.Flush()
}

// endpoint formats an address with its port, for the protocols with ports.
func endpoint(a netip.Addr, port uint16, proto uint8) string {
	if ipproto.HasPorts(proto) {
		return netip.AddrPortFrom(a, port).String()
	}
	return a.String()
}

// identityText is an identity with its reserved name; 0 when no program
// resolved it.
func identityText(id uint32) string {
	if id == 0 {
		return "-"
	}
	if n := ipcache.IdentityName(id); n != "" {
		return fmt.Sprintf("%d (%s)", id, n)
	}
	return strconv.FormatUint(uint64(id), 10)
}
