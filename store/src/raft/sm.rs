//! openraft state machine over [`State`]: applies committed entries in order, publishes
//! their events to the watch hub, and builds/installs rkyv snapshots.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StoredMembership};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use shoal_proto::shoalraft as pb;
use shoal_proto::shoalstore::log_command::Cmd;

use super::codec::{self, Entry};
use super::{Node, Response, TypeConfig};
use crate::disk::Disk;
use crate::lease::LeaseClock;
use crate::metrics::StoreMetrics;
use crate::snapshot;
use crate::state::{Applied, State};
use crate::watch::WatchHub;

/// What the state machine has applied, readable by the rest of the member.
#[derive(Clone, Debug, Default)]
pub struct Applied_ {
    pub log_id: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, Node>,
}

/// Shared between the state machine, its snapshot builder and the member.
pub struct SmShared {
    pub state: Arc<RwLock<State>>,
    pub hub: Arc<WatchHub>,
    pub leases: Arc<LeaseClock>,
    pub disk: Arc<dyn Disk>,
    pub metrics: Arc<StoreMetrics>,
    pub applied: Mutex<Applied_>,
    /// Log index of the snapshot file this state machine stands behind (None: none yet).
    pub snapshot_index: Mutex<Option<u64>>,
    /// Closed when the member shuts down (see `log::Gate`).
    pub gate: super::log::Gate,
    /// Commands and bytes applied since start, and their values when the newest snapshot
    /// was taken: the member snapshots by these (etcd's `--snapshot-count` counts
    /// requests), not by raft entries, which are batches of any size.
    pub applied_cmds: std::sync::atomic::AtomicU64,
    pub applied_bytes: std::sync::atomic::AtomicU64,
    pub snap_cmds: std::sync::atomic::AtomicU64,
    pub snap_bytes: std::sync::atomic::AtomicU64,
    /// Thresholds for the next snapshot: commands, bytes.
    pub snapshot_every: (u64, u64),
    /// Woken by apply when a threshold is crossed.
    pub snapshot_due: Arc<tokio::sync::Notify>,
}

/// The smallest byte threshold between snapshots.
const MIN_SNAPSHOT_BYTES: u64 = 64 << 20;

impl SmShared {
    /// True when enough was applied since the last snapshot to take another.
    pub fn snapshot_due(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let cmds = self.applied_cmds.load(Relaxed) - self.snap_cmds.load(Relaxed);
        let bytes = self.applied_bytes.load(Relaxed) - self.snap_bytes.load(Relaxed);
        // The log kept in memory until the next snapshot is bounded by a quarter of the
        // state (at least 64 MiB): snapshot work stays linear in the bytes written (each
        // snapshot costs the state's size, every state/4 bytes) while the log costs at most
        // 25% of the state's memory.
        let db = u64::try_from(self.metrics.db_size_bytes.get()).unwrap_or(0);
        let by_bytes = self.snapshot_every.1.min((db / 4).max(MIN_SNAPSHOT_BYTES));
        cmds >= self.snapshot_every.0 || bytes >= by_bytes
    }
}

#[derive(Clone)]
pub struct StateMachine {
    pub shared: Arc<SmShared>,
}

fn sm_err(e: impl std::fmt::Display) -> StorageError<u64> {
    StorageError::from_io_error(ErrorSubject::StateMachine, ErrorVerb::Write, std::io::Error::other(e.to_string()))
}

/// Encodes the raft part of a snapshot (stored in the rkyv file's `meta` field).
fn encode_meta(meta: &SnapshotMeta<u64, Node>) -> Vec<u8> {
    codec::snapshot_meta_to_pb(meta).encode_to_vec()
}

/// Decodes the raft part of a snapshot file.
pub fn decode_meta(bytes: &[u8]) -> Result<SnapshotMeta<u64, Node>, String> {
    let m = pb::SnapshotMeta::decode(bytes).map_err(|e| e.to_string())?;
    Ok(codec::snapshot_meta_from_pb(&m))
}

impl StateMachine {
    fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let t = Instant::now();
        use std::sync::atomic::Ordering::Relaxed;
        let (state, applied) = {
            let st = self.shared.state.read();
            self.shared.snap_cmds.store(self.shared.applied_cmds.load(Relaxed), Relaxed);
            self.shared.snap_bytes.store(self.shared.applied_bytes.load(Relaxed), Relaxed);
            (st.clone(), self.shared.applied.lock().clone())
        };
        let Some(last) = applied.log_id else {
            return Err(sm_err("nothing applied yet: no snapshot to build"));
        };
        let meta = SnapshotMeta { last_log_id: Some(last), last_membership: applied.membership.clone(), snapshot_id: format!("{}-{}", last.leader_id.term, last.index) };
        let bytes = snapshot::encode(&state, last.leader_id.term, encode_meta(&meta)).map_err(sm_err)?;
        let name = snapshot::file_name(last.index);
        let closed = self.shared.gate.lock();
        if *closed {
            return Err(sm_err("the member is shutting down"));
        }
        self.shared.disk.write_atomic(&name, &bytes).map_err(|e| StorageError::from_io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        {
            // Only ever forward: an install may have moved past this build meanwhile.
            let mut si = self.shared.snapshot_index.lock();
            *si = Some(si.map_or(last.index, |i| i.max(last.index)));
            if let Err(e) = snapshot::remove_older(self.shared.disk.as_ref(), si.unwrap_or(last.index)) {
                tracing::warn!(error = %e, "removing older snapshots failed");
            }
        }
        self.shared.metrics.snapshots.inc();
        drop(closed);
        tracing::info!(file = %self.shared.disk.path_of(&name).display(), index = last.index, bytes = bytes.len(), ms = t.elapsed().as_millis() as u64, "snapshot written");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.build()).await.map_err(sm_err)?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, StoredMembership<u64, Node>), StorageError<u64>> {
        let a = self.shared.applied.lock();
        Ok((a.log_id, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut events = Vec::new();
        let mut last = None;
        let mut membership = None;
        let mut lease_changes = Vec::new();
        {
            let mut st = self.shared.state.write();
            for e in entries {
                let index = e.log_id.index;
                last = Some(e.log_id);
                if index <= st.applied && st.applied > 0 {
                    // Already in the state (a snapshot covered it): applying again would
                    // change revisions on this member only.
                    tracing::warn!(index, applied = st.applied, "skipping a log entry the state already contains");
                    out.push(vec![]);
                    continue;
                }
                let r = match e.payload {
                    EntryPayload::Normal(batch) => {
                        use std::sync::atomic::Ordering::Relaxed;
                        self.shared.applied_cmds.fetch_add(batch.cmds.len() as u64, Relaxed);
                        self.shared.applied_bytes.fetch_add(prost::Message::encoded_len(&batch) as u64, Relaxed);
                        let mut rs = Vec::with_capacity(batch.cmds.len());
                        for cmd in &batch.cmds {
                            let r = st.apply(index, cmd, &mut events);
                            match (&r, &cmd.cmd) {
                                (Ok(Applied::LeaseGrant { id, ttl }), _) => lease_changes.push((*id, Some(*ttl))),
                                (Ok(Applied::LeaseRevoke), Some(Cmd::LeaseRevoke(rv))) => lease_changes.push((rv.id, None)),
                                _ => {}
                            }
                            rs.push(r);
                        }
                        st.applied = index;
                        rs
                    }
                    EntryPayload::Blank => {
                        st.applied = index;
                        vec![]
                    }
                    EntryPayload::Membership(m) => {
                        st.applied = index;
                        membership = Some(StoredMembership::new(Some(e.log_id), m));
                        vec![]
                    }
                };
                out.push(r);
            }
            self.shared.metrics.applied_index.set(st.applied as i64);
            self.shared.metrics.db_size_bytes.set(st.mvcc.size() as i64);
            self.shared.metrics.keys.set(st.mvcc.key_count() as i64);
            // Still under the state write lock: a snapshot clone always sees the applied
            // log id that matches its contents, and no reader sees a revision whose events
            // are not yet queued to watchers (progress notifications must not run ahead).
            let mut a = self.shared.applied.lock();
            if last.is_some() {
                a.log_id = last;
            }
            if let Some(m) = membership {
                a.membership = m;
            }
            drop(a);
            self.shared.hub.publish(&events);
        }
        let now = Instant::now();
        for (id, ttl) in lease_changes {
            match ttl {
                Some(ttl) => self.shared.leases.renew(id, ttl, now),
                None => self.shared.leases.forget(id),
            }
        }
        self.shared.metrics.proposals_committed.inc_by(out.iter().map(|r| r.len() as u64).sum());
        if self.shared.snapshot_due() {
            self.shared.snapshot_due.notify_one();
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<u64, Node>, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let quota = self.shared.state.read().quota;
        let last = meta.last_log_id.ok_or_else(|| sm_err("installing a snapshot without a last log id"))?;
        let name = snapshot::file_name(last.index);
        // Validate before anything is written: a bad transfer must not become the newest
        // snapshot on disk.
        let loaded = snapshot::decode(bytes.clone(), quota, &format!("snapshot {} from the leader", meta.snapshot_id)).map_err(sm_err)?;
        {
            let closed = self.shared.gate.lock();
            if *closed {
                return Err(sm_err("the member is shutting down"));
            }
            self.shared.disk.write_atomic(&name, &bytes).map_err(|e| StorageError::from_io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        }
        {
            let mut st = self.shared.state.write();
            *st = loaded.state;
            let mut a = self.shared.applied.lock();
            a.log_id = Some(last);
            a.membership = meta.last_membership.clone();
            let mut si = self.shared.snapshot_index.lock();
            *si = Some(si.map_or(last.index, |i| i.max(last.index)));
        }
        if let Err(e) = snapshot::remove_older(self.shared.disk.as_ref(), last.index) {
            tracing::warn!(error = %e, "removing older snapshots failed");
        }
        // Events between the old and new state are not individually known: every watcher
        // catches up from the new state's history.
        let st = self.shared.state.read();
        self.shared.hub.mark_all_lagging(st.mvcc.rev() + 1);
        self.shared.leases.reset_all(st.leases.iter().map(|(id, l)| (*id, l.ttl)), Instant::now());
        tracing::info!(index = last.index, "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let Some(index) = *self.shared.snapshot_index.lock() else { return Ok(None) };
        let newest = snapshot::file_name(index);
        let bytes = self.shared.disk.read(&newest).map_err(sm_err)?;
        let loaded = snapshot::decode(bytes.clone(), 0, &newest).map_err(sm_err)?;
        let meta = decode_meta(&loaded.meta).map_err(sm_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) }))
    }
}
