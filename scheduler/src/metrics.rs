//! Prometheus metrics of the scheduler (Architecture Invariant 7), with kube-scheduler's
//! names so its dashboards read them.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

fn attempt_buckets() -> Histogram {
    // 10 µs .. ~10 s, as upstream's exponential buckets.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.00001, 2.0, 20))
}

pub struct SchedulerMetrics {
    pub attempts: Family<Labels, Counter>,
    pub attempt_duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub pending: Family<Labels, Gauge>,
    pub bindings: Family<Labels, Counter>,
    pub preemption_victims: Counter,
    pub leader: Gauge,
}

impl Default for SchedulerMetrics {
    fn default() -> Self {
        SchedulerMetrics { attempts: Family::default(), attempt_duration: Family::new_with_constructor(attempt_buckets), pending: Family::default(), bindings: Family::default(), preemption_victims: Counter::default(), leader: Gauge::default() }
    }
}

impl SchedulerMetrics {
    /// One scheduling attempt: `result` is scheduled, unschedulable or error.
    pub fn attempt(&self, result: &str, profile: &str, secs: f64) {
        let l = vec![("result", result.to_string()), ("profile", profile.to_string())];
        self.attempts.get_or_create(&l).inc();
        self.attempt_duration.get_or_create(&l).observe(secs);
    }

    pub fn set_pending(&self, s: crate::queue::Stats) {
        for (q, n) in [("active", s.active), ("backoff", s.backoff), ("unschedulable", s.unschedulable)] {
            self.pending.get_or_create(&vec![("queue", q.to_string())]).set(n as i64);
        }
    }

    pub fn register(&self, reg: &mut Registry) {
        reg.register("scheduler_schedule_attempts", "Number of attempts to schedule pods, by the result.", self.attempts.clone());
        reg.register("scheduler_scheduling_attempt_duration_seconds", "Scheduling attempt latency in seconds (scheduling algorithm + binding).", self.attempt_duration.clone());
        reg.register("scheduler_pending_pods", "Number of pending pods, by the queue type.", self.pending.clone());
        reg.register("scheduler_binding", "Bindings written, by result.", self.bindings.clone());
        reg.register("scheduler_preemption_victims", "Pods evicted to make room for higher-priority pods.", self.preemption_victims.clone());
        reg.register("scheduler_leader", "1 while this process holds the scheduler Lease.", self.leader.clone());
    }
}
