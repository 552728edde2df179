// Package etcdtest runs a real etcd cluster of embedded members for tests
// and benchmarks.
package etcdtest

import (
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// Cluster is a running etcd cluster of embedded members.
type Cluster struct {
	t       testing.TB
	opts    Options
	members []*member
}

// Options configure a cluster.
type Options struct {
	Members int
	Host    string // an IP address of this machine; "" means 127.0.0.1
	// Fsync makes the members fsync their logs as a real deployment does
	// (benchmarks); tests skip it, their data dirs are thrown away.
	Fsync bool
}

type member struct {
	name       string
	dir        string
	peer, cli  url.URL
	etcd       *embed.Etcd
	bootstrapd bool
}

// Start starts n members listening on host (an IP address of this
// machine; "" means 127.0.0.1) on free ports, with data dirs in
// t.TempDir(). They are stopped by t.Cleanup, also when the test fails.
func Start(t testing.TB, n int, host string) *Cluster {
	t.Helper()
	return StartWith(t, Options{Members: n, Host: host})
}

// StartWith starts a cluster as o says.
func StartWith(t testing.TB, o Options) *Cluster {
	t.Helper()
	if o.Host == "" {
		o.Host = "127.0.0.1"
	}
	n, host := o.Members, o.Host
	c := &Cluster{t: t, opts: o}
	dir := t.TempDir()
	var initial []string
	for i := range n {
		m := &member{
			name: fmt.Sprintf("m%d", i),
			dir:  filepath.Join(dir, fmt.Sprintf("m%d", i)),
			peer: url.URL{Scheme: "http", Host: freeAddr(t, host)},
			cli:  url.URL{Scheme: "http", Host: freeAddr(t, host)},
		}
		c.members = append(c.members, m)
		initial = append(initial, m.name+"="+m.peer.String())
	}
	t.Cleanup(c.StopAll)
	errc := make(chan error, n)
	for _, m := range c.members {
		go func() { errc <- c.start(m, strings.Join(initial, ",")) }()
	}
	for range n {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// freeAddr returns host:port with a port that was free a moment ago.
func freeAddr(t testing.TB, host string) string {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatalf("etcdtest: find a free port on %s: %v", host, err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func (c *Cluster) start(m *member, initial string) error {
	cfg := embed.NewConfig()
	cfg.Name = m.name
	cfg.Dir = m.dir
	cfg.ListenPeerUrls = []url.URL{m.peer}
	cfg.AdvertisePeerUrls = []url.URL{m.peer}
	cfg.ListenClientUrls = []url.URL{m.cli}
	cfg.AdvertiseClientUrls = []url.URL{m.cli}
	cfg.InitialCluster = initial
	cfg.InitialClusterToken = "ctd-test"
	cfg.ClusterState = embed.ClusterStateFlagNew
	if m.bootstrapd {
		cfg.ClusterState = embed.ClusterStateFlagExisting
	}
	cfg.LogLevel = "fatal" // a stopped member logs its closed listeners as errors
	cfg.Logger = "zap"
	cfg.UnsafeNoFsync = !c.opts.Fsync
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("etcdtest: start member %s: %w", m.name, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		e.Close()
		return fmt.Errorf("etcdtest: member %s not ready after 60s", m.name)
	}
	m.etcd, m.bootstrapd = e, true
	return nil
}

// Endpoints are the client URLs of every member.
func (c *Cluster) Endpoints() []string {
	var out []string
	for _, m := range c.members {
		out = append(out, m.cli.String())
	}
	return out
}

// Stop stops member i (its data stays for Restart).
func (c *Cluster) Stop(i int) {
	if m := c.members[i]; m.etcd != nil {
		m.etcd.Close()
		m.etcd = nil
	}
}

// Restart starts a stopped member i again with its data.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	m := c.members[i]
	if m.etcd != nil {
		return
	}
	var initial []string
	for _, o := range c.members {
		initial = append(initial, o.name+"="+o.peer.String())
	}
	if err := c.start(m, strings.Join(initial, ",")); err != nil {
		c.t.Fatal(err)
	}
}

// RestartAll starts every stopped member (a single member cannot become
// ready without a quorum, so they start together).
func (c *Cluster) RestartAll() {
	c.t.Helper()
	var initial []string
	for _, o := range c.members {
		initial = append(initial, o.name+"="+o.peer.String())
	}
	errc := make(chan error, len(c.members))
	n := 0
	for _, m := range c.members {
		if m.etcd == nil {
			n++
			go func() { errc <- c.start(m, strings.Join(initial, ",")) }()
		}
	}
	for range n {
		if err := <-errc; err != nil {
			c.t.Fatal(err)
		}
	}
}

// StopAll stops every member.
func (c *Cluster) StopAll() {
	for i := range c.members {
		c.Stop(i)
	}
}
