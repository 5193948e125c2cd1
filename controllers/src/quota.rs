//! ResourceQuota status: `status.hard` mirrors the spec and `status.used` counts what the
//! namespace holds — objects by kind (`pods`, `services`, `count/deployments.apps`, ...) and
//! the requests and limits of its non-terminal pods (`requests.cpu`, `limits.memory`, ...)
//! and claims (`requests.storage`). Refusing what exceeds it is admission (the next issue).

use serde_json::{json, Map, Value};
use shoal_client::Client;

use std::sync::Arc;

use crate::informer::Informer;
use crate::pod::Pod;
use crate::queue::WorkQueue;
use crate::Leadership;

/// Milli-units of a quantity (`500m`, `1Gi`, `2`); None when malformed.
pub fn milli(q: &str) -> Option<i128> {
    shoal_client::quantity::parse(q)
}

/// A quantity from milli-units, in the plainest exact form (`1500m`, `2`, `128Mi`).
pub fn format_milli(m: i128) -> String {
    if m % 1000 != 0 {
        return format!("{m}m");
    }
    let n = m / 1000;
    for (suffix, size) in [("Gi", 1i128 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if n != 0 && n % size == 0 {
            return format!("{}{suffix}", n / size);
        }
    }
    n.to_string()
}

fn pod_sum(pods: &[Arc<Pod>], limits: bool, resource: &str) -> i128 {
    pods.iter().filter(|p| p.is_active()).map(|p| p.resource_sum(limits, resource)).sum()
}

pub fn start(client: Client, quotas: Informer, pods: Informer<Pod>, counted: Vec<(&'static str, Informer)>, lead: Leadership) {
    let q = WorkQueue::default();
    crate::feed(&quotas, &q, |k, _, _| vec![k.to_string()]);
    let quotas_of = |qs: Informer| {
        move |k: &str| {
            let ns = k.split_once('/').map_or("", |(n, _)| n).to_string();
            qs.list_in(&ns, |_| true).iter().map(|q| crate::informer::key_of(q)).collect::<Vec<String>>()
        }
    };
    for (_, inf) in &counted {
        let of = quotas_of(quotas.clone());
        crate::feed(inf, &q, move |k, _, _| of(k));
    }
    let of = quotas_of(quotas.clone());
    crate::feed(&pods, &q, move |k, _, _| of(k));
    crate::spawn_workers("resourcequota", q, lead, 1, move |key| {
        let (client, quotas, pods, counted) = (client.clone(), quotas.clone(), pods.clone(), counted.clone());
        async move {
            let Some(quota) = quotas.get(&key) else { return Ok(()) };
            let ns = quota.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string();
            let in_ns = |name: &str| counted.iter().find(|(n, _)| *n == name).map(|(_, i)| i.list_in(&ns, |_| true)).unwrap_or_default();
            let pods = pods.list_in(&ns, |_| true);
            let hard = quota.pointer("/spec/hard").and_then(Value::as_object).cloned().unwrap_or_default();
            let mut used = Map::new();
            for (res, _) in &hard {
                let v: Option<String> = match res.as_str() {
                    "pods" | "count/pods" => Some(pods.iter().filter(|p| p.is_active()).count().to_string()),
                    "services" | "count/services" => Some(in_ns("services").len().to_string()),
                    "configmaps" | "count/configmaps" => Some(in_ns("configmaps").len().to_string()),
                    "secrets" | "count/secrets" => Some(in_ns("secrets").len().to_string()),
                    "persistentvolumeclaims" | "count/persistentvolumeclaims" => Some(in_ns("persistentvolumeclaims").len().to_string()),
                    "services.nodeports" => Some(in_ns("services").iter().filter(|s| matches!(s.pointer("/spec/type").and_then(Value::as_str), Some("NodePort" | "LoadBalancer"))).count().to_string()),
                    "services.loadbalancers" => Some(in_ns("services").iter().filter(|s| s.pointer("/spec/type").and_then(Value::as_str) == Some("LoadBalancer")).count().to_string()),
                    "count/deployments.apps" => Some(in_ns("deployments").len().to_string()),
                    "count/replicasets.apps" => Some(in_ns("replicasets").len().to_string()),
                    "cpu" | "requests.cpu" => Some(format_milli(pod_sum(&pods, false, "cpu"))),
                    "memory" | "requests.memory" => Some(format_milli(pod_sum(&pods, false, "memory"))),
                    "limits.cpu" => Some(format_milli(pod_sum(&pods, true, "cpu"))),
                    "limits.memory" => Some(format_milli(pod_sum(&pods, true, "memory"))),
                    "requests.storage" => Some(format_milli(in_ns("persistentvolumeclaims").iter().filter_map(|c| c.pointer("/spec/resources/requests/storage").and_then(Value::as_str)).filter_map(milli).sum())),
                    _ => None,
                };
                if let Some(v) = v {
                    used.insert(res.clone(), json!(v));
                }
            }
            let status = json!({"hard": hard, "used": used});
            if quota.get("status") == Some(&status) {
                return Ok(());
            }
            let name = quota.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
            match client.merge_patch(&format!("/api/v1/namespaces/{ns}/resourcequotas/{name}/status"), &json!({"status": status})).await {
                Ok(_) => Ok(()),
                Err(e) if e.is_not_found() => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(milli("500m"), Some(500));
        assert_eq!(milli("2"), Some(2000));
        assert_eq!(milli("128Mi"), Some(128 * 1_048_576 * 1000));
        assert_eq!(format_milli(1500), "1500m");
        assert_eq!(format_milli(2000), "2");
        assert_eq!(format_milli(256 * 1_048_576 * 1000), "256Mi");
        assert_eq!(format_milli(0), "0");
        assert_eq!(milli("abc"), None);
    }
}
