/* Parsing and rewriting IPv4 TCP/UDP packets in a tc program.
 *
 * Only IPv4 without options (ihl 5) and unfragmented packets are translated; anything
 * else passes untouched. Offsets are fixed from the Ethernet header on. */
#ifndef SHOAL_PACKET_H
#define SHOAL_PACKET_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define IP_OFF ETH_HLEN
#define IP_CSUM_OFF (IP_OFF + 10)
#define SADDR_OFF (IP_OFF + 12)
#define DADDR_OFF (IP_OFF + 16)
#define L4_OFF (IP_OFF + 20)
#define SPORT_OFF L4_OFF
#define DPORT_OFF (L4_OFF + 2)
#define TCP_CSUM_OFF (L4_OFF + 16)
#define UDP_CSUM_OFF (L4_OFF + 6)

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define IP_MF_OFFSET 0x3fff /* more-fragments flag and fragment offset */

struct tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
};

/* Reads the tuple of an IPv4 TCP or UDP packet; returns -1 for anything else. */
static __always_inline int parse_tuple(struct __sk_buff *skb, struct tuple *t)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return -1;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + L4_OFF + sizeof(struct tcphdr) > end) {
		/* headers may sit in paged data: make them linear (a short UDP packet cannot be
		 * pulled that far, so pull what there is) */
		__u32 want = L4_OFF + sizeof(struct tcphdr);
		if (skb->len < want)
			want = skb->len;
		bpf_skb_pull_data(skb, want);
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
	}
	struct iphdr *ip = data + IP_OFF;
	if ((void *)(ip + 1) > end)
		return -1;
	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(IP_MF_OFFSET)))
		return -1;
	t->saddr = ip->saddr;
	t->daddr = ip->daddr;
	t->proto = ip->protocol;
	t->tcp_flags = 0;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = data + L4_OFF;
		if ((void *)(tcp + 1) > end)
			return -1;
		t->sport = tcp->source;
		t->dport = tcp->dest;
		t->tcp_flags = ((__u8 *)tcp)[13];
		return 0;
	}
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = data + L4_OFF;
		if ((void *)(udp + 1) > end)
			return -1;
		t->sport = udp->source;
		t->dport = udp->dest;
		return 0;
	}
	return -1;
}

static __always_inline int l4_csum_off(__u8 proto)
{
	return proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF;
}

static __always_inline __u64 l4_csum_flags(__u8 proto, __u64 size)
{
	/* a UDP checksum of 0 means "none": leave it so, and never produce 0 */
	return proto == IPPROTO_UDP ? (size | BPF_F_MARK_MANGLED_0) : size;
}

/* Rewrites the address at `off` (SADDR_OFF or DADDR_OFF) and fixes the IP checksum and
 * the L4 checksum's pseudo header. */
static __always_inline int set_addr(struct __sk_buff *skb, __u8 proto, int off, __be32 old,
				    __be32 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, l4_csum_off(proto), old, new,
				l4_csum_flags(proto, BPF_F_PSEUDO_HDR | sizeof(new))))
		return -1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, sizeof(new)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

/* Rewrites the port at `off` (SPORT_OFF or DPORT_OFF) and fixes the L4 checksum. */
static __always_inline int set_port(struct __sk_buff *skb, __u8 proto, int off, __be16 old,
				    __be16 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, l4_csum_off(proto), old, new,
				l4_csum_flags(proto, sizeof(new))))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

/* skb->mark of a packet a program sent back into the pod it came from (a hairpin flow, an
 * ICMP reject): the pod's own traffic, which policy does not judge again on the way in.
 * Marks do not cross into the pod's namespace (veth scrubs them), so a pod cannot set it. */
#define BOUNCE_MARK 0x5a0a1b0u

/* Sends the packet back out of the interface it came in on (into the pod that sent it),
 * with the Ethernet addresses swapped. */
static __always_inline int bounce(struct __sk_buff *skb)
{
	__u8 macs[12];
	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)))
		return TC_ACT_SHOT;
	__u8 swapped[12];
#pragma unroll
	for (int i = 0; i < 6; i++) {
		swapped[i] = macs[i + 6];
		swapped[i + 6] = macs[i];
	}
	if (bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0))
		return TC_ACT_SHOT;
	skb->mark = BOUNCE_MARK;
	return bpf_redirect(skb->ifindex, 0);
}

/* Routes a rewritten packet itself and sends it out of the route's interface. Needed when
 * the source became one of the node's own addresses: the kernel's input path drops such a
 * packet as a martian. Skipping the stack also skips a routing pass. */
static __always_inline int route_out(struct __sk_buff *skb, const struct tuple *t, __be32 saddr,
				     __be32 daddr)
{
	struct bpf_fib_lookup p = {};
	p.family = 2; /* AF_INET */
	p.l4_protocol = t->proto;
	p.ipv4_src = saddr;
	p.ipv4_dst = daddr;
	p.ifindex = skb->ifindex;
	long rc = bpf_fib_lookup(skb, &p, sizeof(p), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_SHOT;
	return bpf_redirect_neigh(p.ifindex, 0, 0, 0);
}

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 c = (__u32)sum;
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)~c;
}

#endif
