/* Connection tracking of service flows: two entries per flow in shoal_ct, one keyed by
 * the client's tuple towards the service (CT_FORWARD, says which backend) and one keyed by
 * the backend's reply tuple (CT_REVERSE, says which service address to restore). */
#ifndef SHOAL_CONNTRACK_H
#define SHOAL_CONNTRACK_H

#include "maps.h"
#include "packet.h"

#define NSEC 1000000000ULL

/* Lifetimes, in seconds; user space may set them at load time. */
volatile const __u32 CT_TCP_SYN_TIMEOUT = 60;
volatile const __u32 CT_TCP_TIMEOUT = 21600;
volatile const __u32 CT_TCP_CLOSE_TIMEOUT = 10;
volatile const __u32 CT_UDP_TIMEOUT = 60;

/* Moves an entry along by the packet's TCP flags and pushes its expiry out. The entry is
 * written only when its state changes or its expiry moves by more than a second, so a
 * busy flow does not write its cache line on every packet. */
static __always_inline void ct_touch(struct ct_entry *e, __u8 proto, __u8 tcp_flags, __u64 now)
{
	__u16 flags = e->flags;
	__u64 timeout;
	if (proto != IPPROTO_TCP) {
		timeout = CT_UDP_TIMEOUT;
	} else {
		if (tcp_flags & (TCP_FIN | TCP_RST))
			flags |= CT_F_CLOSING;
		else if (tcp_flags & TCP_ACK)
			flags |= CT_F_ESTABLISHED;
		if (flags & CT_F_CLOSING)
			timeout = CT_TCP_CLOSE_TIMEOUT;
		else if (flags & CT_F_ESTABLISHED)
			timeout = CT_TCP_TIMEOUT;
		else
			timeout = CT_TCP_SYN_TIMEOUT;
	}
	__u64 expires = now + timeout * NSEC;
	if (flags != e->flags) {
		e->flags = flags;
		e->expires = expires;
	} else if (expires > e->expires + NSEC) {
		e->expires = expires;
	}
}

static __always_inline int is_syn_only(const struct tuple *t)
{
	return t->proto == IPPROTO_TCP && (t->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
}

/* A packet that may open a flow: a TCP SYN, or any UDP datagram. */
static __always_inline int is_syn_only_or_udp(const struct tuple *t)
{
	return t->proto == IPPROTO_UDP || is_syn_only(t);
}

/* The forward key of the flow a reverse entry belongs to. */
static __always_inline struct ct_key ct_forward_key(const struct ct_entry *rev, __u8 proto)
{
	struct ct_key k = {
		.saddr = rev->orig_addr,
		.daddr = rev->nat_addr,
		.sport = rev->orig_port,
		.dport = rev->nat_port,
		.proto = proto,
		.dir = CT_FORWARD,
	};
	return k;
}

#endif
