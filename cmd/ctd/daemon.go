package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/control/daemon"
	"github.com/ctd-dev/ctd/control/gc"
	"github.com/ctd-dev/ctd/control/mapinfo"
	"github.com/ctd-dev/ctd/control/metrics"
	"github.com/ctd-dev/ctd/control/policy"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
)

func newDaemonCmd(a *app) *cobra.Command {
	var (
		ifaces      []string
		mode        string
		metricsAddr string
		logFormat   string
		defaults    [2]string
		cfg         daemon.Config
		lifetimes   = gc.DefaultLifetimes()
		node        clusterNode
	)
	c := &cobra.Command{
		Use:   "daemon --iface NAME [--iface NAME...] [--mode auto|tcx|tc] [--ct-max N] [--ct-unconfirmed-max N] [--metrics-addr ADDR]",
		Short: "Run ctd's agent: adopt the pinned datapath, restore the desired state, attach, and keep it reconciled",
		Long: `Run ctd's long-lived agent. On start it reopens the maps pinned at
--pin-path (creating them when missing), restores the desired state kept in
--state-dir into them (ipcache, policy rules, default verdicts) and removes
what the store does not hold, always inserting before deleting; then it
replaces the programs on every interface atomically with the ones built into
this binary and logs a "ready" line. Interfaces given with --iface are
recorded in the store; interfaces recorded earlier are attached as well.

While it runs it reconciles the maps whenever the store changes (CLI
commands write the store and the maps together). On SIGTERM or SIGINT it
exits 0 and leaves the programs attached and the maps pinned; after a crash
or SIGKILL the next start recovers the same way. It never detaches.

Map sizes default to the size of the pinned map (or the built-in default
when nothing is pinned); a different --ct-max, --ct-unconfirmed-max or
--ipcache-max resizes.

With --kvstore-endpoints (cluster mode) it also applies the cluster's
ipcache, policy and endpoints from etcd to this node's store and maps, and
publishes this node's endpoints ('ctd endpoint') as --node-name under a
lease of --kvstore-lease-ttl; see 'ctd cluster status'.`,
		Args:        cobra.NoArgs,
		Annotations: map[string]string{annotationNoFinish: "yes"},
		RunE: func(c *cobra.Command, _ []string) error {
			if err := a.preamble(nil); err != nil {
				return err
			}
			m, err := attach.ParseMode(mode)
			if err != nil {
				return err
			}
			if err := checkSizeFlags(c, cfg.RingBufSize); err != nil {
				return err
			}
			if err := lifetimes.Validate(); err != nil {
				return err
			}
			for d, v := range defaults {
				if v == "" {
					continue
				}
				verdict, err := policy.ParseVerdict(v)
				if err != nil {
					return fmt.Errorf("invalid --default-%s %q: valid are allow, deny", bpf.Direction(d), v)
				}
				cfg.Defaults[d] = verdict
			}
			if cfg.PollInterval <= 0 {
				return fmt.Errorf("invalid --poll-interval %v: must be a positive duration, e.g. 1s", cfg.PollInterval)
			}
			for _, iface := range ifaces {
				if _, err := lookupIface(iface); err != nil {
					return err
				}
			}
			var handler slog.Handler
			switch logFormat {
			case "text":
				handler = slog.NewTextHandler(c.ErrOrStderr(), nil)
			case "json":
				handler = slog.NewJSONHandler(c.ErrOrStderr(), nil)
			default:
				return fmt.Errorf("invalid --log-format %q: valid formats are text, json", logFormat)
			}
			log := slog.New(handler)

			cfg.Interfaces, cfg.Mode = ifaces, m
			cfg.PinPath, cfg.StateDir = a.pinPath, a.stateDir
			cfg.Logger = log
			cfg.Spec = datapathSpec
			if len(ifaces) == 0 {
				if err := a.requireStoredIfaces(); err != nil {
					return err
				}
			}
			// Bind before starting, so that a bad or busy address fails
			// before anything changes.
			var metricsLn net.Listener
			if metricsAddr != "" {
				if metricsLn, err = net.Listen("tcp", metricsAddr); err != nil {
					return fmt.Errorf("invalid --metrics-addr %q: %w", metricsAddr, err)
				}
				defer metricsLn.Close()
				if w := exposedWarning(metricsLn.Addr()); w != "" {
					log.Warn(w, "addr", metricsLn.Addr().String())
				}
			}
			cfg.Components = daemonComponents(lifetimes, metricsLn)
			var early func(context.Context)
			if a.clusterMode() {
				agent, closeKV, err := a.clusterAgent(node, log)
				if err != nil {
					return err
				}
				defer closeKV()
				cfg.Components = append(cfg.Components, agent.Component())
				early = agent.Publish
			}
			return runDaemon(c, cfg, log, early)
		},
	}
	c.Flags().StringArrayVar(&ifaces, "iface", nil, "interface to attach to (repeatable; default: the interfaces recorded in the state store)")
	c.Flags().StringVar(&mode, "mode", string(attach.ModeAuto), "attach mode for --iface: auto (tcx where the kernel has it, else tc), tcx, or tc")
	c.Flags().Uint32Var(&cfg.CTMax, "ct-max", 0, fmt.Sprintf("conntrack table size for confirmed flows, per family (entries); default: the pinned table's size, else %d", loader.DefaultCTMax))
	c.Flags().Uint32Var(&cfg.CTUnconfirmedMax, "ct-unconfirmed-max", 0, fmt.Sprintf("conntrack table size for flows not yet confirmed, per family (entries); default: the pinned table's size, else %d", loader.DefaultCTUnconfirmedMax))
	c.Flags().Uint32Var(&cfg.IPCacheMax, "ipcache-max", 0, fmt.Sprintf("ipcache size per family, for host entries (/32, /128) and for CIDRs each (prefixes); default: the pinned size, else %d", loader.DefaultIPCacheMax))
	c.Flags().Uint32Var(&cfg.RingBufSize, "ringbuf-size", 0, fmt.Sprintf("event ring buffer size in bytes, a power of two; default: the pinned size, else %d", loader.DefaultRingBufSize))
	c.Flags().StringVar(&metricsAddr, "metrics-addr", "", "serve Prometheus metrics on this address, e.g. 127.0.0.1:9478 (off unless set; a non-loopback address logs a warning)")
	c.Flags().DurationVar(&cfg.PollInterval, "poll-interval", daemon.DefaultPollInterval, "how often to check the state store for changes")
	c.Flags().StringVar(&logFormat, "log-format", "text", "log format on stderr: text or json")
	c.Flags().StringVar(&defaults[bpf.Ingress], "default-ingress", "", "default verdict for new ingress flows, allow or deny, recorded where the state store holds none (a new install): bootstrap closed with deny")
	c.Flags().StringVar(&defaults[bpf.Egress], "default-egress", "", "default verdict for new egress flows, allow or deny, recorded where the state store holds none")
	lifetimes.AddFlags(c.Flags())
	node.add(c.Flags())
	_ = c.RegisterFlagCompletionFunc("iface", completeIfaces)
	_ = c.RegisterFlagCompletionFunc("mode", cobra.FixedCompletions(
		[]string{string(attach.ModeAuto), string(attach.ModeTCX), string(attach.ModeTC)}, cobra.ShellCompDirectiveNoFileComp))
	_ = c.RegisterFlagCompletionFunc("log-format", cobra.FixedCompletions([]string{"text", "json"}, cobra.ShellCompDirectiveNoFileComp))
	return c
}

// requireStoredIfaces fails when no --iface is given and the store records
// no interface either: the daemon would protect nothing.
func (a *app) requireStoredIfaces() error {
	path := filepath.Join(a.stateDir, store.FileName)
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("missing --iface: there is no state store at %s to take the interfaces from; name one, e.g. --iface eth0", path)
	}
	s, err := a.openStore()
	if err != nil {
		return err
	}
	st, err := s.Snapshot()
	if err != nil {
		return err
	}
	if len(st.Interfaces) == 0 {
		return fmt.Errorf("missing --iface: the state store %s records no interface; name one, e.g. --iface eth0", s.Path())
	}
	return nil
}

// detachAndForget detaches ctd from iface and removes iface from the
// interfaces recorded in the state store (which 'ctd daemon' attaches at
// every start), as one change (store.Change): if the detach fails, the
// store keeps the interface. Without a store file only the detach is done;
// none is created. The detach runs in the calling goroutine, whose network
// namespace is the command's.
func (a *app) detachAndForget(iface string) error {
	if _, err := os.Stat(filepath.Join(a.stateDir, store.FileName)); err != nil {
		return a.pins().Detach(iface)
	}
	s, err := a.openStore()
	if err != nil {
		return err
	}
	return s.Change(store.Change{
		What:   "detach " + iface,
		Record: func(tx *store.Tx) error { return tx.DeleteInterface(iface) },
		Apply:  func() error { return a.pins().Detach(iface) },
	}, nil)
}

// daemonComponents returns the loops the daemon runs beside reconcile:
// conntrack GC, and the Prometheus endpoint when metrics is a listener.
func daemonComponents(lt gc.Lifetimes, metricsLn net.Listener) []daemon.Component {
	var (
		runner atomic.Pointer[gc.Runner] // the metrics read the GC's totals
		census *conntrack.TopCensus      // and what its passes counted
		counts gc.Census                 // census for the runner: nil without metrics
	)
	if metricsLn != nil {
		census = conntrack.NewTopCensus(conntrack.CensusN, conntrack.CensusBys...)
		counts = census
	}
	cs := []daemon.Component{{
		Name: "conntrack GC",
		Run: func(ctx context.Context, env *daemon.Env) error {
			r, err := gc.NewRunner(env.Datapath.Conntrack(), gc.RunnerConfig{
				Lifetimes: lt,
				Signals:   gc.SignalsFrom(metricsmap.New(env.Datapath.Metrics())),
				Census:    counts,
				Logger:    env.Logger,
			})
			if err != nil {
				return err
			}
			runner.Store(r)
			return r.Run(ctx)
		},
	}}
	if metricsLn == nil {
		return cs
	}
	return append(cs, daemon.Component{
		Name: "metrics server",
		Run: func(ctx context.Context, env *daemon.Env) error {
			maps, err := mapinfo.Of(&env.Datapath.Maps, env.PinPath)
			if err != nil {
				return err
			}
			gcStats := func() gc.Stats {
				if r := runner.Load(); r != nil {
					return r.Stats()
				}
				return gc.Stats{}
			}
			col := metrics.NewCollector(metrics.Sources{
				Metrics: metricsmap.New(env.Datapath.Metrics()),
				Maps:    maps,
				Entries: metrics.DatapathEntries(ctx, maps, env.Datapath.CT4(), env.Datapath.CT6(), gcStats),
				GC:      gcStats,
				Top:     census.Tables,
				Attachments: func() ([]attach.Attachment, error) {
					var out []attach.Attachment
					for _, iface := range env.Interfaces {
						at, err := env.Pins.Status(iface)
						if errors.Is(err, attach.ErrInterfaceNotFound) {
							at = attach.Attachment{Iface: iface}
						} else if err != nil {
							return nil, err
						}
						out = append(out, at)
					}
					return out, nil
				},
				Build: metrics.ReadBuildInfo(),
			})
			return serveMetrics(ctx, metricsLn, col.Handler(), env.Logger)
		},
	})
}

// exposedWarning returns a warning when the metrics listen on an address
// other hosts can reach (any address, or one that is not loopback), else "".
func exposedWarning(addr net.Addr) string {
	ta, ok := addr.(*net.TCPAddr)
	if !ok || ta.IP.IsLoopback() {
		return ""
	}
	where := "on " + ta.IP.String()
	if ta.IP.IsUnspecified() {
		where = "on every address of the host"
	}
	return "metrics served " + where + ": anyone who reaches it reads ctd's counters, maps and interfaces; use --metrics-addr 127.0.0.1:PORT unless a scraper on another host needs it"
}

// serveMetrics serves h at /metrics on ln until ctx is done.
func serveMetrics(ctx context.Context, ln net.Listener, h http.Handler, log *slog.Logger) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", h)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	log.Info("serving metrics", "addr", ln.Addr().String(), "path", "/metrics")
	select {
	case err := <-errc:
		return fmt.Errorf("serve metrics on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		return nil
	}
}

func runDaemon(c *cobra.Command, cfg daemon.Config, log *slog.Logger, early func(context.Context)) error {
	d, err := daemon.New(cfg)
	if err != nil {
		return err
	}
	defer d.Close()

	// Signals are caught from here on: a SIGTERM during Start lets Start
	// finish (it leaves nothing half-done) and then stops.
	ctx, stop := signal.NotifyContext(c.Context(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	// early (the cluster agent's lease and endpoints) runs from before the
	// datapath loads until the daemon stops: the daemon holds the state
	// directory from daemon.New on.
	if early != nil {
		ectx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() { early(ectx) })
		defer func() { cancel(); wg.Wait() }()
	}

	r, err := d.Start()
	if err != nil {
		return err
	}
	daemon.LogReady(log, r)
	if err := notifySystemd("READY=1\nSTATUS=ready"); err != nil {
		log.Warn("notify systemd", "err", err)
	}

	err = d.Run(ctx)
	_ = notifySystemd("STOPPING=1")
	if err != nil {
		log.Error("stopping", "err", err)
		return err
	}
	log.Info("stopped; programs stay attached and maps pinned")
	return nil
}

// notifySystemd sends state to systemd's notify socket ($NOTIFY_SOCKET, set
// for Type=notify units), so that `systemctl start` and `restart` return
// once the daemon is ready. Without the variable it does nothing.
func notifySystemd(state string) error {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return nil
	}
	if sock[0] == '@' { // abstract namespace
		sock = "\x00" + sock[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("dial $NOTIFY_SOCKET: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("write $NOTIFY_SOCKET: %w", err)
	}
	return nil
}
