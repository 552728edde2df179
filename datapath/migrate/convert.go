package migrate

import (
	"encoding/binary"
	"fmt"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/bpf/v2test"
)

// A Converter turns the entries of a table pinned in an older layout into
// entries of the layout this build uses.
type Converter struct {
	From, To string // map names, e.g. "ct_v1" and "ct_v2"
	// Convert returns the new key and value of one entry. It must be
	// deterministic: pass 2 compares converted entries.
	Convert func(key, value []byte) (newKey, newValue []byte, err error)
}

// converters lists every layout change ctd can migrate.
func converters() []Converter {
	return []Converter{
		// ct_v2 is the test-only layout of bpf/v2test; its converter lives
		// here, where a real one would, so that tests exercise the path a
		// real upgrade takes.
		{From: bpf.CtdMapCtV1, To: v2test.CtdMapCtV2, Convert: typed(ctV1ToV2)},
	}
}

func ctV1ToV2(k bpf.CtdCtKey, e bpf.CtdCtEntry) (v2test.CtdCtKey, v2test.CtdCtEntry) {
	nk := v2test.CtdCtKey{AddrA: k.AddrA, AddrB: k.AddrB, PortA: k.PortA, PortB: k.PortB, Proto: k.Proto, Family: k.Family}
	return nk, v2test.CtdCtEntry{
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

// typed adapts a converter of generated Go types to raw entries.
func typed[OK, OV, NK, NV any](fn func(OK, OV) (NK, NV)) func(k, v []byte) ([]byte, []byte, error) {
	return func(k, v []byte) ([]byte, []byte, error) {
		var ok OK
		var ov OV
		if err := decodeExact(k, &ok); err != nil {
			return nil, nil, fmt.Errorf("key: %w", err)
		}
		if err := decodeExact(v, &ov); err != nil {
			return nil, nil, fmt.Errorf("value: %w", err)
		}
		nk, nv := fn(ok, ov)
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
