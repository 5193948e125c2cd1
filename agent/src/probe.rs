//! One probe attempt (exec, httpGet, tcpSocket), with the kubelet's success rules and
//! failure messages. The prober loop (thresholds, periods) is in `pods.rs`.

use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::runtime::Runtime;
use crate::spec::ProbeAction;

/// An OS error as Go's net package words it (what kubelet's probe messages show).
fn dial_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect: connection refused".into(),
        std::io::ErrorKind::TimedOut => "i/o timeout".into(),
        _ => e.to_string().split(" (os error").next().unwrap_or_default().to_lowercase(),
    }
}

/// Sends `req` and reads the status code of the answer.
async fn status_of<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, req: &str) -> Result<u16, String> {
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1024];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(2).any(|w| w == b"\r\n") {
        let m = s.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
        if m == 0 {
            break;
        }
        n += m;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| "malformed HTTP response".to_string())
}

/// Accepts any server certificate (handshake signatures are still checked).
#[derive(Debug)]
struct SkipVerify(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for SkipVerify {
    fn verify_server_cert(&self, _: &rustls::pki_types::CertificateDer<'_>, _: &[rustls::pki_types::CertificateDer<'_>], _: &rustls::pki_types::ServerName<'_>, _: &[u8], _: rustls::pki_types::UnixTime) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, m: &[u8], c: &rustls::pki_types::CertificateDer<'_>, d: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(&self, m: &[u8], c: &rustls::pki_types::CertificateDer<'_>, d: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn insecure_tls() -> tokio_rustls::TlsConnector {
    static C: std::sync::OnceLock<tokio_rustls::TlsConnector> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(SkipVerify(provider)))
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
    })
    .clone()
}

/// Runs one attempt; Err carries the failure message.
pub async fn check<R: Runtime>(rt: &R, container: &str, pod_ip: Option<Ipv4Addr>, action: &ProbeAction, timeout: Duration) -> Result<(), String> {
    let ip = pod_ip.map(|i| i.to_string()).unwrap_or_else(|| "127.0.0.1".into());
    match action {
        ProbeAction::Exec(cmd) => {
            let child = rt.exec(container, cmd, false).map_err(|e| e.to_string())?;
            match tokio::time::timeout(timeout, child.wait_with_output()).await {
                Err(_) => Err(format!("command {cmd:?} timed out")),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(o)) if o.status.success() => Ok(()),
                Ok(Ok(o)) => {
                    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
                    Err(out.trim().chars().take(1024).collect::<String>())
                }
            }
        }
        ProbeAction::Tcp { port, host } => {
            let h = host.clone().unwrap_or(ip);
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((h.as_str(), *port))).await {
                Err(_) => Err(format!("dial tcp {h}:{port}: i/o timeout")),
                Ok(Err(e)) => Err(format!("dial tcp {h}:{port}: {}", dial_error(&e))),
                Ok(Ok(_)) => Ok(()),
            }
        }
        ProbeAction::Http { port, path, host, headers, https } => {
            let h = host.clone().unwrap_or(ip);
            let url = format!("{}://{h}:{port}{path}", if *https { "https" } else { "http" });
            let attempt = async {
                let s = tokio::net::TcpStream::connect((h.as_str(), *port)).await.map_err(|e| format!("Get {url:?}: dial tcp {h}:{port}: {}", dial_error(&e)))?;
                let mut req = format!("GET {path} HTTP/1.1\r\nHost: {h}:{port}\r\nUser-Agent: kube-probe/1.35\r\nAccept: */*\r\nConnection: close\r\n");
                for (k, v) in headers {
                    req.push_str(&format!("{k}: {v}\r\n"));
                }
                req.push_str("\r\n");
                let code = if *https {
                    // As the kubelet: the certificate is not verified (InsecureSkipVerify).
                    let name = rustls::pki_types::ServerName::try_from(h.clone()).map_err(|e| format!("Get {url:?}: {e}"))?;
                    let tls = insecure_tls().connect(name, s).await.map_err(|e| format!("Get {url:?}: {e}"))?;
                    status_of(tls, &req).await
                } else {
                    status_of(s, &req).await
                }
                .map_err(|e| format!("Get {url:?}: {e}"))?;
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("HTTP probe failed with statuscode: {code}"))
                }
            };
            match tokio::time::timeout(timeout, attempt).await {
                Err(_) => Err(format!("Get {url:?}: context deadline exceeded (Client.Timeout exceeded while awaiting headers)")),
                Ok(r) => r,
            }
        }
        ProbeAction::Grpc { port, service } => {
            use shoal_proto::health::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
            let target = format!("{ip}:{port}");
            let deadline = || format!("timeout: failed to connect service {target:?} within {}s: context deadline exceeded", timeout.as_secs());
            let ep = tonic::transport::Endpoint::from_shared(format!("http://{target}")).map_err(|e| e.to_string())?.connect_timeout(timeout).timeout(timeout);
            let ch = match tokio::time::timeout(timeout, ep.connect()).await {
                Ok(Ok(ch)) => ch,
                Ok(Err(e)) => return Err(format!("failed to connect service {target:?}: {e}")),
                Err(_) => return Err(deadline()),
            };
            let resp = match tokio::time::timeout(timeout, HealthClient::new(ch).check(HealthCheckRequest { service: service.clone() })).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => return Err(format!("rpc error: code = {:?} desc = {}", s.code(), s.message())),
                Err(_) => return Err(deadline()),
            };
            match ServingStatus::try_from(resp.status) {
                Ok(ServingStatus::Serving) => Ok(()),
                Ok(st) => Err(format!("service unhealthy (responded with {:?})", st.as_str_name())),
                Err(_) => Err(format!("service unhealthy (responded with status {})", resp.status)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::sim::{Sim, SimSettings};

    #[tokio::test]
    async fn http_and_tcp_probes_judge_as_the_kubelet() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                n += 1;
                let code = if n == 1 { "200 OK" } else if n == 2 { "302 Found" } else { "503 Service Unavailable" };
                let _ = s.write_all(format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        let rt = Sim::new(SimSettings::default());
        let lo = Some(Ipv4Addr::LOCALHOST);
        let http = ProbeAction::Http { port, path: "/healthz".into(), host: None, headers: vec![], https: false };
        let t = Duration::from_secs(1);
        assert!(check(&rt, "c", lo, &http, t).await.is_ok());
        assert!(check(&rt, "c", lo, &http, t).await.is_ok(), "3xx is success");
        assert_eq!(check(&rt, "c", lo, &http, t).await.unwrap_err(), "HTTP probe failed with statuscode: 503");
        assert!(check(&rt, "c", lo, &ProbeAction::Tcp { port, host: None }, t).await.is_ok());
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = check(&rt, "c", lo, &ProbeAction::Tcp { port: closed, host: None }, t).await.unwrap_err();
        assert_eq!(e, format!("dial tcp 127.0.0.1:{closed}: connect: connection refused"));
        assert!(check(&rt, "c", lo, &ProbeAction::Exec(vec!["true".into()]), t).await.unwrap_err().contains("not supported"), "the simulated runtime has no exec");
    }

    #[tokio::test]
    async fn https_probes_do_not_verify_the_certificate() {
        let cert = rcgen::generate_simple_self_signed(vec!["example.invalid".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider())).with_safe_default_protocol_versions().unwrap().with_no_client_auth().with_single_cert(vec![cert.cert.der().clone()], key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut t) = acceptor.accept(s).await else { return };
                    let mut b = [0u8; 512];
                    let _ = t.read(&mut b).await;
                    let _ = t.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                    let _ = t.shutdown().await;
                });
            }
        });
        let rt = Sim::new(SimSettings::default());
        let probe = ProbeAction::Http { port, path: "/".into(), host: None, headers: vec![], https: true };
        check(&rt, "c", Some(Ipv4Addr::LOCALHOST), &probe, Duration::from_secs(2)).await.unwrap();
    }

    struct Healthy;

    #[tonic::async_trait]
    impl shoal_proto::health::health_server::Health for Healthy {
        async fn check(&self, r: tonic::Request<shoal_proto::health::HealthCheckRequest>) -> Result<tonic::Response<shoal_proto::health::HealthCheckResponse>, tonic::Status> {
            let status = if r.into_inner().service == "sick" { 2 } else { 1 };
            Ok(tonic::Response::new(shoal_proto::health::HealthCheckResponse { status }))
        }
    }

    #[tokio::test]
    async fn grpc_probes_ask_the_health_service() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(tonic::transport::Server::builder().add_service(shoal_proto::health::health_server::HealthServer::new(Healthy)).serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)));
        let rt = Sim::new(SimSettings::default());
        let lo = Some(Ipv4Addr::LOCALHOST);
        let t = Duration::from_secs(2);
        check(&rt, "c", lo, &ProbeAction::Grpc { port, service: String::new() }, t).await.unwrap();
        assert_eq!(check(&rt, "c", lo, &ProbeAction::Grpc { port, service: "sick".into() }, t).await.unwrap_err(), "service unhealthy (responded with \"NOT_SERVING\")");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(check(&rt, "c", lo, &ProbeAction::Grpc { port: closed, service: String::new() }, t).await.is_err());
    }
}
