//! The server half of the agent protocol (`proto/agent.proto`): how 5,000 node agents stay
//! cheap for the control plane.
//!
//! - `Register` checks a bootstrap token (a `bootstrap.kubernetes.io/token` Secret in
//!   `kube-system`, as upstream; the admin token is accepted too), creates the Node if it is
//!   missing and answers a node credential: a JWT from the service-account signer naming
//!   `system:node:NAME`.
//! - `Session` is one bidirectional stream per node. The [`Hub`] (one task) follows pods,
//!   ConfigMaps, Secrets and Nodes in the watch cache and routes each change to the nodes it
//!   concerns (a node gets its own Node object too, for its podCIDR): per event O(nodes concerned), never O(nodes). A (re)connecting agent lists
//!   what it holds with revisions and gets only the difference, then `Synced`.
//! - Pod statuses arrive in batches and are written as `pods/status` updates (the pod must
//!   be bound to the session's node; a changed uid is a 409); `PodGone` deletes a pod whose
//!   containers stopped (grace 0, uid precondition). Heartbeats renew the node's Lease in
//!   `kube-node-lease` and write node status when the agent sends one.
//! - Reverse requests (logs, stats) go down the same stream; replies are routed back by id.
//!
//! Architecture Invariant: every message from an agent is checked here (identity, pod
//! ownership, JSON shape) and goes through the same REST code paths (validation,
//! admission) as a kubectl request would.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::{json, Value};
use shoal_proto::agent::node_agent_server::NodeAgent;
use shoal_proto::agent::{self as pb, agent_message, server_message};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};

use crate::backend::Backend;
use crate::cache::{Cache, Delivery, Entry};
use crate::meta;
use crate::resources::{self, ResourceDef};
use crate::rest::{self, Filter, Query, Target};
use crate::status::ApiError;
use crate::token::{Signer, ISSUER};

/// Audience of node credentials.
pub const NODE_AUDIENCE: &str = "shoal-agent";
/// How long a node credential is valid (a kubelet client certificate's default year).
pub const NODE_TOKEN_SECS: i64 = 365 * 24 * 3600;
/// Messages queued per session before the agent counts as too slow and is disconnected
/// (it reconnects and gets the difference).
const SESSION_QUEUE: usize = 1024;
/// Lease duration written for nodes (upstream's kubelet default).
const LEASE_SECS: i64 = 40;

/// Metrics of the agent protocol.
pub struct AgentMetrics {
    pub status_batch_seconds: Histogram,
    pub heartbeat_seconds: Histogram,
    pub sessions: Gauge,
    pub registrations: Counter,
    pub objects_sent: Counter,
    pub statuses: Counter,
    pub status_errors: Counter,
    pub heartbeats: Counter,
    pub slow_disconnects: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let h = || Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        AgentMetrics {
            status_batch_seconds: h(),
            heartbeat_seconds: h(),
            sessions: Gauge::default(),
            registrations: Counter::default(),
            objects_sent: Counter::default(),
            statuses: Counter::default(),
            status_errors: Counter::default(),
            heartbeats: Counter::default(),
            slow_disconnects: Counter::default(),
        }
    }
}

impl AgentMetrics {
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register("shoal_agent_status_batch_seconds", "Time to write one batch of pod statuses from an agent", self.status_batch_seconds.clone());
        reg.register("shoal_agent_heartbeat_seconds", "Time to record one heartbeat (Lease renewal, node status when sent)", self.heartbeat_seconds.clone());
        reg.register("shoal_agent_sessions", "Connected agent sessions", self.sessions.clone());
        reg.register("shoal_agent_registrations", "Nodes registered with a bootstrap token", self.registrations.clone());
        reg.register("shoal_agent_objects_sent", "Objects sent to agents (pods, configmaps, secrets; deletions included)", self.objects_sent.clone());
        reg.register("shoal_agent_pod_statuses", "Pod statuses received from agents", self.statuses.clone());
        reg.register("shoal_agent_pod_status_errors", "Pod statuses refused or failed", self.status_errors.clone());
        reg.register("shoal_agent_heartbeats", "Heartbeats received from agents", self.heartbeats.clone());
        reg.register("shoal_agent_slow_disconnects", "Sessions closed because the agent did not read fast enough", self.slow_disconnects.clone());
    }
}

type Out = mpsc::Sender<Result<pb::ServerMessage, Status>>;

/// The gRPC service.
pub struct AgentService {
    backend: Backend,
    cache: Arc<Cache>,
    signer: Arc<Signer>,
    admin_token: String,
    hub: Hub,
    metrics: Arc<AgentMetrics>,
    next_session: AtomicU64,
    next_request: AtomicU64,
    /// Reverse requests waiting for replies: id → where the replies go.
    pending: Arc<Mutex<HashMap<u64, mpsc::Sender<pb::ReverseReply>>>>,
    /// Correlates the events agents report (repeats become counts).
    events: shoal_client::events::Correlator,
    /// The latest usage of each node (the resource metrics API).
    pub usage: crate::resource_metrics::UsageTable,
}

fn def(plural: &str, group: &str, version: &str) -> &'static ResourceDef {
    resources::find(group, version, plural).expect("built-in resource")
}

fn api_status(e: ApiError) -> Status {
    let code = match e.code {
        400 | 422 => tonic::Code::InvalidArgument,
        401 => tonic::Code::Unauthenticated,
        403 => tonic::Code::PermissionDenied,
        404 => tonic::Code::NotFound,
        409 => tonic::Code::Aborted,
        429 => tonic::Code::ResourceExhausted,
        503 | 504 => tonic::Code::Unavailable,
        _ => tonic::Code::Internal,
    };
    Status::new(code, e.message)
}

/// Checks a bootstrap token against its Secret (upstream's format and rules).
pub fn check_bootstrap_token(cache: &Cache, token: &str, now: i64) -> Result<(), String> {
    let (id, secret) = token.split_once('.').ok_or("a bootstrap token has the form ID.SECRET")?;
    let ok = |s: &str, n| s.len() == n && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok(id, 6) || !ok(secret, 16) {
        return Err("a bootstrap token is [a-z0-9]{6}.[a-z0-9]{16}".into());
    }
    let e = cache.get(&format!("/registry/secrets/kube-system/bootstrap-token-{id}")).ok_or("unknown bootstrap token")?;
    let v = e.value();
    if v["type"] != "bootstrap.kubernetes.io/token" {
        return Err("unknown bootstrap token".into());
    }
    let field = |k: &str| v["data"][k].as_str().and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok()).map(|b| String::from_utf8_lossy(&b).into_owned());
    let have = field("token-secret").unwrap_or_default();
    if have.len() != secret.len() || have.bytes().zip(secret.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
        return Err("unknown bootstrap token".into());
    }
    if field("usage-bootstrap-authentication").as_deref() != Some("true") {
        return Err("the bootstrap token is not for authentication (usage-bootstrap-authentication)".into());
    }
    if let Some(exp) = field("expiration") {
        if meta::parse_time(&exp).is_none_or(|t| t <= now) {
            return Err("the bootstrap token has expired".into());
        }
    }
    Ok(())
}

/// Reads the cluster's bootstrap token from `dir/bootstrap-token`, creating one (and its
/// Secret) on first start. Returns the token.
pub async fn ensure_bootstrap_token(backend: &Backend, dir: &std::path::Path) -> Result<String, ApiError> {
    let path = dir.join("bootstrap-token");
    let token = match std::fs::read_to_string(&path) {
        Ok(t) => t.trim().to_string(),
        Err(_) => {
            const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
            let mut raw = [0u8; 22];
            getrandom::fill(&mut raw).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
            let s: String = raw.iter().map(|b| ALPHA[*b as usize % ALPHA.len()] as char).collect();
            let t = format!("{}.{}", &s[..6], &s[6..]);
            crate::tls::write_private(&path, &t).map_err(|e| ApiError::internal(e.to_string()))?;
            t
        }
    };
    let (id, secret) = token.split_once('.').ok_or_else(|| ApiError::internal(format!("{} is not a bootstrap token", path.display())))?;
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let obj = json!({"apiVersion": "v1", "kind": "Secret", "type": "bootstrap.kubernetes.io/token",
        "metadata": {"name": format!("bootstrap-token-{id}"), "namespace": "kube-system"},
        "data": {"token-id": b(id), "token-secret": b(secret), "usage-bootstrap-authentication": b("true"), "description": b("created by shoal server for joining agents")}});
    let t = Target { def: def("secrets", "", "v1"), ns: "kube-system", name: &format!("bootstrap-token-{id}"), sub: "" };
    match rest::create(backend, &t, obj, &Query::default()).await {
        Ok(_) => Ok(token),
        Err(e) if e.code == 409 => Ok(token),
        Err(e) => Err(e),
    }
}

impl AgentService {
    pub fn new(backend: Backend, cache: Arc<Cache>, signer: Arc<Signer>, admin_token: String, metrics: Arc<AgentMetrics>) -> AgentService {
        let hub = Hub::start(cache.clone(), metrics.clone());
        AgentService { backend, cache, signer, admin_token, hub, metrics, next_session: AtomicU64::new(1), next_request: AtomicU64::new(1), pending: Default::default(), usage: Default::default(), events: Default::default() }
    }

    /// The node a session's credential names.
    fn node_of(&self, md: &tonic::metadata::MetadataMap) -> Result<String, Status> {
        let h = md.get("authorization").and_then(|v| v.to_str().ok()).ok_or_else(|| Status::unauthenticated("no authorization: send `authorization: Bearer <node credential>` (from Register)"))?;
        let tok = h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")).ok_or_else(|| Status::unauthenticated("authorization must be a Bearer token"))?;
        let claims = self.signer.verify(tok.trim(), meta::now_secs()).ok_or_else(|| Status::unauthenticated("invalid or expired node credential; register again"))?;
        if claims["aud"].as_array().is_none_or(|a| !a.iter().any(|x| x == NODE_AUDIENCE)) {
            return Err(Status::unauthenticated("the credential is not a node credential"));
        }
        let node = claims["sub"].as_str().and_then(|s| s.strip_prefix("system:node:")).ok_or_else(|| Status::unauthenticated("the credential names no node"))?;
        Ok(node.to_string())
    }

    /// Sends a reverse request to a node's agent; replies arrive on the returned receiver
    /// (dropping it cancels the request). None: the node has no session.
    pub fn request(&self, node: &str, req: pb::reverse_request::Request) -> Option<mpsc::Receiver<pb::ReverseReply>> {
        self.request_with_id(node, req).map(|(_, rx)| rx)
    }

    /// Sends standard input (or a terminal resize) to a running exec request (`close`
    /// ends the input); false when the node's session is gone.
    pub async fn input(&self, node: &str, input: pb::StreamInput) -> bool {
        let Some(out) = self.hub.session_out(node) else { return false };
        out.send(Ok(pb::ServerMessage { msg: Some(server_message::Msg::Input(input)) })).await.is_ok()
    }

    /// As [`Self::request`], also returning the request's id (for [`Self::input`]).
    pub fn request_with_id(&self, node: &str, req: pb::reverse_request::Request) -> Option<(u64, mpsc::Receiver<pb::ReverseReply>)> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(64);
        let out = self.hub.session_out(node)?;
        self.pending.lock().insert(id, tx.clone());
        let msg = pb::ServerMessage { msg: Some(server_message::Msg::Request(pb::ReverseRequest { id, request: Some(req) })) };
        if out.try_send(Ok(msg)).is_err() {
            self.pending.lock().remove(&id);
            return None;
        }
        // When the caller drops the receiver before the last reply, tell the agent to stop.
        let pending = self.pending.clone();
        tokio::spawn(async move {
            tx.closed().await;
            if pending.lock().remove(&id).is_some() {
                let _ = out.try_send(Ok(pb::ServerMessage { msg: Some(server_message::Msg::Cancel(pb::Cancel { id })) }));
            }
        });
        Some((id, rx))
    }

    /// Records an event an agent reports about one of its pods, correlated as client-go's
    /// recorder does (repeats bump `count`); best effort, as events are.
    async fn record_event(&self, node: &str, e: &pb::PodEvent) {
        let key = format!("/registry/pods/{}/{}", e.namespace, e.pod);
        if self.check_owner(node, &key, &e.pod).is_err() || !matches!(e.r#type.as_str(), "Normal" | "Warning") || e.reason.is_empty() || e.reason.len() > 128 || e.message.len() > 4096 {
            return;
        }
        let object = format!("Pod/v1/{}/{}/{}/{}", e.namespace, e.pod, e.uid, e.field_path);
        let component = "kubelet";
        let now = shoal_client::time::format(meta::now_secs());
        let t = |name: &'static str| Target { def: def("events", "", "v1"), ns: &e.namespace, name, sub: "" };
        match self.events.decide(&object, &e.r#type, &e.reason, &e.message, component, std::time::Instant::now()) {
            shoal_client::events::Action::Bump { name, count, message } => {
                let tt = Target { def: def("events", "", "v1"), ns: &e.namespace, name: &name, sub: "" };
                if let Ok(mut cur) = rest::get(&self.backend, &tt).await {
                    cur["count"] = json!(count);
                    cur["lastTimestamp"] = json!(now);
                    cur["message"] = json!(message);
                    if rest::update(&self.backend, &tt, cur, &Query::default()).await.is_ok() {
                        return;
                    }
                }
                self.events.forget(&object, &e.r#type, &e.reason, &message, component);
            }
            shoal_client::events::Action::Create(message) => {
                let mut involved = json!({"apiVersion": "v1", "kind": "Pod", "name": e.pod, "namespace": e.namespace, "uid": e.uid});
                if !e.field_path.is_empty() {
                    involved["fieldPath"] = json!(e.field_path);
                }
                let ev = json!({
                    "apiVersion": "v1", "kind": "Event",
                    "metadata": {"generateName": format!("{}.", e.pod), "namespace": e.namespace},
                    "involvedObject": involved,
                    "reason": e.reason, "message": message, "type": e.r#type,
                    "source": {"component": component, "host": node},
                    "firstTimestamp": now, "lastTimestamp": now, "count": 1,
                    "reportingComponent": component, "reportingInstance": node,
                });
                match rest::create(&self.backend, &t(""), ev, &Query::default()).await {
                    Ok((_, v)) => self.events.created(&object, &e.r#type, &e.reason, &message, component, v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("")),
                    Err(err) => {
                        self.events.forget(&object, &e.r#type, &e.reason, &message, component);
                        tracing::debug!(%node, error = %err.message, "agent event not recorded");
                    }
                }
            }
        }
    }

    async fn write_status(&self, node: &str, s: &pb::PodStatus) -> Result<(), ApiError> {
        let key = format!("/registry/pods/{}/{}", s.namespace, s.name);
        self.check_owner(node, &key, &s.name)?;
        let status: Value = serde_json::from_slice(&s.status_json).map_err(|e| ApiError::bad_request(format!("status_json: {e}")))?;
        if !status.is_object() {
            return Err(ApiError::bad_request("status_json must be a JSON object"));
        }
        let obj = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": s.name, "namespace": s.namespace, "uid": s.uid}, "status": status});
        let t = Target { def: def("pods", "", "v1"), ns: &s.namespace, name: &s.name, sub: "status" };
        let mut q = Query::default();
        q.0.insert("fieldManager".into(), "shoal-agent".into());
        rest::update(&self.backend, &t, obj, &q).await.map(|_| ())
    }

    /// A node may only touch the pods bound to it.
    fn check_owner(&self, node: &str, key: &str, name: &str) -> Result<(), ApiError> {
        match self.cache.get(key) {
            None => Err(ApiError::not_found(crate::status::Gr { group: "", resource: "pods" }, name)),
            Some(e) if e.field_str("spec.nodeName") != Some(node) => Err(ApiError::new(403, "Forbidden", format!("node \"{node}\" can only update pods bound to it; pod \"{name}\" is not"))),
            Some(_) => Ok(()),
        }
    }

    async fn pod_gone(&self, node: &str, g: &pb::PodGone) -> Result<(), ApiError> {
        let key = format!("/registry/pods/{}/{}", g.namespace, g.name);
        self.check_owner(node, &key, &g.name)?;
        let t = Target { def: def("pods", "", "v1"), ns: &g.namespace, name: &g.name, sub: "" };
        let body = json!({"gracePeriodSeconds": 0, "preconditions": {"uid": g.uid}}).to_string();
        match rest::delete(&self.backend, &t, body.as_bytes(), &Query::default()).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn status_batch(&self, node: &str, b: pb::StatusBatch) -> pb::StatusAck {
        let mut errors = Vec::new();
        let writes = b.pods.iter().map(|s| async move { (s, self.write_status(node, s).await) });
        for (s, r) in futures::future::join_all(writes).await {
            self.metrics.statuses.inc();
            if let Err(e) = r {
                self.metrics.status_errors.inc();
                errors.push(pb::StatusError { namespace: s.namespace.clone(), name: s.name.clone(), code: e.code as i32, message: e.message });
            }
        }
        for g in &b.gone {
            if let Err(e) = self.pod_gone(node, g).await {
                errors.push(pb::StatusError { namespace: g.namespace.clone(), name: g.name.clone(), code: e.code as i32, message: e.message });
            }
        }
        pb::StatusAck { seq: b.seq, errors }
    }

    async fn heartbeat(&self, node: &str, h: pb::Heartbeat) -> Result<(), ApiError> {
        self.metrics.heartbeats.inc();
        if let Some(u) = h.usage {
            self.usage.put(node, u);
        }
        let now = meta::now_micro_time();
        let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECS, "renewTime": now}});
        let t = Target { def: def("leases", "coordination.k8s.io", "v1"), ns: "kube-node-lease", name: node, sub: "" };
        let mut q = Query::default();
        q.0.insert("fieldManager".into(), "shoal-agent".into());
        // Fast path: renew from the watch cache's copy with a revision compare (one store
        // write, no linearizable read); a lost race falls back to a full update.
        let key = t.def.key(t.ns, t.name);
        let renewed = match self.cache.get(&key) {
            Some(e) => {
                let mut cur = e.value();
                if cur.pointer("/spec/holderIdentity").and_then(Value::as_str) == Some(node) {
                    cur["spec"]["renewTime"] = json!(now);
                    cur["spec"]["leaseDurationSeconds"] = json!(LEASE_SECS);
                    if let Some(m) = cur.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove("resourceVersion");
                    }
                    rest::put_if_unchanged(&self.backend, &key, e.mod_rev, &cur).await?
                } else {
                    false
                }
            }
            None => false,
        };
        match if renewed { Ok((200, Value::Null)) } else { rest::update(&self.backend, &t, lease.clone(), &q).await } {
            Ok(_) => {}
            Err(e) if e.code == 404 => {
                let mut lease = lease;
                if let Some(n) = self.cache.get(&def("nodes", "", "v1").key("", node)) {
                    let uid = n.value().pointer("/metadata/uid").cloned().unwrap_or(Value::Null);
                    lease["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}]);
                }
                match rest::create(&self.backend, &t, lease, &q).await {
                    Ok(_) => {}
                    Err(e) if e.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
        if !h.node_status_json.is_empty() {
            let status: Value = serde_json::from_slice(&h.node_status_json).map_err(|e| ApiError::bad_request(format!("node_status_json: {e}")))?;
            if !status.is_object() {
                return Err(ApiError::bad_request("node_status_json must be a JSON object"));
            }
            let t = Target { def: def("nodes", "", "v1"), ns: "", name: node, sub: "status" };
            rest::update(&self.backend, &t, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}, "status": status}), &q).await?;
        }
        Ok(())
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send + 'static>>;

/// The tonic service of [`AgentService`].
#[derive(Clone)]
pub struct AgentGrpc(pub Arc<AgentService>);

impl std::ops::Deref for AgentGrpc {
    type Target = AgentService;
    fn deref(&self) -> &AgentService {
        &self.0
    }
}

#[tonic::async_trait]
impl NodeAgent for AgentGrpc {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        let now = meta::now_secs();
        let admin = !self.admin_token.is_empty() && r.bootstrap_token.len() == self.admin_token.len() && r.bootstrap_token.bytes().zip(self.admin_token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
        if !admin {
            check_bootstrap_token(&self.cache, &r.bootstrap_token, now).map_err(Status::unauthenticated)?;
        }
        let errs = meta::dns1123_subdomain(&r.node_name);
        if !errs.is_empty() {
            return Err(Status::invalid_argument(format!("node_name {:?}: {}", r.node_name, errs.join("; "))));
        }
        let mut node: Value = if r.node_json.is_empty() { json!({}) } else { serde_json::from_slice(&r.node_json).map_err(|e| Status::invalid_argument(format!("node_json: {e}")))? };
        if !node.is_object() {
            return Err(Status::invalid_argument("node_json must be a JSON object (a v1 Node)"));
        }
        match node.pointer("/metadata/name").and_then(Value::as_str) {
            Some(n) if n != r.node_name => return Err(Status::invalid_argument(format!("node_json names node {n:?}, not {:?}", r.node_name))),
            _ => {}
        }
        node["apiVersion"] = json!("v1");
        node["kind"] = json!("Node");
        node["metadata"]["name"] = json!(r.node_name);
        let t = Target { def: def("nodes", "", "v1"), ns: "", name: &r.node_name, sub: "" };
        let mut q = Query::default();
        q.0.insert("fieldManager".into(), "shoal-agent".into());
        match rest::create(&self.backend, &t, node, &q).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(api_status(e)),
        }
        let claims = json!({"iss": ISSUER, "sub": format!("system:node:{}", r.node_name), "aud": [NODE_AUDIENCE], "iat": now, "nbf": now, "exp": now + NODE_TOKEN_SECS,
            "groups": ["system:nodes", "system:authenticated"]});
        let tok = self.signer.sign(&claims).map_err(api_status)?;
        self.metrics.registrations.inc();
        tracing::info!(node = %r.node_name, "node registered");
        Ok(Response::new(pb::RegisterResponse { node_token: tok, node_name: r.node_name, expires_unix: now + NODE_TOKEN_SECS }))
    }

    type SessionStream = SessionStream;

    async fn session(&self, req: Request<Streaming<pb::AgentMessage>>) -> Result<Response<SessionStream>, Status> {
        let node = self.node_of(req.metadata())?;
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::AgentMessage { msg: Some(agent_message::Msg::Hello(h)) }) => h,
            Some(_) => return Err(Status::invalid_argument("the first message of a session must be hello")),
            None => return Err(Status::cancelled("the agent closed the session before hello")),
        };
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let mut known = HashMap::with_capacity(hello.known.len());
        for k in hello.known {
            let Some(key) = store_key(&k.kind, &k.namespace, &k.name) else {
                return Err(Status::invalid_argument(format!("hello: unknown kind {:?}", k.kind)));
            };
            known.insert(key, k.revision);
        }
        self.hub.send(HubMsg::Attach { node: node.clone(), id, known, out: tx.clone(), kill: kill_tx, peers: hello.want_peers, services: hello.want_services });
        self.metrics.sessions.inc();
        tracing::debug!(%node, id, "agent session opened");
        let svc = self.0.clone();
        tokio::spawn(async move {
            // Status batches are applied in order, one at a time per session (the store
            // group-commits across sessions).
            loop {
                let m = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(%node, error = %e, "agent session read failed");
                        break;
                    }
                };
                match m.msg {
                    Some(agent_message::Msg::Status(b)) => {
                        let t = std::time::Instant::now();
                        let ack = svc.status_batch(&node, b).await;
                        svc.metrics.status_batch_seconds.observe(t.elapsed().as_secs_f64());
                        if tx.send(Ok(pb::ServerMessage { msg: Some(server_message::Msg::Ack(ack)) })).await.is_err() {
                            break;
                        }
                    }
                    Some(agent_message::Msg::Heartbeat(h)) => {
                        let t = std::time::Instant::now();
                        if let Err(e) = svc.heartbeat(&node, h).await {
                            tracing::warn!(%node, error = %e.message, "heartbeat not recorded");
                        }
                        svc.metrics.heartbeat_seconds.observe(t.elapsed().as_secs_f64());
                    }
                    Some(agent_message::Msg::Events(ev)) => {
                        for e in ev.events.iter().take(256) {
                            svc.record_event(&node, e).await;
                        }
                    }
                    Some(agent_message::Msg::Reply(r)) => {
                        let done = r.done;
                        let dest = svc.pending.lock().get(&r.id).cloned();
                        if let Some(d) = dest {
                            if d.send(r.clone()).await.is_err() || done {
                                svc.pending.lock().remove(&r.id);
                            }
                        }
                    }
                    Some(agent_message::Msg::Hello(_)) => {
                        let _ = tx.send(Err(Status::invalid_argument("hello may only be the first message"))).await;
                        break;
                    }
                    None => {}
                }
            }
            svc.hub.send(HubMsg::Detach { node: node.clone(), id });
            svc.metrics.sessions.dec();
            tracing::debug!(%node, id, "agent session closed");
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).take_until(kill_rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The store key of an object an agent may hold.
fn store_key(kind: &str, ns: &str, name: &str) -> Option<String> {
    let d = match kind {
        "Node" => def("nodes", "", "v1"),
        "Pod" => def("pods", "", "v1"),
        "ConfigMap" => def("configmaps", "", "v1"),
        "Secret" => def("secrets", "", "v1"),
        "PersistentVolumeClaim" => def("persistentvolumeclaims", "", "v1"),
        "PersistentVolume" => def("persistentvolumes", "", "v1"),
        _ => return None,
    };
    Some(d.key(ns, name))
}

const SERVICES_PREFIX: &str = "/registry/services/specs/";
const SLICES_PREFIX: &str = "/registry/endpointslices/";
const NAMESPACES_PREFIX: &str = "/registry/namespaces/";
const NETPOL_PREFIX: &str = "/registry/networkpolicies/";
/// Objects per message of a services snapshot (well under the 4 MiB gRPC message limit).
const SERVICES_CHUNK: usize = 500;

fn kind_of_key(key: &str) -> &'static str {
    if key.starts_with(SERVICES_PREFIX) {
        "Service"
    } else if key.starts_with(SLICES_PREFIX) {
        "EndpointSlice"
    } else if key.starts_with(NAMESPACES_PREFIX) {
        "Namespace"
    } else if key.starts_with(NETPOL_PREFIX) {
        "NetworkPolicy"
    } else if key.starts_with("/registry/minions/") {
        "Node"
    } else if key.starts_with("/registry/pods/") {
        "Pod"
    } else if key.starts_with("/registry/configmaps/") {
        "ConfigMap"
    } else if key.starts_with("/registry/persistentvolumeclaims/") {
        "PersistentVolumeClaim"
    } else if key.starts_with("/registry/persistentvolumes/") {
        "PersistentVolume"
    } else {
        "Secret"
    }
}

/// ConfigMaps, Secrets and PersistentVolumeClaims a pod uses (volumes, projected sources,
/// env, envFrom, image pull secrets, claims and generic ephemeral volumes' claims), as
/// store keys. (A claim's PersistentVolume follows the claim: see `Hub`.)
pub fn pod_refs(pod: &Value) -> Vec<String> {
    let ns = pod.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    let mut out = HashSet::new();
    let mut add = |kind: &str, name: Option<&Value>| {
        if let Some(n) = name.and_then(Value::as_str).filter(|n| !n.is_empty()) {
            out.insert(format!("/registry/{kind}/{ns}/{n}"));
        }
    };
    let spec = &pod["spec"];
    let pod_name = pod.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    for v in spec["volumes"].as_array().into_iter().flatten() {
        add("persistentvolumeclaims", v.pointer("/persistentVolumeClaim/claimName"));
        if v.get("ephemeral").is_some() {
            let claim = Value::String(format!("{pod_name}-{}", v["name"].as_str().unwrap_or("")));
            add("persistentvolumeclaims", Some(&claim));
        }
        add("configmaps", v.pointer("/configMap/name"));
        add("secrets", v.pointer("/secret/secretName"));
        for s in v.pointer("/projected/sources").and_then(Value::as_array).into_iter().flatten() {
            add("configmaps", s.pointer("/configMap/name"));
            add("secrets", s.pointer("/secret/name"));
        }
    }
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            for e in c["env"].as_array().into_iter().flatten() {
                add("configmaps", e.pointer("/valueFrom/configMapKeyRef/name"));
                add("secrets", e.pointer("/valueFrom/secretKeyRef/name"));
            }
            for e in c["envFrom"].as_array().into_iter().flatten() {
                add("configmaps", e.pointer("/configMapRef/name"));
                add("secrets", e.pointer("/secretRef/name"));
            }
        }
    }
    for s in spec["imagePullSecrets"].as_array().into_iter().flatten() {
        add("secrets", s.get("name"));
    }
    let mut v: Vec<String> = out.into_iter().collect();
    v.sort();
    v
}

/// The store key of the PersistentVolume a claim is bound to.
fn volume_of_claim(e: &Entry) -> Option<String> {
    let v = e.value();
    let pv = v.pointer("/spec/volumeName").and_then(Value::as_str).filter(|n| !n.is_empty())?;
    Some(def("persistentvolumes", "", "v1").key("", pv))
}

enum HubMsg {
    Attach { node: String, id: u64, known: HashMap<String, i64>, out: Out, kill: oneshot::Sender<()>, peers: bool, services: bool },
    Detach { node: String, id: u64 },
}

struct Conn {
    id: u64,
    out: Out,
    kill: Option<oneshot::Sender<()>>,
    /// What the agent holds: store key → revision.
    sent: HashMap<String, i64>,
    /// The agent wants other nodes' pod ranges (real nodes route between them).
    peers: bool,
}

#[derive(Default)]
struct NodeRec {
    pods: HashSet<String>,
    /// ConfigMap/Secret key → number of this node's pods using it.
    refs: HashMap<String, u32>,
    conn: Option<Conn>,
}

struct PodRec {
    node: String,
    refs: Vec<String>,
}

/// Routes changes to the nodes they concern (see the module documentation).
#[derive(Clone)]
pub struct Hub {
    tx: mpsc::UnboundedSender<HubMsg>,
    /// Each connected node's outgoing queue (for reverse requests from any executor).
    outs: Arc<Mutex<HashMap<String, Out>>>,
}

struct HubState {
    cache: Arc<Cache>,
    metrics: Arc<AgentMetrics>,
    pods: HashMap<String, PodRec>,
    nodes: HashMap<String, NodeRec>,
    /// ConfigMap/Secret/claim/volume key → nodes with a pod using it.
    users: HashMap<String, HashSet<String>>,
    /// Claim key → the key of the PersistentVolume it is bound to (for claims in use).
    claim_volume: HashMap<String, String>,
    outs: Arc<Mutex<HashMap<String, Out>>>,
    /// Objects to send, per node, flushed after each burst of changes.
    pending: HashMap<String, Vec<pb::Object>>,
    /// While the state is rebuilt nothing is queued: connected nodes get a diff after.
    rebuilding: bool,
    /// Each node's (podCIDR, InternalIP), for agents that route between nodes.
    peer_info: HashMap<String, (String, String)>,
    /// Connected nodes that asked for peers (hollow nodes do not: O(routing nodes) per change).
    routing: HashSet<String>,
    /// Connected nodes that proxy services: every Service and EndpointSlice change goes to
    /// each of them (as upstream, where every kube-proxy watches them all).
    proxying: HashSet<String>,
    /// Service and EndpointSlice changes of the current burst, for `proxying` nodes.
    pending_services: Vec<pb::Object>,
    /// Pod key → what `proxying` nodes were last sent of it (`policy_pod`): a pod change
    /// that policy does not see (status, most of them) is not sent.
    policy_pods: HashMap<String, Vec<u8>>,
}

impl Hub {
    fn start(cache: Arc<Cache>, metrics: Arc<AgentMetrics>) -> Hub {
        let (tx, rx) = mpsc::unbounded_channel();
        let outs: Arc<Mutex<HashMap<String, Out>>> = Default::default();
        let st = HubState { cache, metrics, pods: HashMap::new(), nodes: HashMap::new(), users: HashMap::new(), claim_volume: HashMap::new(), outs: outs.clone(), pending: HashMap::new(), rebuilding: false, peer_info: HashMap::new(), routing: HashSet::new(), proxying: HashSet::new(), pending_services: Vec::new(), policy_pods: HashMap::new() };
        std::thread::Builder::new()
            .name("api-agents".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("building the agent hub executor");
                rt.block_on(st.run(rx));
            })
            .expect("spawning the agent hub thread");
        Hub { tx, outs }
    }

    fn send(&self, m: HubMsg) {
        let _ = self.tx.send(m);
    }

    fn session_out(&self, node: &str) -> Option<Out> {
        self.outs.lock().get(node).cloned()
    }
}

/// A node's (podCIDR, InternalIP), when it has both.
fn peer_of(e: &Entry) -> Option<(String, String)> {
    let v = e.value();
    let cidr = v.pointer("/spec/podCIDR")?.as_str()?.to_string();
    let ip = v.pointer("/status/addresses")?.as_array()?.iter().find(|a| a["type"] == "InternalIP")?["address"].as_str()?.to_string();
    Some((cidr, ip))
}

fn object(key: &str, e: Option<&Entry>, rev: i64) -> pb::Object {
    let rest = match key.strip_prefix(SERVICES_PREFIX) {
        Some(rest) => rest,
        None => key.splitn(4, '/').nth(3).unwrap_or(""),
    };
    let (ns, name) = if matches!(kind_of_key(key), "Node" | "PersistentVolume" | "Namespace") { ("", rest) } else { rest.split_once('/').unwrap_or(("", rest)) };
    pb::Object { kind: kind_of_key(key).into(), namespace: ns.into(), name: name.into(), revision: e.map_or(rev, |e| e.mod_rev), json: e.map(Entry::json).unwrap_or_default() }
}

/// What a proxying agent's network policy needs of a pod: labels, node, address, named
/// ports (its whole JSON would send every node every pod status change).
fn policy_pod(e: &Entry) -> Vec<u8> {
    let v = e.value();
    let containers: Vec<Value> = v.pointer("/spec/containers").and_then(Value::as_array).into_iter().flatten().map(|c| {
        let ports: Vec<Value> = c.get("ports").and_then(Value::as_array).into_iter().flatten().filter(|p| p.get("name").is_some()).map(|p| serde_json::json!({"name": p["name"], "containerPort": p["containerPort"], "protocol": p["protocol"]})).collect();
        serde_json::json!({"ports": ports})
    }).collect();
    let slim = serde_json::json!({
        "metadata": {"labels": v.pointer("/metadata/labels")},
        "spec": {"nodeName": v.pointer("/spec/nodeName"), "hostNetwork": v.pointer("/spec/hostNetwork"), "containers": containers},
        "status": {"podIP": v.pointer("/status/podIP")},
    });
    serde_json::to_vec(&slim).unwrap_or_default()
}

impl HubState {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<HubMsg>) {
        let pods_def = def("pods", "", "v1");
        let filter = |d: &ResourceDef| Filter::from_query(d, &Query::default()).expect("an empty selector is valid");
        loop {
            // (Re)build from the cache: pods, then changes of pods, configmaps and secrets.
            let subs = (|| {
                let (p, initial, _, _) = self.cache.subscribe("/registry/pods/", &filter(pods_def), None)?;
                let (c, _, _, _) = self.cache.subscribe("/registry/configmaps/", &filter(def("configmaps", "", "v1")), Some(self.cache.revision()))?;
                let (s, _, _, _) = self.cache.subscribe("/registry/secrets/", &filter(def("secrets", "", "v1")), Some(self.cache.revision()))?;
                let (n, nodes, _, _) = self.cache.subscribe("/registry/minions/", &filter(def("nodes", "", "v1")), None)?;
                let (pvc, _, _, _) = self.cache.subscribe("/registry/persistentvolumeclaims/", &filter(def("persistentvolumeclaims", "", "v1")), Some(self.cache.revision()))?;
                let (pv, _, _, _) = self.cache.subscribe("/registry/persistentvolumes/", &filter(def("persistentvolumes", "", "v1")), Some(self.cache.revision()))?;
                let (svc, _, _, _) = self.cache.subscribe(SERVICES_PREFIX, &filter(def("services", "", "v1")), Some(self.cache.revision()))?;
                let (eps, _, _, _) = self.cache.subscribe(SLICES_PREFIX, &filter(def("endpointslices", "discovery.k8s.io", "v1")), Some(self.cache.revision()))?;
                let (nss, _, _, _) = self.cache.subscribe(NAMESPACES_PREFIX, &filter(def("namespaces", "", "v1")), Some(self.cache.revision()))?;
                let (np, _, _, _) = self.cache.subscribe(NETPOL_PREFIX, &filter(def("networkpolicies", "networking.k8s.io", "v1")), Some(self.cache.revision()))?;
                Some((p, c, s, n, pvc, pv, svc, eps, nss, np, initial, nodes))
            })();
            let Some((mut psub, mut csub, mut ssub, mut nsub, mut pvcsub, mut pvsub, mut svcsub, mut epssub, mut nssub, mut npsub, initial, nodes)) = subs else {
                // Not ready yet; agents may still attach (they are answered once it is).
                tokio::select! {
                    m = rx.recv() => match m { Some(m) => self.control(m, false), None => return },
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            };
            self.pods.clear();
            self.users.clear();
            self.claim_volume.clear();
            for n in self.nodes.values_mut() {
                n.pods.clear();
                n.refs.clear();
            }
            self.rebuilding = true;
            for e in &initial {
                self.pod_changed(&e.key, Some(e), e.mod_rev);
            }
            self.peer_info = nodes.iter().filter_map(|e| Some((e.name().to_string(), peer_of(e)?))).collect();
            self.rebuilding = false;
            self.pending.clear();
            // changes queued before the rebuild are older than the snapshots it sends
            self.pending_services.clear();
            // Every connected agent gets the difference from what it was sent.
            let connected: Vec<String> = self.nodes.iter().filter(|(_, n)| n.conn.is_some()).map(|(k, _)| k.clone()).collect();
            for node in connected {
                self.resync(&node);
                self.send_peers_full(&node);
                self.send_services_full(&node);
            }
            tracing::info!(pods = self.pods.len(), "agent hub following the watch cache");
            loop {
                tokio::select! {
                    biased;
                    m = rx.recv() => match m { Some(m) => self.control(m, true), None => return },
                    d = psub.rx.recv() => if !self.delivery(d, &mut psub.rx) { break },
                    d = csub.rx.recv() => if !self.delivery(d, &mut csub.rx) { break },
                    d = ssub.rx.recv() => if !self.delivery(d, &mut ssub.rx) { break },
                    d = nsub.rx.recv() => if !self.delivery(d, &mut nsub.rx) { break },
                    d = pvcsub.rx.recv() => if !self.delivery(d, &mut pvcsub.rx) { break },
                    d = pvsub.rx.recv() => if !self.delivery(d, &mut pvsub.rx) { break },
                    d = svcsub.rx.recv() => if !self.delivery(d, &mut svcsub.rx) { break },
                    d = epssub.rx.recv() => if !self.delivery(d, &mut epssub.rx) { break },
                    d = nssub.rx.recv() => if !self.delivery(d, &mut nssub.rx) { break },
                    d = npsub.rx.recv() => if !self.delivery(d, &mut npsub.rx) { break },
                }
                self.flush();
            }
            tracing::info!("agent hub lost its cache subscription; rebuilding");
        }
    }

    /// One delivery plus whatever else is already queued on that subscription; false when
    /// the subscription ended (rebuild).
    fn delivery(&mut self, first: Option<Delivery>, rx: &mut mpsc::Receiver<Delivery>) -> bool {
        let mut d = first;
        for _ in 0..1024 {
            match d {
                None | Some(Delivery::Reset) => return false,
                Some(Delivery::Progress(_)) => {}
                Some(Delivery::Event(ev)) => {
                    let cur = (!ev.deleted).then_some(&*ev.obj);
                    if ev.key.starts_with("/registry/pods/") {
                        self.pod_changed(&ev.key, cur, ev.rev);
                        if !self.proxying.is_empty() {
                            let slim = cur.map(policy_pod).unwrap_or_default();
                            // a delete always goes (a snapshot to another node may have
                            // rebuilt what was sent meanwhile); a change only when policy sees it
                            let known = if slim.is_empty() { self.policy_pods.remove(&ev.key) } else { self.policy_pods.insert(ev.key.clone(), slim.clone()) };
                            if slim.is_empty() || known.as_ref() != Some(&slim) {
                                let mut o = object(&ev.key, None, ev.rev);
                                o.json = slim.into();
                                self.pending_services.push(o);
                            }
                        }
                    } else if ev.key.starts_with(SERVICES_PREFIX) || ev.key.starts_with(SLICES_PREFIX) || ev.key.starts_with(NAMESPACES_PREFIX) || ev.key.starts_with(NETPOL_PREFIX) {
                        if !self.proxying.is_empty() {
                            self.pending_services.push(object(&ev.key, cur, ev.rev));
                        }
                    } else if let Some(node) = ev.key.strip_prefix("/registry/minions/") {
                        let node = node.to_string();
                        self.queue(&node, &ev.key, cur, ev.rev);
                        self.peer_changed(&node, cur);
                    } else {
                        self.ref_changed(&ev.key, cur, ev.rev);
                    }
                }
            }
            match rx.try_recv() {
                Ok(x) => d = Some(x),
                Err(_) => return true,
            }
        }
        true
    }

    fn queue(&mut self, node: &str, key: &str, e: Option<&Entry>, rev: i64) {
        if self.rebuilding {
            return;
        }
        let Some(n) = self.nodes.get_mut(node) else { return };
        let Some(c) = n.conn.as_mut() else { return };
        let rev = e.map_or(rev, |e| e.mod_rev);
        match e {
            Some(_) => {
                if c.sent.get(key).is_some_and(|r| *r >= rev) {
                    return;
                }
                c.sent.insert(key.to_string(), rev);
            }
            None => {
                if c.sent.remove(key).is_none() {
                    return;
                }
            }
        }
        self.pending.entry(node.to_string()).or_default().push(object(key, e, rev));
    }

    fn pod_changed(&mut self, key: &str, cur: Option<&Entry>, rev: i64) {
        let new_node = cur.and_then(|e| e.field_str("spec.nodeName")).filter(|n| !n.is_empty()).map(String::from);
        // The common case, a status change of a bound pod: only the node hears of it.
        if let Some(nn) = &new_node {
            if self.pods.get(key).is_some_and(|p| &p.node == nn) {
                self.queue(nn, key, cur, rev);
                return;
            }
        }
        // Bound, deleted or (never, but handled) moved: references follow the node. The
        // volumes and env of a pod never change after it is created (pod spec validation
        // forbids it), so its references are read once, when it is bound.
        if let Some(old) = self.pods.remove(key) {
            if let Some(n) = self.nodes.get_mut(&old.node) {
                n.pods.remove(key);
            }
            self.queue(&old.node, key, None, rev);
            self.unref(&old.node, &old.refs);
        }
        if let (Some(nn), Some(e)) = (new_node, cur) {
            let refs = pod_refs(&e.value());
            self.nodes.entry(nn.clone()).or_default().pods.insert(key.to_string());
            self.add_refs(&nn, &refs);
            self.queue(&nn, key, cur, rev);
            self.pods.insert(key.to_string(), PodRec { node: nn, refs });
        }
    }

    fn add_refs(&mut self, node: &str, refs: &[String]) {
        for r in refs {
            let n = self.nodes.entry(node.to_string()).or_default();
            let c = n.refs.entry(r.clone()).or_insert(0);
            *c += 1;
            if *c == 1 {
                self.users.entry(r.clone()).or_default().insert(node.to_string());
                let e = self.cache.get(r);
                if e.is_some() {
                    self.queue(node, r, e.as_deref(), 0);
                }
                // A claim in use brings its volume along.
                if r.starts_with("/registry/persistentvolumeclaims/") {
                    let pv = match self.claim_volume.get(r) {
                        Some(pv) => Some(pv.clone()),
                        None => e.as_deref().and_then(volume_of_claim),
                    };
                    if let Some(pv) = pv {
                        self.claim_volume.insert(r.clone(), pv.clone());
                        self.add_refs(node, &[pv]);
                    }
                }
            }
        }
    }

    fn unref(&mut self, node: &str, refs: &[String]) {
        for r in refs {
            let Some(n) = self.nodes.get_mut(node) else { return };
            let gone = match n.refs.get_mut(r) {
                Some(c) if *c > 1 => {
                    *c -= 1;
                    false
                }
                Some(_) => {
                    n.refs.remove(r);
                    true
                }
                None => false,
            };
            if gone {
                if let Some(u) = self.users.get_mut(r) {
                    u.remove(node);
                    if u.is_empty() {
                        self.users.remove(r);
                    }
                }
                self.queue(node, r, None, 0);
                if let Some(pv) = self.claim_volume.get(r).cloned() {
                    if !self.users.contains_key(r) {
                        self.claim_volume.remove(r);
                    }
                    self.unref(node, &[pv]);
                }
            }
        }
    }

    /// A ConfigMap, Secret, claim or volume changed: the nodes whose pods use it get it. A
    /// claim bound to another volume moves its users to that volume.
    fn ref_changed(&mut self, key: &str, cur: Option<&Entry>, rev: i64) {
        let users: Vec<String> = self.users.get(key).map(|u| u.iter().cloned().collect()).unwrap_or_default();
        if key.starts_with("/registry/persistentvolumeclaims/") && !users.is_empty() {
            let now = cur.and_then(volume_of_claim);
            let before = self.claim_volume.get(key).cloned();
            if now != before {
                match &now {
                    Some(pv) => self.claim_volume.insert(key.to_string(), pv.clone()),
                    None => self.claim_volume.remove(key),
                };
                for node in &users {
                    if let Some(pv) = &now {
                        self.add_refs(node, std::slice::from_ref(pv));
                    }
                    if let Some(pv) = &before {
                        self.unref(node, std::slice::from_ref(pv));
                    }
                }
            }
        }
        for node in users {
            self.queue(&node, key, cur, rev);
        }
    }

    fn control(&mut self, m: HubMsg, ready: bool) {
        match m {
            HubMsg::Attach { node, id, known, out, kill, peers, services } => {
                let rec = self.nodes.entry(node.clone()).or_default();
                if let Some(mut old) = rec.conn.take() {
                    if let Some(k) = old.kill.take() {
                        let _ = k.send(());
                    }
                }
                rec.conn = Some(Conn { id, out: out.clone(), kill: Some(kill), sent: known, peers });
                if peers {
                    self.routing.insert(node.clone());
                } else {
                    self.routing.remove(&node);
                }
                if services {
                    self.proxying.insert(node.clone());
                } else {
                    self.proxying.remove(&node);
                }
                self.outs.lock().insert(node.clone(), out);
                if ready {
                    self.resync(&node);
                    self.flush();
                    if peers {
                        self.send_peers_full(&node);
                    }
                    self.send_services_full(&node);
                }
            }
            HubMsg::Detach { node, id } => {
                if let Some(rec) = self.nodes.get_mut(&node) {
                    if rec.conn.as_ref().is_some_and(|c| c.id == id) {
                        rec.conn = None;
                        self.outs.lock().remove(&node);
                        self.routing.remove(&node);
                        self.proxying.remove(&node);
                    }
                    if rec.conn.is_none() && rec.pods.is_empty() {
                        self.nodes.remove(&node);
                    }
                }
            }
        }
    }

    /// Sends a connected node what differs between what it holds and what concerns it,
    /// then `Synced`.
    fn resync(&mut self, node: &str) {
        let Some(rec) = self.nodes.get(node) else { return };
        let mut want: Vec<String> = rec.pods.iter().chain(rec.refs.keys()).cloned().collect();
        want.push(def("nodes", "", "v1").key("", node));
        let held: Vec<String> = rec.conn.as_ref().map(|c| c.sent.keys().cloned().collect()).unwrap_or_default();
        let want_set: HashSet<&String> = want.iter().collect();
        for k in held.iter().filter(|k| !want_set.contains(k)) {
            self.queue(node, k, None, 0);
        }
        for k in &want {
            let e = self.cache.get(k);
            match e {
                Some(e) => self.queue(node, k, Some(&e), 0),
                None => self.queue(node, k, None, 0),
            }
        }
        let rev = self.cache.revision();
        self.flush_node(node);
        if let Some(c) = self.nodes.get_mut(node).and_then(|n| n.conn.as_mut()) {
            let _ = c.out.try_send(Ok(pb::ServerMessage { msg: Some(server_message::Msg::Synced(pb::Synced { revision: rev })) }));
        }
    }

    /// A node's pod range or address changed: agents that route hear of it (only then:
    /// node status updates that change neither cost nothing).
    fn peer_changed(&mut self, node: &str, cur: Option<&Entry>) {
        let now = cur.and_then(peer_of);
        if self.peer_info.get(node) == now.as_ref() {
            return;
        }
        match &now {
            Some(p) => self.peer_info.insert(node.to_string(), p.clone()),
            None => self.peer_info.remove(node),
        };
        let (pod_cidr, internal_ip) = now.unwrap_or_default();
        let peer = pb::Peer { name: node.to_string(), pod_cidr, internal_ip };
        let mut slow = vec![];
        for name in self.routing.iter().filter(|n| n.as_str() != node) {
            let Some(c) = self.nodes.get(name).and_then(|r| r.conn.as_ref()).filter(|c| c.peers) else { continue };
            if c.out.try_send(Ok(pb::ServerMessage { msg: Some(server_message::Msg::Peers(pb::Peers { peers: vec![peer.clone()], full: false })) })).is_err() {
                slow.push(name.clone());
            }
        }
        // A lost update would leave a stale route: such an agent reconnects and gets all.
        for name in slow {
            self.disconnect_slow(&name);
        }
    }

    fn disconnect_slow(&mut self, node: &str) {
        let Some(rec) = self.nodes.get_mut(node) else { return };
        let Some(c) = rec.conn.as_mut() else { return };
        self.metrics.slow_disconnects.inc();
        tracing::warn!(%node, "agent session too slow; closing it");
        if let Some(k) = c.kill.take() {
            let _ = k.send(());
        }
        rec.conn = None;
        self.outs.lock().remove(node);
        self.routing.remove(node);
        self.proxying.remove(node);
    }

    fn send_peers_full(&mut self, node: &str) {
        let Some(c) = self.nodes.get(node).and_then(|n| n.conn.as_ref()).filter(|c| c.peers) else { return };
        let peers = self.peer_info.iter().filter(|(n, _)| n.as_str() != node).map(|(n, (cidr, ip))| pb::Peer { name: n.clone(), pod_cidr: cidr.clone(), internal_ip: ip.clone() }).collect();
        if c.out.try_send(Ok(pb::ServerMessage { msg: Some(server_message::Msg::Peers(pb::Peers { peers, full: true })) })).is_err() {
            self.disconnect_slow(node);
        }
    }

    /// Every Service and EndpointSlice, as a snapshot, to a node that proxies services.
    fn send_services_full(&mut self, node: &str) {
        if !self.proxying.contains(node) {
            return;
        }
        let Some(c) = self.nodes.get(node).and_then(|n| n.conn.as_ref()) else { return };
        let mut items: Vec<pb::Object> = Vec::new();
        // namespaces and policies before pods: the agent applies the snapshot at once anyway
        for (prefix, d) in [(SERVICES_PREFIX, def("services", "", "v1")), (SLICES_PREFIX, def("endpointslices", "discovery.k8s.io", "v1")), (NAMESPACES_PREFIX, def("namespaces", "", "v1")), (NETPOL_PREFIX, def("networkpolicies", "networking.k8s.io", "v1"))] {
            let all = Filter::from_query(d, &Query::default()).expect("an empty selector is valid");
            let (entries, _, _) = self.cache.snapshot(prefix, "", &all, 0);
            items.extend(entries.iter().map(|e| object(&e.key, Some(e), e.mod_rev)));
        }
        // pods as policy sees them; what is sent is remembered for the changes after
        let all = Filter::from_query(def("pods", "", "v1"), &Query::default()).expect("an empty selector is valid");
        let (pods, _, _) = self.cache.snapshot("/registry/pods/", "", &all, 0);
        // (pods deleted while no node proxied must not linger as "sent")
        self.policy_pods.clear();
        for e in pods.iter() {
            let slim = policy_pod(e);
            let mut o = object(&e.key, None, e.mod_rev);
            o.json = slim.clone().into();
            items.push(o);
            self.policy_pods.insert(e.key.clone(), slim);
        }
        let mut chunks: Vec<Vec<pb::Object>> = Vec::new();
        while items.len() > SERVICES_CHUNK {
            let rest = items.split_off(SERVICES_CHUNK);
            chunks.push(std::mem::replace(&mut items, rest));
        }
        chunks.push(items);
        let last = chunks.len() - 1;
        self.metrics.objects_sent.inc_by(chunks.iter().map(|c| c.len() as u64).sum());
        for (i, items) in chunks.into_iter().enumerate() {
            let msg = pb::ServerMessage { msg: Some(server_message::Msg::Services(pb::ServiceObjects { items, reset: i == 0, synced: i == last })) };
            if c.out.try_send(Ok(msg)).is_err() {
                self.disconnect_slow(node);
                return;
            }
        }
    }

    fn flush(&mut self) {
        let nodes: Vec<String> = self.pending.keys().cloned().collect();
        for n in nodes {
            self.flush_node(&n);
        }
        if !self.pending_services.is_empty() {
            let items = std::mem::take(&mut self.pending_services);
            let mut slow = vec![];
            for node in &self.proxying {
                let Some(c) = self.nodes.get(node).and_then(|r| r.conn.as_ref()) else { continue };
                self.metrics.objects_sent.inc_by(items.len() as u64);
                let msg = pb::ServerMessage { msg: Some(server_message::Msg::Services(pb::ServiceObjects { items: items.clone(), reset: false, synced: false })) };
                if c.out.try_send(Ok(msg)).is_err() {
                    slow.push(node.clone());
                }
            }
            // a lost change would leave a stale service: such an agent reconnects and
            // gets a snapshot
            for node in slow {
                self.disconnect_slow(&node);
            }
        }
    }

    fn flush_node(&mut self, node: &str) {
        let Some(items) = self.pending.remove(node) else { return };
        if items.is_empty() {
            return;
        }
        let Some(rec) = self.nodes.get_mut(node) else { return };
        let Some(c) = rec.conn.as_mut() else { return };
        self.metrics.objects_sent.inc_by(items.len() as u64);
        let msg = pb::ServerMessage { msg: Some(server_message::Msg::Objects(pb::Objects { items })) };
        if c.out.try_send(Ok(msg)).is_err() {
            // Too slow (or gone): close the session; the agent comes back and gets the
            // difference.
            self.disconnect_slow(node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_refs_finds_every_reference() {
        let pod = json!({"metadata": {"namespace": "ns", "name": "web"}, "spec": {
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "claim1"}}, {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {}}}, {"configMap": {"name": "cm1"}}, {"secret": {"secretName": "s1"}}, {"projected": {"sources": [{"configMap": {"name": "cm2"}}, {"secret": {"name": "s2"}}, {"serviceAccountToken": {"path": "t"}}]}}, {"emptyDir": {}}],
            "initContainers": [{"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "k"}}}]}],
            "containers": [{"envFrom": [{"configMapRef": {"name": "cm3"}}, {"secretRef": {"name": "s1"}}], "env": [{"name": "B", "value": "x"}, {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "cm1", "key": "k"}}}]}],
            "imagePullSecrets": [{"name": "pull"}]}});
        assert_eq!(
            pod_refs(&pod),
            vec!["/registry/configmaps/ns/cm1", "/registry/configmaps/ns/cm2", "/registry/configmaps/ns/cm3", "/registry/persistentvolumeclaims/ns/claim1", "/registry/persistentvolumeclaims/ns/web-scratch", "/registry/secrets/ns/pull", "/registry/secrets/ns/s1", "/registry/secrets/ns/s2", "/registry/secrets/ns/s3"]
        );
        assert!(pod_refs(&json!({"metadata": {"namespace": "ns"}, "spec": {"containers": [{"name": "c"}]}})).is_empty());
    }

    #[test]
    fn object_names_come_from_the_key() {
        let o = object("/registry/pods/ns1/web-1", None, 42);
        assert_eq!((o.kind.as_str(), o.namespace.as_str(), o.name.as_str(), o.revision), ("Pod", "ns1", "web-1", 42));
        assert!(o.json.is_empty());
        assert_eq!(store_key("Secret", "a", "b").as_deref(), Some("/registry/secrets/a/b"));
        assert_eq!(store_key("Node", "", "b").as_deref(), Some("/registry/minions/b"));
        assert_eq!(store_key("Service", "a", "b"), None);
        let v = object("/registry/persistentvolumes/pv-1", None, 3);
        assert_eq!((v.kind.as_str(), v.namespace.as_str(), v.name.as_str()), ("PersistentVolume", "", "pv-1"));
        assert_eq!(object("/registry/persistentvolumeclaims/ns/c", None, 3).kind, "PersistentVolumeClaim");
        let n = object("/registry/minions/n1", None, 7);
        assert_eq!((n.kind.as_str(), n.namespace.as_str(), n.name.as_str()), ("Node", "", "n1"));
        let svc = object("/registry/services/specs/ns1/web", None, 8);
        assert_eq!((svc.kind.as_str(), svc.namespace.as_str(), svc.name.as_str()), ("Service", "ns1", "web"));
        let eps = object("/registry/endpointslices/ns1/web-x1", None, 9);
        assert_eq!((eps.kind.as_str(), eps.namespace.as_str(), eps.name.as_str()), ("EndpointSlice", "ns1", "web-x1"));
        let ns = object("/registry/namespaces/team-a", None, 10);
        assert_eq!((ns.kind.as_str(), ns.namespace.as_str(), ns.name.as_str()), ("Namespace", "", "team-a"));
        let np = object("/registry/networkpolicies/ns1/deny", None, 11);
        assert_eq!((np.kind.as_str(), np.namespace.as_str(), np.name.as_str()), ("NetworkPolicy", "ns1", "deny"));
    }
}
