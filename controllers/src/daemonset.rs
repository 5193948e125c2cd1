//! DaemonSets: one pod per eligible node (node selector and required node affinity match,
//! NoSchedule/NoExecute taints tolerated), pinned to its node with required node affinity
//! on `metadata.name` (the scheduler binds it, as upstream since 1.12), with the daemon
//! tolerations added; pods on nodes that are no longer eligible are removed; rolling
//! update replaces pods of an old template at most maxUnavailable at a time.

use serde_json::{json, Value};
use shoal_client::{selector, Client};

use std::sync::Arc;

use crate::informer::Informer;
use crate::pod::Pod;
use crate::queue::WorkQueue;
use crate::Leadership;

const HASH_LABEL: &str = "controller-revision-hash";

pub fn start(client: Client, dss: Informer, pods: Informer<Pod>, nodes: Informer, lead: Leadership) {
    let q = WorkQueue::default();
    crate::feed(&dss, &q, |k, _, _| vec![k.to_string()]);
    crate::feed(&pods, &q, |_, now, old| crate::owner_keys("DaemonSet", [now, old]));
    // A node change can change every DaemonSet's placement.
    let all = dss.clone();
    crate::feed(&nodes, &q, move |_, _, _| all.keys());
    crate::spawn_workers("daemonset", q, lead, 2, move |key| {
        let (client, dss, pods, nodes) = (client.clone(), dss.clone(), pods.clone(), nodes.clone());
        async move { reconcile(&client, &dss, &pods, &nodes, &key).await }
    });
}

/// Whether the pod template may run on `node`.
fn eligible(tmpl: &Value, node: &Value) -> bool {
    let labels = node.pointer("/metadata/labels").and_then(Value::as_object);
    if let Some(ns) = tmpl.pointer("/spec/nodeSelector").and_then(Value::as_object) {
        if !selector::matches(&json!({"matchLabels": ns}), labels) {
            return false;
        }
    }
    if let Some(terms) = tmpl.pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms").and_then(Value::as_array) {
        let any = terms.iter().any(|t| selector::matches(&json!({"matchExpressions": t.get("matchExpressions").cloned().unwrap_or(json!([]))}), labels));
        if !terms.is_empty() && !any {
            return false;
        }
    }
    let tolerations = tmpl.pointer("/spec/tolerations").and_then(Value::as_array).cloned().unwrap_or_default();
    for taint in node.pointer("/spec/taints").and_then(Value::as_array).into_iter().flatten() {
        let effect = taint["effect"].as_str().unwrap_or("");
        if effect == "PreferNoSchedule" {
            continue;
        }
        let key = taint["key"].as_str().unwrap_or("");
        // The taints daemon pods tolerate by default.
        if key.starts_with("node.kubernetes.io/") {
            continue;
        }
        let tolerated = tolerations.iter().any(|t| {
            let op = t["operator"].as_str().unwrap_or("Equal");
            let key_ok = (t["key"].as_str().unwrap_or("").is_empty() && op == "Exists") || t["key"].as_str() == Some(key);
            let val_ok = op == "Exists" || t["value"].as_str().unwrap_or("") == taint["value"].as_str().unwrap_or("");
            let eff_ok = t["effect"].as_str().unwrap_or("").is_empty() || t["effect"].as_str() == Some(effect);
            key_ok && val_ok && eff_ok
        });
        if !tolerated {
            return false;
        }
    }
    true
}

fn daemon_tolerations(existing: Option<&Value>) -> Value {
    let mut t: Vec<Value> = existing.and_then(Value::as_array).cloned().unwrap_or_default();
    for (key, effect) in [
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ] {
        if !t.iter().any(|x| x["key"] == key && x["effect"] == effect) {
            t.push(json!({"key": key, "operator": "Exists", "effect": effect}));
        }
    }
    Value::Array(t)
}

async fn reconcile(client: &Client, dss: &Informer, pods: &Informer<Pod>, nodes: &Informer, key: &str) -> Result<(), String> {
    let Some(ds) = dss.get(key) else { return Ok(()) };
    if ds.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(());
    }
    let ns = ds.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string();
    let name = ds.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
    let uid = ds.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("").to_string();
    let tmpl = ds.pointer("/spec/template").cloned().unwrap_or(json!({}));
    let hash = crate::deployment::template_hash(&tmpl);
    let pods_path = format!("/api/v1/namespaces/{ns}/pods");
    let owned: Vec<Arc<Pod>> = pods.dependents_of(&uid).into_iter().filter(|p| !p.deleting && p.controlled_by(&uid)).collect();
    let all_nodes = nodes.list(|_| true);
    let wanted: Vec<String> = all_nodes.iter().filter(|n| eligible(&tmpl, n)).filter_map(|n| n.pointer("/metadata/name").and_then(Value::as_str).map(String::from)).collect();
    // Remove pods on nodes that no longer qualify (or that are gone) and duplicates.
    let mut seen: Vec<String> = Vec::new();
    for p in &owned {
        let node = p.target_node().unwrap_or_default().to_string();
        if !wanted.contains(&node) || seen.contains(&node) {
            let pn = &*p.name;
            client.delete(&format!("{pods_path}/{pn}"), None).await.map_err(|e| e.to_string())?;
        } else {
            seen.push(node);
        }
    }
    // Rolling update: replace pods of an old template, maxUnavailable at a time.
    let max_unavailable = ds.pointer("/spec/updateStrategy/rollingUpdate/maxUnavailable").and_then(Value::as_i64).unwrap_or(1).max(1) as usize;
    let rolling = ds.pointer("/spec/updateStrategy/type").and_then(Value::as_str).unwrap_or("RollingUpdate") == "RollingUpdate";
    let outdated: Vec<&Arc<Pod>> = owned.iter().filter(|p| p.label(HASH_LABEL) != Some(hash.as_str())).collect();
    if rolling && !outdated.is_empty() {
        // Outdated pods that are not ready go at once; ready ones within the budget of
        // nodes allowed to be without a ready daemon pod.
        let unavailable = wanted.len().saturating_sub(owned.iter().filter(|p| p.ready).count());
        let mut budget = max_unavailable.saturating_sub(unavailable);
        for p in outdated {
            let ready = p.ready;
            if ready && budget == 0 {
                continue;
            }
            if ready {
                budget -= 1;
            }
            client.delete(&format!("{pods_path}/{}", p.name), None).await.map_err(|e| e.to_string())?;
            seen.retain(|n| Some(n.as_str()) != p.target_node());
        }
    }
    // Create the missing pods, each pinned to its node.
    for node in wanted.iter().filter(|n| !seen.contains(n)) {
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": tmpl.get("metadata").cloned().unwrap_or(json!({})), "spec": tmpl.get("spec").cloned().unwrap_or(json!({}))});
        pod["metadata"]["generateName"] = json!(format!("{name}-"));
        pod["metadata"]["namespace"] = json!(ns);
        pod["metadata"]["labels"][HASH_LABEL] = json!(hash);
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
        if let Some(m) = pod["metadata"].as_object_mut() {
            m.remove("creationTimestamp");
        }
        pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = json!({"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]});
        let tol = daemon_tolerations(pod.pointer("/spec/tolerations"));
        pod["spec"]["tolerations"] = tol;
        match client.create(&pods_path, &pod).await {
            Ok(p) => {
                let pn = p.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
                crate::events::record(client, &ds, "Normal", "SuccessfulCreate", &format!("Created pod: {pn}"), "daemonset-controller").await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    let ready = owned.iter().filter(|p| p.ready).count();
    let current = owned.iter().filter(|p| p.target_node().is_some_and(|n| wanted.iter().any(|w| w == n))).count();
    let updated = owned.iter().filter(|p| p.label(HASH_LABEL) == Some(hash.as_str())).count();
    let status = json!({
        "desiredNumberScheduled": wanted.len(),
        "currentNumberScheduled": current,
        "numberMisscheduled": owned.len() - current,
        "numberReady": ready,
        "numberAvailable": ready,
        "numberUnavailable": wanted.len().saturating_sub(ready),
        "updatedNumberScheduled": updated,
        "observedGeneration": ds.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
    });
    let cur = ds.get("status").cloned().unwrap_or(json!({}));
    let changed = status.as_object().into_iter().flatten().any(|(k, v)| cur.get(k).and_then(Value::as_i64).unwrap_or(0) != v.as_i64().unwrap_or(0));
    if changed {
        match client.merge_patch(&format!("/apis/apps/v1/namespaces/{ns}/daemonsets/{name}/status"), &json!({"status": status})).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eligibility() {
        let tmpl = json!({"spec": {"nodeSelector": {"role": "edge"}}});
        let node = |labels: Value, taints: Value| json!({"metadata": {"labels": labels}, "spec": {"taints": taints}});
        assert!(eligible(&tmpl, &node(json!({"role": "edge"}), json!([]))));
        assert!(!eligible(&tmpl, &node(json!({"role": "core"}), json!([]))));
        assert!(!eligible(&tmpl, &node(json!({"role": "edge"}), json!([{"key": "gpu", "effect": "NoSchedule"}]))));
        assert!(eligible(&tmpl, &node(json!({"role": "edge"}), json!([{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]))));
        let tolerant = json!({"spec": {"tolerations": [{"key": "gpu", "operator": "Exists"}]}});
        assert!(eligible(&tolerant, &node(json!({}), json!([{"key": "gpu", "effect": "NoSchedule"}]))));
        assert_eq!(daemon_tolerations(None).as_array().unwrap().len(), 6);
    }
}
