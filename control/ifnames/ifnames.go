// Package ifnames resolves interface indexes to names, asking the kernel once per index.
package ifnames

import (
	"net"
	"strconv"
)

// Cache resolves interface indexes in the calling thread's network
// namespace and remembers the answers. It is not safe for concurrent use.
type Cache struct {
	names map[uint32]string
}

// New returns an empty cache.
func New() *Cache { return &Cache{names: make(map[uint32]string)} }

// Name returns the name of the interface with index ifindex, or the index
// itself when no interface has it (any more).
func (c *Cache) Name(ifindex uint32) string {
	if s, ok := c.names[ifindex]; ok {
		return s
	}
	s := strconv.FormatUint(uint64(ifindex), 10)
	if ifi, err := net.InterfaceByIndex(int(ifindex)); err == nil {
		s = ifi.Name
	}
	c.names[ifindex] = s
	return s
}

// Forget drops every answer, so that renamed interfaces are looked up again.
func (c *Cache) Forget() { clear(c.names) }
