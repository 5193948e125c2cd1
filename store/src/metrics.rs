//! Prometheus metrics of the store (Architecture Invariant 7), named like etcd's where
//! one exists so existing dashboards read them.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub struct StoreMetrics {
    pub proposals_committed: Counter,
    pub proposals_failed: Counter,
    pub wal_fsync_seconds: Histogram,
    pub batch_entries: Histogram,
    pub applied_index: Gauge,
    pub db_size_bytes: Gauge,
    pub keys: Gauge,
    pub watchers: Gauge,
    pub leases_expired: Counter,
    pub snapshots: Counter,
}

impl StoreMetrics {
    pub fn new() -> StoreMetrics {
        StoreMetrics {
            proposals_committed: Counter::default(),
            proposals_failed: Counter::default(),
            wal_fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            batch_entries: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            applied_index: Gauge::default(),
            db_size_bytes: Gauge::default(),
            keys: Gauge::default(),
            watchers: Gauge::default(),
            leases_expired: Counter::default(),
            snapshots: Counter::default(),
        }
    }

    /// Adds every metric to `reg` (under the prefix the caller chose, e.g. `etcd`).
    pub fn register(&self, reg: &mut Registry) {
        reg.register("server_proposals_committed", "Proposals committed and applied", self.proposals_committed.clone());
        reg.register("server_proposals_failed", "Proposals that failed to commit", self.proposals_failed.clone());
        reg.register("disk_wal_fsync_duration_seconds", "Latency of one group-commit append (write + fdatasync)", self.wal_fsync_seconds.clone());
        reg.register("disk_wal_batch_entries", "Entries made durable by one group commit", self.batch_entries.clone());
        reg.register("server_applied_index", "Index of the last applied log entry", self.applied_index.clone());
        reg.register("mvcc_db_total_size_in_bytes", "Bytes held by all stored versions", self.db_size_bytes.clone());
        reg.register("mvcc_keys", "Number of keys in the index", self.keys.clone());
        reg.register("mvcc_watcher", "Registered watchers", self.watchers.clone());
        reg.register("server_leases_expired", "Leases revoked by expiry", self.leases_expired.clone());
        reg.register("server_snapshots", "Snapshots written", self.snapshots.clone());
    }
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics::new()
    }
}
