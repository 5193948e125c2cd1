//! A client of the OCI distribution API (Docker Registry HTTP API v2): manifests by tag or
//! digest, blobs streamed to a file with their sha256 checked, bearer-token and basic
//! authentication, redirects. Plain HTTP only for registries named insecure (loopback
//! addresses are, as Docker treats `127.0.0.0/8`).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

use super::reference::Reference;
use super::unpack::hex;

/// Accepted manifest types, most specific first.
pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// User name and password for a registry (from an imagePullSecret).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// Why a registry call failed, in the words kubelet shows.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A manifest (tag or digest) the registry does not have.
    #[error("failed to resolve reference \"{0}\": {0}: not found")]
    NotFound(String),
    #[error("pull access denied, repository does not exist or may require authorization: {0}")]
    Unauthorized(String),
    #[error("unexpected status from {method} request to {url}: {status}{detail}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        detail: String,
    },
    #[error("failed to do request: {method} {url:?}: {err}")]
    Transport {
        method: &'static str,
        url: String,
        err: String,
    },
    #[error("failed commit on ref \"{digest}\": unexpected commit digest {got}, expected {digest}: failed precondition")]
    Digest { digest: String, got: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Talks to registries.
pub struct Registry {
    tls: tokio_rustls::TlsConnector,
    insecure: Vec<String>,
    timeout: Duration,
}

struct Url {
    https: bool,
    host: String,
    port: u16,
    path: String,
}

fn parse_url(u: &str) -> Option<Url> {
    let (https, rest) = if let Some(r) = u.strip_prefix("https://") {
        (true, r)
    } else {
        (false, u.strip_prefix("http://")?)
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h.to_string(), p.parse().ok()?),
        _ => (hostport.to_string(), if https { 443 } else { 80 }),
    };
    Some(Url {
        https,
        host,
        port,
        path,
    })
}

/// `Bearer realm="…",service="…",scope="…"` → (scheme, params).
fn parse_challenge(h: &str) -> (String, Vec<(String, String)>) {
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let Some((k, v)) = s.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_string();
        let v = v.trim_start();
        let (val, rest) = if let Some(q) = v.strip_prefix('"') {
            match q.find('"') {
                Some(i) => (q[..i].to_string(), &q[i + 1..]),
                None => (q.to_string(), ""),
            }
        } else {
            match v.find(',') {
                Some(i) => (v[..i].to_string(), &v[i..]),
                None => (v.to_string(), ""),
            }
        };
        params.push((k, val));
        s = rest.trim_start_matches(',').trim();
    }
    (scheme.to_ascii_lowercase(), params)
}

/// An OS error in the words Go's net package uses (what users of containerd know).
fn go_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect: connection refused".into(),
        std::io::ErrorKind::TimedOut => "i/o timeout".into(),
        std::io::ErrorKind::HostUnreachable => "connect: no route to host".into(),
        std::io::ErrorKind::NetworkUnreachable => "connect: network is unreachable".into(),
        _ => {
            let s = e.to_string();
            s.split(" (os error").next().unwrap_or(&s).to_lowercase()
        }
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One HTTP/1.1 request on a fresh connection.
async fn send_http1<IO>(io: IO, req: http::Request<http_body_util::Empty<bytes::Bytes>>) -> Result<http::Response<Incoming>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    send.send_request(req).await.map_err(|e| e.to_string())
}

/// A whole response body (small ones: manifests, tokens, error documents).
async fn body(resp: http::Response<Incoming>, url: &str) -> Result<bytes::Bytes, RegistryError> {
    Ok(resp.into_body().collect().await.map_err(|e| RegistryError::Transport { method: "GET", url: url.to_string(), err: e.to_string() })?.to_bytes())
}

/// The message in a registry's error body (`{"errors":[{"message":…}]}`), if any.
fn registry_message(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    match v["errors"][0]["message"].as_str() {
        Some(m) => format!(": {m}"),
        None => String::new(),
    }
}

impl Registry {
    /// A client trusting the system's CA bundle; `insecure` registries (`host:port`) are
    /// spoken to over plain HTTP.
    pub fn new(insecure: Vec<String>) -> Registry {
        let mut roots = rustls::RootCertStore::empty();
        if let Ok(pem) = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt") {
            for c in shoal_client::pem_certs(&pem) {
                let _ = roots.add(c);
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Registry {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            insecure,
            timeout: Duration::from_secs(60),
        }
    }

    fn is_insecure(&self, host: &str) -> bool {
        let h = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
        self.insecure.iter().any(|i| i == host || i == h)
            || h == "localhost"
            || h.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| a.is_loopback())
    }

    fn base(&self, r: &Reference) -> String {
        let host = r.api_host();
        format!(
            "{}://{host}",
            if self.is_insecure(host) {
                "http"
            } else {
                "https"
            }
        )
    }

    /// One GET (no redirects, no auth handling).
    async fn get_once(
        &self,
        url: &str,
        accept: &str,
        auth: Option<&str>,
    ) -> Result<http::Response<Incoming>, RegistryError> {
        let transport = |err: String| RegistryError::Transport {
            method: "GET",
            url: url.to_string(),
            err,
        };
        let u = parse_url(url).ok_or_else(|| transport("not an http(s) URL".into()))?;
        let fut = async {
            let tcp =
                TcpStream::connect((u.host.trim_start_matches('[').trim_end_matches(']'), u.port))
                    .await
                    .map_err(|e| transport(format!("dial tcp {}:{}: {}", u.host, u.port, go_error(&e))))?;
            let _ = tcp.set_nodelay(true);
            let mut req = http::Request::get(&u.path)
                .header(
                    "host",
                    if (u.https && u.port == 443) || (!u.https && u.port == 80) {
                        u.host.clone()
                    } else {
                        format!("{}:{}", u.host, u.port)
                    },
                )
                .header("user-agent", "shoal-agent/0.1")
                .header("accept", accept);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let req = req
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .map_err(|e| transport(e.to_string()))?;
            if u.https {
                let name = rustls::pki_types::ServerName::try_from(u.host.clone())
                    .map_err(|e| transport(e.to_string()))?;
                let tls = self
                    .tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| transport(format!("tls: {e}")))?;
                send_http1(tls, req).await.map_err(transport)
            } else {
                send_http1(tcp, req).await.map_err(transport)
            }
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| transport("timed out".into()))?
    }

    /// GET following redirects and answering an authentication challenge once.
    async fn get(
        &self,
        r: &Reference,
        url: String,
        accept: &str,
        creds: Option<&Credentials>,
        token: &mut Option<String>,
    ) -> Result<http::Response<Incoming>, RegistryError> {
        let mut url = url;
        let mut challenged = false;
        for _ in 0..8 {
            // Credentials go only to the registry itself, not to where it redirects.
            let ours = url.starts_with(&self.base(r));
            let auth = if ours { token.clone() } else { None };
            let resp = self.get_once(&url, accept, auth.as_deref()).await?;
            let status = resp.status().as_u16();
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let loc = resp
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                url = if loc.starts_with('/') {
                    format!("{}{loc}", self.base(r))
                } else {
                    loc
                };
                continue;
            }
            if status == 401 && ours && !challenged {
                challenged = true;
                let ch = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                *token = Some(self.authenticate(r, &ch, creds).await?);
                continue;
            }
            return Ok(resp);
        }
        Err(RegistryError::Transport {
            method: "GET",
            url,
            err: "stopped after 8 redirects".into(),
        })
    }

    /// Answers a `WWW-Authenticate` challenge: the `Authorization` header to send.
    async fn authenticate(
        &self,
        r: &Reference,
        challenge: &str,
        creds: Option<&Credentials>,
    ) -> Result<String, RegistryError> {
        let basic = creds.map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.username, c.password))
            )
        });
        let (scheme, params) = parse_challenge(challenge);
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        match scheme.as_str() {
            "basic" => basic.ok_or_else(|| RegistryError::Unauthorized(r.to_string())),
            "bearer" => {
                let realm = param("realm").ok_or_else(|| {
                    RegistryError::Unauthorized(format!("{r} (bearer challenge without realm)"))
                })?;
                let mut q = vec![];
                if let Some(s) = param("service") {
                    q.push(format!("service={}", percent_encode(&s)));
                }
                q.push(format!(
                    "scope={}",
                    percent_encode(
                        &param("scope")
                            .unwrap_or_else(|| format!("repository:{}:pull", r.repository))
                    )
                ));
                let url = format!(
                    "{realm}{}{}",
                    if realm.contains('?') { '&' } else { '?' },
                    q.join("&")
                );
                let resp = self
                    .get_once(&url, "application/json", basic.as_deref())
                    .await?;
                let status = resp.status().as_u16();
                let body = body(resp, &url).await?;
                if status != 200 {
                    return Err(RegistryError::Unauthorized(r.to_string()));
                }
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let t = v["token"]
                    .as_str()
                    .or(v["access_token"].as_str())
                    .ok_or_else(|| {
                        RegistryError::Unauthorized(format!(
                            "{r} (token endpoint answered no token)"
                        ))
                    })?;
                Ok(format!("Bearer {t}"))
            }
            _ => Err(RegistryError::Unauthorized(r.to_string())),
        }
    }

    /// The manifest (or index) `reference` names: (media type, bytes, digest).
    pub async fn manifest(
        &self,
        r: &Reference,
        reference: &str,
        creds: Option<&Credentials>,
        token: &mut Option<String>,
    ) -> Result<(String, bytes::Bytes, String), RegistryError> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base(r), r.repository);
        let resp = self
            .get(r, url.clone(), MANIFEST_TYPES, creds, token)
            .await?;
        let status = resp.status().as_u16();
        let media = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = body(resp, &url).await?;
        match status {
            200 => {}
            404 => return Err(RegistryError::NotFound(r.to_string())),
            401 | 403 => return Err(RegistryError::Unauthorized(r.to_string())),
            s => {
                return Err(RegistryError::Status {
                    method: "GET",
                    url,
                    status: s,
                    detail: registry_message(&body),
                })
            }
        }
        let digest = format!("sha256:{}", hex(&Sha256::digest(&body)));
        if reference.starts_with("sha256:") && reference != digest {
            return Err(RegistryError::Digest {
                digest: reference.to_string(),
                got: digest,
            });
        }
        Ok((media, body, digest))
    }

    /// Streams blob `digest` into `dest`, checking its sha256; returns its size.
    pub async fn blob_to_file(
        &self,
        r: &Reference,
        digest: &str,
        dest: &Path,
        creds: Option<&Credentials>,
        token: &mut Option<String>,
    ) -> Result<u64, RegistryError> {
        let url = format!("{}/v2/{}/blobs/{digest}", self.base(r), r.repository);
        let resp = self.get(r, url.clone(), "*/*", creds, token).await?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(match status {
                404 => RegistryError::Status { method: "GET", url, status: 404, detail: ": blob unknown to registry".into() },
                401 | 403 => RegistryError::Unauthorized(r.to_string()),
                s => RegistryError::Status {
                    method: "GET",
                    url,
                    status: s,
                    detail: registry_message(&body),
                },
            });
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(dest)?);
        let mut hash = Sha256::new();
        let mut n = 0u64;
        let mut body = resp.into_body();
        while let Some(frame) = tokio::time::timeout(self.timeout, body.frame())
            .await
            .map_err(|_| RegistryError::Transport {
                method: "GET",
                url: url.clone(),
                err: "read timed out".into(),
            })?
        {
            let frame = frame.map_err(|e| RegistryError::Transport {
                method: "GET",
                url: url.clone(),
                err: e.to_string(),
            })?;
            if let Ok(data) = frame.into_data() {
                hash.update(&data);
                n += data.len() as u64;
                f.write_all(&data)?;
            }
        }
        f.flush()?;
        let got = format!("sha256:{}", hex(&hash.finalize()));
        if got != digest {
            let _ = std::fs::remove_file(dest);
            return Err(RegistryError::Digest {
                digest: digest.to_string(),
                got,
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(
            p,
            vec![
                ("realm".into(), "https://auth.docker.io/token".into()),
                ("service".into(), "registry.docker.io".into()),
                ("scope".into(), "repository:library/busybox:pull".into())
            ]
        );
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!((s.as_str(), p[0].1.as_str()), ("basic", "Registry Realm"));
    }

    #[test]
    fn urls_parse() {
        let u = parse_url("http://127.0.0.1:5000/v2/x/manifests/1").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (false, "127.0.0.1", 5000, "/v2/x/manifests/1")
        );
        let u = parse_url("https://r.example/v2/").unwrap();
        assert_eq!((u.https, u.port), (true, 443));
        assert!(parse_url("ftp://x").is_none());
    }

    #[test]
    fn loopback_registries_are_plain_http() {
        let r = Registry::new(vec!["reg.local:5000".into()]);
        assert!(r.is_insecure("127.0.0.1:5000"));
        assert!(r.is_insecure("localhost:5000"));
        assert!(r.is_insecure("reg.local:5000"));
        assert!(!r.is_insecure("registry-1.docker.io"));
    }
}
