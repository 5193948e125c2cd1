//! What the BPF maps should hold for each service port, and the smallest set of map writes
//! that gets them there.
//!
//! A service port (one `ports[]` entry of a Service: `ns/name:port`) has frontends (its
//! ClusterIP, ExternalIPs, LoadBalancer IPs and NodePorts, all with one protocol) and
//! endpoints (from its EndpointSlices). In the maps it is, per frontend, a master entry
//! (slot 0: how many backends) and one slot per backend, and in `shoal_backends` one entry
//! per endpoint with an id of its own. `Table::sync` compares what it wrote last with what is
//! wanted and writes only the difference: a backend that stays keeps its id and its slot, so
//! one endpoint added to a service of ten is three or four map writes, whatever the number
//! of services.
//!
//! Which endpoints get slots: the ready ones; if none is ready, the serving terminating
//! ones (as kube-proxy). Every endpoint listed keeps its `shoal_backends` entry, so flows
//! already on a not-ready or terminating endpoint keep going; an endpoint that disappears
//! loses its entry and its flows choose again (the programs check the backend on each
//! packet), so no packet goes to a removed backend.
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use crate::abi::{Backend, Proto, SvcKey, SvcValue, BACKEND_F_NO_SLOT, BACKEND_F_TERMINATING, MAGLEV_M, MAGLEV_TABLES, SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_MAGLEV, SVC_F_NODEPORT};

/// One address and port a service port answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// `SVC_F_*`: what kind of address this is.
    pub flags: u16,
}

/// One endpoint of a service port, with its EndpointSlice conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// Everything the maps hold for one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub proto: Proto,
    pub frontends: Vec<Frontend>,
    pub endpoints: Vec<Endpoint>,
    /// Seconds of ClientIP session affinity; 0 for none.
    pub affinity_timeout: u32,
    /// The external frontends (NodePorts, ExternalIPs, LoadBalancer IPs) keep to local
    /// endpoints (externalTrafficPolicy Local): traffic from outside keeps its source.
    pub external_local: bool,
    /// New flows choose by Maglev consistent hashing of their tuple (the same backend on
    /// every node, few flows moved when backends change) instead of at random.
    pub maglev: bool,
}

/// Writes to the maps; the real implementation is `loader::Maps`, tests use a model.
pub trait Maps {
    type Error: std::fmt::Display;
    fn put_service(&mut self, key: &SvcKey, value: &SvcValue) -> Result<(), Self::Error>;
    fn del_service(&mut self, key: &SvcKey) -> Result<(), Self::Error>;
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<(), Self::Error>;
    fn del_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    /// Entry `index` of the Maglev tables (table t holds [t * M, (t + 1) * M)).
    fn put_maglev(&mut self, index: u32, backend_id: u32) -> Result<(), Self::Error>;
    /// A Maglev table is full (all MAGLEV_TABLES in use).
    fn maglev_full(&self) -> Self::Error;
}

/// Map writes one sync made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Writes {
    pub puts: usize,
    pub deletes: usize,
}

impl Writes {
    pub fn total(&self) -> usize {
        self.puts + self.deletes
    }
}

/// Small integer ids, reused after release (ids index nothing, but small ones keep the
/// admin listing readable and never run out).
#[derive(Debug, Default)]
struct Ids {
    next: u32,
    free: Vec<u32>,
}

impl Ids {
    fn take(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        })
    }
    fn release(&mut self, id: u32) {
        self.free.push(id);
    }
    /// Marks ids found in pinned maps as used.
    fn restore(&mut self, used: impl IntoIterator<Item = u32>) {
        let used: std::collections::HashSet<u32> = used.into_iter().collect();
        self.next = used.iter().copied().max().unwrap_or(0);
        self.free = (1..=self.next).filter(|id| !used.contains(id)).rev().collect();
    }
}

/// What one service port holds in the maps now.
#[derive(Clone, Debug, Default)]
struct Installed {
    svc_id: u32,
    proto: Option<Proto>,
    frontends: Vec<Frontend>,
    affinity_timeout: u32,
    /// Backend ids by slot (slot i + 1).
    slots: Vec<u32>,
    /// Every endpoint's backend id and entry.
    backends: HashMap<(Ipv4Addr, u16), (u32, Backend)>,
    /// A write failed part-way: the next sync rewrites everything of this port.
    dirty: bool,
    /// Its Maglev table and the backend ids it holds (empty: unknown, rewrite all).
    maglev: Option<(u32, Vec<u32>)>,
    /// The highest slot found in the maps at a restore (slots past the count that a
    /// crash left behind are deleted by the next sync).
    max_slot: usize,
}

/// The service ports installed in the maps, by name.
#[derive(Debug, Default)]
pub struct Table {
    ports: BTreeMap<String, Installed>,
    /// Ports found in pinned maps after a restart, not yet claimed by a name.
    orphans: Vec<Installed>,
    svc_ids: Ids,
    backend_ids: Ids,
    maglev_ids: Ids,
    /// Which port last wrote each frontend: two services may name the same address and
    /// port (one deleted as the other is created); one's removal must not delete the
    /// other's entries.
    owners: HashMap<(Ipv4Addr, u16, Proto), String>,
}

impl Table {
    pub fn new() -> Table {
        Table::default()
    }

    /// Rebuilds the table from maps pinned by an earlier run, so that a restarted agent
    /// keeps every service id and backend id (and with them every established flow). The
    /// ports have no names yet: the first `sync` of a port whose frontends overlap one of
    /// them claims it; `forget_orphans` removes what no one claimed.
    pub fn restore(services: impl IntoIterator<Item = (SvcKey, SvcValue)>, backends: impl IntoIterator<Item = (u32, Backend)>) -> Table {
        let backends: HashMap<u32, Backend> = backends.into_iter().collect();
        let mut by_svc: BTreeMap<u32, Installed> = BTreeMap::new();
        let mut slots: BTreeMap<(u32, SvcKey), Vec<(u16, u32)>> = BTreeMap::new();
        let services: Vec<(SvcKey, SvcValue)> = services.into_iter().collect();
        let masters: Vec<(SvcKey, SvcValue)> = services.iter().filter(|(k, _)| k.slot == 0).copied().collect();
        for (key, value) in services {
            let port = by_svc.entry(value.svc_id).or_default();
            port.svc_id = value.svc_id;
            let master = key.with_slot(0);
            if key.slot == 0 {
                port.proto = key.protocol();
                port.affinity_timeout = value.affinity_timeout;
                if value.flags & SVC_F_MAGLEV != 0 {
                    port.maglev = Some((value.backend_id, Vec::new()));
                }
                port.frontends.push(Frontend { addr: key.ip(), port: key.host_port(), flags: value.flags & !SVC_F_MAGLEV });
            } else {
                slots.entry((value.svc_id, master)).or_default().push((key.slot, value.backend_id));
            }
        }
        let mut counts: HashMap<u32, Vec<u16>> = HashMap::new();
        for (key, value) in &masters {
            let _ = key;
            counts.entry(value.svc_id).or_default().push(value.count);
        }
        for ((svc_id, _), mut list) in slots {
            // every frontend of a port has the same slots; the first one seen is kept, and
            // an agent killed mid-write (a count that disagrees, a gap, a backend twice)
            // makes the port dirty: its first sync rewrites it whole
            let port = by_svc.get_mut(&svc_id).unwrap();
            list.sort();
            port.max_slot = port.max_slot.max(list.last().map_or(0, |(slot, _)| *slot as usize));
            let ids: Vec<u32> = list.iter().map(|(_, id)| *id).collect();
            let contiguous = list.iter().enumerate().all(|(i, (slot, _))| *slot as usize == i + 1);
            let unique = ids.iter().collect::<std::collections::HashSet<_>>().len() == ids.len();
            let agree = counts.get(&svc_id).is_some_and(|c| c.iter().all(|n| *n as usize == ids.len()));
            if !(contiguous && unique && agree) || (!port.slots.is_empty() && port.slots != ids) {
                port.dirty = true;
            }
            if port.slots.is_empty() {
                let mut seen = std::collections::HashSet::new();
                port.slots = ids.into_iter().filter(|id| seen.insert(*id)).collect();
            }
        }
        for (svc_id, c) in &counts {
            if let Some(port) = by_svc.get_mut(svc_id) {
                if c.iter().any(|n| *n as usize != port.slots.len()) {
                    port.dirty = true;
                }
            }
        }
        let mut table = Table::new();
        let mut used_backends = Vec::new();
        for (_, mut port) in by_svc {
            port.frontends.sort();
            // a port's backends are the ones its slots name; endpoints that held no slot
            // (not ready) are not recoverable from the maps: the first sync re-adds them
            for id in &port.slots {
                if let Some(b) = backends.get(id) {
                    port.backends.insert((b.ip(), b.host_port()), (*id, *b));
                    used_backends.push(*id);
                }
            }
            table.orphans.push(port);
        }
        table.svc_ids.restore(table.orphans.iter().map(|p| p.svc_id));
        table.maglev_ids.restore(table.orphans.iter().filter_map(|p| p.maglev.as_ref().map(|(t, _)| t + 1)));
        // backend ids that no restored port names are released (their entries are stale)
        table.backend_ids.restore(used_backends);
        table
    }

    /// Ids of backends in pinned maps that no restored port names: the caller deletes
    /// them after `restore`.
    pub fn stale_backends(&self, pinned: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let named: std::collections::HashSet<u32> = self.orphans.iter().chain(self.ports.values()).flat_map(|p| p.backends.values().map(|(id, _)| *id)).collect();
        pinned.into_iter().filter(|id| !named.contains(id)).collect()
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// The service id of a port, for listings.
    pub fn svc_id(&self, name: &str) -> Option<u32> {
        self.ports.get(name).map(|p| p.svc_id)
    }

    /// Makes the maps hold `want` for the port `name` (None: remove it), writing only what
    /// differs from the last sync. On a write error the port is marked so that the next
    /// sync rewrites it whole; the error is returned for the caller to count and retry.
    pub fn sync<M: Maps>(&mut self, name: &str, want: Option<&ServicePort>, maps: &mut M) -> Result<Writes, M::Error> {
        let mut writes = Writes::default();
        let Some(want) = want else {
            if let Some(mut cur) = self.ports.remove(name) {
                if let Err(e) = self.remove(name, &cur, maps, &mut writes) {
                    // kept (dirty): a later removal tries again
                    cur.dirty = true;
                    self.ports.insert(name.to_string(), cur);
                    return Err(e);
                }
                self.release(cur);
            }
            return Ok(writes);
        };
        let mut cur = match self.ports.remove(name) {
            Some(cur) => cur,
            None => self.claim_orphan(want).unwrap_or_else(|| Installed { svc_id: self.svc_ids.take(), ..Installed::default() }),
        };
        let result = self.update(name, &mut cur, want, maps, &mut writes);
        if result.is_err() {
            cur.dirty = true;
        }
        self.ports.insert(name.to_string(), cur);
        result.map(|()| writes)
    }

    /// Removes restored ports that no sync claimed (their services are gone).
    pub fn forget_orphans<M: Maps>(&mut self, maps: &mut M) -> Result<Writes, M::Error> {
        let mut writes = Writes::default();
        while let Some(port) = self.orphans.pop() {
            if let Err(e) = self.remove("", &port, maps, &mut writes) {
                self.orphans.push(port);
                return Err(e);
            }
            self.release(port);
        }
        Ok(writes)
    }

    /// Ports whose last write failed: the caller syncs them again (a full map may have
    /// room now).
    pub fn dirty_ports(&self) -> Vec<String> {
        self.ports.iter().filter(|(_, p)| p.dirty).map(|(n, _)| n.clone()).collect()
    }

    /// Whether another port than `name` wrote this frontend last.
    fn owned_by_other(&self, name: &str, addr: Ipv4Addr, port: u16, proto: Proto) -> bool {
        self.owners.get(&(addr, port, proto)).is_some_and(|o| o != name)
    }

    fn claim_orphan(&mut self, want: &ServicePort) -> Option<Installed> {
        let i = self.orphans.iter().position(|o| o.proto == Some(want.proto) && o.frontends.iter().any(|f| want.frontends.iter().any(|w| w.addr == f.addr && w.port == f.port)))?;
        Some(self.orphans.swap_remove(i))
    }

    /// Deletes a port's entries (frontends another port took over are left alone).
    fn remove<M: Maps>(&mut self, name: &str, cur: &Installed, maps: &mut M, writes: &mut Writes) -> Result<(), M::Error> {
        if let Some(proto) = cur.proto {
            for f in &cur.frontends {
                self.delete_frontend(name, f, proto, cur.slots.len().max(cur.max_slot), maps, writes)?;
            }
        }
        for (id, _) in cur.backends.values() {
            maps.del_backend(*id)?;
            writes.deletes += 1;
        }
        Ok(())
    }

    /// Deletes one frontend's master and `slots` slots, unless another port took it over.
    fn delete_frontend<M: Maps>(&mut self, name: &str, f: &Frontend, proto: Proto, slots: usize, maps: &mut M, writes: &mut Writes) -> Result<(), M::Error> {
        if self.owned_by_other(name, f.addr, f.port, proto) {
            return Ok(());
        }
        self.owners.remove(&(f.addr, f.port, proto));
        let key = SvcKey::new(f.addr, f.port, proto, 0);
        maps.del_service(&key)?;
        writes.deletes += 1;
        for slot in 1..=slots {
            maps.del_service(&key.with_slot(slot as u16))?;
            writes.deletes += 1;
        }
        Ok(())
    }

    /// Entries the table wrote: (service map entries, backend entries). Metrics read these
    /// instead of walking 200,000 map entries with system calls.
    pub fn entries(&self) -> (usize, usize) {
        self.ports.values().chain(&self.orphans).fold((0, 0), |(s, b), p| (s + p.frontends.len() * (1 + p.slots.len()), b + p.backends.len()))
    }

    /// Returns a removed port's ids to their pools (after its entries are gone).
    fn release(&mut self, cur: Installed) {
        for (id, _) in cur.backends.values() {
            self.backend_ids.release(*id);
        }
        self.svc_ids.release(cur.svc_id);
        if let Some((t, _)) = cur.maglev {
            self.maglev_ids.release(t + 1);
        }
    }

    fn update<M: Maps>(&mut self, name: &str, cur: &mut Installed, want: &ServicePort, maps: &mut M, writes: &mut Writes) -> Result<(), M::Error> {
        let proto = want.proto;
        let dirty = cur.dirty;
        // 1. backends: every listed endpoint has an entry (flagged when it takes no new
        // flows, which affinity reads); new ones get ids
        let slotted: std::collections::HashSet<(Ipv4Addr, u16)> = slot_endpoints(&want.endpoints).iter().map(|e| (e.addr, e.port)).collect();
        let mut wanted: HashMap<(Ipv4Addr, u16), Backend> = HashMap::new();
        for ep in &want.endpoints {
            let mut flags = if ep.terminating { BACKEND_F_TERMINATING } else { 0 };
            if !slotted.contains(&(ep.addr, ep.port)) {
                flags |= BACKEND_F_NO_SLOT;
            }
            wanted.entry((ep.addr, ep.port)).or_insert(Backend::new(ep.addr, ep.port, proto, flags));
        }
        let mut added = Vec::new();
        for (at, backend) in &wanted {
            match cur.backends.get_mut(at) {
                Some((id, have)) if have == backend && !dirty => {
                    let _ = id;
                }
                Some((id, have)) => {
                    maps.put_backend(*id, backend)?;
                    writes.puts += 1;
                    *have = *backend;
                }
                None => {
                    let id = self.backend_ids.take();
                    cur.backends.insert(*at, (id, *backend));
                    added.push(id);
                    maps.put_backend(id, backend)?;
                    writes.puts += 1;
                }
            }
        }
        // 2. slots: the ready endpoints, else the serving terminating ones; a backend that
        // keeps its slot is not rewritten, a freed slot takes a new backend
        let mut chosen: Vec<u32> = slot_endpoints(&want.endpoints).iter().map(|e| cur.backends[&(e.addr, e.port)].0).collect();
        chosen.sort_unstable();
        chosen.dedup();
        let new_slots = place(&cur.slots, &chosen);
        // 3. frontends: removed ones lose their master and slots, new and kept ones get
        // what changed (everything, for a new frontend or a protocol change)
        let proto_changed = cur.proto != Some(proto);
        let mut frontends = want.frontends.clone();
        frontends.sort();
        frontends.dedup();
        if let Some(old_proto) = cur.proto {
            for f in &cur.frontends {
                if proto_changed || !frontends.iter().any(|w| w.addr == f.addr && w.port == f.port) {
                    self.delete_frontend(name, f, old_proto, cur.slots.len().max(cur.max_slot), maps, writes)?;
                }
            }
        }
        // the Maglev table, before the masters that point at it: only entries that change
        // are written (a backend added to ten moves about a tenth of them)
        let was_maglev = cur.maglev.as_ref().map(|(t, _)| *t);
        if want.maglev && !new_slots.is_empty() {
            let (t, old) = match cur.maglev.take() {
                Some(m) => m,
                None => {
                    let t = self.maglev_ids.take();
                    if t > MAGLEV_TABLES {
                        self.maglev_ids.release(t);
                        return Err(maps.maglev_full());
                    }
                    (t - 1, Vec::new())
                }
            };
            // held by the port from here on, so a failed write below does not leak it
            cur.maglev = Some((t, old.clone()));
            let mut named: Vec<(String, u32)> = new_slots.iter().map(|id| {
                let b = cur.backends.values().find(|(bid, _)| bid == id).map(|(_, b)| *b).unwrap_or_default();
                (format!("{}:{}", b.ip(), b.host_port()), *id)
            }).collect();
            named.sort();
            let entries = maglev_table(&named, MAGLEV_M as usize);
            for (i, id) in entries.iter().enumerate() {
                if dirty || old.get(i) != Some(id) {
                    maps.put_maglev(t * MAGLEV_M + i as u32, *id)?;
                    writes.puts += 1;
                }
            }
            cur.maglev = Some((t, entries));
        }
        let dropped_maglev = if want.maglev && !new_slots.is_empty() { None } else { cur.maglev.take() };
        let maglev_now = cur.maglev.as_ref().map(|(t, _)| *t);
        let master = SvcValue { backend_id: maglev_now.unwrap_or(0), svc_id: cur.svc_id, count: new_slots.len() as u16, flags: if maglev_now.is_some() { SVC_F_MAGLEV } else { 0 }, affinity_timeout: want.affinity_timeout };
        for f in &frontends {
            // taken over from another port (or never ours): write it whole
            let existed = !proto_changed && cur.frontends.iter().any(|c| c.addr == f.addr && c.port == f.port) && !self.owned_by_other(name, f.addr, f.port, proto);
            self.owners.insert((f.addr, f.port, proto), name.to_string());
            let key = SvcKey::new(f.addr, f.port, proto, 0);
            let rewrite_all = dirty || !existed;
            // slots first, then the master's count, then the slots beyond it: a packet
            // never reads a count that names a slot not yet written
            for (i, id) in new_slots.iter().enumerate() {
                if rewrite_all || cur.slots.get(i) != Some(id) {
                    maps.put_service(&key.with_slot(i as u16 + 1), &SvcValue { backend_id: *id, svc_id: cur.svc_id, ..SvcValue::default() })?;
                    writes.puts += 1;
                }
            }
            let old_flags = cur.frontends.iter().find(|c| c.addr == f.addr && c.port == f.port).map(|c| c.flags);
            let f = &Frontend { flags: f.flags | if want.external_local && f.flags & (SVC_F_NODEPORT | SVC_F_EXTERNAL) != 0 { SVC_F_LOCAL } else { 0 }, ..*f };
            if rewrite_all || new_slots.len() != cur.slots.len() || want.affinity_timeout != cur.affinity_timeout || old_flags != Some(f.flags) || was_maglev != maglev_now {
                maps.put_service(&key, &SvcValue { flags: f.flags | master.flags, ..master })?;
                writes.puts += 1;
            }
            if existed {
                for slot in new_slots.len() + 1..=cur.slots.len().max(cur.max_slot) {
                    maps.del_service(&key.with_slot(slot as u16))?;
                    writes.deletes += 1;
                }
            }
        }
        // a table no master names any more is free again
        if let Some((t, _)) = dropped_maglev {
            self.maglev_ids.release(t + 1);
        }
        // 4. endpoints no longer listed lose their entries, after no slot names them
        let gone: Vec<(Ipv4Addr, u16)> = cur.backends.keys().filter(|at| !wanted.contains_key(at)).copied().collect();
        for at in gone {
            let id = cur.backends[&at].0;
            maps.del_backend(id)?;
            cur.backends.remove(&at);
            writes.deletes += 1;
            self.backend_ids.release(id);
        }
        cur.proto = Some(proto);
        cur.frontends = frontends.iter().map(|f| Frontend { flags: f.flags | if want.external_local && f.flags & (SVC_F_NODEPORT | SVC_F_EXTERNAL) != 0 { SVC_F_LOCAL } else { 0 }, ..*f }).collect();
        cur.slots = new_slots;
        cur.affinity_timeout = want.affinity_timeout;
        cur.dirty = false;
        cur.max_slot = 0;
        Ok(())
    }
}

/// A Maglev lookup table of `m` entries (m prime) over `backends` (name, id), sorted by
/// name: each backend fills the table along its own permutation (offset and skip from
/// hashes of its name) in turn, so every node computes the same table from the same
/// backends, each gets m/n entries give or take one, and adding or removing one backend
/// moves only about 1/n of the entries (Eisenbud et al., NSDI 2016).
pub fn maglev_table(backends: &[(String, u32)], m: usize) -> Vec<u32> {
    fn fnv(s: &str, seed: u64) -> u64 {
        let mut h = 0xcbf29ce484222325u64 ^ seed;
        for b in s.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^ (h >> 29)
    }
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    let perms: Vec<(u64, u64)> = backends.iter().map(|(name, _)| (fnv(name, 0) % m as u64, fnv(name, 0x9e3779b97f4a7c15) % (m as u64 - 1) + 1)).collect();
    let mut next = vec![0u64; n];
    let mut entry = vec![u32::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perms[i];
            let mut c = ((offset + next[i] * skip) % m as u64) as usize;
            while entry[c] != u32::MAX {
                next[i] += 1;
                c = ((offset + next[i] * skip) % m as u64) as usize;
            }
            entry[c] = backends[i].1;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

/// The endpoints that get traffic: the ready ones, else the serving terminating ones (as
/// kube-proxy), each address and port once.
pub fn slot_endpoints(endpoints: &[Endpoint]) -> Vec<&Endpoint> {
    let mut out: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if out.is_empty() {
        out = endpoints.iter().filter(|e| e.serving && e.terminating).collect();
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|e| seen.insert((e.addr, e.port)));
    out
}

/// New slot order: ids that stay keep their positions, new ids fill freed positions, and
/// the tail moves into holes when the list shrinks.
fn place(old: &[u32], chosen: &[u32]) -> Vec<u32> {
    let keep = |id: &u32| chosen.binary_search(id).is_ok();
    // an id twice in `old` (a restore after a crash mid-write) keeps its first slot only
    let mut seen = std::collections::HashSet::new();
    let mut slots: Vec<Option<u32>> = old.iter().map(|id| (keep(id) && seen.insert(*id)).then_some(*id)).collect();
    let mut fresh = chosen.iter().filter(|id| !seen.contains(*id)).copied();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = fresh.next();
    }
    slots.extend(fresh.map(Some));
    // fill holes from the end
    let mut out: Vec<u32> = Vec::with_capacity(chosen.len());
    let mut tail: Vec<u32> = Vec::new();
    let len = chosen.len();
    for (i, s) in slots.iter().enumerate() {
        if let Some(id) = s {
            if i < len {
                out.push(*id);
            } else {
                tail.push(*id);
            }
        } else if i < len {
            out.push(u32::MAX);
        }
    }
    for hole in out.iter_mut().filter(|id| **id == u32::MAX) {
        *hole = tail.pop().expect("as many tail entries as holes");
    }
    debug_assert_eq!(out.len(), len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::SVC_F_NODEPORT;

    /// The maps as plain hash maps, counting writes.
    #[derive(Default)]
    struct Model {
        services: HashMap<SvcKey, SvcValue>,
        backends: HashMap<u32, Backend>,
        maglev: HashMap<u32, u32>,
        fail_after: Option<usize>,
        writes: usize,
    }

    impl Model {
        fn step(&mut self) -> Result<(), String> {
            self.writes += 1;
            match self.fail_after {
                Some(n) if self.writes > n => Err("map full".into()),
                _ => Ok(()),
            }
        }
        /// What a packet to `addr:port` can reach: the backends of its slots.
        fn reachable(&self, addr: Ipv4Addr, port: u16, proto: Proto) -> Option<Vec<(Ipv4Addr, u16)>> {
            let key = SvcKey::new(addr, port, proto, 0);
            let master = self.services.get(&key)?;
            let mut out: Vec<(Ipv4Addr, u16)> = (1..=master.count)
                .map(|slot| {
                    let v = self.services[&key.with_slot(slot)];
                    assert_eq!(v.svc_id, master.svc_id);
                    let b = self.backends[&v.backend_id];
                    (b.ip(), b.host_port())
                })
                .collect();
            out.sort();
            Some(out)
        }
    }

    impl Maps for Model {
        type Error = String;
        fn put_service(&mut self, key: &SvcKey, value: &SvcValue) -> Result<(), String> {
            self.step()?;
            self.services.insert(*key, *value);
            Ok(())
        }
        fn del_service(&mut self, key: &SvcKey) -> Result<(), String> {
            self.step()?;
            self.services.remove(key);
            Ok(())
        }
        fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<(), String> {
            self.step()?;
            self.backends.insert(id, *backend);
            Ok(())
        }
        fn del_backend(&mut self, id: u32) -> Result<(), String> {
            self.step()?;
            self.backends.remove(&id);
            Ok(())
        }
        fn put_maglev(&mut self, index: u32, backend_id: u32) -> Result<(), String> {
            self.step()?;
            self.maglev.insert(index, backend_id);
            Ok(())
        }
        fn maglev_full(&self) -> String {
            "maglev tables full".into()
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn ep(addr: &str, ready: bool, terminating: bool) -> Endpoint {
        Endpoint { addr: ip(addr), port: 8080, ready, serving: ready || terminating, terminating }
    }

    fn port(endpoints: Vec<Endpoint>) -> ServicePort {
        ServicePort { proto: Proto::Tcp, frontends: vec![Frontend { addr: ip("10.96.0.10"), port: 80, flags: 0 }], endpoints, affinity_timeout: 0, external_local: false, maglev: false }
    }

    fn pods(n: usize) -> Vec<Endpoint> {
        (0..n).map(|i| ep(&format!("10.0.1.{}", i + 2), true, false)).collect()
    }

    #[test]
    fn a_new_port_gets_a_master_slots_and_backends() {
        let (mut table, mut maps) = (Table::new(), Model::default());
        let w = table.sync("default/web:http", Some(&port(pods(3))), &mut maps).unwrap();
        assert_eq!(w, Writes { puts: 3 + 3 + 1, deletes: 0 });
        assert_eq!(maps.reachable(ip("10.96.0.10"), 80, Proto::Tcp).unwrap().len(), 3);
        assert_eq!(maps.reachable(ip("10.96.0.10"), 80, Proto::Udp), None);
    }

    #[test]
    fn one_endpoint_more_or_less_is_a_few_writes_and_others_keep_their_slots() {
        let (mut table, mut maps) = (Table::new(), Model::default());
        table.sync("s", Some(&port(pods(10))), &mut maps).unwrap();
        let before = maps.services.clone();
        let w = table.sync("s", Some(&port(pods(11))), &mut maps).unwrap();
        // the backend, its slot, the master's count
        assert_eq!(w, Writes { puts: 3, deletes: 0 });
        for slot in 1..=10 {
            let k = SvcKey::new(ip("10.96.0.10"), 80, Proto::Tcp, slot);
            assert_eq!(before[&k], maps.services[&k], "slot {slot} moved");
        }
        // remove one in the middle: the last slot moves into its hole
        let mut eps = pods(11);
        eps.remove(4);
        let w = table.sync("s", Some(&port(eps.clone())), &mut maps).unwrap();
        assert_eq!(w, Writes { puts: 2, deletes: 2 });
        let want: Vec<_> = eps.iter().map(|e| (e.addr, e.port)).collect();
        assert_eq!(maps.reachable(ip("10.96.0.10"), 80, Proto::Tcp).unwrap(), want);
        // nothing changed: nothing written
        assert_eq!(table.sync("s", Some(&port(eps)), &mut maps).unwrap().total(), 0);
    }

    #[test]
    fn terminating_endpoints_get_slots_only_when_none_is_ready() {
        let (mut table, mut maps) = (Table::new(), Model::default());
        let vip = ip("10.96.0.10");
        table.sync("s", Some(&port(vec![ep("10.0.1.2", true, false), ep("10.0.1.3", false, true), ep("10.0.1.4", false, false)])), &mut maps).unwrap();
        assert_eq!(maps.reachable(vip, 80, Proto::Tcp).unwrap(), vec![(ip("10.0.1.2"), 8080)]);
        // all three keep backend entries: their flows continue
        assert_eq!(maps.backends.len(), 3);
        assert_eq!(maps.backends.values().filter(|b| b.flags & BACKEND_F_TERMINATING != 0).count(), 1);
        table.sync("s", Some(&port(vec![ep("10.0.1.2", false, true), ep("10.0.1.3", false, true), ep("10.0.1.4", false, false)])), &mut maps).unwrap();
        assert_eq!(maps.reachable(vip, 80, Proto::Tcp).unwrap(), vec![(ip("10.0.1.2"), 8080), (ip("10.0.1.3"), 8080)]);
        // none serving: the master stays with count 0, which the program rejects
        table.sync("s", Some(&port(vec![ep("10.0.1.4", false, false)])), &mut maps).unwrap();
        assert_eq!(maps.reachable(vip, 80, Proto::Tcp).unwrap(), vec![]);
        assert_eq!(maps.backends.len(), 1);
        assert_eq!(maps.services.len(), 1);
    }

    #[test]
    fn frontends_come_and_go_and_removal_leaves_nothing() {
        let (mut table, mut maps) = (Table::new(), Model::default());
        let mut p = port(pods(2));
        table.sync("s", Some(&p), &mut maps).unwrap();
        p.frontends.push(Frontend { addr: ip("192.168.1.10"), port: 30080, flags: SVC_F_NODEPORT });
        let w = table.sync("s", Some(&p), &mut maps).unwrap();
        assert_eq!(w, Writes { puts: 3, deletes: 0 });
        assert_eq!(maps.services[&SvcKey::new(ip("192.168.1.10"), 30080, Proto::Tcp, 0)].flags, SVC_F_NODEPORT);
        p.frontends.remove(0);
        let w = table.sync("s", Some(&p), &mut maps).unwrap();
        assert_eq!(w, Writes { puts: 0, deletes: 3 });
        assert_eq!(maps.reachable(ip("10.96.0.10"), 80, Proto::Tcp), None);
        p.proto = Proto::Udp;
        table.sync("s", Some(&p), &mut maps).unwrap();
        assert_eq!(maps.reachable(ip("192.168.1.10"), 30080, Proto::Tcp), None);
        assert_eq!(maps.reachable(ip("192.168.1.10"), 30080, Proto::Udp).unwrap().len(), 2);
        table.sync("s", None, &mut maps).unwrap();
        assert!(maps.services.is_empty() && maps.backends.is_empty());
        assert!(table.is_empty());
        // ids are reused
        table.sync("t", Some(&port(pods(1))), &mut maps).unwrap();
        assert_eq!(table.svc_id("t"), Some(1));
    }

    #[test]
    fn a_failed_write_is_repaired_by_the_next_sync() {
        let (mut table, mut maps) = (Table::new(), Model::default());
        table.sync("s", Some(&port(pods(3))), &mut maps).unwrap();
        maps.fail_after = Some(maps.writes + 2);
        assert!(table.sync("s", Some(&port(pods(6))), &mut maps).is_err());
        maps.fail_after = None;
        table.sync("s", Some(&port(pods(6))), &mut maps).unwrap();
        let want: Vec<_> = pods(6).iter().map(|e| (e.addr, e.port)).collect();
        assert_eq!(maps.reachable(ip("10.96.0.10"), 80, Proto::Tcp).unwrap(), want);
    }

    #[test]
    fn a_restored_table_keeps_ids_and_writes_nothing_for_what_did_not_change() {
        let (mut table, mut maps) = (Table::new(), Model::default());
        let mut other = port(pods(2));
        other.frontends[0].addr = ip("10.96.0.11");
        table.sync("a", Some(&port(pods(4))), &mut maps).unwrap();
        table.sync("b", Some(&other), &mut maps).unwrap();
        table.sync("gone", Some(&ServicePort { frontends: vec![Frontend { addr: ip("10.96.0.12"), port: 53, flags: 0 }], proto: Proto::Udp, ..port(vec![ep("10.0.2.2", true, false)]) }), &mut maps).unwrap();
        let backends_before = maps.backends.clone();
        let mut restored = Table::restore(maps.services.clone(), maps.backends.clone());
        assert!(restored.stale_backends(maps.backends.keys().copied()).is_empty());
        assert_eq!(restored.sync("b", Some(&other), &mut maps).unwrap().total(), 0);
        assert_eq!(restored.sync("a", Some(&port(pods(5))), &mut maps).unwrap(), Writes { puts: 3, deletes: 0 });
        assert_eq!(restored.forget_orphans(&mut maps).unwrap(), Writes { puts: 0, deletes: 3 });
        assert_eq!(maps.reachable(ip("10.96.0.12"), 53, Proto::Udp), None);
        for (id, b) in &backends_before {
            if b.ip() != ip("10.0.2.2") {
                assert_eq!(maps.backends.get(id), Some(b), "backend {id} kept its id");
            }
        }
        // a new id does not collide with a restored one
        restored.sync("c", Some(&ServicePort { frontends: vec![Frontend { addr: ip("10.96.0.13"), port: 80, flags: 0 }], ..port(pods(1)) }), &mut maps).unwrap();
        let ids: std::collections::HashSet<u32> = ["a", "b", "c"].iter().map(|n| restored.svc_id(n).unwrap()).collect();
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn maglev_tables_are_balanced_stable_and_move_few_entries() {
        let names = |n: usize| (0..n).map(|i| (format!("10.0.{i}.2:8080"), i as u32 + 1)).collect::<Vec<_>>();
        let t3 = maglev_table(&names(3), 1021);
        assert_eq!(t3.len(), 1021);
        for id in 1..=3 {
            let n = t3.iter().filter(|x| **x == id).count();
            assert!((340..=341).contains(&n), "backend {id} has {n} of 1021 entries");
        }
        // the same backends given in any order make the same table (every node agrees)
        let mut rev = names(3);
        rev.reverse();
        rev.sort();
        assert_eq!(maglev_table(&rev, 1021), t3);
        // a fourth backend takes a quarter; few other entries move between the old ones
        // (Maglev trades a little disruption for balance)
        let t4 = maglev_table(&names(4), 1021);
        let moved: Vec<usize> = (0..1021).filter(|i| t3[*i] != t4[*i]).collect();
        let to_new = moved.iter().filter(|i| t4[**i] == 4).count();
        assert!((250..=256).contains(&to_new), "{to_new} entries went to the new backend");
        assert!(moved.len() - to_new <= 60, "{} entries moved between old backends", moved.len() - to_new);
    }

    #[test]
    fn a_maglev_port_writes_its_table_once_and_then_only_what_changes() {
        let (mut table, mut maps) = (Table::new(), Model::default());
        let mut p = port(pods(3));
        p.maglev = true;
        let w = table.sync("s", Some(&p), &mut maps).unwrap();
        assert_eq!(w.puts, 3 + 3 + 1 + 1021);
        let master = maps.services[&SvcKey::new(ip("10.96.0.10"), 80, Proto::Tcp, 0)];
        assert_eq!(master.flags & SVC_F_MAGLEV, SVC_F_MAGLEV);
        p.endpoints = pods(4);
        let w = table.sync("s", Some(&p), &mut maps).unwrap();
        assert!(w.puts < 3 + 300, "{w:?}");
        // the table names only live backends
        let t = master.backend_id;
        assert!((0..1021).all(|i| maps.backends.contains_key(&maps.maglev[&(t * 1021 + i)])));
        // back to random: the table is released
        p.maglev = false;
        table.sync("s", Some(&p), &mut maps).unwrap();
        assert_eq!(maps.services[&SvcKey::new(ip("10.96.0.10"), 80, Proto::Tcp, 0)].flags & SVC_F_MAGLEV, 0);
    }

    #[test]
    fn a_frontend_taken_over_by_another_port_survives_the_old_ports_removal() {
        let (mut table, mut maps) = (Table::new(), Model::default());
        table.sync("kube-system/kube-dns:53/UDP", Some(&port(pods(2))), &mut maps).unwrap();
        table.sync("kube-system/coredns:53/UDP", Some(&port(pods(3))), &mut maps).unwrap();
        table.sync("kube-system/kube-dns:53/UDP", None, &mut maps).unwrap();
        assert_eq!(maps.reachable(ip("10.96.0.10"), 80, Proto::Tcp).unwrap().len(), 3);
        assert_eq!(maps.backends.len(), 3, "the old port's backends are gone");
        table.sync("kube-system/coredns:53/UDP", None, &mut maps).unwrap();
        assert!(maps.services.is_empty() && maps.backends.is_empty());
    }

    #[test]
    fn a_failed_removal_is_kept_and_finished_later() {
        let (mut table, mut maps) = (Table::new(), Model::default());
        table.sync("s", Some(&port(pods(3))), &mut maps).unwrap();
        maps.fail_after = Some(maps.writes + 1);
        assert!(table.sync("s", None, &mut maps).is_err());
        assert_eq!(table.dirty_ports(), vec!["s".to_string()]);
        maps.fail_after = None;
        table.sync("s", None, &mut maps).unwrap();
        assert!(maps.services.is_empty() && maps.backends.is_empty(), "{:?}", maps.services);
    }

    #[test]
    fn a_restore_after_a_crash_mid_write_repairs_the_port() {
        let (mut table, mut maps) = (Table::new(), Model::default());
        table.sync("s", Some(&port(pods(3))), &mut maps).unwrap();
        // killed while shrinking: slot 3's backend copied into slot 1, count not yet written
        let k = SvcKey::new(ip("10.96.0.10"), 80, Proto::Tcp, 0);
        let third = maps.services[&k.with_slot(3)];
        maps.services.insert(k.with_slot(1), third);
        let mut restored = Table::restore(maps.services.clone(), maps.backends.clone());
        let mut eps = pods(3);
        eps.remove(0);
        restored.sync("s", Some(&port(eps.clone())), &mut maps).unwrap();
        let want: Vec<_> = eps.iter().map(|e| (e.addr, e.port)).collect();
        assert_eq!(maps.reachable(ip("10.96.0.10"), 80, Proto::Tcp).unwrap(), want);
        assert!(maps.services.len() == 3, "{:?}", maps.services.keys().collect::<Vec<_>>());
    }

    #[test]
    fn placement_keeps_positions() {
        assert_eq!(place(&[], &[3, 5]), vec![3, 5]);
        assert_eq!(place(&[1, 2, 3], &[1, 3, 4]), vec![1, 4, 3]);
        assert_eq!(place(&[1, 2, 3, 4], &[1, 4]), vec![1, 4]);
        assert_eq!(place(&[1, 2, 3, 4], &[2, 3]), vec![3, 2]);
        assert_eq!(place(&[1, 2], &[]), Vec::<u32>::new());
        assert_eq!(place(&[3, 2, 3], &[2, 3]), vec![3, 2]);
    }
}
