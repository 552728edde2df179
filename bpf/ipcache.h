/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* ipcache.h: address to security identity through per-family LPM tries. */
#pragma once

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 512000); /* set by the loader from --ipcache-max */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipcache4_key);
	__type(value, struct ipcache_value);
} IPCACHE4_MAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 512000);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipcache6_key);
	__type(value, struct ipcache_value);
} IPCACHE6_MAP SEC(".maps");

/* identity_of resolves an address; no match is the world. */
static __always_inline __u32 identity_of(const union addr *a, __u8 family)
{
	struct ipcache_value *v;

	if (family == 4) {
		struct ipcache4_key k = { .prefixlen = 32 };

		__builtin_memcpy(k.addr, a->b, 4);
		v = bpf_map_lookup_elem(&IPCACHE4_MAP, &k);
	} else {
		struct ipcache6_key k = { .prefixlen = 128 };

		__builtin_memcpy(k.addr, a->b, 16);
		v = bpf_map_lookup_elem(&IPCACHE6_MAP, &k);
	}
	return v ? v->identity : IDENTITY_WORLD;
}
