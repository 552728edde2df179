package kvstore

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"

	"github.com/ctd-dev/ctd/control/store"
)

// Endpoint is an address a node published.
type Endpoint struct {
	Node     string
	IP       netip.Addr
	Identity uint32
	// CreateRevision is the etcd revision at which the key was created:
	// of two nodes publishing one address, the earlier one wins.
	CreateRevision int64
}

// Conflict is an address more than one node publishes.
type Conflict struct {
	IP     netip.Addr
	Winner Endpoint
	Losers []Endpoint
}

// Desired is what a node enforces: the cluster's ipcache (the current
// generation's prefixes, with every endpoint as a host prefix over them),
// policy rules and default verdicts.
type Desired struct {
	IPCache  map[netip.Prefix]uint32
	Policy   map[store.RuleKey]store.Verdict
	Defaults [2]store.Verdict
}

// mirror is the part of the cluster state a node acts on, built from the
// keys of the layout as list and watch deliver them.
type mirror struct {
	l         Layout
	gen       uint64
	ipcache   map[uint64]map[uint32]map[netip.Prefix]uint32 // generation -> bucket -> prefixes
	endpoints map[netip.Addr]map[string]Endpoint
	rules     map[store.RuleKey]store.Verdict
	defaults  [2]store.Verdict
}

func newMirror(l Layout) *mirror {
	return &mirror{
		l:         l,
		ipcache:   make(map[uint64]map[uint32]map[netip.Prefix]uint32),
		endpoints: make(map[netip.Addr]map[string]Endpoint),
		rules:     make(map[store.RuleKey]store.Verdict),
	}
}

// dirty collects what a batch of changes touched.
type dirty struct {
	prefixes map[netip.Prefix]struct{}
	policy   bool
}

func (d *dirty) prefix(p netip.Prefix) {
	if d.prefixes == nil {
		d.prefixes = make(map[netip.Prefix]struct{})
	}
	d.prefixes[p] = struct{}{}
}

// put applies a created or changed key. Values that do not parse are
// ignored, as keys of other kinds are.
func (m *mirror) put(key string, value []byte, createRev int64, d *dirty) {
	k := m.l.parse(key)
	switch k.kind {
	case kindIPCacheCurrent:
		gen, err := parseGen(string(value))
		if err != nil || gen == m.gen {
			return
		}
		m.dirtyGen(m.gen, d)
		m.gen = gen
		m.dirtyGen(m.gen, d)
	case kindIPCacheBucket:
		m.setBucket(k.gen, k.bucket, decodeBucket(value), d)
	case kindRule:
		if v, ok := parseVerdict(string(value)); ok {
			m.rules[k.rule] = v
			d.policy = true
		}
	case kindDefault:
		if v, ok := parseVerdict(string(value)); ok {
			m.defaults[k.dir] = v
			d.policy = true
		}
	case kindEndpoint:
		id, ok := decodeEndpoint(value)
		if !ok {
			return
		}
		byNode := m.endpoints[k.ip]
		if byNode == nil {
			byNode = make(map[string]Endpoint)
			m.endpoints[k.ip] = byNode
		}
		byNode[k.node] = Endpoint{Node: k.node, IP: k.ip, Identity: id, CreateRevision: createRev}
		d.prefix(netip.PrefixFrom(k.ip, k.ip.BitLen()))
	}
}

// del applies a deleted key.
func (m *mirror) del(key string, d *dirty) {
	k := m.l.parse(key)
	switch k.kind {
	case kindIPCacheCurrent:
		m.put(key, []byte("0"), 0, d)
	case kindIPCacheBucket:
		m.setBucket(k.gen, k.bucket, nil, d)
	case kindRule:
		delete(m.rules, k.rule)
		d.policy = true
	case kindDefault:
		m.defaults[k.dir] = store.VerdictUnset
		d.policy = true
	case kindEndpoint:
		byNode := m.endpoints[k.ip]
		if _, ok := byNode[k.node]; !ok {
			return
		}
		delete(byNode, k.node)
		if len(byNode) == 0 {
			delete(m.endpoints, k.ip)
		}
		d.prefix(netip.PrefixFrom(k.ip, k.ip.BitLen()))
	}
}

// dirtyGen marks every prefix of generation gen.
func (m *mirror) dirtyGen(gen uint64, d *dirty) {
	for _, b := range m.ipcache[gen] {
		for p := range b {
			d.prefix(p)
		}
	}
}

// setBucket replaces a bucket (nil: deleted) and, in the current
// generation, marks the prefixes whose identity changed.
func (m *mirror) setBucket(gen uint64, bucket uint32, now map[netip.Prefix]uint32, d *dirty) {
	g := m.ipcache[gen]
	old := g[bucket]
	if gen == m.gen {
		for p, id := range old {
			if nid, ok := now[p]; !ok || nid != id {
				d.prefix(p)
			}
		}
		for p, id := range now {
			if oid, ok := old[p]; !ok || oid != id {
				d.prefix(p)
			}
		}
	}
	switch {
	case len(now) > 0 && g == nil:
		m.ipcache[gen] = map[uint32]map[netip.Prefix]uint32{bucket: now}
	case len(now) > 0:
		g[bucket] = now
	default:
		delete(g, bucket)
		if len(g) == 0 {
			delete(m.ipcache, gen)
		}
	}
}

// ipcacheLen is the number of prefixes of the current generation.
func (m *mirror) ipcacheLen() int {
	n := 0
	for _, b := range m.ipcache[m.gen] {
		n += len(b)
	}
	return n
}

// inIPCache reports whether the current generation has p.
func (m *mirror) inIPCache(p netip.Prefix) (uint32, bool) {
	id, ok := m.ipcache[m.gen][BucketOf(p)][p]
	return id, ok
}

// winner picks the endpoint that owns an address several nodes publish: the
// earliest published (lowest create revision), then the lowest node name.
// Every node sees the same revisions, so every node picks the same one.
func winner(byNode map[string]Endpoint) (Endpoint, []Endpoint) {
	eps := slices.SortedFunc(maps.Values(byNode), func(a, b Endpoint) int {
		return cmp.Or(cmp.Compare(a.CreateRevision, b.CreateRevision), cmp.Compare(a.Node, b.Node))
	})
	return eps[0], eps[1:]
}

// lookup is the identity p has in the desired ipcache.
func (m *mirror) lookup(p netip.Prefix) (uint32, bool) {
	if p.IsSingleIP() {
		if byNode := m.endpoints[p.Addr()]; len(byNode) > 0 {
			w, _ := winner(byNode)
			return w.Identity, true
		}
	}
	return m.inIPCache(p)
}

// desired computes the whole desired state.
func (m *mirror) desired() *Desired {
	d := &Desired{
		IPCache:  make(map[netip.Prefix]uint32, m.ipcacheLen()+len(m.endpoints)),
		Policy:   maps.Clone(m.rules),
		Defaults: m.defaults,
	}
	for _, b := range m.ipcache[m.gen] {
		maps.Copy(d.IPCache, b)
	}
	for ip, byNode := range m.endpoints {
		w, _ := winner(byNode)
		d.IPCache[netip.PrefixFrom(ip, ip.BitLen())] = w.Identity
	}
	return d
}

// conflicts lists the addresses more than one node publishes, by address.
func (m *mirror) conflicts() []Conflict {
	var out []Conflict
	for ip, byNode := range m.endpoints {
		if len(byNode) > 1 {
			w, l := winner(byNode)
			out = append(out, Conflict{IP: ip, Winner: w, Losers: l})
		}
	}
	slices.SortFunc(out, func(a, b Conflict) int { return a.IP.Compare(b.IP) })
	return out
}

// endpointList lists every published endpoint, by address then node.
func (m *mirror) endpointList() []Endpoint {
	var out []Endpoint
	for _, byNode := range m.endpoints {
		for _, e := range byNode {
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b Endpoint) int {
		return cmp.Or(a.IP.Compare(b.IP), cmp.Compare(a.Node, b.Node))
	})
	return out
}
