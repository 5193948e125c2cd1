//! Deployments: one ReplicaSet per pod template (named `<deployment>-<pod-template-hash>`),
//! revisions in `deployment.kubernetes.io/revision` (what `kubectl rollout history/undo`
//! read), rolling updates bounded by maxSurge/maxUnavailable over available pods,
//! Recreate, scaling, pause, history cleanup past revisionHistoryLimit, and status with the
//! Available and Progressing conditions.

use serde_json::{json, Value};
use shoal_client::{selector, time, Client};

use crate::informer::Informer;
use crate::queue::WorkQueue;
use crate::Leadership;

const REVISION: &str = "deployment.kubernetes.io/revision";
const HASH_LABEL: &str = "pod-template-hash";

pub fn start(client: Client, deployments: Informer, rss: Informer, lead: Leadership) {
    let q = WorkQueue::default();
    crate::feed(&deployments, &q, |k, _, _| vec![k.to_string()]);
    crate::feed(&rss, &q, |_, now, old| crate::owner_keys("Deployment", [now, old]));
    crate::spawn_workers("deployment", q, lead, 2, move |key| {
        let (client, deployments, rss) = (client.clone(), deployments.clone(), rss.clone());
        async move { reconcile(&client, &deployments, &rss, &key).await }
    });
}

/// FNV-1a (32 bit) of the template's canonical JSON, in upstream's "safe" alphabet (no
/// vowels, so a hash never spells a word).
pub fn template_hash(template: &Value) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in template.to_string().as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut out = String::new();
    let mut x = h;
    loop {
        out.push(ALPHABET[(x % 27) as usize] as char);
        x /= 27;
        if x == 0 {
            break;
        }
    }
    out
}

/// The template without the pod-template-hash label (to compare a ReplicaSet with it).
fn strip_hash(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(l) = t.pointer_mut("/metadata/labels").and_then(Value::as_object_mut) {
        l.remove(HASH_LABEL);
    }
    if let Some(m) = t.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("creationTimestamp");
        if m.get("labels").and_then(Value::as_object).is_some_and(|l| l.is_empty()) {
            m.remove("labels");
        }
    }
    t
}

/// An int-or-percent against a total (percent rounds up when `up`).
fn resolve(v: Option<&Value>, total: i64, up: bool, default: &str) -> i64 {
    let s = match v {
        Some(Value::Number(n)) => return n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => s.clone(),
        _ => default.to_string(),
    };
    match s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
        Some(p) if up => (p * total + 99) / 100,
        Some(p) => p * total / 100,
        None => s.parse().unwrap_or(0),
    }
}

fn revision(rs: &Value) -> i64 {
    rs.pointer(&format!("/metadata/annotations/{}", REVISION.replace('/', "~1"))).and_then(Value::as_str).and_then(|r| r.parse().ok()).unwrap_or(0)
}

fn int(v: &Value, p: &str) -> i64 {
    v.pointer(p).and_then(Value::as_i64).unwrap_or(0)
}

async fn scale_rs(client: &Client, d: &Value, rs: &Value, replicas: i64) -> Result<(), String> {
    let from = int(rs, "/spec/replicas");
    if from == replicas {
        return Ok(());
    }
    let ns = rs.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    let name = rs.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    client.merge_patch(&format!("/apis/apps/v1/namespaces/{ns}/replicasets/{name}"), &json!({"spec": {"replicas": replicas}})).await.map_err(|e| e.to_string())?;
    let dir = if replicas > from { "up" } else { "down" };
    crate::events::record(client, d, "Normal", "ScalingReplicaSet", &format!("Scaled {dir} replica set {name} from {from} to {replicas}"), "deployment-controller").await;
    Ok(())
}

async fn reconcile(client: &Client, deployments: &Informer, rss: &Informer, key: &str) -> Result<(), String> {
    let Some(d) = deployments.get(key) else { return Ok(()) };
    if d.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(());
    }
    let ns = d.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string();
    let name = d.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
    let uid = d.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("").to_string();
    let replicas = d.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
    let template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
    let sel = d.pointer("/spec/selector").cloned().unwrap_or(Value::Null);
    let owned: Vec<Value> = rss
        .dependents_of(&uid)
        .iter()
        .filter(|r| {
            r.pointer("/metadata/deletionTimestamp").is_none()
                && r.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|o| o.iter().any(|x| x["uid"] == uid.as_str() && x["controller"] == true))
        })
        .map(|r| (**r).clone())
        .collect();
    let want = strip_hash(&template);
    let hash = template_hash(&want);
    let max_rev = owned.iter().map(revision).max().unwrap_or(0);
    let current = owned.iter().find(|r| strip_hash(r.pointer("/spec/template").unwrap_or(&Value::Null)) == want).cloned();
    let paused = d.pointer("/spec/paused").and_then(Value::as_bool).unwrap_or(false);
    let change_cause = d.pointer("/metadata/annotations/kubernetes.io~1change-cause").cloned();
    let rs_path = format!("/apis/apps/v1/namespaces/{ns}/replicasets");
    let strategy = d.pointer("/spec/strategy/type").and_then(Value::as_str).unwrap_or("RollingUpdate").to_string();
    let surge = resolve(d.pointer("/spec/strategy/rollingUpdate/maxSurge"), replicas, true, "25%");
    let mut unavailable = resolve(d.pointer("/spec/strategy/rollingUpdate/maxUnavailable"), replicas, false, "25%");
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    let olds: Vec<&Value> = owned.iter().filter(|r| current.as_ref().is_none_or(|c| c.pointer("/metadata/uid") != r.pointer("/metadata/uid"))).collect();
    let old_total: i64 = olds.iter().map(|r| int(r, "/spec/replicas")).sum();

    let new_rs = match current {
        Some(rs) => {
            // A rollback to an older template makes it the newest revision again.
            if revision(&rs) < max_rev && !paused {
                let rn = rs.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
                let mut ann = json!({REVISION: (max_rev + 1).to_string()});
                if let Some(c) = &change_cause {
                    ann["kubernetes.io/change-cause"] = c.clone();
                }
                client.merge_patch(&format!("{rs_path}/{rn}"), &json!({"metadata": {"annotations": ann}})).await.map_err(|e| e.to_string())?;
            }
            rs
        }
        None if paused => return update_status(client, &d, &owned, None, unavailable).await,
        None => {
            let mut t = template.clone();
            t["metadata"]["labels"][HASH_LABEL] = json!(hash);
            let mut s = sel.clone();
            s["matchLabels"][HASH_LABEL] = json!(hash);
            let initial = if strategy == "Recreate" { if old_total > 0 { 0 } else { replicas } } else { (replicas + surge - old_total).clamp(0, replicas) };
            let mut ann = json!({REVISION: (max_rev + 1).to_string(), "deployment.kubernetes.io/desired-replicas": replicas.to_string(), "deployment.kubernetes.io/max-replicas": (replicas + surge).to_string()});
            if let Some(c) = &change_cause {
                ann["kubernetes.io/change-cause"] = c.clone();
            }
            let labels = t.pointer("/metadata/labels").cloned().unwrap_or(json!({}));
            let rs = json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": format!("{name}-{hash}"), "namespace": ns, "labels": labels, "annotations": ann,
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
                "spec": {"replicas": initial, "minReadySeconds": d.pointer("/spec/minReadySeconds").cloned().unwrap_or(json!(0)), "selector": s, "template": t},
            });
            match client.create(&rs_path, &rs).await {
                Ok(v) => {
                    crate::events::record(client, &d, "Normal", "ScalingReplicaSet", &format!("Scaled up replica set {name}-{hash} from 0 to {initial}"), "deployment-controller").await;
                    v
                }
                Err(e) if e.is_conflict() => return Err(format!("ReplicaSet {name}-{hash} exists but is not owned yet: {e}")),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let _ = selector::matches;
    // The Deployment carries the revision of its current ReplicaSet (kubectl rollout undo
    // patches these annotations).
    let rs_rev = if revision(&new_rs) < max_rev { max_rev + 1 } else { revision(&new_rs) };
    if revision(&d) != rs_rev && rs_rev > 0 {
        client
            .merge_patch(&format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}"), &json!({"metadata": {"annotations": {REVISION: rs_rev.to_string()}}}))
            .await
            .map_err(|e| e.to_string())?;
    }
    if !paused {
        let new_replicas = int(&new_rs, "/spec/replicas");
        if strategy == "Recreate" {
            for r in &olds {
                scale_rs(client, &d, r, 0).await?;
            }
            let old_pods: i64 = olds.iter().map(|r| int(r, "/status/replicas")).sum();
            if old_pods == 0 {
                scale_rs(client, &d, &new_rs, replicas).await?;
            }
        } else if olds.is_empty() || old_total == 0 {
            scale_rs(client, &d, &new_rs, replicas).await?;
        } else {
            // Up: as far as the surge allows.
            let total: i64 = old_total + new_replicas;
            let up = (replicas + surge - total).max(0);
            let target_new = (new_replicas + up).min(replicas);
            scale_rs(client, &d, &new_rs, target_new).await?;
            // Down: keep at least replicas - maxUnavailable available.
            let available: i64 = owned.iter().map(|r| int(r, "/status/availableReplicas")).sum();
            let mut can_remove = (available - (replicas - unavailable)).max(0);
            let mut olds_sorted = olds.clone();
            olds_sorted.sort_by_key(|r| revision(r));
            for r in olds_sorted {
                let have = int(r, "/spec/replicas");
                let unhealthy = have - int(r, "/status/availableReplicas");
                let cut = (unhealthy.max(0) + can_remove).min(have);
                if cut > 0 {
                    scale_rs(client, &d, r, have - cut).await?;
                    can_remove = (can_remove - (cut - unhealthy.max(0)).max(0)).max(0);
                }
            }
        }
        // History: old, empty ReplicaSets past revisionHistoryLimit go (oldest first).
        let limit = d.pointer("/spec/revisionHistoryLimit").and_then(Value::as_i64).unwrap_or(10).max(0) as usize;
        let mut empty: Vec<&&Value> = olds.iter().filter(|r| int(r, "/spec/replicas") == 0 && int(r, "/status/replicas") == 0).collect();
        if empty.len() > limit {
            empty.sort_by_key(|r| revision(r));
            for r in &empty[..empty.len() - limit] {
                let rn = r.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
                client.delete(&format!("{rs_path}/{rn}"), Some("Background")).await.map_err(|e| e.to_string())?;
            }
        }
    }
    update_status(client, &d, &owned, Some(&new_rs), unavailable).await
}

async fn update_status(client: &Client, d: &Value, owned: &[Value], new_rs: Option<&Value>, max_unavailable: i64) -> Result<(), String> {
    let replicas = d.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
    let sum = |p: &str| owned.iter().map(|r| int(r, p)).sum::<i64>();
    let (total, ready, available) = (sum("/status/replicas"), sum("/status/readyReplicas"), sum("/status/availableReplicas"));
    let updated = new_rs.and_then(|n| owned.iter().find(|r| r.pointer("/metadata/uid") == n.pointer("/metadata/uid"))).map_or(0, |r| int(r, "/status/replicas"));
    let now = time::format(time::now_secs());
    let avail_ok = available >= replicas - max_unavailable;
    let cur = d.get("status").cloned().unwrap_or(json!({}));
    let cond = |ty: &str, ok: bool, reason: &str, msg: String| {
        let prev = cur.get("conditions").and_then(Value::as_array).and_then(|c| c.iter().find(|x| x["type"] == ty)).cloned();
        let status = if ok { "True" } else { "False" };
        let since = prev.as_ref().filter(|p| p["status"] == status).and_then(|p| p.get("lastTransitionTime").cloned()).unwrap_or(json!(now));
        json!({"type": ty, "status": status, "reason": reason, "message": msg, "lastUpdateTime": now, "lastTransitionTime": since})
    };
    let name = d.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    let rs_name = new_rs.and_then(|r| r.pointer("/metadata/name")).and_then(Value::as_str).unwrap_or("");
    let complete = updated == replicas && available >= replicas && total == replicas;
    let status = json!({
        "observedGeneration": d.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (replicas - available).max(0),
        "conditions": [
            cond("Available", avail_ok, if avail_ok { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" }, if avail_ok { "Deployment has minimum availability.".into() } else { "Deployment does not have minimum availability.".into() }),
            cond("Progressing", true, if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" }, if complete { format!("ReplicaSet \"{rs_name}\" has successfully progressed.") } else { format!("ReplicaSet \"{rs_name}\" is progressing.") }),
        ],
    });
    let same = ["observedGeneration", "replicas", "updatedReplicas", "readyReplicas", "availableReplicas", "unavailableReplicas"].iter().all(|k| cur.get(*k).and_then(Value::as_i64).unwrap_or(0) == status[*k].as_i64().unwrap_or(0))
        && cur.get("conditions").and_then(Value::as_array).map(|c| c.iter().map(|x| (x["type"].clone(), x["status"].clone(), x["reason"].clone())).collect::<Vec<_>>())
            == status["conditions"].as_array().map(|c| c.iter().map(|x| (x["type"].clone(), x["status"].clone(), x["reason"].clone())).collect::<Vec<_>>());
    if same {
        return Ok(());
    }
    let ns = d.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    match client.merge_patch(&format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}/status"), &json!({"status": status})).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_percentages() {
        let t = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "a:1"}]}});
        let h = template_hash(&t);
        assert!(!h.is_empty() && h.bytes().all(|c| b"bcdfghjklmnpqrstvwxz2456789".contains(&c)));
        assert_eq!(h, template_hash(&t), "stable");
        let mut t2 = t.clone();
        t2["spec"]["containers"][0]["image"] = json!("a:2");
        assert_ne!(h, template_hash(&t2));
        let mut labelled = t.clone();
        labelled["metadata"]["labels"][HASH_LABEL] = json!(h);
        assert_eq!(strip_hash(&labelled), t);
        assert_eq!(resolve(Some(&json!("25%")), 10, true, "25%"), 3);
        assert_eq!(resolve(Some(&json!("25%")), 10, false, "25%"), 2);
        assert_eq!(resolve(Some(&json!(1)), 10, false, "25%"), 1);
        assert_eq!(resolve(None, 4, true, "25%"), 1);
    }
}
