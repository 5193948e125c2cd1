/* Service translation on pod interfaces (tc, on the host side of each pod's veth).
 *
 * from_pod (ingress: packets the pod sends): a packet to a service frontend gets a backend
 * (ClientIP affinity, else random among the slots), a conntrack entry pair, and its
 * destination rewritten; later packets of the flow follow the forward entry. A frontend
 * without backends is answered with ICMP port unreachable. A pod that reaches itself
 * through its service (hairpin) gets its source rewritten to HAIRPIN_ADDR so that its
 * reply leaves the pod too; both directions are bounced straight back into the pod.
 *
 * to_pod (egress: packets delivered to the pod): a reply from a backend gets its source
 * rewritten back to the service address by the reverse entry, whichever node the backend
 * is on.
 *
 * Both judge network policy (lib/policy.h): from_pod after translation (egress, against
 * the backend), to_pod before reverse translation (ingress, from the real peer).
 *
 * from_net / to_net (ingress / egress of the node's uplink): traffic from outside the node
 * to a NodePort, ExternalIP or LoadBalancer frontend. As kube-proxy, the source is
 * rewritten to the node's address (NODE_ADDR, with a free port) unless the frontend keeps
 * to local endpoints (externalTrafficPolicy Local), which preserves the client's address;
 * replies to the node's address are reversed where they arrive (from a local pod in
 * from_pod, from another node in from_net), replies straight to the client in to_net. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/packet.h"
#include "lib/conntrack.h"
#include "lib/reject.h"
#include "lib/policy.h"

/* The source address of hairpin flows (0: hairpin is not translated). */
volatile const __be32 HAIRPIN_ADDR = 0;
/* The node's address: the source of translated traffic from outside (0: none). */
volatile const __be32 NODE_ADDR = 0;

static __always_inline int backend_matches(const struct backend *b, const struct ct_entry *e)
{
	return b && b->addr == e->nat_addr && b->port == e->nat_port;
}

/* Rewrites a client's packet towards its backend, and its source when the flow is
 * source-translated (hairpin: bounced back into the pod; from outside: routed on). */
static __always_inline int to_backend(struct __sk_buff *skb, const struct tuple *t,
				      const struct ct_entry *e)
{
	__be32 addr = e->nat_addr;
	__be16 port = e->nat_port;
	__be32 snat = e->orig_addr;
	__be16 snat_port = e->orig_port;
	__u16 flags = e->flags;
	stat_inc(STAT_TRANSLATED);
	if (set_addr(skb, t->proto, DADDR_OFF, t->daddr, addr) ||
	    set_port(skb, t->proto, DPORT_OFF, t->dport, port))
		return TC_ACT_SHOT;
	if (!snat)
		return TC_ACT_OK;
	if (set_addr(skb, t->proto, SADDR_OFF, t->saddr, snat))
		return TC_ACT_SHOT;
	if (snat_port && set_port(skb, t->proto, SPORT_OFF, t->sport, snat_port))
		return TC_ACT_SHOT;
	return (flags & CT_F_HAIRPIN) ? bounce(skb) : route_out(skb, t, snat, addr);
}

/* Rewrites a backend's reply so that it comes from the service address. */
static __always_inline int from_backend(struct __sk_buff *skb, const struct tuple *t,
					struct ct_entry *e, __u64 now)
{
	__be32 svc_addr = e->nat_addr;
	__be16 svc_port = e->nat_port;
	__be32 client = e->orig_addr;
	__be16 client_port = e->orig_port;
	__u16 flags = e->flags;
	ct_touch(e, t->proto, t->tcp_flags, now);
	if (t->tcp_flags & (TCP_FIN | TCP_RST)) {
		/* a closing flow: a new SYN from the same client port must choose afresh */
		struct ct_key fk = ct_forward_key(e, t->proto);
		struct ct_entry *fwd = bpf_map_lookup_elem(&shoal_ct, &fk);
		if (fwd)
			ct_touch(fwd, t->proto, t->tcp_flags, now);
	}
	stat_inc(STAT_REVERSED);
	if (set_addr(skb, t->proto, SADDR_OFF, t->saddr, svc_addr) ||
	    set_port(skb, t->proto, SPORT_OFF, t->sport, svc_port))
		return TC_ACT_SHOT;
	if (!(flags & (CT_F_HAIRPIN | CT_F_SNAT)))
		return TC_ACT_OK;
	if (set_addr(skb, t->proto, DADDR_OFF, t->daddr, client) ||
	    set_port(skb, t->proto, DPORT_OFF, t->dport, client_port))
		return TC_ACT_SHOT;
	return (flags & CT_F_HAIRPIN) ? bounce(skb) : route_out(skb, t, svc_addr, client);
}

/* The reverse entry of a reply, or NULL. An expired one is revived while its forward
 * entry lives (a UDP stream whose replies are rare). */
static __always_inline struct ct_entry *reverse_entry(const struct tuple *t, __u64 now)
{
	struct ct_key k = {
		.saddr = t->saddr,
		.daddr = t->daddr,
		.sport = t->sport,
		.dport = t->dport,
		.proto = t->proto,
		.dir = CT_REVERSE,
	};
	struct ct_entry *e = bpf_map_lookup_elem(&shoal_ct, &k);
	if (!e || e->expires > now)
		return e;
	struct ct_key fk = ct_forward_key(e, t->proto);
	struct ct_entry *fwd = bpf_map_lookup_elem(&shoal_ct, &fk);
	/* only while the forward entry lives and still points at this backend */
	if (!fwd || fwd->expires <= now || fwd->nat_addr != t->saddr || fwd->nat_port != t->sport)
		return NULL;
	return e;
}

/* Chooses a backend for a new flow of the service whose master entry is `svc`. */
/* A hash of the flow's tuple (murmur3's finalizer over its words): the same on every
 * node, so that Maglev sends a flow to the same backend wherever it arrives. */
static __always_inline __u32 flow_hash(const struct tuple *t)
{
	__u32 h = t->saddr * 0x9e3779b1u;
	h ^= t->daddr + 0x7f4a7c15u + (h << 6) + (h >> 2);
	h ^= (((__u32)t->sport << 16) | t->dport) + 0x7f4a7c15u + (h << 6) + (h >> 2);
	h ^= t->proto;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

static __always_inline struct backend *choose(struct svc_key *sk, const struct svc_value *svc,
					      const struct tuple *t, __u64 now, __u32 *backend_id)
{
	__be32 client = t->saddr;
	__u32 now_s = now / NSEC;
	struct affinity_key ak = { .svc_id = svc->svc_id, .client = client };
	if (svc->affinity_timeout) {
		struct affinity_value *a = bpf_map_lookup_elem(&shoal_affinity, &ak);
		if (a && now_s - a->last_used <= svc->affinity_timeout) {
			__u32 id = a->backend_id;
			struct backend *b = bpf_map_lookup_elem(&shoal_backends, &id);
			/* still this endpoint, and one that takes new flows */
			if (b && b->addr == a->addr && b->port == a->port &&
			    !(b->flags & BACKEND_F_NO_SLOT)) {
				a->last_used = now_s;
				*backend_id = id;
				return b;
			}
		}
	}
	__u32 id;
	if (svc->flags & SVC_F_MAGLEV) {
		__u32 at = svc->backend_id * MAGLEV_M + flow_hash(t) % MAGLEV_M;
		__u32 *entry = bpf_map_lookup_elem(&shoal_maglev, &at);
		if (!entry)
			return NULL;
		id = *entry;
	} else {
		sk->slot = (bpf_get_prandom_u32() % svc->count) + 1;
		struct svc_value *slot = bpf_map_lookup_elem(&shoal_services, sk);
		if (!slot)
			return NULL;
		id = slot->backend_id;
	}
	struct backend *b = bpf_map_lookup_elem(&shoal_backends, &id);
	if (!b)
		return NULL;
	if (svc->affinity_timeout) {
		struct affinity_value av = {
			.backend_id = id, .last_used = now_s, .addr = b->addr, .port = b->port
		};
		bpf_map_update_elem(&shoal_affinity, &ak, &av, BPF_ANY);
	}
	*backend_id = id;
	return b;
}

/* A source port for a flow from outside translated to NODE_ADDR: the client's own when
 * no other flow to that backend holds it, else one of a few pseudo-random ones in
 * 61000-65535. */
static __always_inline __be16 snat_port(const struct tuple *t, const struct backend *b)
{
	struct ct_key rk = {
		.saddr = b->addr,
		.daddr = NODE_ADDR,
		.sport = b->port,
		.dport = t->sport,
		.proto = t->proto,
		.dir = CT_REVERSE,
	};
#pragma unroll
	for (int i = 0; i < 8; i++) {
		struct ct_entry *taken = bpf_map_lookup_elem(&shoal_ct, &rk);
		if (!taken || (taken->orig_addr == t->saddr && taken->orig_port == t->sport))
			return rk.dport;
		/* above Linux's ephemeral range (32768-60999): the node's own connections
		 * never hold these ports */
		rk.dport = bpf_htons(61000 + (bpf_get_prandom_u32() % 4536));
	}
	return 0;
}

/* A pod opens a connection straight to an address (socket-level translation connects to
 * backends this way): a reverse entry of an earlier translated flow with the same ports
 * would take this connection's SYN-ACK for its own and rewrite it to the service. Such an
 * entry is dropped unless its flow still lives and still goes to this backend. */
static __always_inline void drop_stale_reverse(const struct tuple *t, __u64 now)
{
	struct ct_key rk = {
		.saddr = t->daddr,
		.daddr = t->saddr,
		.sport = t->dport,
		.dport = t->sport,
		.proto = t->proto,
		.dir = CT_REVERSE,
	};
	struct ct_entry *rev = bpf_map_lookup_elem(&shoal_ct, &rk);
	if (!rev)
		return;
	struct ct_key fk = ct_forward_key(rev, t->proto);
	struct ct_entry *fwd = bpf_map_lookup_elem(&shoal_ct, &fk);
	if (fwd && fwd->expires > now && !(fwd->flags & CT_F_CLOSING) && fwd->nat_addr == t->daddr &&
	    fwd->nat_port == t->dport)
		return;
	bpf_map_delete_elem(&shoal_ct, &rk);
}

/* Writes the conntrack entries of a new flow of service port `svc_id` to backend `b`
 * (its source translated to `snat`:`sport` when set); returns the forward entry. */
static __always_inline struct ct_entry record_flow(const struct tuple *t, __u32 svc_id,
						  const struct backend *b, __u32 backend_id,
						  __be32 snat, __be16 sport, __u16 flags, __u64 now)
{
	struct ct_entry fwd = {
		.nat_addr = b->addr,
		.nat_port = b->port,
		.flags = flags,
		.orig_addr = snat,
		.orig_port = sport,
		.backend_id = backend_id,
		.svc_id = svc_id,
	};
	ct_touch(&fwd, t->proto, t->tcp_flags, now);
	struct ct_entry rev = {
		.expires = fwd.expires,
		.nat_addr = t->daddr,
		.nat_port = t->dport,
		.flags = fwd.flags,
		.orig_addr = t->saddr,
		.orig_port = t->sport,
		.backend_id = backend_id,
		.svc_id = svc_id,
	};
	struct ct_key fk = {
		.saddr = t->saddr,
		.daddr = t->daddr,
		.sport = t->sport,
		.dport = t->dport,
		.proto = t->proto,
		.dir = CT_FORWARD,
	};
	struct ct_key rk = {
		.saddr = b->addr,
		.daddr = snat ? snat : t->saddr,
		.sport = b->port,
		.dport = sport ? sport : t->sport,
		.proto = t->proto,
		.dir = CT_REVERSE,
	};
	filter_set(&shoal_natted, b->addr);
	if (bpf_map_update_elem(&shoal_ct, &rk, &rev, BPF_ANY) ||
	    bpf_map_update_elem(&shoal_ct, &fk, &fwd, BPF_ANY))
		stat_inc(STAT_CT_UPDATE_FAILED);
	stat_inc(STAT_CT_CREATED);
	return fwd;
}

/* A new flow to a service frontend; `outside`: it came in on the uplink. */
static __always_inline int new_flow(struct __sk_buff *skb, const struct tuple *t, __u64 now,
				    int outside)
{
	struct svc_key sk = { .addr = t->daddr, .port = t->dport, .proto = t->proto };
	/* (forward() only calls here for an address the frontend filter holds) */
	struct svc_value *svc = bpf_map_lookup_elem(&shoal_services, &sk);
	if (!svc) {
		if (!outside && is_syn_only(t) && filter_has(&shoal_natted, t->daddr))
			drop_stale_reverse(t, now);
		return TC_ACT_OK;
	}
	/* from outside only NodePorts, ExternalIPs and LoadBalancer IPs answer */
	if (outside && !(svc->flags & (SVC_F_NODEPORT | SVC_F_EXTERNAL)))
		return TC_ACT_OK;
	if (svc->count == 0) {
		stat_inc(STAT_REJECTED);
		return reject(skb, t);
	}
	__u32 backend_id = 0;
	struct backend *b = choose(&sk, svc, t, now, &backend_id);
	if (!b) {
		stat_inc(STAT_NO_SLOT);
		return TC_ACT_SHOT;
	}
	__be32 snat = 0;
	__be16 sport = 0;
	__u16 flags = 0;
	if (outside && NODE_ADDR && !(svc->flags & SVC_F_LOCAL)) {
		snat = NODE_ADDR;
		sport = snat_port(t, b);
		if (!sport) {
			stat_inc(STAT_CT_UPDATE_FAILED);
			return TC_ACT_SHOT;
		}
		flags = CT_F_SNAT;
	} else if (!outside && b->addr == t->saddr && HAIRPIN_ADDR) {
		snat = HAIRPIN_ADDR;
		flags = CT_F_HAIRPIN;
	}
	struct ct_entry fwd = record_flow(t, svc->svc_id, b, backend_id, snat, sport, flags, now);
	return to_backend(skb, t, &fwd);
}

/* Forward path shared by pods and the uplink: an existing flow, a reply addressed to a
 * translated source (hairpin or the node's address), or a new flow. Traffic to an address
 * that is no frontend (the shoal_frontends filter) leaves after two small lookups. */
static __always_inline int forward(struct __sk_buff *skb, struct tuple *t, int outside)
{
	if (!filter_has(&shoal_frontends, t->daddr)) {
		if ((HAIRPIN_ADDR && t->daddr == HAIRPIN_ADDR) || (NODE_ADDR && t->daddr == NODE_ADDR)) {
			__u64 now = bpf_ktime_get_ns();
			struct ct_entry *rev = reverse_entry(t, now);
			if (rev)
				return from_backend(skb, t, rev, now);
		} else if (!outside && is_syn_only(t) && filter_has(&shoal_natted, t->daddr)) {
			drop_stale_reverse(t, bpf_ktime_get_ns());
		}
		return TC_ACT_OK;
	}
	__u64 now = bpf_ktime_get_ns();
	struct ct_key k = {
		.saddr = t->saddr,
		.daddr = t->daddr,
		.sport = t->sport,
		.dport = t->dport,
		.proto = t->proto,
		.dir = CT_FORWARD,
	};
	struct ct_entry *e = bpf_map_lookup_elem(&shoal_ct, &k);
	if (e) {
		/* a live flow keeps its backend while that backend exists; a new SYN on a
		 * closed flow's port, or a vanished backend, chooses afresh */
		if (e->expires > now && !(is_syn_only(t) && (e->flags & CT_F_CLOSING))) {
			__u32 id = e->backend_id;
			struct backend *b = bpf_map_lookup_elem(&shoal_backends, &id);
			if (backend_matches(b, e)) {
				ct_touch(e, t->proto, t->tcp_flags, now);
				return to_backend(skb, t, e);
			}
		}
	} else if ((HAIRPIN_ADDR && t->daddr == HAIRPIN_ADDR) || (NODE_ADDR && t->daddr == NODE_ADDR)) {
		struct ct_entry *rev = reverse_entry(t, now);
		if (rev)
			return from_backend(skb, t, rev, now);
	}
	return new_flow(skb, t, now, outside);
}

/* Whether an IPv4 packet from a pod carries a source address other than the pod's. */
static __always_inline int spoofed(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	__be32 *own = bpf_map_lookup_elem(&shoal_ifaddrs, &ifindex);
	if (!own || skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	__be32 saddr;
	if (bpf_skb_load_bytes(skb, SADDR_OFF, &saddr, sizeof(saddr)))
		return 0;
	return saddr != *own;
}

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	if (spoofed(skb)) {
		stat_inc(STAT_SPOOFED);
		return TC_ACT_SHOT;
	}
	struct tuple t;
	if (parse_tuple(skb, &t))
		return enforce(skb, POL_EGRESS); /* not TCP/UDP over plain IPv4: policy only */
	int act = forward(skb, &t, 0);
	if (act != TC_ACT_OK)
		return act; /* dropped, or bounced back into the pod (hairpin, reject) */
	/* the source is the pod's still (only bounced or routed flows change it) */
	if (!bpf_map_lookup_elem(&shoal_endpoints, &t.saddr))
		return TC_ACT_OK;
	return enforce(skb, POL_EGRESS);
}

SEC("classifier")
int from_net(struct __sk_buff *skb)
{
	struct tuple t;
	if (parse_tuple(skb, &t))
		return TC_ACT_OK;
	return forward(skb, &t, 1);
}

/* Reverse path shared by pods and the uplink. */
static __always_inline int reverse(struct __sk_buff *skb, const struct tuple *t)
{
	/* reverse entries are keyed by a backend address that had a translated flow */
	if (!filter_has(&shoal_natted, t->saddr))
		return TC_ACT_OK;
	__u64 now = bpf_ktime_get_ns();
	struct ct_entry *rev = reverse_entry(t, now);
	if (!rev)
		return TC_ACT_OK;
	return from_backend(skb, t, rev, now);
}

SEC("classifier")
int to_pod(struct __sk_buff *skb)
{
	struct tuple t;
	if (parse_tuple(skb, &t))
		return skb->mark == BOUNCE_MARK ? TC_ACT_OK : enforce(skb, POL_INGRESS);
	if (skb->mark != BOUNCE_MARK && bpf_map_lookup_elem(&shoal_endpoints, &t.daddr) &&
	    enforce(skb, POL_INGRESS) != TC_ACT_OK)
		return TC_ACT_SHOT;
	return reverse(skb, &t);
}

/* Replies leaving through the uplink straight to an outside client (a local endpoint of
 * a frontend that keeps the client's address) are reversed as into a pod. */
SEC("classifier")
int to_net(struct __sk_buff *skb)
{
	struct tuple t;
	if (parse_tuple(skb, &t))
		return TC_ACT_OK;
	return reverse(skb, &t);
}

/* --- XDP on the uplink ---------------------------------------------------------------
 *
 * xdp_net sees traffic from outside before the kernel builds an skb. A packet to a NodePort,
 * ExternalIP or LoadBalancer frontend whose backend is on another node (the route to it
 * leaves through the uplink again) is translated here, source to the node's address as in
 * from_net, and sent straight back out (XDP_TX); so are that backend's replies, back to the
 * client. Everything else passes to the stack and the tc programs unchanged: local
 * backends (the pod's veth is not reachable from XDP without costing pods GSO),
 * externalTrafficPolicy Local, rejects, and whatever the program is unsure of. It shares
 * conntrack with the tc programs, so a flow may move between them. */

struct xdp_pkt {
	struct ethhdr *eth;
	struct iphdr *ip;
	__be16 *ports; /* source, destination */
	__sum16 *l4csum; /* NULL: UDP without checksum */
};

static __always_inline int xdp_parse(struct xdp_md *ctx, struct tuple *t, struct xdp_pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || (ip->frag_off & bpf_htons(IP_MF_OFFSET)))
		return -1;
	t->saddr = ip->saddr;
	t->daddr = ip->daddr;
	t->proto = ip->protocol;
	t->tcp_flags = 0;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > end)
			return -1;
		t->tcp_flags = ((__u8 *)tcp)[13];
		p->l4csum = &tcp->check;
		p->ports = (__be16 *)tcp;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > end)
			return -1;
		p->l4csum = udp->check ? &udp->check : 0;
		p->ports = (__be16 *)udp;
	} else {
		return -1;
	}
	t->sport = p->ports[0];
	t->dport = p->ports[1];
	p->eth = eth;
	p->ip = ip;
	return 0;
}

/* Incremental checksum updates (RFC 1624), on the words as they sit in the packet. */
static __always_inline __sum16 csum_swap16(__sum16 check, __u16 old, __u16 new)
{
	__u32 sum = (__u16)~check;
	sum += (__u16)~old;
	sum += new;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__sum16)~sum;
}

static __always_inline __sum16 csum_swap32(__sum16 check, __u32 old, __u32 new)
{
	check = csum_swap16(check, old & 0xffff, new & 0xffff);
	return csum_swap16(check, old >> 16, new >> 16);
}

/* Rewrites addresses and ports, fixes both checksums and takes one from the TTL. */
static __always_inline void xdp_rewrite(struct xdp_pkt *p, __u8 proto, __be32 saddr, __be16 sport,
					__be32 daddr, __be16 dport)
{
	struct iphdr *ip = p->ip;
	__sum16 ic = ip->check;
	ic = csum_swap32(ic, ip->saddr, saddr);
	ic = csum_swap32(ic, ip->daddr, daddr);
	__u16 *ttl_word = (__u16 *)&ip->ttl;
	__u16 old_ttl = *ttl_word;
	ip->ttl -= 1;
	ic = csum_swap16(ic, old_ttl, *ttl_word);
	ip->check = ic;
	if (p->l4csum) {
		__sum16 c = *p->l4csum;
		c = csum_swap32(c, ip->saddr, saddr);
		c = csum_swap32(c, ip->daddr, daddr);
		c = csum_swap16(c, p->ports[0], sport);
		c = csum_swap16(c, p->ports[1], dport);
		if (proto == IPPROTO_UDP && c == 0)
			c = 0xffff;
		*p->l4csum = c;
	}
	ip->saddr = saddr;
	ip->daddr = daddr;
	p->ports[0] = sport;
	p->ports[1] = dport;
}

/* When the route from `saddr` to `daddr` leaves through the interface the packet came in
 * on: its next hop's Ethernet addresses written, 1. Else 0 (the stack takes it). */
static __always_inline int xdp_next_hop(struct xdp_md *ctx, struct xdp_pkt *p, __u8 proto,
					__be32 saddr, __be32 daddr)
{
	struct bpf_fib_lookup f = {};
	f.family = 2; /* AF_INET */
	f.l4_protocol = proto;
	f.ipv4_src = saddr;
	f.ipv4_dst = daddr;
	f.tot_len = bpf_ntohs(p->ip->tot_len);
	f.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &f, sizeof(f), 0) != BPF_FIB_LKUP_RET_SUCCESS ||
	    f.ifindex != ctx->ingress_ifindex)
		return 0;
	__builtin_memcpy(p->eth->h_source, f.smac, ETH_ALEN);
	__builtin_memcpy(p->eth->h_dest, f.dmac, ETH_ALEN);
	return 1;
}

/* A reply of another node's backend to a source-translated flow, back to the client. */
static __always_inline int xdp_reply(struct xdp_md *ctx, const struct tuple *t,
				     struct xdp_pkt *p, __u64 now)
{
	struct ct_entry *rev = reverse_entry(t, now);
	if (!rev || !(rev->flags & CT_F_SNAT))
		return XDP_PASS;
	__be32 svc_addr = rev->nat_addr;
	__be16 svc_port = rev->nat_port;
	__be32 client = rev->orig_addr;
	__be16 client_port = rev->orig_port;
	if (!xdp_next_hop(ctx, p, t->proto, svc_addr, client))
		return XDP_PASS;
	ct_touch(rev, t->proto, t->tcp_flags, now);
	if (t->tcp_flags & (TCP_FIN | TCP_RST)) {
		struct ct_key fk = ct_forward_key(rev, t->proto);
		struct ct_entry *fe = bpf_map_lookup_elem(&shoal_ct, &fk);
		if (fe)
			ct_touch(fe, t->proto, t->tcp_flags, now);
	}
	xdp_rewrite(p, t->proto, svc_addr, svc_port, client, client_port);
	stat_inc(STAT_XDP_TX);
	return XDP_TX;
}

SEC("xdp")
int xdp_net(struct xdp_md *ctx)
{
	struct tuple t;
	struct xdp_pkt p;
	if (!NODE_ADDR || xdp_parse(ctx, &t, &p) || p.ip->ttl <= 1)
		return XDP_PASS;
	if (filter_has(&shoal_frontends, t.daddr)) {
		__u64 now = bpf_ktime_get_ns();
		struct ct_key k = {
			.saddr = t.saddr,
			.daddr = t.daddr,
			.sport = t.sport,
			.dport = t.dport,
			.proto = t.proto,
			.dir = CT_FORWARD,
		};
		struct ct_entry *e = bpf_map_lookup_elem(&shoal_ct, &k);
		if (e) {
			/* a live source-translated flow whose backend stands; else tc decides */
			if (e->expires <= now || !(e->flags & CT_F_SNAT) ||
			    (is_syn_only(&t) && (e->flags & CT_F_CLOSING)))
				return XDP_PASS;
			__u32 id = e->backend_id;
			struct backend *b = bpf_map_lookup_elem(&shoal_backends, &id);
			if (!backend_matches(b, e) ||
			    !xdp_next_hop(ctx, &p, t.proto, e->orig_addr, e->nat_addr))
				return XDP_PASS;
			ct_touch(e, t.proto, t.tcp_flags, now);
			xdp_rewrite(&p, t.proto, e->orig_addr, e->orig_port, e->nat_addr, e->nat_port);
			stat_inc(STAT_XDP_TX);
			return XDP_TX;
		}
		/* the node's address is a NodePort frontend too: a reply to a translated source
		 * port comes first (as in forward()) */
		if (t.daddr == NODE_ADDR && filter_has(&shoal_natted, t.saddr) && reverse_entry(&t, now))
			return xdp_reply(ctx, &t, &p, now);
		struct svc_key sk = { .addr = t.daddr, .port = t.dport, .proto = t.proto };
		struct svc_value *svc = bpf_map_lookup_elem(&shoal_services, &sk);
		if (!svc || !(svc->flags & (SVC_F_NODEPORT | SVC_F_EXTERNAL)) ||
		    (svc->flags & SVC_F_LOCAL) || svc->count == 0 || !is_syn_only_or_udp(&t))
			return XDP_PASS;
		__u32 backend_id = 0;
		struct backend *b = choose(&sk, svc, &t, now, &backend_id);
		if (!b)
			return XDP_PASS;
		/* the port first: the next hop lookup writes the packet's MACs */
		__be16 sport = snat_port(&t, b);
		if (!sport || !xdp_next_hop(ctx, &p, t.proto, NODE_ADDR, b->addr))
			return XDP_PASS;
		struct ct_entry fwd = record_flow(&t, svc->svc_id, b, backend_id, NODE_ADDR, sport, CT_F_SNAT, now);
		xdp_rewrite(&p, t.proto, NODE_ADDR, sport, fwd.nat_addr, fwd.nat_port);
		stat_inc(STAT_XDP_TX);
		return XDP_TX;
	}
	if (t.daddr == NODE_ADDR && filter_has(&shoal_natted, t.saddr))
		return xdp_reply(ctx, &t, &p, bpf_ktime_get_ns());
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
