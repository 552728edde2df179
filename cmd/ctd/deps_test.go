package main

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestNoTestBuildsShipped keeps the test-only builds of the datapath out of
// the ctd binary: bpf/nodryrun (a benchmark's baseline) and bpf/upgradetest
// (only with -tags ctd_upgradetest); and the test helpers below test/
// (nettest reads the first release's datapath from git history).
func TestNoTestBuildsShipped(t *testing.T) {
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(goBin, "list", "-deps", "github.com/ctd-dev/ctd/cmd/ctd").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if pkg == "github.com/ctd-dev/ctd/bpf/upgradetest" || pkg == "github.com/ctd-dev/ctd/bpf/nodryrun" ||
			strings.HasPrefix(pkg, "github.com/ctd-dev/ctd/test/") {
			t.Errorf("the ctd binary links the test-only package %s", pkg)
		}
	}
}
