// Package etcdtest runs a real etcd cluster of embedded members for tests
// and benchmarks.
package etcdtest

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
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
	// Dir holds the members' data dirs.
	Dir string
	// Binary, if set, runs each member as this etcd executable (e.g.
	// Debian's /usr/bin/etcd, 3.4) instead of embedded in this process;
	// it always fsyncs. Start takes it from $CTD_ETCD_BINARY.
	Binary string
	// BasePort, if set, fixes the ports: client BasePort+i, peer
	// BasePort+100+i for member i (so that a restart finds the same
	// cluster); else free ports are picked.
	BasePort int
}

type member struct {
	name       string
	dir        string
	peer, cli  url.URL
	stop       func() // nil while stopped
	bootstrapd bool
}

// Start starts n members listening on host (an IP address of this
// machine; "" means 127.0.0.1) on free ports, with data dirs in
// t.TempDir(). They are stopped by t.Cleanup, also when the test fails.
func Start(t testing.TB, n int, host string) *Cluster {
	t.Helper()
	return StartWith(t, Options{Members: n, Host: host, Binary: os.Getenv("CTD_ETCD_BINARY")})
}

// StartWith starts a cluster as o says, in t.TempDir() unless o.Dir is
// set; t.Cleanup stops it.
func StartWith(t testing.TB, o Options) *Cluster {
	t.Helper()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	c, err := Run(o)
	if err != nil {
		t.Fatal(err)
	}
	c.t = t
	t.Cleanup(c.StopAll)
	return c
}

// Run starts a cluster as o says; the caller stops it with StopAll. A
// member whose data dir exists restarts from its data.
func Run(o Options) (*Cluster, error) {
	if o.Host == "" {
		o.Host = "127.0.0.1"
	}
	if o.Dir == "" {
		return nil, fmt.Errorf("etcdtest: no data directory")
	}
	c := &Cluster{opts: o}
	var initial []string
	for i := range o.Members {
		m := &member{
			name: fmt.Sprintf("m%d", i),
			dir:  filepath.Join(o.Dir, fmt.Sprintf("m%d", i)),
		}
		peer, cli, err := c.ports(i)
		if err != nil {
			return nil, err
		}
		m.peer = url.URL{Scheme: "http", Host: peer}
		m.cli = url.URL{Scheme: "http", Host: cli}
		c.members = append(c.members, m)
		initial = append(initial, m.name+"="+m.peer.String())
	}
	errc := make(chan error, o.Members)
	for _, m := range c.members {
		go func() { errc <- c.start(m, strings.Join(initial, ",")) }()
	}
	var errs []error
	for range o.Members {
		errs = append(errs, <-errc)
	}
	if err := errors.Join(errs...); err != nil {
		c.StopAll()
		return nil, err
	}
	return c, nil
}

// ports are member i's peer and client addresses: from BasePort on
// (client BasePort+i, peer BasePort+100+i), else free ports.
func (c *Cluster) ports(i int) (peer, cli string, err error) {
	if p := c.opts.BasePort; p != 0 {
		return net.JoinHostPort(c.opts.Host, strconv.Itoa(p+100+i)), net.JoinHostPort(c.opts.Host, strconv.Itoa(p+i)), nil
	}
	if peer, err = freeAddr(c.opts.Host); err == nil {
		cli, err = freeAddr(c.opts.Host)
	}
	return peer, cli, err
}

// freeAddr returns host:port with a port that was free a moment ago.
func freeAddr(host string) (string, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", fmt.Errorf("etcdtest: find a free port on %s: %w", host, err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func (c *Cluster) start(m *member, initial string) error {
	if c.opts.Binary != "" {
		return c.startBinary(m, initial)
	}
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
	m.stop, m.bootstrapd = e.Close, true
	return nil
}

// startBinary runs member m as the etcd executable and waits until it
// reports healthy.
func (c *Cluster) startBinary(m *member, initial string) error {
	state := "new"
	if m.bootstrapd {
		state = "existing"
	}
	cmd := exec.Command(c.opts.Binary,
		"--name", m.name, "--data-dir", m.dir,
		"--listen-peer-urls", m.peer.String(), "--initial-advertise-peer-urls", m.peer.String(),
		"--listen-client-urls", m.cli.String(), "--advertise-client-urls", m.cli.String(),
		"--initial-cluster", initial, "--initial-cluster-token", "ctd-test", "--initial-cluster-state", state,
		"--logger", "zap", "--log-level", "fatal")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the test
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("etcdtest: start member %s (%s): %w", m.name, c.opts.Binary, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	m.stop = func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	health := m.cli.String() + "/health"
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		select {
		case <-done:
			m.stop = nil
			return fmt.Errorf("etcdtest: member %s (%s) exited while starting", m.name, c.opts.Binary)
		default:
		}
		resp, err := http.Get(health)
		if err != nil {
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK && strings.Contains(string(body), `"health":"true"`) {
			m.bootstrapd = true
			return nil
		}
	}
	m.stop()
	m.stop = nil
	return fmt.Errorf("etcdtest: member %s (%s) not healthy after 60s", m.name, c.opts.Binary)
}

// HostPrefixes returns n distinct host prefixes with identities, half in
// 10.0.0.0/8 and half in fd00::/8: the ipcache of the cluster benchmarks.
func HostPrefixes(n int) map[netip.Prefix]uint32 {
	m := make(map[netip.Prefix]uint32, n)
	for i := range n / 2 {
		a4 := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		m[netip.PrefixFrom(a4, 32)] = uint32(1000 + i%5000)
		var a6 [16]byte
		a6[0], a6[13], a6[14], a6[15] = 0xfd, byte(i>>16), byte(i>>8), byte(i)
		m[netip.PrefixFrom(netip.AddrFrom16(a6), 128)] = uint32(1000 + i%5000)
	}
	return m
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
	if m := c.members[i]; m.stop != nil {
		m.stop()
		m.stop = nil
	}
}

// Restart starts a stopped member i again with its data.
func (c *Cluster) Restart(i int) {
	m := c.members[i]
	if m.stop != nil {
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
		if m.stop == nil {
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
