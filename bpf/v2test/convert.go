package v2test

import (
	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/loader"
)

// Converters are the converters into this build's layouts: ct_v1 to ct_v2.
// The owner of a layout provides them, as a real layout change would.
func Converters() []loader.Converter {
	return []loader.Converter{
		{From: bpf.CtdMapCtV1, To: CtdMapCtV2, Convert: loader.Typed(CtV1ToV2)},
		{From: bpf.CtdMapCtUnconfirmedV1, To: CtdMapCtUnconfirmedV2, Convert: loader.Typed(CtV1ToV2)},
	}
}

// CtV1ToV2 converts one conntrack entry; converted entries have Origin 1.
func CtV1ToV2(k bpf.CtdCtKey, e bpf.CtdCtEntry) (CtdCtKey, CtdCtEntry) {
	nk := CtdCtKey{AddrA: k.AddrA, AddrB: k.AddrB, PortA: k.PortA, PortB: k.PortB, Proto: k.Proto, Family: k.Family}
	return nk, CtdCtEntry{
		FirstSeen:     e.FirstSeen,
		LastSeen:      e.LastSeen,
		SrcIdentity:   e.SrcIdentity,
		DstIdentity:   e.DstIdentity,
		PacketsOrig:   e.PacketsOrig,
		PacketsReply:  e.PacketsReply,
		BytesOrig:     e.BytesOrig,
		BytesReply:    e.BytesReply,
		Ifindex:       e.Ifindex,
		State:         e.State,
		OrigIsB:       e.OrigIsB,
		TcpFlagsOrig:  e.TcpFlagsOrig,
		TcpFlagsReply: e.TcpFlagsReply,
		Flags:         e.Flags,
		Origin:        1,
	}
}
