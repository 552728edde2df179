package kvstore

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/ctd-dev/ctd/control/store"
)

// ErrConflict says that another writer changed the state a write was
// based on; nothing was written.
var ErrConflict = errors.New("the cluster ipcache was replaced by another writer meanwhile; nothing was changed, retry")

// maxTxnOps is etcd's default limit of operations in one transaction
// (--max-txn-ops), the same in 3.4 and later.
const maxTxnOps = 128

// retries bounds the optimistic-concurrency loops.
const retries = 10

func parseGen(s string) (uint64, error) { return strconv.ParseUint(s, 10, 64) }

// current reads the live ipcache generation and the comparison that holds
// while it stays live.
func (c *Client) current(ctx context.Context) (uint64, clientv3.Cmp, error) {
	rctx, cancel := c.ctx(ctx)
	defer cancel()
	key := c.layout.IPCacheCurrent()
	resp, err := c.cli.Get(rctx, key)
	if err != nil {
		return 0, clientv3.Cmp{}, c.wrap(err)
	}
	if len(resp.Kvs) == 0 {
		return 0, clientv3.Compare(clientv3.CreateRevision(key), "=", 0), nil
	}
	gen, err := parseGen(string(resp.Kvs[0].Value))
	if err != nil {
		return 0, clientv3.Cmp{}, fmt.Errorf("etcd key %s holds %q, not a generation number", key, resp.Kvs[0].Value)
	}
	return gen, clientv3.Compare(clientv3.Value(key), "=", string(resp.Kvs[0].Value)), nil
}

// changeBucket changes the bucket of p in the current generation with fn,
// in a transaction that holds only while neither the generation nor the
// bucket changed; it retries when they did.
func (c *Client) changeBucket(ctx context.Context, p netip.Prefix, fn func(b map[netip.Prefix]uint32) error) error {
	for range retries {
		gen, guard, err := c.current(ctx)
		if err != nil {
			return err
		}
		key := c.layout.IPCacheBucket(gen, BucketOf(p))
		rctx, cancel := c.ctx(ctx)
		resp, err := c.cli.Get(rctx, key)
		cancel()
		if err != nil {
			return c.wrap(err)
		}
		b, bcmp := map[netip.Prefix]uint32{}, clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
		if len(resp.Kvs) > 0 {
			b, bcmp = decodeBucket(resp.Kvs[0].Value), clientv3.Compare(clientv3.ModRevision(key), "=", resp.Kvs[0].ModRevision)
		}
		if err := fn(b); err != nil {
			return err
		}
		op := clientv3.OpPut(key, encodeBucket(b))
		if len(b) == 0 {
			op = clientv3.OpDelete(key)
		}
		rctx, cancel = c.ctx(ctx)
		tr, err := c.cli.Txn(rctx).If(guard, bcmp).Then(op).Commit()
		cancel()
		if err != nil {
			return c.wrap(err)
		}
		if tr.Succeeded {
			return nil
		}
	}
	return ErrConflict
}

// IPCacheAdd sets p's identity in the cluster ipcache and returns the one
// it had (0: none).
func (c *Client) IPCacheAdd(ctx context.Context, p netip.Prefix, id uint32) (uint32, error) {
	var prev uint32
	err := c.changeBucket(ctx, p, func(b map[netip.Prefix]uint32) error {
		prev = b[p]
		b[p] = id
		return nil
	})
	return prev, err
}

// IPCacheDelete removes exactly p from the cluster ipcache and returns its
// identity.
func (c *Client) IPCacheDelete(ctx context.Context, p netip.Prefix) (uint32, error) {
	var prev uint32
	err := c.changeBucket(ctx, p, func(b map[netip.Prefix]uint32) error {
		id, ok := b[p]
		if !ok {
			return fmt.Errorf("%v is not in the cluster ipcache (del removes exactly the prefix given; see 'ctd ipcache list --cluster')", p)
		}
		prev = id
		delete(b, p)
		return nil
	})
	return prev, err
}

// LoadResult counts what a load changed, as ipcache.Result does locally.
type LoadResult struct {
	Added, Updated, Unchanged, Deleted int
}

// IPCacheLoad writes entries as a new generation of the cluster ipcache
// (with replace exactly the entries, else the current prefixes with the
// entries over them) and then makes it current in one transaction, so
// that every node applies it whole. If another writer replaced the ipcache
// meanwhile, or etcd fails midway, the current generation stays as it was.
func (c *Client) IPCacheLoad(ctx context.Context, entries map[netip.Prefix]uint32, replace bool) (LoadResult, error) {
	var res LoadResult
	base, guard, err := c.current(ctx)
	if err != nil {
		return res, err
	}
	old := make(map[netip.Prefix]uint32)
	_, err = c.get(ctx, c.layout.IPCacheGen(base), func(k, v []byte, _ int64) {
		if pk := c.layout.parse(string(k)); pk.kind == kindIPCacheBucket {
			maps.Copy(old, decodeBucket(v))
		}
	})
	if err != nil {
		return res, err
	}
	final := entries
	if !replace {
		final = make(map[netip.Prefix]uint32, len(old)+len(entries))
		for p, id := range old {
			final[p] = id
		}
		for p, id := range entries {
			final[p] = id
		}
	}
	for p, id := range entries {
		switch prev, ok := old[p]; {
		case !ok:
			res.Added++
		case prev != id:
			res.Updated++
		default:
			res.Unchanged++
		}
	}
	if replace {
		for p := range old {
			if _, ok := entries[p]; !ok {
				res.Deleted++
			}
		}
	}

	gen, err := c.nextGeneration(ctx, base)
	if err != nil {
		return LoadResult{}, err
	}
	if err := c.writeGeneration(ctx, gen, final); err != nil {
		c.dropGeneration(gen)
		return LoadResult{}, fmt.Errorf("%w (nothing was changed)", err)
	}
	rctx, cancel := c.ctx(ctx)
	resp, err := c.cli.Txn(rctx).If(guard).Then(clientv3.OpPut(c.layout.IPCacheCurrent(), strconv.FormatUint(gen, 10))).Commit()
	cancel()
	switch {
	case err != nil:
		// The switch may or may not have landed: leave the generation
		// for the next load to clean up if it did not.
		return LoadResult{}, fmt.Errorf("%w: the load may not have been applied; check 'ctd ipcache list --cluster'", c.wrap(err))
	case !resp.Succeeded:
		c.dropGeneration(gen)
		return LoadResult{}, ErrConflict
	}
	c.dropOlderGenerations(ctx, gen)
	return res, nil
}

// nextGeneration hands out a generation number above base that no other
// load uses.
func (c *Client) nextGeneration(ctx context.Context, base uint64) (uint64, error) {
	key := c.layout.IPCacheNext()
	for range retries {
		rctx, cancel := c.ctx(ctx)
		resp, err := c.cli.Get(rctx, key)
		cancel()
		if err != nil {
			return 0, c.wrap(err)
		}
		next, cmp := base+1, clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
		if len(resp.Kvs) > 0 {
			n, err := parseGen(string(resp.Kvs[0].Value))
			if err != nil {
				return 0, fmt.Errorf("etcd key %s holds %q, not a generation number", key, resp.Kvs[0].Value)
			}
			next = max(n, base+1)
			cmp = clientv3.Compare(clientv3.ModRevision(key), "=", resp.Kvs[0].ModRevision)
		}
		rctx, cancel = c.ctx(ctx)
		tr, err := c.cli.Txn(rctx).If(cmp).Then(clientv3.OpPut(key, strconv.FormatUint(next+1, 10))).Commit()
		cancel()
		if err != nil {
			return 0, c.wrap(err)
		}
		if tr.Succeeded {
			return next, nil
		}
	}
	return 0, errors.New("etcd: could not allocate an ipcache generation: too many concurrent loads; retry")
}

// maxTxnBytes keeps a transaction well below etcd's default request
// limit (--max-request-bytes, 1.5 MiB).
const maxTxnBytes = 1 << 20

// writeGeneration writes entries as the buckets of generation gen, in
// transactions of at most maxTxnOps puts and maxTxnBytes, several at a time.
func (c *Client) writeGeneration(ctx context.Context, gen uint64, entries map[netip.Prefix]uint32) error {
	buckets := make(map[uint32]map[netip.Prefix]uint32)
	for p, id := range entries {
		b := BucketOf(p)
		if buckets[b] == nil {
			buckets[b] = make(map[netip.Prefix]uint32)
		}
		buckets[b][p] = id
	}
	var txns [][]clientv3.Op
	var ops []clientv3.Op
	size := 0
	for _, b := range slices.Sorted(maps.Keys(buckets)) {
		v := encodeBucket(buckets[b])
		if len(ops) == maxTxnOps || (len(ops) > 0 && size+len(v) > maxTxnBytes) {
			txns, ops, size = append(txns, ops), nil, 0
		}
		ops = append(ops, clientv3.OpPut(c.layout.IPCacheBucket(gen, b), v))
		size += len(v)
	}
	if len(ops) > 0 {
		txns = append(txns, ops)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(4)
	for _, ops := range txns {
		g.Go(func() error {
			rctx, cancel := c.ctx(gctx)
			defer cancel()
			_, err := c.cli.Txn(rctx).Then(ops...).Commit()
			return c.wrap(err)
		})
	}
	return g.Wait()
}

// dropGeneration deletes a generation that never became current, best
// effort (the next load deletes what is left).
func (c *Client) dropGeneration(gen uint64) {
	ctx, cancel := c.ctx(context.Background())
	defer cancel()
	_, _ = c.cli.Delete(ctx, c.layout.IPCacheGen(gen), clientv3.WithPrefix())
}

// dropOlderGenerations deletes every generation below gen: none of them
// can become current again (a load based on one of them fails its switch).
func (c *Client) dropOlderGenerations(ctx context.Context, gen uint64) {
	gens := make(map[uint64]bool)
	dir := c.layout.ipcacheDir()
	rctx, cancel := c.ctx(ctx)
	resp, err := c.cli.Get(rctx, dir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	cancel()
	if err != nil {
		return
	}
	for _, kv := range resp.Kvs {
		g, _, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), dir), "/")
		if n, err := parseGen(g); ok && err == nil && n < gen {
			gens[n] = true
		}
	}
	for g := range gens {
		c.dropGeneration(g)
	}
}

// PolicyAdd sets a rule in the cluster policy and returns the verdict it
// had (VerdictUnset: none).
func (c *Client) PolicyAdd(ctx context.Context, k store.RuleKey, v store.Verdict) (store.Verdict, error) {
	return c.putVerdict(ctx, c.layout.RuleKey(k), v)
}

// putVerdict sets key to v and returns the verdict it held (VerdictUnset:
// none).
func (c *Client) putVerdict(ctx context.Context, key string, v store.Verdict) (store.Verdict, error) {
	rctx, cancel := c.ctx(ctx)
	defer cancel()
	resp, err := c.cli.Put(rctx, key, v.String(), clientv3.WithPrevKV())
	if err != nil {
		return 0, c.wrap(err)
	}
	if resp.PrevKv == nil {
		return store.VerdictUnset, nil
	}
	old, _ := parseVerdict(string(resp.PrevKv.Value))
	return old, nil
}

// PolicyDelete deletes the rule k from the cluster policy; with a verdict
// other than VerdictUnset, only if the rule has it. It returns the verdict
// the rule had.
func (c *Client) PolicyDelete(ctx context.Context, k store.RuleKey, v store.Verdict, selector string) (store.Verdict, error) {
	key := c.layout.RuleKey(k)
	rctx, cancel := c.ctx(ctx)
	defer cancel()
	cmp := clientv3.Compare(clientv3.CreateRevision(key), ">", 0)
	if v != store.VerdictUnset {
		cmp = clientv3.Compare(clientv3.Value(key), "=", v.String())
	}
	resp, err := c.cli.Txn(rctx).If(cmp).Then(clientv3.OpDelete(key, clientv3.WithPrevKV())).Else(clientv3.OpGet(key)).Commit()
	if err != nil {
		return 0, c.wrap(err)
	}
	if !resp.Succeeded {
		kvs := resp.Responses[0].GetResponseRange().GetKvs()
		if len(kvs) == 0 {
			return 0, fmt.Errorf("no rule %q in the cluster policy (see 'ctd policy list --cluster')", selector)
		}
		have, _ := parseVerdict(string(kvs[0].Value))
		return 0, fmt.Errorf("rule %q is %v, not %v: nothing deleted", selector, have, v)
	}
	old, _ := parseVerdict(string(resp.Responses[0].GetResponseDeleteRange().GetPrevKvs()[0].Value))
	return old, nil
}

// PolicyDefault sets a direction's default verdict for the cluster and
// returns the one it had.
func (c *Client) PolicyDefault(ctx context.Context, d store.Direction, v store.Verdict) (store.Verdict, error) {
	return c.putVerdict(ctx, c.layout.DefaultKey(d), v)
}
