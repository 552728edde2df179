// Package explain tells why the datapath passes or drops a packet, by a dry run of the attached program on it (BPF_PROG_TEST_RUN, bpf/explain.h).
//
// The answer comes from the program that runs on the interface and the
// live maps: Run asks it for a dry run, in which it decides as for real and
// changes nothing (no conntrack entry, counter, event or rate-limit token),
// and reads back what decided. Nothing here re-implements the datapath.
package explain

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/control/ipproto"
	"github.com/ctd-dev/ctd/control/policy"
	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/datapath/pins"
	"github.com/ctd-dev/ctd/datapath/policymap"
)

// Packet is the packet to explain. Sport is the echo identifier for ICMP
// and ICMPv6 (the datapath tracks it as the source port of a request).
type Packet struct {
	Proto        uint8
	Src, Dst     netip.Addr
	Sport, Dport uint16
	Flags        uint8 // TCP flags, as in byte 13 of the header
}

// TCP flag bits.
const (
	FIN = 0x01
	SYN = 0x02
	RST = 0x04
	PSH = 0x08
	ACK = 0x10
	URG = 0x20
)

var flagNames = []struct {
	name string
	bit  uint8
}{{"syn", SYN}, {"ack", ACK}, {"fin", FIN}, {"rst", RST}, {"psh", PSH}, {"urg", URG}}

// ParseFlags reads TCP flags as a comma- or plus-separated list of names
// (SYN, ACK, FIN, RST, PSH, URG, any case): "SYN", "syn,ack", "PSH+ACK".
func ParseFlags(s string) (uint8, error) {
	var f uint8
	for _, n := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == '+' }) {
		i := slices.IndexFunc(flagNames, func(fn struct {
			name string
			bit  uint8
		}) bool {
			return strings.EqualFold(fn.name, strings.TrimSpace(n))
		})
		if i < 0 {
			return 0, fmt.Errorf("invalid --flags %q: %q is not a TCP flag; valid are SYN, ACK, FIN, RST, PSH, URG, joined by commas", s, n)
		}
		f |= flagNames[i].bit
	}
	if f == 0 {
		return 0, fmt.Errorf("invalid --flags %q: give one or more of SYN, ACK, FIN, RST, PSH, URG, joined by commas", s)
	}
	return f, nil
}

// FlagsString names flags as ParseFlags reads them ("SYN,ACK").
func FlagsString(f uint8) string {
	var names []string
	for _, fn := range flagNames {
		if f&fn.bit != 0 {
			names = append(names, strings.ToUpper(fn.name))
		}
	}
	return strings.Join(names, ",")
}

// Check reports, in one line, what makes p a packet that cannot be built.
func (p Packet) Check() error {
	if !p.Src.IsValid() || !p.Dst.IsValid() {
		return errors.New("both --src and --dst are required")
	}
	if p.Src.Is4() != p.Dst.Is4() {
		return fmt.Errorf("--src %v and --dst %v are of different address families: give two IPv4 or two IPv6 addresses", p.Src, p.Dst)
	}
	switch {
	case p.Proto == ipproto.ICMP && !p.Src.Is4():
		return fmt.Errorf("icmp is IPv4's: for IPv6 addresses use --proto icmpv6")
	case p.Proto == ipproto.ICMPv6 && p.Src.Is4():
		return fmt.Errorf("icmpv6 is IPv6's: for IPv4 addresses use --proto icmp")
	}
	if p.Flags != 0 && p.Proto != ipproto.TCP {
		return fmt.Errorf("--flags %s: TCP flags go only with --proto tcp, not %s", FlagsString(p.Flags), ipproto.Name(p.Proto))
	}
	echo := p.Proto == ipproto.ICMP || p.Proto == ipproto.ICMPv6
	if !ipproto.HasPorts(p.Proto) {
		if p.Dport != 0 || (p.Sport != 0 && !echo) {
			return fmt.Errorf("%s has no ports: --sport and --dport go only with tcp, udp and sctp (--sport is the echo identifier for icmp and icmpv6)", ipproto.Name(p.Proto))
		}
		return nil
	}
	if p.Dport == 0 {
		return fmt.Errorf("--dport is required for %s: a port 1-65535", ipproto.Name(p.Proto))
	}
	return nil
}

// Frame builds p as an Ethernet frame: for TCP a bare header with p.Flags,
// for UDP and SCTP (a DATA chunk) a few bytes of payload, for ICMP and
// ICMPv6 an echo request, for any other protocol eight bytes of zeros
// after the IP header.
func (p Packet) Frame() ([]byte, error) {
	if err := p.Check(); err != nil {
		return nil, err
	}
	eth := &layers.Ethernet{
		SrcMAC:       []byte{0x02, 0, 0, 0, 0, 1},
		DstMAC:       []byte{0x02, 0, 0, 0, 0, 2},
		EthernetType: layers.EthernetTypeIPv4,
	}
	var (
		ip gopacket.SerializableLayer
		nl gopacket.NetworkLayer
	)
	if p.Src.Is4() {
		v4 := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocol(p.Proto), Flags: layers.IPv4DontFragment,
			SrcIP: p.Src.AsSlice(), DstIP: p.Dst.AsSlice()}
		ip, nl = v4, v4
	} else {
		eth.EthernetType = layers.EthernetTypeIPv6
		v6 := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocol(p.Proto),
			SrcIP: p.Src.AsSlice(), DstIP: p.Dst.AsSlice()}
		ip, nl = v6, v6
	}
	ls := []gopacket.SerializableLayer{eth, ip}
	switch p.Proto {
	case ipproto.TCP:
		tcp := &layers.TCP{SrcPort: layers.TCPPort(p.Sport), DstPort: layers.TCPPort(p.Dport), Seq: 1, Window: 65535,
			FIN: p.Flags&FIN != 0, SYN: p.Flags&SYN != 0, RST: p.Flags&RST != 0,
			PSH: p.Flags&PSH != 0, ACK: p.Flags&ACK != 0, URG: p.Flags&URG != 0}
		if err := tcp.SetNetworkLayerForChecksum(nl); err != nil {
			return nil, err
		}
		ls = append(ls, tcp)
	case ipproto.UDP:
		udp := &layers.UDP{SrcPort: layers.UDPPort(p.Sport), DstPort: layers.UDPPort(p.Dport)}
		if err := udp.SetNetworkLayerForChecksum(nl); err != nil {
			return nil, err
		}
		ls = append(ls, udp, gopacket.Payload(make([]byte, 8)))
	case ipproto.SCTP:
		// Common header (ports, verification tag, checksum: the datapath
		// does not check it) and an empty DATA chunk.
		h := make([]byte, 12+16)
		binary.BigEndian.PutUint16(h[0:], p.Sport)
		binary.BigEndian.PutUint16(h[2:], p.Dport)
		binary.BigEndian.PutUint16(h[12+2:], 16)
		ls = append(ls, gopacket.Payload(h))
	case ipproto.ICMP:
		ls = append(ls, &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: p.Sport, Seq: 1})
	case ipproto.ICMPv6:
		icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeEchoRequest, 0)}
		if err := icmp.SetNetworkLayerForChecksum(nl); err != nil {
			return nil, err
		}
		ls = append(ls, icmp, &layers.ICMPv6Echo{Identifier: p.Sport, SeqNumber: 1})
	default:
		ls = append(ls, gopacket.Payload(make([]byte, 8)))
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		return nil, fmt.Errorf("build the packet: %w", err)
	}
	return buf.Bytes(), nil
}

// skbContext is the head of struct __sk_buff up to cb[], as
// BPF_PROG_TEST_RUN takes it (ctx_in): every other field zero. Its layout
// is the kernel's UAPI.
type skbContext struct {
	_       [10]uint32 // len .. ingress_ifindex
	Ifindex uint32
	_       uint32 // tc_index
	CB      [5]uint32
}

// skbContextOut receives struct __sk_buff (ctx_out): room for it as it is
// today (192 bytes) and as it may grow.
type skbContextOut [512]byte

// cbOffset is offsetof(struct __sk_buff, cb).
const cbOffset = 48

// Verdicts as BPF_PROG_TEST_RUN returns them.
const (
	tcActUnspec = ^uint32(0) // CTD_PASS
	tcActShot   = uint32(2)  // CTD_DROP
)

// Result is what a dry run returns: the program's verdict (true: pass) and
// the findings it wrote into cb[].
type Result struct {
	Pass bool
	bpf.CtdExplainResult
}

// Run runs prog, one of the datapath's TC programs, on frame as a dry run:
// ifindex is the interface it runs for (0: the loopback), which must be in
// the calling thread's network namespace. The caller vouches that prog is
// a build that honours the dry-run request (Check): any other would take
// the packet for real.
func Run(prog *ebpf.Program, ifindex int, frame []byte) (Result, error) {
	in := skbContext{Ifindex: uint32(ifindex)}
	in.CB[0] = uint32(bpf.CtdExplainMagicEXPLAIN_MAGIC_LO)
	in.CB[1] = uint32(bpf.CtdExplainMagicEXPLAIN_MAGIC_HI)
	var out skbContextOut
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame, Context: in, ContextOut: &out})
	if err != nil {
		return Result{}, fmt.Errorf("run program %v: %w", prog, err)
	}
	r := Result{Pass: ret == tcActUnspec}
	if !r.Pass && ret != tcActShot {
		return Result{}, fmt.Errorf("program %v returned %d: neither pass nor drop", prog, int32(ret))
	}
	cb := out[cbOffset : cbOffset+binary.Size(r.CtdExplainResult)]
	if err := binary.Read(bytes.NewReader(cb), binary.NativeEndian, &r.CtdExplainResult); err != nil {
		return Result{}, err
	}
	if binary.NativeEndian.Uint32(cb) == in.CB[0] && binary.NativeEndian.Uint32(cb[4:]) == in.CB[1] {
		return Result{}, fmt.Errorf("program %v left the dry-run request unanswered", prog)
	}
	return r, nil
}

// Check fails unless prog honours this build's dry-run request: its
// instructions as the kernel holds them compare cb[] with both words of
// this build's magic (bpf/explain.h, which changes the magic with the
// result's layout). A program without (an older ctd's, which would take
// the packet for real) or with another magic (another layout) is refused.
// The kernel's tag cannot tell: the loader rewrites instructions (CO-RE,
// subprogram calls) before the kernel hashes them.
func Check(prog *ebpf.Program, name string) error {
	info, err := prog.Info()
	if err != nil {
		return fmt.Errorf("program %s: %w", name, err)
	}
	insns, err := info.Instructions()
	if err != nil {
		return fmt.Errorf("read the instructions of program %s (needed to tell whether it has this build's dry run): %w", name, err)
	}
	var lo, hi bool
	for _, ins := range insns {
		if ins.OpCode.JumpOp() == asm.InvalidJumpOp || ins.OpCode.Source() != asm.ImmSource {
			continue
		}
		switch uint32(ins.Constant) {
		case uint32(bpf.CtdExplainMagicEXPLAIN_MAGIC_LO):
			lo = true
		case uint32(bpf.CtdExplainMagicEXPLAIN_MAGIC_HI):
			hi = true
		}
	}
	if !lo || !hi {
		return &OtherBuildError{Program: name}
	}
	return nil
}

// OtherBuildError: the attached program has no dry run of this build's.
type OtherBuildError struct {
	Iface   string
	Program string
}

func (e *OtherBuildError) Error() string {
	return fmt.Sprintf("the %s program attached to %s has no dry run of this ctd's (an older ctd's program would take the packet for real): attach this build ('ctd attach %s' or restart 'ctd daemon') or run the ctd that attached it",
		e.Program, e.Iface, e.Iface)
}

// Request is a packet to explain on an interface, in one direction.
type Request struct {
	Iface string
	Dir   bpf.Direction
	Packet
}

// Explain runs the program ctd attached to req's interface and direction
// (found through d's pinned links: Attachments) on req's packet as a dry
// run, and tells what decided; only a program with this build's dry run
// (Check). The calling thread must be in the interface's network
// namespace.
func Explain(d pins.Dir, req Request) (Answer, error) {
	frame, err := req.Frame()
	if err != nil {
		return Answer{}, err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	at, err := d.Attachments()
	if err != nil {
		return Answer{}, err
	}
	i := slices.IndexFunc(at, func(a attach.Attachment) bool { return a.Iface == req.Iface })
	if i < 0 {
		return Answer{}, notAttached(d, req.Iface, at)
	}
	id, name := at[i].IngressProgID, "ctd_ingress"
	if req.Dir == bpf.Egress {
		id, name = at[i].EgressProgID, "ctd_egress"
	}
	prog, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return Answer{}, fmt.Errorf("open the %s program of %s (ID %d): %w", req.Dir, req.Iface, id, err)
	}
	defer prog.Close()
	if err := Check(prog, name); err != nil {
		var ob *OtherBuildError
		if errors.As(err, &ob) {
			ob.Iface = req.Iface
		}
		return Answer{}, err
	}
	r, err := Run(prog, at[i].Ifindex, frame)
	if err != nil {
		return Answer{}, err
	}
	return AnswerOf(req, r), nil
}

// notAttached says why iface has no program of this datapath to run.
func notAttached(d pins.Dir, iface string, at []attach.Attachment) error {
	if _, err := attach.Status(iface, ""); errors.Is(err, attach.ErrInterfaceNotFound) {
		return fmt.Errorf("invalid --iface %q: no such interface in this network namespace", iface)
	}
	names := make([]string, len(at))
	for i, a := range at {
		names[i] = a.Iface
	}
	attached := "it is attached to none"
	if len(names) > 0 {
		attached = "it is attached to " + strings.Join(names, ", ")
	}
	return fmt.Errorf("invalid --iface %q: the ctd datapath at %s is not attached to it (%s)", iface, d.Path(), attached)
}

// Answer is the explanation of a packet's verdict.
type Answer struct {
	Iface       string `json:"iface"`
	Dir         string `json:"dir"`
	Verdict     string `json:"verdict"` // allow or drop
	Reason      string `json:"reason"`  // as ctd metrics names it
	SrcIdentity uint32 `json:"src_identity"`
	DstIdentity uint32 `json:"dst_identity"`
	// Rule is the policy rule that decided (as ctd policy prints it), or
	// "DIR default VERDICT"; empty when no policy judged the packet.
	Rule string `json:"rule"`
	// CTState is the state of the conntrack entry the packet hits, as ct
	// list names it (ESTABLISHED, SYN_SENT, NEW, ...), "new" when there is
	// none (the packet opens a flow), "untracked" when the datapath does
	// not track the packet.
	CTState string `json:"ct_state"`
	// CTTable is the table holding the entry: confirmed or unconfirmed.
	CTTable string `json:"ct_table,omitempty"`
	// CTFlags are the entry's flags, as ct list names them.
	CTFlags []string `json:"ct_flags,omitempty"`
}

// AnswerOf reads a dry run's result r for req.
func AnswerOf(req Request, r Result) Answer {
	a := Answer{
		Iface:       req.Iface,
		Dir:         req.Dir.String(),
		Verdict:     "drop",
		Reason:      metricsmap.Reason(r.Reason).String(),
		SrcIdentity: r.SrcIdentity,
		DstIdentity: r.DstIdentity,
		CTState:     "untracked",
	}
	if r.Pass {
		a.Verdict = "allow"
	}
	// A rule or the default decided for the packet the way it went: the
	// policy's verdict is the packet's unless it dropped for another
	// reason than the policy (which comes after the policy only when the
	// policy allowed).
	policyVerdict := policymap.Allow
	if metricsmap.Reason(r.Reason) == metricsmap.DropPolicy {
		policyVerdict = policymap.Deny
	}
	switch bpf.CtdExplainBy(r.By) {
	case bpf.CtdExplainByEXPLAIN_BY_RULE:
		a.Rule = policy.Format(policymap.Rule{Dir: req.Dir, Identity: r.RuleIdentity, Proto: r.RuleProto, Port: r.RulePort, Verdict: policyVerdict})
	case bpf.CtdExplainByEXPLAIN_BY_DEFAULT:
		a.Rule = req.Dir.String() + " default " + policyVerdict.String()
	}
	switch bpf.CtdExplainCt(r.Ct) {
	case bpf.CtdExplainCtEXPLAIN_CT_NEW:
		a.CTState = "new"
	case bpf.CtdExplainCtEXPLAIN_CT_CONFIRMED, bpf.CtdExplainCtEXPLAIN_CT_UNCONFIRMED:
		a.CTState = ctmap.State(r.CtState).String()
		a.CTTable = "unconfirmed"
		if bpf.CtdExplainCt(r.Ct) == bpf.CtdExplainCtEXPLAIN_CT_CONFIRMED {
			a.CTTable = "confirmed"
		}
		a.CTFlags = conntrack.FlagNames(r.CtFlags)
	}
	return a
}
