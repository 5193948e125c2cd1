//! The watch cache: every object under `/registry/` held in memory from one store watch,
//! serving lists and watches so that thousands of clients do not each hit the store.
//!
//! - Objects are kept as the JSON clients receive (resourceVersion already spliced in),
//!   plus their labels and field-selector values: a list is a concatenation of shared
//!   bytes, filtering parses nothing.
//! - Each event is rendered once per event type (`{"type":"MODIFIED","object":...}`) and
//!   the same bytes go to every watcher (Architecture Invariant 6: per event O(watchers
//!   matched), never O(objects)).
//! - Consistent reads (resourceVersion unset) first learn the store's current revision,
//!   then wait until the cache has applied it (asking the store for a progress
//!   notification), as upstream's consistent reads from cache do.
//! - Recent events are kept in a ring so a watch from a recent resourceVersion replays
//!   from memory; older ones fall back to the store (which answers 410 when compacted).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::RwLock;
use serde_json::{Map, Value};
use shoal_proto::etcdserverpb::RangeRequest;
use shoal_proto::mvccpb::event::EventType;
#[cfg(test)]
use shoal_proto::mvccpb::KeyValue;
use tokio::sync::{mpsc, watch as twatch};

use crate::backend::{prefix_end, Backend, BackendError};
use crate::kinds;
use crate::resources::ResourceDef;
use crate::rest::Filter;

const CRD_PREFIX: &str = "/registry/apiextensions.k8s.io/customresourcedefinitions/";

/// Events kept for watches that resume from a recent resourceVersion.
const RING_EVENTS: usize = 50_000;
/// Lines queued per watcher before it is considered too slow and closed (the client then
/// re-watches from its last resourceVersion, as it would after any disconnect).
const WATCHER_QUEUE: usize = 4096;

/// One cached object.
pub struct Entry {
    pub key: String,
    /// The stored JSON. With the embedded store it is the store's own buffer (shared, not
    /// copied); `metadata.resourceVersion` is spliced in at `rv_at` when it is written out.
    stored: Bytes,
    rv_at: usize,
    pub mod_rev: i64,
    pub create_rev: i64,
    labels: Option<Map<String, Value>>,
    name: String,
    namespace: String,
    fields: Vec<(&'static str, String)>,
}

impl Entry {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn labels(&self) -> Option<&Map<String, Value>> {
        self.labels.as_ref()
    }
    /// A precomputed field-selector value (for pods: `spec.nodeName`, `status.phase`, ...).
    pub fn field_str(&self, f: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| *k == f).map(|(_, v)| v.as_str())
    }
    fn field(&self, f: &str) -> Option<String> {
        match f {
            "metadata.name" => Some(self.name.clone()),
            "metadata.namespace" => Some(self.namespace.clone()),
            _ => self.fields.iter().find(|(k, _)| *k == f).map(|(_, v)| v.clone()),
        }
    }
    pub fn matches(&self, f: &Filter) -> bool {
        f.matches_parts(self.labels.as_ref(), |x| self.field(x))
    }
    /// Appends the object as served (resourceVersion spliced in).
    pub fn write_json(&self, out: &mut BytesMut) {
        let i = self.rv_at;
        out.put_slice(&self.stored[..i]);
        out.put_slice(b"\"resourceVersion\":\"");
        out.put_slice(self.mod_rev.to_string().as_bytes());
        out.put_u8(b'"');
        if self.stored.get(i) != Some(&b'}') {
            out.put_u8(b',');
        }
        out.put_slice(&self.stored[i..]);
    }
    /// Bytes the served JSON takes (within a few bytes).
    pub fn json_len(&self) -> usize {
        self.stored.len() + 40
    }
    /// The object as served.
    pub fn json(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.json_len());
        self.write_json(&mut b);
        b.freeze()
    }
    /// The parsed object (for tables, conversion, metadata-only views).
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json()).unwrap_or(Value::Null)
    }
}

/// The offset just after the `{` opening the top-level `metadata` object.
fn top_level_metadata(json: &[u8]) -> Option<usize> {
    let (mut depth, mut i) = (0usize, 0usize);
    while i < json.len() {
        match json[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    if json[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if depth == 1 && &json[start..i.min(json.len())] == b"metadata" {
                    let mut j = i + 1;
                    while j < json.len() && json[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    if json.get(j) == Some(&b':') {
                        j += 1;
                        while j < json.len() && json[j].is_ascii_whitespace() {
                            j += 1;
                        }
                        if json.get(j) == Some(&b'{') {
                            return Some(j + 1);
                        }
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn def_of_key(key: &str) -> Option<&'static ResourceDef> {
    let rest = key.strip_prefix("/registry/")?;
    crate::resources::all().into_iter().filter(|r| !r.is_virtual() && r.is_storage_version()).find(|r| rest.starts_with(r.storage) && rest.as_bytes().get(r.storage.len()) == Some(&b'/'))
}

/// One change to a key, from either feed (an etcd watch event or the embedded store's tap).
struct Change<'a> {
    key: &'a [u8],
    value: Bytes,
    create_rev: i64,
    mod_rev: i64,
    delete: bool,
}

fn entry_of(key: &[u8], stored: Bytes, create_rev: i64, mod_rev: i64) -> Option<Arc<Entry>> {
    let key = String::from_utf8(key.to_vec()).ok()?;
    let def = def_of_key(&key)?;
    let v: Value = serde_json::from_slice(&stored).ok()?;
    let rv_at = top_level_metadata(&stored)?;
    let fields = kinds::field_names(def.kind).iter().map(|f| (*f, kinds::field_value(def.kind, &v, f).unwrap_or_default())).collect();
    Some(Arc::new(Entry {
        key,
        stored,
        rv_at,
        mod_rev,
        create_rev,
        labels: v.pointer("/metadata/labels").and_then(Value::as_object).cloned(),
        name: v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string(),
        namespace: v.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string(),
        fields,
    }))
}

#[cfg(test)]
fn entry_of_kv(kv: &KeyValue) -> Option<Arc<Entry>> {
    entry_of(&kv.key, kv.value.clone(), kv.create_revision, kv.mod_revision)
}

/// One change, with its rendered lines (built on first use, shared by every watcher).
pub struct CacheEvent {
    pub rev: i64,
    pub key: String,
    /// The object after the change (for a delete: the last state, stamped with the
    /// delete's revision).
    pub obj: Arc<Entry>,
    pub prev: Option<Arc<Entry>>,
    pub deleted: bool,
    lines: [OnceLock<Bytes>; 3],
}

/// Watch event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvType {
    Added = 0,
    Modified = 1,
    Deleted = 2,
}

impl EvType {
    fn name(self) -> &'static str {
        match self {
            EvType::Added => "ADDED",
            EvType::Modified => "MODIFIED",
            EvType::Deleted => "DELETED",
        }
    }
}

/// `{"type":"T","object":OBJ}\n` without re-serializing the object.
pub fn line_bytes(ty: &str, obj: &Entry) -> Bytes {
    let mut b = BytesMut::with_capacity(obj.json_len() + 32);
    b.put_slice(b"{\"type\":\"");
    b.put_slice(ty.as_bytes());
    b.put_slice(b"\",\"object\":");
    obj.write_json(&mut b);
    b.put_slice(b"}\n");
    b.freeze()
}

impl CacheEvent {
    /// The event as this filter sees it (upstream's transition rules).
    pub fn type_for(&self, f: &Filter) -> Option<EvType> {
        let now = self.obj.matches(f);
        if self.deleted {
            return now.then_some(EvType::Deleted);
        }
        let before = self.prev.as_ref().is_some_and(|p| p.matches(f));
        match (self.prev.is_some(), before, now) {
            (false, _, true) => Some(EvType::Added),
            (true, true, true) => Some(EvType::Modified),
            (true, false, true) => Some(EvType::Added),
            (true, true, false) => Some(EvType::Deleted),
            _ => None,
        }
    }
    /// The shared line for a type.
    pub fn line(&self, ty: EvType) -> Bytes {
        self.lines[ty as usize].get_or_init(|| line_bytes(ty.name(), &self.obj)).clone()
    }
}

/// What a watcher receives.
pub enum Delivery {
    Event(Arc<CacheEvent>),
    /// The cache's revision advanced (for bookmarks).
    Progress(i64),
    /// The cache was rebuilt: the watcher must end (the client re-watches).
    Reset,
}

struct WatcherReg {
    prefix: String,
    tx: mpsc::Sender<Delivery>,
    /// For pod watchers pinned to one node (`fieldSelector=spec.nodeName=X`, what every
    /// node agent runs): the node. Such watchers are indexed by it, so an event reaches
    /// the watchers of its node (old and new), not all 5,000 of them (upstream's indexed
    /// triggers).
    node: Option<String>,
}

#[derive(Default)]
struct Inner {
    rev: i64,
    objects: BTreeMap<String, Arc<Entry>>,
    ring: VecDeque<Arc<CacheEvent>>,
    /// Every event with revision > `ring_from` is in the ring.
    ring_from: i64,
    watchers: HashMap<u64, WatcherReg>,
    /// Watchers with a node trigger, by node.
    by_node: HashMap<String, Vec<u64>>,
    next_watcher: u64,
}

impl Inner {
    fn remove_watcher(&mut self, id: u64) -> Option<WatcherReg> {
        let w = self.watchers.remove(&id)?;
        if let Some(n) = &w.node {
            if let Some(v) = self.by_node.get_mut(n) {
                v.retain(|x| *x != id);
                if v.is_empty() {
                    self.by_node.remove(n);
                }
            }
        }
        Some(w)
    }
}

/// The cache of one API server process.
pub struct Cache {
    backend: Backend,
    inner: RwLock<Inner>,
    rev_tx: twatch::Sender<i64>,
    ready: AtomicBool,
    progress_tx: mpsc::Sender<()>,
    progress_rx: parking_lot::Mutex<Option<mpsc::Receiver<()>>>,
}

/// A registered watcher; unregisters when dropped.
pub struct Subscription {
    cache: Arc<Cache>,
    id: u64,
    pub rx: mpsc::Receiver<Delivery>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cache.inner.write().remove_watcher(self.id);
    }
}

impl Cache {
    pub fn new(backend: Backend) -> Arc<Cache> {
        let (rev_tx, _) = twatch::channel(0);
        let (progress_tx, progress_rx) = mpsc::channel(16);
        Arc::new(Cache { backend, inner: RwLock::new(Inner::default()), rev_tx, ready: AtomicBool::new(false), progress_tx, progress_rx: parking_lot::Mutex::new(Some(progress_rx)) })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn revision(&self) -> i64 {
        self.inner.read().rev
    }

    pub fn object_count(&self) -> usize {
        self.inner.read().objects.len()
    }

    pub fn watcher_count(&self) -> usize {
        self.inner.read().watchers.len()
    }

    /// Keeps the cache in step with the store until the runtime stops: list, then watch;
    /// on any watch failure, list again.
    pub async fn run(self: Arc<Self>) {
        let mut progress_rx = self.progress_rx.lock().take().expect("Cache::run is called once");
        loop {
            match self.sync_once(&mut progress_rx).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "watch cache lost its store watch; relisting"),
            }
            self.ready.store(false, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn sync_once(self: &Arc<Self>, progress_rx: &mut mpsc::Receiver<()>) -> Result<(), BackendError> {
        let (start, end) = (b"/registry/".to_vec(), prefix_end(b"/registry/"));
        // With the embedded store: its keys and a tap of every later event, sharing the
        // stored value buffers. With etcd: a paged list, then a watch.
        enum Feed {
            Tap(mpsc::Receiver<shoal_store::watch::TapBatch>),
            Watch(crate::backend::WatchStream),
        }
        let mut kvs: Vec<(Bytes, Bytes, i64, i64)> = Vec::new();
        let (rev, mut feed) = match &self.backend {
            Backend::Embedded(m) => {
                let (tx, rx) = mpsc::channel(4096);
                let range = shoal_store::mvcc::KeyRange::from_etcd(&Bytes::from(start.clone()), &Bytes::from(end.clone()));
                let (list, rev) = m.snapshot_and_tap(&range, tx)?;
                kvs.extend(list.into_iter().map(|kv| (kv.key, kv.value, kv.create_rev, kv.mod_rev)));
                (rev, Feed::Tap(rx))
            }
            Backend::Etcd { .. } => {
                let mut key = start.clone();
                let mut rev = 0i64;
                loop {
                    let r = self.backend.range(RangeRequest { key: key.clone().into(), range_end: end.clone().into(), limit: 10_000, revision: rev, ..Default::default() }).await?;
                    if rev == 0 {
                        rev = r.header.as_ref().map_or(0, |h| h.revision);
                    }
                    let n = r.kvs.len();
                    let more = r.more;
                    if let Some(last) = r.kvs.last() {
                        key = last.key.to_vec();
                        key.push(0);
                    }
                    kvs.extend(r.kvs.into_iter().map(|kv| (kv.key, kv.value, kv.create_revision, kv.mod_revision)));
                    if !more || n == 0 {
                        break;
                    }
                }
                (rev, Feed::Watch(self.backend.watch(start, end, rev + 1).await?))
            }
        };
        // CRDs first: their custom resources are only recognised once they are served.
        let crds: Vec<Value> = kvs.iter().filter(|(k, ..)| k.starts_with(CRD_PREFIX.as_bytes())).filter_map(|(_, v, ..)| serde_json::from_slice(v).ok()).collect();
        crate::crd::rebuild(&crds);
        let mut objects = BTreeMap::new();
        for (k, v, c, m) in kvs {
            if let Some(e) = entry_of(&k, v, c, m) {
                objects.insert(e.key.clone(), e);
            }
        }
        {
            let mut g = self.inner.write();
            for (_, w) in g.watchers.drain() {
                let _ = w.tx.try_send(Delivery::Reset);
            }
            g.by_node.clear();
            g.objects = objects;
            g.rev = rev;
            g.ring.clear();
            g.ring_from = rev;
        }
        self.rev_tx.send_replace(rev);
        self.ready.store(true, Ordering::Release);
        tracing::info!(revision = rev, objects = self.object_count(), "watch cache synced");
        loop {
            match &mut feed {
                Feed::Tap(rx) => tokio::select! {
                    b = rx.recv() => match b {
                        None => return Err(BackendError::Unavailable("the store dropped the cache's tap (queue full or state replaced)".into())),
                        Some(batch) => self.apply(batch.iter().map(|(_, ev)| Change {
                            key: &ev.kv.key,
                            value: ev.kv.value.clone(),
                            create_rev: ev.kv.create_rev,
                            mod_rev: ev.kv.mod_rev,
                            delete: ev.kind == shoal_store::mvcc::EventKind::Delete,
                        }), 0),
                    },
                    // The tap carries every revision: the cache is as fresh as the store
                    // once its queue is drained, no progress notification needed.
                    Some(()) = progress_rx.recv() => {}
                },
                Feed::Watch(stream) => tokio::select! {
                    c = stream.next() => match c {
                        None => return Err(BackendError::Unavailable("store watch ended".into())),
                        Some(Err(e)) => return Err(e),
                        Some(Ok(chunk)) => {
                            let empty = chunk.events.is_empty();
                            self.apply(chunk.events.iter().filter_map(|ev| {
                                let kv = ev.kv.as_ref()?;
                                Some(Change { key: &kv.key, value: kv.value.clone(), create_rev: kv.create_revision, mod_rev: kv.mod_revision, delete: ev.r#type == EventType::Delete as i32 })
                            }), if empty { chunk.revision } else { 0 });
                        }
                    },
                    Some(()) = progress_rx.recv() => stream.request_progress(),
                },
            }
        }
    }

    /// Applies changes in revision order and fans them out. `progress_rev` > 0 is a
    /// progress notification (no changes, the store's revision).
    fn apply<'a>(&self, changes: impl Iterator<Item = Change<'a>>, progress_rev: i64) {
        let mut g = self.inner.write();
        let mut new_rev = g.rev;
        let mut any = false;
        for ch in changes {
            any = true;
            new_rev = new_rev.max(ch.mod_rev);
            let Ok(key) = std::str::from_utf8(ch.key) else { continue };
            if def_of_key(key).is_none() {
                continue;
            }
            let key = key.to_string();
            let prev = g.objects.get(&key).cloned();
            let ce = if ch.delete {
                let Some(p) = prev.clone() else { continue };
                g.objects.remove(&key);
                let obj = Arc::new(Entry { key: key.clone(), stored: p.stored.clone(), rv_at: p.rv_at, mod_rev: ch.mod_rev, create_rev: p.create_rev, labels: p.labels.clone(), name: p.name.clone(), namespace: p.namespace.clone(), fields: p.fields.clone() });
                CacheEvent { rev: ch.mod_rev, key: key.clone(), obj, prev, deleted: true, lines: Default::default() }
            } else {
                let Some(e) = entry_of(ch.key, ch.value, ch.create_rev, ch.mod_rev) else { continue };
                g.objects.insert(key.clone(), e.clone());
                CacheEvent { rev: ch.mod_rev, key: key.clone(), obj: e, prev, deleted: false, lines: Default::default() }
            };
            let ce = Arc::new(ce);
            if key.starts_with(CRD_PREFIX) {
                let crds: Vec<Value> = g.objects.range(CRD_PREFIX.to_string()..String::from_utf8(prefix_end(CRD_PREFIX.as_bytes())).unwrap_or_default()).map(|(_, e)| e.value()).collect();
                crate::crd::rebuild(&crds);
            }
            g.ring.push_back(ce.clone());
            if g.ring.len() > RING_EVENTS {
                if let Some(old) = g.ring.pop_front() {
                    g.ring_from = old.rev;
                }
            }
            let mut slow = Vec::new();
            let is_pod = ce.key.starts_with("/registry/pods/");
            for (id, w) in &g.watchers {
                if w.node.is_some() && is_pod {
                    continue;
                }
                if ce.key.starts_with(&w.prefix) && w.tx.try_send(Delivery::Event(ce.clone())).is_err() {
                    slow.push(*id);
                }
            }
            if is_pod && !g.by_node.is_empty() {
                let mut nodes: Vec<String> = ce.obj.field("spec.nodeName").into_iter().collect();
                if let Some(p) = ce.prev.as_ref().and_then(|p| p.field("spec.nodeName")) {
                    if !nodes.contains(&p) {
                        nodes.push(p);
                    }
                }
                for n in nodes {
                    for id in g.by_node.get(&n).into_iter().flatten() {
                        if let Some(w) = g.watchers.get(id) {
                            if ce.key.starts_with(&w.prefix) && w.tx.try_send(Delivery::Event(ce.clone())).is_err() {
                                slow.push(*id);
                            }
                        }
                    }
                }
            }
            for id in slow {
                if let Some(w) = g.remove_watcher(id) {
                    let _ = w.tx.try_send(Delivery::Reset);
                    tracing::info!(prefix = %w.prefix, "closed a watcher that fell too far behind");
                }
            }
        }
        if !any && progress_rev > 0 {
            new_rev = new_rev.max(progress_rev);
            for w in g.watchers.values() {
                let _ = w.tx.try_send(Delivery::Progress(new_rev));
            }
        }
        if new_rev > g.rev {
            g.rev = new_rev;
            if !any {
                g.ring_from = g.ring_from.max(g.ring.back().map_or(new_rev, |e| e.rev.min(new_rev)));
            }
            drop(g);
            self.rev_tx.send_replace(new_rev);
        }
    }

    /// Waits until the cache has applied revision `rev` (asking the store for progress),
    /// at most `limit`. False on timeout.
    pub async fn wait_for(&self, rev: i64, limit: Duration) -> bool {
        let mut rx = self.rev_tx.subscribe();
        if *rx.borrow() >= rev && self.is_ready() {
            return true;
        }
        let _ = self.progress_tx.try_send(());
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if *rx.borrow_and_update() >= rev && self.is_ready() {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return false,
            }
        }
    }

    /// Waits until the cache is as fresh as the store is now (a consistent read).
    pub async fn wait_fresh(&self) -> Result<i64, BackendError> {
        let cur = self.backend.current_revision().await?;
        if self.wait_for(cur, Duration::from_secs(3)).await {
            Ok(cur)
        } else {
            Err(BackendError::Unavailable(format!("the watch cache did not reach revision {cur} in time")))
        }
    }

    /// The matching objects under `prefix` starting at key `from`, at most `limit` (0: all),
    /// and the cache revision they were taken at; the bool says whether more remain.
    pub fn snapshot(&self, prefix: &str, from: &str, filter: &Filter, limit: usize) -> (Vec<Arc<Entry>>, i64, bool) {
        let g = self.inner.read();
        let end = String::from_utf8(prefix_end(prefix.as_bytes())).unwrap_or_default();
        let start = if from.is_empty() { prefix.to_string() } else { from.to_string() };
        let mut out = Vec::new();
        let mut more = false;
        for (_, e) in g.objects.range(start..end) {
            if !e.matches(filter) {
                continue;
            }
            if limit > 0 && out.len() == limit {
                more = true;
                break;
            }
            out.push(e.clone());
        }
        (out, g.rev, more)
    }

    /// The object at `key`, as of the cache's revision.
    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.inner.read().objects.get(key).cloned()
    }

    /// Registers a watcher of `prefix`. With `since = Some(rev)` the events after `rev`
    /// are replayed from the ring (None when the ring no longer covers them); with None
    /// the current matching objects are returned to be sent as ADDED.
    pub fn subscribe(self: &Arc<Self>, prefix: &str, filter: &Filter, since: Option<i64>) -> Option<(Subscription, Vec<Arc<Entry>>, Vec<Arc<CacheEvent>>, i64)> {
        let mut g = self.inner.write();
        if !self.is_ready() {
            return None;
        }
        let (initial, replay) = match since {
            Some(rev) => {
                if rev < g.ring_from || rev > g.rev {
                    return None;
                }
                (Vec::new(), g.ring.iter().filter(|e| e.rev > rev && e.key.starts_with(prefix)).cloned().collect())
            }
            None => {
                let end = String::from_utf8(prefix_end(prefix.as_bytes())).unwrap_or_default();
                (g.objects.range(prefix.to_string()..end).filter(|(_, e)| e.matches(filter)).map(|(_, e)| e.clone()).collect(), Vec::new())
            }
        };
        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        let id = g.next_watcher;
        g.next_watcher += 1;
        let node = if prefix.starts_with("/registry/pods/") { filter.fields.exact("spec.nodeName").map(String::from) } else { None };
        if let Some(n) = &node {
            g.by_node.entry(n.clone()).or_default().push(id);
        }
        g.watchers.insert(id, WatcherReg { prefix: prefix.to_string(), tx, node });
        let rev = g.rev;
        Some((Subscription { cache: self.clone(), id, rx }, initial, replay, rev))
    }
}

/// The same list as `list_body`, produced in chunks of about `chunk` bytes as the client
/// reads: a list of 150,000 pods never exists as one 300 MB buffer.
pub fn list_chunks(kind_list: &str, api_version: &str, meta: &Value, items: Vec<Arc<Entry>>, chunk: usize) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    let head = Bytes::from(format!("{{\"apiVersion\":{},\"items\":[", Value::String(api_version.to_string())));
    let tail = Bytes::from(format!("],\"kind\":{},\"metadata\":{}}}", Value::String(kind_list.to_string()), meta));
    let state = (items, 0usize, Some(head), Some(tail));
    futures::stream::unfold(state, move |(items, mut i, mut head, mut tail)| async move {
        if let Some(h) = head.take() {
            return Some((h, (items, i, None, tail)));
        }
        if i < items.len() {
            let mut b = BytesMut::with_capacity(chunk + 4096);
            while i < items.len() && b.len() < chunk {
                if i > 0 {
                    b.put_u8(b',');
                }
                items[i].write_json(&mut b);
                i += 1;
            }
            return Some((b.freeze(), (items, i, None, tail)));
        }
        tail.take().map(|t| (t, (items, i, None, None)))
    })
}

/// A list response body assembled from cached JSON: `{"kind":..., "items":[...]}`.
pub fn list_body(kind_list: &str, api_version: &str, meta: &Value, items: &[Arc<Entry>]) -> Bytes {
    let head = format!("{{\"apiVersion\":{},\"items\":[", Value::String(api_version.to_string()));
    let total: usize = items.iter().map(|e| e.json_len() + 1).sum::<usize>() + head.len() + 128;
    let mut b = BytesMut::with_capacity(total);
    b.put_slice(head.as_bytes());
    for (i, e) in items.iter().enumerate() {
        if i > 0 {
            b.put_u8(b',');
        }
        e.write_json(&mut b);
    }
    b.put_slice(format!("],\"kind\":{},\"metadata\":{}}}", Value::String(kind_list.to_string()), meta).as_bytes());
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(json: &[u8], rev: i64) -> Option<Bytes> {
        entry_of(b"/registry/configmaps/d/x", Bytes::copy_from_slice(json), 1, rev).map(|e| e.json())
    }

    #[test]
    fn stamping_splices_the_resource_version() {
        let raw = br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"},"data":{}}"#;
        let s = stamp(raw, 42).unwrap();
        let v: Value = serde_json::from_slice(&s).unwrap();
        assert_eq!(v["metadata"]["resourceVersion"], "42");
        assert_eq!(v["metadata"]["name"], "a");
        let empty = stamp(br#"{"metadata":{}}"#, 7).unwrap();
        assert_eq!(&empty[..], br#"{"metadata":{"resourceVersion":"7"}}"#);
        assert!(stamp(b"{}", 1).is_none());
        // A nested "metadata" object or a string that looks like one is not the top level.
        let tricky = br#"{"a":{"metadata":{"x":1}},"b":"\"metadata\":{","metadata":{"name":"n"}}"#;
        let v: Value = serde_json::from_slice(&stamp(tricky, 3).unwrap()).unwrap();
        assert_eq!(v["metadata"]["resourceVersion"], "3");
        assert!(v["a"]["metadata"].get("resourceVersion").is_none());
    }

    #[test]
    fn entries_and_lists() {
        let kv = KeyValue { key: b"/registry/pods/d/p".to_vec().into(), value: serde_json::to_vec(&serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "d", "labels": {"app": "web"}}, "spec": {"nodeName": "n1"}})).unwrap().into(), create_revision: 3, mod_revision: 5, version: 2, lease: 0 };
        let e = entry_of_kv(&kv).unwrap();
        assert_eq!(e.field("spec.nodeName").as_deref(), Some("n1"));
        assert_eq!(e.value()["metadata"]["resourceVersion"], "5");
        let body = list_body("PodList", "v1", &serde_json::json!({"resourceVersion": "9"}), &[e.clone(), e.clone()]);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["items"].as_array().unwrap().len(), 2);
        let items = vec![e.clone(), e.clone(), e.clone()];
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let chunks: Vec<Bytes> = rt.block_on(futures::StreamExt::collect(list_chunks("PodList", "v1", &serde_json::json!({"resourceVersion": "9"}), items.clone(), 10)));
        assert!(chunks.len() >= 4);
        let joined: Vec<u8> = chunks.concat();
        assert_eq!(&joined[..], &list_body("PodList", "v1", &serde_json::json!({"resourceVersion": "9"}), &items)[..]);
        assert_eq!(v["kind"], "PodList");
        assert!(entry_of_kv(&KeyValue { key: b"/registry/ipaddresses/10.96.0.1".to_vec().into(), value: b"x".to_vec().into(), ..Default::default() }).is_none());
        let pods = crate::resources::find("", "v1", "pods").unwrap();
        let line = line_bytes("ADDED", &entry_of(b"/registry/configmaps/d/x", Bytes::from_static(br#"{"metadata":{}}"#), 1, 2).unwrap());
        assert_eq!(&line[..], b"{\"type\":\"ADDED\",\"object\":{\"metadata\":{\"resourceVersion\":\"2\"}}}\n");
        assert!(def_of_key("/registry/pods/d/p").is_some_and(|d| std::ptr::eq(d, pods)));
        assert!(def_of_key("/registry/services/specs/d/s").is_some());
        assert!(def_of_key("/registry/podsx/d/p").is_none());
    }
}
