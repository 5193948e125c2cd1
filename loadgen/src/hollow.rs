//! Hollow nodes and the density scenario.
//!
//! - `loadgen hollow`: N simulated nodes in this process, each a real agent-protocol client
//!   (registration, its own session, statuses, heartbeats) on the simulated runtime,
//!   against a running Shoal (kubeconfig). Sessions share HTTP/2 connections
//!   (`--nodes-per-connection`), as a NAT gateway's agents would not, but the server's
//!   per-session work is the same.
//! - `loadgen density`: starts `shoal server`, connects N hollow nodes, creates Deployments
//!   for `nodes × pods-per-node` pods and measures pod startup (created → scheduled →
//!   running, as seen by a watch), all-running time, API latency, control-plane RSS/CPU and
//!   the memory of a hollow node.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};
use shoal_agent::runtime::sim::{Sim, SimSettings};
use shoal_agent::{Agent, AgentConfig, AgentStats};
use tokio::sync::watch;

#[derive(clap::Args, Debug, Clone)]
pub struct FleetArgs {
    /// Hollow nodes to run.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Node names are PREFIX0, PREFIX1, ...
    #[arg(long, default_value = "hollow-node-")]
    pub prefix: String,
    /// Agent sessions per HTTP/2 connection.
    #[arg(long, default_value_t = 50)]
    pub nodes_per_connection: usize,
    /// Simulated time from container start to Running, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub start_delay_ms: u64,
    /// CPU capacity of each node.
    #[arg(long, default_value = "8")]
    pub cpu: String,
    /// Memory capacity of each node.
    #[arg(long, default_value = "32Gi")]
    pub memory: String,
    /// Pod capacity of each node.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// Lease renewal period of each node, in seconds (upstream kubelet: 10).
    #[arg(long, default_value_t = 10)]
    pub heartbeat_s: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct HollowArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Kubeconfig of the cluster to join (its server, CA and token).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: std::path::PathBuf,
    /// Bootstrap token (`ID.SECRET`); default: the kubeconfig's token.
    #[arg(long)]
    pub token: Option<String>,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub duration_s: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DensityArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Pods per node (created through Deployments).
    #[arg(long, default_value_t = 30)]
    pub pods_per_node: usize,
    /// Replicas of each Deployment.
    #[arg(long, default_value_t = 1000)]
    pub deployment_size: usize,
    /// After the saturation phase, pods created one at a time into the full cluster to
    /// measure startup latency (upstream's density "latency pods"; the SLO is measured on
    /// these, not on pods queued behind 150,000 others).
    #[arg(long, default_value_t = 500)]
    pub latency_pods: usize,
    /// Creation rate of the latency pods, per second.
    #[arg(long, default_value_t = 10.0)]
    pub latency_qps: f64,
    /// Give up after this many seconds of waiting for pods.
    #[arg(long, default_value_t = 1800)]
    pub timeout_s: u64,
    /// The shoal binary (default: the one beside loadgen).
    #[arg(long)]
    pub shoal_bin: Option<std::path::PathBuf>,
    /// Extra flags for `shoal server`, space separated.
    #[arg(long, default_value = "")]
    pub server_flags: String,
}

/// A running set of hollow nodes.
pub struct Fleet {
    pub agents: Vec<Arc<Agent<Sim>>>,
    pub stats: Arc<AgentStats>,
    stop: watch::Sender<bool>,
}

impl Fleet {
    pub fn start(f: &FleetArgs, server: &str, ca_pem: &str, token: &str) -> Result<Fleet> {
        if f.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        let stats = Arc::new(AgentStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let mut agents = Vec::with_capacity(f.nodes);
        let mut channel = None;
        for i in 0..f.nodes {
            if i % f.nodes_per_connection.max(1) == 0 {
                channel = Some(shoal_agent::connect::channel(server, ca_pem)?);
            }
            let mut cfg = AgentConfig::new(&format!("{}{i}", f.prefix), token);
            cfg.capacity = json!({"cpu": f.cpu, "memory": f.memory, "pods": f.max_pods.to_string(), "ephemeral-storage": "100Gi"});
            cfg.host_ip = format!("10.{}.{}.{}", 200 + (i >> 16) % 50, (i >> 8) & 255, i & 255);
            cfg.heartbeat = Duration::from_secs(f.heartbeat_s.max(1));
            cfg.labels.insert("shoal.io/hollow".into(), json!("true"));
            let rt = Arc::new(Sim::new(SimSettings { start_delay: Duration::from_millis(f.start_delay_ms), ..Default::default() }));
            let a = Agent::new(cfg, channel.clone().expect("set on the first node"), rt, stats.clone());
            tokio::spawn(a.clone().run(stop_rx.clone()));
            agents.push(a);
        }
        Ok(Fleet { agents, stats, stop })
    }

    pub fn synced(&self) -> usize {
        self.agents.iter().filter(|a| a.synced.load(Ordering::Relaxed)).count()
    }

    pub fn pods(&self) -> usize {
        self.agents.iter().map(|a| a.pods.count()).sum()
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

pub(crate) fn bar(len: u64, msg: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    b.set_style(indicatif::ProgressStyle::with_template("{msg:28} {bar:40} {pos}/{len} {elapsed}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    b.set_message(msg.to_string());
    b
}

async fn wait_synced(fleet: &Fleet, limit: Duration) -> Result<f64> {
    let t = Instant::now();
    let b = bar(fleet.agents.len() as u64, "hollow nodes connected");
    loop {
        let n = fleet.synced();
        b.set_position(n as u64);
        if n == fleet.agents.len() {
            b.finish_and_clear();
            return Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed() > limit {
            b.finish_and_clear();
            bail!("only {n} of {} hollow nodes connected within {}s", fleet.agents.len(), limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn hollow(a: HollowArgs) -> Result<Value> {
    let cfg = shoal_client::Config::from_kubeconfig(&a.kubeconfig, "loadgen-hollow")?;
    let token = a.token.clone().unwrap_or(cfg.token.clone());
    let rss0 = crate::procs::rss_mib(std::process::id()).unwrap_or(0.0);
    let fleet = Fleet::start(&a.fleet, &cfg.server, &cfg.ca_pem, &token)?;
    let connect_s = wait_synced(&fleet, Duration::from_secs(300)).await?;
    let rss = crate::procs::rss_mib(std::process::id()).unwrap_or(0.0);
    eprintln!("{} hollow nodes connected in {connect_s:.1}s; running for {}s (Ctrl-C stops)", a.fleet.nodes, a.duration_s);
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(a.duration_s)) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    fleet.stop();
    let s = &fleet.stats;
    Ok(json!({"scenario": "hollow", "nodes": a.fleet.nodes, "connect_s": connect_s, "pods": fleet.pods(),
        "hollow_node_kib": (rss - rss0).max(0.0) * 1024.0 / a.fleet.nodes as f64,
        "statuses_sent": s.statuses_sent.load(Ordering::Relaxed), "heartbeats": s.heartbeats.load(Ordering::Relaxed), "sessions": s.sessions.load(Ordering::Relaxed)}))
}

/// Per pod: when the watch saw it created, scheduled, running.
#[derive(Default, Clone, Copy)]
pub(crate) struct Seen {
    pub(crate) created: Option<Instant>,
    pub(crate) scheduled: Option<Instant>,
    pub(crate) running: Option<Instant>,
}

pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// p99 of a verb's latency from the server's `apiserver_request_duration_seconds` buckets
/// (upper bound of the bucket holding the 99th percentile), in ms.
fn p99_from_metrics(text: &str, verb: &str, resource: &str) -> Option<f64> {
    p99_of(text, "apiserver_request_duration_seconds", &[&format!("verb=\"{verb}\""), &format!("resource=\"{resource}\"")])
}

/// The value of an unlabelled gauge in Prometheus text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' ')).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// p99 (bucket upper bound, ms) of a Prometheus histogram, summed over series whose labels
/// contain every one of `labels`.
fn p99_of(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let prefix = format!("{name}_bucket{{");
    for l in text.lines().filter(|l| l.starts_with(&prefix)) {
        if !labels.iter().all(|x| l.contains(x)) {
            continue;
        }
        let le = l.split("le=\"").nth(1)?.split('"').next()?;
        let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
        let n: f64 = l.rsplit(' ').next()?.parse().ok()?;
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some(x) => x.1 += n,
            None => buckets.push((le, n)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets.iter().find(|(_, n)| *n >= 0.99 * total).map(|(le, _)| le * 1000.0)
}

pub(crate) type SeenMap = Arc<parking_lot::Mutex<HashMap<String, Seen>>>;

/// Follows the pods under `path` (a list URL): when each was first seen, scheduled and
/// Running, and how many are Running.
pub(crate) async fn watch_pods(client: &shoal_client::Client, path: &str) -> Result<(SeenMap, watch::Receiver<usize>)> {
    let (_, rv) = client.list(path).await.map_err(|e| anyhow::anyhow!("list: {e}"))?;
    let seen: Arc<parking_lot::Mutex<HashMap<String, Seen>>> = Default::default();
    let (running_tx, running_rx) = watch::channel(0usize);
    {
        let seen = seen.clone();
        let client = client.clone();
        let path = path.to_string();
        tokio::spawn(async move {
            // A watch the server closes (a slow reader, a timeout) resumes from the last
            // resourceVersion seen.
            let (mut rv, mut running) = (rv, 0usize);
            loop {
                let Ok(mut rx) = client.watch(&path, &rv).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                while let Some((ty, p)) = rx.recv().await {
                    if let Some(r) = p.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
                        rv = r.to_string();
                    }
                    if ty == "DELETED" || ty == "BOOKMARK" {
                        continue;
                    }
                    let now = Instant::now();
                    let name = p.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
                    let mut g = seen.lock();
                    let s = g.entry(name).or_default();
                    s.created.get_or_insert(now);
                    if p.pointer("/spec/nodeName").and_then(Value::as_str).is_some_and(|n| !n.is_empty()) {
                        s.scheduled.get_or_insert(now);
                    }
                    if p.pointer("/status/phase").and_then(Value::as_str) == Some("Running") && s.running.is_none() {
                        s.running = Some(now);
                        running += 1;
                        let _ = running_tx.send(running);
                    }
                }
                if running_tx.is_closed() {
                    return;
                }
                tracing::info!(%rv, "pod watch closed by the server; resuming");
            }
        });
    }
    Ok((seen, running_rx))
}

/// A release `shoal server` with hollow nodes connected, Ready and with pod CIDRs.
pub struct HollowCluster {
    pub server: crate::procs::Proc,
    pub client: shoal_client::Client,
    pub fleet: Fleet,
    pub connect_s: f64,
    /// loadgen's RSS before and after starting the hollow nodes (MiB).
    pub rss0: f64,
    pub rss_fleet: f64,
}

pub async fn hollow_cluster(f: &FleetArgs, shoal_bin: Option<&std::path::Path>, server_flags: &str) -> Result<HollowCluster> {
    let bin = shoal_bin.map(std::path::Path::to_path_buf).unwrap_or_else(crate::procs::default_shoal_bin);
    let extra: Vec<String> = server_flags.split_whitespace().map(String::from).collect();
    let (server, dir) = crate::procs::start_shoal_api(&bin, None, None, &extra)?;
    // The API server writes its kubeconfig right after it starts listening.
    let t = Instant::now();
    while !std::fs::read_to_string(dir.join("kubeconfig")).is_ok_and(|k| k.contains("token:")) {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("shoal server wrote no kubeconfig in {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cfg = shoal_client::Config::from_kubeconfig(&dir.join("kubeconfig"), "loadgen")?;
    let client = shoal_client::Client::new(cfg.clone(), 4)?;
    while client.get("/api/v1/namespaces/default").await.ok().flatten().is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the API server did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = std::fs::read_to_string(dir.join("pki/bootstrap-token")).map(|t| t.trim().to_string()).unwrap_or(cfg.token.clone());
    let rss0 = crate::procs::rss_mib(std::process::id()).unwrap_or(0.0);
    let fleet = Fleet::start(f, &cfg.server, &cfg.ca_pem, &token)?;
    let connect_s = wait_synced(&fleet, Duration::from_secs(600)).await?;
    // Every node Ready and with a pod CIDR before pods come.
    let b = bar(f.nodes as u64, "nodes Ready");
    loop {
        let (nodes, _) = client.list("/api/v1/nodes").await.map_err(|e| anyhow::anyhow!("listing nodes: {e}"))?;
        let ready = nodes.iter().filter(|n| n.pointer("/spec/podCIDR").is_some() && n.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))).count();
        b.set_position(ready as u64);
        if ready >= f.nodes {
            break;
        }
        if t.elapsed() > Duration::from_secs(900) {
            bail!("only {ready} of {} nodes became Ready", f.nodes);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    b.finish_and_clear();
    let rss_fleet = crate::procs::rss_mib(std::process::id()).unwrap_or(0.0);
    Ok(HollowCluster { server, client, fleet, connect_s, rss0, rss_fleet })
}

pub async fn density(a: DensityArgs) -> Result<Value> {
    let total = a.fleet.nodes * a.pods_per_node;
    if total == 0 || a.deployment_size == 0 {
        bail!("--nodes, --pods-per-node and --deployment-size must be at least 1");
    }
    let HollowCluster { server, client, fleet, connect_s, rss0, rss_fleet } = hollow_cluster(&a.fleet, a.shoal_bin.as_deref(), &a.server_flags).await?;
    let ns = "density";
    client.create("/api/v1/namespaces", &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})).await.map_err(|e| anyhow::anyhow!("namespace: {e}"))?;

    let (seen, running_rx) = watch_pods(&client, &format!("/api/v1/namespaces/{ns}/pods")).await?;
    let cpu0 = crate::procs::cpu_seconds(server.pid()).unwrap_or(0.0);
    let start = Instant::now();
    let deployments = total.div_ceil(a.deployment_size);
    for d in 0..deployments {
        let replicas = a.deployment_size.min(total - d * a.deployment_size);
        let name = format!("density-{d}");
        let dep = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10",
                    "resources": {"requests": {"cpu": "10m", "memory": "20Mi"}}}]}}}});
        client.create(&format!("/apis/apps/v1/namespaces/{ns}/deployments"), &dep).await.map_err(|e| anyhow::anyhow!("deployment {name}: {e}"))?;
    }
    let b = bar(total as u64, "pods Running");
    let mut running_rx = running_rx;
    let mut last_progress = Instant::now();
    let mut last_n = 0;
    loop {
        let n = *running_rx.borrow();
        b.set_position(n as u64);
        if n >= total {
            break;
        }
        if n != last_n {
            last_n = n;
            last_progress = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(a.timeout_s) || last_progress.elapsed() > Duration::from_secs(120) {
            b.finish_and_clear();
            // Say where the missing pods are.
            let mut by_state: std::collections::BTreeMap<String, usize> = Default::default();
            if let Ok((pods, _)) = client.list(&format!("/api/v1/namespaces/{ns}/pods")).await {
                for p in &pods {
                    let node = p.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
                    let phase = p.pointer("/status/phase").and_then(Value::as_str).unwrap_or("");
                    *by_state.entry(format!("{} {phase}", if node.is_empty() { "unbound" } else { "bound" })).or_default() += 1;
                }
            }
            let unsent: usize = fleet.agents.iter().map(|a| a.unsent()).sum();
            let held: usize = fleet.pods();
            bail!("only {n} of {total} pods Running (as the watch saw) after {:.0}s; pods in the API: {by_state:?}; agents hold {held} pods, {unsent} statuses unsent", start.elapsed().as_secs_f64());
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), running_rx.changed()).await;
    }
    let all_running_s = start.elapsed().as_secs_f64();
    b.finish_and_clear();
    let cpu = crate::procs::cpu_seconds(server.pid()).unwrap_or(0.0) - cpu0;
    let server_rss = crate::procs::rss_mib(server.pid()).unwrap_or(0.0);
    // Latency phase: single pods at a steady rate into the full cluster.
    let lat_total = a.latency_pods;
    if lat_total > 0 {
        let b = bar(lat_total as u64, "latency pods");
        let every = Duration::from_secs_f64(1.0 / a.latency_qps.max(0.1));
        let mut tick = tokio::time::interval(every);
        for i in 0..lat_total {
            tick.tick().await;
            let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("latency-{i}"), "namespace": ns, "labels": {"app": "latency"}},
                "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10", "resources": {"requests": {"cpu": "10m", "memory": "20Mi"}}}]}});
            client.create(&format!("/api/v1/namespaces/{ns}/pods"), &pod).await.map_err(|e| anyhow::anyhow!("latency pod {i}: {e}"))?;
            b.inc(1);
        }
        let t = Instant::now();
        while *running_rx.borrow() < total + lat_total {
            if t.elapsed() > Duration::from_secs(120) {
                bail!("only {} of {lat_total} latency pods Running", (*running_rx.borrow()).saturating_sub(total));
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), running_rx.changed()).await;
        }
        b.finish_and_clear();
    }
    let metrics_text = client.get_text("/metrics").await.unwrap_or_default();
    let (mut startup, mut sched, mut sat): (Vec<f64>, Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new(), Vec::new());
    for (name, s) in seen.lock().iter() {
        let latency_pod = name.starts_with("latency-");
        if let (Some(c), Some(r)) = (s.created, s.running) {
            if latency_pod || lat_total == 0 {
                startup.push(r.duration_since(c).as_secs_f64());
            }
            if !latency_pod {
                sat.push(r.duration_since(c).as_secs_f64());
            }
        }
        if let (Some(c), Some(sc)) = (s.created, s.scheduled) {
            if latency_pod || lat_total == 0 {
                sched.push(sc.duration_since(c).as_secs_f64());
            }
        }
    }
    let (p50, p90, p99) = (pct(&mut startup, 0.5), pct(&mut startup, 0.9), pct(&mut startup, 0.99));
    let (sat_p50, sat_p99) = (pct(&mut sat, 0.5), pct(&mut sat, 0.99));
    let sched_p99 = pct(&mut sched, 0.99);
    let mut api = serde_json::Map::new();
    for (verb, res) in [("POST", "pods"), ("PUT", "pods"), ("PATCH", "pods"), ("GET", "pods"), ("LIST", "pods"), ("PUT", "leases"), ("POST", "bindings")] {
        if let Some(p) = p99_from_metrics(&metrics_text, verb, res) {
            api.insert(format!("{verb} {res}"), json!(p));
        }
    }
    for (label, metric) in [("agent status batch", "shoal_agent_status_batch_seconds"), ("agent heartbeat", "shoal_agent_heartbeat_seconds")] {
        if let Some(p) = p99_of(&metrics_text, metric, &[]) {
            api.insert(label.into(), json!(p));
        }
    }
    let stored_mib = gauge(&metrics_text, "etcd_mvcc_db_total_size_in_bytes").unwrap_or(0.0) / (1024.0 * 1024.0);
    let hollow_kib = (rss_fleet - rss0).max(0.0) * 1024.0 / a.fleet.nodes as f64;
    fleet.stop();
    println!("{:<10} {:>8} {:>10} {:>14} {:>18} {:>10} {:>10} {:>10} {:>12} {:>12}", "density", "nodes", "pods", "all running s", "saturation p99 s", "p50 s", "p90 s", "p99 s", "server RSS", "hollow KiB");
    println!("{:<10} {:>8} {:>10} {:>14.1} {:>18.2} {:>10.2} {:>10.2} {:>10.2} {:>12.0} {:>12.1}", "", a.fleet.nodes, total, all_running_s, sat_p99, p50, p90, p99, server_rss, hollow_kib);
    drop(server);
    Ok(json!({
        "scenario": "density", "nodes": a.fleet.nodes, "pods": total, "pods_per_node": a.pods_per_node,
        "connect_s": connect_s, "all_running_s": all_running_s,
        "startup_p50_s": p50, "startup_p90_s": p90, "startup_p99_s": p99, "schedule_p99_s": sched_p99, "latency_pods": lat_total,
        "saturation_startup_p50_s": sat_p50, "saturation_startup_p99_s": sat_p99,
        "pods_per_s": total as f64 / all_running_s.max(1e-6),
        "server_cpu_s": cpu, "server_cpu_ms_per_pod": cpu * 1000.0 / total as f64, "rss_mib": server_rss, "stored_mib": stored_mib,
        "hollow_node_kib": hollow_kib, "api_p99_ms": api,
        "statuses_sent": fleet.stats.statuses_sent.load(Ordering::Relaxed), "status_errors": fleet.stats.status_errors.load(Ordering::Relaxed),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_reads_histogram_buckets() {
        let text = "apiserver_request_duration_seconds_bucket{verb=\"POST\",group=\"\",resource=\"pods\",subresource=\"\",le=\"0.005\"} 90\n\
apiserver_request_duration_seconds_bucket{verb=\"POST\",group=\"\",resource=\"pods\",subresource=\"\",le=\"0.025\"} 99\n\
apiserver_request_duration_seconds_bucket{verb=\"POST\",group=\"\",resource=\"pods\",subresource=\"\",le=\"+Inf\"} 100\n\
apiserver_request_duration_seconds_bucket{verb=\"GET\",group=\"\",resource=\"pods\",subresource=\"\",le=\"+Inf\"} 5\n";
        assert_eq!(p99_from_metrics(text, "POST", "pods"), Some(25.0));
        assert_eq!(p99_from_metrics(text, "PUT", "pods"), None);
        let g = "# HELP etcd_mvcc_db_total_size_in_bytes x\netcd_mvcc_db_total_size_in_bytes 2048\netcd_mvcc_db_total_size_in_bytes_other 5\n";
        assert_eq!(gauge(g, "etcd_mvcc_db_total_size_in_bytes"), Some(2048.0));
        let mut v = vec![3.0, 1.0, 2.0];
        assert_eq!(pct(&mut v, 0.5), 2.0);
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Pods per node at the start (as upstream's load test: half in Deployments of 250,
    /// a quarter in Deployments of 30, a quarter in Deployments of 5; a Service for every
    /// other Deployment).
    #[arg(long, default_value_t = 30)]
    pub pods_per_node: usize,
    /// Namespaces the Deployments are spread over.
    #[arg(long, default_value_t = 10)]
    pub namespaces: usize,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 1200)]
    pub timeout_s: u64,
    /// The shoal binary (default: the one beside loadgen).
    #[arg(long)]
    pub shoal_bin: Option<std::path::PathBuf>,
    /// Extra flags for `shoal server`, space separated.
    #[arg(long, default_value = "")]
    pub server_flags: String,
}

/// Waits until every Deployment in the load namespaces has all its replicas available and
/// no more pods exist than wanted.
async fn wait_settled(client: &shoal_client::Client, namespaces: &[String], want_pods: usize, limit: Duration, msg: &str) -> Result<f64> {
    let t = Instant::now();
    let b = bar(want_pods as u64, msg);
    loop {
        let (mut avail, mut want, mut pods) = (0usize, 0usize, 0usize);
        for ns in namespaces {
            let (ds, _) = client.list(&format!("/apis/apps/v1/namespaces/{ns}/deployments")).await.map_err(|e| anyhow::anyhow!("listing deployments: {e}"))?;
            for d in &ds {
                want += d.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(0) as usize;
                avail += d.pointer("/status/availableReplicas").and_then(Value::as_u64).unwrap_or(0).min(d.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(0)) as usize;
            }
            let (ps, _) = client.list(&format!("/api/v1/namespaces/{ns}/pods")).await.map_err(|e| anyhow::anyhow!("listing pods: {e}"))?;
            pods += ps.len();
        }
        b.set_length(want.max(1) as u64);
        b.set_position(avail as u64);
        if want == want_pods && avail == want && pods == want {
            b.finish_and_clear();
            return Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed() > limit {
            b.finish_and_clear();
            bail!("{msg}: {avail} of {want} replicas available and {pods} pods (want {want_pods}) after {}s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Upstream's cluster-loader "load" test in small: create Deployments and Services, scale
/// every Deployment to between 50% and 150% of its size, delete everything.
pub async fn load(a: LoadArgs) -> Result<Value> {
    let total = a.fleet.nodes * a.pods_per_node;
    if total == 0 || a.namespaces == 0 {
        bail!("--nodes, --pods-per-node and --namespaces must be at least 1");
    }
    let HollowCluster { server, client, fleet, connect_s, .. } = hollow_cluster(&a.fleet, a.shoal_bin.as_deref(), &a.server_flags).await?;
    let namespaces: Vec<String> = (0..a.namespaces).map(|i| format!("load-{i}")).collect();
    for ns in &namespaces {
        client.create("/api/v1/namespaces", &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})).await.map_err(|e| anyhow::anyhow!("namespace: {e}"))?;
    }
    // Sizes: half the pods in 250s, a quarter in 30s, a quarter in 5s (at least one each).
    let mut sizes = Vec::new();
    for (share, size) in [(total / 2, 250usize), (total / 4, 30), (total - total / 2 - total / 4, 5)] {
        let mut left = share;
        while left > 0 {
            let n = size.min(left);
            sizes.push(n);
            left -= n;
        }
    }
    let (seen, mut running_rx) = watch_pods(&client, "/api/v1/pods").await?;
    let cpu0 = crate::procs::cpu_seconds(server.pid()).unwrap_or(0.0);
    let mut rss_max = 0f64;
    // Phase 1: create.
    let t = Instant::now();
    let b = bar(sizes.len() as u64, "creating deployments");
    let mut deps = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let ns = &namespaces[i % namespaces.len()];
        let name = format!("load-{i}");
        let dep = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": n, "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10", "resources": {"requests": {"cpu": "10m", "memory": "20Mi"}}}]}}}});
        client.create(&format!("/apis/apps/v1/namespaces/{ns}/deployments"), &dep).await.map_err(|e| anyhow::anyhow!("deployment {name}: {e}"))?;
        if i % 2 == 0 {
            let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}});
            client.create(&format!("/api/v1/namespaces/{ns}/services"), &svc).await.map_err(|e| anyhow::anyhow!("service {name}: {e}"))?;
        }
        deps.push((ns.clone(), name, *n));
        b.inc(1);
    }
    b.finish_and_clear();
    let b = bar(total as u64, "pods Running");
    while *running_rx.borrow() < total {
        b.set_position(*running_rx.borrow() as u64);
        if t.elapsed() > Duration::from_secs(a.timeout_s) {
            bail!("create: only {} of {total} pods Running after {}s", *running_rx.borrow(), a.timeout_s);
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), running_rx.changed()).await;
    }
    b.finish_and_clear();
    let create_s = t.elapsed().as_secs_f64();
    rss_max = rss_max.max(crate::procs::rss_mib(server.pid()).unwrap_or(0.0));
    let mut startup: Vec<f64> = seen.lock().values().filter_map(|s| Some(s.running?.duration_since(s.created?).as_secs_f64())).collect();
    let (p50, p99) = (pct(&mut startup, 0.5), pct(&mut startup, 0.99));

    // Phase 2: scale each to 50%..150% (a fixed pseudo-random factor per Deployment).
    let t = Instant::now();
    let mut want = 0;
    for (i, (ns, name, n)) in deps.iter().enumerate() {
        let f = 0.5 + ((i as u64).wrapping_mul(2654435761) % 101) as f64 / 100.0;
        let m = ((*n as f64 * f).round() as usize).max(1);
        want += m;
        client.merge_patch(&format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale"), &json!({"spec": {"replicas": m}})).await.map_err(|e| anyhow::anyhow!("scaling {name}: {e}"))?;
    }
    wait_settled(&client, &namespaces, want, Duration::from_secs(a.timeout_s), "scaling").await?;
    let scale_s = t.elapsed().as_secs_f64();
    rss_max = rss_max.max(crate::procs::rss_mib(server.pid()).unwrap_or(0.0));

    // Phase 3: delete every namespace (cascading) and wait for the pods to go.
    let t = Instant::now();
    for ns in &namespaces {
        client.delete(&format!("/api/v1/namespaces/{ns}"), None).await.map_err(|e| anyhow::anyhow!("deleting {ns}: {e}"))?;
    }
    let b = bar(want as u64, "pods deleted");
    loop {
        let (pods, _) = client.list("/api/v1/pods").await.map_err(|e| anyhow::anyhow!("listing pods: {e}"))?;
        let left = pods.iter().filter(|p| p.pointer("/metadata/namespace").and_then(Value::as_str).is_some_and(|n| n.starts_with("load-"))).count();
        b.set_position((want.saturating_sub(left)) as u64);
        if left == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(a.timeout_s) {
            bail!("delete: {left} pods left after {}s", a.timeout_s);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    b.finish_and_clear();
    let delete_s = t.elapsed().as_secs_f64();
    let cpu = crate::procs::cpu_seconds(server.pid()).unwrap_or(0.0) - cpu0;
    let metrics_text = client.get_text("/metrics").await.unwrap_or_default();
    let mut api = serde_json::Map::new();
    for (verb, res) in [("POST", "pods"), ("DELETE", "pods"), ("PATCH", "deployments"), ("POST", "deployments"), ("LIST", "pods"), ("POST", "services")] {
        if let Some(p) = p99_from_metrics(&metrics_text, verb, res) {
            api.insert(format!("{verb} {res}"), json!(p));
        }
    }
    if let Some(p) = p99_of(&metrics_text, "shoal_agent_status_batch_seconds", &[]) {
        api.insert("agent status batch".into(), json!(p));
    }
    fleet.stop();
    println!("{:<8} {:>7} {:>8} {:>12} {:>10} {:>11} {:>9} {:>9} {:>11}", "load", "nodes", "pods", "deployments", "create s", "scale s", "delete s", "p99 s", "server RSS");
    println!("{:<8} {:>7} {:>8} {:>12} {:>10.1} {:>11.1} {:>9.1} {:>9.2} {:>11.0}", "", a.fleet.nodes, total, deps.len(), create_s, scale_s, delete_s, p99, rss_max);
    drop(server);
    Ok(json!({"scenario": "load", "nodes": a.fleet.nodes, "pods": total, "deployments": deps.len(), "connect_s": connect_s,
        "create_s": create_s, "scale_s": scale_s, "delete_s": delete_s, "pods_after_scale": want,
        "startup_p50_s": p50, "startup_p99_s": p99, "server_cpu_s": cpu, "rss_mib": rss_max, "api_p99_ms": api}))
}
