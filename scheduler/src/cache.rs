//! The scheduler's cache: every node as a row of a structure-of-arrays table (so one pass
//! over 5,000 nodes reads a few dense columns), and every pod that holds resources on a
//! node — bound ones from the API and *assumed* ones the scheduler has chosen a node for
//! but whose binding is not yet confirmed.
//!
//! Architecture Invariant 4: `assume` re-checks the fit of the chosen node under the
//! ledger's lock, against every bound and assumed pod, so concurrent workers never
//! overcommit a node.
//!
//! Concurrency: node structure (rows, labels, taints, allocatable) changes under the
//! caller's write lock (`&mut self`); what pods use changes through `&self` — the ledger
//! (a mutex) holds the truth and mirrors it into atomic columns that workers read without
//! locks while they filter and score. A worker may decide on a slightly stale view; the
//! reservation is then refused and it decides again (optimistic concurrency).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::model::{FastMap, HostPort, Interner, NodeSpec, PodInfo, Resources, Taint};

/// What the pods on one node use (kept by node name, so pods bound to a node the cache has
/// not seen yet are counted once it arrives).
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub requested: Resources,
    pub nonzero_cpu: i64,
    pub nonzero_memory: i64,
    pub pods: i64,
    pub ports: Vec<HostPort>,
}

impl Usage {
    fn apply(&mut self, p: &PodInfo, sign: i64) {
        let r = &p.requests;
        self.requested.milli_cpu += sign * r.milli_cpu;
        self.requested.memory += sign * r.memory;
        self.requested.ephemeral += sign * r.ephemeral;
        for &(k, v) in &r.scalars {
            match self.requested.scalars.iter_mut().find(|(n, _)| *n == k) {
                Some(e) => e.1 += sign * v,
                None => self.requested.scalars.push((k, sign * v)),
            }
        }
        self.nonzero_cpu += sign * p.nonzero_cpu;
        self.nonzero_memory += sign * p.nonzero_memory;
        self.pods += sign;
        for hp in &p.host_ports {
            if sign > 0 {
                self.ports.push(hp.clone());
            } else if let Some(i) = self.ports.iter().position(|x| x == hp) {
                self.ports.swap_remove(i);
            }
        }
    }
}

/// The node rows. Column `i` of every vector is node `i`; a removed node's row is marked
/// dead and reused.
#[derive(Default, Debug)]
pub struct NodeTable {
    pub names: Vec<Arc<str>>,
    pub live: Vec<bool>,
    pub alloc_cpu: Vec<i64>,
    pub alloc_memory: Vec<i64>,
    pub alloc_ephemeral: Vec<i64>,
    pub max_pods: Vec<i64>,
    req_cpu: Vec<AtomicI64>,
    req_memory: Vec<AtomicI64>,
    req_ephemeral: Vec<AtomicI64>,
    pod_count: Vec<AtomicI64>,
    nonzero_cpu: Vec<AtomicI64>,
    nonzero_memory: Vec<AtomicI64>,
    /// (resource, allocatable, requested) of extended resources.
    pub scalars: Vec<Vec<(u32, i64, AtomicI64)>>,
    /// Sorted (key, value) ids.
    pub labels: Vec<Vec<(u32, u32)>>,
    pub taints: Vec<Vec<Taint>>,
    pub unschedulable: Vec<bool>,
    /// Host ports in use (locked only for pods that ask for host ports).
    pub ports: Vec<Mutex<Vec<HostPort>>>,
    pub images: Vec<Vec<(Arc<str>, i64)>>,
    free: Vec<u32>,
}

impl NodeTable {
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The value of label `key` on node `i`.
    pub fn label(&self, i: usize, key: u32) -> Option<u32> {
        let l = &self.labels[i];
        l.binary_search_by_key(&key, |&(k, _)| k).ok().map(|j| l[j].1)
    }

    pub fn req_cpu(&self, i: usize) -> i64 {
        self.req_cpu[i].load(Relaxed)
    }
    pub fn req_memory(&self, i: usize) -> i64 {
        self.req_memory[i].load(Relaxed)
    }
    pub fn req_ephemeral(&self, i: usize) -> i64 {
        self.req_ephemeral[i].load(Relaxed)
    }
    pub fn pod_count(&self, i: usize) -> i64 {
        self.pod_count[i].load(Relaxed)
    }
    pub fn nonzero_cpu(&self, i: usize) -> i64 {
        self.nonzero_cpu[i].load(Relaxed)
    }
    pub fn nonzero_memory(&self, i: usize) -> i64 {
        self.nonzero_memory[i].load(Relaxed)
    }

    /// Mirrors a node's usage into the columns (callers hold the ledger lock or `&mut`).
    fn set_usage(&self, i: usize, u: &Usage) {
        self.req_cpu[i].store(u.requested.milli_cpu, Relaxed);
        self.req_memory[i].store(u.requested.memory, Relaxed);
        self.req_ephemeral[i].store(u.requested.ephemeral, Relaxed);
        self.pod_count[i].store(u.pods, Relaxed);
        self.nonzero_cpu[i].store(u.nonzero_cpu, Relaxed);
        self.nonzero_memory[i].store(u.nonzero_memory, Relaxed);
        for s in &self.scalars[i] {
            s.2.store(u.requested.scalars.iter().find(|(k, _)| *k == s.0).map_or(0, |x| x.1), Relaxed);
        }
        *self.ports[i].lock() = u.ports.clone();
    }

    fn set_spec(&mut self, i: usize, n: &NodeSpec) {
        self.names[i] = n.name.clone();
        self.live[i] = true;
        self.alloc_cpu[i] = n.allocatable.milli_cpu;
        self.alloc_memory[i] = n.allocatable.memory;
        self.alloc_ephemeral[i] = n.allocatable.ephemeral;
        self.max_pods[i] = n.max_pods;
        self.scalars[i] = n.allocatable.scalars.iter().map(|&(k, v)| (k, v, AtomicI64::new(0))).collect();
        self.labels[i] = n.labels.clone();
        self.taints[i] = n.taints.clone();
        self.unschedulable[i] = n.unschedulable;
        self.images[i] = n.images.clone();
    }

    fn same_spec(&self, i: usize, n: &NodeSpec) -> bool {
        self.alloc_cpu[i] == n.allocatable.milli_cpu
            && self.alloc_memory[i] == n.allocatable.memory
            && self.alloc_ephemeral[i] == n.allocatable.ephemeral
            && self.max_pods[i] == n.max_pods
            && self.scalars[i].len() == n.allocatable.scalars.len()
            && self.scalars[i].iter().zip(&n.allocatable.scalars).all(|(a, b)| a.0 == b.0 && a.1 == b.1)
            && self.labels[i] == n.labels
            && self.taints[i] == n.taints
            && self.unschedulable[i] == n.unschedulable
            && self.images[i] == n.images
    }

    fn push_row(&mut self) -> usize {
        if let Some(i) = self.free.pop() {
            return i as usize;
        }
        self.names.push(Arc::from(""));
        self.live.push(false);
        for c in [&mut self.alloc_cpu, &mut self.alloc_memory, &mut self.alloc_ephemeral, &mut self.max_pods] {
            c.push(0);
        }
        for c in [&mut self.req_cpu, &mut self.req_memory, &mut self.req_ephemeral, &mut self.pod_count, &mut self.nonzero_cpu, &mut self.nonzero_memory] {
            c.push(AtomicI64::new(0));
        }
        self.scalars.push(Vec::new());
        self.labels.push(Vec::new());
        self.taints.push(Vec::new());
        self.unschedulable.push(false);
        self.ports.push(Mutex::new(Vec::new()));
        self.images.push(Vec::new());
        self.names.len() - 1
    }
}

/// Why an assumption was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum AssumeError {
    UnknownNode,
    NoLongerFits,
    AlreadyAssigned,
    /// A pod that changes the inter-pod counts was placed after the decision: decide again.
    Stale,
}

struct PodEntry {
    node: Arc<str>,
    info: Arc<PodInfo>,
    /// Set while the binding is in flight; cleared when the API confirms it. (Assumptions
    /// never expire on a timer: the binder always reports, and forgetting a pod whose
    /// binding succeeded but whose event is late would overcommit its node.)
    assumed_at: Option<Instant>,
}

/// What pods use, by node name, and every pod holding resources.
#[derive(Default)]
struct Ledger {
    usage: HashMap<Arc<str>, Usage>,
    pods: HashMap<Arc<str>, PodEntry>,
    /// Placed pods with required anti-affinity (every candidate must be checked against them).
    with_anti_affinity: usize,
    /// Bumped by every placement; the recent ones are kept so a reservation decided on
    /// older topology counts can tell whether a relevant pod arrived meanwhile.
    version: u64,
    recent: VecDeque<(u64, Arc<PodInfo>)>,
}

/// Placements remembered for the staleness check of topology-aware reservations.
const RECENT: usize = 4096;

/// Nodes, the pods placed on them, and the strings they use.
#[derive(Default)]
pub struct Cache {
    pub nodes: NodeTable,
    pub names: Interner,
    by_name: FastMap<Arc<str>, u32>,
    ledger: Mutex<Ledger>,
    /// `Ledger::with_anti_affinity`, readable without the lock.
    anti_affinity_pods: std::sync::atomic::AtomicUsize,
    /// Pods a preemption made room for, by uid: (node name, pod). Other pods of lower or
    /// equal priority must leave that room to them.
    nominations: Mutex<HashMap<Arc<str>, (Arc<str>, Arc<PodInfo>)>>,
    nominated: std::sync::atomic::AtomicUsize,
    topology: Mutex<()>,
    /// Claims, volumes and classes (VolumeBinding).
    pub volumes: parking_lot::RwLock<crate::plugins::volume::Volumes>,
    /// How many nodes carry each image (ImageLocality scales by spread).
    pub image_nodes: HashMap<Arc<str>, u32>,
    /// Bumped on every change that can make a pod fit where it did not.
    pub generation: u64,
}

impl Cache {
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).map(|&i| i as usize)
    }

    pub fn live_nodes(&self) -> usize {
        self.by_name.len()
    }

    /// Adds or updates a node; false when nothing the scheduler reads changed (a heartbeat).
    pub fn upsert_node(&mut self, n: NodeSpec) -> bool {
        let i = match self.by_name.get(&n.name) {
            Some(&i) if self.nodes.same_spec(i as usize, &n) => return false,
            Some(&i) => {
                let old: Vec<Arc<str>> = self.nodes.images[i as usize].iter().map(|(n, _)| n.clone()).collect();
                self.unindex_images(&old);
                i as usize
            }
            None => {
                let i = self.nodes.push_row();
                self.by_name.insert(n.name.clone(), i as u32);
                i
            }
        };
        self.nodes.set_spec(i, &n);
        let u = self.ledger.get_mut().usage.get(&n.name).cloned().unwrap_or_default();
        self.nodes.set_usage(i, &u);
        for (img, _) in &n.images {
            *self.image_nodes.entry(img.clone()).or_default() += 1;
        }
        self.generation += 1;
        true
    }

    fn unindex_images(&mut self, imgs: &[Arc<str>]) {
        for img in imgs {
            if let Some(c) = self.image_nodes.get_mut(img) {
                *c -= 1;
                if *c == 0 {
                    self.image_nodes.remove(img);
                }
            }
        }
    }

    pub fn remove_node(&mut self, name: &str) {
        let Some(i) = self.by_name.remove(name) else { return };
        let i = i as usize;
        let old: Vec<Arc<str>> = self.nodes.images[i].iter().map(|(n, _)| n.clone()).collect();
        self.unindex_images(&old);
        self.nodes.live[i] = false;
        self.nodes.free.push(i as u32);
        self.generation += 1;
    }

    fn account(&self, l: &mut Ledger, node: &Arc<str>, p: &Arc<PodInfo>, sign: i64) {
        if !p.anti_affinity.is_empty() {
            l.with_anti_affinity = (l.with_anti_affinity as i64 + sign).max(0) as usize;
            self.anti_affinity_pods.store(l.with_anti_affinity, Relaxed);
        }
        if sign > 0 {
            l.version += 1;
            let v = l.version;
            l.recent.push_back((v, p.clone()));
            if l.recent.len() > RECENT {
                l.recent.pop_front();
            }
        }
        let u = l.usage.entry(node.clone()).or_default();
        u.apply(p, sign);
        if let Some(&i) = self.by_name.get(node) {
            self.nodes.set_usage(i as usize, u);
        }
        if u.pods == 0 {
            l.usage.remove(node);
        }
    }

    /// A pod the API shows bound to a node (or its update). Pods that are finished or
    /// gone hold nothing.
    pub fn set_bound_pod(&self, p: PodInfo) {
        let Some(node) = p.node_name.clone() else {
            self.remove_pod(&p.uid);
            return;
        };
        if p.finished {
            self.remove_pod(&p.uid);
            return;
        }
        let mut l = self.ledger.lock();
        if let Some(e) = l.pods.get_mut(&p.uid) {
            if e.node == node && e.info.requests == p.requests && e.info.host_ports == p.host_ports {
                e.assumed_at = None; // the binding is confirmed
                return;
            }
        }
        self.drop_pod(&mut l, &p.uid);
        let p = Arc::new(p);
        self.account(&mut l, &node, &p, 1);
        l.pods.insert(p.uid.clone(), PodEntry { node, info: p, assumed_at: None });
    }

    fn drop_pod(&self, l: &mut Ledger, uid: &str) -> bool {
        let Some(e) = l.pods.remove(uid) else { return false };
        let info = e.info.clone();
        self.account(l, &e.node, &info, -1);
        true
    }

    /// The pod is gone; true if it held resources.
    pub fn remove_pod(&self, uid: &str) -> bool {
        self.clear_nomination(uid);
        let mut l = self.ledger.lock();
        self.drop_pod(&mut l, uid)
    }

    /// Reserves the node for a pod the scheduler chose, if it still fits there (checked
    /// under the ledger lock: the guarantee against overcommit). For a pod decided without
    /// topology counts; see [`Cache::assume_at`].
    pub fn assume(&self, p: &Arc<PodInfo>, node: usize) -> Result<Arc<str>, AssumeError> {
        self.assume_at(p, node, None)
    }

    /// Like [`Cache::assume`], for a decision taken on the topology counts of placement
    /// `version` (None: taken without them, valid only while no placed pod has required
    /// anti-affinity).
    pub fn assume_at(&self, p: &Arc<PodInfo>, node: usize, version: Option<u64>) -> Result<Arc<str>, AssumeError> {
        if !self.nodes.live.get(node).copied().unwrap_or(false) {
            return Err(AssumeError::UnknownNode);
        }
        let mut l = self.ledger.lock();
        if l.pods.contains_key(&p.uid) {
            return Err(AssumeError::AlreadyAssigned);
        }
        let c = self.ctx();
        if !crate::plugins::fit::fits(p, &c, node) || !crate::plugins::ports::free(p, &c, node) {
            return Err(AssumeError::NoLongerFits);
        }
        match version {
            None if l.with_anti_affinity > 0 || p.has_pod_constraints() => return Err(AssumeError::Stale),
            None => {}
            Some(v) => {
                let covered = l.recent.front().is_none_or(|(first, _)| *first <= v + 1) || l.version == v;
                if !covered || l.recent.iter().rev().take_while(|(n, _)| *n > v).any(|(_, q)| crate::plugins::podtopology::relevant(p, q)) {
                    return Err(AssumeError::Stale);
                }
            }
        }
        let name = self.nodes.names[node].clone();
        self.account(&mut l, &name, p, 1);
        l.pods.insert(p.uid.clone(), PodEntry { node: name.clone(), info: p.clone(), assumed_at: Some(Instant::now()) });
        drop(l);
        self.clear_nomination(&p.uid);
        Ok(name)
    }

    /// Drops an assumption whose binding failed.
    pub fn forget(&self, uid: &str) {
        let mut l = self.ledger.lock();
        if l.pods.get(uid).is_some_and(|e| e.assumed_at.is_some()) {
            self.drop_pod(&mut l, uid);
        }
    }

    /// Calls `f` with (node row, pod) for every placed pod on a known node (under the
    /// ledger lock: reservations wait meanwhile); returns the placement version seen.
    pub fn for_each_placed(&self, mut f: impl FnMut(usize, &PodInfo)) -> u64 {
        let l = self.ledger.lock();
        for e in l.pods.values() {
            if let Some(&i) = self.by_name.get(&e.node) {
                f(i as usize, &e.info);
            }
        }
        l.version
    }

    /// Records that preemption made room for `p` on `node`.
    pub fn nominate(&self, p: Arc<PodInfo>, node: Arc<str>) {
        let mut n = self.nominations.lock();
        n.insert(p.uid.clone(), (node, p));
        self.nominated.store(n.len(), Relaxed);
    }

    /// The pod got a node, or is gone: its nomination ends.
    pub fn clear_nomination(&self, uid: &str) {
        if self.nominated.load(Relaxed) == 0 {
            return;
        }
        let mut n = self.nominations.lock();
        n.remove(uid);
        self.nominated.store(n.len(), Relaxed);
    }

    /// Whether any nomination exists (cheap; checked per node only then).
    pub fn has_nominations(&self) -> bool {
        self.nominated.load(Relaxed) > 0
    }

    /// Pods nominated to node `name` that `p` must not take room from: other pods of at
    /// least its priority.
    pub fn nominated_on(&self, name: &str, p: &PodInfo) -> Vec<Arc<PodInfo>> {
        self.nominations.lock().values().filter(|(n, q)| &**n == name && q.uid != p.uid && q.priority >= p.priority).map(|(_, q)| q.clone()).collect()
    }

    /// Every placed pod, grouped by node row (for preemption, which is rare).
    pub fn pods_by_node(&self) -> HashMap<usize, Vec<Arc<PodInfo>>> {
        let l = self.ledger.lock();
        let mut out: HashMap<usize, Vec<Arc<PodInfo>>> = HashMap::new();
        for e in l.pods.values() {
            if let Some(&i) = self.by_name.get(&e.node) {
                out.entry(i as usize).or_default().push(e.info.clone());
            }
        }
        out
    }

    /// Serializes the decisions that use topology counts (see `framework::place`).
    pub fn topology_lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.topology.lock()
    }

    /// Whether any placed pod has required anti-affinity.
    pub fn any_anti_affinity(&self) -> bool {
        self.anti_affinity_pods.load(Relaxed) > 0
    }

    pub fn is_placed(&self, uid: &str) -> bool {
        self.ledger.lock().pods.contains_key(uid)
    }

    pub fn pod_count(&self) -> usize {
        self.ledger.lock().pods.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(c: &mut Cache, name: &str, cpu: &str) {
        let spec = NodeSpec::from_value(&json!({"metadata": {"name": name}, "status": {"allocatable": {"cpu": cpu, "memory": "1Gi", "pods": "10"}}}), &mut c.names);
        c.upsert_node(spec);
    }

    fn pod(c: &mut Cache, uid: &str, cpu: &str, node: Option<&str>) -> PodInfo {
        PodInfo::from_value(&json!({"metadata": {"name": uid, "namespace": "d", "uid": uid}, "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}}), &mut c.names)
    }

    #[test]
    fn usage_follows_pods_before_and_after_their_node() {
        let mut c = Cache::default();
        // A pod bound to a node the cache has not seen yet is counted when it arrives.
        let p = pod(&mut c, "a", "500m", Some("n1"));
        c.set_bound_pod(p);
        node(&mut c, "n1", "2");
        let i = c.node_index("n1").unwrap();
        assert_eq!((c.nodes.req_cpu(i), c.nodes.pod_count(i)), (500, 1));
        let p = pod(&mut c, "b", "1", None);
        let p = Arc::new(p);
        assert_eq!(c.assume(&p, i), Ok(Arc::from("n1")));
        assert_eq!(c.nodes.req_cpu(i), 1500);
        // 600m more does not fit in 2 CPUs.
        let q = Arc::new(pod(&mut c, "c", "600m", None));
        assert_eq!(c.assume(&q, i), Err(AssumeError::NoLongerFits));
        c.forget("b");
        assert_eq!(c.nodes.req_cpu(i), 500);
        assert_eq!(c.assume(&q, i), Ok(Arc::from("n1")));
        // Confirmation keeps the count; deletion releases it.
        let mut confirmed = (*q).clone();
        confirmed.node_name = Some(Arc::from("n1"));
        c.set_bound_pod(confirmed);
        assert_eq!(c.nodes.req_cpu(i), 1100);
        c.forget("c"); // confirmed: not an assumption any more
        assert_eq!(c.nodes.req_cpu(i), 1100);
        c.remove_pod("c");
        c.remove_pod("a");
        assert_eq!((c.nodes.req_cpu(i), c.nodes.pod_count(i)), (0, 0));
        // A removed node's row is reused.
        c.remove_node("n1");
        node(&mut c, "n2", "1");
        assert_eq!(c.node_index("n2"), Some(i));
        assert_eq!(c.live_nodes(), 1);
    }
}
