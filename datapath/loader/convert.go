package loader

import (
	"encoding/binary"
	"fmt"
)

// A Converter turns the entries of a table pinned in an older layout into
// entries of a newer one. The package that defines a layout provides the
// converters into it (bpf/v2test does for its test-only ct_v2), and the
// build that loads the layout hands them to the migration.
type Converter struct {
	From, To string // map names, e.g. "ct_v1" and "ct_v2"
	// Convert returns the new key and value of one entry. It must be
	// deterministic: a migration's second pass compares converted entries.
	Convert func(key, value []byte) (newKey, newValue []byte, err error)
}

// Typed adapts a converter of generated Go types to raw entries.
func Typed[OK, OV, NK, NV any](fn func(OK, OV) (NK, NV)) func(k, v []byte) ([]byte, []byte, error) {
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
