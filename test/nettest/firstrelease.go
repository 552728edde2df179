package nettest

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

// FirstReleaseFile is where the repository records the commit of ctd's
// first release (conntrack layout v1), which the upgrade tests take from
// git history: test/first-release.commit.
const FirstReleaseFile = "test/first-release.commit"

// FirstRelease returns the top of the repository and the commit of the
// first release; the test needs a clone with history.
func FirstRelease(t testing.TB) (top, commit string) {
	t.Helper()
	out, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Fatalf("find the repository (the test needs a clone with history): %v", err)
	}
	top = strings.TrimSpace(string(out))
	raw, err := os.ReadFile(filepath.Join(top, FirstReleaseFile))
	if err != nil {
		t.Fatalf("read %s: %v", FirstReleaseFile, err)
	}
	return top, strings.TrimSpace(string(raw))
}

// FirstReleaseSpec returns the datapath object the first release shipped
// (bpf/ctd_bpfel.o at its commit): its programs and maps in layout v1.
func FirstReleaseSpec(t testing.TB) *ebpf.CollectionSpec {
	t.Helper()
	top, commit := FirstRelease(t)
	show := exec.Command("git", "show", commit+":bpf/ctd_bpfel.o")
	show.Dir = top
	var obj, stderr bytes.Buffer
	show.Stdout, show.Stderr = &obj, &stderr
	if err := show.Run(); err != nil {
		t.Fatalf("git show %s:bpf/ctd_bpfel.o (the test needs a clone with history): %v: %s", commit, err, stderr.String())
	}
	spec, err := ebpf.LoadCollectionSpecFromReader(bytes.NewReader(obj.Bytes()))
	if err != nil {
		t.Fatalf("the first release's datapath object: %v", err)
	}
	return spec
}
