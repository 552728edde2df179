package test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
