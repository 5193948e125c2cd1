//! The multi-version key space: every key keeps its versions since the last compaction,
//! each stamped with the global revision that wrote it.
//!
//! Pure data structure: no I/O, no clocks, no randomness. The same sequence of
//! mutations gives the same state on every replica (Architecture Invariant 2: revisions
//! are strictly increasing and never reused, because only [`Mvcc::begin_write`] advances
//! them, by exactly one per writing command).

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

use crate::error::StoreError;

/// A store revision. Revision 1 is the empty store's; the first write makes it 2,
/// as in etcd.
pub type Rev = i64;

/// One version of a key. A tombstone (the key was deleted at `mod_rev`) has `version == 0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub mod_rev: Rev,
    pub create_rev: Rev,
    pub version: i64,
    pub lease: i64,
    pub value: Bytes,
}

impl Version {
    pub fn is_tombstone(&self) -> bool {
        self.version == 0
    }
}

/// A live key-value pair as returned by reads and carried by events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: Bytes,
    pub create_rev: Rev,
    pub mod_rev: Rev,
    pub version: i64,
    pub lease: i64,
    pub value: Bytes,
}

impl Kv {
    fn from_version(key: &Bytes, v: &Version) -> Kv {
        Kv {
            key: key.clone(),
            create_rev: v.create_rev,
            mod_rev: v.mod_rev,
            version: v.version,
            lease: v.lease,
            value: v.value.clone(),
        }
    }
}

/// What happened to one key at one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// For a delete: the key, `mod_rev` = the deleting revision, everything else zero.
    pub kv: Kv,
    pub prev: Option<Kv>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// A set of keys addressed by a request: one key, `[start, end)`, or every key `>= start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRange {
    Single(Bytes),
    Range(Bytes, Bytes),
    From(Bytes),
}

impl KeyRange {
    /// Interprets etcd's `(key, range_end)` pair: empty end is one key, `"\0"` is
    /// "to the end", anything else is the exclusive end.
    pub fn from_etcd(key: &Bytes, range_end: &Bytes) -> KeyRange {
        if range_end.is_empty() {
            KeyRange::Single(key.clone())
        } else if range_end.as_ref() == [0] {
            KeyRange::From(key.clone())
        } else {
            KeyRange::Range(key.clone(), range_end.clone())
        }
    }

    pub fn contains(&self, k: &[u8]) -> bool {
        match self {
            KeyRange::Single(s) => s.as_ref() == k,
            KeyRange::Range(s, e) => s.as_ref() <= k && k < e.as_ref(),
            KeyRange::From(s) => s.as_ref() <= k,
        }
    }

    fn bounds(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        match self {
            KeyRange::Single(s) => (Bound::Included(s.as_ref()), Bound::Included(s.as_ref())),
            KeyRange::Range(s, e) => {
                if s.as_ref() >= e.as_ref() {
                    // An empty interval; BTreeMap::range panics on start > end.
                    (Bound::Included(s.as_ref()), Bound::Excluded(s.as_ref()))
                } else {
                    (Bound::Included(s.as_ref()), Bound::Excluded(e.as_ref()))
                }
            }
            KeyRange::From(s) => (Bound::Included(s.as_ref()), Bound::Unbounded),
        }
    }

    /// True when the two ranges share at least one key.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        fn lo(r: &KeyRange) -> &[u8] {
            match r {
                KeyRange::Single(s) | KeyRange::Range(s, _) | KeyRange::From(s) => s,
            }
        }
        // Exclusive upper end; None is unbounded. A single key k has end k+"\0".
        fn contains_lo(r: &KeyRange, k: &[u8]) -> bool {
            r.contains(k)
        }
        contains_lo(self, lo(other)) || contains_lo(other, lo(self))
    }
}

/// Per-range read options (a subset of etcd's RangeRequest handled by the index itself).
#[derive(Clone, Debug, Default)]
pub struct RangeOpts {
    /// 0 = no limit.
    pub limit: usize,
    /// <= 0 = current revision.
    pub rev: Rev,
    pub count_only: bool,
    /// Read "now" as this revision instead of the committed one: a txn reading the
    /// writes it made at the revision it is writing.
    pub cur: Option<Rev>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeResult {
    pub kvs: Vec<Kv>,
    /// Number of live keys in the range at that revision, unaffected by `limit`.
    pub count: usize,
    pub rev: Rev,
}

/// Approximate bytes a version costs in memory and on disk, for the space quota.
fn version_cost(key: &[u8], v: &Version) -> u64 {
    (key.len() + v.value.len() + 48) as u64
}

/// The MVCC index.
#[derive(Clone, Debug)]
pub struct Mvcc {
    keys: BTreeMap<Bytes, Vec<Version>>,
    rev: Rev,
    compact_rev: Rev,
    /// Bytes held by all versions (the quota's measure).
    size: u64,
}

impl Default for Mvcc {
    fn default() -> Self {
        Mvcc::new()
    }
}

impl Mvcc {
    pub fn new() -> Mvcc {
        Mvcc { keys: BTreeMap::new(), rev: 1, compact_rev: 0, size: 0 }
    }

    /// Rebuilds an index from its parts (snapshot load). `keys` must be sorted and each
    /// history ordered by revision; the snapshot loader checks that.
    pub fn from_parts(keys: BTreeMap<Bytes, Vec<Version>>, rev: Rev, compact_rev: Rev) -> Mvcc {
        let size = keys
            .iter()
            .map(|(k, vs)| vs.iter().map(|v| version_cost(k, v)).sum::<u64>())
            .sum();
        Mvcc { keys, rev, compact_rev, size }
    }

    pub fn keys(&self) -> &BTreeMap<Bytes, Vec<Version>> {
        &self.keys
    }

    /// The current revision: that of the last write.
    pub fn rev(&self) -> Rev {
        self.rev
    }

    /// The revision of the last compaction (0 = never compacted).
    pub fn compact_rev(&self) -> Rev {
        self.compact_rev
    }

    /// Bytes held by every stored version.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    fn check_read_rev(&self, rev: Rev, cur: Option<Rev>) -> Result<Rev, StoreError> {
        let cur = cur.unwrap_or(self.rev);
        if rev <= 0 {
            return Ok(cur);
        }
        if rev > cur {
            return Err(StoreError::FutureRev);
        }
        if rev < self.compact_rev {
            return Err(StoreError::Compacted { compact_rev: self.compact_rev });
        }
        Ok(rev)
    }

    /// The version of a key visible at `rev`, if the key is live then.
    fn visible(history: &[Version], rev: Rev) -> Option<&Version> {
        // Histories are short (compaction trims them); scan from the newest.
        history.iter().rev().find(|v| v.mod_rev <= rev).filter(|v| !v.is_tombstone())
    }

    /// The live version of one key now.
    pub fn get(&self, key: &[u8]) -> Option<Kv> {
        let (k, h) = self.keys.get_key_value(key)?;
        h.last().filter(|v| !v.is_tombstone()).map(|v| Kv::from_version(k, v))
    }

    /// Reads the live keys of `range` at a revision. Keys come in ascending order.
    pub fn range(&self, range: &KeyRange, opts: &RangeOpts) -> Result<RangeResult, StoreError> {
        let rev = self.check_read_rev(opts.rev, opts.cur)?;
        let mut out = RangeResult { rev: self.rev, ..Default::default() };
        for (k, h) in self.keys.range::<[u8], _>(range.bounds()) {
            if let Some(v) = Self::visible(h, rev) {
                out.count += 1;
                if !opts.count_only && (opts.limit == 0 || out.kvs.len() < opts.limit) {
                    out.kvs.push(Kv::from_version(k, v));
                }
            }
        }
        Ok(out)
    }

    /// Starts a write: the revision a writing command will stamp its changes with.
    /// Every change of one command (a put, a delete range, a whole txn, a lease revoke)
    /// shares this revision; [`Mvcc::end_write`] commits it if anything changed.
    pub fn begin_write(&self) -> Rev {
        self.rev + 1
    }

    /// Commits the revision of a write that changed at least one key.
    pub fn end_write(&mut self, wrote: bool) {
        if wrote {
            self.rev += 1;
        }
    }

    /// Puts a value at write revision `wrev` (from [`Mvcc::begin_write`]). Returns the event.
    pub fn put(&mut self, wrev: Rev, key: Bytes, value: Bytes, lease: i64) -> Event {
        debug_assert_eq!(wrev, self.rev + 1);
        let history = self.keys.entry(key.clone()).or_default();
        let prev = history.last().filter(|v| !v.is_tombstone()).cloned();
        let (create_rev, version) = match &prev {
            Some(p) => (p.create_rev, p.version + 1),
            None => (wrev, 1),
        };
        let v = Version { mod_rev: wrev, create_rev, version, lease, value };
        self.size += version_cost(&key, &v);
        let kv = Kv::from_version(&key, &v);
        // A txn never touches a key twice, so the newest version is always older.
        debug_assert!(history.last().is_none_or(|l| l.mod_rev < wrev));
        history.push(v);
        Event { kind: EventKind::Put, kv, prev: prev.map(|p| Kv::from_version(&key, &p)) }
    }

    /// Deletes every live key in `range` at write revision `wrev`; returns one event per key.
    pub fn delete_range(&mut self, wrev: Rev, range: &KeyRange) -> Vec<Event> {
        debug_assert_eq!(wrev, self.rev + 1);
        let mut events = Vec::new();
        for (k, h) in self.keys.range_mut::<[u8], _>(range.bounds()) {
            let Some(prev) = h.last().filter(|v| !v.is_tombstone()).cloned() else { continue };
            let tomb = Version { mod_rev: wrev, create_rev: 0, version: 0, lease: 0, value: Bytes::new() };
            self.size += version_cost(k, &tomb);
            h.push(tomb);
            events.push(Event {
                kind: EventKind::Delete,
                kv: Kv { key: k.clone(), create_rev: 0, mod_rev: wrev, version: 0, lease: 0, value: Bytes::new() },
                prev: Some(Kv::from_version(k, &prev)),
            });
        }
        events
    }

    /// Drops every version superseded at or before `rev`. Reads below `rev` then fail with
    /// [`StoreError::Compacted`].
    pub fn compact(&mut self, rev: Rev) -> Result<(), StoreError> {
        if rev <= self.compact_rev {
            return Err(StoreError::Compacted { compact_rev: self.compact_rev });
        }
        if rev > self.rev {
            return Err(StoreError::FutureRev);
        }
        let mut freed = 0u64;
        self.keys.retain(|k, h| {
            // Keep the newest version at or before `rev` (what a read at `rev` sees) and
            // everything after it. A tombstone older than `rev` goes; one exactly at `rev`
            // stays, because reads and watches from `rev` must still see that delete.
            let Some(i) = h.iter().rposition(|v| v.mod_rev <= rev) else { return true };
            let drop_to = if h[i].is_tombstone() && h[i].mod_rev < rev { i + 1 } else { i };
            for v in h.drain(..drop_to) {
                freed += version_cost(k, &v);
            }
            !h.is_empty()
        });
        self.size -= freed;
        self.compact_rev = rev;
        Ok(())
    }

    /// Every event with revision in `[from, to]` on keys of `range`, ordered by revision
    /// then key. `from` must not be below the compaction revision.
    pub fn events_between(&self, range: &KeyRange, from: Rev, to: Rev, with_prev: bool) -> Result<Vec<(Rev, Event)>, StoreError> {
        if from < self.compact_rev {
            return Err(StoreError::Compacted { compact_rev: self.compact_rev });
        }
        let mut out = Vec::new();
        for (k, h) in self.keys.range::<[u8], _>(range.bounds()) {
            let start = h.partition_point(|v| v.mod_rev < from);
            for i in start..h.len() {
                let v = &h[i];
                if v.mod_rev > to {
                    break;
                }
                let prev = if with_prev && i > 0 && !h[i - 1].is_tombstone() {
                    Some(Kv::from_version(k, &h[i - 1]))
                } else {
                    None
                };
                let kind = if v.is_tombstone() { EventKind::Delete } else { EventKind::Put };
                out.push((v.mod_rev, Event { kind, kv: Kv::from_version(k, v), prev }));
            }
        }
        // Stable: keys stay ascending within one revision, as they were applied for
        // delete ranges and lease revokes.
        out.sort_by_key(|(r, _)| *r);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn put(m: &mut Mvcc, k: &str, v: &str) -> Rev {
        let w = m.begin_write();
        m.put(w, b(k), b(v), 0);
        m.end_write(true);
        w
    }

    #[test]
    fn revisions_versions_and_history() {
        let mut m = Mvcc::new();
        assert_eq!(m.rev(), 1);
        let r1 = put(&mut m, "a", "1");
        let r2 = put(&mut m, "a", "2");
        assert_eq!((r1, r2), (2, 3));
        let kv = m.get(b"a").unwrap();
        assert_eq!((kv.create_rev, kv.mod_rev, kv.version), (2, 3, 2));
        let old = m.range(&KeyRange::Single(b("a")), &RangeOpts { rev: 2, ..Default::default() }).unwrap();
        assert_eq!(old.kvs[0].value, b("1"));
        let w = m.begin_write();
        let ev = m.delete_range(w, &KeyRange::Single(b("a")));
        m.end_write(!ev.is_empty());
        assert_eq!(ev.len(), 1);
        assert!(m.get(b"a").is_none());
        // Recreated keys start a new life: version 1, new create revision.
        let r = put(&mut m, "a", "3");
        let kv = m.get(b"a").unwrap();
        assert_eq!((kv.create_rev, kv.version), (r, 1));
    }

    #[test]
    fn compaction_refuses_old_reads_and_frees_space() {
        let mut m = Mvcc::new();
        put(&mut m, "a", "1");
        let r = put(&mut m, "a", "2");
        let size_before = m.size();
        m.compact(r).unwrap();
        assert!(m.size() < size_before);
        assert_eq!(
            m.range(&KeyRange::Single(b("a")), &RangeOpts { rev: r - 1, ..Default::default() }),
            Err(StoreError::Compacted { compact_rev: r })
        );
        assert_eq!(m.compact(r), Err(StoreError::Compacted { compact_rev: r }));
        assert_eq!(m.compact(r + 5), Err(StoreError::FutureRev));
    }

    #[test]
    fn ranges_count_and_limit() {
        let mut m = Mvcc::new();
        for k in ["a", "b", "c", "d"] {
            put(&mut m, k, "x");
        }
        let r = m
            .range(&KeyRange::Range(b("b"), b("z")), &RangeOpts { limit: 2, ..Default::default() })
            .unwrap();
        assert_eq!(r.count, 3);
        assert_eq!(r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(), vec![b("b"), b("c")]);
        let all = m.range(&KeyRange::From(Bytes::from_static(&[0])), &RangeOpts::default()).unwrap();
        assert_eq!(all.count, 4);
        let empty = m.range(&KeyRange::Range(b("z"), b("a")), &RangeOpts::default()).unwrap();
        assert_eq!(empty.count, 0);
    }

    #[test]
    fn overlaps() {
        let single = KeyRange::Single(b("b"));
        assert!(single.overlaps(&KeyRange::Range(b("a"), b("c"))));
        assert!(!single.overlaps(&KeyRange::Range(b("c"), b("d"))));
        assert!(KeyRange::From(b("a")).overlaps(&KeyRange::Range(b("0"), b("b"))));
        assert!(!KeyRange::Single(b("a")).overlaps(&KeyRange::Single(b("b"))));
    }
}
