//! Informers: a local copy of one resource kept from list + watch, re-listing when the watch
//! ends or the resourceVersion is too old, and telling subscribers which keys changed.
//! Architecture Invariant 3: every key is also re-announced on a periodic resync, so a
//! controller converges whatever events it missed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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

/// Drops what no controller reads and every object carries: managed fields and the
/// last-applied annotation. (Pods are cached as the compact `pod::Pod` instead.)
fn trim(v: &mut Value) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
        if let Some(a) = m.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
}

/// An owner reference as the controllers read it.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnerRef {
    pub api_version: Arc<str>,
    pub kind: Arc<str>,
    pub name: Box<str>,
    pub uid: Box<str>,
    pub controller: bool,
    pub block_owner_deletion: bool,
}

impl OwnerRef {
    pub fn from_value(r: &Value) -> OwnerRef {
        let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("");
        OwnerRef {
            api_version: crate::pod::intern(s("apiVersion")),
            kind: crate::pod::intern(s("kind")),
            name: s("name").into(),
            uid: s("uid").into(),
            controller: r["controller"] == true,
            block_owner_deletion: r["blockOwnerDeletion"] == true,
        }
    }

    pub fn to_value(&self) -> Value {
        let mut v = serde_json::json!({"apiVersion": &*self.api_version, "kind": &*self.kind, "name": &*self.name, "uid": &*self.uid});
        if self.controller {
            v["controller"] = Value::Bool(true);
        }
        if self.block_owner_deletion {
            v["blockOwnerDeletion"] = Value::Bool(true);
        }
        v
    }
}

/// The object metadata the garbage collector works on, whatever the cached type.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    pub deleting: bool,
    pub owners: Vec<OwnerRef>,
    pub finalizers: Vec<String>,
}

/// What an informer keeps of each object: built from the API's JSON once per change.
pub trait Cached: Send + Sync + 'static {
    fn from_api(v: Value) -> Self;
    /// UIDs of every owner reference (for the owner index).
    fn owner_uids(&self) -> Vec<&str>;
    /// Whether one owner reference is the controller (objects without one are orphans,
    /// which controllers may adopt).
    fn has_controller(&self) -> bool;
    fn meta(&self) -> Meta;
}

impl Cached for Value {
    fn from_api(mut v: Value) -> Self {
        trim(&mut v);
        v
    }

    fn owner_uids(&self) -> Vec<&str> {
        self.pointer("/metadata/ownerReferences").and_then(Value::as_array).into_iter().flatten().filter_map(|r| r["uid"].as_str()).collect()
    }

    fn has_controller(&self) -> bool {
        self.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|a| a.iter().any(|r| r["controller"] == true))
    }

    fn meta(&self) -> Meta {
        let s = |p: &str| self.pointer(p).and_then(Value::as_str).unwrap_or("").to_string();
        Meta {
            api_version: s("/apiVersion"),
            kind: s("/kind"),
            namespace: s("/metadata/namespace"),
            name: s("/metadata/name"),
            uid: s("/metadata/uid"),
            resource_version: s("/metadata/resourceVersion"),
            deleting: self.pointer("/metadata/deletionTimestamp").is_some_and(|d| !d.is_null()),
            owners: self.pointer("/metadata/ownerReferences").and_then(Value::as_array).map(|a| a.iter().map(OwnerRef::from_value).collect()).unwrap_or_default(),
            finalizers: self.pointer("/metadata/finalizers").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect()).unwrap_or_default(),
        }
    }
}

/// Where the owner index files objects without a controller owner.
const ORPHANS: &str = "";

/// The objects by key, and the keys of the dependents of each owner uid.
struct Contents<T> {
    objects: BTreeMap<String, Arc<T>>,
    by_owner: HashMap<Box<str>, BTreeSet<String>>,
}

impl<T: Cached> Contents<T> {
    fn index(&mut self, key: &str, obj: &T, add: bool) {
        let mut uids = obj.owner_uids();
        if !obj.has_controller() {
            uids.push(ORPHANS);
        }
        for uid in uids {
            if add {
                self.by_owner.entry(uid.into()).or_default().insert(key.to_string());
            } else if let Some(set) = self.by_owner.get_mut(uid) {
                set.remove(key);
                if set.is_empty() {
                    self.by_owner.remove(uid);
                }
            }
        }
    }

    fn insert(&mut self, key: String, obj: Arc<T>) -> Option<Arc<T>> {
        let old = self.remove(&key);
        self.index(&key, &obj, true);
        self.objects.insert(key, obj);
        old
    }

    fn remove(&mut self, key: &str) -> Option<Arc<T>> {
        let old = self.objects.remove(key)?;
        self.index(key, &old, false);
        Some(old)
    }
}

type Subscriber<T> = mpsc::UnboundedSender<(String, Option<Arc<T>>)>;

/// A shared, read-mostly copy of one resource.
pub struct Informer<T = Value> {
    /// Collection path, e.g. `/api/v1/pods`.
    pub path: String,
    store: Arc<RwLock<Contents<T>>>,
    subscribers: Arc<RwLock<Vec<Subscriber<T>>>>,
    synced: Arc<std::sync::atomic::AtomicBool>,
}

impl<T> Clone for Informer<T> {
    fn clone(&self) -> Self {
        Informer { path: self.path.clone(), store: self.store.clone(), subscribers: self.subscribers.clone(), synced: self.synced.clone() }
    }
}

impl<T: Cached> Informer<T> {
    pub fn new(path: &str) -> Informer<T> {
        Informer {
            path: path.to_string(),
            store: Arc::new(RwLock::new(Contents { objects: BTreeMap::new(), by_owner: HashMap::new() })),
            subscribers: Default::default(),
            synced: Default::default(),
        }
    }

    /// Changes are sent as (key, the object before the change, if any).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<(String, Option<Arc<T>>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.write().push(tx);
        rx
    }

    /// The shared copy of one object.
    pub fn get(&self, key: &str) -> Option<Arc<T>> {
        self.store.read().objects.get(key).cloned()
    }

    /// Every object for which `f` holds.
    pub fn list(&self, f: impl Fn(&T) -> bool) -> Vec<Arc<T>> {
        self.store.read().objects.values().filter(|v| f(v)).cloned().collect()
    }

    /// The objects of namespace `ns` for which `f` holds (a range of the key space, not a
    /// scan of every object).
    pub fn list_in(&self, ns: &str, f: impl Fn(&T) -> bool) -> Vec<Arc<T>> {
        let (from, to) = (format!("{ns}/"), format!("{ns}0"));
        self.store.read().objects.range(from..to).filter(|(_, v)| f(v)).map(|(_, v)| v.clone()).collect()
    }

    /// The objects with an owner reference to `uid` (an index lookup).
    pub fn dependents_of(&self, uid: &str) -> Vec<Arc<T>> {
        if uid.is_empty() {
            return Vec::new();
        }
        let st = self.store.read();
        st.by_owner.get(uid).into_iter().flatten().filter_map(|k| st.objects.get(k).cloned()).collect()
    }

    /// The objects of namespace `ns` without a controller owner (an index lookup).
    pub fn orphans_in(&self, ns: &str) -> Vec<Arc<T>> {
        let st = self.store.read();
        let (from, to) = (format!("{ns}/"), format!("{ns}0"));
        st.by_owner.get(ORPHANS).into_iter().flat_map(|set| set.range(from.clone()..to.clone())).filter_map(|k| st.objects.get(k).cloned()).collect()
    }

    pub fn keys(&self) -> Vec<String> {
        self.store.read().objects.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.store.read().objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    fn announce(&self, key: &str, old: Option<Arc<T>>) {
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
            let mut fresh = Contents { objects: BTreeMap::new(), by_owner: HashMap::new() };
            for o in items {
                fresh.insert(key_of(&o), Arc::new(T::from_api(o)));
            }
            let keys: Vec<String> = fresh.objects.keys().cloned().collect();
            let old = std::mem::replace(&mut *self.store.write(), fresh).objects;
            for (k, o) in &old {
                if self.get(k).is_none() {
                    self.announce(k, Some(o.clone()));
                }
            }
            for k in &keys {
                self.announce(k, old.get(k).cloned());
            }
            drop(old);
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
                            let cur = self.get(&k);
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
                        let obj = Arc::new(T::from_api(obj));
                        let old = self.store.write().insert(k.clone(), obj);
                        self.announce(&k, old);
                    }
                    "DELETED" => {
                        let k = key_of(&obj);
                        let old = self.store.write().remove(&k);
                        self.announce(&k, old.or_else(|| Some(Arc::new(T::from_api(obj)))));
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(name: &str, owners: Value) -> Arc<Value> {
        Arc::new(json!({"metadata": {"name": name, "namespace": "ns", "ownerReferences": owners}}))
    }

    #[test]
    fn owner_index_follows_updates_and_removals() {
        let mut c: Contents<Value> = Contents { objects: BTreeMap::new(), by_owner: HashMap::new() };
        c.insert("ns/a".into(), obj("a", json!([{"uid": "rs1", "controller": true}])));
        c.insert("ns/b".into(), obj("b", json!([{"uid": "rs1", "controller": true}, {"uid": "x"}])));
        c.insert("ns/c".into(), obj("c", json!([])));
        c.insert("other/d".into(), obj("d", json!([{"uid": "x"}])));
        let keys = |c: &Contents<Value>, uid: &str| c.by_owner.get(uid).map(|s| s.iter().cloned().collect::<Vec<_>>()).unwrap_or_default();
        assert_eq!(keys(&c, "rs1"), ["ns/a", "ns/b"]);
        assert_eq!(keys(&c, "x"), ["ns/b", "other/d"]);
        assert_eq!(keys(&c, ORPHANS), ["ns/c", "other/d"]);
        // Re-owning b drops it from rs1 and keeps the unchanged reference to x.
        c.insert("ns/b".into(), obj("b", json!([{"uid": "rs2", "controller": true}, {"uid": "x"}])));
        assert_eq!(keys(&c, "rs1"), ["ns/a"]);
        assert_eq!(keys(&c, "rs2"), ["ns/b"]);
        assert_eq!(keys(&c, "x"), ["ns/b", "other/d"]);
        c.remove("ns/a");
        c.remove("ns/c");
        assert!(!c.by_owner.contains_key("rs1"));
        assert_eq!(keys(&c, ORPHANS), ["other/d"]);
        c.remove("ns/b");
        c.remove("other/d");
        assert!(c.by_owner.is_empty() && c.objects.is_empty());
    }
}
