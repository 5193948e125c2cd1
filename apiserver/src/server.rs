//! Serving: one single-threaded executor per core, each accepting its own TLS connections
//! on an SO_REUSEPORT listener (HTTP/2 or HTTP/1.1 by ALPN); authentication; routing of a
//! request to discovery, health, metrics or the REST verbs; content negotiation.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};

use crate::auth::{self, Attributes, User};
use crate::backend::Backend;
use crate::metrics::ApiMetrics;
use crate::resources::{self, ResourceDef};
use crate::rest::{self, Query, Target};
use crate::status::{ApiError, Gr};
use crate::table::{self, Include};
use crate::watch::{self, Render};
use crate::{discovery, tls};

pub type Body = BoxBody<Bytes, Infallible>;

/// Largest request body accepted (upstream's limit for JSON and protobuf bodies).
pub const MAX_BODY: usize = 3 << 20;

/// Configuration of the API server.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Address the HTTPS API listens on.
    pub addr: SocketAddr,
    /// Executor threads (one listener each).
    pub threads: usize,
    /// Directory holding the CA, serving certificate and admin token.
    pub pki_dir: PathBuf,
    /// Where to write the admin kubeconfig (None: do not write one).
    pub kubeconfig: Option<PathBuf>,
    /// Extra names or addresses the serving certificate is valid for.
    pub extra_sans: Vec<String>,
    /// How often the store's history is compacted (None: never).
    pub compaction_interval: Option<std::time::Duration>,
}

impl ApiConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.threads == 0 {
            return Err("--threads must be at least 1".into());
        }
        Ok(())
    }
}

/// State shared by every connection.
pub struct Api {
    pub backend: Backend,
    /// Lists and watches are served from here when it can (see cache.rs).
    pub cache: Arc<crate::cache::Cache>,
    /// Signs service account tokens.
    pub signer: Arc<crate::token::Signer>,
    pub admin_token: String,
    pub server_address: String,
    pub metrics: Arc<ApiMetrics>,
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// Health of the store (for /readyz).
    pub store_ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The agent protocol (gRPC on this same address, routed by content-type).
    pub agents: crate::agents::AgentGrpc,
    /// The objects every cluster has (system namespaces, priority classes, default storage
    /// class, `kubernetes` service, bootstrap token) are written: until then /readyz fails,
    /// as kube-apiserver's post-start hooks make it.
    pub bootstrapped: std::sync::atomic::AtomicBool,
}

/// A running API server.
pub struct RunningApi {
    pub addr: SocketAddr,
    pub api: Arc<Api>,
    pub credentials: Arc<tls::Credentials>,
}

/// Starts the API server on `threads` executor threads; returns once listening.
/// `extra_metrics` lets the caller expose other components' metrics on `/metrics`.
pub fn start(cfg: ApiConfig, backend: Backend, store_ready: Arc<dyn Fn() -> bool + Send + Sync>, extra_metrics: impl FnOnce(&mut prometheus_client::registry::Registry)) -> anyhow::Result<RunningApi> {
    cfg.validate().map_err(|e| anyhow::anyhow!(e))?;
    let listeners = shoal_store::etcd::bind_reuseport(cfg.addr, cfg.threads).with_context(|| format!("while binding the API address {} (is the port in use?)", cfg.addr))?;
    let addr = listeners[0].local_addr()?;
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string(), "kubernetes".into(), "kubernetes.default".into(), "kubernetes.default.svc".into(), "kubernetes.default.svc.cluster.local".into(), "10.96.0.1".into()];
    if !addr.ip().is_unspecified() && !hosts.contains(&addr.ip().to_string()) {
        hosts.push(addr.ip().to_string());
    }
    hosts.extend(cfg.extra_sans.iter().cloned());
    let creds = Arc::new(tls::load_or_create(&cfg.pki_dir, &hosts)?);
    let tls_cfg = creds.server_config()?;
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let server_address = if addr.is_ipv6() { format!("[{host}]:{}", addr.port()) } else { format!("{host}:{}", addr.port()) };
    if let Some(k) = &cfg.kubeconfig {
        creds.write_kubeconfig(k, &format!("https://{server_address}"))?;
    }
    let metrics = Arc::new(ApiMetrics::default());
    let agent_metrics = Arc::new(crate::agents::AgentMetrics::default());
    let mut reg = prometheus_client::registry::Registry::default();
    metrics.register(&mut reg);
    agent_metrics.register(&mut reg);
    extra_metrics(&mut reg);
    let cache = crate::cache::Cache::new(backend.clone());
    {
        let cache = cache.clone();
        let (backend, every) = (backend.clone(), cfg.compaction_interval);
        std::thread::Builder::new().name("api-cache".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("building the watch cache executor");
            rt.block_on(async move {
                if let Some(every) = every {
                    tokio::spawn(crate::backend::run_compactor(backend, every));
                }
                cache.run().await
            });
        })?;
    }
    let signer = Arc::new(crate::token::Signer::load_or_create(&cfg.pki_dir)?);
    let agents = crate::agents::AgentGrpc(Arc::new(crate::agents::AgentService::new(backend.clone(), cache.clone(), signer.clone(), creds.admin_token.clone(), agent_metrics)));
    let api = Arc::new(Api { backend, cache, signer, admin_token: creds.admin_token.clone(), server_address, metrics, registry: Arc::new(reg), store_ready, agents, bootstrapped: std::sync::atomic::AtomicBool::new(false) });
    let pki_dir = cfg.pki_dir.clone();

    for (i, l) in listeners.into_iter().enumerate() {
        let api = api.clone();
        let pki_dir = pki_dir.clone();
        let tls_cfg = tls_cfg.clone();
        std::thread::Builder::new().name(format!("api-serve-{i}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("building an API executor");
            rt.block_on(async move {
                if i == 0 {
                    // The namespaces every cluster has; retried until the store answers.
                    let api = api.clone();
                    let port = addr.port();
                    tokio::spawn(async move {
                        for attempt in 0u32.. {
                            let r = match rest::ensure_system_namespaces(&api.backend, port).await {
                                Ok(()) => crate::agents::ensure_bootstrap_token(&api.backend, &pki_dir).await.map(|_| ()),
                                Err(e) => Err(e),
                            };
                            match r {
                                Ok(()) => {
                                    api.bootstrapped.store(true, std::sync::atomic::Ordering::Release);
                                    break;
                                }
                                Err(e) => {
                                    if attempt % 10 == 0 {
                                        tracing::warn!(error = %e.message, "creating the system namespaces failed; retrying");
                                    }
                                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                                }
                            }
                        }
                    });
                }
                if let Err(e) = serve(api, l, tls_cfg).await {
                    tracing::error!(error = %e, "API listener stopped");
                }
            });
        })?;
    }
    tracing::info!(addr = %addr, threads = cfg.threads, "API server serving HTTPS");
    Ok(RunningApi { addr, api, credentials: creds })
}

async fn serve(api: Arc<Api>, l: std::net::TcpListener, tls_cfg: Arc<rustls::ServerConfig>) -> anyhow::Result<()> {
    l.set_nonblocking(true)?;
    let l = tokio::net::TcpListener::from_std(l)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_cfg);
    loop {
        let (sock, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let acceptor = acceptor.clone();
        let api = api.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(sock)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            // Watches are long-lived streams: allow many per connection (kube-apiserver's
            // default is 1,000 streams per HTTP/2 connection).
            builder.http2().max_concurrent_streams(1000);
            if let Err(e) = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), svc).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// A tonic response body as this server's body type (which must be `Sync`: the mutex is
/// never contended, `poll_frame` has `&mut`). A body error ends the stream.
struct GrpcBody(std::sync::Mutex<tonic::body::Body>);

impl hyper::body::Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let b = self.get_mut().0.get_mut().unwrap_or_else(|p| p.into_inner());
        match std::pin::Pin::new(b).poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(f))) => std::task::Poll::Ready(Some(Ok(f))),
            std::task::Poll::Ready(_) => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

fn full(status: u16, ctype: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, ctype)
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Full::new(body.into()).boxed())
        .expect("static headers are valid")
}

fn json_response(status: u16, v: &Value) -> Response<Body> {
    full(status, "application/json", serde_json::to_vec(v).expect("JSON values always serialize"))
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.to_status());
    if let Some(s) = e.retry_after {
        r.headers_mut().insert(header::RETRY_AFTER, s.into());
    }
    r
}

/// What representation the client asked for in `Accept`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    Json,
    /// `application/vnd.kubernetes.protobuf` (objects, lists and statuses; watches stay JSON
    /// when the client also accepts it).
    Protobuf,
    Table,
    Metadata,
}

fn negotiate(accept: &str) -> Result<Want, ApiError> {
    if accept.trim().is_empty() {
        return Ok(Want::Json);
    }
    for part in accept.split(',') {
        let mut it = part.split(';').map(str::trim);
        let media = it.next().unwrap_or("");
        let params: Vec<(&str, &str)> = it.filter_map(|p| p.split_once('=')).collect();
        let get = |k: &str| params.iter().find(|(pk, _)| *pk == k).map(|(_, v)| *v);
        match media {
            "application/vnd.kubernetes.protobuf" if get("as").is_none() => return Ok(Want::Protobuf),
            "application/json" | "application/*" | "*/*" | "application/yaml" => match get("as") {
                None => return Ok(Want::Json),
                Some("Table") if get("g") == Some("meta.k8s.io") && matches!(get("v"), Some("v1" | "v1beta1")) => return Ok(Want::Table),
                Some("PartialObjectMetadata" | "PartialObjectMetadataList") if get("g") == Some("meta.k8s.io") => return Ok(Want::Metadata),
                Some(_) => continue,
            },
            _ => continue,
        }
    }
    Err(ApiError::not_acceptable(&["application/json", "application/yaml", "application/vnd.kubernetes.protobuf"]))
}

/// Which verb a request is, for metrics (upstream's names).
fn verb_of(method: &Method, has_name: bool, watch: bool) -> &'static str {
    match *method {
        Method::GET if watch => "WATCH",
        Method::GET if has_name => "GET",
        Method::GET => "LIST",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE if has_name => "DELETE",
        Method::DELETE => "DELETECOLLECTION",
        _ => "OTHER",
    }
}

/// The authorization verb of a request (upstream's names).
fn authz_verb(method: &Method, has_name: bool, watch: bool) -> &'static str {
    match *method {
        Method::GET if watch => "watch",
        Method::GET if has_name => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if has_name => "delete",
        Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

/// A request routed to a resource.
#[derive(Debug)]
struct Routed {
    def: &'static ResourceDef,
    ns: String,
    name: String,
    sub: String,
    watch_path: bool,
}

/// Splits `<prefix>/[watch/][namespaces/<ns>/]<resource>[/<name>[/<subresource>]]`.
fn route_resource(group: &str, version: &str, rest: &[&str]) -> Result<Routed, ApiError> {
    let mut rest = rest;
    let mut watch_path = false;
    if rest.first() == Some(&"watch") {
        watch_path = true;
        rest = &rest[1..];
    }
    let (ns, resource, name, sub) = match rest {
        ["namespaces", ns, "status" | "finalize"] => ("", "namespaces", *ns, rest[2]),
        ["namespaces", ns] => ("", "namespaces", *ns, ""),
        ["namespaces", ns, resource, tail @ ..] => {
            let name = tail.first().copied().unwrap_or("");
            let sub = if tail.len() > 1 { tail[1] } else { "" };
            if tail.len() > 2 {
                return Err(ApiError::no_such_path());
            }
            (*ns, *resource, name, sub)
        }
        [resource, tail @ ..] => {
            if tail.len() > 2 {
                return Err(ApiError::no_such_path());
            }
            ("", *resource, tail.first().copied().unwrap_or(""), tail.get(1).copied().unwrap_or(""))
        }
        [] => return Err(ApiError::no_such_path()),
    };
    let def = resources::find(group, version, resource).ok_or_else(ApiError::no_such_path)?;
    if !def.namespaced && !ns.is_empty() {
        return Err(ApiError::no_such_path());
    }
    if !sub.is_empty() && !def.has_sub(sub) {
        return Err(ApiError::no_such_path());
    }
    Ok(Routed { def, ns: ns.to_string(), name: name.to_string(), sub: sub.to_string(), watch_path })
}

/// Constant-time comparison of a presented token with the admin token.
fn token_ok(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Api {
    /// The caller's identity (after impersonation), or a 401/403 error.
    fn authenticate(&self, req: &Request<Incoming>) -> Result<User, ApiError> {
        let Some(h) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return Err(ApiError::unauthorized()) };
        let user = match h.split_once(' ') {
            Some((scheme, tok)) if scheme.eq_ignore_ascii_case("bearer") && token_ok(tok.trim(), &self.admin_token) => User::admin(),
            _ => return Err(ApiError::unauthorized()),
        };
        let Some(imp) = req.headers().get("impersonate-user").and_then(|v| v.to_str().ok()) else { return Ok(user) };
        if !user.is_master() {
            return Err(ApiError::new(403, "Forbidden", format!("users \"{imp}\" is forbidden: User \"{}\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope", user.name)));
        }
        let groups: Vec<String> = req.headers().get_all("impersonate-group").iter().filter_map(|v| v.to_str().ok().map(String::from)).collect();
        Ok(User::impersonated(imp, groups))
    }

    /// Answers one request; never fails (errors become `Status` responses).
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path().starts_with("/shoal.agent.v1.NodeAgent/") && req.headers().get(header::CONTENT_TYPE).is_some_and(|c| c.as_bytes().starts_with(b"application/grpc")) {
            return self.grpc(req).await;
        }
        let start = Instant::now();
        self.metrics.inflight.inc();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let (resp, labels) = self.dispatch(req).await;
        self.metrics.inflight.dec();
        let status = resp.status().as_u16();
        if let Some((verb, group, resource, sub)) = labels {
            self.metrics.observe(verb, group, resource, &sub, status, start.elapsed().as_secs_f64());
        }
        tracing::debug!(%method, %path, status, micros = start.elapsed().as_micros() as u64, "request");
        resp
    }

    /// The agent protocol. gRPC errors travel in trailers; a body error ends the stream.
    async fn grpc(&self, req: Request<Incoming>) -> Response<Body> {
        use tonic::codegen::Service;
        let mut svc = shoal_proto::agent::node_agent_server::NodeAgentServer::new(self.agents.clone()).max_decoding_message_size(16 << 20);
        let resp = match svc.call(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, BodyExt::boxed(GrpcBody(std::sync::Mutex::new(body))))
    }

    async fn dispatch(&self, req: Request<Incoming>) -> (Response<Body>, Option<(&'static str, &'static str, &'static str, String)>) {
        let path = req.uri().path().to_string();
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match segs.as_slice() {
            ["healthz" | "livez"] | ["healthz" | "livez", "ping"] => return (full(200, "text/plain; charset=utf-8", "ok"), None),
            ["readyz"] | ["readyz", _] => {
                return if !((self.store_ready)() && self.cache.is_ready()) {
                    (full(500, "text/plain; charset=utf-8", "[-]etcd failed: reason withheld\nreadyz check failed\n"), None)
                } else if !self.bootstrapped.load(std::sync::atomic::Ordering::Acquire) {
                    (full(500, "text/plain; charset=utf-8", "[+]etcd ok\n[-]poststarthook/shoal-bootstrap failed: reason withheld\nreadyz check failed\n"), None)
                } else {
                    (full(200, "text/plain; charset=utf-8", "ok"), None)
                };
            }
            ["version"] => return (json_response(200, &version()), None),
            _ => {}
        }
        let user = match self.authenticate(&req) {
            Ok(u) => u,
            Err(e) => return (error_response(&e), None),
        };
        let method = req.method().clone();
        if let ["api", "v1", "namespaces", ns, "pods", name, sub @ ("exec" | "attach")] = segs.as_slice() {
            let labels = Some(("connect", "", "pods", sub.to_string()));
            let (ns, name, attach) = (ns.to_string(), name.to_string(), *sub == "attach");
            return match self.exec(&user, &ns, &name, req, attach).await {
                Ok(r) => (r, labels),
                Err(e) => (error_response(&e), labels),
            };
        }
        let is_resource = matches!(segs.as_slice(), ["api", "v1", _, ..] | ["apis", _, _, _, ..]);
        if !is_resource {
            let a = Attributes { verb: method.as_str().to_lowercase(), path: path.clone(), ..Default::default() };
            if let Err(why) = auth::authorize(&user, &a) {
                return (error_response(&ApiError::new(403, "Forbidden", format!("forbidden: {why}"))), None);
            }
        }
        let mut query = Query::parse(req.uri().query());
        query.0.remove(Query::USER_AGENT);
        query.0.remove("@applied");
        if let Some(ua) = req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()) {
            query.0.insert(Query::USER_AGENT.into(), ua.to_string());
        }
        let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let ctype = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = match read_body(req.into_body()).await {
            Ok(b) => b,
            Err(e) => return (error_response(&e), None),
        };
        let get_only = |v: Option<Value>| match v {
            _ if method != Method::GET => error_response(&ApiError::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")),
            Some(v) => json_response(200, &v),
            None => error_response(&ApiError::no_such_path()),
        };
        let resp = match segs.as_slice() {
            [] => get_only(Some(json!({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/metrics", "/openapi/v2", "/openapi/v3", "/readyz", "/version"]}))),
            ["metrics"] => {
                let mut s = String::new();
                match prometheus_client::encoding::text::encode(&mut s, &self.registry) {
                    Ok(()) => full(200, "text/plain; version=0.0.4; charset=utf-8", s),
                    Err(e) => error_response(&ApiError::internal(format!("encoding metrics: {e}"))),
                }
            }
            ["openapi", "v3"] => get_only(Some(crate::openapi::v3_index())),
            ["openapi", "v3", rest @ ..] => match crate::openapi::v3_doc(&rest.join("/")) {
                Some(b) if method == Method::GET => full(200, "application/json", b),
                _ => get_only(None),
            },
            ["openapi", "v2"] if method == Method::GET => {
                if accept.contains("protobuf") {
                    full(200, "application/com.github.proto-openapi.spec.v2.v1.0+protobuf", crate::openapi::v2_protobuf())
                } else {
                    full(200, "application/json", crate::openapi::v2())
                }
            }
            ["api"] => get_only(Some(discovery::core_versions(&self.server_address))),
            ["apis"] => get_only(Some(discovery::group_list())),
            ["api", "v1"] => get_only(discovery::resource_list("", "v1")),
            ["apis", g] => get_only(discovery::group(g)),
            ["apis", g, v] => get_only(discovery::resource_list(g, v)),
            ["api", "v1", rest @ ..] => return self.resource(&user, "", "v1", rest, &method, &query, &accept, &ctype, body).await,
            ["apis", "metrics.k8s.io", "v1beta1", rest @ ..] => {
                let resource = if rest.first() == Some(&"namespaces") { rest.get(2) } else { rest.first() };
                let a = Attributes { verb: if rest.len() % 2 == 0 { "get".into() } else { "list".into() }, group: crate::resource_metrics::GROUP.into(), resource: resource.map(|r| r.to_string()).unwrap_or_default(), namespace: if rest.first() == Some(&"namespaces") { rest.get(1).map(|s| s.to_string()).unwrap_or_default() } else { String::new() }, ..Default::default() };
                if let Err(why) = auth::authorize(&user, &a) {
                    return (error_response(&ApiError::new(403, "Forbidden", why)), None);
                }
                match crate::resource_metrics::serve(&self.agents.usage, &self.cache, rest, query.get("labelSelector").unwrap_or("")) {
                    Ok(v) if method == Method::GET => json_response(200, &v),
                    Ok(_) => error_response(&ApiError::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")),
                    Err(e) => error_response(&e),
                }
            }
            ["apis", g, v, rest @ ..] => {
                let (g, v) = (g.to_string(), v.to_string());
                return self.resource(&user, &g, &v, rest, &method, &query, &accept, &ctype, body).await;
            }
            _ => error_response(&ApiError::no_such_path()),
        };
        (resp, None)
    }

    #[allow(clippy::too_many_arguments)]
    async fn resource(&self, user: &User, group: &str, version: &str, rest: &[&str], method: &Method, q: &Query, accept: &str, ctype: &str, body: Bytes) -> (Response<Body>, Option<(&'static str, &'static str, &'static str, String)>) {
        let routed = match route_resource(group, version, rest) {
            Ok(r) => r,
            Err(e) => return (error_response(&e), None),
        };
        let watch = routed.watch_path || q.flag("watch");
        let labels = Some((verb_of(method, !routed.name.is_empty(), watch), routed.def.group, routed.def.plural, routed.sub.clone()));
        let want = match negotiate(accept) {
            // A watch is streamed as JSON lines; protobuf clients accept JSON too.
            Ok(Want::Protobuf) if watch => match negotiate(&accept.replace("application/vnd.kubernetes.protobuf", "application/x-unused")) {
                Ok(w) => w,
                Err(e) => return (error_response(&e), labels),
            },
            Ok(w) => w,
            Err(e) => return (error_response(&e), labels),
        };
        let a = Attributes {
            verb: authz_verb(method, !routed.name.is_empty(), watch).to_string(),
            group: routed.def.group.to_string(),
            resource: routed.def.plural.to_string(),
            subresource: routed.sub.clone(),
            namespace: routed.ns.clone(),
            name: routed.name.clone(),
            path: String::new(),
        };
        if let Err(why) = auth::authorize(user, &a) {
            let gr = Gr { group: routed.def.group, resource: routed.def.plural };
            return (error_response(&ApiError::forbidden(gr, &routed.name, &why)), labels);
        }
        if routed.def.is_virtual() {
            let resp = match (method, decode_body(ctype, &body)) {
                (&Method::POST, Ok(b)) => auth::review(routed.def.kind, &routed.def.api_version(), user, &routed.ns, b).map(|v| json_response(201, &v)),
                (&Method::POST, Err(e)) => Err(e),
                _ => Err(ApiError::method_not_allowed(&method.as_str().to_lowercase(), Gr { group: routed.def.group, resource: routed.def.plural })),
            };
            return (resp.unwrap_or_else(|e| error_response(&e)), labels);
        }
        let resp = match self.verb(&routed, method, q, want, ctype, &body, watch).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
        let resp = if want == Want::Protobuf { to_protobuf(resp).await } else { resp };
        if routed.def.kind == "CustomResourceDefinition" && !routed.def.custom && *method != Method::GET && resp.status().is_success() {
            if let Err(e) = rest::refresh_crds(&self.backend).await {
                tracing::warn!(error = %e.message, "refreshing custom resources after a CRD write");
            }
        }
        (resp, labels)
    }

    #[allow(clippy::too_many_arguments)]
    async fn verb(&self, r: &Routed, method: &Method, q: &Query, want: Want, ctype: &str, body: &[u8], watch: bool) -> Result<Response<Body>, ApiError> {
        // `served` is the version the client speaks; `def` the one kept in the store.
        let served = r.def;
        let def = crate::conversion::storage_of(served);
        let to_storage = |mut obj: Value| -> Value {
            if !std::ptr::eq(served, def) && obj.is_object() && obj.get("apiVersion").and_then(Value::as_str).unwrap_or("").is_empty() {
                // A body without apiVersion is in the version of the endpoint it was sent to.
                obj["apiVersion"] = json!(served.api_version());
                if obj.get("kind").and_then(Value::as_str).unwrap_or("").is_empty() {
                    obj["kind"] = json!(served.kind);
                }
            }
            if !std::ptr::eq(served, def) && obj.get("apiVersion").and_then(Value::as_str) == Some(served.api_version().as_str()) {
                crate::conversion::default_served(&mut obj, served);
                crate::conversion::convert(obj, def)
            } else {
                obj
            }
        };
        let gr = Gr { group: def.group, resource: def.plural };
        let t = Target { def, ns: &r.ns, name: &r.name, sub: &r.sub };
        let b = &self.backend;
        let verb_allowed = |v: &str| def.verbs.contains(&v);
        if def.namespaced && r.ns.is_empty() && !r.name.is_empty() {
            return Err(ApiError::no_such_path());
        }
        let render_one = |code: u16, v: Value| -> Response<Body> {
            match want {
                Want::Table if code < 300 && v.get("kind").and_then(Value::as_str) == Some(def.kind) => {
                    let rv = v.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""));
                    json_response(code, &table::table(table::kind_of(def), std::slice::from_ref(&v), json!({"resourceVersion": rv}), Include::parse(q.get("includeObject"))))
                }
                Want::Metadata if code < 300 && v.get("kind").and_then(Value::as_str) == Some(def.kind) => {
                    json_response(code, &json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": v["metadata"]}))
                }
                _ => json_response(code, &crate::conversion::convert(v, served)),
            }
        };
        match (method, r.name.is_empty(), r.sub.as_str()) {
            (&Method::GET, true, "") if watch => {
                if !verb_allowed("watch") {
                    return Err(ApiError::method_not_allowed("watch", gr));
                }
                let render = match want {
                    Want::Table => Render::Table(Include::parse(q.get("includeObject"))),
                    Want::Metadata => Render::Metadata,
                    Want::Json | Want::Protobuf => Render::Object,
                };
                let rx = match watch::start_cached(&self.cache, def, served, &r.ns, q, render).await? {
                    Some(rx) => rx,
                    None => watch::start(b, def, served, &r.ns, q, render).await?,
                };
                let watchers = self.metrics.watchers.clone();
                let labels = vec![("group", def.group.to_string()), ("resource", def.plural.to_string())];
                watchers.get_or_create(&labels).inc();
                let guard = WatchGuard { family: watchers, labels };
                let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |b| {
                    let _ = &guard;
                    Ok::<_, Infallible>(Frame::data(b))
                });
                let ct = if want == Want::Json { "application/json" } else { "application/json;as=Table;v=v1;g=meta.k8s.io" };
                let ct = if want == Want::Metadata { "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io" } else { ct };
                Ok(Response::builder().status(200).header(header::CONTENT_TYPE, ct).header(header::CACHE_CONTROL, "no-cache, private").body(BodyExt::boxed(StreamBody::new(stream))).expect("static headers are valid"))
            }
            (&Method::GET, true, "") => {
                if !verb_allowed("list") {
                    return Err(ApiError::method_not_allowed("list", gr));
                }
                if let Some(resp) = self.list_cached(def, served, &r.ns, q, want).await? {
                    return Ok(resp);
                }
                let page = rest::list(b, def, &r.ns, q).await?;
                Ok(match want {
                    Want::Table => {
                        let mut md = json!({"resourceVersion": page.rev.to_string()});
                        if let Some(c) = &page.cont {
                            md["continue"] = json!(c);
                        }
                        if let Some(n) = page.remaining.filter(|n| *n > 0) {
                            md["remainingItemCount"] = json!(n);
                        }
                        json_response(200, &table::table(table::kind_of(def), &page.items, md, Include::parse(q.get("includeObject"))))
                    }
                    Want::Metadata => {
                        let mut l = rest::list_object(def, page);
                        l["kind"] = json!("PartialObjectMetadataList");
                        l["apiVersion"] = json!("meta.k8s.io/v1");
                        if let Some(items) = l["items"].as_array_mut() {
                            for it in items.iter_mut() {
                                *it = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": it["metadata"].take()});
                            }
                        }
                        json_response(200, &l)
                    }
                    Want::Json | Want::Protobuf => {
                        let page = rest::Page { items: page.items.into_iter().map(|o| crate::conversion::convert(o, served)).collect(), ..page };
                        json_response(200, &rest::list_object(served, page))
                    }
                })
            }
            (&Method::GET, false, "" | "status") => Ok(render_one(200, rest::get(b, &t).await?)),
            (&Method::GET | &Method::PUT | &Method::PATCH, false, "scale") => {
                let (code, v) = rest::scale(b, &t, method, ctype, body, q).await?;
                Ok(json_response(code, &v))
            }
            (&Method::POST, true, "") => {
                if !verb_allowed("create") {
                    return Err(ApiError::method_not_allowed("create", gr));
                }
                let obj = to_storage(decode_body(ctype, body)?);
                if def.kind == "Binding" {
                    let (code, v) = rest::bind(b, &t, obj, q).await?;
                    return Ok(json_response(code, &v));
                }
                let (code, v) = rest::create(b, &t, obj, q).await?;
                Ok(render_one(code, v))
            }
            (&Method::POST, false, "token") => {
                let obj = decode_body(ctype, body)?;
                let (code, v) = rest::token_request(b, &t, obj, &self.signer).await?;
                Ok(json_response(code, &v))
            }
            (&Method::POST, false, "eviction") => {
                let obj = decode_body(ctype, body)?;
                let (code, v) = rest::evict(b, &t, obj, q).await?;
                Ok(json_response(code, &v))
            }
            (&Method::POST, false, "binding") => {
                let obj = decode_body(ctype, body)?;
                let (code, v) = rest::bind(b, &t, obj, q).await?;
                Ok(json_response(code, &v))
            }
            (&Method::PUT, false, "" | "status" | "finalize") => {
                if !verb_allowed("update") {
                    return Err(ApiError::method_not_allowed("update", gr));
                }
                let obj = to_storage(decode_body(ctype, body)?);
                let t = Target { sub: if r.sub == "finalize" { "" } else { &r.sub }, ..t };
                let (code, v) = rest::update(b, &t, obj, q).await?;
                Ok(render_one(code, v))
            }
            (&Method::PATCH, false, "" | "status") => {
                if !verb_allowed("patch") {
                    return Err(ApiError::method_not_allowed("patch", gr));
                }
                let (code, v) = rest::patch(b, &t, served, ctype, body, q).await?;
                Ok(render_one(code, v))
            }
            (&Method::DELETE, false, "") => {
                if !verb_allowed("delete") {
                    return Err(ApiError::method_not_allowed("delete", gr));
                }
                let (code, v) = rest::delete(b, &t, body, q).await?;
                Ok(render_one(code, v))
            }
            (&Method::DELETE, true, "") => {
                if !verb_allowed("deletecollection") {
                    return Err(ApiError::method_not_allowed("deletecollection", gr));
                }
                Ok(json_response(200, &rest::delete_collection(b, def, &r.ns, body, q).await?))
            }
            (&Method::GET, false, "log") if def.kind == "Pod" => self.pod_log(b, &t, q).await,
            (_, _, "portforward" | "proxy" | "ephemeralcontainers") => {
                Err(ApiError::new(501, "NotImplemented", format!("{}/{} is not served yet", def.plural, r.sub)))
            }
            _ => Err(ApiError::method_not_allowed(&method.as_str().to_lowercase(), gr)),
        }
    }
}

impl Api {
    /// `pods/exec`: authorized as `create pods/exec`, checked against the pod, then the
    /// WebSocket is accepted and relayed to the pod's agent (`exec.rs`).
    async fn exec(&self, user: &auth::User, ns: &str, name: &str, req: Request<Incoming>, attach: bool) -> Result<Response<Body>, ApiError> {
        let p = crate::exec::ExecParams::parse(req.uri().query(), attach)?;
        let sub = if attach { "attach" } else { "exec" };
        let a = Attributes { verb: "create".into(), group: String::new(), resource: "pods".into(), subresource: sub.into(), namespace: ns.into(), name: name.into(), path: String::new() };
        if let Err(why) = auth::authorize(user, &a) {
            return Err(ApiError::forbidden(Gr { group: "", resource: "pods" }, name, &why));
        }
        let t = Target { def: crate::resources::find("", "v1", "pods").ok_or_else(|| ApiError::internal("pods are a built-in resource"))?, ns, name, sub: "" };
        let pod = rest::get(&self.backend, &t).await?;
        let names: Vec<&str> = ["initContainers", "containers"].iter().flat_map(|l| pod["spec"][*l].as_array().into_iter().flatten()).filter_map(|c| c["name"].as_str()).collect();
        let app: Vec<&str> = pod["spec"]["containers"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
        let container = match p.container.as_str() {
            "" => app.first().copied().unwrap_or_default().to_string(),
            c if names.contains(&c) => c.to_string(),
            c => return Err(ApiError::bad_request(format!("container {c} is not valid for pod {name}"))),
        };
        let phase = pod["status"]["phase"].as_str().unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            return Err(ApiError::bad_request(format!("cannot exec into a container in a completed pod; current phase is {phase}")));
        }
        let node = pod.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("").to_string();
        if node.is_empty() {
            return Err(ApiError::bad_request(format!("pod {name} does not have a host assigned")));
        }
        let (proto, accept) = crate::exec::negotiate(&req)?;
        let request = if attach {
            // The container's output from now on (its stdin is not kept open: input is not
            // forwarded).
            shoal_proto::agent::reverse_request::Request::Logs(shoal_proto::agent::LogsRequest { namespace: ns.into(), pod: name.into(), container, follow: true, attach: true, tail_lines: -1, ..Default::default() })
        } else {
            shoal_proto::agent::reverse_request::Request::Exec(shoal_proto::agent::ExecRequest { namespace: ns.into(), pod: name.into(), container, command: p.command.clone(), stdin: p.stdin, tty: p.tty })
        };
        let (id, replies) = self.agents.request_with_id(&node, request).ok_or_else(|| ApiError::unavailable(format!("the agent of node {node:?} is not connected")))?;
        let agents = self.agents.0.clone();
        tokio::spawn(async move {
            let io = match hyper::upgrade::on(req).await {
                Ok(u) => hyper_util::rt::TokioIo::new(u),
                Err(e) => {
                    tracing::debug!(error = %e, "exec upgrade failed");
                    return;
                }
            };
            let node2 = node.clone();
            crate::exec::relay(io, p, replies, move |mut input| {
                let (agents, node) = (agents.clone(), node2.clone());
                input.id = id;
                async move { agents.input(&node, input).await }
            })
            .await;
        });
        Ok(crate::exec::switching(proto, &accept))
    }

    /// `pods/log`: the pod's agent is asked over its session (reverse request) and the
    /// answer is streamed back as text.
    async fn pod_log(&self, b: &Backend, t: &Target<'_>, q: &Query) -> Result<Response<Body>, ApiError> {
        let int = |k: &str| -> Result<Option<i64>, ApiError> {
            match q.get(k) {
                None | Some("") => Ok(None),
                Some(v) => v.parse::<i64>().map(Some).map_err(|_| ApiError::bad_request(format!("{k}: invalid value {v:?}: must be an integer"))),
            }
        };
        let (tail, since, limit) = (int("tailLines")?, int("sinceSeconds")?, int("limitBytes")?);
        if since.is_some_and(|s| s < 1) {
            return Err(ApiError::invalid("PodLogOptions", "", "", &[crate::status::FieldError::invalid("sinceSeconds", since.unwrap_or(0), "must be greater than 0")]));
        }
        if limit.is_some_and(|l| l < 1) {
            return Err(ApiError::invalid("PodLogOptions", "", "", &[crate::status::FieldError::invalid("limitBytes", limit.unwrap_or(0), "must be greater than 0")]));
        }
        let pod = rest::get(b, t).await?;
        let names: Vec<&str> = ["initContainers", "containers", "ephemeralContainers"].iter().flat_map(|l| pod["spec"][*l].as_array().into_iter().flatten()).filter_map(|c| c["name"].as_str()).collect();
        let app: Vec<&str> = pod["spec"]["containers"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
        let container = match q.get("container").filter(|c| !c.is_empty()) {
            Some(c) if names.contains(&c) => c.to_string(),
            Some(c) => return Err(ApiError::bad_request(format!("container {c} is not valid for pod {}", t.name))),
            None if app.len() == 1 => app[0].to_string(),
            None => return Err(ApiError::bad_request(format!("a container name must be specified for pod {}, choose one of: [{}]", t.name, app.join(" ")))),
        };
        let node = pod.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
        if node.is_empty() {
            return Err(ApiError::bad_request(format!("pod {} does not have a host assigned", t.name)));
        }
        let req = shoal_proto::agent::LogsRequest {
            namespace: t.ns.to_string(),
            pod: t.name.to_string(),
            container,
            follow: q.flag("follow"),
            previous: q.flag("previous"),
            timestamps: q.flag("timestamps"),
            tail_lines: tail.unwrap_or(-1),
            since_seconds: since.unwrap_or(0),
            limit_bytes: limit.unwrap_or(0),
            attach: false,
        };
        let mut rx = self.agents.request(node, shoal_proto::agent::reverse_request::Request::Logs(req)).ok_or_else(|| ApiError::unavailable(format!("the agent of node {node:?} is not connected")))?;
        // The first reply decides the status code; the rest is streamed.
        let first = tokio::time::timeout(std::time::Duration::from_secs(30), rx.recv()).await.map_err(|_| ApiError::timeout(format!("the agent of node {node:?} did not answer")))?.ok_or_else(|| ApiError::unavailable(format!("the agent of node {node:?} went away")))?;
        if !first.error.is_empty() {
            return Err(ApiError::bad_request(first.error));
        }
        let done = first.done;
        let head = futures::stream::once(futures::future::ready(first.data));
        let rest = futures::stream::unfold((rx, done), |(mut rx, done)| async move {
            if done {
                return None;
            }
            let r = rx.recv().await?;
            let d = r.done || !r.error.is_empty();
            Some((r.data, (rx, d)))
        });
        let frames = head.chain(rest).map(|d| Ok::<_, Infallible>(Frame::data(d)));
        Ok(Response::builder().status(200).header(header::CONTENT_TYPE, "text/plain").body(BodyExt::boxed(StreamBody::new(frames))).expect("static headers are valid"))
    }
}

/// Re-encodes a JSON response (object, list or Status) as Kubernetes protobuf. A body the
/// schema cannot express stays JSON (the client accepts both).
async fn to_protobuf(resp: Response<Body>) -> Response<Body> {
    let is_json = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) == Some("application/json");
    if !is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(never) => match never {},
    };
    let encoded = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| crate::schema::encode_k8s_protobuf(&v).ok());
    match encoded {
        Some(pb) => {
            parts.headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/vnd.kubernetes.protobuf"));
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Full::new(Bytes::from(pb)).boxed())
        }
        None => Response::from_parts(parts, Full::new(bytes).boxed()),
    }
}

/// Reads a request body up to `MAX_BODY`. A larger one is drained (bounded in size and
/// time) before the 413 is sent, so HTTP/2 clients get the answer instead of a reset stream.
async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut too_large = false;
    let mut drained = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ApiError::timeout("timed out reading the request body")),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ApiError::bad_request(format!("error reading the request body: {e}"))),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else { continue };
        if too_large {
            drained += data.len();
            if drained > 8 * MAX_BODY {
                break;
            }
            continue;
        }
        if buf.len() + data.len() > MAX_BODY {
            too_large = true;
            buf = bytes::BytesMut::new();
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if too_large {
        return Err(ApiError::too_large(MAX_BODY));
    }
    Ok(buf.freeze())
}

impl Api {
    /// A list served from the watch cache, or None when the cache cannot serve it
    /// (continue tokens and exact revisions go to the store, which keeps history).
    async fn list_cached(&self, def: &'static ResourceDef, served: &'static ResourceDef, ns: &str, q: &Query, want: Want) -> Result<Option<Response<Body>>, ApiError> {
        if q.get("continue").is_some_and(|c| !c.is_empty()) || q.get("resourceVersionMatch") == Some("Exact") || !self.cache.is_ready() {
            return Ok(None);
        }
        match q.get("resourceVersionMatch") {
            None | Some("" | "NotOlderThan") => {}
            Some(_) => return Ok(None),
        }
        match q.get("resourceVersion").unwrap_or("") {
            "" => {
                if self.cache.wait_fresh().await.is_err() {
                    return Ok(None);
                }
            }
            "0" => {}
            n => {
                let n: i64 = n.parse().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {n:?}")))?;
                if !self.cache.wait_for(n, std::time::Duration::from_secs(3)).await {
                    return Ok(None);
                }
            }
        }
        let filter = rest::Filter::from_query(def, q)?;
        let limit: usize = match q.get("limit") {
            Some(l) if !l.is_empty() => l.parse().map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
            _ => 0,
        };
        let prefix = def.prefix(ns);
        let (items, rev, more) = self.cache.snapshot(&prefix, "", &filter, limit);
        let mut md = json!({"resourceVersion": rev.to_string()});
        if more {
            if let Some(last) = items.last() {
                md["continue"] = json!(rest::continue_token(rev, &format!("{}\0", &last.key[prefix.len()..])));
            }
        }
        if matches!(want, Want::Json | Want::Protobuf) && std::ptr::eq(def, served) {
            if want == Want::Json {
                let stream = crate::cache::list_chunks(&format!("{}List", def.kind), &def.api_version(), &md, items, 256 << 10).map(|b| Ok::<_, Infallible>(Frame::data(b)));
                return Ok(Some(Response::builder().status(200).header(header::CONTENT_TYPE, "application/json").header(header::CACHE_CONTROL, "no-cache, private").body(BodyExt::boxed(StreamBody::new(stream))).expect("static headers are valid")));
            }
            let body = crate::cache::list_body(&format!("{}List", def.kind), &def.api_version(), &md, &items);
            return Ok(Some(full(200, "application/json", body)));
        }
        let values: Vec<Value> = items.iter().map(|e| e.value()).collect();
        Ok(Some(match want {
            Want::Table => json_response(200, &table::table(table::kind_of(def), &values, md, Include::parse(q.get("includeObject")))),
            Want::Metadata => {
                let items: Vec<Value> = values.into_iter().map(|v| json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": v["metadata"]})).collect();
                json_response(200, &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": md, "items": items}))
            }
            Want::Json | Want::Protobuf => {
                let items: Vec<Value> = values.into_iter().map(|o| crate::conversion::convert(o, served)).collect();
                json_response(200, &json!({"kind": format!("{}List", served.kind), "apiVersion": served.api_version(), "metadata": md, "items": items}))
            }
        }))
    }
}

/// Keeps the watcher gauge right: decremented when the response body is dropped.
struct WatchGuard {
    family: prometheus_client::metrics::family::Family<Vec<(&'static str, String)>, prometheus_client::metrics::gauge::Gauge>,
    labels: Vec<(&'static str, String)>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.family.get_or_create(&self.labels).dec();
    }
}

/// Decodes a request body by its media type.
fn decode_body(ctype: &str, body: &[u8]) -> Result<Value, ApiError> {
    let media = ctype.split(';').next().unwrap_or("").trim();
    match media {
        "" | "application/json" | "*/*" => serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding the request body as JSON: {e}"))),
        "application/yaml" => parse_yaml(body),
        "application/vnd.kubernetes.protobuf" => crate::schema::decode_k8s_protobuf(body, crate::schema::message_for).map_err(|e| ApiError::bad_request(format!("error decoding the protobuf request body: {e}"))),
        _ => Err(ApiError::unsupported_media(media, &["application/json", "application/yaml", "application/vnd.kubernetes.protobuf"])),
    }
}

/// Parses a YAML body (one document) into JSON.
pub fn parse_yaml(body: &[u8]) -> Result<Value, ApiError> {
    serde_norway::from_slice::<Value>(body).map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: yaml: {e}")))
}

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "35",
        "emulationMajor": "1",
        "emulationMinor": "35",
        "gitVersion": format!("v1.35.0-shoal.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "2026-11-25T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, if std::env::consts::ARCH == "x86_64" { "amd64" } else { std::env::consts::ARCH }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing() {
        let r = route_resource("", "v1", &["namespaces", "d", "pods", "p", "status"]).unwrap();
        assert_eq!((r.def.plural, r.ns.as_str(), r.name.as_str(), r.sub.as_str()), ("pods", "d", "p", "status"));
        let r = route_resource("", "v1", &["namespaces", "d"]).unwrap();
        assert_eq!((r.def.plural, r.name.as_str()), ("namespaces", "d"));
        let r = route_resource("", "v1", &["namespaces", "d", "finalize"]).unwrap();
        assert_eq!((r.def.plural, r.sub.as_str()), ("namespaces", "finalize"));
        let r = route_resource("", "v1", &["watch", "namespaces", "d", "pods"]).unwrap();
        assert!(r.watch_path);
        assert_eq!(route_resource("", "v1", &["pods"]).unwrap().ns, "");
        assert_eq!(route_resource("", "v1", &["nope"]).unwrap_err().code, 404);
        assert_eq!(route_resource("", "v1", &["namespaces", "d", "nodes"]).unwrap_err().code, 404);
        assert_eq!(route_resource("", "v1", &["namespaces", "d", "pods", "p", "bogus"]).unwrap_err().code, 404);
    }

    #[test]
    fn accept_negotiation() {
        assert_eq!(negotiate("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json").unwrap(), Want::Table);
        assert_eq!(negotiate("application/vnd.kubernetes.protobuf,application/json").unwrap(), Want::Protobuf);
        assert_eq!(negotiate("application/vnd.kubernetes.protobuf;as=Table;g=meta.k8s.io;v=v1,application/json").unwrap(), Want::Json);
        assert_eq!(negotiate("").unwrap(), Want::Json);
        assert_eq!(negotiate("text/plain").unwrap_err().code, 406);
        assert_eq!(negotiate("application/json;as=Bogus;g=x;v=y,application/json").unwrap(), Want::Json);
    }

    #[test]
    fn tokens() {
        assert!(token_ok("abc", "abc"));
        assert!(!token_ok("abd", "abc"));
        assert!(!token_ok("ab", "abc"));
    }
}
