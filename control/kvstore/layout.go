// Package kvstore keeps ctd's cluster state in etcd: the key layout, the
// cluster writes, and the list+watch sync that mirrors the state on a node.
//
// Key layout, below a prefix that carries its version (default /ctd/v1):
//
//	<prefix>/ipcache/current                 the live ipcache generation G (decimal); absent: 0
//	<prefix>/ipcache/next                    the next generation number to hand out (decimal)
//	<prefix>/ipcache/<G>/<B>                 the prefixes of generation G in bucket B (0-1023):
//	                                         one "CIDR id" line each, sorted; B is the FNV-1a hash
//	                                         of the prefix (netip.Prefix.MarshalBinary) mod 1024
//	<prefix>/policy/rules/<dir>/<id>/<proto>/<port>
//	                                         allow|deny; dir ingress|egress, id 0 = any,
//	                                         proto the IP protocol number (0 = any), port 0 = any
//	<prefix>/policy/defaults/<dir>           allow|deny
//	<prefix>/endpoints/<node>/<IP>           {"identity":N}, bound to the node's lease
//	<prefix>/nodes/<node>                    {"lease":ID,"ttl_s":N}, bound to the node's lease
//	<prefix>/identities/labels/<labels>      identity (decimal) of a canonical label set
//	<prefix>/identities/ids/<N>              the canonical label set of identity N
//	<prefix>/identities/next                 the next identity number to hand out
//	<prefix>/events/<node>/<kind>/<subject>  JSON event (e.g. endpoint-conflict), bound to the node's lease
//
// Only the prefixes of the current ipcache generation are live. Single
// changes (add, del) rewrite one bucket of the current generation, guarded
// by compares on <prefix>/ipcache/current and on the bucket's revision; a
// load writes a whole new generation and then switches current to it in
// one transaction (written last), so every node applies a load whole or
// not at all. Generations older than current can never become current
// again and are deleted. Buckets rather than a key per prefix keep a load
// of 100k prefixes to about a thousand keys, for etcd and for every node
// that lists or watches them.
package kvstore

import (
	"cmp"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/ctd-dev/ctd/control/store"
)

// DefaultPrefix is the default key prefix; its last element is the layout
// version.
const DefaultPrefix = "/ctd/v1"

// Layout builds and parses the keys below one prefix.
type Layout struct {
	Prefix string // without a trailing slash
}

// NewLayout checks prefix and returns its layout.
func NewLayout(prefix string) (Layout, error) {
	p := strings.TrimRight(prefix, "/")
	if p == "" || !strings.HasPrefix(p, "/") {
		return Layout{}, fmt.Errorf("invalid --kvstore-prefix %q: must be an absolute key path such as %s", prefix, DefaultPrefix)
	}
	return Layout{Prefix: p}, nil
}

// Root is the prefix every key of the layout starts with.
func (l Layout) Root() string { return l.Prefix + "/" }

func (l Layout) ipcacheDir() string     { return l.Prefix + "/ipcache/" }
func (l Layout) IPCacheCurrent() string { return l.Prefix + "/ipcache/current" }
func (l Layout) IPCacheNext() string    { return l.Prefix + "/ipcache/next" }
func (l Layout) IPCacheGen(gen uint64) string {
	return l.ipcacheDir() + strconv.FormatUint(gen, 10) + "/"
}
func (l Layout) IPCacheBucket(gen uint64, b uint32) string {
	return l.IPCacheGen(gen) + strconv.FormatUint(uint64(b), 10)
}

// Buckets is the number of ipcache buckets per generation.
const Buckets = 1024

// BucketOf is the bucket prefix p lives in.
func BucketOf(p netip.Prefix) uint32 {
	b, _ := p.MarshalBinary()
	h := fnv.New32a()
	h.Write(b)
	return h.Sum32() % Buckets
}

// encodeBucket formats a bucket's prefixes, sorted.
func encodeBucket(m map[netip.Prefix]uint32) string {
	ps := slices.SortedFunc(maps.Keys(m), func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	var sb strings.Builder
	for _, p := range ps {
		sb.WriteString(p.String())
		sb.WriteByte(' ')
		sb.WriteString(strconv.FormatUint(uint64(m[p]), 10))
		sb.WriteByte('\n')
	}
	return sb.String()
}

// decodeBucket parses a bucket; lines that do not parse are skipped.
func decodeBucket(v []byte) map[netip.Prefix]uint32 {
	m := make(map[netip.Prefix]uint32)
	for line := range strings.SplitSeq(string(v), "\n") {
		c, id, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		p, err := netip.ParsePrefix(c)
		n, ok := parseUint32(id)
		if err != nil || !ok || p != p.Masked() {
			continue
		}
		m[p] = n
	}
	return m
}

func (l Layout) RulesDir() string    { return l.Prefix + "/policy/rules/" }
func (l Layout) DefaultsDir() string { return l.Prefix + "/policy/defaults/" }

// RuleKey is the key of a policy rule.
func (l Layout) RuleKey(k store.RuleKey) string {
	return fmt.Sprintf("%s%s/%d/%d/%d", l.RulesDir(), k.Dir, k.Identity, k.Proto, k.Port)
}

// DefaultKey is the key of a direction's default verdict.
func (l Layout) DefaultKey(d store.Direction) string { return l.DefaultsDir() + d.String() }

func (l Layout) EndpointsDir() string             { return l.Prefix + "/endpoints/" }
func (l Layout) NodeEndpoints(node string) string { return l.EndpointsDir() + node + "/" }
func (l Layout) EndpointKey(node string, ip netip.Addr) string {
	return l.NodeEndpoints(node) + ip.String()
}
func (l Layout) NodesDir() string               { return l.Prefix + "/nodes/" }
func (l Layout) NodeKey(node string) string     { return l.NodesDir() + node }
func (l Layout) EventsDir() string              { return l.Prefix + "/events/" }
func (l Layout) IdentitiesDir() string          { return l.Prefix + "/identities/" }
func (l Layout) IdentityLabels(c string) string { return l.IdentitiesDir() + "labels/" + c }
func (l Layout) IdentityID(id uint32) string {
	return l.IdentitiesDir() + "ids/" + strconv.FormatUint(uint64(id), 10)
}
func (l Layout) IdentityNext() string { return l.IdentitiesDir() + "next" }

// EventKey is the key of an event a node reports about subject.
func (l Layout) EventKey(node, kind, subject string) string {
	return l.EventsDir() + node + "/" + kind + "/" + subject
}

// CheckNodeName checks a node name for use in keys.
func CheckNodeName(n string) error {
	if n == "" || strings.ContainsAny(n, "/ \t\n") || len(n) > 253 {
		return fmt.Errorf("invalid --node-name %q: must be 1-253 characters without '/' or spaces, e.g. the host name", n)
	}
	return nil
}

// keyKind says what a key of the layout is.
type keyKind int

const (
	kindOther keyKind = iota
	kindIPCacheCurrent
	kindIPCacheBucket
	kindRule
	kindDefault
	kindEndpoint
)

// parsedKey is a key taken apart.
type parsedKey struct {
	kind   keyKind
	gen    uint64
	bucket uint32
	rule   store.RuleKey
	dir    store.Direction
	node   string
	ip     netip.Addr
}

// parse takes a key of the layout apart; keys it does not know (other
// kinds, or malformed ones) are kindOther.
func (l Layout) parse(key string) parsedKey {
	rest, ok := strings.CutPrefix(key, l.Root())
	if !ok {
		return parsedKey{}
	}
	section, rest, _ := strings.Cut(rest, "/")
	switch section {
	case "ipcache":
		if rest == "current" {
			return parsedKey{kind: kindIPCacheCurrent}
		}
		g, bucket, ok := strings.Cut(rest, "/")
		gen, err := strconv.ParseUint(g, 10, 64)
		b, berr := strconv.ParseUint(bucket, 10, 32)
		if !ok || err != nil || berr != nil || b >= Buckets {
			return parsedKey{}
		}
		return parsedKey{kind: kindIPCacheBucket, gen: gen, bucket: uint32(b)}
	case "policy":
		sub, rest, _ := strings.Cut(rest, "/")
		switch sub {
		case "rules":
			f := strings.Split(rest, "/")
			if len(f) != 4 {
				return parsedKey{}
			}
			d, ok := parseDir(f[0])
			id, e1 := strconv.ParseUint(f[1], 10, 32)
			proto, e2 := strconv.ParseUint(f[2], 10, 8)
			port, e3 := strconv.ParseUint(f[3], 10, 16)
			if !ok || e1 != nil || e2 != nil || e3 != nil {
				return parsedKey{}
			}
			return parsedKey{kind: kindRule, rule: store.RuleKey{Dir: d, Identity: uint32(id), Proto: uint8(proto), Port: uint16(port)}}
		case "defaults":
			d, ok := parseDir(rest)
			if !ok {
				return parsedKey{}
			}
			return parsedKey{kind: kindDefault, dir: d}
		}
	case "endpoints":
		node, ip, ok := strings.Cut(rest, "/")
		a, err := netip.ParseAddr(ip)
		if !ok || node == "" || err != nil || a.Zone() != "" {
			return parsedKey{}
		}
		return parsedKey{kind: kindEndpoint, node: node, ip: a}
	}
	return parsedKey{}
}

func parseDir(s string) (store.Direction, bool) {
	switch s {
	case store.Ingress.String():
		return store.Ingress, true
	case store.Egress.String():
		return store.Egress, true
	}
	return 0, false
}

func parseVerdict(s string) (store.Verdict, bool) {
	switch s {
	case store.Allow.String():
		return store.Allow, true
	case store.Deny.String():
		return store.Deny, true
	}
	return store.VerdictUnset, false
}

func parseUint32(s string) (uint32, bool) {
	v, err := strconv.ParseUint(s, 10, 32)
	return uint32(v), err == nil && v != 0
}

// EndpointValue is the value of an endpoint key.
type EndpointValue struct {
	Identity uint32 `json:"identity"`
}

func encodeEndpoint(id uint32) string {
	b, _ := json.Marshal(EndpointValue{Identity: id})
	return string(b)
}

func decodeEndpoint(v []byte) (uint32, bool) {
	var ev EndpointValue
	if err := json.Unmarshal(v, &ev); err != nil || ev.Identity == 0 {
		return 0, false
	}
	return ev.Identity, true
}
