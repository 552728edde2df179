// Package v2test is a test-only build of the datapath with the conntrack
// table in layout v2 (map ct_v2, struct ct_entry reordered with one more
// field; see CT_LAYOUT_V2 in bpf/common.h). It exists to prove upgrades by
// migration, with the converter from ct_v1 (Converters). Only tests import
// it: the ctd binary holds neither its object nor its converter.
package v2test

//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu -DCT_LAYOUT_V2" -target bpfel -type ct_key -type ct_entry Ctd ../ctd.c
