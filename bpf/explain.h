/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* explain.h: 'ctd explain', a dry run of the programs on one packet.
 *
 * ctd explain runs the attached program with BPF_PROG_TEST_RUN on a packet
 * it builds, and asks for a dry run with a magic in the __sk_buff's cb[0]
 * and cb[1] (ctx_in). handle() reads it once, and passes the request down
 * as x: the skb itself in a dry run, NULL for every real packet. In a dry
 * run the program takes each decision as it would for real, and has no
 * side effect: no conntrack entry is created, changed, promoted or deleted,
 * nothing is counted, no event is written and no rate-limit token is
 * taken (the LRU marks the entry a lookup finds as used, as for any
 * lookup). What decided goes into cb[] instead (struct explain_result),
 * which BPF_PROG_TEST_RUN hands back in ctx_out. ctd explain runs only a
 * program whose instructions compare cb[] with its magic, never an older
 * one that would take the packet for real: change the magic whenever
 * struct explain_result changes.
 *
 * At TC, cb[] is the qdisc layer's scratch space; the kernel leaves there
 * pointers, lengths and counters, never this magic. The check costs real
 * traffic two context loads and compares, and a not-taken branch where a
 * dry run leaves the real path.
 */
#pragma once

#include "common.h"
#include "conntrack.h"
#include "policy.h"
#include "metrics.h"

/* The dry-run request: cb[0] and cb[1] (ctx_in). */
enum explain_magic {
	EXPLAIN_MAGIC_LO = 0x6c707865, /* "expl" */
	EXPLAIN_MAGIC_HI = 0x3a647463, /* "ctd:" */
};

/* What decided a verdict. */
enum explain_by {
	EXPLAIN_BY_NONE = 0,    /* no policy: the flow is tracked, or the packet is not */
	EXPLAIN_BY_RULE = 1,    /* the rule rule_identity/rule_proto/rule_port */
	EXPLAIN_BY_DEFAULT = 2, /* no rule matched: the direction's default */
};

/* Where the packet's conntrack lookup led. */
enum explain_ct {
	EXPLAIN_CT_NONE = 0,        /* no lookup: the packet is not tracked */
	EXPLAIN_CT_NEW = 1,         /* no entry: the packet opens a flow */
	EXPLAIN_CT_UNCONFIRMED = 2, /* an entry in the unconfirmed table */
	EXPLAIN_CT_CONFIRMED = 3,   /* an entry in the confirmed table */
};

/* A dry run's findings, written into cb[] as it goes (returned in ctx_out). */
struct explain_result {
	__u32 src_identity;  /* the packet's source's: the entry's, or the ipcache's for a new flow */
	__u32 dst_identity;  /* its destination's */
	__u32 rule_identity; /* EXPLAIN_BY_RULE: the rule's key (0: any) */
	__u16 rule_port;     /* host order, 0: any */
	__u8  rule_proto;    /* 0: any */
	__u8  by;            /* enum explain_by */
	__u8  reason;        /* enum metric_reason: the verdict's */
	__u8  ct;            /* enum explain_ct */
	__u8  ct_state;      /* the entry's enum ct_state (before this packet) */
	__u8  ct_flags;      /* the entry's CT_F_* */
};

/* explain_put stores v into field f of the result in x's cb[], with a
 * constant offset from the context pointer, as the verifier requires
 * (assembly keeps clang from offsetting the pointer itself). */
#define explain_put(x, f, v)                                                                   \
	do {                                                                                   \
		const __u64 v_ = (v);                                                          \
		const int sz_ = sizeof(((struct explain_result *)0)->f);                       \
		_Static_assert(sizeof(((struct explain_result *)0)->f) <= 4, "a cb[] word");   \
		if (sz_ == 1)                                                                  \
			asm volatile("*(u8 *)(%0 + %1) = %2" ::"r"(x), "i"(EXPLAIN_OFF(f)), "r"(v_) : "memory"); \
		else if (sz_ == 2)                                                             \
			asm volatile("*(u16 *)(%0 + %1) = %2" ::"r"(x), "i"(EXPLAIN_OFF(f)), "r"(v_) : "memory"); \
		else                                                                           \
			asm volatile("*(u32 *)(%0 + %1) = %2" ::"r"(x), "i"(EXPLAIN_OFF(f)), "r"(v_) : "memory"); \
	} while (0)
#define EXPLAIN_OFF(f) (offsetof(struct __sk_buff, cb) + offsetof(struct explain_result, f))
_Static_assert(sizeof(struct explain_result) == sizeof(((struct __sk_buff *)0)->cb), "the result fills cb[]");

#ifdef CTD_NO_DRY_RUN
/* Test-only build (bpf/nodryrun): no dry run, so that the compiler removes
 * every test of x; test/bench's BenchmarkDryRunCheck measures against it
 * what the check costs real packets. */
static __always_inline struct __sk_buff *explain_requested(struct __sk_buff *skb)
{
	return NULL;
}
#else
/* explain_requested returns skb, its result cleared, when it asks for a
 * dry run; NULL for a real packet. */
static __always_inline struct __sk_buff *explain_requested(struct __sk_buff *skb)
{
	if (skb->cb[0] != EXPLAIN_MAGIC_LO || skb->cb[1] != EXPLAIN_MAGIC_HI)
		return NULL;
	/* Word stores of a zero register (plain C would let clang merge them
	 * through an offset context pointer). */
	asm volatile("*(u32 *)(%0 + %1) = %2\n"
		     "*(u32 *)(%0 + %1 + 4) = %2\n"
		     "*(u32 *)(%0 + %1 + 8) = %2\n"
		     "*(u32 *)(%0 + %1 + 12) = %2\n"
		     "*(u32 *)(%0 + %1 + 16) = %2\n"
		     ::"r"(skb), "i"(offsetof(struct __sk_buff, cb)), "r"(0ULL) : "memory");
	return skb;
}
#endif

/* tally counts (dir, reason), or, in a dry run, notes the verdict's reason
 * instead (the verdicts are the reasons below M_CT_CREATED). */
static __always_inline void tally(struct __sk_buff *x, __u32 dir, __u32 reason, __u64 len)
{
	if (x) {
		if (reason < M_CT_CREATED)
			explain_put(x, reason, reason);
		return;
	}
	count(dir, reason, len);
}

/* explain_identities notes the packet's source and destination identity. */
static __always_inline void explain_identities(struct __sk_buff *x, __u32 src_id, __u32 dst_id)
{
	if (x) {
		explain_put(x, src_identity, src_id);
		explain_put(x, dst_identity, dst_id);
	}
}

/* explain_ct notes what the conntrack lookup found: e (in the confirmed
 * table or not) or nothing; is_orig says whether the packet comes from the
 * flow's originator. */
static __always_inline void explain_ct(struct __sk_buff *x, const struct ct_entry *e,
				       int confirmed, int is_orig)
{
	if (!x)
		return;
	if (!e) {
		explain_put(x, ct, EXPLAIN_CT_NEW);
		return;
	}
	explain_put(x, ct, confirmed ? EXPLAIN_CT_CONFIRMED : EXPLAIN_CT_UNCONFIRMED);
	explain_put(x, ct_state, e->state);
	explain_put(x, ct_flags, e->flags);
	explain_identities(x, is_orig ? e->src_identity : e->dst_identity,
			   is_orig ? e->dst_identity : e->src_identity);
}

/* judge is policy_verdict, and notes in a dry run what decided. */
static __always_inline int judge(struct __sk_buff *x, const struct config *cfg, __u32 dir,
				 __u32 remote_id, __u8 proto, __u16 port)
{
	struct policy_key k;
	int v = policy_match(cfg, dir, remote_id, proto, port, &k);

	if (x && v) {
		explain_put(x, by, EXPLAIN_BY_RULE);
		explain_put(x, rule_identity, k.identity);
		explain_put(x, rule_port, k.port);
		explain_put(x, rule_proto, k.proto);
	} else if (x) {
		explain_put(x, by, EXPLAIN_BY_DEFAULT);
	}
	return v ? v : policy_default(cfg, dir);
}

/* Anchors the types userspace shares in BTF (bpf2go -type); never used. */
struct explain_types {
	struct explain_result result;
	enum explain_magic magic;
	enum explain_by by;
	enum explain_ct ct;
};
const struct explain_types *unused_explain_types __attribute__((unused));
