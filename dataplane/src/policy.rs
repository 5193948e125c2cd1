//! NetworkPolicy: from Pods, Namespaces and NetworkPolicies to the three maps the programs
//! judge flows with (bpf/lib/policy.h): `shoal_ipcache` (address or CIDR → identity),
//! `shoal_endpoints` (local pod → subject, isolation) and `shoal_policy` (subject,
//! direction, peer identity, protocol, port prefix → allowed).
//!
//! An identity is what policy can tell apart about an address: for a pod its namespace,
//! its labels and which policy CIDRs hold its address; for a policy CIDR the CIDRs that
//! hold it; for the node's own addresses the same, flagged as the host. Pods of one
//! Deployment share one identity, so the policy map grows with identities, not pods. A
//! subject is what decides a local pod's rules: namespace, labels and its named container
//! ports. Identity and subject numbers are this agent's own (never reused while it runs).
//!
//! `ipBlock` selects every address it holds, pods' too (upstream leaves that to the
//! implementation; Calico does the same, Cilium does not): an `except` is exact because
//! the LPM trie holds every policy CIDR, and an identity names the CIDRs around it.
//!
//! The work is proportional to what changed in the common case: a pod that comes or goes
//! with labels other pods have is one ipcache write; rules are recomputed (over
//! identities, not pods) only when a policy, a namespace's labels, the set of identities or
//! a local pod changes, and only the difference is written.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use serde_json::Value;

use crate::abi::{self, EndpointValue, IpcacheValue, PolicyData};

/// An IPv4 prefix: (address as a host u32 with the host bits cleared, length).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix(pub u32, pub u8);

impl Prefix {
    pub fn parse(s: &str) -> Option<Prefix> {
        let (a, l) = s.split_once('/')?;
        let a: Ipv4Addr = a.parse().ok()?;
        let l: u8 = l.parse().ok().filter(|l| *l <= 32)?;
        Some(Prefix(u32::from(a) & mask(l), l))
    }
    pub fn host(a: Ipv4Addr) -> Prefix {
        Prefix(u32::from(a), 32)
    }
    /// Whether `other` lies inside this prefix.
    pub fn contains(&self, other: &Prefix) -> bool {
        other.1 >= self.1 && (other.0 & mask(self.1)) == self.0
    }
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.0)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr(), self.1)
    }
}

type Labels = BTreeMap<String, String>;

fn labels_of(v: &Value, ptr: &str) -> Labels {
    v.pointer(ptr).and_then(Value::as_object).map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect()).unwrap_or_default()
}

fn selects(sel: &Value, labels: &Labels) -> bool {
    shoal_client::selector::matches_with(sel, |k| labels.get(k).map(String::as_str))
}

fn proto_num(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "SCTP" => Some(132),
        _ => None,
    }
}

/// What policy needs of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodInfo {
    ip: Option<Ipv4Addr>,
    node: String,
    labels: Labels,
    /// Named container ports: (name, protocol, port).
    ports: BTreeSet<(String, u8, u16)>,
}

impl PodInfo {
    fn from_json(v: &Value) -> PodInfo {
        let host_network = v.pointer("/spec/hostNetwork").and_then(Value::as_bool).unwrap_or(false);
        // a pod on the host network has the node's address: it is the host to policy
        let ip = if host_network { None } else { v.pointer("/status/podIP").and_then(Value::as_str).and_then(|s| s.parse().ok()) };
        let mut ports = BTreeSet::new();
        for c in v.pointer("/spec/containers").and_then(Value::as_array).into_iter().flatten() {
            for p in c.get("ports").and_then(Value::as_array).into_iter().flatten() {
                let (Some(name), Some(port)) = (p.get("name").and_then(Value::as_str), p.get("containerPort").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok())) else { continue };
                let proto = proto_num(p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")).unwrap_or(6);
                ports.insert((name.to_string(), proto, port));
            }
        }
        PodInfo { ip, node: v.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("").to_string(), labels: labels_of(v, "/metadata/labels"), ports }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Port {
    Any,
    Range(u16, u16),
    Named(String),
}

#[derive(Clone, Debug, PartialEq)]
enum Peer {
    /// podSelector and/or namespaceSelector (None: the policy's namespace / every pod).
    Pods { pods: Option<Value>, namespaces: Option<Value> },
    Block { cidr: Prefix, except: Vec<Prefix> },
}

#[derive(Clone, Debug, PartialEq)]
struct Rule {
    /// Empty: every peer.
    peers: Vec<Peer>,
    /// Empty: every protocol and port.
    ports: Vec<(u8, Port)>,
    /// Peers or ports were given but none can match here (IPv6 ipBlocks only, say): the
    /// rule allows nothing (an empty list would mean everything).
    nothing: bool,
}

#[derive(Clone, Debug, PartialEq)]
struct NetPol {
    selector: Value,
    /// None: the policy does not cover that direction (policyTypes).
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

impl NetPol {
    fn from_json(v: &Value) -> NetPol {
        let spec = v.get("spec").cloned().unwrap_or(Value::Null);
        let types: Vec<&str> = spec.get("policyTypes").and_then(Value::as_array).map(|t| t.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let has_egress = spec.get("egress").and_then(Value::as_array).is_some_and(|e| !e.is_empty());
        // the server defaults policyTypes; without it, as upstream's defaulting
        let (ingress, egress) = if types.is_empty() { (true, has_egress) } else { (types.contains(&"Ingress"), types.contains(&"Egress")) };
        let rules = |dir: &str, peers_key: &str| -> Vec<Rule> {
            spec.get(dir).and_then(Value::as_array).into_iter().flatten().map(|r| {
                let given_peers = r.get(peers_key).and_then(Value::as_array).is_some_and(|a| !a.is_empty());
                let given_ports = r.get("ports").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
                let peers: Vec<Peer> = r.get(peers_key).and_then(Value::as_array).into_iter().flatten().filter_map(|p| {
                    if let Some(b) = p.get("ipBlock").filter(|b| !b.is_null()) {
                        // IPv6 blocks select nothing here (the programs are IPv4)
                        let cidr = Prefix::parse(b.get("cidr")?.as_str()?)?;
                        let except = b.get("except").and_then(Value::as_array).into_iter().flatten().filter_map(|e| Prefix::parse(e.as_str()?)).collect();
                        return Some(Peer::Block { cidr, except });
                    }
                    let get = |k: &str| p.get(k).filter(|v| !v.is_null()).cloned();
                    Some(Peer::Pods { pods: get("podSelector"), namespaces: get("namespaceSelector") })
                }).collect();
                let ports: Vec<(u8, Port)> = r.get("ports").and_then(Value::as_array).into_iter().flatten().filter_map(|p| {
                    let proto = proto_num(p.get("protocol").and_then(Value::as_str).unwrap_or("TCP"))?;
                    let port = match p.get("port") {
                        None | Some(Value::Null) => Port::Any,
                        Some(Value::String(name)) => Port::Named(name.clone()),
                        Some(n) => {
                            let start = u16::try_from(n.as_u64()?).ok()?;
                            let end = p.get("endPort").and_then(Value::as_u64).and_then(|e| u16::try_from(e).ok()).unwrap_or(start);
                            Port::Range(start, end.max(start))
                        }
                    };
                    Some((proto, port))
                }).collect();
                let nothing = (given_peers && peers.is_empty()) || (given_ports && ports.is_empty());
                Rule { peers, ports, nothing }
            }).collect()
        };
        NetPol { selector: spec.get("podSelector").cloned().unwrap_or(Value::Null), ingress: ingress.then(|| rules("ingress", "from")), egress: egress.then(|| rules("egress", "to")) }
    }
}

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Pod { ns: String, labels: Labels },
    Host,
    Cidr,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct IdKey {
    kind: Kind,
    /// The policy CIDRs holding the address or prefix.
    cidrs: Vec<Prefix>,
}

/// An identity in use, with how many ipcache entries carry it and the named ports of the
/// pods behind it (for egress rules that name a port).
struct Identity {
    id: u32,
    refs: usize,
    ports: BTreeMap<(String, u8, u16), usize>,
}

/// Local pod's subject key: namespace, labels, named ports.
type SubjectKey = (String, Labels, BTreeSet<(String, u8, u16)>);

/// The maps' writer (the loader's, or a recording one in tests).
pub trait Maps {
    type Error: std::fmt::Display;
    fn put_ipcache(&mut self, prefix: Prefix, value: IpcacheValue) -> Result<(), Self::Error>;
    fn del_ipcache(&mut self, prefix: Prefix) -> Result<(), Self::Error>;
    fn put_endpoint(&mut self, addr: Ipv4Addr, value: EndpointValue) -> Result<(), Self::Error>;
    fn del_endpoint(&mut self, addr: Ipv4Addr) -> Result<(), Self::Error>;
    fn put_rule(&mut self, prefix_len: u32, key: PolicyData) -> Result<(), Self::Error>;
    fn del_rule(&mut self, prefix_len: u32, key: PolicyData) -> Result<(), Self::Error>;
}

/// A `shoal_policy` entry: (prefix length, key).
pub type RuleKey = (u32, PolicyData);

/// The policy state of one node: its inputs, the identities and subjects derived from
/// them, and what the maps hold.
#[derive(Default)]
pub struct Policies {
    node: String,
    namespaces: HashMap<String, Labels>,
    pods: HashMap<(String, String), PodInfo>,
    policies: HashMap<(String, String), NetPol>,
    host: BTreeSet<Ipv4Addr>,
    /// Every ipBlock CIDR and except of every policy.
    prefixes: Vec<Prefix>,
    identities: HashMap<IdKey, Identity>,
    /// ipcache as it should be: prefix → identity key.
    wanted_ipcache: HashMap<Prefix, IdKey>,
    /// Prefixes whose wanted entry changed since the last sync.
    changed: BTreeSet<Prefix>,
    /// Pods on this node.
    local: BTreeSet<(String, String)>,
    next_id: u32,
    subjects: HashMap<SubjectKey, u32>,
    next_subject: u32,
    /// What the maps hold.
    ipcache: HashMap<Prefix, IpcacheValue>,
    endpoints: HashMap<Ipv4Addr, EndpointValue>,
    rules: BTreeSet<RuleKey>,
    /// The rules must be recomputed (policies, namespaces, identities or local pods changed).
    rules_dirty: bool,
    /// The identities of every pod must be recomputed (the policy CIDRs changed).
    ids_dirty: bool,
    /// Whether any local pod is isolated: without one, the maps stay empty.
    active: bool,
    /// The last sync left writes undone.
    pending: bool,
    /// The pod whose address each pod entry of the ipcache is (an address may be reused).
    owners: HashMap<Prefix, (String, String)>,
}

/// Map writes of one sync, and a failed one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub writes: usize,
    pub errors: Vec<String>,
}

impl Policies {
    pub fn new(node: &str) -> Policies {
        Policies { node: node.to_string(), next_id: 256, next_subject: 1, ..Default::default() }
    }

    /// The node's own addresses (its address, the pod bridge's): ingress from them is
    /// always allowed (probes, source-translated NodePort traffic).
    pub fn set_host(&mut self, addrs: impl IntoIterator<Item = Ipv4Addr>) {
        let new: BTreeSet<Ipv4Addr> = addrs.into_iter().collect();
        if new != self.host {
            for a in self.host.iter().filter(|a| !new.contains(a)).copied().collect::<Vec<_>>() {
                self.unset_address(Prefix::host(a));
            }
            self.host = new;
            for a in self.host.clone() {
                self.set_address(Prefix::host(a), Kind::Host);
            }
        }
    }

    /// Forgets every input (a snapshot follows).
    pub fn reset(&mut self) {
        self.namespaces.clear();
        self.policies.clear();
        for (k, p) in std::mem::take(&mut self.pods) {
            self.pod_gone(&k, &p);
        }
        self.local.clear();
        self.rules_dirty = true;
        self.ids_dirty = true;
    }

    /// Records a Pod, Namespace or NetworkPolicy (None: deleted); false for other kinds.
    pub fn hold(&mut self, kind: &str, ns: &str, name: &str, value: Option<&Value>) -> bool {
        match kind {
            "Pod" => {
                let key = (ns.to_string(), name.to_string());
                let new = value.map(PodInfo::from_json);
                let old = self.pods.get(&key).cloned();
                if old == new {
                    return true;
                }
                if let Some(old) = self.pods.remove(&key) {
                    self.pod_gone(&key, &old);
                    self.local.remove(&key);
                }
                if let Some(new) = new {
                    if new.node == self.node {
                        self.rules_dirty = true;
                        self.local.insert(key.clone());
                    }
                    self.pod_added(&new, &key);
                    self.pods.insert(key, new);
                }
            }
            "Namespace" => {
                let labels = value.map(|v| labels_of(v, "/metadata/labels"));
                let changed = match labels {
                    Some(l) => self.namespaces.insert(name.to_string(), l.clone()) != Some(l),
                    None => self.namespaces.remove(name).is_some(),
                };
                self.rules_dirty |= changed;
            }
            "NetworkPolicy" => {
                let key = (ns.to_string(), name.to_string());
                match value.map(NetPol::from_json) {
                    Some(p) => {
                        self.policies.insert(key, p);
                    }
                    None => {
                        self.policies.remove(&key);
                    }
                }
                self.rules_dirty = true;
                let prefixes = self.policy_prefixes();
                if prefixes != self.prefixes {
                    self.prefixes = prefixes;
                    self.ids_dirty = true;
                }
            }
            _ => return false,
        }
        true
    }

    fn policy_prefixes(&self) -> Vec<Prefix> {
        let mut all = BTreeSet::new();
        for p in self.policies.values() {
            for r in p.ingress.iter().chain(p.egress.iter()).flatten() {
                for peer in &r.peers {
                    if let Peer::Block { cidr, except } = peer {
                        all.insert(*cidr);
                        all.extend(except.iter().copied());
                    }
                }
            }
        }
        all.into_iter().collect()
    }

    fn cidrs_holding(&self, p: &Prefix) -> Vec<Prefix> {
        self.prefixes.iter().filter(|c| c.contains(p)).copied().collect()
    }

    fn pod_added(&mut self, pod: &PodInfo, key: &(String, String)) {
        if let Some(ip) = pod.ip {
            let id_key = self.set_address(Prefix::host(ip), Kind::Pod { ns: key.0.clone(), labels: pod.labels.clone() });
            self.owners.insert(Prefix::host(ip), key.clone());
            let id = self.identities.get_mut(&id_key).expect("set_address made it");
            let mut new_port = false;
            for p in &pod.ports {
                let n = id.ports.entry(p.clone()).or_default();
                *n += 1;
                new_port |= *n == 1;
            }
            // egress rules naming a port resolve it over the identity's pods
            self.rules_dirty |= new_port;
        }
    }

    fn pod_gone(&mut self, key: &(String, String), pod: &PodInfo) {
        if pod.node == self.node {
            self.rules_dirty = true;
        }
        let Some(ip) = pod.ip else { return };
        let prefix = Prefix::host(ip);
        // another pod may hold the address by now (a reused IP): only its own entry goes
        let ours = self.owners.get(&prefix) == Some(key);
        if let Some(id) = self.wanted_ipcache.get(&prefix).and_then(|k| self.identities.get_mut(k)) {
            if ours {
                for p in &pod.ports {
                    if let Some(n) = id.ports.get_mut(p) {
                        *n -= 1;
                        if *n == 0 {
                            id.ports.remove(p);
                            self.rules_dirty = true;
                        }
                    }
                }
            }
        }
        if ours {
            self.owners.remove(&prefix);
            self.unset_address(prefix);
            // a policy CIDR that is this very address holds it again
            if self.prefixes.contains(&prefix) {
                self.set_address(prefix, Kind::Cidr);
            }
        }
    }

    /// Points `prefix` at the identity of `kind` with the CIDRs around it.
    fn set_address(&mut self, prefix: Prefix, kind: Kind) -> IdKey {
        let key = IdKey { kind, cidrs: self.cidrs_holding(&prefix) };
        if self.wanted_ipcache.get(&prefix) == Some(&key) {
            return key;
        }
        self.unset_address(prefix);
        self.changed.insert(prefix);
        let next = &mut self.next_id;
        let id = self.identities.entry(key.clone()).or_insert_with(|| {
            let id = *next;
            *next += 1;
            Identity { id, refs: 0, ports: BTreeMap::new() }
        });
        if id.refs == 0 {
            // a new identity: rules that select it must list it
            self.rules_dirty = true;
        }
        id.refs += 1;
        self.wanted_ipcache.insert(prefix, key.clone());
        key
    }

    fn unset_address(&mut self, prefix: Prefix) {
        let Some(key) = self.wanted_ipcache.remove(&prefix) else { return };
        self.changed.insert(prefix);
        if let Some(id) = self.identities.get_mut(&key) {
            id.refs -= 1;
            if id.refs == 0 {
                self.identities.remove(&key);
                self.rules_dirty = true;
            }
        }
    }

    /// Every identity again (the policy CIDRs changed).
    fn recompute_identities(&mut self) {
        let pods: Vec<((String, String), PodInfo)> = self.pods.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (k, p) in &pods {
            self.pod_gone(k, p);
        }
        for a in self.host.clone() {
            self.unset_address(Prefix::host(a));
        }
        for p in self.wanted_ipcache.keys().copied().collect::<Vec<_>>() {
            self.unset_address(p);
        }
        for (k, p) in &pods {
            self.pod_added(p, k);
        }
        for a in self.host.clone() {
            self.set_address(Prefix::host(a), Kind::Host);
        }
        for p in self.prefixes.clone() {
            if !self.wanted_ipcache.contains_key(&p) {
                self.set_address(p, Kind::Cidr);
            }
        }
        self.ids_dirty = false;
        self.rules_dirty = true;
    }

    /// The policies that select a pod, by namespace and labels.
    fn selecting<'a>(&'a self, ns: &'a str, labels: &'a Labels) -> impl Iterator<Item = &'a NetPol> + 'a {
        self.policies.iter().filter(move |((pns, _), p)| pns == ns && selects(&p.selector, labels)).map(|(_, p)| p)
    }

    /// Identities a peer selects, for a policy in namespace `ns`.
    fn peer_ids(&self, peer: &Peer, ns: &str) -> Vec<&Identity> {
        self.identities.iter().filter(|(k, _)| match (peer, &k.kind) {
            (Peer::Pods { pods, namespaces }, Kind::Pod { ns: pns, labels }) => {
                let ns_ok = match namespaces {
                    None => pns == ns,
                    Some(sel) => self.namespaces.get(pns).is_some_and(|l| selects(sel, l)),
                };
                ns_ok && pods.as_ref().is_none_or(|s| selects(s, labels))
            }
            (Peer::Pods { .. }, _) => false,
            (Peer::Block { cidr, except }, _) => k.cidrs.contains(cidr) && !except.iter().any(|e| k.cidrs.contains(e)),
        }).map(|(_, v)| v).collect()
    }

    /// The local pods' endpoints and the rules they follow.
    fn compute(&mut self) -> (HashMap<Ipv4Addr, EndpointValue>, BTreeSet<RuleKey>) {
        let mut endpoints = HashMap::new();
        let mut rules = BTreeSet::new();
        let mut done: BTreeSet<u32> = BTreeSet::new();
        let locals: Vec<(String, PodInfo)> = self.local.iter().filter_map(|k| Some((k.0.clone(), self.pods.get(k).filter(|p| p.ip.is_some())?.clone()))).collect();
        for (ns, pod) in locals {
            let mut flags = 0;
            for p in self.selecting(&ns, &pod.labels) {
                flags |= if p.ingress.is_some() { abi::EP_F_INGRESS } else { 0 } | if p.egress.is_some() { abi::EP_F_EGRESS } else { 0 };
            }
            if flags == 0 {
                continue;
            }
            let skey: SubjectKey = (ns.clone(), pod.labels.clone(), pod.ports.clone());
            let next = &mut self.next_subject;
            let subject = *self.subjects.entry(skey).or_insert_with(|| {
                *next += 1;
                *next - 1
            });
            endpoints.insert(pod.ip.expect("filtered above"), EndpointValue { subject, flags });
            if !done.insert(subject) {
                continue;
            }
            for p in self.selecting(&ns, &pod.labels) {
                for (dir, list) in [(abi::POL_INGRESS, &p.ingress), (abi::POL_EGRESS, &p.egress)] {
                    for rule in list.iter().flatten() {
                        self.rule_entries(subject, dir, rule, &ns, &pod, &mut rules);
                    }
                }
            }
        }
        (endpoints, rules)
    }

    fn rule_entries(&self, subject: u32, dir: u8, rule: &Rule, ns: &str, pod: &PodInfo, out: &mut BTreeSet<RuleKey>) {
        if rule.nothing {
            return;
        }
        // (peer identity, named ports it has): ID_ANY for a rule without peers
        let peers: Vec<(u32, Option<&BTreeMap<(String, u8, u16), usize>>)> = if rule.peers.is_empty() {
            vec![(abi::ID_ANY, None)]
        } else {
            let mut v: Vec<(u32, Option<&BTreeMap<(String, u8, u16), usize>>)> = rule.peers.iter().flat_map(|p| self.peer_ids(p, ns)).map(|i| (i.id, Some(&i.ports))).collect();
            v.sort_by_key(|(id, _)| *id);
            v.dedup_by_key(|(id, _)| *id);
            v
        };
        let key = |peer: u32, proto: u8, port: u16| PolicyData { subject, peer, dir, proto, port: port.to_be() };
        for (peer, peer_ports) in peers {
            if rule.ports.is_empty() {
                out.insert((abi::POLICY_EXACT, key(peer, 0, 0)));
                continue;
            }
            for (proto, port) in &rule.ports {
                match port {
                    Port::Any => {
                        out.insert((abi::POLICY_PROTO, key(peer, *proto, 0)));
                    }
                    Port::Range(a, b) => {
                        for (start, len) in port_prefixes(*a, *b) {
                            out.insert((abi::POLICY_PROTO + u32::from(len), key(peer, *proto, start)));
                        }
                    }
                    Port::Named(name) => {
                        // ingress: the pod's own port of that name; egress: the peer's
                        // (every port of that name among the peer identity's pods; with no
                        // peers, among all pods)
                        let found: Vec<u16> = if dir == abi::POL_INGRESS {
                            pod.ports.iter().filter(|(n, p, _)| n == name && p == proto).map(|(_, _, port)| *port).collect()
                        } else {
                            match peer_ports {
                                Some(ports) => ports.keys().filter(|(n, p, _)| n == name && p == proto).map(|(_, _, port)| *port).collect(),
                                None => self.identities.values().flat_map(|i| i.ports.keys()).filter(|(n, p, _)| n == name && p == proto).map(|(_, _, port)| *port).collect(),
                            }
                        };
                        for port in found {
                            out.insert((abi::POLICY_FULL, key(peer, *proto, port)));
                        }
                    }
                }
            }
        }
    }

    /// nftables mode: the whole `table ip TABLE` that enforces the policies of this node's
    /// pods, recreated in one transaction (`nft -f -`). In the forward hook (bridged pod
    /// traffic passes it: br_netfilter is built in), after conntrack's established and
    /// related packets: a packet to an isolated pod jumps to its subject's ingress chain,
    /// one from an isolated pod to its egress chain; an allowing rule returns, the chain
    /// ends in a drop. The rules are the same as the programs' (selectors resolved to the
    /// pods' addresses, ipBlocks with their excepts inline); the node's own addresses
    /// always enter. Work is a full rewrite of this table per change: this is the fallback.
    pub fn nft_script(&mut self, table: &str) -> String {
        use std::fmt::Write;
        if self.ids_dirty {
            self.recompute_identities();
        }
        let mut by_key: HashMap<&IdKey, Vec<Ipv4Addr>> = HashMap::new();
        for (p, k) in &self.wanted_ipcache {
            if p.1 == 32 && matches!(k.kind, Kind::Pod { .. }) {
                by_key.entry(k).or_default().push(p.addr());
            }
        }
        // local isolated pods grouped by subject
        let mut groups: BTreeMap<SubjectKey, (u32, Vec<Ipv4Addr>)> = BTreeMap::new();
        for k in &self.local {
            let Some(pod) = self.pods.get(k) else { continue };
            let Some(ip) = pod.ip else { continue };
            let mut flags = 0;
            for p in self.selecting(&k.0, &pod.labels) {
                flags |= if p.ingress.is_some() { abi::EP_F_INGRESS } else { 0 } | if p.egress.is_some() { abi::EP_F_EGRESS } else { 0 };
            }
            if flags != 0 {
                let g = groups.entry((k.0.clone(), pod.labels.clone(), pod.ports.clone())).or_insert((flags, vec![]));
                g.1.push(ip);
            }
        }
        let set = |addrs: &mut Vec<String>| {
            addrs.sort();
            addrs.dedup();
            format!("{{ {} }}", addrs.join(", "))
        };
        let mut out = format!("table ip {table}\ndelete table ip {table}\n");
        if groups.is_empty() {
            return out;
        }
        let mut chains = String::new();
        let mut forward = String::from("    chain forward {\n        type filter hook forward priority filter; policy accept;\n        ct state established,related accept\n");
        let host: Vec<String> = self.host.iter().map(ToString::to_string).collect();
        for (i, ((ns, labels, ports), (flags, ips))) in groups.iter().enumerate() {
            let mut pod_set: Vec<String> = ips.iter().map(ToString::to_string).collect();
            let pod_set = set(&mut pod_set);
            for (dir, flag, name, peer_field, own_field) in [(abi::POL_INGRESS, abi::EP_F_INGRESS, "ingress", "saddr", "daddr"), (abi::POL_EGRESS, abi::EP_F_EGRESS, "egress", "daddr", "saddr")] {
                if flags & flag == 0 {
                    continue;
                }
                let chain = format!("{name}-{i}");
                let _ = writeln!(forward, "        ip {own_field} {pod_set} jump {chain}");
                let _ = writeln!(chains, "    chain {chain} {{");
                for ip in ips {
                    // a pod reaching itself (hairpin through a service)
                    let _ = writeln!(chains, "        ip saddr {ip} ip daddr {ip} return");
                }
                if dir == abi::POL_INGRESS && !host.is_empty() {
                    let _ = writeln!(chains, "        ip saddr {} return", set(&mut host.clone()));
                }
                let pod = PodInfo { ip: None, node: String::new(), labels: labels.clone(), ports: ports.clone() };
                for p in self.selecting(ns, labels) {
                    let rules = if dir == abi::POL_INGRESS { &p.ingress } else { &p.egress };
                    for rule in rules.iter().flatten().filter(|r| !r.nothing) {
                        // (peer match, the pods' named ports behind it)
                        let mut peers: Vec<(String, Vec<(String, u8, u16)>)> = Vec::new();
                        if rule.peers.is_empty() {
                            let all: Vec<(String, u8, u16)> = self.identities.values().flat_map(|i| i.ports.keys().cloned()).collect();
                            peers.push((String::new(), all));
                        }
                        for peer in &rule.peers {
                            match peer {
                                Peer::Block { cidr, except } => {
                                    let mut m = format!("ip {peer_field} {cidr}");
                                    if !except.is_empty() {
                                        let _ = write!(m, " ip {peer_field} != {}", set(&mut except.iter().map(ToString::to_string).collect()));
                                    }
                                    peers.push((m, vec![]));
                                }
                                Peer::Pods { .. } => {
                                    let matched: BTreeSet<u32> = self.peer_ids(peer, ns).iter().map(|x| x.id).collect();
                                    let ids: Vec<&IdKey> = self.identities.iter().filter(|(_, v)| matched.contains(&v.id)).map(|(k, _)| k).collect();
                                    let mut addrs: Vec<String> = ids.iter().flat_map(|k| by_key.get(k).into_iter().flatten()).map(ToString::to_string).collect();
                                    if addrs.is_empty() {
                                        continue;
                                    }
                                    let named: Vec<(String, u8, u16)> = ids.iter().filter_map(|k| self.identities.get(*k)).flat_map(|i| i.ports.keys().cloned()).collect();
                                    peers.push((format!("ip {peer_field} {}", set(&mut addrs)), named));
                                }
                            }
                        }
                        for (m, named) in &peers {
                            let mut port_matches: Vec<String> = Vec::new();
                            if rule.ports.is_empty() {
                                port_matches.push(String::new());
                            }
                            for (proto, port) in &rule.ports {
                                let pname = match proto {
                                    6 => "tcp",
                                    17 => "udp",
                                    _ => "sctp",
                                };
                                match port {
                                    Port::Any => port_matches.push(format!("meta l4proto {pname}")),
                                    Port::Range(a, b) if a == b => port_matches.push(format!("meta l4proto {pname} th dport {a}")),
                                    Port::Range(a, b) => port_matches.push(format!("meta l4proto {pname} th dport {a}-{b}")),
                                    Port::Named(n) => {
                                        let source: Vec<(String, u8, u16)> = if dir == abi::POL_INGRESS { pod.ports.iter().cloned().collect() } else { named.clone() };
                                        let mut found: Vec<String> = source.iter().filter(|(sn, sp, _)| sn == n && sp == proto).map(|(_, _, port)| port.to_string()).collect();
                                        if !found.is_empty() {
                                            port_matches.push(format!("meta l4proto {pname} th dport {}", set(&mut found)));
                                        }
                                    }
                                }
                            }
                            for pm in port_matches {
                                let line = [m.as_str(), pm.as_str(), "return"].iter().filter(|x| !x.is_empty()).copied().collect::<Vec<_>>().join(" ");
                                let _ = writeln!(chains, "        {line}");
                            }
                        }
                    }
                }
                let _ = writeln!(chains, "        counter drop\n    }}");
            }
        }
        forward.push_str("    }\n");
        let _ = write!(out, "table ip {table} {{\n{forward}{chains}}}\n");
        out
    }

    /// Brings the maps in step; work only for what changed.
    pub fn sync<M: Maps>(&mut self, maps: &mut M) -> Synced {
        if self.ids_dirty {
            self.recompute_identities();
        }
        let mut out = Synced::default();
        let note = |r: Result<(), M::Error>, out: &mut Synced| match r {
            Ok(()) => out.writes += 1,
            Err(e) => out.errors.push(e.to_string()),
        };
        let (endpoints, rules) = if self.rules_dirty {
            self.rules_dirty = false;
            self.compute()
        } else {
            (self.endpoints.clone(), self.rules.clone())
        };
        // without an isolated local pod the programs never look further: the ipcache
        // stays empty (all of it is written when one appears, only changes after that)
        let was_active = self.active;
        self.active = !endpoints.is_empty();
        let changed = std::mem::take(&mut self.changed);
        let value = |p: &Prefix| -> Option<IpcacheValue> {
            let k = self.wanted_ipcache.get(p)?;
            let id = self.identities.get(k)?;
            Some(IpcacheValue { identity: id.id, flags: if k.kind == Kind::Host { abi::IPC_F_HOST } else { 0 } })
        };
        let consider: Vec<Prefix> = match (was_active, self.active) {
            (false, false) => vec![],
            (true, true) => changed.into_iter().collect(),
            _ => self.wanted_ipcache.keys().chain(self.ipcache.keys()).copied().collect::<BTreeSet<_>>().into_iter().collect(),
        };
        let mut ipcache_puts = Vec::new();
        let mut ipcache_dels = Vec::new();
        for p in consider {
            let want = if self.active { value(&p) } else { None };
            match want {
                Some(v) if self.ipcache.get(&p) != Some(&v) => ipcache_puts.push((p, v)),
                None if self.ipcache.contains_key(&p) => ipcache_dels.push(p),
                _ => {}
            }
        }
        // allow before deny: new rules and identities first, stale ones last, so that a
        // flow is never refused in between by a half-written change
        // what the maps hold is updated write by write: a failed write is retried by the
        // next sync (everything is recomputed and diffed again)
        let mut failed = false;
        for r in rules.difference(&self.rules).copied().collect::<Vec<_>>() {
            let w = maps.put_rule(r.0, r.1);
            failed |= w.is_err();
            if w.is_ok() {
                self.rules.insert(r);
            }
            note(w, &mut out);
        }
        for (p, v) in &ipcache_puts {
            let w = maps.put_ipcache(*p, *v);
            if w.is_ok() {
                self.ipcache.insert(*p, *v);
            } else {
                failed = true;
                self.changed.insert(*p);
            }
            note(w, &mut out);
        }
        for (a, v) in &endpoints {
            if self.endpoints.get(a) != Some(v) {
                let w = maps.put_endpoint(*a, *v);
                failed |= w.is_err();
                if w.is_ok() {
                    self.endpoints.insert(*a, *v);
                }
                note(w, &mut out);
            }
        }
        for a in self.endpoints.keys().filter(|a| !endpoints.contains_key(a)).copied().collect::<Vec<_>>() {
            let w = maps.del_endpoint(a);
            failed |= w.is_err();
            if w.is_ok() {
                self.endpoints.remove(&a);
            }
            note(w, &mut out);
        }
        for p in &ipcache_dels {
            let w = maps.del_ipcache(*p);
            if w.is_ok() {
                self.ipcache.remove(p);
            } else {
                failed = true;
                self.changed.insert(*p);
            }
            note(w, &mut out);
        }
        for r in self.rules.difference(&rules).copied().collect::<Vec<_>>() {
            let w = maps.del_rule(r.0, r.1);
            failed |= w.is_err();
            if w.is_ok() {
                self.rules.remove(&r);
            }
            note(w, &mut out);
        }
        if failed {
            self.rules_dirty = true;
        }
        self.pending = failed;
        out
    }

    /// Whether the last sync left writes undone (the proxy retries on its timer).
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Makes the state believe the maps hold these entries (read back after a restart),
    /// so that the first sync removes what is stale and writes only what differs.
    pub fn adopt(&mut self, ipcache: Vec<(Prefix, IpcacheValue)>, endpoints: Vec<(Ipv4Addr, EndpointValue)>, rules: Vec<RuleKey>) {
        self.ipcache = ipcache.into_iter().collect();
        self.changed.extend(self.ipcache.keys().copied());
        // numbers of the earlier run are not reused: an old rule never meets a new identity
        self.next_id = self.next_id.max(self.ipcache.values().map(|v| v.identity + 1).max().unwrap_or(0));
        self.next_subject = self.next_subject.max(endpoints.iter().map(|(_, e)| e.subject + 1).max().unwrap_or(0));
        self.endpoints = endpoints.into_iter().collect();
        self.rules = rules.into_iter().collect();
        self.next_subject = self.next_subject.max(self.rules.iter().map(|(_, k)| k.subject + 1).max().unwrap_or(0));
        self.active = !self.endpoints.is_empty();
        self.rules_dirty = true;
    }

    /// Whether any NetworkPolicy is held.
    pub fn has_policies(&self) -> bool {
        !self.policies.is_empty()
    }

    /// Counts for metrics: (ipcache entries, isolated local pods, rules).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.ipcache.len(), self.endpoints.len(), self.rules.len())
    }
}

/// The fewest (start, prefix length in bits) blocks that cover ports a..=b.
pub fn port_prefixes(a: u16, b: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut start, end) = (u32::from(a), u32::from(b));
    while start <= end {
        // the largest aligned block at `start` that stays within `end`
        let mut size = if start == 0 { 1 << 16 } else { 1u32 << start.trailing_zeros().min(16) };
        while start + size - 1 > end {
            size >>= 1;
        }
        out.push((start as u16, (16 - size.trailing_zeros()) as u8));
        start += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Default)]
    struct Rec {
        ipcache: HashMap<Prefix, IpcacheValue>,
        endpoints: HashMap<Ipv4Addr, EndpointValue>,
        rules: BTreeSet<RuleKey>,
    }

    impl Maps for Rec {
        type Error = String;
        fn put_ipcache(&mut self, p: Prefix, v: IpcacheValue) -> Result<(), String> {
            self.ipcache.insert(p, v);
            Ok(())
        }
        fn del_ipcache(&mut self, p: Prefix) -> Result<(), String> {
            self.ipcache.remove(&p).map(|_| ()).ok_or(format!("no {p}"))
        }
        fn put_endpoint(&mut self, a: Ipv4Addr, v: EndpointValue) -> Result<(), String> {
            self.endpoints.insert(a, v);
            Ok(())
        }
        fn del_endpoint(&mut self, a: Ipv4Addr) -> Result<(), String> {
            self.endpoints.remove(&a).map(|_| ()).ok_or(format!("no {a}"))
        }
        fn put_rule(&mut self, l: u32, k: PolicyData) -> Result<(), String> {
            self.rules.insert((l, k));
            Ok(())
        }
        fn del_rule(&mut self, l: u32, k: PolicyData) -> Result<(), String> {
            self.rules.remove(&(l, k)).then_some(()).ok_or("no rule".into())
        }
    }

    impl Rec {
        /// What the programs would decide (lib/policy.h, without conntrack).
        fn allows(&self, dir: u8, local: &str, peer: &str, proto: u8, port: u16) -> bool {
            let local: Ipv4Addr = local.parse().unwrap();
            let peer: Ipv4Addr = peer.parse().unwrap();
            let Some(ep) = self.endpoints.get(&local) else { return true };
            let isolated = if dir == abi::POL_INGRESS { abi::EP_F_INGRESS } else { abi::EP_F_EGRESS };
            if ep.flags & isolated == 0 {
                return true;
            }
            let hit = self.ipcache.iter().filter(|(p, _)| p.contains(&Prefix::host(peer))).max_by_key(|(p, _)| p.1).map(|(_, v)| *v);
            if dir == abi::POL_INGRESS && hit.is_some_and(|v| v.flags & abi::IPC_F_HOST != 0) {
                return true;
            }
            let id = hit.map_or(abi::ID_WORLD, |v| v.identity);
            let key = |peer| PolicyData { subject: ep.subject, peer, dir, proto, port: port.to_be() };
            let bits = |k: &PolicyData| -> u128 { (u128::from(k.subject.to_be()) << 64) | (u128::from(k.peer.to_be()) << 32) | (u128::from(k.dir) << 24) | (u128::from(k.proto) << 16) | u128::from(u16::from_be(k.port)) };
            [id, abi::ID_ANY].iter().any(|peer| {
                let want = bits(&key(*peer));
                self.rules.iter().any(|(len, k)| {
                    let shift = 96 - len;
                    (bits(k) >> shift) == (want >> shift)
                })
            })
        }
    }

    fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]}, "status": {"podIP": ip}})
    }

    fn setup() -> Policies {
        let mut p = Policies::new("n1");
        p.set_host(["192.168.0.1".parse().unwrap(), "10.0.1.1".parse().unwrap()]);
        p.hold("Namespace", "", "default", Some(&json!({"metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}})));
        p.hold("Namespace", "", "other", Some(&json!({"metadata": {"name": "other", "labels": {"team": "b"}}})));
        p.hold("Pod", "default", "web-1", Some(&pod("default", "web-1", "n1", "10.0.1.2", json!({"app": "web"}))));
        p.hold("Pod", "default", "web-2", Some(&pod("default", "web-2", "n2", "10.0.2.2", json!({"app": "web"}))));
        p.hold("Pod", "default", "client", Some(&pod("default", "client", "n2", "10.0.2.3", json!({"role": "client"}))));
        p.hold("Pod", "other", "spy", Some(&pod("other", "spy", "n1", "10.0.1.4", json!({"role": "client"}))));
        p
    }

    #[test]
    fn no_policy_keeps_the_maps_empty_and_everything_flows() {
        let mut p = setup();
        let mut m = Rec::default();
        p.sync(&mut m);
        assert!(m.ipcache.is_empty() && m.endpoints.is_empty() && m.rules.is_empty());
        assert!(m.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.2.3", 6, 80));
    }

    #[test]
    fn ingress_by_pod_and_namespace_selector_and_port() {
        let mut p = setup();
        let mut m = Rec::default();
        p.hold("NetworkPolicy", "default", "web", Some(&json!({"spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"protocol": "TCP", "port": "http"}, {"protocol": "UDP", "port": 53}]}]}})));
        let s = p.sync(&mut m);
        assert!(s.errors.is_empty());
        // the selected local pod is isolated; the other local pod is not
        assert_eq!(m.endpoints.get(&"10.0.1.2".parse().unwrap()).map(|e| e.flags), Some(abi::EP_F_INGRESS));
        assert!(!m.endpoints.contains_key(&"10.0.1.4".parse().unwrap()));
        assert!(m.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.2.3", 6, 8080), "client on the named port");
        assert!(m.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.2.3", 17, 53));
        assert!(!m.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.2.3", 6, 80), "another port");
        assert!(!m.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.1.4", 6, 8080), "a client in another namespace");
        assert!(!m.allows(abi::POL_INGRESS, "10.0.1.2", "8.8.8.8", 6, 8080), "the world");
        assert!(m.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.1.1", 6, 9999), "the node (probes)");
        assert!(m.allows(abi::POL_EGRESS, "10.0.1.2", "8.8.8.8", 6, 1), "egress is not isolated");
        // the other namespace by its labels
        p.hold("NetworkPolicy", "default", "web2", Some(&json!({"spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}})));
        p.sync(&mut m);
        assert!(m.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.1.4", 6, 1234));
        // the namespace loses its label: the rule no longer selects it
        p.hold("Namespace", "", "other", Some(&json!({"metadata": {"name": "other"}})));
        p.sync(&mut m);
        assert!(!m.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.1.4", 6, 1234));
        // a new client pod with known labels: one ipcache write, no rule change
        let rules = m.rules.clone();
        p.hold("Pod", "default", "client-2", Some(&pod("default", "client-2", "n3", "10.0.3.9", json!({"role": "client"}))));
        let s = p.sync(&mut m);
        assert_eq!(s.writes, 1);
        assert_eq!(m.rules, rules);
        assert!(m.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.3.9", 6, 8080));
        // the policies go: the pod is open and the maps are empty again
        p.hold("NetworkPolicy", "default", "web", None);
        p.hold("NetworkPolicy", "default", "web2", None);
        p.sync(&mut m);
        assert!(m.ipcache.is_empty() && m.endpoints.is_empty() && m.rules.is_empty(), "{:?}", m.endpoints);
    }

    #[test]
    fn egress_ip_blocks_with_except_and_port_ranges() {
        let mut p = setup();
        let mut m = Rec::default();
        p.hold("NetworkPolicy", "default", "out", Some(&json!({"spec": {"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.2.0/24"]}}], "ports": [{"port": 8000, "endPort": 8100}]},
                       {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "UDP", "port": 53}]}]}})));
        p.sync(&mut m);
        assert!(m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.3.9", 6, 8050), "inside the block, in the range");
        assert!(m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.1.4", 6, 8000), "a pod inside the block");
        assert!(!m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.3.9", 6, 8101), "past the range");
        assert!(!m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.2.3", 6, 8050), "a pod in the except");
        assert!(!m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.2.77", 6, 8050), "an address in the except");
        assert!(m.allows(abi::POL_EGRESS, "10.0.1.2", "1.1.1.1", 17, 53));
        assert!(!m.allows(abi::POL_EGRESS, "10.0.1.2", "1.1.1.1", 6, 53));
        assert!(m.allows(abi::POL_INGRESS, "10.0.1.2", "1.1.1.1", 6, 53), "ingress is not isolated");
    }

    #[test]
    fn a_rule_whose_peers_cannot_match_here_allows_nothing() {
        // an IPv6-only ipBlock must not turn into "every peer"
        let mut p = setup();
        let mut m = Rec::default();
        p.hold("NetworkPolicy", "default", "v6", Some(&json!({"spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "2001:db8::/32"}}]}]}})));
        p.sync(&mut m);
        assert!(!m.allows(abi::POL_EGRESS, "10.0.1.2", "8.8.8.8", 6, 443));
        assert!(!m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.2.3", 6, 80));
        assert!(!p.nft_script("pol").lines().any(|l| l.trim() == "return"));
    }

    #[test]
    fn a_failed_write_is_retried_by_the_next_sync() {
        struct Flaky(Rec, bool);
        impl Maps for Flaky {
            type Error = String;
            fn put_ipcache(&mut self, p: Prefix, v: IpcacheValue) -> Result<(), String> {
                self.0.put_ipcache(p, v)
            }
            fn del_ipcache(&mut self, p: Prefix) -> Result<(), String> {
                self.0.del_ipcache(p)
            }
            fn put_endpoint(&mut self, a: Ipv4Addr, v: EndpointValue) -> Result<(), String> {
                if self.1 {
                    return Err("full".into());
                }
                self.0.put_endpoint(a, v)
            }
            fn del_endpoint(&mut self, a: Ipv4Addr) -> Result<(), String> {
                self.0.del_endpoint(a)
            }
            fn put_rule(&mut self, l: u32, k: PolicyData) -> Result<(), String> {
                if self.1 {
                    return Err("full".into());
                }
                self.0.put_rule(l, k)
            }
            fn del_rule(&mut self, l: u32, k: PolicyData) -> Result<(), String> {
                self.0.del_rule(l, k)
            }
        }
        let mut p = setup();
        let mut m = Flaky(Rec::default(), true);
        p.hold("NetworkPolicy", "default", "web", Some(&json!({"spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}})));
        let s = p.sync(&mut m);
        assert!(!s.errors.is_empty() && p.pending());
        m.1 = false;
        let s = p.sync(&mut m);
        assert!(s.errors.is_empty() && !p.pending(), "{s:?}");
        assert!(m.0.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.2.3", 6, 80));
        assert!(!m.0.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.1.4", 6, 80));
    }

    #[test]
    fn a_policy_cidr_that_is_a_pods_address_outlives_the_pod() {
        let mut p = setup();
        let mut m = Rec::default();
        p.hold("NetworkPolicy", "default", "out", Some(&json!({"spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.0.9.9/32"}}]}]}})));
        p.sync(&mut m);
        assert!(m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.9.9", 6, 80));
        p.hold("Pod", "default", "p99", Some(&pod("default", "p99", "n2", "10.0.9.9", json!({"x": "y"}))));
        p.sync(&mut m);
        assert!(m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.9.9", 6, 80), "the pod's identity names the CIDR");
        p.hold("Pod", "default", "p99", None);
        p.sync(&mut m);
        assert!(m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.9.9", 6, 80), "the CIDR entry is back");
        assert!(!m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.9.8", 6, 80));
    }

    #[test]
    fn an_empty_rule_allows_everything_and_no_rule_denies_everything() {
        let mut p = setup();
        let mut m = Rec::default();
        p.hold("NetworkPolicy", "default", "deny", Some(&json!({"spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}})));
        p.sync(&mut m);
        assert!(!m.allows(abi::POL_INGRESS, "10.0.1.2", "10.0.2.3", 6, 80));
        assert!(!m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.2.3", 6, 80));
        p.hold("NetworkPolicy", "default", "allow-in", Some(&json!({"spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}})));
        p.sync(&mut m);
        assert!(m.allows(abi::POL_INGRESS, "10.0.1.2", "8.8.8.8", 1, 0));
        assert!(!m.allows(abi::POL_EGRESS, "10.0.1.2", "10.0.2.3", 6, 80));
    }

    #[test]
    fn nftables_renders_the_same_rules() {
        let mut p = setup();
        assert_eq!(p.nft_script("pol"), "table ip pol\ndelete table ip pol\n");
        p.hold("NetworkPolicy", "default", "web", Some(&json!({"spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"protocol": "TCP", "port": "http"}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.2.0/24"]}}], "ports": [{"protocol": "UDP", "port": 53, "endPort": 54}]}, {}]}})));
        p.sync(&mut Rec::default());
        let s = p.nft_script("pol");
        for want in [
            "ip daddr { 10.0.1.2 } jump ingress-0",
            "ip saddr { 10.0.1.2 } jump egress-0",
            "ip saddr { 10.0.1.1, 192.168.0.1 } return",
            "ip saddr { 10.0.2.3 } meta l4proto tcp th dport { 8080 } return",
            "ip daddr 10.0.0.0/8 ip daddr != { 10.0.2.0/24 } meta l4proto udp th dport 53-54 return",
            "ip saddr 10.0.1.2 ip daddr 10.0.1.2 return",
            "counter drop",
        ] {
            assert!(s.contains(want), "{want} missing from:\n{s}");
        }
        // the empty egress rule allows everything
        assert!(s.lines().any(|l| l.trim() == "return"), "{s}");
        // the other local pod (10.0.1.4, another namespace) is not isolated
        assert!(!s.contains("10.0.1.4"), "{s}");
    }

    #[test]
    fn port_ranges_become_few_prefixes() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(8000, 8007), vec![(8000, 13)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        let p = port_prefixes(1000, 2000);
        let covered: u32 = p.iter().map(|(_, l)| 1u32 << (16 - l)).sum();
        assert_eq!(covered, 1001);
        assert!(p.len() <= 30);
    }
}
