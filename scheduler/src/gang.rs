//! Gang scheduling: pods labelled `shoal.io/pod-group: NAME` with the annotation
//! `shoal.io/pod-group-min-member: "N"` are bound all or none. Each member that gets a
//! node keeps its reservation and waits (upstream's Permit "wait", as the coscheduling
//! plugin does); when N members of the group hold nodes they are all released to bind,
//! and later members bind at once. If the group does not reach N within its timeout
//! (`shoal.io/pod-group-timeout-seconds`, default 60), every waiting member gives its node
//! back and returns to the queue, so a half-placed job never holds the cluster.
//! Pure bookkeeping with time passed in; the driver acts on what it returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::PodInfo;

pub const GROUP_LABEL: &str = "shoal.io/pod-group";
pub const MIN_MEMBER_ANNOTATION: &str = "shoal.io/pod-group-min-member";
pub const TIMEOUT_ANNOTATION: &str = "shoal.io/pod-group-timeout-seconds";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A pod's group: (namespace, name), minimum members, timeout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub group: (Arc<str>, Arc<str>),
    pub min_member: usize,
    pub timeout: Duration,
}

struct Gang<T> {
    min: usize,
    timeout: Duration,
    waiting: Vec<(Arc<PodInfo>, T)>,
    since: Option<Instant>,
    /// Reached its quorum: further members go through.
    admitted: bool,
}

/// What to do with a member that just got a node.
pub enum Permit<T> {
    /// Hold it (its reservation stays) until the group is complete.
    Wait,
    /// Bind these (the member, and the ones that were waiting).
    Release(Vec<(Arc<PodInfo>, T)>),
}

/// The groups with members holding nodes. `T` is whatever the driver needs to bind.
pub struct Gangs<T> {
    groups: HashMap<(Arc<str>, Arc<str>), Gang<T>>,
}

impl<T> Default for Gangs<T> {
    fn default() -> Self {
        Gangs { groups: HashMap::new() }
    }
}

impl<T> Gangs<T> {
    /// A member got a node at `now`.
    pub fn permit(&mut self, m: &Membership, pod: Arc<PodInfo>, bind: T, now: Instant) -> Permit<T> {
        let g = self.groups.entry(m.group.clone()).or_insert(Gang { min: m.min_member, timeout: m.timeout, waiting: Vec::new(), since: None, admitted: false });
        g.min = m.min_member;
        if g.admitted {
            return Permit::Release(vec![(pod, bind)]);
        }
        g.waiting.retain(|(p, _)| p.uid != pod.uid);
        g.waiting.push((pod, bind));
        g.since.get_or_insert(now);
        if g.waiting.len() >= g.min {
            g.admitted = true;
            g.since = None;
            return Permit::Release(std::mem::take(&mut g.waiting));
        }
        Permit::Wait
    }

    /// Groups whose wait ran out at `now`: their waiting members, to be given back.
    pub fn expired(&mut self, now: Instant) -> Vec<((Arc<str>, Arc<str>), usize, Vec<(Arc<PodInfo>, T)>)> {
        let mut out = Vec::new();
        for (k, g) in self.groups.iter_mut() {
            if let Some(since) = g.since {
                if now.duration_since(since) >= g.timeout {
                    g.since = None;
                    out.push((k.clone(), g.min, std::mem::take(&mut g.waiting)));
                }
            }
        }
        out
    }

    /// A member left (deleted): it no longer waits.
    pub fn forget(&mut self, uid: &str) {
        for g in self.groups.values_mut() {
            g.waiting.retain(|(p, _)| &*p.uid != uid);
        }
    }

    /// Members waiting, for metrics.
    pub fn waiting(&self) -> usize {
        self.groups.values().map(|g| g.waiting.len()).sum()
    }
}

impl PodInfo {
    /// The pod's gang, when it names one with a valid minimum.
    pub fn gang(&self) -> Option<Membership> {
        let name = self.labels.iter().find(|(k, _)| &**k == GROUP_LABEL).map(|(_, v)| v.clone())?;
        let min = self.gang_min?;
        Some(Membership { group: (self.namespace.clone(), name), min_member: min.max(1), timeout: self.gang_timeout.unwrap_or(DEFAULT_TIMEOUT) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Interner;
    use serde_json::json;

    fn member(name: &str) -> Arc<PodInfo> {
        Arc::new(PodInfo::from_value(
            &json!({"metadata": {"name": name, "namespace": "ml", "uid": name, "labels": {GROUP_LABEL: "train"}, "annotations": {MIN_MEMBER_ANNOTATION: "3", TIMEOUT_ANNOTATION: "10"}}, "spec": {"containers": []}}),
            &mut Interner::default(),
        ))
    }

    #[test]
    fn all_or_none() {
        let t0 = Instant::now();
        let mut g: Gangs<u32> = Gangs::default();
        let m = member("a").gang().expect("a gang member");
        assert_eq!((m.min_member, m.timeout), (3, Duration::from_secs(10)));
        assert!(matches!(g.permit(&m, member("a"), 1, t0), Permit::Wait));
        assert!(matches!(g.permit(&m, member("b"), 2, t0), Permit::Wait));
        assert_eq!(g.waiting(), 2);
        match g.permit(&m, member("c"), 3, t0) {
            Permit::Release(v) => assert_eq!(v.iter().map(|x| x.1).collect::<Vec<_>>(), [1, 2, 3]),
            Permit::Wait => panic!("the third member completes the group"),
        }
        // Later members go through at once.
        assert!(matches!(g.permit(&m, member("d"), 4, t0), Permit::Release(v) if v.len() == 1));
        assert!(g.expired(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn an_incomplete_group_gives_its_nodes_back_after_the_timeout() {
        let t0 = Instant::now();
        let mut g: Gangs<u32> = Gangs::default();
        let m = member("a").gang().unwrap();
        assert!(matches!(g.permit(&m, member("a"), 1, t0), Permit::Wait));
        assert!(matches!(g.permit(&m, member("b"), 2, t0 + Duration::from_secs(5)), Permit::Wait));
        assert!(g.expired(t0 + Duration::from_secs(9)).is_empty());
        let exp = g.expired(t0 + Duration::from_secs(10));
        assert_eq!((exp.len(), exp[0].1, exp[0].2.len()), (1, 3, 2));
        assert_eq!(g.waiting(), 0);
        // A retry starts a new wait.
        assert!(matches!(g.permit(&m, member("a"), 1, t0 + Duration::from_secs(11)), Permit::Wait));
        g.forget("a");
        assert_eq!(g.waiting(), 0);
    }
}
