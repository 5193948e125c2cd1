//! The service proxy of one node: Services and EndpointSlices in, map writes out.
//!
//! `ports_of` turns one Service and its EndpointSlices into service ports (the pure part,
//! tested on upstream-shaped objects). `Proxy` holds the objects the agent was sent and,
//! on each change, re-derives only the ports of the services that change touched, which
//! `Table::sync` turns into only the map writes that differ. It runs on a thread of its own
//! (map writes are system calls); `ProxyHandle` is how the agent talks to it.
use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::abi::{Proto, SVC_F_EXTERNAL, SVC_F_NODEPORT};
use crate::loader::{Dataplane, Error};
use crate::nft::Nft;
use crate::policy::Policies;
use crate::table::{Endpoint, Frontend, ServicePort, Table};

/// Which node the proxy runs on: `Local` traffic policies keep to its endpoints, NodePorts
/// answer on its addresses.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
}

/// A Service or EndpointSlice as the agent protocol carries it; empty `json`: deleted.
#[derive(Clone, Debug)]
pub struct Object {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub json: Vec<u8>,
}

fn u16_at(v: &Value, ptr: &str) -> Option<u16> {
    v.pointer(ptr).and_then(Value::as_u64).and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0)
}

fn ipv4s<'a>(items: impl Iterator<Item = &'a Value>) -> Vec<Ipv4Addr> {
    items.filter_map(Value::as_str).filter_map(|s| s.parse().ok()).collect()
}

/// The service ports of `svc` (named `ns/name:port/PROTO`, and `.../external` when the
/// external frontends keep to local endpoints and the cluster ones do not, or the other way
/// round) with their endpoints from `slices`.
pub fn ports_of(svc: &Value, slices: &[&Value], node: &NodeView) -> Vec<(String, ServicePort)> {
    let spec = &svc["spec"];
    if spec["type"] == "ExternalName" {
        return vec![];
    }
    let ns = svc.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    let name = svc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    let mut cluster_ips = ipv4s(spec["clusterIPs"].as_array().into_iter().flatten());
    if cluster_ips.is_empty() {
        cluster_ips = ipv4s(std::iter::once(&spec["clusterIP"]));
    }
    let external_ips: Vec<Ipv4Addr> = ipv4s(spec["externalIPs"].as_array().into_iter().flatten()).into_iter().chain(ipv4s(svc.pointer("/status/loadBalancer/ingress").and_then(Value::as_array).into_iter().flatten().map(|i| &i["ip"]))).collect();
    let node_ports = matches!(spec["type"].as_str(), Some("NodePort") | Some("LoadBalancer"));
    let affinity = if spec["sessionAffinity"] == "ClientIP" { spec.pointer("/sessionAffinityConfig/clientIP/timeoutSeconds").and_then(Value::as_u64).unwrap_or(10800) as u32 } else { 0 };
    let internal_local = spec["internalTrafficPolicy"] == "Local";
    // as Cilium's service.cilium.io/lb-algorithm
    let maglev = svc.pointer("/metadata/annotations/service.shoal.io~1lb-algorithm").and_then(Value::as_str) == Some("maglev");
    let external_local = spec["externalTrafficPolicy"] == "Local";
    let mut out = Vec::new();
    for p in spec["ports"].as_array().into_iter().flatten() {
        let Some(port) = u16_at(p, "/port") else { continue };
        let Some(proto) = Proto::parse(p["protocol"].as_str().unwrap_or("TCP")) else { continue };
        let port_name = p["name"].as_str().unwrap_or("");
        let mut endpoints: Vec<(Endpoint, bool)> = Vec::new();
        for slice in slices {
            if slice["addressType"].as_str().is_some_and(|t| t != "IPv4") {
                continue;
            }
            let Some(target) = slice["ports"].as_array().into_iter().flatten().find(|sp| sp["name"].as_str().unwrap_or("") == port_name && sp["protocol"].as_str().unwrap_or("TCP") == proto.name()).and_then(|sp| u16_at(sp, "/port")) else { continue };
            for ep in slice["endpoints"].as_array().into_iter().flatten() {
                let c = &ep["conditions"];
                let ready = c["ready"].as_bool().unwrap_or(true);
                let serving = c["serving"].as_bool().unwrap_or(ready);
                let terminating = c["terminating"].as_bool().unwrap_or(false);
                let local = ep["nodeName"].as_str() == Some(node.name.as_str());
                for addr in ipv4s(ep["addresses"].as_array().into_iter().flatten()) {
                    endpoints.push((Endpoint { addr, port: target, ready, serving, terminating }, local));
                }
            }
        }
        let pick = |local_only: bool| endpoints.iter().filter(|(_, local)| !local_only || *local).map(|(e, _)| *e).collect::<Vec<_>>();
        let cluster: Vec<Frontend> = cluster_ips.iter().map(|a| Frontend { addr: *a, port, flags: 0 }).collect();
        let mut external: Vec<Frontend> = external_ips.iter().map(|a| Frontend { addr: *a, port, flags: SVC_F_EXTERNAL }).collect();
        if node_ports {
            if let Some(np) = u16_at(p, "/nodePort") {
                external.extend(node.addresses.iter().map(|a| Frontend { addr: *a, port: np, flags: SVC_F_NODEPORT }));
            }
        }
        let base = format!("{ns}/{name}:{port}/{}", proto.name());
        let make = |frontends: Vec<Frontend>, local_only: bool| ServicePort { proto, frontends, endpoints: pick(local_only), affinity_timeout: affinity, external_local, maglev };
        if internal_local == external_local || external.is_empty() || cluster.is_empty() {
            let local = if cluster.is_empty() { external_local } else { internal_local };
            let mut all = cluster;
            all.extend(external);
            if !all.is_empty() {
                out.push((base, make(all, local)));
            }
        } else {
            out.push((base.clone(), make(cluster, internal_local)));
            out.push((format!("{base}/external"), make(external, external_local)));
        }
    }
    out
}

/// The proxy's metrics.
#[derive(Debug)]
pub struct ProxyMetrics {
    pub sync_seconds: Histogram,
    pub map_writes: Counter,
    pub sync_errors: Counter,
    pub service_ports: Gauge,
    pub map_entries: Family<Vec<(String, String)>, Gauge>,
    pub packets: Family<Vec<(String, String)>, Gauge>,
    pub attach_errors: Counter,
    pub sockets_closed: Counter,
}

impl ProxyMetrics {
    pub fn new() -> ProxyMetrics {
        ProxyMetrics {
            sync_seconds: Histogram::new([0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            map_writes: Counter::default(),
            sync_errors: Counter::default(),
            service_ports: Gauge::default(),
            map_entries: Family::default(),
            packets: Family::default(),
            attach_errors: Counter::default(),
            sockets_closed: Counter::default(),
        }
    }

    pub fn register(&self, r: &mut Registry) {
        r.register("shoal_proxy_sync_duration_seconds", "Seconds to apply one batch of Service/EndpointSlice changes to the BPF maps", self.sync_seconds.clone());
        r.register("shoal_proxy_map_writes", "BPF map updates and deletes made by the proxy", self.map_writes.clone());
        r.register("shoal_proxy_sync_errors", "Service ports whose map writes failed (a full map among them)", self.sync_errors.clone());
        r.register("shoal_proxy_service_ports", "Service ports programmed into the BPF maps", self.service_ports.clone());
        r.register("shoal_proxy_map_entries", "Entries in each BPF map (services and backends as written; conntrack counted every 30 s)", self.map_entries.clone());
        r.register("shoal_proxy_packets", "Packets by what the service programs did with them", self.packets.clone());
        r.register("shoal_proxy_attach_errors", "Pod interfaces the service programs could not be attached to", self.attach_errors.clone());
        r.register("shoal_proxy_sockets_closed", "Pods' TCP sockets closed because the backend socket-level translation connected them to was removed", self.sockets_closed.clone());
    }
}

/// What programs the packets: the BPF maps (with the table of what they hold), or the
/// nftables fallback.
enum Engine {
    Bpf { dp: Dataplane, table: Table },
    Nft(Nft),
}

/// The agent names each pod's network namespace `shoal-<uid>` under /run/netns (only
/// sockets the programs recorded are ever closed, whatever namespace they are in).
const POD_NETNS_PREFIX: &str = "shoal-";

/// Services, EndpointSlices and the table derived from them.
pub struct Proxy {
    engine: Engine,
    node: NodeView,
    services: HashMap<String, Value>,
    /// Slice `ns/name` → (its service `ns/name`, the slice).
    slices: HashMap<String, (String, Value)>,
    slices_of: HashMap<String, BTreeSet<String>>,
    /// Service → the port names installed for it.
    installed: HashMap<String, BTreeSet<String>>,
    /// A snapshot being received.
    snapshot: Option<Vec<Object>>,
    /// The table came from pinned maps: ports no snapshot claims are removed after the first.
    restored: bool,
    metrics: Arc<ProxyMetrics>,
    /// Pods, Namespaces and NetworkPolicies, and the policy maps derived from them.
    policies: Policies,
    /// The pods' bridge, whose address is the node's to policy (probes come from it).
    bridge: String,
    /// nftables mode: the policy table last written (rewritten when it differs).
    nft_policy: Option<String>,
    /// The bridge's addresses, once it has one (it gets them with the node's first pod).
    bridge_addrs: Vec<Ipv4Addr>,
}

impl Proxy {
    /// A proxy over loaded programs, its table rebuilt from their pinned maps.
    pub fn new(mut dp: Dataplane, node: NodeView, metrics: Arc<ProxyMetrics>) -> Result<Proxy, Error> {
        let table = dp.restore_table()?;
        let (ipcache, endpoints, rules) = dp.policy_maps().read();
        let mut p = Proxy::with(Engine::Bpf { dp, table }, node, metrics);
        // the first sync after the snapshot removes what is stale, rewrites what differs
        p.policies.adopt(ipcache, endpoints, rules);
        Ok(p)
    }

    /// A proxy programming nftables (`--proxy-mode nftables`, or the fallback when the BPF
    /// programs do not load).
    pub fn nftables(nft: Nft, node: NodeView, metrics: Arc<ProxyMetrics>) -> Proxy {
        Proxy::with(Engine::Nft(nft), node, metrics)
    }

    fn with(engine: Engine, node: NodeView, metrics: Arc<ProxyMetrics>) -> Proxy {
        let policies = Policies::new(&node.name);
        Proxy { engine, node, services: HashMap::new(), slices: HashMap::new(), slices_of: HashMap::new(), installed: HashMap::new(), snapshot: None, restored: true, metrics, policies, bridge: "shoal0".into(), nft_policy: None, bridge_addrs: vec![] }
    }

    /// Service ports installed.
    pub fn ports(&self) -> usize {
        match &self.engine {
            Engine::Bpf { table, .. } => table.len(),
            Engine::Nft(nft) => nft.len(),
        }
    }

    /// Attaches the BPF programs to a pod's interface (nothing to do for nftables).
    fn attach(&mut self, ifname: &str, addr: Option<Ipv4Addr>) -> Result<(), Error> {
        match &mut self.engine {
            Engine::Bpf { dp, .. } => dp.attach_pod(ifname, addr),
            Engine::Nft(_) => Ok(()),
        }
    }

    /// Applies a message of the agent protocol's `ServiceObjects`.
    pub fn apply(&mut self, objects: Vec<Object>, reset: bool, synced: bool) {
        let start = Instant::now();
        if reset {
            self.snapshot = Some(Vec::new());
        }
        if let Some(snap) = self.snapshot.as_mut() {
            snap.extend(objects);
            if !synced {
                return;
            }
            let snap = self.snapshot.take().unwrap_or_default();
            let before: BTreeSet<String> = self.services.keys().cloned().collect();
            self.policies.reset();
            self.services.clear();
            self.slices.clear();
            self.slices_of.clear();
            for o in snap {
                self.hold(o);
            }
            let touched: BTreeSet<String> = before.into_iter().chain(self.services.keys().cloned()).chain(self.installed.keys().cloned()).collect();
            for svc in touched {
                self.resync(&svc);
            }
            if self.restored {
                self.restored = false;
                if let Engine::Bpf { dp, table } = &mut self.engine {
                let mut maps = dp.maps();
                match table.forget_orphans(&mut maps) {
                    Ok(w) => {
                    self.metrics.map_writes.inc_by(w.total() as u64);
                }
                    Err(e) => tracing::warn!(error = %e, "removing services left from before the restart"),
                }
                }
            }
        } else {
            let touched: BTreeSet<String> = objects.into_iter().filter_map(|o| self.hold(o)).collect();
            for svc in touched {
                self.resync(&svc);
            }
        }
        self.sync_policy();
        self.close_gone();
        if let Engine::Nft(nft) = &mut self.engine {
            if let Err(e) = nft.commit() {
                self.metrics.sync_errors.inc();
                tracing::error!(error = %e, "the nftables batch failed; rebuilding the table from every service");
                self.rebuild_nft();
            }
        }
        self.metrics.service_ports.set(self.ports() as i64);
        self.metrics.sync_seconds.observe(start.elapsed().as_secs_f64());
    }

    /// Records one object; returns the service it concerns.
    fn hold(&mut self, o: Object) -> Option<String> {
        let key = format!("{}/{}", o.namespace, o.name);
        let value: Option<Value> = if o.json.is_empty() { None } else { serde_json::from_slice(&o.json).ok() };
        match o.kind.as_str() {
            "Service" => {
                match value {
                    Some(v) => self.services.insert(key.clone(), v),
                    None => self.services.remove(&key),
                };
                Some(key)
            }
            "EndpointSlice" => {
                let old = self.slices.remove(&key).map(|(svc, _)| svc);
                if let Some(svc) = &old {
                    if let Some(set) = self.slices_of.get_mut(svc) {
                        set.remove(&key);
                    }
                }
                let svc = value.as_ref().and_then(|v| v.pointer("/metadata/labels/kubernetes.io~1service-name")).and_then(Value::as_str).map(|s| format!("{}/{s}", o.namespace));
                if let (Some(svc), Some(v)) = (&svc, value) {
                    self.slices_of.entry(svc.clone()).or_default().insert(key.clone());
                    self.slices.insert(key, (svc.clone(), v));
                }
                // a slice that moved between services touches both; report the new one and
                // resync the old one here
                if let (Some(old), Some(new)) = (&old, &svc) {
                    if old != new {
                        let old = old.clone();
                        self.resync(&old);
                    }
                }
                svc.or(old)
            }
            kind => {
                self.policies.hold(kind, &o.namespace, &o.name, value.as_ref());
                None
            }
        }
    }

    /// Closes pods' sockets that socket-level translation connected to a backend address
    /// no backend entry names any more (the tc path moves such flows itself).
    fn close_gone(&mut self) {
        let Engine::Bpf { dp, .. } = &mut self.engine else { return };
        let gone = dp.take_gone_backends();
        if gone.is_empty() {
            return;
        }
        let netns: Vec<std::path::PathBuf> = std::fs::read_dir("/run/netns").into_iter().flatten().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with(POD_NETNS_PREFIX)).map(|e| e.path()).collect();
        match dp.close_sockets_to(&gone, &netns) {
            Ok(0) => {}
            Ok(n) => {
                self.metrics.sockets_closed.inc_by(n as u64);
                tracing::info!(sockets = n, backends = gone.len(), "closed pods' connections to removed backends");
            }
            Err(e) => tracing::warn!(error = %e, "closing pods' connections to removed backends"),
        }
    }

    /// Brings the policy maps in step with the Pods, Namespaces and NetworkPolicies held.
    fn sync_policy(&mut self) {
        if self.bridge_addrs.is_empty() {
            self.bridge_addrs = addresses_of(&self.bridge);
        }
        let host: Vec<Ipv4Addr> = self.node.addresses.iter().chain(self.bridge_addrs.iter()).copied().collect();
        self.policies.set_host(host);
        let dp = match &mut self.engine {
            Engine::Bpf { dp, .. } => dp,
            Engine::Nft(_) => {
                let script = self.policies.nft_script(crate::nft::POLICY_TABLE);
                if self.nft_policy.as_deref() == Some(script.as_str()) {
                    return;
                }
                match crate::nft::run(&script) {
                    Ok(()) => {
                        self.metrics.map_writes.inc();
                        self.nft_policy = Some(script);
                    }
                    Err(e) => {
                        self.metrics.sync_errors.inc();
                        tracing::error!(error = %e, "writing the network policy table failed; retried on the next change");
                    }
                }
                return;
            }
        };
        let start = Instant::now();
        let s = self.policies.sync(dp.policy_maps());
        self.metrics.map_writes.inc_by(s.writes as u64);
        if !s.errors.is_empty() {
            self.metrics.sync_errors.inc_by(s.errors.len() as u64);
            tracing::error!(errors = s.errors.len(), first = %s.errors[0], "writing the network policy maps failed; retried on the next change");
        }
        if s.writes > 0 {
            tracing::debug!(writes = s.writes, micros = start.elapsed().as_micros() as u64, "network policy maps synced");
        }
    }

    /// Makes the maps hold what the service `svc` (`ns/name`) wants now.
    fn resync(&mut self, svc: &str) {
        let want: Vec<(String, ServicePort)> = match self.services.get(svc) {
            Some(s) => {
                let slices: Vec<&Value> = self.slices_of.get(svc).into_iter().flatten().filter_map(|k| self.slices.get(k).map(|(_, v)| v)).collect();
                ports_of(s, &slices, &self.node)
            }
            None => vec![],
        };
        let old = self.installed.remove(svc).unwrap_or_default();
        let mut now = BTreeSet::new();
        let (dp, table) = match &mut self.engine {
            Engine::Bpf { dp, table } => (dp, table),
            Engine::Nft(nft) => {
                for name in old.iter().filter(|n| !want.iter().any(|(w, _)| w == *n)) {
                    nft.sync(name, None);
                }
                for (name, port) in &want {
                    nft.sync(name, Some(port));
                    now.insert(name.clone());
                }
                if !now.is_empty() {
                    self.installed.insert(svc.to_string(), now);
                }
                return;
            }
        };
        let mut maps = dp.maps();
        for name in old.iter().filter(|n| !want.iter().any(|(w, _)| w == *n)) {
            match table.sync(name, None, &mut maps) {
                Ok(w) => {
                    self.metrics.map_writes.inc_by(w.total() as u64);
                }
                Err(e) => {
                    self.metrics.sync_errors.inc();
                    tracing::error!(service = svc, port = %name, error = %e, "removing a service port from the BPF maps failed");
                    now.insert(name.clone());
                }
            }
        }
        for (name, port) in &want {
            now.insert(name.clone());
            match table.sync(name, Some(port), &mut maps) {
                Ok(w) => {
                    self.metrics.map_writes.inc_by(w.total() as u64);
                }
                Err(e) => {
                    self.metrics.sync_errors.inc();
                    tracing::error!(service = svc, port = %name, error = %e, "programming a service port into the BPF maps failed; it is retried on the next change");
                }
            }
        }
        if !now.is_empty() {
            self.installed.insert(svc.to_string(), now);
        }
    }

    /// Syncs again the ports whose writes failed (a full map may have room now).
    pub fn retry_failed(&mut self) {
        if self.policies.pending() {
            self.sync_policy();
        }
        let Engine::Bpf { table, .. } = &self.engine else { return };
        let dirty = table.dirty_ports();
        if dirty.is_empty() {
            return;
        }
        let services: BTreeSet<String> = self.installed.iter().filter(|(_, ports)| ports.iter().any(|p| dirty.contains(p))).map(|(s, _)| s.clone()).collect();
        for svc in services {
            self.resync(&svc);
        }
    }

    /// After a failed nftables batch: a fresh table, every service programmed again.
    fn rebuild_nft(&mut self) {
        let Engine::Nft(nft) = &mut self.engine else { return };
        // the table's recreation and every service in one transaction: no moment without
        // services
        *nft = Nft::fresh(&nft.table_name().to_string());
        self.installed.clear();
        let all: Vec<String> = self.services.keys().cloned().collect();
        for svc in all {
            self.resync(&svc);
        }
        self.sync_policy();
        self.close_gone();
        if let Engine::Nft(nft) = &mut self.engine {
            if let Err(e) = nft.commit() {
                tracing::error!(error = %e, "programming nftables failed again; services stay unproxied until the next change");
            }
        }
    }

    /// Refreshes the map-fill and packet gauges (conntrack only when `conntrack`: it walks
    /// the whole map).
    pub fn refresh_gauges(&self, conntrack: bool) {
        let Engine::Bpf { dp, table } = &self.engine else { return };
        let fill = |m: &str| self.metrics.map_entries.get_or_create(&vec![("map".to_string(), m.to_string())]).clone();
        let (services, backends) = table.entries();
        fill("shoal_services").set(services as i64);
        fill("shoal_backends").set(backends as i64);
        let (ipcache, endpoints, rules) = self.policies.sizes();
        fill("shoal_ipcache").set(ipcache as i64);
        fill("shoal_endpoints").set(endpoints as i64);
        fill("shoal_policy").set(rules as i64);
        if conntrack {
            fill("shoal_ct").set(dp.conntrack().len() as i64);
        }
        for (name, v) in dp.stats() {
            self.metrics.packets.get_or_create(&vec![("result".to_string(), name.to_string())]).set(v as i64);
        }
    }
}

enum Msg {
    Objects(Vec<Object>, bool, bool),
    Attach(String, Option<Ipv4Addr>, mpsc::SyncSender<Result<(), String>>),
}

/// How the agent talks to the proxy thread.
#[derive(Clone)]
pub struct ProxyHandle {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyHandle")
    }
}

impl ProxyHandle {
    /// Starts the proxy thread; the programs are attached to every current port of
    /// `bridge` (pods that outlived an agent restart, and program upgrades).
    pub fn start(mut proxy: Proxy, bridge: &str, uplink: Option<&str>) -> ProxyHandle {
        proxy.bridge = bridge.to_string();
        if let Some(up) = uplink {
            let r = match &mut proxy.engine {
                Engine::Bpf { dp, .. } => dp.attach_uplink(up),
                Engine::Nft(_) => Ok(()),
            };
            match r {
                Ok(()) => tracing::info!(interface = up, "service programs on the uplink: NodePorts and external addresses answer from outside"),
                Err(e) => {
                    proxy.metrics.attach_errors.inc();
                    tracing::error!(interface = up, error = %e, "attaching the service programs to the uplink: NodePorts do not answer from outside");
                }
            }
        }
        // (their addresses are in the pinned shoal_ifaddrs from when they were set up)
        for port in bridge_ports(bridge) {
            if let Err(e) = proxy.attach(&port, None) {
                proxy.metrics.attach_errors.inc();
                tracing::error!(interface = %port, error = %e, "attaching the service programs");
            }
        }
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("service-proxy".into())
            .spawn(move || {
                let mut last_ct = Instant::now() - Duration::from_secs(60);
                loop {
                    match rx.recv_timeout(Duration::from_secs(5)) {
                        Ok(Msg::Objects(objs, reset, synced)) => proxy.apply(objs, reset, synced),
                        Ok(Msg::Attach(ifname, addr, reply)) => {
                            let r = proxy.attach(&ifname, addr).map_err(|e| e.to_string());
                            if r.is_err() {
                                proxy.metrics.attach_errors.inc();
                            }
                            let _ = reply.send(r);
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => proxy.retry_failed(),
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    let ct = last_ct.elapsed() >= Duration::from_secs(30);
                    if ct {
                        last_ct = Instant::now();
                    }
                    proxy.refresh_gauges(ct);
                }
            })
            .expect("spawning the service proxy thread");
        ProxyHandle { tx }
    }

    pub fn objects(&self, objects: Vec<Object>, reset: bool, synced: bool) {
        let _ = self.tx.send(Msg::Objects(objects, reset, synced));
    }

    /// Attaches the programs to a new pod's host-side interface (before the pod runs, so
    /// its first packet to a service is translated); `addr`: the pod's address, the only
    /// source its packets may carry.
    pub fn attach(&self, ifname: &str, addr: Option<Ipv4Addr>) -> Result<(), String> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx.send(Msg::Attach(ifname.to_string(), addr, tx)).map_err(|_| "the service proxy thread is gone".to_string())?;
        rx.recv().map_err(|_| "the service proxy thread is gone".to_string())?
    }
}

/// The ports of a bridge (the pods' host-side veths).
pub fn bridge_ports(bridge: &str) -> Vec<String> {
    std::fs::read_dir(format!("/sys/class/net/{bridge}/brif")).into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

/// The IPv4 addresses of an interface, from `ip -o -4 addr show dev` (none if it is not there).
pub fn addresses_of(ifname: &str) -> Vec<Ipv4Addr> {
    let Ok(out) = std::process::Command::new("ip").args(["-o", "-4", "addr", "show", "dev", ifname]).stderr(std::process::Stdio::null()).output() else { return vec![] };
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().nth(3)?.split('/').next()?.parse().ok()).collect()
}

/// The interface holding `addr` (the node's uplink), from `ip -o -4 addr`.
pub fn interface_with(addr: Ipv4Addr) -> Option<String> {
    let out = std::process::Command::new("ip").args(["-o", "-4", "addr", "show"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, name, _, cidr) = (f.next()?, f.next()?, f.next()?, f.next()?);
        (cidr.split('/').next()? == addr.to_string()).then(|| name.trim_end_matches(':').split('@').next().unwrap_or(name).to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> NodeView {
        NodeView { name: "n1".into(), addresses: vec!["192.168.0.1".parse().unwrap()] }
    }

    fn slice(svc: &str, port_name: &str, port: u16, eps: Value) -> Value {
        json!({"metadata": {"name": format!("{svc}-abc"), "namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
               "addressType": "IPv4", "ports": [{"name": port_name, "port": port, "protocol": "TCP"}], "endpoints": eps})
    }

    #[test]
    fn a_cluster_ip_service_gets_its_ready_endpoints_by_port_name() {
        let svc = json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]}});
        let s = slice("web", "http", 8080, json!([
            {"addresses": ["10.0.1.2"], "conditions": {"ready": true}, "nodeName": "n1"},
            {"addresses": ["10.0.2.2"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "n2"},
            {"addresses": ["10.0.3.2"]}]));
        let ports = ports_of(&svc, &[&s], &node());
        assert_eq!(ports.len(), 2);
        let (name, http) = &ports[0];
        assert_eq!(name, "default/web:80/TCP");
        assert_eq!(http.frontends, vec![Frontend { addr: "10.96.0.10".parse().unwrap(), port: 80, flags: 0 }]);
        let eps: Vec<(String, u16, bool, bool)> = http.endpoints.iter().map(|e| (e.addr.to_string(), e.port, e.ready, e.terminating)).collect();
        assert_eq!(eps, vec![("10.0.1.2".into(), 8080, true, false), ("10.0.2.2".into(), 8080, false, true), ("10.0.3.2".into(), 8080, true, false)]);
        assert!(!http.maglev);
        let mut annotated = svc.clone();
        annotated["metadata"]["annotations"] = json!({"service.shoal.io/lb-algorithm": "maglev"});
        assert!(ports_of(&annotated, &[&s], &node()).iter().all(|(_, p)| p.maglev));
        // the UDP port has no slice port of its name: no endpoints, so it rejects
        assert_eq!(ports[1].0, "default/web:53/UDP");
        assert!(ports[1].1.endpoints.is_empty());
    }

    #[test]
    fn node_ports_external_ips_and_local_traffic_policies() {
        let svc = json!({"metadata": {"name": "lb", "namespace": "default"}, "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20",
            "externalIPs": ["203.0.113.5"], "externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP",
            "ports": [{"port": 443, "nodePort": 30443, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}});
        let s = slice("lb", "", 8443, json!([
            {"addresses": ["10.0.1.2"], "conditions": {"ready": true}, "nodeName": "n1"},
            {"addresses": ["10.0.2.2"], "conditions": {"ready": true}, "nodeName": "n2"}]));
        let ports = ports_of(&svc, &[&s], &node());
        assert_eq!(ports.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["default/lb:443/TCP", "default/lb:443/TCP/external"]);
        assert_eq!(ports[0].1.endpoints.len(), 2, "cluster traffic goes to every endpoint");
        assert_eq!(ports[0].1.affinity_timeout, 10800);
        let ext = &ports[1].1;
        assert_eq!(ext.endpoints.len(), 1, "external traffic keeps to this node's endpoints");
        let fronts: Vec<(String, u16, u16)> = ext.frontends.iter().map(|f| (f.addr.to_string(), f.port, f.flags)).collect();
        assert_eq!(fronts, vec![("203.0.113.5".into(), 443, SVC_F_EXTERNAL), ("198.51.100.7".into(), 443, SVC_F_EXTERNAL), ("192.168.0.1".into(), 30443, SVC_F_NODEPORT)]);
    }

    #[test]
    fn headless_external_name_and_unsupported_ports_get_nothing() {
        let headless = json!({"metadata": {"name": "h", "namespace": "default"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}});
        assert!(ports_of(&headless, &[], &node()).is_empty());
        let ext = json!({"metadata": {"name": "e", "namespace": "default"}, "spec": {"type": "ExternalName", "externalName": "example.com"}});
        assert!(ports_of(&ext, &[], &node()).is_empty());
        let sctp = json!({"metadata": {"name": "s", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 80, "protocol": "SCTP"}, {"port": 0}]}});
        assert!(ports_of(&sctp, &[], &node()).is_empty());
    }
}
