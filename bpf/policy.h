/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* policy.h: the verdict for a new flow by (direction, remote identity,
 * protocol, port), most specific rule first, then the direction's default. */
#pragma once

#include "common.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
} POLICY_MAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} CONFIG_MAP SEC(".maps");

/* policy_rule looks up the rule for (id, proto, port) in k's direction,
 * leaving its key in k; VERDICT_UNSET if there is none. */
static __always_inline int policy_rule(struct policy_key *k, __u32 id, __u8 proto, __u16 port)
{
	struct policy_value *v;

	k->identity = id;
	k->port = port;
	k->proto = proto;
	v = bpf_map_lookup_elem(&POLICY_MAP, k);
	return v ? v->verdict : VERDICT_UNSET;
}

/* policy_match finds the rule that decides: a specific identity beats any
 * identity; within one, a protocol with a port beats the protocol, beats
 * any protocol with the port, beats any protocol. Returns the rule's
 * verdict, its key in k, or VERDICT_UNSET when no rule matches. */
static __always_inline int policy_match(const struct config *cfg, __u32 dir, __u32 remote_id,
					__u8 proto, __u16 port, struct policy_key *k)
{
	__u32 ids[2] = { remote_id, IDENTITY_ANY };
	int v;

	*k = (struct policy_key){ .dir = dir };
	if (!cfg || !cfg->policy_rules)
		return VERDICT_UNSET;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (port) {
			v = policy_rule(k, ids[i], proto, port);
			if (v)
				return v;
		}
		v = policy_rule(k, ids[i], proto, 0);
		if (v)
			return v;
		if (port) {
			v = policy_rule(k, ids[i], 0, port);
			if (v)
				return v;
		}
		v = policy_rule(k, ids[i], 0, 0);
		if (v)
			return v;
	}
	return VERDICT_UNSET;
}

/* policy_default is the direction's default: VERDICT_ALLOW or VERDICT_DENY. */
static __always_inline int policy_default(const struct config *cfg, __u32 dir)
{
	if (cfg && cfg->default_verdict[dir & 1] == VERDICT_DENY)
		return VERDICT_DENY;
	return VERDICT_ALLOW;
}

/* policy_verdict: the matching rule's verdict (policy_match), else the
 * direction's default. Returns VERDICT_ALLOW or VERDICT_DENY. */
static __always_inline int policy_verdict(const struct config *cfg, __u32 dir, __u32 remote_id,
					  __u8 proto, __u16 port)
{
	struct policy_key k;
	int v = policy_match(cfg, dir, remote_id, proto, port, &k);

	return v ? v : policy_default(cfg, dir);
}

/* policy_port is the port policy matches: the destination port of the
 * flow's first packet for the protocols that have ports, else 0. */
static __always_inline __u16 policy_port(__u8 proto, __be16 dport)
{
	if (has_ports(proto))
		return bpf_ntohs(dport);
	return 0;
}
