//! NodePorts: a pod's host ports must be free on the node.

use super::Ctx;
use crate::model::PodInfo;

pub fn free(p: &PodInfo, c: &Ctx, i: usize) -> bool {
    p.host_ports.iter().all(|want| !c.t.ports[i].iter().any(|used| used.conflicts(want)))
}
