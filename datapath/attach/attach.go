// Package attach attaches ctd's ingress/egress TC programs to network interfaces via TCX or clsact.
//
// All functions work in the network namespace of the calling OS thread: they
// lock the goroutine to its thread for their duration and open their netlink
// sockets there. A caller that switched only its own thread into another
// namespace must hold runtime.LockOSThread across the call; a process started
// with `nsenter --net=...` needs nothing special.
//
// TCX links are pinned below a bpffs directory linkDir as
// <linkDir>/<iface>/ingress and <linkDir>/<iface>/egress, so they survive the
// process and can be updated in place later. Pins are keyed by interface
// name, so use one linkDir per network namespace.
//
// In tc mode ctd owns exactly one cls_bpf filter per direction, identified by
// TCPriority and TCHandle below the clsact qdisc. The clsact qdisc itself is
// created when missing and never removed, since other tools may share it.
package attach

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	tc "github.com/florianl/go-tc"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
)

// Mode selects the attachment mechanism.
type Mode string

const (
	// ModeAuto uses TCX when the kernel supports it (Linux 6.6+), else tc.
	ModeAuto Mode = "auto"
	// ModeTCX attaches bpf_links to the TCX hooks, pinned in linkDir.
	ModeTCX Mode = "tcx"
	// ModeTC attaches direct-action cls_bpf filters below a clsact qdisc.
	ModeTC Mode = "tc"
)

// ParseMode parses a --mode flag value.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ModeAuto, ModeTCX, ModeTC:
		return m, nil
	}
	return "", fmt.Errorf("invalid --mode %q: valid modes are auto, tcx, tc", s)
}

// Programs is the pair of SchedCLS programs to attach.
type Programs struct {
	Ingress, Egress *ebpf.Program
}

// Attachment describes what ctd has attached to one interface.
// Mode is empty and the program IDs are zero when nothing is attached.
type Attachment struct {
	Iface         string
	Ifindex       int
	Mode          Mode
	IngressProgID ebpf.ProgramID
	EgressProgID  ebpf.ProgramID
}

// ErrInterfaceNotFound is matched (errors.Is) by errors about a missing interface.
var ErrInterfaceNotFound = errors.New("interface not found")

type notFoundError string

func (e notFoundError) Error() string        { return fmt.Sprintf("interface %q not found", string(e)) }
func (e notFoundError) Is(target error) bool { return target == ErrInterfaceNotFound }

// Attach attaches progs to iface in the given mode, replacing what ctd had
// attached there before without a moment where no ctd program runs:
// TCX links are updated in place, tc filters are replaced atomically, and on a
// mode switch the new mode is attached before the old one is removed.
// Calling it again with the same arguments is a no-op. A pinned TCX link that
// was severed because the interface was deleted (and maybe recreated) is
// replaced by a fresh link. In auto mode TCX is used if the kernel supports
// it, else tc. The returned Attachment reports the resolved mode.
//
// If attaching the second direction fails, the first one keeps the new
// program; calling Attach again converges.
func Attach(iface string, mode Mode, progs Programs, linkDir string) (Attachment, error) {
	if _, err := ParseMode(string(mode)); err != nil {
		return Attachment{}, fmt.Errorf("attach to %s: invalid mode %q: valid modes are auto, tcx, tc", iface, mode)
	}
	if progs.Ingress == nil || progs.Egress == nil {
		return Attachment{}, fmt.Errorf("attach to %s: both an ingress and an egress program are required", iface)
	}
	if linkDir == "" {
		return Attachment{}, fmt.Errorf("attach to %s: link pin directory is empty", iface)
	}

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	s, err := open()
	if err != nil {
		return Attachment{}, fmt.Errorf("attach to %s: %w", iface, err)
	}
	defer s.close()

	ifindex, err := s.ifindex(iface)
	if err != nil {
		return Attachment{}, err
	}

	if mode == ModeAuto {
		mode = ModeTC
		if haveTCX(ifindex) {
			mode = ModeTCX
		}
	}

	switch mode {
	case ModeTCX:
		for _, d := range directions() {
			if err := attachTCX(ifindex, d, d.prog(progs), linkDir, iface); err != nil {
				return Attachment{}, fmt.Errorf("attach %s to %s: %w", d, iface, err)
			}
		}
		if err := s.removeTC(ifindex); err != nil {
			return Attachment{}, fmt.Errorf("attach to %s: remove previous tc filters: %w", iface, err)
		}
	case ModeTC:
		if err := s.ensureClsact(ifindex, iface); err != nil {
			return Attachment{}, fmt.Errorf("attach to %s: %w", iface, err)
		}
		for _, d := range directions() {
			if err := s.replaceFilter(ifindex, d, d.prog(progs)); err != nil {
				return Attachment{}, fmt.Errorf("attach %s to %s: %w", d, iface, err)
			}
		}
		if err := detachTCX(linkDir, iface); err != nil {
			return Attachment{}, fmt.Errorf("attach to %s: remove previous tcx links: %w", iface, err)
		}
	}

	a, err := s.status(iface, ifindex, linkDir)
	if err != nil {
		return Attachment{}, fmt.Errorf("attach to %s: read back: %w", iface, err)
	}
	return a, nil
}

// Detach removes ctd's programs from iface: it detaches and unpins the TCX
// links and deletes ctd's tc filters, leaving anything else (including the
// clsact qdisc) alone. Nothing attached is not an error. If iface no longer
// exists, its stale pins are removed and Detach returns nil.
func Detach(iface string, linkDir string) error {
	if err := checkIfaceName(iface); err != nil {
		return fmt.Errorf("detach from %s: %w", iface, err)
	}

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	s, err := open()
	if err != nil {
		return fmt.Errorf("detach from %s: %w", iface, err)
	}
	defer s.close()

	var errs []error
	if linkDir != "" {
		if err := detachTCX(linkDir, iface); err != nil {
			errs = append(errs, err)
		}
	}
	ifindex, err := s.ifindex(iface)
	switch {
	case errors.Is(err, ErrInterfaceNotFound):
	case err != nil:
		errs = append(errs, err)
	default:
		if err := s.removeTC(ifindex); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("detach from %s: %w", iface, err)
	}
	return nil
}

// Status reports what ctd has attached to iface. Pinned TCX links that are
// severed (the interface was recreated) do not count as attached.
func Status(iface string, linkDir string) (Attachment, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	s, err := open()
	if err != nil {
		return Attachment{}, fmt.Errorf("status of %s: %w", iface, err)
	}
	defer s.close()

	ifindex, err := s.ifindex(iface)
	if err != nil {
		return Attachment{}, err
	}
	a, err := s.status(iface, ifindex, linkDir)
	if err != nil {
		return Attachment{}, fmt.Errorf("status of %s: %w", iface, err)
	}
	return a, nil
}

// List reports every interface of the current network namespace that has a
// ctd program attached: TCX interfaces are found through the pins in linkDir,
// tc interfaces by looking for ctd's filters below each clsact qdisc.
// Stale pins of deleted or recreated interfaces are not reported.
// The result is sorted by interface name.
func List(linkDir string) ([]Attachment, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	s, err := open()
	if err != nil {
		return nil, fmt.Errorf("list attachments: %w", err)
	}
	defer s.close()

	names, err := PinnedIfaces(linkDir)
	if err != nil {
		return nil, fmt.Errorf("list attachments: %w", err)
	}
	tcNames, err := s.tcIfaces()
	if err != nil {
		return nil, fmt.Errorf("list attachments: %w", err)
	}
	for _, n := range tcNames {
		if !slices.Contains(names, n) {
			names = append(names, n)
		}
	}

	slices.Sort(names)
	var out []Attachment
	for _, name := range names {
		ifindex, err := s.ifindex(name)
		if errors.Is(err, ErrInterfaceNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list attachments: %w", err)
		}
		a, err := s.status(name, ifindex, linkDir)
		if err != nil {
			return nil, fmt.Errorf("list attachments: status of %s: %w", name, err)
		}
		if a.Mode != "" {
			out = append(out, a)
		}
	}
	return out, nil
}

// session holds the netlink sockets of one call, opened in the calling
// thread's network namespace.
type session struct {
	nl *netlink.Handle
	tc *tc.Tc
}

func open() (*session, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("open rtnetlink socket: %w", err)
	}
	t, err := tc.Open(&tc.Config{})
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("open tc netlink socket: %w", err)
	}
	return &session{nl: h, tc: t}, nil
}

func (s *session) close() {
	s.tc.Close()
	s.nl.Close()
}

// ifindex looks iface up, so that nothing is done to a missing interface.
func (s *session) ifindex(iface string) (int, error) {
	if err := checkIfaceName(iface); err != nil {
		return 0, err
	}
	l, err := s.nl.LinkByName(iface)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
		return 0, notFoundError(iface)
	}
	if err != nil {
		return 0, fmt.Errorf("look up interface %q: %w", iface, err)
	}
	return l.Attrs().Index, nil
}

func (s *session) status(iface string, ifindex int, linkDir string) (Attachment, error) {
	a := Attachment{Iface: iface, Ifindex: ifindex}

	var tcxIDs, tcIDs [2]ebpf.ProgramID
	for i, d := range directions() {
		id, err := tcxProgram(linkDir, iface, d, ifindex)
		if err != nil {
			return Attachment{}, err
		}
		tcxIDs[i] = id

		fs, err := s.filters(ifindex, d)
		if err != nil {
			return Attachment{}, fmt.Errorf("list %s tc filters: %w", d, err)
		}
		if len(fs) > 0 && fs[0].BPF.ID != nil {
			tcIDs[i] = ebpf.ProgramID(*fs[0].BPF.ID)
		}
	}

	switch {
	case tcxIDs != [2]ebpf.ProgramID{}:
		a.Mode, a.IngressProgID, a.EgressProgID = ModeTCX, tcxIDs[0], tcxIDs[1]
	case tcIDs != [2]ebpf.ProgramID{}:
		a.Mode, a.IngressProgID, a.EgressProgID = ModeTC, tcIDs[0], tcIDs[1]
	}
	return a, nil
}

// checkIfaceName rejects names that cannot be interfaces, which also keeps
// pin paths inside linkDir.
func checkIfaceName(iface string) error {
	if iface == "" || iface == "." || iface == ".." || len(iface) >= unix.IFNAMSIZ ||
		strings.ContainsAny(iface, "/ \t\n:") {
		return fmt.Errorf("invalid interface name %q", iface)
	}
	return nil
}

// direction is one of the two hooks ctd attaches to, and how each
// mechanism names it. Its String ("ingress", "egress") is also the name of
// its link pin.
type direction struct {
	bpf.Direction
	tcx       ebpf.AttachType // TCX attach type
	clsactMin uint32          // minor of the clsact parent handle
	filter    string          // cls_bpf filter name
}

func directions() [2]direction {
	return [2]direction{
		{Direction: bpf.Ingress, tcx: ebpf.AttachTCXIngress, clsactMin: tc.HandleMinIngress, filter: "ctd_ingress"},
		{Direction: bpf.Egress, tcx: ebpf.AttachTCXEgress, clsactMin: tc.HandleMinEgress, filter: "ctd_egress"},
	}
}

func (d direction) prog(p Programs) *ebpf.Program {
	if d.Direction == bpf.Ingress {
		return p.Ingress
	}
	return p.Egress
}

// haveTCX probes for TCX without side effects: querying a TCX hook fails on
// kernels without TCX and reports revision >= 1 on kernels with it.
func haveTCX(ifindex int) bool {
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: ebpf.AttachTCXIngress})
	return err == nil && res.Revision != 0
}
