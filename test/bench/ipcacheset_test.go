package bench

import (
	"fmt"
	mrand "math/rand/v2"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/ipcachemap"
)

// ipcacheSet is the ipcache of a fixture: per family, the given number of
// prefixes (80% host entries) and the host addresses new flows come from.
type ipcacheSet struct {
	entries            []ipcachemap.Entry
	sources4, sources6 []netip.Addr
}

func newIPCacheSet(prefixes int) (ipcacheSet, error) {
	rnd := mrand.New(mrand.NewPCG(uint64(prefixes), 4))
	set4, hosts4, err := prefixSet(prefixes, space4, serverNet4, 18, 30, rnd)
	if err != nil {
		return ipcacheSet{}, err
	}
	set6, hosts6, err := prefixSet(prefixes, space6, serverNet6, 48, 120, rnd)
	if err != nil {
		return ipcacheSet{}, err
	}
	s := ipcacheSet{sources4: hosts4, sources6: hosts6}
	for _, set := range []map[netip.Prefix]uint32{set4, set6} {
		for p, id := range set {
			s.entries = append(s.entries, ipcachemap.Entry{Prefix: p, Identity: id})
		}
	}
	if len(hosts4) == 0 || len(hosts6) == 0 {
		return ipcacheSet{}, fmt.Errorf("prefill ipcache: no host entries to send new flows from (%d prefixes)", prefixes)
	}
	return s, nil
}

// writeTries writes every prefix, host entries too, into the tries, as a
// datapath without host hashes (the first release's) holds them.
func (s ipcacheSet) writeTries(v4, v6 *ebpf.Map) error {
	var (
		k4 []bpf.CtdIpcache4Key
		k6 []bpf.CtdIpcache6Key
		i4 []bpf.CtdIpcacheValue
		i6 []bpf.CtdIpcacheValue
	)
	for _, e := range s.entries {
		v := bpf.CtdIpcacheValue{Identity: e.Identity}
		if a := e.Prefix.Addr(); a.Is4() {
			k4, i4 = append(k4, bpf.CtdIpcache4Key{Prefixlen: uint32(e.Prefix.Bits()), Addr: a.As4()}), append(i4, v)
		} else {
			k6, i6 = append(k6, bpf.CtdIpcache6Key{Prefixlen: uint32(e.Prefix.Bits()), Addr: a.As16()}), append(i6, v)
		}
	}
	if len(k4) > 0 {
		if err := putAll(v4, k4, i4, len(k4)); err != nil {
			return fmt.Errorf("prefill ipcache4: %w", err)
		}
	}
	if len(k6) > 0 {
		if err := putAll(v6, k6, i6, len(k6)); err != nil {
			return fmt.Errorf("prefill ipcache6: %w", err)
		}
	}
	return nil
}

// floodFlows are n half-open flows as a SYN flood leaves them: SYNs from
// distinct addresses of space4 to a server port of its own (floodPort).
func floodFlows(n int) []flow {
	out := make([]flow, n)
	base := space4.Addr().As4()
	for i := range out {
		src := netip.AddrFrom4([4]byte{base[0], base[1] + byte(i>>16&1), byte(i >> 8), byte(i)})
		out[i] = flow{proto: 6, client: src, cport: clientPort0, server: server4, sport: floodPort}
	}
	return out
}
