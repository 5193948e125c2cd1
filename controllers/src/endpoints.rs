//! Endpoints and EndpointSlices: for every Service with a selector, the addresses of the
//! pods it selects (ready ones as `addresses`/`ready`, others as `notReadyAddresses` or
//! not-ready slice endpoints, terminating ones flagged), with target ports resolved by
//! number or by the pods' named ports.

use serde_json::{json, Value};
use shoal_client::Client;

use std::sync::Arc;

use crate::informer::Informer;
use crate::pod::{Phase, Pod};
use crate::queue::WorkQueue;
use crate::Leadership;

pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

pub fn start(client: Client, services: Informer, pods: Informer<Pod>, lead: Leadership) {
    let q = WorkQueue::default();
    crate::feed(&services, &q, |k, _, _| vec![k.to_string()]);
    // A pod change wakes the services of its namespace that select it (before or after).
    let svcs = services.clone();
    crate::feed(&pods, &q, move |_, now, old| {
        let mut keys = Vec::new();
        for p in [now, old].into_iter().flatten() {
            for s in svcs.list_in(&p.namespace, |_| true) {
                if let Some(sel) = s.pointer("/spec/selector").filter(|x| x.is_object()) {
                    if p.selected_by(&json!({"matchLabels": sel})) {
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

/// The port a service port targets on a pod (number, or a named container port).
fn target_port(sp: &Value, pod: &Pod) -> Option<i64> {
    match sp.get("targetPort") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(name)) => pod.named_port(name),
        _ => sp.get("port").and_then(Value::as_i64),
    }
}

async fn reconcile(client: &Client, services: &Informer, pods: &Informer<Pod>, key: &str) -> Result<(), String> {
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
    let mut selected: Vec<Arc<Pod>> = pods.list_in(ns, |p| p.ip.is_some() && !matches!(p.phase, Phase::Succeeded | Phase::Failed) && p.selected_by(&sel));
    selected.sort_by(|a, b| a.name.cmp(&b.name));
    let with_node = |mut o: Value, p: &Pod| {
        if let Some(n) = &p.node_name {
            o["nodeName"] = json!(&**n);
        }
        o
    };
    let addr = |p: &Pod| with_node(json!({"ip": p.ip.as_deref(), "targetRef": {"kind": "Pod", "name": &*p.name, "namespace": ns, "uid": &*p.uid}}), p);
    let (ready, not_ready): (Vec<&Arc<Pod>>, Vec<&Arc<Pod>>) = selected.iter().filter(|p| !p.deleting).partition(|p| p.ready);
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
        let terminating = p.deleting;
        with_node(json!({
            "addresses": [p.ip.as_deref()],
            "conditions": {"ready": p.ready && !terminating, "serving": p.ready, "terminating": terminating},
            "targetRef": {"kind": "Pod", "name": &*p.name, "namespace": ns, "uid": &*p.uid},
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
