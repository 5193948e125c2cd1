//! StatefulSets: pods with stable names `<set>-<ordinal>`, hostnames and per-pod
//! PersistentVolumeClaims from volumeClaimTemplates (`<template>-<set>-<ordinal>`, kept when
//! the pod goes); OrderedReady creates ordinal i only when 0..i are Running and Ready and
//! removes from the highest ordinal one at a time, Parallel acts on all at once; a rolling
//! update replaces outdated pods from the highest ordinal down to the partition, one at a
//! time once the others are Ready.

use serde_json::{json, Value};
use shoal_client::Client;

use std::sync::Arc;

use crate::informer::Informer;
use crate::pod::{Phase, Pod};
use crate::queue::WorkQueue;
use crate::Leadership;

const REVISION_LABEL: &str = "controller-revision-hash";

pub fn start(client: Client, sets: Informer, pods: Informer<Pod>, lead: Leadership) {
    let q = WorkQueue::default();
    crate::feed(&sets, &q, |k, _, _| vec![k.to_string()]);
    crate::feed(&pods, &q, |_, now, old| crate::owner_keys("StatefulSet", [now, old]));
    crate::spawn_workers("statefulset", q, lead, 2, move |key| {
        let (client, sets, pods) = (client.clone(), sets.clone(), pods.clone());
        async move { reconcile(&client, &sets, &pods, &key).await }
    });
}

fn is_ready(p: &Pod) -> bool {
    p.phase == Phase::Running && p.ready
}

fn ordinal(set: &str, pod: &Pod) -> Option<usize> {
    pod.name.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

async fn reconcile(client: &Client, sets: &Informer, pods: &Informer<Pod>, key: &str) -> Result<(), String> {
    let Some(set) = sets.get(key) else { return Ok(()) };
    if set.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(());
    }
    let ns = set.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string();
    let name = set.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
    let uid = set.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("").to_string();
    let replicas = set.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1).max(0) as usize;
    let parallel = set.pointer("/spec/podManagementPolicy").and_then(Value::as_str) == Some("Parallel");
    let tmpl = set.pointer("/spec/template").cloned().unwrap_or(json!({}));
    let revision = format!("{name}-{}", crate::deployment::template_hash(&tmpl));
    let pods_path = format!("/api/v1/namespaces/{ns}/pods");
    let mut owned: Vec<Arc<Pod>> = pods.dependents_of(&uid).into_iter().filter(|p| p.controlled_by(&uid)).collect();
    owned.sort_by_key(|p| ordinal(&name, p).unwrap_or(usize::MAX));
    let at = |i: usize| owned.iter().find(|p| ordinal(&name, p) == Some(i));
    let terminating = owned.iter().any(|p| p.deleting);

    // Create missing ordinals (in order unless Parallel).
    for i in 0..replicas {
        if at(i).is_some() {
            continue;
        }
        if !parallel && (terminating || (0..i).any(|j| !at(j).is_some_and(|p| is_ready(p)))) {
            break;
        }
        for ct in set.pointer("/spec/volumeClaimTemplates").and_then(Value::as_array).into_iter().flatten() {
            let claim = format!("{}-{name}-{i}", ct.pointer("/metadata/name").and_then(Value::as_str).unwrap_or(""));
            let mut pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": ct.get("metadata").cloned().unwrap_or(json!({})), "spec": ct.get("spec").cloned().unwrap_or(json!({}))});
            pvc["metadata"]["name"] = json!(claim);
            pvc["metadata"]["namespace"] = json!(ns);
            pvc["metadata"]["labels"] = tmpl.pointer("/metadata/labels").cloned().unwrap_or(json!({}));
            match client.create(&format!("/api/v1/namespaces/{ns}/persistentvolumeclaims"), &pvc).await {
                Ok(_) => {}
                Err(e) if e.is_conflict() => {}
                Err(e) => return Err(format!("claim {claim}: {e}")),
            }
        }
        let pod_name = format!("{name}-{i}");
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": tmpl.get("metadata").cloned().unwrap_or(json!({})), "spec": tmpl.get("spec").cloned().unwrap_or(json!({}))});
        pod["metadata"]["name"] = json!(pod_name);
        pod["metadata"]["namespace"] = json!(ns);
        pod["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
        pod["metadata"]["labels"]["apps.kubernetes.io/pod-index"] = json!(i.to_string());
        pod["metadata"]["labels"][REVISION_LABEL] = json!(revision);
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
        if let Some(m) = pod["metadata"].as_object_mut() {
            m.remove("creationTimestamp");
        }
        pod["spec"]["hostname"] = json!(pod_name);
        if let Some(svc) = set.pointer("/spec/serviceName").and_then(Value::as_str).filter(|s| !s.is_empty()) {
            pod["spec"]["subdomain"] = json!(svc);
        }
        let mut vols: Vec<Value> = pod.pointer("/spec/volumes").and_then(Value::as_array).cloned().unwrap_or_default();
        for ct in set.pointer("/spec/volumeClaimTemplates").and_then(Value::as_array).into_iter().flatten() {
            let vname = ct.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
            vols.retain(|v| v["name"] != vname);
            vols.push(json!({"name": vname, "persistentVolumeClaim": {"claimName": format!("{vname}-{name}-{i}")}}));
        }
        if !vols.is_empty() {
            pod["spec"]["volumes"] = json!(vols);
        }
        match client.create(&pods_path, &pod).await {
            Ok(_) => crate::events::record(client, &set, "Normal", "SuccessfulCreate", &format!("create Pod {pod_name} in StatefulSet {name} successful"), "statefulset-controller").await,
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e.to_string()),
        }
        if !parallel {
            break; // one at a time: the next waits for this one to be Ready
        }
    }
    // Remove ordinals past the count, highest first (one at a time unless Parallel).
    let extra: Vec<&Arc<Pod>> = owned.iter().rev().filter(|p| ordinal(&name, p).is_some_and(|i| i >= replicas) && !p.deleting).collect();
    for p in extra.into_iter().take(if parallel { usize::MAX } else if terminating { 0 } else { 1 }) {
        let pn = &*p.name;
        client.delete(&format!("{pods_path}/{pn}"), None).await.map_err(|e| e.to_string())?;
        crate::events::record(client, &set, "Normal", "SuccessfulDelete", &format!("delete Pod {pn} in StatefulSet {name} successful"), "statefulset-controller").await;
    }
    // Rolling update: the highest outdated ordinal at or above the partition, once every
    // other pod is Ready.
    let partition = set.pointer("/spec/updateStrategy/rollingUpdate/partition").and_then(Value::as_i64).unwrap_or(0).max(0) as usize;
    let rolling = set.pointer("/spec/updateStrategy/type").and_then(Value::as_str).unwrap_or("RollingUpdate") == "RollingUpdate";
    let in_range: Vec<&Arc<Pod>> = owned.iter().filter(|p| ordinal(&name, p).is_some_and(|i| i < replicas)).collect();
    if rolling && !terminating && in_range.len() == replicas && in_range.iter().all(|p| is_ready(p)) {
        if let Some(p) = in_range.iter().rev().find(|p| ordinal(&name, p).is_some_and(|i| i >= partition) && p.label(REVISION_LABEL) != Some(revision.as_str())) {
            let pn = &*p.name;
            client.delete(&format!("{pods_path}/{pn}"), None).await.map_err(|e| e.to_string())?;
        }
    }
    let live: Vec<&Arc<Pod>> = owned.iter().filter(|p| !p.deleting).collect();
    let ready = live.iter().filter(|p| is_ready(p)).count();
    let updated = live.iter().filter(|p| p.label(REVISION_LABEL) == Some(revision.as_str())).count();
    let status = json!({
        "observedGeneration": set.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "replicas": live.len(), "readyReplicas": ready, "availableReplicas": ready,
        "currentReplicas": updated, "updatedReplicas": updated,
        "currentRevision": revision, "updateRevision": revision,
    });
    let cur = set.get("status").cloned().unwrap_or(json!({}));
    let changed = ["observedGeneration", "replicas", "readyReplicas", "availableReplicas", "updatedReplicas"].iter().any(|k| cur.get(*k).and_then(Value::as_i64).unwrap_or(0) != status[*k].as_i64().unwrap_or(0)) || cur.get("updateRevision") != status.get("updateRevision");
    if changed {
        match client.merge_patch(&format!("/apis/apps/v1/namespaces/{ns}/statefulsets/{name}/status"), &json!({"status": status})).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}
