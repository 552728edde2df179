package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/ctd-dev/ctd/datapath/ipcachemap"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/test/nettest"
)

// cliEnv runs ctd commands in-process against a fresh pin path and state
// directory, as the binary would (main prints the error and exits 1).
type cliEnv struct {
	t             *testing.T
	pin, stateDir string
}

func newCLIEnv(t *testing.T) *cliEnv {
	return &cliEnv{t: t, pin: nettest.PinPath(t), stateDir: t.TempDir()}
}

func (e *cliEnv) run(stdin string, args ...string) (string, error) {
	e.t.Helper()
	root := newRootCmd(&app{})
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetIn(strings.NewReader(stdin))
	root.SetArgs(append([]string{"--pin-path", e.pin, "--state-dir", e.stateDir}, args...))
	err := root.Execute()
	return out.String(), err
}

func (e *cliEnv) must(args ...string) string {
	e.t.Helper()
	out, err := e.run("", args...)
	if err != nil {
		e.t.Fatalf("ctd %s: %v", strings.Join(args, " "), err)
	}
	return out
}

func (e *cliEnv) ipcache() *ipcachemap.Map {
	e.t.Helper()
	m, done, err := (&app{pinPath: e.pin}).openPinnedIPCache()
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(done)
	return m
}

func (e *cliEnv) list() []ipcacheListEntry {
	e.t.Helper()
	var got []ipcacheListEntry
	if err := json.Unmarshal([]byte(e.must("ipcache", "list", "-o", "json")), &got); err != nil {
		e.t.Fatal(err)
	}
	return got
}

func TestIPCacheCLI(t *testing.T) {
	e := newCLIEnv(t)
	if out := e.must("ipcache", "add", "10.0.0.0/8", "id=5"); out != "added 10.0.0.0/8 id=5\n" {
		t.Errorf("add printed %q", out)
	}
	if out := e.must("ipcache", "add", "10.0.0.0/8", "id=world"); out != "updated 10.0.0.0/8 id=2 (world) (was id=5)\n" {
		t.Errorf("add (update) printed %q", out)
	}
	e.must("ipcache", "add", "198.51.100.2", "id=42")
	e.must("ipcache", "add", "fd00:c7d::/64", "id=host")

	for _, tc := range []struct {
		ip, text string
		json     ipcacheGetResult
	}{
		{"198.51.100.2", "198.51.100.2: 198.51.100.2/32 id=42\n", ipcacheGetResult{"198.51.100.2", "198.51.100.2/32", 42}},
		{"10.1.2.3", "10.1.2.3: 10.0.0.0/8 id=2 (world)\n", ipcacheGetResult{"10.1.2.3", "10.0.0.0/8", 2}},
		{"fd00:c7d::2", "fd00:c7d::2: fd00:c7d::/64 id=1 (host)\n", ipcacheGetResult{"fd00:c7d::2", "fd00:c7d::/64", 1}},
		{"203.0.113.9", "203.0.113.9: no matching prefix, id=2 (world)\n", ipcacheGetResult{"203.0.113.9", "", 2}},
	} {
		if out := e.must("ipcache", "get", tc.ip); out != tc.text {
			t.Errorf("get %s printed %q, want %q", tc.ip, out, tc.text)
		}
		var got ipcacheGetResult
		if err := json.Unmarshal([]byte(e.must("ipcache", "get", tc.ip, "-o", "json")), &got); err != nil || got != tc.json {
			t.Errorf("get %s -o json = %+v, %v; want %+v", tc.ip, got, err, tc.json)
		}
	}
	want := []ipcacheListEntry{{"10.0.0.0/8", 2}, {"198.51.100.2/32", 42}, {"fd00:c7d::/64", 1}}
	if got := e.list(); !slices.Equal(got, want) {
		t.Fatalf("list = %v, want %v", got, want)
	}
	// The text listing is a file load reads.
	text := e.must("ipcache", "list")
	if _, err := e.run(text, "ipcache", "load", "--replace", "-"); err != nil {
		t.Fatalf("loading the listing back: %v", err)
	}
	if got := e.list(); !slices.Equal(got, want) {
		t.Fatalf("list after loading the listing = %v, want %v", got, want)
	}

	file := filepath.Join(t.TempDir(), "ids.txt")
	bad := "# ids\n10.0.0.0/8 id=5\n198.51.100.0/24 id=6\n\n\n\n10.0.0.1/8 id=7\n"
	if err := os.WriteFile(file, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}

	// Bad input: one line, an error (exit 1), maps unchanged.
	for _, tc := range []struct {
		stdin   string
		args    []string
		wantErr string
	}{
		{"", []string{"ipcache", "add", "10.0.0.0/33", "id=5"}, "prefix length 33 is out of range"},
		{"", []string{"ipcache", "add", "10.0.0.1/8", "id=5"}, "10.0.0.1/8 has host bits set: did you mean 10.0.0.0/8?"},
		{"", []string{"ipcache", "add", "10.0.0.0/8", "id=abc"}, `invalid identity "abc"`},
		{"", []string{"ipcache", "add", "10.0.0.0/8", "id=0"}, "0 is never a valid identity"},
		{"", []string{"ipcache", "add", "10.0.0.0/8", "id=-1"}, "negative"},
		{"", []string{"ipcache", "add", "10.0.0.0/8", "id=4294967296"}, "out of range"},
		{"", []string{"ipcache", "add", "10.0.0.0/8"}, "missing id=N"},
		{"", []string{"ipcache", "add", "fe80::1%eth0", "id=5"}, "zones"},
		{"", []string{"ipcache", "del", "10.0.0.1/8"}, "host bits set"},
		{"", []string{"ipcache", "del", "10.9.0.0/16"}, "10.9.0.0/16 is not in the ipcache"},
		{"", []string{"ipcache", "get", "10.0.0.0/8"}, "without a prefix length"},
		{"", []string{"ipcache", "get", "fe80::1%lo"}, "zones"},
		{"", []string{"ipcache", "get", "1.2.3.4", "-o", "yaml"}, "invalid --output"},
		{"", []string{"ipcache", "load", "-"}, "ipcache load stdin: no entries"},
		{"10.0.0.0/8 id=5\n10.0.0.0/8 id=0\n", []string{"ipcache", "load", "--replace", "-"}, "ipcache load stdin: line 2: invalid identity 0"},
		{"", []string{"ipcache", "load", file}, "ipcache load " + file + ": line 7: 10.0.0.1/8 has host bits set"},
		{"", []string{"ipcache", "load", file + ".missing"}, "no such file"},
		{"", []string{"ipcache", "add", "10.9.0.0/16", "id=5", "--ipcache-max", "1000"}, "invalid --ipcache-max 1000"},
	} {
		out, err := e.run(tc.stdin, tc.args...)
		switch {
		case err == nil:
			t.Errorf("ctd %s succeeded: %q", strings.Join(tc.args, " "), out)
		case !strings.Contains(err.Error(), tc.wantErr) || strings.Contains(err.Error(), "\n"):
			t.Errorf("ctd %s: error %q, want one line containing %q", strings.Join(tc.args, " "), err, tc.wantErr)
		}
		if got := e.list(); !slices.Equal(got, want) {
			t.Fatalf("ctd %s failed but changed the ipcache: %v", strings.Join(tc.args, " "), got)
		}
	}
}

// refMatch is the straightforward longest-prefix match over a set.
func refMatch(set map[netip.Prefix]uint32, a netip.Addr) ipcacheGetResult {
	res := ipcacheGetResult{IP: a.String(), Identity: ipcachemap.IdentityWorld}
	best := -1
	for p, id := range set {
		if p.Contains(a) && p.Bits() > best {
			best, res.CIDR, res.Identity = p.Bits(), p.String(), id
		}
	}
	return res
}

// TestIPCacheGetMatchesReference is the property test of `ctd ipcache get`:
// on thousands of random, heavily overlapping prefixes of both families
// (loaded with `ctd ipcache load`) and thousands of random addresses, the
// command's JSON answer equals a straightforward Go longest-prefix match,
// before and after deleting a random part of the prefixes.
func TestIPCacheGetMatchesReference(t *testing.T) {
	for _, withDefault := range []bool{false, true} {
		t.Run(fmt.Sprintf("default-route=%v", withDefault), func(t *testing.T) {
			testGetMatchesReference(t, withDefault, rand.New(rand.NewPCG(42, uint64(len(t.Name())))))
		})
	}
}

func testGetMatchesReference(t *testing.T, withDefault bool, rng *rand.Rand) {
	e := newCLIEnv(t)
	// Addresses come from 10.0.0.0/20 and fd00::/116 (plus a few outside),
	// and prefixes are /12-/32 and /100-/128 of them: they nest deeply.
	addr := func(v6 bool) netip.Addr {
		if rng.IntN(20) == 0 {
			if v6 {
				return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(rng.IntN(256))})
			}
			return netip.AddrFrom4([4]byte{203, 0, 113, byte(rng.IntN(256))})
		}
		if v6 {
			return netip.AddrFrom16([16]byte{0: 0xfd, 14: byte(rng.IntN(16)), 15: byte(rng.IntN(256))})
		}
		return netip.AddrFrom4([4]byte{10, 0, byte(rng.IntN(16)), byte(rng.IntN(256))})
	}
	set := map[netip.Prefix]uint32{}
	for len(set) < 3000 {
		v6 := rng.IntN(2) == 1
		a := addr(v6)
		var p netip.Prefix
		if v6 {
			p, _ = a.Prefix(100 + rng.IntN(29))
		} else {
			p, _ = a.Prefix(12 + rng.IntN(21))
		}
		set[p] = 3 + rng.Uint32N(1<<31)
	}
	if withDefault {
		set[netip.MustParsePrefix("0.0.0.0/0")] = 1000
		set[netip.MustParsePrefix("::/0")] = 1001
	}
	var file strings.Builder
	for p, id := range set {
		fmt.Fprintf(&file, "%v id=%d\n", p, id)
	}
	path := filepath.Join(t.TempDir(), "ipcache.txt")
	if err := os.WriteFile(path, []byte(file.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	e.must("ipcache", "load", path)
	m := e.ipcache()

	check := func(n int) {
		t.Helper()
		var buf bytes.Buffer
		for range n {
			a := addr(rng.IntN(2) == 1)
			buf.Reset()
			if err := ipcacheGet(&buf, m, a.String(), "json"); err != nil {
				t.Fatalf("ipcache get %v: %v", a, err)
			}
			var got ipcacheGetResult
			if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
				t.Fatalf("ipcache get %v printed %q: %v", a, buf.String(), err)
			}
			if want := refMatch(set, a); got != want {
				t.Fatalf("ipcache get %v = %+v, reference %+v", a, got, want)
			}
		}
	}
	check(4000)

	// Delete a random third, in one replace, and check again.
	file.Reset()
	for p, id := range set {
		if rng.IntN(3) == 0 {
			delete(set, p)
			continue
		}
		fmt.Fprintf(&file, "%v id=%d\n", p, id)
	}
	if _, err := e.run(file.String(), "ipcache", "load", "--replace", "-"); err != nil {
		t.Fatal(err)
	}
	check(4000)
}

func TestOpenMapsSize(t *testing.T) {
	// Maps created by an ipcache command get --ipcache-max; once pinned,
	// later commands use them whatever their size.
	e := newCLIEnv(t)
	e.must("ipcache", "add", "10.0.0.0/8", "id=5", "--ipcache-max", "100")
	m := e.ipcache()
	for table, n := range m.MaxEntries() {
		if n != 100 {
			t.Fatalf("created %s table holds %d prefixes, want 100", ipcachemap.TableName(table), n)
		}
	}
	e.must("ipcache", "add", "10.1.0.0/16", "id=6")
	e.must("policy", "add", "ingress", "id=5", "allow")
	if _, err := e.run("", "ipcache", "add", "10.2.0.0/16", "id=6", "--ipcache-max", fmt.Sprint(loader.DefaultIPCacheMax)); err == nil {
		t.Fatal("an explicit --ipcache-max other than the pinned size was accepted")
	}
}

func TestIPCacheUnusableStore(t *testing.T) {
	// A change that cannot be recorded is not made, and creates no maps.
	e := newCLIEnv(t)
	e.stateDir = filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(e.stateDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"ipcache", "add", "10.0.0.0/8", "id=5"},
		{"policy", "default", "ingress", "deny"},
	} {
		if _, err := e.run("", args...); err == nil || !strings.Contains(err.Error(), "not a directory") {
			t.Fatalf("ctd %s with a file as state directory: %v", strings.Join(args, " "), err)
		}
	}
	if _, err := os.Stat(e.pin); !os.IsNotExist(err) {
		t.Fatalf("failed commands created %s: %v", e.pin, err)
	}
}
