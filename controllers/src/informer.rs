//! Informers: a local copy of one resource kept from list + watch, re-listing when the watch
//! ends or the resourceVersion is too old, and telling subscribers which keys changed.
//! Architecture Invariant 3: every key is also re-announced on a periodic resync, so a
//! controller converges whatever events it missed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use serde_json::Value;
use shoal_client::Client;
use tokio::sync::mpsc;

/// `namespace/name` (or `name` for cluster-scoped objects).
pub fn key_of(obj: &Value) -> String {
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    match obj.pointer("/metadata/namespace").and_then(Value::as_str).filter(|n| !n.is_empty()) {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// Keeps only what the controllers read, so a cache of 150,000 pods stays small: no managed
/// fields or last-applied annotation on any object, and for pods only identity, labels,
/// owners, deletion, node, tolerations, affinity, container names/ports/resources and the
/// status phase, IP and conditions.
fn trim(v: &mut Value) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
        if let Some(a) = m.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
    if v.get("kind").and_then(Value::as_str) != Some("Pod") {
        return;
    }
    let keep = |o: &mut serde_json::Map<String, Value>, fields: &[&str]| o.retain(|k, _| fields.contains(&k.as_str()));
    if let Some(o) = v.as_object_mut() {
        keep(o, &["apiVersion", "kind", "metadata", "spec", "status"]);
    }
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        keep(m, &["name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp", "labels", "ownerReferences", "finalizers"]);
    }
    if let Some(spec) = v.get_mut("spec").and_then(Value::as_object_mut) {
        keep(spec, &["nodeName", "tolerations", "affinity", "containers", "initContainers"]);
        for list in ["containers", "initContainers"] {
            for c in spec.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
                if let Some(c) = c.as_object_mut() {
                    keep(c, &["name", "ports", "resources"]);
                }
            }
        }
    }
    if let Some(st) = v.get_mut("status").and_then(Value::as_object_mut) {
        keep(st, &["phase", "podIP", "conditions"]);
        for c in st.get_mut("conditions").and_then(Value::as_array_mut).into_iter().flatten() {
            if let Some(c) = c.as_object_mut() {
                keep(c, &["type", "status"]);
            }
        }
    }
}

/// A shared, read-mostly copy of one resource.
#[derive(Clone)]
pub struct Informer {
    /// Collection path, e.g. `/api/v1/pods`.
    pub path: String,
    store: Arc<RwLock<BTreeMap<String, Arc<Value>>>>,
    subscribers: Arc<RwLock<Vec<mpsc::UnboundedSender<(String, Option<Arc<Value>>)>>>>,
    synced: Arc<std::sync::atomic::AtomicBool>,
}

impl Informer {
    pub fn new(path: &str) -> Informer {
        Informer { path: path.to_string(), store: Default::default(), subscribers: Default::default(), synced: Default::default() }
    }

    /// Changes are sent as (key, the object before the change, if any).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<(String, Option<Arc<Value>>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.write().push(tx);
        rx
    }

    pub fn get(&self, key: &str) -> Option<Value> {
        self.store.read().get(key).map(|v| (**v).clone())
    }

    /// The shared copy (no clone).
    pub fn get_arc(&self, key: &str) -> Option<Arc<Value>> {
        self.store.read().get(key).cloned()
    }

    /// Every object for which `f` holds.
    pub fn list(&self, f: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.store.read().values().filter(|v| f(v)).map(|v| (**v).clone()).collect()
    }

    /// The objects of namespace `ns` for which `f` holds (a range of the key space, not a
    /// scan of every object).
    pub fn list_in(&self, ns: &str, f: impl Fn(&Value) -> bool) -> Vec<Value> {
        let (from, to) = (format!("{ns}/"), format!("{ns}0"));
        self.store.read().range(from..to).filter(|(_, v)| f(v)).map(|(_, v)| (**v).clone()).collect()
    }

    pub fn keys(&self) -> Vec<String> {
        self.store.read().keys().cloned().collect()
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    fn announce(&self, key: &str, old: Option<Arc<Value>>) {
        self.subscribers.write().retain(|s| s.send((key.to_string(), old.clone())).is_ok());
    }

    /// Keeps the copy in step until the process ends; re-announces every key each `resync`.
    pub async fn run(self, client: Client, resync: Duration) {
        let mut next_resync = tokio::time::Instant::now() + resync;
        loop {
            let (items, rv) = match client.list(&self.path).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(path = %self.path, error = %e, "list failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let fresh: BTreeMap<String, Arc<Value>> = items.into_iter().map(|mut o| (key_of(&o), {
                trim(&mut o);
                Arc::new(o)
            })).collect();
            let old = std::mem::replace(&mut *self.store.write(), fresh.clone());
            for (k, o) in &old {
                if !fresh.contains_key(k) {
                    self.announce(k, Some(o.clone()));
                }
            }
            for k in fresh.keys() {
                self.announce(k, old.get(k).cloned());
            }
            self.synced.store(true, std::sync::atomic::Ordering::Release);
            let mut rv = rv;
            let mut rx = match client.watch(&self.path, &rv).await {
                Ok(rx) => rx,
                Err(_) => continue,
            };
            loop {
                let ev = tokio::select! {
                    ev = rx.recv() => ev,
                    _ = tokio::time::sleep_until(next_resync) => {
                        next_resync = tokio::time::Instant::now() + resync;
                        for k in self.keys() {
                            let cur = self.get_arc(&k);
                            self.announce(&k, cur);
                        }
                        continue;
                    }
                };
                let Some((ty, obj)) = ev else { break };
                if let Some(r) = obj.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
                    rv = r.to_string();
                }
                match ty.as_str() {
                    "ADDED" | "MODIFIED" => {
                        let k = key_of(&obj);
                        let mut obj = obj;
                        trim(&mut obj);
                        let old = self.store.write().insert(k.clone(), Arc::new(obj));
                        self.announce(&k, old);
                    }
                    "DELETED" => {
                        let k = key_of(&obj);
                        let old = self.store.write().remove(&k);
                        self.announce(&k, old.or(Some(Arc::new(obj))));
                    }
                    "BOOKMARK" => {}
                    _ => break, // ERROR (e.g. 410): relist
                }
            }
            // The watch ended: resume from the last revision, else relist.
            let _ = rv;
        }
    }
}
