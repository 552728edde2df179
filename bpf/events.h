/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* events.h: flow and drop events to userspace through a ring buffer, written
 * only while a consumer is registered, rate limited per CPU so that a flood
 * cannot starve it. */
#pragma once

#include "common.h"
#include "metrics.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20); /* set by the loader from --ringbuf-size */
} EVENTS_MAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ratelimit);
} EVLIMIT_MAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct evlisten);
} EVLISTEN_MAP SEC(".maps");

/* listening reports whether a consumer reads events now. An array lookup
 * (inlined by the verifier) and a compare: with nobody listening, emit
 * costs this and nothing is reserved, rate limited or counted as lost. */
static __always_inline int listening(__u64 now)
{
	__u32 zero = 0;
	struct evlisten *l = bpf_map_lookup_elem(&EVLISTEN_MAP, &zero);

	return l && now <= l->until;
}

/* event_allowed takes one token from this CPU's bucket. The bucket holds at
 * most burst tokens, also right after the limit was lowered; the refill is
 * computed in whole seconds plus a fraction so that it cannot overflow after
 * a long idle time. */
static __always_inline int event_allowed(const struct config *cfg, __u64 now)
{
	__u32 zero = 0;
	struct ratelimit *rl;
	__u64 rate, burst, refill, elapsed;

	if (!cfg || !cfg->events_rate)
		return 1;
	rl = bpf_map_lookup_elem(&EVLIMIT_MAP, &zero);
	if (!rl)
		return 0;
	rate = cfg->events_rate;
	burst = cfg->events_burst ? cfg->events_burst : rate;
	elapsed = now - rl->last;
	refill = elapsed / 1000000000ULL * rate + elapsed % 1000000000ULL * rate / 1000000000ULL;
	if (refill) {
		rl->tokens += refill;
		rl->last = now;
	}
	if (rl->tokens > burst)
		rl->tokens = burst;
	if (!rl->tokens)
		return 0;
	rl->tokens--;
	return 1;
}

/* emit sends one event while a consumer listens; then a rate-limited or
 * lost event is counted, never silent. src/dst are the originator's for flow
 * events, the packet's for drops. */
static __always_inline void emit(const struct config *cfg, __u64 now, __u8 type, __u8 reason,
				 __u32 dir, __u32 ifindex, const struct tuple *t,
				 __u32 src_id, __u32 dst_id, __u8 state, const struct ct_entry *e)
{
	struct event *ev;

	if (!listening(now))
		return;
	if (!event_allowed(cfg, now)) {
		count(dir, M_EVENTS_RATELIMITED, 0);
		return;
	}
	ev = bpf_ringbuf_reserve(&EVENTS_MAP, sizeof(*ev), 0);
	if (!ev) {
		count(dir, M_EVENTS_LOST, 0);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->time = now;
	ev->type = type;
	ev->reason = reason;
	ev->dir = dir;
	ev->proto = t->proto;
	ev->family = t->family;
	ev->state = state;
	ev->ifindex = ifindex;
	ev->src_identity = src_id;
	ev->dst_identity = dst_id;
	__builtin_memcpy(ev->src, t->src.b, 16);
	__builtin_memcpy(ev->dst, t->dst.b, 16);
	ev->sport = t->sport;
	ev->dport = t->dport;
	if (e) {
		ev->packets_orig = e->packets_orig;
		ev->bytes_orig = e->bytes_orig;
		ev->packets_reply = e->packets_reply;
		ev->bytes_reply = e->bytes_reply;
		ev->cgroup_id = e->cgroup_id;
		ev->pid = e->pid;
		ev->rtt_us = e->rtt_us;
		__builtin_memcpy(ev->comm, e->comm, sizeof(ev->comm));
	}
	bpf_ringbuf_submit(ev, 0);
}

/* Anchors struct event in BTF so bpf2go can generate its Go type; never used. */
const struct event *unused_event __attribute__((unused));
