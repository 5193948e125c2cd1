//! Model-based property tests of the store's state machine.
//!
//! A deliberately naive model keeps the *whole* key space as of every revision
//! (`snaps[r]` = the map at revision `r`), so reads at any revision, compare results,
//! delete counts, previous values and per-revision events can all be computed by
//! looking things up in plain `BTreeMap`s. Random sequences of etcd-style commands are
//! applied both to the real [`State`] (through `State::apply` / `State::range`) and to
//! the model, and every answer is compared.
//!
//! Properties checked:
//! 1. `state_matches_model`: puts (prev_kv), delete ranges (single key, interval,
//!    prefix, from-key; `deleted` and prev_kvs), txns (single-key compares on
//!    mod/version/create/value/lease; `succeeded`; every branch response, including
//!    reads inside the txn, which see the txn's own earlier writes), compactions
//!    (Compacted / FutureRev errors) and ranges at any revision (limit, count_only,
//!    keys_only; kvs, count, more; Compacted / FutureRev errors). After every write the
//!    response header carries the model's revision, revisions only move by +1 per
//!    writing command, the events `apply` emits are the model's diff for that revision,
//!    and at the end every revision still readable is read back in full.
//! 2. `events_between_matches_model`: after random puts / deletes / compactions,
//!    `Mvcc::events_between(range, from, to, true)` for `from >= compact_rev` equals
//!    the model's per-revision diffs, ordered by revision (then key).
//!
//! Fixed-input tests at the end pin the smallest reproductions of store bugs these
//! properties (and a reading of the nested-txn code) found, now fixed.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use shoal_proto::etcdserverpb::{
    compare, request_op, response_op, CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest,
    PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest,
};
use shoal_proto::mvccpb;
use shoal_proto::shoalstore::{log_command::Cmd, LogCommand};
use shoal_store::mvcc::{Event, EventKind, KeyRange, Kv};
use shoal_store::state::{self, Applied, State};
use shoal_store::StoreError;

// ---------------------------------------------------------------------------------------
// Key space
// ---------------------------------------------------------------------------------------

/// Keys that get written. "p/a", "p/b" and "pq" share prefixes with each other.
const KEYS: &[&str] = &["a", "b", "c", "d", "e", "f", "p/a", "p/b", "pq"];
/// Interval / from-key bounds: keys plus points between and around them.
const BOUNDS: &[&str] = &["a", "b", "c", "c5", "d", "f", "g", "p", "p/", "p/b", "pq", "z"];
/// Prefixes for prefix ranges (range_end = prefix with its last byte + 1).
const PREFIXES: &[&str] = &["a", "c", "p", "p/", "pq"];
const VALUES: &[&str] = &["", "x", "y", "zz", "value-1"];
/// Lease ids granted at the start of every case (0 = no lease).
const LEASES: &[i64] = &[0, 0, 7, 8];

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut e = p.to_vec();
    *e.last_mut().unwrap() += 1;
    e
}

/// A set of keys addressed by a request.
#[derive(Clone, Debug)]
enum Sel {
    Single(usize),
    Interval(usize, usize),
    Prefix(usize),
    FromKey(usize),
}

impl Sel {
    /// etcd's `(key, range_end)` encoding.
    fn etcd(&self) -> (Bytes, Bytes) {
        match *self {
            Sel::Single(i) => (b(KEYS[i]), Bytes::new()),
            Sel::Interval(s, e) => (b(BOUNDS[s]), b(BOUNDS[e])),
            Sel::Prefix(i) => (b(PREFIXES[i]), Bytes::from(prefix_end(PREFIXES[i].as_bytes()))),
            Sel::FromKey(i) => (b(BOUNDS[i]), Bytes::from_static(&[0])),
        }
    }
}

/// The model's own reading of `(key, range_end)` (independent of `KeyRange`).
fn in_range(key: &[u8], end: &[u8], k: &[u8]) -> bool {
    if end.is_empty() {
        k == key
    } else if end == [0] {
        k >= key
    } else {
        key <= k && k < end
    }
}

// ---------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
struct MKv {
    value: Bytes,
    create: i64,
    modr: i64,
    version: i64,
    lease: i64,
}

type Snap = BTreeMap<Bytes, MKv>;

struct Model {
    /// `snaps[r]` = the key space at revision `r`; `snaps[0]` is a placeholder and
    /// `snaps[1]` the empty store.
    snaps: Vec<Snap>,
    compact: i64,
}

impl Model {
    fn new() -> Model {
        Model { snaps: vec![Snap::new(), Snap::new()], compact: 0 }
    }

    fn rev(&self) -> i64 {
        self.snaps.len() as i64 - 1
    }

    fn cur(&self) -> &Snap {
        self.snaps.last().unwrap()
    }

    /// What a read at `rev` (0 = current) must see, or the error it must fail with.
    fn read_at(&self, rev: i64) -> Result<&Snap, StoreError> {
        if rev <= 0 {
            return Ok(self.cur());
        }
        if rev > self.rev() {
            return Err(StoreError::FutureRev);
        }
        if rev < self.compact {
            return Err(StoreError::Compacted { compact_rev: self.compact });
        }
        Ok(&self.snaps[rev as usize])
    }

    fn begin(&self) -> WriteTx {
        WriteTx { wrev: self.rev() + 1, next: self.cur().clone(), wrote: false }
    }

    fn commit(&mut self, tx: WriteTx) {
        if tx.wrote {
            self.snaps.push(tx.next);
        }
    }

    /// The events of revision `r` (>= 2), in key order, with previous values.
    fn diff(&self, r: i64) -> Vec<(i64, Event)> {
        let before = &self.snaps[r as usize - 1];
        let after = &self.snaps[r as usize];
        let mut keys: Vec<&Bytes> = before.keys().chain(after.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut out = Vec::new();
        for k in keys {
            let prev = before.get(k).map(|p| kv(k, p));
            match after.get(k) {
                Some(now) if now.modr == r => {
                    out.push((r, Event { kind: EventKind::Put, kv: kv(k, now), prev }));
                }
                Some(now) => assert_eq!(Some(now), before.get(k), "model: unchanged key changed"),
                None if before.contains_key(k) => out.push((
                    r,
                    Event {
                        kind: EventKind::Delete,
                        kv: Kv { key: k.clone(), create_rev: 0, mod_rev: r, version: 0, lease: 0, value: Bytes::new() },
                        prev,
                    },
                )),
                None => {}
            }
        }
        out
    }
}

/// The model's pending write (one command: a put, a delete range or a whole txn).
struct WriteTx {
    wrev: i64,
    next: Snap,
    wrote: bool,
}

impl WriteTx {
    fn put(&mut self, key: &Bytes, value: &Bytes, lease: i64) -> Option<MKv> {
        let prev = self.next.get(key).cloned();
        let (create, version) = match &prev {
            Some(p) => (p.create, p.version + 1),
            None => (self.wrev, 1),
        };
        self.next.insert(key.clone(), MKv { value: value.clone(), create, modr: self.wrev, version, lease });
        self.wrote = true;
        prev
    }

    fn delete(&mut self, key: &[u8], end: &[u8]) -> Vec<(Bytes, MKv)> {
        let gone: Vec<(Bytes, MKv)> =
            self.next.iter().filter(|(k, _)| in_range(key, end, k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        for (k, _) in &gone {
            self.next.remove(k);
        }
        self.wrote |= !gone.is_empty();
        gone
    }
}

fn kv(k: &Bytes, v: &MKv) -> Kv {
    Kv { key: k.clone(), create_rev: v.create, mod_rev: v.modr, version: v.version, lease: v.lease, value: v.value.clone() }
}

fn pb_kv(k: &Bytes, v: &MKv, keys_only: bool) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: k.clone(),
        create_revision: v.create,
        mod_revision: v.modr,
        version: v.version,
        value: if keys_only { Bytes::new() } else { v.value.clone() },
        lease: v.lease,
    }
}

/// Checks a range response against a model snapshot.
fn check_range(
    what: &str,
    got: &RangeResponse,
    snap: &Snap,
    r: &RangeRequest,
    header_rev: Option<i64>,
) -> Result<(), TestCaseError> {
    let live: Vec<(&Bytes, &MKv)> = snap.iter().filter(|(k, _)| in_range(&r.key, &r.range_end, k)).collect();
    let count = live.len();
    let limit = r.limit.max(0) as usize;
    let kvs: Vec<mvccpb::KeyValue> = if r.count_only {
        vec![]
    } else {
        live.iter().take(if limit == 0 { usize::MAX } else { limit }).map(|(k, v)| pb_kv(k, v, r.keys_only)).collect()
    };
    let more = limit > 0 && count > limit;
    prop_assert_eq!(&got.kvs, &kvs, "{}: kvs of {:?}", what, r);
    prop_assert_eq!(got.count, count as i64, "{}: count of {:?}", what, r);
    prop_assert_eq!(got.more, more, "{}: more of {:?}", what, r);
    if let Some(h) = header_rev {
        prop_assert_eq!(got.header.as_ref().map(|h| h.revision), Some(h), "{}: header of {:?}", what, r);
    }
    Ok(())
}

/// Events emitted by one `apply` must be exactly the model's diff for its revision
/// (compared in key order: a txn emits them in op order).
fn check_apply_events(what: &str, m: &Model, before_rev: i64, events: &[(i64, Event)]) -> Result<(), TestCaseError> {
    let mut got = events.to_vec();
    got.sort_by(|a, b| a.1.kv.key.cmp(&b.1.kv.key));
    let want = if m.rev() > before_rev { m.diff(m.rev()) } else { vec![] };
    prop_assert_eq!(got, want, "{}: events emitted by apply", what);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct CmpSpec {
    key: usize,
    /// 0 = mod, 1 = version, 2 = create, 3 = value, 4 = lease.
    target: u8,
    /// 0 = equal, 1 = greater, 2 = less, 3 = not equal.
    result: u8,
    /// For numeric targets: operand = the model's current number + delta.
    delta: i64,
    /// For value: `None` = the key's current value (from the model), else VALUES[i].
    other_value: Option<usize>,
}

#[derive(Clone, Debug)]
enum TOp {
    Put { key: usize, val: usize, lease: usize, prev_kv: bool },
    Del { sel: Sel, prev_kv: bool },
    /// `rev`: None = current (sees the txn's own writes), else picks 1..=current+1.
    Range { sel: Sel, rev: Option<u32>, limit: i64 },
}

#[derive(Clone, Debug)]
enum Op {
    Put { key: usize, val: usize, lease: usize, prev_kv: bool },
    Del { sel: Sel, prev_kv: bool },
    Txn { cmps: Vec<CmpSpec>, success: Vec<TOp>, failure: Vec<TOp> },
    /// Picks a revision in 1..=current+1.
    Compact { pick: u32 },
    /// `rev`: None = 0 (current), else picks 1..=current+1.
    Range { sel: Sel, rev: Option<u32>, limit: i64, count_only: bool, keys_only: bool },
}

fn sel() -> impl Strategy<Value = Sel> {
    prop_oneof![
        3 => (0..KEYS.len()).prop_map(Sel::Single),
        2 => (0..BOUNDS.len(), 0..BOUNDS.len()).prop_map(|(s, e)| Sel::Interval(s, e)),
        2 => (0..PREFIXES.len()).prop_map(Sel::Prefix),
        1 => (0..BOUNDS.len()).prop_map(Sel::FromKey),
    ]
}

fn rev_pick() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![1 => Just(None), 3 => any::<u32>().prop_map(Some)]
}

fn cmp_spec() -> impl Strategy<Value = CmpSpec> {
    (0..KEYS.len(), 0u8..5, 0u8..4, -1i64..=1, prop::option::weighted(0.3, 0..VALUES.len())).prop_map(
        |(key, target, result, delta, other_value)| CmpSpec { key, target, result, delta, other_value },
    )
}

fn txn_op() -> impl Strategy<Value = TOp> {
    prop_oneof![
        3 => (0..KEYS.len(), 0..VALUES.len(), 0..LEASES.len(), any::<bool>())
            .prop_map(|(key, val, lease, prev_kv)| TOp::Put { key, val, lease, prev_kv }),
        2 => (sel(), any::<bool>()).prop_map(|(sel, prev_kv)| TOp::Del { sel, prev_kv }),
        2 => (sel(), prop_oneof![4 => Just(None), 1 => any::<u32>().prop_map(Some)], 0i64..4)
            .prop_map(|(sel, rev, limit)| TOp::Range { sel, rev, limit }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..KEYS.len(), 0..VALUES.len(), 0..LEASES.len(), any::<bool>())
            .prop_map(|(key, val, lease, prev_kv)| Op::Put { key, val, lease, prev_kv }),
        2 => (sel(), any::<bool>()).prop_map(|(sel, prev_kv)| Op::Del { sel, prev_kv }),
        3 => (prop::collection::vec(cmp_spec(), 0..3), prop::collection::vec(txn_op(), 0..4), prop::collection::vec(txn_op(), 0..4))
            .prop_map(|(cmps, success, failure)| Op::Txn { cmps, success, failure }),
        1 => any::<u32>().prop_map(|pick| Op::Compact { pick }),
        4 => (sel(), rev_pick(), 0i64..4, prop::bool::weighted(0.2), prop::bool::weighted(0.2))
            .prop_map(|(sel, rev, limit, count_only, keys_only)| Op::Range { sel, rev, limit, count_only, keys_only }),
    ]
}

/// Maps a pick to 1..=cur+1 (cur+1 is the first future revision); 0 (where shrinking
/// goes) maps to the current revision.
fn pick_rev(pick: u32, cur: i64) -> i64 {
    1 + (cur - 1 + pick as i64) % (cur + 1)
}

fn put_req(key: usize, val: usize, lease: usize, prev_kv: bool) -> PutRequest {
    PutRequest { key: b(KEYS[key]), value: b(VALUES[val]), lease: LEASES[lease], prev_kv, ..Default::default() }
}

fn del_req(sel: &Sel, prev_kv: bool) -> DeleteRangeRequest {
    let (key, range_end) = sel.etcd();
    DeleteRangeRequest { key, range_end, prev_kv }
}

/// Builds a compare whose operand comes from the model's current state, so that both
/// outcomes happen often; returns it with the outcome the model expects.
fn build_compare(c: &CmpSpec, cur: &Snap) -> (Compare, bool) {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    use std::cmp::Ordering;
    let key = b(KEYS[c.key]);
    let live = cur.get(&key);
    let num = |f: fn(&MKv) -> i64| live.map_or(0, f);
    let (target, union, ord) = match c.target {
        0 => {
            let a = num(|v| v.modr);
            (CompareTarget::Mod, TargetUnion::ModRevision(a + c.delta), a.cmp(&(a + c.delta)))
        }
        1 => {
            let a = num(|v| v.version);
            (CompareTarget::Version, TargetUnion::Version(a + c.delta), a.cmp(&(a + c.delta)))
        }
        2 => {
            let a = num(|v| v.create);
            (CompareTarget::Create, TargetUnion::CreateRevision(a + c.delta), a.cmp(&(a + c.delta)))
        }
        3 => {
            let operand = match (c.other_value, live) {
                (Some(i), _) => b(VALUES[i]),
                (None, Some(v)) => v.value.clone(),
                (None, None) => b(VALUES[1]),
            };
            // A missing key has no value: every value compare is false (etcd).
            let ord = live.map(|v| v.value.as_ref().cmp(operand.as_ref()));
            (CompareTarget::Value, TargetUnion::Value(operand), ord.unwrap_or(Ordering::Equal))
        }
        _ => {
            let a = num(|v| v.lease);
            (CompareTarget::Lease, TargetUnion::Lease(a + c.delta), a.cmp(&(a + c.delta)))
        }
    };
    let result = match c.result {
        0 => CompareResult::Equal,
        1 => CompareResult::Greater,
        2 => CompareResult::Less,
        _ => CompareResult::NotEqual,
    };
    let mut ok = match result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
        CompareResult::NotEqual => ord != Ordering::Equal,
    };
    if c.target == 3 && live.is_none() {
        ok = false;
    }
    let cmp = Compare {
        result: result as i32,
        target: target as i32,
        key,
        range_end: Bytes::new(),
        target_union: Some(union),
    };
    (cmp, ok)
}

/// Turns generated txn ops into a branch validation accepts: a key is put at most once,
/// and no put key lies in a deleted range (before or after the put).
fn build_branch(ops: &[TOp], cur_rev: i64) -> Vec<(TOp, RequestOp, i64)> {
    let mut puts: Vec<Bytes> = Vec::new();
    let mut dels: Vec<(Bytes, Bytes)> = Vec::new();
    let mut out = Vec::new();
    for op in ops {
        let (req, rev) = match op {
            TOp::Put { key, val, lease, prev_kv } => {
                let p = put_req(*key, *val, *lease, *prev_kv);
                if puts.contains(&p.key) || dels.iter().any(|(s, e)| in_range(s, e, &p.key)) {
                    continue;
                }
                puts.push(p.key.clone());
                (request_op::Request::RequestPut(p), 0)
            }
            TOp::Del { sel, prev_kv } => {
                let d = del_req(sel, *prev_kv);
                if puts.iter().any(|k| in_range(&d.key, &d.range_end, k)) {
                    continue;
                }
                dels.push((d.key.clone(), d.range_end.clone()));
                (request_op::Request::RequestDeleteRange(d), 0)
            }
            TOp::Range { sel, rev, limit } => {
                let (key, range_end) = sel.etcd();
                let revision = rev.map_or(0, |p| pick_rev(p, cur_rev));
                (request_op::Request::RequestRange(RangeRequest { key, range_end, limit: *limit, revision, ..Default::default() }), revision)
            }
        };
        out.push((op.clone(), RequestOp { request: Some(req) }, rev));
    }
    out
}

/// Drives the real state machine with a monotonically increasing log index.
struct Harness {
    st: State,
    index: u64,
    events: Vec<(i64, Event)>,
    /// Skipped commands (validation rejected them); informative only.
    skipped: usize,
}

impl Harness {
    fn new() -> Harness {
        let mut h = Harness { st: State::new(0), index: 0, events: Vec::new(), skipped: 0 };
        for id in [7, 8] {
            let r = h.apply(Cmd::LeaseGrant(LeaseGrantRequest { ttl: 60, id }));
            assert!(matches!(r, Some(Ok(Applied::LeaseGrant { .. }))), "lease grant: {r:?}");
        }
        h
    }

    /// Validates then applies; `None` when validation rejects the command.
    fn apply(&mut self, cmd: Cmd) -> Option<Result<Applied, StoreError>> {
        let cmd = LogCommand { cmd: Some(cmd) };
        if state::validate(&cmd).is_err() {
            self.skipped += 1;
            return None;
        }
        self.index += 1;
        self.events.clear();
        Some(self.st.apply(self.index, &cmd, &mut self.events))
    }
}

fn header_rev(h: &Option<shoal_proto::etcdserverpb::ResponseHeader>) -> Option<i64> {
    h.as_ref().map(|h| h.revision)
}

// ---------------------------------------------------------------------------------------
// Property 1: State vs model
// ---------------------------------------------------------------------------------------

fn run_state_model(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = Harness::new();
    let mut m = Model::new();
    prop_assert_eq!(h.st.mvcc.rev(), 1);
    let mut last_header = 1i64;

    for (i, op) in ops.iter().enumerate() {
        let what = format!("op #{i} {op:?}");
        let before_rev = m.rev();
        h.events.clear();
        match op {
            Op::Put { key, val, lease, prev_kv } => {
                let p = put_req(*key, *val, *lease, *prev_kv);
                let mut tx = m.begin();
                let prev = tx.put(&p.key, &p.value, p.lease);
                let res = h.apply(Cmd::Put(p.clone()));
                let Some(res) = res else { continue };
                m.commit(tx);
                let Ok(Applied::Put(resp)) = res else {
                    return Err(TestCaseError::fail(format!("{what}: put returned {res:?}")));
                };
                let want_prev = if *prev_kv { prev.as_ref().map(|v| pb_kv(&p.key, v, false)) } else { None };
                prop_assert_eq!(resp.prev_kv, want_prev, "{}: prev_kv", what);
                prop_assert_eq!(header_rev(&resp.header), Some(m.rev()), "{}: header", what);
            }
            Op::Del { sel, prev_kv } => {
                let d = del_req(sel, *prev_kv);
                let mut tx = m.begin();
                let gone = tx.delete(&d.key, &d.range_end);
                let Some(res) = h.apply(Cmd::DeleteRange(d.clone())) else { continue };
                m.commit(tx);
                let Ok(Applied::DeleteRange(resp)) = res else {
                    return Err(TestCaseError::fail(format!("{what}: delete returned {res:?}")));
                };
                prop_assert_eq!(resp.deleted, gone.len() as i64, "{}: deleted", what);
                let want_prev: Vec<_> =
                    if *prev_kv { gone.iter().map(|(k, v)| pb_kv(k, v, false)).collect() } else { vec![] };
                prop_assert_eq!(resp.prev_kvs, want_prev, "{}: prev_kvs", what);
                prop_assert_eq!(header_rev(&resp.header), Some(m.rev()), "{}: header", what);
            }
            Op::Txn { cmps, success, failure } => {
                let cur_rev = m.rev();
                let mut compares = Vec::new();
                let mut succeeded = true;
                for c in cmps {
                    let (cmp, ok) = build_compare(c, m.cur());
                    compares.push(cmp);
                    succeeded &= ok;
                }
                let succ = build_branch(success, cur_rev);
                let fail = build_branch(failure, cur_rev);
                let t = TxnRequest {
                    compare: compares,
                    success: succ.iter().map(|(_, r, _)| r.clone()).collect(),
                    failure: fail.iter().map(|(_, r, _)| r.clone()).collect(),
                };
                let branch = if succeeded { &succ } else { &fail };
                // A read at a bad revision fails the whole txn before it writes anything.
                let expected_err = branch.iter().find_map(|(_, _, rev)| m.read_at(*rev).err());

                let Some(res) = h.apply(Cmd::Txn(t.clone())) else { continue };
                if let Some(e) = expected_err {
                    prop_assert_eq!(res, Err(e), "{}: txn with a bad read revision", what);
                    prop_assert_eq!(h.st.mvcc.rev(), m.rev(), "{}: failed txn changed the revision", what);
                    prop_assert!(h.events.is_empty(), "{}: failed txn emitted events", what);
                    continue;
                }
                let Ok(Applied::Txn(resp)) = res else {
                    return Err(TestCaseError::fail(format!("{what}: txn returned {res:?}")));
                };
                prop_assert_eq!(resp.succeeded, succeeded, "{}: succeeded", what);
                prop_assert_eq!(resp.responses.len(), branch.len(), "{}: number of responses", what);

                let mut tx = m.begin();
                for (j, ((top, req, rev), got)) in branch.iter().zip(&resp.responses).enumerate() {
                    let what = format!("{what}, branch op #{j}");
                    match (top, &req.request, &got.response) {
                        (TOp::Put { prev_kv, .. }, Some(request_op::Request::RequestPut(p)), Some(response_op::Response::ResponsePut(r))) => {
                            let prev = tx.put(&p.key, &p.value, p.lease);
                            let want = if *prev_kv { prev.as_ref().map(|v| pb_kv(&p.key, v, false)) } else { None };
                            prop_assert_eq!(&r.prev_kv, &want, "{}: prev_kv", what);
                        }
                        (TOp::Del { prev_kv, .. }, Some(request_op::Request::RequestDeleteRange(d)), Some(response_op::Response::ResponseDeleteRange(r))) => {
                            let gone = tx.delete(&d.key, &d.range_end);
                            prop_assert_eq!(r.deleted, gone.len() as i64, "{}: deleted", what);
                            let want: Vec<_> =
                                if *prev_kv { gone.iter().map(|(k, v)| pb_kv(k, v, false)).collect() } else { vec![] };
                            prop_assert_eq!(&r.prev_kvs, &want, "{}: prev_kvs", what);
                        }
                        (TOp::Range { .. }, Some(request_op::Request::RequestRange(rq)), Some(response_op::Response::ResponseRange(r))) => {
                            // Revision 0 reads the txn's own earlier writes (etcd semantics,
                            // and what state.rs documents); other revisions read history.
                            let snap = if *rev != 0 { m.read_at(*rev).unwrap() } else { &tx.next };
                            check_range(&what, r, snap, rq, None)?;
                        }
                        _ => return Err(TestCaseError::fail(format!("{what}: response {got:?} for {req:?}"))),
                    }
                }
                m.commit(tx);
                prop_assert_eq!(header_rev(&resp.header), Some(m.rev()), "{}: header", what);
                // Every response of a txn that wrote nothing carries the unchanged revision.
                if m.rev() == before_rev {
                    for got in &resp.responses {
                        let hr = match &got.response {
                            Some(response_op::Response::ResponseRange(r)) => header_rev(&r.header),
                            Some(response_op::Response::ResponsePut(r)) => header_rev(&r.header),
                            Some(response_op::Response::ResponseDeleteRange(r)) => header_rev(&r.header),
                            Some(response_op::Response::ResponseTxn(r)) => header_rev(&r.header),
                            None => None,
                        };
                        prop_assert_eq!(hr, Some(m.rev()), "{}: header of a response of a txn that wrote nothing", what);
                    }
                }
            }
            Op::Compact { pick } => {
                let rev = pick_rev(*pick, m.rev());
                let Some(res) = h.apply(Cmd::Compaction(CompactionRequest { revision: rev, physical: false })) else { continue };
                let want = if rev <= m.compact {
                    Err(StoreError::Compacted { compact_rev: m.compact })
                } else if rev > m.rev() {
                    Err(StoreError::FutureRev)
                } else {
                    m.compact = rev;
                    Ok(Applied::Compaction)
                };
                prop_assert_eq!(res, want, "{}: compaction at {}", what, rev);
                prop_assert_eq!(h.st.mvcc.compact_rev(), m.compact, "{}: compact_rev", what);
            }
            Op::Range { sel, rev, limit, count_only, keys_only } => {
                let (key, range_end) = sel.etcd();
                let revision = match rev {
                    None => 0,
                    Some(p) => (*p as i64) % (m.rev() + 2), // 0..=cur+1
                };
                let r = RangeRequest { key, range_end, limit: *limit, revision, count_only: *count_only, keys_only: *keys_only, ..Default::default() };
                let got = h.st.range(&r);
                match (m.read_at(revision), got) {
                    (Ok(snap), Ok(resp)) => check_range(&what, &resp, snap, &r, Some(m.rev()))?,
                    (Err(e), got) => prop_assert_eq!(got, Err(e), "{}: range at {}", what, revision),
                    (Ok(_), Err(e)) => return Err(TestCaseError::fail(format!("{what}: range at {revision} failed: {e:?}"))),
                }
            }
        }

        // Invariants after every command.
        prop_assert_eq!(h.st.mvcc.rev(), m.rev(), "{}: store revision", what);
        prop_assert!(m.rev() == before_rev || m.rev() == before_rev + 1, "{}: revision moved by more than one", what);
        if m.rev() > before_rev {
            prop_assert!(m.rev() > last_header, "{}: revision not strictly increasing", what);
            last_header = m.rev();
        }
        if matches!(op, Op::Put { .. } | Op::Del { .. } | Op::Txn { .. }) {
            check_apply_events(&what, &m, before_rev, &h.events)?;
        } else {
            prop_assert!(h.events.is_empty(), "{}: a non-writing command emitted events", what);
        }
    }

    // Every revision still readable reads back exactly as the model recorded it.
    let from = m.compact.max(1);
    for rev in from..=m.rev() {
        let r = RangeRequest { key: Bytes::from_static(&[0]), range_end: Bytes::from_static(&[0]), revision: rev, ..Default::default() };
        let got = h.st.range(&r).map_err(|e| TestCaseError::fail(format!("final read at {rev}: {e:?}")))?;
        check_range(&format!("final full read at revision {rev}"), &got, &m.snaps[rev as usize], &r, Some(m.rev()))?;
    }
    if m.compact > 1 {
        let r = RangeRequest { key: b("a"), revision: m.compact - 1, ..Default::default() };
        prop_assert_eq!(h.st.range(&r), Err(StoreError::Compacted { compact_rev: m.compact }));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Property 2: events_between vs model diffs
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum EvOp {
    Put { key: usize, val: usize, lease: usize },
    Del { sel: Sel },
    Compact { pick: u32 },
}

fn ev_op() -> impl Strategy<Value = EvOp> {
    prop_oneof![
        6 => (0..KEYS.len(), 0..VALUES.len(), 0..LEASES.len()).prop_map(|(key, val, lease)| EvOp::Put { key, val, lease }),
        3 => sel().prop_map(|sel| EvOp::Del { sel }),
        1 => any::<u32>().prop_map(|pick| EvOp::Compact { pick }),
    ]
}

fn run_events_between(ops: &[EvOp], watch: &Sel, from_pick: u32, to_pick: Option<u32>) -> Result<(), TestCaseError> {
    let mut h = Harness::new();
    let mut m = Model::new();
    for op in ops {
        match op {
            EvOp::Put { key, val, lease } => {
                let p = put_req(*key, *val, *lease, false);
                let mut tx = m.begin();
                tx.put(&p.key, &p.value, p.lease);
                let res = h.apply(Cmd::Put(p)).expect("a put is valid");
                prop_assert!(res.is_ok(), "put: {:?}", res);
                m.commit(tx);
            }
            EvOp::Del { sel } => {
                let d = del_req(sel, false);
                let mut tx = m.begin();
                tx.delete(&d.key, &d.range_end);
                let res = h.apply(Cmd::DeleteRange(d)).expect("a delete is valid");
                prop_assert!(res.is_ok(), "delete: {:?}", res);
                m.commit(tx);
            }
            EvOp::Compact { pick } => {
                // 1..=cur, 0 (where shrinking goes) = cur.
                let rev = m.rev() - (*pick as i64) % m.rev();
                let res = h.apply(Cmd::Compaction(CompactionRequest { revision: rev, physical: false })).expect("valid");
                if rev > m.compact && rev <= m.rev() {
                    prop_assert_eq!(res, Ok(Applied::Compaction));
                    m.compact = rev;
                } else {
                    prop_assert!(res.is_err());
                }
            }
        }
        prop_assert_eq!(h.st.mvcc.rev(), m.rev());
    }

    let cur = m.rev();
    // from in [compact, cur+1]; to = cur (None) or in [from-1, cur].
    let from = m.compact + (from_pick as i64) % (cur + 2 - m.compact);
    let to = to_pick.map_or(cur, |p| from - 1 + (p as i64) % (cur - from + 2));
    let (key, end) = watch.etcd();
    let range = KeyRange::from_etcd(&key, &end);

    let got = h.st.mvcc.events_between(&range, from, to, true);
    let mut want = Vec::new();
    for r in from.max(2)..=to {
        want.extend(m.diff(r).into_iter().filter(|(_, e)| in_range(&key, &end, &e.kv.key)));
    }
    // The previous value of an event at exactly the compaction revision may be gone
    // (etcd too omits prev_kv it can no longer read): accept None there.
    if let Ok(got) = &got {
        if got.len() == want.len() {
            for (g, w) in got.iter().zip(want.iter_mut()) {
                if w.0 == m.compact && g.1.prev.is_none() {
                    w.1.prev = None;
                }
            }
        }
    }
    prop_assert_eq!(
        got,
        Ok(want),
        "events_between({:?}, {}, {}) with compact_rev {}, current {}",
        range,
        from,
        to,
        m.compact,
        cur
    );
    if m.compact > 0 {
        prop_assert_eq!(
            h.st.mvcc.events_between(&range, m.compact - 1, cur, false),
            Err(StoreError::Compacted { compact_rev: m.compact })
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn state_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        run_state_model(&ops)?;
    }

    #[test]
    fn events_between_matches_model(
        ops in prop::collection::vec(ev_op(), 0..60),
        watch in prop_oneof![3 => (0..BOUNDS.len()).prop_map(Sel::FromKey), 2 => sel()],
        from_pick in any::<u32>(),
        to_pick in prop::option::weighted(0.3, any::<u32>()),
    ) {
        run_events_between(&ops, &watch, from_pick, to_pick)?;
    }
}

// ---------------------------------------------------------------------------------------
// Minimal reproductions of what the properties above found (fixed inputs, same checks)
// ---------------------------------------------------------------------------------------

fn apply_ok(h: &mut Harness, cmd: Cmd) -> Applied {
    let what = format!("{cmd:?}");
    match h.apply(cmd) {
        Some(Ok(a)) => a,
        other => panic!("{what}: {other:?}"),
    }
}

/// Put a=1 (rev 2); txn { put a=2; range a } must read a=2 at mod revision 3 (etcd: reads
/// in a txn see its earlier writes; state.rs says so too).
#[test]
fn txn_range_sees_the_txns_own_earlier_put() {
    let mut h = Harness::new();
    apply_ok(&mut h, Cmd::Put(PutRequest { key: b("a"), value: b("1"), ..Default::default() }));
    let put = RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key: b("a"), value: b("2"), ..Default::default() })) };
    let read = RequestOp { request: Some(request_op::Request::RequestRange(RangeRequest { key: b("a"), ..Default::default() })) };
    let Applied::Txn(t) = apply_ok(&mut h, Cmd::Txn(TxnRequest { compare: vec![], success: vec![put, read], failure: vec![] })) else {
        panic!("not a txn response")
    };
    let Some(response_op::Response::ResponseRange(r)) = &t.responses[1].response else { panic!("not a range response") };
    let want = mvccpb::KeyValue { key: b("a"), create_revision: 2, mod_revision: 3, version: 2, value: b("2"), lease: 0 };
    assert_eq!(r.kvs, vec![want], "range after put in the same txn");
}

/// Put a (rev 2), delete a (rev 3), compact 3: reading from revision 3 is still allowed
/// (3 >= compact_rev), so the delete at 3 must still be reported.
#[test]
fn delete_at_the_compaction_revision_is_still_an_event() {
    let mut h = Harness::new();
    apply_ok(&mut h, Cmd::Put(PutRequest { key: b("a"), value: b("1"), ..Default::default() }));
    apply_ok(&mut h, Cmd::DeleteRange(DeleteRangeRequest { key: b("a"), ..Default::default() }));
    let a = KeyRange::Single(b("a"));
    let before = h.st.mvcc.events_between(&a, 3, 3, false).unwrap();
    assert_eq!(before.len(), 1);
    apply_ok(&mut h, Cmd::Compaction(CompactionRequest { revision: 3, physical: false }));
    let after = h.st.mvcc.events_between(&a, 3, 3, false).unwrap();
    assert_eq!(after, before, "events at revision 3 after compacting at 3");
}

fn req_op(r: request_op::Request) -> RequestOp {
    RequestOp { request: Some(r) }
}

fn put_op(k: &str, v: &str, lease: i64) -> RequestOp {
    req_op(request_op::Request::RequestPut(PutRequest { key: b(k), value: b(v), lease, ..Default::default() }))
}

fn version_is(k: &str, v: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Version as i32,
        key: b(k),
        target_union: Some(compare::TargetUnion::Version(v)),
        ..Default::default()
    }
}

/// A txn whose nested txn fails its checks changes nothing: compares, nested ones too,
/// see the state before the txn, and every op on the path is checked before any runs.
#[test]
fn failing_nested_txn_leaves_no_trace() {
    let mut h = Harness::new();
    let bad_range = req_op(request_op::Request::RequestRange(RangeRequest { key: b("x"), revision: 99, ..Default::default() }));
    // On the pre-txn state a has version 0, so the inner txn takes its success branch
    // (after the outer put it would not: compares see the state before the txn).
    let inner = TxnRequest { compare: vec![version_is("a", 0)], success: vec![bad_range], failure: vec![] };
    let t = TxnRequest { compare: vec![], success: vec![put_op("a", "ghost", 0), req_op(request_op::Request::RequestTxn(inner))], failure: vec![] };
    let rev = h.st.mvcc.rev();
    let cmd = LogCommand { cmd: Some(Cmd::Txn(t)) };
    h.index += 1;
    let mut events = Vec::new();
    assert!(matches!(h.st.apply(h.index, &cmd, &mut events), Err(StoreError::Compacted { .. }) | Err(StoreError::FutureRev)));
    assert!(events.is_empty());
    assert_eq!(h.st.mvcc.rev(), rev);
    assert!(h.st.mvcc.get(b"a").is_none());
}

/// A key put by a txn and again by a txn nested in it is a duplicate; the two branches
/// of one nested txn may put the same key.
#[test]
fn nested_txn_duplicate_keys() {
    let nested = |succ: Vec<RequestOp>, fail: Vec<RequestOp>| req_op(request_op::Request::RequestTxn(TxnRequest { compare: vec![], success: succ, failure: fail }));
    let dup = TxnRequest { compare: vec![], success: vec![put_op("a", "1", 0), nested(vec![put_op("a", "2", 0)], vec![])], failure: vec![] };
    assert_eq!(shoal_store::state::validate(&LogCommand { cmd: Some(Cmd::Txn(dup)) }), Err(StoreError::DuplicateKey));
    let ok = TxnRequest { compare: vec![], success: vec![nested(vec![put_op("a", "2", 0)], vec![put_op("a", "3", 0)])], failure: vec![] };
    assert_eq!(shoal_store::state::validate(&LogCommand { cmd: Some(Cmd::Txn(ok)) }), Ok(()));
}

/// A put with an unknown lease inside a nested txn is refused like a top-level one.
#[test]
fn nested_put_with_unknown_lease_is_refused() {
    let mut h = Harness::new();
    let inner = TxnRequest { compare: vec![], success: vec![put_op("b", "v", 999)], failure: vec![] };
    let t = TxnRequest { compare: vec![], success: vec![put_op("a", "v", 0), req_op(request_op::Request::RequestTxn(inner))], failure: vec![] };
    h.index += 1;
    let mut events = Vec::new();
    let r = h.st.apply(h.index, &LogCommand { cmd: Some(Cmd::Txn(t)) }, &mut events);
    assert_eq!(r.err(), Some(StoreError::LeaseNotFound));
    assert!(h.st.mvcc.get(b"a").is_none() && h.st.mvcc.get(b"b").is_none());
}
