//! NodeResourcesFit: the filter (requests fit in what is left of allocatable, and the pod
//! count limit) and its LeastAllocated score; NodeResourcesBalancedAllocation.

use super::Ctx;
use crate::model::PodInfo;

use super::{Failure, CPU, EPHEMERAL, MEMORY, PODS, SCALAR};

/// Which resources do not fit (upstream checks them all and reports each).
#[inline]
pub fn check(p: &PodInfo, c: &Ctx, i: usize) -> Failure {
    let mut f = Failure::default();
    if c.t.pod_count(i) + 1 > c.t.max_pods[i] {
        f.bits |= PODS;
    }
    let r = &p.requests;
    if r.milli_cpu > 0 && r.milli_cpu > c.t.alloc_cpu[i] - c.t.req_cpu(i) {
        f.bits |= CPU;
    }
    if r.memory > 0 && r.memory > c.t.alloc_memory[i] - c.t.req_memory(i) {
        f.bits |= MEMORY;
    }
    if r.ephemeral > 0 && r.ephemeral > c.t.alloc_ephemeral[i] - c.t.req_ephemeral(i) {
        f.bits |= EPHEMERAL;
    }
    for &(k, v) in &r.scalars {
        if v == 0 {
            continue;
        }
        let (alloc, used) = c.t.scalars[i].iter().find(|s| s.0 == k).map_or((0, 0), |s| (s.1, s.2.load(std::sync::atomic::Ordering::Relaxed)));
        if v > alloc - used {
            f.bits |= SCALAR;
            f.scalar = f.scalar.or(Some(k));
        }
    }
    f
}

#[inline]
pub fn fits(p: &PodInfo, c: &Ctx, i: usize) -> bool {
    check(p, c, i).bits == 0
}

/// LeastAllocated: the mean over cpu and memory of the share left free after placing the
/// pod, 0–100 (upstream's default NodeResourcesFit score, weights 1:1).
#[inline]
pub fn least_allocated(p: &PodInfo, c: &Ctx, i: usize) -> i64 {
    let part = |req: i64, alloc: i64| if alloc <= 0 || req > alloc { 0 } else { (alloc - req) * 100 / alloc };
    (part(c.t.nonzero_cpu(i) + p.nonzero_cpu, c.t.alloc_cpu[i]) + part(c.t.nonzero_memory(i) + p.nonzero_memory, c.t.alloc_memory[i])) / 2
}

/// BalancedAllocation: 100 × (1 − the standard deviation of the cpu and memory fractions
/// requested after placing the pod); for two resources the deviation is |a − b| / 2.
#[inline]
pub fn balanced(p: &PodInfo, c: &Ctx, i: usize) -> i64 {
    let frac = |req: i64, alloc: i64| if alloc <= 0 { 1.0 } else { (req as f64 / alloc as f64).min(1.0) };
    let cpu = frac(c.t.req_cpu(i) + p.requests.milli_cpu, c.t.alloc_cpu[i]);
    let m = frac(c.t.req_memory(i) + p.requests.memory, c.t.alloc_memory[i]);
    let std = (cpu - m).abs() / 2.0;
    ((1.0 - std) * 100.0) as i64
}

/// [`check`] as if the pods in `minus` had left node `i` and those in `plus` had arrived
/// (preemption's victims; pods nominated to the node by an earlier preemption). Host
/// ports included.
pub fn check_adjusted(p: &PodInfo, c: &Ctx, i: usize, minus: &[&PodInfo], plus: &[&PodInfo]) -> Failure {
    let delta = |f: &dyn Fn(&PodInfo) -> i64| plus.iter().map(|q| f(q)).sum::<i64>() - minus.iter().map(|q| f(q)).sum::<i64>();
    let mut out = Failure::default();
    if c.t.pod_count(i) + plus.len() as i64 - minus.len() as i64 + 1 > c.t.max_pods[i] {
        out.bits |= PODS;
    }
    let r = &p.requests;
    if r.milli_cpu > 0 && r.milli_cpu > c.t.alloc_cpu[i] - (c.t.req_cpu(i) + delta(&|q| q.requests.milli_cpu)) {
        out.bits |= CPU;
    }
    if r.memory > 0 && r.memory > c.t.alloc_memory[i] - (c.t.req_memory(i) + delta(&|q| q.requests.memory)) {
        out.bits |= MEMORY;
    }
    if r.ephemeral > 0 && r.ephemeral > c.t.alloc_ephemeral[i] - (c.t.req_ephemeral(i) + delta(&|q| q.requests.ephemeral)) {
        out.bits |= EPHEMERAL;
    }
    for &(k, v) in r.scalars.iter().filter(|(_, v)| *v > 0) {
        let (alloc, used) = c.t.scalars[i].iter().find(|s| s.0 == k).map_or((0, 0), |s| (s.1, s.2.load(std::sync::atomic::Ordering::Relaxed)));
        let amount = |q: &PodInfo| q.requests.scalars.iter().filter(|(n, _)| *n == k).map(|(_, a)| *a).sum::<i64>();
        if v > alloc - (used + delta(&amount)) {
            out.bits |= SCALAR;
            out.scalar = out.scalar.or(Some(k));
        }
    }
    if !p.host_ports.is_empty() {
        let used = c.t.ports[i].lock();
        let mut taken: Vec<&crate::model::HostPort> = used.iter().collect();
        for q in minus {
            for hp in &q.host_ports {
                if let Some(k) = taken.iter().position(|x| *x == hp) {
                    taken.swap_remove(k);
                }
            }
        }
        taken.extend(plus.iter().flat_map(|q| q.host_ports.iter()));
        if p.host_ports.iter().any(|want| taken.iter().any(|u| u.conflicts(want))) {
            out.bits |= super::PORTS;
        }
    }
    out
}
