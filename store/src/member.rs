//! One store member: recovery (snapshot + log tail), the group-commit pipeline, and the
//! background duties (lease expiry, watch catch-up, snapshots).
//!
//! Write path: `propose` validates and encodes a command and queues it. The committer
//! thread takes every queued proposal at once, appends them to the write-ahead log as one
//! batch (one write + one fdatasync through io_uring), applies them to the state under
//! its write lock, publishes their events to the watch hub, and only then answers the
//! proposers. Architecture Invariant 2: no proposer hears "ok" before its entry is durable.
//!
//! Today a member is a single-member cluster; replication (openraft) takes the place of
//! the committer's "append" step, with the same log and state machine.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use prost::Message;
use shoal_proto::etcdserverpb::{LeaseRevokeRequest, ResponseHeader};
use shoal_proto::shoalstore::{log_command::Cmd, LogCommand};
use tokio::sync::{mpsc, oneshot};

use crate::disk::Disk;
use crate::error::StoreError;
use crate::lease::LeaseClock;
use crate::metrics::StoreMetrics;
use crate::snapshot;
use crate::state::{self, Applied, State};
use crate::wal::Wal;
use crate::watch::{HeaderInfo, WatchHub};

/// Configuration of a member. [`StoreConfig::validate`] rejects nonsense at start-up.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Human-readable member name (etcd's `--name`).
    pub name: String,
    /// URLs clients use (shown by `member list`).
    pub client_urls: Vec<String>,
    /// URLs peers use.
    pub peer_urls: Vec<String>,
    /// Space quota: writes are refused with NOSPACE beyond it. etcd's default is 2 GiB; ours 8 GiB.
    pub quota_bytes: u64,
    /// Largest request accepted (etcd's `--max-request-bytes`, default 1.5 MiB).
    pub max_request_bytes: usize,
    /// A snapshot is written after this many entries since the last one.
    pub snapshot_entries: u64,
    /// How often watchers that asked for progress notifications get one when idle.
    pub progress_interval: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            name: "default".into(),
            client_urls: vec!["http://127.0.0.1:2379".into()],
            peer_urls: vec!["http://127.0.0.1:2380".into()],
            quota_bytes: 8 << 30,
            max_request_bytes: 3 << 19,
            snapshot_entries: 100_000,
            progress_interval: Duration::from_secs(600),
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
        Ok(())
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
    #[error("replaying entry {index} of the write-ahead log: {reason}")]
    Replay { index: u64, reason: String },
    #[error("starting the committer thread: {0}")]
    Thread(std::io::Error),
}

struct Proposal {
    cmd: LogCommand,
    data: Vec<u8>,
    reply: oneshot::Sender<Result<Applied, StoreError>>,
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
    tx: mpsc::Sender<Proposal>,
    /// The member's files (log and snapshots).
    pub disk: Arc<dyn Disk>,
    /// Set when the log failed: the member refuses writes from then on.
    failed: Arc<AtomicBool>,
    /// Monotonic source of lease IDs (seeded from the clock and member ID).
    lease_seq: AtomicU64,
    pub recovery: RecoveryInfo,
}

/// What the last start found and how long it took.
#[derive(Clone, Debug, Default)]
pub struct RecoveryInfo {
    pub snapshot_index: u64,
    pub replayed_entries: u64,
    pub truncated_tail: Option<(String, u64, u64)>,
    pub duration: Duration,
}

/// FNV-1a, for stable IDs derived from names.
fn fnv(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Member {
    /// Opens a member whose files live in `disk`: loads the newest snapshot, replays the log
    /// after it, and starts the committer thread.
    pub fn open(config: StoreConfig, disk: Arc<dyn Disk>) -> Result<Arc<Member>, OpenError> {
        config.validate().map_err(OpenError::Config)?;
        let t0 = Instant::now();
        let metrics = Arc::new(StoreMetrics::new());
        let (mut st, snap_index) = match snapshot::load_latest(&disk, config.quota_bytes)? {
            Some(l) => {
                let i = l.state.applied;
                (l.state, i)
            }
            None => (State::new(config.quota_bytes), 0),
        };
        let (mut wal, entries, report) = Wal::open(disk.clone(), snap_index)?;
        let replayed = entries.len() as u64;
        let mut scratch = Vec::new();
        for e in entries {
            let cmd = LogCommand::decode(e.data.as_ref()).map_err(|err| OpenError::Replay { index: e.index, reason: err.to_string() })?;
            // A command that failed when first applied fails again the same way: that is
            // part of determinism, not an error of the log.
            let _ = st.apply(e.index, &cmd, &mut scratch);
            scratch.clear();
        }
        let recovery = RecoveryInfo { snapshot_index: snap_index, replayed_entries: replayed, truncated_tail: report.truncated, duration: t0.elapsed() };
        tracing::info!(name = %config.name, snapshot_index = snap_index, replayed, revision = st.mvcc.rev(),
            keys = st.mvcc.key_count(), ms = recovery.duration.as_millis() as u64, "store recovered");

        let member_id = fnv(format!("{}|{}", config.name, config.peer_urls.join(",")).as_bytes()) | 1;
        // Taking over as leader commits an entry of its own (raft's empty entry of a new term).
        let start = LogCommand { cmd: Some(Cmd::LeaderStart(shoal_proto::shoalstore::LeaderStart { member_id })) };
        let index = wal.last_index().max(st.applied) + 1;
        wal.append([(index, start.encode_to_vec().as_slice())]).map_err(|e| OpenError::Replay { index, reason: format!("appending the leader-start entry: {e}") })?;
        let _ = st.apply(index, &start, &mut scratch);
        let cluster_id = fnv(format!("shoal|{}", config.peer_urls.join(",")).as_bytes()) | 1;
        let leases = Arc::new(LeaseClock::new());
        leases.reset_all(st.leases.iter().map(|(id, l)| (*id, l.ttl)), Instant::now());
        let hub = Arc::new(WatchHub::new(HeaderInfo { cluster_id, member_id }, config.max_request_bytes));
        let state = Arc::new(RwLock::new(st));
        let (tx, rx) = mpsc::channel(65_536);
        let failed = Arc::new(AtomicBool::new(false));
        let committer = Committer {
            wal,
            disk: disk.clone(),
            state: state.clone(),
            hub: hub.clone(),
            leases: leases.clone(),
            metrics: metrics.clone(),
            failed: failed.clone(),
            snapshot_entries: config.snapshot_entries,
            last_snapshot: snap_index,
            snapshot_done: Arc::new(AtomicU64::new(0)),
            snapshot_running: Arc::new(AtomicBool::new(false)),
        };
        std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(OpenError::Thread)?;
        let seed = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64) ^ member_id;
        Ok(Arc::new(Member {
            config,
            state,
            hub,
            leases,
            metrics,
            member_id,
            cluster_id,
            tx,
            disk,
            failed,
            lease_seq: AtomicU64::new(seed),
            recovery,
        }))
    }

    /// True once the log failed and the member stopped taking writes.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Response header for the current revision.
    pub fn header(&self) -> Option<ResponseHeader> {
        self.header_at(self.state.read().mvcc.rev())
    }

    pub fn header_at(&self, rev: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader { cluster_id: self.cluster_id, member_id: self.member_id, revision: rev, raft_term: self.term() })
    }

    /// The raft term (1 for a single member that never changed leader).
    pub fn term(&self) -> u64 {
        1
    }

    /// Picks a lease ID nobody holds: positive, never reused by this member.
    pub fn next_lease_id(&self) -> i64 {
        loop {
            let x = self.lease_seq.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
            let id = (x >> 1) as i64;
            if id > 0 && !self.state.read().leases.contains_key(&id) {
                return id;
            }
        }
    }

    /// Validates, logs and applies a command; returns once it is durable and applied.
    pub async fn propose(&self, cmd: LogCommand) -> Result<Applied, StoreError> {
        state::validate(&cmd)?;
        let data = cmd.encode_to_vec();
        if data.len() > self.config.max_request_bytes {
            return Err(StoreError::RequestTooLarge);
        }
        if self.failed.load(Ordering::Relaxed) {
            return Err(StoreError::Stopped);
        }
        let (reply, rx) = oneshot::channel();
        self.tx.send(Proposal { cmd, data, reply }).await.map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Starts the background duties on the current tokio runtime: lease expiry, watch
    /// catch-up and progress notifications.
    pub fn spawn_background(self: &Arc<Self>) {
        let m = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                for id in m.leases.expired(Instant::now()) {
                    let cmd = LogCommand { cmd: Some(Cmd::LeaseRevoke(LeaseRevokeRequest { id })) };
                    match m.propose(cmd).await {
                        Ok(_) => {
                            m.metrics.leases_expired.inc();
                            tracing::debug!(lease = id, "lease expired");
                        }
                        Err(StoreError::LeaseNotFound) => m.leases.forget(id),
                        Err(e) => tracing::warn!(lease = id, error = %e, "revoking an expired lease failed; will retry"),
                    }
                }
            }
        });
        let m = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                m.hub.resync(&m.state);
                m.metrics.watchers.set(m.hub.watcher_count() as i64);
            }
        });
        let m = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(m.config.progress_interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                m.hub.progress_tick(&m.state);
            }
        });
    }

    /// Directory where a member keeps its files under `--data-dir`.
    pub fn member_dir(data_dir: &std::path::Path) -> PathBuf {
        data_dir.join("member")
    }
}

struct Committer {
    wal: Wal,
    disk: Arc<dyn Disk>,
    state: Arc<RwLock<State>>,
    hub: Arc<WatchHub>,
    leases: Arc<LeaseClock>,
    metrics: Arc<StoreMetrics>,
    failed: Arc<AtomicBool>,
    snapshot_entries: u64,
    last_snapshot: u64,
    snapshot_done: Arc<AtomicU64>,
    snapshot_running: Arc<AtomicBool>,
}

/// Most proposals one group commit takes.
const MAX_BATCH: usize = 8192;

impl Committer {
    fn run(mut self, mut rx: mpsc::Receiver<Proposal>) {
        let mut batch: Vec<Proposal> = Vec::with_capacity(MAX_BATCH);
        let mut events = Vec::new();
        while let Some(p) = rx.blocking_recv() {
            batch.push(p);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch, &mut events);
            self.maybe_snapshot();
        }
        tracing::info!("store committer stopped");
    }

    fn commit(&mut self, batch: &mut Vec<Proposal>, events: &mut Vec<(i64, crate::mvcc::Event)>) {
        if self.failed.load(Ordering::Relaxed) {
            // After a failed append the log's tail is unknown: append nothing more.
            for p in batch.drain(..) {
                self.metrics.proposals_failed.inc();
                let _ = p.reply.send(Err(StoreError::Stopped));
            }
            return;
        }
        let first = self.wal.last_index() + 1;
        let t = Instant::now();
        let res = self.wal.append(batch.iter().enumerate().map(|(i, p)| (first + i as u64, p.data.as_slice())));
        self.metrics.wal_fsync_seconds.observe(t.elapsed().as_secs_f64());
        self.metrics.batch_entries.observe(batch.len() as f64);
        if let Err(e) = res {
            // Whether the batch reached the disk is unknown: stop taking writes rather than
            // risk answering differently from what a restart will replay.
            tracing::error!(error = %e, "write-ahead log append failed; the member stops accepting writes");
            self.failed.store(true, Ordering::Relaxed);
            for p in batch.drain(..) {
                self.metrics.proposals_failed.inc();
                let _ = p.reply.send(Err(StoreError::Internal(format!("write-ahead log: {e}"))));
            }
            return;
        }
        let mut results = Vec::with_capacity(batch.len());
        let now = Instant::now();
        {
            let mut st = self.state.write();
            for (i, p) in batch.iter().enumerate() {
                results.push(st.apply(first + i as u64, &p.cmd, events));
            }
            self.metrics.applied_index.set(st.applied as i64);
            self.metrics.db_size_bytes.set(st.mvcc.size() as i64);
            self.metrics.keys.set(st.mvcc.key_count() as i64);
        }
        self.hub.publish(events);
        events.clear();
        for (p, r) in batch.drain(..).zip(results) {
            match &r {
                Ok(Applied::LeaseGrant { id, ttl }) => self.leases.renew(*id, *ttl, now),
                Ok(Applied::LeaseRevoke) => {
                    if let Some(Cmd::LeaseRevoke(rv)) = &p.cmd.cmd {
                        self.leases.forget(rv.id);
                    }
                }
                _ => {}
            }
            self.metrics.proposals_committed.inc();
            let _ = p.reply.send(r);
        }
    }

    fn maybe_snapshot(&mut self) {
        let done = self.snapshot_done.swap(0, Ordering::AcqRel);
        if done > 0 {
            self.last_snapshot = done;
            if let Err(e) = self.wal.purge_to(done).and_then(|_| snapshot::remove_older(self.disk.as_ref(), done)) {
                tracing::warn!(error = %e, "removing files covered by a snapshot failed");
            }
        }
        let applied = self.wal.last_index();
        if applied - self.last_snapshot < self.snapshot_entries || self.snapshot_running.load(Ordering::Acquire) {
            return;
        }
        // New entries go to a fresh segment so that every older one is covered by the snapshot.
        if let Err(e) = self.wal.roll() {
            // A half-created segment may now exist: appending elsewhere would leave the
            // log in an order recovery cannot trust, so the member stops taking writes.
            tracing::error!(error = %e, "starting a new write-ahead log segment failed; the member stops accepting writes");
            self.failed.store(true, Ordering::Relaxed);
            return;
        }
        self.snapshot_running.store(true, Ordering::Release);
        let state = self.state.read().clone();
        let disk = self.disk.clone();
        let done = self.snapshot_done.clone();
        let running = self.snapshot_running.clone();
        let metrics = self.metrics.clone();
        let spawned = std::thread::Builder::new().name("store-snapshot".into()).spawn(move || {
            let t = Instant::now();
            match snapshot::save(disk.as_ref(), &state, 1, vec![]) {
                Ok(name) => {
                    tracing::info!(file = %disk.path_of(&name).display(), index = state.applied, ms = t.elapsed().as_millis() as u64, "snapshot written");
                    metrics.snapshots.inc();
                    done.store(state.applied, Ordering::Release);
                }
                Err(e) => tracing::warn!(error = %e, "writing a snapshot failed; the log keeps growing until one succeeds"),
            }
            running.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.snapshot_running.store(false, Ordering::Release);
        }
    }
}
