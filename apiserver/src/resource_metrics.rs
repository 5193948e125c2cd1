//! The resource metrics API, `metrics.k8s.io/v1beta1` (what metrics-server serves; what
//! `kubectl top` and the HorizontalPodAutoscaler read), built from the usage agents send
//! with their heartbeats: no scraping of 5,000 kubelets, and nothing written to the store.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::{json, Map, Value};
use shoal_proto::agent::Usage;

use crate::cache::Cache;
use crate::selector::LabelSelector;
use crate::status::{ApiError, Gr};

pub const GROUP: &str = "metrics.k8s.io";
pub const VERSION: &str = "v1beta1";
/// Usage older than this is not served (the agent is gone or silent).
const FRESH_MS: i64 = 120_000;

/// The latest usage of each node.
#[derive(Default)]
pub struct UsageTable {
    nodes: RwLock<HashMap<String, Arc<Usage>>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl UsageTable {
    pub fn put(&self, node: &str, u: Usage) {
        self.nodes.write().insert(node.to_string(), Arc::new(u));
    }
    fn fresh(&self) -> Vec<(String, Arc<Usage>)> {
        let now = now_ms();
        let mut v: Vec<(String, Arc<Usage>)> = self.nodes.read().iter().filter(|(_, u)| now - u.timestamp_ms < FRESH_MS).map(|(n, u)| (n.clone(), u.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// The discovery entries of the group.
pub fn group_doc() -> Value {
    let gv = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({"name": GROUP, "versions": [gv.clone()], "preferredVersion": gv})
}

pub fn resource_list() -> Value {
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{GROUP}/{VERSION}"), "resources": [
        {"name": "nodes", "singularName": "", "namespaced": false, "kind": "NodeMetrics", "verbs": ["get", "list"]},
        {"name": "pods", "singularName": "", "namespaced": true, "kind": "PodMetrics", "verbs": ["get", "list"]},
    ]})
}

fn cpu(n: u64) -> String {
    format!("{n}n")
}

fn memory(b: u64) -> String {
    if b % 1024 == 0 {
        format!("{}Ki", b / 1024)
    } else {
        b.to_string()
    }
}

fn time_ms(ms: i64) -> String {
    crate::meta::format_time(ms / 1000)
}

fn window(u: &Usage) -> String {
    format!("{}s", (u.window_ms / 1000).max(1))
}

/// Answers `GET /apis/metrics.k8s.io/v1beta1/<rest>`.
pub fn serve(table: &UsageTable, cache: &Cache, rest: &[&str], label_selector: &str) -> Result<Value, ApiError> {
    let sel = LabelSelector::parse(label_selector).map_err(ApiError::bad_request)?;
    let nodes_gr = Gr { group: GROUP, resource: "nodes" };
    let pods_gr = Gr { group: GROUP, resource: "pods" };
    let labels_of = |key: &str| cache.get(key).and_then(|e| e.labels().cloned());
    let node_item = |name: &str, u: &Usage, labels: Option<Map<String, Value>>| {
        json!({"kind": "NodeMetrics", "apiVersion": format!("{GROUP}/{VERSION}"),
            "metadata": {"name": name, "creationTimestamp": crate::meta::now(), "labels": labels.unwrap_or_default()},
            "timestamp": time_ms(u.timestamp_ms), "window": window(u),
            "usage": {"cpu": cpu(u.cpu_nanocores), "memory": memory(u.memory_bytes)}})
    };
    let pod_items = |ns: Option<&str>, name: Option<&str>| -> Vec<Value> {
        let mut out = Vec::new();
        for (_, u) in table.fresh() {
            for p in u.pods.iter().filter(|p| ns.is_none_or(|n| n == p.namespace) && name.is_none_or(|n| n == p.name)) {
                // A pod that is gone from the API (deleted meanwhile) is not reported.
                let Some(e) = cache.get(&format!("/registry/pods/{}/{}", p.namespace, p.name)) else { continue };
                let labels = e.labels().cloned().unwrap_or_default();
                if !sel.matches(Some(&labels)) {
                    continue;
                }
                out.push(json!({"kind": "PodMetrics", "apiVersion": format!("{GROUP}/{VERSION}"),
                    "metadata": {"name": p.name, "namespace": p.namespace, "creationTimestamp": crate::meta::now(), "labels": labels},
                    "timestamp": time_ms(u.timestamp_ms), "window": window(&u),
                    "containers": p.containers.iter().map(|c| json!({"name": c.name, "usage": {"cpu": cpu(c.cpu_nanocores), "memory": memory(c.memory_bytes)}})).collect::<Vec<_>>()}));
            }
        }
        out.sort_by(|a, b| (a["metadata"]["namespace"].as_str(), a["metadata"]["name"].as_str()).cmp(&(b["metadata"]["namespace"].as_str(), b["metadata"]["name"].as_str())));
        out
    };
    let list = |kind: &str, items: Vec<Value>| json!({"kind": kind, "apiVersion": format!("{GROUP}/{VERSION}"), "metadata": {}, "items": items});
    match rest {
        ["nodes"] => {
            let items = table.fresh().into_iter().filter_map(|(n, u)| {
                let labels = labels_of(&format!("/registry/minions/{n}"));
                sel.matches(labels.as_ref()).then(|| node_item(&n, &u, labels))
            });
            Ok(list("NodeMetricsList", items.collect()))
        }
        ["nodes", name] => {
            let u = table.fresh().into_iter().find(|(n, _)| n == name).ok_or_else(|| ApiError::not_found(nodes_gr, name))?;
            Ok(node_item(name, &u.1, labels_of(&format!("/registry/minions/{name}"))))
        }
        ["pods"] => Ok(list("PodMetricsList", pod_items(None, None))),
        ["namespaces", ns, "pods"] => Ok(list("PodMetricsList", pod_items(Some(ns), None))),
        ["namespaces", ns, "pods", name] => pod_items(Some(ns), Some(name)).into_iter().next().ok_or_else(|| ApiError::not_found(pods_gr, name)),
        _ => Err(ApiError::no_such_path()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_as_metrics_server_writes_them() {
        assert_eq!(cpu(1_500_000), "1500000n");
        assert_eq!(memory(8 << 20), "8192Ki");
        assert_eq!(memory(1000), "1000");
        let u = Usage { timestamp_ms: 1_795_000_000_000, window_ms: 10_000, ..Default::default() };
        assert_eq!(window(&u), "10s");
        assert_eq!(time_ms(u.timestamp_ms), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn stale_usage_is_not_served() {
        let t = UsageTable::default();
        t.put("old", Usage { timestamp_ms: now_ms() - FRESH_MS - 1, ..Default::default() });
        t.put("new", Usage { timestamp_ms: now_ms(), ..Default::default() });
        let names: Vec<String> = t.fresh().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["new"]);
    }
}
