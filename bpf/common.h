/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* common.h: includes, constants and the structs shared with Go (bpf2go -type).
 *
 * Every struct here is part of a map layout. Changing one is a layout change:
 * bump the version in the map's name (ct4_v2 -> ct4_v3) and add a migration in
 * datapath/migrate. Never reuse a name with a different layout.
 */
#pragma once

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* The constants below that userspace shares are enums, so that bpf2go -type
 * generates their Go side (anchored in BTF in ctd.c); never copy them. */

/* The hook a program runs at. */
enum direction {
	DIR_INGRESS = 0,
	DIR_EGRESS = 1,
};

/* Verdicts a TC program returns. UNSPEC lets later programs and filters on the
 * same hook see the packet (TCX_NEXT); it passes when there are none. */
#define CTD_PASS TC_ACT_UNSPEC
#define CTD_DROP TC_ACT_SHOT

/* Reserved identities. 0 is never a valid identity; in policy keys it means "any". */
enum reserved_identity {
	IDENTITY_ANY = 0,
	IDENTITY_HOST = 1,
	IDENTITY_WORLD = 2,
};

/* TCP flag bits as in byte 13 of the TCP header. */
#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_PSH 0x08
#define TCPF_ACK 0x10

/* The maps, one name each. The version in a name is its layout's: a layout
 * change renames the map here (and in datapath/loader, its only Go owner),
 * and the code that uses the map keeps using the macro. */
#define CT4_MAP             ct4_v2
#define CT6_MAP             ct6_v2
#define CT4_UNCONFIRMED_MAP ct4_unconfirmed_v2
#define CT6_UNCONFIRMED_MAP ct6_unconfirmed_v2
#define CT_GUARD_MAP        ct_v2 /* holds nothing: see conntrack.h */
#define IPCACHE4_MAP ipcache4_v1
#define IPCACHE6_MAP ipcache6_v1
#define IPHOST4_MAP  iphost4_v1
#define IPHOST6_MAP  iphost6_v1
#define POLICY_MAP   policy_v1
#define CONFIG_MAP   config_v1
#define METRICS_MAP  metrics_v1
#define EVENTS_MAP   events_v2
#define OWNER_MAP    owner_v1
#define EVLIMIT_MAP  evlimit_v1
#define EVLISTEN_MAP evlisten_v1

/* An address of either family; IPv4 uses the first 4 bytes, the rest is zero. */
union addr {
	__u8  b[16];
	__u32 w[4];
	__u64 d[2];
};

/* ---- conntrack, layout v2: ct4_v2 / ct6_v2 (LRU hash, confirmed flows) and
 * ct4_unconfirmed_v2 / ct6_unconfirmed_v2 (LRU hash, flows not yet
 * confirmed), a key per family and one entry layout ---- */

enum ct_state {
	CT_NEW = 0,         /* non-TCP: seen in the originating direction only */
	CT_ESTABLISHED = 1, /* TCP: handshake done (or picked up mid-stream); others: reply seen */
	CT_SYN_SENT = 2,
	CT_SYN_RECV = 3,
	CT_FIN_WAIT = 4,    /* one side has sent FIN */
	CT_CLOSED = 5,      /* both sides sent FIN, or RST */
};

/* Entry flags. */
enum ct_flag {
	CT_F_OPENED_INGRESS = 0x01, /* first packet was seen on ingress */
	CT_F_PICKUP = 0x02,         /* TCP flow picked up mid-stream (first packet was not a SYN) */
	CT_F_RELATED = 0x04,        /* an ICMP error related to this flow was seen */
	CT_F_REVOKED = 0x08,        /* cut by 'ctd ct revoke': both directions are dropped */
};
/* Flag bits are additive: a program that predates a bit ignores it (a build
 * without CT_F_REVOKED passes a revoked flow again). */

/* The keys are canonical: endpoint a is the lower (address, port) of the
 * two, so both directions of a connection hash to the same entry with one
 * lookup. Addresses compare as the little-endian words they load as (IPv4:
 * one 32-bit word; IPv6: two 64-bit words), then ports as stored. */
struct ct4_key {
	__be32 addr_a;
	__be32 addr_b;
	__be16 port_a;
	__be16 port_b;
	__u8   proto;
	__u8   pad[3];
};

struct ct6_key {
	__u8   addr_a[16];
	__u8   addr_b[16];
	__be16 port_a;
	__be16 port_b;
	__u8   proto;
	__u8   pad[3];
};

/* One entry layout for both families. The first 64 bytes are what a packet
 * of an established flow reads and writes; the rest is written when the
 * flow is created or its handshake completes. */
struct ct_entry {
	__u64 packets_orig;
	__u64 bytes_orig;
	__u64 packets_reply;
	__u64 bytes_reply;
	__u64 last_seen;       /* CLOCK_MONOTONIC_COARSE ns */
	__u8  state;           /* enum ct_state */
	__u8  orig_is_b;       /* 1 when endpoint b of the key opened the flow */
	__u8  tcp_flags_orig;  /* OR of TCP flags seen from the originator */
	__u8  tcp_flags_reply; /* OR of TCP flags seen from the responder */
	__u8  flags;           /* CT_F_* */
	__u8  pad[3];
	__u32 src_identity;    /* originator's identity */
	__u32 dst_identity;    /* responder's identity */
	__u32 ifindex;         /* interface the flow was first seen on */
	__u32 rtt_us;          /* TCP handshake round trip seen here (SYN -> completing ACK), 0: unknown */
	/* cold */
	__u64 first_seen;      /* CLOCK_MONOTONIC_COARSE ns */
	__u64 syn_ns;          /* bpf_ktime_get_ns() of the opening SYN (for rtt_us), 0 otherwise */
	__u64 cgroup_id;       /* owner socket's cgroup v2 id, 0: no local owner */
	__u32 pid;             /* owner process (tgid), 0: none */
	__u32 pad2;
	char  comm[16];        /* owner's command name, NUL padded */
};

/* ---- conntrack, layout v1 (ct_v1, ct_unconfirmed_v1): no longer used by
 * the datapath, kept (never to change) for the converter that upgrades it
 * (datapath/loader/convert.go). One table for both families. ---- */

struct ct_v1_key {
	__u8   addr_a[16];
	__u8   addr_b[16];
	__be16 port_a;
	__be16 port_b;
	__u8   proto;
	__u8   family; /* 4 or 6; IPv4 zero-pads */
	__u8   pad[2];
} __attribute__((aligned(8)));

struct ct_v1_entry {
	__u64 packets_orig;
	__u64 bytes_orig;
	__u64 packets_reply;
	__u64 bytes_reply;
	__u64 first_seen;
	__u64 last_seen;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;
	__u8  state;
	__u8  orig_is_b;
	__u8  tcp_flags_orig;
	__u8  tcp_flags_reply;
	__u8  flags;
	__u8  pad[7];
};

/* ---- ipcache: host entries (/32, /128) in iphost4_v1 / iphost6_v1 (hash,
 * keyed by the address), CIDRs in ipcache4_v1 / ipcache6_v1 (LPM trie); one
 * value layout. A datapath pinned before the hashes existed has its host
 * entries in the tries, which resolve them the same until they are moved. ---- */

struct iphost4_key {
	__u8 addr[4];
};

struct iphost6_key {
	__u8 addr[16];
};

struct ipcache4_key {
	__u32 prefixlen;
	__u8  addr[4];
};

struct ipcache6_key {
	__u32 prefixlen;
	__u8  addr[16];
};

struct ipcache_value {
	__u32 identity;
	__u32 flags; /* reserved, 0 */
};

/* ---- policy: policy_v1 (hash) ---- */

enum verdict {
	VERDICT_UNSET = 0, /* default verdict not configured: allow */
	VERDICT_ALLOW = 1,
	VERDICT_DENY = 2,
};

struct policy_key {
	__u32 identity; /* remote identity, 0 = any */
	__u16 port;     /* destination port of the first packet, host order, 0 = any */
	__u8  proto;    /* IP protocol, 0 = any */
	__u8  dir;      /* DIR_INGRESS or DIR_EGRESS */
};

struct policy_value {
	__u8 verdict; /* VERDICT_ALLOW or VERDICT_DENY */
	__u8 pad[3];
};

/* ---- config: config_v1 (array of one) ---- */

struct config {
	__u8  default_verdict[2]; /* by direction; VERDICT_UNSET means allow */
	__u8  owner_off;          /* 1: new flows record no owner (to measure what attribution costs) */
	__u8  pad;
	__u32 policy_rules;       /* rules in policy_v1; 0 skips the policy lookups */
	__u32 events_rate;        /* events per second per CPU; 0 = unlimited */
	__u32 events_burst;       /* token bucket depth per CPU */
};

/* ---- metrics: metrics_v1 (per-CPU array), index = dir * METRIC_MAX + reason ---- */

enum metric_reason {
	/* verdicts: forwarded */
	M_FWD_ESTABLISHED = 0, /* conntrack hit */
	M_FWD_NEW = 1,         /* new flow allowed by policy */
	M_FWD_RELATED = 2,     /* ICMP error related to a tracked flow */
	M_FWD_UNTRACKED = 3,   /* not tracked: non-IP, neighbour discovery, later fragments */
	M_FWD_UNPARSEABLE = 4, /* could not be parsed, passed (default allow) */
	/* verdicts: dropped */
	M_DROP_POLICY = 16,
	M_DROP_INVALID = 17,   /* invalid or out-of-state */
	M_DROP_CT_INSERT = 18, /* conntrack insert failed */
	M_DROP_PARSE = 19,     /* could not be parsed, dropped (default deny) */
	M_DROP_REVOKED = 20,   /* packet of a revoked flow (or an ICMP error quoting one) */
	/* counters that are not verdicts (bytes unused unless noted) */
	M_CT_CREATED = 32,        /* entries created */
	M_CT_UPDATE_FAILED = 33,  /* a conntrack map update failed */
	M_EVENTS_LOST = 34,       /* ring buffer reservation failed */
	M_EVENTS_RATELIMITED = 35,/* event suppressed by the per-CPU rate limit */
	M_FRAGMENTS = 36,         /* later fragments seen (also counted as untracked) */
	M_CT_CONFIRMED = 37,      /* flows promoted to the confirmed table */
	M_CT_MIDSTREAM_MISS = 38, /* a TCP packet other than SYN or RST found no entry:
				   * its flow was lost (LRU, flush) or predates ctd */
	M_OWNER_FAILED = 39,      /* a socket's owner could not be stored (counted as egress) */
	METRIC_MAX = 64,
};

struct metric_value {
	__u64 packets;
	__u64 bytes;
};

/* ---- events: events_v2 (ring buffer) ---- */

enum event_type {
	EV_FLOW_NEW = 1,
	EV_FLOW_CLOSED = 2,
	EV_DROP = 3,
	EV_CT_INSERT_FAILED = 4,
	EV_CT_MIDSTREAM_MISS = 5, /* as M_CT_MIDSTREAM_MISS */
};

struct event {
	__u64 time;  /* CLOCK_MONOTONIC_COARSE ns */
	__u8  type;  /* enum event_type */
	__u8  reason;/* enum metric_reason, for drops */
	__u8  dir;
	__u8  proto;
	__u8  family;
	__u8  state;
	__u8  pad[2];
	__u32 ifindex;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 pad2;
	__u8  src[16]; /* originator for flow events, the packet's source for drops */
	__u8  dst[16];
	__be16 sport;
	__be16 dport;
	__u32 pad3;
	__u64 packets_orig;
	__u64 bytes_orig;
	__u64 packets_reply;
	__u64 bytes_reply;
	/* v2: the flow's local owner (see struct owner) and handshake RTT */
	__u64 cgroup_id;
	__u32 pid;
	__u32 rtt_us;
	char  comm[16];
};

struct ratelimit {
	__u64 tokens;
	__u64 last; /* ns */
};

/* ---- owner: owner_v1 (socket storage): who created a local socket ---- */

/* Written when an IPv4 or IPv6 TCP or UDP socket is created (the
 * cgroup/sock_create program of owner.h); a socket accept() returns
 * inherits its listener's (BPF_F_CLONE). */
struct owner {
	__u64 cgroup_id; /* cgroup v2 id (the inode number of its directory) */
	__u32 pid;       /* tgid of the creating process */
	__u32 pad;
	char  comm[16];  /* its command name, NUL padded */
};

/* ---- event consumer: evlisten_v1 (array of one) ---- */

/* The consumer of events_v2 ('ctd monitor') registers here and refreshes
 * until every second; the datapath writes events only while now <= until. */
struct evlisten {
	__u64 until; /* CLOCK_MONOTONIC_COARSE ns; 0: nobody reads events */
	__u32 pid;   /* the consumer's process id, for messages */
	__u32 pad;
};
