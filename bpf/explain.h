/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* explain.h: 'ctd explain', a dry run of the programs on one packet.
 *
 * ctd explain runs the attached program with BPF_PROG_TEST_RUN on a packet
 * it builds, and asks for a dry run with a magic in the __sk_buff's cb[0]
 * and cb[1] (ctx_in). handle() reads it once into x (struct explain,
 * below), which it passes down; dry(x) tells a dry run. In a dry run the
 * program takes each decision as it would for real, and has no
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
 * traffic two context loads and compares, the request's word computed and
 * stored (six ALU instructions and a store), and a stack load and a
 * not-taken branch where a dry run leaves the real path.
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

/* explain_put stores v into field f of the result in x's skb's cb[], with a
 * constant offset from the context pointer, as the verifier requires
 * (assembly keeps clang from offsetting the pointer itself). */
#define explain_put(x, f, v)                                                                   \
	do {                                                                                   \
		const __u64 v_ = (v);                                                          \
		const int sz_ = sizeof(((struct explain_result *)0)->f);                       \
		_Static_assert(sizeof(((struct explain_result *)0)->f) <= 4, "a cb[] word");   \
		if (sz_ == 1)                                                                  \
			asm volatile("*(u8 *)(%0 + %1) = %2" ::"r"((x)->skb), "i"(EXPLAIN_OFF(f)), "r"(v_) : "memory"); \
		else if (sz_ == 2)                                                             \
			asm volatile("*(u16 *)(%0 + %1) = %2" ::"r"((x)->skb), "i"(EXPLAIN_OFF(f)), "r"(v_) : "memory"); \
		else                                                                           \
			asm volatile("*(u32 *)(%0 + %1) = %2" ::"r"((x)->skb), "i"(EXPLAIN_OFF(f)), "r"(v_) : "memory"); \
	} while (0)
#define EXPLAIN_OFF(f) (offsetof(struct __sk_buff, cb) + offsetof(struct explain_result, f))
_Static_assert(sizeof(struct explain_result) == sizeof(((struct __sk_buff *)0)->cb), "the result fills cb[]");

/* The request as the programs carry it (x): the skb, whose cb[] collects
 * the result, and a word that is zero in a dry run, stored once and read
 * again at each test of the request (dry).
 *
 * How it is kept is what keeps the verifier's work near a build without
 * the dry run. A request the verifier follows is known to it after the
 * first test: carried as the skb or NULL, it made the verifier explore
 * every path twice to its end, once as a real packet and once as a dry
 * run, two states it cannot prune against each other (53% more
 * instructions verified for ingress, 63% for egress); a word it tracks in
 * the stack still cost 9% for ingress, and a flag in a register ran the
 * programs out of stack (clang's spills). The word is instead the upper
 * half of a 64-bit stack slot (word, 8-aligned as any __u64): the
 * verifier keeps the value stored there, but a load of the slot's upper
 * half gives a value it does not know. So each test reads an
 * unknown value, the verifier explores both branches of that test only,
 * and the states of real packets and dry runs meet again after it. It
 * also explores mixed paths (a test as a dry run, a later one as real)
 * that no packet takes: they are as safe as any other. The word is
 * computed from the magic without a branch, so that neither branch of the
 * request's test knows it. bpf's TestDryRunVerifierCost holds the
 * verifier's count to the build without the dry run's. */
struct explain {
	struct __sk_buff *skb;
	__u64 word; /* the request in the upper half: 0 in a dry run */
};

#ifdef CTD_NO_DRY_RUN
/* Test-only build (bpf/nodryrun): no dry run, so that the compiler removes
 * every test of the request; test/bench's BenchmarkDryRunCheck measures
 * against it what the check costs real packets. */
static __always_inline void explain_start(struct explain *x, struct __sk_buff *skb)
{
	x->skb = skb;
}

static __always_inline int dry(const struct explain *x)
{
	return 0;
}
#else
/* explain_start reads whether skb asks for a dry run into x, and clears
 * the result when it does. */
static __always_inline void explain_start(struct explain *x, struct __sk_buff *skb)
{
	__u32 lo = skb->cb[0], hi = skb->cb[1];

	x->skb = skb;
	*(volatile __u64 *)&x->word = (__u64)((lo ^ EXPLAIN_MAGIC_LO) | (hi ^ EXPLAIN_MAGIC_HI)) << 32;
	if (lo != EXPLAIN_MAGIC_LO || hi != EXPLAIN_MAGIC_HI)
		return;
	/* Word stores of a zero register (plain C would let clang merge them
	 * through an offset context pointer). */
	asm volatile("*(u32 *)(%0 + %1) = %2\n"
		     "*(u32 *)(%0 + %1 + 4) = %2\n"
		     "*(u32 *)(%0 + %1 + 8) = %2\n"
		     "*(u32 *)(%0 + %1 + 12) = %2\n"
		     "*(u32 *)(%0 + %1 + 16) = %2\n"
		     ::"r"(skb), "i"(offsetof(struct __sk_buff, cb)), "r"(0ULL) : "memory");
}

/* dry reports whether x is a dry run: a 4-byte load of the upper half of
 * x->word (above). */
static __always_inline int dry(const struct explain *x)
{
	return !((const volatile __u32 *)&x->word)[1];
}
#endif

/* tally counts (dir, reason), or, in a dry run, notes the verdict's reason
 * instead (the verdicts are the reasons below M_CT_CREATED). */
static __always_inline void tally(const struct explain *x, __u32 dir, __u32 reason, __u64 len)
{
	if (dry(x)) {
		if (reason < M_CT_CREATED)
			explain_put(x, reason, reason);
		return;
	}
	count(dir, reason, len);
}

/* explain_identities notes the packet's source and destination identity. */
static __always_inline void explain_identities(const struct explain *x, __u32 src_id, __u32 dst_id)
{
	if (dry(x)) {
		explain_put(x, src_identity, src_id);
		explain_put(x, dst_identity, dst_id);
	}
}

/* explain_ct notes what the conntrack lookup found: e (in the confirmed
 * table or not) or nothing; is_orig says whether the packet comes from the
 * flow's originator. */
static __always_inline void explain_ct(const struct explain *x, const struct ct_entry *e,
				       int confirmed, int is_orig)
{
	if (!dry(x))
		return;
	if (!e) {
		explain_put(x, ct, EXPLAIN_CT_NEW);
		return;
	}
	explain_put(x, ct, confirmed ? EXPLAIN_CT_CONFIRMED : EXPLAIN_CT_UNCONFIRMED);
	explain_put(x, ct_state, e->state);
	explain_put(x, ct_flags, e->flags);
	explain_put(x, src_identity, is_orig ? e->src_identity : e->dst_identity);
	explain_put(x, dst_identity, is_orig ? e->dst_identity : e->src_identity);
}

/* judge is policy_verdict, and notes in a dry run what decided. */
static __always_inline int judge(const struct explain *x, const struct config *cfg, __u32 dir,
				 __u32 remote_id, __u8 proto, __u16 port)
{
	struct policy_key k;
	int v = policy_match(cfg, dir, remote_id, proto, port, &k);

	if (dry(x) && v) {
		explain_put(x, by, EXPLAIN_BY_RULE);
		explain_put(x, rule_identity, k.identity);
		explain_put(x, rule_port, k.port);
		explain_put(x, rule_proto, k.proto);
	} else if (dry(x)) {
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
