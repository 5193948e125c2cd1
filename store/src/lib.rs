//! Shoal's store: the MVCC key space that holds all cluster state, made durable by a
//! group-committed write-ahead log and rkyv snapshots, served over the etcd v3 API.
//!
//! Map:
//! - [`mvcc`]: the multi-version index (pure data structure).
//! - [`state`]: the deterministic state machine (index + leases + alarms) applied from the log.
//! - [`wal`], [`snapshot`], [`disk`]: durability (io_uring appends, torn-tail recovery, power-loss simulation).
//! - [`member`]: recovery and the group-commit pipeline; [`watch`]: the watch hub; [`lease`]: expiry deadlines.
//! - [`etcd`]: the etcd v3 gRPC services.
//!
//! Architecture Invariant: a write is acknowledged only after its log entry is durable
//! (fdatasync returned) and applied; revisions are strictly increasing and never reused.
//! This crate must never depend on the API server or any other Shoal component.

pub mod disk;
pub mod error;
pub mod etcd;
pub mod http;
pub mod lease;
pub mod member;
pub mod metrics;
pub mod mvcc;
pub mod raft;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod wal;
pub mod watch;

pub use error::StoreError;
pub use member::{Member, StoreConfig};
