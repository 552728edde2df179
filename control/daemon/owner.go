package daemon

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// RunDir holds the lock files by which daemons own pin paths.
const RunDir = "/run/ctd"

// lockPinPath makes sure that one daemon at a time owns a datapath, whatever
// its state directory: it holds a lock file named after the pin path in
// RunDir until the daemon exits (unlockPinPath removes it). Not a lock on
// the pin directory itself: config_v1's writers lock that one for each
// write.
func lockPinPath(pinPath string) (*os.File, error) {
	if err := os.MkdirAll(RunDir, 0o700); err != nil {
		return nil, fmt.Errorf("lock pin path %s: %w", pinPath, err)
	}
	name := "pin-" + url.PathEscape(filepath.Clean(pinPath)) + ".lock"
	f, owner, err := lockPID(filepath.Join(RunDir, name))
	if owner != "" {
		return nil, fmt.Errorf("another ctd daemon (pid %s) owns the datapath at %s: stop it first, one daemon acts on a datapath at a time", owner, pinPath)
	}
	return f, err
}

// unlockPinPath removes the lock file and releases the lock, in this order:
// a daemon that opened the file meanwhile finds it replaced (lockPID checks).
func unlockPinPath(f *os.File) error {
	return errors.Join(os.Remove(f.Name()), f.Close())
}

// lockPID takes an exclusive flock on path, created where missing, and writes
// the process's pid into it. When another process holds the lock, it returns
// that process's pid as owner. The kernel drops the lock when the process
// dies, so a SIGKILL leaves no stale lock behind.
func lockPID(path string) (f *os.File, owner string, err error) {
	for {
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return nil, "", fmt.Errorf("daemon lock %s: %w", path, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			defer f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				pid, _ := os.ReadFile(path)
				if owner = strings.TrimSpace(string(pid)); owner == "" {
					owner = "unknown"
				}
				return nil, owner, nil
			}
			return nil, "", fmt.Errorf("daemon lock %s: %w", path, err)
		}
		// Locked; but if the owner before removed the file meanwhile,
		// the lock is on a file nobody else will look at: start over.
		var held, now unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) == nil && unix.Stat(path, &now) == nil && held.Ino == now.Ino && held.Dev == now.Dev {
			break
		}
		f.Close()
	}
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, "", nil
}
