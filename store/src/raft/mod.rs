//! Replication with openraft: the log storage over the write-ahead log, the state
//! machine over [`State`](crate::state::State), and the gRPC transport between members.
//!
//! Architecture Invariant: openraft decides what is committed; this module only makes
//! entries durable (log storage answers "flushed" after fdatasync), applies committed
//! entries in order, and moves messages. No write is acknowledged before a quorum has it
//! durable.

pub mod codec;
pub mod log;
pub mod net;
pub mod sm;

use std::io::Cursor;

use shoal_proto::shoalstore::LogBatch;

use crate::error::StoreError;
use crate::state::Applied;

/// A member as the cluster knows it (raft's node data).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// host:port of the raft transport.
    pub peer_addr: String,
    /// URL clients use for the etcd API.
    pub client_url: String,
}

/// What applying one entry (a batch of commands) produced, one result per command.
pub type Response = Vec<Result<Applied, StoreError>>;

openraft::declare_raft_types!(
    /// Shoal's raft type configuration.
    pub TypeConfig:
        D = LogBatch,
        R = Response,
        NodeId = u64,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// FNV-1a: stable member IDs derived from a member's peer address, so every member
/// computes the same ID for everyone from `--initial-cluster` alone.
pub fn member_id(peer_addr: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in peer_addr.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Never 0: etcd treats member 0 as "none".
    h | 1
}
