package test

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/ctd-dev/ctd/test/nettest"
)

// buildFirstRelease builds cmd/ctd of the first release from git history
// (git archive of the recorded commit into a temporary directory, then go
// build there) and returns the binary.
func buildFirstRelease(t *testing.T) string {
	t.Helper()
	top, commit := nettest.FirstRelease(t)
	src := t.TempDir()
	// From the top: git archive in a subdirectory archives only that.
	archive := exec.Command("git", "archive", "--format=tar", commit)
	archive.Dir = top
	var tarball, stderr bytes.Buffer
	archive.Stdout, archive.Stderr = &tarball, &stderr
	if err := archive.Run(); err != nil {
		t.Fatalf("git archive %s (the test needs a clone with history): %v: %s", commit, err, stderr.String())
	}
	untar := exec.Command("tar", "-x", "-C", src)
	untar.Stdin = &tarball
	if out, err := untar.CombinedOutput(); err != nil {
		t.Fatalf("unpack %s: %v: %s", commit, err, out)
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "ctd-"+commit[:7])
	build := exec.Command(goBin, "build", "-o", bin, "./cmd/ctd")
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the first release (%s): %v\n%s", commit, err, out)
	}
	return bin
}
