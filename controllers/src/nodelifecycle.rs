//! Node lifecycle: a node whose kubelet (agent) stopped renewing its Lease in
//! `kube-node-lease` and posting status for the grace period gets its Ready condition set to
//! Unknown and the `node.kubernetes.io/unreachable` NoExecute taint; a node reporting Ready
//! False gets `node.kubernetes.io/not-ready`; the taints go away when it is Ready again.
//! Pods on a node with a NoExecute taint they do not tolerate are evicted (those that
//! tolerate it for `tolerationSeconds` after that long), at most `eviction_rate` nodes per
//! second, as upstream's rate limiter.

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
    /// Nodes whose pods may be evicted per second (`--node-eviction-rate`).
    pub eviction_rate: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { grace: Duration::from_secs(40), period: Duration::from_secs(5), eviction_rate: 0.1 }
    }
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
        let mut tokens = 1.0f64;
        let mut last = Instant::now();
        // When each node got its NoExecute taint (for tolerationSeconds).
        let mut tainted_since: HashMap<String, i64> = HashMap::new();
        loop {
            tokio::time::sleep(s.period).await;
            tokens = (tokens + last.elapsed().as_secs_f64() * s.eviction_rate).min(1.0);
            last = Instant::now();
            if !lead.is_leader() || !nodes.is_synced() {
                continue;
            }
            let now = time::now_secs();
            for node in nodes.list(|_| true) {
                let name = node.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
                let lease = leases.get(&format!("kube-node-lease/{name}"));
                let silent = now - last_heartbeat(&node, lease.as_deref()) > s.grace.as_secs() as i64;
                // A node that has not reported yet is given the grace period from its creation
                // (counted in last_heartbeat) before it is considered lost.
                let ready = ready_condition(&node).and_then(|c| c["status"].as_str()).unwrap_or("").to_string();
                if let Err(e) = update_node(&client, &node, silent, &ready).await {
                    tracing::debug!(node = %name, error = %e, "updating node conditions failed");
                    continue;
                }
                let taint_key = if silent || ready == "Unknown" { Some(UNREACHABLE) } else if ready == "False" { Some(NOT_READY) } else { None };
                let Some(key) = taint_key else {
                    tainted_since.remove(&name);
                    continue;
                };
                let since = *tainted_since.entry(name.clone()).or_insert(now);
                if tokens < 1.0 {
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
                    tokens -= 1.0;
                }
            }
        }
    });
}

/// Keeps the Ready condition and the lifecycle taints in step with what is observed.
async fn update_node(client: &Client, node: &Value, silent: bool, ready: &str) -> Result<(), String> {
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
        next.push(json!({"key": k, "effect": "NoExecute", "timeAdded": time::format(time::now_secs())}));
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
