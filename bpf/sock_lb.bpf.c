/* Socket-level translation for pods' TCP connections to ClusterIP services.
 *
 * cgroup/connect4 runs in connect() of every process in the pods' cgroup: a TCP socket
 * connecting to a ClusterIP frontend is connected to a backend instead (random slot,
 * ready backends only). Its packets then carry the backend's address from the first SYN:
 * no conntrack entries, no per-packet rewriting in the tc programs (which still judge
 * network policy against that backend, and still translate everything this program
 * leaves alone). cgroup/getpeername4 gives the socket its service address back;
 * cgroup/sock_release forgets the socket.
 *
 * Left to the tc programs: UDP, services with ClientIP affinity or Maglev (their choice
 * depends on the client's address and tuple, which connect() does not know yet), NodePort,
 * ExternalIP and LoadBalancer frontends, and services without endpoints (rejected with
 * ICMP there, so connect() fails with ECONNREFUSED as with kube-proxy). Without this
 * program (not attached, an older kernel) everything is translated by tc. */
#include <linux/bpf.h>
#include <linux/in.h>
#define SOCK_STREAM 1 /* <sys/socket.h> does not build for the BPF target */
#include <bpf/bpf_helpers.h>

#include "lib/common.h"
#include "lib/maps.h"

/* Socket cookie -> what the socket was connected to instead, for getpeername(); removed
 * when the socket is released. A preallocated hash: measured 3x cheaper per connect() than
 * socket storage (1,040 -> ~300 ns), whose allocation dominated the program. When it is
 * full, connect() is left to the tc programs. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct sock_lb);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME); /* sockets outlive an agent restart */
} shoal_sock_lb SEC(".maps");

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP ||
	    !filter_has(&shoal_frontends, ctx->user_ip4))
		return 1;
	struct svc_key sk = {
		.addr = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
		.proto = IPPROTO_TCP,
	};
	struct svc_value *svc = bpf_map_lookup_elem(&shoal_services, &sk);
	if (!svc || svc->count == 0 || svc->flags || svc->affinity_timeout)
		return 1;
	sk.slot = (bpf_get_prandom_u32() % svc->count) + 1;
	struct svc_value *slot = bpf_map_lookup_elem(&shoal_services, &sk);
	if (!slot)
		return 1;
	__u32 id = slot->backend_id;
	struct backend *b = bpf_map_lookup_elem(&shoal_backends, &id);
	if (!b || (b->flags & BACKEND_F_NO_SLOT))
		return 1;
	struct sock_lb st = {
		.svc_addr = ctx->user_ip4,
		.svc_port = (__be16)ctx->user_port,
		.backend_addr = b->addr,
		.backend_port = b->port,
	};
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&shoal_sock_lb, &cookie, &st, BPF_ANY))
		return 1;
	ctx->user_ip4 = b->addr;
	ctx->user_port = (__u32)b->port;
	stat_inc(STAT_SOCK_TRANSLATED);
	return 1;
}

SEC("cgroup/getpeername4")
int sock_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct sock_lb *st = bpf_map_lookup_elem(&shoal_sock_lb, &cookie);
	if (st && st->backend_addr == ctx->user_ip4 && st->backend_port == (__be16)ctx->user_port) {
		ctx->user_ip4 = st->svc_addr;
		ctx->user_port = (__u32)st->svc_port;
	}
	return 1;
}

SEC("cgroup/sock_release")
int sock_release(struct bpf_sock *sk)
{
	if (sk->protocol != IPPROTO_TCP)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(sk);
	bpf_map_delete_elem(&shoal_sock_lb, &cookie);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
