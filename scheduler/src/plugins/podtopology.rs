//! Plugins that count other pods per topology domain (the value of a node label such as
//! `topology.kubernetes.io/zone`): InterPodAffinity (required terms and existing pods'
//! anti-affinity as filters, preferred terms as a score) and PodTopologySpread
//! (DoNotSchedule as a filter, ScheduleAnyway as a score). The counts are taken once per
//! scheduling cycle (`State::compute`, upstream's PreFilter) over every placed pod, then
//! each node is a few hash lookups.


use super::{affinity, Ctx, Failure, ANTI, EXISTING_ANTI, POD_AFFINITY, SPREAD, SPREAD_LABEL};
use crate::model::{FastMap as HashMap, FastSet as HashSet, PodInfo, SpreadConstraint};

struct Spread {
    key: u32,
    max_skew: i64,
    hard: bool,
    counts: HashMap<u32, i64>,
    /// The smallest count over eligible domains (0 when fewer than minDomains exist).
    min: i64,
    self_match: bool,
}

/// Whether placing `q` can change what the topology counts say about `p`.
pub fn relevant(p: &PodInfo, q: &PodInfo) -> bool {
    p.affinity.iter().chain(&p.anti_affinity).any(|t| t.matches(q))
        || p.preferred_affinity.iter().chain(&p.preferred_anti_affinity).any(|(_, t)| t.matches(q))
        || q.anti_affinity.iter().any(|t| t.matches(p))
        || p.spread.iter().any(|s| q.namespace == p.namespace && q.selected_by(&s.selector))
}

/// Per-cycle counts for one pod.
#[derive(Default)]
pub struct State {
    /// The placement version the counts were taken at.
    pub version: u64,
    /// Whether topology counts were taken (else only the volume check is here).
    pub topology: bool,
    /// Required affinity: per term, its key and the domains holding a matching pod.
    affinity: Vec<(u32, HashSet<u32>)>,
    /// No pod matches the affinity terms yet and the pod matches them itself: the first
    /// pod of a group may go anywhere the keys exist (upstream's rule).
    first_of_group: bool,
    anti: Vec<(u32, HashSet<u32>)>,
    /// Domains (values by key) where an existing pod's required anti-affinity rejects
    /// this pod.
    forbidden: HashMap<u32, HashSet<u32>>,
    preferred: HashMap<(u32, u32), i64>,
    preferred_keys: Vec<u32>,
    spread: Vec<Spread>,
    /// VolumeBinding's per-pod check (pods with claims).
    pub volumes: Option<super::volume::Check>,
    /// Why no node can take the pod at all (upstream's PreFilter rejection), if so.
    pub prefilter: Option<String>,
}

impl State {
    /// None when neither the pod nor any placed pod has inter-pod constraints.
    pub fn compute(p: &PodInfo, c: &Ctx) -> Option<State> {
        let topology = p.has_pod_constraints() || c.cache.any_anti_affinity();
        if !topology && p.claims.is_empty() {
            return None;
        }
        let (volumes, prefilter) = if p.claims.is_empty() {
            (None, None)
        } else {
            match super::volume::Check::compute(p, &c.cache.volumes.read()) {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(e)),
            }
        };
        if !topology {
            return Some(State { volumes, prefilter, ..State::default() });
        }
        let mut st = State {
            affinity: p.affinity.iter().map(|t| (t.topology_key, HashSet::default())).collect(),
            anti: p.anti_affinity.iter().map(|t| (t.topology_key, HashSet::default())).collect(),
            ..State::default()
        };
        let mut keys: Vec<u32> = p.preferred_affinity.iter().chain(&p.preferred_anti_affinity).map(|(_, t)| t.topology_key).collect();
        keys.sort_unstable();
        keys.dedup();
        st.preferred_keys = keys;
        // Spread domains: nodes that pass the pod's node affinity (nodeAffinityPolicy
        // Honor) and carry the key.
        let spreads: Vec<&SpreadConstraint> = p.spread.iter().collect();
        let mut eligible = vec![false; c.t.len()];
        if !spreads.is_empty() {
            for (i, e) in eligible.iter_mut().enumerate() {
                *e = c.t.live[i] && affinity::required_matches(p, c, i);
            }
        }
        for sc in &spreads {
            let mut counts = HashMap::default();
            for (i, &ok) in eligible.iter().enumerate() {
                if ok {
                    if let Some(v) = c.t.label(i, sc.topology_key) {
                        counts.entry(v).or_insert(0i64);
                    }
                }
            }
            st.spread.push(Spread { key: sc.topology_key, max_skew: sc.max_skew, hard: sc.hard, counts, min: 0, self_match: p.selected_by(&sc.selector) });
        }
        let mut any_affinity_match = false;
        st.version = c.cache.for_each_placed(|i, q| {
            if q.uid == p.uid || q.deleting {
                return;
            }
            for (k, t) in p.affinity.iter().enumerate() {
                if t.matches(q) {
                    any_affinity_match = true;
                    if let Some(v) = c.t.label(i, t.topology_key) {
                        st.affinity[k].1.insert(v);
                    }
                }
            }
            for (k, t) in p.anti_affinity.iter().enumerate() {
                if t.matches(q) {
                    if let Some(v) = c.t.label(i, t.topology_key) {
                        st.anti[k].1.insert(v);
                    }
                }
            }
            for t in &q.anti_affinity {
                if t.matches(p) {
                    if let Some(v) = c.t.label(i, t.topology_key) {
                        st.forbidden.entry(t.topology_key).or_default().insert(v);
                    }
                }
            }
            for (w, t) in &p.preferred_affinity {
                if t.matches(q) {
                    if let Some(v) = c.t.label(i, t.topology_key) {
                        *st.preferred.entry((t.topology_key, v)).or_default() += w;
                    }
                }
            }
            for (w, t) in &p.preferred_anti_affinity {
                if t.matches(q) {
                    if let Some(v) = c.t.label(i, t.topology_key) {
                        *st.preferred.entry((t.topology_key, v)).or_default() -= w;
                    }
                }
            }
            for (k, sc) in spreads.iter().enumerate() {
                if eligible[i] && q.namespace == p.namespace && q.selected_by(&sc.selector) {
                    if let Some(v) = c.t.label(i, sc.topology_key) {
                        *st.spread[k].counts.entry(v).or_default() += 1;
                    }
                }
            }
        });
        st.volumes = volumes;
        st.prefilter = prefilter;
        st.topology = true;
        st.first_of_group = !any_affinity_match && p.affinity.iter().all(|t| t.matches(p));
        for (k, sc) in spreads.iter().enumerate() {
            let s = &mut st.spread[k];
            s.min = if (s.counts.len() as i64) < sc.min_domains { 0 } else { s.counts.values().copied().min().unwrap_or(0) };
        }
        Some(st)
    }

    /// PodTopologySpread then InterPodAffinity, as upstream orders them.
    pub fn filter(&self, c: &Ctx, i: usize) -> Failure {
        let fail = |bits| Failure { bits, ..Failure::default() };
        if let Some(bits) = self.volumes.as_ref().and_then(|v| v.filter(c, i)) {
            return fail(bits);
        }
        for s in self.spread.iter().filter(|s| s.hard) {
            let Some(v) = c.t.label(i, s.key) else { return fail(SPREAD_LABEL) };
            let count = s.counts.get(&v).copied().unwrap_or(0);
            if count + i64::from(s.self_match) - s.min > s.max_skew {
                return fail(SPREAD);
            }
        }
        if self.forbidden.iter().any(|(&k, vals)| c.t.label(i, k).is_some_and(|v| vals.contains(&v))) {
            return fail(EXISTING_ANTI);
        }
        for (k, domains) in &self.anti {
            if c.t.label(i, *k).is_some_and(|v| domains.contains(&v)) {
                return fail(ANTI);
            }
        }
        for (k, domains) in &self.affinity {
            let Some(v) = c.t.label(i, *k) else { return fail(POD_AFFINITY) };
            if !self.first_of_group && !domains.contains(&v) {
                return fail(POD_AFFINITY);
            }
        }
        Failure::default()
    }

    /// Raw InterPodAffinity score (weights of matching pods in the node's domains).
    pub fn affinity_raw(&self, c: &Ctx, i: usize) -> i64 {
        self.preferred_keys.iter().filter_map(|&k| c.t.label(i, k).and_then(|v| self.preferred.get(&(k, v)))).sum()
    }

    /// Raw PodTopologySpread score (matching pods in the node's domains; fewer is better),
    /// or None when the pod has no ScheduleAnyway constraint.
    pub fn spread_raw(&self, c: &Ctx, i: usize) -> Option<i64> {
        if self.spread.iter().all(|s| s.hard) {
            return None;
        }
        // A node without the key ranks below every domain.
        Some(self.spread.iter().filter(|s| !s.hard).map(|s| c.t.label(i, s.key).map_or(s.counts.values().copied().max().unwrap_or(0) + 1, |v| s.counts.get(&v).copied().unwrap_or(0))).sum())
    }
}
