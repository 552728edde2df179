//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* ctrevoke.c: 'ctd ct revoke', run through BPF_PROG_TEST_RUN by
 * datapath/ctmap's Revoker against the live tables.
 *
 * The input is up to REVOKE_BATCH records back to back. For each the
 * program looks the entry up (in either conntrack table of its family) and judges its
 * flow again, as its first packet would be judged now: same direction,
 * remote identity, protocol and port, through the datapath's own
 * policy_verdict. A flow the policy now denies is marked CT_F_REVOKED in
 * place (not deleted, so that no pickup re-creates it); its counters and
 * state are left to the datapath.
 */
#include "common.h"
#include "conntrack.h"
#include "policy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* How many records one run decides (one page of input, as ctexpire.c). */
enum revoke_limit {
	REVOKE_BATCH = 64,
};

enum revoke_outcome {
	REVOKE_REVOKED = 1, /* the policy denies the flow now: marked */
	REVOKE_KEPT = 2,    /* the policy still allows it: untouched */
	REVOKE_ALREADY = 3, /* was revoked before */
	REVOKE_MISSING = 4, /* no entry (expired, evicted or deleted meanwhile) */
};

struct revoke_rec {
	struct ct_any_key key;
	__u8  outcome; /* enum revoke_outcome, written here */
	__u8  pad[7];
};

/* Anchors the types userspace shares in BTF for bpf2go -type; never used. */
struct revoke_types {
	struct revoke_rec rec;
	enum revoke_limit limit;
	enum revoke_outcome outcome;
};
const struct revoke_types *unused_revoke_types __attribute__((unused));

/* revoke_one judges the flow whose key in tb is k (its protocol and ports
 * given) again, as its first packet would be judged now: the direction it
 * was opened in, the remote identity there, and the originator's
 * destination port; it marks the flow revoked if the policy denies it. */
static __always_inline __u8 revoke_one(const struct config *cfg, struct ct_tables tb, const void *k,
				       __u8 proto, __be16 port_a, __be16 port_b)
{
	struct ct_entry *e;
	int confirmed;
	__u32 dir;

	e = ct_lookup(tb, k, &confirmed);
	if (!e)
		return REVOKE_MISSING;
	if (e->flags & CT_F_REVOKED)
		return REVOKE_ALREADY;
	dir = (e->flags & CT_F_OPENED_INGRESS) ? DIR_INGRESS : DIR_EGRESS;
	if (policy_verdict(cfg, dir, dir == DIR_INGRESS ? e->src_identity : e->dst_identity,
			   proto, policy_port(proto, e->orig_is_b ? port_a : port_b)) == VERDICT_ALLOW)
		return REVOKE_KEPT;
	e->flags |= CT_F_REVOKED;
	return REVOKE_REVOKED;
}

SEC("tc")
int ctd_ct_revoke(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&CONFIG_MAP, &zero);

	for (int i = 0; i < REVOKE_BATCH; i++) {
		struct revoke_rec *r = data + i * sizeof(struct revoke_rec);

		if ((void *)(r + 1) > end)
			break;
		if (r->key.family == 4) {
			const struct ct4_key *k = (const void *)r->key.key;

			r->outcome = revoke_one(cfg, CT4_TABLES, k, k->proto, k->port_a, k->port_b);
		} else {
			const struct ct6_key *k = (const void *)r->key.key;

			r->outcome = revoke_one(cfg, CT6_TABLES, k, k->proto, k->port_a, k->port_b);
		}
	}
	return 0;
}
