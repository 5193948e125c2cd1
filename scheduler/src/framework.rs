//! The scheduling cycle for one pod: filter every node (in parallel chunks), score the
//! feasible ones with the profile's weighted plugins, pick the best (ties at random).
//! `schedule_one` is pure: it reads a cache view and returns a decision; reserving the node
//! and binding are the caller's.

use std::fmt;

use rayon::prelude::*;

use crate::model::PodInfo;
use crate::plugins::podtopology::State;
use crate::plugins::{self, affinity, fit, image, ports, taints, Ctx, Failure};

/// Score weights per plugin (0 disables the plugin's score).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Weights {
    #[serde(default)]
    pub node_resources_least_allocated: i64,
    #[serde(default)]
    pub node_resources_balanced_allocation: i64,
    #[serde(default)]
    pub image_locality: i64,
    #[serde(default)]
    pub node_affinity: i64,
    #[serde(default)]
    pub taint_toleration: i64,
    #[serde(default)]
    pub inter_pod_affinity: i64,
    #[serde(default)]
    pub pod_topology_spread: i64,
}

impl Weights {
    /// Score plugin names as KubeSchedulerConfiguration spells them.
    pub const PLUGINS: [&'static str; 7] = ["NodeResourcesFit", "NodeResourcesBalancedAllocation", "ImageLocality", "NodeAffinity", "TaintToleration", "InterPodAffinity", "PodTopologySpread"];

    /// The weight of a score plugin by its upstream name.
    pub fn of_plugin_mut(&mut self, plugin: &str) -> Option<&mut i64> {
        Some(match plugin {
            "NodeResourcesFit" => &mut self.node_resources_least_allocated,
            "NodeResourcesBalancedAllocation" => &mut self.node_resources_balanced_allocation,
            "ImageLocality" => &mut self.image_locality,
            "NodeAffinity" => &mut self.node_affinity,
            "TaintToleration" => &mut self.taint_toleration,
            "InterPodAffinity" => &mut self.inter_pod_affinity,
            "PodTopologySpread" => &mut self.pod_topology_spread,
            _ => return None,
        })
    }
}

/// A named set of weights and knobs; `shoal` and `kubernetes` are built in.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub weights: Weights,
    /// Stop filtering once this share of the nodes (at least 100) is feasible; 100 (the
    /// default) evaluates every node.
    pub percentage_of_nodes_to_score: u32,
    /// Threads that filter and score one pod's nodes: 1 evaluates them on the worker's own
    /// thread (best when the workers already keep every core busy), more splits the nodes
    /// into chunks on the shared pool.
    #[serde(default = "default_parallelism")]
    pub parallelism: u32,
}

fn default_parallelism() -> u32 {
    1
}

impl Profile {
    /// Shoal's default: resource balance 30%, image locality 20%, pod affinity 25%, node
    /// affinity 25%.
    pub fn shoal() -> Profile {
        Profile {
            name: "shoal".into(),
            weights: Weights { node_resources_balanced_allocation: 30, image_locality: 20, inter_pod_affinity: 25, node_affinity: 25, ..Weights::zero() },
            percentage_of_nodes_to_score: 100,
            parallelism: default_parallelism(),
        }
    }

    /// Upstream kube-scheduler's default plugins and weights.
    pub fn kubernetes() -> Profile {
        Profile {
            name: "kubernetes".into(),
            weights: Weights {
                node_resources_least_allocated: 1,
                node_resources_balanced_allocation: 1,
                image_locality: 1,
                node_affinity: 2,
                taint_toleration: 3,
                inter_pod_affinity: 2,
                pod_topology_spread: 2,
            },
            percentage_of_nodes_to_score: 100,
            parallelism: default_parallelism(),
        }
    }

    pub fn builtin(name: &str) -> Option<Profile> {
        match name {
            "shoal" => Some(Profile::shoal()),
            "kubernetes" | "default-scheduler" => Some(Profile::kubernetes()),
            _ => None,
        }
    }

    /// Rejects settings that make no sense, saying which and why.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("profile name must not be empty".into());
        }
        if !(1..=100).contains(&self.percentage_of_nodes_to_score) {
            return Err(format!("percentageOfNodesToScore must be between 1 and 100, got {}", self.percentage_of_nodes_to_score));
        }
        if !(1..=256).contains(&self.parallelism) {
            return Err(format!("parallelism must be between 1 and 256, got {}", self.parallelism));
        }
        let w = &self.weights;
        for (name, v) in [
            ("nodeResourcesLeastAllocated", w.node_resources_least_allocated),
            ("nodeResourcesBalancedAllocation", w.node_resources_balanced_allocation),
            ("imageLocality", w.image_locality),
            ("nodeAffinity", w.node_affinity),
            ("taintToleration", w.taint_toleration),
            ("interPodAffinity", w.inter_pod_affinity),
            ("podTopologySpread", w.pod_topology_spread),
        ] {
            if !(0..=100).contains(&v) {
                return Err(format!("weight {name} must be between 0 and 100, got {v}"));
            }
        }
        Ok(())
    }
}

impl Weights {
    pub fn zero() -> Weights {
        Weights { node_resources_least_allocated: 0, node_resources_balanced_allocation: 0, image_locality: 0, node_affinity: 0, taint_toleration: 0, inter_pod_affinity: 0, pod_topology_spread: 0 }
    }
}

/// Runs the filters in upstream's order and stops at the first that fails.
#[inline]
pub fn filter(p: &PodInfo, c: &Ctx, st: Option<&State>, i: usize) -> Failure {
    let mut f = filter_node(p, c, i);
    // Room a preemption made for another pod of at least this priority is not free.
    if f.bits == 0 && c.cache.has_nominations() {
        let noms = c.cache.nominated_on(&c.t.names[i], p);
        if !noms.is_empty() {
            let plus: Vec<&PodInfo> = noms.iter().map(|q| &**q).collect();
            f = fit::check_adjusted(p, c, i, &[], &plus);
        }
    }
    match st {
        Some(st) if f.bits == 0 => st.filter(c, i),
        _ => f,
    }
}

#[inline]
fn filter_node(p: &PodInfo, c: &Ctx, i: usize) -> Failure {
    let fail = |bits| Failure { bits, ..Failure::default() };
    if taints::unschedulable(p, c, i) {
        return fail(plugins::UNSCHEDULABLE);
    }
    if !affinity::name_matches(p, c, i) {
        return fail(plugins::NODE_NAME);
    }
    if let Some(t) = taints::untolerated(p, c, i) {
        return Failure { bits: plugins::TAINT, taint: Some(t), scalar: None };
    }
    if !affinity::required_matches(p, c, i) {
        return fail(plugins::AFFINITY);
    }
    if !ports::free(p, c, i) {
        return fail(plugins::PORTS);
    }
    fit::check(p, c, i)
}

/// No node fits: how many nodes failed for each reason (upstream's "0/N nodes are
/// available: ..." message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FitError {
    pub nodes: usize,
    /// (reason, nodes), sorted as upstream prints them.
    pub reasons: Vec<(String, usize)>,
    /// A rejection before any node was looked at (e.g. a missing claim).
    pub prefilter: Option<String>,
}

impl fmt::Display for FitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(m) = &self.prefilter {
            return write!(f, "0/{} nodes are available: {m}.", self.nodes);
        }
        let mut parts: Vec<String> = self.reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        parts.sort();
        if parts.is_empty() {
            write!(f, "0/{} nodes are available.", self.nodes)
        } else {
            write!(f, "0/{} nodes are available: {}.", self.nodes, parts.join(", "))
        }
    }
}

/// A small, fast random source for tie-breaking (xorshift64*), seeded explicitly in tests.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn from_entropy() -> Rng {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        Rng::new(u64::from_le_bytes(b))
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// Chunk length for parallel passes: big enough that a task's overhead is small.
const MIN_CHUNK: usize = 256;

/// Filters every live node; returns the feasible rows or the reasons none fit.
pub fn feasible_nodes(p: &PodInfo, c: &Ctx, st: Option<&State>, profile: &Profile, start: usize) -> Result<Vec<u32>, FitError> {
    if let Some(m) = st.and_then(|s| s.prefilter.clone()) {
        return Err(FitError { nodes: c.total_nodes, reasons: Vec::new(), prefilter: Some(m) });
    }
    let n = c.t.len();
    let want = if profile.percentage_of_nodes_to_score >= 100 { usize::MAX } else { (c.total_nodes * profile.percentage_of_nodes_to_score as usize / 100).max(100) };
    type Acc = (Vec<u32>, Vec<(Failure, usize)>);
    let scan = |range: std::ops::Range<usize>, limit: usize| -> Acc {
        let mut ok = Vec::new();
        let mut bad: Vec<(Failure, usize)> = Vec::new();
        for j in range {
            let i = (j + start) % n;
            if !c.t.live[i] {
                continue;
            }
            let f = filter(p, c, st, i);
            if f.bits == 0 {
                ok.push(i as u32);
                if ok.len() >= limit {
                    break;
                }
            } else {
                match bad.iter_mut().find(|(g, _)| *g == f) {
                    Some(e) => e.1 += 1,
                    None => bad.push((f, 1)),
                }
            }
        }
        (ok, bad)
    };
    let (ok, bad) = if want != usize::MAX || n < 2 * MIN_CHUNK || profile.parallelism <= 1 {
        scan(0..n, want)
    } else {
        let chunk = (n / (profile.parallelism as usize * 4)).max(MIN_CHUNK);
        (0..n.div_ceil(chunk))
            .into_par_iter()
            .map(|k| scan(k * chunk..((k + 1) * chunk).min(n), usize::MAX))
            .reduce(
                || (Vec::new(), Vec::new()),
                |mut a, b| {
                    a.0.extend(b.0);
                    for (f, k) in b.1 {
                        match a.1.iter_mut().find(|(g, _)| *g == f) {
                            Some(e) => e.1 += k,
                            None => a.1.push((f, k)),
                        }
                    }
                    a
                },
            )
    };
    if !ok.is_empty() {
        return Ok(ok);
    }
    let mut reasons: Vec<(String, usize)> = Vec::new();
    for (f, k) in bad {
        for m in plugins::messages(&f, c.names) {
            match reasons.iter_mut().find(|(r, _)| *r == m) {
                Some(e) => e.1 += k,
                None => reasons.push((m, k)),
            }
        }
    }
    reasons.sort();
    Err(FitError { nodes: c.total_nodes, reasons, prefilter: None })
}

/// Weighted total score of every feasible node (same order as `feasible`).
pub fn score(p: &PodInfo, c: &Ctx, st: Option<&State>, profile: &Profile, feasible: &[u32]) -> Vec<i64> {
    let w = &profile.weights;
    let seq = feasible.len() < 2 * MIN_CHUNK || profile.parallelism <= 1;
    let raw = |&i: &u32| {
        let i = i as usize;
        let mut base = 0;
        if w.node_resources_least_allocated > 0 {
            base += w.node_resources_least_allocated * fit::least_allocated(p, c, i);
        }
        if w.node_resources_balanced_allocation > 0 {
            base += w.node_resources_balanced_allocation * fit::balanced(p, c, i);
        }
        if w.image_locality > 0 && !p.images.is_empty() {
            base += w.image_locality * image::score(p, c, i);
        }
        let aff = if w.node_affinity > 0 && !p.preferred.is_empty() { affinity::preferred_score(p, c, i) } else { 0 };
        let taint = if w.taint_toleration > 0 { taints::intolerable_preferred(p, c, i) } else { 0 };
        (base, aff, taint)
    };
    let raws: Vec<(i64, i64, i64)> = if seq { feasible.iter().map(raw).collect() } else { feasible.par_iter().with_min_len(MIN_CHUNK).map(raw).collect() };
    let max_aff = raws.iter().map(|r| r.1).max().unwrap_or(0);
    let max_taint = raws.iter().map(|r| r.2).max().unwrap_or(0);
    let mut totals: Vec<i64> = raws
        .iter()
        .map(|&(base, aff, taint)| {
            let mut total = base;
            if max_aff > 0 {
                total += w.node_affinity * aff * 100 / max_aff;
            }
            if w.taint_toleration > 0 {
                total += w.taint_toleration * if max_taint == 0 { 100 } else { 100 - taint * 100 / max_taint };
            }
            total
        })
        .collect();
    // Topology-aware scores only for pods with the counts: InterPodAffinity min–max
    // normalized, PodTopologySpread with fewer matching pods better.
    if let Some(st) = st {
        let topo: Vec<(i64, Option<i64>)> = feasible.iter().map(|&i| (st.affinity_raw(c, i as usize), st.spread_raw(c, i as usize))).collect();
        let (min_pa, max_pa) = topo.iter().fold((i64::MAX, i64::MIN), |(lo, hi), r| (lo.min(r.0), hi.max(r.0)));
        let (min_sp, max_sp) = topo.iter().filter_map(|r| r.1).fold((i64::MAX, i64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        for (total, &(pod_aff, spread)) in totals.iter_mut().zip(&topo) {
            if w.inter_pod_affinity > 0 && max_pa > min_pa {
                *total += w.inter_pod_affinity * 100 * (pod_aff - min_pa) / (max_pa - min_pa);
            }
            if let Some(sp) = spread.filter(|_| w.pod_topology_spread > 0) {
                *total += w.pod_topology_spread * if max_sp <= 0 { 100 } else { 100 * (max_sp + min_sp - sp) / max_sp };
            }
        }
    }
    totals
}

/// Picks the node for `p`: the best-scored feasible node, ties broken at random.
pub fn schedule_one(p: &PodInfo, c: &Ctx, profile: &Profile, rng: &mut Rng) -> Result<usize, FitError> {
    decide(p, c, profile, rng).map(|d| d.node)
}

/// A chosen node, and the placement version of the topology counts it was chosen on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub node: usize,
    pub version: Option<u64>,
}

/// [`schedule_one`], saying which topology counts the decision used.
pub fn decide(p: &PodInfo, c: &Ctx, profile: &Profile, rng: &mut Rng) -> Result<Decision, FitError> {
    let start = if profile.percentage_of_nodes_to_score >= 100 || c.t.is_empty() { 0 } else { rng.below(c.t.len() as u64) as usize };
    let st = State::compute(p, c);
    let version = st.as_ref().filter(|s| s.topology).map(|s| s.version);
    let feasible = feasible_nodes(p, c, st.as_ref(), profile, start)?;
    if feasible.len() == 1 {
        return Ok(Decision { node: feasible[0] as usize, version });
    }
    let scores = score(p, c, st.as_ref(), profile, &feasible);
    let mut best = i64::MIN;
    let mut chosen = 0usize;
    let mut ties = 0u64;
    for (k, &s) in scores.iter().enumerate() {
        if s > best {
            best = s;
            chosen = k;
            ties = 1;
        } else if s == best {
            ties += 1;
            if rng.below(ties) == 0 {
                chosen = k;
            }
        }
    }
    Ok(Decision { node: feasible[chosen] as usize, version })
}

/// Why `place` placed nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum PlaceError {
    /// No node fits.
    Unschedulable(FitError),
    /// The pod already holds a node (its binding is on the way).
    AlreadyPlaced,
    /// Every attempt lost a race: try later.
    Conflict,
}

/// Decides and reserves a node for `p` — what a scheduling worker does for one pod.
/// Decisions that use topology counts (inter-pod affinity, spreading, or any placed pod
/// with anti-affinity) run one at a time under the cache's topology lock, and their
/// reservation is refused if a relevant pod was placed meanwhile; plain decisions run in
/// parallel. A lost race is decided again, a few times.
pub fn place(cache: &crate::cache::Cache, p: &std::sync::Arc<PodInfo>, profile: &Profile, rng: &mut Rng) -> Result<(usize, std::sync::Arc<str>), PlaceError> {
    use crate::cache::AssumeError;
    for _ in 0..5 {
        let _serial = (p.has_pod_constraints() || cache.any_anti_affinity()).then(|| cache.topology_lock());
        let d = decide(p, &cache.ctx(), profile, rng).map_err(PlaceError::Unschedulable)?;
        match cache.assume_at(p, d.node, d.version) {
            Ok(name) => return Ok((d.node, name)),
            Err(AssumeError::AlreadyAssigned) => return Err(PlaceError::AlreadyPlaced),
            Err(AssumeError::NoLongerFits | AssumeError::UnknownNode | AssumeError::Stale) => continue,
        }
    }
    Err(PlaceError::Conflict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::model::{NodeSpec, PodInfo};
    use serde_json::{json, Value};
    use std::sync::Arc;

    fn cluster(nodes: &[Value]) -> Cache {
        let mut c = Cache::default();
        for n in nodes {
            let s = NodeSpec::from_value(n, &mut c.names);
            c.upsert_node(s);
        }
        c
    }

    fn node(name: &str, cpu: &str, mem: &str, extra: Value) -> Value {
        let mut n = json!({"metadata": {"name": name, "labels": {}}, "spec": {}, "status": {"allocatable": {"cpu": cpu, "memory": mem, "pods": "110"}}});
        merge(&mut n, extra);
        n
    }

    fn pod(extra: Value) -> Value {
        let mut p = json!({"metadata": {"name": "p", "namespace": "d", "uid": "u"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
        merge(&mut p, extra);
        p
    }

    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn feasible(c: &mut Cache, p: &Value) -> Result<Vec<String>, String> {
        let pod = PodInfo::from_value(p, &mut c.names);
        let ctx = c.ctx();
        let st = State::compute(&pod, &ctx);
        match feasible_nodes(&pod, &ctx, st.as_ref(), &Profile::kubernetes(), 0) {
            Ok(v) => {
                let mut names: Vec<String> = v.iter().map(|&i| c.nodes.names[i as usize].to_string()).collect();
                names.sort();
                Ok(names)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Filter cases after upstream's plugin tests: the same inputs, the same verdicts and
    /// the same wording.
    #[test]
    fn filters() {
        let nodes = [
            node("small", "1", "1Gi", json!({"metadata": {"labels": {"zone": "a", "disk": "ssd", "cores": "8"}}})),
            node("big", "8", "32Gi", json!({"metadata": {"labels": {"zone": "b"}}})),
            node("tainted", "8", "32Gi", json!({"spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}})),
            node("cordoned", "8", "32Gi", json!({"spec": {"unschedulable": true}})),
        ];
        let cpu = |q: &str| json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": q}}}]}});
        let cases: Vec<(&str, Value, Result<Vec<&str>, &str>)> = vec![
            ("no requests fit everywhere untainted", pod(json!({})), Ok(vec!["big", "small"])),
            ("cpu", pod(cpu("2")), Ok(vec!["big"])),
            (
                "too much cpu anywhere",
                pod(cpu("9")),
                Err("0/4 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 1 node(s) were unschedulable, 2 Insufficient cpu."),
            ),
            ("memory", pod(json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"memory": "2Gi"}}}]}})), Ok(vec!["big"])),
            ("toleration", pod(json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}})), Ok(vec!["big", "small", "tainted"])),
            ("unschedulable toleration", pod(json!({"spec": {"tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}]}})), Ok(vec!["big", "cordoned", "small"])),
            ("node selector", pod(json!({"spec": {"nodeSelector": {"zone": "a"}}})), Ok(vec!["small"])),
            (
                "node selector nobody has",
                pod(json!({"spec": {"nodeSelector": {"zone": "z"}}})),
                Err("0/4 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 1 node(s) were unschedulable, 2 node(s) didn't match Pod's node affinity/selector."),
            ),
            ("node name", pod(json!({"spec": {"nodeName": null, "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["big"]}]}]}}}}})), Ok(vec!["big"])),
            ("NotIn", pod(json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}]}}}}})), Ok(vec!["big"])),
            ("terms are ORed", pod(json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}]}}}}})), Ok(vec!["big", "small"])),
            ("expressions are ANDed", pod(json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}, {"key": "disk", "operator": "DoesNotExist"}]}]}}}}})), Err("0/4 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 1 node(s) were unschedulable, 2 node(s) didn't match Pod's node affinity/selector.")),
            ("Gt", pod(json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["4"]}]}]}}}}})), Ok(vec!["small"])),
            ("extended resource", pod(json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"example.com/gpu": "1"}}}]}})), Err("0/4 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 1 node(s) were unschedulable, 2 Insufficient example.com/gpu.")),
        ];
        for (name, p, want) in cases {
            let mut c = cluster(&nodes);
            let got = feasible(&mut c, &p);
            let want = want.map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map_err(String::from);
            assert_eq!(got, want, "case {name}");
        }
    }

    #[test]
    fn host_ports_and_pod_count() {
        let mut c = cluster(&[node("n", "8", "8Gi", json!({"status": {"allocatable": {"pods": "2"}}}))]);
        let with_port = pod(json!({"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}}));
        let first = Arc::new(PodInfo::from_value(&with_port, &mut c.names));
        c.assume(&first, 0).unwrap();
        let mut second = with_port.clone();
        second["metadata"]["uid"] = json!("u2");
        assert_eq!(feasible(&mut c, &second), Err("0/1 nodes are available: 1 node(s) didn't have free ports for the requested pod ports.".into()));
        // UDP on the same port is another port.
        second["spec"]["containers"][0]["ports"][0]["protocol"] = json!("UDP");
        assert_eq!(feasible(&mut c, &second), Ok(vec!["n".to_string()]));
        let p2 = Arc::new(PodInfo::from_value(&second, &mut c.names));
        c.assume(&p2, 0).unwrap();
        assert_eq!(feasible(&mut c, &pod(json!({}))), Err("0/1 nodes are available: 1 Too many pods.".into()));
    }

    #[test]
    fn scores_match_upstream_formulas() {
        // LeastAllocated (upstream test "nothing scheduled, resources requested, differently
        // sized nodes"): node1 4000m/10000 bytes, node2 6000m/10000; pod asks 3000m/5000.
        let mut c = cluster(&[node("node1", "4", "10000", json!({})), node("node2", "6", "10000", json!({}))]);
        let p = PodInfo::from_value(&pod(json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "3", "memory": "5000"}}}]}})), &mut c.names);
        let ctx = c.ctx();
        assert_eq!((fit::least_allocated(&p, &ctx, 0), fit::least_allocated(&p, &ctx, 1)), (37, 50));
        // BalancedAllocation: cpu 3/4 = .75, memory .5 → 100 × (1 − .125) = 87; node2 .5/.5 → 100.
        assert_eq!((fit::balanced(&p, &ctx, 0), fit::balanced(&p, &ctx, 1)), (87, 100));
    }

    #[test]
    fn preferred_affinity_and_taints_steer_the_choice() {
        let mut c = cluster(&[
            node("a", "4", "8Gi", json!({"metadata": {"labels": {"zone": "a"}}})),
            node("b", "4", "8Gi", json!({"metadata": {"labels": {"zone": "b"}}})),
            node("c", "4", "8Gi", json!({"metadata": {"labels": {"zone": "b"}}, "spec": {"taints": [{"key": "x", "effect": "PreferNoSchedule"}]}})),
        ]);
        let p = PodInfo::from_value(&pod(json!({"spec": {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}}]}}}})), &mut c.names);
        let mut rng = Rng::new(7);
        for _ in 0..20 {
            let i = schedule_one(&p, &c.ctx(), &Profile::kubernetes(), &mut rng).unwrap();
            assert_eq!(&*c.nodes.names[i], "b", "zone b preferred, and c's PreferNoSchedule taint is not tolerated");
        }
    }

    #[test]
    fn ties_are_broken_at_random_and_seeded() {
        let nodes: Vec<Value> = (0..8).map(|i| node(&format!("n{i}"), "4", "8Gi", json!({}))).collect();
        let mut c = cluster(&nodes);
        let p = PodInfo::from_value(&pod(json!({})), &mut c.names);
        let pick = |seed| {
            let mut rng = Rng::new(seed);
            (0..16).map(|_| schedule_one(&p, &c.ctx(), &Profile::kubernetes(), &mut rng).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(pick(1), pick(1), "same seed, same choices");
        let spread: std::collections::HashSet<usize> = pick(1).into_iter().collect();
        assert!(spread.len() > 1, "equal nodes are not always the same one: {spread:?}");
    }

    #[test]
    fn profile_validation() {
        assert!(Profile::shoal().validate().is_ok());
        let mut p = Profile::kubernetes();
        p.percentage_of_nodes_to_score = 0;
        assert_eq!(p.validate(), Err("percentageOfNodesToScore must be between 1 and 100, got 0".into()));
        let mut p = Profile::kubernetes();
        p.weights.image_locality = -1;
        assert!(p.validate().unwrap_err().contains("imageLocality"));
    }

    #[test]
    fn partial_scoring_stops_after_enough_feasible_nodes() {
        let nodes: Vec<Value> = (0..300).map(|i| node(&format!("n{i}"), "4", "8Gi", json!({}))).collect();
        let mut c = cluster(&nodes);
        let p = PodInfo::from_value(&pod(json!({})), &mut c.names);
        let mut prof = Profile::kubernetes();
        prof.percentage_of_nodes_to_score = 10; // 30 nodes, but at least 100
        assert_eq!(feasible_nodes(&p, &c.ctx(), None, &prof, 17).unwrap().len(), 100);
        prof.percentage_of_nodes_to_score = 100;
        assert_eq!(feasible_nodes(&p, &c.ctx(), None, &prof, 0).unwrap().len(), 300);
    }

    fn zoned() -> Cache {
        cluster(&[
            node("n1", "4", "8Gi", json!({"metadata": {"labels": {"zone": "a", "kubernetes.io/hostname": "n1"}}})),
            node("n2", "4", "8Gi", json!({"metadata": {"labels": {"zone": "a", "kubernetes.io/hostname": "n2"}}})),
            node("n3", "4", "8Gi", json!({"metadata": {"labels": {"zone": "b", "kubernetes.io/hostname": "n3"}}})),
            node("n4", "4", "8Gi", json!({"metadata": {"labels": {"kubernetes.io/hostname": "n4"}}})),
        ])
    }

    fn place_on(c: &mut Cache, name: &str, node: &str, extra: Value) {
        let mut p = pod(extra);
        p["metadata"]["name"] = json!(name);
        p["metadata"]["uid"] = json!(name);
        p["spec"]["nodeName"] = json!(node);
        let info = PodInfo::from_value(&p, &mut c.names);
        c.set_bound_pod(info);
    }

    fn term(key: &str, app: &str) -> Value {
        json!({"labelSelector": {"matchLabels": {"app": app}}, "topologyKey": key})
    }

    /// Inter-pod affinity and topology spreading, after upstream's plugin tests.
    #[test]
    fn pod_affinity_anti_affinity_and_spreading() {
        let web = json!({"metadata": {"labels": {"app": "web"}}});
        let cases: Vec<(&str, Vec<(&str, &str, Value)>, Value, Result<Vec<&str>, &str>)> = vec![
            ("anti-affinity per host", vec![("w1", "n1", web.clone())],
                json!({"metadata": {"labels": {"app": "web"}}, "spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term("kubernetes.io/hostname", "web")]}}}}),
                Ok(vec!["n2", "n3", "n4"])),
            ("anti-affinity per zone; a node without the key is fine", vec![("w1", "n1", web.clone())],
                json!({"spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term("zone", "web")]}}}}),
                Ok(vec!["n3", "n4"])),
            ("an existing pod's anti-affinity keeps matching pods out of its zone",
                vec![("guard", "n3", json!({"spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term("zone", "db")]}}}}))],
                json!({"metadata": {"labels": {"app": "db"}}}),
                Ok(vec!["n1", "n2", "n4"])),
            ("affinity to a zone holding a matching pod", vec![("c1", "n3", json!({"metadata": {"labels": {"app": "cache"}}}))],
                json!({"spec": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term("zone", "cache")]}}}}),
                Ok(vec!["n3"])),
            ("the first pod of a group may go wherever the key exists", vec![],
                json!({"metadata": {"labels": {"app": "cache"}}, "spec": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term("zone", "cache")]}}}}),
                Ok(vec!["n1", "n2", "n3"])),
            ("affinity nothing satisfies", vec![],
                json!({"spec": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term("zone", "cache")]}}}}),
                Err("0/4 nodes are available: 4 node(s) didn't match pod affinity rules.")),
            ("spread: zone a already has two", vec![("w1", "n1", web.clone()), ("w2", "n2", web.clone())],
                json!({"metadata": {"labels": {"app": "web"}}, "spec": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]}}),
                Ok(vec!["n3"])),
            ("spread: skew within bounds", vec![("w1", "n1", web.clone())],
                json!({"metadata": {"labels": {"app": "web"}}, "spec": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]}}),
                Ok(vec!["n3"])),
            ("spread: every domain full", vec![("w1", "n1", web.clone()), ("w3", "n3", web.clone())],
                json!({"metadata": {"labels": {"app": "web"}}, "spec": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]}}),
                Ok(vec!["n1", "n2", "n3"])),
            ("spread on a key no node has", vec![],
                json!({"spec": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "rack", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]}}),
                Err("0/4 nodes are available: 4 node(s) didn't match pod topology spread constraints (missing required label).")),
        ];
        for (name, existing, p, want) in cases {
            let mut c = zoned();
            for (pn, n, extra) in existing {
                place_on(&mut c, pn, n, extra);
            }
            let got = feasible(&mut c, &pod(p));
            let want = want.map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map_err(String::from);
            assert_eq!(got, want, "case {name}");
        }
    }

    #[test]
    fn soft_constraints_steer_scores() {
        // ScheduleAnyway spreading prefers the emptier zone; preferred affinity the zone
        // with the matching pod.
        let mut c = zoned();
        place_on(&mut c, "w1", "n1", json!({"metadata": {"labels": {"app": "web"}}}));
        let mut rng = Rng::new(3);
        let spread = PodInfo::from_value(&pod(json!({"metadata": {"labels": {"app": "web"}}, "spec": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app": "web"}}}]}})), &mut c.names);
        for _ in 0..10 {
            let i = schedule_one(&spread, &c.ctx(), &Profile::kubernetes(), &mut rng).unwrap();
            assert_eq!(&*c.nodes.names[i], "n3");
        }
        let near = PodInfo::from_value(&pod(json!({"spec": {"affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term("kubernetes.io/hostname", "web")}]}}}})), &mut c.names);
        for _ in 0..10 {
            let i = schedule_one(&near, &c.ctx(), &Profile::kubernetes(), &mut rng).unwrap();
            assert_eq!(&*c.nodes.names[i], "n1");
        }
    }

    #[test]
    fn concurrent_workers_respect_anti_affinity() {
        let nodes: Vec<Value> = (0..30).map(|i| node(&format!("n{i}"), "8", "8Gi", json!({"metadata": {"labels": {"kubernetes.io/hostname": format!("n{i}")}}}))).collect();
        let mut c = cluster(&nodes);
        let pods: Vec<Arc<PodInfo>> = (0..40)
            .map(|i| {
                let mut p = pod(json!({"metadata": {"labels": {"app": "one-per-node"}}, "spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term("kubernetes.io/hostname", "one-per-node")]}}}}));
                p["metadata"]["uid"] = json!(format!("u{i}"));
                p["metadata"]["name"] = json!(format!("p{i}"));
                Arc::new(PodInfo::from_value(&p, &mut c.names))
            })
            .collect();
        let placed = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for w in 0..3 {
                let (c, pods, placed) = (&c, &pods, &placed);
                s.spawn(move || {
                    let mut rng = Rng::new(w + 1);
                    for p in pods.iter().skip(w as usize).step_by(3) {
                        if let Ok((n, _)) = place(c, p, &Profile::kubernetes(), &mut rng) {
                            placed.lock().unwrap().push(n);
                        }
                    }
                });
            }
        });
        let mut nodes_used = placed.into_inner().unwrap();
        nodes_used.sort_unstable();
        let before = nodes_used.len();
        nodes_used.dedup();
        assert_eq!(before, nodes_used.len(), "two pods with anti-affinity share a node");
        assert_eq!(before, 30, "every node took one");
    }
}
