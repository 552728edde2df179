package test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/test/nettest"
)

// Frame header sizes as TC sees them: ctd counts skb->len, which at the TC
// hooks includes the Ethernet header.
const (
	ethHdr  = 14
	ipv4Hdr = 20 // the kernel sends no IPv4 options
	ipv6Hdr = 40 // and no IPv6 extension headers here
	udpHdr  = 8
	icmpHdr = 8 // echo request/reply header, both ICMP and ICMPv6
	tcpHdr  = 20
)

func ipHdr(a netip.Addr) uint64 {
	if a.Is4() {
		return ipv4Hdr
	}
	return ipv6Hdr
}

// coreCLI runs the ctd binary inside a host's network namespace against one
// pin path, as an operator would.
type coreCLI struct {
	t    *testing.T
	bin  string
	pin  string
	host *nettest.Host
}

type cliResult struct {
	stdout, stderr string
	exitCode       int
}

func (c *coreCLI) run(args ...string) cliResult {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	full := append([]string{"--pin-path", c.pin}, args...)
	return runCmd(c.t, c.host.CommandContext(ctx, c.bin, full...))
}

// must runs ctd and fails the test unless it exits 0.
func (c *coreCLI) must(args ...string) string {
	c.t.Helper()
	r := c.run(args...)
	if r.exitCode != 0 {
		c.t.Fatalf("ctd %s: exit %d\nstderr: %s\nstdout: %s", strings.Join(args, " "), r.exitCode, r.stderr, r.stdout)
	}
	return r.stdout
}

func runCmd(t *testing.T, cmd *exec.Cmd) cliResult {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	code := 0
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("run %s: %v", cmd, err)
	}
	return cliResult{stdout: stdout.String(), stderr: stderr.String(), exitCode: code}
}

// ctRow is one object of `ctd ct list -o json`: the keys issue 2 names.
type ctRow struct {
	Proto        string   `json:"proto"`
	Src          string   `json:"src"`
	Sport        uint16   `json:"sport"`
	Dst          string   `json:"dst"`
	Dport        uint16   `json:"dport"`
	State        string   `json:"state"`
	PacketsOrig  uint64   `json:"packets_orig"`
	BytesOrig    uint64   `json:"bytes_orig"`
	PacketsReply uint64   `json:"packets_reply"`
	BytesReply   uint64   `json:"bytes_reply"`
	FirstSeen    string   `json:"first_seen"`
	LastSeen     string   `json:"last_seen"`
	Iface        string   `json:"iface"`
	Flags        []string `json:"flags"`
}

func (r ctRow) String() string {
	return fmt.Sprintf("%s %s %s:%d -> %s:%d packets=%d/%d bytes=%d/%d iface=%s flags=%v",
		r.Proto, r.State, r.Src, r.Sport, r.Dst, r.Dport, r.PacketsOrig, r.PacketsReply, r.BytesOrig, r.BytesReply, r.Iface, r.Flags)
}

func (c *coreCLI) ctList(args ...string) []ctRow {
	c.t.Helper()
	out := c.must(append([]string{"ct", "list", "-o", "json"}, args...)...)
	var rows []ctRow
	var raw []map[string]any
	if err := json.Unmarshal([]byte(out), &raw); err != nil {
		c.t.Fatalf("ct list -o json is not a JSON array: %v\n%s", err, out)
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		c.t.Fatalf("ct list -o json: %v\n%s", err, out)
	}
	for i, obj := range raw {
		for _, k := range []string{"proto", "src", "sport", "dst", "dport", "state", "packets_orig", "bytes_orig",
			"packets_reply", "bytes_reply", "first_seen", "last_seen", "iface", "src_identity", "dst_identity", "flags"} {
			if _, ok := obj[k]; !ok {
				c.t.Fatalf("ct list -o json: object %d lacks %q: %v", i, k, obj)
			}
		}
	}
	return rows
}

// wantFlow is a flow the test caused and what ct list must show for it.
type wantFlow struct {
	name       string
	proto      string
	src, dst   netip.Addr // src: the originator
	sport      uint16     // 0: unknown (the ICMP echo identifier ping picks)
	dport      uint16
	state      string
	ingress    bool // opened by a packet arriving on the attached interface
	exact      bool // counters are exact (UDP, ICMP) rather than lower bounds (TCP)
	packetsO   uint64
	bytesO     uint64
	packetsR   uint64
	bytesR     uint64
	notBefore  time.Time
	notAfter   time.Time
	attachedTo string
}

func (w wantFlow) matches(r ctRow) bool {
	return r.Proto == w.proto && r.Src == w.src.String() && r.Dst == w.dst.String() &&
		(w.sport == 0 || r.Sport == w.sport) && r.Dport == w.dport
}

// check returns what is wrong with r, or "".
func (w wantFlow) check(r ctRow) string {
	var bad []string
	if r.State != w.state {
		bad = append(bad, fmt.Sprintf("state %s, want %s", r.State, w.state))
	}
	counters := []struct {
		name      string
		got, want uint64
	}{
		{"packets_orig", r.PacketsOrig, w.packetsO},
		{"bytes_orig", r.BytesOrig, w.bytesO},
		{"packets_reply", r.PacketsReply, w.packetsR},
		{"bytes_reply", r.BytesReply, w.bytesR},
	}
	for _, c := range counters {
		if w.exact && c.got != c.want {
			bad = append(bad, fmt.Sprintf("%s %d, want %d", c.name, c.got, c.want))
		}
		if !w.exact && c.got < c.want {
			bad = append(bad, fmt.Sprintf("%s %d, want at least %d", c.name, c.got, c.want))
		}
	}
	if r.Iface != w.attachedTo {
		bad = append(bad, fmt.Sprintf("iface %q, want %q", r.Iface, w.attachedTo))
	}
	if got := slices.Contains(r.Flags, "opened_ingress"); got != w.ingress {
		bad = append(bad, fmt.Sprintf("flags %v: opened_ingress %v, want %v", r.Flags, got, w.ingress))
	}
	first, err1 := time.Parse(time.RFC3339Nano, r.FirstSeen)
	last, err2 := time.Parse(time.RFC3339Nano, r.LastSeen)
	switch {
	case err1 != nil || err2 != nil:
		bad = append(bad, fmt.Sprintf("first_seen %q / last_seen %q not RFC 3339", r.FirstSeen, r.LastSeen))
	case first.Before(w.notBefore) || last.After(w.notAfter) || last.Before(first):
		bad = append(bad, fmt.Sprintf("first_seen %s, last_seen %s: want ordered within [%s, %s]",
			r.FirstSeen, r.LastSeen, w.notBefore.Format(time.RFC3339Nano), w.notAfter.Format(time.RFC3339Nano)))
	}
	return strings.Join(bad, "; ")
}

// compareFlows returns what is wrong with rows given want: a missing,
// duplicated or wrong flow, or a flow nobody caused.
func compareFlows(rows []ctRow, want []wantFlow) []string {
	var problems []string
	used := make([]bool, len(rows))
	for _, w := range want {
		var hits []int
		for i, r := range rows {
			if w.matches(r) {
				hits = append(hits, i)
			}
		}
		switch len(hits) {
		case 0:
			problems = append(problems, fmt.Sprintf("%s: no flow %s %s:%d -> %s:%d", w.name, w.proto, w.src, w.sport, w.dst, w.dport))
		case 1:
			used[hits[0]] = true
			if s := w.check(rows[hits[0]]); s != "" {
				problems = append(problems, fmt.Sprintf("%s: %s: %s", w.name, rows[hits[0]], s))
			}
		default:
			problems = append(problems, fmt.Sprintf("%s: %d flows match", w.name, len(hits)))
		}
	}
	for i, r := range rows {
		if !used[i] {
			problems = append(problems, fmt.Sprintf("unexpected flow %s", r))
		}
	}
	return problems
}

// waitFlows polls ct list until it shows exactly want (TCP's last FIN or
// ACK may still be in flight when the sockets are closed) and fails with
// the differences after a timeout.
func (c *coreCLI) waitFlows(want []wantFlow, args ...string) []ctRow {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		rows := c.ctList(args...)
		problems := compareFlows(rows, want)
		if len(problems) == 0 {
			return rows
		}
		if time.Now().After(deadline) {
			var all []string
			for _, r := range rows {
				all = append(all, "  "+r.String())
			}
			c.t.Fatalf("ct list %v does not show the expected flows:\n  %s\nflows:\n%s",
				args, strings.Join(problems, "\n  "), strings.Join(all, "\n"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// tcpExchange: client dials server's port on dst, sends req bytes, reads
// resp bytes and closes; the server reads req bytes, answers, reads until
// EOF and closes. Returns the client's port and the server's.
func tcpExchange(t *testing.T, client, server *nettest.Host, dst netip.Addr, req, resp int) (uint16, uint16) {
	t.Helper()
	ln, err := server.Listen("tcp", netip.AddrPortFrom(dst, 0).String())
	if err != nil {
		t.Fatalf("listen on %s in %s: %v", dst, server.Name, err)
	}
	defer ln.Close()
	sport := uint16(ln.Addr().(*net.TCPAddr).Port)

	done := make(chan error, 1)
	go func() {
		done <- func() error {
			c, err := ln.Accept()
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			if _, err := io.ReadFull(c, make([]byte, req)); err != nil {
				return fmt.Errorf("server read: %w", err)
			}
			if _, err := c.Write(bytes.Repeat([]byte{'r'}, resp)); err != nil {
				return fmt.Errorf("server write: %w", err)
			}
			if n, err := io.Copy(io.Discard, c); err != nil || n != 0 {
				return fmt.Errorf("server waiting for EOF: %d bytes, %v", n, err)
			}
			return nil
		}()
	}()

	c, err := client.Dial("tcp", netip.AddrPortFrom(dst, sport).String())
	if err != nil {
		t.Fatalf("dial %s from %s: %v", dst, client.Name, err)
	}
	cport := uint16(c.LocalAddr().(*net.TCPAddr).Port)
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(bytes.Repeat([]byte{'q'}, req)); err != nil {
		t.Fatalf("client write: %v", err)
	}
	if _, err := io.ReadFull(c, make([]byte, resp)); err != nil {
		t.Fatalf("client read: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("client close: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return cport, sport
}

// udpExchange sends one datagram of req bytes from client to server and one
// of resp bytes back. Returns the client's port and the server's.
func udpExchange(t *testing.T, client, server *nettest.Host, dst netip.Addr, req, resp int) (uint16, uint16) {
	t.Helper()
	pc, err := server.ListenPacket("udp", netip.AddrPortFrom(dst, 0).String())
	if err != nil {
		t.Fatalf("listen on %s in %s: %v", dst, server.Name, err)
	}
	defer pc.Close()
	sport := uint16(pc.LocalAddr().(*net.UDPAddr).Port)

	done := make(chan error, 1)
	go func() {
		done <- func() error {
			pc.SetDeadline(time.Now().Add(20 * time.Second))
			buf := make([]byte, req+1)
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return fmt.Errorf("server read: %w", err)
			}
			if n != req {
				return fmt.Errorf("server read %d bytes, want %d", n, req)
			}
			_, err = pc.WriteTo(bytes.Repeat([]byte{'r'}, resp), from)
			return err
		}()
	}()

	c, err := client.Dial("udp", netip.AddrPortFrom(dst, sport).String())
	if err != nil {
		t.Fatalf("dial %s from %s: %v", dst, client.Name, err)
	}
	defer c.Close()
	cport := uint16(c.LocalAddr().(*net.UDPAddr).Port)
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(bytes.Repeat([]byte{'q'}, req)); err != nil {
		t.Fatalf("client write: %v", err)
	}
	buf := make([]byte, resp+1)
	n, err := c.Read(buf)
	if err != nil || n != resp {
		t.Fatalf("client read: %d bytes, %v; want %d", n, err, resp)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return cport, sport
}

// ping sends count echo requests of size payload bytes from h to dst; all
// must be answered.
func ping(t *testing.T, h *nettest.Host, dst netip.Addr, count, payload int) {
	t.Helper()
	nettest.RequireTool(t, "ping", "iputils-ping")
	out, err := h.Command("ping", "-n", "-q", "-c", strconv.Itoa(count), "-s", strconv.Itoa(payload),
		"-i", "0.2", "-W", "2", "-w", strconv.Itoa(5+count), dst.String()).CombinedOutput()
	if err != nil {
		t.Fatalf("ping -c %d -s %d %s from %s: %v\n%s", count, payload, dst, h.Name, err, out)
	}
}

// programsOn describes every BPF program on h's interface: TCX programs as
// the kernel reports them and cls_bpf filters below a clsact qdisc.
func programsOn(t *testing.T, h *nettest.Host) []string {
	t.Helper()
	var progs []string
	err := h.Do(func() error {
		for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: h.IfIndex, Attach: at})
			if err != nil {
				return fmt.Errorf("query %s: %w", at, err)
			}
			for _, p := range res.Programs {
				progs = append(progs, fmt.Sprintf("%s prog %d", at, p.ID))
			}
		}
		nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		defer nl.Close()
		l, err := nl.LinkByIndex(h.IfIndex)
		if err != nil {
			return err
		}
		qdiscs, err := nl.QdiscList(l)
		if err != nil {
			return err
		}
		for _, q := range qdiscs {
			if q.Type() != "clsact" {
				continue
			}
			for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
				fs, err := nl.FilterList(l, parent)
				if err != nil {
					return fmt.Errorf("list filters of %s: %w", h.Iface, err)
				}
				for _, f := range fs {
					if bf, ok := f.(*netlink.BpfFilter); ok {
						progs = append(progs, fmt.Sprintf("tc %s filter %q prog %d", netlink.HandleStr(parent), bf.Name, bf.Id))
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("programs on %s in %s: %v", h.Iface, h.Name, err)
	}
	return progs
}

// TestCTFlows attaches the built ctd to host A's interface in each mode,
// runs real TCP, UDP and ICMP traffic in both families and both directions,
// and checks what `ctd ct list -o json` shows; then ct flush, detach,
// re-attach and teardown.
//
// UDP and ICMP counters are checked exactly: one datagram or echo is one
// skb, and its bytes are the frame (Ethernet + IP + L4 header + payload).
// TCP counters are lower bounds: with GSO/TSO one skb carries several
// segments (packets count gso_segs, but bytes count skb->len, which holds
// one set of headers for all of them), and the stack adds pure ACKs and
// window updates (and may retransmit) beyond what the test can predict.
// What any TCP flow must have: its payload, and at least SYN, data and FIN
// as separate packets each way, each with at least minimal headers.
func TestCTFlows(t *testing.T) {
	for _, mode := range []string{"tcx", "tc"} {
		t.Run(mode, func(t *testing.T) { testCTFlows(t, mode) })
	}
}

func testCTFlows(t *testing.T, mode string) {
	bin := nettest.BuildCtd(t)
	pair := nettest.NewPair(t)
	a, b := pair.A, pair.B
	ctd := &coreCLI{t: t, bin: bin, pin: nettest.PinPath(t), host: a}

	out := ctd.must("attach", "--iface", a.Iface, "--mode", mode)
	if want := fmt.Sprintf("attached ctd to %s (%s)", a.Iface, mode); !strings.HasPrefix(out, want) {
		t.Fatalf("attach printed %q, want it to start with %q", out, want)
	}
	if got := programsOn(t, a); len(got) != 2 {
		t.Fatalf("after attach --mode %s: programs on %s: %v, want ingress and egress", mode, a.Iface, got)
	}
	// Attaching again replaces, never adds.
	ctd.must("attach", "--iface", a.Iface, "--mode", mode)
	if got := programsOn(t, a); len(got) != 2 {
		t.Fatalf("after attaching twice: programs on %s: %v, want ingress and egress once", a.Iface, got)
	}

	start := time.Now().Add(-time.Second) // wall clocks and CLOCK_MONOTONIC_COARSE drift apart slowly
	var want []wantFlow
	flow := func(w wantFlow) {
		w.notBefore, w.attachedTo = start, a.Iface
		want = append(want, w)
	}

	type host struct {
		h  *nettest.Host
		v4 netip.Addr
		v6 netip.Addr
	}
	hosts := [2]host{{a, a.IPv4, a.IPv6}, {b, b.IPv4, b.IPv6}}
	for i, fam := range []string{"ipv4", "ipv6"} {
		for j, dir := range []string{"A->B", "B->A"} {
			cli, srv := hosts[j], hosts[1-j]
			src, dst := cli.v4, srv.v4
			if i == 1 {
				src, dst = cli.v6, srv.v6
			}
			ingress := cli.h == b // the first packet arrives on A's interface
			// Distinct sizes per flow and direction catch swapped counters.
			base := 100*(2*i+j) + 1

			req, resp := 20000+base, 70000+base
			cport, sport := tcpExchange(t, cli.h, srv.h, dst, req, resp)
			minFrame := ethHdr + ipHdr(dst) + tcpHdr
			flow(wantFlow{
				name: "tcp " + fam + " " + dir, proto: "tcp", src: src, dst: dst, sport: cport, dport: sport,
				state: "CLOSED", ingress: ingress,
				packetsO: 3, bytesO: uint64(req) + 3*minFrame,
				packetsR: 3, bytesR: uint64(resp) + 3*minFrame,
			})

			ureq, uresp := base, 2*base
			cport, sport = udpExchange(t, cli.h, srv.h, dst, ureq, uresp)
			frame := ethHdr + ipHdr(dst) + udpHdr
			flow(wantFlow{
				name: "udp " + fam + " " + dir, proto: "udp", src: src, dst: dst, sport: cport, dport: sport,
				state: "ESTABLISHED", ingress: ingress, exact: true,
				packetsO: 1, bytesO: frame + uint64(ureq),
				packetsR: 1, bytesR: frame + uint64(uresp),
			})

			count, size := 2+j, 32+base%50
			ping(t, cli.h, dst, count, size)
			proto := "icmp"
			if i == 1 {
				proto = "icmpv6"
			}
			frame = ethHdr + ipHdr(dst) + icmpHdr + uint64(size)
			flow(wantFlow{
				name: proto + " echo " + dir, proto: proto, src: src, dst: dst,
				state: "ESTABLISHED", ingress: ingress, exact: true,
				packetsO: uint64(count), bytesO: uint64(count) * frame,
				packetsR: uint64(count), bytesR: uint64(count) * frame,
			})
		}
	}
	for i := range want {
		want[i].notAfter = time.Now().Add(time.Second)
	}
	rows := ctd.waitFlows(want)

	// The text form has one line per flow.
	if text := ctd.must("ct", "list"); strings.Count(text, "\n") != len(rows) {
		t.Errorf("ct list printed %d lines for %d flows:\n%s", strings.Count(text, "\n"), len(rows), text)
	}
	// Filters select, on the kernel's table as on the JSON.
	var udp6 []wantFlow
	for _, w := range want {
		if w.proto == "udp" && w.src.Is6() {
			udp6 = append(udp6, w)
		}
	}
	ctd.waitFlows(udp6, "--proto", "udp", "--addr", a.IPv6.String())
	ctd.waitFlows(want[:1], "--proto", "tcp", "--port", strconv.Itoa(int(want[0].sport)))

	// ct top counts what ct list lists.
	perProto := map[string]int{}
	for _, r := range ctd.ctList() {
		perProto[r.Proto]++
	}
	var top []struct {
		Value string  `json:"value"`
		Flows int     `json:"flows"`
		Share float64 `json:"share"`
	}
	if err := json.Unmarshal([]byte(ctd.must("ct", "top", "--by", "proto", "-o", "json")), &top); err != nil {
		t.Fatalf("ct top -o json: %v", err)
	}
	gotTop := map[string]int{}
	for _, r := range top {
		gotTop[r.Value] = r.Flows
	}
	if !maps.Equal(gotTop, perProto) {
		t.Errorf("ct top --by proto counted %v, ct list lists %v", gotTop, perProto)
	}

	status := ctd.must("status", "-o", "json")
	var st struct {
		Interfaces []struct {
			Name string `json:"name"`
			Mode string `json:"mode"`
		} `json:"interfaces"`
		Maps []struct {
			Name    string `json:"name"`
			Entries *int   `json:"entries"`
		} `json:"maps"`
	}
	if err := json.Unmarshal([]byte(status), &st); err != nil {
		t.Fatalf("status -o json: %v\n%s", err, status)
	}
	if len(st.Interfaces) != 1 || st.Interfaces[0].Name != a.Iface || st.Interfaces[0].Mode != mode {
		t.Errorf("status shows interfaces %+v, want only %s in mode %s", st.Interfaces, a.Iface, mode)
	}
	confirmed := 0 // the flows of both families, all confirmed
	for _, m := range st.Maps {
		if m.Name == "ct4_v2" || m.Name == "ct6_v2" {
			if m.Entries == nil {
				t.Fatalf("status: no entry count for %s", m.Name)
			}
			confirmed += *m.Entries
		}
	}
	if confirmed != len(want) {
		t.Errorf("status: ct4_v2 and ct6_v2 hold %d entries, want %d", confirmed, len(want))
	}

	// ct flush --proto udp removes exactly the UDP flows.
	var rest []wantFlow
	nUDP := 0
	for _, w := range want {
		if w.proto == "udp" {
			nUDP++
		} else {
			rest = append(rest, w)
		}
	}
	out = ctd.must("ct", "flush", "--proto", "udp")
	if want := fmt.Sprintf("deleted %d conntrack entries\n", nUDP); out != want {
		t.Errorf("ct flush --proto udp printed %q, want %q", out, want)
	}
	ctd.waitFlows(rest)

	// detach leaves no program on the interface, and the maps in place.
	ctd.must("detach", "--iface", a.Iface)
	if got := programsOn(t, a); len(got) != 0 {
		t.Errorf("after detach: programs on %s: %v, want none", a.Iface, got)
	}
	ctd.waitFlows(rest)

	// teardown detaches wherever ctd is attached and removes every pin.
	ctd.must("attach", "--iface", a.Iface, "--mode", mode)
	ctd.must("teardown")
	if got := programsOn(t, a); len(got) != 0 {
		t.Errorf("after teardown: programs on %s: %v, want none", a.Iface, got)
	}
	if _, err := os.Lstat(ctd.pin); !errors.Is(err, os.ErrNotExist) {
		entries, _ := filepath.Glob(filepath.Join(ctd.pin, "*"))
		t.Errorf("after teardown: pin path %s still exists (%v, entries %v)", ctd.pin, err, entries)
	}
	ctd.must("teardown") // idempotent
}

// TestCoreCLIErrors: every failure is one line on stderr naming the bad
// input, with a non-zero exit, and nothing is created or attached.
func TestCoreCLIErrors(t *testing.T) {
	bin := nettest.BuildCtd(t)
	pair := nettest.NewPair(t)
	a := pair.A
	pin := nettest.PinPath(t)
	notBPFFS := "/proc/ctdtest-" + strconv.Itoa(os.Getpid()) // procfs: no mkdir, no mount

	for _, tc := range []struct {
		name string
		args []string
		want string // the error line must contain it
	}{
		{"missing interface", []string{"attach", "--iface", "ctdmissing0"}, `interface "ctdmissing0" not found`},
		{"bad mode", []string{"attach", "--iface", a.Iface, "--mode", "xdp"}, `invalid --mode "xdp"`},
		{"no iface", []string{"attach"}, `"iface" not set`},
		{"bad ct-max", []string{"attach", "--iface", a.Iface, "--ct-max", "0"}, "invalid --ct-max 0"},
		{"bad ringbuf-size", []string{"attach", "--iface", a.Iface, "--ringbuf-size", "5000"}, "invalid --ringbuf-size 5000"},
		{"relative pin path", []string{"--pin-path", "ctd", "attach", "--iface", a.Iface}, `invalid --pin-path "ctd"`},
		{"bpffs root as pin path", []string{"--pin-path", "/sys/fs/bpf", "attach", "--iface", a.Iface}, `invalid --pin-path "/sys/fs/bpf"`},
		{"pin path not on bpffs, not mountable", []string{"--pin-path", notBPFFS, "attach", "--iface", a.Iface}, "pin path " + notBPFFS + " is not on a bpffs"},
		{"bad port", []string{"ct", "list", "--port", "70000"}, `invalid --port "70000"`},
		{"bad proto", []string{"ct", "flush", "--proto", "tcpp"}, `invalid --proto "tcpp"`},
		{"bad addr", []string{"ct", "list", "--addr", "198.51.100"}, `invalid --addr "198.51.100"`},
		{"bad top dimension", []string{"ct", "top", "--by", "owner"}, `invalid --by "owner"`},
		{"bad output", []string{"status", "-o", "yaml"}, `invalid --output "yaml"`},
		{"nothing attached yet", []string{"ct", "list"}, "no ctd datapath at " + pin},
		{"detach missing interface", []string{"detach", "--iface", "ctdmissing0"}, `interface "ctdmissing0" not found`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if args[0] != "--pin-path" {
				args = append([]string{"--pin-path", pin}, args...)
			}
			r := runCmd(t, a.Command(bin, args...))
			checkOneLineError(t, r, tc.want)
			for _, p := range []string{pin, notBPFFS} {
				if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s exists after a failed command (%v)", p, err)
				}
			}
			if got := programsOn(t, a); len(got) != 0 {
				t.Errorf("programs on %s after a failed command: %v", a.Iface, got)
			}
		})
	}

	t.Run("not root", func(t *testing.T) {
		// A copy of the binary that user nobody can execute.
		dir, err := os.MkdirTemp("", "ctdtest-nobody-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		nbin := filepath.Join(dir, "ctd")
		data, err := os.ReadFile(bin)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(nbin, data, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, args := range [][]string{
			{"attach", "--iface", "lo"},
			{"detach", "--iface", "lo"},
			{"status"},
			{"ct", "list"},
			{"ct", "flush"},
			{"teardown"},
		} {
			cmd := exec.Command(nbin, append([]string{"--pin-path", pin}, args...)...)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			checkOneLineError(t, runCmd(t, cmd), "ctd must run as root")
		}
		if _, err := os.Lstat(pin); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s exists after failed commands (%v)", pin, err)
		}
	})
}

func checkOneLineError(t *testing.T, r cliResult, want string) {
	t.Helper()
	if r.exitCode == 0 {
		t.Errorf("exit 0, want non-zero (stdout %q)", r.stdout)
	}
	if r.stdout != "" {
		t.Errorf("stdout %q, want nothing", r.stdout)
	}
	lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], want) || !strings.HasPrefix(lines[0], "ctd: ") {
		t.Errorf("stderr %q, want one line \"ctd: ...\" containing %q", r.stderr, want)
	}
}

// TestCoreAttachFailureUndoes: when attaching fails after the maps were
// created (here: an ingress qdisc occupies the clsact slot that tc mode
// needs), ctd removes what it created: no pins, no programs.
func TestCoreAttachFailureUndoes(t *testing.T) {
	bin := nettest.BuildCtd(t)
	pair := nettest.NewPair(t)
	a := pair.A
	ctd := &coreCLI{t: t, bin: bin, pin: nettest.PinPath(t), host: a}

	if out, err := a.Command("tc", "qdisc", "add", "dev", a.Iface, "ingress").CombinedOutput(); err != nil {
		t.Fatalf("tc qdisc add dev %s ingress: %v\n%s", a.Iface, err, out)
	}
	r := ctd.run("attach", "--iface", a.Iface, "--mode", "tc")
	checkOneLineError(t, r, "an ingress qdisc occupies the clsact slot")
	if _, err := os.Lstat(ctd.pin); !errors.Is(err, os.ErrNotExist) {
		entries, _ := filepath.Glob(filepath.Join(ctd.pin, "*"))
		t.Errorf("pin path %s exists after a failed attach (%v, entries %v)", ctd.pin, err, entries)
	}
	if got := programsOn(t, a); len(got) != 0 {
		t.Errorf("programs on %s after a failed attach: %v", a.Iface, got)
	}

	// The same attach in tcx mode does not need the clsact slot. A failed
	// tc attach over it must leave the working attachment alone.
	ctd.must("attach", "--iface", a.Iface, "--mode", "tcx")
	checkOneLineError(t, ctd.run("attach", "--iface", a.Iface, "--mode", "tc"), "an ingress qdisc occupies the clsact slot")
	if got := programsOn(t, a); len(got) != 2 {
		t.Errorf("programs on %s after a failed switch to tc: %v, want the tcx ones", a.Iface, got)
	}
	ctd.must("teardown")
}

// TestCoreTeardownOwnMount: a pin path outside /sys/fs/bpf gets a bpffs
// mounted on itself; teardown unmounts it and removes the directory.
func TestCoreTeardownOwnMount(t *testing.T) {
	bin := nettest.BuildCtd(t)
	pair := nettest.NewPair(t)
	dir, err := os.MkdirTemp("", "ctdtest-pins-")
	if err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(dir, "ctd")
	t.Cleanup(func() {
		unix.Unmount(pin, unix.MNT_DETACH)
		os.RemoveAll(dir)
	})
	ctd := &coreCLI{t: t, bin: bin, pin: pin, host: pair.A}

	ctd.must("attach", "--iface", pair.A.Iface)
	var st unix.Statfs_t
	if err := unix.Statfs(pin, &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		t.Fatalf("pin path %s after attach: statfs type %#x, %v; want a bpffs", pin, st.Type, err)
	}
	ctd.must("teardown")
	if _, err := os.Lstat(pin); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after teardown: pin path %s still exists (%v)", pin, err)
	}
	if got := programsOn(t, pair.A); len(got) != 0 {
		t.Errorf("after teardown: programs on %s: %v, want none", pair.A.Iface, got)
	}
}
