/* Socket-level translation for pods' TCP and UDP traffic to ClusterIP services.
 *
 * These run in the socket calls of every process in the pods' cgroup:
 * - cgroup/connect4: a TCP or UDP socket connecting to a ClusterIP frontend is connected
 *   to a backend instead (random slot, ready backends only). Its packets carry the
 *   backend's address from the first one: no conntrack entries, no per-packet rewriting
 *   in the tc programs (which still judge network policy against that backend).
 * - cgroup/sendmsg4: a datagram sent with sendto() to a ClusterIP goes to a backend; the
 *   socket keeps that backend for the service while it lives and the backend stands (as
 *   conntrack keeps a UDP flow on one backend).
 * - cgroup/recvmsg4 and cgroup/getpeername4: a datagram from that backend, and the peer
 *   of a connected socket, read as the service address (resolvers check where an answer
 *   came from).
 * - cgroup/sock_release forgets the socket.
 *
 * Left to the tc programs: services with ClientIP affinity or Maglev (their choice depends
 * on the client's address and tuple, which the socket calls do not know yet), NodePort,
 * ExternalIP and LoadBalancer frontends, and services without endpoints (rejected with
 * ICMP there, so connect() fails with ECONNREFUSED as with kube-proxy). Without these
 * programs (not attached, an older kernel) everything is translated by tc. */
#include <linux/bpf.h>
#include <linux/in.h>
/* <sys/socket.h> does not build for the BPF target */
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#include <bpf/bpf_helpers.h>

#include "lib/common.h"
#include "lib/maps.h"

/* Socket cookie -> the service it reached and the backend it was sent to instead (the
 * last one, for an unconnected UDP socket); removed when the socket is released. When it
 * is full, the socket is left to the tc programs. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct sock_lb);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME); /* sockets outlive an agent restart */
} shoal_sock_lb SEC(".maps");

/* The protocol of a socket this translates, else 0. */
static __always_inline __u8 sock_proto(const struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP)
		return IPPROTO_TCP;
	if (ctx->type == SOCK_DGRAM && ctx->protocol == IPPROTO_UDP)
		return IPPROTO_UDP;
	return 0;
}

/* Sends the socket's destination (a ClusterIP frontend) to a backend; `sticky`: keep the
 * backend this socket had for the same service while it stands. */
static __always_inline void translate(struct bpf_sock_addr *ctx, int sticky)
{
	__u8 proto = sock_proto(ctx);
	if (!proto || !filter_has(&shoal_frontends, ctx->user_ip4))
		return;
	struct svc_key sk = {
		.addr = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
		.proto = proto,
	};
	struct svc_value *svc = bpf_map_lookup_elem(&shoal_services, &sk);
	if (!svc || svc->count == 0 || svc->flags || svc->affinity_timeout)
		return;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (sticky) {
		struct sock_lb *had = bpf_map_lookup_elem(&shoal_sock_lb, &cookie);
		if (had && had->svc_addr == sk.addr && had->svc_port == sk.port) {
			/* still a backend of the service, taking new traffic? */
			__be32 addr = had->backend_addr;
			__be16 port = had->backend_port;
			__u16 count = svc->count;
			for (__u16 slot = 1; slot <= 64 && slot <= count; slot++) {
				sk.slot = slot;
				struct svc_value *v = bpf_map_lookup_elem(&shoal_services, &sk);
				if (!v)
					break;
				__u32 id = v->backend_id;
				struct backend *b = bpf_map_lookup_elem(&shoal_backends, &id);
				if (b && b->addr == addr && b->port == port && !(b->flags & BACKEND_F_NO_SLOT)) {
					ctx->user_ip4 = addr;
					ctx->user_port = (__u32)port;
					stat_inc(STAT_SOCK_TRANSLATED);
					return;
				}
			}
		}
	}
	sk.slot = (bpf_get_prandom_u32() % svc->count) + 1;
	struct svc_value *slot = bpf_map_lookup_elem(&shoal_services, &sk);
	if (!slot)
		return;
	__u32 id = slot->backend_id;
	struct backend *b = bpf_map_lookup_elem(&shoal_backends, &id);
	if (!b || (b->flags & BACKEND_F_NO_SLOT))
		return;
	struct sock_lb st = {
		.svc_addr = ctx->user_ip4,
		.svc_port = (__be16)ctx->user_port,
		.backend_addr = b->addr,
		.backend_port = b->port,
	};
	if (bpf_map_update_elem(&shoal_sock_lb, &cookie, &st, BPF_ANY))
		return;
	ctx->user_ip4 = b->addr;
	ctx->user_port = (__u32)b->port;
	stat_inc(STAT_SOCK_TRANSLATED);
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	translate(ctx, 0);
	return 1;
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	translate(ctx, 1);
	return 1;
}

/* The backend's address as the service's, where the socket was sent there. */
static __always_inline void untranslate(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct sock_lb *st = bpf_map_lookup_elem(&shoal_sock_lb, &cookie);
	if (st && st->backend_addr == ctx->user_ip4 && st->backend_port == (__be16)ctx->user_port) {
		ctx->user_ip4 = st->svc_addr;
		ctx->user_port = (__u32)st->svc_port;
	}
}

SEC("cgroup/getpeername4")
int sock_getpeername4(struct bpf_sock_addr *ctx)
{
	untranslate(ctx);
	return 1;
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	untranslate(ctx);
	return 1;
}

SEC("cgroup/sock_release")
int sock_release(struct bpf_sock *sk)
{
	if (sk->protocol != IPPROTO_TCP && sk->protocol != IPPROTO_UDP)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(sk);
	bpf_map_delete_elem(&shoal_sock_lb, &cookie);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
