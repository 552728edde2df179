/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* metrics.h: per-CPU packet and byte counters by direction and reason. */
#pragma once

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * METRIC_MAX);
	__type(key, __u32);
	__type(value, struct metric_value);
} METRICS_MAP SEC(".maps");

/* count adds one packet of len bytes to (dir, reason) on this CPU. Per-CPU
 * values need no atomics. */
static __always_inline void count(__u32 dir, __u32 reason, __u64 len)
{
	__u32 key = dir * METRIC_MAX + reason;
	struct metric_value *m = bpf_map_lookup_elem(&METRICS_MAP, &key);

	if (m) {
		m->packets++;
		m->bytes += len;
	}
}
