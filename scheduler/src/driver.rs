//! The scheduler at work inside `shoal server`: list + watch of nodes and pods into the
//! cache and the queue, worker threads running `schedule_one`, and an async binder that
//! writes `pods/binding` (many in flight at once). Results show as upstream: a `Scheduled`
//! event, or a `PodScheduled=False` condition with reason `Unschedulable` and a
//! `FailedScheduling` event carrying the "0/N nodes are available: ..." summary.
//! Only the holder of Lease `kube-system/shoal-scheduler` schedules.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde_json::{json, Value};
use shoal_client::leader::Leadership;
use shoal_client::{events, Client};
use tokio::sync::{mpsc, Semaphore};

use crate::cache::Cache;
use crate::framework::{place, PlaceError, Profile, Rng};
use crate::gang::{Gangs, Permit};
use crate::metrics::SchedulerMetrics;
use crate::model::{NodeSpec, PodInfo, Selector};
use crate::preemption::Budget;
use crate::queue::Queue;

/// Settings of the scheduler.
#[derive(Clone, Debug)]
pub struct Options {
    /// Identity in the leader Lease.
    pub identity: String,
    /// The profile used for pods that name `default-scheduler` (or nothing).
    pub default_profile: Profile,
    /// Worker threads running scheduling cycles at once.
    pub workers: usize,
    /// Bindings in flight at once.
    pub bind_concurrency: usize,
    /// Record a `Scheduled` event per bound pod (upstream does).
    pub scheduled_events: bool,
    /// Profiles from a configuration file, by schedulerName (they replace the built-ins of
    /// the same name).
    pub profiles: HashMap<String, Profile>,
}

impl Default for Options {
    fn default() -> Self {
        Options { identity: format!("shoal-{}", std::process::id()), default_profile: Profile::shoal(), workers: 2, bind_concurrency: 64, scheduled_events: true, profiles: HashMap::new() }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), String> {
        self.default_profile.validate()?;
        for (name, p) in &self.profiles {
            p.validate().map_err(|e| format!("profile {name}: {e}"))?;
        }
        if !(1..=64).contains(&self.workers) {
            return Err(format!("scheduler workers must be between 1 and 64, got {}", self.workers));
        }
        if !(1..=10_000).contains(&self.bind_concurrency) {
            return Err(format!("bind concurrency must be between 1 and 10000, got {}", self.bind_concurrency));
        }
        Ok(())
    }
}

/// The profiles by `schedulerName`.
pub type Profiles = Arc<RwLock<HashMap<String, Profile>>>;

/// A running scheduler: its shared state, for admin and tests.
#[derive(Clone)]
pub struct Handle {
    pub cache: Arc<RwLock<Cache>>,
    pub queue: Arc<Queue>,
    pub profiles: Profiles,
    pub leadership: Leadership,
    /// PodDisruptionBudgets, for preemption.
    pub budgets: Arc<RwLock<Vec<Budget>>>,
    /// Gang members holding nodes while their group fills up.
    gangs: Arc<parking_lot::Mutex<Gangs<Bind>>>,
}

struct Bind {
    pod: Arc<PodInfo>,
    node: Arc<str>,
    /// Unbound WaitForFirstConsumer claims (`ns/name`) to bind on `node` first.
    claims: Vec<String>,
    attempts: u32,
    started: Instant,
    profile: String,
}

enum Report {
    Bind(Bind),
    Unschedulable { pod: Arc<PodInfo>, message: String },
    Preempt { pod: Arc<PodInfo>, node: Arc<str>, victims: Vec<Arc<PodInfo>> },
}

/// Starts the scheduler on the current tokio runtime (its workers on threads of their own).
pub fn start(client: Client, opts: Options, metrics: Arc<SchedulerMetrics>) -> Handle {
    let lead = Leadership::default();
    tokio::spawn(shoal_client::leader::run(client.clone(), "shoal-scheduler", opts.identity.clone(), lead.clone()));
    let mut profiles = HashMap::new();
    profiles.insert("default-scheduler".to_string(), opts.default_profile.clone());
    for p in [Profile::shoal(), Profile::kubernetes()] {
        profiles.entry(p.name.clone()).or_insert(p);
    }
    for (name, p) in &opts.profiles {
        profiles.insert(name.clone(), p.clone());
    }
    let h = Handle { cache: Arc::new(RwLock::new(Cache::default())), queue: Arc::new(Queue::default()), profiles: Arc::new(RwLock::new(profiles)), leadership: lead, budgets: Default::default(), gangs: Default::default() };
    tokio::spawn(watch_nodes(client.clone(), h.clone()));
    tokio::spawn(watch_budgets(client.clone(), h.clone()));
    tokio::spawn(watch_volumes(client.clone(), h.clone(), "/api/v1/persistentvolumeclaims"));
    tokio::spawn(watch_volumes(client.clone(), h.clone(), "/api/v1/persistentvolumes"));
    tokio::spawn(watch_volumes(client.clone(), h.clone(), "/apis/storage.k8s.io/v1/storageclasses"));
    tokio::spawn(watch_pods(client.clone(), h.clone()));
    let (tx, rx) = mpsc::unbounded_channel::<Report>();
    tokio::spawn(report(client, h.clone(), rx, opts.clone(), metrics.clone()));
    for w in 0..opts.workers.max(1) {
        let (h, tx, metrics) = (h.clone(), tx.clone(), metrics.clone());
        let spawned = std::thread::Builder::new().name(format!("scheduler-{w}")).spawn(move || worker(h, tx, metrics));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "starting a scheduler worker failed");
        }
    }
    // Gangs that did not fill up in time give their nodes back.
    let (hh, gtx) = (h.clone(), tx.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let expired = hh.gangs.lock().expired(Instant::now());
            for ((ns, group), min, members) in expired {
                let message = format!("pod group {ns}/{group}: only {} of {min} members could be placed before the group's timeout; their nodes were given back", members.len());
                for (pod, b) in members {
                    hh.cache.read().forget(&pod.uid);
                    hh.queue.requeue(pod.clone(), b.attempts);
                    let _ = gtx.send(Report::Unschedulable { pod, message: message.clone() });
                }
            }
        }
    });
    let (q, m, lead) = (h.queue.clone(), metrics, h.leadership.clone());
    tokio::spawn(async move {
        loop {
            m.set_pending(q.stats());
            m.leader.set(i64::from(lead.is_leader()));
            q.cluster_changed(false); // releases pods parked for 5 minutes
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    h
}

/// One worker: pop a pod, decide, reserve, hand the binding to the binder.
fn worker(h: Handle, tx: mpsc::UnboundedSender<Report>, metrics: Arc<SchedulerMetrics>) {
    let mut rng = Rng::from_entropy();
    loop {
        let Some(item) = h.queue.pop(Duration::from_secs(1)) else {
            if tx.is_closed() {
                return;
            }
            continue;
        };
        if !h.leadership.is_leader() {
            h.queue.retry(&item.key);
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let started = Instant::now();
        let profile_name = item.pod.scheduler_name.to_string();
        let Some(profile) = h.profiles.read().get(&profile_name).cloned() else {
            h.queue.done(&item.key); // another scheduler's pod
            continue;
        };
        let outcome = {
            let c = h.cache.read();
            match place(&c, &item.pod, &profile, &mut rng) {
                Ok((_, name)) => Some(Ok(name)),
                Err(PlaceError::Unschedulable(fit)) => Some(Err(fit.to_string())),
                Err(PlaceError::Conflict) => None,
                Err(PlaceError::AlreadyPlaced) => {
                    h.queue.done(&item.key);
                    continue;
                }
            }
        };
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Some(Ok(node)) => {
                h.queue.done(&item.key);
                let claims = if item.pod.claims.is_empty() {
                    Vec::new()
                } else {
                    crate::plugins::volume::Check::compute(&item.pod, &h.cache.read().volumes.read()).map(|c| c.to_bind).unwrap_or_default()
                };
                let bind = Bind { pod: item.pod.clone(), node, claims, attempts: item.attempts, started, profile: profile_name };
                // Gang members wait for their group (Permit), holding their node.
                let released = match item.pod.gang() {
                    Some(m) => match h.gangs.lock().permit(&m, item.pod.clone(), bind, Instant::now()) {
                        Permit::Wait => Vec::new(),
                        Permit::Release(list) => list.into_iter().map(|(_, b)| b).collect(),
                    },
                    None => vec![bind],
                };
                for b in released {
                    let _ = tx.send(Report::Bind(b));
                }
            }
            Some(Err(message)) => {
                metrics.attempt("unschedulable", &profile_name, secs);
                h.queue.unschedulable(&item.key);
                // PostFilter: make room by evicting lower-priority pods, if that can help.
                let pre = { crate::preemption::find(&item.pod, &h.cache.read(), &h.budgets.read()) };
                if let Some(pre) = pre {
                    metrics.preemption_victims.inc_by(pre.victims.len() as u64);
                    h.cache.read().nominate(item.pod.clone(), pre.node_name.clone());
                    let _ = tx.send(Report::Preempt { pod: item.pod.clone(), node: pre.node_name, victims: pre.victims });
                }
                let _ = tx.send(Report::Unschedulable { pod: item.pod, message });
            }
            None => {
                // Lost every race, or already placed: try again later.
                metrics.attempt("error", &profile_name, secs);
                h.queue.retry(&item.key);
            }
        }
    }
}

/// Writes bindings (concurrently) and unschedulable conditions and events.
async fn report(client: Client, h: Handle, mut rx: mpsc::UnboundedReceiver<Report>, opts: Options, metrics: Arc<SchedulerMetrics>) {
    let slots = Arc::new(Semaphore::new(opts.bind_concurrency.max(1)));
    while let Some(r) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (client, h, metrics) = (client.clone(), h.clone(), metrics.clone());
        let events_on = opts.scheduled_events;
        tokio::spawn(async move {
            match r {
                Report::Bind(b) => bind(&client, &h, &metrics, b, events_on).await,
                Report::Unschedulable { pod, message } => mark_unschedulable(&client, &pod, &message).await,
                Report::Preempt { pod, node, victims } => preempt(&client, &pod, &node, &victims).await,
            }
            drop(permit);
        });
    }
}

fn reference(p: &PodInfo) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": &*p.name, "namespace": &*p.namespace, "uid": &*p.uid, "resourceVersion": &*p.resource_version}})
}

/// PreBind for volumes: asks the binder to bind the pod's waiting claims on the chosen
/// node, and waits until they are Bound.
async fn bind_claims(client: &Client, claims: &[String], node: &str) -> Result<(), String> {
    for key in claims {
        let (ns, name) = key.split_once('/').unwrap_or(("", key));
        let path = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}");
        client.merge_patch(&path, &json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": node}}})).await.map_err(|e| format!("claim {key}: {e}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for key in claims {
        let (ns, name) = key.split_once('/').unwrap_or(("", key));
        let path = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}");
        loop {
            let c = client.get(&path).await.map_err(|e| format!("claim {key}: {e}"))?.ok_or_else(|| format!("claim {key} was deleted"))?;
            if c.pointer("/status/phase").and_then(Value::as_str) == Some("Bound") {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("claim {key} was not bound within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

async fn bind(client: &Client, h: &Handle, metrics: &SchedulerMetrics, b: Bind, events_on: bool) {
    let p = &b.pod;
    if !b.claims.is_empty() {
        if let Err(e) = bind_claims(client, &b.claims, &b.node).await {
            tracing::warn!(pod = %p.key(), node = %b.node, error = %e, "binding the pod's volumes failed; retrying after backoff");
            metrics.attempt("error", &b.profile, b.started.elapsed().as_secs_f64());
            h.cache.read().forget(&p.uid);
            h.queue.requeue(b.pod.clone(), b.attempts);
            return;
        }
    }
    let body = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": &*p.name, "namespace": &*p.namespace, "uid": &*p.uid}, "target": {"apiVersion": "v1", "kind": "Node", "name": &*b.node}});
    let path = format!("/api/v1/namespaces/{}/pods/{}/binding", p.namespace, p.name);
    let res = client.create(&path, &body).await;
    let secs = b.started.elapsed().as_secs_f64();
    match res {
        Ok(_) => {
            metrics.attempt("scheduled", &b.profile, secs);
            metrics.bindings.get_or_create(&vec![("result", "ok".to_string())]).inc();
            if events_on {
                events::record(client, &reference(p), "Normal", "Scheduled", &format!("Successfully assigned {}/{} to {}", p.namespace, p.name, b.node), "default-scheduler").await;
            }
        }
        Err(e) => {
            metrics.attempt("error", &b.profile, secs);
            metrics.bindings.get_or_create(&vec![("result", "error".to_string())]).inc();
            h.cache.read().forget(&p.uid);
            // Gone, or bound by someone else (409): the watch tells the rest.
            if e.is_not_found() || e.is_conflict() {
                tracing::debug!(pod = %p.key(), error = %e, "binding refused; dropping the pod from the queue");
                return;
            }
            tracing::warn!(pod = %p.key(), node = %b.node, error = %e, "binding failed; retrying after backoff");
            h.queue.requeue(b.pod.clone(), b.attempts);
        }
    }
}

/// Nominates the node for the preemptor, then evicts the victims (graceful deletion, with
/// the DisruptionTarget condition and a `Preempted` event, as upstream).
async fn preempt(client: &Client, p: &PodInfo, node: &str, victims: &[Arc<PodInfo>]) {
    let path = format!("/api/v1/namespaces/{}/pods/{}/status", p.namespace, p.name);
    if let Err(e) = client.strategic_patch(&path, &json!({"status": {"nominatedNodeName": node}})).await {
        tracing::debug!(pod = %p.key(), error = %e, "setting nominatedNodeName failed");
    }
    let now = shoal_client::time::format(shoal_client::time::now_secs());
    for v in victims {
        let vpath = format!("/api/v1/namespaces/{}/pods/{}", v.namespace, v.name);
        let cond = json!({"status": {"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler", "message": "default-scheduler: preempting to accommodate a higher priority pod", "lastTransitionTime": now}]}});
        let _ = client.strategic_patch(&format!("{vpath}/status"), &cond).await;
        match client.delete(&vpath, None).await {
            Ok(()) => {
                events::record(client, &reference(v), "Normal", "Preempted", &format!("Preempted by pod {}/{} on node {node}", p.namespace, p.name), "default-scheduler").await;
                tracing::info!(preemptor = %p.key(), victim = %v.key(), node, "preempted");
            }
            Err(e) => tracing::warn!(victim = %v.key(), error = %e, "evicting a preemption victim failed"),
        }
    }
}

async fn mark_unschedulable(client: &Client, p: &PodInfo, message: &str) {
    if p.unschedulable_message.as_deref() != Some(message) {
        let now = shoal_client::time::format(shoal_client::time::now_secs());
        let patch = json!({"status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message, "lastProbeTime": null, "lastTransitionTime": now}]}});
        let path = format!("/api/v1/namespaces/{}/pods/{}/status", p.namespace, p.name);
        if let Err(e) = client.strategic_patch(&path, &patch).await {
            tracing::debug!(pod = %p.key(), error = %e, "writing the PodScheduled condition failed");
        }
    }
    events::record(client, &reference(p), "Warning", "FailedScheduling", message, "default-scheduler").await;
}

/// Keeps the node table in step with the API.
async fn watch_nodes(client: Client, h: Handle) {
    loop {
        let (items, rv) = match client.list("/api/v1/nodes").await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "listing nodes failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        {
            let mut c = h.cache.write();
            let listed: Vec<String> = items.iter().filter_map(|n| n.pointer("/metadata/name").and_then(Value::as_str).map(String::from)).collect();
            let stale: Vec<String> = c.nodes.names.iter().enumerate().filter(|(i, n)| c.nodes.live[*i] && !listed.iter().any(|l| l.as_str() == &***n)).map(|(_, n)| n.to_string()).collect();
            for n in stale {
                c.remove_node(&n);
            }
            for n in &items {
                let spec = NodeSpec::from_value(n, &mut c.names);
                c.upsert_node(spec);
            }
        }
        h.queue.cluster_changed(true);
        let Ok(mut rx) = client.watch("/api/v1/nodes", &rv).await else { continue };
        while let Some((ty, obj)) = rx.recv().await {
            match ty.as_str() {
                "ADDED" | "MODIFIED" => {
                    let changed = {
                        let mut c = h.cache.write();
                        let spec = NodeSpec::from_value(&obj, &mut c.names);
                        c.upsert_node(spec)
                    };
                    if changed {
                        h.queue.cluster_changed(true);
                    }
                }
                "DELETED" => {
                    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
                    h.cache.write().remove_node(name);
                }
                "BOOKMARK" => {}
                _ => break,
            }
        }
    }
}

/// Keeps one kind of VolumeBinding's inputs (claims, volumes or classes) in step.
async fn watch_volumes(client: Client, h: Handle, path: &'static str) {
    let key = |v: &Value| {
        let name = v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
        match v.pointer("/metadata/namespace").and_then(Value::as_str) {
            Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
            _ => name.to_string(),
        }
    };
    let apply = |h: &Handle, v: &Value, deleted: bool| {
        let k = key(v);
        let c = if path.ends_with("persistentvolumes") && !deleted {
            let mut c = h.cache.write();
            let vol = crate::plugins::volume::Volumes::volume_from(v, &mut c.names);
            c.volumes.write().volumes.insert(k, vol);
            return;
        } else {
            h.cache.read()
        };
        let mut vols = c.volumes.write();
        match (path, deleted) {
            (p, true) if p.ends_with("persistentvolumeclaims") => drop(vols.claims.remove(&k)),
            (p, false) if p.ends_with("persistentvolumeclaims") => drop(vols.claims.insert(k, crate::plugins::volume::Volumes::claim_from(v))),
            (p, true) if p.ends_with("persistentvolumes") => drop(vols.volumes.remove(&k)),
            (_, true) => drop(vols.classes.remove(&k)),
            (_, false) => drop(vols.classes.insert(k, crate::plugins::volume::Volumes::class_from(v))),
        }
    };
    loop {
        let (items, rv) = match client.list(path).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(path, error = %e, "listing failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        {
            let c = h.cache.read();
            let mut vols = c.volumes.write();
            if path.ends_with("persistentvolumeclaims") {
                vols.claims.clear();
            } else if path.ends_with("persistentvolumes") {
                vols.volumes.clear();
            } else {
                vols.classes.clear();
            }
        }
        for v in &items {
            apply(&h, v, false);
        }
        h.queue.cluster_changed(true);
        let Ok(mut rx) = client.watch(path, &rv).await else { continue };
        while let Some((ty, obj)) = rx.recv().await {
            match ty.as_str() {
                "ADDED" | "MODIFIED" => apply(&h, &obj, false),
                "DELETED" => apply(&h, &obj, true),
                "BOOKMARK" => continue,
                _ => break,
            }
            h.queue.cluster_changed(true);
        }
    }
}

/// PodDisruptionBudgets for preemption (re-listed on every change: they are few).
async fn watch_budgets(client: Client, h: Handle) {
    let path = "/apis/policy/v1/poddisruptionbudgets";
    loop {
        let rv = match client.list(path).await {
            Ok((items, rv)) => {
                *h.budgets.write() = items
                    .iter()
                    .map(|b| Budget {
                        namespace: Arc::from(b.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("")),
                        selector: Selector::compile(b.pointer("/spec/selector").unwrap_or(&Value::Null)),
                        allowed: b.pointer("/status/disruptionsAllowed").and_then(Value::as_i64).unwrap_or(0),
                    })
                    .collect();
                rv
            }
            Err(e) => {
                tracing::debug!(error = %e, "listing PodDisruptionBudgets failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Ok(mut rx) = client.watch(path, &rv).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        // Any change: list again (shortly: changes come in bursts).
        let _ = rx.recv().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Bound pods go to the cache, pending ones to the queue.
async fn watch_pods(client: Client, h: Handle) {
    loop {
        let (items, rv) = match client.list("/api/v1/pods").await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "listing pods failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        for p in &items {
            apply_pod(&h, p);
        }
        let Ok(mut rx) = client.watch("/api/v1/pods", &rv).await else { continue };
        while let Some((ty, obj)) = rx.recv().await {
            match ty.as_str() {
                "ADDED" | "MODIFIED" => apply_pod(&h, &obj),
                "DELETED" => {
                    let uid = obj.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("");
                    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
                    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
                    h.gangs.lock().forget(uid);
                    let held = h.cache.read().remove_pod(uid);
                    h.queue.remove(&format!("{ns}/{name}"));
                    if held {
                        h.queue.cluster_changed(true); // freed resources may help
                    }
                }
                "BOOKMARK" => {}
                _ => break,
            }
        }
    }
}

fn apply_pod(h: &Handle, v: &Value) {
    let pod = {
        let mut c = h.cache.write();
        PodInfo::from_value(v, &mut c.names)
    };
    if pod.node_name.is_some() {
        let key = pod.key();
        let finished = pod.finished;
        let uid = pod.uid.clone();
        h.cache.read().clear_nomination(&uid);
        h.cache.read().set_bound_pod(pod);
        h.queue.remove(&key);
        if finished {
            h.cache.read().remove_pod(&uid);
            h.queue.cluster_changed(true);
        }
        return;
    }
    if pod.deleting || pod.finished {
        h.cache.read().clear_nomination(&pod.uid);
        h.queue.remove(&pod.key());
        return;
    }
    // A nomination written by an earlier leader (or before a restart) still holds.
    if let Some(n) = pod.nominated_node.clone() {
        h.cache.read().nominate(Arc::new(pod.clone()), n);
    }
    if h.profiles.read().contains_key(&*pod.scheduler_name) {
        h.queue.add(pod);
    }
}
