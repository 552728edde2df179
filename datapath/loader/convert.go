package loader

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/ctd-dev/ctd/bpf"
)

// A Converter turns the entries of a table pinned in an older layout into
// entries of a newer one. The owner of a layout provides the converters
// into it (this package for the datapath's, Converters), and the build that
// loads the layout hands them to the migration. One old table may feed
// several new ones (ct_v1 feeds ct4_v2 and ct6_v2): each converter takes
// the entries that go into its table and skips the others.
type Converter struct {
	From, To string // map names, e.g. "ct_v1" and "ct4_v2"
	// Convert returns the new key and value of one entry, or a nil key
	// for an entry that does not go into To. It must be deterministic: a
	// migration's second pass compares converted entries.
	Convert func(key, value []byte) (newKey, newValue []byte, err error)
}

// The maps of older layouts that this build converts (Converters).
const (
	CTV1Map            = "ct_v1"             // conntrack layout v1: confirmed flows of both families
	CTUnconfirmedV1Map = "ct_unconfirmed_v1" // and those not yet confirmed
)

// Converters are the converters from older layouts into this build's:
// conntrack layout v1 (one table for both families, a 40-byte key with the
// family in it) into layout v2 (a table per family). Each v1 table feeds
// the two v2 tables of its kind; every field of an entry is kept, the
// fields v2 adds start at zero. Both layouts order a key's endpoints
// alike, so a key keeps its orientation (orig_is_b).
func Converters() []Converter {
	return []Converter{
		{From: CTV1Map, To: CT4Map, Convert: Typed(ct4FromV1)},
		{From: CTV1Map, To: CT6Map, Convert: Typed(ct6FromV1)},
		{From: CTUnconfirmedV1Map, To: CT4UnconfirmedMap, Convert: Typed(ct4FromV1)},
		{From: CTUnconfirmedV1Map, To: CT6UnconfirmedMap, Convert: Typed(ct6FromV1)},
	}
}

// replaces returns the maps of older layouts that convs convert into the
// map named name.
func replaces(name string, convs []Converter) []string {
	var out []string
	for _, c := range convs {
		if c.To == name && !slices.Contains(out, c.From) {
			out = append(out, c.From)
		}
	}
	return out
}

// converted reports whether convs convert the map named name into another.
func converted(name string, convs []Converter) bool {
	return slices.ContainsFunc(convs, func(c Converter) bool { return c.From == name })
}

func ct4FromV1(k bpf.CtdCtV1Key, e bpf.CtdCtV1Entry) (bpf.CtdCt4Key, bpf.CtdCtEntry, bool) {
	if k.Family != 4 {
		return bpf.CtdCt4Key{}, bpf.CtdCtEntry{}, false
	}
	ne := binary.NativeEndian
	return bpf.CtdCt4Key{AddrA: ne.Uint32(k.AddrA[:4]), AddrB: ne.Uint32(k.AddrB[:4]), PortA: k.PortA, PortB: k.PortB, Proto: k.Proto},
		entryFromV1(e), true
}

// ct6FromV1 takes every entry that is not IPv4 (v1 wrote family 4 or 6).
func ct6FromV1(k bpf.CtdCtV1Key, e bpf.CtdCtV1Entry) (bpf.CtdCt6Key, bpf.CtdCtEntry, bool) {
	if k.Family == 4 {
		return bpf.CtdCt6Key{}, bpf.CtdCtEntry{}, false
	}
	return bpf.CtdCt6Key{AddrA: k.AddrA, AddrB: k.AddrB, PortA: k.PortA, PortB: k.PortB, Proto: k.Proto}, entryFromV1(e), true
}

func entryFromV1(e bpf.CtdCtV1Entry) bpf.CtdCtEntry {
	return bpf.CtdCtEntry{
		PacketsOrig:   e.PacketsOrig,
		BytesOrig:     e.BytesOrig,
		PacketsReply:  e.PacketsReply,
		BytesReply:    e.BytesReply,
		LastSeen:      e.LastSeen,
		State:         e.State,
		OrigIsB:       e.OrigIsB,
		TcpFlagsOrig:  e.TcpFlagsOrig,
		TcpFlagsReply: e.TcpFlagsReply,
		Flags:         e.Flags,
		SrcIdentity:   e.SrcIdentity,
		DstIdentity:   e.DstIdentity,
		Ifindex:       e.Ifindex,
		FirstSeen:     e.FirstSeen,
	}
}

// Typed adapts a converter of generated Go types to raw entries; fn
// returns false for an entry that does not go into the new table.
func Typed[OK, OV, NK, NV any](fn func(OK, OV) (NK, NV, bool)) func(k, v []byte) ([]byte, []byte, error) {
	return func(k, v []byte) ([]byte, []byte, error) {
		var ok OK
		var ov OV
		if err := decodeExact(k, &ok); err != nil {
			return nil, nil, fmt.Errorf("key: %w", err)
		}
		if err := decodeExact(v, &ov); err != nil {
			return nil, nil, fmt.Errorf("value: %w", err)
		}
		nk, nv, take := fn(ok, ov)
		if !take {
			return nil, nil, nil
		}
		kb, err := binary.Append(nil, binary.NativeEndian, nk)
		if err != nil {
			return nil, nil, fmt.Errorf("key: %w", err)
		}
		vb, err := binary.Append(nil, binary.NativeEndian, nv)
		if err != nil {
			return nil, nil, fmt.Errorf("value: %w", err)
		}
		return kb, vb, nil
	}
}

func decodeExact(b []byte, v any) error {
	if size := binary.Size(v); size != len(b) {
		return fmt.Errorf("%d bytes pinned, the converter reads %d", len(b), size)
	}
	_, err := binary.Decode(b, binary.NativeEndian, v)
	return err
}
