package main

import (
	"fmt"
	"io"
	"os"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/ipcache"
	"github.com/ctd-dev/ctd/datapath/ipcachemap"
	"github.com/ctd-dev/ctd/datapath/loader"
)

func newIPCacheCmd(a *app) *cobra.Command {
	var ipcacheMax uint32
	c := &cobra.Command{
		Use:   "ipcache",
		Short: "Map CIDRs to security identities (the ipcache the datapath resolves addresses with)",
		Long: `The ipcache maps CIDRs to 32-bit security identities, one LPM trie per
family: the most specific prefix that contains an address decides its
identity, and an address no prefix contains is the reserved identity world
(2). host (1) is the other reserved name; 0 is never a valid identity.

CIDRs are written as 10.0.0.0/8 or fd00::/8; a bare address means /32 or
/128. A CIDR with host bits set (10.0.0.1/8) is rejected, not cleared.

Changes go to the pinned maps and to the desired-state store (--state-dir),
which 'ctd daemon' restores after a restart. The maps are created (and
pinned) when missing, so the ipcache can be filled before 'ctd attach'.`,
		Annotations: map[string]string{annotationStore: "yes"},
	}
	c.PersistentFlags().Uint32Var(&ipcacheMax, "ipcache-max", loader.DefaultIPCacheMax,
		"ipcache size per family (prefixes) if the maps are created now; must match attach's")
	table := func(c *cobra.Command) (ipcache.Table, func(), error) {
		if err := a.preamble(nil); err != nil {
			return ipcache.Table{}, nil, err
		}
		// The store first: a command that cannot record its change must
		// not create maps either.
		st, err := a.openStore()
		if err != nil {
			return ipcache.Table{}, nil, err
		}
		maps, err := a.openMaps(c, ipcacheMax)
		if err != nil {
			return ipcache.Table{}, nil, err
		}
		t := ipcache.Table{Map: maps.IPCache(), Store: st, Finish: finisher(maps)}
		return t, func() { maps.Close() }, nil
	}

	c.AddCommand(&cobra.Command{
		Use:   "add CIDR id=N",
		Short: "Add a prefix, or change its identity (N: 1-4294967295, world or host)",
		Args:  cobra.ArbitraryArgs,
		RunE: func(c *cobra.Command, args []string) error {
			e, err := ipcache.ParseEntry(args)
			if err != nil {
				return err
			}
			if a.clusterMode() {
				return a.clusterIPCacheAdd(c, e)
			}
			t, done, err := table(c)
			if err != nil {
				return err
			}
			defer done()
			prev, err := t.Add(e)
			if err != nil {
				return fmt.Errorf("ipcache add %v: %w", e.Prefix, err)
			}
			printIPCacheAdd(c.OutOrStdout(), e, prev, "")
			return nil
		},
	})

	c.AddCommand(&cobra.Command{
		Use:   "del CIDR",
		Short: "Delete exactly one prefix (not the prefixes it contains)",
		Args:  exactArgs(1, "ctd ipcache del CIDR"),
		RunE: func(c *cobra.Command, args []string) error {
			p, err := ipcache.ParsePrefix(args[0])
			if err != nil {
				return err
			}
			if a.clusterMode() {
				return a.clusterIPCacheDel(c, p)
			}
			t, done, err := table(c)
			if err != nil {
				return err
			}
			defer done()
			id, err := t.Delete(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "deleted %v id=%s\n", p, idString(id))
			return nil
		},
	})

	var getOut string
	var getCluster bool
	get := &cobra.Command{
		Use:   "get IP [-o json]",
		Short: "Resolve an address as the datapath does: the matching prefix and its identity, or world",
		Long: `Resolve an address as the datapath does: the identity is the kernel's own
longest-prefix-match answer, shown with the prefix that matched. When no
prefix contains the address, it is the world (identity 2) and the CIDR is
empty (JSON "cidr": "").`,
		Args: exactArgs(1, "ctd ipcache get IP [-o json]"),
		RunE: func(c *cobra.Command, args []string) error {
			if err := a.preamble(&getOut); err != nil {
				return err
			}
			if getCluster {
				return a.clusterIPCacheGet(c, args[0], getOut)
			}
			m, done, err := a.openPinnedIPCache()
			if err != nil {
				return err
			}
			defer done()
			return ipcacheGet(c.OutOrStdout(), m, args[0], getOut)
		},
	}
	get.Flags().BoolVar(&getCluster, "cluster", false, "resolve in the cluster's ipcache in etcd instead of this node's maps")
	outputFlag(get, &getOut)
	c.AddCommand(get)

	var listOut string
	var listCluster bool
	list := &cobra.Command{
		Use:   "list [-o json]",
		Short: "List every prefix and its identity (the text form is a file 'ipcache load' reads)",
		Args:  exactArgs(0, "ctd ipcache list [-o json]"),
		RunE: func(c *cobra.Command, _ []string) error {
			if err := a.preamble(&listOut); err != nil {
				return err
			}
			if listCluster {
				snap, err := a.clusterSnapshot(c)
				if err != nil {
					return err
				}
				return writeIPCache(c.OutOrStdout(), sortedEntries(snap.Desired.IPCache), listOut)
			}
			m, done, err := a.openPinnedIPCache()
			if err != nil {
				return err
			}
			defer done()
			return ipcacheList(c.OutOrStdout(), m, listOut)
		},
	}
	list.Flags().BoolVar(&listCluster, "cluster", false, "list the cluster's ipcache in etcd (endpoints included) instead of this node's maps")
	outputFlag(list, &listOut)
	c.AddCommand(list)

	var replace bool
	load := &cobra.Command{
		Use:   "load FILE|- [--replace]",
		Short: "Load 'CIDR id=N' lines (# comments) from a file or stdin, all or nothing",
		Long: `Load 'CIDR id=N' lines from FILE, or from stdin with '-'. Blank lines and
everything after '#' are ignored. The whole file is validated before
anything is applied: a bad line is named by its number and nothing changes.
The entries are written with batch operations.

With --replace the ipcache becomes exactly the file: new and changed
prefixes are written first, then the prefixes the file does not have are
deleted, so a prefix in both the old table and the file is never missing.`,
		Args: exactArgs(1, "ctd ipcache load FILE|- [--replace]"),
		RunE: func(c *cobra.Command, args []string) error {
			if os.Getenv("GOMEMLIMIT") == "" {
				// A big load is mostly short-lived garbage (lines,
				// batches): collect it before the heap doubles.
				debug.SetMemoryLimit(loadMemoryLimit)
			}
			name, r := args[0], io.Reader(c.InOrStdin())
			if name == "-" {
				name = "stdin"
			} else {
				f, err := os.Open(name)
				if err != nil {
					return fmt.Errorf("ipcache load: %w", err)
				}
				defer f.Close()
				r = f
			}
			entries, err := ipcache.Parse(r)
			if err != nil {
				return fmt.Errorf("ipcache load %s: %w (nothing was changed)", name, err)
			}
			if a.clusterMode() {
				return a.clusterIPCacheLoad(c, name, entries, replace)
			}
			t, done, err := table(c)
			if err != nil {
				return err
			}
			defer done()
			res, err := t.Apply(entries, ipcache.Options{Replace: replace})
			if err != nil {
				return fmt.Errorf("ipcache load %s: %w", name, err)
			}
			fmt.Fprintf(c.OutOrStdout(), "loaded %d prefixes from %s: %d added, %d updated, %d unchanged, %d deleted\n",
				len(entries), name, res.Added, res.Updated, res.Unchanged, res.Deleted)
			return nil
		},
	}
	load.Flags().BoolVar(&replace, "replace", false, "make the ipcache equal to the file: delete the prefixes it does not have")
	c.AddCommand(load)
	return c
}

// loadMemoryLimit is the Go GC's soft memory limit for 'ipcache load'
// (unless GOMEMLIMIT sets one): 500k lines need about 60 MiB live.
const loadMemoryLimit = 80 << 20

// exactArgs is cobra.ExactArgs with a usage line in its one-line error.
func exactArgs(n int, usage string) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) != n {
			return fmt.Errorf("%s: want %d argument(s), got %d: usage: %s", c.CommandPath(), n, len(args), usage)
		}
		return nil
	}
}

// printIPCacheAdd reports what an add did; where is appended (" (cluster)").
func printIPCacheAdd(w io.Writer, e ipcache.Entry, prev uint32, where string) {
	switch prev {
	case 0:
		fmt.Fprintf(w, "added %v id=%s%s\n", e.Prefix, idString(e.Identity), where)
	case e.Identity:
		fmt.Fprintf(w, "unchanged %v id=%s%s\n", e.Prefix, idString(e.Identity), where)
	default:
		fmt.Fprintf(w, "updated %v id=%s (was id=%d)%s\n", e.Prefix, idString(e.Identity), prev, where)
	}
}

// idString formats an identity with its reserved name, if any: "2 (world)".
func idString(id uint32) string {
	if name := ipcache.IdentityName(id); name != "" {
		return fmt.Sprintf("%d (%s)", id, name)
	}
	return fmt.Sprint(id)
}

// ipcacheGetResult is one line of 'ctd ipcache get -o json'.
type ipcacheGetResult struct {
	IP       string `json:"ip"`
	CIDR     string `json:"cidr"` // "" when no prefix matched (world)
	Identity uint32 `json:"identity"`
}

// ipcacheGet resolves arg and prints the answer in the output format.
func ipcacheGet(w io.Writer, m *ipcachemap.Map, arg, output string) error {
	addr, err := ipcache.ParseAddr(arg)
	if err != nil {
		return err
	}
	e, found, err := m.Lookup(addr)
	if err != nil {
		return fmt.Errorf("ipcache get %v: %w", addr, err)
	}
	res := ipcacheGetResult{IP: addr.String(), Identity: e.Identity}
	if found {
		res.CIDR = e.Prefix.String()
	}
	if output == "json" {
		return writeJSON(w, res)
	}
	if !found {
		_, err = fmt.Fprintf(w, "%s: no matching prefix, id=%s\n", res.IP, idString(res.Identity))
		return err
	}
	_, err = fmt.Fprintf(w, "%s: %s id=%s\n", res.IP, res.CIDR, idString(res.Identity))
	return err
}

// ipcacheListEntry is one object of 'ctd ipcache list -o json'.
type ipcacheListEntry struct {
	CIDR     string `json:"cidr"`
	Identity uint32 `json:"identity"`
}

func ipcacheList(w io.Writer, m *ipcachemap.Map, output string) error {
	entries, err := m.List()
	if err != nil {
		return err
	}
	return writeIPCache(w, entries, output)
}

func writeIPCache(w io.Writer, entries []ipcache.Entry, output string) error {
	if output == "json" {
		out := make([]ipcacheListEntry, 0, len(entries))
		for _, e := range entries {
			out = append(out, ipcacheListEntry{CIDR: e.Prefix.String(), Identity: e.Identity})
		}
		return writeJSON(w, out)
	}
	for _, e := range entries {
		if _, err := fmt.Fprintf(w, "%v id=%d\n", e.Prefix, e.Identity); err != nil {
			return err
		}
	}
	return nil
}

// openMaps opens ctd's pinned maps for a command that changes the ipcache
// or the policy. Where the datapath is fully pinned, its maps are used
// whatever their size (a differing explicit --ipcache-max is an error);
// otherwise the missing maps are created and pinned, the ipcache tries
// with --ipcache-max prefixes per family.
func (a *app) openMaps(c *cobra.Command, ipcacheMax uint32) (*loader.Maps, error) {
	if !a.fullyPinned() {
		o := loader.Options{PinPath: a.pinPath, IPCacheMax: ipcacheMax}.WithDefaults()
		if err := o.Validate(); err != nil {
			return nil, err
		}
		a.noteSetup()
		return loader.OpenMaps(o)
	}
	maps, err := loader.OpenPinned(a.pinPath)
	if err != nil {
		return nil, err
	}
	if f := c.Flag("ipcache-max"); f != nil && f.Changed {
		if have := maps.IPCache4().MaxEntries(); have != ipcacheMax {
			maps.Close()
			return nil, fmt.Errorf("invalid --ipcache-max %d: the pinned ipcache at %s holds %d prefixes per family (drop the flag, or resize with 'ctd daemon --ipcache-max')", ipcacheMax, a.pinPath, have)
		}
	}
	return maps, nil
}

// fullyPinned reports whether every map of the datapath is pinned.
func (a *app) fullyPinned() bool {
	for _, name := range loader.MapNames {
		if !a.pins().Pinned(name) {
			return false
		}
	}
	return true
}

// openPinnedIPCache opens the pinned ipcache tries for reading; it never
// creates anything.
func (a *app) openPinnedIPCache() (*ipcachemap.Map, func(), error) {
	maps, err := loader.OpenPinned(a.pinPath)
	if err != nil {
		return nil, nil, err
	}
	return maps.IPCache(), func() { maps.Close() }, nil
}
