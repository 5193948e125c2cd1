//! A small Kubernetes API client for Shoal's own components (controllers, scheduler, agent,
//! loadgen): HTTPS with the cluster CA, HTTP/2 multiplexed over a few connections that are
//! re-established when they break, JSON objects as `serde_json::Value`, and list + watch.
//! It speaks only the public REST API: components never reach into the API server.

#![forbid(unsafe_code)]

pub mod events;
pub mod leader;
pub mod quantity;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use serde_json::Value;

/// An error answered by the API server (its `Status`) or met on the way.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{code} {reason}: {message}")]
    Api { code: u16, reason: String, message: String },
    #[error("{0}")]
    Transport(String),
}

impl Error {
    pub fn code(&self) -> u16 {
        match self {
            Error::Api { code, .. } => *code,
            Error::Transport(_) => 0,
        }
    }
    pub fn is_not_found(&self) -> bool {
        self.code() == 404
    }
    pub fn is_conflict(&self) -> bool {
        self.code() == 409
    }
}

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct Config {
    /// `https://host:port`
    pub server: String,
    pub ca_pem: String,
    pub token: String,
    /// Sent as User-Agent (the field manager of updates).
    pub user_agent: String,
}

impl Config {
    /// Reads a kubeconfig (the current context's cluster and a token user).
    pub fn from_kubeconfig(path: &std::path::Path, user_agent: &str) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let k: Value = serde_norway::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not a kubeconfig: {e}", path.display()))?;
        let ctx_name = k["current-context"].as_str().unwrap_or("");
        let ctx = k["contexts"].as_array().and_then(|a| a.iter().find(|c| c["name"] == ctx_name)).map(|c| c["context"].clone()).unwrap_or(Value::Null);
        let cluster = k["clusters"].as_array().and_then(|a| a.iter().find(|c| c["name"] == ctx["cluster"])).map(|c| c["cluster"].clone()).ok_or_else(|| anyhow::anyhow!("kubeconfig: no cluster for context {ctx_name:?}"))?;
        let user = k["users"].as_array().and_then(|a| a.iter().find(|c| c["name"] == ctx["user"])).map(|c| c["user"].clone()).ok_or_else(|| anyhow::anyhow!("kubeconfig: no user for context {ctx_name:?}"))?;
        let ca = base64::engine::general_purpose::STANDARD.decode(cluster["certificate-authority-data"].as_str().unwrap_or("")).map_err(|e| anyhow::anyhow!("kubeconfig: certificate-authority-data: {e}"))?;
        Ok(Config {
            server: cluster["server"].as_str().unwrap_or("").to_string(),
            ca_pem: String::from_utf8(ca)?,
            token: user["token"].as_str().unwrap_or("").to_string(),
            user_agent: user_agent.to_string(),
        })
    }
}

/// The certificates of a PEM bundle.
pub fn pem_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let mut out = Vec::new();
    for block in pem.split("-----BEGIN CERTIFICATE-----").skip(1) {
        let b64: String = block.split("-----END CERTIFICATE-----").next().unwrap_or("").chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b64) {
            out.push(der.into());
        }
    }
    out
}

/// The API client; cheap to clone.
#[derive(Clone)]
pub struct Client {
    cfg: Arc<Config>,
    tls: tokio_rustls::TlsConnector,
    authority: Arc<str>,
    addr: Arc<str>,
    conns: Arc<parking_lot::Mutex<Vec<Option<SendRequest<Full<Bytes>>>>>>,
}

impl Client {
    pub fn new(cfg: Config, conns: usize) -> anyhow::Result<Client> {
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs(&cfg.ca_pem) {
            roots.add(c)?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider())).with_safe_default_protocol_versions()?.with_root_certificates(roots).with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let hostport = cfg.server.trim_start_matches("https://").trim_end_matches('/').to_string();
        Ok(Client {
            cfg: Arc::new(cfg),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            authority: hostport.clone().into(),
            addr: hostport.into(),
            conns: Arc::new(parking_lot::Mutex::new(vec![None; conns.max(1)])),
        })
    }

    async fn sender(&self, i: usize) -> Result<SendRequest<Full<Bytes>>, Error> {
        let slot = i % self.conns.lock().len();
        let existing = self.conns.lock()[slot].clone();
        if let Some(s) = existing {
            if !s.is_closed() {
                return Ok(s);
            }
        }
        let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&*self.addr)).await.map_err(|_| Error::Transport(format!("connecting to {} timed out", self.addr)))?.map_err(|e| Error::Transport(format!("connecting to {}: {e}", self.addr)))?;
        let _ = tcp.set_nodelay(true);
        let host = self.addr.rsplit_once(':').map_or(&*self.addr, |(h, _)| h).trim_matches(['[', ']']).to_string();
        let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| Error::Transport(e.to_string()))?;
        let tls = self.tls.connect(name, tcp).await.map_err(|e| Error::Transport(format!("TLS: {e}")))?;
        let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls)).await.map_err(|e| Error::Transport(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.conns.lock()[slot] = Some(sender.clone());
        Ok(sender)
    }

    async fn send(&self, method: Method, path: &str, ctype: &str, body: Option<Bytes>) -> Result<hyper::Response<hyper::body::Incoming>, Error> {
        let mut s = self.sender(path.len()).await?;
        s.ready().await.map_err(|e| Error::Transport(e.to_string()))?;
        let req = Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.authority))
            .header("authorization", format!("Bearer {}", self.cfg.token))
            .header("content-type", ctype)
            .header("accept", "application/json")
            .header("user-agent", &self.cfg.user_agent)
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Error::Transport(e.to_string()))?;
        s.send_request(req).await.map_err(|e| Error::Transport(e.to_string()))
    }

    /// One request; a non-2xx answer is an `Error::Api` built from its Status.
    pub async fn request(&self, method: Method, path: &str, ctype: &str, body: Option<Bytes>) -> Result<Value, Error> {
        let resp = self.send(method, path, ctype, body).await?;
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(|e| Error::Transport(e.to_string()))?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if (200..300).contains(&code) {
            Ok(v)
        } else {
            Err(Error::Api { code, reason: v["reason"].as_str().unwrap_or("").to_string(), message: v["message"].as_str().unwrap_or("").to_string() })
        }
    }

    /// A GET whose answer is text (`/metrics`, logs).
    pub async fn get_text(&self, path: &str) -> Result<String, Error> {
        let resp = self.send(Method::GET, path, "", None).await?;
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(|e| Error::Transport(e.to_string()))?.to_bytes();
        if (200..300).contains(&code) {
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        } else {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Err(Error::Api { code, reason: v["reason"].as_str().unwrap_or("").to_string(), message: v["message"].as_str().unwrap_or_else(|| std::str::from_utf8(&bytes).unwrap_or("")).to_string() })
        }
    }

    pub async fn get(&self, path: &str) -> Result<Option<Value>, Error> {
        match self.request(Method::GET, path, "application/json", None).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }
    pub async fn create(&self, path: &str, obj: &Value) -> Result<Value, Error> {
        self.request(Method::POST, path, "application/json", Some(Bytes::from(obj.to_string()))).await
    }
    pub async fn update(&self, path: &str, obj: &Value) -> Result<Value, Error> {
        self.request(Method::PUT, path, "application/json", Some(Bytes::from(obj.to_string()))).await
    }
    pub async fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value, Error> {
        self.request(Method::PATCH, path, "application/merge-patch+json", Some(Bytes::from(patch.to_string()))).await
    }
    /// PATCH with a strategic merge patch (lists such as conditions merge by their key).
    pub async fn strategic_patch(&self, path: &str, patch: &Value) -> Result<Value, Error> {
        self.request(Method::PATCH, path, "application/strategic-merge-patch+json", Some(Bytes::from(patch.to_string()))).await
    }
    /// DELETE with a propagation policy (`Background`, `Foreground`, `Orphan`); a missing
    /// object is not an error.
    pub async fn delete(&self, path: &str, propagation: Option<&str>) -> Result<(), Error> {
        let body = propagation.map(|p| Bytes::from(serde_json::json!({"propagationPolicy": p}).to_string()));
        match self.request(Method::DELETE, path, "application/json", body).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A full list (all pages): the items and the list's resourceVersion.
    pub async fn list(&self, path: &str) -> Result<(Vec<Value>, String), Error> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut items = Vec::new();
        let mut cont = String::new();
        loop {
            let p = if cont.is_empty() { format!("{path}{sep}limit=5000") } else { format!("{path}{sep}limit=5000&continue={cont}") };
            let v = self.request(Method::GET, &p, "application/json", None).await?;
            if let Some(a) = v["items"].as_array() {
                items.extend(a.iter().cloned());
            }
            cont = v.pointer("/metadata/continue").and_then(Value::as_str).unwrap_or("").to_string();
            if cont.is_empty() {
                return Ok((items, v.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or("").to_string()));
            }
        }
    }

    /// Watches `path` from `rv`; events arrive on the returned channel as
    /// (type, object) until the stream ends (the caller re-watches or relists).
    pub async fn watch(&self, path: &str, rv: &str) -> Result<tokio::sync::mpsc::Receiver<(String, Value)>, Error> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let p = format!("{path}{sep}watch=1&allowWatchBookmarks=true&resourceVersion={rv}");
        let resp = self.send(Method::GET, &p, "application/json", None).await?;
        let code = resp.status().as_u16();
        if code != 200 {
            return Err(Error::Api { code, reason: String::new(), message: format!("watch of {path} answered {code}") });
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut buf: Vec<u8> = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let Ok(v) = serde_json::from_slice::<Value>(&line) else { continue };
                    let ty = v["type"].as_str().unwrap_or("").to_string();
                    if tx.send((ty, v["object"].clone())).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// Label selectors given as `metav1.LabelSelector` objects (matchLabels, matchExpressions).
pub mod selector {
    use serde_json::{Map, Value};

    /// Whether `labels` satisfy `sel`. An empty selector matches everything; a null one nothing.
    pub fn matches(sel: &Value, labels: Option<&Map<String, Value>>) -> bool {
        matches_with(sel, |k| labels.and_then(|l| l.get(k)).and_then(Value::as_str))
    }

    /// [`matches`] over labels looked up by `get` (for callers with their own label type).
    pub fn matches_with<'a>(sel: &Value, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        if sel.is_null() {
            return false;
        }
        for (k, v) in sel.get("matchLabels").and_then(Value::as_object).into_iter().flatten() {
            if get(k) != v.as_str() {
                return false;
            }
        }
        for e in sel.get("matchExpressions").and_then(Value::as_array).into_iter().flatten() {
            let key = e["key"].as_str().unwrap_or("");
            let vals: Vec<&str> = e.get("values").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            let ok = match e["operator"].as_str().unwrap_or("") {
                "In" => get(key).is_some_and(|v| vals.contains(&v)),
                "NotIn" => get(key).is_none_or(|v| !vals.contains(&v)),
                "Exists" => get(key).is_some(),
                "DoesNotExist" => get(key).is_none(),
                _ => false,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

/// Timestamps as the API writes them.
pub mod time {
    /// Seconds since the Unix epoch.
    pub fn now_secs() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
    }

    /// RFC 3339 UTC with microseconds (`metav1.MicroTime`).
    pub fn now_micro() -> String {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        format!("{}.{:06}Z", format(d.as_secs() as i64).trim_end_matches('Z'), d.subsec_micros())
    }

    /// RFC 3339 UTC with nanoseconds (the CRI log format's time stamps).
    pub fn now_nanos() -> String {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        format!("{}.{:09}Z", format(d.as_secs() as i64).trim_end_matches('Z'), d.subsec_nanos())
    }

    /// RFC 3339 UTC with seconds (`metav1.Time`).
    pub fn format(unix: i64) -> String {
        let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
    }

    /// Parses RFC 3339 (fractions ignored, `Z` or offset) to Unix seconds.
    pub fn parse(s: &str) -> Option<i64> {
        let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
        let (y, mo, d, h, mi, se) = (n(0..4)?, n(5..7)?, n(8..10)?, n(11..13)?, n(14..16)?, n(17..19)?);
        let mut rest = s.get(19..)?;
        if let Some(r) = rest.strip_prefix('.') {
            rest = &r[r.bytes().take_while(u8::is_ascii_digit).count()..];
        }
        let off = match rest {
            "Z" | "z" => 0,
            r => {
                let sign = if r.starts_with('-') { -1 } else { 1 };
                sign * (r.get(1..3)?.parse::<i64>().ok()? * 3600 + r.get(4..6)?.parse::<i64>().ok()? * 60)
            }
        };
        let y = if mo <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = if mo > 2 { mo - 3 } else { mo + 9 };
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + (153 * mp + 2) / 5 + d - 1;
        Some((era * 146_097 + doe - 719_468) * 86_400 + h * 3600 + mi * 60 + se - off)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trip() {
            for t in [0, 951_782_400, 1_795_564_861] {
                assert_eq!(super::parse(&super::format(t)), Some(t));
            }
            assert!(super::now_micro().ends_with('Z'));
        }
    }
}
