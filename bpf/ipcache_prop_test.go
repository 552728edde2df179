package bpf_test

import (
	"errors"
	"flag"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/test/dptest"
)

var ipcacheSeed = flag.Uint64("ipcache-seed", 0, "seed of TestIPCacheLongestPrefixProperty (0: from the clock)")

// lpmReference is the straightforward longest-prefix match: try every length
// from the longest down.
type lpmReference map[netip.Prefix]uint32

func (r lpmReference) lookup(a netip.Addr) uint32 {
	for bits := a.BitLen(); bits >= 0; bits-- {
		if id, ok := r[netip.PrefixFrom(a, bits).Masked()]; ok {
			return id
		}
	}
	return identityWorld
}

// ipcacheLookup is the datapath's own question: the address's host entry
// in its hash, else the address as a full-length key of the trie.
func ipcacheLookup(tb testing.TB, d *dptest.Datapath, a netip.Addr) uint32 {
	tb.Helper()
	var v bpf.CtdIpcacheValue
	var err error
	if a.Is4() {
		if err = d.IPHost4().Lookup(bpf.CtdIphost4Key{Addr: a.As4()}, &v); errors.Is(err, ebpf.ErrKeyNotExist) {
			err = d.IPCache4().Lookup(bpf.CtdIpcache4Key{Prefixlen: 32, Addr: a.As4()}, &v)
		}
	} else {
		if err = d.IPHost6().Lookup(bpf.CtdIphost6Key{Addr: a.As16()}, &v); errors.Is(err, ebpf.ErrKeyNotExist) {
			err = d.IPCache6().Lookup(bpf.CtdIpcache6Key{Prefixlen: 128, Addr: a.As16()}, &v)
		}
	}
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return identityWorld
	}
	if err != nil {
		tb.Fatalf("ipcache lookup %s: %v", a, err)
	}
	return v.Identity
}

func delIdentity(tb testing.TB, d *dptest.Datapath, p netip.Prefix) {
	tb.Helper()
	if err := d.IPCache().Delete(p); err != nil {
		tb.Fatalf("ipcache del %s: %v", p, err)
	}
}

// near returns base with up to its low `span` bits randomised.
func near(rng *rand.Rand, base netip.Addr, span int) netip.Addr {
	b := base.AsSlice()
	for i := 0; i < span; i++ {
		if rng.IntN(2) == 0 {
			bit := len(b)*8 - 1 - rng.IntN(span)
			b[bit/8] ^= 0x80 >> (bit % 8)
		}
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

func randomAddr(rng *rand.Rand, bits int) netip.Addr {
	b := make([]byte, bits/8)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// TestIPCacheLongestPrefixProperty fills the ipcache with thousands of
// random, heavily overlapping prefixes and compares the datapath's answer for
// thousands of addresses with the reference, both by looking the map up as
// the datapath does and through the identities of new flows.
func TestIPCacheLongestPrefixProperty(t *testing.T) {
	seed := *ipcacheSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (replay with -ipcache-seed=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed>>1))

	const prefixes, addrs, flows = 4000, 4000, 300
	for _, bits := range []int{32, 128} {
		t.Run(map[int]string{32: "ipv4", 128: "ipv6"}[bits], func(t *testing.T) {
			d := dptest.New(t)
			ref := lpmReference{}
			// Clusters of nearby prefixes of every length make overlaps the rule.
			bases := make([]netip.Addr, 16)
			for i := range bases {
				bases[i] = randomAddr(rng, bits)
			}
			for range prefixes {
				a := near(rng, bases[rng.IntN(len(bases))], rng.IntN(bits+1))
				// From /8 and /32 up: shorter ones would cover everything.
				p := netip.PrefixFrom(a, bits/4+rng.IntN(bits-bits/4+1)).Masked()
				id := 3 + rng.Uint32N(1<<31)
				ref[p] = id
				d.SetIdentity(t, p, id)
			}
			// Some go away again: what remains must still match.
			for p := range ref {
				if rng.IntN(10) == 0 {
					delIdentity(t, d, p)
					delete(ref, p)
				}
			}

			probes := make([]netip.Addr, addrs)
			for i := range probes {
				if i%2 == 0 {
					probes[i] = near(rng, bases[rng.IntN(len(bases))], rng.IntN(bits+1))
				} else {
					probes[i] = randomAddr(rng, bits)
				}
			}
			check := func(t *testing.T) {
				matched := 0
				for _, a := range probes {
					want := ref.lookup(a)
					if got := ipcacheLookup(t, d, a); got != want {
						t.Fatalf("%s: ipcache says identity %d, longest prefix match gives %d", a, got, want)
					}
					if want != identityWorld {
						matched++
					}
				}
				// The property means little unless both outcomes are common.
				if matched < addrs/4 || matched == addrs {
					t.Fatalf("%d of %d probes matched a prefix: the generator lost its spread", matched, addrs)
				}
				t.Logf("%d prefixes, %d of %d probes matched one", len(ref), matched, addrs)
			}
			t.Run("lookup", check)

			t.Run("new flows", func(t *testing.T) {
				for i := range flows {
					src, dst := probes[rng.IntN(len(probes))], probes[rng.IntN(len(probes))]
					s, ds := netip.AddrPortFrom(src, uint16(1024+i)), netip.AddrPortFrom(dst, 53)
					if v := d.Run(t, egress, dptest.UDP(t, s, ds, dptest.Payload(8))); v != dptest.Pass {
						t.Fatalf("%s -> %s: %s", s, ds, dptest.VerdictName(v))
					}
					f := d.Flows(t)
					if len(f) != 1 {
						t.Fatalf("%s -> %s: %d entries, want 1", s, ds, len(f))
					}
					if f[0].SrcIdentity != ref.lookup(src) || f[0].DstIdentity != ref.lookup(dst) {
						t.Fatalf("%s -> %s: identities %d -> %d, want %d -> %d", s, ds,
							f[0].SrcIdentity, f[0].DstIdentity, ref.lookup(src), ref.lookup(dst))
					}
					d.ResetCT(t)
				}
			})

			// A default route: nothing is the world any more.
			t.Run("with a default route", func(t *testing.T) {
				def := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
				if bits == 128 {
					def = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
				}
				ref[def] = 1
				d.SetIdentity(t, def, 1)
				for _, a := range probes {
					if got, want := ipcacheLookup(t, d, a), ref.lookup(a); got != want || got == identityWorld {
						t.Fatalf("%s: ipcache says identity %d, longest prefix match gives %d", a, got, want)
					}
				}
			})
		})
	}
}
