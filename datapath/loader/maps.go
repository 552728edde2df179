package loader

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/ipcachemap"
)

// The names of the datapath's maps. The version in a name is its layout's
// (the *_MAP macros in bpf/common.h): a layout change renames the map here
// and in the header, and the code that uses the map keeps its accessor.
const (
	CT4Map            = bpf.CtdMapCt4V2
	CT6Map            = bpf.CtdMapCt6V2
	CT4UnconfirmedMap = bpf.CtdMapCt4UnconfirmedV2
	CT6UnconfirmedMap = bpf.CtdMapCt6UnconfirmedV2
	CTGuardMap        = bpf.CtdMapCtV2
	IPCache4Map       = bpf.CtdMapIpcache4V1
	IPCache6Map       = bpf.CtdMapIpcache6V1
	IPHost4Map        = bpf.CtdMapIphost4V1
	IPHost6Map        = bpf.CtdMapIphost6V1
	PolicyMap         = bpf.CtdMapPolicyV1
	ConfigMap         = bpf.CtdMapConfigV1
	MetricsMap        = bpf.CtdMapMetricsV1
	EventsMap         = bpf.CtdMapEventsV2
	EventLimitMap     = bpf.CtdMapEvlimitV1
	ListenerMap       = bpf.CtdMapEvlistenV1
	OwnerMap          = bpf.CtdMapOwnerV1
)

// MapNames lists every map ctd pins, in a stable order.
var MapNames = []string{CT4Map, CT6Map, CT4UnconfirmedMap, CT6UnconfirmedMap, CTGuardMap, IPCache4Map, IPCache6Map, IPHost4Map, IPHost6Map, PolicyMap, ConfigMap, MetricsMap, EventsMap, EventLimitMap, ListenerMap, OwnerMap}

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

// CT4 and CT6 are the conntrack tables of confirmed flows, by family.
func (m *Maps) CT4() *ebpf.Map { return m.objs.Ct4V2 }
func (m *Maps) CT6() *ebpf.Map { return m.objs.Ct6V2 }

// CT4Unconfirmed and CT6Unconfirmed are the conntrack tables of flows not
// yet confirmed, by family.
func (m *Maps) CT4Unconfirmed() *ebpf.Map { return m.objs.Ct4UnconfirmedV2 }
func (m *Maps) CT6Unconfirmed() *ebpf.Map { return m.objs.Ct6UnconfirmedV2 }

// CTGuard is the downgrade guard (ct_v2 in bpf/ctd.c): it holds nothing;
// pinned, it makes builds of conntrack layout v1 refuse this datapath.
func (m *Maps) CTGuard() *ebpf.Map { return m.objs.CtV2 }

// IPCache4 and IPCache6 are the ipcache's LPM tries (CIDRs), by family.
func (m *Maps) IPCache4() *ebpf.Map { return m.objs.Ipcache4V1 }
func (m *Maps) IPCache6() *ebpf.Map { return m.objs.Ipcache6V1 }

// IPHost4 and IPHost6 are the ipcache's hashes of host entries, by family.
func (m *Maps) IPHost4() *ebpf.Map { return m.objs.Iphost4V1 }
func (m *Maps) IPHost6() *ebpf.Map { return m.objs.Iphost6V1 }

// IPCache is the ipcache: the tries and the hashes as one table.
func (m *Maps) IPCache() *ipcachemap.Map {
	return ipcachemap.New(m.IPCache4(), m.IPCache6(), m.IPHost4(), m.IPHost6())
}

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
		CT4Map: m.CT4(), CT6Map: m.CT6(), CT4UnconfirmedMap: m.CT4Unconfirmed(), CT6UnconfirmedMap: m.CT6Unconfirmed(),
		CTGuardMap: m.CTGuard(), IPCache4Map: m.IPCache4(), IPCache6Map: m.IPCache6(),
		IPHost4Map: m.IPHost4(), IPHost6Map: m.IPHost6(), PolicyMap: m.Policy(),
		ConfigMap: m.objs.ConfigV1, MetricsMap: m.Metrics(), EventsMap: m.Events(), EventLimitMap: m.EventLimit(),
		ListenerMap: m.Listener(), OwnerMap: m.Owner(),
	}
}

// Close closes the maps' file descriptors; the pins stay.
func (m *Maps) Close() error { return m.objs.Close() }

// Conntrack is the conntrack table: its four tables as flows.
func (m *Maps) Conntrack() *ctmap.Map {
	return ctmap.New(ctmap.Tables{Confirmed4: m.CT4(), Confirmed6: m.CT6(), Unconfirmed4: m.CT4Unconfirmed(), Unconfirmed6: m.CT6Unconfirmed()})
}

// ConntrackMaps are the names of the conntrack tables, as in ctmap.Tables.
var ConntrackMaps = [4]string{CT4Map, CT6Map, CT4UnconfirmedMap, CT6UnconfirmedMap}

// OpenConntrack opens the conntrack table's four maps with open, by name
// in ConntrackMaps order; close releases them. On an error it closes those
// it opened and returns open's error as is.
func OpenConntrack(open func(name string) (*ebpf.Map, error)) (ct *ctmap.Map, close func(), err error) {
	var ms [4]*ebpf.Map
	closeAll := func() {
		for _, m := range ms {
			if m != nil {
				m.Close()
			}
		}
	}
	for i, name := range ConntrackMaps {
		if ms[i], err = open(name); err != nil {
			closeAll()
			return nil, nil, err
		}
	}
	return ctmap.New(ctmap.Tables{Confirmed4: ms[0], Confirmed6: ms[1], Unconfirmed4: ms[2], Unconfirmed6: ms[3]}), closeAll, nil
}

// NewConntrack creates an unpinned conntrack table (its four maps), sized
// by o, for tests and benchmarks; close releases it.
func NewConntrack(o Options) (ct *ctmap.Map, close func(), err error) {
	spec, err := o.WithDefaults().Spec()
	if err != nil {
		return nil, nil, err
	}
	return OpenConntrack(func(name string) (*ebpf.Map, error) {
		m, err := ebpf.NewMap(spec.Maps[name])
		if err != nil {
			return nil, fmt.Errorf("create map %s: %w", name, err)
		}
		return m, nil
	})
}
