//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* ctd.c: the TC ingress and egress programs.
 *
 * A packet's way: parse -> conntrack lookup (one in the confirmed table of
 * its family, with a canonical key; on a miss one in the family's
 * unconfirmed table) -> hit:
 * advance state and counters, promote a flow just confirmed, pass -> miss:
 * resolve both identities through the ipcache, judge policy, create the
 * entry in the unconfirmed table or drop (see conntrack.h).
 *
 * x, passed down from handle(), holds ctd explain's dry-run request: in a
 * dry run (dry(x)) the skb's cb[] collects what decided, and each side
 * effect (map writes, counters, events) is skipped where dry(x) is tested
 * (explain.h).
 */
#include "common.h"
#include "parse.h"
#include "conntrack.h"
#include "ipcache.h"
#include "policy.h"
#include "metrics.h"
#include "events.h"
#include "explain.h"
#include "owner.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The downgrade guard. Builds of layout v1 know the conntrack table as
 * ct_v1 (table "ct"). Over a v2 datapath they find this map, another
 * layout of their table, and refuse to load (they have no converter from
 * ct_v2), instead of creating an empty ct_v1 beside ct4_v2 and ct6_v2 and
 * losing every flow. It holds nothing and no program uses it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} CT_GUARD_MAP SEC(".maps");

/* Anchors the enums userspace shares in BTF, so that bpf2go -type generates
 * their Go constants (bpf/gen.go); never used. */
struct shared_enums {
	enum direction dir;
	enum reserved_identity identity;
	enum ct_state state;
	enum ct_flag flag;
	enum verdict verdict;
	enum metric_reason reason;
	enum event_type type;
	struct ct_v1_key v1_key;     /* the converter's input, never used here */
	struct ct_v1_entry v1_entry;
};
const struct shared_enums *unused_enums __attribute__((unused));
/* Anchors struct owner (the value of OWNER_MAP) for bpf2go -type. */
const struct owner *unused_owner __attribute__((unused));

static __always_inline struct config *config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&CONFIG_MAP, &zero);
}

static __always_inline int verdict_drop(const struct explain *x, __u32 dir, __u32 reason, __u64 len)
{
	tally(x, dir, reason, len);
	return CTD_DROP;
}

/* ct_account adds the packet to e's direction counters and flags. */
static __always_inline void ct_account(struct ct_entry *e, int is_orig, __u8 tcp_flags,
				       __u64 len, __u64 segs, __u64 now)
{
	if (is_orig) {
		__sync_fetch_and_add(&e->packets_orig, segs);
		__sync_fetch_and_add(&e->bytes_orig, len);
		e->tcp_flags_orig |= tcp_flags;
	} else {
		__sync_fetch_and_add(&e->packets_reply, segs);
		__sync_fetch_and_add(&e->bytes_reply, len);
		e->tcp_flags_reply |= tcp_flags;
	}
	e->last_seen = now;
}

/* ct_new judges a flow that has no entry (or a SYN that reuses the tuple
 * of a closed or revoked one, replaced: in the confirmed table if
 * confirmed) and, if allowed, creates its entry in tb's unconfirmed table. */
static __always_inline int ct_new(const struct explain *x, struct __sk_buff *skb, __u32 dir, struct tuple *t,
				  struct ct_tables tb, const void *k, int src_is_b, int confirmed,
				  __u64 len, __u64 segs, __u64 now)
{
	struct config *cfg = config_get();
	struct ct_entry e = {};
	__u32 src_id, dst_id;
	int err;

	src_id = identity_of(&t->src, t->family);
	dst_id = identity_of(&t->dst, t->family);
	explain_identities(x, src_id, dst_id);

	/* Mid-stream TCP without an entry: a flow lost to the LRU (or flushed,
	 * or older than ctd). Visible before the policy judges it. */
	if (!dry(x) && t->proto == IPPROTO_TCP && !(t->tcp_flags & (TCPF_SYN | TCPF_RST))) {
		count(dir, M_CT_MIDSTREAM_MISS, 0);
		emit(cfg, now, EV_CT_MIDSTREAM_MISS, 0, dir, skb->ifindex, t, src_id, dst_id, 0, NULL);
	}

	if (judge(x, cfg, dir, dir == DIR_INGRESS ? src_id : dst_id, t->proto,
		  policy_port(t->proto, t->dport)) != VERDICT_ALLOW) {
		if (!dry(x))
			emit(cfg, now, EV_DROP, M_DROP_POLICY, dir, skb->ifindex, t, src_id, dst_id, 0, NULL);
		return verdict_drop(x, dir, M_DROP_POLICY, len);
	}
	/* An RST for a connection we do not know needs no entry; a dry run
	 * creates none. */
	if (dry(x) || (t->proto == IPPROTO_TCP && (t->tcp_flags & TCPF_RST))) {
		tally(x, dir, M_FWD_NEW, len);
		return CTD_PASS;
	}

	e.first_seen = now;
	e.src_identity = src_id;
	e.dst_identity = dst_id;
	e.ifindex = skb->ifindex;
	e.orig_is_b = src_is_b;
	e.flags = dir == DIR_INGRESS ? CT_F_OPENED_INGRESS : 0;
	e.state = CT_NEW;
	if (t->proto == IPPROTO_TCP) {
		if (tcp_opens(t->tcp_flags)) {
			e.state = CT_SYN_SENT;
			e.syn_ns = bpf_ktime_get_ns(); /* for rtt_us (conntrack.h) */
		} else {
			e.state = CT_ESTABLISHED;
			e.flags |= CT_F_PICKUP;
		}
	}
	ct_account(&e, 1, t->tcp_flags, len, segs, now);
	ct_update_state(&e, t->proto, t->tcp_flags, 1);
	owner_of(skb, dir, cfg, t, &e);

	if (confirmed)
		bpf_map_delete_elem(tb.confirmed, k);
	err = bpf_map_update_elem(tb.unconfirmed, k, &e, BPF_ANY);
	if (err) {
		count(dir, M_CT_UPDATE_FAILED, 0);
		emit(cfg, now, EV_CT_INSERT_FAILED, M_DROP_CT_INSERT, dir, skb->ifindex, t, src_id, dst_id, 0, NULL);
		return verdict_drop(x, dir, M_DROP_CT_INSERT, len);
	}
	count(dir, M_CT_CREATED, 0);
	count(dir, M_FWD_NEW, len);
	emit(cfg, now, EV_FLOW_NEW, 0, dir, skb->ifindex, t, src_id, dst_id, e.state, &e);
	return CTD_PASS;
}

/* ct_revoked handles a packet of a revoked flow: it is dropped, whichever
 * its direction, and refreshes the entry so that the flow stays cut while
 * either side keeps trying (a pickup cannot re-create it). Only a SYN that
 * the policy in force allows opens a new flow in its place. */
static __always_inline int ct_revoked(const struct explain *x, struct __sk_buff *skb, __u32 dir, struct tuple *t,
				      struct ct_tables tb, const void *k, int src_is_b,
				      struct ct_entry *e, int confirmed,
				      __u64 len, __u64 segs, __u64 now)
{
	int is_orig = src_is_b == e->orig_is_b;

	if (t->proto == IPPROTO_TCP && tcp_opens(t->tcp_flags))
		return ct_new(x, skb, dir, t, tb, k, src_is_b, confirmed, len, segs, now);
	if (!dry(x)) {
		e->last_seen = now;
		emit(config_get(), now, EV_DROP, M_DROP_REVOKED, dir, skb->ifindex, t,
		     is_orig ? e->src_identity : e->dst_identity,
		     is_orig ? e->dst_identity : e->src_identity, e->state, NULL);
	}
	return verdict_drop(x, dir, M_DROP_REVOKED, len);
}

/* ct_lookup_tuple finds the entry of tuple t in its family's tables. */
static __always_inline struct ct_entry *ct_lookup_tuple(const struct tuple *t, int *confirmed)
{
	if (t->family == 4) {
		struct ct4_key k;

		ct4_key_of(t, &k);
		return ct_lookup(CT4_TABLES, &k, confirmed);
	}
	struct ct6_key k;

	ct6_key_of(t, &k);
	return ct_lookup(CT6_TABLES, &k, confirmed);
}

/* related handles an ICMP error: it passes when it quotes a tracked flow, and
 * is otherwise judged like a new flow without creating an entry. */
static __always_inline int related(const struct explain *x, struct __sk_buff *skb, __u32 dir, struct pkt *p, __u64 len, __u64 now)
{
	struct config *cfg;
	__u32 src_id;
	int confirmed;
	struct ct_entry *e = ct_lookup_tuple(&p->inner, &confirmed);

	if (dry(x)) {
		/* The quoted flow's entry; the error's own addresses' identities. */
		explain_ct(x, e, confirmed, 1);
		explain_identities(x, identity_of(&p->t.src, p->t.family), identity_of(&p->t.dst, p->t.family));
	}
	if (e && (e->flags & CT_F_REVOKED))
		return verdict_drop(x, dir, M_DROP_REVOKED, len);
	if (e) {
		if (!dry(x))
			e->flags |= CT_F_RELATED;
		tally(x, dir, M_FWD_RELATED, len);
		return CTD_PASS;
	}
	cfg = config_get();
	src_id = identity_of(&p->t.src, p->t.family);
	if (judge(x, cfg, dir, dir == DIR_INGRESS ? src_id : identity_of(&p->t.dst, p->t.family),
		  p->t.proto, 0) != VERDICT_ALLOW) {
		if (!dry(x))
			emit(cfg, now, EV_DROP, M_DROP_POLICY, dir, skb->ifindex, &p->t, src_id, 0, 0, NULL);
		return verdict_drop(x, dir, M_DROP_POLICY, len);
	}
	tally(x, dir, M_FWD_NEW, len);
	return CTD_PASS;
}

/* ct_promote moves a flow just confirmed into tb's confirmed table. Should
 * the insert fail, the flow stays where it is, and is counted. */
static __always_inline void ct_promote(__u32 dir, struct ct_tables tb, const void *k, struct ct_entry *e)
{
	if (bpf_map_update_elem(tb.confirmed, k, e, BPF_ANY)) {
		count(dir, M_CT_UPDATE_FAILED, 0);
		return;
	}
	bpf_map_delete_elem(tb.unconfirmed, k);
	count(dir, M_CT_CONFIRMED, 0);
}

/* ct_hit handles a packet of a tracked flow, whose entry e is in the
 * confirmed table or not. */
static __always_inline int ct_hit(const struct explain *x, struct __sk_buff *skb, __u32 dir, struct tuple *t,
				  struct ct_tables tb, const void *k, int src_is_b,
				  struct ct_entry *e, int confirmed,
				  __u64 len, __u64 segs, __u64 now)
{
	int is_orig;
	__u8 old;

	if (e->flags & CT_F_REVOKED)
		return ct_revoked(x, skb, dir, t, tb, k, src_is_b, e, confirmed, len, segs, now);

	/* A SYN on a closed connection reuses its tuple: a new flow. */
	if (t->proto == IPPROTO_TCP && e->state == CT_CLOSED && tcp_opens(t->tcp_flags))
		return ct_new(x, skb, dir, t, tb, k, src_is_b, confirmed, len, segs, now);

	/* A dry run stops here: the packet would pass, and change the entry. */
	if (dry(x)) {
		tally(x, dir, M_FWD_ESTABLISHED, len);
		return CTD_PASS;
	}

	is_orig = src_is_b == e->orig_is_b;
	old = e->state;
	ct_account(e, is_orig, t->tcp_flags, len, segs, now);
	ct_update_state(e, t->proto, t->tcp_flags, is_orig);
	if (e->state == CT_CLOSED && old != CT_CLOSED) {
		struct tuple orig = *t;

		if (!is_orig) {
			orig.src = t->dst;
			orig.dst = t->src;
			orig.sport = t->dport;
			orig.dport = t->sport;
		}
		emit(config_get(), now, EV_FLOW_CLOSED, 0, dir, e->ifindex, &orig,
		     e->src_identity, e->dst_identity, CT_CLOSED, e);
	}
	if (!confirmed && ct_confirmed(e))
		ct_promote(dir, tb, k, e);
	count(dir, M_FWD_ESTABLISHED, len);
	return CTD_PASS;
}

/* ct_track runs conntrack for a packet of tuple t, whose key in tb is k:
 * one lookup in the confirmed table, one in the unconfirmed table on a
 * miss. Inlined once per family. */
static __always_inline int ct_track(const struct explain *x, struct __sk_buff *skb, __u32 dir, struct tuple *t,
				    struct ct_tables tb, const void *k, int src_is_b,
				    __u64 len, __u64 segs)
{
	__u64 now = bpf_ktime_get_coarse_ns();
	struct ct_entry *e;
	int confirmed;

	e = ct_lookup(tb, k, &confirmed);
	explain_ct(x, e, confirmed, e && src_is_b == e->orig_is_b);
	if (!e)
		return ct_new(x, skb, dir, t, tb, k, src_is_b, 0, len, segs, now);
	return ct_hit(x, skb, dir, t, tb, k, src_is_b, e, confirmed, len, segs, now);
}

/* process judges one packet (x: see the top of this file). */
static __always_inline int process(const struct explain *x, struct __sk_buff *skb, __u32 dir)
{
	struct pkt p = {};
	__u64 len = skb->len, segs = skb->gso_segs ? skb->gso_segs : 1;
	int kind;

	kind = parse(skb, &p);
	switch (kind) {
	case PKT_TRACK:
		break;
	case PKT_NON_IP:
	case PKT_UNTRACKED:
		tally(x, dir, M_FWD_UNTRACKED, len);
		return CTD_PASS;
	case PKT_FRAGMENT:
		/* Later fragments carry no ports and are not tracked: the first
		 * fragment was judged, and without it nothing reassembles. */
		tally(x, dir, M_FRAGMENTS, len);
		tally(x, dir, M_FWD_UNTRACKED, len);
		return CTD_PASS;
	case PKT_ICMP_ERR:
		return related(x, skb, dir, &p, len, bpf_ktime_get_coarse_ns());
	default: {
		struct config *cfg = config_get();

		if (cfg && cfg->default_verdict[dir & 1] == VERDICT_DENY)
			return verdict_drop(x, dir, M_DROP_PARSE, len);
		tally(x, dir, M_FWD_UNPARSEABLE, len);
		return CTD_PASS;
	}
	}

	if (p.t.proto == IPPROTO_TCP && tcp_flags_invalid(p.t.tcp_flags))
		return verdict_drop(x, dir, M_DROP_INVALID, len);

	if (p.t.family == 4) {
		struct ct4_key k;
		int src_is_b = ct4_key_of(&p.t, &k);

		return ct_track(x, skb, dir, &p.t, CT4_TABLES, &k, src_is_b, len, segs);
	}
	struct ct6_key k;
	int src_is_b = ct6_key_of(&p.t, &k);

	return ct_track(x, skb, dir, &p.t, CT6_TABLES, &k, src_is_b, len, segs);
}

/* handle reads whether skb asks for a dry run (explain.h). */
static __always_inline int handle(struct __sk_buff *skb, __u32 dir)
{
	struct explain x;

	explain_start(&x, skb);
	return process(&x, skb, dir);
}

SEC("tc")
int ctd_ingress(struct __sk_buff *skb)
{
	return handle(skb, DIR_INGRESS);
}

SEC("tc")
int ctd_egress(struct __sk_buff *skb)
{
	return handle(skb, DIR_EGRESS);
}
