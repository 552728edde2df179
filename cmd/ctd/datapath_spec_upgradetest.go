//go:build ctd_upgradetest

package main

import (
	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf/upgradetest"
)

// datapathSpec, in this test-only build, returns the datapath compiled for
// the older BPF ISA (package upgradetest): the same maps, different
// programs. The restart test upgrades a running daemon to a binary built
// this way.
func datapathSpec() (*ebpf.CollectionSpec, error) { return upgradetest.LoadCtd() }
