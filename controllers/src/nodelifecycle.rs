//! Node lifecycle: a node whose kubelet (agent) stopped renewing its Lease in
//! `kube-node-lease` and posting status for the grace period gets its Ready condition set to
//! Unknown and the `node.kubernetes.io/unreachable` NoExecute taint; a node reporting Ready
//! False gets `node.kubernetes.io/not-ready`; the taints go away when it is Ready again.
//! Pods on a node with a NoExecute taint they do not tolerate are evicted (those that
//! tolerate it for `tolerationSeconds` after that long), at most `eviction_rate` nodes per
//! second per zone (`topology.kubernetes.io/region` + `zone` labels), as upstream's rate
//! limiters. A zone where at least `unhealthy_threshold` of the nodes (and more than two)
//! are not ready is partially disrupted and evicts at `secondary_rate` (zero in zones of
//! at most `large_cluster` nodes); when every node of every zone is not ready the
//! controller assumes it, not the nodes, is cut off ("master disruption mode"): it evicts
//! nothing and puts no NoExecute taints until a node is ready again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shoal_client::{time, Client};

use crate::informer::Informer;
use crate::pod::Pod;
use crate::Leadership;

const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const NOT_READY: &str = "node.kubernetes.io/not-ready";

/// Settings (upstream's flags of the same meaning).
#[derive(Clone, Debug)]
pub struct Settings {
    /// `--node-monitor-grace-period`.
    pub grace: Duration,
    /// How often nodes are checked (`--node-monitor-period`).
    pub period: Duration,
    /// Nodes whose pods may be evicted per second, per zone (`--node-eviction-rate`).
    pub eviction_rate: f64,
    /// The rate in a partially disrupted zone (`--secondary-node-eviction-rate`).
    pub secondary_rate: f64,
    /// Share of not-ready nodes that makes a zone partially disrupted
    /// (`--unhealthy-zone-threshold`).
    pub unhealthy_threshold: f64,
    /// Zones of at most this many nodes stop evicting when partially disrupted
    /// (`--large-cluster-size-threshold`).
    pub large_cluster: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { grace: Duration::from_secs(40), period: Duration::from_secs(5), eviction_rate: 0.1, secondary_rate: 0.01, unhealthy_threshold: 0.55, large_cluster: 50 }
    }
}

/// A zone's health (upstream's ZoneState).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneState {
    Normal,
    PartialDisruption,
    FullDisruption,
}

pub fn zone_state(not_ready: usize, total: usize, threshold: f64) -> ZoneState {
    if total > 0 && not_ready == total {
        ZoneState::FullDisruption
    } else if not_ready > 2 && not_ready as f64 / total as f64 >= threshold {
        ZoneState::PartialDisruption
    } else {
        ZoneState::Normal
    }
}

/// Evictions per second allowed in a zone of `size` nodes in `state`.
pub fn zone_rate(state: ZoneState, size: usize, s: &Settings) -> f64 {
    match state {
        ZoneState::Normal | ZoneState::FullDisruption => s.eviction_rate,
        ZoneState::PartialDisruption if size > s.large_cluster => s.secondary_rate,
        ZoneState::PartialDisruption => 0.0,
    }
}

fn zone_of(node: &Value) -> String {
    let l = |k: &str| node.pointer("/metadata/labels").and_then(|m| m.get(k)).and_then(Value::as_str).unwrap_or("").to_string();
    format!("{}:\u{0}:{}", l("topology.kubernetes.io/region"), l("topology.kubernetes.io/zone"))
}

fn ready_condition(node: &Value) -> Option<&Value> {
    node.pointer("/status/conditions")?.as_array()?.iter().find(|c| c["type"] == "Ready")
}

/// The last sign of life: the Lease's renewTime or the Ready condition's heartbeat.
fn last_heartbeat(node: &Value, lease: Option<&Value>) -> i64 {
    let from_lease = lease.and_then(|l| l.pointer("/spec/renewTime")).and_then(Value::as_str).and_then(time::parse).unwrap_or(0);
    let from_status = ready_condition(node).and_then(|c| c["lastHeartbeatTime"].as_str()).and_then(time::parse).unwrap_or(0);
    let created = node.pointer("/metadata/creationTimestamp").and_then(Value::as_str).and_then(time::parse).unwrap_or(0);
    from_lease.max(from_status).max(created)
}

pub fn start(client: Client, nodes: Informer, leases: Informer, pods: Informer<Pod>, lead: Leadership, s: Settings) {
    tokio::spawn(async move {
        // Per zone: eviction tokens (one node's pods per token).
        let mut tokens: HashMap<String, f64> = HashMap::new();
        let mut last = Instant::now();
        let mut disrupted = false;
        // When each node got its NoExecute taint (for tolerationSeconds).
        let mut tainted_since: HashMap<String, i64> = HashMap::new();
        loop {
            tokio::time::sleep(s.period).await;
            let elapsed = last.elapsed().as_secs_f64();
            last = Instant::now();
            if !lead.is_leader() || !nodes.is_synced() {
                continue;
            }
            let now = time::now_secs();
            // Observe every node first, then decide per zone.
            let all = nodes.list(|_| true);
            let mut observed = Vec::with_capacity(all.len());
            let mut zones: HashMap<String, (usize, usize)> = HashMap::new();
            for node in all {
                let name = node.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
                let lease = leases.get(&format!("kube-node-lease/{name}"));
                // A node that has not reported yet is given the grace period from its
                // creation (counted in last_heartbeat) before it is considered lost.
                let silent = now - last_heartbeat(&node, lease.as_deref()) > s.grace.as_secs() as i64;
                let ready = ready_condition(&node).and_then(|c| c["status"].as_str()).unwrap_or("").to_string();
                let zone = zone_of(&node);
                let z = zones.entry(zone.clone()).or_default();
                z.1 += 1;
                if silent || ready != "True" {
                    z.0 += 1;
                }
                observed.push((node, name, silent, ready, zone));
            }
            let states: HashMap<String, (ZoneState, usize)> = zones.iter().map(|(z, (nr, t))| (z.clone(), (zone_state(*nr, *t, s.unhealthy_threshold), *t))).collect();
            let all_down = !states.is_empty() && states.values().all(|(st, _)| *st == ZoneState::FullDisruption);
            if all_down != disrupted {
                disrupted = all_down;
                if all_down {
                    tracing::warn!("every node is not ready: entering master disruption mode (no evictions, no NoExecute taints) until one is ready again");
                } else {
                    tracing::info!("a node is ready again: leaving master disruption mode");
                    tokens.clear();
                    tainted_since.clear();
                }
            }
            for (z, (st, size)) in &states {
                let t = tokens.entry(z.clone()).or_insert(1.0);
                *t = (*t + elapsed * zone_rate(*st, *size, &s)).min(1.0);
            }
            for (node, name, silent, ready, zone) in observed {
                if let Err(e) = update_node(&client, &node, silent, &ready, !disrupted).await {
                    tracing::debug!(node = %name, error = %e, "updating node conditions failed");
                    continue;
                }
                let taint_key = if silent || ready == "Unknown" { Some(UNREACHABLE) } else if ready == "False" { Some(NOT_READY) } else { None };
                let Some(key) = taint_key.filter(|_| !disrupted) else {
                    tainted_since.remove(&name);
                    continue;
                };
                let since = *tainted_since.entry(name.clone()).or_insert(now);
                if tokens.get(&zone).copied().unwrap_or(0.0) < 1.0 {
                    continue;
                }
                let mut evicted = 0;
                for p in pods.list(|p| p.node_name.as_deref() == Some(name.as_str()) && !p.deleting) {
                    let due = match p.toleration_for(key, "", "NoExecute") {
                        None => true,
                        Some(None) => false,
                        Some(Some(secs)) => now - since >= secs,
                    };
                    if due {
                        let (ns, pn) = (&*p.namespace, &*p.name);
                        if client.delete(&format!("/api/v1/namespaces/{ns}/pods/{pn}"), None).await.is_ok() {
                            evicted += 1;
                            crate::events::record(&client, &p.reference(), "Normal", "TaintManagerEviction", &format!("Marking for deletion Pod {ns}/{pn}"), "taint-eviction-controller").await;
                        }
                    }
                }
                if evicted > 0 {
                    if let Some(t) = tokens.get_mut(&zone) {
                        *t -= 1.0;
                    }
                }
            }
        }
    });
}

/// Keeps the Ready condition and the lifecycle taints in step with what is observed.
async fn update_node(client: &Client, node: &Value, silent: bool, ready: &str, no_execute: bool) -> Result<(), String> {
    let name = node.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    if silent && ready != "Unknown" {
        let now = time::format(time::now_secs());
        let mut conds: Vec<Value> = node.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
        conds.retain(|c| c["type"] != "Ready");
        conds.push(json!({"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown", "message": "Kubelet stopped posting node status.", "lastHeartbeatTime": ready_condition(node).and_then(|c| c.get("lastHeartbeatTime")).cloned().unwrap_or(Value::Null), "lastTransitionTime": now}));
        client.merge_patch(&format!("/api/v1/nodes/{name}/status"), &json!({"status": {"conditions": conds}})).await.map_err(|e| e.to_string())?;
    }
    let effective = if silent { "Unknown" } else { ready };
    let want: Vec<&str> = match effective {
        "Unknown" => vec![UNREACHABLE],
        "False" => vec![NOT_READY],
        _ => vec![],
    };
    let taints: Vec<Value> = node.pointer("/spec/taints").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut next: Vec<Value> = taints.iter().filter(|t| !matches!(t["key"].as_str(), Some(UNREACHABLE | NOT_READY))).cloned().collect();
    for k in &want {
        if no_execute {
            next.push(json!({"key": k, "effect": "NoExecute", "timeAdded": time::format(time::now_secs())}));
        }
        next.push(json!({"key": k, "effect": "NoSchedule"}));
    }
    let same = |a: &[Value], b: &[Value]| {
        let keys = |v: &[Value]| {
            let mut k: Vec<(String, String)> = v.iter().map(|t| (t["key"].as_str().unwrap_or("").to_string(), t["effect"].as_str().unwrap_or("").to_string())).collect();
            k.sort();
            k
        };
        keys(a) == keys(b)
    };
    if !same(&taints, &next) {
        let body = if next.is_empty() { Value::Null } else { json!(next) };
        client.merge_patch(&format!("/api/v1/nodes/{name}"), &json!({"spec": {"taints": body}})).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_are_judged_as_upstream() {
        let s = Settings::default();
        assert_eq!(zone_state(0, 10, 0.55), ZoneState::Normal);
        assert_eq!(zone_state(2, 3, 0.55), ZoneState::Normal, "two not-ready nodes never make a disruption");
        assert_eq!(zone_state(6, 10, 0.55), ZoneState::PartialDisruption);
        assert_eq!(zone_state(5, 10, 0.55), ZoneState::Normal);
        assert_eq!(zone_state(3, 3, 0.55), ZoneState::FullDisruption);
        assert_eq!(zone_state(0, 0, 0.55), ZoneState::Normal);
        assert_eq!(zone_rate(ZoneState::Normal, 10, &s), 0.1);
        assert_eq!(zone_rate(ZoneState::PartialDisruption, 100, &s), 0.01);
        assert_eq!(zone_rate(ZoneState::PartialDisruption, 50, &s), 0.0, "small zones stop evicting");
        assert_eq!(zone_rate(ZoneState::FullDisruption, 10, &s), 0.1);
        let n = json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "a", "topology.kubernetes.io/region": "r"}}});
        assert_eq!(zone_of(&n), "r:\u{0}:a");
        assert_eq!(zone_of(&json!({})), ":\u{0}:");
    }

    #[test]
    fn tolerations() {
        let tol = |t: Value| Pod::from_value(&json!({"spec": {"tolerations": t}})).toleration_for(UNREACHABLE, "", "NoExecute");
        assert_eq!(tol(json!([])), None);
        assert_eq!(tol(json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}])), Some(Some(300)));
        assert_eq!(tol(json!([{"operator": "Exists"}])), Some(None));
        assert_eq!(tol(json!([{"key": NOT_READY, "operator": "Exists"}])), None);
        let node = json!({"metadata": {"creationTimestamp": "2026-11-25T10:00:00Z"}, "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-25T10:00:30Z"}]}});
        let lease = json!({"spec": {"renewTime": "2026-11-25T10:01:00.000000Z"}});
        assert_eq!(last_heartbeat(&node, Some(&lease)), time::parse("2026-11-25T10:01:00Z").unwrap());
        assert_eq!(last_heartbeat(&node, None), time::parse("2026-11-25T10:00:30Z").unwrap());
    }
}
