//! Wire types of Shoal. Serialization lives here and at API edges; the inside of each
//! crate works on its own compact types.
//!
//! - [`mvccpb`], [`etcdserverpb`]: the etcd v3 API (same packages, services and field
//!   numbers as etcd, so `etcdctl` and client libraries work unchanged).
//! - [`shoalstore`]: the store's replicated log command and the pre-encoded watch response.
//! - [`raw_watch`]: the server half of etcd's Watch service, sending pre-encoded events.
//!
//! Architecture Invariant: nothing here has behaviour; it is generated code plus helpers
//! that only convert or encode.
#![allow(clippy::all)]
#![forbid(unsafe_code)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod shoalstore {
    tonic::include_proto!("shoalstore");
}

/// Replication: raft messages, stored log entries, follower → leader calls.
pub mod shoalraft {
    tonic::include_proto!("shoalraft");
}

/// The operator API (`shoal admin`): scheduler tuning and inspection.
pub mod admin {
    tonic::include_proto!("shoal.admin.v1");
    /// Encoded descriptors of the admin services, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("admin_descriptor");
}

/// The agent protocol (`shoal agent` and hollow nodes ↔ API server).
pub mod health {
    //! `grpc.health.v1`: the agent probes pods' gRPC health services with it.
    tonic::include_proto!("grpc.health.v1");
}

pub mod agent {
    tonic::include_proto!("shoal.agent.v1");
}

/// Server of `etcdserverpb.Watch` whose responses are [`shoalstore::WatchResponseRaw`].
pub mod raw_watch {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.Watch.rs"));
}

pub use prost;
pub use prost::Message;
