package bench

import (
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// Addresses of the synthetic packets and tables. The IPv4 ones are in
// 198.18.0.0/15, the range RFC 2544 sets aside for benchmarks, because the
// ipcache needs room for 100k distinct prefixes; the IPv6 ones are ULA space.
// None is configured on any interface: the packets exist only inside
// BPF_PROG_TEST_RUN and the tables only in maps pinned for one benchmark.
var (
	space4     = netip.MustParsePrefix("198.18.0.0/15")
	server4    = netip.MustParseAddr("198.19.255.1")
	serverNet4 = netip.MustParsePrefix("198.19.255.0/24")
	space6     = netip.MustParsePrefix("fd00:bec::/32")
	server6    = netip.MustParseAddr("fd00:bec:ffff::1")
	serverNet6 = netip.MustParsePrefix("fd00:bec:ffff::/48")
)

// Ports and identities of the synthetic tables.
const (
	estPortTCP   = 80   // server port of the prefilled TCP flows
	estPortUDP   = 53   // server port of the prefilled UDP flows
	newPort      = 443  // server port of new flows (never prefilled)
	floodPort    = 8080 // server port of the flood's half-open flows (FillFlood)
	newPortBase  = 20000
	clientPort0  = 1024
	portsPerAddr = 16384

	hostIdentity0  = 1000 // /32 and /128 entries: 1000 + k%64
	hostIdentities = 64
	cidrIdentity0  = 5000 // CIDR entries: 5000 + k%256
	serverIdentity = 9000 // the servers' CIDRs

	stateEstablished = 1 // CT_ESTABLISHED
)

// Flow classes of the prefilled conntrack table: flow i is of class i%4.
const (
	classTCP4 = iota
	classUDP4
	classICMP4
	classTCP6
	classes
)

func addr4(base netip.Addr, off uint32) netip.Addr {
	b := base.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += off
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func addr6(base netip.Addr, off uint32) netip.Addr {
	b := base.As16()
	for i := 15; i >= 12; i-- {
		b[i] += byte(off)
		off >>= 8
	}
	return netip.AddrFrom16(b)
}

// flow is a prefilled flow as its originator sees it.
type flow struct {
	proto  uint8
	client netip.Addr
	cport  uint16
	server netip.Addr
	sport  uint16
}

// flowOf returns the j-th prefilled flow of a class: clients count up from
// the bottom of the space, 16384 ports each, to one server.
func flowOf(class, j int) flow {
	off, port := uint32(j/portsPerAddr), uint16(clientPort0+j%portsPerAddr)
	switch class {
	case classTCP4:
		return flow{unix.IPPROTO_TCP, addr4(space4.Addr(), off), port, server4, estPortTCP}
	case classUDP4:
		return flow{unix.IPPROTO_UDP, addr4(space4.Addr(), off), port, server4, estPortUDP}
	case classICMP4:
		// The echo identifier stands in for the client port, 0 for the server's.
		return flow{unix.IPPROTO_ICMP, addr4(space4.Addr(), off), port, server4, 0}
	default:
		return flow{unix.IPPROTO_TCP, addr6(space6.Addr(), off), port, server6, estPortTCP}
	}
}

// FillConntrack writes n established synthetic flows into the conntrack
// table ct with batch updates: a quarter each of TCP, UDP and ICMP echo over
// IPv4 and TCP over IPv6, between clients in 198.18.0.0/16 (fd00:bec::/96)
// and one server, last seen now. Size ct for at least n entries with room
// to spare: an LRU table near its size evicts while it is filled.
func FillConntrack(ct *ctmap.Map, n int) error {
	now := uint64(ctmap.Now().Mono()) // the datapath's clock
	const chunk = 1 << 16
	keys := make([]ctmap.Key, 0, chunk)
	vals := make([]ctmap.Entry, 0, chunk)
	flush := func() error {
		if len(keys) == 0 {
			return nil
		}
		if err := ct.PutBatch(keys, vals); err != nil {
			return fmt.Errorf("fill conntrack table: %w", err)
		}
		keys, vals = keys[:0], vals[:0]
		return nil
	}
	for i := range n {
		fl := flowOf(i%classes, i/classes)
		k, origIsB := ctmap.KeyOf(fl.proto, fl.client, fl.cport, fl.server, fl.sport)
		e := ctmap.Entry{
			PacketsOrig: 1, BytesOrig: 64, PacketsReply: 1, BytesReply: 64,
			FirstSeen: now, LastSeen: now,
			SrcIdentity: hostIdentity0, DstIdentity: serverIdentity,
			Ifindex: 1, State: stateEstablished,
		}
		if origIsB {
			e.OrigIsB = 1
		}
		if fl.proto == unix.IPPROTO_TCP {
			e.TcpFlagsOrig, e.TcpFlagsReply = 0x12, 0x12 // SYN|ACK seen both ways
		}
		keys = append(keys, k)
		vals = append(vals, e)
		if len(keys) == chunk {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// FillFlood fills an unconfirmed conntrack table with n half-open flows, as
// a SYN flood leaves it: SYNs from distinct addresses of space4 to a server
// port of its own (floodPort), answered by nobody.
func FillFlood(m *ctmap.Map, n int) error {
	now := uint64(ctmap.Now().Mono())
	keys := make([]ctmap.Key, 0, n)
	vals := make([]ctmap.Entry, 0, n)
	base := space4.Addr().As4()
	for i := range n {
		src := netip.AddrFrom4([4]byte{base[0], base[1] + byte(i>>16&1), byte(i >> 8), byte(i)})
		k, origIsB := ctmap.KeyOf(unix.IPPROTO_TCP, src, clientPort0, server4, floodPort)
		e := ctmap.Entry{PacketsOrig: 1, BytesOrig: 54, FirstSeen: now, LastSeen: now,
			SrcIdentity: hostIdentity0, DstIdentity: serverIdentity, Ifindex: 1,
			State: uint8(ctmap.StateSynSent), TcpFlagsOrig: 0x02, Flags: ctmap.FlagOpenedIngress}
		if origIsB {
			e.OrigIsB = 1
		}
		keys, vals = append(keys, k), append(vals, e)
	}
	if err := m.PutUnconfirmedBatch(keys, vals); err != nil {
		return fmt.Errorf("fill the unconfirmed table: %w", err)
	}
	return nil
}
