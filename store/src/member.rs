//! One store member: recovery (snapshot + log tail), the raft node that replicates its
//! log, and the background duties (lease expiry on the leader, watch catch-up).
//!
//! Write path: `propose` validates and size-checks a command, then hands it to raft
//! (`client_write`) on the leader, or forwards it to the leader (`Forward` RPC) from a
//! follower. Raft appends it to the log of a quorum (each member's log writer makes a
//! whole batch durable with one fdatasync) and applies it on every member in log order;
//! the proposer hears back after its own member applied it. Architecture Invariant 2: no
//! write is acknowledged before a quorum has it durable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ServerState, SnapshotPolicy, StoredMembership};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use shoal_proto::etcdserverpb::{
    AlarmResponse, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, ResponseHeader,
};
use shoal_proto::shoalraft::{self as pb, apply_result::Result as AR};
use shoal_proto::shoalstore::{log_command::Cmd, LogBatch, LogCommand};
use tokio::sync::{mpsc, oneshot};

use crate::disk::Disk;
use crate::error::StoreError;
use crate::lease::LeaseClock;
use crate::metrics::StoreMetrics;
use crate::raft::log::LogStore;
use crate::raft::net::{Faults, LeaderDuties, Network};
use crate::raft::sm::{decode_meta, Applied_, SmShared, StateMachine};
use crate::raft::{codec, member_id, Node, Raft};
use crate::snapshot;
use crate::state::{self, Applied, State};
use crate::wal::Wal;
use crate::watch::{HeaderInfo, WatchHub};

/// Configuration of a member. [`StoreConfig::validate`] rejects nonsense at start-up.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Human-readable member name (etcd's `--name`).
    pub name: String,
    /// URL clients use (shown by `member list`).
    pub client_url: String,
    /// host:port of this member's raft transport.
    pub peer_addr: String,
    /// Every member of a new cluster as (name, peer host:port), this one included.
    /// Empty: a single-member cluster of this member alone.
    pub initial_cluster: Vec<(String, String)>,
    /// True: bootstrap a new cluster on first start. False: join an existing one (this
    /// member was added with MemberAdd and waits for the leader to contact it).
    pub new_cluster: bool,
    /// Space quota: writes are refused with NOSPACE beyond it. etcd's default is 2 GiB; ours 8 GiB.
    pub quota_bytes: u64,
    /// Largest request accepted (etcd's `--max-request-bytes`, default 1.5 MiB).
    pub max_request_bytes: usize,
    /// A snapshot is written after this many entries since the last one.
    pub snapshot_entries: u64,
    /// How often watchers that asked for progress notifications get one when idle.
    pub progress_interval: Duration,
    /// Raft heartbeat interval.
    pub heartbeat: Duration,
    /// Raft election timeout (randomised between it and twice it).
    pub election_timeout: Duration,
    /// Test hook: a file listing member IDs whose raft traffic is dropped.
    pub fault_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            name: "default".into(),
            client_url: "http://127.0.0.1:2379".into(),
            peer_addr: "127.0.0.1:2380".into(),
            initial_cluster: vec![],
            new_cluster: true,
            quota_bytes: 8 << 30,
            max_request_bytes: 3 << 19,
            snapshot_entries: 100_000,
            progress_interval: Duration::from_secs(600),
            heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            fault_file: None,
        }
    }
}

impl StoreConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("member name must not be empty".into());
        }
        if self.max_request_bytes < 1024 {
            return Err(format!("max request bytes {} is below 1024", self.max_request_bytes));
        }
        if self.quota_bytes != 0 && self.quota_bytes < self.max_request_bytes as u64 {
            return Err(format!("quota of {} bytes is smaller than one request ({} bytes)", self.quota_bytes, self.max_request_bytes));
        }
        if self.snapshot_entries == 0 {
            return Err("snapshot entries must be at least 1".into());
        }
        if self.heartbeat.is_zero() || self.election_timeout < self.heartbeat * 3 {
            return Err(format!("election timeout {:?} must be at least 3 heartbeats ({:?})", self.election_timeout, self.heartbeat));
        }
        if !self.initial_cluster.is_empty() && !self.initial_cluster.iter().any(|(n, a)| *n == self.name && *a == self.peer_addr) {
            return Err(format!("the initial cluster does not list this member ({}={})", self.name, self.peer_addr));
        }
        Ok(())
    }

    /// The members a new cluster starts with. Every member bootstraps with exactly this
    /// (raft treats entries with the same log id as identical), so it holds only what all
    /// of them know: names and peer addresses. Client URLs are published after start.
    fn bootstrap_members(&self) -> BTreeMap<u64, Node> {
        let list = if self.initial_cluster.is_empty() { vec![(self.name.clone(), self.peer_addr.clone())] } else { self.initial_cluster.clone() };
        let alone = list.len() == 1;
        list.into_iter()
            .map(|(name, addr)| {
                // A lone member bootstraps alone: it may state its own client URL at once.
                let client_url = if alone { self.client_url.clone() } else { String::new() };
                (member_id(&addr), Node { name, peer_addr: addr, client_url })
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Wal(#[from] crate::wal::WalError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("write-ahead log entry {index}: {reason}")]
    Replay { index: u64, reason: String },
    #[error("starting raft: {0}")]
    Raft(String),
    #[error("starting the log writer thread: {0}")]
    Thread(std::io::Error),
}

/// What the last start found and how long it took.
#[derive(Clone, Debug, Default)]
pub struct RecoveryInfo {
    pub snapshot_index: u64,
    pub replayed_entries: u64,
    pub truncated_tail: Option<(String, u64, u64)>,
    pub duration: Duration,
}

/// A running member.
pub struct Member {
    pub config: StoreConfig,
    pub state: Arc<RwLock<State>>,
    pub hub: Arc<WatchHub>,
    pub leases: Arc<LeaseClock>,
    pub metrics: Arc<StoreMetrics>,
    pub member_id: u64,
    pub cluster_id: u64,
    /// The member's files (log, snapshots, vote).
    pub disk: Arc<dyn Disk>,
    pub raft: Raft,
    pub net: Network,
    sm: Arc<SmShared>,
    /// Monotonic source of lease IDs (seeded from the clock and member ID).
    lease_seq: AtomicU64,
    pub recovery: RecoveryInfo,
    /// Last leader this member saw itself as (to refresh lease deadlines on takeover).
    was_leader: Mutex<bool>,
    /// Closed by `shutdown`: no file is written after it returns.
    gate: crate::raft::log::Gate,
    /// Proposals waiting to be committed together (leader only).
    batch_tx: mpsc::Sender<Proposal>,
    /// Linearizable reads waiting for a read index; one leadership confirmation serves
    /// every read that arrived before it started (etcd batches ReadIndex the same way).
    read_waiters: Mutex<Vec<oneshot::Sender<Result<u64, StoreError>>>>,
    read_notify: Arc<tokio::sync::Notify>,
}

struct Proposal {
    cmd: LogCommand,
    /// The result and the raft index of the entry that carried it.
    reply: oneshot::Sender<Result<(Applied, u64), StoreError>>,
}

/// Most commands one raft entry carries.
const MAX_BATCH: usize = 4096;
/// Most bytes one raft entry carries.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Commits queued proposals as batches: one raft entry (so one fsync on each member) per
/// batch. openraft 0.9 flushes each entry before taking the next, so without batching
/// every write would cost a whole fsync round; while one batch is in flight the next
/// fills up (group commit).
async fn batcher(raft: Raft, mut rx: mpsc::Receiver<Proposal>) {
    while let Some(p) = rx.recv().await {
        let mut bytes = p.cmd.encoded_len();
        let mut cmds = vec![p.cmd];
        let mut replies = vec![p.reply];
        while cmds.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.cmd.encoded_len();
                    cmds.push(p.cmd);
                    replies.push(p.reply);
                }
                Err(_) => break,
            }
        }
        let n = cmds.len();
        match raft.client_write(LogBatch { cmds }).await {
            Ok(resp) => {
                debug_assert_eq!(resp.data.len(), n);
                let index = resp.log_id.index;
                for (reply, r) in replies.into_iter().zip(resp.data) {
                    let _ = reply.send(r.map(|a| (a, index)));
                }
            }
            Err(e) => {
                let err = match e {
                    RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => StoreError::NotLeader,
                    RaftError::APIError(e) => StoreError::Internal(e.to_string()),
                    RaftError::Fatal(e) => StoreError::Internal(format!("raft stopped: {e}")),
                };
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// A snapshot is also taken after this many bytes of commands, whatever their count.
const SNAPSHOT_BYTES: u64 = 512 << 20;

/// Request timeout for a write (etcd: 5 s + 2 election timeouts).
const WRITE_TIMEOUT: Duration = Duration::from_secs(7);

impl Member {
    /// Opens a member whose files live in `disk`: loads the newest snapshot, recovers the
    /// log after it, and starts raft (bootstrapping a new cluster on first start).
    pub async fn open(config: StoreConfig, disk: Arc<dyn Disk>) -> Result<Arc<Member>, OpenError> {
        config.validate().map_err(OpenError::Config)?;
        let t0 = Instant::now();
        let metrics = Arc::new(StoreMetrics::new());
        let me = member_id(&config.peer_addr);
        let (st, applied) = match snapshot::load_latest(&disk, config.quota_bytes)? {
            Some(l) => {
                let meta = decode_meta(&l.meta).map_err(|reason| OpenError::Replay { index: l.state.applied, reason: format!("snapshot metadata: {reason}") })?;
                if meta.last_log_id.map_or(0, |x| x.index) != l.state.applied {
                    return Err(OpenError::Replay {
                        index: l.state.applied,
                        reason: format!("the newest snapshot claims log index {:?} but holds state up to {}", meta.last_log_id.map(|x| x.index), l.state.applied),
                    });
                }
                (l.state, Applied_ { log_id: meta.last_log_id, membership: meta.last_membership })
            }
            None => (State::new(config.quota_bytes), Applied_ { log_id: None, membership: StoredMembership::default() }),
        };
        let snap_index = applied.log_id.map_or(0, |l| l.index);
        let (wal, records, report) = Wal::open(disk.clone(), applied.log_id.map(|l| l.index))?;
        let mut entries = Vec::with_capacity(records.len());
        for r in records {
            let pbe = pb::Entry::decode(r.data.as_ref()).map_err(|e| OpenError::Replay { index: r.index, reason: e.to_string() })?;
            let e = codec::entry_from_pb(pbe).map_err(|e| OpenError::Replay { index: r.index, reason: e.message().to_string() })?;
            if e.log_id.index != r.index {
                return Err(OpenError::Replay { index: r.index, reason: format!("holds entry {}", e.log_id.index) });
            }
            entries.push(e);
        }
        let fresh = entries.is_empty() && applied.log_id.is_none() && LogStore::load_vote(disk.as_ref()).map_err(OpenError::Config)?.is_none();
        let recovery = RecoveryInfo { snapshot_index: snap_index, replayed_entries: entries.len() as u64, truncated_tail: report.truncated, duration: t0.elapsed() };

        let cluster_id = {
            let mut ids: Vec<String> = config.bootstrap_members().values().map(|n| n.peer_addr.clone()).collect();
            ids.sort();
            member_id(&format!("shoal-cluster|{}", ids.join(",")))
        };
        let leases = Arc::new(LeaseClock::new());
        leases.reset_all(st.leases.iter().map(|(id, l)| (*id, l.ttl)), Instant::now());
        let hub = Arc::new(WatchHub::new(HeaderInfo { cluster_id, member_id: me }, config.max_request_bytes, st.mvcc.rev() + 1));
        let state = Arc::new(RwLock::new(st));
        let gate: crate::raft::log::Gate = Arc::default();
        let sm = Arc::new(SmShared { state: state.clone(), hub: hub.clone(), leases: leases.clone(), disk: disk.clone(), metrics: metrics.clone(), applied: Mutex::new(applied.clone()), snapshot_index: Mutex::new(applied.log_id.map(|l| l.index)), gate: gate.clone(),
            applied_cmds: Default::default(), applied_bytes: Default::default(), snap_cmds: Default::default(), snap_bytes: Default::default(),
            snapshot_every: (config.snapshot_entries, SNAPSHOT_BYTES),
            snapshot_due: Arc::new(tokio::sync::Notify::new()) });
        let log = LogStore::new(disk.clone(), wal, entries, applied.log_id, metrics.clone(), gate.clone()).map_err(OpenError::Thread)?;
        let net = Network::new(me, Arc::new(Faults::from_file(config.fault_file.clone())));
        let hb = config.heartbeat.as_millis() as u64;
        let el = config.election_timeout.as_millis() as u64;
        let raft_config = openraft::Config {
            cluster_name: "shoal".into(),
            heartbeat_interval: hb,
            election_timeout_min: el,
            election_timeout_max: el * 2,
            // Snapshots are triggered by the member (commands/bytes since the last one).
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: 1000,
            // An entry is a batch of up to 8 MiB: keep AppendEntries well under the
            // transport's 256 MiB message cap.
            max_payload_entries: 16,
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate().map_err(|e| OpenError::Raft(e.to_string()))?);
        let raft = Raft::new(me, raft_config, net.clone(), log, StateMachine { shared: sm.clone() }).await.map_err(|e| OpenError::Raft(e.to_string()))?;
        if fresh && config.new_cluster {
            let members = config.bootstrap_members();
            tracing::info!(members = ?members.values().map(|n| &n.name).collect::<Vec<_>>(), "bootstrapping a new cluster");
            raft.initialize(members).await.map_err(|e| OpenError::Raft(e.to_string()))?;
        }
        // A lone voter need not wait an election timeout to lead again.
        let voters: Vec<u64> = applied.membership.membership().voter_ids().collect();
        if (fresh && config.bootstrap_members().len() == 1) || voters == [me] {
            let _ = raft.trigger().elect().await;
        }
        tracing::info!(name = %config.name, id = format!("{me:x}"), snapshot_index = snap_index, log_entries = recovery.replayed_entries,
            ms = recovery.duration.as_millis() as u64, "store recovered");
        let (batch_tx, batch_rx) = mpsc::channel(65_536);
        tokio::spawn(batcher(raft.clone(), batch_rx));
        let seed = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64) ^ me;
        let read_notify = Arc::new(tokio::sync::Notify::new());
        let member = Arc::new(Member {
            config,
            state,
            hub,
            leases,
            metrics,
            member_id: me,
            cluster_id,
            disk,
            raft,
            net,
            sm,
            lease_seq: AtomicU64::new(seed),
            recovery,
            was_leader: Mutex::new(false),
            gate,
            batch_tx,
            read_waiters: Mutex::new(Vec::new()),
            read_notify: read_notify.clone(),
        });
        tokio::spawn(Member::read_index_loop(Arc::downgrade(&member), read_notify));
        tokio::spawn(Member::snapshot_loop(Arc::downgrade(&member), member.sm.snapshot_due.clone()));
        Ok(member)
    }

    /// Stops raft (its tasks and, once they drop the log, the log writer thread).
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
        *self.gate.lock() = true;
    }

    /// True once the log writer failed and the member stopped taking writes.
    pub fn is_failed(&self) -> bool {
        self.raft.metrics().borrow().running_state.is_err()
    }

    /// Response header for the current revision.
    pub fn header(&self) -> Option<ResponseHeader> {
        self.header_at(self.state.read().mvcc.rev())
    }

    pub fn header_at(&self, rev: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader { cluster_id: self.cluster_id, member_id: self.member_id, revision: rev, raft_term: self.term() })
    }

    /// The current raft term.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// The leader's member ID, if one is known.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.member_id)
    }

    /// Raft indexes: (last log index, last applied index).
    pub fn raft_indexes(&self) -> (u64, u64) {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.last_log_index.unwrap_or(0), m.last_applied.map_or(0, |l| l.index))
    }

    /// The cluster's members as raft knows them: (id, node, is_learner).
    pub fn members(&self) -> Vec<(u64, Node, bool)> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: std::collections::BTreeSet<u64> = m.membership().voter_ids().collect();
        m.membership().nodes().map(|(id, n)| (*id, n.clone(), !voters.contains(id))).collect()
    }

    /// Picks a lease ID nobody holds: positive, never reused by this member, and at least
    /// 2^60 so its 16-digit hex form (`etcdctl lease grant`) never starts with 0 (tools
    /// that compare the decimal form converted to hex without padding would trip on it).
    pub fn next_lease_id(&self) -> i64 {
        loop {
            let x = self.lease_seq.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
            let id = (x >> 1) as i64;
            if id >= 1 << 60 && !self.state.read().leases.contains_key(&id) {
                return id;
            }
        }
    }

    /// Validates a command, commits it through raft (forwarding it to the leader from a
    /// follower) and returns what applying it produced.
    pub async fn propose(&self, cmd: LogCommand) -> Result<Applied, StoreError> {
        state::validate(&cmd)?;
        if cmd.encoded_len() > self.config.max_request_bytes {
            return Err(StoreError::RequestTooLarge);
        }
        match tokio::time::timeout(WRITE_TIMEOUT, self.propose_inner(cmd)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// Waits (bounded by the caller's timeout) until some member is known to lead.
    async fn await_leader(&self) {
        let _ = self.raft.wait(Some(WRITE_TIMEOUT)).metrics(|m| m.current_leader.is_some() || m.running_state.is_err(), "a leader").await;
    }

    async fn propose_inner(&self, cmd: LogCommand) -> Result<Applied, StoreError> {
        let (applied, index) = self.propose_indexed(cmd).await?;
        // A write forwarded to the leader is answered once this member has applied it
        // too, so a read here right after sees it (and its revision is not "future").
        if self.applied_log_index() < index {
            self.raft.wait(Some(WRITE_TIMEOUT)).applied_index_at_least(Some(index), "forwarded write").await.map_err(|_| StoreError::Timeout)?;
        }
        Ok(applied)
    }

    /// Commits a command; returns its result and the raft index of its entry. Retried
    /// while leadership is moving (the old leader gone, the new one not yet elected), but
    /// only when the request cannot have reached a leader: a request that may have been
    /// committed is never proposed twice.
    async fn propose_indexed(&self, cmd: LogCommand) -> Result<(Applied, u64), StoreError> {
        loop {
            match self.propose_once(&cmd).await {
                Err(StoreError::NoLeader | StoreError::NotLeader) => tokio::time::sleep(Duration::from_millis(50)).await,
                r => return r,
            }
        }
    }

    async fn propose_once(&self, cmd: &LogCommand) -> Result<(Applied, u64), StoreError> {
        if self.leader().is_none() {
            self.await_leader().await;
        }
        // A member whose log failed (or that shut down) answers at once, not at the timeout.
        if self.is_failed() {
            return Err(StoreError::Stopped);
        }
        if self.is_leader() {
            let (reply, rx) = oneshot::channel();
            self.batch_tx.send(Proposal { cmd: cmd.clone(), reply }).await.map_err(|_| StoreError::Stopped)?;
            return rx.await.map_err(|_| StoreError::Stopped)?;
        }
        let node = self.leader_node().ok_or(StoreError::NoLeader)?;
        let mut client = self.net.client(&node.peer_addr).map_err(remote)?;
        let r = client.forward(self.net.request(cmd.clone())).await.map_err(forward_err)?.into_inner();
        let index = r.log_index;
        Ok((applied_from_pb(r)?, index))
    }

    /// Waits until this member's state reflects every write acknowledged before the call
    /// (raft read index: the leader confirms it still leads, a follower asks the leader).
    /// Every live key in `range` now, and a tap (see `WatchHub::tap`) that receives every
    /// event applied after that read: together, a consistent starting point for an
    /// in-process cache.
    pub fn snapshot_and_tap(&self, range: &crate::mvcc::KeyRange, tx: mpsc::Sender<crate::watch::TapBatch>) -> Result<(Vec<crate::mvcc::Kv>, crate::mvcc::Rev), StoreError> {
        let st = self.state.read();
        let r = st.mvcc.range(range, &crate::mvcc::RangeOpts { limit: 0, rev: 0, count_only: false, cur: None })?;
        self.hub.tap(tx);
        Ok((r.kvs, r.rev))
    }

    /// An etcd Range: linearizable (after a read barrier) unless it asks to be
    /// serializable. The header carries the revision it was served at.
    pub async fn range(&self, r: shoal_proto::etcdserverpb::RangeRequest) -> Result<shoal_proto::etcdserverpb::RangeResponse, StoreError> {
        if r.key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        if !r.serializable {
            self.read_barrier().await?;
        }
        self.state.read().range(&r)
    }

    /// An etcd Txn: a read-only one is served locally (after a read barrier unless all its
    /// ranges are serializable), any other goes through the log.
    pub async fn txn(&self, t: shoal_proto::etcdserverpb::TxnRequest) -> Result<shoal_proto::etcdserverpb::TxnResponse, StoreError> {
        if crate::state::txn_is_read_only(&t) {
            let t = LogCommand { cmd: Some(Cmd::Txn(t)) };
            crate::state::validate(&t)?;
            let Some(Cmd::Txn(t)) = t.cmd else { unreachable!("built above") };
            if !txn_serializable(&t) {
                self.read_barrier().await?;
            }
            return self.state.read().txn_read(&t);
        }
        match self.propose(LogCommand { cmd: Some(Cmd::Txn(t)) }).await? {
            Applied::Txn(r) => Ok(r),
            a => Err(StoreError::Internal(format!("unexpected apply result {a:?}"))),
        }
    }

    pub async fn read_barrier(&self) -> Result<(), StoreError> {
        let fut = async {
            let (tx, rx) = oneshot::channel();
            self.read_waiters.lock().push(tx);
            self.read_notify.notify_one();
            let index = rx.await.map_err(|_| StoreError::Stopped)??;
            if self.applied_log_index() >= index {
                return Ok(());
            }
            self.raft.wait(Some(WRITE_TIMEOUT)).applied_index_at_least(Some(index), "read index").await.map_err(|_| StoreError::Timeout)?;
            Ok(())
        };
        tokio::time::timeout(WRITE_TIMEOUT, fut).await.map_err(|_| StoreError::Timeout)?
    }

    /// The commit index a linearizable read must wait for, confirmed against a quorum now:
    /// on the leader by openraft, on a follower by asking the leader.
    async fn fetch_read_index(&self) -> Result<u64, StoreError> {
        if self.leader().is_none() {
            self.await_leader().await;
        }
        if self.is_failed() {
            return Err(StoreError::Stopped);
        }
        match self.raft.get_read_log_id().await {
            Ok((read, _)) => Ok(read.map_or(0, |l| l.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                let node = f.leader_node.ok_or(StoreError::NoLeader)?;
                let mut client = self.net.client(&node.peer_addr).map_err(remote)?;
                Ok(client.read_index(self.net.request(pb::Empty {})).await.map_err(remote)?.into_inner().index)
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => Err(StoreError::NoLeader),
            Err(e) => Err(StoreError::Internal(e.to_string())),
        }
    }

    /// Asks raft for a snapshot once `--snapshot-count` commands or [`SNAPSHOT_BYTES`]
    /// have been applied since the last one. Ends when the member is dropped.
    async fn snapshot_loop(member: std::sync::Weak<Member>, due: Arc<tokio::sync::Notify>) {
        loop {
            // Woken by apply; the timeout also retries a trigger that found raft busy
            // (openraft ignores a trigger while a build runs; a build resets the counters).
            let _ = tokio::time::timeout(Duration::from_secs(1), due.notified()).await;
            let Some(m) = member.upgrade() else { return };
            if m.sm.snapshot_due() && m.raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }

    /// Serves waiting linearizable reads in batches: every read queued before a fetch
    /// starts shares its result; reads arriving during it wait for the next one.
    async fn read_index_loop(member: std::sync::Weak<Member>, notify: Arc<tokio::sync::Notify>) {
        loop {
            notify.notified().await;
            let Some(m) = member.upgrade() else { return };
            loop {
                let batch = std::mem::take(&mut *m.read_waiters.lock());
                if batch.is_empty() {
                    break;
                }
                let r = m.fetch_read_index().await;
                for w in batch {
                    let _ = w.send(r.clone());
                }
            }
        }
    }

    /// Keeps a lease alive: on the leader, which keeps the deadlines; forwarded otherwise.
    pub async fn lease_keep_alive(&self, req: LeaseKeepAliveRequest) -> Result<LeaseKeepAliveResponse, StoreError> {
        if self.is_leader() {
            let ttl = self.state.read().leases.get(&req.id).map(|l| l.ttl);
            // An unknown lease answers TTL 0: the client reports it expired (etcd).
            let ttl = match ttl {
                Some(ttl) => {
                    self.leases.renew(req.id, ttl, Instant::now());
                    ttl
                }
                None => 0,
            };
            return Ok(LeaseKeepAliveResponse { header: self.header(), id: req.id, ttl });
        }
        let leader = self.leader_node().ok_or(StoreError::NoLeader)?;
        let mut client = self.net.client(&leader.peer_addr).map_err(remote)?;
        Ok(client.lease_keep_alive(self.net.request(req)).await.map_err(remote)?.into_inner())
    }

    /// Time left on a lease, from the member that keeps the deadlines.
    pub async fn lease_time_to_live(&self, req: LeaseTimeToLiveRequest) -> Result<LeaseTimeToLiveResponse, StoreError> {
        if !self.is_leader() {
            if let Some(leader) = self.leader_node() {
                let mut client = self.net.client(&leader.peer_addr).map_err(remote)?;
                return Ok(client.lease_time_to_live(self.net.request(req)).await.map_err(remote)?.into_inner());
            }
        }
        let st = self.state.read();
        let Some(l) = st.leases.get(&req.id) else {
            return Ok(LeaseTimeToLiveResponse { header: self.header_at(st.mvcc.rev()), id: req.id, ttl: -1, ..Default::default() });
        };
        let ttl = self.leases.remaining(req.id, Instant::now()).unwrap_or(l.ttl);
        let keys = if req.keys { l.keys.iter().cloned().collect() } else { vec![] };
        Ok(LeaseTimeToLiveResponse { header: self.header_at(st.mvcc.rev()), id: req.id, ttl, granted_ttl: l.ttl, keys })
    }

    /// A client of the leader's raft service (for requests only it can answer).
    pub fn leader_client(&self) -> Result<shoal_proto::shoalraft::raft_client::RaftClient<tonic::transport::Channel>, tonic::Status> {
        let leader = self.leader_node().ok_or(StoreError::NoLeader)?;
        self.net.client(&leader.peer_addr)
    }

    fn leader_node(&self) -> Option<Node> {
        let leader = self.leader()?;
        self.members().into_iter().find(|(id, _, _)| *id == leader).map(|(_, n, _)| n)
    }

    /// This member as it should appear in the membership.
    fn own_node(&self) -> Node {
        Node { name: self.config.name.clone(), peer_addr: self.config.peer_addr.clone(), client_url: self.config.client_url.clone() }
    }

    /// Records this member's name and client URL in the membership once a leader exists.
    async fn publish_self(&self) -> Result<bool, StoreError> {
        let me = self.own_node();
        match self.members().into_iter().find(|(id, _, _)| *id == self.member_id) {
            Some((_, n, _)) if n == me => return Ok(true),
            None => return Ok(false), // not a member (yet)
            _ => {}
        }
        if self.is_leader() {
            LeaderDuties::publish(self, me).await.map_err(remote)?;
        } else {
            let leader = self.leader_node().ok_or(StoreError::NoLeader)?;
            let mut client = self.net.client(&leader.peer_addr).map_err(remote)?;
            client.publish(self.net.request(codec::node_to_pb(&me))).await.map_err(remote)?;
        }
        Ok(true)
    }

    /// Starts the background duties on the current tokio runtime: lease expiry (leader
    /// only), watch catch-up, progress notifications, publishing this member's attributes.
    pub fn spawn_background(self: &Arc<Self>) {
        // Each duty holds the member weakly and ends once it is dropped or shut down.
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            // Checked for good, not once: a member's own bootstrap entry can be replaced
            // by the leader's (which lacks this member's client URL), and a member added
            // later starts with no attributes at all.
            while let Some(m) = live(&weak) {
                let pause = match m.publish_self().await {
                    Ok(true) => Duration::from_secs(1),
                    Ok(false) => Duration::from_millis(100),
                    Err(e) => {
                        tracing::debug!(error = %e, "publishing member attributes; will retry");
                        Duration::from_millis(100)
                    }
                };
                drop(m);
                tokio::time::sleep(pause).await;
            }
        });
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(m) = live(&weak) else { return };
                m.expire_leases().await;
            }
        });
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                let Some(m) = live(&weak) else { return };
                m.hub.resync(&m.state);
                m.metrics.watchers.set(m.hub.watcher_count() as i64);
            }
        });
        let weak = Arc::downgrade(self);
        let interval = self.config.progress_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(m) = live(&weak) else { return };
                m.hub.progress_tick(&m.state);
            }
        });
    }

    /// On the leader: revokes leases whose deadline passed. A member that just became
    /// leader first gives every lease a full TTL (etcd): the old leader's deadlines are gone.
    async fn expire_leases(&self) {
        let leader = self.is_leader();
        {
            let mut was = self.was_leader.lock();
            if leader && !*was {
                let st = self.state.read();
                self.leases.reset_all(st.leases.iter().map(|(id, l)| (*id, l.ttl)), Instant::now());
            }
            *was = leader;
        }
        if !leader {
            return;
        }
        for id in self.leases.expired(Instant::now()) {
            let cmd = LogCommand { cmd: Some(Cmd::LeaseRevoke(LeaseRevokeRequest { id })) };
            match self.propose(cmd).await {
                Ok(_) => {
                    self.metrics.leases_expired.inc();
                    tracing::debug!(lease = id, "lease expired");
                }
                Err(StoreError::LeaseNotFound) => self.leases.forget(id),
                Err(e) => tracing::warn!(lease = id, error = %e, "revoking an expired lease failed; will retry"),
            }
        }
    }

    /// Directory where a member keeps its files under `--data-dir`.
    pub fn member_dir(data_dir: &std::path::Path) -> PathBuf {
        data_dir.join("member")
    }

    /// What this member has applied (log id) — for status and tests.
    pub fn applied_log_index(&self) -> u64 {
        self.sm.applied.lock().log_id.map_or(0, |l| l.index)
    }
}

/// The member behind `weak`, unless it was dropped or shut down.
fn live(weak: &std::sync::Weak<Member>) -> Option<Arc<Member>> {
    weak.upgrade().filter(|m| !*m.gate.lock())
}

/// The error of a forwarded write. Only a request that provably never reached the leader
/// (no connection, or dropped by the fault injector before sending) may be retried;
/// anything else may have been committed, so the client hears "request timed out" and
/// decides, as with etcd.
fn forward_err(s: tonic::Status) -> StoreError {
    let never_sent = s.message().contains("tcp connect error") || s.message().contains("partitioned") || s.message().contains("Connection refused");
    match s.code() {
        tonic::Code::Unavailable if never_sent => StoreError::NoLeader,
        tonic::Code::Unavailable if s.message() == "etcdserver: no leader" || s.message() == "etcdserver: not leader" => StoreError::NoLeader,
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled if !s.message().starts_with("etcdserver:") => StoreError::Timeout,
        _ => StoreError::Remote { code: s.code(), message: s.message().to_string() },
    }
}

/// A status from a peer, kept with its code and etcd-worded message.
fn remote(s: tonic::Status) -> StoreError {
    match s.code() {
        // The leader could not be reached (gone, restarting, partitioned): look again.
        tonic::Code::Unavailable | tonic::Code::Unknown if !s.message().starts_with("etcdserver:") => StoreError::NoLeader,
        tonic::Code::Unavailable if s.message() == "etcdserver: no leader" || s.message() == "etcdserver: not leader" => StoreError::NoLeader,
        _ => StoreError::Remote { code: s.code(), message: s.message().to_string() },
    }
}

/// Encodes an apply result for a follower that forwarded the write.
pub fn applied_to_pb(a: Applied, header: Option<ResponseHeader>) -> pb::ApplyResult {
    let r = match a {
        Applied::Put(r) => AR::Put(r),
        Applied::DeleteRange(r) => AR::DeleteRange(r),
        Applied::Txn(r) => AR::Txn(r),
        Applied::Compaction => AR::Compaction(pb::Empty {}),
        Applied::LeaseGrant { id, ttl } => AR::LeaseGrant(LeaseGrantResponse { header, id, ttl, error: String::new() }),
        Applied::LeaseRevoke => AR::LeaseRevoke(pb::Empty {}),
        Applied::Alarm(alarms) => AR::Alarm(AlarmResponse { header, alarms }),
        // Only commands are forwarded, and a command never applies as Noop.
        Applied::Noop => return pb::ApplyResult { result: None, log_index: 0 },
    };
    pb::ApplyResult { result: Some(r), log_index: 0 }
}

fn applied_from_pb(r: pb::ApplyResult) -> Result<Applied, StoreError> {
    Ok(match r.result {
        Some(AR::Put(r)) => Applied::Put(r),
        Some(AR::DeleteRange(r)) => Applied::DeleteRange(r),
        Some(AR::Txn(r)) => Applied::Txn(r),
        Some(AR::Compaction(_)) => Applied::Compaction,
        Some(AR::LeaseGrant(g)) => Applied::LeaseGrant { id: g.id, ttl: g.ttl },
        Some(AR::LeaseRevoke(_)) => Applied::LeaseRevoke,
        Some(AR::Alarm(a)) => Applied::Alarm(a.alarms),
        None => return Err(StoreError::Internal("empty forwarded result".into())),
    })
}

#[tonic::async_trait]
impl LeaderDuties for Member {
    async fn forward(&self, cmd: LogCommand) -> Result<pb::ApplyResult, tonic::Status> {
        state::validate(&cmd)?;
        let (a, index) = match tokio::time::timeout(WRITE_TIMEOUT, self.propose_indexed(cmd)).await {
            Ok(r) => r?,
            Err(_) => return Err(StoreError::Timeout.into()),
        };
        let mut r = applied_to_pb(a, self.header());
        r.log_index = index;
        Ok(r)
    }

    async fn read_index(&self) -> Result<u64, tonic::Status> {
        // Followers' requests join this leader's batches.
        let (tx, rx) = oneshot::channel();
        self.read_waiters.lock().push(tx);
        self.read_notify.notify_one();
        Ok(rx.await.map_err(|_| StoreError::Stopped)??)
    }

    async fn lease_keep_alive(&self, req: LeaseKeepAliveRequest) -> Result<LeaseKeepAliveResponse, tonic::Status> {
        Ok(Member::lease_keep_alive(self, req).await?)
    }

    async fn lease_time_to_live(&self, req: LeaseTimeToLiveRequest) -> Result<LeaseTimeToLiveResponse, tonic::Status> {
        Ok(Member::lease_time_to_live(self, req).await?)
    }

    async fn member_add(&self, req: shoal_proto::etcdserverpb::MemberAddRequest) -> Result<shoal_proto::etcdserverpb::MemberAddResponse, tonic::Status> {
        self.member_add_local(req).await
    }

    async fn member_remove(&self, req: shoal_proto::etcdserverpb::MemberRemoveRequest) -> Result<shoal_proto::etcdserverpb::MemberRemoveResponse, tonic::Status> {
        self.member_remove_local(req).await
    }

    async fn member_promote(&self, req: shoal_proto::etcdserverpb::MemberPromoteRequest) -> Result<shoal_proto::etcdserverpb::MemberPromoteResponse, tonic::Status> {
        self.member_promote_local(req).await
    }

    async fn publish(&self, node: Node) -> Result<(), tonic::Status> {
        let id = member_id(&node.peer_addr);
        if !self.members().iter().any(|(i, _, _)| *i == id) {
            return Err(StoreError::MemberNotFound.into());
        }
        self.raft
            .change_membership(openraft::ChangeMembers::SetNodes([(id, node)].into()), true)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("etcdserver: publishing member attributes failed: {e}")))?;
        Ok(())
    }
}

/// A read-only txn is served member-locally only when all its ranges ask for it (etcd).
fn txn_serializable(t: &shoal_proto::etcdserverpb::TxnRequest) -> bool {
    use shoal_proto::etcdserverpb::request_op::Request;
    t.success.iter().chain(&t.failure).all(|op| match &op.request {
        Some(Request::RequestRange(r)) => r.serializable,
        Some(Request::RequestTxn(t)) => txn_serializable(t),
        _ => true,
    })
}
