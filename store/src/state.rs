//! The replicated state machine: the MVCC index, the leases and the alarms, changed only
//! by applying log commands in log order.
//!
//! Architecture Invariant: `apply` is deterministic. It reads no clock, no randomness
//! and no local configuration other than what every member shares (the quota), so every
//! replica that applies the same log holds the same state. Lease expiry deadlines are
//! therefore *not* here: the leader keeps them and proposes revokes.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use shoal_proto::etcdserverpb::{
    self as pb, compare, range_request, request_op, response_op, Compare, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseOp, TxnRequest, TxnResponse,
};
use shoal_proto::mvccpb;
use shoal_proto::shoalstore::{log_command::Cmd, LogCommand};

use crate::error::StoreError;
use crate::mvcc::{Event, KeyRange, Kv, Mvcc, RangeOpts, Rev};

/// etcd's `--max-txn-ops` default.
pub const MAX_TXN_OPS: usize = 128;
/// Largest lease TTL etcd accepts (seconds).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// A granted lease as every replica knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ttl: i64,
    pub keys: BTreeSet<Bytes>,
}

/// What applying one command produced for its proposer.
#[derive(Clone, Debug, PartialEq)]
pub enum Applied {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction,
    LeaseGrant { id: i64, ttl: i64 },
    LeaseRevoke,
    Alarm(Vec<pb::AlarmMember>),
    /// A raft entry with no command (a new leader's blank entry, a membership change).
    Noop,
}

/// The state machine.
#[derive(Clone, Debug)]
pub struct State {
    pub mvcc: Mvcc,
    pub leases: BTreeMap<i64, Lease>,
    pub nospace: bool,
    /// Index of the last applied log entry.
    pub applied: u64,
    /// Space quota in bytes (0 = none).
    pub quota: u64,
}

pub fn kv_to_pb(kv: &Kv, keys_only: bool) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key.clone(),
        create_revision: kv.create_rev,
        mod_revision: kv.mod_rev,
        version: kv.version,
        value: if keys_only { Bytes::new() } else { kv.value.clone() },
        lease: kv.lease,
    }
}

pub fn event_to_pb(ev: &Event) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match ev.kind {
            crate::mvcc::EventKind::Put => mvccpb::event::EventType::Put as i32,
            crate::mvcc::EventKind::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(kv_to_pb(&ev.kv, false)),
        prev_kv: ev.prev.as_ref().map(|p| kv_to_pb(p, false)),
    }
}

fn header(rev: Rev) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader { revision: rev, ..Default::default() })
}

/// Checks a request that only depends on the request itself. Called at the edge, before
/// anything is proposed, so a bad request changes nothing.
pub fn validate(cmd: &LogCommand) -> Result<(), StoreError> {
    match &cmd.cmd {
        Some(Cmd::Put(p)) => validate_put(p),
        Some(Cmd::DeleteRange(d)) => validate_key(&d.key),
        Some(Cmd::Txn(t)) => validate_txn(t),
        Some(Cmd::LeaseGrant(g)) if g.ttl > MAX_LEASE_TTL => Err(StoreError::LeaseTtlTooLarge),
        Some(_) => Ok(()),
        None => Err(StoreError::Internal("empty log command".into())),
    }
}

fn validate_key(k: &[u8]) -> Result<(), StoreError> {
    if k.is_empty() {
        Err(StoreError::EmptyKey)
    } else {
        Ok(())
    }
}

fn validate_put(p: &PutRequest) -> Result<(), StoreError> {
    validate_key(&p.key)?;
    if p.ignore_value && !p.value.is_empty() {
        return Err(StoreError::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(StoreError::LeaseProvided);
    }
    Ok(())
}

fn validate_txn(t: &TxnRequest) -> Result<(), StoreError> {
    validate_txn_shape(t)?;
    // Success and failure are exclusive, so each is checked on its own.
    branch_writes(&t.success)?;
    branch_writes(&t.failure)?;
    Ok(())
}

/// Per-op checks of a txn and every txn nested in it.
fn validate_txn_shape(t: &TxnRequest) -> Result<(), StoreError> {
    if t.compare.len() > MAX_TXN_OPS || t.success.len() > MAX_TXN_OPS || t.failure.len() > MAX_TXN_OPS {
        return Err(StoreError::TooManyOps);
    }
    for c in &t.compare {
        validate_key(&c.key)?;
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => validate_key(&r.key)?,
            Some(request_op::Request::RequestPut(p)) => validate_put(p)?,
            Some(request_op::Request::RequestDeleteRange(d)) => validate_key(&d.key)?,
            Some(request_op::Request::RequestTxn(inner)) => validate_txn_shape(inner)?,
            None => return Err(StoreError::Internal("empty txn operation".into())),
        }
    }
    Ok(())
}

/// The keys one branch (with everything nested in it) may put and the ranges it may
/// delete. A key written twice, or written and deleted, on any path through the branch
/// is a duplicate (etcd: "duplicate key given in txn request"). The two branches of a
/// nested txn may write the same key: only one of them runs.
fn branch_writes(ops: &[RequestOp]) -> Result<(BTreeSet<Bytes>, Vec<KeyRange>), StoreError> {
    let mut dels: Vec<KeyRange> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => Some(KeyRange::from_etcd(&d.key, &d.range_end)),
            _ => None,
        })
        .collect();
    let mut puts: BTreeSet<Bytes> = BTreeSet::new();
    let deleted = |dels: &[KeyRange], k: &[u8]| dels.iter().any(|d| d.contains(k));
    for op in ops {
        let Some(request_op::Request::RequestTxn(inner)) = &op.request else { continue };
        let (then_puts, then_dels) = branch_writes(&inner.success)?;
        let (else_puts, else_dels) = branch_writes(&inner.failure)?;
        for k in &then_puts {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(StoreError::DuplicateKey);
            }
        }
        for k in &else_puts {
            if (puts.contains(k) && !then_puts.contains(k)) || deleted(&dels, k) {
                return Err(StoreError::DuplicateKey);
            }
        }
        puts.extend(then_puts);
        puts.extend(else_puts);
        dels.extend(then_dels);
        dels.extend(else_dels);
    }
    for op in ops {
        let Some(request_op::Request::RequestPut(p)) = &op.request else { continue };
        if !puts.insert(p.key.clone()) || deleted(&dels, &p.key) {
            return Err(StoreError::DuplicateKey);
        }
    }
    Ok((puts, dels))
}

impl State {
    pub fn new(quota: u64) -> State {
        State { mvcc: Mvcc::new(), leases: BTreeMap::new(), nospace: false, applied: 0, quota }
    }

    /// Serves a range request against the current state (the read path and txn reads).
    pub fn range(&self, r: &RangeRequest) -> Result<RangeResponse, StoreError> {
        range(&self.mvcc, r)
    }

    /// Applies one committed command. Events are appended to `events` in apply order.
    pub fn apply(&mut self, index: u64, cmd: &LogCommand, events: &mut Vec<(Rev, Event)>) -> Result<Applied, StoreError> {
        // Commands of one batch share their entry's index.
        debug_assert!(index >= self.applied, "log applied out of order");
        self.applied = index;
        match &cmd.cmd {
            Some(Cmd::Put(p)) => {
                self.check_space(p.key.len() + p.value.len())?;
                self.check_put(p)?;
                let wrev = self.mvcc.begin_write();
                let resp = self.do_put(wrev, p, events);
                self.mvcc.end_write(true);
                Ok(Applied::Put(PutResponse { header: header(self.mvcc.rev()), ..resp }))
            }
            Some(Cmd::DeleteRange(d)) => {
                let wrev = self.mvcc.begin_write();
                let resp = self.do_delete(wrev, d, events);
                self.mvcc.end_write(resp.deleted > 0);
                Ok(Applied::DeleteRange(DeleteRangeResponse { header: header(self.mvcc.rev()), ..resp }))
            }
            Some(Cmd::Txn(t)) => {
                if txn_writes(t) {
                    self.check_space(txn_bytes(t))?;
                }
                // Every compare, nested ones included, is evaluated against the state
                // before the txn (etcd), then every operation on that path is checked,
                // and only then does anything change: a txn fails whole or not at all.
                let mut path = Vec::new();
                self.txn_path(t, &mut path);
                let succeeded = path[0];
                let ops = if succeeded { &t.success } else { &t.failure };
                self.check_txn_ops(ops, &path, &mut 1)?;
                let wrev = self.mvcc.begin_write();
                let mut wrote = false;
                let responses = self.do_txn_ops(wrev, ops, &path, &mut 1, events, &mut wrote);
                self.mvcc.end_write(wrote);
                Ok(Applied::Txn(TxnResponse { header: header(self.mvcc.rev()), succeeded, responses }))
            }
            Some(Cmd::Compaction(c)) => {
                self.mvcc.compact(c.revision)?;
                Ok(Applied::Compaction)
            }
            Some(Cmd::LeaseGrant(g)) => {
                if self.nospace {
                    return Err(StoreError::NoSpace);
                }
                if self.leases.contains_key(&g.id) {
                    return Err(StoreError::LeaseExists);
                }
                self.leases.insert(g.id, Lease { ttl: g.ttl, keys: BTreeSet::new() });
                Ok(Applied::LeaseGrant { id: g.id, ttl: g.ttl })
            }
            Some(Cmd::LeaseRevoke(r)) => {
                let lease = self.leases.remove(&r.id).ok_or(StoreError::LeaseNotFound)?;
                let wrev = self.mvcc.begin_write();
                let mut wrote = false;
                for k in &lease.keys {
                    let evs = self.mvcc.delete_range(wrev, &KeyRange::Single(k.clone()));
                    wrote |= !evs.is_empty();
                    events.extend(evs.into_iter().map(|e| (wrev, e)));
                }
                self.mvcc.end_write(wrote);
                Ok(Applied::LeaseRevoke)
            }
            Some(Cmd::Alarm(a)) => {
                use pb::alarm_request::AlarmAction;
                let nospace = a.alarm == pb::AlarmType::Nospace as i32;
                match AlarmAction::try_from(a.action) {
                    Ok(AlarmAction::Activate) if nospace => self.nospace = true,
                    // Disarming NOSPACE without freeing space would re-raise it on the next write.
                    Ok(AlarmAction::Deactivate) if nospace || a.alarm == pb::AlarmType::None as i32 => self.nospace = false,
                    _ => {}
                }
                Ok(Applied::Alarm(self.alarms()))
            }
            None => Err(StoreError::Internal("empty log command".into())),
        }
    }

    /// The raised alarms, etcd style (member 0 = the whole cluster's store).
    pub fn alarms(&self) -> Vec<pb::AlarmMember> {
        if self.nospace {
            vec![pb::AlarmMember { member_id: 0, alarm: pb::AlarmType::Nospace as i32 }]
        } else {
            vec![]
        }
    }

    fn check_space(&mut self, bytes: usize) -> Result<(), StoreError> {
        if self.nospace {
            return Err(StoreError::NoSpace);
        }
        if self.quota > 0 && self.mvcc.size() + bytes as u64 > self.quota {
            self.nospace = true;
            return Err(StoreError::NoSpace);
        }
        Ok(())
    }

    /// Serves a txn that only reads (see [`txn_is_read_only`]) without the log.
    pub fn txn_read(&self, t: &TxnRequest) -> Result<TxnResponse, StoreError> {
        use response_op::Response;
        let succeeded = t.compare.iter().all(|c| self.compare(c));
        let mut responses = Vec::new();
        for op in if succeeded { &t.success } else { &t.failure } {
            let r = match &op.request {
                Some(request_op::Request::RequestRange(r)) => Response::ResponseRange(self.range(r)?),
                Some(request_op::Request::RequestTxn(inner)) => Response::ResponseTxn(self.txn_read(inner)?),
                _ => return Err(StoreError::Internal("txn_read on a writing txn".into())),
            };
            responses.push(ResponseOp { response: Some(r) });
        }
        Ok(TxnResponse { header: header(self.mvcc.rev()), succeeded, responses })
    }

    /// Checks a put against the state; a failing put changes nothing.
    fn check_put(&self, p: &PutRequest) -> Result<(), StoreError> {
        if p.ignore_value || p.ignore_lease {
            if self.mvcc.get(&p.key).is_none() {
                return Err(StoreError::KeyNotFound);
            }
        }
        if !p.ignore_lease && p.lease != 0 && !self.leases.contains_key(&p.lease) {
            return Err(StoreError::LeaseNotFound);
        }
        Ok(())
    }

    /// The branch every txn on the path takes, in depth-first order (this txn first).
    fn txn_path(&self, t: &TxnRequest, path: &mut Vec<bool>) {
        let ok = t.compare.iter().all(|c| self.compare(c));
        path.push(ok);
        for op in if ok { &t.success } else { &t.failure } {
            if let Some(request_op::Request::RequestTxn(inner)) = &op.request {
                self.txn_path(inner, path);
            }
        }
    }

    /// Checks every operation on a txn's path against the state before the txn, so a
    /// failing txn changes nothing. `at` walks `path` in the order `txn_path` filled it.
    fn check_txn_ops(&self, ops: &[RequestOp], path: &[bool], at: &mut usize) -> Result<(), StoreError> {
        for op in ops {
            match &op.request {
                Some(request_op::Request::RequestPut(p)) => self.check_put(p)?,
                Some(request_op::Request::RequestRange(r)) => {
                    if r.revision > 0 && r.revision < self.mvcc.compact_rev() {
                        return Err(StoreError::Compacted { compact_rev: self.mvcc.compact_rev() });
                    }
                    if r.revision > self.mvcc.rev() {
                        return Err(StoreError::FutureRev);
                    }
                }
                Some(request_op::Request::RequestTxn(t)) => {
                    let ok = path[*at];
                    *at += 1;
                    self.check_txn_ops(if ok { &t.success } else { &t.failure }, path, at)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn do_put(&mut self, wrev: Rev, p: &PutRequest, events: &mut Vec<(Rev, Event)>) -> PutResponse {
        // Stored keys and values get exact-size buffers of their own: decoded request
        // fields are slices of whole receive buffers, which they would keep alive.
        let key = Bytes::copy_from_slice(&p.key);
        let cur = self.mvcc.get(&key);
        let value = match (&cur, p.ignore_value) {
            (Some(c), true) => c.value.clone(),
            _ => Bytes::copy_from_slice(&p.value),
        };
        let lease = match (&cur, p.ignore_lease) {
            (Some(c), true) => c.lease,
            _ => p.lease,
        };
        if let Some(c) = &cur {
            if c.lease != 0 && c.lease != lease {
                if let Some(l) = self.leases.get_mut(&c.lease) {
                    l.keys.remove(&key);
                }
            }
        }
        if lease != 0 {
            if let Some(l) = self.leases.get_mut(&lease) {
                l.keys.insert(key.clone());
            }
        }
        let ev = self.mvcc.put(wrev, key, value, lease);
        let prev_kv = if p.prev_kv { ev.prev.as_ref().map(|k| kv_to_pb(k, false)) } else { None };
        events.push((wrev, ev));
        PutResponse { header: None, prev_kv }
    }

    fn do_delete(&mut self, wrev: Rev, d: &DeleteRangeRequest, events: &mut Vec<(Rev, Event)>) -> DeleteRangeResponse {
        let evs = self.mvcc.delete_range(wrev, &KeyRange::from_etcd(&d.key, &d.range_end));
        let mut resp = DeleteRangeResponse { header: None, deleted: evs.len() as i64, prev_kvs: vec![] };
        for ev in evs {
            if let Some(prev) = &ev.prev {
                if prev.lease != 0 {
                    if let Some(l) = self.leases.get_mut(&prev.lease) {
                        l.keys.remove(&prev.key);
                    }
                }
                if d.prev_kv {
                    resp.prev_kvs.push(kv_to_pb(prev, false));
                }
            }
            events.push((wrev, ev));
        }
        resp
    }

    /// Runs the operations of a checked txn path. Cannot fail: `check_txn_ops` ran first.
    fn do_txn_ops(&mut self, wrev: Rev, ops: &[RequestOp], path: &[bool], at: &mut usize, events: &mut Vec<(Rev, Event)>, wrote: &mut bool) -> Vec<ResponseOp> {
        use response_op::Response;
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let resp = match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    // Reads inside a txn see the txn's own earlier writes.
                    let cur = if *wrote { wrev } else { self.mvcc.rev() };
                    let mut rr = range_at(&self.mvcc, r, Some(cur)).unwrap_or_else(|e| {
                        debug_assert!(false, "txn range failed after its checks passed: {e}");
                        RangeResponse::default()
                    });
                    rr.header = header(cur);
                    Response::ResponseRange(rr)
                }
                Some(request_op::Request::RequestPut(p)) => {
                    *wrote = true;
                    let mut r = self.do_put(wrev, p, events);
                    r.header = header(wrev);
                    Response::ResponsePut(r)
                }
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    let mut r = self.do_delete(wrev, d, events);
                    *wrote |= r.deleted > 0;
                    r.header = header(wrev);
                    Response::ResponseDeleteRange(r)
                }
                Some(request_op::Request::RequestTxn(t)) => {
                    let succeeded = path[*at];
                    *at += 1;
                    let inner = self.do_txn_ops(wrev, if succeeded { &t.success } else { &t.failure }, path, at, events, wrote);
                    Response::ResponseTxn(TxnResponse { header: header(wrev), succeeded, responses: inner })
                }
                None => continue,
            };
            out.push(ResponseOp { response: Some(resp) });
        }
        // Headers of a txn that wrote nothing carry the unchanged revision.
        if !*wrote {
            for r in &mut out {
                set_header_rev(r, self.mvcc.rev());
            }
        }
        out
    }

    /// Evaluates one compare of a txn against the current state. Over a range, every key
    /// must satisfy it; a missing key compares as zero values (etcd semantics).
    fn compare(&self, c: &Compare) -> bool {
        let range = KeyRange::from_etcd(&c.key, &c.range_end);
        match range {
            KeyRange::Single(ref k) => {
                let kv = self.mvcc.get(k);
                compare_one(c, kv.as_ref())
            }
            _ => {
                let Ok(r) = self.mvcc.range(&range, &RangeOpts::default()) else { return false };
                if r.kvs.is_empty() {
                    // etcd: a range compare over no keys is true only for the zero values.
                    return compare_one(c, None);
                }
                r.kvs.iter().all(|kv| compare_one(c, Some(kv)))
            }
        }
    }
}

fn set_header_rev(r: &mut ResponseOp, rev: Rev) {
    use response_op::Response;
    match &mut r.response {
        Some(Response::ResponseRange(x)) => x.header = header(rev),
        Some(Response::ResponsePut(x)) => x.header = header(rev),
        Some(Response::ResponseDeleteRange(x)) => x.header = header(rev),
        Some(Response::ResponseTxn(x)) => x.header = header(rev),
        None => {}
    }
}

fn compare_one(c: &Compare, kv: Option<&Kv>) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    use std::cmp::Ordering;
    let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
    let ord = match (target, &c.target_union) {
        (CompareTarget::Value, Some(TargetUnion::Value(v))) => {
            // A missing key has no value: every value compare fails (etcd).
            let Some(kv) = kv else { return false };
            kv.value.as_ref().cmp(v.as_ref())
        }
        (CompareTarget::Version, Some(TargetUnion::Version(v))) => kv.map_or(0, |k| k.version).cmp(v),
        (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => kv.map_or(0, |k| k.create_rev).cmp(v),
        (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => kv.map_or(0, |k| k.mod_rev).cmp(v),
        (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => kv.map_or(0, |k| k.lease).cmp(v),
        // Target and union disagree, or the union is unset: compare against zero value.
        (CompareTarget::Value, _) => return false,
        (_, None) => {
            let x = match target {
                CompareTarget::Version => kv.map_or(0, |k| k.version),
                CompareTarget::Create => kv.map_or(0, |k| k.create_rev),
                CompareTarget::Mod => kv.map_or(0, |k| k.mod_rev),
                CompareTarget::Lease => kv.map_or(0, |k| k.lease),
                CompareTarget::Value => return false,
            };
            x.cmp(&0)
        }
        _ => return false,
    };
    match CompareResult::try_from(c.result).unwrap_or(CompareResult::Equal) {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

/// True when no branch of the txn writes: it can be served on the read path.
pub fn txn_is_read_only(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| match &op.request {
        Some(request_op::Request::RequestRange(_)) => true,
        Some(request_op::Request::RequestTxn(t)) => txn_is_read_only(t),
        _ => false,
    })
}

fn txn_writes(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match &op.request {
        Some(request_op::Request::RequestPut(_)) => true,
        Some(request_op::Request::RequestTxn(t)) => txn_writes(t),
        _ => false,
    })
}

fn txn_bytes(t: &TxnRequest) -> usize {
    t.success
        .iter()
        .chain(&t.failure)
        .map(|op| match &op.request {
            Some(request_op::Request::RequestPut(p)) => p.key.len() + p.value.len(),
            Some(request_op::Request::RequestTxn(t)) => txn_bytes(t),
            _ => 0,
        })
        .sum()
}

/// A full etcd range request over an index: revision, sort, filters, limit, keys/count only.
pub fn range(mvcc: &Mvcc, r: &RangeRequest) -> Result<RangeResponse, StoreError> {
    range_at(mvcc, r, None)
}

/// [`range`], reading "now" as revision `cur` when given (a txn reading its own writes).
fn range_at(mvcc: &Mvcc, r: &RangeRequest, cur: Option<Rev>) -> Result<RangeResponse, StoreError> {
    use range_request::{SortOrder, SortTarget};
    let krange = KeyRange::from_etcd(&r.key, &r.range_end);
    let mut order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    if order == SortOrder::None && target != SortTarget::Key {
        order = SortOrder::Ascend;
    }
    let filtered = r.min_mod_revision != 0 || r.max_mod_revision != 0 || r.min_create_revision != 0 || r.max_create_revision != 0;
    let sorted = !(order == SortOrder::None || (order == SortOrder::Ascend && target == SortTarget::Key));
    let limit = if r.limit < 0 { 0 } else { r.limit as usize };
    // Sorting or filtering needs every key first; the limit applies afterwards.
    let fetch_limit = if sorted || filtered || limit == 0 { 0 } else { limit };
    let res = mvcc.range(&krange, &RangeOpts { limit: fetch_limit, rev: r.revision, count_only: r.count_only, cur })?;
    let mut kvs = res.kvs;
    if filtered {
        kvs.retain(|kv| {
            (r.min_mod_revision == 0 || kv.mod_rev >= r.min_mod_revision)
                && (r.max_mod_revision == 0 || kv.mod_rev <= r.max_mod_revision)
                && (r.min_create_revision == 0 || kv.create_rev >= r.min_create_revision)
                && (r.max_create_revision == 0 || kv.create_rev <= r.max_create_revision)
        });
    }
    if sorted {
        match target {
            SortTarget::Key => {}
            SortTarget::Version => kvs.sort_by_key(|kv| kv.version),
            SortTarget::Create => kvs.sort_by_key(|kv| kv.create_rev),
            SortTarget::Mod => kvs.sort_by_key(|kv| kv.mod_rev),
            SortTarget::Value => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
        }
        if order == SortOrder::Descend {
            kvs.reverse();
        }
    }
    let mut more = false;
    if limit > 0 && (kvs.len() > limit || (!sorted && !filtered && res.count > limit)) {
        kvs.truncate(limit);
        more = true;
    }
    Ok(RangeResponse {
        header: header(res.rev),
        kvs: kvs.iter().map(|kv| kv_to_pb(kv, r.keys_only)).collect(),
        more,
        count: res.count as i64,
    })
}
