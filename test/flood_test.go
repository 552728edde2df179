package test

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/test/nettest"
)

// synFlood sends n TCP SYNs from h's IPv4 address to dst, each from another
// source port, through a raw socket in h's namespace, and returns how long
// it took. The SYNs are real to A's stack: it answers them, and h's stack
// resets the answers, as with hping3 --flood -S.
func synFlood(t *testing.T, h *nettest.Host, dst netip.AddrPort, n int) time.Duration {
	t.Helper()
	start := time.Now()
	err := h.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
		if err != nil {
			return fmt.Errorf("raw socket: %w", err)
		}
		defer unix.Close(fd)
		to := &unix.SockaddrInet4{Addr: dst.Addr().As4()}
		buf := gopacket.NewSerializeBuffer()
		opts := gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}
		for i := range n {
			ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP,
				SrcIP: h.IPv4.AsSlice(), DstIP: dst.Addr().AsSlice()}
			tcp := &layers.TCP{SrcPort: layers.TCPPort(1024 + i%64000), DstPort: layers.TCPPort(dst.Port()),
				Seq: uint32(i) * 7919, SYN: true, Window: 64240}
			if err := tcp.SetNetworkLayerForChecksum(ip); err != nil {
				return err
			}
			if err := gopacket.SerializeLayers(buf, opts, ip, tcp); err != nil {
				return err
			}
			if err := unix.Sendto(fd, buf.Bytes(), 0, to); err != nil {
				return fmt.Errorf("send SYN %d: %w", i, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return time.Since(start)
}

// counters reads 'ctd metrics -o json' summed over both directions.
func (ctd *policyCLI) counters() map[string]uint64 {
	ctd.t.Helper()
	var rows []struct {
		Reason  string
		Packets uint64
	}
	if err := json.Unmarshal([]byte(ctd.quiet("metrics", "-o", "json")), &rows); err != nil {
		ctd.t.Fatal(err)
	}
	out := map[string]uint64{}
	for _, r := range rows {
		out[r.Reason] += r.Packets
	}
	return out
}

// entries reads each map's live entries from 'ctd maps -o json'.
func (ctd *policyCLI) entries() map[string]uint64 {
	ctd.t.Helper()
	var rows []struct {
		Name    string
		Entries uint64
	}
	if err := json.Unmarshal([]byte(ctd.quiet("maps", "-o", "json")), &rows); err != nil {
		ctd.t.Fatal(err)
	}
	out := map[string]uint64{}
	for _, r := range rows {
		out[r.Name] = r.Entries
	}
	return out
}

// TestSYNFlood is issue 11's flood test. ctd protects A with --ct-max 4096,
// ingress default deny and one allow rule for B to port 8095. A holds 20
// connections it opened to B: 10 active throughout, 5 idle until after the
// flood (then A speaks first), 5 where B speaks first after the flood,
// which under default deny only works if their entries survived. B sends
// 10 x ct-max SYNs to the allowed port. All 20 keep working: the flood
// only evicts unconfirmed flows.
func TestSYNFlood(t *testing.T) {
	const (
		ctMax     = 4096
		unconfMax = 1024
		floodPort = 8095
		bPort     = 9095
	)
	bin := nettest.BuildCtd(t)
	pair := nettest.NewPair(t)
	a, b := pair.A, pair.B
	ctd := &policyCLI{t: t, bin: bin, pin: nettest.PinPath(t), stateDir: t.TempDir(), host: a}
	ctd.run("attach", "--iface", a.Iface, "--ct-max", strconv.Itoa(ctMax), "--ct-unconfirmed-max", strconv.Itoa(unconfMax))
	ctd.run("policy", "default", "ingress", "deny")
	ctd.run("ipcache", "add", b.IPv4.String()+"/32", "id=42")
	ctd.run("policy", "add", "ingress", "id=42", "tcp/"+strconv.Itoa(floodPort), "allow")

	// A listens on the flooded port, as the service under attack would.
	la, err := a.Listen("tcp", netip.AddrPortFrom(a.IPv4, floodPort).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { la.Close() })
	lb, err := b.Listen("tcp", netip.AddrPortFrom(b.IPv4, bPort).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lb.Close() })

	// A opens 20 connections to B; keep both ends of each.
	conns := make([]*heldConn, 20)
	for i := range conns {
		conns[i] = dialFrom(t, "connection "+strconv.Itoa(i), a, lb, netip.AddrPortFrom(b.IPv4, bPort))
	}
	active, idle, remoteFirst := conns[:10], conns[10:15], conns[15:]
	before := ctd.counters()

	// The active ones talk throughout the flood.
	stop := chatter(active, 20*time.Millisecond)
	took := synFlood(t, b, netip.AddrPortFrom(a.IPv4, floodPort), 10*ctMax)
	activeErr, rounds := stop()
	after := ctd.counters()
	ent := ctd.entries()

	kept := len(conns)
	broken := func(format string, args ...any) {
		t.Errorf(format, args...)
		kept--
	}
	for i, err := range activeErr {
		if err != nil {
			broken("active connection %d broke during the flood: %v", i, err)
		}
	}
	for _, c := range idle {
		if err := send(c.a, c.b, "A first"); err != nil {
			broken("%s (idle, A speaks first): A -> B: %v", c.name, err)
		} else if err := send(c.b, c.a, "B answers"); err != nil {
			broken("%s (idle, A speaks first): B -> A: %v", c.name, err)
		}
	}
	for _, c := range remoteFirst {
		if err := send(c.b, c.a, "B first"); err != nil {
			broken("%s (B speaks first after the flood): B -> A: %v", c.name, err)
		} else if err := send(c.a, c.b, "A answers"); err != nil {
			broken("%s (B speaks first after the flood): A -> B: %v", c.name, err)
		}
	}
	delta := func(r string) uint64 { return after[r] - before[r] }
	if n := delta("ct-midstream-miss"); n != 0 {
		t.Errorf("ct-midstream-miss grew by %d during the flood, want 0 (no confirmed flow lost)", n)
	}
	if n := ent["ct4_v2"]; n < 20 {
		t.Errorf("the confirmed table holds %d entries after the flood, want at least the 20 connections", n)
	}
	t.Logf("flood: %d SYNs in %v; connections kept: %d of %d (10 active, %d echo rounds during the flood; 5 idle; 5 remote-first); "+
		"ct-created +%d, ct-confirmed +%d, ct-midstream-miss +%d (confirmed flows lost), dropped by policy +%d; "+
		"entries after: ct4_v2 %d of %d, ct4_unconfirmed_v2 %d of %d (the rest of the flood evicted there)",
		10*ctMax, took.Round(time.Millisecond), kept, len(conns), rounds, delta("ct-created"), delta("ct-confirmed"), delta("ct-midstream-miss"),
		delta("policy"), ent["ct4_v2"], ctMax, ent["ct4_unconfirmed_v2"], unconfMax)
}
