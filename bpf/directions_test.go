package bpf_test

import "github.com/ctd-dev/ctd/bpf"

// The directions, as the tests write them.
const (
	ingress = bpf.Ingress
	egress  = bpf.Egress
)

func reverse(d bpf.Direction) bpf.Direction { return 1 - d }
