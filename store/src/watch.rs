//! The watch hub: delivers every applied event to the watchers whose key range it
//! matches, in revision order, exactly once.
//!
//! Each event is encoded once (with and without its previous value) into shared bytes;
//! every watcher's response references those bytes (see `WatchResponseRaw`). Watchers are
//! either *synced* (they get events as they are applied) or *lagging* (started in the
//! past, or their stream's queue was full): a lagging watcher is caught up from the MVCC
//! history, under the state lock, and becomes synced in the same step, so no event is
//! skipped or sent twice. Architecture Invariant: a watcher's `next_rev` only grows, and
//! only events with revision `>= next_rev` are sent to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use prost::Message;
use shoal_proto::etcdserverpb::ResponseHeader;
use shoal_proto::shoalstore::WatchResponseRaw;
use tokio::sync::mpsc;

use crate::error::StoreError;
use crate::mvcc::{Event, EventKind, KeyRange, Rev};
use crate::state::{event_to_pb, State};

/// One response as the client stream yields it.
pub type WatchItem = Result<WatchResponseRaw, tonic::Status>;

/// What a tap receives: the events of one apply, shared (values are the stored buffers).
pub type TapBatch = std::sync::Arc<Vec<(Rev, Event)>>;

/// What a stream's queue carries: responses queued together (one publish fans out to a
/// stream's watchers as one queue operation, not one per watcher).
pub type WatchBatch = Vec<WatchItem>;

/// Identity stamped on every response header.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeaderInfo {
    pub cluster_id: u64,
    pub member_id: u64,
}

/// One registered watcher.
struct Watcher {
    stream: u64,
    watch_id: i64,
    range: KeyRange,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    fragment: bool,
    progress_notify: bool,
    /// Lowest revision not yet sent.
    next_rev: Rev,
    lagging: bool,
    /// Set when events were sent since the last progress tick.
    active: bool,
}

impl Watcher {
    /// False when the watcher filters this kind of event out (NOPUT / NODELETE).
    fn wants(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::Put => !self.no_put,
            EventKind::Delete => !self.no_delete,
        }
    }
}

struct StreamEntry {
    tx: mpsc::Sender<WatchBatch>,
    /// A progress request arrived while some watcher lagged: answer once synced.
    progress_pending: bool,
}

#[derive(Default)]
struct Inner {
    watchers: HashMap<(u64, i64), Watcher>,
    streams: HashMap<u64, StreamEntry>,
    lagging: usize,
    /// The most recent events in revision order; every event with revision
    /// `>= ring_start` is here, so catching a watcher up from there costs O(events), not a
    /// scan of its key range in the MVCC history.
    ring: std::collections::VecDeque<(Rev, Event)>,
    ring_start: Rev,
    /// In-process subscribers of every event (the API server's watch cache), see `tap`.
    taps: Vec<mpsc::Sender<TapBatch>>,
}

/// Events kept in the ring.
const RING_EVENTS: usize = 20_000;

/// Parameters of a new watcher (from a `WatchCreateRequest`).
#[derive(Clone, Debug)]
pub struct WatchSpec {
    pub range: KeyRange,
    pub start_rev: Rev,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    pub fragment: bool,
    pub progress_notify: bool,
}

/// An event encoded for the wire, lazily in each of its two forms.
struct Encoded<'a> {
    rev: Rev,
    ev: &'a Event,
    plain: Option<Bytes>,
    with_prev: Option<Bytes>,
}

impl Encoded<'_> {
    fn get(&mut self, prev: bool) -> Bytes {
        let slot = if prev && self.ev.prev.is_some() { &mut self.with_prev } else { &mut self.plain };
        if slot.is_none() {
            let mut pb = event_to_pb(self.ev);
            if !prev {
                pb.prev_kv = None;
            }
            *slot = Some(Bytes::from(pb.encode_to_vec()));
        }
        slot.clone().expect("filled above")
    }
}

pub struct WatchHub {
    inner: Mutex<Inner>,
    next_stream: AtomicU64,
    header: HeaderInfo,
    /// Largest response before fragmenting (the request size limit, as etcd).
    max_bytes: usize,
    pub events_sent: AtomicU64,
}

impl WatchHub {
    /// A hub whose ring starts empty at `next_rev` (the revision after the current one).
    pub fn new(header: HeaderInfo, max_bytes: usize, next_rev: Rev) -> WatchHub {
        let inner = Inner { ring_start: next_rev, ..Inner::default() };
        WatchHub { inner: Mutex::new(inner), next_stream: AtomicU64::new(1), header, max_bytes, events_sent: AtomicU64::new(0) }
    }

    pub fn header(&self, rev: Rev) -> Option<ResponseHeader> {
        Some(ResponseHeader { cluster_id: self.header.cluster_id, member_id: self.header.member_id, revision: rev, raft_term: 0 })
    }

    /// Registers a client stream; its responses go to `tx`.
    pub fn open_stream(&self, tx: mpsc::Sender<WatchBatch>) -> u64 {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.inner.lock().streams.insert(id, StreamEntry { tx, progress_pending: false });
        id
    }

    /// Drops a stream and all its watchers.
    pub fn close_stream(&self, stream: u64) {
        let mut g = self.inner.lock();
        g.streams.remove(&stream);
        let mut lag = 0;
        g.watchers.retain(|_, w| {
            let keep = w.stream != stream;
            if !keep && w.lagging {
                lag += 1;
            }
            keep
        });
        g.lagging -= lag;
    }

    pub fn watcher_count(&self) -> usize {
        self.inner.lock().watchers.len()
    }

    pub fn has_watcher(&self, stream: u64, watch_id: i64) -> bool {
        self.inner.lock().watchers.contains_key(&(stream, watch_id))
    }

    /// Adds a watcher. The caller has already queued the `created` response. Past start
    /// revisions are replayed from `state` before this returns, or later if the stream
    /// queue is full.
    pub fn add(&self, state: &RwLock<State>, stream: u64, watch_id: i64, spec: WatchSpec) {
        let st = state.read();
        let mut g = self.inner.lock();
        let cur = st.mvcc.rev();
        let lagging = spec.start_rev > 0 && spec.start_rev <= cur;
        let w = Watcher {
            stream,
            watch_id,
            range: spec.range,
            prev_kv: spec.prev_kv,
            no_put: spec.no_put,
            no_delete: spec.no_delete,
            fragment: spec.fragment,
            progress_notify: spec.progress_notify,
            // A start in the future waits for that revision (etcd: max(start, now + 1)).
            next_rev: if lagging { spec.start_rev } else { spec.start_rev.max(cur + 1) },
            lagging,
            active: false,
        };
        g.watchers.insert((stream, watch_id), w);
        if lagging {
            g.lagging += 1;
            self.catch_up(&st, &mut g, Some((stream, watch_id)));
        }
    }

    /// Registers an in-process subscriber of every event applied from now on, delivered
    /// unencoded with the stored value buffers shared. Call it while holding the state's
    /// read lock after reading a snapshot of the keys: no event can be applied in between.
    /// A tap whose queue is full, or any tap when the state is replaced by a snapshot, is
    /// dropped: its receiver ends and must re-read and re-tap.
    pub fn tap(&self, tx: mpsc::Sender<TapBatch>) {
        self.inner.lock().taps.push(tx);
    }

    /// Makes every watcher catch up from history (after the state was replaced wholesale).
    pub fn mark_all_lagging(&self, next_rev: Rev) {
        let mut g = self.inner.lock();
        g.taps.clear();
        g.ring.clear();
        g.ring_start = next_rev;
        let mut n = 0;
        for w in g.watchers.values_mut() {
            if !w.lagging {
                w.lagging = true;
                n += 1;
            }
        }
        g.lagging += n;
    }

    /// Removes a watcher; returns whether it existed.
    pub fn cancel(&self, stream: u64, watch_id: i64) -> bool {
        let mut g = self.inner.lock();
        match g.watchers.remove(&(stream, watch_id)) {
            Some(w) => {
                if w.lagging {
                    g.lagging -= 1;
                }
                true
            }
            None => false,
        }
    }

    /// Delivers events just applied (ordered by revision) to synced watchers.
    pub fn publish(&self, events: &[(Rev, Event)]) {
        if events.is_empty() {
            return;
        }
        let mut enc: Vec<Encoded> = events.iter().map(|(rev, ev)| Encoded { rev: *rev, ev, plain: None, with_prev: None }).collect();
        let mut g = self.inner.lock();
        if !g.taps.is_empty() {
            let batch: TapBatch = std::sync::Arc::new(events.to_vec());
            g.taps.retain(|t| t.try_send(batch.clone()).is_ok());
        }
        let Inner { watchers, streams, lagging, ring, ring_start, .. } = &mut *g;
        ring.extend(events.iter().cloned());
        while ring.len() > RING_EVENTS {
            // Evict whole revisions only: the ring must hold every event from ring_start on.
            let Some((r, _)) = ring.pop_front() else { break };
            while ring.front().is_some_and(|(f, _)| *f == r) {
                ring.pop_front();
            }
            *ring_start = r + 1;
        }
        let mut dead = Vec::new();
        let mut out: Vec<Bytes> = Vec::new();
        // Per stream: the responses of all its watchers, and (watcher, its new next_rev).
        let mut per_stream: HashMap<u64, (WatchBatch, Vec<((u64, i64), Rev)>)> = HashMap::new();
        for (key, w) in watchers.iter_mut() {
            if w.lagging {
                continue;
            }
            out.clear();
            let mut last_rev = 0;
            for e in enc.iter_mut() {
                if e.rev < w.next_rev || !w.range.contains(&e.ev.kv.key) {
                    continue;
                }
                if !w.wants(e.ev.kind) {
                    last_rev = e.rev;
                    continue;
                }
                out.push(e.get(w.prev_kv));
                last_rev = e.rev;
            }
            if last_rev == 0 {
                continue;
            }
            if !streams.contains_key(&w.stream) {
                dead.push(*key);
                continue;
            }
            if out.is_empty() {
                w.next_rev = last_rev + 1;
                continue;
            }
            let entry = per_stream.entry(w.stream).or_default();
            entry.0.extend(self.responses(w, last_rev, std::mem::take(&mut out)).into_iter().map(Ok));
            entry.1.push((*key, last_rev + 1));
        }
        for (sid, (batch, moved)) in per_stream {
            let Some(s) = streams.get(&sid) else { continue };
            let n: u64 = batch.iter().map(|r| r.as_ref().map_or(0, |r| r.events.len() as u64)).sum();
            match s.tx.try_send(batch) {
                Ok(()) => {
                    self.events_sent.fetch_add(n, Ordering::Relaxed);
                    for (key, next) in moved {
                        if let Some(w) = watchers.get_mut(&key) {
                            w.next_rev = next;
                            w.active = true;
                        }
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The client reads slower than we write: its watchers catch up from
                    // history later, from the revisions they have not been sent.
                    for (key, _) in moved {
                        if let Some(w) = watchers.get_mut(&key) {
                            w.lagging = true;
                            *lagging += 1;
                        }
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => dead.extend(moved.into_iter().map(|(k, _)| k)),
            }
        }
        for k in dead {
            if let Some(w) = watchers.remove(&k) {
                if w.lagging {
                    *lagging -= 1;
                }
            }
        }
    }

    /// Queues every response as one batch, or none (a watcher never gets part of a revision).
    fn send_all(&self, tx: &mpsc::Sender<WatchBatch>, responses: Vec<WatchResponseRaw>) -> Result<(), mpsc::error::TrySendError<WatchBatch>> {
        let n: u64 = responses.iter().map(|r| r.events.len() as u64).sum();
        tx.try_send(responses.into_iter().map(Ok).collect())?;
        self.events_sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Splits a watcher's events into responses (fragmenting only when asked).
    fn responses(&self, w: &Watcher, rev: Rev, events: Vec<Bytes>) -> Vec<WatchResponseRaw> {
        let base = WatchResponseRaw { header: self.header(rev), watch_id: w.watch_id, ..Default::default() };
        let total: usize = events.iter().map(|e| e.len() + 4).sum();
        if !w.fragment || total <= self.max_bytes {
            return vec![WatchResponseRaw { events, ..base }];
        }
        let mut out = Vec::new();
        let mut cur = Vec::new();
        let mut size = 0;
        for e in events {
            if size + e.len() + 4 > self.max_bytes && !cur.is_empty() {
                out.push(WatchResponseRaw { events: std::mem::take(&mut cur), fragment: true, ..base.clone() });
                size = 0;
            }
            size += e.len() + 4;
            cur.push(e);
        }
        out.push(WatchResponseRaw { events: cur, fragment: false, ..base });
        out
    }

    /// Catches up lagging watchers from history. Call periodically; cheap when none lag.
    pub fn resync(&self, state: &RwLock<State>) {
        if self.inner.lock().lagging == 0 {
            return;
        }
        let st = state.read();
        let mut g = self.inner.lock();
        self.catch_up(&st, &mut g, None);
    }

    /// Replays history to lagging watchers (all, or one) while the caller holds the
    /// state lock, so no apply can slip between the replay and becoming synced.
    fn catch_up(&self, st: &State, g: &mut Inner, only: Option<(u64, i64)>) {
        let cur = st.mvcc.rev();
        let compact = st.mvcc.compact_rev();
        let keys: Vec<(u64, i64)> = match only {
            Some(k) => vec![k],
            None => g.watchers.iter().filter(|(_, w)| w.lagging).map(|(k, _)| *k).collect(),
        };
        for key in keys {
            let Inner { watchers, streams, lagging, ring, ring_start, .. } = &mut *g;
            let Some(w) = watchers.get_mut(&key) else { continue };
            let Some(s) = streams.get(&w.stream) else { continue };
            if w.next_rev < compact {
                // History is gone: cancel the watcher with the compaction revision (etcd).
                let resp = WatchResponseRaw {
                    header: self.header(cur),
                    watch_id: w.watch_id,
                    canceled: true,
                    compact_revision: compact,
                    cancel_reason: StoreError::Compacted { compact_rev: compact }.to_string(),
                    ..Default::default()
                };
                if s.tx.try_send(vec![Ok(resp)]).is_ok() {
                    watchers.remove(&key);
                    *lagging -= 1;
                }
                continue;
            }
            if s.tx.capacity() == 0 {
                // The client has not drained its queue yet: replaying history now would be
                // thrown away, at the cost of a scan under the state lock.
                continue;
            }
            let evs: Vec<(Rev, Event)> = if w.next_rev >= *ring_start {
                // The ring holds everything from next_rev on (publish runs under the state
                // write lock, so it is exactly up to `cur`).
                let from = ring.partition_point(|(r, _)| *r < w.next_rev);
                ring.range(from..)
                    .filter(|(_, e)| w.range.contains(&e.kv.key))
                    .map(|(r, e)| {
                        let mut e = e.clone();
                        if !w.prev_kv {
                            e.prev = None;
                        }
                        (*r, e)
                    })
                    .collect()
            } else {
                match st.mvcc.events_between(&w.range, w.next_rev, cur, w.prev_kv) {
                    Ok(e) => e,
                    Err(_) => continue,
                }
            };
            let filtered: Vec<Bytes> = evs
                .iter()
                .filter(|(_, e)| w.wants(e.kind))
                .map(|(rev, e)| Encoded { rev: *rev, ev: e, plain: None, with_prev: None }.get(w.prev_kv))
                .collect();
            let responses = if filtered.is_empty() { vec![] } else { self.chunked(w, cur, filtered) };
            match self.send_all(&s.tx, responses) {
                Ok(()) => {
                    w.next_rev = cur + 1;
                    w.lagging = false;
                    w.active = true;
                    *lagging -= 1;
                }
                Err(_) => {} // still full (or closed: the stream's own close removes it)
            }
        }
        // Progress requests that waited for every watcher of their stream to sync.
        let pending: Vec<u64> = g.streams.iter().filter(|(_, s)| s.progress_pending).map(|(k, _)| *k).collect();
        for sid in pending {
            if !g.watchers.values().any(|w| w.stream == sid && w.lagging) {
                if let Some(s) = g.streams.get_mut(&sid) {
                    let resp = WatchResponseRaw { header: self.header(cur), watch_id: -1, ..Default::default() };
                    if s.tx.try_send(vec![Ok(resp)]).is_ok() {
                        s.progress_pending = false;
                    }
                }
            }
        }
    }

    /// History replays are split into bounded responses (fragment flag only if asked,
    /// but never one unbounded message).
    fn chunked(&self, w: &Watcher, rev: Rev, events: Vec<Bytes>) -> Vec<WatchResponseRaw> {
        if w.fragment {
            return self.responses(w, rev, events);
        }
        let mut out = Vec::new();
        let mut cur = Vec::new();
        let mut size = 0;
        for e in events {
            // Whole revisions cannot be told apart here; etcd likewise splits history
            // replays by count, not by revision.
            if size + e.len() > self.max_bytes && !cur.is_empty() {
                out.push(WatchResponseRaw { header: self.header(rev), watch_id: w.watch_id, events: std::mem::take(&mut cur), ..Default::default() });
                size = 0;
            }
            size += e.len();
            cur.push(e);
        }
        out.push(WatchResponseRaw { header: self.header(rev), watch_id: w.watch_id, events: cur, ..Default::default() });
        out
    }

    /// Answers a progress request: the current revision, once every watcher of the stream
    /// is synced (so the client may trust that no older event is still coming).
    pub fn request_progress(&self, state: &RwLock<State>, stream: u64) {
        let st = state.read();
        let mut g = self.inner.lock();
        let synced = !g.watchers.values().any(|w| w.stream == stream && w.lagging);
        if let Some(s) = g.streams.get_mut(&stream) {
            if synced {
                let resp = WatchResponseRaw { header: self.header(st.mvcc.rev()), watch_id: -1, ..Default::default() };
                if s.tx.try_send(vec![Ok(resp)]).is_err() {
                    s.progress_pending = true;
                }
            } else {
                s.progress_pending = true;
            }
        }
    }

    /// Sends a progress notification to idle synced watchers that asked for them.
    pub fn progress_tick(&self, state: &RwLock<State>) {
        let st = state.read();
        let rev = st.mvcc.rev();
        let mut g = self.inner.lock();
        let Inner { watchers, streams, .. } = &mut *g;
        for w in watchers.values_mut() {
            if !w.progress_notify || w.lagging {
                continue;
            }
            if std::mem::take(&mut w.active) {
                continue;
            }
            if let Some(s) = streams.get(&w.stream) {
                let resp = WatchResponseRaw { header: self.header(rev), watch_id: w.watch_id, ..Default::default() };
                let _ = s.tx.try_send(vec![Ok(resp)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::etcdserverpb::PutRequest;
    use shoal_proto::mvccpb;
    use shoal_proto::shoalstore::{log_command::Cmd, LogCommand};

    fn put(st: &RwLock<State>, hub: &WatchHub, index: u64, key: &str, value: &str) {
        let mut events = Vec::new();
        let cmd = LogCommand { cmd: Some(Cmd::Put(PutRequest { key: key.to_string().into(), value: value.to_string().into(), ..Default::default() })) };
        let mut g = st.write();
        g.apply(index, &cmd, &mut events).unwrap();
        hub.publish(&events);
    }

    /// A plain watcher of every key starting with `k`, from `start_rev`.
    fn from(start_rev: Rev) -> WatchSpec {
        WatchSpec { range: KeyRange::From(Bytes::from_static(b"k")), start_rev, prev_kv: false, no_put: false, no_delete: false, fragment: false, progress_notify: false }
    }

    fn revisions(rx: &mut mpsc::Receiver<WatchBatch>) -> Vec<i64> {
        let mut out = Vec::new();
        while let Ok(batch) = rx.try_recv() {
            for r in batch {
                for e in r.unwrap().events {
                    let ev = <mvccpb::Event as prost::Message>::decode(e.as_ref()).unwrap();
                    out.push(ev.kv.unwrap().mod_revision);
                }
            }
        }
        out
    }

    /// A client that stops reading falls back to history and, once it drains its queue,
    /// gets every revision exactly once, in order.
    #[test]
    fn slow_watcher_catches_up_without_gaps_or_duplicates() {
        let st = RwLock::new(State::new(0));
        let hub = WatchHub::new(HeaderInfo::default(), 1 << 20, 2);
        let (tx, mut rx) = mpsc::channel(2);
        let sid = hub.open_stream(tx);
        hub.add(&st, sid, 0, from(0));
        for i in 0..10u64 {
            put(&st, &hub, i + 1, &format!("k{i}"), "v");
        }
        // Only two batches fit: the watcher is now lagging.
        let mut got = revisions(&mut rx);
        assert_eq!(got, vec![2, 3]);
        // Resyncing while the queue has room replays the rest from history.
        for _ in 0..10 {
            hub.resync(&st);
            got.extend(revisions(&mut rx));
        }
        put(&st, &hub, 11, "k10", "v");
        got.extend(revisions(&mut rx));
        assert_eq!(got, (2..=12).collect::<Vec<_>>());
    }

    /// History from before the ring began is read from the MVCC index, the rest from the
    /// ring; the watcher sees one gap-free sequence.
    #[test]
    fn history_spans_index_and_ring() {
        let st = RwLock::new(State::new(0));
        // Revisions 2..=4 happen before the hub exists (as after a restart).
        {
            let mut g = st.write();
            for i in 0..3u64 {
                let cmd = LogCommand { cmd: Some(Cmd::Put(PutRequest { key: format!("k{i}").into(), value: "v".into(), ..Default::default() })) };
                g.apply(i + 1, &cmd, &mut Vec::new()).unwrap();
            }
        }
        let hub = WatchHub::new(HeaderInfo::default(), 1 << 20, 5);
        put(&st, &hub, 4, "k3", "v");
        put(&st, &hub, 5, "k4", "v");
        let (tx, mut rx) = mpsc::channel(16);
        let sid = hub.open_stream(tx);
        hub.add(&st, sid, 0, from(2));
        assert_eq!(revisions(&mut rx), vec![2, 3, 4, 5, 6]);
        hub.add(&st, sid, 1, from(5));
        assert_eq!(revisions(&mut rx), vec![5, 6]);
    }

    /// A watcher starting at a future revision gets nothing before it.
    #[test]
    fn future_start_revision_waits() {
        let st = RwLock::new(State::new(0));
        let hub = WatchHub::new(HeaderInfo::default(), 1 << 20, 2);
        let (tx, mut rx) = mpsc::channel(16);
        let sid = hub.open_stream(tx);
        hub.add(&st, sid, 0, from(4));
        for i in 0..4u64 {
            put(&st, &hub, i + 1, &format!("k{i}"), "v");
        }
        assert_eq!(revisions(&mut rx), vec![4, 5]);
    }
}
