// Package bpf holds ctd's datapath: the C sources of the TC programs and the
// objects and Go bindings bpf2go generates from them.
package bpf

//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -target bpfel -type ct4_key -type ct6_key -type ct_entry -type ct_v1_key -type ct_v1_entry -type ipcache4_key -type ipcache6_key -type ipcache_value -type policy_key -type policy_value -type config -type metric_value -type event -type evlisten -type owner -type direction -type reserved_identity -type ct_state -type ct_flag -type verdict -type metric_reason -type event_type -type explain_result -type explain_magic -type explain_by -type explain_ct Ctd ctd.c

// The conntrack GC's compare-and-delete program (datapath/ctmap's Expirer).
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -target bpfel -type expire_rec -type expire_limit -type expire_outcome Ctexpire ctexpire.c

// 'ctd ct revoke': re-judges entries against the policy in force and marks those it denies (datapath/ctmap's Revoker).
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -target bpfel -type revoke_rec -type revoke_limit -type revoke_outcome Ctrevoke ctrevoke.c
