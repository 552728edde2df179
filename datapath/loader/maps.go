package loader

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// The names of the datapath's maps. The version in a name is its layout's
// (the *_MAP macros in bpf/common.h): a layout change renames the map here
// and in the header, and the code that uses the map keeps its accessor.
const (
	CTMap            = bpf.CtdMapCtV1
	CTUnconfirmedMap = bpf.CtdMapCtUnconfirmedV1
	IPCache4Map      = bpf.CtdMapIpcache4V1
	IPCache6Map      = bpf.CtdMapIpcache6V1
	PolicyMap        = bpf.CtdMapPolicyV1
	ConfigMap        = bpf.CtdMapConfigV1
	MetricsMap       = bpf.CtdMapMetricsV1
	EventsMap        = bpf.CtdMapEventsV2
	EventLimitMap    = bpf.CtdMapEvlimitV1
	ListenerMap      = bpf.CtdMapEvlistenV1
	OwnerMap         = bpf.CtdMapOwnerV1
)

// MapNames lists every map ctd pins, in a stable order.
var MapNames = []string{CTMap, CTUnconfirmedMap, IPCache4Map, IPCache6Map, PolicyMap, ConfigMap, MetricsMap, EventsMap, EventLimitMap, ListenerMap, OwnerMap}

// Maps are the datapath's maps, each by what it holds.
type Maps struct {
	objs bpf.CtdMaps
	cfg  *config.Map
}

// assign takes the maps of coll (which keeps what it has not handed over)
// pinned at pinPath ("" for maps not pinned).
func (m *Maps) assign(coll *ebpf.Collection, pinPath string) error {
	if err := coll.Assign(&m.objs); err != nil {
		return fmt.Errorf("assign maps: %w", err)
	}
	m.cfg = config.New(m.objs.ConfigV1, pinPath)
	return nil
}

// CT is the conntrack table.
func (m *Maps) CT() *ebpf.Map { return m.objs.CtV1 }

func (m *Maps) CTUnconfirmed() *ebpf.Map { return m.objs.CtUnconfirmedV1 }

// IPCache4 and IPCache6 are the ipcache's LPM tries, by family.
func (m *Maps) IPCache4() *ebpf.Map { return m.objs.Ipcache4V1 }
func (m *Maps) IPCache6() *ebpf.Map { return m.objs.Ipcache6V1 }

// Policy is the policy rules' hash.
func (m *Maps) Policy() *ebpf.Map { return m.objs.PolicyV1 }

// Config is the datapath's configuration, and its one writer.
func (m *Maps) Config() *config.Map { return m.cfg }

// Metrics is the per-CPU counters.
func (m *Maps) Metrics() *ebpf.Map { return m.objs.MetricsV1 }

// Events is the event ring buffer.
func (m *Maps) Events() *ebpf.Map { return m.objs.EventsV2 }

// EventLimit is the per-CPU state of the event rate limit.
func (m *Maps) EventLimit() *ebpf.Map { return m.objs.EvlimitV1 }

// Listener is where the event consumer registers (events.Listen): the
// datapath writes events only while one is.
func (m *Maps) Listener() *ebpf.Map { return m.objs.EvlistenV1 }

// Owner is the socket storage where the cgroup/sock_create program records
// each local socket's owner (process and cgroup).
func (m *Maps) Owner() *ebpf.Map { return m.objs.OwnerV1 }

// ByName returns the maps by name, in the order of MapNames.
func (m *Maps) ByName() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		CTMap: m.CT(), CTUnconfirmedMap: m.CTUnconfirmed(), IPCache4Map: m.IPCache4(), IPCache6Map: m.IPCache6(), PolicyMap: m.Policy(),
		ConfigMap: m.objs.ConfigV1, MetricsMap: m.Metrics(), EventsMap: m.Events(), EventLimitMap: m.EventLimit(),
		ListenerMap: m.Listener(), OwnerMap: m.Owner(),
	}
}

// Close closes the maps' file descriptors; the pins stay.
func (m *Maps) Close() error { return m.objs.Close() }

// Conntrack is the conntrack table: the confirmed and unconfirmed tables as flows.
func (m *Maps) Conntrack() *ctmap.Map { return ctmap.New(m.CT(), m.CTUnconfirmed()) }

// NewConntrack creates an unpinned conntrack table (both of its maps),
// sized by o, for tests and benchmarks; close releases it.
func NewConntrack(o Options) (ct *ctmap.Map, close func(), err error) {
	spec, err := o.WithDefaults().Spec()
	if err != nil {
		return nil, nil, err
	}
	confirmed, err := ebpf.NewMap(spec.Maps[CTMap])
	if err != nil {
		return nil, nil, fmt.Errorf("create map %s: %w", CTMap, err)
	}
	unconfirmed, err := ebpf.NewMap(spec.Maps[CTUnconfirmedMap])
	if err != nil {
		confirmed.Close()
		return nil, nil, fmt.Errorf("create map %s: %w", CTUnconfirmedMap, err)
	}
	return ctmap.New(confirmed, unconfirmed), func() { confirmed.Close(); unconfirmed.Close() }, nil
}
