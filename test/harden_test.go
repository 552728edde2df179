package test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/test/nettest"
)

const bpffsRoot = nettest.BPFFSRoot

// hardenCLI runs the ctd binary in the test's own network namespace against
// one pin path and state directory.
type hardenCLI struct {
	t        *testing.T
	bin      string
	pin      string
	stateDir string
}

func newHardenCLI(t *testing.T) *hardenCLI {
	return &hardenCLI{t: t, bin: nettest.BuildCtd(t), pin: nettest.PinPath(t), stateDir: t.TempDir()}
}

func (c *hardenCLI) run(args ...string) cliResult {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// A store belongs to one pin path: one state directory per pin path.
	state := filepath.Join(c.stateDir, strings.ReplaceAll(strings.Trim(c.pin, "/"), "/", "_"))
	full := append([]string{"--pin-path", c.pin, "--state-dir", state}, args...)
	return runCmd(c.t, exec.CommandContext(ctx, c.bin, full...))
}

// startLogged starts cmd with its stderr in a buffer; the channel gets
// cmd.Wait's result. A cmd still running when the test ends is killed.
func startLogged(t *testing.T, cmd *exec.Cmd) (*syncBuffer, <-chan error) {
	t.Helper()
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() }) // ErrProcessDone once it exited
	return stderr, done
}

// TestLongInputQuotedShort: an error quotes at most 80 characters of the
// offending input, however long the input (a 200 KB line, argument or flag).
func TestLongInputQuotedShort(t *testing.T) {
	ctd := newHardenCLI(t)
	long := strings.Repeat("x", 200<<10) // the file's bad line
	arg := long[:100<<10]                // an argument's limit is 128 KiB
	file := filepath.Join(t.TempDir(), "prefixes")
	if err := os.WriteFile(file, []byte("198.51.100.0/24 id=7\n"+long+" id=8\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"ipcache load line", []string{"ipcache", "load", file}, "line 2: "},
		{"ipcache add CIDR", []string{"ipcache", "add", arg, "id=7"}, "invalid CIDR"},
		{"policy add identity", []string{"policy", "add", "ingress", "id=" + arg, "allow"}, "invalid identity"},
		{"ct list proto", []string{"ct", "list", "--proto", arg}, "invalid --proto"},
		{"flag value", []string{"attach", "--iface", "lo", "--ct-max", arg}, "invalid argument"},
		{"unknown flag", []string{"status", "--" + arg}, "unknown flag"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := ctd.run(tc.args...)
			checkOneLineError(t, r, tc.want)
			if !strings.Contains(r.stderr, strings.Repeat("x", 40)) {
				t.Errorf("stderr %q does not quote the start of the input", r.stderr)
			}
			if strings.Contains(r.stderr, strings.Repeat("x", 81)) {
				t.Errorf("stderr quotes more than 80 characters of the input (%d bytes: %.200q...)", len(r.stderr), r.stderr)
			}
		})
	}
}

// outsidePinPath returns a pin path below a fresh directory outside
// /sys/fs/bpf (so ctd mounts a bpffs of its own), unmounted and removed when
// the test ends.
func (c *hardenCLI) outsidePinPath(name string) string {
	dir := c.t.TempDir()
	pin := filepath.Join(dir, name)
	c.t.Cleanup(func() {
		for range 4 {
			if unix.Unmount(pin, unix.MNT_DETACH) != nil {
				break
			}
		}
	})
	c.pin = pin
	return pin
}

// TestPinPathOwnership: ctd never mounts a bpffs over a directory that holds
// files, never removes a directory it did not create, and a command that
// fails takes back the mount, directory and pins it made.
func TestPinPathOwnership(t *testing.T) {
	ctd := newHardenCLI(t)
	add := []string{"ipcache", "add", "198.51.100.0/24", "id=7"}

	t.Run("non-empty directory is refused", func(t *testing.T) {
		pin := ctd.outsidePinPath("full")
		if err := os.MkdirAll(pin, 0o755); err != nil {
			t.Fatal(err)
		}
		keep := filepath.Join(pin, "operator-file")
		if err := os.WriteFile(keep, []byte("mine"), 0o600); err != nil {
			t.Fatal(err)
		}
		checkOneLineError(t, ctd.run(add...), "ctd mounts one only on an empty directory: "+pin+" holds operator-file")
		if nettest.MountedAt(t, pin) {
			t.Errorf("a filesystem is mounted on %s after the refusal", pin)
		}
		if data, err := os.ReadFile(keep); err != nil || string(data) != "mine" {
			t.Errorf("%s after the refusal: %q, %v", keep, data, err)
		}
	})

	t.Run("existing empty directory is kept by teardown", func(t *testing.T) {
		pin := ctd.outsidePinPath("empty")
		if err := os.Mkdir(pin, 0o755); err != nil {
			t.Fatal(err)
		}
		if r := ctd.run(add...); r.exitCode != 0 {
			t.Fatalf("ipcache add: exit %d: %s", r.exitCode, r.stderr)
		}
		if !nettest.MountedAt(t, pin) {
			t.Fatalf("no bpffs mounted on %s", pin)
		}
		r := ctd.run("teardown")
		if r.exitCode != 0 || !strings.Contains(r.stdout, "kept "+pin+": ctd did not create it") {
			t.Fatalf("teardown: exit %d, stdout %q, stderr %q; want it to keep %s", r.exitCode, r.stdout, r.stderr, pin)
		}
		if nettest.MountedAt(t, pin) {
			t.Errorf("teardown left the bpffs ctd mounted on %s", pin)
		}
		if entries, err := os.ReadDir(pin); err != nil || len(entries) != 0 {
			t.Errorf("after teardown %s holds %v (%v), want the empty directory it was", pin, entries, err)
		}
	})

	t.Run("directory ctd created is removed by teardown", func(t *testing.T) {
		pin := ctd.outsidePinPath("new")
		if r := ctd.run(add...); r.exitCode != 0 {
			t.Fatalf("ipcache add: exit %d: %s", r.exitCode, r.stderr)
		}
		if r := ctd.run("teardown"); r.exitCode != 0 || r.stdout != "removed "+pin+"\n" {
			t.Fatalf("teardown: exit %d, stdout %q, stderr %q", r.exitCode, r.stdout, r.stderr)
		}
		if _, err := os.Lstat(pin); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("after teardown %s exists (%v)", pin, err)
		}
	})

	// ipcache load checks that the file fits the tries after it created
	// them: a file of 3 prefixes into tries of 2 fails there.
	file := filepath.Join(t.TempDir(), "prefixes")
	if err := os.WriteFile(file, []byte("198.51.100.0/26 id=7\n198.51.100.64/26 id=7\n198.51.100.128/26 id=7\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	load := []string{"ipcache", "load", file, "--ipcache-max", "2"}
	for _, tc := range []struct {
		name string
		pin  func() string
	}{
		{"failed command outside /sys/fs/bpf leaves nothing", func() string { return ctd.outsidePinPath("failed") }},
		{"failed command below /sys/fs/bpf leaves nothing", func() string { ctd.pin = nettest.PinPath(t); return ctd.pin }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pin := tc.pin()
			checkOneLineError(t, ctd.run(load...), "holds at most 2 prefixes")
			if nettest.MountedAt(t, pin) {
				t.Errorf("the failed command left a bpffs mounted on %s", pin)
			}
			if _, err := os.Lstat(pin); !errors.Is(err, os.ErrNotExist) {
				entries, _ := os.ReadDir(pin)
				t.Errorf("the failed command left %s (%v), holding %v", pin, err, entries)
			}
		})
	}

	t.Run("failed command on a set-up pin path keeps it", func(t *testing.T) {
		ctd.pin = nettest.PinPath(t)
		if r := ctd.run("ipcache", "add", "198.51.100.0/26", "id=7", "--ipcache-max", "2"); r.exitCode != 0 {
			t.Fatalf("ipcache add: exit %d: %s", r.exitCode, r.stderr)
		}
		checkOneLineError(t, ctd.run("ipcache", "load", file), "holds at most 2 prefixes")
		if out := ctd.run("ipcache", "list"); out.stdout != "198.51.100.0/26 id=7\n" {
			t.Errorf("ipcache list after the failed load: %q, %q; want the prefix added before", out.stdout, out.stderr)
		}
	})
}

// TestStatusWithoutDatapath: status on a pin path that holds no ctd
// datapath (missing, empty, another tool's) exits 3 with one line.
func TestStatusWithoutDatapath(t *testing.T) {
	ctd := newHardenCLI(t)
	empty := nettest.PinPath(t)
	if err := os.Mkdir(empty, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, pin, want string }{
		{"missing", filepath.Join(bpffsRoot, "ctdtest-no-such-dir"), "the directory does not exist"},
		{"empty", empty, "no map of ctd's is pinned there"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctd.pin = tc.pin
			r := ctd.run("status")
			checkOneLineError(t, r, "no ctd datapath at "+tc.pin+": "+tc.want)
			if r.exitCode != 3 {
				t.Errorf("exit %d, want 3", r.exitCode)
			}
		})
	}

	t.Run("set up", func(t *testing.T) {
		ctd.pin = nettest.PinPath(t)
		if r := ctd.run("ipcache", "add", "198.51.100.0/24", "id=7"); r.exitCode != 0 {
			t.Fatalf("ipcache add: exit %d: %s", r.exitCode, r.stderr)
		}
		if r := ctd.run("status"); r.exitCode != 0 || !strings.Contains(r.stdout, "none attached") {
			t.Errorf("status of a datapath attached nowhere: exit %d, stdout %q, stderr %q", r.exitCode, r.stdout, r.stderr)
		}
		ctd.run("teardown")
	})
}

// TestDemoLeavesNothingRunning: `make demo` (scripts/demo.sh) ends with no
// process of its own left, ctd monitor included. The demo runs in a process
// group of its own, which its background processes keep.
func TestDemoLeavesNothingRunning(t *testing.T) {
	nettest.RequireRoot(t)
	for _, tool := range []string{"socat", "ss", "ping", "nsenter"} {
		nettest.RequireTool(t, tool, tool)
	}
	bin := nettest.BuildCtd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "../scripts/demo.sh")
	cmd.Env = append(os.Environ(), "CTD_BIN="+bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	pgid := cmd.Process.Pid
	left := processesInGroup(t, pgid)
	t.Cleanup(func() {
		for _, p := range left {
			syscall.Kill(p.pid, syscall.SIGKILL)
		}
	})
	for _, p := range left {
		t.Errorf("the demo left pid %d running: %s", p.pid, p.cmdline)
	}
	if !strings.Contains(string(out), "ctd: monitor: the datapath at ") || !strings.Contains(string(out), "was torn down") {
		t.Errorf("the demo does not show monitor exiting after the teardown:\n%s", out)
	}
}

type process struct {
	pid     int
	cmdline string
}

// processesInGroup lists the live processes of process group pgid.
func processesInGroup(t *testing.T, pgid int) []process {
	t.Helper()
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []process
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", d.Name(), "stat"))
		if err != nil {
			continue // gone meanwhile
		}
		// pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ')'.
		i := strings.LastIndexByte(string(stat), ')')
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 3 || f[0] == "Z" {
			continue
		}
		if g, _ := strconv.Atoi(f[2]); g != pgid {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		out = append(out, process{pid: pid, cmdline: strings.ReplaceAll(string(cmdline), "\x00", " ")})
	}
	return out
}

// TestMonitorExitsWithItsDatapath: ctd monitor exits with one line, within
// seconds, when its datapath is torn down or replaced under it.
func TestMonitorExitsWithItsDatapath(t *testing.T) {
	ctd := newHardenCLI(t)
	for _, tc := range []struct {
		name   string
		change func(t *testing.T)
		want   string
	}{
		{"torn down", func(t *testing.T) {
			if r := ctd.run("teardown"); r.exitCode != 0 {
				t.Fatalf("teardown: %s", r.stderr)
			}
		}, "was torn down (events_v2 is no longer pinned)"},
		{"replaced", func(t *testing.T) {
			// What a resize of the ring buffer does: another map at the pin.
			pin := filepath.Join(ctd.pin, "events_v2")
			m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.RingBuf, MaxEntries: 4096})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if err := os.Remove(pin); err != nil {
				t.Fatal(err)
			}
			if err := m.Pin(pin); err != nil {
				t.Fatal(err)
			}
		}, "was replaced (events_v2 is now another map"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctd.pin = nettest.PinPath(t)
			if r := ctd.run("ipcache", "add", "198.51.100.0/24", "id=7"); r.exitCode != 0 {
				t.Fatalf("ipcache add: exit %d: %s", r.exitCode, r.stderr)
			}
			t.Cleanup(func() { ctd.run("teardown") })
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, ctd.bin, "--pin-path", ctd.pin, "monitor")
			stderr, exited := startLogged(t, cmd)
			for !strings.Contains(stderr.String(), "streaming the events") {
				select {
				case err := <-exited:
					t.Fatalf("monitor exited at start (%v): %s", err, stderr.String())
				case <-time.After(20 * time.Millisecond):
				}
			}
			tc.change(t)
			select {
			case err := <-exited:
				var ee *exec.ExitError
				if !errors.As(err, &ee) || ee.ExitCode() != 1 {
					t.Errorf("monitor exited with %v, want exit status 1", err)
				}
			case <-time.After(5 * time.Second):
				cmd.Process.Kill()
				<-exited
				t.Fatalf("monitor still runs 5s after its datapath was %s; stderr:\n%s", tc.name, stderr.String())
			}
			lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
			if last := lines[len(lines)-1]; !strings.HasPrefix(last, "ctd: monitor: the datapath at "+ctd.pin+" ") || !strings.Contains(last, tc.want) {
				t.Errorf("monitor's last line %q, want one naming %s that %s", last, ctd.pin, tc.want)
			}
		})
	}
}

// TestMetricsAddrWarning: the daemon warns when its metrics listen on an
// address other hosts can reach, and not on loopback.
func TestMetricsAddrWarning(t *testing.T) {
	pair := nettest.NewPair(t)
	bin := nettest.BuildCtd(t)
	for _, tc := range []struct {
		addr string
		warn bool
	}{
		{":0", true},
		{"127.0.0.1:0", false},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			pin := nettest.PinPath(t)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			cmd := pair.A.CommandContext(ctx, bin, "--pin-path", pin, "--state-dir", filepath.Join(t.TempDir(), "state"),
				"daemon", "--iface", pair.A.Iface, "--metrics-addr", tc.addr)
			stderr, done := startLogged(t, cmd)
			defer func() {
				cmd.Process.Signal(syscall.SIGTERM)
				<-done
				pair.A.Command(bin, "--pin-path", pin, "teardown").Run()
			}()
			for !strings.Contains(stderr.String(), "msg=ready") {
				select {
				case err := <-done:
					t.Fatalf("daemon exited (%v):\n%s", err, stderr.String())
				case <-time.After(20 * time.Millisecond):
				}
			}
			const warning = "level=WARN msg=\"metrics served on every address of the host"
			if got := strings.Contains(stderr.String(), warning); got != tc.warn {
				t.Errorf("--metrics-addr %s: warning logged %v, want %v; log:\n%s", tc.addr, got, tc.warn, stderr.String())
			}
		})
	}
}

// TestNoEventsWithoutMonitor: with no ctd monitor running, new flows over a
// real interface write nothing to the event ring and count no event as
// lost, however many there are; with a monitor they are streamed.
func TestNoEventsWithoutMonitor(t *testing.T) {
	pair := nettest.NewPair(t)
	bin := nettest.BuildCtd(t)
	pin := nettest.PinPath(t)
	cli := &coreCLI{t: t, bin: bin, pin: pin, host: pair.B}
	// 4 KiB holds 36 events of 112 bytes: 100 new flows would overflow it.
	cli.must("attach", "--iface", pair.B.Iface, "--ringbuf-size", "4096")
	t.Cleanup(func() { cli.run("teardown") })
	newFlows := func(first int) {
		t.Helper()
		for port := first; port < first+100; port++ {
			c, err := pair.A.Dial("udp", netip.AddrPortFrom(pair.B.IPv4, uint16(port)).String())
			if err != nil {
				t.Fatal(err)
			}
			c.Write([]byte("x"))
			c.Close()
		}
	}
	lostAndPending := func() (lost uint64, pending float64) {
		t.Helper()
		var rows []struct {
			Reason  string
			Packets uint64
		}
		if err := json.Unmarshal([]byte(cli.must("metrics", "-o", "json")), &rows); err != nil {
			t.Fatal(err)
		}
		for _, r := range rows {
			if r.Reason == "events-lost" {
				lost += r.Packets
			}
		}
		maps, _ := mapsJSON(t, bin, pin)
		return lost, maps["events_v2"]["entries"].(float64)
	}

	newFlows(20000)
	if lost, pending := lostAndPending(); lost != 0 || pending != 0 {
		t.Errorf("no monitor, 100 new flows: %d events lost, %v bytes in the ring; want none written and none lost", lost, pending)
	}

	mon := startMonitor(t, bin, pin, pair.B)
	newFlows(21000)
	mon.waitFor("a flow-new event of the second batch", func(ev monitorEvent) bool {
		return ev.Type == "flow-new" && ev.Dport >= 21000 && ev.Dport < 21100
	})
	mon.stop(syscall.SIGINT)
}

// TestSecondMonitorWarns: a monitor started while another one reads the
// events says that the two split them.
func TestSecondMonitorWarns(t *testing.T) {
	ctd := newHardenCLI(t)
	if r := ctd.run("ipcache", "add", "198.51.100.0/24", "id=7"); r.exitCode != 0 {
		t.Fatalf("ipcache add: exit %d: %s", r.exitCode, r.stderr)
	}
	t.Cleanup(func() { ctd.run("teardown") })
	start := func() (*exec.Cmd, *syncBuffer) {
		cmd := exec.Command(ctd.bin, "--pin-path", ctd.pin, "monitor")
		stderr, _ := startLogged(t, cmd)
		for deadline := time.Now().Add(10 * time.Second); !strings.Contains(stderr.String(), "streaming the events"); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("monitor did not start: %s", stderr.String())
			}
		}
		return cmd, stderr
	}
	first, firstErr := start()
	_, second := start()
	if strings.Contains(firstErr.String(), "warning") {
		t.Errorf("the first monitor warned: %s", firstErr.String())
	}
	want := fmt.Sprintf("warning: another ctd monitor (pid %d) reads the events of %s", first.Process.Pid, ctd.pin)
	if !strings.Contains(second.String(), want) {
		t.Errorf("the second monitor's stderr %q lacks %q", second.String(), want)
	}
}
