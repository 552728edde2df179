// Package upgradetest is a test-only build of the datapath: the same C
// sources and map layouts as package bpf, compiled for the older BPF ISA
// (-mcpu=v2: no 32-bit ALU or jumps) and reading every header with
// bpf_skb_load_bytes (CTD_PARSE_SKB_LOAD_ONLY), so that its programs are
// genuinely different instructions. The restart test (test/restart_test.go)
// upgrades a running ctd to a binary built with -tags ctd_upgradetest, which
// loads this object, to prove that replacing the programs keeps every
// connection; the bpf package's tests compare its parser, the path the
// production build takes only for non-linear skbs (which BPF_PROG_TEST_RUN
// cannot make), with the production build's direct reads. ctd never ships it.
package upgradetest

//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -mcpu=v2 -DCTD_PARSE_SKB_LOAD_ONLY -I/usr/include/x86_64-linux-gnu" -target bpfel Ctd ../ctd.c
