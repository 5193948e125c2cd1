//! Namespace deletion: once a namespace is Terminating, delete every namespaced object in
//! it (every served resource that supports deletecollection), wait until none is left,
//! then remove the `kubernetes` finalizer through `namespaces/NAME/finalize`, which lets the
//! API server delete the namespace.

use serde_json::Value;
use shoal_client::Client;

use crate::informer::Informer;
use crate::queue::WorkQueue;
use crate::Leadership;

pub fn start(client: Client, namespaces: Informer, lead: Leadership) {
    let q = WorkQueue::default();
    crate::feed(&namespaces, &q, |k, _, _| vec![k.to_string()]);
    crate::spawn_workers("namespace", q, lead, 2, move |key| {
        let (client, namespaces) = (client.clone(), namespaces.clone());
        async move { reconcile(&client, &namespaces, &key).await }
    });
}

/// Collection paths (`/api/v1/namespaces/{ns}/pods`) of every namespaced resource that can
/// be deleted as a collection, from discovery.
async fn namespaced_collections(client: &Client, ns: &str) -> Result<Vec<String>, String> {
    let mut gvs = vec!["/api/v1".to_string()];
    let groups = client.get("/apis").await.map_err(|e| e.to_string())?.unwrap_or(Value::Null);
    for g in groups["groups"].as_array().into_iter().flatten() {
        for v in g["versions"].as_array().into_iter().flatten() {
            if let Some(gv) = v["groupVersion"].as_str() {
                gvs.push(format!("/apis/{gv}"));
            }
        }
    }
    let mut out = Vec::new();
    for gv in gvs {
        let Some(list) = client.get(&gv).await.map_err(|e| e.to_string())? else { continue };
        for r in list["resources"].as_array().into_iter().flatten() {
            let name = r["name"].as_str().unwrap_or("");
            let verbs: Vec<&str> = r["verbs"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            if r["namespaced"].as_bool() == Some(true) && !name.contains('/') && verbs.contains(&"deletecollection") && verbs.contains(&"list") {
                let path = format!("{gv}/namespaces/{ns}/{name}");
                if !out.contains(&path) {
                    out.push(path);
                }
            }
        }
    }
    Ok(out)
}

async fn reconcile(client: &Client, namespaces: &Informer, key: &str) -> Result<(), String> {
    let Some(ns) = namespaces.get(key) else { return Ok(()) };
    if ns.pointer("/metadata/deletionTimestamp").is_none() {
        return Ok(());
    }
    let fins: Vec<Value> = ns.pointer("/spec/finalizers").and_then(Value::as_array).cloned().unwrap_or_default();
    if !fins.iter().any(|f| f == "kubernetes") {
        return Ok(());
    }
    let colls = namespaced_collections(client, key).await?;
    let mut remaining = 0;
    for c in &colls {
        client.delete(c, Some("Background")).await.map_err(|e| format!("deleting {c}: {e}"))?;
        let (items, _) = client.list(c).await.map_err(|e| e.to_string())?;
        remaining += items.len();
    }
    if remaining > 0 {
        return Err(format!("{remaining} objects still in namespace {key}"));
    }
    let mut done = (*ns).clone();
    done["spec"]["finalizers"] = Value::Array(fins.into_iter().filter(|f| f != "kubernetes").collect());
    match client.update(&format!("/api/v1/namespaces/{key}/finalize"), &done).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
