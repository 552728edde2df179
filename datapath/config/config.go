// Package config is the one writer of the datapath's configuration (config_v1): default verdicts, policy rule count, event rate limit.
//
// config_v1 is an array of one value that the datapath reads whole, and a
// map update writes a whole value: a writer that changes one field must
// read the others and write them back. Every writer goes through Update,
// which holds an exclusive flock(2) on the pin directory from the read to
// the write, so that two ctd processes (a CLI command and the daemon, say)
// changing different fields at once each keep the other's change. A lock on
// the directory rather than a spin lock in the value keeps the map's
// layout as it is.
package config

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
)

// Values is the configuration as the datapath reads it.
type Values = bpf.CtdConfig

// Map is config_v1 and the lock that serialises its writers.
type Map struct {
	m       *ebpf.Map
	lockDir string     // flocked around every update; "" for a map that is not pinned
	mu      sync.Mutex // writers of this process; flock serialises processes
}

// New wraps config_v1, pinned in lockDir ("" for a map of this process
// only, such as a test's).
func New(m *ebpf.Map, lockDir string) *Map { return &Map{m: m, lockDir: lockDir} }

// Read returns the configuration.
func (c *Map) Read() (Values, error) {
	var v Values
	if err := c.m.Lookup(uint32(0), &v); err != nil {
		return Values{}, fmt.Errorf("read config_v1: %w", err)
	}
	return v, nil
}

// Update applies fn to the configuration and writes it back, as one step
// with respect to every other Update on the same pin directory, in any
// process. fn must only change the fields its caller owns.
func (c *Map) Update(fn func(*Values)) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	unlock, err := c.lock()
	if err != nil {
		return err
	}
	defer unlock()
	v, err := c.Read()
	if err != nil {
		return err
	}
	fn(&v)
	if err := c.m.Put(uint32(0), &v); err != nil {
		return fmt.Errorf("write config_v1: %w", err)
	}
	return nil
}

// lock takes the exclusive flock on the pin directory.
func (c *Map) lock() (func(), error) {
	if c.lockDir == "" {
		return func() {}, nil
	}
	f, err := os.Open(c.lockDir)
	if err != nil {
		return nil, fmt.Errorf("lock %s to write config_v1: %w", c.lockDir, err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s to write config_v1: %w", c.lockDir, err)
	}
	return func() { f.Close() }, nil // closing the last descriptor releases the lock
}
