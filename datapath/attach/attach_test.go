package attach

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/bpffs"
	"github.com/ctd-dev/ctd/test/nettest"
)

const testIface = "veth0"

func randomSuffix(t *testing.T) string {
	t.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// env is a fresh network namespace (entered by the test's locked thread)
// with a veth pair, plus a private link pin directory.
type env struct {
	linkDir string
}

func setup(t *testing.T) env {
	t.Helper()
	nettest.RequireRoot(t)
	name := "ctdattach-" + randomSuffix(t)

	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("get current netns: %v", err)
	}
	ns, err := netns.NewNamed(name) // also switches this thread into it
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		t.Fatalf("create netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := netns.Set(orig); err != nil {
			// Leave the thread locked so that it exits with the test goroutine.
			t.Errorf("restore netns: %v", err)
		} else {
			runtime.UnlockOSThread()
		}
		ns.Close()
		orig.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})

	root := filepath.Join(bpffs.DefaultRoot, name)
	linkDir := filepath.Join(root, "links")
	if err := bpffs.Ensure(linkDir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(root); err != nil {
			t.Errorf("remove pins: %v", err)
		}
	})

	addVeth(t)
	return env{linkDir: linkDir}
}

func addVeth(t *testing.T) {
	t.Helper()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: testIface}, PeerName: "veth1"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	for _, n := range []string{testIface, "veth1"} {
		l, err := netlink.LinkByName(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
}

func delVeth(t *testing.T) {
	t.Helper()
	l, err := netlink.LinkByName(testIface)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkDel(l); err != nil {
		t.Fatal(err)
	}
}

func ifindex(t *testing.T) int {
	t.Helper()
	l, err := netlink.LinkByName(testIface)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().Index
}

// progPair loads a trivial ingress/egress pair returning TC_ACT_OK.
func progPair(t *testing.T) (Programs, [2]ebpf.ProgramID) {
	t.Helper()
	var ps [2]*ebpf.Program
	var ids [2]ebpf.ProgramID
	for i := range ps {
		p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type:         ebpf.SchedCLS,
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
			License:      "GPL",
		})
		if err != nil {
			t.Fatalf("load program: %v", err)
		}
		t.Cleanup(func() { p.Close() })
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, ok := info.ID()
		if !ok {
			t.Fatal("no program ID")
		}
		ps[i], ids[i] = p, id
	}
	return Programs{Ingress: ps[0], Egress: ps[1]}, ids
}

// state is what the kernel reports on testIface, independent of the package:
// per direction, the TCX program IDs and ctd's tc filters' program IDs.
type state struct {
	tcx [2][]ebpf.ProgramID
	tc  [2][]ebpf.ProgramID
}

func observe(t *testing.T) state {
	t.Helper()
	l, err := netlink.LinkByName(testIface)
	if err != nil {
		t.Fatal(err)
	}
	var s state
	for i, d := range directions() {
		res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: d.tcx})
		if err != nil {
			t.Fatalf("query tcx %s: %v", d, err)
		}
		for _, p := range res.Programs {
			s.tcx[i] = append(s.tcx[i], p.ID)
		}
		fs, err := netlink.FilterList(l, clsactParent(d))
		if err != nil {
			t.Fatalf("list %s filters: %v", d, err)
		}
		for _, f := range fs {
			bf, ok := f.(*netlink.BpfFilter)
			if !ok || !strings.HasPrefix(bf.Name, "ctd_") {
				continue
			}
			if bf.Name != d.filter || bf.Priority != TCPriority || bf.Handle != TCHandle || !bf.DirectAction {
				t.Errorf("unexpected ctd filter %+v", bf)
			}
			s.tc[i] = append(s.tc[i], ebpf.ProgramID(bf.Id))
		}
	}
	return s
}

// tcxLinkIDs returns the IDs of the TCX links on testIface, per direction.
func tcxLinkIDs(t *testing.T) [2][]link.ID {
	t.Helper()
	var ids [2][]link.ID
	for i, d := range directions() {
		res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex(t), Attach: d.tcx})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range res.Programs {
			id, _ := p.LinkID()
			ids[i] = append(ids[i], id)
		}
	}
	return ids
}

// want is the state with ids attached in mode m (nothing if m is empty).
func want(m Mode, ids [2]ebpf.ProgramID) state {
	var s state
	for i := range ids {
		switch m {
		case ModeTCX:
			s.tcx[i] = []ebpf.ProgramID{ids[i]}
		case ModeTC:
			s.tc[i] = []ebpf.ProgramID{ids[i]}
		}
	}
	return s
}

func checkState(t *testing.T, e env, m Mode, ids [2]ebpf.ProgramID) {
	t.Helper()
	got, exp := observe(t), want(m, ids)
	for i := range 2 {
		if !slices.Equal(got.tcx[i], exp.tcx[i]) || !slices.Equal(got.tc[i], exp.tc[i]) {
			t.Fatalf("kernel state: tcx %v tc %v, want tcx %v tc %v", got.tcx, got.tc, exp.tcx, exp.tc)
		}
	}

	st, err := Status(testIface, e.linkDir)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	wantSt := Attachment{Iface: testIface, Ifindex: ifindex(t), Mode: m}
	if m != "" {
		wantSt.IngressProgID, wantSt.EgressProgID = ids[0], ids[1]
	}
	if st != wantSt {
		t.Fatalf("Status = %+v, want %+v", st, wantSt)
	}

	list, err := List(e.linkDir)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	var wantList []Attachment
	if m != "" {
		wantList = []Attachment{wantSt}
	}
	if !slices.Equal(list, wantList) {
		t.Fatalf("List = %+v, want %+v", list, wantList)
	}

	pins := filepath.Join(e.linkDir, testIface)
	_, err = os.Stat(pins)
	if hasPins := err == nil; hasPins != (m == ModeTCX) {
		t.Fatalf("pin directory %s exists = %v in mode %q", pins, hasPins, m)
	}
}

func attach(t *testing.T, e env, m Mode, p Programs, wantMode Mode, ids [2]ebpf.ProgramID) {
	t.Helper()
	a, err := Attach(testIface, m, p, e.linkDir)
	if err != nil {
		t.Fatalf("Attach(%s): %v", m, err)
	}
	exp := Attachment{Iface: testIface, Ifindex: ifindex(t), Mode: wantMode, IngressProgID: ids[0], EgressProgID: ids[1]}
	if a != exp {
		t.Fatalf("Attach(%s) = %+v, want %+v", m, a, exp)
	}
}

var modes = []Mode{ModeTCX, ModeTC}

func TestAttachReplaceDetach(t *testing.T) {
	for _, m := range modes {
		t.Run(string(m), func(t *testing.T) {
			e := setup(t)
			progsA, idsA := progPair(t)
			progsB, idsB := progPair(t)

			attach(t, e, m, progsA, m, idsA)
			checkState(t, e, m, idsA)

			attach(t, e, m, progsA, m, idsA) // idempotent
			checkState(t, e, m, idsA)

			linksA := tcxLinkIDs(t)
			attach(t, e, m, progsB, m, idsB) // replace in place
			checkState(t, e, m, idsB)
			if linksB := tcxLinkIDs(t); !slices.Equal(linksA[0], linksB[0]) || !slices.Equal(linksA[1], linksB[1]) {
				t.Fatalf("tcx links changed from %v to %v, want an in-place update", linksA, linksB)
			}

			if err := Detach(testIface, e.linkDir); err != nil {
				t.Fatalf("Detach: %v", err)
			}
			checkState(t, e, "", idsB)

			if err := Detach(testIface, e.linkDir); err != nil {
				t.Fatalf("second Detach: %v", err)
			}
		})
	}
}

func TestAttachAuto(t *testing.T) {
	e := setup(t)
	p, ids := progPair(t)
	wantMode := ModeTC
	if haveTCX(ifindex(t)) {
		wantMode = ModeTCX
	}
	attach(t, e, ModeAuto, p, wantMode, ids)
	checkState(t, e, wantMode, ids)
}

func TestModeSwitch(t *testing.T) {
	for _, tt := range []struct{ from, to Mode }{
		{ModeTC, ModeTCX},
		{ModeTCX, ModeTC},
	} {
		t.Run(string(tt.from)+"-to-"+string(tt.to), func(t *testing.T) {
			e := setup(t)
			progsA, idsA := progPair(t)
			progsB, idsB := progPair(t)

			attach(t, e, tt.from, progsA, tt.from, idsA)
			checkState(t, e, tt.from, idsA)
			attach(t, e, tt.to, progsB, tt.to, idsB)
			checkState(t, e, tt.to, idsB)
		})
	}
}

func TestSeveredInterface(t *testing.T) {
	for _, m := range modes {
		t.Run(string(m), func(t *testing.T) {
			e := setup(t)
			progs, ids := progPair(t)
			attach(t, e, m, progs, m, ids)

			delVeth(t)
			addVeth(t)

			// A severed TCX link still pinned is not reported as attached.
			st, err := Status(testIface, e.linkDir)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode != "" {
				t.Fatalf("Status after recreating %s = %+v, want nothing attached", testIface, st)
			}

			attach(t, e, m, progs, m, ids)
			checkState(t, e, m, ids)
		})
	}
}

func TestMissingInterface(t *testing.T) {
	e := setup(t)
	progs, _ := progPair(t)

	_, err := Attach("nope", ModeTCX, progs, e.linkDir)
	if err == nil || err.Error() != `interface "nope" not found` || !errors.Is(err, ErrInterfaceNotFound) {
		t.Fatalf("Attach(nope) error = %v", err)
	}
	if _, err := Status("nope", e.linkDir); !errors.Is(err, ErrInterfaceNotFound) {
		t.Fatalf("Status(nope) error = %v", err)
	}
	if err := Detach("nope", e.linkDir); err != nil {
		t.Fatalf("Detach(nope) = %v, want nil", err)
	}
	if _, err := os.Stat(filepath.Join(e.linkDir, "nope")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Attach(nope) left a pin directory: %v", err)
	}

	// Detaching a deleted interface removes its stale pins.
	attach(t, e, ModeTCX, progs, ModeTCX, mustIDs(t, progs))
	delVeth(t)
	if err := Detach(testIface, e.linkDir); err != nil {
		t.Fatalf("Detach(deleted iface) = %v, want nil", err)
	}
	if _, err := os.Stat(filepath.Join(e.linkDir, testIface)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale pins remain: %v", err)
	}
}

func mustIDs(t *testing.T, p Programs) [2]ebpf.ProgramID {
	t.Helper()
	var ids [2]ebpf.ProgramID
	for i, prog := range []*ebpf.Program{p.Ingress, p.Egress} {
		info, err := prog.Info()
		if err != nil {
			t.Fatal(err)
		}
		ids[i], _ = info.ID()
	}
	return ids
}

func TestLeavesOthersAlone(t *testing.T) {
	e := setup(t)
	l, err := netlink.LinkByName(testIface)
	if err != nil {
		t.Fatal(err)
	}
	foreign, foreignIDs := progPair(t)
	ours, ourIDs := progPair(t)

	// A foreign TCX program, held by this test's FD, and a foreign tc filter.
	fl, err := link.AttachTCX(link.TCXOptions{Interface: l.Attrs().Index, Program: foreign.Ingress, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		t.Fatal(err)
	}
	defer fl.Close()
	if err := netlink.QdiscAdd(&netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: l.Attrs().Index, Handle: clsactHandle, Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}); err != nil {
		t.Fatal(err)
	}
	ff := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: l.Attrs().Index, Parent: clsactParent(directions()[1]),
			Handle: 1, Priority: 1, Protocol: unix.ETH_P_ALL,
		},
		Fd: foreign.Egress.FD(), Name: "foreign", DirectAction: true,
	}
	if err := netlink.FilterAdd(ff); err != nil {
		t.Fatal(err)
	}

	for _, m := range []Mode{ModeTC, ModeTCX, ModeTC} {
		attach(t, e, m, ours, m, ourIDs)
		if err := Detach(testIface, e.linkDir); err != nil {
			t.Fatal(err)
		}
	}

	res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Programs) != 1 || res.Programs[0].ID != foreignIDs[0] {
		t.Errorf("tcx ingress programs = %+v, want only the foreign one", res.Programs)
	}
	fs, err := netlink.FilterList(l, ff.Parent)
	if err != nil {
		t.Fatal(err)
	}
	if len(fs) != 1 || fs[0].(*netlink.BpfFilter).Name != "foreign" {
		t.Errorf("egress filters = %+v, want only the foreign one", fs)
	}
}

func TestParseMode(t *testing.T) {
	for _, tt := range []struct {
		in      string
		want    Mode
		wantErr string
	}{
		{in: "auto", want: ModeAuto},
		{in: "tcx", want: ModeTCX},
		{in: "tc", want: ModeTC},
		{in: "foo", wantErr: `invalid --mode "foo": valid modes are auto, tcx, tc`},
		{in: "", wantErr: `invalid --mode "": valid modes are auto, tcx, tc`},
		{in: "TCX", wantErr: `invalid --mode "TCX": valid modes are auto, tcx, tc`},
	} {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseMode(tt.in)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("ParseMode(%q) error = %v, want %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseMode(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
			}
		})
	}
}

func TestInvalidArguments(t *testing.T) {
	progs := Programs{}
	for _, tt := range []struct {
		name    string
		iface   string
		mode    Mode
		linkDir string
		wantErr string
	}{
		{"bad mode", "veth0", "xdp", "/sys/fs/bpf/x", `attach to veth0: invalid mode "xdp": valid modes are auto, tcx, tc`},
		{"missing programs", "veth0", ModeTC, "/sys/fs/bpf/x", "attach to veth0: both an ingress and an egress program are required"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Attach(tt.iface, tt.mode, progs, tt.linkDir)
			if err == nil || err.Error() != tt.wantErr {
				t.Fatalf("Attach error = %v, want %q", err, tt.wantErr)
			}
		})
	}
	if err := Detach("../etc", "/sys/fs/bpf/x"); err == nil {
		t.Fatal("Detach accepted a path as interface name")
	}
}
