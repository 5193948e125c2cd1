//! ReplicaSets: keep `spec.replicas` pods matching the template, owned by the ReplicaSet
//! (controller ownerReference), adopting matching orphans; create in slow-start batches
//! (1, 2, 4, ... as upstream, so a failing template costs few requests); delete the least
//! valuable pods first (unscheduled, then pending, then not ready, then newest); report
//! replicas, readyReplicas, availableReplicas and observedGeneration.

use serde_json::{json, Value};
use shoal_client::{selector, Client};

use crate::informer::{key_of, Informer};
use crate::queue::WorkQueue;
use crate::Leadership;

/// Most pods created or deleted by one reconcile (upstream's burst).
const BURST: usize = 500;

pub fn start(client: Client, rss: Informer, pods: Informer, lead: Leadership) {
    let q = WorkQueue::default();
    crate::feed(&rss, &q, |k, _, _| vec![k.to_string()]);
    // A pod change wakes its owner (and its former owner).
    crate::feed(&pods, &q, |_, now, old| crate::owner_keys("ReplicaSet", [now, old]));
    crate::spawn_workers("replicaset", q, lead, 4, move |key| {
        let (client, rss, pods) = (client.clone(), rss.clone(), pods.clone());
        async move { reconcile(&client, &rss, &pods, &key).await }
    });
}

/// The name of the controller owner of `obj` if it is of `kind`.
pub fn controller_of(obj: &Value, kind: &str) -> Option<String> {
    obj.pointer("/metadata/ownerReferences")?.as_array()?.iter().find(|r| r["controller"] == true && r["kind"] == kind).and_then(|r| r["name"].as_str()).map(String::from)
}

fn is_active(p: &Value) -> bool {
    let phase = p.pointer("/status/phase").and_then(Value::as_str).unwrap_or("");
    p.pointer("/metadata/deletionTimestamp").is_none() && phase != "Succeeded" && phase != "Failed"
}

fn is_ready(p: &Value) -> bool {
    p.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// Lower sorts first: the pods to delete first (upstream's ranking, simplified).
fn deletion_rank(p: &Value) -> (u8, u8, u8, std::cmp::Reverse<String>) {
    let unassigned = p.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("").is_empty();
    let phase = p.pointer("/status/phase").and_then(Value::as_str).unwrap_or("");
    let created = p.pointer("/metadata/creationTimestamp").and_then(Value::as_str).unwrap_or("").to_string();
    (u8::from(!unassigned), u8::from(phase != "Pending"), u8::from(is_ready(p)), std::cmp::Reverse(created))
}

async fn reconcile(client: &Client, rss: &Informer, pods: &Informer, key: &str) -> Result<(), String> {
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
    let mut adopted: Vec<Value> = Vec::new();
    for p in pods.list_in(&ns, |p| is_active(p) && selector::matches(&sel, p.pointer("/metadata/labels").and_then(Value::as_object))) {
        let has_controller = p.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|r| r.iter().any(|o| o["controller"] == true));
        if !has_controller {
            let mut refs = p.pointer("/metadata/ownerReferences").and_then(Value::as_array).cloned().unwrap_or_default();
            refs.push(owner_ref.clone());
            let patch = json!({"metadata": {"ownerReferences": refs, "resourceVersion": p.pointer("/metadata/resourceVersion")}});
            let pname = p.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
            adopted.push(client.merge_patch(&format!("{pods_path}/{pname}"), &patch).await.map_err(|e| e.to_string())?);
        }
    }
    let mut owned: Vec<Value> = pods.list_in(&ns, |p| is_owned_by(p, &uid));
    for a in adopted {
        if !owned.iter().any(|o| o.pointer("/metadata/uid") == a.pointer("/metadata/uid")) {
            owned.push(a);
        }
    }
    let active: Vec<&Value> = owned.iter().filter(|p| is_active(p)).collect();
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
        let mut victims: Vec<&Value> = active.clone();
        victims.sort_by_key(|p| deletion_rank(p));
        for p in victims.into_iter().take((active.len() - want).min(BURST)) {
            let pname = p.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
            client.delete(&format!("{pods_path}/{pname}"), None).await.map_err(|e| e.to_string())?;
            crate::events::record(client, &rs, "Normal", "SuccessfulDelete", &format!("Deleted pod: {pname}"), "replicaset-controller").await;
        }
    }
    // Status from what is observed now (the next event brings the effect of the writes).
    let labels_match = |p: &&&Value| selector::matches(rs.pointer("/spec/template/metadata/labels").map(|l| json!({"matchLabels": l})).as_ref().unwrap_or(&Value::Null), p.pointer("/metadata/labels").and_then(Value::as_object));
    let ready = active.iter().filter(|p| is_ready(p)).count();
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
    let _ = key_of;
    Ok(())
}

fn is_owned_by(p: &Value, uid: &str) -> bool {
    p.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|r| r.iter().any(|o| o["uid"] == uid && o["controller"] == true))
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
