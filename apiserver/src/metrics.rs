//! Prometheus metrics of the API server (Architecture Invariant 7), with upstream's names
//! so kube-apiserver dashboards read them.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    Histogram::new([0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0])
}

pub struct ApiMetrics {
    pub requests: Family<Labels, Counter>,
    pub duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub watchers: Family<Labels, Gauge>,
    pub inflight: Gauge,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics { requests: Family::default(), duration: Family::new_with_constructor(latency_histogram), watchers: Family::default(), inflight: Gauge::default() }
    }
}

impl ApiMetrics {
    /// Records one finished request.
    pub fn observe(&self, verb: &str, group: &str, resource: &str, subresource: &str, code: u16, secs: f64) {
        let base = vec![("verb", verb.to_string()), ("group", group.to_string()), ("resource", resource.to_string()), ("subresource", subresource.to_string())];
        let mut with_code = base.clone();
        with_code.push(("code", code.to_string()));
        self.requests.get_or_create(&with_code).inc();
        if verb != "WATCH" {
            self.duration.get_or_create(&base).observe(secs);
        }
    }

    pub fn register(&self, reg: &mut Registry) {
        reg.register("apiserver_request", "Counter of apiserver requests broken out for each verb, group, resource, subresource and HTTP response code.", self.requests.clone());
        reg.register("apiserver_request_duration_seconds", "Response latency distribution in seconds for each verb, group, resource and subresource.", self.duration.clone());
        reg.register("apiserver_longrunning_requests", "Gauge of all active long-running apiserver requests (watches) broken out by group and resource.", self.watchers.clone());
        reg.register("apiserver_current_inflight_requests", "Requests currently being served.", self.inflight.clone());
    }
}
