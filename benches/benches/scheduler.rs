//! The scheduler's hot paths: each plugin over every node of a 5,000-node table, and the
//! full cycle (`schedule_one`) for a basic pod, a node-affinity pod and an anti-affinity
//! pod. `cargo bench -p shoal-benches --bench scheduler`.

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use shoal_scheduler::cache::Cache;
use shoal_scheduler::framework::{schedule_one, Profile, Rng};
use shoal_scheduler::model::{NodeSpec, PodInfo};
use shoal_scheduler::plugins::{affinity, fit, taints};

const NODES: usize = 5000;

fn cluster() -> Cache {
    let mut c = Cache::default();
    for i in 0..NODES {
        let n = json!({"metadata": {"name": format!("node-{i}"), "labels": {"kubernetes.io/hostname": format!("node-{i}"), "topology.kubernetes.io/zone": format!("zone{}", i % 3)}},
            "status": {"allocatable": {"cpu": "4", "memory": "32Gi", "pods": "110"}}});
        let s = NodeSpec::from_value(&n, &mut c.names);
        c.upsert_node(s);
    }
    c
}

fn pod(c: &mut Cache, extra: serde_json::Value) -> PodInfo {
    let mut p = json!({"metadata": {"name": "p", "namespace": "d", "uid": "u", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "resources": {"requests": {"cpu": "100m", "memory": "500Mi"}}}]}});
    if let (Some(spec), Some(extra)) = (p["spec"].as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    PodInfo::from_value(&p, &mut c.names)
}

fn plugins(cr: &mut Criterion) {
    let mut c = cluster();
    let p = pod(&mut c, json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["zone1", "zone2"]}]}]}}}}));
    let ctx = c.ctx();
    let mut g = cr.benchmark_group("plugin_over_5000_nodes");
    g.bench_function("NodeResourcesFit filter", |b| b.iter(|| (0..NODES).filter(|&i| fit::check(&p, &ctx, i).bits == 0).count()));
    g.bench_function("NodeResourcesFit LeastAllocated score", |b| b.iter(|| (0..NODES).map(|i| fit::least_allocated(&p, &ctx, i)).sum::<i64>()));
    g.bench_function("BalancedAllocation score", |b| b.iter(|| (0..NODES).map(|i| fit::balanced(&p, &ctx, i)).sum::<i64>()));
    g.bench_function("TaintToleration filter", |b| b.iter(|| (0..NODES).filter(|&i| taints::untolerated(&p, &ctx, i).is_none()).count()));
    g.bench_function("NodeAffinity filter", |b| b.iter(|| (0..NODES).filter(|&i| affinity::required_matches(&p, &ctx, i)).count()));
    g.finish();
}

fn cycles(cr: &mut Criterion) {
    let mut c = cluster();
    let basic = pod(&mut c, json!({}));
    let zoned = pod(&mut c, json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["zone1"]}]}]}}}}));
    let anti = pod(&mut c, json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}}));
    let profile = Profile::kubernetes();
    let mut rng = Rng::new(1);
    let mut g = cr.benchmark_group("schedule_one_5000_nodes");
    g.bench_function("basic pod", |b| b.iter(|| schedule_one(&basic, &c.ctx(), &profile, &mut rng)));
    g.bench_function("required node affinity", |b| b.iter(|| schedule_one(&zoned, &c.ctx(), &profile, &mut rng)));
    g.bench_function("required pod anti-affinity (no pods placed)", |b| b.iter(|| schedule_one(&anti, &c.ctx(), &profile, &mut rng)));
    g.finish();
}

criterion_group!(benches, plugins, cycles);
criterion_main!(benches);
