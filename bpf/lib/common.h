/* Structs and constants shared by the BPF programs and `dataplane/` (Rust).
 *
 * Every struct here is mirrored by a #[repr(C)] type in dataplane/src/abi.rs; the test
 * `abi_matches_the_programs_btf` compares sizes and member offsets with this file's BTF,
 * so a change on one side that is not made on the other fails the build's tests.
 * Addresses and ports are in network byte order everywhere. */
#ifndef SHOAL_COMMON_H
#define SHOAL_COMMON_H

#include <linux/types.h>

/* One frontend of a service: an address (ClusterIP, ExternalIP, LoadBalancer IP or a
 * node address for a NodePort), a port and a protocol. Slot 0 is the service's master
 * entry (how many backends, flags); slots 1..=count name its backends. */
struct svc_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
	__u16 slot;
	__u16 pad2;
};

#define SVC_F_NODEPORT 0x1 /* the frontend is a node address (NodePort) */
#define SVC_F_EXTERNAL 0x2 /* ExternalIP or LoadBalancer address */
#define SVC_F_LOCAL 0x4    /* external traffic keeps to local endpoints: no source NAT */
#define SVC_F_MAGLEV 0x8   /* backends by Maglev table; slot 0's backend_id is the table */

/* Maglev: each table has MAGLEV_M entries (a prime) in shoal_maglev, table t at
 * [t * MAGLEV_M, (t + 1) * MAGLEV_M), each entry a backend id. */
#define MAGLEV_M 1021
#define MAGLEV_TABLES 512

struct svc_value {
	__u32 backend_id;       /* slot > 0: the backend in this slot; slot 0: Maglev table */
	__u32 svc_id;           /* the service port this frontend belongs to */
	__u16 count;            /* slot 0: number of backend slots; 0 = reject */
	__u16 flags;            /* SVC_F_* */
	__u32 affinity_timeout; /* seconds of ClientIP affinity; 0 = none */
};

#define BACKEND_F_TERMINATING 0x1 /* serving but terminating: kept for its flows */
#define BACKEND_F_NO_SLOT 0x2     /* holds no slot (not ready): existing flows only */

struct backend {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 flags; /* BACKEND_F_* */
};

#define CT_FORWARD 0 /* key is the client's tuple towards the service address */
#define CT_REVERSE 1 /* key is the backend's reply tuple */
#define CT_POLICY 2  /* a non-TCP flow a policy allowed: saddr/sport the local pod's */

struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

#define CT_F_ESTABLISHED 0x1
#define CT_F_CLOSING 0x2 /* FIN or RST seen */
#define CT_F_HAIRPIN 0x4 /* the client is its own backend: the source is rewritten too */
#define CT_F_SNAT 0x8    /* from outside the node: the source is rewritten to NODE_ADDR */

struct ct_entry {
	__u64 expires;    /* bpf_ktime_get_ns() after which the entry is dead */
	__be32 nat_addr;  /* forward: backend address; reverse: service address */
	__be16 nat_port;  /* forward: backend port; reverse: service port */
	__u16 flags;      /* CT_F_* */
	__be32 orig_addr; /* forward: translated source (0: none); reverse: the client's address */
	__be16 orig_port; /* forward: translated source port (0: kept); reverse: the client's port */
	__u16 pad;
	__u32 backend_id;
	__u32 svc_id;
};

struct affinity_key {
	__u32 svc_id;
	__be32 client;
};

struct affinity_value {
	__u32 backend_id;
	__u32 last_used; /* seconds (bpf_ktime_get_ns() / 1e9) */
	__be32 addr;     /* the backend's address and port: an id reused by another */
	__be16 port;     /* endpoint does not inherit the client */
	__u16 pad;
};

/* Network policy.
 *
 * Every address the policy knows maps to an identity in shoal_ipcache (longest prefix):
 * a pod's address to the identity of its namespace and labels, a policy's ipBlock CIDR
 * to a CIDR identity, the node's own addresses to one flagged IPC_F_HOST. An address in
 * none of them is ID_WORLD. A local pod's address maps (shoal_endpoints) to its policy
 * subject and whether policies isolate it; shoal_policy then holds, per subject and
 * direction, the (peer identity, protocol, port range) triples that are allowed. */
#define ID_ANY 0   /* in a policy key: any peer */
#define ID_WORLD 1 /* an address shoal_ipcache does not know */

#define IPC_F_HOST 0x1 /* one of the node's own addresses: ingress from it is allowed */

struct ipcache_key {
	__u32 prefixlen; /* 0..=32 */
	__be32 addr;
};

struct ipcache_value {
	__u32 identity;
	__u32 flags; /* IPC_F_* */
};

#define EP_F_INGRESS 0x1 /* a policy selects the pod for ingress: default deny */
#define EP_F_EGRESS 0x2  /* a policy selects the pod for egress: default deny */

struct endpoint {
	__u32 subject; /* the pod's policy subject (the shoal_policy entries it follows) */
	__u32 flags;   /* EP_F_* */
};

#define POL_INGRESS 0
#define POL_EGRESS 1

/* An LPM trie key: the bits after prefixlen are compared from the first byte on, so
 * subject, peer and direction are always matched whole (POLICY_EXACT bits), the protocol
 * is matched unless the rule names no ports (prefix POLICY_EXACT), and a port range is a
 * few prefixes of the big-endian port. */
#define POLICY_EXACT 72
#define POLICY_PROTO 80
#define POLICY_FULL 96

struct policy_key {
	__u32 prefixlen;
	__u32 subject;
	__u32 peer; /* identity, or ID_ANY */
	__u8 dir;   /* POL_* */
	__u8 proto;
	__be16 port;
};

/* Address filters: a bit per hash of an address (FILTER_BITS of them in u64 words), set
 * when some entry keyed by an address with that hash may exist. A clear bit lets a packet
 * skip lookups in the large hash maps (a cache and TLB miss each under load).
 * shoal_frontends: service frontend addresses (written by user space, with counts);
 * shoal_natted: backend addresses that ever had a translated flow (set by the programs,
 * never cleared: a stale bit costs a lookup, nothing else). */
#define FILTER_BITS 65536
#define FILTER_WORDS (FILTER_BITS / 64)

static __always_inline __u32 filter_bit(__be32 addr)
{
	return (addr * 0x9e3779b1u) >> 16;
}

/* Socket-level translation (sock_lb.bpf.c): what a socket connected to a service was
 * sent to instead, kept in the socket's own storage for getpeername(). */
struct sock_lb {
	__be32 svc_addr;
	__be32 backend_addr;
	__be16 svc_port;
	__be16 backend_port;
};

/* Counters, one per CPU, summed by user space. */
enum stat {
	STAT_TRANSLATED = 0, /* packets of service flows rewritten towards a backend */
	STAT_REVERSED,       /* replies rewritten back to the service address */
	STAT_CT_CREATED,     /* new service flows */
	STAT_REJECTED,       /* packets to a service without endpoints, answered with ICMP */
	STAT_NO_SLOT,        /* a slot or backend vanished under a concurrent update: dropped */
	STAT_CT_UPDATE_FAILED,
	STAT_POLICY_DENIED, /* packets dropped by network policy */
	STAT_POLICY_ALLOWED, /* new flows a policy rule allowed to an isolated pod */
	STAT_SOCK_TRANSLATED, /* connect()s sent straight to a backend (socket-level) */
	STAT_XDP_TX,          /* packets from outside turned around on the uplink by XDP */
	STAT_SPOOFED,         /* packets a pod sent with another source address: dropped */
	STAT_MAX,
};

#endif
