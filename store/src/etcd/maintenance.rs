//! etcd Maintenance and Cluster services.

use std::pin::Pin;

use futures::Stream;
use shoal_proto::etcdserverpb::maintenance_server::Maintenance;
use shoal_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use shoal_proto::shoalstore::log_command::Cmd;
use tonic::{Request, Response, Status};

use super::lease::async_stream;
use super::EtcdService;
use crate::error::StoreError;
use crate::state::Applied;

/// The etcd API version Shoal reports; clients gate features on it.
pub const REPORTED_VERSION: &str = "3.5.0";

/// Bytes per snapshot stream message.
const SNAPSHOT_CHUNK: usize = 32 * 1024;

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for EtcdService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let r = req.into_inner();
        let mut alarms = match AlarmAction::try_from(r.action) {
            Ok(AlarmAction::Get) => self.m.state.read().alarms(),
            Ok(_) => match self.propose(Cmd::Alarm(r.clone())).await? {
                Applied::Alarm(a) => a,
                a => return Err(Status::internal(format!("unexpected apply result {a:?}"))),
            },
            Err(_) => return Err(Status::invalid_argument(format!("etcdserver: unknown alarm action {}", r.action))),
        };
        for a in &mut alarms {
            a.member_id = self.m.member_id;
        }
        if r.alarm != AlarmType::None as i32 {
            alarms.retain(|a| a.alarm == r.alarm);
        }
        Ok(Response::new(AlarmResponse { header: self.m.header(), alarms }))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let st = self.m.state.read();
        let errors = st.alarms().iter().map(|a| format!("memberID:{} alarm:{}", self.m.member_id, alarm_name(a.alarm))).collect();
        let in_use = st.mvcc.size() as i64;
        let size = self.m.disk.total_bytes() as i64;
        let (raft_index, applied) = self.m.raft_indexes();
        Ok(Response::new(StatusResponse {
            header: self.m.header_at(st.mvcc.rev()),
            version: REPORTED_VERSION.into(),
            db_size: size,
            leader: self.m.leader().unwrap_or(0),
            raft_index,
            raft_term: self.m.term(),
            raft_applied_index: applied,
            errors,
            db_size_in_use: in_use,
            is_learner: false,
        }))
    }

    async fn defragment(&self, _req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        // Nothing to defragment: the index lives in memory and snapshots are rewritten whole.
        Ok(Response::new(DefragmentResponse { header: self.m.header() }))
    }

    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let st = self.m.state.read();
        let hash = hash_kv(&st.mvcc, st.mvcc.rev());
        Ok(Response::new(HashResponse { header: self.m.header_at(st.mvcc.rev()), hash }))
    }

    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let r = req.into_inner();
        let st = self.m.state.read();
        let rev = if r.revision <= 0 { st.mvcc.rev() } else { r.revision };
        if rev > st.mvcc.rev() {
            return Err(StoreError::FutureRev.into());
        }
        if rev < st.mvcc.compact_rev() {
            return Err(StoreError::Compacted { compact_rev: st.mvcc.compact_rev() }.into());
        }
        let hash = hash_kv(&st.mvcc, rev);
        Ok(Response::new(HashKvResponse { header: self.m.header_at(st.mvcc.rev()), hash, compact_revision: st.mvcc.compact_rev() }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, _req: Request<SnapshotRequest>) -> Result<Response<SnapshotStream>, Status> {
        let (state, header) = {
            let st = self.m.state.read();
            (st.clone(), self.m.header_at(st.mvcc.rev()))
        };
        let out = async_stream(move |tx| async move {
            // etcd's format: the backend database file followed by its SHA-256.
            let bytes = tokio::task::spawn_blocking(move || {
                use sha2::Digest;
                let mut db = super::bolt::encode(&state.mvcc, state.applied);
                let sum = sha2::Sha256::digest(&db);
                db.extend_from_slice(&sum);
                db
            })
            .await;
            let Ok(bytes) = bytes else {
                let _ = tx.send(Err(Status::internal("etcdserver: encoding the snapshot failed"))).await;
                return;
            };
            let total = bytes.len();
            let mut sent = 0;
            for chunk in bytes.chunks(SNAPSHOT_CHUNK) {
                sent += chunk.len();
                let resp = SnapshotResponse { header: header.clone(), remaining_bytes: (total - sent) as u64, blob: bytes::Bytes::copy_from_slice(chunk) };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn move_leader(&self, req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        let target = req.into_inner().target_id;
        if self.m.leader() == Some(target) {
            return Ok(Response::new(MoveLeaderResponse { header: self.m.header() }));
        }
        if !self.m.members().iter().any(|(i, _, _)| *i == target) {
            return Err(StoreError::MemberNotFound.into());
        }
        Err(Status::unimplemented("etcdserver: leadership transfer is not supported yet"))
    }
}

fn alarm_name(a: i32) -> &'static str {
    match AlarmType::try_from(a) {
        Ok(AlarmType::Nospace) => "NOSPACE",
        Ok(AlarmType::Corrupt) => "CORRUPT",
        _ => "NONE",
    }
}

/// CRC32 over every version at or below `rev`, in key then revision order.
fn hash_kv(mvcc: &crate::mvcc::Mvcc, rev: i64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (k, vs) in mvcc.keys() {
        for v in vs.iter().filter(|v| v.mod_rev <= rev) {
            h.update(k);
            h.update(&v.mod_rev.to_le_bytes());
            h.update(&v.version.to_le_bytes());
            h.update(&v.value);
        }
    }
    h.finalize()
}

