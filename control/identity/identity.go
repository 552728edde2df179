// Package identity allocates cluster-wide security identities for label
// sets in etcd: the same labels get the same number on every node.
package identity

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/ctd-dev/ctd/control/kvstore"
)

// First is the first number handed out; below it are the reserved
// identities (1 host, 2 world).
const First = 256

// Labels is a set of key=value labels.
type Labels map[string]string

// ParseLabels parses "k=v[,k=v...]". Keys and values are non-empty and
// hold no ',' or '='; a key given twice is an error.
func ParseLabels(s string) (Labels, error) {
	l := make(Labels)
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || k == "" || v == "" || strings.ContainsAny(k+v, "=/ \t\n") {
			return nil, fmt.Errorf("invalid labels %q: want k=v[,k=v...] with non-empty keys and values without '=', '/' or spaces, e.g. app=web,env=prod", s)
		}
		if _, dup := l[k]; dup {
			return nil, fmt.Errorf("invalid labels %q: key %q given twice", s, k)
		}
		l[k] = v
	}
	return l, nil
}

// String is the canonical form: k=v pairs sorted by key, comma-separated.
// Label sets equal in any order have the same canonical form.
func (l Labels) String() string {
	keys := slices.Sorted(maps.Keys(l))
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + l[k]
	}
	return strings.Join(parts, ",")
}

// Identity is an allocated identity.
type Identity struct {
	ID     uint32 `json:"identity"`
	Labels Labels `json:"labels"`
}

// Allocator hands out identities in the cluster's etcd.
type Allocator struct {
	Client *kvstore.Client
}

func (a Allocator) ctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, a.Client.Timeout())
}

func (a Allocator) wrap(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("etcd did not answer within %v (--kvstore-timeout)", a.Client.Timeout())
	}
	return fmt.Errorf("etcd: %w", err)
}

// Allocate returns the identity of labels, allocating the next free number
// in one transaction that creates it only if no node did first.
func (a Allocator) Allocate(ctx context.Context, labels Labels) (Identity, error) {
	l, cli := a.Client.Layout(), a.Client.Etcd()
	canon := labels.String()
	lkey, next := l.IdentityLabels(canon), l.IdentityNext()
	for attempt := range 20 {
		rctx, cancel := a.ctx(ctx)
		resp, err := cli.Txn(rctx).Then(clientv3.OpGet(lkey), clientv3.OpGet(next)).Commit()
		cancel()
		if err != nil {
			return Identity{}, a.wrap(err)
		}
		if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
			return parseIdentity(kvs[0].Value, labels)
		}
		n, nextCmp := uint64(First), clientv3.Compare(clientv3.CreateRevision(next), "=", 0)
		if kvs := resp.Responses[1].GetResponseRange().GetKvs(); len(kvs) > 0 {
			v, err := strconv.ParseUint(string(kvs[0].Value), 10, 32)
			if err != nil || v < First {
				return Identity{}, fmt.Errorf("etcd key %s holds %q, not an identity number", next, kvs[0].Value)
			}
			n, nextCmp = v, clientv3.Compare(clientv3.ModRevision(next), "=", kvs[0].ModRevision)
		}
		if n > 0xffffffff-1 {
			return Identity{}, errors.New("identities exhausted: every number up to 4294967295 is allocated")
		}
		ikey := l.IdentityID(uint32(n))
		rctx, cancel = a.ctx(ctx)
		tr, err := cli.Txn(rctx).
			If(clientv3.Compare(clientv3.CreateRevision(lkey), "=", 0), nextCmp, clientv3.Compare(clientv3.CreateRevision(ikey), "=", 0)).
			Then(clientv3.OpPut(lkey, strconv.FormatUint(n, 10)), clientv3.OpPut(ikey, canon), clientv3.OpPut(next, strconv.FormatUint(n+1, 10))).
			Commit()
		cancel()
		if err != nil {
			return Identity{}, a.wrap(err)
		}
		if tr.Succeeded {
			return Identity{ID: uint32(n), Labels: labels}, nil
		}
		// Another node allocated meanwhile: read again.
		sleep(ctx, time.Duration(attempt)*time.Millisecond)
	}
	return Identity{}, errors.New("identity allocate: too many concurrent allocations; retry")
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

func parseIdentity(v []byte, labels Labels) (Identity, error) {
	n, err := strconv.ParseUint(string(v), 10, 32)
	if err != nil || n == 0 {
		return Identity{}, fmt.Errorf("etcd holds %q for labels %s, not an identity number", v, labels)
	}
	return Identity{ID: uint32(n), Labels: labels}, nil
}

// List returns every allocated identity, by number.
func (a Allocator) List(ctx context.Context) ([]Identity, error) {
	l := a.Client.Layout()
	rctx, cancel := a.ctx(ctx)
	defer cancel()
	dir := l.IdentitiesDir() + "ids/"
	resp, err := a.Client.Etcd().Get(rctx, dir, clientv3.WithPrefix())
	if err != nil {
		return nil, a.wrap(err)
	}
	var out []Identity
	for _, kv := range resp.Kvs {
		n, err := strconv.ParseUint(strings.TrimPrefix(string(kv.Key), dir), 10, 32)
		labels, lerr := ParseLabels(string(kv.Value))
		if err != nil || lerr != nil {
			continue
		}
		out = append(out, Identity{ID: uint32(n), Labels: labels})
	}
	slices.SortFunc(out, func(a, b Identity) int { return cmp.Compare(a.ID, b.ID) })
	return out, nil
}

// Get returns identity id.
func (a Allocator) Get(ctx context.Context, id uint32) (Identity, error) {
	rctx, cancel := a.ctx(ctx)
	defer cancel()
	resp, err := a.Client.Etcd().Get(rctx, a.Client.Layout().IdentityID(id))
	if err != nil {
		return Identity{}, a.wrap(err)
	}
	if len(resp.Kvs) == 0 {
		return Identity{}, fmt.Errorf("identity %d is not allocated (see 'ctd identity list')", id)
	}
	labels, err := ParseLabels(string(resp.Kvs[0].Value))
	if err != nil {
		return Identity{}, fmt.Errorf("identity %d: etcd holds corrupt labels %q", id, resp.Kvs[0].Value)
	}
	return Identity{ID: id, Labels: labels}, nil
}
