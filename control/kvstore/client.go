package kvstore

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// DefaultTimeout bounds every request to etcd.
const DefaultTimeout = 5 * time.Second

// Config says where the cluster's etcd is.
type Config struct {
	Endpoints []string      // URLs, e.g. http://10.0.0.1:2379
	Prefix    string        // key prefix; "" means DefaultPrefix
	Timeout   time.Duration // per request; 0 means DefaultTimeout
}

// ParseEndpoints splits a comma-separated --kvstore-endpoints value and
// checks every URL.
func ParseEndpoints(s string) ([]string, error) {
	var out []string
	for _, e := range strings.Split(s, ",") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		u, err := url.Parse(e)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Port() == "" {
			return nil, fmt.Errorf("invalid --kvstore-endpoints URL %q: want http://HOST:PORT or https://HOST:PORT, comma-separated", e)
		}
		out = append(out, e)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("invalid --kvstore-endpoints %q: give at least one URL, e.g. http://127.0.0.1:2379", s)
	}
	return out, nil
}

// Client talks to the cluster's etcd with ctd's key layout.
type Client struct {
	cli     *clientv3.Client
	layout  Layout
	timeout time.Duration
	eps     string
}

// New returns a client for cfg. It does not wait for a connection: each
// request waits at most the timeout.
func New(cfg Config) (*Client, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("no etcd endpoints: set --kvstore-endpoints")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	l, err := NewLayout(cfg.Prefix)
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            cfg.Endpoints,
		DialTimeout:          cfg.Timeout,
		DialKeepAliveTime:    cfg.Timeout,
		DialKeepAliveTimeout: cfg.Timeout,
		Logger:               zap.NewNop(),
		MaxCallRecvMsgSize:   256 << 20,
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client for %s: %w", strings.Join(cfg.Endpoints, ","), err)
	}
	return &Client{cli: cli, layout: l, timeout: cfg.Timeout, eps: strings.Join(cfg.Endpoints, ",")}, nil
}

// Close closes the connections.
func (c *Client) Close() error { return c.cli.Close() }

// Layout is the client's key layout.
func (c *Client) Layout() Layout { return c.layout }

// Timeout is the per-request timeout.
func (c *Client) Timeout() time.Duration { return c.timeout }

// Etcd is the underlying etcd client.
func (c *Client) Etcd() *clientv3.Client { return c.cli }

// ctx bounds one request by the timeout.
func (c *Client) ctx(parent context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(parent, c.timeout)
}

// wrap turns an etcd error into one line naming the cluster.
func (c *Client) wrap(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "DeadlineExceeded") {
		return fmt.Errorf("etcd at %s did not answer within %v (--kvstore-timeout)", c.eps, c.timeout)
	}
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	return fmt.Errorf("etcd at %s: %s", c.eps, msg)
}

// get reads the keys with prefix at a single revision, in pages so that a
// large table never needs one huge response. It returns the revision.
func (c *Client) get(ctx context.Context, prefix string, fn func(key, value []byte, createRev int64)) (int64, error) {
	const page = 10000
	end := clientv3.GetPrefixRangeEnd(prefix)
	from, rev := prefix, int64(0)
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(page), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		rctx, cancel := c.ctx(ctx)
		resp, err := c.cli.Get(rctx, from, opts...)
		cancel()
		if err != nil {
			return 0, c.wrap(err)
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			fn(kv.Key, kv.Value, kv.CreateRevision)
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return rev, nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// Ping reads one key: it tells whether a quorum answers.
func (c *Client) Ping(ctx context.Context) (int64, error) {
	rctx, cancel := c.ctx(ctx)
	defer cancel()
	resp, err := c.cli.Get(rctx, c.layout.IPCacheCurrent())
	if err != nil {
		return 0, c.wrap(err)
	}
	return resp.Header.Revision, nil
}

// Snapshot reads the whole cluster state once: what every node would
// enforce, the published endpoints and the address conflicts.
func (c *Client) Snapshot(ctx context.Context) (*Snapshot, error) {
	m := newMirror(c.layout)
	var d dirty
	rev, err := c.get(ctx, c.layout.Root(), func(k, v []byte, cr int64) { m.put(string(k), v, cr, &d) })
	if err != nil {
		return nil, err
	}
	return &Snapshot{Revision: rev, Desired: m.desired(), Endpoints: m.endpointList(), Conflicts: m.conflicts()}, nil
}

// Snapshot is the cluster state at one revision.
type Snapshot struct {
	Revision  int64
	Desired   *Desired
	Endpoints []Endpoint
	Conflicts []Conflict
}
