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
    /// This node's service proxy, read from its pinned BPF maps (run it on the node, as
    /// root; no server needed).
    Dataplane {
        /// The agent's `--bpf-dir`.
        #[arg(long, default_value = "/sys/fs/bpf/shoal")]
        bpf_dir: PathBuf,
        #[command(subcommand)]
        cmd: DataplaneCmd,
    },
}

#[derive(Subcommand, Debug)]
enum DataplaneCmd {
    /// Every service frontend with its backends, in slot order (like `cilium bpf lb list`).
    Services,
    /// Every backend entry (id, address, flags).
    Backends,
    /// Connection-tracking entries (both directions of each service flow, and the
    /// non-TCP flows network policy let through).
    Conntrack,
    /// NetworkPolicy: each isolated pod of this node with its subject, and every rule
    /// (like `cilium bpf policy get --all`).
    Policy,
    /// The policy identities of addresses and CIDRs (longest prefix wins).
    Ipcache,
    /// The programs' packet counters, summed over CPUs (translated, reversed, rejected,
    /// dropped by policy, spoofed, turned around by XDP, connects translated at socket level).
    Stats,
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
    if let AdminCmd::Dataplane { bpf_dir, cmd } = &a.cmd {
        return dataplane(bpf_dir, cmd, a.output);
    }
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
    let AdminCmd::Scheduler { cmd } = a.cmd else { unreachable!("handled above") };
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

fn dataplane(dir: &std::path::Path, cmd: &DataplaneCmd, out: Output) -> Result<String, Failure> {
    use shoal_dataplane::abi::{addr_of, BACKEND_F_TERMINATING, CT_F_CLOSING, CT_F_ESTABLISHED, CT_F_HAIRPIN, CT_F_SNAT, CT_POLICY, CT_REVERSE, SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_MAGLEV, SVC_F_NODEPORT};
    if !dir.join("shoal_services").exists() {
        return Err(Failure(3, format!("no service proxy maps in {} (is `shoal agent` running here with --bpf-dir {}? are you root?)", dir.display(), dir.display())));
    }
    let maps = shoal_dataplane::loader::Pinned::open(dir).map_err(|e| Failure(3, format!("{e} (root is needed to read BPF maps)")))?;
    let proto = |p: u8| match p {
        6 => "TCP".to_string(),
        17 => "UDP".to_string(),
        132 => "SCTP".to_string(),
        1 => "ICMP".to_string(),
        n => n.to_string(),
    };
    let port = |p: u16| u16::from_be(p);
    match cmd {
        DataplaneCmd::Services => {
            let backends: std::collections::HashMap<u32, shoal_dataplane::abi::Backend> = maps.backends().into_iter().collect();
            let mut entries = maps.services();
            entries.sort_by_key(|(k, _)| (k.addr.to_be(), port(k.port), k.proto, k.slot));
            let mut rows: Vec<Value> = Vec::new();
            for (k, v) in entries.iter().filter(|(k, _)| k.slot == 0) {
                let mut kind = vec![];
                for (f, n) in [(SVC_F_NODEPORT, "NodePort"), (SVC_F_EXTERNAL, "External"), (SVC_F_LOCAL, "Local"), (SVC_F_MAGLEV, "Maglev")] {
                    if v.flags & f != 0 {
                        kind.push(n);
                    }
                }
                let list: Vec<String> = (1..=v.count)
                    .map(|slot| {
                        let id = entries.iter().find(|(s, _)| s.with_slot(0) == *k && s.slot == slot).map(|(_, sv)| sv.backend_id);
                        match id.and_then(|id| backends.get(&id).map(|b| (id, b))) {
                            Some((id, b)) => format!("{}:{} (#{id}{})", b.ip(), b.host_port(), if b.flags & BACKEND_F_TERMINATING != 0 { ", terminating" } else { "" }),
                            None => "(missing)".into(),
                        }
                    })
                    .collect();
                rows.push(json!({"frontend": format!("{}:{}/{}", k.ip(), k.host_port(), proto(k.proto)), "serviceId": v.svc_id, "kind": if kind.is_empty() { "ClusterIP".to_string() } else { kind.join(",") }, "affinitySeconds": v.affinity_timeout, "backends": list}));
            }
            Ok(match out {
                Output::Json => Value::Array(rows).to_string(),
                Output::Human => {
                    let mut s = format!("{:<28} {:<6} {:<20} BACKENDS\n", "FRONTEND", "ID", "KIND");
                    for r in &rows {
                        let b: Vec<&str> = r["backends"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                        s.push_str(&format!("{:<28} {:<6} {:<20} {}\n", r["frontend"].as_str().unwrap_or(""), r["serviceId"], r["kind"].as_str().unwrap_or(""), if b.is_empty() { "(none: rejected)".to_string() } else { b.join(", ") }));
                    }
                    s.trim_end().to_string()
                }
            })
        }
        DataplaneCmd::Backends => {
            let mut b = maps.backends();
            b.sort_by_key(|(id, _)| *id);
            Ok(match out {
                Output::Json => Value::Array(b.iter().map(|(id, b)| json!({"id": id, "address": format!("{}:{}", b.ip(), b.host_port()), "protocol": proto(b.proto), "terminating": b.flags & BACKEND_F_TERMINATING != 0})).collect()).to_string(),
                Output::Human => {
                    let mut s = format!("{:<8} {:<22} {:<6} STATE\n", "ID", "ADDRESS", "PROTO");
                    for (id, b) in &b {
                        s.push_str(&format!("{:<8} {:<22} {:<6} {}\n", id, format!("{}:{}", b.ip(), b.host_port()), proto(b.proto), if b.flags & BACKEND_F_TERMINATING != 0 { "terminating" } else { "active" }));
                    }
                    s.trim_end().to_string()
                }
            })
        }
        DataplaneCmd::Conntrack => {
            let now = std::fs::read_to_string("/proc/uptime").ok().and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok()).unwrap_or(0.0);
            let rows: Vec<Value> = maps
                .conntrack()
                .into_iter()
                .map(|(k, e)| {
                    let mut flags = vec![];
                    for (f, n) in [(CT_F_ESTABLISHED, "established"), (CT_F_CLOSING, "closing"), (CT_F_HAIRPIN, "hairpin"), (CT_F_SNAT, "snat")] {
                        if e.flags & f != 0 {
                            flags.push(n);
                        }
                    }
                    let direction = match k.dir {
                        CT_REVERSE => "reply",
                        CT_POLICY => "policy",
                        _ => "forward",
                    };
                    json!({"direction": direction, "protocol": proto(k.proto),
                        "source": format!("{}:{}", addr_of(k.saddr), port(k.sport)), "destination": format!("{}:{}", addr_of(k.daddr), port(k.dport)),
                        "translatedTo": format!("{}:{}", addr_of(e.nat_addr), port(e.nat_port)), "serviceId": e.svc_id, "backendId": e.backend_id,
                        "flags": flags.join(","), "expiresInSeconds": (e.expires as f64 / 1e9 - now).round()})
                })
                .collect();
            Ok(match out {
                Output::Json => Value::Array(rows).to_string(),
                Output::Human => {
                    let mut s = format!("{:<8} {:<5} {:<22} {:<22} {:<22} {:<8} FLAGS\n", "DIR", "PROTO", "SOURCE", "DESTINATION", "TRANSLATED", "EXPIRES");
                    for r in &rows {
                        let f = |k: &str| r[k].as_str().unwrap_or("").to_string();
                        s.push_str(&format!("{:<8} {:<5} {:<22} {:<22} {:<22} {:<8} {}\n", f("direction"), f("protocol"), f("source"), f("destination"), f("translatedTo"), format!("{}s", r["expiresInSeconds"]), f("flags")));
                    }
                    s.push_str(&format!("{} entries", rows.len()));
                    s
                }
            })
        }
        DataplaneCmd::Stats => {
            let stats = shoal_dataplane::loader::pinned_stats(dir).map_err(|e| Failure(3, format!("{e} (root is needed to read BPF maps)")))?;
            Ok(match out {
                Output::Json => Value::Object(stats.iter().map(|(k, v)| (k.to_string(), json!(v))).collect()).to_string(),
                Output::Human => {
                    let mut s = format!("{:<18} PACKETS\n", "COUNTER");
                    for (k, v) in &stats {
                        s.push_str(&format!("{k:<18} {v}\n"));
                    }
                    s.trim_end().to_string()
                }
            })
        }
        DataplaneCmd::Policy | DataplaneCmd::Ipcache => {
            use shoal_dataplane::abi::{EP_F_EGRESS, EP_F_INGRESS, ID_ANY, ID_WORLD, IPC_F_HOST, POLICY_EXACT, POLICY_PROTO, POL_INGRESS};
            let pm = shoal_dataplane::loader::Pinned::open_policy(dir).map_err(|e| Failure(3, format!("{e} (an agent older than network policy?)")))?;
            let (ipcache, endpoints, rules) = pm.read();
            let identity = |id: u32| match id {
                ID_ANY => "any".to_string(),
                ID_WORLD => "world".to_string(),
                n => n.to_string(),
            };
            if matches!(cmd, DataplaneCmd::Ipcache) {
                let mut rows = ipcache;
                rows.sort_by_key(|(p, _)| (p.0, p.1));
                let rows: Vec<Value> = rows.iter().map(|(p, v)| json!({"prefix": p.to_string(), "identity": v.identity, "host": v.flags & IPC_F_HOST != 0})).collect();
                return Ok(match out {
                    Output::Json => Value::Array(rows).to_string(),
                    Output::Human => {
                        let mut s = format!("{:<20} {:<10} FLAGS\n", "PREFIX", "IDENTITY");
                        for r in &rows {
                            s.push_str(&format!("{:<20} {:<10} {}\n", r["prefix"].as_str().unwrap_or(""), r["identity"], if r["host"] == true { "host" } else { "" }));
                        }
                        s.push_str(&format!("{} entries", rows.len()));
                        s
                    }
                });
            }
            let mut eps = endpoints;
            eps.sort_by_key(|(a, _)| u32::from(*a));
            let mut rules = rules;
            rules.sort_by_key(|(l, k)| (k.subject, k.dir, k.peer, k.proto, u16::from_be(k.port), *l));
            let rule_rows = |subject: u32| -> Vec<Value> {
                rules.iter().filter(|(_, k)| k.subject == subject).map(|(len, k)| {
                    let (p, ports) = if *len <= POLICY_EXACT {
                        ("any".to_string(), "any".to_string())
                    } else if *len <= POLICY_PROTO {
                        (proto(k.proto), "any".to_string())
                    } else {
                        let start = u16::from_be(k.port);
                        let span = 1u32 << (96 - len);
                        let end = u32::from(start) + span - 1;
                        (proto(k.proto), if span == 1 { start.to_string() } else { format!("{start}-{end}") })
                    };
                    json!({"direction": if k.dir == POL_INGRESS { "ingress" } else { "egress" }, "peerIdentity": identity(k.peer), "protocol": p, "ports": ports})
                }).collect()
            };
            let rows: Vec<Value> = eps.iter().map(|(a, e)| {
                let mut iso = vec![];
                if e.flags & EP_F_INGRESS != 0 {
                    iso.push("ingress");
                }
                if e.flags & EP_F_EGRESS != 0 {
                    iso.push("egress");
                }
                json!({"pod": a.to_string(), "subject": e.subject, "isolated": iso.join(","), "allow": rule_rows(e.subject)})
            }).collect();
            Ok(match out {
                Output::Json => Value::Array(rows).to_string(),
                Output::Human => {
                    let mut s = String::new();
                    for r in &rows {
                        s.push_str(&format!("pod {} (subject {}, isolated for {})\n", r["pod"].as_str().unwrap_or(""), r["subject"], r["isolated"].as_str().unwrap_or("")));
                        let allow = r["allow"].as_array().cloned().unwrap_or_default();
                        if allow.is_empty() {
                            s.push_str("    (no rule: everything denied)\n");
                        }
                        for a in &allow {
                            let f = |k: &str| a[k].as_str().unwrap_or("").to_string();
                            s.push_str(&format!("    allow {:<8} peer {:<8} {:<5} ports {}\n", f("direction"), f("peerIdentity"), f("protocol"), f("ports")));
                        }
                    }
                    s.push_str(&format!("{} isolated pods", rows.len()));
                    s
                }
            })
        }
    }
}
