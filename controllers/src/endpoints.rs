//! Endpoints and EndpointSlices: for every Service with a selector, the addresses of the
//! pods it selects (ready ones as `addresses`/`ready`, others as `notReadyAddresses` or
//! not-ready slice endpoints, terminating ones flagged), with target ports resolved by
//! number or by the pods' named ports.

use serde_json::{json, Value};
use shoal_client::{selector, Client};

use crate::informer::Informer;
use crate::queue::WorkQueue;
use crate::Leadership;

pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

pub fn start(client: Client, services: Informer, pods: Informer, lead: Leadership) {
    let q = WorkQueue::default();
    crate::feed(&services, &q, |k, _, _| vec![k.to_string()]);
    // A pod change wakes the services of its namespace that select it (before or after).
    let svcs = services.clone();
    crate::feed(&pods, &q, move |_, now, old| {
        let mut keys = Vec::new();
        for p in [now, old].into_iter().flatten() {
            let ns = p.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string();
            let labels = p.pointer("/metadata/labels").and_then(Value::as_object).cloned();
            for s in svcs.list_in(&ns, |_| true) {
                if let Some(sel) = s.pointer("/spec/selector").filter(|x| x.is_object()) {
                    if selector::matches(&json!({"matchLabels": sel}), labels.as_ref()) {
                        keys.push(crate::informer::key_of(&s));
                    }
                }
            }
        }
        keys
    });
    crate::spawn_workers("endpoints", q, lead, 2, move |key| {
        let (client, services, pods) = (client.clone(), services.clone(), pods.clone());
        async move { reconcile(&client, &services, &pods, &key).await }
    });
}

fn is_ready(p: &Value) -> bool {
    p.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// The port a service port targets on a pod (number, or a named container port).
fn target_port(sp: &Value, pod: &Value) -> Option<i64> {
    match sp.get("targetPort") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(name)) => pod.pointer("/spec/containers")?.as_array()?.iter().flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default()).find(|p| p["name"] == name.as_str()).and_then(|p| p["containerPort"].as_i64()),
        _ => sp.get("port").and_then(Value::as_i64),
    }
}

async fn reconcile(client: &Client, services: &Informer, pods: &Informer, key: &str) -> Result<(), String> {
    let (ns, name) = key.split_once('/').unwrap_or(("", key));
    let ep_path = format!("/api/v1/namespaces/{ns}/endpoints");
    let slice_path = format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices");
    let Some(svc) = services.get(key) else {
        // The Service is gone: its Endpoints go too (slices follow by owner reference).
        client.delete(&format!("{ep_path}/{name}"), None).await.map_err(|e| e.to_string())?;
        return Ok(());
    };
    let Some(sel) = svc.pointer("/spec/selector").filter(|s| s.as_object().is_some_and(|m| !m.is_empty())).cloned() else {
        return Ok(()); // selector-less services keep user-managed endpoints
    };
    let sel = json!({"matchLabels": sel});
    let ports: Vec<Value> = svc.pointer("/spec/ports").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut selected: Vec<Value> = pods.list_in(ns, |p| {
        selector::matches(&sel, p.pointer("/metadata/labels").and_then(Value::as_object))
            && p.pointer("/status/podIP").and_then(Value::as_str).is_some_and(|ip| !ip.is_empty())
            && !matches!(p.pointer("/status/phase").and_then(Value::as_str), Some("Succeeded" | "Failed"))
    });
    selected.sort_by(|a, b| a.pointer("/metadata/name").and_then(Value::as_str).cmp(&b.pointer("/metadata/name").and_then(Value::as_str)));
    let with_node = |mut o: Value, p: &Value| {
        if let Some(n) = p.pointer("/spec/nodeName").filter(|n| n.as_str().is_some_and(|s| !s.is_empty())) {
            o["nodeName"] = n.clone();
        }
        o
    };
    let addr = |p: &Value| with_node(json!({"ip": p.pointer("/status/podIP"), "targetRef": {"kind": "Pod", "name": p.pointer("/metadata/name"), "namespace": ns, "uid": p.pointer("/metadata/uid")}}), p);
    let (ready, not_ready): (Vec<&Value>, Vec<&Value>) = selected.iter().filter(|p| p.pointer("/metadata/deletionTimestamp").is_none()).partition(|p| is_ready(p));
    let ep_ports: Vec<Value> = ports.iter().map(|sp| {
        let port = selected.first().and_then(|p| target_port(sp, p)).or_else(|| sp.get("targetPort").and_then(Value::as_i64)).unwrap_or(0);
        let mut o = json!({"port": port, "protocol": sp.get("protocol").cloned().unwrap_or(json!("TCP"))});
        if let Some(n) = sp.get("name").filter(|n| n.as_str().is_some_and(|s| !s.is_empty())) {
            o["name"] = n.clone();
        }
        o
    }).collect();
    let mut subsets = Vec::new();
    if !ready.is_empty() || !not_ready.is_empty() {
        let mut s = json!({"ports": ep_ports});
        if !ready.is_empty() {
            s["addresses"] = json!(ready.iter().map(|p| addr(p)).collect::<Vec<_>>());
        }
        if !not_ready.is_empty() {
            s["notReadyAddresses"] = json!(not_ready.iter().map(|p| addr(p)).collect::<Vec<_>>());
        }
        subsets.push(s);
    }
    let labels = svc.pointer("/metadata/labels").cloned().unwrap_or(json!({}));
    let endpoints = json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": ns, "labels": labels}, "subsets": subsets});
    upsert(client, &ep_path, name, endpoints, |cur, new| cur.get("subsets") == new.get("subsets")).await?;

    let slice_name = format!("{name}-shoal");
    let uid = svc.pointer("/metadata/uid").cloned().unwrap_or(Value::Null);
    let endpoints_list: Vec<Value> = selected.iter().map(|p| {
        let terminating = p.pointer("/metadata/deletionTimestamp").is_some();
        with_node(json!({
            "addresses": [p.pointer("/status/podIP")],
            "conditions": {"ready": is_ready(p) && !terminating, "serving": is_ready(p), "terminating": terminating},
            "targetRef": {"kind": "Pod", "name": p.pointer("/metadata/name"), "namespace": ns, "uid": p.pointer("/metadata/uid")},
        }), p)
    }).collect();
    let slice_ports: Vec<Value> = ep_ports.clone();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": slice_name, "namespace": ns,
            "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": MANAGED_BY},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
        "addressType": "IPv4",
        "endpoints": endpoints_list,
        "ports": slice_ports,
    });
    upsert(client, &slice_path, &slice_name, slice, |cur, new| cur.get("endpoints") == new.get("endpoints") && cur.get("ports") == new.get("ports")).await
}

/// Creates `obj`, or replaces the stored one when `same` says it differs.
async fn upsert(client: &Client, coll: &str, name: &str, mut obj: Value, same: impl Fn(&Value, &Value) -> bool) -> Result<(), String> {
    match client.get(&format!("{coll}/{name}")).await.map_err(|e| e.to_string())? {
        None => match client.create(coll, &obj).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_conflict() => Err("created concurrently; retrying".into()),
            Err(e) => Err(e.to_string()),
        },
        Some(cur) if same(&cur, &obj) => Ok(()),
        Some(cur) => {
            obj["metadata"]["resourceVersion"] = cur.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null);
            client.update(&format!("{coll}/{name}"), &obj).await.map(|_| ()).map_err(|e| e.to_string())
        }
    }
}
