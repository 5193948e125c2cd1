//! The `shoal` binary: parses arguments and wires the crates together. No logic lives
//! here (STYLE.md, "Thin binary").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};

mod admin;
mod up;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shoal: a Kubernetes-compatible container orchestrator for very large clusters.
#[derive(Parser, Debug)]
#[command(name = "shoal", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info`, `shoal_store=debug`).
    /// The `RUST_LOG` environment variable overrides it.
    #[arg(long, global = true, default_value = "info,openraft=warn")]
    log: String,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a whole cluster on this machine (as root): `shoal server` and a `shoal agent`
    /// node with runc and the eBPF service proxy, a kubeconfig in DATA_DIR/kubeconfig.
    /// Ctrl-C stops it; running it again on the same data directory resumes it.
    Up(up::UpArgs),
    /// Run a control-plane server: a store member serving the etcd v3 API (KV, Watch,
    /// Lease, Cluster, Maintenance) and the Kubernetes API over HTTPS. With no
    /// --initial-cluster the store is a single-member cluster.
    Server(ServerArgs),
    /// Operate a running server over its admin gRPC API (`--admin-addr`): show and tune
    /// the scheduler live, queue statistics, explain a pending pod.
    Admin(admin::AdminArgs),
    /// Run a node agent: joins the cluster with a bootstrap token and runs the pods the
    /// scheduler binds to this node with runc (images, pod network, volumes, logs).
    Agent(AgentArgs),
    /// Manage the node's image store.
    Image(ImageArgs),
    /// (Internal) one container's shim, started by the agent: runs `runc create`, keeps
    /// the container's output in its log and records its exit, so the container outlives
    /// an agent restart.
    #[command(hide = true)]
    Shim(ShimArgs),
}

#[derive(Parser, Debug)]
struct ShimArgs {
    /// The container's id.
    #[arg(long)]
    id: String,
    /// The OCI bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    /// runc's state root.
    #[arg(long)]
    root: PathBuf,
    /// The runc binary.
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// The container's log file (CRI format).
    #[arg(long)]
    log_file: PathBuf,
    /// Rotate the log past this many bytes (0: never).
    #[arg(long, default_value_t = 10 << 20)]
    log_max_bytes: u64,
    /// Log files kept in all, the current one included.
    #[arg(long, default_value_t = 5)]
    log_max_files: u32,
}

#[derive(Parser, Debug)]
struct AgentArgs {
    /// The API server, `https://HOST:PORT`.
    #[arg(long, default_value = "https://127.0.0.1:6443")]
    server: String,
    /// Bootstrap token (`ID.SECRET`; `shoal server` writes one to DATA_DIR/pki/bootstrap-token).
    #[arg(long, env = "SHOAL_TOKEN", default_value = "")]
    token: String,
    /// PEM file of the cluster CA (the server's DATA_DIR/pki/ca.crt).
    #[arg(long, default_value = "shoal-data/pki/ca.crt")]
    ca_file: PathBuf,
    /// The Node's name (default: this machine's hostname).
    #[arg(long, default_value = "")]
    node_name: String,
    /// The node's InternalIP, reported in the Node and as pods' hostIP.
    #[arg(long, default_value = "127.0.0.1")]
    node_ip: String,
    /// Where images, containers, volumes and logs live.
    #[arg(long, default_value = "shoal-agent-data")]
    data_dir: PathBuf,
    /// The cluster's pod range: pod traffic leaving it is masqueraded.
    #[arg(long, default_value = "10.0.0.0/8")]
    cluster_cidr: String,
    /// Registry (`host:port`) spoken to over plain HTTP; repeatable. Loopback registries
    /// always are.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// The OCI runtime binary.
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// A label of the Node (`key=value`); repeatable.
    #[arg(long = "node-label")]
    labels: Vec<String>,
    /// CPUs the node offers (0: all of this machine's).
    #[arg(long, default_value_t = 0)]
    cpu: u32,
    /// Memory the node offers in bytes (0: all of this machine's).
    #[arg(long, default_value_t = 0)]
    memory_bytes: u64,
    /// Pods the node runs at most.
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
    /// Hard eviction thresholds: the node reports MemoryPressure/DiskPressure/PIDPressure
    /// below them and evicts pods under memory pressure (empty: none).
    #[arg(long, default_value = "memory.available<100Mi,nodefs.available<10%")]
    eviction_hard: String,
    /// How often node pressure is checked (`10s`, `1m`).
    #[arg(long, default_value = "10s")]
    housekeeping_interval: String,
    /// Rotate a container's log past this size, as the kubelet's containerLogMaxSize.
    #[arg(long, default_value = "10Mi")]
    container_log_max_size: String,
    /// Log files kept per container, the current one included (containerLogMaxFiles).
    #[arg(long, default_value_t = 5)]
    container_log_max_files: u32,
    /// Where the agent serves Prometheus `/metrics` and `/healthz` (empty: not served).
    #[arg(long, default_value = "127.0.0.1:10255")]
    metrics_addr: String,
    /// How pods reach Services: `ebpf` (tc programs on every pod interface translate
    /// service addresses, with their own connection tracking; falls back to nftables when
    /// the programs cannot be loaded), `nftables` (kube-proxy's nftables layout) or `none`.
    #[arg(long, default_value = "ebpf")]
    proxy_mode: shoal_agent::node::ProxyMode,
    /// bpffs directory where the service proxy pins its maps (kept across agent restarts,
    /// so established connections survive them).
    #[arg(long, default_value = "/sys/fs/bpf/shoal")]
    bpf_dir: PathBuf,
    /// eBPF mode: translate pods' TCP connects to ClusterIPs at connect() (cgroup programs
    /// on the pods' cgroup): those connections need no conntrack and no per-packet
    /// rewriting. When a backend is removed, the pods' sockets connected to it are closed
    /// (SOCK_DESTROY). `--socket-lb=false` leaves every connection to the tc programs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    socket_lb: bool,
}

#[derive(Parser, Debug)]
struct ImageArgs {
    /// The agent's data directory (images are under DATA_DIR/images).
    #[arg(long, default_value = "shoal-agent-data", global = true)]
    data_dir: PathBuf,
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Import an OCI layout (directory or tarball) or a docker-archive tarball (`docker
    /// save`, `skopeo copy … docker-archive:`), for machines without a registry.
    Import {
        /// The archive or layout directory.
        file: PathBuf,
        /// Name the image (`REPO:TAG`) when the archive carries only a tag or no name.
        #[arg(long)]
        name: Option<String>,
    },
    /// List the images in the store.
    List,
    /// Pull an image from its registry.
    Pull {
        image: String,
        /// Registry (`host:port`) spoken to over plain HTTP; repeatable.
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
    },
    /// Remove an image (layers shared with other images stay).
    Rm { image: String },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum WalIo {
    /// One io_uring submission per group commit: a write linked to an fdatasync.
    Uring,
    /// Plain pwrite + fdatasync system calls.
    Std,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ClusterState {
    New,
    Existing,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ExecutorArg {
    PerCore,
    WorkStealing,
}

#[derive(Parser, Debug)]
struct ServerArgs {
    /// Name of this member, unique in the cluster (shown by `etcdctl member list`).
    #[arg(long, default_value = "default")]
    name: String,
    /// Directory holding the write-ahead log and snapshots (created if missing; locked
    /// while the member runs). Defaults to `<name>.shoal` in the current directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address the etcd v3 gRPC API listens on.
    #[arg(long, default_value = "127.0.0.1:2379")]
    etcd_addr: SocketAddr,
    /// Address peers reach this member on (raft transport).
    #[arg(long, default_value = "127.0.0.1:2380")]
    peer_addr: SocketAddr,
    /// Every member of the cluster as `name=host:port,...` (peer addresses), this one
    /// included. Omit for a single-member cluster.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// `new` bootstraps a new cluster from --initial-cluster on first start; `existing`
    /// joins a cluster this member was added to (`etcdctl member add`) and waits for its
    /// leader.
    #[arg(long, value_enum, default_value_t = ClusterState::New)]
    initial_cluster_state: ClusterState,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_interval: u64,
    /// Raft election timeout in milliseconds (randomised up to twice it); at least three
    /// heartbeat intervals.
    #[arg(long, default_value_t = 1000)]
    election_timeout: u64,
    /// Testing only: a file listing member IDs (decimal) whose raft traffic this member
    /// drops, to simulate a network partition. Re-read when it changes.
    #[arg(long, hide = true)]
    fault_file: Option<PathBuf>,
    /// Address of the HTTP endpoint serving `/metrics` (Prometheus) and `/health`.
    /// Empty disables it.
    #[arg(long, default_value = "127.0.0.1:2381")]
    metrics_addr: String,
    /// Executor threads serving clients, each accepting its own connections through
    /// SO_REUSEPORT. Defaults to the number of CPUs.
    #[arg(long)]
    threads: Option<usize>,
    /// Space quota in bytes: past it, writes fail with "database space exceeded" and a
    /// NOSPACE alarm is raised until space is freed (compaction) and the alarm disarmed.
    #[arg(long, default_value_t = 8 << 30)]
    quota_backend_bytes: u64,
    /// Largest request accepted, in bytes; larger ones fail with "request is too large".
    #[arg(long, default_value_t = 3 << 19)]
    max_request_bytes: usize,
    /// Write a snapshot (and drop the log it covers) after this many log entries.
    #[arg(long, default_value_t = 100_000)]
    snapshot_count: u64,
    /// Seconds between progress notifications to idle watchers that asked for them.
    #[arg(long, default_value_t = 600)]
    watch_progress_notify_interval: u64,
    /// Executor model serving clients: `per-core` (one single-threaded runtime per
    /// thread, each with its own SO_REUSEPORT listener) or `work-stealing` (one tokio
    /// multi-threaded runtime).
    #[arg(long, value_enum, default_value_t = ExecutorArg::PerCore)]
    executor: ExecutorArg,
    /// How the write-ahead log is appended (std measured faster here; see ARCHITECTURE.md).
    #[arg(long, value_enum, default_value_t = WalIo::Std)]
    wal_io: WalIo,
    /// Address the Kubernetes API (HTTPS) listens on. Empty disables the API server.
    #[arg(long, default_value = "127.0.0.1:6443")]
    api_addr: String,
    /// Keep Kubernetes objects in an external etcd v3 cluster instead of the embedded
    /// store: `etcd://HOST:PORT[,HOST:PORT...]`. The embedded store is then not started.
    #[arg(long)]
    store: Option<String>,
    /// Where to write the admin kubeconfig. Defaults to `DATA_DIR/kubeconfig`.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Extra DNS names or IP addresses for the API serving certificate (repeatable).
    #[arg(long = "tls-san")]
    tls_san: Vec<String>,
    /// Run the controllers (Deployments, ReplicaSets, DaemonSets, StatefulSets, endpoints,
    /// namespaces, garbage collection, node lifecycle and IPAM, quotas) in this process,
    /// leader-elected through a Lease with the other servers.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    controllers: bool,
    /// Run the scheduler in this process (leader-elected through Lease
    /// kube-system/shoal-scheduler): it binds pending pods whose schedulerName is
    /// `default-scheduler`, `shoal` or `kubernetes`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    scheduler: bool,
    /// The scheduling profile for pods that name `default-scheduler`: `shoal` (resource
    /// balance 30%, image locality 20%, pod affinity 25%, node affinity 25%) or
    /// `kubernetes` (kube-scheduler's default plugins and weights).
    #[arg(long, default_value = "shoal")]
    scheduler_profile: String,
    /// Scheduling cycles run at once (each filters and scores nodes in parallel).
    #[arg(long, default_value_t = 2)]
    scheduler_workers: usize,
    /// A KubeSchedulerConfiguration-style YAML file: profiles by schedulerName with score
    /// plugins enabled (with weights) or disabled, percentageOfNodesToScore, parallelism.
    #[arg(long)]
    scheduler_config: Option<PathBuf>,
    /// Address of the operator gRPC API (`shoal admin`, grpcurl with reflection): live
    /// scheduler tuning, queue statistics, explain. Calls need the admin token. Empty
    /// disables it.
    #[arg(long, default_value = "127.0.0.1:6444")]
    admin_addr: String,
    /// How long a node may go without renewing its Lease or posting status before it is
    /// marked Unknown and tainted unreachable (`300s`, `40s`, `1m`).
    #[arg(long, default_value = "40s")]
    node_monitor_grace_period: String,
    /// The pod network: every node gets a slice of it (`--node-cidr-mask-size`).
    #[arg(long, default_value = "10.0.0.0/8")]
    cluster_cidr: String,
    /// Prefix length of each node's pod range.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size: u8,
    /// The service (ClusterIP) range, carved out of the cluster CIDR; node ranges skip it.
    /// Only the default is accepted today (the API server's allocator uses it).
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cluster_ip_range: String,
    /// Nodes per second, per zone, whose pods may be evicted after they became unreachable or
    /// not ready.
    #[arg(long, default_value_t = 0.1)]
    node_eviction_rate: f64,
    /// The eviction rate in a zone where at least --unhealthy-zone-threshold of the nodes
    /// are not ready (zones of at most --large-cluster-size-threshold nodes stop evicting).
    #[arg(long, default_value_t = 0.01)]
    secondary_node_eviction_rate: f64,
    /// Share of not-ready nodes (and more than two) that makes a zone partially disrupted.
    #[arg(long, default_value_t = 0.55)]
    unhealthy_zone_threshold: f64,
    /// Zones of at most this many nodes stop evicting when partially disrupted.
    #[arg(long, default_value_t = 50)]
    large_cluster_size_threshold: usize,
    /// How often HorizontalPodAutoscalers are evaluated (`15s`), as kube-controller-manager's
    /// flag of the same name.
    #[arg(long, default_value = "15s")]
    horizontal_pod_autoscaler_sync_period: String,
    /// Addresses for Services of type LoadBalancer: CIDRs and `first-last` ranges, comma
    /// separated (`192.0.2.0/28,198.51.100.10-198.51.100.20`). Must not overlap the cluster
    /// or service CIDR. Empty: LoadBalancer services stay pending (no cloud provider).
    #[arg(long, default_value = "")]
    load_balancer_ip_pool: String,
    /// How often the API server compacts the store's history, keeping at least this much
    /// (`300s`, `5m`, `1h`; `0` disables), as kube-apiserver's flag of the same name.
    #[arg(long, default_value = "5m")]
    etcd_compaction_interval: String,
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log));
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("shoal: invalid --log filter {:?}: {e}", cli.log);
            std::process::exit(2);
        }
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let res = match cli.cmd {
        Command::Server(a) => server(a),
        Command::Up(a) => up::run(a),
        Command::Agent(a) => agent(a),
        Command::Image(a) => image(a),
        Command::Shim(a) => std::process::exit(shoal_agent::shim::run(shoal_agent::shim::ShimArgs { id: a.id, bundle: a.bundle, root: a.root, runc: a.runc, log: a.log_file, log_max_bytes: a.log_max_bytes, log_max_files: a.log_max_files })),
        Command::Admin(a) => {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("shoal admin: error: starting the runtime: {e}");
                    std::process::exit(1);
                }
            };
            match rt.block_on(admin::run(a)) {
                Ok(out) => {
                    println!("{out}");
                    return;
                }
                Err(admin::Failure(code, msg)) => {
                    eprintln!("shoal admin: error: {msg}");
                    std::process::exit(code);
                }
            }
        }
    };
    if let Err(e) = res {
        eprintln!("shoal: error: {e:#}");
        std::process::exit(1);
    }
}

fn agent(a: AgentArgs) -> anyhow::Result<()> {
    let node_name = if a.node_name.is_empty() { std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_ascii_lowercase() } else { a.node_name };
    let mut labels = vec![];
    for l in &a.labels {
        let (k, v) = l.split_once('=').with_context(|| format!("--node-label {l:?} is not key=value"))?;
        labels.push((k.to_string(), v.to_string()));
    }
    let metrics_addr = match a.metrics_addr.as_str() {
        "" => None,
        m => Some(m.parse().with_context(|| format!("--metrics-addr {m:?} is not host:port"))?),
    };
    let log_max_bytes = shoal_client::quantity::parse(&a.container_log_max_size).filter(|m| *m >= 0).map(|m| (m / 1000) as u64).with_context(|| format!("--container-log-max-size {:?} is not a quantity like 10Mi", a.container_log_max_size))?;
    let eviction_hard = shoal_agent::eviction::Thresholds::parse(&a.eviction_hard).map_err(|e| anyhow::anyhow!("--eviction-hard: {e}"))?;
    let housekeeping = parse_duration(&a.housekeeping_interval).context("--housekeeping-interval")?;
    if housekeeping.is_zero() {
        bail!("--housekeeping-interval must be at least 1s");
    }
    let opts = shoal_agent::node::NodeOptions { eviction_hard, housekeeping, metrics_addr, log_max_bytes, log_max_files: a.container_log_max_files, server: a.server, token: a.token, ca_file: a.ca_file, node_name, data_dir: a.data_dir, node_ip: a.node_ip, cluster_cidr: a.cluster_cidr, insecure_registries: a.insecure_registries, runc: a.runc, labels, cpu: a.cpu, memory_bytes: a.memory_bytes, max_pods: a.max_pods, proxy_mode: a.proxy_mode, bpf_dir: a.bpf_dir, socket_lb: a.socket_lb };
    opts.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("while starting the runtime")?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let run = tokio::spawn(shoal_agent::node::run(opts, rx));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            r = run => return r.context("the agent task failed")?,
        }
        tracing::info!("stopping the agent (pods keep running until the agent comes back)");
        let _ = tx.send(true);
        Ok(())
    })
}

fn image(a: ImageArgs) -> anyhow::Result<()> {
    let insecure = match &a.cmd {
        ImageCmd::Pull { insecure_registries, .. } => insecure_registries.clone(),
        _ => vec![],
    };
    let store = shoal_agent::image::ImageStore::open(&a.data_dir.join("images"), insecure).with_context(|| format!("while opening the image store in {}", a.data_dir.display()))?;
    match a.cmd {
        ImageCmd::Import { file, name } => {
            let spinner = indicatif::ProgressBar::new_spinner().with_message(format!("importing {}", file.display()));
            spinner.enable_steady_tick(Duration::from_millis(120));
            let imgs = store.import(&file, name.as_deref());
            spinner.finish_and_clear();
            for i in imgs? {
                println!("imported {} ({}, {} bytes)", i.repo_tags.first().or(i.repo_digests.first()).cloned().unwrap_or_else(|| "<none>".into()), i.id, i.size);
            }
        }
        ImageCmd::List => {
            println!("{:<60} {:<20} {:>12}", "IMAGE", "ID", "SIZE");
            for i in store.list() {
                let id = i.id.trim_start_matches("sha256:").chars().take(12).collect::<String>();
                for n in i.repo_tags.iter().chain(i.repo_tags.is_empty().then_some(&i.repo_digests).into_iter().flatten()) {
                    println!("{n:<60} {id:<20} {:>12}", i.size);
                }
            }
        }
        ImageCmd::Pull { image, .. } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let spinner = indicatif::ProgressBar::new_spinner().with_message(format!("pulling {image}"));
            spinner.enable_steady_tick(Duration::from_millis(120));
            let res = rt.block_on(store.pull(&image, None, true));
            spinner.finish_and_clear();
            let i = res?;
            println!("pulled {} ({})", i.repo_digests.first().cloned().unwrap_or_default(), i.id);
        }
        ImageCmd::Rm { image } => {
            store.remove(&image)?;
            println!("removed {image}");
        }
    }
    Ok(())
}

/// Parses a duration as `300`, `300s`, `5m`, `1h` or `1h30m`.
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().with_context(|| format!("{s:?} is not a duration like 300s, 5m or 1h"))?;
        num.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => bail!("{s:?} is not a duration like 300s, 5m or 1h"),
        };
    }
    if !num.is_empty() {
        bail!("{s:?} is not a duration like 300s, 5m or 1h (a unit is missing)");
    }
    Ok(Duration::from_secs(total))
}

/// Parses `--initial-cluster` and checks that this member is in it.
fn parse_cluster(spec: &str, name: &str) -> anyhow::Result<Vec<(String, SocketAddr)>> {
    let mut out: Vec<(String, SocketAddr)> = Vec::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (n, a) = part.split_once('=').with_context(|| format!("--initial-cluster entry {part:?} is not name=host:port"))?;
        let a = a.trim_start_matches("http://");
        let addr: SocketAddr = a.parse().with_context(|| format!("--initial-cluster entry {part:?}: {a:?} is not host:port"))?;
        if out.iter().any(|(x, _)| x == n) {
            bail!("--initial-cluster names member {n:?} twice");
        }
        out.push((n.to_string(), addr));
    }
    if !out.iter().any(|(n, _)| n == name) {
        bail!("--initial-cluster does not contain this member's --name {name:?}");
    }
    Ok(out)
}

fn server(mut a: ServerArgs) -> anyhow::Result<()> {
    let kubeconfig = a.kubeconfig.take();
    let run_controllers = a.controllers;
    let scheduler_opts = if a.scheduler {
        let profile = shoal_scheduler::framework::Profile::builtin(&a.scheduler_profile).ok_or_else(|| anyhow::anyhow!("--scheduler-profile {:?}: expected shoal or kubernetes", a.scheduler_profile))?;
        let profiles = match &a.scheduler_config {
            Some(f) => {
                let text = std::fs::read_to_string(f).with_context(|| format!("while reading --scheduler-config {}", f.display()))?;
                shoal_scheduler::config::parse(&text, &profile).map_err(|e| anyhow::anyhow!("--scheduler-config {}: {e}", f.display()))?
            }
            None => Default::default(),
        };
        let opts = shoal_scheduler::driver::Options { identity: format!("{}-{}", a.name, std::process::id()), default_profile: profile, workers: a.scheduler_workers, profiles, ..Default::default() };
        opts.validate().map_err(|e| anyhow::anyhow!("scheduler settings refused: {e}"))?;
        Some(opts)
    } else {
        None
    };
    let scheduler_metrics = std::sync::Arc::new(shoal_scheduler::metrics::SchedulerMetrics::default());
    // Bound now, so a taken port fails the start instead of a background task.
    let admin_listener = match a.admin_addr.as_str() {
        // Today the admin API serves the scheduler only (it needs the API server).
        _ if scheduler_opts.is_none() || a.api_addr.is_empty() => None,
        "" => None,
        s => {
            let addr: SocketAddr = s.parse().with_context(|| format!("--admin-addr {s:?} is not host:port"))?;
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("while binding the admin address {addr} (is the port in use?)"))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
    };
    let node_grace = parse_duration(&a.node_monitor_grace_period).with_context(|| format!("--node-monitor-grace-period {:?}", a.node_monitor_grace_period))?;
    let node_eviction_rate = a.node_eviction_rate;
    let (secondary_rate, unhealthy_threshold, large_cluster) = (a.secondary_node_eviction_rate, a.unhealthy_zone_threshold, a.large_cluster_size_threshold);
    let hpa_sync = parse_duration(&a.horizontal_pod_autoscaler_sync_period).with_context(|| format!("--horizontal-pod-autoscaler-sync-period {:?}", a.horizontal_pod_autoscaler_sync_period))?;
    if hpa_sync.is_zero() {
        bail!("--horizontal-pod-autoscaler-sync-period must be longer than 0");
    }
    let plan = shoal_controllers::ipam::Plan {
        cluster: shoal_controllers::ipam::Cidr::parse(&a.cluster_cidr).map_err(|e| anyhow::anyhow!("--cluster-cidr: {e}"))?,
        service: shoal_controllers::ipam::Cidr::parse(&a.service_cluster_ip_range).map_err(|e| anyhow::anyhow!("--service-cluster-ip-range: {e}"))?,
        node_mask: a.node_cidr_mask_size,
    };
    plan.validate().map_err(|e| anyhow::anyhow!("address plan refused: {e}"))?;
    let lb_pool = shoal_controllers::loadbalancer::Pool::parse(&a.load_balancer_ip_pool).map_err(|e| anyhow::anyhow!("--load-balancer-ip-pool: {e}"))?;
    for (what, c) in [("cluster", &plan.cluster), ("service", &plan.service)] {
        if lb_pool.overlaps(c) {
            bail!("--load-balancer-ip-pool overlaps the {what} CIDR {c}");
        }
    }
    if plan.service != shoal_controllers::ipam::Plan::default().service {
        bail!("--service-cluster-ip-range other than 10.96.0.0/12 is not supported yet (the API server allocates ClusterIPs from 10.96.0.0/12)");
    }
    if !(node_eviction_rate > 0.0 && node_eviction_rate.is_finite()) {
        bail!("--node-eviction-rate must be a positive number, got {node_eviction_rate}");
    }
    if !(a.secondary_node_eviction_rate >= 0.0 && a.secondary_node_eviction_rate.is_finite()) {
        bail!("--secondary-node-eviction-rate must be zero or positive, got {}", a.secondary_node_eviction_rate);
    }
    if !(a.unhealthy_zone_threshold > 0.0 && a.unhealthy_zone_threshold <= 1.0) {
        bail!("--unhealthy-zone-threshold must be in (0, 1], got {}", a.unhealthy_zone_threshold);
    }
    let name = a.name.clone();
    let compaction_interval = Some(parse_duration(&a.etcd_compaction_interval).with_context(|| format!("--etcd-compaction-interval {:?}", a.etcd_compaction_interval))?);
    let tls_san = std::mem::take(&mut a.tls_san);
    let initial_cluster = match &a.initial_cluster {
        Some(spec) => {
            let members = parse_cluster(spec, &a.name)?;
            let own = members.iter().find(|(n, _)| *n == a.name).map(|(_, addr)| *addr);
            if own != Some(a.peer_addr) {
                bail!("--initial-cluster gives {} the peer address {:?}, but --peer-addr is {}", a.name, own, a.peer_addr);
            }
            members.into_iter().map(|(n, addr)| (n, addr.to_string())).collect()
        }
        None => vec![],
    };
    let metrics_addr = match a.metrics_addr.as_str() {
        "" => None,
        s => Some(s.parse::<SocketAddr>().with_context(|| format!("--metrics-addr {s:?} is not host:port"))?),
    };
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 || threads > 1024 {
        bail!("--threads must be between 1 and 1024, got {threads}");
    }
    let store = shoal_store::StoreConfig {
        name: a.name.clone(),
        client_url: format!("http://{}", a.etcd_addr),
        peer_addr: a.peer_addr.to_string(),
        initial_cluster,
        new_cluster: a.initial_cluster_state == ClusterState::New,
        heartbeat: Duration::from_millis(a.heartbeat_interval),
        election_timeout: Duration::from_millis(a.election_timeout),
        fault_file: a.fault_file.clone(),
        quota_bytes: a.quota_backend_bytes,
        max_request_bytes: a.max_request_bytes,
        snapshot_entries: a.snapshot_count,
        progress_interval: Duration::from_secs(a.watch_progress_notify_interval.max(1)),
    };
    store.validate().map_err(anyhow::Error::msg)?;
    let data_dir = a.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("{}.shoal", a.name)));
    let api_addr = match a.api_addr.as_str() {
        "" => None,
        s => Some(s.parse::<SocketAddr>().with_context(|| format!("--api-addr {s:?} is not host:port"))?),
    };
    let external: Option<Vec<String>> = match &a.store {
        None => None,
        Some(s) => {
            let list = s.strip_prefix("etcd://").with_context(|| format!("--store {s:?}: only etcd://HOST:PORT[,HOST:PORT...] is supported"))?;
            let eps: Vec<String> = list.split(',').filter(|e| !e.is_empty()).map(|e| e.trim_start_matches("etcd://").to_string()).collect();
            for e in &eps {
                e.parse::<SocketAddr>().or_else(|_| std::net::ToSocketAddrs::to_socket_addrs(e.as_str()).map(|_| "0.0.0.0:0".parse().expect("literal")))
                    .with_context(|| format!("--store endpoint {e:?} is not host:port"))?;
            }
            if eps.is_empty() {
                bail!("--store {s:?} names no endpoint");
            }
            if api_addr.is_none() {
                bail!("--store needs the API server (--api-addr)");
            }
            Some(eps)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("shoal-main").enable_all().build()?;
    let (running, backend, ready): (_, _, std::sync::Arc<dyn Fn() -> bool + Send + Sync>) = match external {
        Some(eps) => {
            let _g = rt.enter();
            std::fs::create_dir_all(&data_dir).with_context(|| format!("while creating {}", data_dir.display()))?;
            (None, shoal_apiserver::backend::Backend::connect_etcd(&eps)?, std::sync::Arc::new(|| true))
        }
        None => {
            let running = start_store(a, data_dir.clone(), store, metrics_addr, threads)?;
            let m = running.member.clone();
            let backend = shoal_apiserver::backend::Backend::Embedded(m.clone());
            (Some(running), backend, std::sync::Arc::new(move || !m.is_failed() && m.leader().is_some()))
        }
    };
    let _api = match api_addr {
        Some(addr) => {
            let cfg = shoal_apiserver::server::ApiConfig {
                addr,
                threads,
                pki_dir: data_dir.join("pki"),
                kubeconfig: Some(kubeconfig.unwrap_or_else(|| data_dir.join("kubeconfig"))),
                extra_sans: tls_san,
                compaction_interval: compaction_interval.filter(|d| !d.is_zero()),
            };
            let member = running.as_ref().map(|r| r.member.clone());
            let sm = scheduler_metrics.clone();
            let api = shoal_apiserver::server::start(cfg, backend, ready, |reg| {
                if let Some(m) = member {
                    m.metrics.register(reg.sub_registry_with_prefix("etcd"));
                }
                sm.register(reg);
            })?;
            tracing::info!(kubeconfig = %data_dir.join("kubeconfig").display(), "use it with: kubectl --kubeconfig {}", data_dir.join("kubeconfig").display());
            let host = if api.addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { api.addr.ip().to_string() };
            let client_for = |user_agent: &str, conns: usize| {
                let cfg = shoal_client::Config {
                    server: format!("https://{}", if api.addr.is_ipv6() { format!("[{host}]:{}", api.addr.port()) } else { format!("{host}:{}", api.addr.port()) }),
                    ca_pem: api.credentials.ca_pem.clone(),
                    token: api.credentials.admin_token.clone(),
                    user_agent: user_agent.into(),
                };
                shoal_client::Client::new(cfg, conns)
            };
            if let Some(opts) = scheduler_opts {
                let client = client_for("shoal-scheduler/v0.1.0", 2)?;
                let metrics = scheduler_metrics.clone();
                let token: std::sync::Arc<str> = api.credentials.admin_token.trim().into();
                std::thread::Builder::new().name("scheduler".into()).spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("scheduler-io").enable_all().build().expect("building the scheduler runtime");
                    rt.block_on(async move {
                        let workers = opts.workers as u32;
                        let handle = shoal_scheduler::driver::start(client, opts, metrics);
                        if let Some(l) = admin_listener {
                            let svc = shoal_scheduler::admin::Service { handle, workers };
                            if let Err(e) = shoal_admin_serve(l, svc, token).await {
                                tracing::error!(error = %e, "the admin API stopped");
                            }
                        }
                        std::future::pending::<()>().await
                    });
                })?;
            }
            if run_controllers {
                let client = client_for("shoal-controller-manager/v0.1.0", 2)?;
                let opts = shoal_controllers::Options {
                    identity: format!("{}-{}", name, std::process::id()),
                    plan: plan.clone(),
                    nodes: shoal_controllers::nodelifecycle::Settings {
                        grace: node_grace,
                        period: std::time::Duration::from_secs(node_grace.as_secs().clamp(1, 5)),
                        eviction_rate: node_eviction_rate,
                        secondary_rate,
                        unhealthy_threshold,
                        large_cluster,
                    },
                    hpa_sync,
                    lb_pool: lb_pool.clone(),
                    ..Default::default()
                };
                std::thread::Builder::new().name("controllers".into()).spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("controllers").enable_all().build().expect("building the controllers runtime");
                    rt.block_on(async move {
                        let _lead = shoal_controllers::start(client, opts);
                        std::future::pending::<()>().await
                    });
                })?;
            }
            Some(api)
        }
        None => None,
    };
    let _running = running;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        anyhow::Ok(())
    })
}

/// Serves the operator gRPC API (with reflection) on `l`.
async fn shoal_admin_serve(l: std::net::TcpListener, svc: shoal_scheduler::admin::Service, token: std::sync::Arc<str>) -> anyhow::Result<()> {
    use shoal_proto::admin::scheduler_admin_server::SchedulerAdminServer;
    let addr = l.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(tokio::net::TcpListener::from_std(l)?);
    let reflection = tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(shoal_proto::admin::FILE_DESCRIPTOR_SET).build_v1()?;
    tracing::info!(%addr, "admin API serving (gRPC, reflection)");
    tonic::transport::Server::builder()
        .add_service(reflection)
        .add_service(SchedulerAdminServer::with_interceptor(svc, shoal_scheduler::admin::TokenCheck(token)))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// Starts the embedded store member.
fn start_store(a: ServerArgs, data_dir: PathBuf, store: shoal_store::StoreConfig, metrics_addr: Option<SocketAddr>, threads: usize) -> anyhow::Result<shoal_store::server::Running> {
    let opts = shoal_store::server::ServerOptions {
        data_dir,
        etcd_addr: a.etcd_addr,
        peer_addr: a.peer_addr,
        metrics_addr,
        threads,
        executor: match a.executor {
            ExecutorArg::PerCore => shoal_store::server::Executor::PerCore,
            ExecutorArg::WorkStealing => shoal_store::server::Executor::WorkStealing,
        },
        uring: matches!(a.wal_io, WalIo::Uring),
        store,
    };
    shoal_store::server::start(opts)
}
