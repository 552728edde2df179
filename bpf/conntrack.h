/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* conntrack.h: the connection tables and the TCP state machine.
 *
 * Each family has two LRU tables with its own compact key (struct ct4_key,
 * 16 bytes; struct ct6_key, 40) and one entry layout. A new flow goes into
 * the family's unconfirmed table; it is promoted into the confirmed table
 * once confirmed (ct_confirmed): both sides spoke and, for TCP, the
 * handshake completed. A flood of new flows (SYNs, spoofed UDP) thus only
 * ever evicts other unconfirmed flows, never an established connection,
 * like nf_conntrack's early_drop, which sacrifices unconfirmed entries
 * first. An established flow costs one lookup, in its family's confirmed
 * table; only packets of unconfirmed flows also look in the other.
 *
 * The code is written once for both families: the functions below take a
 * family's tables (struct ct_tables) and its key as void *, and are
 * inlined where the family is known, so that each family's code looks up
 * its own maps directly (the verifier inlines those lookups).
 */
#pragma once

#include "common.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144); /* set by the loader from --ct-max */
	__type(key, struct ct4_key);
	__type(value, struct ct_entry);
} CT4_MAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144); /* set by the loader from --ct-max */
	__type(key, struct ct6_key);
	__type(value, struct ct_entry);
} CT6_MAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* set by the loader from --ct-unconfirmed-max */
	__type(key, struct ct4_key);
	__type(value, struct ct_entry);
} CT4_UNCONFIRMED_MAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* set by the loader from --ct-unconfirmed-max */
	__type(key, struct ct6_key);
	__type(value, struct ct_entry);
} CT6_UNCONFIRMED_MAP SEC(".maps");

/* The tables of one family. */
struct ct_tables {
	void *confirmed;
	void *unconfirmed;
};

#define CT4_TABLES ((struct ct_tables){ &CT4_MAP, &CT4_UNCONFIRMED_MAP })
#define CT6_TABLES ((struct ct_tables){ &CT6_MAP, &CT6_UNCONFIRMED_MAP })

/* ct_lookup finds k's entry in either of tb's tables; *confirmed says which. */
static __always_inline struct ct_entry *ct_lookup(struct ct_tables tb, const void *k, int *confirmed)
{
	struct ct_entry *e = bpf_map_lookup_elem(tb.confirmed, k);

	*confirmed = e != NULL;
	if (e)
		return e;
	return bpf_map_lookup_elem(tb.unconfirmed, k);
}

/* ct_delete removes k from the table of tb it is in. */
static __always_inline int ct_delete(struct ct_tables tb, const void *k, int confirmed)
{
	return bpf_map_delete_elem(confirmed ? tb.confirmed : tb.unconfirmed, k);
}

/* A key of either family, as the programs that userspace runs through
 * BPF_PROG_TEST_RUN (ctexpire.c, ctrevoke.c) take it. */
struct ct_any_key {
	__u8 key[sizeof(struct ct6_key)]; /* family 4: a struct ct4_key, zero-padded */
	__u8 family;                      /* 4 or 6 */
	__u8 pad[7];
};

/* ct_confirmed: both sides spoke and the flow is established (for TCP:
 * the handshake completed, or, picked up mid-stream, the other side
 * answered). */
static __always_inline int ct_confirmed(const struct ct_entry *e)
{
	return e->packets_reply && e->state == CT_ESTABLISHED;
}

/* ct4_key_of builds the canonical key of an IPv4 tuple t. Returns 1 when
 * t's source is endpoint b. */
static __always_inline int ct4_key_of(const struct tuple *t, struct ct4_key *k)
{
	__u32 s = t->src.w[0], d = t->dst.w[0];
	int src_is_b = s != d ? s > d : t->sport > t->dport;

	k->addr_a = src_is_b ? d : s;
	k->addr_b = src_is_b ? s : d;
	k->port_a = src_is_b ? t->dport : t->sport;
	k->port_b = src_is_b ? t->sport : t->dport;
	k->proto = t->proto;
	k->pad[0] = 0;
	k->pad[1] = 0;
	k->pad[2] = 0;
	return src_is_b;
}

/* ct6_key_of builds the canonical key of an IPv6 tuple t. Returns 1 when
 * t's source is endpoint b. */
static __always_inline int ct6_key_of(const struct tuple *t, struct ct6_key *k)
{
	int src_is_b;

	if (t->src.d[0] != t->dst.d[0])
		src_is_b = t->src.d[0] > t->dst.d[0];
	else if (t->src.d[1] != t->dst.d[1])
		src_is_b = t->src.d[1] > t->dst.d[1];
	else
		src_is_b = t->sport > t->dport;

	if (src_is_b) {
		__builtin_memcpy(k->addr_a, t->dst.b, 16);
		__builtin_memcpy(k->addr_b, t->src.b, 16);
		k->port_a = t->dport;
		k->port_b = t->sport;
	} else {
		__builtin_memcpy(k->addr_a, t->src.b, 16);
		__builtin_memcpy(k->addr_b, t->dst.b, 16);
		k->port_a = t->sport;
		k->port_b = t->dport;
	}
	k->proto = t->proto;
	k->pad[0] = 0;
	k->pad[1] = 0;
	k->pad[2] = 0;
	return src_is_b;
}

/* tcp_opens: a packet that may open a TCP connection (SYN without ACK). */
static __always_inline int tcp_opens(__u8 f)
{
	return (f & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
}

/* ct_update_state advances e's state for a packet with TCP flags `flags`
 * (ignored for other protocols) from the originator (is_orig) or responder. */
static __always_inline void ct_update_state(struct ct_entry *e, __u8 proto, __u8 flags, int is_orig)
{
	__u8 s = e->state;

	if (proto != IPPROTO_TCP) {
		if (!is_orig && s == CT_NEW)
			e->state = CT_ESTABLISHED;
		return;
	}
	if (s == CT_CLOSED)
		return;
	if (flags & TCPF_RST) {
		e->state = CT_CLOSED;
		return;
	}
	if ((e->tcp_flags_orig & TCPF_FIN) && (e->tcp_flags_reply & TCPF_FIN)) {
		e->state = CT_CLOSED;
		return;
	}
	if (flags & TCPF_FIN) {
		e->state = CT_FIN_WAIT;
		return;
	}
	switch (s) {
	case CT_SYN_SENT:
		if (!is_orig && (flags & (TCPF_SYN | TCPF_ACK)) == (TCPF_SYN | TCPF_ACK))
			e->state = CT_SYN_RECV;
		else if (is_orig && e->syn_ns && tcp_opens(flags))
			e->syn_ns = bpf_ktime_get_ns(); /* a retransmitted SYN: time the last */
		break;
	case CT_SYN_RECV:
		if (is_orig && (flags & (TCPF_SYN | TCPF_ACK)) == TCPF_ACK) {
			e->state = CT_ESTABLISHED;
			/* The handshake's round trip, from the opening SYN (the
			 * precise clock only on handshake packets). */
			if (e->syn_ns)
				e->rtt_us = (bpf_ktime_get_ns() - e->syn_ns) / 1000;
		}
		break;
	}
}

/* tcp_flags_invalid: combinations no real stack sends. */
static __always_inline int tcp_flags_invalid(__u8 f)
{
	if ((f & (TCPF_SYN | TCPF_FIN)) == (TCPF_SYN | TCPF_FIN))
		return 1;
	if ((f & (TCPF_SYN | TCPF_RST)) == (TCPF_SYN | TCPF_RST))
		return 1;
	return (f & (TCPF_SYN | TCPF_FIN | TCPF_RST | TCPF_ACK)) == 0;
}

