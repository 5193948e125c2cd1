//! The PersistentVolume binder and Shoal's node-local provisioner, as upstream's PV
//! controller and a local-path provisioner:
//! - a Pending claim binds to the smallest Available volume of its class that has the
//!   capacity and access modes it asks for (and, when the scheduler chose a node for a
//!   WaitForFirstConsumer claim, whose node affinity allows that node);
//! - with none, a class whose provisioner is `shoal.io/local-path` gets a new `local`
//!   volume on the node the scheduler selected (annotation
//!   `volume.kubernetes.io/selected-node`); until then a WaitForFirstConsumer claim waits
//!   with upstream's event;
//! - a volume whose claim is gone is Released, then deleted (reclaim policy Delete) or
//!   kept (Retain).
//!
//! Every write is conditioned on the object's resourceVersion, so two binders never bind
//! one volume twice (Architecture Invariant 3: level-triggered, retried on conflict).

use serde_json::{json, Value};
use shoal_client::{quantity, Client};

use crate::informer::Informer;
use crate::queue::WorkQueue;
use crate::Leadership;

pub const LOCAL_PROVISIONER: &str = "shoal.io/local-path";
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Where the agent keeps local volumes.
pub const LOCAL_ROOT: &str = "/var/lib/shoal/volumes";

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn storage(v: Option<&Value>) -> i128 {
    v.and_then(Value::as_str).and_then(quantity::parse).unwrap_or(0)
}

/// Whether volume `pv` can serve claim `pvc` (class, size, access modes, node).
fn matches(pv: &Value, pvc: &Value, node: Option<&str>) -> bool {
    if s(pv, "/spec/storageClassName") != s(pvc, "/spec/storageClassName") || s(pv, "/status/phase") != "Available" {
        return false;
    }
    if pv.pointer("/spec/claimRef").is_some_and(|r| !r.is_null() && r["uid"] != pvc["metadata"]["uid"]) {
        return false;
    }
    if storage(pv.pointer("/spec/capacity/storage")) < storage(pvc.pointer("/spec/resources/requests/storage")) {
        return false;
    }
    let has = pv.pointer("/spec/accessModes").and_then(Value::as_array).cloned().unwrap_or_default();
    if !pvc.pointer("/spec/accessModes").and_then(Value::as_array).into_iter().flatten().all(|m| has.contains(m)) {
        return false;
    }
    match (node, pv.pointer("/spec/nodeAffinity/required/nodeSelectorTerms").and_then(Value::as_array)) {
        (Some(n), Some(terms)) => terms.iter().any(|t| {
            t["matchExpressions"].as_array().into_iter().flatten().all(|e| {
                let vals: Vec<&str> = e["values"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                e["key"] == "kubernetes.io/hostname" && e["operator"] == "In" && vals.contains(&n)
            })
        }),
        _ => true,
    }
}

pub fn start(client: Client, claims: Informer, volumes: Informer, classes: Informer, lead: Leadership) {
    let q = WorkQueue::default();
    // Keys: "pvc|ns/name" and "pv|name".
    // A claim change wakes the claim and the volume it is bound to (a deleted claim
    // releases its volume).
    crate::feed(&claims, &q, |k, now, old| {
        let mut keys = vec![format!("pvc|{k}")];
        for c in [now, old].into_iter().flatten() {
            let v = s(&c, "/spec/volumeName");
            if !v.is_empty() {
                keys.push(format!("pv|{v}"));
            }
        }
        keys
    });
    let cl = claims.clone();
    crate::feed(&volumes, &q, move |k, now, old| {
        let mut keys = vec![format!("pv|{k}")];
        // A volume changing can complete or unblock a claim.
        for v in [now, old].into_iter().flatten() {
            let ns = s(&v, "/spec/claimRef/namespace");
            if !ns.is_empty() {
                keys.push(format!("pvc|{ns}/{}", s(&v, "/spec/claimRef/name")));
            }
        }
        if keys.len() == 1 {
            // A new Available volume may serve any waiting claim.
            keys.extend(cl.list(|c| s(c, "/status/phase") == "Pending").iter().map(|c| format!("pvc|{}", crate::informer::key_of(c))));
        }
        keys
    });
    crate::spawn_workers("persistentvolume-binder", q, lead, 1, move |key| {
        let (client, claims, volumes, classes) = (client.clone(), claims.clone(), volumes.clone(), classes.clone());
        async move {
            match key.split_once('|') {
                Some(("pvc", k)) => sync_claim(&client, &claims, &volumes, &classes, k).await,
                Some(("pv", k)) => sync_volume(&client, &claims, &volumes, k).await,
                _ => Ok(()),
            }
        }
    });
}

async fn sync_claim(client: &Client, claims: &Informer, volumes: &Informer, classes: &Informer, key: &str) -> Result<(), String> {
    let Some(pvc) = claims.get(key) else { return Ok(()) };
    if pvc.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(());
    }
    let (ns, name) = (s(&pvc, "/metadata/namespace").to_string(), s(&pvc, "/metadata/name").to_string());
    let path = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}");
    let bound_to = s(&pvc, "/spec/volumeName").to_string();
    if !bound_to.is_empty() {
        // Finish a binding: the claim's status, once the volume points back at it.
        let Some(pv) = volumes.get(&bound_to) else { return Ok(()) };
        if pv.pointer("/spec/claimRef/uid") == pvc.pointer("/metadata/uid") && s(&pvc, "/status/phase") != "Bound" {
            let status = json!({"status": {"phase": "Bound", "accessModes": pv.pointer("/spec/accessModes"), "capacity": pv.pointer("/spec/capacity")}});
            client.merge_patch(&format!("{path}/status"), &status).await.map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    let class_name = s(&pvc, "/spec/storageClassName").to_string();
    let class = classes.get(&class_name);
    let wait_first = class.as_ref().is_some_and(|c| s(c, "/volumeBindingMode") == "WaitForFirstConsumer");
    let node = pvc.pointer("/metadata/annotations").and_then(|a| a.get(SELECTED_NODE)).and_then(Value::as_str).map(String::from);
    if wait_first && node.is_none() {
        if pvc.pointer("/metadata/annotations/shoal.io~1waiting-reported").is_none() {
            crate::events::record(client, &pvc, "Normal", "WaitForFirstConsumer", "waiting for first consumer to be created before binding", "persistentvolume-controller").await;
            let _ = client.merge_patch(&path, &json!({"metadata": {"annotations": {"shoal.io/waiting-reported": "true"}}})).await;
        }
        return Ok(());
    }
    // The smallest Available volume that fits.
    let mut candidates = volumes.list(|pv| matches(pv, &pvc, node.as_deref()));
    candidates.sort_by_key(|pv| storage(pv.pointer("/spec/capacity/storage")));
    let pv = match candidates.first() {
        Some(pv) => (**pv).clone(),
        None => match class.as_ref().filter(|c| s(c, "/provisioner") == LOCAL_PROVISIONER) {
            Some(c) => {
                let Some(node) = node else {
                    crate::events::record(client, &pvc, "Warning", "ProvisioningFailed", &format!("storageclass {class_name:?}: the {LOCAL_PROVISIONER} provisioner needs volumeBindingMode WaitForFirstConsumer (a local volume lives on one node)"), "persistentvolume-controller").await;
                    return Ok(());
                };
                provision(client, &pvc, c, &node).await?
            }
            None => return Ok(()), // waits for a volume to appear (a volume change wakes it)
        },
    };
    // Bind: the volume first (conditioned on its version), then the claim.
    let pv_name = s(&pv, "/metadata/name").to_string();
    let claim_ref = json!({"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": ns, "name": name, "uid": pvc.pointer("/metadata/uid"), "resourceVersion": pvc.pointer("/metadata/resourceVersion")});
    let patch = json!({"metadata": {"resourceVersion": pv.pointer("/metadata/resourceVersion"), "annotations": {"pv.kubernetes.io/bound-by-controller": "yes"}}, "spec": {"claimRef": claim_ref}});
    client.merge_patch(&format!("/api/v1/persistentvolumes/{pv_name}"), &patch).await.map_err(|e| e.to_string())?;
    client.merge_patch(&format!("/api/v1/persistentvolumes/{pv_name}/status"), &json!({"status": {"phase": "Bound"}})).await.map_err(|e| e.to_string())?;
    let claim_patch = json!({"metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes", "pv.kubernetes.io/bound-by-controller": "yes"}}, "spec": {"volumeName": pv_name}});
    client.merge_patch(&path, &claim_patch).await.map_err(|e| e.to_string())?;
    let status = json!({"status": {"phase": "Bound", "accessModes": pv.pointer("/spec/accessModes"), "capacity": pv.pointer("/spec/capacity")}});
    client.merge_patch(&format!("{path}/status"), &status).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Creates a `local` volume for the claim on `node`, pre-bound to it.
async fn provision(client: &Client, pvc: &Value, class: &Value, node: &str) -> Result<Value, String> {
    let uid = s(pvc, "/metadata/uid");
    let name = format!("pvc-{uid}");
    let pv = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": LOCAL_PROVISIONER}, "labels": {"shoal.io/node": node}},
        "spec": {
            "capacity": {"storage": pvc.pointer("/spec/resources/requests/storage").cloned().unwrap_or(json!("1Gi"))},
            "accessModes": pvc.pointer("/spec/accessModes").cloned().unwrap_or(json!(["ReadWriteOnce"])),
            "persistentVolumeReclaimPolicy": class.get("reclaimPolicy").cloned().unwrap_or(json!("Delete")),
            "storageClassName": s(pvc, "/spec/storageClassName"),
            "volumeMode": "Filesystem",
            "local": {"path": format!("{LOCAL_ROOT}/{name}")},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
            "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": s(pvc, "/metadata/namespace"), "name": s(pvc, "/metadata/name"), "uid": uid},
        },
    });
    let created = match client.create("/api/v1/persistentvolumes", &pv).await {
        Ok(v) => v,
        Err(e) if e.is_conflict() => client.get(&format!("/api/v1/persistentvolumes/{name}")).await.map_err(|e| e.to_string())?.ok_or("provisioned volume vanished")?,
        Err(e) => return Err(e.to_string()),
    };
    crate::events::record(client, pvc, "Normal", "ProvisioningSucceeded", &format!("Successfully provisioned volume {name} on node {node}"), LOCAL_PROVISIONER).await;
    let mut v = created;
    v["status"]["phase"] = json!("Available");
    Ok(v)
}

async fn sync_volume(client: &Client, claims: &Informer, volumes: &Informer, name: &str) -> Result<(), String> {
    let Some(pv) = volumes.get(name) else { return Ok(()) };
    if pv.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(());
    }
    let path = format!("/api/v1/persistentvolumes/{name}");
    let phase = s(&pv, "/status/phase");
    let claim = pv.pointer("/spec/claimRef").filter(|r| !r.is_null());
    match claim {
        None => {
            if phase != "Available" {
                client.merge_patch(&format!("{path}/status"), &json!({"status": {"phase": "Available"}})).await.map_err(|e| e.to_string())?;
            }
        }
        Some(r) => {
            let key = format!("{}/{}", r["namespace"].as_str().unwrap_or(""), r["name"].as_str().unwrap_or(""));
            let live = claims.get(&key).filter(|c| c.pointer("/metadata/uid") == r.get("uid"));
            match live {
                // Pre-bound (provisioned) and not yet bound: Available to its claim only.
                Some(_) if phase == "Pending" => {
                    client.merge_patch(&format!("{path}/status"), &json!({"status": {"phase": "Available"}})).await.map_err(|e| e.to_string())?;
                }
                Some(_) => {}
                None if claims.is_synced() && phase != "Released" && phase != "Failed" => {
                    // The claim is gone (confirmed live, not just missing from the cache).
                    let gone = client.get(&format!("/api/v1/namespaces/{}/persistentvolumeclaims/{}", r["namespace"].as_str().unwrap_or(""), r["name"].as_str().unwrap_or(""))).await.map_err(|e| e.to_string())?.is_none_or(|c| c.pointer("/metadata/uid") != r.get("uid"));
                    if !gone {
                        return Ok(());
                    }
                    if s(&pv, "/spec/persistentVolumeReclaimPolicy") == "Delete" {
                        client.delete(&path, None).await.map_err(|e| e.to_string())?;
                    } else {
                        client.merge_patch(&format!("{path}/status"), &json!({"status": {"phase": "Released"}})).await.map_err(|e| e.to_string())?;
                    }
                }
                None => {}
            }
        }
    }
    Ok(())
}
