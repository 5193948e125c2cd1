/* Network policy on pod interfaces (NetworkPolicy, ingress and egress).
 *
 * A pod that no policy selects (no shoal_endpoints entry, or no EP_F_* flag) is not
 * judged at all. For an isolated pod, a new flow is judged once, in the direction it was
 * opened: towards the pod (ingress, before any reply translation) or from it (egress,
 * after service translation, so against the backend it reaches, as upstream). Replies
 * follow the verdict of their flow:
 * - TCP needs no state: only a SYN without ACK opens a connection, so only those are
 *   judged; any other segment of a connection a SYN was not allowed to open meets a socket
 *   that does not exist (and is answered with RST by the pod's or the peer's kernel).
 * - Other protocols keep a CT_POLICY entry in shoal_ct per allowed flow (keyed from the
 *   pod's side), whose packets in either direction pass.
 * Traffic from the node's own addresses (probes, source-translated NodePort traffic)
 * always enters, as upstream; a pod reaching itself always passes. Non-first fragments
 * pass: without their first fragment (judged with the ports) they cannot be reassembled.
 * ICMP errors pass (conntrack's RELATED: they concern a flow already judged).
 *
 * The pod is found by its packets' address; from_pod drops a pod's packets with any other
 * source address first (shoal_ifaddrs), so no pod passes for another. */
#ifndef SHOAL_POLICY_H
#define SHOAL_POLICY_H

#include "maps.h"
#include "packet.h"
#include "conntrack.h"

struct pol_tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u8 icmp_type;
};

#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12

#define PARSE_PASS 1 /* not judged: not IPv4, a non-first fragment, or truncated */

/* Reads addresses, protocol and (TCP, UDP, SCTP) ports, with any IP header length. */
static __always_inline int parse_policy(struct __sk_buff *skb, struct pol_tuple *t)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return PARSE_PASS;
	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, IP_OFF, &ip, sizeof(ip)))
		return PARSE_PASS;
	if (ip.frag_off & bpf_htons(0x1fff))
		return PARSE_PASS;
	t->saddr = ip.saddr;
	t->daddr = ip.daddr;
	t->proto = ip.protocol;
	t->sport = 0;
	t->dport = 0;
	t->tcp_flags = 0;
	t->icmp_type = 0;
	__u32 l4 = IP_OFF + (ip.ihl & 0xf) * 4;
	if (ip.protocol == IPPROTO_ICMP && bpf_skb_load_bytes(skb, l4, &t->icmp_type, 1))
		return PARSE_PASS;
	if (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP || ip.protocol == 132) {
		__be16 ports[2];
		/* truncated: the stack drops it as malformed */
		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
			return PARSE_PASS;
		t->sport = ports[0];
		t->dport = ports[1];
		if (ip.protocol == IPPROTO_TCP && bpf_skb_load_bytes(skb, l4 + 13, &t->tcp_flags, 1))
			return PARSE_PASS;
	}
	return 0;
}

/* Whether a rule lets `peer` reach the pod (ingress) or the pod reach `peer` (egress) on
 * `proto`/`port` (the port of the side that accepted the flow). */
static __always_inline int policy_allows(const struct endpoint *ep, __be32 peer, __u8 dir,
					 __u8 proto, __be16 port)
{
	struct ipcache_key ik = { .prefixlen = 32, .addr = peer };
	struct ipcache_value *iv = bpf_map_lookup_elem(&shoal_ipcache, &ik);
	if (iv && dir == POL_INGRESS && (iv->flags & IPC_F_HOST))
		return 1;
	struct policy_key k = {
		.prefixlen = POLICY_FULL,
		.subject = ep->subject,
		.peer = iv ? iv->identity : ID_WORLD,
		.dir = dir,
		.proto = proto,
		.port = port,
	};
	if (bpf_map_lookup_elem(&shoal_policy, &k))
		return 1;
	k.peer = ID_ANY;
	return bpf_map_lookup_elem(&shoal_policy, &k) != NULL;
}

/* Judges a packet at a pod's interface: `dir` POL_EGRESS for one the pod sent (after
 * service translation), POL_INGRESS for one on its way into the pod. TC_ACT_OK or
 * TC_ACT_SHOT. */
static __always_inline int enforce(struct __sk_buff *skb, __u8 dir)
{
	struct pol_tuple t;
	if (parse_policy(skb, &t))
		return TC_ACT_OK;
	/* ICMP errors belong to a flow already judged (path MTU discovery needs "fragmentation
	 * needed" to reach an isolated pod): as conntrack's RELATED, they pass */
	if (t.proto == IPPROTO_ICMP && (t.icmp_type == ICMP_DEST_UNREACH ||
					t.icmp_type == ICMP_TIME_EXCEEDED || t.icmp_type == ICMP_PARAMETERPROB))
		return TC_ACT_OK;
	__be32 local = dir == POL_INGRESS ? t.daddr : t.saddr;
	__be32 peer = dir == POL_INGRESS ? t.saddr : t.daddr;
	struct endpoint *ep = bpf_map_lookup_elem(&shoal_endpoints, &local);
	if (!ep || !(ep->flags & (EP_F_INGRESS | EP_F_EGRESS)) || peer == local)
		return TC_ACT_OK;
	__u32 flags = ep->flags;
	__u32 isolated = dir == POL_INGRESS ? EP_F_INGRESS : EP_F_EGRESS;
	__u64 now = bpf_ktime_get_ns();
	struct ct_key ck = {
		.saddr = local,
		.daddr = peer,
		.sport = dir == POL_INGRESS ? t.dport : t.sport,
		.dport = dir == POL_INGRESS ? t.sport : t.dport,
		.proto = t.proto,
		.dir = CT_POLICY,
	};
	if (t.proto == IPPROTO_TCP) {
		if ((t.tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN)
			return TC_ACT_OK;
	} else {
		struct ct_entry *e = bpf_map_lookup_elem(&shoal_ct, &ck);
		if (e && e->expires > now) {
			ct_touch(e, t.proto, 0, now);
			return TC_ACT_OK;
		}
	}
	if (flags & isolated) {
		if (!policy_allows(ep, peer, dir, t.proto, t.dport)) {
			stat_inc(STAT_POLICY_DENIED);
			return TC_ACT_SHOT;
		}
		stat_inc(STAT_POLICY_ALLOWED);
	}
	/* replies of a non-TCP flow pass the other direction's isolation by this entry */
	if (t.proto != IPPROTO_TCP && (flags & ~isolated & (EP_F_INGRESS | EP_F_EGRESS))) {
		struct ct_entry e = { .flags = 0 };
		ct_touch(&e, t.proto, 0, now);
		if (bpf_map_update_elem(&shoal_ct, &ck, &e, BPF_ANY))
			stat_inc(STAT_CT_UPDATE_FAILED);
	}
	return TC_ACT_OK;
}

#endif
