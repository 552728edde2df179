package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/control/policy"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/policymap"
)

func newPolicyCmd(a *app) *cobra.Command {
	var (
		ipcacheMax uint32
		revokeFlag bool
	)
	c := &cobra.Command{
		Use:   "policy",
		Short: "Identity-aware policy: which new flows each direction allows",
		Long: `Policy decides the first packet of a new flow; replies and later packets
of an allowed flow pass through conntrack without a policy lookup, and
established flows are not re-judged when policy changes: 'ctd ct revoke'
(or --revoke on 'policy del' and 'policy default') cuts those the changed
policy denies; 'ctd ct flush' makes them be tracked again from their next
packet.

A rule matches the remote identity (the source on ingress, the destination
on egress; see 'ctd ipcache'), the protocol and the destination port:

  ` + policy.Syntax + `

PROTO is any IP protocol: a name from /etc/protocols (tcp, udp, icmp,
icmpv6, sctp, gre, esp, ...; ctd knows netbase's names when the file is
missing) or a number 1-255. A port goes only with the protocols that have
ports (tcp, udp, sctp) or any. id=any (or any), protocol any and no port
are wildcards. The most specific
rule wins: a specific identity beats any identity; within one, protocol and
port beat the protocol alone, which beats any protocol with the port, which
beats any protocol. Without a matching rule the direction's default verdict
applies, allow unless set otherwise.

Changes go to the pinned maps and to the desired-state store (--state-dir),
which 'ctd daemon' restores after a restart.`,
		Annotations: map[string]string{annotationStore: "yes"},
	}
	c.PersistentFlags().Uint32Var(&ipcacheMax, "ipcache-max", loader.DefaultIPCacheMax,
		"ipcache size per family (prefixes) if the maps are created now; must match attach's")
	// open opens the store and the maps; revoke, when asked for, cuts the
	// tracked flows the changed policy denies.
	open := func(c *cobra.Command) (policy.Policy, func(), func() error, error) {
		if err := a.preamble(nil); err != nil {
			return policy.Policy{}, nil, nil, err
		}
		// The store first: a command that cannot record its change must
		// not create maps either.
		st, err := a.openStore()
		if err != nil {
			return policy.Policy{}, nil, nil, err
		}
		maps, err := a.openMaps(c, ipcacheMax)
		if err != nil {
			return policy.Policy{}, nil, nil, err
		}
		revoke := func() error {
			if !revokeFlag {
				return nil
			}
			res, err := revokeFlows(maps, conntrack.Filter{})
			if err != nil {
				return fmt.Errorf("the policy changed, but revoking the flows it denies failed (run 'ctd ct revoke'): %w", err)
			}
			return writeRevoked(c.OutOrStdout(), res, "text")
		}
		p := policy.Policy{Map: policymap.New(maps.Policy(), maps.Config()), Store: st, Finish: finisher(maps)}
		return p, func() { maps.Close() }, revoke, nil
	}
	addRevokeFlag := func(c *cobra.Command) *cobra.Command {
		c.Flags().BoolVar(&revokeFlag, "revoke", false,
			"also cut the tracked flows the changed policy denies, as 'ctd ct revoke' does")
		return c
	}

	c.AddCommand(addRevokeFlag(&cobra.Command{
		Use:   "default ingress|egress allow|deny [--revoke]",
		Short: "Set the verdict for new flows no rule matches",
		Args:  exactArgs(2, "ctd policy default ingress|egress allow|deny [--revoke]"),
		RunE: func(c *cobra.Command, args []string) error {
			d, err := policy.ParseDirection(args[0])
			if err != nil {
				return err
			}
			v, err := policy.ParseVerdict(args[1])
			if err != nil {
				return err
			}
			if a.clusterMode() {
				if revokeFlag {
					return errClusterRevoke
				}
				return a.clusterPolicyDefault(c, d, v)
			}
			p, done, revoke, err := open(c)
			if err != nil {
				return err
			}
			defer done()
			prev, err := p.SetDefault(d, v)
			if err != nil {
				return fmt.Errorf("policy default %v %v: %w", d, v, err)
			}
			fmt.Fprintf(c.OutOrStdout(), "default %v %v (was %s)\n", d, v, defaultString(prev))
			return revoke()
		},
	}))

	c.AddCommand(&cobra.Command{
		Use:   "add " + policy.Syntax,
		Short: "Add a rule, or change the verdict of the rule with the same selector",
		Args:  cobra.ArbitraryArgs,
		RunE: func(c *cobra.Command, args []string) error {
			r, err := policy.ParseRule(args)
			if err != nil {
				return err
			}
			if a.clusterMode() {
				return a.clusterPolicyAdd(c, r)
			}
			p, done, _, err := open(c)
			if err != nil {
				return err
			}
			defer done()
			prev, err := p.Add(r)
			if err != nil {
				return err
			}
			printPolicyAdd(c.OutOrStdout(), r, prev, "")
			return nil
		},
	})

	c.AddCommand(addRevokeFlag(&cobra.Command{
		Use:   "del ingress|egress id=N|any [PROTO[/PORT]|any[/PORT]] [allow|deny] [--revoke]",
		Short: "Delete the rule with this selector (with a verdict: only if the rule has it)",
		Args:  cobra.ArbitraryArgs,
		RunE: func(c *cobra.Command, args []string) error {
			r, err := policy.ParseSelector(args, true)
			if err != nil {
				return err
			}
			if a.clusterMode() {
				if revokeFlag {
					return errClusterRevoke
				}
				return a.clusterPolicyDel(c, r)
			}
			p, done, revoke, err := open(c)
			if err != nil {
				return err
			}
			defer done()
			old, err := p.Delete(r)
			if err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "deleted %s\n", policy.Format(old))
			return revoke()
		},
	}))

	var listOut string
	var listCluster bool
	list := &cobra.Command{
		Use:   "list [-o json]",
		Short: "Show the default verdicts and every rule",
		Args:  exactArgs(0, "ctd policy list [-o json]"),
		RunE: func(c *cobra.Command, _ []string) error {
			if listCluster {
				if err := checkOutput(listOut); err != nil {
					return err
				}
				return a.clusterPolicyList(c, listOut)
			}
			if err := a.preamble(&listOut); err != nil {
				return err
			}
			maps, err := loader.OpenPinned(a.pinPath)
			if err != nil {
				return err
			}
			defer maps.Close()
			s, err := policy.Show(policymap.New(maps.Policy(), maps.Config()))
			if err != nil {
				return err
			}
			return policyList(c.OutOrStdout(), s, listOut)
		},
	}
	list.Flags().BoolVar(&listCluster, "cluster", false, "show the cluster's policy in etcd instead of this node's maps")
	outputFlag(list, &listOut)
	c.AddCommand(list)
	return c
}

// errClusterRevoke refuses --revoke in cluster mode: the change reaches
// each node's datapath through etcd, after the command returns.
var errClusterRevoke = errors.New("--revoke is not available in cluster mode: the change reaches each node through etcd; run 'ctd ct revoke' on the nodes once it has")

// defaultString shows a default verdict; unset is the allow of a datapath
// that was never told otherwise.
// printPolicyAdd reports what an add did; where is appended (" (cluster)").
func printPolicyAdd(w io.Writer, r policymap.Rule, prev policymap.Verdict, where string) {
	switch prev {
	case policymap.VerdictUnset:
		fmt.Fprintf(w, "added %s%s\n", policy.Format(r), where)
	case r.Verdict:
		fmt.Fprintf(w, "unchanged %s%s\n", policy.Format(r), where)
	default:
		fmt.Fprintf(w, "updated %s (was %v)%s\n", policy.Format(r), prev, where)
	}
}

func defaultString(v policymap.Verdict) string {
	if v == policymap.VerdictUnset {
		return "allow, unset"
	}
	return v.String()
}

// policyJSON is 'ctd policy list -o json'.
type policyJSON struct {
	Defaults map[string]string `json:"defaults"` // "ingress"/"egress" -> "allow"/"deny"
	Rules    []policyRuleJSON  `json:"rules"`
}

type policyRuleJSON struct {
	Direction string `json:"direction"`
	Identity  uint32 `json:"identity"` // 0 = any
	Proto     string `json:"proto"`    // "any" = any protocol
	Port      uint16 `json:"port"`     // 0 = any
	Verdict   string `json:"verdict"`
	Rule      string `json:"rule"` // as 'policy add' reads it
}

func policyList(w io.Writer, s policy.State, output string) error {
	if output == "json" {
		out := policyJSON{Defaults: map[string]string{}, Rules: []policyRuleJSON{}}
		for d, v := range s.Defaults {
			out.Defaults[bpf.Direction(d).String()] = v.Effective().String()
		}
		for _, r := range s.Rules {
			out.Rules = append(out.Rules, policyRuleJSON{
				Direction: r.Dir.String(),
				Identity:  r.Identity,
				Proto:     policy.ProtoName(r.Proto),
				Port:      r.Port,
				Verdict:   r.Verdict.String(),
				Rule:      policy.Format(r),
			})
		}
		return writeJSON(w, out)
	}
	for d, v := range s.Defaults {
		if _, err := fmt.Fprintf(w, "default %v %s\n", bpf.Direction(d), defaultString(v)); err != nil {
			return err
		}
	}
	for _, r := range s.Rules {
		if _, err := fmt.Fprintln(w, policy.Format(r)); err != nil {
			return err
		}
	}
	return nil
}
