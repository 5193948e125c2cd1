//! `shoal admin`: the operator CLI over the admin gRPC API — argument parsing, the calls,
//! and rendering (human tables or `-o json`). Exit codes: 0 done, 1 server error,
//! 2 usage, 3 unreachable, 4 not allowed (token), 5 invalid change, 6 not found.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use shoal_proto::admin as pb;
use shoal_proto::admin::scheduler_admin_client::SchedulerAdminClient;

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The server's admin API (its `--admin-addr`).
    #[arg(long, default_value = "http://127.0.0.1:6444", env = "SHOAL_ADMIN_SERVER")]
    server: String,
    /// File holding the admin token (the server's `DATA_DIR/pki/admin.token`).
    #[arg(long, default_value = "shoal-data/pki/admin.token", env = "SHOAL_ADMIN_TOKEN_FILE")]
    token_file: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "human")]
    output: Output,
    #[command(subcommand)]
    cmd: AdminCmd,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum AdminCmd {
    /// The scheduler: profiles, live tuning, queue, explain.
    Scheduler {
        #[command(subcommand)]
        cmd: SchedulerCmd,
    },
}

#[derive(Subcommand, Debug)]
enum SchedulerCmd {
    /// Show every profile (weights, percentageOfNodesToScore, parallelism) and the workers.
    Config,
    /// Change a profile now. The whole change is validated first; a refused change leaves
    /// the profile as it was.
    Set {
        /// The schedulerName whose profile changes.
        #[arg(long, default_value = "default-scheduler")]
        profile: String,
        /// PLUGIN=WEIGHT (repeatable): NodeResourcesFit, NodeResourcesBalancedAllocation,
        /// ImageLocality, NodeAffinity, TaintToleration, InterPodAffinity, PodTopologySpread.
        #[arg(long = "weight")]
        weights: Vec<String>,
        /// Stop filtering once this share of the nodes (at least 100) is feasible (1–100).
        #[arg(long)]
        percentage_of_nodes_to_score: Option<u32>,
        /// Threads evaluating one pod's nodes (1–256).
        #[arg(long)]
        parallelism: Option<u32>,
        /// Start again from a built-in profile (shoal or kubernetes) first.
        #[arg(long)]
        reset_to: Option<String>,
    },
    /// Queue sizes (active, backoff, unschedulable, in flight) and cache counts.
    Queue,
    /// Every node's filter verdict and score for a pending pod.
    Explain {
        /// NAMESPACE/NAME of a pod waiting in the scheduler's queue.
        pod: String,
    },
}

/// A failure with the exit code it maps to.
pub struct Failure(pub i32, pub String);

fn from_status(server: &str, s: tonic::Status) -> Failure {
    use tonic::Code;
    let code = match s.code() {
        Code::Unavailable => return Failure(3, format!("cannot reach the admin API at {server}: {} (is `shoal server` running with --admin-addr?)", s.message())),
        Code::Unauthenticated | Code::PermissionDenied => 4,
        Code::InvalidArgument => 5,
        Code::NotFound => 6,
        _ => 1,
    };
    Failure(code, s.message().to_string())
}

fn weights_json(w: &Option<pb::Weights>) -> Value {
    let w = w.clone().unwrap_or_default();
    json!({
        "NodeResourcesFit": w.node_resources_least_allocated, "NodeResourcesBalancedAllocation": w.node_resources_balanced_allocation,
        "ImageLocality": w.image_locality, "NodeAffinity": w.node_affinity, "TaintToleration": w.taint_toleration,
        "InterPodAffinity": w.inter_pod_affinity, "PodTopologySpread": w.pod_topology_spread,
    })
}

fn render_config(c: &pb::SchedulerConfig, out: Output) -> String {
    if out == Output::Json {
        let profiles: Vec<Value> = c.profiles.iter().map(|p| json!({"schedulerName": p.scheduler_name, "base": p.base, "weights": weights_json(&p.weights), "percentageOfNodesToScore": p.percentage_of_nodes_to_score, "parallelism": p.parallelism})).collect();
        return json!({"profiles": profiles, "workers": c.workers, "leader": c.leader}).to_string();
    }
    let mut s = format!("{:<20} {:<11} {:>4} {:>9} {:>6} {:>9} {:>6} {:>8} {:>7} {:>7} {:>12}\n", "SCHEDULER NAME", "BASE", "FIT", "BALANCED", "IMAGE", "NODE-AFF", "TAINT", "POD-AFF", "SPREAD", "SCORE%", "PARALLELISM");
    for p in &c.profiles {
        let w = p.weights.clone().unwrap_or_default();
        s += &format!(
            "{:<20} {:<11} {:>4} {:>9} {:>6} {:>9} {:>6} {:>8} {:>7} {:>7} {:>12}\n",
            p.scheduler_name, p.base, w.node_resources_least_allocated, w.node_resources_balanced_allocation, w.image_locality, w.node_affinity, w.taint_toleration, w.inter_pod_affinity, w.pod_topology_spread, p.percentage_of_nodes_to_score, p.parallelism
        );
    }
    s += &format!("workers: {}, leader: {}", c.workers, c.leader);
    s
}

/// Runs one admin command; the text to print, or the failure.
pub async fn run(a: AdminArgs) -> Result<String, Failure> {
    let token = std::fs::read_to_string(&a.token_file).map_err(|e| Failure(4, format!("reading the admin token {}: {e} (pass --token-file DATA_DIR/pki/admin.token)", a.token_file.display())))?;
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim()).parse().map_err(|_| Failure(4, format!("{} does not hold a valid token", a.token_file.display())))?;
    let endpoint = tonic::transport::Endpoint::from_shared(a.server.clone()).map_err(|e| Failure(2, format!("--server {:?}: {e}", a.server)))?.connect_timeout(std::time::Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| Failure(3, format!("cannot reach the admin API at {}: {e} (is `shoal server` running with --admin-addr?)", a.server)))?;
    let mut client = SchedulerAdminClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", token.clone());
        Ok(r)
    });
    let server = a.server.clone();
    let st = |s| from_status(&server, s);
    let AdminCmd::Scheduler { cmd } = a.cmd;
    match cmd {
        SchedulerCmd::Config => {
            let c = client.get_config(pb::GetSchedulerConfigRequest {}).await.map_err(st)?.into_inner();
            Ok(render_config(&c, a.output))
        }
        SchedulerCmd::Set { profile, weights, percentage_of_nodes_to_score, parallelism, reset_to } => {
            let mut req = pb::UpdateProfileRequest { scheduler_name: profile, reset_to, percentage_of_nodes_to_score, parallelism, ..Default::default() };
            for w in &weights {
                let (k, v) = w.split_once('=').ok_or_else(|| Failure(2, format!("--weight {w:?}: expected PLUGIN=WEIGHT")))?;
                let v: i64 = v.trim().parse().map_err(|_| Failure(2, format!("--weight {w:?}: the weight must be an integer")))?;
                req.weights.insert(k.trim().to_string(), v);
            }
            let c = client.update_profile(req).await.map_err(st)?.into_inner();
            Ok(render_config(&c, a.output))
        }
        SchedulerCmd::Queue => {
            let q = client.get_queue_stats(pb::QueueStatsRequest {}).await.map_err(st)?.into_inner();
            Ok(match a.output {
                Output::Json => json!({"active": q.active, "backoff": q.backoff, "unschedulable": q.unschedulable, "inFlight": q.in_flight, "nodes": q.nodes, "placedPods": q.placed_pods}).to_string(),
                Output::Human => format!("active: {}\nbackoff: {}\nunschedulable: {}\nin flight: {}\nnodes: {}\nplaced pods: {}", q.active, q.backoff, q.unschedulable, q.in_flight, q.nodes, q.placed_pods),
            })
        }
        SchedulerCmd::Explain { pod } => {
            let (namespace, name) = pod.split_once('/').ok_or_else(|| Failure(2, format!("{pod:?}: expected NAMESPACE/NAME")))?;
            let e = client.explain(pb::ExplainRequest { namespace: namespace.into(), name: name.into() }).await.map_err(st)?.into_inner();
            Ok(match a.output {
                Output::Json => {
                    let nodes: Vec<Value> = e.nodes.iter().map(|n| json!({"node": n.node, "feasible": n.feasible, "reasons": n.reasons, "score": n.score})).collect();
                    json!({"pod": e.pod, "profile": e.profile, "summary": e.summary, "chosen": e.chosen, "nodes": nodes}).to_string()
                }
                Output::Human => {
                    let mut s = format!("pod {} (profile {})\n", e.pod, e.profile);
                    s += &if e.chosen.is_empty() { format!("no node fits: {}\n", e.summary) } else { format!("would choose: {}\n", e.chosen) };
                    s += &format!("{:<24} {:<9} {:>8}  {}\n", "NODE", "FEASIBLE", "SCORE", "REASONS");
                    for n in &e.nodes {
                        s += &format!("{:<24} {:<9} {:>8}  {}\n", n.node, n.feasible, if n.feasible { n.score.to_string() } else { "-".into() }, n.reasons.join(", "));
                    }
                    s.trim_end().to_string()
                }
            })
        }
    }
}
