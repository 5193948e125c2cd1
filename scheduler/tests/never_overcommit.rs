//! Architecture Invariant 4 under concurrency: several workers choose nodes for random pods
//! against one shared cache at once; no node ever ends up with more requested than it
//! allocates, and the cache's sums equal the pods it placed.

use std::sync::Arc;

use parking_lot::RwLock;
use proptest::prelude::*;
use serde_json::json;
use shoal_scheduler::cache::Cache;
use shoal_scheduler::framework::{place, Profile, Rng};
use shoal_scheduler::model::{NodeSpec, PodInfo};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn concurrent_workers_never_overcommit(
        nodes in prop::collection::vec((1u32..8, 1u32..16), 1..12),
        pods in prop::collection::vec((50u32..3000, 16u32..4096), 1..200),
        workers in 1usize..5,
    ) {
        let mut c = Cache::default();
        for (i, (cpu, gib)) in nodes.iter().enumerate() {
            let n = json!({"metadata": {"name": format!("n{i}")}, "status": {"allocatable": {"cpu": cpu.to_string(), "memory": format!("{gib}Gi"), "pods": "110"}}});
            let s = NodeSpec::from_value(&n, &mut c.names);
            c.upsert_node(s);
        }
        let infos: Vec<Arc<PodInfo>> = pods.iter().enumerate().map(|(i, (m, mib))| {
            let p = json!({"metadata": {"name": format!("p{i}"), "namespace": "d", "uid": format!("u{i}")},
                "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": format!("{m}m"), "memory": format!("{mib}Mi")}}}]}});
            Arc::new(PodInfo::from_value(&p, &mut c.names))
        }).collect();
        let cache = Arc::new(RwLock::new(c));
        let placed = Arc::new(RwLock::new(Vec::new()));
        let chunks: Vec<Vec<Arc<PodInfo>>> = (0..workers).map(|w| infos.iter().skip(w).step_by(workers).cloned().collect()).collect();
        std::thread::scope(|s| {
            for (w, chunk) in chunks.into_iter().enumerate() {
                let (cache, placed) = (cache.clone(), placed.clone());
                s.spawn(move || {
                    let mut rng = Rng::new(w as u64 + 1);
                    for p in chunk {
                        if let Ok((node, _)) = place(&cache.read(), &p, &Profile::kubernetes(), &mut rng) {
                            placed.write().push((p.clone(), node));
                        }
                    }
                });
            }
        });
        let c = cache.read();
        for i in 0..c.nodes.len() {
            prop_assert!(c.nodes.req_cpu(i) <= c.nodes.alloc_cpu[i], "node {i} cpu {} > {}", c.nodes.req_cpu(i), c.nodes.alloc_cpu[i]);
            prop_assert!(c.nodes.req_memory(i) <= c.nodes.alloc_memory[i]);
            let (cpu, mem) = placed.read().iter().filter(|(_, n)| *n == i).fold((0, 0), |a, (p, _)| (a.0 + p.requests.milli_cpu, a.1 + p.requests.memory));
            prop_assert_eq!((c.nodes.req_cpu(i), c.nodes.req_memory(i)), (cpu, mem));
        }
        prop_assert_eq!(c.pod_count(), placed.read().len());
    }
}
