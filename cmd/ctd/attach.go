package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/migrate"
)

func newAttachCmd(a *app) *cobra.Command {
	var (
		iface string
		mode  string
		opts  loader.Options
	)
	c := &cobra.Command{
		Use:   "attach --iface NAME [--mode auto|tcx|tc]",
		Short: "Load the datapath (reusing pinned maps) and attach it to an interface's ingress and egress",
		Long: `Load ctd's TC programs against the maps pinned at --pin-path (creating
and pinning any that are missing) and attach them to the interface's ingress
and egress hooks. TCX links are pinned below <pin-path>/links, so the datapath
keeps running without a ctd process. Attaching again replaces the programs
atomically; it never attaches twice.

A map pinned in an older layout (conntrack layout v1: ct_v1) or in another
size than a size flag asks for is migrated live, as 'ctd daemon' does: the
programs on every interface where ctd is attached are switched to the new
maps, every entry kept. Without a size flag a map keeps its pinned size.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			m, err := attach.ParseMode(mode)
			if err != nil {
				return err
			}
			if err := checkSizeFlags(c, opts.RingBufSize); err != nil {
				return err
			}
			if err := a.preamble(nil); err != nil {
				return err
			}
			opts.PinPath = a.pinPath
			if _, err := lookupIface(iface); err != nil {
				return err
			}
			if opts, err = migrate.PinnedSizes(opts); err != nil {
				return err
			}
			if err := opts.Validate(); err != nil {
				return err
			}
			at, err := a.pins().LoadAndAttach(iface, m, opts, func(o loader.Options) (*loader.Datapath, error) {
				dp, _, err := migrate.Load(o, migrate.Interfaces{})
				return dp, err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "attached ctd to %s (%s): ingress prog %d, egress prog %d\n",
				at.Iface, at.Mode, at.IngressProgID, at.EgressProgID)
			return nil
		},
	}
	c.Flags().StringVar(&iface, "iface", "", "interface to attach to (required)")
	c.Flags().StringVar(&mode, "mode", string(attach.ModeAuto), "attach mode: auto (tcx where the kernel has it, else tc), tcx, or tc (clsact + cls_bpf)")
	c.Flags().Uint32Var(&opts.CTMax, "ct-max", 0, fmt.Sprintf("conntrack table size for confirmed flows, per family (entries); default: the pinned size, else %d", loader.DefaultCTMax))
	c.Flags().Uint32Var(&opts.CTUnconfirmedMax, "ct-unconfirmed-max", 0,
		fmt.Sprintf("conntrack table size for flows not yet confirmed, per family (entries): a flood of new flows evicts only these; default: the pinned size, else %d", loader.DefaultCTUnconfirmedMax))
	c.Flags().Uint32Var(&opts.IPCacheMax, "ipcache-max", 0, fmt.Sprintf("ipcache size per family (prefixes); default: the pinned size, else %d", loader.DefaultIPCacheMax))
	c.Flags().Uint32Var(&opts.RingBufSize, "ringbuf-size", 0, fmt.Sprintf("event ring buffer size in bytes (a power of two); default: the pinned size, else %d", loader.DefaultRingBufSize))
	_ = c.MarkFlagRequired("iface")
	_ = c.RegisterFlagCompletionFunc("iface", completeIfaces)
	_ = c.RegisterFlagCompletionFunc("mode", cobra.FixedCompletions(
		[]string{string(attach.ModeAuto), string(attach.ModeTCX), string(attach.ModeTC)}, cobra.ShellCompDirectiveNoFileComp))
	return c
}
