//! `loadgen scheduler`: upstream's scheduler_perf workloads run in-process against Shoal's
//! scheduling core (cache, framework, plugins — the code `shoal server` runs, without the
//! API): nodes and pods from the same templates (nodes of 4 CPU / 32 GiB / 110 pods, pods
//! of 100m / 500 MiB), `init` pods placed first, then `measure` pods scheduled by
//! `--workers` threads at once, each cycle a full filter + score of every node followed by
//! the reservation. Reports pods/s and the per-pod decision latency.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use parking_lot::RwLock;
use serde_json::{json, Value};
use shoal_scheduler::cache::Cache;
use shoal_scheduler::framework::{place, Profile, Rng};
use shoal_scheduler::model::{NodeSpec, PodInfo};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Plain pods with requests (upstream SchedulingBasic).
    SchedulingBasic,
    /// Every pod requires nodes of zone1 or zone2; every node is in zone1 (upstream
    /// SchedulingNodeAffinity).
    NodeAffinity,
    /// Every pod refuses nodes holding another pod of its colour (required anti-affinity per
    /// hostname; upstream SchedulingPodAntiAffinity).
    PodAntiAffinity,
    /// Every pod spreads over three zones with maxSkew 5 (DoNotSchedule; upstream
    /// TopologySpreading).
    TopologySpreading,
    /// Half the nodes carry a NoSchedule taint that every pod tolerates, plus a preferred
    /// node affinity: exercises the taint filter and the normalized scores.
    TaintsAndPreferences,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SchedulerArgs {
    #[arg(long, value_enum, default_value_t = Workload::SchedulingBasic)]
    pub workload: Workload,
    /// Node counts to run, comma separated (a scaling curve when several).
    #[arg(long, value_delimiter = ',', default_values_t = vec![5000usize])]
    pub nodes: Vec<usize>,
    /// Pods placed before measuring.
    #[arg(long, default_value_t = 1000)]
    pub init_pods: usize,
    /// Pods scheduled while measuring.
    #[arg(long, default_value_t = 10_000)]
    pub measure_pods: usize,
    /// Scheduling workers (threads) at once.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Profile: shoal or kubernetes.
    #[arg(long, default_value = "kubernetes")]
    pub profile: String,
    /// Threads evaluating one pod's nodes (1: on the worker's own thread).
    #[arg(long, default_value_t = 1)]
    pub parallelism: u32,
    /// End to end instead of in-process: a `shoal server` (release build beside loadgen,
    /// or --shoal-bin) with its scheduler; `--measure-pods` pods are created while no node
    /// exists (all unschedulable), then the nodes (first of `--nodes`), and the binding
    /// rate is measured from the first bind to the last, as seen by a watch.
    #[arg(long)]
    pub e2e: bool,
    /// The shoal binary for --e2e (default: the one beside loadgen).
    #[arg(long)]
    pub shoal_bin: Option<std::path::PathBuf>,
    /// Requests in flight while creating pods and nodes (--e2e).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
}

fn node(i: usize, w: Workload) -> Value {
    let mut n = json!({"metadata": {"name": format!("node-{i}"), "labels": {"kubernetes.io/hostname": format!("node-{i}")}},
        "status": {"allocatable": {"cpu": "4", "memory": "32Gi", "pods": "110"}}});
    match w {
        Workload::SchedulingBasic => {}
        Workload::NodeAffinity => n["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("zone1"),
        Workload::PodAntiAffinity => {}
        Workload::TopologySpreading => n["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!(format!("zone{}", i % 3)),
        Workload::TaintsAndPreferences => {
            n["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!(format!("zone{}", i % 3));
            if i % 2 == 0 {
                n["spec"] = json!({"taints": [{"key": "dedicated", "value": "batch", "effect": "NoSchedule"}]});
            }
        }
    }
    n
}

fn pod(i: usize, w: Workload) -> Value {
    let mut p = json!({"metadata": {"name": format!("pod-{i}"), "namespace": "sched-0", "uid": format!("uid-{i}")},
        "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10", "ports": [{"containerPort": 80}],
            "resources": {"requests": {"cpu": "100m", "memory": "500Mi"}, "limits": {"cpu": "100m", "memory": "500Mi"}}}]}});
    match w {
        Workload::SchedulingBasic => {}
        Workload::NodeAffinity => {
            p["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["zone1", "zone2"]}]}]}}});
        }
        Workload::PodAntiAffinity => {
            p["metadata"]["labels"] = json!({"color": "green"});
            p["spec"]["affinity"] = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"color": "green"}}, "topologyKey": "kubernetes.io/hostname"}]}});
        }
        Workload::TopologySpreading => {
            p["metadata"]["labels"] = json!({"color": "blue"});
            p["spec"]["topologySpreadConstraints"] = json!([{"maxSkew": 5, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"color": "blue"}}}]);
        }
        Workload::TaintsAndPreferences => {
            p["spec"]["tolerations"] = json!([{"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}]);
            p["spec"]["affinity"] = json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "preference": {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["zone1"]}]}}]}});
        }
    }
    p
}

struct Run {
    nodes: usize,
    pods_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    unschedulable: usize,
}

fn run_one(a: &SchedulerArgs, profile: &Profile, nodes: usize) -> Result<Run> {
    let mut c = Cache::default();
    for i in 0..nodes {
        let spec = NodeSpec::from_value(&node(i, a.workload), &mut c.names);
        c.upsert_node(spec);
    }
    let total = a.init_pods + a.measure_pods;
    let pods: Vec<Arc<PodInfo>> = (0..total).map(|i| Arc::new(PodInfo::from_value(&pod(i, a.workload), &mut c.names))).collect();
    let cache = Arc::new(RwLock::new(c));
    let mut rng = Rng::new(1);
    for p in &pods[..a.init_pods] {
        let _ = place(&cache.read(), p, profile, &mut rng);
    }
    let bar = indicatif::ProgressBar::new(a.measure_pods as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} pods {per_sec}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    bar.set_message(format!("{nodes} nodes"));
    let next = AtomicUsize::new(a.init_pods);
    let failed = AtomicUsize::new(0);
    let started = Instant::now();
    let mut lat: Vec<u32> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..a.workers.max(1))
            .map(|w| {
                let (cache, pods, next, failed, bar) = (&cache, &pods, &next, &failed, &bar);
                s.spawn(move || {
                    let mut rng = Rng::new(w as u64 + 2);
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            break;
                        }
                        let p = &pods[i];
                        let t = Instant::now();
                        if place(&cache.read(), p, profile, &mut rng).is_err() {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        if i % 256 == 0 {
                            bar.set_position((i - a.init_pods) as u64);
                        }
                    }
                    lat
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    let secs = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    lat.sort_unstable();
    let q = |f: f64| lat.get(((lat.len() as f64 * f) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0) as f64;
    Ok(Run { nodes, pods_per_s: a.measure_pods as f64 / secs, p50_us: q(0.5), p99_us: q(0.99), unschedulable: failed.load(Ordering::Relaxed) })
}

pub async fn run(a: SchedulerArgs) -> Result<Value> {
    if a.e2e {
        return e2e(a).await;
    }
    let Some(mut profile) = Profile::builtin(&a.profile) else { bail!("--profile {:?}: expected shoal or kubernetes", a.profile) };
    profile.parallelism = a.parallelism;
    if let Err(e) = profile.validate() {
        bail!("{e}");
    }
    if a.nodes.is_empty() || a.nodes.contains(&0) {
        bail!("--nodes needs at least one positive node count");
    }
    let runs: Vec<Run> = {
        let a = a.clone();
        tokio::task::spawn_blocking(move || a.nodes.iter().map(|&n| run_one(&a, &profile, n)).collect::<Result<Vec<_>>>()).await??
    };
    let name = format!("{:?}", a.workload);
    println!("{:<22} {:>8} {:>12} {:>10} {:>10} {:>14}", "workload", "nodes", "pods/s", "p50 µs", "p99 µs", "unschedulable");
    for r in &runs {
        println!("{:<22} {:>8} {:>12.0} {:>10.0} {:>10.0} {:>14}", name, r.nodes, r.pods_per_s, r.p50_us, r.p99_us, r.unschedulable);
    }
    let main = runs.iter().find(|r| r.nodes == 5000).unwrap_or(&runs[runs.len() - 1]);
    let mut out = json!({
        "scenario": "scheduler/in-process",
        "workload": name,
        "profile": a.profile,
        "workers": a.workers,
        "parallelism": a.parallelism,
        "init_pods": a.init_pods,
        "measure_pods": a.measure_pods,
        "nodes": main.nodes,
        "pods_per_s": main.pods_per_s,
        "p50_ms": main.p50_us / 1000.0,
        "p99_ms": main.p99_us / 1000.0,
        "unschedulable": main.unschedulable,
    });
    for r in &runs {
        out[format!("pods_per_s_{}_nodes", r.nodes)] = json!(r.pods_per_s);
        out[format!("p99_ms_{}_nodes", r.nodes)] = json!(r.p99_us / 1000.0);
    }
    Ok(out)
}

/// Creates `objs` at `path` with `concurrency` requests in flight, advancing `bar`.
async fn create_all(client: &shoal_client::Client, path: &str, objs: Vec<Value>, concurrency: usize, bar: &indicatif::ProgressBar) -> Result<()> {
    use futures::StreamExt;
    let mut results = futures::stream::iter(objs.into_iter().map(|o| {
        let client = client.clone();
        let path = path.to_string();
        async move { client.create(&path, &o).await }
    }))
    .buffer_unordered(concurrency.max(1));
    while let Some(r) = results.next().await {
        r.map_err(|e| anyhow::anyhow!("create at {path}: {e}"))?;
        bar.inc(1);
    }
    Ok(())
}

async fn e2e(a: SchedulerArgs) -> Result<Value> {
    use std::collections::HashMap;
    use std::time::Duration;

    let nodes = a.nodes[0];
    let pods = a.measure_pods;
    if pods == 0 {
        bail!("--measure-pods must be at least 1");
    }
    let bin = a.shoal_bin.clone().unwrap_or_else(crate::procs::default_shoal_bin);
    let extra = vec!["--scheduler-profile".to_string(), a.profile.clone(), "--scheduler-workers".to_string(), a.workers.to_string()];
    let (server, dir) = crate::procs::start_shoal_api(&bin, None, None, &extra)?;
    let cfg = shoal_client::Config::from_kubeconfig(&dir.join("kubeconfig"), "loadgen")?;
    let client = shoal_client::Client::new(cfg, 4)?;
    let t = Instant::now();
    while client.get("/api/v1/namespaces/default").await.ok().flatten().is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the API server did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ns = "sched-e2e";
    client.create("/api/v1/namespaces", &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})).await.map_err(|e| anyhow::anyhow!("namespace: {e}"))?;
    let cpu0 = crate::procs::cpu_seconds(server.pid()).unwrap_or(0.0);

    // Watch every pod: when it was found unschedulable and when it was bound.
    let (_, rv) = client.list(&format!("/api/v1/namespaces/{ns}/pods")).await.map_err(|e| anyhow::anyhow!("list: {e}"))?;
    let mut rx = client.watch(&format!("/api/v1/namespaces/{ns}/pods"), &rv).await.map_err(|e| anyhow::anyhow!("watch: {e}"))?;
    let (unsched_tx, mut unsched_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (bound_tx, mut bound_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, String)>();
    tokio::spawn(async move {
        let mut seen_unsched = std::collections::HashSet::new();
        let mut seen_bound = std::collections::HashSet::new();
        while let Some((_, p)) = rx.recv().await {
            let name = p.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
            if let Some(node) = p.pointer("/spec/nodeName").and_then(Value::as_str).filter(|n| !n.is_empty()) {
                if seen_bound.insert(name) {
                    let _ = bound_tx.send((Instant::now(), node.to_string()));
                }
            } else if p.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|c| c.iter().any(|c| c["type"] == "PodScheduled" && c["status"] == "False")) && seen_unsched.insert(name) {
                let _ = unsched_tx.send(());
            }
        }
    });

    let template = |i: usize| {
        let mut p = pod(i, a.workload);
        p["metadata"]["namespace"] = json!(ns);
        p["metadata"].as_object_mut().map(|m| m.remove("uid"));
        p
    };
    let bar = indicatif::ProgressBar::new(pods as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{msg:24} {bar:40} {pos}/{len} {per_sec}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    bar.set_message("creating pods");
    create_all(&client, &format!("/api/v1/namespaces/{ns}/pods"), (0..pods).map(template).collect(), a.concurrency, &bar).await?;
    bar.set_position(0);
    bar.set_message("waiting: unschedulable");
    let mut n_unsched = 0;
    while n_unsched < pods {
        match tokio::time::timeout(Duration::from_secs(60), unsched_rx.recv()).await {
            Ok(Some(())) => {
                n_unsched += 1;
                bar.inc(1);
            }
            _ => bail!("only {n_unsched} of {pods} pods were reported unschedulable within 60 s"),
        }
    }
    bar.set_position(0);
    bar.set_length(nodes as u64);
    bar.set_message("creating nodes");
    let node_objs: Vec<Value> = (0..nodes).map(|i| {
        let mut n = node(i, a.workload);
        n["apiVersion"] = json!("v1");
        n["kind"] = json!("Node");
        n
    }).collect();
    // Nodes are created with their status (as registering kubelets do).
    create_all(&client, "/api/v1/nodes", node_objs, a.concurrency, &bar).await?;
    let nodes_done = Instant::now();
    bar.set_position(0);
    bar.set_length(pods as u64);
    bar.set_message("binding");
    let mut first = None;
    let mut last = nodes_done;
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for k in 0..pods {
        match tokio::time::timeout(Duration::from_secs(120), bound_rx.recv()).await {
            Ok(Some((t, node))) => {
                first.get_or_insert(t);
                last = t;
                *per_node.entry(node).or_default() += 1;
                bar.inc(1);
            }
            _ => bail!("only {k} of {pods} pods were bound within 120 s of the last event"),
        }
    }
    bar.finish_and_clear();
    let cpu = crate::procs::cpu_seconds(server.pid()).unwrap_or(0.0) - cpu0;
    let first = first.unwrap_or(nodes_done);
    let span = last.duration_since(first).as_secs_f64().max(1e-6);
    let max_per_node = per_node.values().copied().max().unwrap_or(0);
    // 100m pods on 4-CPU nodes: at most 40 per node; more would be an overcommit.
    if max_per_node > 40 {
        bail!("a node got {max_per_node} pods of 100m on 4 CPUs: overcommitted");
    }
    println!("{:<22} {:>8} {:>8} {:>12} {:>14} {:>16}", "workload (e2e)", "nodes", "pods", "binds/s", "all bound s", "server CPU ms");
    println!("{:<22} {:>8} {:>8} {:>12.0} {:>14.2} {:>16.0}", format!("{:?}", a.workload), nodes, pods, pods as f64 / span, last.duration_since(nodes_done).as_secs_f64(), cpu * 1000.0);
    Ok(json!({
        "scenario": "scheduler/e2e",
        "workload": format!("{:?}", a.workload),
        "profile": a.profile,
        "workers": a.workers,
        "nodes": nodes,
        "pods": pods,
        "pods_per_s": pods as f64 / span,
        "all_bound_after_nodes_s": last.duration_since(nodes_done).as_secs_f64(),
        "max_pods_per_node": max_per_node,
        "server_cpu_s": cpu,
        "server_cpu_us_per_pod": cpu * 1e6 / pods as f64,
    }))
}
