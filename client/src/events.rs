//! Events components record (core/v1 Events, as `kubectl get events` and `describe` show
//! them). Best effort: a failed event never fails the work it reports on.

use serde_json::{json, Value};
use crate::{time, Client};

/// Records a Normal or Warning event about `obj`.
pub async fn record(client: &Client, obj: &Value, ty: &str, reason: &str, message: &str, component: &str) {
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default");
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    let now = time::format(time::now_secs());
    let ev = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": format!("{name}."), "namespace": ns},
        "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": name, "namespace": ns, "uid": obj.pointer("/metadata/uid"), "resourceVersion": obj.pointer("/metadata/resourceVersion")},
        "reason": reason, "message": message, "type": ty,
        "source": {"component": component},
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        "reportingComponent": component, "reportingInstance": component,
    });
    if let Err(e) = client.create(&format!("/api/v1/namespaces/{ns}/events"), &ev).await {
        tracing::debug!(error = %e, reason, "recording an event failed");
    }
}
