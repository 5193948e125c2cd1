//! Store errors, worded exactly as etcd words them so clients that match on the message
//! (etcdctl, client-go's rpctypes, kube-apiserver) behave the same.

use tonic::{Code, Status};

use crate::mvcc::Rev;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted { compact_rev: Rev },
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: not capable")]
    NotCapable,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: server stopped")]
    Stopped,
    /// An error another member answered with (a forwarded request), kept as it was.
    #[error("{message}")]
    Remote { code: Code, message: String },
    /// A storage failure: logged with context; the member stops taking writes.
    #[error("etcdserver: internal error: {0}")]
    Internal(String),
}

impl StoreError {
    /// The gRPC code etcd uses for this error (its `rpctypes` table).
    pub fn code(&self) -> Code {
        use StoreError::*;
        match self {
            Compacted { .. } | FutureRev | LeaseTtlTooLarge => Code::OutOfRange,
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | RequestTooLarge => Code::InvalidArgument,
            NoSpace => Code::ResourceExhausted,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            LeaseExists => Code::FailedPrecondition,
            NoLeader | NotLeader | Timeout | Stopped => Code::Unavailable,
            NotCapable => Code::Unimplemented,
            Internal(_) => Code::Internal,
            Remote { code, .. } => *code,
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
