// Package bpffs makes sure BPF pin paths live on a mounted bpf filesystem.
package bpffs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultRoot is the conventional bpffs mount point.
const DefaultRoot = "/sys/fs/bpf"

// dirMode is the mode of pin directories and of bpffs mounts made by Ensure.
const dirMode = 0o700

// IsBPFFS reports whether path is on a bpf filesystem. path must exist.
func IsBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, fmt.Errorf("statfs %s: %w", path, err)
	}
	return uint32(st.Type) == uint32(unix.BPF_FS_MAGIC), nil
}

// Ensure makes sure pinPath is a directory with mode 0700 on a bpf filesystem.
//
// The filesystem of pinPath's nearest existing ancestor is checked. If it is
// not a bpffs, one is mounted (mode=0700): on /sys/fs/bpf when pinPath is
// below it, otherwise on pinPath itself, never on a directory that is not
// empty (its files would become unreachable). Missing directories are
// created. Mounting needs CAP_SYS_ADMIN. When Ensure fails it leaves no
// mount and no directory of its own behind.
func Ensure(pinPath string) error {
	_, _, err := ensure(pinPath)
	return err
}

// setup is what ensure did to a pin path.
type setup struct {
	created bool // the pin path's directory did not exist
	mounted bool // a bpffs was mounted on the pin path itself
}

func ensure(pinPath string) (abs string, did setup, err error) {
	if pinPath == "" {
		return "", setup{}, errors.New("pin path is empty: give a directory on a bpffs, e.g. " + DefaultRoot + "/ctd")
	}
	if abs, err = filepath.Abs(pinPath); err != nil {
		return "", setup{}, fmt.Errorf("pin path %s: %w", pinPath, err)
	}
	_, err = os.Lstat(abs)
	did.created = errors.Is(err, os.ErrNotExist)

	ok, err := onBPFFS(abs)
	if err != nil {
		return "", setup{}, err
	}
	var mountedOn string
	if !ok {
		if mountedOn, err = mountFor(abs); err != nil {
			if did.created {
				os.Remove(abs) // mountFor may have created it
			}
			return "", setup{}, err
		}
	}
	did.mounted = mountedOn == abs
	undo := func() {
		if mountedOn != "" {
			unix.Unmount(mountedOn, unix.MNT_DETACH)
		}
		if did.created {
			os.Remove(abs)
		}
	}

	if err := os.MkdirAll(abs, dirMode); err != nil {
		undo()
		return "", setup{}, fmt.Errorf("pin path %s: create directory: %w", abs, unwrapPath(err))
	}
	if err := os.Chmod(abs, dirMode); err != nil {
		undo()
		return "", setup{}, fmt.Errorf("pin path %s: set mode 0700: %w", abs, unwrapPath(err))
	}
	return abs, did, nil
}

// onBPFFS reports whether the nearest existing ancestor of path (path
// included) is on a bpffs.
func onBPFFS(path string) (bool, error) {
	anc, err := existingAncestor(path)
	if err != nil {
		return false, fmt.Errorf("pin path %s: %w", path, err)
	}
	ok, err := IsBPFFS(anc)
	if err != nil {
		return false, fmt.Errorf("pin path %s: %w", path, err)
	}
	return ok, nil
}

// mountFor mounts a bpffs so that path ends up on it, and returns where it
// mounted it.
func mountFor(path string) (string, error) {
	target := path
	if underDefaultRoot(path) {
		target = DefaultRoot
		ok, err := IsBPFFS(DefaultRoot)
		if err != nil {
			return "", fmt.Errorf("pin path %s is not on a bpffs and %s cannot be checked: %w", path, DefaultRoot, unwrapPath(err))
		}
		if ok {
			// /sys/fs/bpf is a bpffs but something else is mounted
			// between it and path; mounting over it would hide that.
			return "", fmt.Errorf("pin path %s is not on a bpffs although %s is (another filesystem is mounted in between); choose a pin path on the bpffs", path, DefaultRoot)
		}
	} else if err := os.MkdirAll(path, dirMode); err != nil {
		return "", fmt.Errorf("pin path %s is not on a bpffs and creating it failed: %w", path, unwrapPath(err))
	}
	if names, err := dirNames(target); err != nil {
		return "", fmt.Errorf("pin path %s is not on a bpffs and %s cannot be read: %w", path, target, err)
	} else if len(names) > 0 {
		return "", fmt.Errorf("pin path %s is not on a bpffs, and ctd mounts one only on an empty directory: %s holds %s; choose a new or empty directory, or one below %s",
			path, target, listNames(names), DefaultRoot)
	}

	if err := unix.Mount("bpffs", target, "bpf", 0, "mode=0700"); err != nil {
		return "", fmt.Errorf("pin path %s is not on a bpffs and mounting one failed: %v (run as root, or mount one with: mount -t bpf bpf %s)", path, err, target)
	}

	ok, err := onBPFFS(path)
	if err == nil && !ok {
		err = fmt.Errorf("pin path %s is still not on a bpffs after mounting one on %s; choose a pin path on a bpffs", path, target)
	}
	if err != nil {
		unix.Unmount(target, unix.MNT_DETACH)
		return "", err
	}
	return target, nil
}

// dirNames lists the names in dir.
func dirNames(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, unwrapPath(err)
	}
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.Name()
	}
	return names, nil
}

// listNames names a few of names for a message: "a, b, c and 7 more".
func listNames(names []string) string {
	const show = 3
	if len(names) <= show {
		return strings.Join(names, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(names[:show], ", "), len(names)-show)
}

// existingAncestor returns path or its nearest ancestor that exists.
func existingAncestor(path string) (string, error) {
	for p := path; ; p = filepath.Dir(p) {
		_, err := os.Stat(p)
		switch {
		case err == nil:
			return p, nil
		case !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTDIR):
			return "", fmt.Errorf("stat %s: %w", p, unwrapPath(err))
		case p == filepath.Dir(p):
			return "", fmt.Errorf("no existing ancestor: %w", err)
		}
	}
}

func underDefaultRoot(path string) bool {
	return path == DefaultRoot || strings.HasPrefix(path, DefaultRoot+"/")
}

// unwrapPath strips the *os.PathError wrapper, whose path our messages
// already name, so errors stay one short line.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
