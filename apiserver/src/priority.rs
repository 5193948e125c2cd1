//! PriorityClasses and the Priority admission step, as upstream: a pod's
//! `priorityClassName` is resolved to `spec.priority` and `spec.preemptionPolicy` when it
//! is created (the global default class, or 0, when it names none); an unknown class is
//! refused with 403; the two system classes exist in every cluster; at most one class is
//! the global default.

use serde_json::{json, Value};
use shoal_proto::etcdserverpb::RangeRequest;

use crate::backend::{prefix_end, Backend};
use crate::rest::{backend_error, create, Query, Target};
use crate::status::{ApiError, Gr};

/// The highest value a user-defined class may have (above it: system classes only).
pub const HIGHEST_USER_DEFINABLE: i64 = 1_000_000_000;

/// The classes every cluster has.
pub const SYSTEM: [(&str, i64); 2] = [("system-node-critical", 2_000_001_000), ("system-cluster-critical", 2_000_000_000)];

const PREFIX: &str = "/registry/priorityclasses/";

async fn classes(backend: &Backend) -> Result<Vec<Value>, ApiError> {
    let r = backend.range(RangeRequest { key: PREFIX.as_bytes().to_vec().into(), range_end: prefix_end(PREFIX.as_bytes()).into(), ..Default::default() }).await.map_err(backend_error)?;
    Ok(r.kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect())
}

/// Fills in the pod's priority from its class (a pod create).
pub async fn admit_pod(backend: &Backend, pod: &mut Value, name: &str) -> Result<(), ApiError> {
    let gr = Gr { group: "", resource: "pods" };
    let wanted = pod.pointer("/spec/priorityClassName").and_then(Value::as_str).unwrap_or("").to_string();
    let all = classes(backend).await?;
    let class = if wanted.is_empty() {
        all.iter().find(|c| c["globalDefault"] == true)
    } else {
        match all.iter().find(|c| c.pointer("/metadata/name").and_then(Value::as_str) == Some(wanted.as_str())) {
            Some(c) => Some(c),
            None => return Err(ApiError::forbidden(gr, name, &format!("no PriorityClass with name {wanted} was found"))),
        }
    };
    let priority = class.and_then(|c| c["value"].as_i64()).unwrap_or(0);
    let policy = class.and_then(|c| c["preemptionPolicy"].as_str()).unwrap_or("PreemptLowerPriority").to_string();
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else { return Ok(()) };
    if let Some(given) = spec.get("priority").and_then(Value::as_i64) {
        if given != priority {
            return Err(ApiError::forbidden(gr, name, &format!("the integer value of priority ({given}) must not be provided in pod spec; priority admission controller computed {priority} from the given PriorityClass name")));
        }
    }
    if let Some(c) = class {
        spec.insert("priorityClassName".into(), c["metadata"]["name"].clone());
    }
    spec.insert("priority".into(), json!(priority));
    if spec.get("preemptionPolicy").is_none_or(Value::is_null) {
        spec.insert("preemptionPolicy".into(), json!(policy));
    }
    Ok(())
}

/// Refuses a second global default class (a PriorityClass create).
pub async fn admit_class(backend: &Backend, class: &Value, name: &str) -> Result<(), ApiError> {
    if class["globalDefault"] != true {
        return Ok(());
    }
    if let Some(other) = classes(backend).await?.iter().find(|c| c["globalDefault"] == true && c.pointer("/metadata/name").and_then(Value::as_str) != Some(name)) {
        let other = other.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
        return Err(ApiError::forbidden(Gr { group: "scheduling.k8s.io", resource: "priorityclasses" }, name, &format!("PriorityClass {other} is already marked as default. Only one default can exist")));
    }
    Ok(())
}

/// Creates the system classes when missing.
pub async fn ensure_system_classes(backend: &Backend) -> Result<(), ApiError> {
    let def = crate::resources::find("scheduling.k8s.io", "v1", "priorityclasses").expect("priorityclasses are built in");
    for (name, value) in SYSTEM {
        let t = Target { def, ns: "", name, sub: "" };
        let desc = if name == "system-node-critical" { "Used for system critical pods that must not be moved from their current node." } else { "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary." };
        let obj = json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}, "value": value, "description": desc, "preemptionPolicy": "PreemptLowerPriority"});
        match create(backend, &t, obj, &Query::default()).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
