package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/control/events"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/datapath/pins"
)

// lostReportInterval is how often monitor reports events the datapath
// could not deliver.
const lostReportInterval = 5 * time.Second

// watchInterval is how often monitor checks that its datapath is still the
// one pinned at the pin path.
const watchInterval = time.Second

// pinWatch tells whether a pin directory still holds, under a name, the
// map a process opened.
type pinWatch struct {
	dir  pins.Dir
	name string
	id   ebpf.MapID
}

func watchPin(dir pins.Dir, name string, m *ebpf.Map) (*pinWatch, error) {
	id, err := pins.MapID(m)
	if err != nil {
		return nil, fmt.Errorf("inspect %s: %w", dir.Map(name), err)
	}
	return &pinWatch{dir: dir, name: name, id: id}, nil
}

// check fails, in one line, when the pin is gone (the datapath was torn
// down) or holds another map (it was replaced).
func (w *pinWatch) check() error {
	id, err := w.dir.MapID(w.name)
	switch {
	case err != nil:
		return fmt.Errorf("monitor: cannot check the datapath at %s any more: %w", w.dir.Path(), err)
	case id == 0:
		return fmt.Errorf("monitor: the datapath at %s was torn down (%s is no longer pinned)", w.dir.Path(), w.name)
	case id != w.id:
		return fmt.Errorf("monitor: the datapath at %s was replaced (%s is now another map, e.g. after a resize): run 'ctd monitor' again", w.dir.Path(), w.name)
	}
	return nil
}

func newMonitorCmd(a *app) *cobra.Command {
	var out, typ, iface string
	c := &cobra.Command{
		Use:   "monitor [-o json] [--type flow|drop] [--iface NAME]",
		Short: "Stream the datapath's events live: new and closed flows, drops",
		Long: `Stream the datapath's events until interrupted (SIGINT or SIGTERM):
flow-new and flow-closed (with the flow's final counters), drop (a packet
that policy denied, with both identities) and ct-insert-failed. With -o json
each event is one JSON object per line, with the keys time (RFC 3339), type,
reason (drops), proto, src, sport, dst, dport (flow events: the flow's
originator; drops: the packet), src_identity, dst_identity, iface, ifindex,
dir, state (flow events), packets_orig, bytes_orig, packets_reply,
bytes_reply (flow-closed), and for flows with a local owner pid, comm,
cgroup, cgroup_id and, once the TCP handshake was seen, rtt_us (see
'ctd ct list').

The datapath writes events only while a monitor runs: monitor registers
itself in evlisten_v1 and refreshes that every second, and the registration
lapses 3 seconds after its last refresh, however monitor ended. The ring
buffer has one reader: run one monitor at a time, or they split the events
between them. The daemon never reads it. Events written before monitor
started are skipped. Every 5 seconds monitor reports on stderr the events
the datapath could not deliver: lost because the ring was full, or
suppressed by the per-CPU rate limit (see 'ctd events rate'). When the
datapath is torn down or replaced (its ring buffer unpinned, or pinned
anew, e.g. by a resize), monitor exits with one line saying so, within a
second.

Interface names are those of monitor's own network namespace.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			match := func(events.Type) bool { return true }
			switch typ {
			case "":
			case "flow":
				match = events.Type.IsFlow
			case "drop":
				match = events.Type.IsDrop
			default:
				return fmt.Errorf("invalid --type %q: valid types are flow (flow-new, flow-closed, ct-midstream-miss) and drop (drop, ct-insert-failed)", typ)
			}
			var ifindex uint32
			if iface != "" {
				ifi, err := net.InterfaceByName(iface)
				if err != nil {
					return fmt.Errorf("invalid --iface %q: no such interface in this network namespace (see 'ip link')", iface)
				}
				ifindex = uint32(ifi.Index)
			}
			maps, err := a.openPinnedMaps(&out)
			if err != nil {
				return err
			}
			defer maps.Close()
			rd, err := events.NewReader(maps.Events())
			if err != nil {
				return err
			}
			defer rd.Close()
			// The datapath writes events only while a consumer is
			// registered: from here on, refreshed every second.
			if l, err := events.GetListener(maps.Listener()); err != nil {
				return err
			} else if l.Active(ctmap.Now().Mono()) && l.PID != uint32(os.Getpid()) {
				fmt.Fprintf(c.ErrOrStderr(), "ctd monitor: warning: another ctd monitor (pid %d) reads the events of %s: each gets a share of them; stop one\n", l.PID, a.pinPath)
			}
			if err := events.Listen(maps.Listener(), os.Getpid()); err != nil {
				return err
			}
			defer events.Unlisten(maps.Listener(), os.Getpid())
			rd.SkipBefore(ctmap.Now().Mono())
			lim, err := events.GetRateLimit(maps.Config())
			if err != nil {
				return err
			}

			ctx, stop := signal.NotifyContext(c.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			lost := &lostReporter{m: metricsmap.New(maps.Metrics()), w: c.ErrOrStderr()}
			if err := lost.start(); err != nil {
				return err
			}
			watch, err := watchPin(a.pins(), loader.EventsMap, maps.Events())
			if err != nil {
				return err
			}
			done := make(chan struct{})
			defer close(done)
			var gone atomic.Pointer[error] // why the datapath went away
			go func() {
				t := time.NewTicker(watchInterval)
				defer t.Stop()
				lastReport := time.Now()
				for {
					select {
					case <-ctx.Done():
						rd.Close() // ends the Read below
						return
					case <-done:
						return
					case <-t.C:
						err := watch.check()
						if err == nil {
							err = events.Listen(maps.Listener(), os.Getpid())
						}
						if err != nil {
							gone.Store(&err)
							rd.Close()
							return
						}
						if time.Since(lastReport) >= lostReportInterval {
							lost.report()
							lastReport = time.Now()
						}
					}
				}
			}()
			fmt.Fprintf(c.ErrOrStderr(), "ctd monitor: streaming the events of %s (rate limit: %s); interrupt to stop\n", a.pinPath, lim)

			w := bufio.NewWriter(c.OutOrStdout())
			err = stream(rd, w, out == "json", func(ev events.Event) bool {
				return match(ev.Kind) && (ifindex == 0 || ev.Ifindex == ifindex)
			})
			if errors.Is(err, events.ErrClosed) {
				if why := gone.Load(); why != nil {
					return *why
				}
				if ctx.Err() != nil {
					err = nil
				}
			}
			lost.report()
			return err
		},
	}
	outputFlag(c, &out)
	c.Flags().StringVar(&typ, "type", "", "only events of this kind: flow (flow-new, flow-closed, ct-midstream-miss) or drop (drop, ct-insert-failed)")
	c.Flags().StringVar(&iface, "iface", "", "only events of this interface")
	_ = c.RegisterFlagCompletionFunc("type", cobra.FixedCompletions([]string{"flow", "drop"}, cobra.ShellCompDirectiveNoFileComp))
	_ = c.RegisterFlagCompletionFunc("iface", completeIfaces)
	return c
}

// stream writes the events that keep selects, one per line, flushing each,
// until reading fails.
func stream(rd *events.Reader, w *bufio.Writer, asJSON bool, keep func(events.Event) bool) error {
	enc := json.NewEncoder(w)
	synced := time.Now()
	for {
		ev, err := rd.Read()
		if err != nil {
			return err
		}
		if !keep(ev) {
			continue
		}
		if asJSON {
			err = enc.Encode(ev)
		} else {
			_, err = fmt.Fprintln(w, ev)
		}
		if err == nil {
			err = w.Flush()
		}
		if err != nil {
			return fmt.Errorf("write event: %w", err)
		}
		// Follow steps of the wall clock and renamed interfaces.
		if time.Since(synced) > time.Minute {
			rd.Decoder().Resync()
			synced = time.Now()
		}
	}
}

// lostReporter reports growth of the datapath's events-lost and
// events-ratelimited counters.
type lostReporter struct {
	m           *metricsmap.Map
	w           io.Writer
	lost, limit uint64
	since       time.Time
}

func (l *lostReporter) read() (lost, limit uint64, err error) {
	s, err := l.m.Read()
	if err != nil {
		return 0, 0, err
	}
	return s.Total(metricsmap.EventsLost).Packets, s.Total(metricsmap.EventsRateLimited).Packets, nil
}

func (l *lostReporter) start() (err error) {
	l.lost, l.limit, err = l.read()
	l.since = time.Now()
	return err
}

func (l *lostReporter) report() {
	lost, limit, err := l.read()
	if err != nil {
		fmt.Fprintf(l.w, "ctd monitor: read the lost-event counters: %v\n", err)
		return
	}
	if lost > l.lost || limit > l.limit {
		fmt.Fprintf(l.w, "ctd monitor: %d events lost (ring buffer full) and %d suppressed by the rate limit in the last %v\n",
			lost-l.lost, limit-l.limit, time.Since(l.since).Round(time.Second))
	}
	l.lost, l.limit, l.since = lost, limit, time.Now()
}
