package main

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestNoTestBuildsShipped keeps the test-only builds of the datapath out of
// the ctd binary: bpf/v2test (a layout ctd never ships, and its converter),
// bpf/nodryrun (a benchmark's baseline) and bpf/upgradetest (only with
// -tags ctd_upgradetest).
func TestNoTestBuildsShipped(t *testing.T) {
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(goBin, "list", "-deps", "github.com/ctd-dev/ctd/cmd/ctd").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		switch pkg {
		case "github.com/ctd-dev/ctd/bpf/v2test", "github.com/ctd-dev/ctd/bpf/nodryrun", "github.com/ctd-dev/ctd/bpf/upgradetest":
			t.Errorf("the ctd binary links the test-only package %s", pkg)
		}
	}
}
