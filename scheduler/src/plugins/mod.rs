//! Filter and score plugins, each a plain function of (pod, cache view, node row) that does
//! no I/O and allocates nothing: the framework calls them for every node.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cache::{Cache, NodeTable};
use crate::model::{Interner, Taint};

pub mod affinity;
pub mod fit;
pub mod image;
pub mod podtopology;
pub mod ports;
pub mod taints;
pub mod volume;

/// A read-only view of the cache for one scheduling cycle.
pub struct Ctx<'a> {
    pub cache: &'a Cache,
    pub t: &'a NodeTable,
    pub names: &'a Interner,
    pub image_nodes: &'a HashMap<Arc<str>, u32>,
    pub total_nodes: usize,
    pub unschedulable_key: u32,
}

impl Cache {
    pub fn ctx(&self) -> Ctx<'_> {
        Ctx { cache: self, t: &self.nodes, names: &self.names, image_nodes: &self.image_nodes, total_nodes: self.live_nodes(), unschedulable_key: self.names.get(UNSCHEDULABLE_TAINT) }
    }
}

/// The taint that stands for `spec.unschedulable`.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

// Why a node was filtered out (bits of `Failure::bits`).
pub const UNSCHEDULABLE: u32 = 1 << 0;
pub const NODE_NAME: u32 = 1 << 1;
pub const TAINT: u32 = 1 << 2;
pub const AFFINITY: u32 = 1 << 3;
pub const PORTS: u32 = 1 << 4;
pub const CPU: u32 = 1 << 5;
pub const MEMORY: u32 = 1 << 6;
pub const EPHEMERAL: u32 = 1 << 7;
pub const PODS: u32 = 1 << 8;
pub const SCALAR: u32 = 1 << 9;
pub const SPREAD: u32 = 1 << 10;
pub const SPREAD_LABEL: u32 = 1 << 11;
pub const EXISTING_ANTI: u32 = 1 << 12;
pub const ANTI: u32 = 1 << 13;
pub const POD_AFFINITY: u32 = 1 << 14;
pub const VOLUME_AFFINITY: u32 = 1 << 15;
pub const VOLUME_BIND: u32 = 1 << 16;

/// The verdict of the filters on one node: empty means it fits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Failure {
    pub bits: u32,
    pub taint: Option<Taint>,
    pub scalar: Option<u32>,
}

/// Upstream's wording of each reason, as `FailedScheduling` events show it.
pub fn messages(f: &Failure, names: &Interner) -> Vec<String> {
    let mut out = Vec::new();
    let fixed: [(u32, &str); 15] = [
        (UNSCHEDULABLE, "node(s) were unschedulable"),
        (NODE_NAME, "node(s) didn't match the requested node name"),
        (AFFINITY, "node(s) didn't match Pod's node affinity/selector"),
        (PORTS, "node(s) didn't have free ports for the requested pod ports"),
        (CPU, "Insufficient cpu"),
        (MEMORY, "Insufficient memory"),
        (EPHEMERAL, "Insufficient ephemeral-storage"),
        (PODS, "Too many pods"),
        (SPREAD, "node(s) didn't match pod topology spread constraints"),
        (SPREAD_LABEL, "node(s) didn't match pod topology spread constraints (missing required label)"),
        (EXISTING_ANTI, "node(s) didn't satisfy existing pods anti-affinity rules"),
        (ANTI, "node(s) didn't match pod anti-affinity rules"),
        (POD_AFFINITY, "node(s) didn't match pod affinity rules"),
        (VOLUME_AFFINITY, "node(s) had volume node affinity conflict"),
        (VOLUME_BIND, "node(s) didn't find available persistent volumes to bind"),
    ];
    for (bit, msg) in fixed {
        if f.bits & bit != 0 {
            out.push(msg.to_string());
        }
    }
    if f.bits & TAINT != 0 {
        if let Some(t) = f.taint {
            out.push(format!("node(s) had untolerated taint {{{}: {}}}", names.name(t.key), names.name(t.value)));
        }
    }
    if f.bits & SCALAR != 0 {
        if let Some(s) = f.scalar {
            out.push(format!("Insufficient {}", names.name(s)));
        }
    }
    out
}
