package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/cluster"
	"github.com/ctd-dev/ctd/control/identity"
	"github.com/ctd-dev/ctd/control/ipcache"
	"github.com/ctd-dev/ctd/control/kvstore"
	"github.com/ctd-dev/ctd/control/policy"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/ipcachemap"
	"github.com/ctd-dev/ctd/datapath/policymap"
)

// kvstoreFlags are the global flags that put ctd in cluster mode.
type kvstoreFlags struct {
	endpoints string
	prefix    string
	timeout   time.Duration
}

func (k *kvstoreFlags) add(fs *pflag.FlagSet) {
	fs.StringVar(&k.endpoints, "kvstore-endpoints", envOr("CTD_KVSTORE_ENDPOINTS", ""), "etcd URLs, comma-separated (env CTD_KVSTORE_ENDPOINTS): cluster mode, the cluster's state lives in etcd")
	fs.StringVar(&k.prefix, "kvstore-prefix", kvstore.DefaultPrefix, "key prefix of ctd's state in etcd (its last element is the layout version)")
	fs.DurationVar(&k.timeout, "kvstore-timeout", kvstore.DefaultTimeout, "how long a request to etcd may take")
}

// clusterMode reports whether --kvstore-endpoints is set.
func (a *app) clusterMode() bool { return a.kv.endpoints != "" }

// kvClient connects to the cluster's etcd.
func (a *app) kvClient() (*kvstore.Client, error) {
	if !a.clusterMode() {
		return nil, fmt.Errorf("not in cluster mode: set --kvstore-endpoints (or CTD_KVSTORE_ENDPOINTS) to the cluster's etcd URLs")
	}
	if a.kv.timeout <= 0 {
		return nil, fmt.Errorf("invalid --kvstore-timeout %v: must be a positive duration, e.g. 5s", a.kv.timeout)
	}
	eps, err := kvstore.ParseEndpoints(a.kv.endpoints)
	if err != nil {
		return nil, err
	}
	return kvstore.New(kvstore.Config{Endpoints: eps, Prefix: a.kv.prefix, Timeout: a.kv.timeout})
}

// withCluster runs fn with a client, for a command in cluster mode.
func (a *app) withCluster(c *cobra.Command, fn func(ctx context.Context, kv *kvstore.Client) error) error {
	kv, err := a.kvClient()
	if err != nil {
		return err
	}
	defer kv.Close()
	return fn(c.Context(), kv)
}

// clusterIPCacheAdd is 'ipcache add' in cluster mode.
func (a *app) clusterIPCacheAdd(c *cobra.Command, e ipcache.Entry) error {
	return a.withCluster(c, func(ctx context.Context, kv *kvstore.Client) error {
		prev, err := kv.IPCacheAdd(ctx, e.Prefix, e.Identity)
		if err != nil {
			return fmt.Errorf("ipcache add %v: %w (nothing was changed)", e.Prefix, err)
		}
		printIPCacheAdd(c.OutOrStdout(), e, prev, " (cluster)")
		return nil
	})
}

// clusterIPCacheDel is 'ipcache del' in cluster mode.
func (a *app) clusterIPCacheDel(c *cobra.Command, p netip.Prefix) error {
	return a.withCluster(c, func(ctx context.Context, kv *kvstore.Client) error {
		id, err := kv.IPCacheDelete(ctx, p)
		if err != nil {
			return fmt.Errorf("ipcache del %v: %w", p, err)
		}
		fmt.Fprintf(c.OutOrStdout(), "deleted %v id=%s (cluster)\n", p, idString(id))
		return nil
	})
}

// clusterIPCacheLoad is 'ipcache load' in cluster mode.
func (a *app) clusterIPCacheLoad(c *cobra.Command, name string, entries []ipcache.Entry, replace bool) error {
	m := make(map[netip.Prefix]uint32, len(entries))
	for _, e := range entries {
		if _, dup := m[e.Prefix]; dup {
			return fmt.Errorf("ipcache load %s: %v is given twice (nothing was changed)", name, e.Prefix)
		}
		m[e.Prefix] = e.Identity
	}
	return a.withCluster(c, func(ctx context.Context, kv *kvstore.Client) error {
		res, err := kv.IPCacheLoad(ctx, m, replace)
		if err != nil {
			return fmt.Errorf("ipcache load %s: %w", name, err)
		}
		fmt.Fprintf(c.OutOrStdout(), "loaded %d prefixes from %s into the cluster: %d added, %d updated, %d unchanged, %d deleted\n",
			len(entries), name, res.Added, res.Updated, res.Unchanged, res.Deleted)
		return nil
	})
}

// clusterSnapshot reads the cluster's state for the --cluster views.
func (a *app) clusterSnapshot(c *cobra.Command) (*kvstore.Snapshot, error) {
	var snap *kvstore.Snapshot
	err := a.withCluster(c, func(ctx context.Context, kv *kvstore.Client) (err error) {
		snap, err = kv.Snapshot(ctx)
		return err
	})
	return snap, err
}

func sortedEntries(m map[netip.Prefix]uint32) []ipcachemap.Entry {
	out := make([]ipcachemap.Entry, 0, len(m))
	for p, id := range m {
		out = append(out, ipcachemap.Entry{Prefix: p, Identity: id})
	}
	slices.SortFunc(out, ipcachemap.Compare)
	return out
}

// clusterIPCacheGet is 'ipcache get --cluster': the longest prefix of the
// cluster's ipcache that contains the address.
func (a *app) clusterIPCacheGet(c *cobra.Command, arg, output string) error {
	addr, err := ipcache.ParseAddr(arg)
	if err != nil {
		return err
	}
	snap, err := a.clusterSnapshot(c)
	if err != nil {
		return err
	}
	res := ipcacheGetResult{IP: addr.String(), Identity: 2}
	for bits := addr.BitLen(); bits >= 0; bits-- {
		p := netip.PrefixFrom(addr, bits).Masked()
		if id, ok := snap.Desired.IPCache[p]; ok {
			res.CIDR, res.Identity = p.String(), id
			break
		}
	}
	w := c.OutOrStdout()
	if output == "json" {
		return writeJSON(w, res)
	}
	if res.CIDR == "" {
		_, err = fmt.Fprintf(w, "%s: no matching prefix in the cluster, id=%s\n", res.IP, idString(res.Identity))
		return err
	}
	_, err = fmt.Fprintf(w, "%s: %s id=%s (cluster)\n", res.IP, res.CIDR, idString(res.Identity))
	return err
}

// clusterPolicyList is 'policy list --cluster'.
func (a *app) clusterPolicyList(c *cobra.Command, output string) error {
	snap, err := a.clusterSnapshot(c)
	if err != nil {
		return err
	}
	s := policy.State{Defaults: snap.Desired.Defaults}
	for k, v := range snap.Desired.Policy {
		s.Rules = append(s.Rules, policymap.Rule{Dir: k.Dir, Identity: k.Identity, Proto: k.Proto, Port: k.Port, Verdict: v})
	}
	slices.SortFunc(s.Rules, policymap.Compare)
	return policyList(c.OutOrStdout(), s, output)
}

func storeKey(r policymap.Rule) store.RuleKey {
	return store.RuleKey{Dir: r.Dir, Identity: r.Identity, Proto: r.Proto, Port: r.Port}
}

// clusterPolicyAdd is 'policy add' in cluster mode.
func (a *app) clusterPolicyAdd(c *cobra.Command, r policymap.Rule) error {
	return a.withCluster(c, func(ctx context.Context, kv *kvstore.Client) error {
		prev, err := kv.PolicyAdd(ctx, storeKey(r), r.Verdict)
		if err != nil {
			return fmt.Errorf("policy add %s: %w (nothing was changed)", policy.Format(r), err)
		}
		printPolicyAdd(c.OutOrStdout(), r, prev, " (cluster)")
		return nil
	})
}

// clusterPolicyDel is 'policy del' in cluster mode.
func (a *app) clusterPolicyDel(c *cobra.Command, r policymap.Rule) error {
	return a.withCluster(c, func(ctx context.Context, kv *kvstore.Client) error {
		old, err := kv.PolicyDelete(ctx, storeKey(r), r.Verdict, policy.Selector(r))
		if err != nil {
			return fmt.Errorf("policy del: %w", err)
		}
		r.Verdict = old
		fmt.Fprintf(c.OutOrStdout(), "deleted %s (cluster)\n", policy.Format(r))
		return nil
	})
}

// clusterPolicyDefault is 'policy default' in cluster mode.
func (a *app) clusterPolicyDefault(c *cobra.Command, d bpf.Direction, v policymap.Verdict) error {
	return a.withCluster(c, func(ctx context.Context, kv *kvstore.Client) error {
		prev, err := kv.PolicyDefault(ctx, d, v)
		if err != nil {
			return fmt.Errorf("policy default %v %v: %w (nothing was changed)", d, v, err)
		}
		fmt.Fprintf(c.OutOrStdout(), "default %v %v (was %s) (cluster)\n", d, v, defaultString(prev))
		return nil
	})
}

func newClusterCmd(a *app) *cobra.Command {
	c := &cobra.Command{
		Use:   "cluster",
		Short: "This node's view of the cluster (cluster mode, see --kvstore-endpoints)",
	}
	var out string
	status := &cobra.Command{
		Use:   "status [-o json]",
		Short: "Whether this node's daemon reaches etcd and has synced the cluster's state",
		Long: `Print what the daemon of this --state-dir reports: node, connected (etcd
answers), synced (the first full sync since start is done and the watch is
live), revision (the etcd revision the node's state matches),
ipcache_entries and policy_rules (what the node enforces from the
cluster), lease_ttl_s, plus lease_id, endpoints (this node's, published)
and conflicts (addresses another node publishes too). When no daemon runs,
connected and synced are false.`,
		Args: exactArgs(0, "ctd cluster status [-o json]"),
		RunE: func(c *cobra.Command, _ []string) error {
			if err := checkOutput(out); err != nil {
				return err
			}
			st, live, err := cluster.ReadStatus(a.stateDir)
			if err != nil {
				return err
			}
			if out == "json" {
				return writeJSON(c.OutOrStdout(), st)
			}
			w := c.OutOrStdout()
			fmt.Fprintf(w, "node:            %s\n", st.Node)
			if !live {
				fmt.Fprintf(w, "daemon:          not running (last report %s)\n", st.Updated.Format(time.RFC3339))
			}
			fmt.Fprintf(w, "connected:       %v\n", st.Connected)
			fmt.Fprintf(w, "synced:          %v\n", st.Synced)
			fmt.Fprintf(w, "revision:        %d\n", st.Revision)
			fmt.Fprintf(w, "ipcache entries: %d\n", st.IPCacheEntries)
			fmt.Fprintf(w, "policy rules:    %d\n", st.PolicyRules)
			fmt.Fprintf(w, "lease:           %s (ttl %ds)\n", st.LeaseID, st.LeaseTTL)
			fmt.Fprintf(w, "endpoints:       %d\n", st.Endpoints)
			if len(st.Conflicts) > 0 {
				fmt.Fprintf(w, "conflicts:       %v\n", st.Conflicts)
			}
			return nil
		},
	}
	outputFlag(status, &out)
	c.AddCommand(status)
	return c
}

func newEndpointCmd(a *app) *cobra.Command {
	c := &cobra.Command{
		Use:   "endpoint",
		Short: "Addresses that live on this node, published to the cluster by the daemon",
		Long: `An endpoint is an address that lives on this node, with its identity. The
daemon (cluster mode) publishes it under <prefix>/endpoints/<node>/<ip>,
bound to the node's lease, and every node's ipcache maps it. When the node
is gone longer than the lease TTL, its endpoints leave every ipcache.`,
	}
	c.AddCommand(&cobra.Command{
		Use:   "add IP id=N",
		Short: "Add an endpoint of this node, or change its identity",
		Args:  exactArgs(2, "ctd endpoint add IP id=N"),
		RunE: func(c *cobra.Command, args []string) error {
			e, err := ipcache.ParseEntry(args)
			if err != nil {
				return err
			}
			if !e.Prefix.IsSingleIP() {
				return fmt.Errorf("invalid endpoint %v: an endpoint is one address, e.g. 198.51.100.7", e.Prefix)
			}
			verb := "added"
			err = cluster.ChangeEndpoints(a.stateDir, func(eps []cluster.LocalEndpoint) ([]cluster.LocalEndpoint, error) {
				if i := slices.IndexFunc(eps, func(l cluster.LocalEndpoint) bool { return l.IP == e.Prefix.Addr() }); i >= 0 {
					verb = "updated"
					eps[i].Identity = e.Identity
					return eps, nil
				}
				return append(eps, cluster.LocalEndpoint{IP: e.Prefix.Addr(), Identity: e.Identity}), nil
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "%s endpoint %v id=%s\n", verb, e.Prefix.Addr(), idString(e.Identity))
			return nil
		},
	})
	c.AddCommand(&cobra.Command{
		Use:   "del IP",
		Short: "Remove an endpoint of this node",
		Args:  exactArgs(1, "ctd endpoint del IP"),
		RunE: func(c *cobra.Command, args []string) error {
			ip, err := ipcache.ParseAddr(args[0])
			if err != nil {
				return err
			}
			err = cluster.ChangeEndpoints(a.stateDir, func(eps []cluster.LocalEndpoint) ([]cluster.LocalEndpoint, error) {
				i := slices.IndexFunc(eps, func(l cluster.LocalEndpoint) bool { return l.IP == ip })
				if i < 0 {
					return nil, fmt.Errorf("%v is not an endpoint of this node (see 'ctd endpoint list')", ip)
				}
				return slices.Delete(eps, i, i+1), nil
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "deleted endpoint %v\n", ip)
			return nil
		},
	})
	var out string
	var all bool
	list := &cobra.Command{
		Use:   "list [--cluster] [-o json]",
		Short: "List this node's endpoints (with --cluster: every node's, from etcd)",
		Args:  exactArgs(0, "ctd endpoint list [--cluster] [-o json]"),
		RunE: func(c *cobra.Command, _ []string) error {
			if err := checkOutput(out); err != nil {
				return err
			}
			type row struct {
				Node     string `json:"node,omitempty"`
				IP       string `json:"ip"`
				Identity uint32 `json:"identity"`
				Winner   *bool  `json:"winner,omitempty"`
			}
			rows := []row{}
			if all {
				snap, err := a.clusterSnapshot(c)
				if err != nil {
					return err
				}
				for _, e := range snap.Endpoints {
					win := true
					for _, cf := range snap.Conflicts {
						if cf.IP == e.IP && cf.Winner.Node != e.Node {
							win = false
						}
					}
					rows = append(rows, row{Node: e.Node, IP: e.IP.String(), Identity: e.Identity, Winner: &win})
				}
			} else {
				eps, err := cluster.ReadEndpoints(a.stateDir)
				if err != nil {
					return err
				}
				for _, e := range eps {
					rows = append(rows, row{IP: e.IP.String(), Identity: e.Identity})
				}
			}
			w := c.OutOrStdout()
			if out == "json" {
				return writeJSON(w, rows)
			}
			for _, r := range rows {
				line := fmt.Sprintf("%s id=%s", r.IP, idString(r.Identity))
				if r.Node != "" {
					line += " node=" + r.Node
					if !*r.Winner {
						line += " (conflict: another node published it first)"
					}
				}
				fmt.Fprintln(w, line)
			}
			return nil
		},
	}
	list.Flags().BoolVar(&all, "cluster", false, "list every node's endpoints from etcd")
	outputFlag(list, &out)
	c.AddCommand(list)
	return c
}

func newIdentityCmd(a *app) *cobra.Command {
	c := &cobra.Command{
		Use:   "identity",
		Short: "Cluster-wide identities for label sets (cluster mode)",
		Long: `An identity is a number for a set of k=v labels, the same on every node:
it is allocated once for the cluster, in an etcd transaction that creates
it only if no node did first. Numbers start at 256; 1 (host) and 2 (world)
are reserved.`,
	}
	print := func(w io.Writer, ids []identity.Identity, out string, one bool) error {
		if out == "json" {
			if one {
				return writeJSON(w, ids[0])
			}
			if ids == nil {
				ids = []identity.Identity{}
			}
			return writeJSON(w, ids)
		}
		for _, id := range ids {
			if _, err := fmt.Fprintf(w, "%d %s\n", id.ID, id.Labels); err != nil {
				return err
			}
		}
		return nil
	}
	var allocOut string
	alloc := &cobra.Command{
		Use:   "allocate k=v[,k=v...] [-o json]",
		Short: "The identity of a label set, allocated for the cluster if new",
		Args:  exactArgs(1, "ctd identity allocate k=v[,k=v...] [-o json]"),
		RunE: func(c *cobra.Command, args []string) error {
			if err := checkOutput(allocOut); err != nil {
				return err
			}
			labels, err := identity.ParseLabels(args[0])
			if err != nil {
				return err
			}
			return a.withCluster(c, func(ctx context.Context, kv *kvstore.Client) error {
				id, err := identity.Allocator{Client: kv}.Allocate(ctx, labels)
				if err != nil {
					return fmt.Errorf("identity allocate %s: %w", labels, err)
				}
				return print(c.OutOrStdout(), []identity.Identity{id}, allocOut, true)
			})
		},
	}
	outputFlag(alloc, &allocOut)
	var listOut string
	list := &cobra.Command{
		Use:   "list [-o json]",
		Short: "Every allocated identity",
		Args:  exactArgs(0, "ctd identity list [-o json]"),
		RunE: func(c *cobra.Command, _ []string) error {
			if err := checkOutput(listOut); err != nil {
				return err
			}
			return a.withCluster(c, func(ctx context.Context, kv *kvstore.Client) error {
				ids, err := identity.Allocator{Client: kv}.List(ctx)
				if err != nil {
					return fmt.Errorf("identity list: %w", err)
				}
				return print(c.OutOrStdout(), ids, listOut, false)
			})
		},
	}
	outputFlag(list, &listOut)
	var getOut string
	get := &cobra.Command{
		Use:   "get N [-o json]",
		Short: "The labels of identity N",
		Args:  exactArgs(1, "ctd identity get N [-o json]"),
		RunE: func(c *cobra.Command, args []string) error {
			if err := checkOutput(getOut); err != nil {
				return err
			}
			n, err := ipcache.ParseIdentity(args[0])
			if err != nil {
				return err
			}
			return a.withCluster(c, func(ctx context.Context, kv *kvstore.Client) error {
				id, err := identity.Allocator{Client: kv}.Get(ctx, n)
				if err != nil {
					return err
				}
				return print(c.OutOrStdout(), []identity.Identity{id}, getOut, true)
			})
		},
	}
	outputFlag(get, &getOut)
	c.AddCommand(alloc, list, get)
	return c
}

// clusterNode are the daemon's flags for cluster mode.
type clusterNode struct {
	name     string
	leaseTTL time.Duration
}

func (n *clusterNode) add(fs *pflag.FlagSet) {
	host, _ := os.Hostname()
	fs.StringVar(&n.name, "node-name", host, "this node's name in the cluster (cluster mode; default: the host name)")
	fs.DurationVar(&n.leaseTTL, "kvstore-lease-ttl", cluster.DefaultLeaseTTL, "how long this node's endpoints outlive it when it is gone (cluster mode; whole seconds)")
}

// clusterAgent is the daemon's cluster component, and what closes its client.
func (a *app) clusterAgent(n clusterNode, log *slog.Logger) (*cluster.Agent, func(), error) {
	kv, err := a.kvClient()
	if err != nil {
		return nil, nil, err
	}
	agent, err := cluster.New(cluster.Config{Client: kv, Node: n.name, StateDir: a.stateDir, LeaseTTL: n.leaseTTL, Logger: log})
	if err != nil {
		kv.Close()
		return nil, nil, err
	}
	return agent, func() { kv.Close() }, nil
}
