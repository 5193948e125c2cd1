//! ReplicaSets: keep `spec.replicas` pods matching the template, owned by the ReplicaSet
//! (controller ownerReference), adopting matching orphans; create in slow-start batches
//! (1, 2, 4, ... as upstream, so a failing template costs few requests); delete the least
//! valuable pods first (unscheduled, then pending, then not ready, then newest); report
//! replicas, readyReplicas, availableReplicas and observedGeneration.

use serde_json::{json, Value};
use shoal_client::Client;

use std::sync::Arc;

use crate::informer::Informer;
use crate::pod::{Phase, Pod};
use crate::queue::WorkQueue;
use crate::Leadership;

/// Most pods created or deleted by one reconcile (upstream's burst).
const BURST: usize = 500;

pub fn start(client: Client, rss: Informer, pods: Informer<Pod>, lead: Leadership) {
    let q = WorkQueue::default();
    crate::feed(&rss, &q, |k, _, _| vec![k.to_string()]);
    // A pod change wakes its owner (and its former owner).
    crate::feed(&pods, &q, |_, now, old| crate::owner_keys("ReplicaSet", [now, old]));
    crate::spawn_workers("replicaset", q, lead, 4, move |key| {
        let (client, rss, pods) = (client.clone(), rss.clone(), pods.clone());
        async move { reconcile(&client, &rss, &pods, &key).await }
    });
}

/// Lower sorts first: the pods to delete first (upstream's ranking, simplified).
fn deletion_rank(p: &Pod) -> (u8, u8, u8, std::cmp::Reverse<&str>) {
    (u8::from(p.node_name.is_some()), u8::from(p.phase != Phase::Pending), u8::from(p.ready), std::cmp::Reverse(&*p.created))
}

async fn reconcile(client: &Client, rss: &Informer, pods: &Informer<Pod>, key: &str) -> Result<(), String> {
    let Some(rs) = rss.get(key) else { return Ok(()) };
    if rs.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(());
    }
    let ns = rs.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string();
    let name = rs.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
    let uid = rs.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("").to_string();
    let sel = rs.pointer("/spec/selector").cloned().unwrap_or(Value::Null);
    let want = rs.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1).max(0) as usize;
    let pods_path = format!("/api/v1/namespaces/{ns}/pods");
    let owner_ref = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true});

    // Adopt matching orphans (no controller owner); they count as owned from now on.
    // Orphans and owned pods both come from the owner index, not a scan of the namespace.
    let mut adopted: Vec<Arc<Pod>> = Vec::new();
    for p in pods.orphans_in(&ns).into_iter().filter(|p| p.is_active() && p.selected_by(&sel)) {
        let mut refs: Vec<Value> = p.owners.iter().map(|o| o.to_value()).collect();
        refs.push(owner_ref.clone());
        let patch = json!({"metadata": {"ownerReferences": refs, "resourceVersion": &*p.resource_version}});
        let v = client.merge_patch(&format!("{pods_path}/{}", p.name), &patch).await.map_err(|e| e.to_string())?;
        adopted.push(Arc::new(Pod::from_value(&v)));
    }
    let mut owned: Vec<Arc<Pod>> = pods.dependents_of(&uid).into_iter().filter(|p| p.controlled_by(&uid)).collect();
    for a in adopted {
        if !owned.iter().any(|o| o.uid == a.uid) {
            owned.push(a);
        }
    }
    let active: Vec<&Pod> = owned.iter().filter(|p| p.is_active()).map(|p| &**p).collect();
    if active.len() < want {
        let mut missing = (want - active.len()).min(BURST);
        let mut batch = 1usize;
        let tmpl = rs.pointer("/spec/template").cloned().unwrap_or(json!({}));
        while missing > 0 {
            let n = batch.min(missing);
            let mut ok = 0;
            let mut last_err = None;
            let creates = (0..n).map(|_| {
                let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": tmpl.get("metadata").cloned().unwrap_or(json!({})), "spec": tmpl.get("spec").cloned().unwrap_or(json!({}))});
                pod["metadata"]["generateName"] = json!(format!("{name}-"));
                pod["metadata"]["namespace"] = json!(ns);
                pod["metadata"]["ownerReferences"] = json!([owner_ref.clone()]);
                if let Some(m) = pod["metadata"].as_object_mut() {
                    m.remove("name");
                    m.remove("creationTimestamp");
                }
                let (client, path) = (client.clone(), pods_path.clone());
                async move { client.create(&path, &pod).await }
            });
            for r in futures_join(creates).await {
                match r {
                    Ok(p) => {
                        ok += 1;
                        let pn = p.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
                        crate::events::record(client, &rs, "Normal", "SuccessfulCreate", &format!("Created pod: {pn}"), "replicaset-controller").await;
                    }
                    Err(e) => last_err = Some(e.to_string()),
                }
            }
            missing -= n;
            if let Some(e) = last_err {
                return Err(format!("creating pods for {key}: {e} ({ok} of {n} created)"));
            }
            batch *= 2;
        }
    } else if active.len() > want {
        let mut victims: Vec<&Pod> = active.clone();
        victims.sort_by_key(|p| deletion_rank(p));
        for p in victims.into_iter().take((active.len() - want).min(BURST)) {
            let pname = &*p.name;
            client.delete(&format!("{pods_path}/{pname}"), None).await.map_err(|e| e.to_string())?;
            crate::events::record(client, &rs, "Normal", "SuccessfulDelete", &format!("Deleted pod: {pname}"), "replicaset-controller").await;
        }
    }
    // Status from what is observed now (the next event brings the effect of the writes).
    let template_sel = rs.pointer("/spec/template/metadata/labels").map(|l| json!({"matchLabels": l})).unwrap_or(Value::Null);
    let labels_match = |p: &&&Pod| p.selected_by(&template_sel);
    let ready = active.iter().filter(|p| p.ready).count();
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": active.iter().filter(labels_match).count(),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "observedGeneration": rs.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
    });
    let cur = rs.get("status").cloned().unwrap_or(json!({}));
    let changed = ["replicas", "fullyLabeledReplicas", "readyReplicas", "availableReplicas", "observedGeneration"].iter().any(|k| cur.get(*k).and_then(Value::as_i64).unwrap_or(0) != status[*k].as_i64().unwrap_or(0));
    if changed {
        let path = format!("/apis/apps/v1/namespaces/{ns}/replicasets/{name}/status");
        match client.merge_patch(&path, &json!({"status": status})).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}
