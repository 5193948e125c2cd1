//! The scheduler's own compact view of pods and nodes, parsed once from the API's JSON at
//! the edge: integer resources (milli-CPU, bytes), interned label and taint strings, and
//! selectors compiled to those ids, so filtering a node compares integers.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use shoal_client::quantity;

/// A fast, non-cryptographic hasher for the scheduler's own maps (interned ids and node
/// names the cluster controls, not attacker-chosen keys reaching a public endpoint):
/// SipHash dominated the topology counting loop.
#[derive(Clone, Copy, Default)]
pub struct FastHash;

pub struct FastHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(SEED);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(SEED);
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(i)).wrapping_mul(SEED);
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(SEED);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl std::hash::BuildHasher for FastHash {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(0)
    }
}

/// A HashMap with [`FastHash`].
pub type FastMap<K, V> = HashMap<K, V, FastHash>;
/// A HashSet with [`FastHash`].
pub type FastSet<K> = std::collections::HashSet<K, FastHash>;

/// An id no interned string has: a selector value that no node can carry.
pub const UNKNOWN: u32 = u32::MAX;

/// Strings seen in node labels, taints and resource names, as dense ids.
#[derive(Default, Debug)]
pub struct Interner {
    ids: FastMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.names.len() as u32;
        let a: Arc<str> = Arc::from(s);
        self.names.push(a.clone());
        self.ids.insert(a, id);
        id
    }

    /// The id of `s`, or [`UNKNOWN`] if no node ever carried it.
    pub fn get(&self, s: &str) -> u32 {
        self.ids.get(s).copied().unwrap_or(UNKNOWN)
    }

    pub fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", |s| s)
    }
}

/// Upstream's defaults for containers that request nothing, used only for scoring
/// (`DefaultMilliCPURequest`, `DefaultMemoryRequest`).
pub const DEFAULT_MILLI_CPU: i64 = 100;
pub const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

/// Amounts of the resources a pod requests or a node offers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
    pub ephemeral: i64,
    /// Extended resources (`example.com/gpu`, `hugepages-2Mi`) by interned name.
    pub scalars: Vec<(u32, i64)>,
}

impl Resources {
    fn add(&mut self, o: &Resources) {
        self.milli_cpu += o.milli_cpu;
        self.memory += o.memory;
        self.ephemeral += o.ephemeral;
        for &(k, v) in &o.scalars {
            match self.scalars.iter_mut().find(|(n, _)| *n == k) {
                Some(e) => e.1 += v,
                None => self.scalars.push((k, v)),
            }
        }
    }

    fn max_with(&mut self, o: &Resources) {
        self.milli_cpu = self.milli_cpu.max(o.milli_cpu);
        self.memory = self.memory.max(o.memory);
        self.ephemeral = self.ephemeral.max(o.ephemeral);
        for &(k, v) in &o.scalars {
            match self.scalars.iter_mut().find(|(n, _)| *n == k) {
                Some(e) => e.1 = e.1.max(v),
                None => self.scalars.push((k, v)),
            }
        }
    }

    pub fn is_zero(&self) -> bool {
        self.milli_cpu == 0 && self.memory == 0 && self.ephemeral == 0 && self.scalars.iter().all(|(_, v)| *v == 0)
    }

    /// Parses a `ResourceList` map; unknown names become scalars when they are extended
    /// resources (with a `/`, or `hugepages-`).
    pub fn from_list(list: Option<&Value>, names: &mut Interner) -> Resources {
        let mut r = Resources::default();
        for (k, v) in list.and_then(Value::as_object).into_iter().flatten() {
            let Some(m) = v.as_str().and_then(quantity::parse).or_else(|| v.as_f64().map(|f| (f * 1000.0) as i128)) else { continue };
            let whole = || (m / 1000 + i128::from(m % 1000 != 0)).clamp(0, i64::MAX as i128) as i64;
            match k.as_str() {
                "cpu" => r.milli_cpu = m.clamp(0, i64::MAX as i128) as i64,
                "memory" => r.memory = whole(),
                "ephemeral-storage" => r.ephemeral = whole(),
                "pods" => {}
                n if n.contains('/') || n.starts_with("hugepages-") => r.scalars.push((names.intern(n), whole())),
                _ => {}
            }
        }
        r
    }
}

/// A label selector requirement compiled to ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

#[derive(Clone, Debug)]
pub struct Requirement {
    pub key: u32,
    pub op: Op,
    pub values: Vec<u32>,
    /// For Gt/Lt: the number compared with the label's value.
    pub number: i64,
}

/// One node selector term: all its requirements must hold. `fields` match `metadata.name`.
#[derive(Clone, Debug, Default)]
pub struct Term {
    pub labels: Vec<Requirement>,
    pub names: Option<(bool, Vec<Arc<str>>)>,
}

/// Taint effects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl Effect {
    fn parse(s: &str) -> Option<Effect> {
        match s {
            "NoSchedule" => Some(Effect::NoSchedule),
            "PreferNoSchedule" => Some(Effect::PreferNoSchedule),
            "NoExecute" => Some(Effect::NoExecute),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taint {
    pub key: u32,
    pub value: u32,
    pub effect: Effect,
}

#[derive(Clone, Debug)]
pub struct Toleration {
    pub key: u32,
    /// Empty key with `Exists` tolerates everything.
    pub any_key: bool,
    pub exists: bool,
    pub value: u32,
    pub effect: Option<Effect>,
}

impl Toleration {
    pub fn tolerates(&self, t: &Taint) -> bool {
        if self.effect.is_some_and(|e| e != t.effect) {
            return false;
        }
        if self.any_key {
            return self.exists;
        }
        self.key == t.key && (self.exists || self.value == t.value)
    }
}

/// A host port a container asks for: (protocol, host IP or empty for all, port).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub protocol: u8,
    pub ip: Arc<str>,
    pub port: u16,
}

impl HostPort {
    pub fn conflicts(&self, o: &HostPort) -> bool {
        self.port == o.port && self.protocol == o.protocol && (self.ip.is_empty() || o.ip.is_empty() || self.ip == o.ip || &*self.ip == "0.0.0.0" || &*o.ip == "0.0.0.0")
    }
}

/// A LabelSelector compiled once: `matchLabels` pairs and `matchExpressions`.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    /// A missing selector selects nothing; `{}` selects everything.
    nothing: bool,
    labels: Vec<(Arc<str>, Arc<str>)>,
    exprs: Vec<(Arc<str>, Op, Vec<Arc<str>>)>,
}

impl Selector {
    pub fn compile(v: &Value) -> Selector {
        if !v.is_object() {
            return Selector { nothing: true, ..Selector::default() };
        }
        let labels = v["matchLabels"].as_object().into_iter().flatten().map(|(k, x)| (Arc::from(k.as_str()), Arc::from(x.as_str().unwrap_or("")))).collect();
        let mut nothing = false;
        let exprs = v["matchExpressions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let op = match e["operator"].as_str().unwrap_or("") {
                    "In" => Op::In,
                    "NotIn" => Op::NotIn,
                    "Exists" => Op::Exists,
                    "DoesNotExist" => Op::DoesNotExist,
                    _ => {
                        nothing = true; // validation rejects it; match nothing rather than guess
                        Op::In
                    }
                };
                let vals = e["values"].as_array().into_iter().flatten().filter_map(Value::as_str).map(Arc::from).collect();
                (Arc::from(e["key"].as_str().unwrap_or("")), op, vals)
            })
            .collect();
        Selector { nothing, labels, exprs }
    }

    pub fn matches(&self, labels: &[(Arc<str>, Arc<str>)]) -> bool {
        if self.nothing {
            return false;
        }
        let get = |k: &str| labels.iter().find(|(l, _)| &**l == k).map(|(_, v)| v);
        self.labels.iter().all(|(k, v)| get(k) == Some(v))
            && self.exprs.iter().all(|(k, op, vals)| match op {
                Op::In => get(k).is_some_and(|v| vals.contains(v)),
                Op::NotIn => get(k).is_none_or(|v| !vals.contains(v)),
                Op::Exists => get(k).is_some(),
                Op::DoesNotExist => get(k).is_none(),
                Op::Gt | Op::Lt => false,
            })
    }
}

/// Which namespaces a pod affinity term looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    /// The term's `namespaces`, or the pod's own namespace when it names none.
    Listed(Vec<Arc<str>>),
    /// An empty `namespaceSelector` (`{}`): every namespace. A non-empty selector is read
    /// the same way until the scheduler watches namespace labels (the conservative reading
    /// for anti-affinity).
    All,
}

/// One pod (anti-)affinity term: pods matching `selector` in `namespaces`, counted per
/// value of the node label `topology_key`.
#[derive(Clone, Debug)]
pub struct PodTerm {
    pub selector: Arc<Selector>,
    pub namespaces: Namespaces,
    pub topology_key: u32,
}

impl PodTerm {
    fn parse(t: &Value, own_ns: &str, names: &mut Interner) -> PodTerm {
        let listed: Vec<Arc<str>> = t["namespaces"].as_array().into_iter().flatten().filter_map(Value::as_str).map(Arc::from).collect();
        let namespaces = if t.get("namespaceSelector").is_some_and(|s| s.is_object()) {
            Namespaces::All
        } else if listed.is_empty() {
            Namespaces::Listed(vec![Arc::from(own_ns)])
        } else {
            Namespaces::Listed(listed)
        };
        // A missing selector matches no pod (upstream); `{}` matches every pod.
        let selector = Arc::new(Selector::compile(t.get("labelSelector").unwrap_or(&Value::Null)));
        PodTerm { selector, namespaces, topology_key: names.intern(t["topologyKey"].as_str().unwrap_or("")) }
    }

    /// Whether `p` is one of the pods this term counts.
    pub fn matches(&self, p: &PodInfo) -> bool {
        let ns_ok = match &self.namespaces {
            Namespaces::All => true,
            Namespaces::Listed(l) => l.iter().any(|n| *n == p.namespace),
        };
        ns_ok && p.selected_by(&self.selector)
    }
}

/// One `topologySpreadConstraints` entry.
#[derive(Clone, Debug)]
pub struct SpreadConstraint {
    pub max_skew: i64,
    pub topology_key: u32,
    /// DoNotSchedule (a filter) or ScheduleAnyway (a score).
    pub hard: bool,
    pub selector: Arc<Selector>,
    pub min_domains: i64,
}

/// What the scheduler needs of a pod.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub uid: Arc<str>,
    pub resource_version: Arc<str>,
    pub priority: i32,
    /// `spec.preemptionPolicy: Never`: waits instead of preempting.
    pub never_preempts: bool,
    /// `status.nominatedNodeName`: the node a preemption made room on.
    pub nominated_node: Option<Arc<str>>,
    pub scheduler_name: Arc<str>,
    /// Effective requests (containers, init containers and overhead, as upstream).
    pub requests: Resources,
    /// Requests with upstream's defaults for containers that ask for nothing (scoring).
    pub nonzero_cpu: i64,
    pub nonzero_memory: i64,
    pub node_name: Option<Arc<str>>,
    pub node_selector: Vec<(u32, u32)>,
    /// Required node affinity: any term (OR); None when there is none.
    pub required: Option<Vec<Term>>,
    pub preferred: Vec<(i32, Term)>,
    pub tolerations: Vec<Toleration>,
    pub host_ports: Vec<HostPort>,
    pub images: Vec<Arc<str>>,
    pub labels: Vec<(Arc<str>, Arc<str>)>,
    /// Required pod affinity and anti-affinity terms, and the preferred ones with weights.
    pub affinity: Vec<PodTerm>,
    pub anti_affinity: Vec<PodTerm>,
    pub preferred_affinity: Vec<(i64, PodTerm)>,
    pub preferred_anti_affinity: Vec<(i64, PodTerm)>,
    pub spread: Vec<SpreadConstraint>,
    pub deleting: bool,
    pub finished: bool,
    /// The message of a `PodScheduled=False` condition already written (not repeated).
    pub unschedulable_message: Option<Arc<str>>,
    /// PersistentVolumeClaims the pod mounts, by name.
    pub claims: Vec<Arc<str>>,
    /// Gang annotations (see `gang.rs`).
    pub gang_min: Option<usize>,
    pub gang_timeout: Option<std::time::Duration>,
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn compile_requirement(e: &Value, names: &mut Interner) -> Requirement {
    let values: Vec<&str> = e["values"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let op = match e["operator"].as_str().unwrap_or("") {
        "In" => Op::In,
        "NotIn" => Op::NotIn,
        "Exists" => Op::Exists,
        "DoesNotExist" => Op::DoesNotExist,
        "Gt" => Op::Gt,
        "Lt" => Op::Lt,
        _ => Op::In, // validation rejects others; an unknown operator with no values matches nothing
    };
    let number = values.first().and_then(|v| v.parse().ok()).unwrap_or(0);
    Requirement { key: names.intern(e["key"].as_str().unwrap_or("")), op, values: values.iter().map(|v| names.intern(v)).collect(), number }
}

fn compile_term(t: &Value, names: &mut Interner) -> Term {
    let labels = t["matchExpressions"].as_array().into_iter().flatten().map(|e| compile_requirement(e, names)).collect();
    let mut term = Term { labels, names: None };
    for f in t["matchFields"].as_array().into_iter().flatten() {
        if f["key"] == "metadata.name" {
            let vals: Vec<Arc<str>> = f["values"].as_array().into_iter().flatten().filter_map(Value::as_str).map(Arc::from).collect();
            let positive = f["operator"] == "In";
            term.names = Some((positive, vals));
        }
    }
    term
}

/// Compiles a node selector term (PersistentVolume node affinity uses the same shape).
pub fn compile_term_pub(t: &Value, names: &mut Interner) -> Term {
    compile_term(t, names)
}

fn container_requests(c: &Value, names: &mut Interner) -> (Resources, i64, i64) {
    let r = Resources::from_list(c.pointer("/resources/requests"), names);
    let has = |k: &str| c.pointer(&format!("/resources/requests/{k}")).is_some();
    let nz_cpu = if has("cpu") { r.milli_cpu } else { DEFAULT_MILLI_CPU };
    let nz_mem = if has("memory") { r.memory } else { DEFAULT_MEMORY };
    (r, nz_cpu, nz_mem)
}

impl PodInfo {
    /// Parses a pod; the strings its selectors and tolerations name are interned, so a node
    /// that carries them later matches.
    pub fn from_value(v: &Value, names: &mut Interner) -> PodInfo {
        // Requests: max(sum of app containers and sidecars, each init container plus the
        // sidecars started before it) + overhead.
        let mut sum = Resources::default();
        let (mut nz_cpu, mut nz_mem) = (0i64, 0i64);
        let mut init_max = Resources::default();
        let (mut init_nz_cpu, mut init_nz_mem) = (0i64, 0i64);
        let mut sidecars = Resources::default();
        let (mut side_cpu, mut side_mem) = (0i64, 0i64);
        for c in v.pointer("/spec/initContainers").and_then(Value::as_array).into_iter().flatten() {
            let (r, c_cpu, c_mem) = container_requests(c, names);
            if c["restartPolicy"] == "Always" {
                sidecars.add(&r);
                side_cpu += c_cpu;
                side_mem += c_mem;
            } else {
                let mut with = r.clone();
                with.add(&sidecars);
                init_max.max_with(&with);
                init_nz_cpu = init_nz_cpu.max(c_cpu + side_cpu);
                init_nz_mem = init_nz_mem.max(c_mem + side_mem);
            }
        }
        for c in v.pointer("/spec/containers").and_then(Value::as_array).into_iter().flatten() {
            let (r, c_cpu, c_mem) = container_requests(c, names);
            sum.add(&r);
            nz_cpu += c_cpu;
            nz_mem += c_mem;
        }
        sum.add(&sidecars);
        nz_cpu += side_cpu;
        nz_mem += side_mem;
        sum.max_with(&init_max);
        nz_cpu = nz_cpu.max(init_nz_cpu);
        nz_mem = nz_mem.max(init_nz_mem);
        let overhead = Resources::from_list(v.pointer("/spec/overhead"), names);
        sum.add(&overhead);
        nz_cpu += overhead.milli_cpu;
        nz_mem += overhead.memory;

        let node_selector = v.pointer("/spec/nodeSelector").and_then(Value::as_object).into_iter().flatten().map(|(k, val)| (names.intern(k), names.intern(val.as_str().unwrap_or("")))).collect();
        let na = v.pointer("/spec/affinity/nodeAffinity");
        let required = na.and_then(|a| a.pointer("/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")).and_then(Value::as_array).map(|terms| terms.iter().map(|t| compile_term(t, names)).collect());
        let preferred = na
            .and_then(|a| a["preferredDuringSchedulingIgnoredDuringExecution"].as_array())
            .into_iter()
            .flatten()
            .map(|p| (p["weight"].as_i64().unwrap_or(0) as i32, compile_term(&p["preference"], names)))
            .collect();
        let tolerations = v
            .pointer("/spec/tolerations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|t| {
                let key = s(t, "/key");
                Toleration {
                    key: names.intern(key),
                    any_key: key.is_empty(),
                    exists: t["operator"] == "Exists",
                    value: names.intern(s(t, "/value")),
                    effect: Effect::parse(s(t, "/effect")),
                }
            })
            .collect();
        let mut host_ports = Vec::new();
        let mut images = Vec::new();
        for list in ["/spec/initContainers", "/spec/containers"] {
            for c in v.pointer(list).and_then(Value::as_array).into_iter().flatten() {
                if let Some(i) = c["image"].as_str() {
                    images.push(Arc::from(normalize_image(i)));
                }
                for p in c["ports"].as_array().into_iter().flatten() {
                    let port = p["hostPort"].as_u64().unwrap_or(0);
                    if port > 0 && port <= u16::MAX as u64 {
                        let protocol = match p["protocol"].as_str().unwrap_or("TCP") {
                            "UDP" => 1,
                            "SCTP" => 2,
                            _ => 0,
                        };
                        host_ports.push(HostPort { protocol, ip: Arc::from(p["hostIP"].as_str().unwrap_or("")), port: port as u16 });
                    }
                }
            }
        }
        let labels = v.pointer("/metadata/labels").and_then(Value::as_object).into_iter().flatten().map(|(k, val)| (Arc::from(k.as_str()), Arc::from(val.as_str().unwrap_or("")))).collect();
        let own_ns = s(v, "/metadata/namespace");
        let mut terms = |path: &str| -> Vec<PodTerm> { v.pointer(path).and_then(Value::as_array).into_iter().flatten().map(|t| PodTerm::parse(t, own_ns, names)).collect() };
        let affinity = terms("/spec/affinity/podAffinity/requiredDuringSchedulingIgnoredDuringExecution");
        let anti_affinity = terms("/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution");
        let mut weighted = |path: &str| -> Vec<(i64, PodTerm)> {
            v.pointer(path).and_then(Value::as_array).into_iter().flatten().map(|w| (w["weight"].as_i64().unwrap_or(0), PodTerm::parse(&w["podAffinityTerm"], own_ns, names))).collect()
        };
        let preferred_affinity = weighted("/spec/affinity/podAffinity/preferredDuringSchedulingIgnoredDuringExecution");
        let preferred_anti_affinity = weighted("/spec/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution");
        let spread = v
            .pointer("/spec/topologySpreadConstraints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|c| SpreadConstraint {
                max_skew: c["maxSkew"].as_i64().unwrap_or(1).max(1),
                topology_key: names.intern(c["topologyKey"].as_str().unwrap_or("")),
                hard: c["whenUnsatisfiable"].as_str() != Some("ScheduleAnyway"),
                selector: Arc::new(Selector::compile(c.get("labelSelector").unwrap_or(&Value::Null))),
                min_domains: c["minDomains"].as_i64().unwrap_or(1).max(1),
            })
            .collect();
        let node = s(v, "/spec/nodeName");
        let phase = s(v, "/status/phase");
        PodInfo {
            namespace: Arc::from(s(v, "/metadata/namespace")),
            name: Arc::from(s(v, "/metadata/name")),
            uid: Arc::from(s(v, "/metadata/uid")),
            resource_version: Arc::from(s(v, "/metadata/resourceVersion")),
            priority: v.pointer("/spec/priority").and_then(Value::as_i64).unwrap_or(0) as i32,
            never_preempts: s(v, "/spec/preemptionPolicy") == "Never",
            nominated_node: Some(s(v, "/status/nominatedNodeName")).filter(|n| !n.is_empty()).map(Arc::from),
            scheduler_name: Arc::from(match s(v, "/spec/schedulerName") {
                "" => "default-scheduler",
                n => n,
            }),
            requests: sum,
            nonzero_cpu: nz_cpu,
            nonzero_memory: nz_mem,
            node_name: (!node.is_empty()).then(|| Arc::from(node)),
            node_selector,
            required,
            preferred,
            tolerations,
            host_ports,
            images,
            labels,
            affinity,
            anti_affinity,
            preferred_affinity,
            preferred_anti_affinity,
            spread,
            deleting: v.pointer("/metadata/deletionTimestamp").is_some_and(|d| !d.is_null()),
            finished: matches!(phase, "Succeeded" | "Failed"),
            claims: v.pointer("/spec/volumes").and_then(Value::as_array).into_iter().flatten().filter_map(|vol| vol.pointer("/persistentVolumeClaim/claimName").and_then(Value::as_str)).map(Arc::from).collect(),
            gang_min: v.pointer("/metadata/annotations").and_then(|a| a.get(crate::gang::MIN_MEMBER_ANNOTATION)).and_then(Value::as_str).and_then(|n| n.trim().parse().ok()),
            gang_timeout: v.pointer("/metadata/annotations").and_then(|a| a.get(crate::gang::TIMEOUT_ANNOTATION)).and_then(Value::as_str).and_then(|n| n.trim().parse().ok()).map(std::time::Duration::from_secs),
            unschedulable_message: v
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
                .and_then(|c| c["message"].as_str())
                .map(Arc::from),
        }
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether a compiled LabelSelector selects this pod.
    pub fn selected_by(&self, sel: &Selector) -> bool {
        sel.matches(&self.labels)
    }

    /// Whether the pod takes part in inter-pod affinity or topology spreading (and so needs
    /// the per-cycle topology counts).
    pub fn has_pod_constraints(&self) -> bool {
        !(self.affinity.is_empty() && self.anti_affinity.is_empty() && self.preferred_affinity.is_empty() && self.preferred_anti_affinity.is_empty() && self.spread.is_empty())
    }

    /// Whether the pod tolerates a taint.
    pub fn tolerates(&self, t: &Taint) -> bool {
        self.tolerations.iter().any(|x| x.tolerates(t))
    }
}

/// Image names as nodes report them: a missing tag means `:latest`, and Docker Hub names
/// get their implicit `docker.io/library/` prefix (as upstream's ImageLocality normalizes).
pub fn normalize_image(name: &str) -> String {
    let (repo, rest) = match name.find('@') {
        Some(i) => (&name[..i], &name[i..]),
        None => match name.rfind(':').filter(|&i| !name[i..].contains('/')) {
            Some(i) => (&name[..i], &name[i..]),
            None => (name, ":latest"),
        },
    };
    let first = repo.split('/').next().unwrap_or("");
    let has_registry = repo.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let repo = if has_registry {
        repo.to_string()
    } else if repo.contains('/') {
        format!("docker.io/{repo}")
    } else {
        format!("docker.io/library/{repo}")
    };
    format!("{repo}{rest}")
}

/// What the scheduler needs of a node.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: Arc<str>,
    pub allocatable: Resources,
    pub max_pods: i64,
    pub labels: Vec<(u32, u32)>,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    /// (normalized image name, size in bytes)
    pub images: Vec<(Arc<str>, i64)>,
}

impl NodeSpec {
    pub fn from_value(v: &Value, names: &mut Interner) -> NodeSpec {
        let alloc_v = v.pointer("/status/allocatable").filter(|a| a.as_object().is_some_and(|m| !m.is_empty())).or(v.pointer("/status/capacity"));
        let allocatable = Resources::from_list(alloc_v, names);
        let max_pods = alloc_v.and_then(|a| a.get("pods")).and_then(|p| p.as_str().and_then(quantity::parse).or_else(|| p.as_i64().map(|i| i as i128 * 1000))).map_or(110, |m| (m / 1000) as i64);
        let mut labels: Vec<(u32, u32)> = v.pointer("/metadata/labels").and_then(Value::as_object).into_iter().flatten().map(|(k, val)| (names.intern(k), names.intern(val.as_str().unwrap_or("")))).collect();
        labels.sort_unstable();
        let taints = v
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| Some(Taint { key: names.intern(s(t, "/key")), value: names.intern(s(t, "/value")), effect: Effect::parse(s(t, "/effect"))? }))
            .collect();
        let mut images = Vec::new();
        for i in v.pointer("/status/images").and_then(Value::as_array).into_iter().flatten() {
            let size = i["sizeBytes"].as_i64().unwrap_or(0);
            for n in i["names"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                images.push((Arc::from(normalize_image(n)), size));
            }
        }
        NodeSpec {
            name: Arc::from(s(v, "/metadata/name")),
            allocatable,
            max_pods,
            labels,
            taints,
            unschedulable: v.pointer("/spec/unschedulable").and_then(Value::as_bool).unwrap_or(false),
            images,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_requests_follow_upstream_rules() {
        let mut n = Interner::default();
        // Two containers (one without requests), an init container larger in memory, a
        // sidecar, and overhead.
        let pod = json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {
            "initContainers": [
                {"name": "side", "restartPolicy": "Always", "resources": {"requests": {"cpu": "50m", "memory": "10Mi"}}},
                {"name": "init", "resources": {"requests": {"cpu": "100m", "memory": "1Gi"}}}],
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "250m", "memory": "64Mi", "example.com/gpu": "1"}}},
                {"name": "b"}],
            "overhead": {"cpu": "10m"}}});
        let p = PodInfo::from_value(&pod, &mut n);
        assert_eq!(p.requests.milli_cpu, 250 + 50 + 10);
        assert_eq!(p.requests.memory, (1 << 30) + 10 * (1 << 20));
        assert_eq!(p.requests.scalars, vec![(n.get("example.com/gpu"), 1)]);
        // b asks for nothing: it counts as 100m and 200Mi when scoring.
        assert_eq!(p.nonzero_cpu, 250 + 100 + 50 + 10);
        assert_eq!(p.nonzero_memory, ((1i64 << 30) + 10 * (1 << 20)).max(64 * (1 << 20) + DEFAULT_MEMORY + 10 * (1 << 20)));
        assert_eq!(&*p.scheduler_name, "default-scheduler");
    }

    #[test]
    fn node_parsing_and_tolerations() {
        let mut n = Interner::default();
        let node = json!({"metadata": {"name": "n1", "labels": {"zone": "a"}}, "spec": {"taints": [{"key": "gpu", "value": "true", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110", "example.com/gpu": "2"}, "images": [{"names": ["busybox:1.36"], "sizeBytes": 1000}]}});
        let ns = NodeSpec::from_value(&node, &mut n);
        assert_eq!((ns.allocatable.milli_cpu, ns.allocatable.memory, ns.max_pods), (4000, 8 << 30, 110));
        assert_eq!(ns.images[0].0.as_ref(), "docker.io/library/busybox:1.36");
        let pod = |tol: Value| PodInfo::from_value(&json!({"spec": {"tolerations": tol}}), &mut Interner::default());
        let taint = ns.taints[0];
        // Ids differ between interners: rebuild with the node's.
        let p = PodInfo::from_value(&json!({"spec": {"tolerations": [{"key": "gpu", "operator": "Equal", "value": "true"}]}}), &mut n);
        assert!(p.tolerates(&taint));
        let p = PodInfo::from_value(&json!({"spec": {"tolerations": [{"key": "gpu", "operator": "Equal", "value": "false"}]}}), &mut n);
        assert!(!p.tolerates(&taint));
        let p = PodInfo::from_value(&json!({"spec": {"tolerations": [{"operator": "Exists"}]}}), &mut n);
        assert!(p.tolerates(&taint));
        let p = PodInfo::from_value(&json!({"spec": {"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoExecute"}]}}), &mut n);
        assert!(!p.tolerates(&taint));
        assert!(!pod(json!([])).tolerates(&taint));
    }

    #[test]
    fn compiled_selectors_match_as_upstream() {
        let labels: Vec<(Arc<str>, Arc<str>)> = vec![(Arc::from("app"), Arc::from("web")), (Arc::from("tier"), Arc::from("front"))];
        let cases = [
            (json!(null), false),
            (json!({}), true),
            (json!({"matchLabels": {"app": "web"}}), true),
            (json!({"matchLabels": {"app": "db"}}), false),
            (json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "back"]}]}), true),
            (json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]}), false),
            (json!({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}), true),
            (json!({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}), false),
            (json!({"matchExpressions": [{"key": "app", "operator": "Bogus", "values": ["web"]}]}), false),
        ];
        for (sel, want) in cases {
            assert_eq!(Selector::compile(&sel).matches(&labels), want, "{sel}");
        }
    }

    #[test]
    fn image_names() {
        assert_eq!(normalize_image("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(normalize_image("user/app:1"), "docker.io/user/app:1");
        assert_eq!(normalize_image("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(normalize_image("registry.k8s.io/pause:3.9"), "registry.k8s.io/pause:3.9");
        assert_eq!(normalize_image("busybox@sha256:abc"), "docker.io/library/busybox@sha256:abc");
    }
}
