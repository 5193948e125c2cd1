//! Storage admission and bootstrap: the DefaultStorageClass admission step (a claim that
//! names no class gets the default one, as upstream), and the `standard` StorageClass every
//! new cluster starts with — Shoal's node-local provisioner (`shoal.io/local-path`,
//! WaitForFirstConsumer: a local volume lives on the node its first pod is scheduled to).

use serde_json::{json, Value};
use shoal_proto::etcdserverpb::RangeRequest;

use crate::backend::{prefix_end, Backend};
use crate::rest::{backend_error, create, Query, Target};
use crate::status::ApiError;

/// The built-in provisioner (the controllers provision, the agent creates the directory).
pub const LOCAL_PROVISIONER: &str = "shoal.io/local-path";
const DEFAULT_ANNOTATION: &str = "storageclass.kubernetes.io/is-default-class";
const PREFIX: &str = "/registry/storageclasses/";

async fn classes(backend: &Backend) -> Result<Vec<Value>, ApiError> {
    let r = backend.range(RangeRequest { key: PREFIX.as_bytes().to_vec().into(), range_end: prefix_end(PREFIX.as_bytes()).into(), ..Default::default() }).await.map_err(backend_error)?;
    Ok(r.kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect())
}

fn is_default(c: &Value) -> bool {
    c.pointer("/metadata/annotations").and_then(|a| a.get(DEFAULT_ANNOTATION)).and_then(Value::as_str) == Some("true")
}

/// DefaultStorageClass: fills `spec.storageClassName` of a new claim that has none (an
/// explicit `""` means "no class" and is kept). With several defaults the newest wins.
pub async fn admit_claim(backend: &Backend, claim: &mut Value) -> Result<(), ApiError> {
    if claim.pointer("/spec/storageClassName").is_some_and(|v| !v.is_null()) {
        return Ok(());
    }
    let mut defaults: Vec<Value> = classes(backend).await?.into_iter().filter(is_default).collect();
    defaults.sort_by(|a, b| a.pointer("/metadata/creationTimestamp").and_then(Value::as_str).cmp(&b.pointer("/metadata/creationTimestamp").and_then(Value::as_str)));
    if let (Some(c), Some(spec)) = (defaults.last(), claim.get_mut("spec").and_then(Value::as_object_mut)) {
        spec.insert("storageClassName".into(), c["metadata"]["name"].clone());
    }
    Ok(())
}

/// Creates the `standard` class when the cluster has no StorageClass at all.
pub async fn ensure_default_class(backend: &Backend) -> Result<(), ApiError> {
    if !classes(backend).await?.is_empty() {
        return Ok(());
    }
    let def = crate::resources::find("storage.k8s.io", "v1", "storageclasses").expect("storageclasses are built in");
    let t = Target { def, ns: "", name: "standard", sub: "" };
    let obj = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "standard", "annotations": {DEFAULT_ANNOTATION: "true"}},
        "provisioner": LOCAL_PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer"});
    match create(backend, &t, obj, &Query::default()).await {
        Ok(_) => Ok(()),
        Err(e) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}
