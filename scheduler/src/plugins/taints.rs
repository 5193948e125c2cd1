//! TaintToleration (filter on NoSchedule/NoExecute, score on PreferNoSchedule) and
//! NodeUnschedulable.

use super::Ctx;
use crate::model::{Effect, PodInfo, Taint};

/// The first NoSchedule or NoExecute taint the pod does not tolerate.
#[inline]
pub fn untolerated(p: &PodInfo, c: &Ctx, i: usize) -> Option<Taint> {
    c.t.taints[i].iter().find(|x| x.effect != Effect::PreferNoSchedule && !p.tolerates(x)).copied()
}

/// PreferNoSchedule taints the pod does not tolerate (fewer is better; normalized reversed).
#[inline]
pub fn intolerable_preferred(p: &PodInfo, c: &Ctx, i: usize) -> i64 {
    c.t.taints[i].iter().filter(|x| x.effect == Effect::PreferNoSchedule && !p.tolerates(x)).count() as i64
}

/// `spec.unschedulable` nodes take only pods that tolerate
/// `node.kubernetes.io/unschedulable:NoSchedule`.
#[inline]
pub fn unschedulable(p: &PodInfo, c: &Ctx, i: usize) -> bool {
    c.t.unschedulable[i] && !p.tolerates(&Taint { key: c.unschedulable_key, value: c.names.get(""), effect: Effect::NoSchedule })
}
