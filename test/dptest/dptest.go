// Package dptest runs crafted frames through ctd's datapath programs in tests.
package dptest

import (
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/loader"
)

// Verdicts as Program.Run reports them.
const (
	Pass = ^uint32(0) // TC_ACT_UNSPEC (-1)
	Drop = uint32(2)  // TC_ACT_SHOT
)

// Direction selects the program: DIR_INGRESS or DIR_EGRESS.
type Direction uint8

const (
	Ingress Direction = 0
	Egress  Direction = 1
)

// Datapath is a loaded datapath: its programs and maps.
type Datapath struct {
	Maps  *bpf.CtdMaps
	Progs *bpf.CtdPrograms
}

// Load loads the datapath pinned at pinPath (created there if missing) with
// small tables; everything is closed when the test ends. The caller owns
// pinPath's removal (nettest.PinPath does it).
func Load(tb testing.TB, pinPath string) *Datapath {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Fatalf("dptest: loading BPF programs needs root (euid %d): run the tests as root", os.Geteuid())
	}
	dp, err := loader.Load(loader.Options{PinPath: pinPath, CTMax: 4096, IPCacheMax: 1024, RingBufSize: 1 << 16})
	if err != nil {
		tb.Fatalf("dptest: load datapath at %s: %v", pinPath, err)
	}
	tb.Cleanup(func() { dp.Close() })
	return &Datapath{Maps: &dp.CtdMaps, Progs: &dp.CtdPrograms}
}

// Listen registers the test as the consumer of events for as long as the
// datapath is loaded: the datapath writes events only while one is
// registered (as ctd monitor does, refreshing it every second).
func (d *Datapath) Listen(tb testing.TB) {
	tb.Helper()
	if err := d.Maps.EvlistenV1.Put(uint32(0), bpf.CtdEvlisten{Until: ^uint64(0), Pid: uint32(os.Getpid())}); err != nil {
		tb.Fatalf("dptest: register as the event consumer: %v", err)
	}
}

// Run runs one frame through the direction's program and returns the verdict.
func (d *Datapath) Run(tb testing.TB, dir Direction, frame []byte) uint32 {
	tb.Helper()
	prog := d.Progs.CtdIngress
	if dir == Egress {
		prog = d.Progs.CtdEgress
	}
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame})
	if err != nil {
		tb.Fatalf("dptest: run frame: %v", err)
	}
	return ret
}

// SetDefault sets the default verdict of a direction in config_v1
// (VERDICT_ALLOW 1, VERDICT_DENY 2), keeping the other fields.
func (d *Datapath) SetDefault(tb testing.TB, dir Direction, verdict uint8) {
	tb.Helper()
	var c bpf.CtdConfig
	if err := d.Maps.ConfigV1.Lookup(uint32(0), &c); err != nil {
		tb.Fatal(err)
	}
	c.DefaultVerdict[dir] = verdict
	if err := d.Maps.ConfigV1.Put(uint32(0), &c); err != nil {
		tb.Fatal(err)
	}
}

// TCP flag sets.
const (
	FIN = 1 << iota
	SYN
	RST
	PSH
	ACK
)

var (
	srcMAC = []byte{0x02, 0, 0, 0, 0, 1}
	dstMAC = []byte{0x02, 0, 0, 0, 0, 2}
)

// TCP builds an Ethernet frame carrying one TCP segment from src to dst.
func TCP(tb testing.TB, src, dst netip.AddrPort, flags int, payload []byte) []byte {
	tb.Helper()
	tcp := &layers.TCP{
		SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()),
		Seq: 1000, Ack: 2000, Window: 65535,
		FIN: flags&FIN != 0, SYN: flags&SYN != 0, RST: flags&RST != 0,
		PSH: flags&PSH != 0, ACK: flags&ACK != 0,
	}
	return frame(tb, src.Addr(), dst.Addr(), layers.IPProtocolTCP, tcp, payload)
}

// UDP builds an Ethernet frame carrying one UDP datagram from src to dst.
func UDP(tb testing.TB, src, dst netip.AddrPort, payload []byte) []byte {
	tb.Helper()
	udp := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
	return frame(tb, src.Addr(), dst.Addr(), layers.IPProtocolUDP, udp, payload)
}

type transport interface {
	gopacket.SerializableLayer
	SetNetworkLayerForChecksum(gopacket.NetworkLayer) error
}

func frame(tb testing.TB, src, dst netip.Addr, proto layers.IPProtocol, l4 transport, payload []byte) []byte {
	tb.Helper()
	eth := &layers.Ethernet{SrcMAC: srcMAC, DstMAC: dstMAC}
	var l3 gopacket.SerializableLayer
	if src.Is4() {
		eth.EthernetType = layers.EthernetTypeIPv4
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
		l3 = ip
		if err := l4.SetNetworkLayerForChecksum(ip); err != nil {
			tb.Fatal(err)
		}
	} else {
		eth.EthernetType = layers.EthernetTypeIPv6
		ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
		l3 = ip
		if err := l4.SetNetworkLayerForChecksum(ip); err != nil {
			tb.Fatal(err)
		}
	}
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(buf, opts, eth, l3, l4, gopacket.Payload(payload)); err != nil {
		tb.Fatalf("dptest: build frame: %v", err)
	}
	return buf.Bytes()
}
