// Package byteorder converts the datapath's addresses and network-order fields to Go values and back.
package byteorder

import "net/netip"

// Addr is the address of family (4 or 6) held in b as the datapath stores
// both families: IPv4 in the first 4 bytes, the rest zero.
func Addr(b [16]byte, family uint8) netip.Addr {
	if family == 4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

// Bytes is the inverse of Addr: a's bytes as the datapath stores them.
func Bytes(a netip.Addr) [16]byte {
	if a.Is4() {
		var b [16]byte
		v4 := a.As4()
		copy(b[:], v4[:])
		return b
	}
	return a.As16()
}

// Swap16 converts a 16-bit value between network and host order (ntohs
// and htons on a little-endian host, which is all bpf2go targets here).
func Swap16(v uint16) uint16 { return v<<8 | v>>8 }
