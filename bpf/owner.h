/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* owner.h: which process and cgroup own a local flow.
 *
 * A cgroup/sock_create program, attached to the cgroup v2 root, stores the
 * creating process (tgid, comm) and its cgroup in the socket's storage
 * (OWNER_MAP, socket-local storage). Accepted sockets inherit their
 * listener's storage (BPF_F_CLONE). When the TC programs create a flow
 * (never for a packet of a tracked flow), owner_of finds the local socket
 * and copies its owner into the entry: at egress the packet's own socket,
 * at ingress the socket a lookup of its tuple finds (a listener, a bound
 * UDP socket). A forwarded packet has no local socket and no owner. A
 * socket created before the programs were attached has no storage: the
 * flows it opens get its cgroup (bpf_skb_cgroup_id), without pid and comm;
 * those it accepts get nothing (TC programs have no helper for the cgroup
 * of a socket they looked up). So do the TCP subflows of an MPTCP socket
 * that were never bound (a listener's is bound by its process: the
 * post_bind programs record it; a client's is not).
 *
 * A socket bound to the wildcard address is found for any destination,
 * also for a flow this host forwards; when the lookup finds one, a FIB
 * lookup asks whether the kernel would forward the packet, and a forwarded
 * flow gets no owner. That costs only the flows the lookup finds a
 * wildcard socket for.
 */
#pragma once

#include "common.h"
#include "conntrack.h"
#include "metrics.h"
#include "parse.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct owner);
} OWNER_MAP SEC(".maps");

/* owner_record stores the current process as sk's owner; with only_new,
 * only if sk has none yet. */
static __always_inline void owner_record(struct bpf_sock *sk, int only_new)
{
	struct owner *o;

	if ((sk->family != AF_INET && sk->family != AF_INET6) ||
	    (sk->protocol != IPPROTO_TCP && sk->protocol != IPPROTO_UDP))
		return;
	o = bpf_sk_storage_get(&OWNER_MAP, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o) {
		count(DIR_EGRESS, M_OWNER_FAILED, 0);
		return;
	}
	if (only_new && o->pid)
		return;
	o->pid = bpf_get_current_pid_tgid() >> 32;
	o->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(o->comm, sizeof(o->comm));
}

/* ctd_sock_create records the creator of every IPv4/IPv6 TCP and UDP
 * socket a process creates. It never denies: it returns 1. */
SEC("cgroup/sock_create")
int ctd_sock_create(struct bpf_sock *sk)
{
	owner_record(sk, 1);
	return 1;
}

/* ctd_post_bind4 and ctd_post_bind6 record the process that binds a socket
 * nobody recorded: the TCP subflows of an MPTCP socket (Go's listeners are
 * MPTCP by default), which the kernel creates, and which are what the TC
 * programs see. A socket with an owner keeps it. They never deny. */
SEC("cgroup/post_bind4")
int ctd_post_bind4(struct bpf_sock *sk)
{
	owner_record(sk, 1);
	return 1;
}

SEC("cgroup/post_bind6")
int ctd_post_bind6(struct bpf_sock *sk)
{
	owner_record(sk, 1);
	return 1;
}

/* owner_from copies sk's owner into e, and reports whether it has one. */
static __always_inline int owner_from(struct bpf_sock *sk, struct ct_entry *e)
{
	struct owner *o = bpf_sk_storage_get(&OWNER_MAP, sk, NULL, 0);

	if (!o)
		return 0;
	e->cgroup_id = o->cgroup_id;
	e->pid = o->pid;
	__builtin_memcpy(e->comm, o->comm, sizeof(e->comm));
	return 1;
}

/* owner_lookup finds the local socket an ingress packet of t is for, in the
 * network namespace of the skb's device; NULL if there is none. The caller
 * releases it. An IPv6 tuple is laid out as bpf_sock_tuple's ipv6 (source,
 * destination, ports) and is passed as it is: no copy on the stack. */
static __always_inline struct bpf_sock *owner_lookup(struct __sk_buff *skb, const struct tuple *t)
{
	struct bpf_sock_tuple *st = (struct bpf_sock_tuple *)t;
	struct bpf_sock_tuple st4;
	__u32 size = sizeof(st->ipv6);

	_Static_assert(__builtin_offsetof(struct tuple, dst) == __builtin_offsetof(struct bpf_sock_tuple, ipv6.daddr) &&
		       __builtin_offsetof(struct tuple, sport) == __builtin_offsetof(struct bpf_sock_tuple, ipv6.sport) &&
		       __builtin_offsetof(struct tuple, dport) == __builtin_offsetof(struct bpf_sock_tuple, ipv6.dport),
		       "struct tuple starts as bpf_sock_tuple.ipv6");
	if (t->family == 4) {
		st4.ipv4.saddr = t->src.w[0];
		st4.ipv4.daddr = t->dst.w[0];
		st4.ipv4.sport = t->sport;
		st4.ipv4.dport = t->dport;
		st = &st4;
		size = sizeof(st4.ipv4);
	}
	if (t->proto == IPPROTO_TCP)
		return bpf_sk_lookup_tcp(skb, st, size, BPF_F_CURRENT_NETNS, 0);
	return bpf_sk_lookup_udp(skb, st, size, BPF_F_CURRENT_NETNS, 0);
}

/* bound_to_any reports whether sk is bound to the wildcard address (an
 * IPv6 one also takes IPv4 unless v6only). */
static __always_inline int bound_to_any(const struct bpf_sock *sk)
{
	if (sk->family == AF_INET)
		return sk->src_ip4 == 0;
	return (sk->src_ip6[0] | sk->src_ip6[1] | sk->src_ip6[2] | sk->src_ip6[3]) == 0;
}

/* forwarded reports whether the kernel would forward t's packet, which
 * entered on skb's device, rather than deliver it here: its route is a
 * unicast one to another host. A local destination's route is of type
 * local (BPF_FIB_LKUP_RET_NOT_FWDED), and a host that does not forward
 * (BPF_FIB_LKUP_RET_FWD_DISABLED) can only deliver it. */
static __always_inline int forwarded(struct __sk_buff *skb, const struct tuple *t)
{
	struct bpf_fib_lookup fib = {
		.l4_protocol = t->proto,
		.sport = t->sport,
		.dport = t->dport,
		.ifindex = skb->ingress_ifindex,
	};
	long rc;

	if (t->family == 4) {
		fib.family = AF_INET;
		fib.ipv4_src = t->src.w[0];
		fib.ipv4_dst = t->dst.w[0];
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, t->src.w, sizeof(fib.ipv6_src));
		__builtin_memcpy(fib.ipv6_dst, t->dst.w, sizeof(fib.ipv6_dst));
	}
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	return rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ||
	       rc == BPF_FIB_LKUP_RET_FRAG_NEEDED;
}

/* owner_of records in e, the entry of a new flow, the owner of the local
 * socket of its first packet t, if it has one: at egress the packet's
 * socket, at ingress the one a lookup of its tuple finds. Only for new
 * flows: it costs a socket lookup at ingress. */
static __always_inline void owner_of(struct __sk_buff *skb, __u32 dir, const struct config *cfg,
				     const struct tuple *t, struct ct_entry *e)
{
	struct bpf_sock *sk;

	if ((cfg && cfg->owner_off) || (t->proto != IPPROTO_TCP && t->proto != IPPROTO_UDP))
		return;
	if (dir == DIR_EGRESS) {
		sk = skb->sk;
		if (!sk)
			return;
		sk = bpf_sk_fullsock(sk);
		if (!sk || !owner_from(sk, e))
			e->cgroup_id = bpf_skb_cgroup_id(skb); /* the socket's cgroup */
		return;
	}
	sk = owner_lookup(skb, t);
	if (!sk)
		return;
	if (!bound_to_any(sk) || !forwarded(skb, t))
		owner_from(sk, e);
	bpf_sk_release(sk);
}
