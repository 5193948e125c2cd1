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

use crate::runtime::{ContainerConfig, ContainerKind, ContainerState, PullPolicy, Runtime, RuntimeError, SandboxConfig};
use crate::spec::{Objects, PodFacts};

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
#[serde(rename_all = "camelCase", default)]
struct Container {
    name: String,
    image: String,
    image_pull_policy: String,
}

#[derive(Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "camelCase", default)]
struct Spec {
    containers: Vec<Container>,
    init_containers: Vec<Container>,
    host_network: bool,
    termination_grace_period_seconds: Option<i64>,
    restart_policy: String,
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

/// `spec.restartPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// A container as the agent keeps it.
#[derive(Clone, Debug)]
struct Ctr {
    name: String,
    image: String,
    pull: PullPolicy,
}

/// A pod as the agent keeps it.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub uid: Arc<str>,
    containers: Arc<[Ctr]>,
    init_containers: Arc<[Ctr]>,
    host_network: bool,
    grace: i64,
    restart: RestartPolicy,
    qos_class: Arc<str>,
    /// Conditions set by others (DisruptionTarget, readiness gates) kept in our reports.
    foreign_conditions: Arc<[Value]>,
    deleting: Option<i64>,
    terminal: bool,
    /// The pod's `shoal.io/` annotations (for the runtime).
    annotations: Arc<[(String, String)]>,
    /// The whole pod, for runtimes that run real containers (volumes, environment).
    raw: Option<Arc<Value>>,
}

impl Pod {
    /// Reads the fields the agent uses from the pod's JSON; `keep` keeps the whole pod
    /// (a real node needs it, a hollow node does not).
    pub fn parse(json: &[u8], keep: bool) -> Result<Pod, String> {
        let p: PodObj = serde_json::from_slice(json).map_err(|e| format!("undecodable pod: {e}"))?;
        let raw = if keep { Some(Arc::new(serde_json::from_slice::<Value>(json).map_err(|e| format!("undecodable pod: {e}"))?)) } else { None };
        let own = ["PodScheduled", "Initialized", "ContainersReady", "Ready", "PodReadyToStartContainers"];
        let ctrs = |cs: Vec<Container>| -> Arc<[Ctr]> { cs.into_iter().map(|c| Ctr { pull: PullPolicy::of(&c.image_pull_policy, &c.image), name: c.name, image: c.image }).collect() };
        Ok(Pod {
            namespace: p.metadata.namespace.into(),
            name: p.metadata.name.into(),
            uid: p.metadata.uid.into(),
            containers: ctrs(p.spec.containers),
            init_containers: ctrs(p.spec.init_containers),
            host_network: p.spec.host_network,
            grace: p.spec.termination_grace_period_seconds.unwrap_or(30).max(0),
            restart: match p.spec.restart_policy.as_str() {
                "Never" => RestartPolicy::Never,
                "OnFailure" => RestartPolicy::OnFailure,
                _ => RestartPolicy::Always,
            },
            qos_class: p.status.qos_class.into(),
            foreign_conditions: p.status.conditions.into_iter().filter(|c| !own.iter().any(|o| c["type"] == *o)).collect(),
            deleting: p.metadata.deletion_timestamp.map(|_| p.metadata.deletion_grace_period_seconds.unwrap_or(0)),
            terminal: matches!(p.status.phase.as_str(), "Succeeded" | "Failed"),
            annotations: p.metadata.annotations.into_iter().filter(|(k, _)| k.starts_with("shoal.io/")).collect(),
            raw,
        })
    }
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    /// Memory requested by the app containers (bytes), for the eviction ranking.
    fn memory_request(&self) -> u64 {
        let Some(raw) = &self.raw else { return 0 };
        raw["spec"]["containers"].as_array().into_iter().flatten().filter_map(|c| c["resources"]["requests"]["memory"].as_str().and_then(shoal_client::quantity::parse)).map(|m| (m.max(0) / 1000) as u64).sum()
    }

    /// The pod's hostPorts: (protocol, host port, container port).
    fn host_ports(&self) -> Vec<(String, u16, u16)> {
        let Some(raw) = &self.raw else { return vec![] };
        if self.host_network {
            return vec![];
        }
        let mut out = vec![];
        for c in raw["spec"]["containers"].as_array().into_iter().flatten() {
            for p in c["ports"].as_array().into_iter().flatten() {
                let (Some(hp), Some(cp)) = (p["hostPort"].as_u64().and_then(|x| u16::try_from(x).ok()).filter(|x| *x > 0), p["containerPort"].as_u64().and_then(|x| u16::try_from(x).ok())) else { continue };
                out.push((p["protocol"].as_str().unwrap_or("TCP").to_ascii_lowercase(), hp, cp));
            }
        }
        out
    }

    fn hostname(&self) -> String {
        self.raw.as_ref().and_then(|r| r["spec"]["hostname"].as_str().map(str::to_string)).unwrap_or_else(|| self.name.to_string())
    }
    fn pull_secrets(&self) -> Vec<String> {
        self.raw.as_ref().map(|r| r["spec"]["imagePullSecrets"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str().map(str::to_string)).collect()).unwrap_or_default()
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
    /// Reservations made before the range was known.
    early: Mutex<Vec<Ipv4Addr>>,
}

impl Default for Ipam {
    fn default() -> Self {
        Ipam {
            inner: Mutex::new((None, Used::new())),
            ready: watch::channel(false).0,
            early: Mutex::new(Vec::new()),
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
        let size = 1u32 << (32 - len);
        let mut g = self.inner.lock();
        if g.0.map(|r| r.0) != Some(base) {
            *g = (Some((base, size)), Default::default());
        }
        // Addresses of adopted pods, reserved before any pod is given one.
        for a in self.early.lock().drain(..) {
            let i = u32::from(a).wrapping_sub(base);
            if i < size {
                g.1.insert(i);
            }
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
    /// Marks an address in use (a pod adopted after an agent restart keeps its address);
    /// before the node has a range it is held until the range is set.
    pub fn reserve(&self, ip: Ipv4Addr) {
        let mut g = self.inner.lock();
        match g.0 {
            Some((base, size)) => {
                let i = u32::from(ip).wrapping_sub(base);
                if i < size {
                    g.1.insert(i);
                }
            }
            None => self.early.lock().push(ip),
        }
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
    /// ConfigMaps, Secrets and claims of the node's pods (kept only by real nodes).
    pub objects: Objects,
    /// Where pods' volumes live (`DATA/pods`); None on hollow nodes.
    pub pods_dir: Option<std::path::PathBuf>,
    /// Events about pods, waiting to be sent (bounded: events are best effort).
    pub events: Mutex<Vec<shoal_proto::agent::PodEvent>>,
    pub events_ready: Notify,
}

impl NodeCtx {
    pub fn new(node_name: &str, host_ip: &str, pods_dir: Option<std::path::PathBuf>) -> NodeCtx {
        NodeCtx { node_name: node_name.into(), host_ip: Mutex::new(host_ip.into()), ipam: Ipam::default(), objects: Objects::default(), pods_dir, events: Mutex::new(Vec::new()), events_ready: Notify::new() }
    }
}

/// What a pod task is told.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ctl {
    Run,
    /// Stop within this grace and report the pod gone.
    Delete(i64),
    /// The server no longer has the pod: stop at once, report nothing.
    Forget,
    /// Evicted by the node (pressure): stop at once, report Failed/Evicted, wait for the
    /// delete.
    Evict,
}

/// Runtime ids of a container: the current one and the one before it (`logs --previous`).
#[derive(Clone, Debug, Default)]
struct Ids {
    current: String,
    previous: Option<String>,
}

struct Handle {
    uid: Arc<str>,
    ctl: watch::Sender<Ctl>,
    /// Container name → runtime ids (for logs and usage).
    containers: Arc<Mutex<HashMap<String, Ids>>>,
    /// The pod and its address once its volumes are set up (to refresh them when a
    /// ConfigMap or Secret they show changes).
    volumes: Arc<Mutex<Option<(Arc<Value>, Option<Ipv4Addr>)>>>,
    /// For the eviction ranking: QoS class and memory requested (bytes).
    qos: Arc<str>,
    memory_request: u64,
    /// Why the node evicted it.
    evicted: Arc<Mutex<Option<String>>>,
}

/// The pods of one node.
pub struct PodManager<R: Runtime> {
    rt: Arc<R>,
    node: Arc<NodeCtx>,
    outbox: Arc<Outbox>,
    pods: Mutex<HashMap<String, Handle>>,
    /// First restart delay (upstream: 10 s, doubling to 5 min).
    pub backoff_base: Duration,
    /// Metrics of a real node (None on hollow nodes).
    metrics: Option<Arc<crate::metrics::NodeMetrics>>,
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

/// One container's part of a report.
#[derive(Clone, Debug, Default)]
struct Slot {
    name: String,
    image: String,
    image_id: String,
    /// `runc://ID`
    id: String,
    state: Option<ContainerState>,
    /// Why it is not running (reason, message), when that is known.
    waiting: Option<(&'static str, String)>,
    restarts: u32,
    last: Option<ContainerState>,
    /// The readiness probe's verdict (None: no readiness probe).
    probe_ready: Option<bool>,
    /// Whether the startup probe has succeeded (None: no startup probe).
    probe_started: Option<bool>,
}

/// A pod's status as the agent reports it.
#[derive(Clone, Debug, Default)]
struct Report {
    /// Set when the pod is done (Succeeded, Failed).
    done: Option<&'static str>,
    start: i64,
    ip: Option<Ipv4Addr>,
    initialized: bool,
    init: Vec<Slot>,
    apps: Vec<Slot>,
    reason: Option<(&'static str, String)>,
}

fn terminated(st: &ContainerState, id: &str) -> Option<Value> {
    match st {
        ContainerState::Exited { exit_code, reason, started_at, finished_at } => Some(json!({"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": time(*started_at), "finishedAt": time(*finished_at), "containerID": id}})),
        _ => None,
    }
}

fn container_status(c: &Slot, waiting: &str) -> Value {
    let state = match (&c.waiting, &c.state) {
        (Some((r, m)), _) => {
            let mut w = json!({"reason": r});
            if !m.is_empty() {
                w["message"] = json!(m);
            }
            json!({ "waiting": w })
        }
        (None, None | Some(ContainerState::Created)) => json!({"waiting": {"reason": waiting}}),
        (None, Some(ContainerState::Running { started_at })) => json!({"running": {"startedAt": time(*started_at)}}),
        (None, Some(st)) => terminated(st, &c.id).unwrap_or_default(),
    };
    let running = c.waiting.is_none() && matches!(c.state, Some(ContainerState::Running { .. }));
    let started = running && c.probe_started != Some(false);
    let ready = started && c.probe_ready != Some(false);
    let mut v = json!({"name": c.name, "image": c.image, "imageID": c.image_id, "ready": ready, "restartCount": c.restarts, "started": started, "state": state, "lastState": {}});
    if let Some(t) = c.last.as_ref().and_then(|l| terminated(l, "")) {
        v["lastState"] = t;
    }
    if !c.id.is_empty() {
        v["containerID"] = json!(c.id);
    }
    v
}

impl Report {
    fn running(c: &Slot) -> bool {
        c.waiting.is_none() && matches!(c.state, Some(ContainerState::Running { .. }))
    }
    fn ready(&self) -> bool {
        self.done.is_none() && self.initialized && self.apps.iter().all(|c| Self::running(c) && c.probe_started != Some(false) && c.probe_ready != Some(false))
    }
    fn phase(&self) -> &'static str {
        if let Some(d) = self.done {
            return d;
        }
        if self.initialized && self.apps.iter().any(|c| Self::running(c) || c.restarts > 0 || matches!(c.state, Some(ContainerState::Exited { .. }))) {
            return "Running";
        }
        "Pending"
    }
    fn json(&self, pod: &Pod, host_ip: &str) -> Bytes {
        let t = time(self.start);
        let cond = |ty: &str, ok: bool, reason: Option<&str>| {
            let mut c = json!({"type": ty, "status": if ok { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": t});
            if let (false, Some(r)) = (ok, reason) {
                c["reason"] = json!(r);
            }
            c
        };
        let ready = self.ready();
        let ready_reason = if self.done.is_some() { "PodCompleted" } else { "ContainersNotReady" };
        let mut conditions = vec![
            cond("PodReadyToStartContainers", self.ip.is_some() || pod.host_network, None),
            cond("Initialized", self.initialized, Some("ContainersNotInitialized")),
            cond("Ready", ready, Some(ready_reason)),
            cond("ContainersReady", ready, Some(ready_reason)),
            cond("PodScheduled", true, None),
        ];
        conditions.extend(pod.foreign_conditions.iter().cloned());
        let mut s = json!({
            "phase": self.phase(),
            "conditions": conditions,
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "startTime": t,
            "containerStatuses": self.apps.iter().map(|c| container_status(c, if self.initialized { "ContainerCreating" } else { "PodInitializing" })).collect::<Vec<_>>(),
        });
        if !self.init.is_empty() {
            s["initContainerStatuses"] = self.init.iter().map(|c| container_status(c, "PodInitializing")).collect();
        }
        let ip = if pod.host_network { Some(host_ip.to_string()) } else { self.ip.map(|i| i.to_string()) };
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

/// Which slot of the report a container fills.
#[derive(Clone, Copy)]
enum Which {
    Init(usize),
    App(usize),
}

/// The shared state of one pod's task.
struct Run<'a> {
    pod: &'a Pod,
    sandbox: String,
    report: Mutex<Report>,
    /// Runtime ids of every container created (removed when the pod stops).
    created: Mutex<Vec<String>>,
    ids: Arc<Mutex<HashMap<String, Ids>>>,
    volumes: HashMap<String, std::path::PathBuf>,
    /// preStop hooks of the containers created, by runtime id.
    pre_stop: Mutex<HashMap<String, crate::spec::Hook>>,
    /// Containers an earlier agent left for this pod, by container name.
    adopted: Mutex<HashMap<String, crate::runtime::runc::AdoptedCtr>>,
    /// When the pod reached the agent, and whether its start was measured.
    since: std::time::Instant,
    start_measured: std::sync::atomic::AtomicBool,
}

impl Run<'_> {
    fn slot<T>(&self, w: Which, f: impl FnOnce(&mut Slot) -> T) -> T {
        let mut r = self.report.lock();
        match w {
            Which::Init(i) => f(&mut r.init[i]),
            Which::App(i) => f(&mut r.apps[i]),
        }
    }
}

/// Restart delays: `base` doubling to 5 minutes; reset after a container ran 10 minutes.
struct Backoff {
    base: Duration,
    next: Duration,
}

impl Backoff {
    fn new(base: Duration) -> Backoff {
        Backoff { base, next: base }
    }
    fn delay(&mut self, ran: Duration) -> Duration {
        if ran >= Duration::from_secs(600) {
            self.next = self.base;
        }
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(300).max(self.base));
        d
    }
}

/// Resolves once the pod is no longer to run.
async fn told_to_stop(ctl: &mut watch::Receiver<Ctl>) {
    let _ = ctl.wait_for(|c| *c != Ctl::Run).await;
}

impl<R: Runtime> PodManager<R> {
    pub fn new(rt: Arc<R>, node: Arc<NodeCtx>, outbox: Arc<Outbox>) -> Arc<Self> {
        Self::with_metrics(rt, node, outbox, None)
    }

    pub fn with_metrics(rt: Arc<R>, node: Arc<NodeCtx>, outbox: Arc<Outbox>, metrics: Option<Arc<crate::metrics::NodeMetrics>>) -> Arc<Self> {
        Arc::new(PodManager { rt, node, outbox, pods: Mutex::new(HashMap::new()), backoff_base: Duration::from_secs(10), metrics })
    }

    /// Records an event about a pod (a container when `container` is given), as the
    /// kubelet would; hollow nodes record none.
    fn event(&self, pod: &Pod, container: Option<&str>, warning: bool, reason: &str, message: String) {
        if !self.rt.keeps_specs() {
            return;
        }
        let mut g = self.node.events.lock();
        if g.len() >= 1000 {
            return;
        }
        let field_path = container.map(|c| {
            let init = pod.init_containers.iter().any(|x| x.name == c);
            format!("spec.{}{{{c}}}", if init { "initContainers" } else { "containers" })
        });
        g.push(shoal_proto::agent::PodEvent { namespace: pod.namespace.to_string(), pod: pod.name.to_string(), uid: pod.uid.to_string(), r#type: if warning { "Warning" } else { "Normal" }.into(), reason: reason.into(), message, field_path: field_path.unwrap_or_default() });
        drop(g);
        self.node.events_ready.notify_one();
    }

    fn op<T, E>(&self, op: &str, r: &Result<T, E>) {
        if let Some(m) = &self.metrics {
            m.op(op, r);
        }
    }

    pub fn count(&self) -> usize {
        self.pods.lock().len()
    }

    /// Whether pods are kept whole (real runtimes) or compact (the simulated one).
    pub fn keeps_specs(&self) -> bool {
        self.rt.keeps_specs()
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
                // An evicted pod still goes when the server deletes it.
                if cur != want && (cur == Ctl::Run || (cur == Ctl::Evict && matches!(want, Ctl::Delete(_)))) {
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
        g.insert(key.clone(), Handle { uid: pod.uid.clone(), ctl: tx, containers: Default::default(), volumes: Default::default(), qos: pod.qos_class.clone(), memory_request: pod.memory_request(), evicted: Default::default() });
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
        self.outbox.status(pod.key(), pod.uid.clone(), r.json(pod, &host_ip));
    }

    fn facts<'a>(&self, pod: &'a Value, ip: Option<Ipv4Addr>) -> PodFacts<'a> {
        PodFacts { pod, pod_ip: ip.map(|i| i.to_string()).unwrap_or_default(), host_ip: self.node.host_ip.lock().clone(), node_name: self.node.node_name.clone() }
    }

    async fn run(self: Arc<Self>, pod: Pod, mut ctl: watch::Receiver<Ctl>) {
        let since = std::time::Instant::now();
        let slots = |cs: &[Ctr]| cs.iter().map(|c| Slot { name: c.name.clone(), image: c.image.clone(), ..Default::default() }).collect::<Vec<_>>();
        let mut r = Report { start: now(), init: slots(&pod.init_containers), apps: slots(&pod.containers), initialized: pod.init_containers.is_empty(), ..Default::default() };
        let mut sandbox = None;
        let run = if *ctl.borrow() == Ctl::Run {
            self.publish(&pod, &r);
            tokio::select! {
                res = self.sandbox(&pod, &mut r, &mut sandbox) => res,
                _ = told_to_stop(&mut ctl) => None,
            }
        } else {
            None
        };
        let ids = self.pods.lock().get(&pod.key()).filter(|h| h.uid == pod.uid).map(|h| h.containers.clone()).unwrap_or_default();
        let run = run.map(|volumes| Run { pod: &pod, sandbox: sandbox.clone().unwrap_or_default(), report: Mutex::new(r.clone()), created: Mutex::new(vec![]), ids, volumes, since, start_measured: Default::default(), adopted: Default::default(), pre_stop: Default::default() });
        if let Some(run) = &run {
            // Of a container's generations left behind, the newest is adopted; the one
            // before stays for `logs --previous`; all go when the pod does.
            let mut found = self.rt.adopted_containers(&pod.uid);
            found.sort_by_key(|a| a.restarts);
            let mut adopted = run.adopted.lock();
            for a in found {
                run.created.lock().push(a.id.clone());
                if let Some(older) = adopted.insert(a.container.clone(), a) {
                    run.ids.lock().entry(older.container.clone()).or_default().previous = Some(older.id);
                }
            }
        }
        if let (Some(m), Some(_)) = (&self.metrics, &run) {
            m.running_pods.inc();
        }
        if let Some(run) = &run {
            let mut c2 = ctl.clone();
            tokio::select! {
                _ = self.containers(run) => {}
                _ = told_to_stop(&mut c2) => {}
            }
            // Done or failed: hold until deleted.
            told_to_stop(&mut ctl).await;
        }
        // Stopping.
        let mut final_ctl = *ctl.borrow();
        let grace = match final_ctl {
            Ctl::Delete(g) => g.min(pod.grace),
            _ => 0,
        };
        if let Some(run) = &run {
            let created = run.created.lock().clone();
            let stops = created.iter().map(|id| self.kill(run, id, Duration::from_secs(grace as u64)));
            futures::future::join_all(stops).await;
            let mut rep = run.report.lock().clone();
            for slot in rep.init.iter_mut().chain(rep.apps.iter_mut()) {
                if let Some(id) = slot.id.rsplit("//").next() {
                    if let Ok(st) = self.rt.container_state(id) {
                        slot.state = Some(st);
                        slot.waiting = None;
                    }
                }
            }
            for id in &created {
                let _ = self.rt.remove_container(id).await;
            }
            r = rep;
        }
        if let (Some(m), Some(_)) = (&self.metrics, &run) {
            m.running_pods.dec();
        }
        // A sandbox whose setup was abandoned (the pod went first) is the pod's uid.
        let sb = sandbox.unwrap_or_else(|| pod.uid.to_string());
        let _ = self.rt.stop_sandbox(&sb).await;
        let _ = self.rt.remove_sandbox(&sb).await;
        if let Some(ip) = r.ip {
            self.node.ipam.release(ip);
        }
        if let Some(dir) = &self.node.pods_dir {
            let vols = dir.join(&*pod.uid).join("volumes");
            if let Ok(rd) = std::fs::read_dir(&vols) {
                for e in rd.flatten() {
                    let _ = rustix::mount::unmount(e.path(), rustix::mount::UnmountFlags::DETACH);
                }
            }
            let _ = std::fs::remove_dir_all(dir.join(&*pod.uid));
        }
        if final_ctl == Ctl::Evict {
            let why = self.pods.lock().get(&pod.key()).filter(|h| h.uid == pod.uid).and_then(|h| h.evicted.lock().clone()).unwrap_or_default();
            self.event(&pod, None, true, "Evicted", why.clone());
            r.done = Some("Failed");
            r.reason = Some(("Evicted", why));
            self.publish(&pod, &r);
            let _ = ctl.wait_for(|c| *c != Ctl::Evict).await;
            final_ctl = *ctl.borrow();
        }
        if matches!(final_ctl, Ctl::Delete(_)) {
            r.done.get_or_insert("Running");
            self.publish(&pod, &r);
            self.outbox.gone(pod.key(), pod.uid.clone());
        }
        let mut g = self.pods.lock();
        if g.get(&pod.key()).is_some_and(|h| h.uid == pod.uid) && final_ctl == Ctl::Forget {
            g.remove(&pod.key());
        }
    }

    /// Address, volumes and sandbox, retried until they work; returns the volumes.
    async fn sandbox(&self, pod: &Pod, r: &mut Report, sandbox: &mut Option<String>) -> Option<HashMap<String, std::path::PathBuf>> {
        let adopted = self.rt.adopted_sandbox(&pod.uid);
        if let Some((_, Some(ip))) = &adopted {
            // The address stays the pod's: hold it before any other pod is given one.
            self.node.ipam.reserve(*ip);
            r.ip = Some(*ip);
        }
        if !pod.host_network && r.ip.is_none() {
            r.ip = self.node.ipam.allocate_when_ready().await;
            if r.ip.is_none() {
                r.reason = Some(("OutOfpods", "no pod address free in the node's podCIDR".into()));
                r.done = Some("Failed");
                self.publish(pod, r);
                return None;
            }
        }
        let mut delay = Duration::from_secs(1);
        loop {
            let volumes = match (&pod.raw, &self.node.pods_dir) {
                (Some(raw), Some(dir)) => crate::spec::prepare_volumes(&self.facts(raw, r.ip), &self.node.objects, &dir.join(&*pod.uid)),
                _ => Ok(HashMap::new()),
            };
            let res = match volumes {
                Ok(v) if adopted.is_some() => Ok((adopted.clone().map(|a| a.0).unwrap_or_default(), v)),
                Ok(v) => {
                    let cfg = SandboxConfig { namespace: pod.namespace.to_string(), name: pod.name.to_string(), uid: pod.uid.to_string(), host_network: pod.host_network, ip: r.ip, annotations: pod.annotations.to_vec(), hostname: pod.hostname(), host_ports: pod.host_ports() };
                    let res = self.rt.run_sandbox(&cfg).await;
                    self.op("run_podsandbox", &res);
                    res.map(|sb| (sb, v)).map_err(|e| format!("Failed to create pod sandbox: {e}"))
                }
                Err(e) => {
                    self.event(pod, None, true, "FailedMount", format!("MountVolume.SetUp failed: {e}"));
                    Err(format!("MountVolume.SetUp failed: {e}"))
                }
            };
            match res {
                Ok((sb, v)) => {
                    *sandbox = Some(sb);
                    if let Some(raw) = &pod.raw {
                        if let Some(h) = self.pods.lock().get(&pod.key()).filter(|h| h.uid == pod.uid) {
                            *h.volumes.lock() = Some((raw.clone(), r.ip));
                        }
                    }
                    return Some(v);
                }
                Err(e) => {
                    tracing::info!(pod = %pod.key(), error = %e, "pod sandbox not ready; retrying");
                    for s in r.apps.iter_mut().chain(r.init.iter_mut()) {
                        s.waiting = Some(("ContainerCreating", e.clone()));
                    }
                    self.publish(pod, r);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Init containers in order, then the app containers together; returns when the pod
    /// is done (every container ended for good).
    async fn containers(&self, run: &Run<'_>) {
        // App containers an earlier agent started mean the init containers are done.
        let apps_adopted = run.pod.containers.iter().any(|c| run.adopted.lock().contains_key(&c.name));
        if apps_adopted {
            for (i, c) in run.pod.init_containers.iter().enumerate() {
                if let Some(a) = run.adopted.lock().remove(&c.name) {
                    let _ = self.adopt(run, c, Which::Init(i), a);
                } else {
                    run.slot(Which::Init(i), |s| s.state = Some(ContainerState::Exited { exit_code: 0, reason: "Completed".into(), started_at: now(), finished_at: now() }));
                }
            }
        }
        for (i, c) in run.pod.init_containers.iter().enumerate().filter(|_| !apps_adopted) {
            let code = self.supervise(run, c, Which::Init(i)).await;
            if code != 0 {
                // Only with restartPolicy Never does a failed init container end the pod.
                let mut r = run.report.lock();
                r.done = Some("Failed");
                self.publish(run.pod, &r);
                return;
            }
        }
        {
            let mut r = run.report.lock();
            r.initialized = true;
            self.publish(run.pod, &r);
        }
        let apps = run.pod.containers.iter().enumerate().map(|(i, c)| self.supervise(run, c, Which::App(i)));
        let codes = futures::future::join_all(apps).await;
        let mut r = run.report.lock();
        r.done = Some(if codes.iter().all(|c| *c == 0) { "Succeeded" } else { "Failed" });
        self.publish(run.pod, &r);
    }

    /// Runs one container, restarting it as the restart policy says, until it ends for
    /// good; returns its last exit code.
    async fn supervise(&self, run: &Run<'_>, c: &Ctr, which: Which) -> i32 {
        let mut backoff = Backoff::new(self.backoff_base);
        let init = matches!(which, Which::Init(_));
        let mut adopted = run.adopted.lock().remove(&c.name);
        loop {
            let started = std::time::Instant::now();
            let launched = match adopted.take() {
                Some(a) => self.adopt(run, c, which, a),
                None => self.launch(run, c, which).await,
            };
            let code = match launched {
                // Found exited (while no agent ran): as if it had just exited.
                Ok((id, _)) if id.is_empty() => match run.slot(which, |s| s.state.clone()) {
                    Some(ContainerState::Exited { exit_code, .. }) => exit_code,
                    _ => 255,
                },
                Ok((id, probes)) => {
                    run.slot(which, |s| {
                        s.probe_ready = probes.readiness.as_ref().map(|_| false);
                        s.probe_started = probes.startup.as_ref().map(|_| false);
                    });
                    {
                        let r = run.report.lock();
                        if let Some(m) = &self.metrics {
                            m.running_containers.inc();
                            // Started as upstream counts it: every app container running (ready or not).
                            if r.initialized && r.apps.iter().all(Report::running) && !run.start_measured.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                m.pod_start.observe(run.since.elapsed().as_secs_f64());
                            }
                        }
                        self.publish(run.pod, &r);
                    }
                    let wait = self.rt.wait_container(&id);
                    tokio::pin!(wait);
                    let st = tokio::select! {
                        st = &mut wait => st,
                        why = self.probe(run, which, &id, &probes) => {
                            // A failed liveness or startup probe: stop it; the restart policy decides what follows.
                            tracing::info!(pod = %run.pod.key(), container = %c.name, %why, "container will be restarted");
                            self.kill(run, &id, Duration::from_secs(run.pod.grace as u64)).await;
                            wait.await
                        }
                    };
                    let st = st.unwrap_or(ContainerState::Exited { exit_code: 255, reason: "Unknown".into(), started_at: now(), finished_at: now() });
                    let code = match &st {
                        ContainerState::Exited { exit_code, .. } => *exit_code,
                        _ => 255,
                    };
                    run.slot(which, |s| s.state = Some(st));
                    if let Some(m) = &self.metrics {
                        m.running_containers.dec();
                    }
                    code
                }
                Err((reason, msg)) => {
                    // Could not start: wait and try again (ImagePullBackOff and friends).
                    tracing::info!(pod = %run.pod.key(), container = %c.name, %reason, error = %msg, "container not started");
                    run.slot(which, |s| s.waiting = Some((reason, msg.clone())));
                    {
                        let r = run.report.lock();
                        self.publish(run.pod, &r);
                    }
                    let d = backoff.delay(Duration::ZERO);
                    tokio::time::sleep(d.min(Duration::from_secs(2)).max(Duration::from_millis(100))).await;
                    if reason == "ErrImagePull" {
                        self.event(run.pod, Some(&c.name), false, "BackOff", format!("Back-off pulling image \"{}\"", c.image));
                        run.slot(which, |s| s.waiting = Some(("ImagePullBackOff", format!("Back-off pulling image \"{}\": {msg}", c.image))));
                        {
                            let r = run.report.lock();
                            self.publish(run.pod, &r);
                        }
                        tokio::time::sleep(d.saturating_sub(Duration::from_secs(2))).await;
                    }
                    continue;
                }
            };
            let restart = match run.pod.restart {
                RestartPolicy::Always => !init || code != 0,
                RestartPolicy::OnFailure => code != 0,
                RestartPolicy::Never => false,
            };
            if !restart {
                let r = run.report.lock();
                self.publish(run.pod, &r);
                return code;
            }
            let d = backoff.delay(started.elapsed());
            self.event(run.pod, Some(&c.name), true, "BackOff", format!("Back-off restarting failed container {} in pod {}_{}({})", c.name, run.pod.name, run.pod.namespace, run.pod.uid));
            run.slot(which, |s| {
                s.last = s.state.take();
                s.waiting = Some(("CrashLoopBackOff", format!("back-off {}s restarting failed container={} pod={}_{}({})", d.as_secs(), c.name, run.pod.name, run.pod.namespace, run.pod.uid)));
            });
            {
                let r = run.report.lock();
                self.publish(run.pod, &r);
            }
            tokio::time::sleep(d).await;
            run.slot(which, |s| s.restarts += 1);
        }
    }

    /// The name of the container whose current runtime id is `id`.
    fn container_of(&self, run: &Run<'_>, id: &str) -> Option<String> {
        run.ids.lock().iter().find(|(_, i)| i.current == id).map(|(n, _)| n.clone())
    }

    /// Stops a container as the kubelet does: its preStop hook first (within the grace
    /// period), then SIGTERM, then SIGKILL when the rest of the grace is spent.
    async fn kill(&self, run: &Run<'_>, id: &str, grace: Duration) {
        if let Ok(ContainerState::Running { .. }) = self.rt.container_state(id) {
            let name = run.ids.lock().iter().find(|(_, i)| i.current == id).map(|(n, _)| n.clone());
            if let Some(n) = name {
                self.event(run.pod, Some(&n), false, "Killing", format!("Stopping container {n}"));
            }
        }
        let hook = run.pre_stop.lock().remove(id);
        let t0 = std::time::Instant::now();
        if let (Some(h), Ok(ContainerState::Running { .. })) = (hook, self.rt.container_state(id)) {
            let ip = run.report.lock().ip;
            if let Err(e) = tokio::time::timeout(grace, self.run_hook(id, ip, &h)).await.unwrap_or_else(|_| Err("timed out".into())) {
                tracing::info!(pod = %run.pod.key(), %id, error = %e, "preStop hook failed");
            }
        }
        let _ = self.rt.stop_container(id, grace.saturating_sub(t0.elapsed())).await;
    }

    async fn run_hook(&self, id: &str, ip: Option<Ipv4Addr>, h: &crate::spec::Hook) -> Result<(), String> {
        match h {
            crate::spec::Hook::Sleep(d) => {
                tokio::time::sleep(*d).await;
                Ok(())
            }
            // Hooks have no timeout of their own; the caller bounds them.
            crate::spec::Hook::Action(a) => crate::probe::check(&*self.rt, id, ip, a, Duration::from_secs(3600)).await,
        }
    }

    /// Runs a container's probes; returns (only) when liveness or startup says to restart
    /// it, with why. Readiness and startup verdicts go into the report.
    async fn probe(&self, run: &Run<'_>, which: Which, id: &str, probes: &crate::spec::Probes) -> String {
        let ip = run.report.lock().ip;
        let set = |f: &dyn Fn(&mut Slot) -> bool| {
            let changed = run.slot(which, f);
            if changed {
                let r = run.report.lock();
                self.publish(run.pod, &r);
            }
        };
        if let Some(p) = &probes.startup {
            tokio::time::sleep(p.initial_delay).await;
            let mut fails = 0;
            loop {
                match crate::probe::check(&*self.rt, id, ip, &p.action, p.timeout).await {
                    Ok(()) => break,
                    Err(e) => {
                        fails += 1;
                        self.event(run.pod, self.container_of(run, id).as_deref(), true, "Unhealthy", format!("Startup probe failed: {e}"));
                        if fails >= p.failure_threshold {
                            return format!("Startup probe failed: {e}");
                        }
                    }
                }
                tokio::time::sleep(p.period).await;
            }
            set(&|s| s.probe_started.replace(true) != Some(true));
        }
        let liveness = async {
            let Some(p) = &probes.liveness else { return std::future::pending().await };
            tokio::time::sleep(p.initial_delay).await;
            let mut fails = 0;
            loop {
                match crate::probe::check(&*self.rt, id, ip, &p.action, p.timeout).await {
                    Ok(()) => fails = 0,
                    Err(e) => {
                        fails += 1;
                        self.event(run.pod, self.container_of(run, id).as_deref(), true, "Unhealthy", format!("Liveness probe failed: {e}"));
                        tracing::debug!(pod = %run.pod.key(), error = %e, fails, "liveness probe failed");
                        if fails >= p.failure_threshold {
                            return format!("Liveness probe failed: {e}");
                        }
                    }
                }
                tokio::time::sleep(p.period).await;
            }
        };
        let readiness = async {
            let Some(p) = &probes.readiness else { return std::future::pending::<()>().await };
            tokio::time::sleep(p.initial_delay).await;
            let (mut ok, mut bad) = (0, 0);
            loop {
                match crate::probe::check(&*self.rt, id, ip, &p.action, p.timeout).await {
                    Ok(()) => {
                        (ok, bad) = (ok + 1, 0);
                        if ok >= p.success_threshold {
                            set(&|s| s.probe_ready.replace(true) != Some(true));
                        }
                    }
                    Err(e) => {
                        (ok, bad) = (0, bad + 1);
                        self.event(run.pod, self.container_of(run, id).as_deref(), true, "Unhealthy", format!("Readiness probe failed: {e}"));
                        tracing::debug!(pod = %run.pod.key(), error = %e, "readiness probe failed");
                        if bad >= p.failure_threshold {
                            set(&|s| s.probe_ready.replace(false) != Some(false));
                        }
                    }
                }
                tokio::time::sleep(p.period).await;
            }
        };
        tokio::select! {
            why = liveness => why,
            _ = readiness => unreachable!("the readiness loop never ends"),
        }
    }

    /// Takes over a container an earlier agent started: its report slot and ids as if
    /// just launched. Returns its id and probes, or an empty id when it had exited.
    fn adopt(&self, run: &Run<'_>, c: &Ctr, which: Which, a: crate::runtime::runc::AdoptedCtr) -> Result<(String, crate::spec::Probes), (&'static str, String)> {
        let probes = match (&run.pod.raw, which) {
            (Some(raw), Which::App(_)) => {
                let cj = raw["spec"]["containers"].as_array().and_then(|l| l.iter().find(|x| x["name"] == c.name.as_str())).cloned().unwrap_or_default();
                crate::spec::probes(&cj).unwrap_or_default()
            }
            _ => Default::default(),
        };
        run.ids.lock().entry(c.name.clone()).or_default().current = a.id.clone();
        let scheme = self.rt.version();
        let scheme = scheme.split("//").next().unwrap_or("runc:");
        let running = matches!(a.state, ContainerState::Running { .. });
        run.slot(which, |s| {
            s.image_id = a.image_id.clone();
            s.id = format!("{scheme}//{}", a.id);
            s.restarts = a.restarts;
            s.waiting = None;
            s.state = Some(a.state.clone());
        });
        if let (Some(raw), Which::App(_)) = (&run.pod.raw, which) {
            let cj = raw["spec"]["containers"].as_array().and_then(|l| l.iter().find(|x| x["name"] == c.name.as_str())).cloned().unwrap_or_default();
            if let Ok(crate::spec::Hooks { pre_stop: Some(h), .. }) = crate::spec::hooks(&cj) {
                run.pre_stop.lock().insert(a.id.clone(), h);
            }
        }
        tracing::info!(pod = %run.pod.key(), container = %c.name, id = %a.id, running, "container adopted");
        Ok((if running { a.id } else { String::new() }, probes))
    }

    /// Pulls, creates and starts one container; the error is (waiting reason, message).
    async fn launch(&self, run: &Run<'_>, c: &Ctr, which: Which) -> Result<(String, crate::spec::Probes), (&'static str, String)> {
        let pod = run.pod;
        let creds = match &pod.raw {
            Some(_) => crate::spec::pull_credentials(&c.image, &pod.namespace, &pod.pull_secrets(), &self.node.objects),
            None => vec![],
        };
        let t0 = std::time::Instant::now();
        let present = self.rt.has_image(&c.image);
        let cached = present && c.pull != PullPolicy::Always;
        if !cached && c.pull != PullPolicy::Never {
            self.event(pod, Some(&c.name), false, "Pulling", format!("Pulling image \"{}\"", c.image));
        }
        let pulled = self.rt.pull_image(&c.image, c.pull, &creds).await;
        self.op("pull_image", &pulled);
        match &pulled {
            Ok(_) if cached => self.event(pod, Some(&c.name), false, "Pulled", format!("Container image \"{}\" already present on machine", c.image)),
            Ok(_) => {
                let d = t0.elapsed().as_secs_f64();
                self.event(pod, Some(&c.name), false, "Pulled", format!("Successfully pulled image \"{}\" in {d:.3}s ({d:.3}s including waiting)", c.image));
            }
            Err(e) => {
                self.event(pod, Some(&c.name), true, "Failed", format!("Failed to pull image \"{}\": {e}", c.image));
                let code = if matches!(e, RuntimeError::ImageNeverPull(_)) { "ErrImageNeverPull" } else { "ErrImagePull" };
                self.event(pod, Some(&c.name), true, "Failed", format!("Error: {code}"));
            }
        }
        if let (Some(m), Ok(_)) = (&self.metrics, &pulled) {
            m.image_pull.observe(t0.elapsed().as_secs_f64());
        }
        let image_id = pulled.map_err(|e| match e {
            RuntimeError::ImageNeverPull(m) => ("ErrImageNeverPull", m),
            RuntimeError::ImagePull(m) => ("ErrImagePull", m),
            e => ("ErrImagePull", e.to_string()),
        })?;
        let (spec, probes) = match &pod.raw {
            Some(raw) => {
                let list = if matches!(which, Which::Init(_)) { "initContainers" } else { "containers" };
                let cj = raw["spec"][list].as_array().and_then(|a| a.iter().find(|x| x["name"] == c.name.as_str())).cloned().unwrap_or_default();
                let ip = run.report.lock().ip;
                let spec = match crate::spec::run_spec(&cj, &self.facts(raw, ip), &self.node.objects, &run.volumes) {
                    Ok(s) => s,
                    Err(e) => {
                        self.event(pod, Some(&c.name), true, "Failed", format!("Error: {e}"));
                        return Err(("CreateContainerConfigError", e));
                    }
                };
                // Init containers are not probed and have no hooks.
                let (probes, hooks) = if matches!(which, Which::Init(_)) { Default::default() } else { (crate::spec::probes(&cj).map_err(|e| ("CreateContainerConfigError", e))?, crate::spec::hooks(&cj).map_err(|e| ("CreateContainerConfigError", e))?) };
                (Arc::new(spec), (probes, hooks))
            }
            None => Default::default(),
        };
        let (probes, hooks) = probes;
        let kind = if matches!(which, Which::Init(_)) { ContainerKind::Init } else { ContainerKind::App };
        let created = self.rt.create_container(&run.sandbox, &ContainerConfig { name: c.name.clone(), image: c.image.clone(), kind, run: spec, restart_count: run.slot(which, |s| s.restarts) }).await;
        self.op("create_container", &created);
        if let Err(e) = &created {
            self.event(pod, Some(&c.name), true, "Failed", format!("Error: {e}"));
        }
        let id = created.map_err(|e| ("CreateContainerError", e.to_string()))?;
        self.event(pod, Some(&c.name), false, "Created", format!("Created container {}", c.name));
        // Recorded before any other await: a pod deleted from here on still removes it.
        run.created.lock().push(id.clone());
        // Keep this and the previous container (for `logs --previous`); older ones go.
        let older = {
            let mut ids = run.ids.lock();
            let e = ids.entry(c.name.clone()).or_default();
            let older = e.previous.take();
            e.previous = (!e.current.is_empty()).then(|| std::mem::take(&mut e.current));
            e.current = id.clone();
            older
        };
        if let Some(o) = older {
            run.created.lock().retain(|x| *x != o);
            let _ = self.rt.remove_container(&o).await;
        }
        let scheme = self.rt.version();
        let scheme = scheme.split("//").next().unwrap_or("sim:");
        run.slot(which, |s| {
            s.image_id = image_id;
            s.id = format!("{scheme}//{id}");
            s.state = Some(ContainerState::Created);
        });
        let started = self.rt.start_container(&id).await;
        self.op("start_container", &started);
        if let Err(e) = started {
            self.event(pod, Some(&c.name), true, "Failed", format!("Error: {e}"));
            // Nothing ran: the next attempt makes a new one, this one goes now.
            let _ = self.rt.remove_container(&id).await;
            run.created.lock().retain(|x| *x != id);
            return Err(("RunContainerError", e.to_string()));
        }
        self.event(pod, Some(&c.name), false, "Started", format!("Started container {}", c.name));
        if let Some(h) = hooks.pre_stop {
            run.pre_stop.lock().insert(id.clone(), h);
        }
        if let Some(h) = &hooks.post_start {
            // The container is not running for the pod until its postStart hook is done; a
            // failed hook kills it and the restart policy decides.
            let ip = run.report.lock().ip;
            if let Err(e) = tokio::time::timeout(Duration::from_secs(120), self.run_hook(&id, ip, h)).await.unwrap_or_else(|_| Err("timed out".into())) {
                tracing::info!(pod = %pod.key(), container = %c.name, error = %e, "postStart hook failed");
                self.kill(run, &id, Duration::from_secs(pod.grace as u64)).await;
                return Err(("PostStartHookError", format!("PostStartHookError: {e}")));
            }
        }
        let st = self.rt.container_state(&id).ok();
        run.slot(which, |s| {
            s.waiting = None;
            // An exit already seen stays; otherwise it runs.
            if !matches!(s.state, Some(ContainerState::Exited { .. })) {
                s.state = st;
            }
        });
        Ok((id, probes))
    }

    /// A ConfigMap or Secret changed: rewrite the volumes that show it (atomically, as
    /// upstream's AtomicWriter), so running containers see the new files.
    pub fn object_changed(&self, kind: &str, ns: &str, name: &str) {
        let Some(dir) = &self.node.pods_dir else { return };
        let field = if kind == "Secret" { "secretName" } else { "name" };
        let key = if kind == "Secret" { "secret" } else { "configMap" };
        let uses = |pod: &Value| {
            pod["spec"]["volumes"].as_array().into_iter().flatten().any(|v| {
                v[key][field] == name || v["projected"]["sources"].as_array().into_iter().flatten().any(|s| s[key]["name"] == name)
            })
        };
        let pods: Vec<(String, Arc<Value>, Option<Ipv4Addr>)> = self
            .pods
            .lock()
            .iter()
            .filter(|(k, _)| k.split_once('/').map(|(n, _)| n) == Some(ns))
            .filter_map(|(_, h)| h.volumes.lock().clone().map(|(p, ip)| (h.uid.to_string(), p, ip)))
            .filter(|(_, p, _)| uses(p))
            .collect();
        for (uid, pod, ip) in pods {
            if let Err(e) = crate::spec::prepare_volumes(&self.facts(&pod, ip), &self.node.objects, &dir.join(&uid)) {
                tracing::warn!(pod = %uid, error = %e, "volume refresh failed");
            }
        }
    }

    /// CPU and memory of every running container, by pod: (namespace, name, [(container,
    /// usage)]).
    pub fn usage(&self) -> Vec<(String, String, Vec<(String, crate::runtime::Usage)>)> {
        let handles: Vec<(String, Arc<Mutex<HashMap<String, Ids>>>)> = self.pods.lock().iter().map(|(k, h)| (k.clone(), h.containers.clone())).collect();
        let mut out = Vec::with_capacity(handles.len());
        for (key, ids) in handles {
            let cs: Vec<(String, crate::runtime::Usage)> = ids.lock().iter().filter_map(|(name, id)| self.rt.container_usage(&id.current).map(|u| (name.clone(), u))).collect();
            if cs.is_empty() {
                continue;
            }
            let (ns, name) = key.split_once('/').unwrap_or(("", &key));
            out.push((ns.to_string(), name.to_string(), cs));
        }
        out
    }

    /// After the first sync: removes what an earlier agent left for pods this node no
    /// longer has.
    pub async fn gc_adopted(&self) {
        let keep: std::collections::HashSet<String> = self.pods.lock().values().map(|h| h.uid.to_string()).collect();
        self.rt.gc_adopted(&keep).await;
    }

    /// Evicts a running pod (node pressure): its containers stop at once and it is
    /// reported Failed with reason Evicted and `message`.
    pub fn evict(&self, key: &str, message: String) -> bool {
        let g = self.pods.lock();
        let Some(h) = g.get(key) else { return false };
        if *h.ctl.borrow() != Ctl::Run {
            return false;
        }
        *h.evicted.lock() = Some(message);
        h.ctl.send(Ctl::Evict).is_ok()
    }

    /// Running pods with their QoS class, memory use and request (eviction ranking).
    pub fn eviction_candidates(&self) -> Vec<crate::eviction::Candidate> {
        let usage: HashMap<String, u64> = self.usage().into_iter().map(|(ns, n, cs)| (format!("{ns}/{n}"), cs.iter().map(|(_, u)| u.memory_bytes).sum())).collect();
        // Only pods with running containers: one still starting frees nothing.
        self.pods.lock().iter().filter(|(k, h)| *h.ctl.borrow() == Ctl::Run && usage.contains_key(*k)).map(|(k, h)| crate::eviction::Candidate { key: k.clone(), qos: h.qos.to_string(), memory_usage: usage[k], memory_request: h.memory_request }).collect()
    }

    /// The node's metrics (None on hollow nodes).
    pub fn metrics(&self) -> Option<&Arc<crate::metrics::NodeMetrics>> {
        self.metrics.as_ref()
    }

    /// Starts `cmd` on a terminal in a container of a pod (`kubectl exec -t`).
    pub async fn exec_tty(&self, ns: &str, pod: &str, container: &str, cmd: &[String]) -> Result<(i32, std::os::fd::OwnedFd), String> {
        let id = self.exec_target(ns, pod, container)?;
        self.rt.exec_tty(&id, cmd).await.map_err(|e| format!("unable to upgrade connection: {e}"))
    }

    fn exec_target(&self, ns: &str, pod: &str, container: &str) -> Result<String, String> {
        let key = format!("{ns}/{pod}");
        let ids = self.pods.lock().get(&key).map(|h| h.containers.clone()).ok_or_else(|| format!("pod {key} is not running on this node"))?;
        let ids = ids.lock();
        let name = if container.is_empty() { ids.keys().next().cloned().unwrap_or_default() } else { container.to_string() };
        ids.get(&name).map(|i| i.current.clone()).ok_or_else(|| format!("container {name} is not valid for pod {pod}"))
    }

    /// Starts `cmd` in a container of a pod (`kubectl exec`).
    pub fn exec(&self, ns: &str, pod: &str, container: &str, cmd: &[String], stdin: bool) -> Result<tokio::process::Child, String> {
        let id = self.exec_target(ns, pod, container)?;
        self.rt.exec(&id, cmd, stdin).map_err(|e| format!("unable to upgrade connection: {e}"))
    }

    /// Logs of a container of a pod (for the server's reverse requests), with upstream's
    /// messages when there is none.
    pub fn logs(&self, ns: &str, pod: &str, container: &str, previous: bool, o: &crate::logs::LogOptions) -> Result<Vec<u8>, String> {
        let id = self.log_target(ns, pod, container, previous)?;
        self.rt.logs(&id).map(|raw| crate::logs::render(&raw, o)).map_err(|e| e.to_string())
    }

    /// Follows a container's log (`logs -f`): what is there, rendered as `o` says, then each
    /// new record as it is written, until the container has exited and its log is drained
    /// or `out` is closed. Returns when done.
    pub async fn follow_logs(&self, ns: &str, pod: &str, container: &str, o: &crate::logs::LogOptions, out: tokio::sync::mpsc::Sender<(u32, Bytes)>) -> Result<(), String> {
        self.follow(ns, pod, container, Some(o), out).await
    }

    /// Attaches to a container's output (`kubectl attach`): what it writes from now on, as
    /// (stream, bytes) with stream 1 stdout and 2 stderr, until it exits.
    pub async fn attach(&self, ns: &str, pod: &str, container: &str, out: tokio::sync::mpsc::Sender<(u32, Bytes)>) -> Result<(), String> {
        self.follow(ns, pod, container, None, out).await
    }

    /// Follows a container's log file: rendered for `logs -f` (`o`), or raw records by
    /// stream from the end for attach (`None`).
    async fn follow(&self, ns: &str, pod: &str, container: &str, o: Option<&crate::logs::LogOptions>, out: tokio::sync::mpsc::Sender<(u32, Bytes)>) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let id = self.log_target(ns, pod, container, false)?;
        let Some(path) = self.rt.log_path(&id) else {
            // A runtime without log files: what there is, once.
            let raw = self.rt.logs(&id).map_err(|e| e.to_string())?;
            let _ = out.send((1, Bytes::from(crate::logs::render(&raw, o.unwrap_or(&Default::default()))))).await;
            return Ok(());
        };
        let mut f = tokio::fs::File::open(&path).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        // Only whole records; a partial last line waits for its end.
        let cut = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let mut pos = cut as u64;
        let emit = |chunk: &[u8]| -> Vec<(u32, Bytes)> {
            match o {
                Some(o) => vec![(1, Bytes::from(crate::logs::render(chunk, &crate::logs::LogOptions { timestamps: o.timestamps, ..Default::default() })))],
                None => crate::logs::records(chunk).into_iter().map(|(stream, partial, msg)| {
                    let mut m = msg.to_vec();
                    if !partial {
                        m.push(b'\n');
                    }
                    (if stream == "stderr" { 2 } else { 1 }, Bytes::from(m))
                }).collect(),
            }
        };
        if let Some(o) = o {
            if out.send((1, Bytes::from(crate::logs::render(&buf[..cut], o)))).await.is_err() {
                return Ok(());
            }
        }
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let exited = !matches!(self.rt.container_state(&id), Ok(ContainerState::Running { .. } | ContainerState::Created));
            f.seek(std::io::SeekFrom::Start(pos)).await.map_err(|e| e.to_string())?;
            let n = f.read(&mut chunk).await.map_err(|e| e.to_string())?;
            let whole = chunk[..n].iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            if whole > 0 {
                pos += whole as u64;
                for item in emit(&chunk[..whole]) {
                    if out.send(item).await.is_err() {
                        return Ok(());
                    }
                }
                continue;
            }
            // Rotated (the file was renamed and a new one started): follow the new one.
            use std::os::unix::fs::MetadataExt;
            let (now_ino, our_ino) = (tokio::fs::metadata(&path).await.map(|m| m.ino()).ok(), f.metadata().await.map(|m| m.ino()).ok());
            if now_ino.is_some() && now_ino != our_ino {
                f = tokio::fs::File::open(&path).await.map_err(|e| e.to_string())?;
                pos = 0;
                continue;
            }
            if exited || out.is_closed() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The runtime id of a pod's container (the previous one with `previous`).
    fn log_target(&self, ns: &str, pod: &str, container: &str, previous: bool) -> Result<String, String> {
        let key = format!("{ns}/{pod}");
        let ids = self.pods.lock().get(&key).map(|h| h.containers.clone()).ok_or_else(|| format!("pod {key} is not running on this node"))?;
        let ids = ids.lock();
        let name = if container.is_empty() {
            if ids.len() > 1 {
                let mut names: Vec<&String> = ids.keys().collect();
                names.sort();
                return Err(format!("a container name must be specified for pod {pod}, choose one of: {names:?}"));
            }
            ids.keys().next().cloned().ok_or_else(|| format!("container in pod {pod} has not started"))?
        } else {
            container.to_string()
        };
        let id = ids.get(&name).ok_or_else(|| format!("container {name} is not valid for pod {pod}"))?;
        let id = if previous { id.previous.as_ref().ok_or_else(|| format!("previous terminated container \"{name}\" in pod \"{pod}\" not found"))? } else { &id.current };
        Ok(id.clone())
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
        let node = Arc::new(NodeCtx::new("n1", "10.1.0.5", None));
        node.ipam.set_cidr("10.244.3.0/24");
        let outbox = Arc::new(Outbox::default());
        let m = PodManager::new(
            Arc::new(Sim::new(SimSettings::default())),
            node,
            outbox.clone(),
        );
        m.upsert(Pod::parse(&pod_json("u1", false), false).unwrap());
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
        m.upsert(Pod::parse(&pod_json("u1", true), false).unwrap());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = outbox.take(10);
        assert_eq!(b.gone.len(), 1);
        assert_eq!(&*b.gone[0].1, "u1");
        // Address returned to the pool.
        assert_eq!(m.node.ipam.allocate(), Some("10.244.3.2".parse().unwrap()));
    }

    #[test]
    fn reserved_addresses_are_never_handed_out() {
        let ipam = Ipam::default();
        ipam.reserve("10.0.3.2".parse().unwrap());
        ipam.set_cidr("10.0.3.0/24");
        assert_eq!(ipam.allocate(), Some("10.0.3.3".parse().unwrap()), "an address reserved before the range came stays taken");
        ipam.reserve("10.0.3.4".parse().unwrap());
        assert_eq!(ipam.allocate(), Some("10.0.3.5".parse().unwrap()));
        ipam.release("10.0.3.2".parse().unwrap());
        assert_eq!(ipam.allocate(), Some("10.0.3.2".parse().unwrap()));
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
