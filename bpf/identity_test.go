package bpf_test

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/ipproto"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

const identityWorld = 2

// Overlapping prefixes in both families and, for addresses under them, the
// identity the longest match gives.
var (
	lpmPrefixes = map[netip.Prefix]uint32{
		netip.MustParsePrefix("198.0.0.0/8"):            100,
		netip.MustParsePrefix("198.51.0.0/16"):          200,
		netip.MustParsePrefix("198.51.100.0/24"):        300,
		netip.MustParsePrefix("198.51.100.7/32"):        400,
		netip.MustParsePrefix("fd00::/8"):               1100,
		netip.MustParsePrefix("fd00:c7d::/32"):          1200,
		netip.MustParsePrefix("fd00:c7d:0:1::/64"):      1300,
		netip.MustParsePrefix("fd00:c7d:0:1::7/128"):    1400,
		netip.MustParsePrefix("fd00:c7d:0:1:8000::/65"): 1350,
	}
	lpmAddrs = map[netip.Addr]uint32{
		netip.MustParseAddr("198.51.100.7"):         400,
		netip.MustParseAddr("198.51.100.8"):         300,
		netip.MustParseAddr("198.51.100.255"):       300,
		netip.MustParseAddr("198.51.7.1"):           200,
		netip.MustParseAddr("198.1.1.1"):            100,
		netip.MustParseAddr("203.0.113.1"):          identityWorld,
		netip.MustParseAddr("199.0.0.1"):            identityWorld,
		netip.MustParseAddr("fd00:c7d:0:1::7"):      1400,
		netip.MustParseAddr("fd00:c7d:0:1::8"):      1300,
		netip.MustParseAddr("fd00:c7d:0:1:8000::1"): 1350,
		netip.MustParseAddr("fd00:c7d:5::1"):        1200,
		netip.MustParseAddr("fd12::1"):              1100,
		netip.MustParseAddr("2001:db8::1"):          identityWorld,
	}
)

// Every new flow records both sides' identities, the originator's as src,
// whichever direction opened it.
func TestIdentitiesLongestPrefix(t *testing.T) {
	for _, o := range openers {
		t.Run(o.name, func(t *testing.T) {
			d := dptest.New(t)
			for p, id := range lpmPrefixes {
				d.SetIdentity(t, p, id)
			}
			port := uint16(1000)
			want := map[string]ctmap.Flow{}
			for src, srcID := range lpmAddrs {
				for dst, dstID := range lpmAddrs {
					if src == dst || src.Is4() != dst.Is4() {
						continue
					}
					port++
					s, ds := netip.AddrPortFrom(src, port), netip.AddrPortFrom(dst, 53)
					d.Expect(t, o.origDir, dptest.UDP(t, s, ds, dptest.Payload(10)), dptest.Pass, dptest.NewFlow(o.origDir))
					want[s.String()+" "+ds.String()] = ctmap.Flow{SrcIdentity: srcID, DstIdentity: dstID}
				}
			}
			got := d.Flows(t)
			if len(got) != len(want) {
				t.Fatalf("%d entries, want %d", len(got), len(want))
			}
			for _, f := range got {
				key := netip.AddrPortFrom(f.Src, f.Sport).String() + " " + netip.AddrPortFrom(f.Dst, f.Dport).String()
				w, ok := want[key]
				if !ok {
					t.Errorf("unexpected entry %s", key)
					continue
				}
				if f.SrcIdentity != w.SrcIdentity || f.DstIdentity != w.DstIdentity {
					t.Errorf("%s: identities src=%d dst=%d, want src=%d dst=%d", key, f.SrcIdentity, f.DstIdentity, w.SrcIdentity, w.DstIdentity)
				}
			}
		})
	}
}

// Host entries resolve the same from the hashes (where ctd writes them),
// from the tries (where a datapath pinned before the hashes holds them),
// and across MoveHosts, which moves them: the longest match throughout. A
// host entry in both resolves to the hash's identity, the one written later.
func TestIdentitiesHostEntriesMoved(t *testing.T) {
	hostInBoth := netip.MustParsePrefix("198.51.100.9/32")
	for _, where := range []string{"hash", "trie", "trie, moved"} {
		t.Run(where, func(t *testing.T) {
			d := dptest.New(t)
			for p, id := range lpmPrefixes {
				if where == "hash" {
					d.SetIdentity(t, p, id)
				} else {
					d.SetTrieIdentity(t, p, id)
				}
			}
			d.SetTrieIdentity(t, hostInBoth, 500)
			d.SetIdentity(t, hostInBoth, 501)
			want := maps.Clone(lpmAddrs)
			want[hostInBoth.Addr()] = 501
			if where == "trie, moved" {
				n, err := d.IPCache().MoveHosts()
				if err != nil {
					t.Fatal(err)
				}
				if n != 3 {
					t.Errorf("MoveHosts moved %d host entries, want 3", n)
				}
				// The tries hold CIDRs only now.
				for _, h := range []netip.Prefix{hostInBoth, netip.MustParsePrefix("198.51.100.7/32")} {
					var v bpf.CtdIpcacheValue
					k := bpf.CtdIpcache4Key{Prefixlen: 32, Addr: h.Addr().As4()}
					if err := d.IPCache4().Lookup(&k, &v); err == nil && v.Identity != 300 {
						t.Errorf("after MoveHosts the trie still resolves %v to %d", h, v.Identity)
					}
				}
			}
			peer4, peer6 := netip.MustParseAddrPort("203.0.113.1:53"), netip.MustParseAddrPort("[2001:db8::1]:53")
			port := uint16(2000)
			for a, id := range want {
				port++
				peer := peer4
				if a.Is6() {
					peer = peer6
				}
				if a == peer.Addr() {
					continue
				}
				s := netip.AddrPortFrom(a, port)
				d.Expect(t, egress, dptest.UDP(t, s, peer, dptest.Payload(10)), dptest.Pass, dptest.NewFlow(egress))
				i := slices.IndexFunc(d.Flows(t), func(f ctmap.Flow) bool { return f.Src == a && f.Sport == port })
				if i < 0 {
					t.Fatalf("no entry for the flow from %v", s)
				}
				if got := d.Flows(t)[i].SrcIdentity; got != id {
					t.Errorf("%v resolved to %d, want %d", a, got, id)
				}
			}
		})
	}
}

// A flow's identities are resolved when it is created: a later ipcache change
// applies to new flows only.
func TestIdentitiesResolvedAtCreation(t *testing.T) {
	d := dptest.New(t)
	host, peer := netip.MustParseAddrPort("198.51.100.7:40000"), netip.MustParseAddrPort("203.0.113.9:80")
	hostPrefix := netip.PrefixFrom(host.Addr(), 32)
	d.SetIdentity(t, netip.MustParsePrefix("198.51.100.0/24"), 300)
	d.SetIdentity(t, hostPrefix, 400)

	d.Expect(t, egress, dptest.TCP(t, host, peer, dptest.SYN, nil), dptest.Pass, dptest.NewFlow(egress))
	if err := d.IPCache().Delete(hostPrefix); err != nil {
		t.Fatal(err)
	}
	d.Expect(t, ingress, dptest.TCP(t, peer, host, dptest.SYN|dptest.ACK, nil), dptest.Pass, dptest.Hit(ingress))
	if f := d.Flows(t); len(f) != 1 || f[0].SrcIdentity != 400 || f[0].DstIdentity != identityWorld {
		t.Fatalf("existing flow: %+v, want src identity 400 (as created), dst world", f)
	}

	other := netip.AddrPortFrom(host.Addr(), 40001)
	d.Expect(t, egress, dptest.TCP(t, other, peer, dptest.SYN, nil), dptest.Pass, dptest.NewFlow(egress))
	for _, f := range d.Flows(t) {
		if f.Sport == other.Port() && f.SrcIdentity != 300 {
			t.Fatalf("new flow after the /32 was removed: src identity %d, want 300 from the /24", f.SrcIdentity)
		}
	}
}

// rule is one policy_v1 entry.
type rule struct {
	dir     bpf.Direction
	id      uint32 // 0 = any
	proto   uint8  // 0 = any
	port    uint16 // 0 = any
	verdict uint8
}

func (r rule) String() string {
	id, proto := "any", "any"
	if r.id != 0 {
		id = fmt.Sprint(r.id)
	}
	if r.proto != 0 {
		proto = ipproto.Name(r.proto)
	}
	v := "allow"
	if r.verdict == dptest.Deny {
		v = "deny"
	}
	return fmt.Sprintf("%s id=%s %s/%d %s", r.dir, id, proto, r.port, v)
}

// setPolicy writes the rules and the defaults, with config.PolicyRules set
// to the number of rules, as ctd does.
func setPolicy(tb testing.TB, d *dptest.Datapath, defaults [2]uint8, rules ...rule) {
	tb.Helper()
	for _, r := range rules {
		k := bpf.CtdPolicyKey{Identity: r.id, Port: r.port, Proto: r.proto, Dir: uint8(r.dir)}
		if err := d.Policy().Put(k, bpf.CtdPolicyValue{Verdict: r.verdict}); err != nil {
			tb.Fatalf("policy add %s: %v", r, err)
		}
	}
	d.SetConfig(tb, bpf.CtdConfig{DefaultVerdict: defaults, PolicyRules: uint32(len(rules))})
}

func delRule(tb testing.TB, d *dptest.Datapath, r rule) {
	tb.Helper()
	k := bpf.CtdPolicyKey{Identity: r.id, Port: r.port, Proto: r.proto, Dir: uint8(r.dir)}
	if err := d.Policy().Delete(k); err != nil {
		tb.Fatalf("policy del %s: %v", r, err)
	}
}

// The protected host and its peers: the peer's /32 carries identity 42 inside
// a /24 of identity 43.
var (
	local      = netip.MustParseAddr("198.51.100.1")
	peer       = netip.MustParseAddr("203.0.113.7")
	peerOther  = netip.MustParseAddr("203.0.113.8")
	local6     = netip.MustParseAddr("fd00:c7d::1")
	peer6      = netip.MustParseAddr("fd00:c7d:1::7")
	peerID     = uint32(42)
	neighbours = uint32(43)
)

func policyDatapath(t *testing.T) *dptest.Datapath {
	t.Helper()
	d := dptest.New(t)
	d.SetIdentity(t, netip.MustParsePrefix("203.0.113.0/24"), neighbours)
	d.SetIdentity(t, netip.PrefixFrom(peer, 32), peerID)
	d.SetIdentity(t, netip.PrefixFrom(peer6, 128), peerID)
	return d
}

func TestPolicyPrecedence(t *testing.T) {
	const (
		A = dptest.Allow
		D = dptest.Deny
	)
	tcp, udp := uint8(unix.IPPROTO_TCP), uint8(unix.IPPROTO_UDP)
	// Each level of precedence against the next, both ways round: the more
	// specific rule wins whatever its verdict and whatever the default.
	levels := []rule{
		{ingress, peerID, tcp, 80, 0},
		{ingress, peerID, tcp, 0, 0},
		{ingress, peerID, 0, 80, 0},
		{ingress, peerID, 0, 0, 0},
		{ingress, 0, tcp, 80, 0},
		{ingress, 0, tcp, 0, 0},
		{ingress, 0, 0, 80, 0},
		{ingress, 0, 0, 0, 0},
	}
	with := func(r rule, v uint8) rule { r.verdict = v; return r }
	type tcase struct {
		name     string
		defaults [2]uint8
		rules    []rule
		want     uint8
	}
	var cases []tcase
	for i := range levels {
		for j := i + 1; j < len(levels); j++ {
			for _, v := range []uint8{A, D} {
				other := uint8(A + D - v)
				cases = append(cases, tcase{
					name:     fmt.Sprintf("%s beats %s", with(levels[i], v), with(levels[j], other)),
					defaults: [2]uint8{other, 0},
					rules:    []rule{with(levels[i], v), with(levels[j], other)},
					want:     v,
				})
			}
		}
	}
	cases = append(cases,
		tcase{"no rule: default deny", dptest.DenyIn(ingress), nil, D},
		tcase{"no rule: default allow", [2]uint8{}, nil, A},
		tcase{"another identity's rule", dptest.DenyIn(ingress), []rule{{ingress, neighbours, tcp, 80, A}}, D},
		tcase{"another protocol's rule", dptest.DenyIn(ingress), []rule{{ingress, peerID, udp, 80, A}}, D},
		tcase{"another port's rule", dptest.DenyIn(ingress), []rule{{ingress, peerID, tcp, 81, A}}, D},
		tcase{"the other direction's rule", dptest.DenyIn(ingress), []rule{{egress, peerID, tcp, 80, A}, {egress, 0, 0, 0, A}}, D},
		tcase{"deny rule under default allow", [2]uint8{}, []rule{{ingress, peerID, tcp, 80, D}}, D},
		tcase{"deny for any under default allow", [2]uint8{}, []rule{{ingress, 0, 0, 0, D}}, D},
	)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := policyDatapath(t)
			setPolicy(t, d, tc.defaults, tc.rules...)
			checkNewFlow(t, d, ingress, dptest.TCP(t, netip.AddrPortFrom(peer, 40000), netip.AddrPortFrom(local, 80), dptest.SYN, nil), tc.want)
		})
	}
}

// checkNewFlow sends the first packet of a flow and checks the verdict: an
// allowed flow gets an entry, a denied one is dropped for policy and leaves none.
func checkNewFlow(t *testing.T, d *dptest.Datapath, dir bpf.Direction, frame []byte, want uint8) {
	t.Helper()
	if want == dptest.Allow {
		d.Expect(t, dir, frame, dptest.Pass, dptest.NewFlow(dir))
		if n := len(d.Flows(t)); n != 1 {
			t.Fatalf("allowed flow: %d entries, want 1", n)
		}
		return
	}
	d.Expect(t, dir, frame, dptest.Drop, dptest.One(dptest.Key{Dir: dir, Reason: metricsmap.DropPolicy}))
	d.NoFlows(t)
}

func TestPolicyMatches(t *testing.T) {
	tcp, udp, icmp, icmp6 := uint8(unix.IPPROTO_TCP), uint8(unix.IPPROTO_UDP), uint8(unix.IPPROTO_ICMP), uint8(unix.IPPROTO_ICMPV6)
	for _, tc := range []struct {
		name     string
		defaults [2]uint8
		rules    []rule
		dir      bpf.Direction
		frame    func(t *testing.T) []byte
		want     uint8
	}{
		{
			name: "egress judges the destination's identity", defaults: dptest.DenyIn(egress),
			rules: []rule{{egress, peerID, tcp, 443, dptest.Allow}}, dir: egress,
			frame: func(t *testing.T) []byte {
				return dptest.TCP(t, netip.AddrPortFrom(local, 40000), netip.AddrPortFrom(peer, 443), dptest.SYN, nil)
			},
			want: dptest.Allow,
		},
		{
			name: "egress rule for the source's identity does not match", defaults: dptest.DenyIn(egress),
			rules: []rule{{egress, peerID, tcp, 443, dptest.Allow}}, dir: egress,
			frame: func(t *testing.T) []byte {
				return dptest.TCP(t, netip.AddrPortFrom(peer, 40000), netip.AddrPortFrom(peerOther, 443), dptest.SYN, nil)
			},
			want: dptest.Deny,
		},
		{
			name: "the most specific prefix's identity is judged", defaults: dptest.DenyIn(ingress),
			rules: []rule{{ingress, neighbours, tcp, 0, dptest.Allow}}, dir: ingress,
			frame: func(t *testing.T) []byte {
				return dptest.TCP(t, netip.AddrPortFrom(peer, 40000), netip.AddrPortFrom(local, 80), dptest.SYN, nil)
			},
			want: dptest.Deny,
		},
		{
			name: "the /24's identity for its other addresses", defaults: dptest.DenyIn(ingress),
			rules: []rule{{ingress, neighbours, tcp, 0, dptest.Allow}}, dir: ingress,
			frame: func(t *testing.T) []byte {
				return dptest.TCP(t, netip.AddrPortFrom(peerOther, 40000), netip.AddrPortFrom(local, 80), dptest.SYN, nil)
			},
			want: dptest.Allow,
		},
		{
			name: "world when no prefix matches", defaults: dptest.DenyIn(ingress),
			rules: []rule{{ingress, identityWorld, udp, 53, dptest.Allow}}, dir: ingress,
			frame: func(t *testing.T) []byte {
				return dptest.UDP(t, netip.MustParseAddrPort("198.18.0.77:5353"), netip.AddrPortFrom(local, 53), dptest.Payload(20))
			},
			want: dptest.Allow,
		},
		{
			name: "udp by port", defaults: dptest.DenyIn(ingress),
			rules: []rule{{ingress, peerID, udp, 53, dptest.Allow}}, dir: ingress,
			frame: func(t *testing.T) []byte {
				return dptest.UDP(t, netip.AddrPortFrom(peer, 5353), netip.AddrPortFrom(local, 53), dptest.Payload(20))
			},
			want: dptest.Allow,
		},
		{
			name: "udp source port is not the rule's port", defaults: dptest.DenyIn(ingress),
			rules: []rule{{ingress, peerID, udp, 53, dptest.Allow}}, dir: ingress,
			frame: func(t *testing.T) []byte {
				return dptest.UDP(t, netip.AddrPortFrom(peer, 53), netip.AddrPortFrom(local, 5353), dptest.Payload(20))
			},
			want: dptest.Deny,
		},
		{
			name: "icmp echo by protocol", defaults: dptest.DenyIn(ingress),
			rules: []rule{{ingress, peerID, icmp, 0, dptest.Allow}}, dir: ingress,
			frame: func(t *testing.T) []byte { return dptest.Echo(t, peer, local, 9, false) },
			want:  dptest.Allow,
		},
		{
			name: "icmp echo id is not a port", defaults: dptest.DenyIn(ingress),
			rules: []rule{{ingress, peerID, icmp, 9, dptest.Allow}, {ingress, peerID, 0, 9, dptest.Allow}}, dir: ingress,
			frame: func(t *testing.T) []byte { return dptest.Echo(t, peer, local, 9, false) },
			want:  dptest.Deny,
		},
		{
			name: "icmpv6 echo by protocol", defaults: dptest.DenyIn(ingress),
			rules: []rule{{ingress, peerID, icmp6, 0, dptest.Allow}}, dir: ingress,
			frame: func(t *testing.T) []byte { return dptest.Echo(t, peer6, local6, 9, false) },
			want:  dptest.Allow,
		},
		{
			name: "v6 peer identity", defaults: dptest.DenyIn(ingress),
			rules: []rule{{ingress, peerID, tcp, 22, dptest.Allow}}, dir: ingress,
			frame: func(t *testing.T) []byte {
				return dptest.TCP(t, netip.AddrPortFrom(peer6, 40000), netip.AddrPortFrom(local6, 22), dptest.SYN, nil)
			},
			want: dptest.Allow,
		},
		{
			name: "a non-SYN without entry is judged as new: denied", defaults: dptest.DenyIn(ingress),
			rules: []rule{{ingress, peerID, tcp, 81, dptest.Allow}}, dir: ingress,
			frame: func(t *testing.T) []byte {
				return dptest.TCP(t, netip.AddrPortFrom(peer, 40000), netip.AddrPortFrom(local, 80), dptest.ACK, dptest.Payload(100))
			},
			want: dptest.Deny,
		},
		{
			name: "a non-SYN without entry is judged as new: allowed", defaults: dptest.DenyIn(ingress),
			rules: []rule{{ingress, peerID, tcp, 80, dptest.Allow}}, dir: ingress,
			frame: func(t *testing.T) []byte {
				return dptest.TCP(t, netip.AddrPortFrom(peer, 40000), netip.AddrPortFrom(local, 80), dptest.ACK, dptest.Payload(100))
			},
			want: dptest.Allow,
		},
		{
			name: "an RST without entry is judged", defaults: dptest.DenyIn(ingress), dir: ingress,
			frame: func(t *testing.T) []byte {
				return dptest.TCP(t, netip.AddrPortFrom(peer, 40000), netip.AddrPortFrom(local, 80), dptest.RST, nil)
			},
			want: dptest.Deny,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := policyDatapath(t)
			setPolicy(t, d, tc.defaults, tc.rules...)
			checkNewFlow(t, d, tc.dir, tc.frame(t), tc.want)
		})
	}
}

// With rules in the map but config.PolicyRules 0, the datapath skips the
// lookups and applies the default: the count is part of the contract.
func TestPolicyRulesCountGatesLookups(t *testing.T) {
	d := policyDatapath(t)
	r := rule{ingress, peerID, unix.IPPROTO_TCP, 80, dptest.Allow}
	setPolicy(t, d, dptest.DenyIn(ingress), r)
	d.SetConfig(t, bpf.CtdConfig{DefaultVerdict: dptest.DenyIn(ingress)})
	checkNewFlow(t, d, ingress, dptest.TCP(t, netip.AddrPortFrom(peer, 40000), netip.AddrPortFrom(local, 80), dptest.SYN, nil), dptest.Deny)
}

// Only the first packet of a flow is judged: an allowed flow's replies and
// later packets pass by conntrack, in both directions, under deny, and even
// after the rule that allowed it is gone; once its entry is flushed, its next
// packet is judged as new again.
func TestPolicyStateful(t *testing.T) {
	for _, fam := range []struct{ local, peer netip.Addr }{{local, peer}, {local6, peer6}} {
		t.Run(fam.local.String(), func(t *testing.T) {
			d := policyDatapath(t)
			allow := rule{ingress, peerID, unix.IPPROTO_TCP, 80, dptest.Allow}
			deny := [2]uint8{dptest.Deny, dptest.Deny}
			setPolicy(t, d, deny, allow)
			client, server := netip.AddrPortFrom(fam.peer, 40000), netip.AddrPortFrom(fam.local, 80)

			checkNewFlow(t, d, ingress, dptest.TCP(t, client, server, dptest.SYN, nil), dptest.Allow)
			d.Expect(t, egress, dptest.TCP(t, server, client, dptest.SYN|dptest.ACK, nil), dptest.Pass, dptest.Hit(egress))
			d.Expect(t, ingress, dptest.TCP(t, client, server, dptest.ACK, nil), dptest.Pass, dptest.Hit(ingress))

			delRule(t, d, allow)
			d.SetConfig(t, bpf.CtdConfig{DefaultVerdict: deny})
			d.Expect(t, ingress, dptest.TCP(t, client, server, dptest.PSH|dptest.ACK, dptest.Payload(100)), dptest.Pass, dptest.Hit(ingress))
			d.Expect(t, egress, dptest.TCP(t, server, client, dptest.PSH|dptest.ACK, dptest.Payload(1000)), dptest.Pass, dptest.Hit(egress))
			if f := d.Flows(t); len(f) != 1 || f[0].State != ctmap.StateEstablished || f[0].SrcIdentity != peerID {
				t.Fatalf("allowed flow: %+v, want one established entry from identity %d", f, peerID)
			}

			d.ResetCT(t)
			d.Expect(t, ingress, dptest.TCP(t, client, server, dptest.PSH|dptest.ACK, dptest.Payload(100)), dptest.Drop, dptest.One(dptest.Key{Dir: ingress, Reason: metricsmap.DropPolicy}))
			d.Expect(t, egress, dptest.TCP(t, server, client, dptest.PSH|dptest.ACK, dptest.Payload(1000)), dptest.Drop, dptest.One(dptest.Key{Dir: egress, Reason: metricsmap.DropPolicy}))
			d.NoFlows(t)
		})
	}
}

// ICMP errors about an allowed flow pass under deny; others are judged.
func TestPolicyICMPErrors(t *testing.T) {
	for _, fam := range []struct{ local, peer, router netip.Addr }{
		{local, peer, netip.MustParseAddr("198.51.100.254")},
		{local6, peer6, netip.MustParseAddr("fd00:c7d::fe")},
	} {
		t.Run(fam.local.String(), func(t *testing.T) {
			d := policyDatapath(t)
			setPolicy(t, d, dptest.DenyIn(ingress))
			client, server := netip.AddrPortFrom(fam.local, 40000), netip.AddrPortFrom(fam.peer, 443)

			syn := dptest.TCP(t, client, server, dptest.SYN, nil)
			checkNewFlow(t, d, egress, syn, dptest.Allow)
			d.Expect(t, ingress, dptest.TCP(t, server, client, dptest.SYN|dptest.ACK, nil), dptest.Pass, dptest.Hit(ingress))
			d.Expect(t, ingress, dptest.ICMPError(t, fam.router, fam.local, syn), dptest.Pass, dptest.One(dptest.Key{Dir: ingress, Reason: metricsmap.FwdRelated}))
			if f := d.Flows(t); len(f) != 1 || f[0].Flags&ctmap.FlagRelated == 0 {
				t.Fatalf("want the flow marked related: %+v", f)
			}

			// Quoting a packet of no tracked flow: judged, denied.
			stray := dptest.TCP(t, netip.AddrPortFrom(fam.local, 40001), server, dptest.SYN, nil)
			d.Expect(t, ingress, dptest.ICMPError(t, fam.router, fam.local, stray), dptest.Drop, dptest.One(dptest.Key{Dir: ingress, Reason: metricsmap.DropPolicy}))
			if n := len(d.Flows(t)); n != 1 {
				t.Fatalf("%d entries after a denied ICMP error, want 1", n)
			}
		})
	}
}

// The datapath judges policy for every protocol it tracks, by address pair
// for those without ports.
func TestPolicyOtherProtocol(t *testing.T) {
	d := policyDatapath(t)
	const gre = 47
	setPolicy(t, d, dptest.DenyIn(ingress), rule{ingress, peerID, gre, 0, dptest.Allow})
	frame := dptest.TCP(t, netip.AddrPortFrom(peer, 1), netip.AddrPortFrom(local, 2), dptest.SYN, nil)
	frame[14+9] = gre // the protocol byte; the checksum is not the datapath's business
	checkNewFlow(t, d, ingress, frame, dptest.Allow)
	f := d.Flows(t)[0]
	if f.Proto != gre || f.Sport != 0 || f.Dport != 0 || f.Src != peer || f.Dst != local {
		t.Fatalf("GRE flow: %+v, want %s -> %s proto %d without ports", f, peer, local, gre)
	}
	other := dptest.TCP(t, netip.AddrPortFrom(peerOther, 1), netip.AddrPortFrom(local, 2), dptest.SYN, nil)
	other[14+9] = gre
	d.Expect(t, ingress, other, dptest.Drop, dptest.One(dptest.Key{Dir: ingress, Reason: metricsmap.DropPolicy}))
}

// SCTP rules match the destination port, as TCP and UDP rules do.
func TestPolicySCTPPort(t *testing.T) {
	const sctp = unix.IPPROTO_SCTP
	for _, tc := range []struct {
		name  string
		rules []rule
		port  uint16
		want  uint8
	}{
		{"sctp/3868 allows its port", []rule{{ingress, peerID, sctp, 3868, dptest.Allow}}, 3868, dptest.Allow},
		{"sctp/3868 leaves other ports to the default", []rule{{ingress, peerID, sctp, 3868, dptest.Allow}}, 3869, dptest.Deny},
		{"any/3868 matches sctp", []rule{{ingress, peerID, 0, 3868, dptest.Allow}}, 3868, dptest.Allow},
		{"sctp/3868 deny beats sctp allow", []rule{{ingress, peerID, sctp, 0, dptest.Allow}, {ingress, peerID, sctp, 3868, dptest.Deny}}, 3868, dptest.Deny},
		{"tcp/3868 does not match sctp", []rule{{ingress, peerID, unix.IPPROTO_TCP, 3868, dptest.Allow}}, 3868, dptest.Deny},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := policyDatapath(t)
			setPolicy(t, d, dptest.DenyIn(ingress), tc.rules...)
			frame := dptest.SCTP(t, netip.AddrPortFrom(peer, 40000), netip.AddrPortFrom(local, tc.port), nil)
			checkNewFlow(t, d, ingress, frame, tc.want)
		})
	}
}
