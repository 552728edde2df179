package test

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/datapath/attach"
	"github.com/ctd-dev/ctd/test/nettest"
)

// TestDaemonRejectsBadInput checks that `ctd daemon` refuses bad input with
// one line naming it, a non-zero exit, and without creating any pin or
// state.
func TestDaemonRejectsBadInput(t *testing.T) {
	pair := nettest.NewPair(t)
	bin := nettest.BuildCtd(t)
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"missing iface", []string{"--iface", "nope0"}, `interface "nope0" not found`},
		{"no iface, no store", nil, "missing --iface"},
		{"mode", []string{"--iface", pair.A.Iface, "--mode", "xdp"}, `invalid --mode "xdp"`},
		{"ct-max 0", []string{"--iface", pair.A.Iface, "--ct-max", "0"}, "invalid --ct-max 0"},
		{"ct-max text", []string{"--iface", pair.A.Iface, "--ct-max", "many"}, `invalid argument "many" for "--ct-max"`},
		{"ipcache-max 0", []string{"--iface", pair.A.Iface, "--ipcache-max", "0"}, "invalid --ipcache-max 0"},
		{"ringbuf-size", []string{"--iface", pair.A.Iface, "--ringbuf-size", "5000"}, "invalid --ringbuf-size 5000"},
		{"metrics-addr", []string{"--iface", pair.A.Iface, "--metrics-addr", "nohost:notaport"}, `invalid --metrics-addr "nohost:notaport"`},
		{"log-format", []string{"--iface", pair.A.Iface, "--log-format", "xml"}, `invalid --log-format "xml"`},
		{"poll-interval", []string{"--iface", pair.A.Iface, "--poll-interval", "0s"}, "invalid --poll-interval 0s"},
		{"lifetime", []string{"--iface", pair.A.Iface, "--ct-lifetime-icmp", "-1s"}, "invalid --ct-lifetime-icmp -1s"},
	} {
		t.Run(c.name, func(t *testing.T) {
			pin := nettest.PinPath(t)
			state := filepath.Join(t.TempDir(), "state")
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			args := append([]string{"--pin-path", pin, "--state-dir", state, "daemon"}, c.args...)
			out, err := pair.A.CommandContext(ctx, bin, args...).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() == 0 {
				t.Fatalf("ctd daemon %v: %v, want a non-zero exit\n%s", c.args, err, out)
			}
			msg := strings.TrimSpace(string(out))
			if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, c.want) {
				t.Errorf("ctd daemon %v said %q, want one line containing %q", c.args, msg, c.want)
			}
			for _, p := range []string{pin, state} {
				if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s exists after the failed start (%v)", p, err)
				}
			}
		})
	}
}

// TestDaemonNotifiesSystemd runs the daemon as a Type=notify unit would:
// it must send READY=1 once ready, and STOPPING=1 on SIGTERM, then exit 0
// with its programs still attached.
func TestDaemonNotifiesSystemd(t *testing.T) {
	pair := nettest.NewPair(t)
	bin := nettest.BuildCtd(t)
	pin := nettest.PinPath(t)
	sockPath := filepath.Join(t.TempDir(), "notify.sock")
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()

	cmd := pair.A.Command(bin, "--pin-path", pin, "--state-dir", filepath.Join(t.TempDir(), "state"),
		"daemon", "--iface", pair.A.Iface)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sockPath)
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-done
		}
	})

	read := func(want string) {
		t.Helper()
		sock.SetReadDeadline(time.Now().Add(30 * time.Second))
		buf := make([]byte, 512)
		n, err := sock.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %s on $NOTIFY_SOCKET: %v\n%s", want, err, stderr.String())
		}
		if !strings.Contains(string(buf[:n]), want) {
			t.Fatalf("$NOTIFY_SOCKET got %q, want %s", buf[:n], want)
		}
	}
	read("READY=1")
	// The log is copied from a pipe: give the copy a moment.
	for deadline := time.Now().Add(2 * time.Second); !strings.Contains(stderr.String(), "msg=ready"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Errorf("READY=1 without a ready line in the log:\n%s", stderr.String())
			break
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	read("STOPPING=1")
	if err := <-done; err != nil {
		t.Errorf("daemon after SIGTERM: %v, want exit 0\n%s", err, stderr.String())
	}
	var attached bool
	if err := pair.A.Do(func() error {
		at, err := attach.Status(pair.A.Iface, filepath.Join(pin, "links"))
		attached = at.Mode != ""
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if !attached {
		t.Errorf("no program attached to %s after the daemon stopped", pair.A.Iface)
	}
}

// TestDetachForgetsInterface checks that `ctd detach` removes the interface
// from the state store, so that the next `ctd daemon` does not attach it
// again, and that the daemon without --iface attaches the recorded ones.
func TestDetachForgetsInterface(t *testing.T) {
	pair := nettest.NewPair(t)
	bin := nettest.BuildCtd(t)
	pin := nettest.PinPath(t)
	state := filepath.Join(t.TempDir(), "state")
	run := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := pair.A.CommandContext(ctx, bin, append([]string{"--pin-path", pin, "--state-dir", state}, args...)...).CombinedOutput()
		return string(out), err
	}
	attached := func() bool {
		t.Helper()
		var at attach.Attachment
		if err := pair.A.Do(func() (err error) {
			at, err = attach.Status(pair.A.Iface, filepath.Join(pin, "links"))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return at.Mode != ""
	}
	// daemon runs the daemon until it is ready, then stops it with SIGTERM.
	daemon := func(args ...string) {
		t.Helper()
		cmd := pair.A.Command(bin, append([]string{"--pin-path", pin, "--state-dir", state, "daemon"}, args...)...)
		var stderr syncBuffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(stderr.String(), "msg=ready") {
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				cmd.Wait()
				t.Fatalf("daemon %v not ready:\n%s", args, stderr.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		cmd.Process.Signal(syscall.SIGTERM)
		if err := cmd.Wait(); err != nil {
			t.Fatalf("daemon %v after SIGTERM: %v\n%s", args, err, stderr.String())
		}
	}

	daemon("--iface", pair.A.Iface)
	if out, err := run("detach", "--iface", pair.A.Iface); err != nil {
		t.Fatalf("detach: %v\n%s", err, out)
	}
	if attached() {
		t.Fatal("still attached after detach")
	}
	out, err := run("daemon")
	if err == nil || !strings.Contains(out, "records no interface") {
		t.Errorf("daemon without --iface after detach: %v, %q; want it refused for lack of interfaces", err, out)
	}
	if attached() {
		t.Error("a daemon attached the detached interface again")
	}

	// Recorded again, and its programs removed behind ctd's back: a daemon
	// without --iface attaches the recorded interface.
	daemon("--iface", pair.A.Iface)
	if err := pair.A.Do(func() error { return attach.Detach(pair.A.Iface, filepath.Join(pin, "links")) }); err != nil {
		t.Fatal(err)
	}
	daemon()
	if !attached() {
		t.Error("a daemon without --iface did not attach the recorded interface")
	}
}

// TestDaemonRestoresAfterReboot sets ipcache and policy through the CLI
// beside a running daemon, then empties bpffs as a reboot does (`ctd
// teardown` detaches and removes every pin): the next daemon start, without
// --iface, must restore the state from the store before attaching to the
// recorded interface, and enforce it.
func TestDaemonRestoresAfterReboot(t *testing.T) {
	pair := nettest.NewPair(t)
	bin := nettest.BuildCtd(t)
	pin := nettest.PinPath(t)
	state := filepath.Join(t.TempDir(), "state")
	run := func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := pair.A.CommandContext(ctx, bin, append([]string{"--pin-path", pin, "--state-dir", state}, args...)...).Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				out = append(out, ee.Stderr...)
			}
			t.Fatalf("ctd %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	daemon := func(args ...string) (stop func()) {
		t.Helper()
		cmd := pair.A.Command(bin, append([]string{"--pin-path", pin, "--state-dir", state, "daemon", "--poll-interval", "50ms"}, args...)...)
		var stderr syncBuffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		stop = func() {
			cmd.Process.Signal(syscall.SIGTERM)
			if err := cmd.Wait(); err != nil {
				t.Errorf("daemon after SIGTERM: %v\n%s", err, stderr.String())
			}
		}
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(stderr.String(), "msg=ready") {
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				cmd.Wait()
				t.Fatalf("daemon %v not ready:\n%s", args, stderr.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		return stop
	}
	dial := func(port string) error {
		return pair.B.Do(func() error {
			d := net.Dialer{Timeout: 500 * time.Millisecond}
			c, err := d.Dial("tcp", net.JoinHostPort(pair.A.IPv4.String(), port))
			if err == nil {
				c.Close()
			}
			return err
		})
	}
	for _, port := range []string{"7200", "7201"} {
		l, err := pair.A.Listen("tcp", net.JoinHostPort(pair.A.IPv4.String(), port))
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
	}

	stop := daemon("--iface", pair.A.Iface)
	run("policy", "default", "ingress", "deny")
	run("ipcache", "add", pair.B.IPv4.String()+"/32", "id=42")
	run("policy", "add", "ingress", "id=42", "tcp/7200", "allow")
	stop()
	listsBefore := run("ipcache", "list", "-o", "json") + run("policy", "list", "-o", "json")

	run("teardown") // what a reboot leaves: no pins, nothing attached
	if _, err := os.Lstat(pin); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin path %s still there after teardown: %v", pin, err)
	}
	if err := dial("7201"); err != nil {
		t.Fatalf("without ctd, B cannot reach A:7201: %v", err)
	}

	stop = daemon()
	defer stop()
	if got := run("ipcache", "list", "-o", "json") + run("policy", "list", "-o", "json"); got != listsBefore {
		t.Errorf("after the restore the maps hold\n%s\nwant, as before the reboot,\n%s", got, listsBefore)
	}
	if err := dial("7200"); err != nil {
		t.Errorf("the restored rule does not allow B to A:7200: %v", err)
	}
	if err := dial("7201"); err == nil {
		t.Error("B reached A:7201 although the restored ingress default is deny")
	}
}

// syncBuffer collects a process's output for a test that reads it while
// the process runs.
type syncBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
