package conntrack

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/ctd-dev/ctd/control/ifnames"
	"github.com/ctd-dev/ctd/control/ipproto"
	"github.com/ctd-dev/ctd/datapath/cgroupv2"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// By is a dimension that Top groups flows by.
type By string

// The dimensions of Top.
const (
	// ByIdentity counts a flow once for each distinct identity at its ends,
	// so the shares of a ByIdentity table can add up to more than 1.
	ByIdentity    By = "identity"
	BySrcIdentity By = "src-identity" // the originator's identity
	ByDstIdentity By = "dst-identity" // the responder's identity
	ByDport       By = "dport"        // protocol and destination port, e.g. tcp/443
	ByProto       By = "proto"
	ByState       By = "state"
	ByIface       By = "iface"  // the interface the flow was first seen on
	ByCgroup      By = "cgroup" // the local owner's cgroup
	ByComm        By = "comm"   // the local owner's command name
)

// Bys lists every dimension, in the order help texts show them.
var Bys = []By{ByIdentity, BySrcIdentity, ByDstIdentity, ByDport, ByProto, ByState, ByIface, ByCgroup, ByComm}

// NoOwner is the value of ByCgroup and ByComm for flows without a local
// owner (forwarded flows).
const NoOwner = "-"

// ParseBy parses the value of --by.
func ParseBy(s string) (By, error) {
	if i := slices.Index(Bys, By(s)); i >= 0 {
		return Bys[i], nil
	}
	names := make([]string, len(Bys))
	for i, b := range Bys {
		names[i] = string(b)
	}
	return "", fmt.Errorf("invalid --by %q: valid are %s", s, strings.Join(names, ", "))
}

// TopRow is one value of a dimension and the flows that have it.
type TopRow struct {
	Value string  `json:"value"`
	Flows int     `json:"flows"`
	Share float64 `json:"share"` // of all flows Top counted
}

// TopTable is the result of Top: its rows, largest first, and the number
// of flows the filter selected.
type TopTable struct {
	By    By
	Rows  []TopRow
	Total int
}

// Top reads the table once and counts the flows f selects by the value
// they have in dimension by, largest first (ties by value). n > 0 keeps the
// n largest rows; n <= 0 keeps them all.
func Top(m *ctmap.Map, f Filter, by By, n int, names *ifnames.Cache, cg *cgroupv2.Names) (TopTable, error) {
	t, err := NewTally(by)
	if err != nil {
		return TopTable{}, err
	}
	err = List(m, f, func(fl ctmap.Flow) error {
		t.Add(fl)
		return nil
	})
	if err != nil {
		return TopTable{}, err
	}
	return t.Tables(n, names, cg)[0], nil
}

// A Tally counts flows by one or more dimensions at once.
//
// Counting runs on integer keys; only the rows a table keeps are turned
// into strings, so counting a million flows costs little more than reading
// them.
type Tally struct {
	bys    []By
	keys   []keyFunc
	values []valueFunc
	counts []map[uint32]int
	// dense counts the dimensions whose keys number the values met (0, 1,
	// 2, ...) by index, cheaper than a map; nil for the others.
	dense [][]int
	total int
}

// keyFunc maps a flow to its key in a dimension, or to two keys (two true)
// when the flow counts twice in it.
type keyFunc func(ctmap.Flow) (k1, k2 uint32, two bool)

// valueFunc names a key of a dimension.
type valueFunc func(k uint32, names *ifnames.Cache, cg *cgroupv2.Names) string

// NewTally returns an empty tally of the dimensions bys.
func NewTally(bys ...By) (*Tally, error) {
	t := &Tally{bys: bys}
	for _, by := range bys {
		key, value, dense, err := topKey(by)
		if err != nil {
			return nil, err
		}
		t.keys = append(t.keys, key)
		t.values = append(t.values, value)
		t.counts = append(t.counts, make(map[uint32]int))
		var d []int
		if dense {
			d = make([]int, 0, 64)
		}
		t.dense = append(t.dense, d)
	}
	return t, nil
}

// Add counts fl in every dimension.
func (t *Tally) Add(fl ctmap.Flow) {
	t.total++
	for i, key := range t.keys {
		k1, k2, two := key(fl)
		if d := t.dense[i]; d != nil {
			for int(k1) >= len(d) {
				d = append(d, 0)
			}
			d[k1]++
			t.dense[i] = d
			continue
		}
		t.counts[i][k1]++
		if two {
			t.counts[i][k2]++
		}
	}
}

// Tables returns one table per dimension, in the order NewTally got them,
// each with its n largest rows (all if n <= 0); names names interfaces and
// cg cgroups.
func (t *Tally) Tables(n int, names *ifnames.Cache, cg *cgroupv2.Names) []TopTable {
	tables := make([]TopTable, len(t.bys))
	for i, by := range t.bys {
		value := t.values[i]
		counts := t.counts[i]
		if d := t.dense[i]; d != nil {
			counts = make(map[uint32]int, len(d))
			for k, c := range d {
				if c > 0 {
					counts[uint32(k)] = c
				}
			}
		}
		tables[i] = TopTable{By: by, Total: t.total,
			Rows: topRows(counts, t.total, n, func(k uint32) string { return value(k, names, cg) })}
	}
	return tables
}

// topRows sorts counts largest first, keeps the first n (all if n <= 0) and
// names their keys.
func topRows(counts map[uint32]int, total, n int, name func(uint32) string) []TopRow {
	type kc struct {
		k uint32
		c int
	}
	all := make([]kc, 0, len(counts))
	for k, c := range counts {
		all = append(all, kc{k, c})
	}
	slices.SortFunc(all, func(a, b kc) int {
		if c := cmp.Compare(b.c, a.c); c != 0 {
			return c
		}
		return cmp.Compare(a.k, b.k)
	})
	if n > 0 && len(all) > n {
		all = all[:n]
	}
	rows := make([]TopRow, len(all))
	for i, e := range all {
		rows[i] = TopRow{Value: name(e.k), Flows: e.c, Share: float64(e.c) / float64(total)}
	}
	return rows
}

// topKey returns the functions that map a flow to its key(s) in dimension
// by and name a key. Keys of the dimensions whose values do not fit 32
// bits (cgroup ids, command names) number the values the tally has met:
// dense says so (one key per flow, 0, 1, 2, ...).
func topKey(by By) (key keyFunc, value valueFunc, dense bool, err error) {
	one := func(f func(ctmap.Flow) uint32) keyFunc {
		return func(fl ctmap.Flow) (uint32, uint32, bool) { return f(fl), 0, false }
	}
	number := func(k uint32, _ *ifnames.Cache, _ *cgroupv2.Names) string { return strconv.FormatUint(uint64(k), 10) }
	switch by {
	case ByIdentity:
		return func(fl ctmap.Flow) (uint32, uint32, bool) {
			return fl.SrcIdentity, fl.DstIdentity, fl.DstIdentity != fl.SrcIdentity
		}, number, false, nil
	case BySrcIdentity:
		return one(func(fl ctmap.Flow) uint32 { return fl.SrcIdentity }), number, false, nil
	case ByDstIdentity:
		return one(func(fl ctmap.Flow) uint32 { return fl.DstIdentity }), number, false, nil
	case ByDport:
		return one(func(fl ctmap.Flow) uint32 { return uint32(fl.Proto)<<16 | uint32(fl.Dport) }),
			func(k uint32, _ *ifnames.Cache, _ *cgroupv2.Names) string {
				// Flows without ports (ICMP echo: the identifier is the
				// source port) have destination port 0 and are shown by
				// protocol alone.
				proto, port := uint8(k>>16), uint16(k)
				if port == 0 {
					return ipproto.Name(proto)
				}
				return ipproto.Name(proto) + "/" + strconv.Itoa(int(port))
			}, false, nil
	case ByProto:
		return one(func(fl ctmap.Flow) uint32 { return uint32(fl.Proto) }),
			func(k uint32, _ *ifnames.Cache, _ *cgroupv2.Names) string { return ipproto.Name(uint8(k)) }, false, nil
	case ByState:
		return one(func(fl ctmap.Flow) uint32 { return uint32(fl.State) }),
			func(k uint32, _ *ifnames.Cache, _ *cgroupv2.Names) string { return ctmap.State(k).String() }, false, nil
	case ByIface:
		return one(func(fl ctmap.Flow) uint32 { return fl.Ifindex }),
			func(k uint32, names *ifnames.Cache, _ *cgroupv2.Names) string { return names.Name(k) }, false, nil
	case ByCgroup:
		in := newInterner[uint64]()
		return one(func(fl ctmap.Flow) uint32 { return in.key(fl.CgroupID) }),
			func(k uint32, _ *ifnames.Cache, cg *cgroupv2.Names) string {
				if k == 0 {
					return NoOwner
				}
				return cg.Name(in.value(k))
			}, true, nil
	case ByComm:
		in := newInterner[ctmap.Comm]()
		return one(func(fl ctmap.Flow) uint32 { return in.key(fl.Comm) }),
			func(k uint32, _ *ifnames.Cache, _ *cgroupv2.Names) string {
				if k == 0 {
					return NoOwner
				}
				return in.value(k).String()
			}, true, nil
	}
	_, err = ParseBy(string(by))
	return nil, nil, false, err
}

// interner numbers the values of a dimension in the order it meets them:
// the zero value is key 0, the others 1, 2, ...
type interner[V comparable] struct {
	keys   map[V]uint32
	values []V
}

func newInterner[V comparable]() *interner[V] {
	var zero V
	return &interner[V]{keys: make(map[V]uint32), values: []V{zero}}
}

func (in *interner[V]) key(v V) uint32 {
	var zero V
	if v == zero {
		return 0
	}
	k, ok := in.keys[v]
	if !ok {
		k = uint32(len(in.values))
		in.keys[v] = k
		in.values = append(in.values, v)
	}
	return k
}

func (in *interner[V]) value(k uint32) V { return in.values[k] }

// CensusN is how many of each dimension's largest values the daemon
// exports (ctd_conntrack_top_flows), and CensusBys are those dimensions: at
// most CensusN × len(CensusBys) series, whatever the table holds. identity
// is left out: it counts each flow under both its identities.
const CensusN = 10

// CensusBys: see CensusN.
var CensusBys = []By{BySrcIdentity, ByDstIdentity, ByDport, ByProto, ByState, ByIface, ByCgroup, ByComm}

// TopCensus keeps the top n values of some dimensions as the conntrack GC
// counts them in its passes (it is a gc.Census): the tables of the last
// complete pass stay readable while the next pass counts.
type TopCensus struct {
	bys []By
	n   int
	cur *Tally // the pass under way; only the GC's goroutine touches it
	// cgroups names the cgroups of ByCgroup (nil without a cgroup v2
	// mount: ids); only the GC's goroutine touches it.
	cgroups *cgroupv2.Names

	mu   sync.Mutex
	last []TopTable
}

// NewTopCensus returns a census of the n largest values of each of bys. It
// panics if one of bys is not a dimension (one of Bys): a programming error.
func NewTopCensus(n int, bys ...By) *TopCensus {
	if _, err := NewTally(bys...); err != nil {
		panic(err)
	}
	c := &TopCensus{bys: bys, n: n}
	if root, err := cgroupv2.Mount(); err == nil {
		c.cgroups = cgroupv2.NewNames(root)
	}
	return c
}

// Begin starts counting a pass.
func (c *TopCensus) Begin() { c.cur, _ = NewTally(c.bys...) }

// Add counts a flow the pass keeps.
func (c *TopCensus) Add(fl ctmap.Flow) { c.cur.Add(fl) }

// End publishes the pass's tables if the pass read the whole table.
func (c *TopCensus) End(ok bool) {
	if ok {
		tables := c.cur.Tables(c.n, ifnames.New(), c.cgroups)
		c.mu.Lock()
		c.last = tables
		c.mu.Unlock()
	}
	c.cur = nil
}

// Tables returns the tables of the last complete pass, nil before the
// first one. The caller must not change them.
func (c *TopCensus) Tables() []TopTable {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.last
}
