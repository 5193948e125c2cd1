//! A real node: the agent session, the runc runtime, the image store and the pod network
//! wired together, as `shoal agent` runs them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::image::ImageStore;
use crate::net::PodNetwork;
use crate::runtime::runc::{Runc, RuncSettings};
use crate::{Agent, AgentConfig, AgentStats};

/// How `shoal agent` runs (every field is a flag of the command).
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// `https://HOST:PORT` of the API server.
    pub server: String,
    /// Bootstrap token `ID.SECRET`.
    pub token: String,
    /// PEM file of the cluster CA.
    pub ca_file: PathBuf,
    pub node_name: String,
    /// Images, containers, volumes, logs.
    pub data_dir: PathBuf,
    /// The node's InternalIP.
    pub node_ip: String,
    /// The cluster's pod range (traffic inside it is not masqueraded).
    pub cluster_cidr: String,
    /// Registries spoken to over plain HTTP (`host:port`), besides loopback ones.
    pub insecure_registries: Vec<String>,
    pub runc: PathBuf,
    /// Labels of the Node (`k=v`).
    pub labels: Vec<(String, String)>,
    /// `status.capacity`: cpu cores and memory bytes (detected when zero), max pods.
    pub cpu: u32,
    pub memory_bytes: u64,
    pub max_pods: u32,
    /// Where `/metrics` is served (None: not served).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Container log rotation: size (0: never) and files kept.
    pub log_max_bytes: u64,
    pub log_max_files: u32,
    /// Hard eviction thresholds (`--eviction-hard`).
    pub eviction_hard: crate::eviction::Thresholds,
    /// How often node pressure is checked.
    pub housekeeping: std::time::Duration,
    /// How Services are proxied on this node.
    pub proxy_mode: ProxyMode,
    /// bpffs directory of the service proxy's pinned maps.
    pub bpf_dir: PathBuf,
    /// Socket-level translation of pods' TCP connects to ClusterIPs (`--socket-lb`).
    pub socket_lb: bool,
}

/// `--proxy-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// tc BPF programs on every pod interface (the default).
    Ebpf,
    /// nftables rules (kube-proxy's nftables layout); also the fallback when the BPF
    /// programs cannot be loaded.
    Nftables,
    /// No service proxy on this node.
    None,
}

impl std::str::FromStr for ProxyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<ProxyMode, String> {
        match s {
            "ebpf" => Ok(ProxyMode::Ebpf),
            "nftables" => Ok(ProxyMode::Nftables),
            "none" => Ok(ProxyMode::None),
            "iptables" | "ipvs" => Err(format!("--proxy-mode {s} is not offered (ebpf, nftables or none); IPVS is not in this kernel")),
            _ => Err(format!("unknown --proxy-mode {s:?} (ebpf, nftables or none)")),
        }
    }
}

/// Loads the eBPF service proxy; a failure leaves the node without one, loudly.
fn start_proxy(o: &NodeOptions, metrics: &crate::metrics::NodeMetrics) -> Option<shoal_dataplane::ProxyHandle> {
    if o.proxy_mode == ProxyMode::None {
        tracing::info!("service proxy disabled (--proxy-mode none)");
        return None;
    }
    let node_addr: Option<std::net::Ipv4Addr> = o.node_ip.parse().ok().filter(|a: &std::net::Ipv4Addr| !a.is_loopback());
    let cfg = shoal_dataplane::Config { pin_dir: o.bpf_dir.clone(), node_addr, ..Default::default() };
    let node = shoal_dataplane::NodeView { name: o.node_name.clone(), addresses: o.node_ip.parse().into_iter().collect() };
    let pm = Arc::new(shoal_dataplane::ProxyMetrics::new());
    metrics.register_with(|r| pm.register(r));
    let uplink = node_addr.and_then(shoal_dataplane::proxy::interface_with);
    if o.proxy_mode == ProxyMode::Ebpf {
        // rules of an earlier nftables run would translate again what the programs did
        let _ = shoal_dataplane::nft::run("table ip shoal-proxy\ndelete table ip shoal-proxy\ntable ip shoal-policy\ndelete table ip shoal-policy\n");
        let loaded = shoal_dataplane::Dataplane::load(&cfg).and_then(|mut dp| {
            // pods' TCP connects to ClusterIPs go straight to a backend (the tc programs
            // translate the rest, and everything when this is not possible)
            // without it, an earlier run's links must not translate with frozen maps
            if !o.socket_lb {
                let _ = shoal_dataplane::loader::detach_cgroup_links(&o.bpf_dir);
                return shoal_dataplane::Proxy::new(dp, node.clone(), pm.clone());
            }
            match shoal_dataplane::loader::cgroup2_root().map(|root| root.join("shoal").join(&o.node_name)) {
                Some(cgroup) => match dp.attach_cgroup(&cgroup) {
                    Ok(true) => tracing::info!(cgroup = %cgroup.display(), "socket-level service translation on the pods' cgroup"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "socket-level service translation is off: the tc programs translate every connection"),
                },
                None => tracing::warn!("no cgroup v2 hierarchy: socket-level service translation is off"),
            }
            shoal_dataplane::Proxy::new(dp, node.clone(), pm.clone())
        });
        match loaded {
            Ok(p) => {
                tracing::info!(bpf_dir = %o.bpf_dir.display(), "eBPF service proxy loaded");
                // the uplink carries NodePort traffic from outside (a loopback node address has none)
                return Some(shoal_dataplane::ProxyHandle::start(p, "shoal0", uplink.as_deref()));
            }
            Err(e) => tracing::error!(error = %e, "THE eBPF SERVICE PROXY COULD NOT BE LOADED: falling back to nftables (no ClientIP affinity, no NodePorts from outside)"),
        }
    }
    // filters of an earlier eBPF run would keep translating with frozen maps
    let _ = shoal_dataplane::loader::detach_cgroup_links(&o.bpf_dir);
    let _ = shoal_dataplane::loader::detach_xdp(&o.bpf_dir);
    for ifname in shoal_dataplane::proxy::bridge_ports("shoal0").into_iter().chain(uplink) {
        if shoal_dataplane::loader::detach_filters(&ifname).is_ok() {
            tracing::info!(interface = %ifname, "removed the eBPF service filters of an earlier run");
        }
    }
    match shoal_dataplane::nft::Nft::new("shoal-proxy") {
        Ok(nft) => {
            tracing::info!("nftables service proxy ready (table ip shoal-proxy)");
            Some(shoal_dataplane::ProxyHandle::start(shoal_dataplane::Proxy::nftables(nft, node, pm), "shoal0", None))
        }
        Err(e) => {
            tracing::error!(error = %e, "THE nftables SERVICE PROXY COULD NOT BE SET UP EITHER: Services are NOT reachable from pods on this node");
            None
        }
    }
}

impl NodeOptions {
    /// Rejects nonsense before anything starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.server.starts_with("https://") {
            anyhow::bail!("--server must be https://HOST:PORT (got {:?})", self.server);
        }
        if self.token.is_empty() {
            anyhow::bail!("--token is required (a bootstrap token ID.SECRET, see the server's DATA_DIR/pki/bootstrap-token)");
        }
        if crate::net::parse_cidr(&self.cluster_cidr).is_none() {
            anyhow::bail!("--cluster-cidr {:?} is not an IPv4 CIDR", self.cluster_cidr);
        }
        if self.node_name.is_empty() || self.node_name.len() > 253 || !self.node_name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
            anyhow::bail!("--node-name {:?} must be a lowercase DNS subdomain", self.node_name);
        }
        if self.node_ip.parse::<std::net::IpAddr>().is_err() {
            anyhow::bail!("--node-ip {:?} is not an IP address", self.node_ip);
        }
        Ok(())
    }
}

/// The shim to run containers with: `shoal-shim` beside this binary (small, so each
/// container's shim costs little memory), else this binary's own `shim` command.
fn shim_binary() -> anyhow::Result<std::path::PathBuf> {
    let me = std::env::current_exe().context("while finding the shoal binary (its shim runs containers)")?;
    let small = me.with_file_name("shoal-shim");
    Ok(if small.exists() { small } else { me })
}

fn detect_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())).map(|k| k * 1024).unwrap_or(0)
}

/// Runs the node until `stop` turns true.
pub async fn run(o: NodeOptions, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    o.validate()?;
    let ca = std::fs::read_to_string(&o.ca_file).with_context(|| format!("while reading the cluster CA {}", o.ca_file.display()))?;
    std::fs::create_dir_all(&o.data_dir).with_context(|| format!("while creating {}", o.data_dir.display()))?;
    let images = Arc::new(ImageStore::open(&o.data_dir.join("images"), o.insecure_registries.clone()).context("while opening the image store")?);
    let metrics = Arc::new(crate::metrics::NodeMetrics::default());
    let proxy = start_proxy(&o, &metrics);
    let net = Arc::new(PodNetwork { bridge: "shoal0".into(), cluster_cidr: o.cluster_cidr.clone(), routes: Default::default(), node_ip: o.node_ip.clone(), own_cidr: Default::default(), proxy: proxy.clone() });
    let settings = RuncSettings { root: o.data_dir.join("run"), runc: o.runc.clone(), cgroup_parent: format!("/shoal/{}", o.node_name), pod_cidr: Arc::new(Mutex::new(None)), shim: shim_binary()?, log_max_bytes: o.log_max_bytes, log_max_files: o.log_max_files };
    let rt = Runc::new(settings, images, net).await.context("while starting the runc runtime")?;
    let mut cfg = AgentConfig::new(&o.node_name, &o.token);
    cfg.host_ip = o.node_ip.clone();
    cfg.pods_dir = Some(o.data_dir.join("pods"));
    let cpu = if o.cpu == 0 { std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1) } else { o.cpu };
    let mem = if o.memory_bytes == 0 { detect_memory() } else { o.memory_bytes };
    cfg.capacity = serde_json::json!({"cpu": cpu.to_string(), "memory": format!("{}Ki", mem / 1024), "pods": o.max_pods.to_string(), "ephemeral-storage": "100Gi"});
    for (k, v) in &o.labels {
        cfg.labels.insert(k.clone(), serde_json::Value::from(v.as_str()));
    }
    cfg.metrics = Some(metrics.clone());
    cfg.proxy = proxy;
    let stats = Arc::new(AgentStats::default());
    if let Some(addr) = o.metrics_addr {
        crate::metrics::serve(addr, metrics, stats.clone()).await.with_context(|| format!("while listening for metrics on {addr}"))?;
    }
    let channel = crate::connect::channel(&o.server, &ca)?;
    let agent = Agent::new(cfg, channel, rt, stats);
    tracing::info!(node = %o.node_name, server = %o.server, data_dir = %o.data_dir.display(), "node agent starting");
    tokio::spawn(agent.clone().housekeeping(o.eviction_hard.clone(), o.data_dir.clone(), o.housekeeping, stop.clone()));
    agent.run(stop).await;
    Ok(())
}
