package bpf

import "strconv"

// Direction is the hook a program runs at: enum direction, as the maps key
// it (policy rules, counters, events).
type Direction uint8

const (
	Ingress = Direction(CtdDirectionDIR_INGRESS)
	Egress  = Direction(CtdDirectionDIR_EGRESS)
)

func (d Direction) String() string {
	switch d {
	case Ingress:
		return "ingress"
	case Egress:
		return "egress"
	}
	return "dir" + strconv.Itoa(int(d))
}
