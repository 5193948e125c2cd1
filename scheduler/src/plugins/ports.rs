//! NodePorts: a pod's host ports must be free on the node.

use super::Ctx;
use crate::model::PodInfo;

#[inline]
pub fn free(p: &PodInfo, c: &Ctx, i: usize) -> bool {
    if p.host_ports.is_empty() {
        return true;
    }
    let used = c.t.ports[i].lock();
    p.host_ports.iter().all(|want| !used.iter().any(|u| u.conflicts(want)))
}
