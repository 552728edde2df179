package bpffs

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/test/nettest"
)

func requireRoot(t *testing.T) {
	t.Helper()
	nettest.RequireRoot(t)
}

// mount mounts fstype on dir and unmounts it when the test ends.
func mount(t *testing.T, fstype, dir string) {
	t.Helper()
	if err := unix.Mount(fstype, dir, fstype, 0, ""); err != nil {
		t.Fatalf("mount %s on %s: %v", fstype, dir, err)
	}
	t.Cleanup(func() { unmountAll(t, dir) })
}

// unmountAll removes every mount stacked on dir.
func unmountAll(t *testing.T, dir string) {
	t.Helper()
	for range 8 {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				t.Errorf("unmount %s: %v", dir, err)
			}
			return
		}
	}
}

// tmpfsDir returns a fresh directory on a tmpfs (not a bpffs) under /tmp.
func tmpfsDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	mount(t, "tmpfs", dir)
	return dir
}

func randomName(t *testing.T) string {
	t.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "ctdbpffs-" + hex.EncodeToString(b)
}

func TestEnsure(t *testing.T) {
	requireRoot(t)

	tests := []struct {
		name string
		// setup prepares the environment below a tmpfs dir and returns
		// the pin path to pass to Ensure.
		setup func(t *testing.T, base string) string
		// wantMount is where Ensure must have mounted a bpffs ("" = no new mount).
		wantMount func(pin string) string
		wantErr   string
	}{
		{
			name:      "plain dir gets its own bpffs",
			setup:     func(t *testing.T, base string) string { return filepath.Join(base, "pins") },
			wantMount: func(pin string) string { return pin },
		},
		{
			name:      "nested missing dirs are created then mounted",
			setup:     func(t *testing.T, base string) string { return filepath.Join(base, "a", "b", "c") },
			wantMount: func(pin string) string { return pin },
		},
		{
			name: "already on bpffs only creates dirs",
			setup: func(t *testing.T, base string) string {
				fs := filepath.Join(base, "fs")
				if err := os.Mkdir(fs, 0o755); err != nil {
					t.Fatal(err)
				}
				mount(t, "bpf", fs)
				return filepath.Join(fs, "ctd", "links")
			},
		},
		{
			name: "existing dir on bpffs is chmodded to 0700",
			setup: func(t *testing.T, base string) string {
				fs := filepath.Join(base, "fs")
				if err := os.Mkdir(fs, 0o755); err != nil {
					t.Fatal(err)
				}
				mount(t, "bpf", fs)
				pin := filepath.Join(fs, "open")
				if err := os.Mkdir(pin, 0o777); err != nil {
					t.Fatal(err)
				}
				return pin
			},
		},
		{
			name: "bpffs mounted on the pin path itself",
			setup: func(t *testing.T, base string) string {
				pin := filepath.Join(base, "here")
				if err := os.Mkdir(pin, 0o755); err != nil {
					t.Fatal(err)
				}
				mount(t, "bpf", pin)
				return pin
			},
		},
		{
			name: "under /sys/fs/bpf",
			setup: func(t *testing.T, _ string) string {
				dir := filepath.Join(DefaultRoot, randomName(t))
				t.Cleanup(func() { os.RemoveAll(dir) })
				return filepath.Join(dir, "links")
			},
		},
		{
			name: "below a regular file",
			setup: func(t *testing.T, base string) string {
				f := filepath.Join(base, "file")
				if err := os.WriteFile(f, nil, 0o600); err != nil {
					t.Fatal(err)
				}
				return filepath.Join(f, "sub")
			},
			wantErr: "is not on a bpffs and creating it failed: not a directory",
		},
		{
			name: "regular file on bpffs",
			setup: func(t *testing.T, base string) string {
				fs := filepath.Join(base, "fs")
				if err := os.Mkdir(fs, 0o755); err != nil {
					t.Fatal(err)
				}
				mount(t, "bpf", fs)
				// bpffs has no regular files; a pinned-object-like
				// non-directory is simulated with a symlink.
				pin := filepath.Join(fs, "link")
				if err := os.Symlink("/nonexistent", pin); err != nil {
					t.Fatal(err)
				}
				return filepath.Join(pin, "x")
			},
			wantErr: "create directory:",
		},
		{
			name: "non-empty plain dir is never mounted over",
			setup: func(t *testing.T, base string) string {
				pin := filepath.Join(base, "full")
				if err := os.Mkdir(pin, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(pin, "notes"), nil, 0o600); err != nil {
					t.Fatal(err)
				}
				return pin
			},
			wantErr: "ctd mounts one only on an empty directory: ",
		},
		{
			name:    "empty",
			setup:   func(*testing.T, string) string { return "" },
			wantErr: "pin path is empty",
		},
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := tmpfsDir(t)
			pin := tt.setup(t, base)
			if tt.wantMount != nil {
				t.Cleanup(func() { unmountAll(t, tt.wantMount(pin)) })
			}

			err := Ensure(pin)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("Ensure(%q) succeeded, want error containing %q", pin, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) || (pin != "" && !strings.Contains(err.Error(), pin)) {
					t.Fatalf("Ensure(%q) = %q, want it to name the path and contain %q", pin, err, tt.wantErr)
				}
				if strings.Contains(err.Error(), "\n") {
					t.Errorf("error is not one line: %q", err)
				}
				if pin != "" && nettest.MountedAt(t, pin) {
					t.Errorf("a failed Ensure(%q) left a mount", pin)
				}
				return
			}
			if err != nil {
				t.Fatalf("Ensure(%q): %v", pin, err)
			}

			ok, err := IsBPFFS(pin)
			if err != nil || !ok {
				t.Fatalf("IsBPFFS(%q) = %v, %v; want true", pin, ok, err)
			}
			fi, err := os.Stat(pin)
			if err != nil {
				t.Fatal(err)
			}
			if !fi.IsDir() || fi.Mode().Perm() != 0o700 {
				t.Errorf("%s: mode %v, want a directory with 0700", pin, fi.Mode())
			}
			if tt.wantMount != nil && !nettest.MountedAt(t, tt.wantMount(pin)) {
				t.Errorf("expected a bpffs mounted on %s", tt.wantMount(pin))
			}

			// Idempotent: a second call changes nothing and does not stack mounts.
			if err := Ensure(pin); err != nil {
				t.Fatalf("second Ensure(%q): %v", pin, err)
			}
		})
	}
}

func TestIsBPFFS(t *testing.T) {
	requireRoot(t)
	if err := Ensure(DefaultRoot); err != nil {
		t.Fatal(err)
	}
	base := tmpfsDir(t)

	tests := []struct {
		name    string
		path    string
		want    bool
		wantErr bool
	}{
		{name: "default root", path: DefaultRoot, want: true},
		{name: "tmpfs", path: base},
		{name: "ext or whatever backs /tmp", path: os.TempDir()},
		{name: "missing", path: filepath.Join(base, "missing"), wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := IsBPFFS(tt.path)
			if (err != nil) != tt.wantErr {
				t.Fatalf("IsBPFFS(%q) error = %v, wantErr %v", tt.path, err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("IsBPFFS(%q) = %v, want %v", tt.path, got, tt.want)
			}
		})
	}
}

// Prepare records what it did; Release takes back exactly that.
func TestPrepareRelease(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name      string
		setup     func(t *testing.T, base string) string
		wantKept  string // "" = removed
		wantDir   bool   // the directory exists after Release
		extraFile bool   // an entry ctd did not make is in the pin path
	}{
		{name: "created and mounted by ctd", setup: func(t *testing.T, base string) string { return filepath.Join(base, "new") }},
		{name: "existing empty dir: unmounted, kept", setup: func(t *testing.T, base string) string {
			pin := filepath.Join(base, "mine")
			if err := os.Mkdir(pin, 0o755); err != nil {
				t.Fatal(err)
			}
			return pin
		}, wantKept: "ctd did not create it", wantDir: true},
		{name: "created on a bpffs", setup: func(t *testing.T, base string) string {
			fs := filepath.Join(base, "fs")
			if err := os.Mkdir(fs, 0o755); err != nil {
				t.Fatal(err)
			}
			mount(t, "bpf", fs)
			return filepath.Join(fs, "ctd")
		}},
		{name: "foreign entry keeps everything", setup: func(t *testing.T, base string) string { return filepath.Join(base, "shared") },
			wantKept: "it holds other, which ctd did not create", wantDir: true, extraFile: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pin := tc.setup(t, tmpfsDir(t))
			t.Cleanup(func() { unmountAll(t, pin) })
			if err := Prepare(pin); err != nil {
				t.Fatal(err)
			}
			if err := Prepare(pin); err != nil { // idempotent
				t.Fatal(err)
			}
			if tc.extraFile {
				if err := os.Mkdir(filepath.Join(pin, "other"), 0o700); err != nil {
					t.Fatal(err)
				}
			}
			kept, err := Release(pin)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(kept, tc.wantKept) || (tc.wantKept == "") != (kept == "") {
				t.Errorf("Release kept %q, want %q", kept, tc.wantKept)
			}
			_, err = os.Lstat(pin)
			if exists := err == nil; exists != tc.wantDir {
				t.Errorf("after Release %s exists: %v, want %v", pin, exists, tc.wantDir)
			}
			if !tc.extraFile && nettest.MountedAt(t, pin) {
				t.Errorf("after Release a filesystem is still mounted on %s", pin)
			}
		})
	}
}
