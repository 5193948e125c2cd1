//! Preemption (upstream's DefaultPreemption): when a pod fits nowhere, find the node where
//! evicting lower-priority pods makes room, evicting as few and as unimportant pods as
//! possible and preferring not to break PodDisruptionBudgets. Pure: it reads the cache and
//! returns the victims; the driver sets `nominatedNodeName` and deletes them.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cache::Cache;
use crate::framework::filter;
use crate::model::{PodInfo, Selector};
use crate::plugins::{Ctx, Failure, CPU, EPHEMERAL, MEMORY, PODS, PORTS, SCALAR};

/// A PodDisruptionBudget as preemption reads it.
#[derive(Clone, Debug)]
pub struct Budget {
    pub namespace: Arc<str>,
    pub selector: Selector,
    /// `status.disruptionsAllowed`.
    pub allowed: i64,
}

/// The chosen node and the pods to evict there.
#[derive(Debug)]
pub struct Preemption {
    pub node: usize,
    pub node_name: Arc<str>,
    pub victims: Vec<Arc<PodInfo>>,
}

/// Failures that evicting pods can cure; anything else (taints, affinity, node name...)
/// rules the node out.
const RESOLVABLE: u32 = CPU | MEMORY | EPHEMERAL | PODS | SCALAR | PORTS;

/// Whether `p` fits on node `i` once `gone` have left (resources, pod count, host ports).
fn fits_without(p: &PodInfo, c: &Ctx, i: usize, gone: &[&Arc<PodInfo>]) -> bool {
    let minus: Vec<&PodInfo> = gone.iter().map(|q| &***q).collect();
    crate::plugins::fit::check_adjusted(p, c, i, &minus, &[]).bits == 0
}

/// Whether evicting `q` breaks a budget (counting the evictions already planned).
fn violates(q: &PodInfo, budgets: &[Budget], spent: &mut HashMap<usize, i64>) -> bool {
    let mut broke = false;
    for (k, b) in budgets.iter().enumerate() {
        if b.namespace == q.namespace && b.selector.matches(&q.labels) {
            let used = spent.entry(k).or_default();
            *used += 1;
            if b.allowed - *used < 0 {
                broke = true;
            }
        }
    }
    broke
}

/// Upstream's eligibility: a pod that already nominated a node where lower-priority pods
/// are terminating waits for them rather than preempting again.
pub fn eligible(p: &PodInfo, by_node: &HashMap<usize, Vec<Arc<PodInfo>>>, cache: &Cache) -> bool {
    if p.never_preempts {
        return false;
    }
    match p.nominated_node.as_ref().and_then(|n| cache.node_index(n)) {
        Some(i) => !by_node.get(&i).is_some_and(|pods| pods.iter().any(|q| q.deleting && q.priority < p.priority)),
        None => true,
    }
}

/// Chooses the node and the victims, or None when no eviction can make room.
pub fn find(p: &PodInfo, cache: &Cache, budgets: &[Budget]) -> Option<Preemption> {
    let by_node = cache.pods_by_node();
    if !eligible(p, &by_node, cache) {
        return None;
    }
    let c = cache.ctx();
    let st = crate::plugins::podtopology::State::compute(p, &c);
    // (violations, highest victim priority, sum of priorities, count) — lower is better.
    let mut best: Option<((usize, i64, i64, usize), usize, Vec<Arc<PodInfo>>)> = None;
    for (&i, pods) in &by_node {
        if !c.t.live[i] {
            continue;
        }
        let f: Failure = filter(p, &c, st.as_ref(), i);
        if f.bits == 0 || f.bits & !RESOLVABLE != 0 {
            continue; // fits already (a race), or eviction cannot help
        }
        let mut lower: Vec<&Arc<PodInfo>> = pods.iter().filter(|q| q.priority < p.priority && !q.deleting).collect();
        if lower.is_empty() || !fits_without(p, &c, i, &lower) {
            continue;
        }
        // Reprieve as many as possible, most important first; pods whose eviction would
        // break a budget get the first chance.
        lower.sort_by(|a, b| b.priority.cmp(&a.priority));
        let mut spent = HashMap::new();
        let (breaking, safe): (Vec<&Arc<PodInfo>>, Vec<&Arc<PodInfo>>) = lower.iter().partition(|q| violates(q, budgets, &mut spent));
        let mut victims: Vec<&Arc<PodInfo>> = lower.clone();
        let mut violations = 0usize;
        for (group, counts) in [(&breaking, true), (&safe, false)] {
            for q in group.iter() {
                let without: Vec<&Arc<PodInfo>> = victims.iter().filter(|v| v.uid != q.uid).copied().collect();
                if fits_without(p, &c, i, &without) {
                    victims = without; // reprieved
                } else if counts {
                    violations += 1;
                }
            }
        }
        let key = (violations, victims.iter().map(|v| v.priority as i64).max().unwrap_or(i64::MIN), victims.iter().map(|v| v.priority as i64 + (1 << 31)).sum::<i64>(), victims.len());
        if best.as_ref().is_none_or(|(k, bi, _)| key < *k || (key == *k && i < *bi)) {
            best = Some((key, i, victims.into_iter().cloned().collect()));
        }
    }
    best.map(|(_, i, victims)| Preemption { node: i, node_name: c.t.names[i].clone(), victims })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeSpec;
    use serde_json::{json, Value};

    fn cache() -> Cache {
        let mut c = Cache::default();
        for (n, taint) in [("n1", false), ("n2", false), ("tainted", true)] {
            let mut v = json!({"metadata": {"name": n}, "status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "10"}}});
            if taint {
                v["spec"] = json!({"taints": [{"key": "x", "effect": "NoSchedule"}]});
            }
            let s = NodeSpec::from_value(&v, &mut c.names);
            c.upsert_node(s);
        }
        c
    }

    fn pod(c: &mut Cache, name: &str, cpu: &str, priority: i64, node: Option<&str>, labels: Value) -> PodInfo {
        PodInfo::from_value(&json!({"metadata": {"name": name, "namespace": "d", "uid": name, "labels": labels},
            "spec": {"nodeName": node, "priority": priority, "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}}), &mut c.names)
    }

    fn names(v: &[Arc<PodInfo>]) -> Vec<String> {
        let mut n: Vec<String> = v.iter().map(|p| p.name.to_string()).collect();
        n.sort();
        n
    }

    #[test]
    fn evicts_the_fewest_least_important_pods() {
        let mut c = cache();
        // n1: two low pods (priority 1 and 2); n2: one mid pod (priority 5) using all of it;
        // the tainted node has room but the pod does not tolerate it.
        for (name, cpu, prio, node) in [("low1", "1", 1, "n1"), ("low2", "1", 2, "n1"), ("mid", "2", 5, "n2")] {
            let p = pod(&mut c, name, cpu, prio, Some(node), json!({}));
            c.set_bound_pod(p);
        }
        let high = pod(&mut c, "high", "1", 10, None, json!({}));
        let pre = find(&high, &c, &[]).expect("room can be made");
        // Evicting one pod of n1 (the least important, priority 1) beats evicting mid.
        assert_eq!((&*pre.node_name, names(&pre.victims)), ("n1", vec!["low1".to_string()]));
        // Needing the whole node: both of n1 (max victim priority 2) beat mid (5).
        let big = pod(&mut c, "big", "2", 10, None, json!({}));
        let pre = find(&big, &c, &[]).unwrap();
        assert_eq!((&*pre.node_name, names(&pre.victims)), ("n1", vec!["low1".to_string(), "low2".to_string()]));
        // A pod of equal or lower priority preempts nothing; Never never does.
        assert!(find(&pod(&mut c, "peer", "2", 1, None, json!({})), &c, &[]).is_none());
        let mut never = pod(&mut c, "never", "1", 10, None, json!({}));
        never.never_preempts = true;
        assert!(find(&never, &c, &[]).is_none());
    }

    #[test]
    fn budgets_are_respected_when_possible() {
        let mut c = cache();
        for (name, node, app) in [("a", "n1", "guarded"), ("b", "n2", "free")] {
            let p = pod(&mut c, name, "2", 1, Some(node), json!({"app": app}));
            c.set_bound_pod(p);
        }
        let budgets = [Budget { namespace: Arc::from("d"), selector: Selector::compile(&json!({"matchLabels": {"app": "guarded"}})), allowed: 0 }];
        let high = pod(&mut c, "high", "1", 10, None, json!({}));
        let pre = find(&high, &c, &budgets).unwrap();
        assert_eq!((&*pre.node_name, names(&pre.victims)), ("n2", vec!["b".to_string()]));
    }

    #[test]
    fn room_made_for_a_nominated_pod_is_kept_for_it() {
        let mut c = cache();
        let v = pod(&mut c, "victim", "2", 1, Some("n1"), json!({}));
        c.set_bound_pod(v);
        let filler = pod(&mut c, "filler", "2", 1, Some("n2"), json!({}));
        c.set_bound_pod(filler);
        let vip = Arc::new(pod(&mut c, "vip", "2", 10, None, json!({})));
        let low = pod(&mut c, "low", "1", 1, None, json!({}));
        c.nominate(vip.clone(), Arc::from("n1"));
        c.remove_pod("victim"); // the victim is gone
        let ctx = c.ctx();
        let i = c.node_index("n1").unwrap();
        // A lower-priority pod may not take n1; the nominated pod may.
        assert_eq!(crate::framework::filter(&low, &ctx, None, i).bits, CPU);
        assert_eq!(crate::framework::filter(&vip, &ctx, None, i).bits, 0);
        drop(ctx);
        c.clear_nomination("vip");
        assert_eq!(crate::framework::filter(&low, &c.ctx(), None, i).bits, 0);
    }

    #[test]
    fn a_nominated_pod_waits_for_its_victims() {
        let mut c = cache();
        let mut v = pod(&mut c, "going", "2", 1, Some("n1"), json!({}));
        v.deleting = true;
        c.set_bound_pod(v);
        let other = pod(&mut c, "other", "2", 1, Some("n2"), json!({}));
        c.set_bound_pod(other);
        let mut p = pod(&mut c, "high", "1", 10, None, json!({}));
        p.nominated_node = Some(Arc::from("n1"));
        assert!(find(&p, &c, &[]).is_none(), "its victim on n1 is still terminating");
        p.nominated_node = None;
        assert_eq!(&*find(&p, &c, &[]).unwrap().node_name, "n2");
    }
}
