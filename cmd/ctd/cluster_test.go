package main

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/test/etcdtest"
)

// deadEndpoint is an etcd URL where nothing listens.
func deadEndpoint(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr
}

// TestClusterCLIErrors checks that cluster-mode commands refuse bad input,
// and an etcd that does not answer, with one line and no change.
func TestClusterCLIErrors(t *testing.T) {
	e := newCLIEnv(t)
	dead := deadEndpoint(t)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--kvstore-endpoints", "nope", "ipcache", "add", "198.51.100.0/24", "id=5"}, `invalid --kvstore-endpoints URL "nope"`},
		{[]string{"--kvstore-endpoints", dead, "--kvstore-prefix", "ctd", "ipcache", "add", "198.51.100.0/24", "id=5"}, `invalid --kvstore-prefix "ctd"`},
		{[]string{"--kvstore-endpoints", dead, "--kvstore-timeout", "300ms", "ipcache", "add", "198.51.100.0/24", "id=5"}, "did not answer within 300ms"},
		{[]string{"--kvstore-endpoints", dead, "--kvstore-timeout", "300ms", "policy", "default", "ingress", "deny"}, "did not answer within 300ms"},
		{[]string{"--kvstore-endpoints", dead, "--kvstore-timeout", "300ms", "identity", "allocate", "app=web"}, "did not answer within 300ms"},
		{[]string{"--kvstore-endpoints", dead, "identity", "allocate", "app"}, `invalid labels "app"`},
		{[]string{"identity", "list"}, "not in cluster mode"},
		{[]string{"endpoint", "add", "198.51.100.0/24", "id=5"}, "an endpoint is one address"},
		{[]string{"endpoint", "add", "198.51.100.7", "id=0"}, "invalid identity 0"},
		{[]string{"endpoint", "del", "198.51.100.7"}, "not an endpoint of this node"},
		{[]string{"cluster", "status"}, "no cluster status"},
	} {
		t0 := time.Now()
		out, err := e.run("", c.args...)
		if err == nil {
			t.Errorf("ctd %s succeeded: %s", strings.Join(c.args, " "), out)
			continue
		}
		if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, c.want) {
			t.Errorf("ctd %s: %q, want one line containing %q", strings.Join(c.args, " "), msg, c.want)
		}
		if took := time.Since(t0); took > 5*time.Second {
			t.Errorf("ctd %s took %v", strings.Join(c.args, " "), took)
		}
	}
	// Nothing was written locally.
	if _, err := os.Stat(filepath.Join(e.pin, "ipcache4_v1")); err == nil {
		t.Error("a failed cluster write created the local maps")
	}
}

func TestClusterCLI(t *testing.T) {
	ec := etcdtest.Start(t, 1, "")
	e := newCLIEnv(t)
	kv := []string{"--kvstore-endpoints", strings.Join(ec.Endpoints(), ",")}
	run := func(args ...string) string { return e.must(append(kv, args...)...) }
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"ipcache", "add", "198.51.100.0/24", "id=300"}, "added 198.51.100.0/24 id=300 (cluster)"},
		{[]string{"ipcache", "add", "198.51.100.0/24", "id=301"}, "updated 198.51.100.0/24 id=301 (was id=300) (cluster)"},
		{[]string{"ipcache", "list", "--cluster"}, "198.51.100.0/24 id=301"},
		{[]string{"ipcache", "get", "--cluster", "198.51.100.9"}, "198.51.100.9: 198.51.100.0/24 id=301 (cluster)"},
		{[]string{"ipcache", "del", "198.51.100.0/24"}, "deleted 198.51.100.0/24 id=301 (cluster)"},
		{[]string{"policy", "default", "ingress", "deny"}, "default ingress deny (was allow, unset) (cluster)"},
		{[]string{"policy", "add", "ingress", "id=301", "tcp/80", "allow"}, "added ingress id=301 tcp/80 allow (cluster)"},
		{[]string{"policy", "list", "--cluster"}, "default ingress deny"},
		{[]string{"policy", "del", "ingress", "id=301", "tcp/80"}, "deleted ingress id=301 tcp/80 allow (cluster)"},
		{[]string{"identity", "allocate", "b=2,a=1", "-o", "json"}, `"identity": 256`},
		{[]string{"identity", "allocate", "a=1,b=2"}, "256 a=1,b=2"},
		{[]string{"identity", "get", "256"}, "256 a=1,b=2"},
		{[]string{"identity", "list"}, "256 a=1,b=2"},
		{[]string{"endpoint", "add", "198.51.100.7", "id=256"}, "added endpoint 198.51.100.7 id=256"},
		{[]string{"endpoint", "list"}, "198.51.100.7 id=256"},
	} {
		if out := run(c.args...); !strings.Contains(out, c.want) {
			t.Errorf("ctd %s printed %q, want %q", strings.Join(c.args, " "), out, c.want)
		}
	}
	f := filepath.Join(t.TempDir(), "ipcache.txt")
	if err := os.WriteFile(f, []byte("198.51.100.0/25 id=5\nfd00::/64 id=6\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out := run("ipcache", "load", f, "--replace"); !strings.Contains(out, "2 added, 0 updated, 0 unchanged, 0 deleted") {
		t.Errorf("load printed %q", out)
	}
	if out := run("ipcache", "list", "--cluster", "-o", "json"); !strings.Contains(out, `"cidr": "fd00::/64"`) {
		t.Errorf("list --cluster -o json printed %q", out)
	}
}
