// Package nodryrun is a test-only build of the datapath: package bpf's
// sources without ctd explain's dry run (-DCTD_NO_DRY_RUN, bpf/explain.h),
// in which the compiler removes every test of the dry-run request. It is
// the baseline of test/bench's BenchmarkDryRunCheck, which measures what
// the request's check costs real packets. ctd never ships it.
package nodryrun

//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -DCTD_NO_DRY_RUN -I/usr/include/x86_64-linux-gnu" -target bpfel Ctd ../ctd.c
