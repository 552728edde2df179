/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* conntrack.h: the connection tables and the TCP state machine.
 *
 * Flows live in two LRU tables of one layout. A new flow goes into the
 * unconfirmed table; it is promoted into the confirmed table (CT_MAP) once
 * confirmed (ct_confirmed): both sides spoke and, for TCP, the handshake
 * completed. A flood of new flows (SYNs, spoofed UDP) thus only ever
 * evicts other unconfirmed flows, never an established connection, like
 * nf_conntrack's early_drop, which sacrifices unconfirmed entries first. An
 * established flow costs one lookup, in the confirmed table; only packets
 * of unconfirmed flows also look in the other.
 */
#pragma once

#include "common.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144); /* set by the loader from --ct-max */
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
} CT_MAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* set by the loader from --ct-unconfirmed-max */
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
} CT_UNCONFIRMED_MAP SEC(".maps");

/* ct_lookup finds k's entry in either table; *confirmed says which. */
static __always_inline struct ct_entry *ct_lookup(const struct ct_key *k, int *confirmed)
{
	struct ct_entry *e = bpf_map_lookup_elem(&CT_MAP, k);

	*confirmed = e != NULL;
	if (e)
		return e;
	return bpf_map_lookup_elem(&CT_UNCONFIRMED_MAP, k);
}

/* ct_delete removes k from the table it is in. */
static __always_inline int ct_delete(const struct ct_key *k, int confirmed)
{
	if (confirmed)
		return bpf_map_delete_elem(&CT_MAP, k);
	return bpf_map_delete_elem(&CT_UNCONFIRMED_MAP, k);
}

/* ct_confirmed: both sides spoke and the flow is established (for TCP:
 * the handshake completed, or, picked up mid-stream, the other side
 * answered). */
static __always_inline int ct_confirmed(const struct ct_entry *e)
{
	return e->packets_reply && e->state == CT_ESTABLISHED;
}

/* ct_key_of builds the canonical key of t: endpoint a is the lower
 * (address, port). Returns 1 when t's source is endpoint b. */
static __always_inline int ct_key_of(const struct tuple *t, struct ct_key *k)
{
	int src_is_b = 0;

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
	k->family = t->family;
	k->pad[0] = 0;
	k->pad[1] = 0;
	return src_is_b;
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
		break;
	case CT_SYN_RECV:
		if (is_orig && (flags & (TCPF_SYN | TCPF_ACK)) == TCPF_ACK)
			e->state = CT_ESTABLISHED;
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

/* tcp_opens: a packet that may open a TCP connection (SYN without ACK). */
static __always_inline int tcp_opens(__u8 f)
{
	return (f & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
}
