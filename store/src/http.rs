//! A minimal HTTP/1.1 endpoint for `/metrics` (Prometheus text format) and `/health`.
//! Only GET of those two paths is served; anything else gets 404 or 405.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves until the runtime stops. `health` answers whether the component is healthy.
pub async fn serve_metrics(listener: TcpListener, registry: Arc<Registry>, health: Arc<dyn Fn() -> bool + Send + Sync>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let registry = registry.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read until the end of the request head (bounded).
            loop {
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || n == buf.len() {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
                ("GET", "/metrics") => {
                    let mut s = String::new();
                    match prometheus_client::encoding::text::encode(&mut s, &registry) {
                        Ok(()) => ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", s),
                        Err(_) => ("500 Internal Server Error", "text/plain", "encoding metrics failed\n".into()),
                    }
                }
                ("GET", "/health") => {
                    if health() {
                        ("200 OK", "application/json", "{\"health\":\"true\"}\n".into())
                    } else {
                        ("503 Service Unavailable", "application/json", "{\"health\":\"false\"}\n".into())
                    }
                }
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
                _ => ("405 Method Not Allowed", "text/plain", "method not allowed\n".into()),
            };
            let resp = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
