/* The answer to a packet for a service without endpoints: ICMP port unreachable from the
 * service address, as kube-proxy's REJECT rule gives (connect() fails at once with
 * ECONNREFUSED instead of timing out). */
#ifndef SHOAL_REJECT_H
#define SHOAL_REJECT_H

#include "packet.h"

/* linux/icmp.h pulls in libc's socket headers, which do not build for the BPF target */
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3

struct icmp_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__u32 unused;
};

struct icmp_reply {
	__u8 eth[ETH_HLEN];
	struct iphdr ip;
	struct icmp_hdr icmp;
	struct iphdr inner; /* the offending packet's IP header */
	__u8 inner_l4[8];   /* and the first 8 bytes of its L4 header (its ports) */
} __attribute__((packed));

static __always_inline int reject(struct __sk_buff *skb, const struct tuple *t)
{
	struct icmp_reply r = {};
	__u8 eth[ETH_HLEN];
	if (bpf_skb_load_bytes(skb, 0, eth, ETH_HLEN) ||
	    bpf_skb_load_bytes(skb, IP_OFF, &r.inner, sizeof(r.inner)) ||
	    bpf_skb_load_bytes(skb, L4_OFF, r.inner_l4, sizeof(r.inner_l4)))
		return TC_ACT_SHOT;
#pragma unroll
	for (int i = 0; i < 6; i++) {
		r.eth[i] = eth[i + 6];
		r.eth[i + 6] = eth[i];
	}
	r.eth[12] = eth[12];
	r.eth[13] = eth[13];
	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.tot_len = bpf_htons(sizeof(r) - ETH_HLEN);
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.saddr = t->daddr;
	r.ip.daddr = t->saddr;
	r.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)((__u8 *)&r + ETH_HLEN), sizeof(r.ip), 0));
	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_PORT_UNREACH;
	r.icmp.checksum = csum_fold(bpf_csum_diff(
		0, 0, (__be32 *)((__u8 *)&r + ETH_HLEN + sizeof(struct iphdr)), sizeof(r.icmp) + sizeof(r.inner) + sizeof(r.inner_l4), 0));
	if (bpf_skb_change_tail(skb, sizeof(r), 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, &r, sizeof(r), 0))
		return TC_ACT_SHOT;
	skb->mark = BOUNCE_MARK;
	return bpf_redirect(skb->ifindex, 0);
}

#endif
