//! Pod lifecycle: one task per pod drives the runtime (sandbox, init containers in order,
//! app containers together) and publishes the pod's status; a delete stops the
//! containers within the grace period and reports the pod gone.
//!
//! Pods are held in a compact form (names, images, uid; not the JSON): a hollow node holds
//! 30 of them in a few KiB.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::runtime::{ContainerConfig, ContainerKind, ContainerState, Runtime, SandboxConfig};

#[derive(Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "camelCase", default)]
struct Meta {
    name: String,
    namespace: String,
    uid: String,
    annotations: HashMap<String, String>,
    deletion_timestamp: Option<String>,
    deletion_grace_period_seconds: Option<i64>,
}

#[derive(Deserialize, Default, Clone, Debug)]
#[serde(default)]
struct Container {
    name: String,
    image: String,
}

#[derive(Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "camelCase", default)]
struct Spec {
    containers: Vec<Container>,
    init_containers: Vec<Container>,
    host_network: bool,
    termination_grace_period_seconds: Option<i64>,
}

#[derive(Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "camelCase", default)]
struct Status {
    phase: String,
    qos_class: String,
    conditions: Vec<Value>,
}

#[derive(Deserialize, Default, Clone, Debug)]
#[serde(default)]
struct PodObj {
    metadata: Meta,
    spec: Spec,
    status: Status,
}

/// A pod as the agent keeps it.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub uid: Arc<str>,
    containers: Arc<[Container]>,
    init_containers: Arc<[Container]>,
    host_network: bool,
    grace: i64,
    qos_class: Arc<str>,
    /// Conditions set by others (DisruptionTarget, readiness gates) kept in our reports.
    foreign_conditions: Arc<[Value]>,
    deleting: Option<i64>,
    terminal: bool,
    /// The pod's `shoal.io/` annotations (for the runtime).
    annotations: Arc<[(String, String)]>,
}

impl Pod {
    /// Reads the fields the agent uses from the pod's JSON.
    pub fn parse(json: &[u8]) -> Result<Pod, String> {
        let p: PodObj =
            serde_json::from_slice(json).map_err(|e| format!("undecodable pod: {e}"))?;
        let own = [
            "PodScheduled",
            "Initialized",
            "ContainersReady",
            "Ready",
            "PodReadyToStartContainers",
        ];
        Ok(Pod {
            namespace: p.metadata.namespace.into(),
            name: p.metadata.name.into(),
            uid: p.metadata.uid.into(),
            containers: p.spec.containers.into(),
            init_containers: p.spec.init_containers.into(),
            host_network: p.spec.host_network,
            grace: p.spec.termination_grace_period_seconds.unwrap_or(30).max(0),
            qos_class: p.status.qos_class.into(),
            foreign_conditions: p
                .status
                .conditions
                .into_iter()
                .filter(|c| !own.iter().any(|o| c["type"] == *o))
                .collect(),
            deleting: p
                .metadata
                .deletion_timestamp
                .map(|_| p.metadata.deletion_grace_period_seconds.unwrap_or(0)),
            terminal: matches!(p.status.phase.as_str(), "Succeeded" | "Failed"),
            annotations: p
                .metadata
                .annotations
                .into_iter()
                .filter(|(k, _)| k.starts_with("shoal.io/"))
                .collect(),
        })
    }
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the session sends next: statuses (latest per pod wins) and pods gone.
#[derive(Default)]
pub struct Outbox {
    inner: Mutex<OutboxInner>,
    pub notify: Notify,
}

#[derive(Default)]
struct OutboxInner {
    statuses: HashMap<String, (Arc<str>, Bytes)>,
    gone: HashMap<String, Arc<str>>,
}

/// A batch taken from the outbox.
#[derive(Default, Debug)]
pub struct Batch {
    /// (namespace/name, uid, status JSON)
    pub statuses: Vec<(String, Arc<str>, Bytes)>,
    /// (namespace/name, uid)
    pub gone: Vec<(String, Arc<str>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.statuses.is_empty() && self.gone.is_empty()
    }
}

impl Outbox {
    pub fn status(&self, key: String, uid: Arc<str>, status: Bytes) {
        self.inner.lock().statuses.insert(key, (uid, status));
        self.notify.notify_one();
    }
    pub fn gone(&self, key: String, uid: Arc<str>) {
        let mut g = self.inner.lock();
        g.statuses.remove(&key);
        g.gone.insert(key, uid);
        drop(g);
        self.notify.notify_one();
    }
    /// Takes up to `max` entries.
    pub fn take(&self, max: usize) -> Batch {
        let mut g = self.inner.lock();
        let mut b = Batch::default();
        let keys: Vec<String> = g.statuses.keys().take(max).cloned().collect();
        for k in keys {
            if let Some((u, s)) = g.statuses.remove(&k) {
                b.statuses.push((k, u, s));
            }
        }
        let keys: Vec<String> = g
            .gone
            .keys()
            .take(max.saturating_sub(b.statuses.len()))
            .cloned()
            .collect();
        for k in keys {
            if let Some(u) = g.gone.remove(&k) {
                b.gone.push((k, u));
            }
        }
        b
    }
    /// Puts back an unacknowledged batch, unless something newer is queued for a pod.
    pub fn put_back(&self, b: Batch) {
        let mut g = self.inner.lock();
        for (k, u, s) in b.statuses {
            if !g.gone.contains_key(&k) {
                g.statuses.entry(k).or_insert((u, s));
            }
        }
        for (k, u) in b.gone {
            g.gone.entry(k).or_insert(u);
        }
        drop(g);
        self.notify.notify_one();
    }
    pub fn len(&self) -> usize {
        let g = self.inner.lock();
        g.statuses.len() + g.gone.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Hands out pod addresses from the node's podCIDR (a /24 or wider; .1 is the gateway).
pub struct Ipam {
    /// (first address, size) of the range, and the offsets in use.
    inner: Mutex<(Option<(u32, u32)>, Used)>,
    /// True once a range is set (pods wait for it, as sandboxes wait for the network).
    ready: watch::Sender<bool>,
}

impl Default for Ipam {
    fn default() -> Self {
        Ipam {
            inner: Mutex::new((None, Used::new())),
            ready: watch::channel(false).0,
        }
    }
}

type Used = std::collections::BTreeSet<u32>;

impl Ipam {
    /// Sets the range from `spec.podCIDR` (ignored when unparsable).
    pub fn set_cidr(&self, cidr: &str) {
        let Some((ip, len)) = cidr.split_once('/') else {
            return;
        };
        let (Ok(ip), Ok(len)) = (ip.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
            return;
        };
        if !(8..=30).contains(&len) {
            return;
        }
        let base = u32::from(ip) & (!0u32 << (32 - len));
        let mut g = self.inner.lock();
        if g.0.map(|r| r.0) != Some(base) {
            *g = (Some((base, 1 << (32 - len))), Default::default());
        }
        drop(g);
        self.ready.send_replace(true);
    }
    /// Whether the node has a pod range (the network is ready).
    pub fn has_range(&self) -> bool {
        *self.ready.borrow()
    }
    /// An address, waiting for the node's range if it has none yet.
    pub async fn allocate_when_ready(&self) -> Option<Ipv4Addr> {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
        self.allocate()
    }
    pub fn allocate(&self) -> Option<Ipv4Addr> {
        let mut g = self.inner.lock();
        let (base, size) = g.0?;
        let i = (2..size - 1).find(|i| !g.1.contains(i))?;
        g.1.insert(i);
        Some(Ipv4Addr::from(base + i))
    }
    pub fn release(&self, ip: Ipv4Addr) {
        let mut g = self.inner.lock();
        if let Some((base, _)) = g.0 {
            g.1.remove(&(u32::from(ip).wrapping_sub(base)));
        }
    }
}

/// The node facts pods need.
pub struct NodeCtx {
    pub node_name: String,
    pub host_ip: Mutex<String>,
    pub ipam: Ipam,
}

/// What a pod task is told.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ctl {
    Run,
    /// Stop within this grace and report the pod gone.
    Delete(i64),
    /// The server no longer has the pod: stop at once, report nothing.
    Forget,
}

struct Handle {
    uid: Arc<str>,
    ctl: watch::Sender<Ctl>,
    /// Container name → runtime id (for logs).
    containers: Arc<Mutex<HashMap<String, String>>>,
}

/// The pods of one node.
pub struct PodManager<R: Runtime> {
    rt: Arc<R>,
    node: Arc<NodeCtx>,
    outbox: Arc<Outbox>,
    pods: Mutex<HashMap<String, Handle>>,
}

/// RFC 3339 (UTC, seconds) of a unix time.
pub fn rfc3339(secs: i64) -> String {
    time(secs)
}

fn time(secs: i64) -> String {
    shoal_client::time::format(secs.max(0))
}

pub fn now() -> i64 {
    shoal_client::time::now_secs()
}

/// (name, image, imageID, containerID, state) of one container in a report.
type ContainerSlot = (String, String, String, String, Option<ContainerState>);

/// A pod's status as the agent reports it.
#[derive(Clone, Debug, Default)]
struct Report {
    phase: &'static str,
    start: i64,
    ip: Option<Ipv4Addr>,
    initialized: bool,
    ready: bool,
    init: Vec<ContainerSlot>,
    apps: Vec<ContainerSlot>,
    reason: Option<(&'static str, String)>,
}

fn container_status(c: &ContainerSlot, waiting: &str) -> Value {
    let (name, image, image_id, id, st) = c;
    let state = match st {
        None | Some(ContainerState::Created) => json!({"waiting": {"reason": waiting}}),
        Some(ContainerState::Running { started_at }) => {
            json!({"running": {"startedAt": time(*started_at)}})
        }
        Some(ContainerState::Exited {
            exit_code,
            reason,
            started_at,
            finished_at,
        }) => {
            json!({"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": time(*started_at), "finishedAt": time(*finished_at), "containerID": id}})
        }
    };
    let running = matches!(st, Some(ContainerState::Running { .. }));
    let mut v = json!({"name": name, "image": image, "imageID": image_id, "ready": running, "restartCount": 0, "started": running, "state": state});
    if !id.is_empty() {
        v["containerID"] = json!(id);
    }
    v
}

impl Report {
    fn json(&self, pod: &Pod, host_ip: &str) -> Bytes {
        let t = time(self.start);
        let cond = |ty: &str, ok: bool, reason: Option<&str>| {
            let mut c = json!({"type": ty, "status": if ok { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": t});
            if let (false, Some(r)) = (ok, reason) {
                c["reason"] = json!(r);
            }
            c
        };
        let mut conditions = vec![
            cond(
                "PodReadyToStartContainers",
                self.ip.is_some() || pod.host_network,
                None,
            ),
            cond(
                "Initialized",
                self.initialized,
                Some("ContainersNotInitialized"),
            ),
            cond("Ready", self.ready, Some("ContainersNotReady")),
            cond("ContainersReady", self.ready, Some("ContainersNotReady")),
            cond("PodScheduled", true, None),
        ];
        conditions.extend(pod.foreign_conditions.iter().cloned());
        let mut s = json!({
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "startTime": t,
            "containerStatuses": self.apps.iter().map(|c| container_status(c, if self.initialized { "ContainerCreating" } else { "PodInitializing" })).collect::<Vec<_>>(),
        });
        if !self.init.is_empty() {
            s["initContainerStatuses"] = self
                .init
                .iter()
                .map(|c| container_status(c, "PodInitializing"))
                .collect();
        }
        let ip = if pod.host_network {
            Some(host_ip.to_string())
        } else {
            self.ip.map(|i| i.to_string())
        };
        if let Some(ip) = ip.filter(|i| !i.is_empty()) {
            s["podIP"] = json!(ip);
            s["podIPs"] = json!([{"ip": ip}]);
        }
        if !pod.qos_class.is_empty() {
            s["qosClass"] = json!(&*pod.qos_class);
        }
        if let Some((r, m)) = &self.reason {
            s["reason"] = json!(r);
            s["message"] = json!(m);
        }
        Bytes::from(s.to_string())
    }
}

impl<R: Runtime> PodManager<R> {
    pub fn new(rt: Arc<R>, node: Arc<NodeCtx>, outbox: Arc<Outbox>) -> Arc<Self> {
        Arc::new(PodManager {
            rt,
            node,
            outbox,
            pods: Mutex::new(HashMap::new()),
        })
    }

    pub fn count(&self) -> usize {
        self.pods.lock().len()
    }

    /// The server's current version of a pod bound to this node.
    pub fn upsert(self: &Arc<Self>, pod: Pod) {
        let key = pod.key();
        let want = match pod.deleting {
            Some(g) => Ctl::Delete(g),
            None => Ctl::Run,
        };
        let mut g = self.pods.lock();
        if let Some(h) = g.get(&key) {
            if h.uid == pod.uid {
                let cur = *h.ctl.borrow();
                if cur != want && cur == Ctl::Run {
                    let _ = h.ctl.send(want);
                }
                return;
            }
            // Same name, new pod: the old one goes first.
            let _ = h.ctl.send(Ctl::Forget);
        }
        if pod.terminal && pod.deleting.is_none() {
            // Finished before we saw it (or before an agent restart): nothing to run.
            return;
        }
        let (tx, rx) = watch::channel(want);
        g.insert(
            key.clone(),
            Handle {
                uid: pod.uid.clone(),
                ctl: tx,
                containers: Default::default(),
            },
        );
        drop(g);
        let me = self.clone();
        tokio::spawn(async move {
            me.run(pod, rx).await;
        });
    }

    /// The server no longer has the pod (or it left this node).
    pub fn remove(&self, key: &str) {
        if let Some(h) = self.pods.lock().remove(key) {
            let _ = h.ctl.send(Ctl::Forget);
        }
    }

    fn publish(&self, pod: &Pod, r: &Report) {
        let host_ip = self.node.host_ip.lock().clone();
        self.outbox
            .status(pod.key(), pod.uid.clone(), r.json(pod, &host_ip));
    }

    async fn run(self: Arc<Self>, pod: Pod, mut ctl: watch::Receiver<Ctl>) {
        let mut r = Report {
            phase: "Pending",
            start: now(),
            ..Default::default()
        };
        r.init = pod
            .init_containers
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    c.image.clone(),
                    String::new(),
                    String::new(),
                    None,
                )
            })
            .collect();
        r.apps = pod
            .containers
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    c.image.clone(),
                    String::new(),
                    String::new(),
                    None,
                )
            })
            .collect();
        r.initialized = pod.init_containers.is_empty();
        let mut ids: Vec<String> = Vec::new();
        let mut sandbox = None;
        let started = if *ctl.borrow() == Ctl::Run {
            self.publish(&pod, &r);
            let start = self.start(&pod, &mut r, &mut ids, &mut sandbox);
            tokio::select! {
                res = start => res,
                _ = ctl.wait_for(|c| *c != Ctl::Run) => Err("deleted while starting".to_string()),
            }
        } else {
            Err("deleted before it started".into())
        };
        match started {
            Ok(()) => {
                r.phase = "Running";
                r.ready = true;
                self.publish(&pod, &r);
                let _ = ctl.wait_for(|c| *c != Ctl::Run).await;
            }
            Err(e) if *ctl.borrow() == Ctl::Run => {
                tracing::info!(pod = %pod.key(), error = %e, "pod failed to start");
                r.reason = Some(("Failed", e));
                self.publish(&pod, &r);
                let _ = ctl.wait_for(|c| *c != Ctl::Run).await;
            }
            Err(_) => {}
        }
        // Stopping.
        let final_ctl = *ctl.borrow();
        let grace = match final_ctl {
            Ctl::Delete(g) => g.min(pod.grace),
            _ => 0,
        };
        for id in &ids {
            let _ = self
                .rt
                .stop_container(id, Duration::from_secs(grace as u64))
                .await;
        }
        for (i, id) in ids.iter().enumerate() {
            if let Ok(st) = self.rt.container_state(id) {
                let slot = if i < r.init.len() {
                    &mut r.init[i]
                } else {
                    &mut r.apps[i - r.init.len()]
                };
                slot.4 = Some(st);
            }
            let _ = self.rt.remove_container(id).await;
        }
        if let Some(sb) = sandbox {
            let _ = self.rt.stop_sandbox(&sb).await;
            let _ = self.rt.remove_sandbox(&sb).await;
        }
        if let Some(ip) = r.ip {
            self.node.ipam.release(ip);
        }
        if matches!(final_ctl, Ctl::Delete(_)) {
            r.ready = false;
            self.publish(&pod, &r);
            self.outbox.gone(pod.key(), pod.uid.clone());
        }
        let mut g = self.pods.lock();
        if g.get(&pod.key()).is_some_and(|h| h.uid == pod.uid) && final_ctl == Ctl::Forget {
            g.remove(&pod.key());
        }
    }

    /// Pulls the image and creates one container; records its image and container IDs in
    /// the report slot and its runtime id for logs. Returns the runtime id.
    async fn create(
        &self,
        pod: &Pod,
        sandbox: &str,
        c: &Container,
        kind: ContainerKind,
        slot: &mut ContainerSlot,
    ) -> Result<String, String> {
        let image_id = self
            .rt
            .pull_image(&c.image)
            .await
            .map_err(|e| e.to_string())?;
        let id = self
            .rt
            .create_container(
                sandbox,
                &ContainerConfig {
                    name: c.name.clone(),
                    image: c.image.clone(),
                    kind,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        slot.2 = image_id;
        slot.3 = format!(
            "{}//{id}",
            self.rt.version().split("//").next().unwrap_or("sim:")
        );
        self.containers_of(pod)
            .lock()
            .insert(c.name.clone(), id.clone());
        Ok(id)
    }

    async fn start(
        &self,
        pod: &Pod,
        r: &mut Report,
        ids: &mut Vec<String>,
        sandbox: &mut Option<String>,
    ) -> Result<(), String> {
        if !pod.host_network {
            r.ip = Some(
                self.node
                    .ipam
                    .allocate_when_ready()
                    .await
                    .ok_or("no pod address free in the node's podCIDR")?,
            );
        }
        let cfg = SandboxConfig {
            namespace: pod.namespace.to_string(),
            name: pod.name.to_string(),
            uid: pod.uid.to_string(),
            host_network: pod.host_network,
            ip: r.ip,
            annotations: pod.annotations.to_vec(),
        };
        *sandbox = Some(self.rt.run_sandbox(&cfg).await.map_err(|e| e.to_string())?);
        let sb = sandbox.clone().unwrap_or_default();
        for (i, c) in pod.init_containers.iter().enumerate() {
            let id = self
                .create(pod, &sb, c, ContainerKind::Init, &mut r.init[i])
                .await?;
            ids.push(id.clone());
            self.rt
                .start_container(&id)
                .await
                .map_err(|e| e.to_string())?;
            let st = self
                .rt
                .wait_container(&id)
                .await
                .map_err(|e| e.to_string())?;
            let ok = matches!(st, ContainerState::Exited { exit_code: 0, .. });
            r.init[i].4 = Some(st);
            if !ok {
                return Err(format!("init container {} failed", c.name));
            }
        }
        r.initialized = true;
        for (i, c) in pod.containers.iter().enumerate() {
            ids.push(
                self.create(pod, &sb, c, ContainerKind::App, &mut r.apps[i])
                    .await?,
            );
        }
        let starts = ids[pod.init_containers.len()..]
            .iter()
            .map(|id| self.rt.start_container(id));
        for res in futures::future::join_all(starts).await {
            res.map_err(|e| e.to_string())?;
        }
        for (i, id) in ids[pod.init_containers.len()..].iter().enumerate() {
            r.apps[i].4 = self.rt.container_state(id).ok();
        }
        Ok(())
    }

    /// CPU and memory of every running container, by pod: (namespace, name, [(container,
    /// usage)]).
    pub fn usage(&self) -> Vec<(String, String, Vec<(String, crate::runtime::Usage)>)> {
        let handles: Vec<(String, Arc<Mutex<HashMap<String, String>>>)> = self
            .pods
            .lock()
            .iter()
            .map(|(k, h)| (k.clone(), h.containers.clone()))
            .collect();
        let mut out = Vec::with_capacity(handles.len());
        for (key, ids) in handles {
            let cs: Vec<(String, crate::runtime::Usage)> = ids
                .lock()
                .iter()
                .filter_map(|(name, id)| self.rt.container_usage(id).map(|u| (name.clone(), u)))
                .collect();
            if cs.is_empty() {
                continue;
            }
            let (ns, name) = key.split_once('/').unwrap_or(("", &key));
            out.push((ns.to_string(), name.to_string(), cs));
        }
        out
    }

    fn containers_of(&self, pod: &Pod) -> Arc<Mutex<HashMap<String, String>>> {
        self.pods
            .lock()
            .get(&pod.key())
            .filter(|h| h.uid == pod.uid)
            .map(|h| h.containers.clone())
            .unwrap_or_default()
    }

    /// Logs of a container of a pod (for the server's reverse requests), with upstream's
    /// messages when there is none.
    pub fn logs(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        tail: Option<usize>,
    ) -> Result<Vec<u8>, String> {
        let key = format!("{ns}/{pod}");
        let ids = self
            .pods
            .lock()
            .get(&key)
            .map(|h| h.containers.clone())
            .ok_or_else(|| format!("pod {key} is not running on this node"))?;
        let ids = ids.lock();
        let name = if container.is_empty() {
            if ids.len() > 1 {
                let mut names: Vec<&String> = ids.keys().collect();
                names.sort();
                return Err(format!(
                    "a container name must be specified for pod {pod}, choose one of: {names:?}"
                ));
            }
            ids.keys()
                .next()
                .cloned()
                .ok_or_else(|| format!("container in pod {pod} has not started"))?
        } else {
            container.to_string()
        };
        let id = ids
            .get(&name)
            .ok_or_else(|| format!("container {name} is not valid for pod {pod}"))?;
        self.rt.logs(id, tail).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::sim::{Sim, SimSettings};

    fn pod_json(uid: &str, deleting: bool) -> Vec<u8> {
        let mut p = json!({"metadata": {"name": "web", "namespace": "ns", "uid": uid}, "spec": {"nodeName": "n1", "initContainers": [{"name": "init", "image": "busybox"}], "containers": [{"name": "app", "image": "nginx:1.27"}, {"name": "side", "image": "busybox"}]}, "status": {"phase": "Pending", "qosClass": "BestEffort", "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "DisruptionTarget", "status": "True"}]}});
        if deleting {
            p["metadata"]["deletionTimestamp"] = json!("2026-11-25T10:00:00Z");
            p["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        }
        serde_json::to_vec(&p).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_runs_then_is_deleted_and_reported_gone() {
        let node = Arc::new(NodeCtx {
            node_name: "n1".into(),
            host_ip: Mutex::new("10.1.0.5".into()),
            ipam: Ipam::default(),
        });
        node.ipam.set_cidr("10.244.3.0/24");
        let outbox = Arc::new(Outbox::default());
        let m = PodManager::new(
            Arc::new(Sim::new(SimSettings::default())),
            node,
            outbox.clone(),
        );
        m.upsert(Pod::parse(&pod_json("u1", false)).unwrap());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let b = outbox.take(10);
        assert_eq!(b.statuses.len(), 1, "the latest status only");
        let s: Value = serde_json::from_slice(&b.statuses[0].2).unwrap();
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["podIP"], "10.244.3.2");
        assert_eq!(s["hostIP"], "10.1.0.5");
        assert_eq!(s["qosClass"], "BestEffort");
        assert_eq!(s["containerStatuses"][0]["ready"], true);
        assert!(s["containerStatuses"][1]["state"]["running"]["startedAt"].is_string());
        assert_eq!(
            s["initContainerStatuses"][0]["state"]["terminated"]["reason"],
            "Completed"
        );
        assert!(
            s["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["type"] == "DisruptionTarget"),
            "foreign conditions kept"
        );
        assert!(s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"));
        // Same uid, now deleting: stop and report gone.
        m.upsert(Pod::parse(&pod_json("u1", true)).unwrap());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = outbox.take(10);
        assert_eq!(b.gone.len(), 1);
        assert_eq!(&*b.gone[0].1, "u1");
        // Address returned to the pool.
        assert_eq!(m.node.ipam.allocate(), Some("10.244.3.2".parse().unwrap()));
    }

    #[test]
    fn outbox_keeps_the_latest_and_puts_back_unacknowledged() {
        let o = Outbox::default();
        o.status("a/p".into(), "u".into(), Bytes::from_static(b"1"));
        o.status("a/p".into(), "u".into(), Bytes::from_static(b"2"));
        let b = o.take(10);
        assert_eq!(b.statuses.len(), 1);
        assert_eq!(b.statuses[0].2, Bytes::from_static(b"2"));
        o.status("a/p".into(), "u".into(), Bytes::from_static(b"3"));
        o.put_back(b);
        assert_eq!(
            o.take(10).statuses[0].2,
            Bytes::from_static(b"3"),
            "newer status wins over a put-back one"
        );
        o.gone("a/q".into(), "u2".into());
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
