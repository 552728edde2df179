//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* ctexpire.c: conntrack GC's compare-and-delete, run through
 * BPF_PROG_TEST_RUN by datapath/ctmap's Expirer against the live table.
 *
 * The input is up to EXPIRE_BATCH records back to back. For each the
 * program looks the entry up (in either conntrack table of its family), compares its last_seen with the one GC read,
 * and deletes it only if they are equal, all in the kernel: a packet that
 * refreshed the entry at any time before the comparison keeps it. It
 * writes what it did into the record, which BPF_PROG_TEST_RUN copies back.
 */
#include "common.h"
#include "conntrack.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* How many records one run decides: BPF_PROG_TEST_RUN takes a TC
 * program's input as one page, less the skb's head- and tailroom. */
enum expire_limit {
	EXPIRE_BATCH = 56,
};

enum expire_outcome {
	EXPIRE_DELETED = 1,   /* unchanged since GC read it: deleted */
	EXPIRE_REFRESHED = 2, /* last_seen changed: kept */
	EXPIRE_MISSING = 3,   /* no entry (evicted or deleted meanwhile) */
};

struct expire_rec {
	struct ct_any_key key;
	__u64 last_seen; /* as GC read it */
	__u8  outcome;   /* enum expire_outcome, written here */
	__u8  pad[7];
};

/* Anchors the types userspace shares in BTF for bpf2go -type; never used. */
struct expire_types {
	struct expire_rec rec;
	enum expire_limit limit;
	enum expire_outcome outcome;
};
const struct expire_types *unused_expire_types __attribute__((unused));

/* expire_one deletes the entry whose key in tb is k if its last_seen is
 * still last_seen. */
static __always_inline __u8 expire_one(struct ct_tables tb, const void *k, __u64 last_seen)
{
	struct ct_entry *e;
	int confirmed;

	e = ct_lookup(tb, k, &confirmed);
	if (!e)
		return EXPIRE_MISSING;
	if (e->last_seen != last_seen)
		return EXPIRE_REFRESHED;
	return ct_delete(tb, k, confirmed) ? EXPIRE_MISSING : EXPIRE_DELETED;
}

SEC("tc")
int ctd_ct_expire(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	for (int i = 0; i < EXPIRE_BATCH; i++) {
		struct expire_rec *r = data + i * sizeof(struct expire_rec);

		if ((void *)(r + 1) > end)
			break;
		if (r->key.family == 4)
			r->outcome = expire_one(CT4_TABLES, r->key.key, r->last_seen);
		else
			r->outcome = expire_one(CT6_TABLES, r->key.key, r->last_seen);
	}
	return 0;
}
