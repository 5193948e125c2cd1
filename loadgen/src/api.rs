//! `loadgen api`: Kubernetes API workloads against `shoal server`, on its embedded store
//! and on a real etcd (Debian etcd-server) in the same run: single-object create / get /
//! update / delete of pods with K clients (latency per verb), and LIST of many pods with
//! the server's memory per stored pod.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};

use crate::procs::{self, Proc};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiScenario {
    /// Each client creates, gets, updates and deletes its own pods in a loop.
    Crud,
    /// Create --pods pods, then LIST all of them --lists times.
    List,
    /// --watchers node watchers (`fieldSelector=spec.nodeName=node-N`, as node agents
    /// watch), then --events pods created for random nodes: delivery latency per event.
    Watch,
    /// crud and list.
    All,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiStore {
    /// `shoal server` on its embedded store.
    Embedded,
    /// `shoal server --store etcd://...` on a real etcd.
    Etcd,
    Both,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    #[arg(long, value_enum, default_value_t = ApiScenario::All)]
    pub scenario: ApiScenario,
    /// Which stores to run the API server on.
    #[arg(long, value_enum, default_value_t = ApiStore::Both)]
    pub store: ApiStore,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// HTTP/2 connections the clients share.
    #[arg(long, default_value_t = 4)]
    pub conns: usize,
    /// Seconds the crud case runs.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Pods created before the list case.
    #[arg(long, default_value_t = 150_000)]
    pub pods: usize,
    /// LIST requests of all pods in the list case.
    #[arg(long, default_value_t = 5)]
    pub lists: usize,
    /// Node watchers in the watch case.
    #[arg(long, default_value_t = 5000)]
    pub watchers: usize,
    /// Pods created (one event each) in the watch case.
    #[arg(long, default_value_t = 5000)]
    pub events: usize,
    /// The shoal binary (default: the one beside loadgen).
    #[arg(long)]
    pub shoal_bin: Option<std::path::PathBuf>,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: String,
    /// Extra arguments for `shoal server`, e.g. `--shoal-arg=--snapshot-count=10000`.
    #[arg(long = "shoal-arg", allow_hyphen_values = true)]
    pub shoal_args: Vec<String>,
    /// Directory under which data directories are created (default /var/tmp).
    #[arg(long)]
    pub data_base: Option<std::path::PathBuf>,
}

/// An HTTP/2 client of the API with the admin token, over a few TLS connections.
#[derive(Clone)]
struct Client {
    senders: Vec<hyper::client::conn::http2::SendRequest<Full<Bytes>>>,
    token: Arc<str>,
    authority: Arc<str>,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr, data_dir: &std::path::Path, conns: usize) -> anyhow::Result<Client> {
        let pki = data_dir.join("pki");
        let t = Instant::now();
        while !pki.join("admin.token").exists() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the server wrote no credentials under {}", pki.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ca = std::fs::read_to_string(pki.join("ca.crt")).context("while reading the cluster CA")?;
        let token = std::fs::read_to_string(pki.join("admin.token"))?.trim().to_string();
        let mut roots = rustls::RootCertStore::empty();
        for c in shoal_client::pem_certs(&ca) {
            roots.add(c)?;
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let mut senders = Vec::new();
        for _ in 0..conns.max(1) {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("localhost")?.to_owned();
            let tls = connector.connect(name, tcp).await.context("TLS handshake with the API server")?;
            let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            senders.push(sender);
        }
        Ok(Client { senders, token: token.into(), authority: format!("localhost:{}", addr.port()).into() })
    }

    async fn req(&self, i: usize, method: Method, path: &str, ctype: &str, body: Option<Bytes>) -> anyhow::Result<(u16, Bytes)> {
        let mut s = self.senders[i % self.senders.len()].clone();
        s.ready().await?;
        let req = Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.authority))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", ctype)
            .header("accept", "application/json")
            .body(Full::new(body.unwrap_or_default()))?;
        let resp = s.send_request(req).await?;
        let status = resp.status().as_u16();
        let b = resp.into_body().collect().await?.to_bytes();
        Ok((status, b))
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            if let Ok((200, _)) = self.req(0, Method::GET, "/readyz", "application/json", None).await {
                if let Ok((200, _)) = self.req(0, Method::GET, "/api/v1/namespaces/default", "application/json", None).await {
                    return Ok(());
                }
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the API server did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn pod(name: &str, i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "lg", "labels": {"app": "loadgen", "group": format!("g{}", i % 50)}, "annotations": {"loadgen/index": i.to_string()}},
        "spec": {
            "nodeName": format!("node-{}", i % 5000),
            "containers": [{
                "name": "app", "image": "registry.local/app:1.0", "command": ["/bin/app", "--serve", "--port=8080"],
                "env": [{"name": "MODE", "value": "bench"}, {"name": "POD_INDEX", "value": i.to_string()}],
                "ports": [{"containerPort": 8080, "name": "http"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "200m", "memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
            }],
        },
    })
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

/// A system under test: the API server process and, for the etcd case, etcd.
struct System {
    name: &'static str,
    api: Proc,
    data_dir: std::path::PathBuf,
    etcd: Vec<Proc>,
    client: Client,
}

impl System {
    fn pids(&self) -> Vec<u32> {
        let mut p = vec![self.api.pid()];
        p.extend(self.etcd.iter().map(Proc::pid));
        p
    }
    fn cpu(&self) -> f64 {
        self.pids().into_iter().filter_map(procs::cpu_seconds).sum()
    }
    fn rss(&self) -> f64 {
        self.pids().into_iter().filter_map(procs::rss_mib).sum()
    }
}

async fn start(a: &ApiArgs, which: &'static str) -> anyhow::Result<System> {
    let bin = a.shoal_bin.clone().unwrap_or_else(procs::default_shoal_bin);
    let (etcd, store) = if which == "etcd" {
        let e = procs::start_etcd(&a.etcd_bin, a.data_base.as_deref(), 1)?;
        let s = format!("etcd://{}", e[0].endpoint);
        (e, Some(s))
    } else {
        (vec![], None)
    };
    let (api, dir) = procs::start_shoal_api(&bin, a.data_base.as_deref(), store.as_deref(), &a.shoal_args)?;
    let client = Client::connect(api.endpoint, &dir, a.conns).await?;
    client.wait_ready().await?;
    let (code, body) = client.req(0, Method::POST, "/api/v1/namespaces", "application/json", Some(Bytes::from(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lg"}}).to_string()))).await?;
    if code != 201 && code != 409 {
        bail!("creating namespace lg: {code} {}", String::from_utf8_lossy(&body));
    }
    Ok(System { name: which, api, data_dir: dir, etcd, client })
}

fn bar(len: u64, msg: String) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template("{msg:28} [{bar:40}] {pos}/{len} {elapsed}").expect("static template").progress_chars("=> "));
    pb.set_message(msg);
    pb
}

/// The crud case: per-verb latencies and server CPU per request.
async fn crud(sys: &System, a: &ApiArgs) -> anyhow::Result<Map<String, Value>> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let pb = bar(a.duration, format!("{} crud", sys.name));
    let cpu0 = sys.cpu();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let client = sys.client.clone();
        let stop = stop.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: [Vec<u32>; 4] = Default::default();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("c{c}-{n}");
                n += 1;
                let base = "/api/v1/namespaces/lg/pods";
                let t = Instant::now();
                let r = client.req(c, Method::POST, base, "application/json", Some(Bytes::from(pod(&name, n).to_string()))).await;
                lat[0].push(t.elapsed().as_micros() as u32);
                let Ok((201, body)) = r else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let t = Instant::now();
                let r = client.req(c, Method::GET, &format!("{base}/{name}"), "application/json", None).await;
                lat[1].push(t.elapsed().as_micros() as u32);
                if !matches!(r, Ok((200, _))) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                let mut obj: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                obj["metadata"]["labels"]["updated"] = json!("yes");
                let t = Instant::now();
                let r = client.req(c, Method::PUT, &format!("{base}/{name}"), "application/json", Some(Bytes::from(obj.to_string()))).await;
                lat[2].push(t.elapsed().as_micros() as u32);
                if !matches!(r, Ok((200, _))) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                let t = Instant::now();
                let r = client.req(c, Method::DELETE, &format!("{base}/{name}"), "application/json", None).await;
                lat[3].push(t.elapsed().as_micros() as u32);
                if !matches!(r, Ok((200, _))) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    for _ in 0..a.duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        pb.inc(1);
    }
    stop.store(true, Ordering::Relaxed);
    let mut all: [Vec<u32>; 4] = Default::default();
    for t in tasks {
        let l = t.await?;
        for (i, v) in l.into_iter().enumerate() {
            all[i].extend(v);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = sys.cpu() - cpu0;
    pb.finish_and_clear();
    let mut m = Map::new();
    let mut total = 0usize;
    let mut worst_p99 = 0f64;
    for (i, verb) in ["create", "get", "update", "delete"].iter().enumerate() {
        all[i].sort_unstable();
        total += all[i].len();
        let p99 = pct(&all[i], 0.99);
        worst_p99 = worst_p99.max(p99);
        m.insert(format!("{}_{verb}_p50_ms", sys.name), json!(pct(&all[i], 0.5)));
        m.insert(format!("{}_{verb}_p99_ms", sys.name), json!(p99));
    }
    m.insert(format!("{}_requests_per_s", sys.name), json!(total as f64 / secs));
    m.insert(format!("{}_p99_ms", sys.name), json!(worst_p99));
    m.insert(format!("{}_errors", sys.name), json!(errors.load(Ordering::Relaxed)));
    m.insert(format!("{}_server_cpu_us_per_op", sys.name), json!(if total > 0 { cpu * 1e6 / total as f64 } else { 0.0 }));
    Ok(m)
}

/// The list case: create pods, then LIST them all.
async fn list(sys: &System, a: &ApiArgs) -> anyhow::Result<Map<String, Value>> {
    let rss0 = sys.rss();
    let pb = bar(a.pods as u64, format!("{} create {} pods", sys.name, a.pods));
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stored = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..a.clients.max(16) {
        let (client, next, errors, stored, pb, n) = (sys.client.clone(), next.clone(), errors.clone(), stored.clone(), pb.clone(), a.pods as u64);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let body = Bytes::from(pod(&format!("p-{i}"), i as usize).to_string());
                match client.req(c, Method::POST, "/api/v1/namespaces/lg/pods", "application/json", Some(body)).await {
                    Ok((201, b)) => {
                        stored.fetch_add(b.len() as u64, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                pb.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let create_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let rss_created = sys.rss();
    let pb = bar(a.lists as u64, format!("{} list all pods", sys.name));
    let mut lat = Vec::new();
    let mut bytes = 0usize;
    let mut items = 0usize;
    for _ in 0..a.lists {
        let t = Instant::now();
        let (code, body) = sys.client.req(0, Method::GET, "/api/v1/pods", "application/json", None).await?;
        lat.push(t.elapsed().as_micros() as u32);
        if code != 200 {
            bail!("LIST pods answered {code}");
        }
        bytes = body.len();
        let v: Value = serde_json::from_slice(&body)?;
        items = v["items"].as_array().map_or(0, Vec::len);
        pb.inc(1);
    }
    pb.finish_and_clear();
    lat.sort_unstable();
    let rss1 = sys.rss();
    let mut m = Map::new();
    let n = sys.name;
    m.insert(format!("{n}_pods"), json!(items));
    m.insert(format!("{n}_create_errors"), json!(errors.load(Ordering::Relaxed)));
    m.insert(format!("{n}_creates_per_s"), json!(a.pods as f64 / create_secs));
    m.insert(format!("{n}_list_p50_ms"), json!(pct(&lat, 0.5)));
    m.insert(format!("{n}_list_p99_ms"), json!(pct(&lat, 0.99)));
    m.insert(format!("{n}_list_mib"), json!(bytes as f64 / (1 << 20) as f64));
    m.insert(format!("{n}_stored_mib"), json!(stored.load(Ordering::Relaxed) as f64 / (1 << 20) as f64));
    m.insert(format!("{n}_rss_mib"), json!(rss1));
    m.insert(format!("{n}_rss_after_create_mib"), json!(rss_created));
    m.insert(format!("{n}_rss_growth_mib"), json!(rss1 - rss0));
    m.insert(format!("{n}_rss_bytes_per_pod"), json!((rss1 - rss0) * (1 << 20) as f64 / a.pods.max(1) as f64));
    Ok(m)
}

/// The watch case: node watchers, then pods for random nodes; latency from create to the
/// node's watcher.
async fn watch(sys: &System, a: &ApiArgs) -> anyhow::Result<Map<String, Value>> {
    let conns = a.watchers.div_ceil(900).max(1);
    let addr = sys.api.endpoint;
    let wclient = Client::connect(addr, &sys_dir(sys), conns).await?;
    let epoch = Instant::now();
    let lat = Arc::new(parking_lot_free::Lat::default());
    let pb = bar(a.watchers as u64, format!("{} open {} watches", sys.name, a.watchers));
    let mut streams = Vec::new();
    for i in 0..a.watchers {
        let mut s = wclient.senders[i % wclient.senders.len()].clone();
        s.ready().await?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("https://{}/api/v1/namespaces/lg/pods?watch=1&fieldSelector=spec.nodeName%3Dnode-{i}", wclient.authority))
            .header("authorization", format!("Bearer {}", wclient.token))
            .body(Full::new(Bytes::new()))?;
        let resp = s.send_request(req).await?;
        if resp.status() != 200 {
            bail!("watch {i} answered {}", resp.status());
        }
        let lat = lat.clone();
        streams.push(tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                        if let Some(sent) = v.pointer("/object/metadata/annotations/loadgen~1sent-us").and_then(Value::as_str).and_then(|s| s.parse::<u64>().ok()) {
                            lat.push((epoch.elapsed().as_micros() as u64).saturating_sub(sent) as u32);
                        }
                    }
                }
            }
        }));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let cpu0 = sys.cpu();
    let pb = bar(a.events as u64, format!("{} create {} pods", sys.name, a.events));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..16 {
        let (client, next, pb, n, w) = (sys.client.clone(), next.clone(), pb.clone(), a.events as u64, a.watchers.max(1));
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let mut p = pod(&format!("w-{i}"), i as usize);
                p["spec"]["nodeName"] = json!(format!("node-{}", (i as usize * 7919) % w));
                p["metadata"]["annotations"]["loadgen/sent-us"] = json!((epoch.elapsed().as_micros() as u64).to_string());
                let _ = client.req(c, Method::POST, "/api/v1/namespaces/lg/pods", "application/json", Some(Bytes::from(p.to_string()))).await;
                pb.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let t = Instant::now();
    while lat.len() < a.events && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pb.finish_and_clear();
    let cpu = sys.cpu() - cpu0;
    for s in streams {
        s.abort();
    }
    let mut l = lat.take();
    l.sort_unstable();
    let n = sys.name;
    let mut m = Map::new();
    m.insert(format!("{n}_watchers"), json!(a.watchers));
    m.insert(format!("{n}_events_delivered"), json!(l.len()));
    m.insert(format!("{n}_lost"), json!(a.events.saturating_sub(l.len())));
    m.insert(format!("{n}_watch_p50_ms"), json!(pct(&l, 0.5)));
    m.insert(format!("{n}_watch_p99_ms"), json!(pct(&l, 0.99)));
    m.insert(format!("{n}_server_cpu_us_per_event"), json!(cpu * 1e6 / a.events.max(1) as f64));
    println!("{n}: {} watchers, {} events delivered, p50 {:.1} ms, p99 {:.1} ms, {:.0} us server CPU per event (create + fan-out)", a.watchers, l.len(), pct(&l, 0.5), pct(&l, 0.99), cpu * 1e6 / a.events.max(1) as f64);
    Ok(m)
}

fn sys_dir(sys: &System) -> std::path::PathBuf {
    sys.data_dir.clone()
}

mod parking_lot_free {
    /// Latencies collected from many tasks.
    #[derive(Default)]
    pub struct Lat(std::sync::Mutex<Vec<u32>>);
    impl Lat {
        pub fn push(&self, v: u32) {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(v);
        }
        pub fn len(&self) -> usize {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
        }
        pub fn take(&self) -> Vec<u32> {
            std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
        }
    }
}

pub async fn run(a: ApiArgs) -> anyhow::Result<Value> {
    if a.clients == 0 || a.conns == 0 {
        bail!("--clients and --conns must be at least 1");
    }
    let systems: Vec<&'static str> = match a.store {
        ApiStore::Embedded => vec!["embedded"],
        ApiStore::Etcd => vec!["etcd"],
        ApiStore::Both => vec!["embedded", "etcd"],
    };
    let mut out = Map::new();
    let name = match a.scenario {
        ApiScenario::Crud => "api/crud",
        ApiScenario::List => "api/list",
        ApiScenario::Watch => "api/watch",
        ApiScenario::All => "api/all",
    };
    out.insert("scenario".into(), json!(name));
    println!("{:<10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12}", "store", "create p99", "get p99", "update p99", "delete p99", "req/s", "list p99", "rss B/pod");
    for s in systems {
        let sys = start(&a, s).await?;
        let mut m = Map::new();
        if matches!(a.scenario, ApiScenario::Crud | ApiScenario::All) {
            m.extend(crud(&sys, &a).await?);
        }
        if matches!(a.scenario, ApiScenario::List | ApiScenario::All) {
            m.extend(list(&sys, &a).await?);
        }
        if a.scenario == ApiScenario::Watch {
            m.extend(watch(&sys, &a).await?);
        }
        let f = |k: &str| m.get(&format!("{s}_{k}")).and_then(Value::as_f64).map_or("-".to_string(), |v| format!("{v:.1}"));
        println!("{:<10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12}", s, f("create_p99_ms"), f("get_p99_ms"), f("update_p99_ms"), f("delete_p99_ms"), f("requests_per_s"), f("list_p99_ms"), f("rss_bytes_per_pod"));
        out.extend(m);
    }
    if let Some(p) = out.get("embedded_p99_ms").cloned() {
        out.insert("p99_ms".into(), p);
    }
    if let (Some(e), Some(x)) = (out.get("embedded_requests_per_s").and_then(Value::as_f64), out.get("etcd_requests_per_s").and_then(Value::as_f64)) {
        out.insert("ratio".into(), json!(e / x));
    }
    Ok(Value::Object(out))
}
