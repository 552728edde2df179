package nettest

import (
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NodeIface is the name of every node's interface in a Bridged topology.
const NodeIface = "eth0"

// Bridged is n nodes (network namespaces) whose eth0 hang on one bridge in
// a hub namespace, like hosts on a LAN, plus one veth from that bridge into
// the root namespace that carries only a random IPv6 ULA /64: the control
// plane, where services of the test (etcd) listen for the nodes. Node i has
// 198.51.100.(11+i)/24 and fd00:c7d::(11+i)/64 (as Pair's hosts do) and
// Control.Addr()+11+i in the control /64.
type Bridged struct {
	Nodes    []*Host
	Control  netip.Prefix // fd00:c7d:XXXX::/64
	HostAddr netip.Addr   // the root namespace's address in Control
}

// NewBridged creates the topology; t.Cleanup removes all of it (the
// namespaces, and with them the bridge and veths, and the root end).
func NewBridged(t testing.TB, n int) *Bridged {
	t.Helper()
	RequireRoot(t)
	var r [2]byte
	if _, err := fmt.Sscanf(randomHex(2), "%02x%02x", &r[0], &r[1]); err != nil {
		t.Fatal(err)
	}
	ctl := netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0x00, 0x0c, 0x7d, r[0], r[1]}), 64)
	b := &Bridged{Control: ctl, HostAddr: nth(ctl, 0xfe)}
	hub := newHost(t, "br0", netip.Addr{}, netip.Addr{})
	hnl, err := hub.netlinkHandle()
	if err != nil {
		t.Fatal(err)
	}
	defer hnl.Close()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
	if err := hnl.LinkAdd(br); err != nil {
		t.Fatalf("nettest: create bridge: %v", err)
	}
	port := func(name string) {
		l, err := hnl.LinkByName(name)
		if err == nil {
			err = hnl.LinkSetMaster(l, br)
		}
		if err == nil {
			err = hnl.LinkSetUp(l)
		}
		if err != nil {
			t.Fatalf("nettest: bridge port %s: %v", name, err)
		}
	}
	for i := range n {
		h := newHost(t, NodeIface, nth(Prefix4, 11+i), nth(Prefix6, 11+i))
		nl, err := h.netlinkHandle()
		if err != nil {
			t.Fatal(err)
		}
		peer := fmt.Sprintf("n%d", i)
		err = nl.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: NodeIface}, PeerName: peer, PeerNamespace: netlink.NsFd(int(hub.Handle))})
		nl.Close()
		if err != nil {
			t.Fatalf("nettest: veth of node %d: %v", i, err)
		}
		if err := h.configure(); err != nil {
			t.Fatal(err)
		}
		if err := h.addAddr(nth(ctl, 11+i), 64); err != nil {
			t.Fatal(err)
		}
		port(peer)
		b.Nodes = append(b.Nodes, h)
	}
	// The root namespace's end: created in the hub with its peer moved out.
	// (This goroutine's thread: the process's first thread may have been
	// left in another namespace by addNamedNetns.)
	runtime.LockOSThread()
	root, err := netns.Get()
	runtime.UnlockOSThread()
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	rootName := "ctdh" + randomHex(4)
	if err := hnl.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "up0"}, PeerName: rootName, PeerNamespace: netlink.NsFd(int(root))}); err != nil {
		t.Fatalf("nettest: veth to the root namespace: %v", err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(rootName); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	port("up0")
	if err := hnl.LinkSetUp(br); err != nil {
		t.Fatal(err)
	}
	l, err := netlink.LinkByName(rootName)
	if err == nil {
		ipn := &net.IPNet{IP: b.HostAddr.AsSlice(), Mask: net.CIDRMask(64, 128)}
		err = netlink.AddrAdd(l, &netlink.Addr{IPNet: ipn, Flags: unix.IFA_F_NODAD})
	}
	if err == nil {
		err = netlink.LinkSetUp(l)
	}
	if err != nil {
		t.Fatalf("nettest: root end %s: %v", rootName, err)
	}
	for _, h := range b.Nodes {
		if err := h.waitReady(readyTimeout); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

// ControlAddr is node i's address in the control /64.
func (b *Bridged) ControlAddr(i int) netip.Addr { return nth(b.Control, 11+i) }

// nth is the address i past p's first.
func nth(p netip.Prefix, i int) netip.Addr {
	a := p.Addr().As16()
	if p.Addr().Is4() {
		a4 := p.Addr().As4()
		a4[3] += byte(i)
		return netip.AddrFrom4(a4)
	}
	a[15] += byte(i)
	return netip.AddrFrom16(a)
}

func (h *Host) addAddr(a netip.Addr, bits int) error {
	nl, err := h.netlinkHandle()
	if err != nil {
		return err
	}
	defer nl.Close()
	l, err := nl.LinkByName(h.Iface)
	if err != nil {
		return err
	}
	ipn := &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}
	return nl.AddrAdd(l, &netlink.Addr{IPNet: ipn, Flags: unix.IFA_F_NODAD})
}
