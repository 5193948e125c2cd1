//! `loadgen`: Shoal's load generator. Each scenario shows progress, prints a human
//! table, and prints one JSON object as its very last line (format in BENCHMARKS.md).

mod api;
mod dataplane;
mod hollow;
mod node;
mod procs;
mod scheduler;
mod store;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmarks Shoal against the systems it replaces, side by side in one run.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about)]
struct Cli {
    /// Also write the final JSON result to this file (default: target/loadgen/<scenario>.json);
    /// a Markdown summary goes beside it (same name, `.md`).
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// etcd v3 workloads (put, get, txn, watch fan-out, mix) against Shoal and a real etcd.
    Store(store::StoreArgs),
    /// Kubernetes API workloads (pod create/get/update/delete, LIST of many pods) against
    /// `shoal server` on its embedded store and on a real etcd.
    Api(api::ApiArgs),
    /// Upstream scheduler_perf workloads against Shoal's scheduling core, in-process.
    Scheduler(scheduler::SchedulerArgs),
    /// Simulated nodes (real agent-protocol clients on a simulated runtime) joining a
    /// running cluster, for as long as --duration-s.
    Hollow(hollow::HollowArgs),
    /// Starts `shoal server` and hollow nodes, creates `nodes × pods-per-node` pods through
    /// Deployments, and measures pod startup latency, all-running time and memory.
    Density(hollow::DensityArgs),
    /// Starts `shoal server` and hollow nodes, then creates Deployments and Services, scales
    /// every Deployment and deletes everything (upstream's load test in small).
    Load(hollow::LoadArgs),
    /// One real node: `shoal server` and `shoal agent` (runc) in a network namespace of
    /// their own; pod startup latency with a cached image, agent memory and CPU per pod.
    Node(node::NodeArgs),
    /// The service proxy: connect rate to the last of 10,000 services with no rules, eBPF,
    /// nftables and iptables-legacy; cold load, one change, iperf3 throughput (needs root).
    Dataplane(dataplane::DataplaneArgs),
}

/// A Markdown summary of a result: one row per measured value (nested objects flattened
/// with dotted names), for pasting into docs/benchmarks.md.
fn markdown(v: &serde_json::Value) -> String {
    fn rows(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    rows(&name, x, out);
                }
            }
            serde_json::Value::Number(n) => {
                let s = match n.as_f64() {
                    Some(f) if n.is_f64() => format!("{f:.3}"),
                    _ => n.to_string(),
                };
                out.push((prefix.to_string(), s));
            }
            other => out.push((prefix.to_string(), other.to_string().trim_matches('"').to_string())),
        }
    }
    let mut r = Vec::new();
    rows("", v, &mut r);
    let mut s = format!("# loadgen {}\n\n| measure | value |\n|---|---|\n", v["scenario"].as_str().unwrap_or("result"));
    for (k, x) in r.into_iter().filter(|(k, _)| k != "scenario") {
        s.push_str(&format!("| {k} | {x} |\n"));
    }
    s
}

fn main() {
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Node(_) | Cmd::Dataplane(_)) {
        // Before the runtime starts threads: they and every child inherit the namespace.
        if let Err(e) = node::enter_own_netns() {
            eprintln!("loadgen: error: {e:#}");
            std::process::exit(1);
        }
    }
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let res = rt.block_on(async {
        match cli.cmd {
            Cmd::Store(a) => store::run(a).await,
            Cmd::Api(a) => api::run(a).await,
            Cmd::Scheduler(a) => scheduler::run(a).await,
            Cmd::Hollow(a) => hollow::hollow(a).await,
            Cmd::Density(a) => hollow::density(a).await,
            Cmd::Load(a) => hollow::load(a).await,
            Cmd::Node(a) => node::node(a).await,
            Cmd::Dataplane(a) => tokio::task::spawn_blocking(move || dataplane::run(a)).await.unwrap_or_else(|e| Err(anyhow::anyhow!("the dataplane scenario panicked: {e}"))),
        }
    });
    match res {
        Ok(v) => {
            let line = v.to_string();
            let name = v["scenario"].as_str().unwrap_or("result").replace('/', "-");
            let out = cli.out.unwrap_or_else(|| PathBuf::from(format!("target/loadgen/{name}.json")));
            if let Some(dir) = out.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = std::fs::write(&out, format!("{line}\n")) {
                eprintln!("loadgen: warning: could not write {}: {e}", out.display());
            }
            let md = out.with_extension("md");
            if let Err(e) = std::fs::write(&md, markdown(&v)) {
                eprintln!("loadgen: warning: could not write {}: {e}", md.display());
            }
            println!("{line}");
        }
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            std::process::exit(1);
        }
    }
}
