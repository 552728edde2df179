//go:build !ctd_upgradetest

package main

import (
	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
)

// datapathSpec returns the datapath `ctd daemon` loads: the one built into
// package bpf. Builds with -tags ctd_upgradetest load another build of the
// programs instead (datapath_spec_upgradetest.go).
func datapathSpec() (*ebpf.CollectionSpec, error) { return bpf.LoadCtd() }
