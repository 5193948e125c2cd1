//! The agent's side of the protocol: register with the bootstrap token, hold one session,
//! apply what the server sends to the pod manager, send batched statuses and heartbeats,
//! answer reverse requests, and come back after any failure with what it holds (so the
//! server sends only the difference and no status is lost).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{json, Value};
use shoal_proto::agent::node_agent_client::NodeAgentClient;
use shoal_proto::agent::{self as pb, agent_message, reverse_request, server_message};
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::pods::{now, NodeCtx, Outbox, Pod, PodManager};
use crate::runtime::Runtime;

/// How an agent joins and behaves.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    /// A bootstrap token (`ID.SECRET`) or the admin token.
    pub bootstrap_token: String,
    /// Labels of the Node created at registration.
    pub labels: serde_json::Map<String, Value>,
    /// Taints of the Node created at registration.
    pub taints: Vec<Value>,
    /// `status.capacity` (and allocatable): `{"cpu": "8", "memory": "32Gi", "pods": "110"}`.
    pub capacity: Value,
    /// The node's InternalIP.
    pub host_ip: String,
    /// Lease renewal period (upstream: 10 s).
    pub heartbeat: Duration,
    /// Node status is sent at least this often when nothing changed (upstream: 5 min).
    pub status_report: Duration,
    /// Pod statuses per batch.
    pub max_batch: usize,
    /// Where pods' volumes live (real nodes); None on hollow nodes.
    pub pods_dir: Option<std::path::PathBuf>,
    /// Metrics of a real node; None on hollow nodes.
    pub metrics: Option<Arc<crate::metrics::NodeMetrics>>,
    /// The node's service proxy: the agent asks for Services and EndpointSlices and hands
    /// them to it. None: services are not proxied here (hollow nodes, `--proxy-mode none`).
    pub proxy: Option<shoal_dataplane::ProxyHandle>,
}

impl AgentConfig {
    pub fn new(node_name: &str, bootstrap_token: &str) -> AgentConfig {
        AgentConfig {
            node_name: node_name.into(),
            bootstrap_token: bootstrap_token.into(),
            labels: Default::default(),
            taints: Vec::new(),
            capacity: json!({"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"}),
            host_ip: "127.0.0.1".into(),
            heartbeat: Duration::from_secs(10),
            status_report: Duration::from_secs(300),
            max_batch: 200,
            pods_dir: None,
            metrics: None,
            proxy: None,
        }
    }
}

/// Counters an agent (or a fleet of hollow nodes) exposes.
#[derive(Default, Debug)]
pub struct AgentStats {
    pub sessions: AtomicU64,
    pub objects: AtomicU64,
    pub statuses_sent: AtomicU64,
    pub status_errors: AtomicU64,
    pub heartbeats: AtomicU64,
}

/// (kind, namespace, name)
type ObjectId = (Arc<str>, Arc<str>, Arc<str>);

/// One node agent.
pub struct Agent<R: Runtime> {
    cfg: AgentConfig,
    channel: Channel,
    rt: Arc<R>,
    pub pods: Arc<PodManager<R>>,
    outbox: Arc<Outbox>,
    node: Arc<NodeCtx>,
    /// What the agent holds: (kind, namespace, name) → revision.
    known: Mutex<HashMap<ObjectId, i64>>,
    token: Mutex<Option<String>>,
    /// The server's view of this node's Ready condition is not True: send status now.
    status_due: AtomicBool,
    /// Wakes the session to send a heartbeat with status at once.
    status_now: tokio::sync::Notify,
    pub synced: AtomicBool,
    pub stats: Arc<AgentStats>,
    ready_since: i64,
    /// The image list's generation last reported in node status.
    images_gen: AtomicU64,
    /// The node's resource pressure (real nodes' housekeeping sets it).
    pressure: Mutex<crate::eviction::Pressure>,
    /// The current session's outbound messages (exec output goes there).
    replies: Mutex<Option<mpsc::Sender<pb::AgentMessage>>>,
    /// Running execs (and log follows): request id → their input.
    execs: Mutex<HashMap<u64, mpsc::Sender<Input>>>,
}

/// (machine ID, boot ID, kernel release) of this machine, read once: the thousands of
/// hollow nodes of one process share them.
fn machine_facts() -> &'static (String, String, String) {
    static F: std::sync::OnceLock<(String, String, String)> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
        (read("/etc/machine-id"), read("/proc/sys/kernel/random/boot_id"), read("/proc/sys/kernel/osrelease"))
    })
}

/// What the server sends a running exec.
enum Input {
    Data(Bytes),
    Close,
    Resize(u16, u16),
}

/// Resolves once `stop` is true (the guard `wait_for` returns is not `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Why a session ended.
enum End {
    Stop,
    Retry(String),
    Reregister(String),
}

impl<R: Runtime> Agent<R> {
    pub fn new(
        cfg: AgentConfig,
        channel: Channel,
        rt: Arc<R>,
        stats: Arc<AgentStats>,
    ) -> Arc<Agent<R>> {
        let node = Arc::new(NodeCtx::new(&cfg.node_name, &cfg.host_ip, cfg.pods_dir.clone()));
        for ip in rt.adopted_ips() {
            node.ipam.reserve(ip);
        }
        let outbox = Arc::new(Outbox::default());
        let pods = PodManager::with_metrics(rt.clone(), node.clone(), outbox.clone(), cfg.metrics.clone());
        Arc::new(Agent {
            cfg,
            channel,
            rt,
            pods,
            outbox,
            node,
            known: Mutex::new(HashMap::new()),
            token: Mutex::new(None),
            status_due: AtomicBool::new(true),
            status_now: tokio::sync::Notify::new(),
            synced: AtomicBool::new(false),
            stats,
            ready_since: now(),
            replies: Mutex::new(None),
            images_gen: AtomicU64::new(0),
            pressure: Mutex::new(Default::default()),
            execs: Mutex::new(HashMap::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.node_name
    }

    /// The revision of an object the agent holds (kind `Pod`, `ConfigMap`, `Secret`,
    /// `PersistentVolumeClaim`, `PersistentVolume`, `Node`), if it holds it.
    pub fn holds(&self, kind: &str, namespace: &str, name: &str) -> Option<i64> {
        self.known
            .lock()
            .get(&(Arc::from(kind), Arc::from(namespace), Arc::from(name)))
            .copied()
    }

    /// Statuses waiting to be sent or acknowledged.
    pub fn unsent(&self) -> usize {
        self.outbox.len()
    }

    fn node_object(&self) -> Value {
        let mut labels = self.cfg.labels.clone();
        for (k, v) in [
            ("kubernetes.io/hostname", self.cfg.node_name.as_str()),
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", "amd64"),
            ("beta.kubernetes.io/os", "linux"),
            ("beta.kubernetes.io/arch", "amd64"),
        ] {
            labels.entry(k.to_string()).or_insert(json!(v));
        }
        let mut n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.cfg.node_name, "labels": labels}, "spec": {}, "status": self.node_status()});
        if !self.cfg.taints.is_empty() {
            n["spec"]["taints"] = json!(self.cfg.taints);
        }
        n
    }

    fn node_status(&self) -> Value {
        let t = crate::pods::now();
        let ts = |s: i64| crate::pods::rfc3339(s);
        let cond = |ty: &str, st: &str, reason: &str, msg: &str| json!({"type": ty, "status": st, "reason": reason, "message": msg, "lastHeartbeatTime": ts(t), "lastTransitionTime": ts(self.ready_since)});
        // Largest first, at most 50, as the kubelet reports them (ImageLocality reads them).
        let mut imgs = self.rt.images();
        imgs.sort_by(|a, b| b.1.cmp(&a.1));
        imgs.truncate(50);
        let images: Vec<Value> = imgs.into_iter().map(|(names, size)| json!({"names": names, "sizeBytes": size})).collect();
        let (machine_id, boot_id, kernel) = machine_facts();
        let pressure = *self.pressure.lock();
        json!({
            "capacity": self.cfg.capacity,
            "allocatable": self.cfg.capacity,
            "conditions": [
                if pressure.memory { cond("MemoryPressure", "True", "KubeletHasInsufficientMemory", "kubelet has insufficient memory available") } else { cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available") },
                if pressure.disk { cond("DiskPressure", "True", "KubeletHasDiskPressure", "kubelet has disk pressure") } else { cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure") },
                if pressure.pid { cond("PIDPressure", "True", "KubeletHasInsufficientPID", "kubelet has insufficient PID available") } else { cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available") },
                if self.node.ipam.has_range() {
                    cond("Ready", "True", "KubeletReady", "kubelet is posting ready status")
                } else {
                    cond("Ready", "False", "KubeletNotReady", "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:the node has no spec.podCIDR yet")
                },
            ],
            "addresses": [{"type": "InternalIP", "address": self.node.host_ip.lock().clone()}, {"type": "Hostname", "address": self.cfg.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "images": images,
            "nodeInfo": {"machineID": machine_id, "systemUUID": "", "bootID": boot_id, "kernelVersion": kernel, "osImage": "Shoal", "containerRuntimeVersion": self.rt.version(), "kubeletVersion": "v1.35.0", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        })
    }

    async fn register(&self) -> Result<String, End> {
        let mut client = NodeAgentClient::new(self.channel.clone());
        let req = pb::RegisterRequest {
            bootstrap_token: self.cfg.bootstrap_token.clone(),
            node_name: self.cfg.node_name.clone(),
            node_json: Bytes::from(self.node_object().to_string()),
        };
        match client.register(req).await {
            Ok(r) => Ok(r.into_inner().node_token),
            Err(s)
                if s.code() == tonic::Code::Unauthenticated
                    || s.code() == tonic::Code::InvalidArgument =>
            {
                Err(End::Retry(format!("registration refused: {}", s.message())))
            }
            Err(s) => Err(End::Retry(format!("registration failed: {}", s.message()))),
        }
    }

    /// Runs until `stop` turns true: sessions, reconnecting with backoff.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            if *stop.borrow() {
                return;
            }
            let end = self.session(&mut stop).await;
            match end {
                End::Stop => return,
                End::Retry(why) => {
                    tracing::debug!(node = %self.cfg.node_name, %why, "agent session ended; reconnecting")
                }
                End::Reregister(why) => {
                    tracing::info!(node = %self.cfg.node_name, %why, "node credential refused; registering again");
                    *self.token.lock() = None;
                }
            }
            if self.synced.swap(false, Ordering::Relaxed) {
                backoff = Duration::from_millis(500);
            }
            // Jitter spreads thousands of agents reconnecting after a server restart.
            let jitter = Duration::from_millis(u64::from(
                self.cfg
                    .node_name
                    .bytes()
                    .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
                    % 500,
            ));
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                _ = stopped(&mut stop) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Usage of the node and its pods, for the metrics API.
    fn usage(&self) -> pb::Usage {
        let u = self.rt.usage();
        let pods = self
            .pods
            .usage()
            .into_iter()
            .map(|(namespace, name, cs)| pb::PodUsage {
                namespace,
                name,
                containers: cs
                    .into_iter()
                    .map(|(name, u)| pb::ContainerUsage {
                        name,
                        cpu_nanocores: u.cpu_nanocores,
                        memory_bytes: u.memory_bytes,
                    })
                    .collect(),
            })
            .collect();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        pb::Usage {
            timestamp_ms: now_ms,
            window_ms: self.cfg.heartbeat.as_millis() as u32,
            cpu_nanocores: u.cpu_nanocores,
            memory_bytes: u.memory_bytes,
            pods,
        }
    }

    fn hello(&self) -> pb::Hello {
        let known = self
            .known
            .lock()
            .iter()
            .map(|((k, ns, n), r)| pb::Known {
                kind: k.to_string(),
                namespace: ns.to_string(),
                name: n.to_string(),
                revision: *r,
            })
            .collect();
        pb::Hello { known, want_peers: self.rt.keeps_specs(), want_services: self.cfg.proxy.is_some() }
    }

    async fn session(self: &Arc<Self>, stop: &mut watch::Receiver<bool>) -> End {
        let cur = self.token.lock().clone();
        let token = match cur {
            Some(t) => t,
            None => match self.register().await {
                Ok(t) => {
                    *self.token.lock() = Some(t.clone());
                    t
                }
                Err(e) => return e,
            },
        };
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
        *self.replies.lock() = Some(tx.clone());
        let _ = tx.try_send(pb::AgentMessage {
            msg: Some(agent_message::Msg::Hello(self.hello())),
        });
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        match format!("Bearer {token}").parse() {
            Ok(v) => {
                req.metadata_mut().insert("authorization", v);
            }
            Err(_) => {
                return End::Reregister("the node credential is not a valid header value".into())
            }
        }
        let mut client =
            NodeAgentClient::new(self.channel.clone()).max_decoding_message_size(64 << 20);
        let mut inbound = match client.session(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                return End::Reregister(s.message().to_string())
            }
            Err(s) => return End::Retry(s.message().to_string()),
        };
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        self.status_due.store(true, Ordering::Relaxed);
        let mut seq = 0u64;
        let mut inflight: Option<(u64, crate::pods::Batch)> = None;
        let mut hb = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_millis(50),
            self.cfg.heartbeat,
        );
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = tokio::time::Instant::now();
        let end = loop {
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(m)) => {
                        if let Some(reply) = self.handle(m, &mut inflight) {
                            if tx.send(reply).await.is_err() { break End::Retry("session closed".into()) }
                        }
                    }
                    Ok(None) => break End::Retry("the server ended the session".into()),
                    Err(s) if s.code() == tonic::Code::Unauthenticated => break End::Reregister(s.message().to_string()),
                    Err(s) => break End::Retry(s.message().to_string()),
                },
                _ = self.outbox.notify.notified(), if inflight.is_none() => {
                    let b = self.outbox.take(self.cfg.max_batch);
                    if b.is_empty() { continue }
                    seq += 1;
                    let msg = pb::StatusBatch {
                        seq,
                        pods: b.statuses.iter().map(|(k, uid, s)| {
                            let (ns, name) = k.split_once('/').unwrap_or(("", k));
                            pb::PodStatus { namespace: ns.into(), name: name.into(), uid: uid.to_string(), status_json: s.clone() }
                        }).collect(),
                        gone: b.gone.iter().map(|(k, uid)| {
                            let (ns, name) = k.split_once('/').unwrap_or(("", k));
                            pb::PodGone { namespace: ns.into(), name: name.into(), uid: uid.to_string() }
                        }).collect(),
                    };
                    self.stats.statuses_sent.fetch_add(msg.pods.len() as u64, Ordering::Relaxed);
                    inflight = Some((seq, b));
                    if tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Status(msg)) }).await.is_err() { break End::Retry("session closed".into()) }
                }
                _ = self.node.events_ready.notified() => {
                    let events: Vec<pb::PodEvent> = std::mem::take(&mut *self.node.events.lock());
                    if !events.is_empty() && tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Events(pb::Events { events })) }).await.is_err() { break End::Retry("session closed".into()) }
                }
                _ = async { tokio::select! { _ = hb.tick() => {}, _ = self.status_now.notified() => {} } } => {
                    let images_gen = self.rt.images_generation();
                    let images_changed = images_gen != self.images_gen.swap(images_gen, Ordering::Relaxed);
                    let due = self.status_due.swap(false, Ordering::Relaxed) || images_changed || last_status.elapsed() >= self.cfg.status_report;
                    let node_status_json = if due { last_status = tokio::time::Instant::now(); Bytes::from(self.node_status().to_string()) } else { Bytes::new() };
                    self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                    let usage = Some(self.usage());
                    if tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Heartbeat(pb::Heartbeat { node_status_json, usage })) }).await.is_err() { break End::Retry("session closed".into()) }
                }
                _ = stopped(stop) => break End::Stop,
            }
        };
        if let Some((_, b)) = inflight.take() {
            self.outbox.put_back(b);
        }
        end
    }

    /// Applies one server message; returns a reply to send, if any.
    fn handle(
        self: &Arc<Self>,
        m: pb::ServerMessage,
        inflight: &mut Option<(u64, crate::pods::Batch)>,
    ) -> Option<pb::AgentMessage> {
        match m.msg? {
            server_message::Msg::Objects(o) => {
                for item in o.items {
                    self.stats.objects.fetch_add(1, Ordering::Relaxed);
                    self.object(item);
                }
                None
            }
            server_message::Msg::Synced(_) => {
                self.synced.store(true, Ordering::Relaxed);
                if self.pods.keeps_specs() {
                    let pods = self.pods.clone();
                    tokio::spawn(async move { pods.gc_adopted().await });
                }
                None
            }
            server_message::Msg::Ack(a) => {
                if inflight.as_ref().is_some_and(|(s, _)| *s == a.seq) {
                    let (_, batch) = inflight.take()?;
                    // Transient failures are retried; a pod that is gone or replaced is not.
                    let retry: Vec<&pb::StatusError> = a
                        .errors
                        .iter()
                        .filter(|e| e.code == 429 || e.code >= 500)
                        .collect();
                    self.stats
                        .status_errors
                        .fetch_add(a.errors.len() as u64, Ordering::Relaxed);
                    for e in &a.errors {
                        tracing::debug!(node = %self.cfg.node_name, pod = %format!("{}/{}", e.namespace, e.name), code = e.code, message = %e.message, "pod status not written");
                    }
                    if !retry.is_empty() {
                        let keep = |k: &str| {
                            retry
                                .iter()
                                .any(|e| k == format!("{}/{}", e.namespace, e.name))
                        };
                        let b = crate::pods::Batch {
                            statuses: batch
                                .statuses
                                .into_iter()
                                .filter(|(k, _, _)| keep(k))
                                .collect(),
                            gone: batch.gone.into_iter().filter(|(k, _)| keep(k)).collect(),
                        };
                        self.outbox.put_back(b);
                    } else if !self.outbox.is_empty() {
                        self.outbox.notify.notify_one();
                    }
                }
                None
            }
            server_message::Msg::Request(pb::ReverseRequest { id, request: Some(reverse_request::Request::Exec(e)) }) => {
                self.exec(id, e);
                None
            }
            server_message::Msg::Request(pb::ReverseRequest { id, request: Some(reverse_request::Request::Logs(l)) }) if l.follow => {
                self.follow(id, l);
                None
            }
            server_message::Msg::Request(r) => Some(self.reverse(r)),
            server_message::Msg::Cancel(c) => {
                // Dropping the input channel kills the exec'd process.
                self.execs.lock().remove(&c.id);
                None
            }
            server_message::Msg::Services(s) => {
                self.stats.objects.fetch_add(s.items.len() as u64, Ordering::Relaxed);
                if let Some(proxy) = &self.cfg.proxy {
                    let objects = s.items.into_iter().map(|o| shoal_dataplane::Object { kind: o.kind, namespace: o.namespace, name: o.name, json: o.json.to_vec() }).collect();
                    proxy.objects(objects, s.reset, s.synced);
                }
                None
            }
            server_message::Msg::Peers(p) => {
                self.rt.set_peers(p.peers.into_iter().map(|x| (x.name, x.pod_cidr, x.internal_ip)).collect(), p.full);
                None
            }
            server_message::Msg::Input(i) => {
                let tx = self.execs.lock().get(&i.id).cloned();
                if let Some(tx) = tx {
                    let m = if i.close {
                        Input::Close
                    } else if i.width > 0 && i.height > 0 {
                        Input::Resize(i.width.min(u16::MAX as u32) as u16, i.height.min(u16::MAX as u32) as u16)
                    } else {
                        Input::Data(i.data)
                    };
                    if tx.try_send(m).is_err() {
                        tracing::debug!(id = i.id, "exec input dropped (the process is not reading)");
                    }
                }
                None
            }
        }
    }

    fn object(&self, o: pb::Object) {
        let id = (
            Arc::<str>::from(o.kind.as_str()),
            Arc::<str>::from(o.namespace.as_str()),
            Arc::<str>::from(o.name.as_str()),
        );
        if o.json.is_empty() {
            self.known.lock().remove(&id);
            if o.kind == "Pod" {
                self.pods.remove(&format!("{}/{}", o.namespace, o.name));
            } else {
                self.node.objects.remove(&o.kind, &o.namespace, &o.name);
            }
            return;
        }
        {
            let mut k = self.known.lock();
            if k.get(&id).is_some_and(|r| *r >= o.revision) {
                return;
            }
            k.insert(id, o.revision);
        }
        match o.kind.as_str() {
            "ConfigMap" | "Secret" | "PersistentVolumeClaim" | "PersistentVolume" if self.pods.keeps_specs() => {
                match serde_json::from_slice::<Value>(&o.json) {
                    Ok(v) => {
                        self.node.objects.put(&o.kind, &o.namespace, &o.name, v);
                        if o.kind == "ConfigMap" || o.kind == "Secret" {
                            self.pods.object_changed(&o.kind, &o.namespace, &o.name);
                        }
                    }
                    Err(e) => tracing::warn!(kind = %o.kind, name = %o.name, error = %e, "object ignored"),
                }
            }
            "Pod" => match Pod::parse(&o.json, self.pods.keeps_specs()) {
                Ok(p) => self.pods.upsert(p),
                Err(e) => {
                    tracing::warn!(node = %self.cfg.node_name, pod = %o.name, error = %e, "pod ignored")
                }
            },
            "Node" => {
                let n: Value = serde_json::from_slice(&o.json).unwrap_or(Value::Null);
                if let Some(c) = n.pointer("/spec/podCIDR").and_then(Value::as_str) {
                    self.rt.set_pod_cidr(c);
                    let was = self.node.ipam.has_range();
                    self.node.ipam.set_cidr(c);
                    if !was && self.node.ipam.has_range() {
                        // The network just became ready: say so now, not at the next beat.
                        self.status_due.store(true, Ordering::Relaxed);
                        self.status_now.notify_one();
                    }
                }
                let ready = n
                    .pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                    .is_some_and(|c| c["status"] == "True");
                if !ready && self.node.ipam.has_range() {
                    // Someone (the node lifecycle controller, a restart) marked us not
                    // ready: say otherwise at the next heartbeat.
                    self.status_due.store(true, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }

    /// The kubelet's housekeeping, every `every` until `stop`: node pressure against the
    /// hard eviction thresholds, reported as node conditions at once when it changes;
    /// under disk pressure unused images go; under memory pressure one pod at a time is
    /// evicted (BestEffort first).
    pub async fn housekeeping(self: Arc<Self>, t: crate::eviction::Thresholds, data_dir: std::path::PathBuf, every: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped(&mut stop) => return,
            }
            let o = crate::eviction::Observed::read(&data_dir);
            let p = crate::eviction::pressure(&t, &o);
            let before = std::mem::replace(&mut *self.pressure.lock(), p);
            if before != p {
                tracing::info!(node = %self.cfg.node_name, memory = p.memory, disk = p.disk, pid = p.pid, available_memory = o.memory_available, available_disk = o.nodefs_available, "node pressure changed");
                self.status_due.store(true, Ordering::Relaxed);
                self.status_now.notify_one();
            }
            if p.disk {
                self.rt.gc_images().await;
            }
            if p.memory {
                let pods = self.pods.eviction_candidates();
                if let Some(v) = crate::eviction::victim(&pods) {
                    let th = match t.memory_available {
                        Some(crate::eviction::Amount::Bytes(b)) => format!("{}Ki", b / 1024),
                        Some(crate::eviction::Amount::Percent(x)) => format!("{x}%"),
                        None => String::new(),
                    };
                    let msg = format!("The node was low on resource: memory. Threshold quantity: {th}, available: {}Ki. Pod was using {}Ki, request is {}Ki.", o.memory_available / 1024, v.memory_usage / 1024, v.memory_request / 1024);
                    tracing::warn!(node = %self.cfg.node_name, pod = %v.key, %msg, "evicting a pod");
                    self.pods.evict(&v.key, msg);
                }
            }
        }
    }

    /// Runs an exec request: output goes back as replies on the session, input comes from
    /// `StreamInput` messages, the last reply carries the exit code.
    fn exec(self: &Arc<Self>, id: u64, e: pb::ExecRequest) {
        let Some(out) = self.replies.lock().clone() else { return };
        let reply = move |data: Bytes, stream: u32, done: bool, error: String, exit_code: i32| pb::AgentMessage { msg: Some(agent_message::Msg::Reply(pb::ReverseReply { id, data, done, error, stream, exit_code })) };
        if let Some(m) = self.pods.metrics() {
            m.execs.inc();
        }
        let (in_tx, mut in_rx) = mpsc::channel::<Input>(16);
        self.execs.lock().insert(id, in_tx);
        let me = self.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let code = if e.tty {
                // One terminal: its output is stdout; input, resizes and the exit as usual.
                let (pid, master) = match me.pods.exec_tty(&e.namespace, &e.pod, &e.container, &e.command).await {
                    Ok(x) => x,
                    Err(msg) => {
                        me.execs.lock().remove(&id);
                        let _ = out.send(reply(Bytes::new(), 0, true, msg, 0)).await;
                        return;
                    }
                };
                let file = std::fs::File::from(master);
                let resize = file.try_clone().ok();
                let (mut rd, mut wr) = match file.try_clone() {
                    Ok(w) => (tokio::fs::File::from_std(file), tokio::fs::File::from_std(w)),
                    Err(_) => return,
                };
                let mut buf = vec![0u8; 32 << 10];
                let mut in_open = true;
                loop {
                    tokio::select! {
                        // EIO once the last process on the terminal has gone.
                        n = rd.read(&mut buf) => match n {
                            Ok(n) if n > 0 => { if out.send(reply(Bytes::copy_from_slice(&buf[..n]), 1, false, String::new(), 0)).await.is_err() { break } }
                            _ => break,
                        },
                        i = in_rx.recv(), if in_open => match i {
                            Some(Input::Data(d)) => { let _ = wr.write_all(&d).await; let _ = wr.flush().await; }
                            Some(Input::Resize(w, h)) => {
                                if let Some(f) = &resize {
                                    let _ = rustix::termios::tcsetwinsize(f, rustix::termios::Winsize { ws_row: h, ws_col: w, ws_xpixel: 0, ws_ypixel: 0 });
                                }
                            }
                            // End of input on a terminal is its EOF character.
                            Some(Input::Close) => { let _ = wr.write_all(&[4]).await; in_open = false; }
                            None => {
                                if let Some(p) = rustix::process::Pid::from_raw(pid) {
                                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                                }
                                in_open = false;
                            }
                        },
                    }
                }
                crate::runtime::runc::wait_exit(pid).await
            } else {
                let mut child = match me.pods.exec(&e.namespace, &e.pod, &e.container, &e.command, e.stdin) {
                    Ok(c) => c,
                    Err(msg) => {
                        me.execs.lock().remove(&id);
                        let _ = out.send(reply(Bytes::new(), 0, true, msg, 0)).await;
                        return;
                    }
                };
                let mut stdin = child.stdin.take();
                let (Some(mut so), Some(mut se)) = (child.stdout.take(), child.stderr.take()) else { return };
                let (mut bo, mut be) = (vec![0u8; 32 << 10], vec![0u8; 32 << 10]);
                let (mut o_open, mut e_open) = (true, true);
                let mut in_open = true;
                while o_open || e_open {
                    tokio::select! {
                        n = so.read(&mut bo), if o_open => match n {
                            Ok(n) if n > 0 => { if out.send(reply(Bytes::copy_from_slice(&bo[..n]), 1, false, String::new(), 0)).await.is_err() { break } }
                            _ => o_open = false,
                        },
                        n = se.read(&mut be), if e_open => match n {
                            Ok(n) if n > 0 => { if out.send(reply(Bytes::copy_from_slice(&be[..n]), 2, false, String::new(), 0)).await.is_err() { break } }
                            _ => e_open = false,
                        },
                        i = in_rx.recv(), if in_open => match i {
                            Some(Input::Data(d)) => { if let Some(w) = stdin.as_mut() { let _ = w.write_all(&d).await; } }
                            Some(Input::Resize(..)) => {}
                            // End of input: close stdin.
                            Some(Input::Close) => { stdin = None; in_open = false; }
                            // The server cancelled.
                            None => { let _ = child.start_kill(); in_open = false; stdin = None; }
                        },
                    }
                }
                drop(stdin);
                match child.wait().await {
                    Ok(st) => st.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(9)),
                    Err(_) => 255,
                }
            };
            me.execs.lock().remove(&id);
            let _ = out.send(reply(Bytes::new(), 0, true, String::new(), code)).await;
        });
    }

    /// `logs -f`: streams the log as it grows; a cancel from the server stops it.
    fn follow(self: &Arc<Self>, id: u64, l: pb::LogsRequest) {
        let Some(out) = self.replies.lock().clone() else { return };
        let (cancel_tx, mut cancel_rx) = mpsc::channel::<Input>(1);
        self.execs.lock().insert(id, cancel_tx);
        let me = self.clone();
        tokio::spawn(async move {
            let o = crate::logs::LogOptions {
                tail: (l.tail_lines >= 0).then_some(l.tail_lines as usize),
                timestamps: l.timestamps,
                since_unix: (l.since_seconds > 0).then(|| now() - l.since_seconds),
                limit_bytes: None,
            };
            let (tx, mut rx) = mpsc::channel::<(u32, Bytes)>(16);
            let pods = me.pods.clone();
            let attach = l.attach;
            let follow = async move {
                if attach {
                    pods.attach(&l.namespace, &l.pod, &l.container, tx).await
                } else {
                    pods.follow_logs(&l.namespace, &l.pod, &l.container, &o, tx).await
                }
            };
            let reply = |data: Bytes, stream: u32, done: bool, error: String| pb::AgentMessage { msg: Some(agent_message::Msg::Reply(pb::ReverseReply { id, data, done, error, stream, ..Default::default() })) };
            let relay = async {
                // The first reply goes even when empty: it tells the server the log exists.
                let mut first = !attach;
                while let Some((stream, d)) = rx.recv().await {
                    if (first || !d.is_empty()) && out.send(reply(d, stream, false, String::new())).await.is_err() {
                        return;
                    }
                    first = false;
                }
            };
            let res = tokio::select! {
                (r, _) = async { tokio::join!(follow, relay) } => r,
                // The server cancelled (the client went away): the sender was dropped.
                _ = async { while cancel_rx.recv().await.is_some() {} } => Ok(()),
            };
            me.execs.lock().remove(&id);
            let _ = out.send(reply(Bytes::new(), 0, true, res.err().unwrap_or_default())).await;
        });
    }

    fn reverse(&self, r: pb::ReverseRequest) -> pb::AgentMessage {
        let (data, error) = match r.request {
            Some(reverse_request::Request::Logs(l)) => {
                let o = crate::logs::LogOptions {
                    tail: (l.tail_lines >= 0).then_some(l.tail_lines as usize),
                    timestamps: l.timestamps,
                    since_unix: (l.since_seconds > 0).then(|| now() - l.since_seconds),
                    limit_bytes: (l.limit_bytes > 0).then_some(l.limit_bytes as usize),
                };
                match self.pods.logs(&l.namespace, &l.pod, &l.container, l.previous, &o) {
                    Ok(d) => (Bytes::from(d), String::new()),
                    Err(e) => (Bytes::new(), e),
                }
            }
            Some(reverse_request::Request::Exec(_)) => (Bytes::new(), "exec is handled on its own".to_string()),
            Some(reverse_request::Request::Stats(_)) => {
                let u = self.rt.usage();
                (Bytes::from(json!({"node": {"nodeName": self.cfg.node_name, "cpu": {"usageNanoCores": u.cpu_nanocores}, "memory": {"workingSetBytes": u.memory_bytes}}, "pods": self.pods.count()}).to_string()), String::new())
            }
            None => (Bytes::new(), "unknown request".to_string()),
        };
        pb::AgentMessage {
            msg: Some(agent_message::Msg::Reply(pb::ReverseReply {
                id: r.id,
                data,
                done: true,
                error,
                ..Default::default()
            })),
        }
    }
}
