package test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/test/nettest"
)

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
	full := append([]string{"--pin-path", c.pin, "--state-dir", c.stateDir}, args...)
	return runCmd(c.t, exec.CommandContext(ctx, c.bin, full...))
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
