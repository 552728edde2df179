/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* ipcache.h: address to security identity. Host entries (/32, /128) are
 * exact-match hashes consulted first: one lookup whatever the ipcache's
 * size. CIDRs are per-family LPM tries, walked only on a hash miss. */
#pragma once

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 512000); /* set by the loader from --ipcache-max */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct iphost4_key);
	__type(value, struct ipcache_value);
} IPHOST4_MAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 512000);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct iphost6_key);
	__type(value, struct ipcache_value);
} IPHOST6_MAP SEC(".maps");

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

/* identity_of resolves an address: its host entry, else its longest CIDR;
 * no match is the world. */
static __always_inline __u32 identity_of(const union addr *a, __u8 family)
{
	struct ipcache_value *v;

	if (family == 4) {
		struct ipcache4_key k = { .prefixlen = 32 };
		struct iphost4_key h;

		__builtin_memcpy(h.addr, a->b, 4);
		v = bpf_map_lookup_elem(&IPHOST4_MAP, &h);
		if (v)
			return v->identity;
		__builtin_memcpy(k.addr, a->b, 4);
		v = bpf_map_lookup_elem(&IPCACHE4_MAP, &k);
	} else {
		struct ipcache6_key k = { .prefixlen = 128 };
		struct iphost6_key h;

		__builtin_memcpy(h.addr, a->b, 16);
		v = bpf_map_lookup_elem(&IPHOST6_MAP, &h);
		if (v)
			return v->identity;
		__builtin_memcpy(k.addr, a->b, 16);
		v = bpf_map_lookup_elem(&IPCACHE6_MAP, &k);
	}
	return v ? v->identity : IDENTITY_WORLD;
}
