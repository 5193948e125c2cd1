//! The controllers' compact pod: only the fields a controller reads, with repeated strings
//! (namespaces, label keys, node names, owner kinds) interned. A `serde_json::Value` of the
//! same trimmed pod costs ~9 KB (every JSON object is a B-tree node of ~640 bytes); this
//! struct costs a few hundred bytes, which is what keeps 150,000 cached pods affordable.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;
use serde_json::{json, Value};
use shoal_client::selector;

use crate::informer::{Cached, Meta, OwnerRef};

static STRINGS: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(Default::default);

/// One shared copy of a string that many objects repeat. The table only grows, so only
/// strings with few distinct values (namespaces, keys, node names, kinds) go in it.
pub fn intern(s: &str) -> Arc<str> {
    let mut t = STRINGS.lock();
    if let Some(a) = t.get(s) {
        return a.clone();
    }
    let a: Arc<str> = Arc::from(s);
    t.insert(a.clone());
    a
}

/// Pod phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

/// A toleration of the pod's spec.
#[derive(Clone, Debug)]
pub struct Toleration {
    pub key: Arc<str>,
    pub exists: bool,
    pub value: Box<str>,
    pub effect: Arc<str>,
    pub seconds: Option<i64>,
}

/// A named or numbered container port.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: Box<str>,
    pub port: i64,
}

/// What the controllers know about one pod.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: Arc<str>,
    pub name: Box<str>,
    pub uid: Box<str>,
    pub resource_version: Box<str>,
    /// creationTimestamp as written (RFC 3339 sorts as text).
    pub created: Box<str>,
    pub deleting: bool,
    pub labels: Box<[(Arc<str>, Box<str>)]>,
    pub owners: Box<[OwnerRef]>,
    pub finalizers: Box<[Box<str>]>,
    pub node_name: Option<Arc<str>>,
    /// The node a required `matchFields metadata.name` affinity pins the pod to (DaemonSets).
    pub pinned_node: Option<Arc<str>>,
    pub tolerations: Box<[Toleration]>,
    pub ports: Box<[Port]>,
    /// Sums over the containers, in thousandths: (`requests`|`limits`, resource name, amount).
    pub resources: Box<[(bool, Arc<str>, i128)]>,
    pub phase: Phase,
    pub ip: Option<Box<str>>,
    pub ready: bool,
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn boxed(v: &Value, p: &str) -> Box<str> {
    s(v, p).into()
}

impl Pod {
    pub fn from_value(v: &Value) -> Pod {
        let labels = v.pointer("/metadata/labels").and_then(Value::as_object).map(|m| m.iter().map(|(k, v)| (intern(k), v.as_str().unwrap_or("").into())).collect()).unwrap_or_default();
        let owners = v.pointer("/metadata/ownerReferences").and_then(Value::as_array).map(|a| a.iter().map(OwnerRef::from_value).collect()).unwrap_or_default();
        let finalizers = v.pointer("/metadata/finalizers").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(Box::from).collect()).unwrap_or_default();
        let node = s(v, "/spec/nodeName");
        let pinned_node = v
            .pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|t| t["matchFields"].as_array().into_iter().flatten())
            .find(|f| f["key"] == "metadata.name")
            .and_then(|f| f["values"][0].as_str())
            .map(intern);
        let tolerations = v
            .pointer("/spec/tolerations")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|t| Toleration { key: intern(s(t, "/key")), exists: t["operator"] == "Exists", value: boxed(t, "/value"), effect: intern(s(t, "/effect")), seconds: t["tolerationSeconds"].as_i64() })
                    .collect()
            })
            .unwrap_or_default();
        let containers: Vec<&Value> = v.pointer("/spec/containers").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
        let ports = containers
            .iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .map(|p| Port { name: boxed(p, "/name"), port: p["containerPort"].as_i64().unwrap_or(0) })
            .collect();
        let mut resources: Vec<(bool, Arc<str>, i128)> = Vec::new();
        for c in &containers {
            for (limits, section) in [(false, "requests"), (true, "limits")] {
                for (res, q) in c.pointer(&format!("/resources/{section}")).and_then(Value::as_object).into_iter().flatten() {
                    let amount = match q {
                        Value::String(s) => crate::quota::milli(s),
                        Value::Number(n) => n.as_f64().map(|f| (f * 1000.0) as i128),
                        _ => None,
                    };
                    let Some(amount) = amount else { continue };
                    match resources.iter_mut().find(|(l, r, _)| *l == limits && &**r == res) {
                        Some(e) => e.2 += amount,
                        None => resources.push((limits, intern(res), amount)),
                    }
                }
            }
        }
        let phase = match s(v, "/status/phase") {
            "Running" => Phase::Running,
            "Succeeded" => Phase::Succeeded,
            "Failed" => Phase::Failed,
            "Unknown" => Phase::Unknown,
            _ => Phase::Pending,
        };
        let ready = v.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        Pod {
            namespace: intern(s(v, "/metadata/namespace")),
            name: boxed(v, "/metadata/name"),
            uid: boxed(v, "/metadata/uid"),
            resource_version: boxed(v, "/metadata/resourceVersion"),
            created: boxed(v, "/metadata/creationTimestamp"),
            deleting: v.pointer("/metadata/deletionTimestamp").is_some_and(|d| !d.is_null()),
            labels,
            owners,
            finalizers,
            node_name: (!node.is_empty()).then(|| intern(node)),
            pinned_node,
            tolerations,
            ports,
            resources: resources.into_boxed_slice(),
            phase,
            ip: v.pointer("/status/podIP").and_then(Value::as_str).filter(|ip| !ip.is_empty()).map(Box::from),
            ready,
        }
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| &**k == key).map(|(_, v)| &**v)
    }

    /// Whether a LabelSelector (`matchLabels`/`matchExpressions`) selects this pod.
    pub fn selected_by(&self, sel: &Value) -> bool {
        selector::matches_with(sel, |k| self.label(k))
    }

    /// Not deleted and not finished.
    pub fn is_active(&self) -> bool {
        !self.deleting && !matches!(self.phase, Phase::Succeeded | Phase::Failed)
    }

    /// The controller owner reference, if any.
    pub fn controller(&self) -> Option<&OwnerRef> {
        self.owners.iter().find(|o| o.controller)
    }

    /// Whether the controller owner is the object with this uid.
    pub fn controlled_by(&self, uid: &str) -> bool {
        self.controller().is_some_and(|o| &*o.uid == uid)
    }

    /// The node the pod runs on or is pinned to.
    pub fn target_node(&self) -> Option<&str> {
        self.node_name.as_deref().or(self.pinned_node.as_deref())
    }

    /// The container port called `name`.
    pub fn named_port(&self, name: &str) -> Option<i64> {
        self.ports.iter().find(|p| &*p.name == name).map(|p| p.port)
    }

    /// Sum of `requests` (or `limits`) of `resource` over the containers, in thousandths.
    pub fn resource_sum(&self, limits: bool, resource: &str) -> i128 {
        self.resources.iter().filter(|(l, r, _)| *l == limits && &**r == resource).map(|(_, _, a)| a).sum()
    }

    /// `None` if no toleration matches the taint, else its `tolerationSeconds` (None: forever).
    pub fn toleration_for(&self, key: &str, value: &str, effect: &str) -> Option<Option<i64>> {
        self.tolerations
            .iter()
            .find(|t| {
                let key_ok = (t.key.is_empty() && t.exists) || &*t.key == key;
                let val_ok = t.exists || &*t.value == value;
                let eff_ok = t.effect.is_empty() || &*t.effect == effect;
                key_ok && val_ok && eff_ok
            })
            .map(|t| t.seconds)
    }

    /// Enough of the object for an event's `involvedObject`.
    pub fn reference(&self) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": &*self.name, "namespace": &*self.namespace, "uid": &*self.uid, "resourceVersion": &*self.resource_version}})
    }
}

impl Cached for Pod {
    fn from_api(v: Value) -> Self {
        Pod::from_value(&v)
    }

    fn owner_uids(&self) -> Vec<&str> {
        self.owners.iter().map(|o| &*o.uid).collect()
    }

    fn has_controller(&self) -> bool {
        self.controller().is_some()
    }

    fn meta(&self) -> Meta {
        Meta {
            api_version: "v1".into(),
            kind: "Pod".into(),
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
            uid: self.uid.to_string(),
            resource_version: self.resource_version.to_string(),
            deleting: self.deleting,
            owners: self.owners.to_vec(),
            finalizers: self.finalizers.iter().map(|f| f.to_string()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "ns", "uid": "u1", "resourceVersion": "7", "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app": "web", "pod-template-hash": "abc"}, "finalizers": ["f"],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "rs1", "controller": true}]},
            "spec": {"nodeName": "n1",
                "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
                "containers": [
                    {"name": "a", "ports": [{"name": "http", "containerPort": 8080}], "resources": {"requests": {"cpu": "100m", "memory": "1Mi"}, "limits": {"cpu": "1"}}},
                    {"name": "b", "resources": {"requests": {"cpu": "250m"}}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "conditions": [{"type": "Ready", "status": "True"}]}
        })
    }

    #[test]
    fn reads_what_controllers_use() {
        let p = Pod::from_value(&sample());
        assert_eq!((&*p.namespace, &*p.name, &*p.uid, &*p.resource_version), ("ns", "web-1", "u1", "7"));
        assert_eq!(p.label("app"), Some("web"));
        assert!(p.selected_by(&json!({"matchLabels": {"app": "web"}})));
        assert!(!p.selected_by(&json!({"matchLabels": {"app": "db"}})));
        assert!(p.selected_by(&json!({"matchExpressions": [{"key": "pod-template-hash", "operator": "In", "values": ["abc"]}]})));
        assert!(p.controlled_by("rs1") && !p.controlled_by("rs2"));
        assert_eq!(p.target_node(), Some("n1"));
        assert_eq!(p.named_port("http"), Some(8080));
        assert_eq!(p.resource_sum(false, "cpu"), 350);
        assert_eq!(p.resource_sum(true, "cpu"), 1000);
        assert_eq!(p.resource_sum(false, "memory"), 1_048_576_000);
        assert_eq!(p.toleration_for("node.kubernetes.io/unreachable", "", "NoExecute"), Some(Some(300)));
        assert_eq!(p.toleration_for("node.kubernetes.io/not-ready", "", "NoExecute"), None);
        assert_eq!((p.phase, p.ready, p.ip.as_deref()), (Phase::Running, true, Some("10.0.0.5")));
        assert!(p.is_active() && !p.deleting);
        let m = p.meta();
        assert_eq!((m.kind.as_str(), m.finalizers.len(), m.owners.len()), ("Pod", 1, 1));
    }

    #[test]
    fn pinned_daemon_pods_and_deletion() {
        let mut v = sample();
        v["spec"].as_object_mut().unwrap().remove("nodeName");
        v["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n7"]}]}]}}});
        v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:01Z");
        let p = Pod::from_value(&v);
        assert_eq!((p.node_name.as_deref(), p.target_node()), (None, Some("n7")));
        assert!(p.deleting && !p.is_active());
        assert!(Arc::ptr_eq(&p.namespace, &intern("ns")));
    }
}
