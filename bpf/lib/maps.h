/* The maps of the service programs. The LRU maps keep a free list per CPU
 * (BPF_F_NO_COMMON_LRU): measured +16% connects/s against one shared list. All are pinned by name under the dataplane's bpffs
 * directory, so an agent restart (or a program upgrade) keeps services, backends and
 * established flows. Sizes are the design point: 10,000 services x 10 endpoints. */
#ifndef SHOAL_MAPS_H
#define SHOAL_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "common.h"

#define LIBBPF_PIN_BY_NAME 1

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct backend);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, MAGLEV_M * MAGLEV_TABLES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, FILTER_WORDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, FILTER_WORDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_natted SEC(".maps");

/* Whether an address may have entries behind the filter `map` (common.h). */
static __always_inline int filter_has(void *map, __be32 addr)
{
	__u32 bit = filter_bit(addr);
	__u32 word = bit / 64;
	__u64 *w = bpf_map_lookup_elem(map, &word);
	return !w || (*w & (1ULL << (bit % 64)));
}

static __always_inline void filter_set(void *map, __be32 addr)
{
	__u32 bit = filter_bit(addr);
	__u32 word = bit / 64;
	__u64 *w = bpf_map_lookup_elem(map, &word);
	if (w && !(*w & (1ULL << (bit % 64))))
		__sync_fetch_and_or(w, 1ULL << (bit % 64));
}

/* A pod interface's (host side) ifindex -> the pod's address: from_pod drops packets with
 * another source address, so that a pod cannot pass for another (network policy finds a
 * pod by its address). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __be32);
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_ifaddrs SEC(".maps");

/* Network policy (common.h). LPM tries must not be preallocated. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, struct endpoint);
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, __u32);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shoal_stats SEC(".maps");

static __always_inline void stat_inc(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&shoal_stats, &which);
	if (v)
		*v += 1;
}

#endif
