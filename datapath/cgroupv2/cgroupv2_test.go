package cgroupv2

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseMountInfo(t *testing.T) {
	for _, tc := range []struct {
		name, table, want string
		err               error
	}{
		{"unified", `30 22 0:27 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`, "/sys/fs/cgroup/unified", nil},
		{"optional fields", `29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 master:1 - cgroup2 cgroup2 rw,nsdelegate
`, "/sys/fs/cgroup", nil},
		{"escaped", `29 23 0:26 / /mnt/cg\040v2 rw - cgroup2 none rw
`, "/mnt/cg v2", nil},
		{"v1 only", `31 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
`, "", ErrNoMount},
		{"source named cgroup2", `31 30 0:28 / /x rw - tmpfs cgroup2 rw
`, "", ErrNoMount},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseMountInfo(strings.NewReader(tc.table), "mountinfo")
			if got != tc.want || !errors.Is(err, tc.err) {
				t.Errorf("parseMountInfo = %q, %v; want %q, %v", got, err, tc.want, tc.err)
			}
		})
	}
}

func TestMountIsCgroup2(t *testing.T) {
	root, err := Mount()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "cgroup.procs")); err != nil {
		t.Errorf("Mount() = %s, which has no cgroup.procs: %v", root, err)
	}
}

func TestNames(t *testing.T) {
	root := t.TempDir()
	mk := func(rel string) uint64 {
		t.Helper()
		dir := filepath.Join(root, rel)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		id, err := ID(dir)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	rootID := mk(".")
	a := mk("a")
	ab := mk("a/b")
	n := NewNames(root)
	for id, want := range map[uint64]string{rootID: "/", a: "/a", ab: "/a/b"} {
		if got, ok := n.Path(id); !ok || got != want {
			t.Errorf("Path(%d) = %q, %v; want %q", id, got, ok, want)
		}
	}
	if got, ok := n.Path(0); ok {
		t.Errorf("Path(0) = %q, want none", got)
	}

	// A cgroup made after the walk is found once the index is older than Rescan.
	c := mk("c")
	n.Rescan = 1<<63 - 1
	if got, ok := n.Path(c); ok {
		t.Errorf("Path of a cgroup made after the walk, within Rescan = %q, want none (no walk)", got)
	}
	n.Rescan = 0
	if got, ok := n.Path(c); !ok || got != "/c" {
		t.Errorf("Path(%d) after Rescan = %q, %v; want /c", c, got, ok)
	}
}

func TestIDOfAFile(t *testing.T) {
	f := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ID(f); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("ID(file) = %v, want not a directory", err)
	}
}
