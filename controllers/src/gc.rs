//! The garbage collector: an object whose owners (ownerReferences) are all gone is deleted
//! (background propagation); an owner being deleted with the `foregroundDeletion` finalizer
//! first has its dependents deleted, with `orphan` first has its references removed from
//! them; then the finalizer is removed. An owner is confirmed missing with a live read
//! before anything is deleted, so a lagging informer never causes a deletion.

use std::sync::Arc;

use serde_json::{json, Value};
use shoal_client::Client;
use tokio::sync::mpsc;

use crate::informer::{Cached, Informer, Meta, OwnerRef};
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

fn self_path(m: &Meta) -> Option<String> {
    Some(format!("{}/{}", path_of(&m.api_version, &m.kind, &m.namespace)?, m.name))
}

/// An informer of any cached type, seen through object metadata.
pub trait Watched: Send + Sync {
    fn meta(&self, key: &str) -> Option<Meta>;
    /// Objects with an owner reference to `uid`.
    fn dependents(&self, uid: &str) -> Vec<Meta>;
    /// Changes as (key, metadata before the change).
    fn changes(&self) -> mpsc::UnboundedReceiver<(String, Option<Meta>)>;
}

impl<T: Cached> Watched for Informer<T> {
    fn meta(&self, key: &str) -> Option<Meta> {
        self.get(key).map(|o| o.meta())
    }

    fn dependents(&self, uid: &str) -> Vec<Meta> {
        self.dependents_of(uid).iter().map(|o| o.meta()).collect()
    }

    fn changes(&self) -> mpsc::UnboundedReceiver<(String, Option<Meta>)> {
        let mut rx = self.subscribe();
        let (tx, out) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((k, old)) = rx.recv().await {
                if tx.send((k, old.map(|o| o.meta()))).is_err() {
                    break;
                }
            }
        });
        out
    }
}

type Kinds = Arc<Vec<(&'static str, Arc<dyn Watched>)>>;

pub fn start(client: Client, kinds: Vec<(&'static str, Arc<dyn Watched>)>, lead: Leadership) {
    let kinds: Kinds = Arc::new(kinds);
    let q = WorkQueue::default();
    // Queue items are "<informer index>|<key>".
    for (i, (_, inf)) in kinds.iter().enumerate() {
        let mut rx = inf.changes();
        let (qq, all) = (q.clone(), kinds.clone());
        tokio::spawn(async move {
            while let Some((k, old)) = rx.recv().await {
                qq.add(&format!("{i}|{k}"));
                // An owner going away (deleted, or being deleted) wakes its dependents (an
                // index lookup per informer).
                let Some(old) = old else { continue };
                if matches!(old.kind.as_str(), "Pod" | "EndpointSlice") {
                    continue; // they own nothing here
                }
                let going = all[i].1.meta(&k).is_none_or(|cur| cur.deleting);
                if !going || old.uid.is_empty() {
                    continue;
                }
                for (j, (_, dep)) in all.iter().enumerate() {
                    for d in dep.dependents(&old.uid) {
                        qq.add(&format!("{j}|{}", key_of_meta(&d)));
                    }
                }
            }
        });
    }
    crate::spawn_workers("garbagecollector", q, lead, 2, move |item| {
        let (client, kinds) = (client.clone(), kinds.clone());
        async move { reconcile(&client, &kinds, &item).await }
    });
}

fn key_of_meta(m: &Meta) -> String {
    if m.namespace.is_empty() {
        m.name.clone()
    } else {
        format!("{}/{}", m.namespace, m.name)
    }
}

async fn owner_exists(client: &Client, kinds: &Kinds, ns: &str, r: &OwnerRef) -> Result<bool, String> {
    // The cache answers "alive" cheaply; only a missing owner is confirmed with a live read.
    if let Some((_, inf)) = kinds.iter().find(|(k, _)| *k == &*r.kind) {
        let key = if ns.is_empty() { r.name.to_string() } else { format!("{ns}/{}", r.name) };
        if inf.meta(&key).is_some_and(|o| o.uid == *r.uid) {
            return Ok(true);
        }
    }
    let Some(coll) = path_of(&r.api_version, &r.kind, ns) else { return Ok(true) }; // unknown kinds are kept
    match client.get(&format!("{coll}/{}", r.name)).await.map_err(|e| e.to_string())? {
        Some(o) => Ok(o.pointer("/metadata/uid").and_then(Value::as_str) == Some(&*r.uid)),
        None => Ok(false),
    }
}

async fn reconcile(client: &Client, kinds: &Kinds, item: &str) -> Result<(), String> {
    let Some((i, key)) = item.split_once('|') else { return Ok(()) };
    let Some((_, inf)) = i.parse::<usize>().ok().and_then(|i| kinds.get(i)) else { return Ok(()) };
    let Some(obj) = inf.meta(key) else { return Ok(()) };
    let Some(me) = self_path(&obj) else { return Ok(()) };
    // 1. Dependent side: all owners gone → delete (background).
    if !obj.owners.is_empty() {
        let mut any_alive = false;
        for r in &obj.owners {
            if owner_exists(client, kinds, &obj.namespace, r).await? {
                any_alive = true;
                break;
            }
        }
        if !any_alive && !obj.deleting {
            client.delete(&me, Some("Background")).await.map_err(|e| e.to_string())?;
            return Ok(());
        }
    }
    // 2. Owner side: finalizers of a deletion in progress.
    if !obj.deleting {
        return Ok(());
    }
    let dependents: Vec<Meta> = kinds.iter().flat_map(|(_, d)| d.dependents(&obj.uid)).collect();
    let remove_fin = |f: &str| {
        let rest: Vec<&String> = obj.finalizers.iter().filter(|x| *x != f).collect();
        json!({"metadata": {"finalizers": rest, "resourceVersion": obj.resource_version}})
    };
    if obj.finalizers.iter().any(|f| f == "orphan") {
        for d in &dependents {
            let keep: Vec<Value> = d.owners.iter().filter(|x| *x.uid != *obj.uid).map(OwnerRef::to_value).collect();
            if let Some(p) = self_path(d) {
                let refs = if keep.is_empty() { Value::Null } else { json!(keep) };
                client.merge_patch(&p, &json!({"metadata": {"ownerReferences": refs}})).await.map_err(|e| e.to_string())?;
            }
        }
        client.merge_patch(&me, &remove_fin("orphan")).await.map_err(|e| e.to_string())?;
        return Ok(());
    }
    if obj.finalizers.iter().any(|f| f == "foregroundDeletion") {
        if dependents.is_empty() {
            client.merge_patch(&me, &remove_fin("foregroundDeletion")).await.map_err(|e| e.to_string())?;
            return Ok(());
        }
        for d in &dependents {
            if !d.deleting {
                if let Some(p) = self_path(d) {
                    client.delete(&p, Some("Foreground")).await.map_err(|e| e.to_string())?;
                }
            }
        }
        return Err(format!("{} dependents of {me} still being deleted", dependents.len()));
    }
    Ok(())
}
