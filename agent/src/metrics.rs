//! Prometheus metrics of a real node's agent, named as the kubelet names them where one
//! exists, served on `--metrics-addr` at `/metrics` (and `/healthz`). Hollow nodes keep none
//! (5,000 registries would cost more than the nodes).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub operation_type: String,
}

/// The agent's metrics.
#[derive(Debug)]
pub struct NodeMetrics {
    /// From the pod reaching the agent to all its containers running.
    pub pod_start: Histogram,
    pub runtime_ops: Family<OpLabels, Counter>,
    pub runtime_errors: Family<OpLabels, Counter>,
    pub image_pull: Histogram,
    pub running_pods: Gauge,
    pub running_containers: Gauge,
    pub execs: Counter,
    registry: parking_lot::Mutex<Registry>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let buckets = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0];
        let m = NodeMetrics {
            pod_start: Histogram::new(buckets),
            runtime_ops: Family::default(),
            runtime_errors: Family::default(),
            image_pull: Histogram::new(buckets),
            running_pods: Gauge::default(),
            running_containers: Gauge::default(),
            execs: Counter::default(),
            registry: parking_lot::Mutex::new(Registry::default()),
        };
        {
            let mut r = m.registry.lock();
            r.register("kubelet_pod_start_duration_seconds", "Seconds from a pod reaching the node to all its containers running", m.pod_start.clone());
            r.register("kubelet_runtime_operations", "Runtime operations by type", m.runtime_ops.clone());
            r.register("kubelet_runtime_operations_errors", "Failed runtime operations by type", m.runtime_errors.clone());
            r.register("kubelet_image_pull_duration_seconds", "Seconds to make an image available (pull or cache hit)", m.image_pull.clone());
            r.register("kubelet_running_pods", "Pods with a running sandbox", m.running_pods.clone());
            r.register("kubelet_running_containers", "Containers running", m.running_containers.clone());
            r.register("shoal_agent_execs", "Exec requests served", m.execs.clone());
        }
        m
    }
}

impl NodeMetrics {
    /// Adds metrics of another part of the agent (the service proxy).
    pub fn register_with(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock());
    }

    /// Counts one runtime operation and its failure.
    pub fn op<T, E>(&self, op: &str, r: &Result<T, E>) {
        let l = OpLabels { operation_type: op.into() };
        self.runtime_ops.get_or_create(&l).inc();
        if r.is_err() {
            self.runtime_errors.get_or_create(&l).inc();
        }
    }

    /// The registry's text, with the session counters of `stats` appended.
    pub fn encode(&self, stats: &crate::AgentStats) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut s, &self.registry.lock());
        use std::sync::atomic::Ordering::Relaxed;
        let c = |s: &mut String, name: &str, help: &str, v: &AtomicU64| {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name}_total {}\n", v.load(Relaxed)));
        };
        c(&mut s, "shoal_agent_sessions", "Sessions opened with the API server", &stats.sessions);
        c(&mut s, "shoal_agent_objects_received", "Objects received over the session", &stats.objects);
        c(&mut s, "shoal_agent_statuses_sent", "Pod statuses sent", &stats.statuses_sent);
        c(&mut s, "shoal_agent_status_errors", "Pod statuses the server refused", &stats.status_errors);
        c(&mut s, "shoal_agent_heartbeats", "Heartbeats sent", &stats.heartbeats);
        s.push_str("# EOF\n");
        s
    }
}

/// Serves `/metrics` and `/healthz` on `addr` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, m: Arc<NodeMetrics>, stats: Arc<crate::AgentStats>) -> std::io::Result<()> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "agent metrics listening");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else { continue };
            let (m, stats) = (m.clone(), stats.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (m, stats) = (m.clone(), stats.clone());
                    async move {
                        let (code, ctype, body) = match req.uri().path() {
                            "/metrics" => (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", m.encode(&stats)),
                            "/healthz" => (200, "text/plain", "ok".to_string()),
                            _ => (404, "text/plain", "404 page not found\n".to_string()),
                        };
                        http::Response::builder().status(code).header("content-type", ctype).body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), svc).await;
            });
        }
    });
    Ok(())
}
