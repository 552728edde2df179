package mapinfo

import (
	"context"
	"sync"
	"time"
)

// Counts keeps the entry counts of maps for readers that must not walk a
// map themselves, such as a metrics scrape. A reader gets the last count at
// once. While readers keep asking, the maps are counted again in the
// background every MaxAge, one count at a time however many readers there
// are, so the counts they get are at most about MaxAge old; when nobody has
// asked for ten times MaxAge, counting stops until the next reader.
type Counts struct {
	ctx       context.Context
	maps      []Map
	maxAge    time.Duration
	idleAfter time.Duration

	mu       sync.Mutex
	counts   map[string]uint64 // by map name; absent before the first count
	asked    time.Time         // when a reader last asked
	counting bool
}

// NewCounts returns Counts of maps, counted every maxAge while asked for,
// until ctx is done.
func NewCounts(ctx context.Context, maps []Map, maxAge time.Duration) *Counts {
	return &Counts{ctx: ctx, maps: maps, maxAge: maxAge, idleAfter: 10 * maxAge, counts: make(map[string]uint64)}
}

// Entries returns the last count of the map named name; ok is false before
// its first count finished (or when the last count of it failed).
func (c *Counts) Entries(name string) (n uint64, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.asked = time.Now()
	if !c.counting && c.ctx.Err() == nil {
		c.counting = true
		go c.run()
	}
	n, ok = c.counts[name]
	return n, ok
}

// run counts the maps every maxAge until nobody asked for idleAfter, or
// ctx is done.
func (c *Counts) run() {
	t := time.NewTimer(c.maxAge)
	defer t.Stop()
	for {
		counts := make(map[string]uint64, len(c.maps))
		for _, m := range c.maps {
			if n, err := Count(m.Map); err == nil {
				counts[m.Name] = n
			}
		}
		c.mu.Lock()
		c.counts = counts
		c.mu.Unlock()
		t.Reset(c.maxAge)
		select {
		case <-c.ctx.Done():
		case <-t.C:
		}
		c.mu.Lock()
		if time.Since(c.asked) > c.idleAfter || c.ctx.Err() != nil {
			c.counting = false
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
	}
}
