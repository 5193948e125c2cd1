//! The garbage collector: an object whose owners (ownerReferences) are all gone is deleted
//! (background propagation); an owner being deleted with the `foregroundDeletion` finalizer
//! first has its dependents deleted, with `orphan` first has its references removed from
//! them; then the finalizer is removed. An owner is confirmed missing with a live read
//! before anything is deleted, so a lagging informer never causes a deletion.

use serde_json::{json, Value};
use shoal_client::Client;

use crate::informer::{key_of, Informer};
use crate::queue::WorkQueue;
use crate::Leadership;

/// Collection path of a kind the collector watches, by (apiVersion, kind).
fn path_of(api_version: &str, kind: &str, ns: &str) -> Option<String> {
    let plural = match kind {
        "Pod" => "pods",
        "ReplicaSet" => "replicasets",
        "Deployment" => "deployments",
        "StatefulSet" => "statefulsets",
        "DaemonSet" => "daemonsets",
        "ControllerRevision" => "controllerrevisions",
        "ConfigMap" => "configmaps",
        "Secret" => "secrets",
        "Service" => "services",
        "EndpointSlice" => "endpointslices",
        _ => return None,
    };
    let base = if api_version == "v1" { "/api/v1".to_string() } else { format!("/apis/{api_version}") };
    Some(if ns.is_empty() { format!("{base}/{plural}") } else { format!("{base}/namespaces/{ns}/{plural}") })
}

fn self_path(obj: &Value) -> Option<String> {
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    let name = obj.pointer("/metadata/name").and_then(Value::as_str)?;
    Some(format!("{}/{name}", path_of(obj["apiVersion"].as_str().unwrap_or("v1"), obj["kind"].as_str()?, ns)?))
}

pub fn start(client: Client, kinds: Vec<(&'static str, Informer)>, lead: Leadership) {
    let informers: Vec<Informer> = kinds.iter().map(|(_, i)| i.clone()).collect();
    let kind_names: Vec<&'static str> = kinds.iter().map(|(k, _)| *k).collect();
    let q = WorkQueue::default();
    // Queue items are "<informer index>|<key>".
    for (i, inf) in informers.iter().enumerate() {
        let mut rx = inf.subscribe();
        let (qq, all) = (q.clone(), informers.clone());
        tokio::spawn(async move {
            while let Some((k, old)) = rx.recv().await {
                qq.add(&format!("{i}|{k}"));
                // An owner going away (deleted, or being deleted) wakes its dependents. Pods
                // and slices own nothing here: no scan for them.
                let Some(old) = old else { continue };
                if matches!(old.get("kind").and_then(Value::as_str), Some("Pod" | "EndpointSlice")) {
                    continue;
                }
                let going = all[i].get_arc(&k).is_none_or(|cur| cur.pointer("/metadata/deletionTimestamp").is_some());
                if !going {
                    continue;
                }
                let uid = old.pointer("/metadata/uid").and_then(Value::as_str).map(String::from);
                if let Some(uid) = uid {
                    for (j, dep) in all.iter().enumerate() {
                        for d in dep.list(|d| d.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|r| r.iter().any(|o| o["uid"] == uid))) {
                            qq.add(&format!("{j}|{}", key_of(&d)));
                        }
                    }
                }
            }
        });
    }
    crate::spawn_workers("garbagecollector", q, lead, 2, move |item| {
        let (client, informers, kind_names) = (client.clone(), informers.clone(), kind_names.clone());
        async move { reconcile(&client, &informers, &kind_names, &item).await }
    });
}

async fn owner_exists(client: &Client, informers: &[Informer], kinds: &[&str], ns: &str, r: &Value) -> Result<bool, String> {
    let (api, kind, name) = (r["apiVersion"].as_str().unwrap_or(""), r["kind"].as_str().unwrap_or(""), r["name"].as_str().unwrap_or(""));
    // The cache answers "alive" cheaply; only a missing owner is confirmed with a live read.
    if let Some(i) = kinds.iter().position(|k| *k == kind) {
        let key = if ns.is_empty() { name.to_string() } else { format!("{ns}/{name}") };
        if informers[i].get_arc(&key).is_some_and(|o| o.pointer("/metadata/uid") == r.get("uid")) {
            return Ok(true);
        }
    }
    let Some(coll) = path_of(api, kind, ns) else { return Ok(true) }; // unknown kinds are kept
    match client.get(&format!("{coll}/{name}")).await.map_err(|e| e.to_string())? {
        Some(o) => Ok(o.pointer("/metadata/uid") == r.get("uid")),
        None => Ok(false),
    }
}

async fn reconcile(client: &Client, informers: &[Informer], kinds: &[&str], item: &str) -> Result<(), String> {
    let Some((i, key)) = item.split_once('|') else { return Ok(()) };
    let Some(inf) = i.parse::<usize>().ok().and_then(|i| informers.get(i)) else { return Ok(()) };
    let Some(obj) = inf.get(key) else { return Ok(()) };
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string();
    let uid = obj.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("").to_string();
    let Some(me) = self_path(&obj) else { return Ok(()) };
    // 1. Dependent side: all owners gone → delete (background).
    let refs = obj.pointer("/metadata/ownerReferences").and_then(Value::as_array).cloned().unwrap_or_default();
    if !refs.is_empty() {
        let mut any_alive = false;
        for r in &refs {
            if owner_exists(client, informers, kinds, &ns, r).await? {
                any_alive = true;
                break;
            }
        }
        if !any_alive && obj.pointer("/metadata/deletionTimestamp").is_none() {
            client.delete(&me, Some("Background")).await.map_err(|e| e.to_string())?;
            return Ok(());
        }
    }
    // 2. Owner side: finalizers of a deletion in progress.
    if obj.pointer("/metadata/deletionTimestamp").is_none() {
        return Ok(());
    }
    let fins: Vec<String> = obj.pointer("/metadata/finalizers").and_then(Value::as_array).map(|a| a.iter().filter_map(|f| f.as_str().map(String::from)).collect()).unwrap_or_default();
    let dependents: Vec<(usize, Value)> = informers
        .iter()
        .enumerate()
        .flat_map(|(j, d)| d.list(|o| o.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|r| r.iter().any(|x| x["uid"] == uid))).into_iter().map(move |o| (j, o)))
        .collect();
    let remove_fin = |f: &str| {
        let rest: Vec<&String> = fins.iter().filter(|x| *x != f).collect();
        json!({"metadata": {"finalizers": rest, "resourceVersion": obj.pointer("/metadata/resourceVersion")}})
    };
    if fins.iter().any(|f| f == "orphan") {
        for (_, d) in &dependents {
            let keep: Vec<&Value> = d.pointer("/metadata/ownerReferences").and_then(Value::as_array).map(|r| r.iter().filter(|x| x["uid"] != uid.as_str()).collect()).unwrap_or_default();
            if let Some(p) = self_path(d) {
                let refs = if keep.is_empty() { Value::Null } else { json!(keep) };
                client.merge_patch(&p, &json!({"metadata": {"ownerReferences": refs}})).await.map_err(|e| e.to_string())?;
            }
        }
        client.merge_patch(&me, &remove_fin("orphan")).await.map_err(|e| e.to_string())?;
        return Ok(());
    }
    if fins.iter().any(|f| f == "foregroundDeletion") {
        if dependents.is_empty() {
            client.merge_patch(&me, &remove_fin("foregroundDeletion")).await.map_err(|e| e.to_string())?;
            return Ok(());
        }
        for (_, d) in &dependents {
            if d.pointer("/metadata/deletionTimestamp").is_none() {
                if let Some(p) = self_path(d) {
                    client.delete(&p, Some("Foreground")).await.map_err(|e| e.to_string())?;
                }
            }
        }
        return Err(format!("{} dependents of {me} still being deleted", dependents.len()));
    }
    Ok(())
}
