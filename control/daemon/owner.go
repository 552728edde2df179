package daemon

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// lockPinPath makes sure that one daemon at a time owns a datapath, whatever
// its state directory: it holds an exclusive flock on the pin path
// directory itself until the daemon exits (the kernel drops it when the
// process dies). A daemon that finds the lock taken names the owner's pid,
// read from /proc/locks: bpffs holds no regular file to write it to.
func lockPinPath(pinPath string) (*os.File, error) {
	f, err := os.OpenFile(pinPath, os.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("lock pin path %s: %w", pinPath, err)
	}
	err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if err == nil {
		return f, nil
	}
	defer f.Close()
	if !errors.Is(err, unix.EWOULDBLOCK) {
		return nil, fmt.Errorf("lock pin path %s: %w", pinPath, err)
	}
	owner := "unknown pid"
	if pid, ok := flockOwner(f); ok {
		owner = "pid " + strconv.Itoa(pid)
	}
	return nil, fmt.Errorf("another ctd daemon (%s) owns the datapath at %s: stop it first, one daemon acts on a datapath at a time", owner, pinPath)
}

// flockOwner finds the pid holding a flock on f's inode in /proc/locks.
func flockOwner(f *os.File) (int, bool) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, false
	}
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	locks, err := os.Open("/proc/locks")
	if err != nil {
		return 0, false
	}
	defer locks.Close()
	sc := bufio.NewScanner(locks)
	for sc.Scan() {
		// 1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF
		fs := strings.Fields(sc.Text())
		if len(fs) < 6 || fs[1] != "FLOCK" || fs[5] != want {
			continue
		}
		if pid, err := strconv.Atoi(fs[4]); err == nil {
			return pid, true
		}
	}
	return 0, false
}
