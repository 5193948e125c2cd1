//! The channel to the API server: gRPC over the API's HTTPS address, TLS verified against
//! the cluster CA, HTTP/2 by ALPN. One channel is one HTTP/2 connection; sessions of many
//! hollow nodes may share it (each session is its own stream).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

/// Connects TCP + TLS for tonic.
#[derive(Clone)]
struct TlsConnect {
    tls: tokio_rustls::TlsConnector,
    addr: Arc<str>,
    host: Arc<str>,
}

impl tonic::codegen::Service<http::Uri> for TlsConnect {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&*me.addr).await?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::try_from(me.host.to_string())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = me.tls.connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// A lazily connected channel to `server` (`https://host:port`) trusting `ca_pem`; it
/// reconnects by itself after a failure.
pub fn channel(server: &str, ca_pem: &str) -> anyhow::Result<Channel> {
    let hostport = server
        .strip_prefix("https://")
        .ok_or_else(|| {
            anyhow::anyhow!("the server address must start with https:// (got {server:?})")
        })?
        .trim_end_matches('/')
        .to_string();
    let host = match hostport.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => anyhow::bail!("the server address needs a port (got {server:?})"),
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in shoal_client::pem_certs(ca_pem) {
        roots.add(c)?;
    }
    if roots.is_empty() {
        anyhow::bail!("the CA bundle holds no certificate");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connect = TlsConnect {
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        addr: hostport.clone().into(),
        host: host.into(),
    };
    let ep = Endpoint::from_shared(format!("http://{hostport}"))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok(ep.connect_with_connector_lazy(connect))
}
