/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* parse.h: bounded, bounds-checked parsing of L2/L3/L4 headers into a tuple.
 *
 * Every read goes through load(): a linear skb (the whole packet in its
 * head, as almost every packet arrives) is read directly, each read checked
 * against data_end; any other (GRO'd, paged) with bpf_skb_load_bytes, which
 * checks bounds against the whole skb. So nothing in a packet can make the
 * parser read past its end or misread a paged fragment.
 */
#pragma once

#include "common.h"

#define ETH_P_8021Q_  0x8100
#define ETH_P_8021AD_ 0x88A8
#define IPV6_MAX_EXT_HDRS 6 /* walked before the upper-layer header */

/* load copies len bytes at off into to. A linear skb (all of it in the
 * head: what arrives unfragmented) is read directly, bounds-checked against
 * data_end; any other (GRO'd, paged) through bpf_skb_load_bytes. linear is a
 * constant in each inlined copy of the parser, so each copy has one path. */
static __always_inline int load(struct __sk_buff *skb, const int linear, __u32 off, void *to, const __u32 len)
{
	void *data, *data_end;

	if (!linear)
		return bpf_skb_load_bytes(skb, off, to, len);
	/* Plain loads let clang hoist &skb->data into a register and offset it,
	 * which the verifier rejects for context pointers: load them in asm. */
	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(data) : "r"(skb), "i"(offsetof(struct __sk_buff, data)));
	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(data_end) : "r"(skb), "i"(offsetof(struct __sk_buff, data_end)));
	if (off > 0xff00 || data + off + len > data_end)
		return -1;
	__builtin_memcpy(to, data + off, len);
	return 0;
}

enum pkt_kind {
	PKT_TRACK = 0,     /* an IP packet with a tuple to track */
	PKT_NON_IP = 1,    /* not IPv4/IPv6: passed untracked */
	PKT_UNTRACKED = 2, /* IP but deliberately not tracked (neighbour discovery, MLD) */
	PKT_FRAGMENT = 3,  /* a later fragment: no L4 header, never parsed as ports */
	PKT_ICMP_ERR = 4,  /* ICMP error: inner holds the quoted tuple */
	PKT_ERROR = 5,     /* truncated or malformed */
};

struct tuple {
	union addr src;
	union addr dst;
	__be16 sport;
	__be16 dport;
	__u8   proto;
	__u8   family;
	__u8   tcp_flags;
	__u8   pad;
};

struct pkt {
	struct tuple t;     /* the packet's own tuple */
	struct tuple inner; /* for PKT_ICMP_ERR: the quoted packet's tuple */
	__u32 kind;
};

/* ICMP echo: the identifier stands in for the port. The request carries it as
 * the source port and the reply as the destination port, so both directions
 * of one exchange meet in the same canonical conntrack key. */
static __always_inline void icmp_echo_ports(struct tuple *t, __be16 id, int is_request)
{
	if (is_request) {
		t->sport = id;
		t->dport = 0;
	} else {
		t->sport = 0;
		t->dport = id;
	}
}

/* has_ports: the protocols whose header starts with source and destination
 * port, which conntrack keys and policy matches. */
static __always_inline int has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* Reads TCP/UDP/SCTP ports (and TCP flags) at off into t; the whole header
 * must lie within the IP packet, which ends at end. Other protocols are
 * tracked by address pair and protocol with zero ports. */
static __always_inline int parse_ports(struct __sk_buff *skb, const int linear, __u32 off, __u32 end, struct tuple *t)
{
	__u8 hdr[14];

	switch (t->proto) {
	case IPPROTO_TCP:
		if (off + 20 > end || load(skb, linear, off, hdr, 14) < 0)
			return -1;
		t->tcp_flags = hdr[13];
		break;
	case IPPROTO_UDP:
		if (off + 8 > end || load(skb, linear, off, hdr, 4) < 0)
			return -1;
		break;
	case IPPROTO_SCTP: /* the common header: ports, verification tag, checksum */
		if (off + 12 > end || load(skb, linear, off, hdr, 4) < 0)
			return -1;
		break;
	default:
		return 0;
	}
	__builtin_memcpy(&t->sport, &hdr[0], 2);
	__builtin_memcpy(&t->dport, &hdr[2], 2);
	return 0;
}

/* The packet quoted by an ICMP error: its IP header and the first 8 bytes of
 * its L4 header (all RFC 792 guarantees). Returns 0 when a tuple was read. */
static __always_inline int parse_inner4(struct __sk_buff *skb, const int linear, __u32 off, struct tuple *in)
{
	struct iphdr ip;
	__u8 l4[8];

	if (load(skb, linear, off, &ip, sizeof(ip)) < 0 || ip.version != 4 || ip.ihl < 5)
		return -1;
	in->family = 4;
	in->proto = ip.protocol;
	in->src.w[0] = ip.saddr;
	in->dst.w[0] = ip.daddr;
	if (ip.frag_off & bpf_htons(0x1fff))
		return 0;
	off += ip.ihl * 4;
	switch (ip.protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if (load(skb, linear, off, l4, 4) < 0)
			return -1;
		__builtin_memcpy(&in->sport, &l4[0], 2);
		__builtin_memcpy(&in->dport, &l4[2], 2);
		break;
	case IPPROTO_ICMP:
		if (load(skb, linear, off, l4, 8) < 0)
			return -1;
		if (l4[0] == ICMP_ECHO || l4[0] == ICMP_ECHOREPLY) {
			__be16 id;
			__builtin_memcpy(&id, &l4[4], 2);
			icmp_echo_ports(in, id, l4[0] == ICMP_ECHO);
		}
		break;
	}
	return 0;
}

static __always_inline int parse_inner6(struct __sk_buff *skb, const int linear, __u32 off, struct tuple *in)
{
	struct ipv6hdr ip6;
	__u8 l4[8];

	if (load(skb, linear, off, &ip6, sizeof(ip6)) < 0 || ip6.version != 6)
		return -1;
	in->family = 6;
	in->proto = ip6.nexthdr;
	__builtin_memcpy(in->src.b, &ip6.saddr, 16);
	__builtin_memcpy(in->dst.b, &ip6.daddr, 16);
	off += sizeof(ip6);
	/* The quoted packet's extension headers are not walked: a quoted packet
	 * with them is matched by address pair and next header only. */
	switch (ip6.nexthdr) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if (load(skb, linear, off, l4, 4) < 0)
			return -1;
		__builtin_memcpy(&in->sport, &l4[0], 2);
		__builtin_memcpy(&in->dport, &l4[2], 2);
		break;
	case IPPROTO_ICMPV6:
		if (load(skb, linear, off, l4, 8) < 0)
			return -1;
		if (l4[0] == ICMPV6_ECHO_REQUEST || l4[0] == ICMPV6_ECHO_REPLY) {
			__be16 id;
			__builtin_memcpy(&id, &l4[4], 2);
			icmp_echo_ports(in, id, l4[0] == ICMPV6_ECHO_REQUEST);
		}
		break;
	}
	return 0;
}

static __always_inline int parse_icmp4(struct __sk_buff *skb, const int linear, __u32 off, __u32 end, struct pkt *p)
{
	__u8 h[8];
	__be16 id;

	if (off + 8 > end || load(skb, linear, off, h, 8) < 0)
		return PKT_ERROR;
	switch (h[0]) {
	case ICMP_ECHO:
	case ICMP_ECHOREPLY:
		__builtin_memcpy(&id, &h[4], 2);
		icmp_echo_ports(&p->t, id, h[0] == ICMP_ECHO);
		return PKT_TRACK;
	case ICMP_DEST_UNREACH:
	case ICMP_SOURCE_QUENCH:
	case ICMP_REDIRECT:
	case ICMP_TIME_EXCEEDED:
	case ICMP_PARAMETERPROB:
		if (parse_inner4(skb, linear, off + 8, &p->inner) < 0)
			return PKT_ERROR;
		return PKT_ICMP_ERR;
	}
	/* Other ICMP (timestamps, ...) is tracked by address pair. */
	return PKT_TRACK;
}

static __always_inline int parse_icmp6(struct __sk_buff *skb, const int linear, __u32 off, __u32 end, struct pkt *p)
{
	__u8 h[8];
	__be16 id;

	if (off + 8 > end || load(skb, linear, off, h, 8) < 0)
		return PKT_ERROR;
	switch (h[0]) {
	case ICMPV6_ECHO_REQUEST:
	case ICMPV6_ECHO_REPLY:
		__builtin_memcpy(&id, &h[4], 2);
		icmp_echo_ports(&p->t, id, h[0] == ICMPV6_ECHO_REQUEST);
		return PKT_TRACK;
	case ICMPV6_DEST_UNREACH:
	case ICMPV6_PKT_TOOBIG:
	case ICMPV6_TIME_EXCEED:
	case ICMPV6_PARAMPROB:
		if (parse_inner6(skb, linear, off + 8, &p->inner) < 0)
			return PKT_ERROR;
		return PKT_ICMP_ERR;
	case 130: /* MLD query */
	case 131: /* MLD report */
	case 132: /* MLD done */
	case 133: /* router solicitation */
	case 134: /* router advertisement */
	case 135: /* neighbour solicitation */
	case 136: /* neighbour advertisement */
	case 137: /* redirect */
	case 143: /* MLDv2 report */
		/* Link-local control traffic IPv6 cannot work without: never tracked,
		 * never judged by policy. */
		return PKT_UNTRACKED;
	}
	return PKT_TRACK;
}

/* parse_l4 reads the upper-layer header at off of an IP packet ending at end. */
static __always_inline int parse_l4(struct __sk_buff *skb, const int linear, __u32 off, __u32 end, struct pkt *p)
{
	if (p->t.proto == IPPROTO_ICMP)
		return parse_icmp4(skb, linear, off, end, p);
	if (p->t.proto == IPPROTO_ICMPV6)
		return parse_icmp6(skb, linear, off, end, p);
	if (parse_ports(skb, linear, off, end, &p->t) < 0)
		return PKT_ERROR;
	return PKT_TRACK;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, const int linear, __u32 off, struct pkt *p)
{
	struct iphdr ip;
	__u32 end = skb->len;
	__u16 tot;

	if (load(skb, linear, off, &ip, sizeof(ip)) < 0)
		return PKT_ERROR;
	if (ip.version != 4 || ip.ihl < 5)
		return PKT_ERROR;
	/* The packet must fit in the frame (a link-layer trailer may follow
	 * it). A total length of 0 is the rest of the frame in a BIG TCP GSO
	 * packet, and malformed in any other. */
	tot = bpf_ntohs(ip.tot_len);
	if (tot || !skb->gso_size) {
		if (off + tot > end)
			return PKT_ERROR;
		end = off + tot;
	}
	if (off + ip.ihl * 4 > end)
		return PKT_ERROR;
	p->t.family = 4;
	p->t.proto = ip.protocol;
	p->t.src.w[0] = ip.saddr;
	p->t.dst.w[0] = ip.daddr;
	/* A non-zero fragment offset: no L4 header here. */
	if (ip.frag_off & bpf_htons(0x1fff))
		return PKT_FRAGMENT;
	return parse_l4(skb, linear, off + ip.ihl * 4, end, p);
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, const int linear, __u32 off, struct pkt *p)
{
	struct ipv6hdr ip6;
	__u32 end = skb->len;
	__u16 plen;
	__u8 nexthdr;

	if (load(skb, linear, off, &ip6, sizeof(ip6)) < 0)
		return PKT_ERROR;
	if (ip6.version != 6)
		return PKT_ERROR;
	/* As for IPv4, but a payload length of 0 outside BIG TCP GSO packets
	 * is an empty payload (a jumbogram cannot cross an Ethernet link). */
	plen = bpf_ntohs(ip6.payload_len);
	if (plen || !skb->gso_size) {
		if (off + sizeof(ip6) + plen > end)
			return PKT_ERROR;
		end = off + sizeof(ip6) + plen;
	}
	p->t.family = 6;
	__builtin_memcpy(p->t.src.b, &ip6.saddr, 16);
	__builtin_memcpy(p->t.dst.b, &ip6.daddr, 16);
	nexthdr = ip6.nexthdr;
	off += sizeof(ip6);

	/* IPV6_MAX_EXT_HDRS extension headers, then the upper-layer header. An
	 * extension header that runs past the packet's end makes it malformed. */
#pragma unroll
	for (int i = 0; i <= IPV6_MAX_EXT_HDRS; i++) {
		__u8 ext[8];

		if (off > end)
			return PKT_ERROR;
		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if (load(skb, linear, off, ext, 2) < 0)
				return PKT_ERROR;
			nexthdr = ext[0];
			off += (ext[1] + 1) * 8;
			break;
		case IPPROTO_AH:
			if (load(skb, linear, off, ext, 2) < 0)
				return PKT_ERROR;
			nexthdr = ext[0];
			off += (ext[1] + 2) * 4;
			break;
		case IPPROTO_FRAGMENT:
			if (load(skb, linear, off, ext, 8) < 0)
				return PKT_ERROR;
			nexthdr = ext[0];
			p->t.proto = nexthdr;
			/* ext[2..3]: offset (13 bits) and flags. */
			if ((ext[2] << 8 | ext[3]) & 0xfff8)
				return PKT_FRAGMENT;
			off += 8;
			break;
		default:
			p->t.proto = nexthdr;
			return parse_l4(skb, linear, off, end, p);
		}
	}
	/* More extension headers than we walk: refuse rather than guess. */
	return PKT_ERROR;
}

static __always_inline int parse_frame(struct __sk_buff *skb, const int linear, struct pkt *p)
{
	__u8 eth[ETH_HLEN];
	__u32 off = ETH_HLEN;
	__u16 proto;

	if (load(skb, linear, 0, eth, ETH_HLEN) < 0)
		return PKT_ERROR;
	proto = eth[12] << 8 | eth[13];
	if (proto == ETH_P_8021Q_ || proto == ETH_P_8021AD_) {
		__u8 vlan[4];

		if (load(skb, linear, off, vlan, 4) < 0)
			return PKT_ERROR;
		proto = vlan[2] << 8 | vlan[3];
		off += 4;
	}
	switch (proto) {
	case ETH_P_IP:
		return parse_ipv4(skb, linear, off, p);
	case ETH_P_IPV6:
		return parse_ipv6(skb, linear, off, p);
	}
	return PKT_NON_IP;
}

/* parse fills p and returns its kind. Builds with CTD_PARSE_SKB_LOAD_ONLY
 * (the test-only bpf/upgradetest) take the bpf_skb_load_bytes path for every
 * packet, so that tests, which can only send linear skbs, cover it too. */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
#ifndef CTD_PARSE_SKB_LOAD_ONLY
	if (skb->data_end - skb->data == skb->len)
		return parse_frame(skb, 1, p);
#endif
	return parse_frame(skb, 0, p);
}
