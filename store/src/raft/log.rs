//! openraft log storage over the write-ahead log.
//!
//! Entries are kept decoded in memory from the last purge on (openraft reads them back to
//! replicate) and appended to the log by the writer thread, which takes every append
//! queued meanwhile and makes them durable with one write + fdatasync (group commit);
//! only then does openraft hear "flushed". The vote lives in its own file, replaced
//! atomically.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogId, LogState, RaftLogReader, StorageError, Vote};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use shoal_proto::shoalraft as pb;

use super::codec::{self, Entry};
use super::TypeConfig;
use crate::disk::Disk;
use crate::metrics::StoreMetrics;
use crate::wal::Wal;

const VOTE_FILE: &str = "vote";

/// Closed (true) once the member shut down: the log writer and the snapshot builder
/// write nothing after that. Held while they write.
pub type Gate = Arc<Mutex<bool>>;

struct Shared {
    entries: RwLock<BTreeMap<u64, Entry>>,
    last_purged: Mutex<Option<LogId<u64>>>,
}

/// Log reader handed to replication tasks.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(&mut self, range: RB) -> Result<Vec<Entry>, StorageError<u64>> {
        Ok(self.shared.entries.read().range(range).map(|(_, e)| e.clone()).collect())
    }
}

enum Job {
    Append { records: Vec<(u64, Vec<u8>)>, done: LogFlushed<TypeConfig> },
    Purge(u64),
    Committed(Vec<u8>),
}

/// Holds the last committed log id openraft reported: a hint written without fsync, so
/// a restarted member re-applies what it knows is committed before serving, instead of
/// serving its snapshot's older state until a leader commits again. A lost or stale hint
/// is safe: it only ever names entries that were already durable and committed.
const COMMITTED_FILE: &str = "committed";

/// The log storage openraft drives.
pub struct LogStore {
    shared: Arc<Shared>,
    disk: Arc<dyn Disk>,
    tx: std::sync::mpsc::Sender<Job>,
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: std::io::Error) -> StorageError<u64> {
    StorageError::from_io_error(subject, verb, e)
}

impl LogStore {
    /// Takes over a recovered log: `entries` (decoded from the log after the snapshot)
    /// and `last_purged` (the snapshot's last log id). Starts the writer thread.
    pub fn new(disk: Arc<dyn Disk>, wal: Wal, entries: Vec<Entry>, last_purged: Option<LogId<u64>>, metrics: Arc<StoreMetrics>, gate: Gate) -> std::io::Result<LogStore> {
        let shared = Arc::new(Shared {
            entries: RwLock::new(entries.into_iter().map(|e| (e.log_id.index, e)).collect()),
            last_purged: Mutex::new(last_purged),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let wdisk = disk.clone();
        std::thread::Builder::new().name("store-wal".into()).spawn(move || writer(wal, wdisk, rx, metrics, gate))?;
        Ok(LogStore { shared, disk, tx })
    }

    /// Reads the vote file, if any.
    pub fn load_vote(disk: &dyn Disk) -> Result<Option<Vote<u64>>, String> {
        match disk.read(VOTE_FILE) {
            Ok(b) => {
                let v = pb::Vote::decode(b.as_slice()).map_err(|e| format!("{}: {e}", disk.path_of(VOTE_FILE).display()))?;
                Ok(Some(codec::vote_from_pb(Some(&v)).map_err(|e| e.message().to_string())?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", disk.path_of(VOTE_FILE).display())),
        }
    }
}

/// The log writer thread: group commit of every queued append.
fn writer(mut wal: Wal, disk: Arc<dyn Disk>, rx: std::sync::mpsc::Receiver<Job>, metrics: Arc<StoreMetrics>, gate: Gate) {
    let mut failed = false;
    while let Ok(job) = rx.recv() {
        let mut jobs = vec![job];
        while let Ok(j) = rx.try_recv() {
            jobs.push(j);
        }
        let mut records: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut done = Vec::new();
        let mut purge = None;
        let mut committed = None;
        for j in jobs {
            match j {
                Job::Append { records: r, done: d } => {
                    records.extend(r);
                    done.push(d);
                }
                Job::Purge(i) => purge = Some(i),
                Job::Committed(c) => committed = Some(c),
            }
        }
        // Held while writing: once the member is closed, nothing more reaches the disk.
        let closed = gate.lock();
        if *closed {
            failed = true;
        }
        if !records.is_empty() {
            let t = Instant::now();
            let res = if failed {
                Err(std::io::Error::other("the write-ahead log failed earlier; this member takes no more writes"))
            } else {
                wal.append(records.iter().map(|(i, d)| (*i, d.as_slice())))
            };
            metrics.wal_fsync_seconds.observe(t.elapsed().as_secs_f64());
            metrics.batch_entries.observe(records.len() as f64);
            if let Err(e) = &res {
                if !failed {
                    tracing::error!(error = %e, "write-ahead log append failed; the member stops accepting writes");
                }
                failed = true;
            }
            for d in done {
                d.log_io_completed(res.as_ref().map(|_| ()).map_err(|e| std::io::Error::new(e.kind(), e.to_string())));
            }
        }
        // After this round's append: the hint never names an entry not yet on disk here.
        if let Some(c) = committed.filter(|_| !*closed && !failed) {
            if let Err(e) = disk.write_lazy(COMMITTED_FILE, &c) {
                tracing::debug!(error = %e, "recording the committed index failed (a hint only)");
            }
        }
        if let Some(i) = purge.filter(|_| !*closed) {
            if let Err(e) = wal.purge_to(i) {
                tracing::warn!(error = %e, upto = i, "removing write-ahead log segments covered by a snapshot failed");
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(&mut self, range: RB) -> Result<Vec<Entry>, StorageError<u64>> {
        Ok(self.shared.entries.read().range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let last_purged = *self.shared.last_purged.lock();
        let last = self.shared.entries.read().values().next_back().map(|e| e.log_id).or(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError<u64>> {
        if let Some(c) = committed {
            let _ = self.tx.send(Job::Committed(codec::log_id_to_pb(&c).encode_to_vec()));
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        // Unreadable (torn by a crash) or absent: no hint, openraft learns it from a leader.
        let Ok(bytes) = self.disk.read(COMMITTED_FILE) else { return Ok(None) };
        if bytes.is_empty() {
            return Ok(None);
        }
        let Ok(c) = pb::LogId::decode(bytes.as_slice()) else { return Ok(None) };
        let c = codec::log_id_from_pb(&c);
        // Never beyond the log this member has.
        let last = self.shared.entries.read().keys().next_back().copied();
        let purged = self.shared.last_purged.lock().map(|l| l.index);
        if last.or(purged).is_some_and(|l| c.index <= l) {
            Ok(Some(c))
        } else {
            Ok(None)
        }
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader { shared: self.shared.clone() }
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let bytes = codec::vote_to_pb(vote).encode_to_vec();
        self.disk.write_atomic(VOTE_FILE, &bytes).map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        LogStore::load_vote(self.disk.as_ref())
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Read, std::io::Error::other(e)))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut records = Vec::new();
        {
            let mut map = self.shared.entries.write();
            for e in entries {
                records.push((e.log_id.index, codec::entry_to_pb(&e).encode_to_vec()));
                map.insert(e.log_id.index, e);
            }
        }
        self.tx
            .send(Job::Append { records, done: callback })
            .map_err(|_| io_err(ErrorSubject::Logs, ErrorVerb::Write, std::io::Error::other("log writer stopped")))
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        // Entries from `log_id` on are dropped here; on disk they are superseded by the
        // next append at the same index (the log keeps the newest copy of an index).
        self.shared.entries.write().split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        {
            let mut map = self.shared.entries.write();
            *map = map.split_off(&(log_id.index + 1));
        }
        *self.shared.last_purged.lock() = Some(log_id);
        let _ = self.tx.send(Job::Purge(log_id.index));
        Ok(())
    }
}
