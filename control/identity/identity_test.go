package identity_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/control/identity"
	"github.com/ctd-dev/ctd/control/kvstore"
	"github.com/ctd-dev/ctd/test/etcdtest"
)

func TestParseLabels(t *testing.T) {
	for _, c := range []struct {
		in, canon string
		ok        bool
	}{
		{"app=web", "app=web", true},
		{"env=prod,app=web", "app=web,env=prod", true},
		{" app=web , env=prod ", "app=web,env=prod", true},
		{"", "", false},
		{"app", "", false},
		{"app=", "", false},
		{"=web", "", false},
		{"app=web,app=db", "", false},
		{"a/b=c", "", false},
		{"app=w=b", "", false},
	} {
		l, err := identity.ParseLabels(c.in)
		if (err == nil) != c.ok {
			t.Errorf("ParseLabels(%q) error %v, want ok=%v", c.in, err, c.ok)
			continue
		}
		if c.ok && l.String() != c.canon {
			t.Errorf("ParseLabels(%q) = %s, want %s", c.in, l, c.canon)
		}
	}
}

// TestAllocateAgrees allocates label sets from two clients (two nodes) at
// once, in different orders: each set must get one number, the same on
// both, numbers from 256 on and distinct across sets.
func TestAllocateAgrees(t *testing.T) {
	ec := etcdtest.Start(t, 3, "")
	var allocs [2]identity.Allocator
	for i := range allocs {
		c, err := kvstore.New(kvstore.Config{Endpoints: ec.Endpoints()[i:], Timeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		allocs[i] = identity.Allocator{Client: c}
	}
	const sets = 20
	var got [2][sets]uint32
	var wg sync.WaitGroup
	for node := range allocs {
		wg.Go(func() {
			for i := range sets {
				s := fmt.Sprintf("app=a%d,env=prod", i)
				if node == 1 {
					s = fmt.Sprintf("env=prod,app=a%d", i)
				}
				l, err := identity.ParseLabels(s)
				if err != nil {
					t.Error(err)
					return
				}
				id, err := allocs[node].Allocate(context.Background(), l)
				if err != nil {
					t.Error(err)
					return
				}
				got[node][i] = id.ID
			}
		})
	}
	wg.Wait()
	seen := make(map[uint32]int)
	for i := range sets {
		if got[0][i] != got[1][i] {
			t.Errorf("set %d: node 0 got %d, node 1 got %d", i, got[0][i], got[1][i])
		}
		if got[0][i] < identity.First {
			t.Errorf("set %d got %d, below %d", i, got[0][i], identity.First)
		}
		if j, dup := seen[got[0][i]]; dup {
			t.Errorf("sets %d and %d both got %d", j, i, got[0][i])
		}
		seen[got[0][i]] = i
	}
	list, err := allocs[0].List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != sets {
		t.Errorf("list has %d identities, want %d", len(list), sets)
	}
	one, err := allocs[1].Get(context.Background(), got[0][3])
	if err != nil || one.Labels.String() != "app=a3,env=prod" {
		t.Errorf("get %d = %v, %v", got[0][3], one, err)
	}
	if _, err := allocs[1].Get(context.Background(), 9999); err == nil {
		t.Error("get of an identity never allocated succeeded")
	}
}
