package nettest

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The link between A and a host routed behind it (RoutedBehindA).
const (
	ifaceAToC = "ctd2"
	ifaceC    = "ctd3"
)

var (
	// RoutedPrefix4 and RoutedPrefix6 are the subnets between A and the
	// host routed behind it. 203.0.113.0/24 is TEST-NET-3 (RFC 5737).
	RoutedPrefix4 = netip.MustParsePrefix("203.0.113.0/24")
	RoutedPrefix6 = netip.MustParsePrefix("fd00:c7e::/64")

	routedA4 = netip.MustParseAddr("203.0.113.1")
	routedC4 = netip.MustParseAddr("203.0.113.2")
	routedA6 = netip.MustParseAddr("fd00:c7e::1")
	routedC6 = netip.MustParseAddr("fd00:c7e::2")
)

// RoutedBehindA adds a third network namespace C behind A: a veth pair
// between A (ctd2, 203.0.113.1/24, fd00:c7e::1/64) and C (ctd3,
// 203.0.113.2/24, fd00:c7e::2/64), forwarding on in A, and routes so that
// B reaches C through A and C answers through A. A packet from B to C thus
// enters A on A's pair end and leaves on ctd2: A forwards it. C is removed
// by t.Cleanup with the pair.
func (p *Pair) RoutedBehindA(t testing.TB) *Host {
	t.Helper()
	c := newHost(t, ifaceC, routedC4, routedC6)
	aSide := *p.A
	aSide.Iface, aSide.IPv4, aSide.IPv6 = ifaceAToC, routedA4, routedA6
	if err := createVeth(&aSide, c); err != nil {
		t.Fatalf("nettest: creating veth %s/%s: %v", aSide.Iface, c.Iface, err)
	}
	for _, h := range []*Host{&aSide, c} {
		if err := h.configureIn(RoutedPrefix4, RoutedPrefix6); err != nil {
			t.Fatalf("nettest: configuring %s in %s: %v", h.Iface, h.Name, err)
		}
	}
	for _, h := range []*Host{&aSide, c} {
		if err := h.waitReady(readyTimeout); err != nil {
			t.Fatalf("nettest: %s in %s not ready: %v", h.Iface, h.Name, err)
		}
	}
	err := p.A.Do(func() error {
		for _, f := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile(f, []byte("1"), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("nettest: forwarding on in %s: %v", p.A.Name, err)
	}
	routes := []struct {
		h   *Host
		dst netip.Prefix
		via netip.Addr
	}{
		{p.B, RoutedPrefix4, p.A.IPv4},
		{p.B, RoutedPrefix6, p.A.IPv6},
		{c, Prefix4, routedA4},
		{c, Prefix6, routedA6},
	}
	for _, r := range routes {
		if err := r.h.addRoute(r.dst, r.via); err != nil {
			t.Fatalf("nettest: route to %v via %v in %s: %v", r.dst, r.via, r.h.Name, err)
		}
	}
	return c
}

// configureIn brings lo and the veth end up and assigns the host's
// addresses with the lengths of the subnets p4 and p6.
func (h *Host) configureIn(p4, p6 netip.Prefix) error {
	nl, err := h.netlinkHandle()
	if err != nil {
		return err
	}
	defer nl.Close()

	lo, err := nl.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("lo: %w", err)
	}
	if err := nl.LinkSetUp(lo); err != nil {
		return fmt.Errorf("set lo up: %w", err)
	}
	link, err := nl.LinkByName(h.Iface)
	if err != nil {
		return err
	}
	h.IfIndex = link.Attrs().Index
	h.MAC = link.Attrs().HardwareAddr
	for _, a := range []struct {
		addr   netip.Addr
		prefix netip.Prefix
		flags  int
	}{
		{h.IPv4, p4, 0},
		{h.IPv6, p6, unix.IFA_F_NODAD},
	} {
		ipn := &net.IPNet{IP: a.addr.AsSlice(), Mask: net.CIDRMask(a.prefix.Bits(), a.addr.BitLen())}
		if err := nl.AddrAdd(link, &netlink.Addr{IPNet: ipn, Flags: a.flags}); err != nil {
			return fmt.Errorf("add address %s: %w", ipn, err)
		}
	}
	if err := nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", h.Iface, err)
	}
	return nil
}

// addRoute adds a route to dst via gw in h's namespace.
func (h *Host) addRoute(dst netip.Prefix, gw netip.Addr) error {
	nl, err := h.netlinkHandle()
	if err != nil {
		return err
	}
	defer nl.Close()
	ipn := &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), dst.Addr().BitLen())}
	return nl.RouteAdd(&netlink.Route{Dst: ipn, Gw: gw.AsSlice()})
}
