package bpf_test

import (
	"net/netip"
	"testing"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

// An originator and a responder. The pairs cover both canonical key orders
// (the originator as endpoint a or b) in both families, and a pair on one
// address that only the ports tell apart.
type pair struct {
	name       string
	orig, resp netip.AddrPort
}

var pairs = []pair{
	{"v4 low to high", netip.MustParseAddrPort("198.51.100.1:40000"), netip.MustParseAddrPort("203.0.113.7:80")},
	{"v4 high to low", netip.MustParseAddrPort("203.0.113.7:40000"), netip.MustParseAddrPort("198.51.100.1:80")},
	{"v4 one address", netip.MustParseAddrPort("198.51.100.1:40000"), netip.MustParseAddrPort("198.51.100.1:80")},
	{"v6 low to high", netip.MustParseAddrPort("[fd00:c7d::1]:40000"), netip.MustParseAddrPort("[fd00:c7d::2]:443")},
	{"v6 high to low", netip.MustParseAddrPort("[fd00:c7d::2]:40000"), netip.MustParseAddrPort("[fd00:c7d::1]:443")},
}

// How a flow meets the datapath: opened by a local process, its originator's
// packets leave on egress and the replies come in on ingress; opened from
// outside, the other way round.
type opener struct {
	name    string
	origDir bpf.Direction
	respDir bpf.Direction
	ctFlags uint8
}

var openers = []opener{
	{name: "opened inside", origDir: egress, respDir: ingress},
	{name: "opened outside", origDir: ingress, respDir: egress, ctFlags: ctmap.FlagOpenedIngress},
}

type side int

const (
	fromOrig side = iota
	fromResp
)

func (s side) String() string {
	if s == fromOrig {
		return "orig"
	}
	return "resp"
}

// flowModel is what the entry of the flow under test must hold.
type flowModel struct {
	want ctmap.Flow
}

func newModel(tb testing.TB, proto uint8, p pair, o opener) *flowModel {
	return &flowModel{want: ctmap.Flow{
		Proto: proto,
		Src:   p.orig.Addr(), Sport: p.orig.Port(),
		Dst: p.resp.Addr(), Dport: p.resp.Port(),
		SrcIdentity: 2, DstIdentity: 2, // world: the ipcache is empty
		Ifindex: dptest.LoIfindex(tb),
		Flags:   o.ctFlags,
	}}
}

func (m *flowModel) account(s side, n int, tcpFlags uint8) {
	if s == fromOrig {
		m.want.PacketsOrig++
		m.want.BytesOrig += uint64(n)
		m.want.TCPFlagsOrig |= tcpFlags
	} else {
		m.want.PacketsReply++
		m.want.BytesReply += uint64(n)
		m.want.TCPFlagsReply |= tcpFlags
	}
}
