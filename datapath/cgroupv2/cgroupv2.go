// Package cgroupv2 finds the cgroup v2 hierarchy and names its cgroups by their ids.
//
// A cgroup's id, as bpf_get_current_cgroup_id returns it, is the inode
// number of its directory below the cgroup v2 mount.
package cgroupv2

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// MountInfo is where the mount table is read from.
const MountInfo = "/proc/self/mountinfo"

// ErrNoMount is matched (errors.Is) when no cgroup v2 hierarchy is mounted.
var ErrNoMount = errors.New("no cgroup v2 hierarchy is mounted")

// Mount returns the first mount point of the cgroup v2 hierarchy in the
// calling process's mount namespace: /sys/fs/cgroup on most systems,
// /sys/fs/cgroup/unified on hybrid ones.
func Mount() (string, error) {
	f, err := os.Open(MountInfo)
	if err != nil {
		return "", fmt.Errorf("find the cgroup v2 mount: %w", err)
	}
	defer f.Close()
	return parseMountInfo(f, MountInfo)
}

// parseMountInfo returns the mount point of the first cgroup2 line of a
// mountinfo(5) table.
func parseMountInfo(r io.Reader, name string) (string, error) {
	s := bufio.NewScanner(r)
	for s.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		fields := strings.Fields(s.Text())
		sep := -1
		for i, fl := range fields {
			if fl == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+1 >= len(fields) || fields[sep+1] != "cgroup2" {
			continue
		}
		return unescape(fields[4]), nil
	}
	if err := s.Err(); err != nil {
		return "", fmt.Errorf("find the cgroup v2 mount: read %s: %w", name, err)
	}
	return "", fmt.Errorf("find the cgroup v2 mount in %s: %w", name, ErrNoMount)
}

// unescape undoes mountinfo's octal escapes of space, tab, newline and backslash.
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, ok := octal(s[i+1 : i+4]); ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func octal(s string) (byte, bool) {
	if len(s) != 3 {
		return 0, false
	}
	var v int
	for _, c := range s {
		if c < '0' || c > '7' {
			return 0, false
		}
		v = v*8 + int(c-'0')
	}
	return byte(v), v < 256
}

// ID returns the id of the cgroup whose directory is dir.
func ID(dir string) (uint64, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return 0, fmt.Errorf("cgroup id of %s: %w", dir, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || !fi.IsDir() {
		return 0, fmt.Errorf("cgroup id of %s: not a directory", dir)
	}
	return st.Ino, nil
}

// DefaultRescan is how long Names trusts its index before an unknown id
// makes it walk the hierarchy again.
const DefaultRescan = time.Second

// Names resolves cgroup ids to paths below the mount ("/" for the root,
// "/system.slice/ssh.service"), lazily: the first unknown id walks the
// hierarchy once and indexes every cgroup; another walk happens for an
// unknown id only when the index is older than Rescan. Not safe for
// concurrent use.
type Names struct {
	root    string
	Rescan  time.Duration
	byID    map[uint64]string
	scanned time.Time
}

// NewNames returns a resolver for the hierarchy mounted at root.
func NewNames(root string) *Names {
	return &Names{root: root, Rescan: DefaultRescan, byID: make(map[uint64]string)}
}

// Root is the mount point the names are relative to.
func (n *Names) Root() string { return n.root }

// Path returns the path of cgroup id below the mount, and false if no
// cgroup has that id (any more).
func (n *Names) Path(id uint64) (string, bool) {
	if id == 0 {
		return "", false
	}
	if p, ok := n.byID[id]; ok {
		return p, true
	}
	if !n.scanned.IsZero() && time.Since(n.scanned) < n.Rescan {
		return "", false
	}
	n.scan()
	p, ok := n.byID[id]
	return p, ok
}

// Name is Path, or "id:N" where no cgroup has id (any more) or n is nil.
func (n *Names) Name(id uint64) string {
	if n != nil {
		if p, ok := n.Path(id); ok {
			return p
		}
	}
	return "id:" + strconv.FormatUint(id, 10)
}

// scan indexes every cgroup directory below the mount. Directories that
// vanish or cannot be read during the walk are skipped.
func (n *Names) scan() {
	n.scanned = time.Now()
	_ = filepath.WalkDir(n.root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return nil
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		rel, err := filepath.Rel(n.root, path)
		if err != nil {
			return nil
		}
		if rel == "." {
			rel = ""
		}
		n.byID[st.Ino] = "/" + filepath.ToSlash(rel)
		return nil
	})
}
