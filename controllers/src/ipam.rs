//! Node IPAM: every node gets a pod CIDR (`spec.podCIDR`, a /24 by default) from the
//! cluster CIDR (10.0.0.0/8), skipping any that overlaps the service CIDR (10.96.0.0/12,
//! carved out of the cluster range). Allocations are derived from the nodes themselves, so
//! the controller keeps no state of its own.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use serde_json::{json, Value};
use shoal_client::Client;

use crate::informer::Informer;
use crate::queue::WorkQueue;
use crate::Leadership;

/// An IPv4 CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub base: u32,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, p) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?}: {ip:?} is not an IPv4 address"))?;
        let prefix: u8 = p.parse().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{s:?}: bad prefix length"))?;
        let base = u32::from(ip);
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        if base & !mask != 0 {
            return Err(format!("{s:?} has host bits set (did you mean {}/{prefix}?)", Ipv4Addr::from(base & mask)));
        }
        Ok(Cidr { base, prefix })
    }
    fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }
    fn end(&self) -> u64 {
        u64::from(self.base) + self.size()
    }
    pub fn overlaps(&self, o: &Cidr) -> bool {
        u64::from(self.base) < o.end() && u64::from(o.base) < self.end()
    }
    pub fn contains(&self, o: &Cidr) -> bool {
        self.base <= o.base && o.end() <= self.end()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

/// The address plan.
#[derive(Clone, Debug)]
pub struct Plan {
    pub cluster: Cidr,
    pub service: Cidr,
    pub node_mask: u8,
}

impl Default for Plan {
    fn default() -> Self {
        Plan { cluster: Cidr::parse("10.0.0.0/8").expect("literal"), service: Cidr::parse("10.96.0.0/12").expect("literal"), node_mask: 24 }
    }
}

impl Plan {
    /// Refuses a plan where node ranges cannot be carved out cleanly.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_mask <= self.cluster.prefix || self.node_mask > 30 {
            return Err(format!("the node CIDR mask /{} must be longer than the cluster CIDR's /{} and at most /30", self.node_mask, self.cluster.prefix));
        }
        if self.service.contains(&self.cluster) {
            return Err(format!("the service CIDR {} covers the whole cluster CIDR {}: no pod range is left", self.service, self.cluster));
        }
        if self.service.overlaps(&self.cluster) && !self.cluster.contains(&self.service) {
            return Err(format!("the service CIDR {} overlaps the cluster CIDR {} without being carved out of it", self.service, self.cluster));
        }
        Ok(())
    }

    /// The first node range not in `used` and not overlapping the service range.
    pub fn next_free(&self, used: &HashSet<u32>) -> Option<Cidr> {
        let step = 1u64 << (32 - self.node_mask);
        let mut at = u64::from(self.cluster.base);
        while at < self.cluster.end() {
            let c = Cidr { base: at as u32, prefix: self.node_mask };
            if !used.contains(&c.base) && !c.overlaps(&self.service) {
                return Some(c);
            }
            at += step;
        }
        None
    }
}

pub fn start(client: Client, nodes: Informer, lead: Leadership, plan: Plan) {
    let q = WorkQueue::default();
    crate::feed(&nodes, &q, |k, _, _| vec![k.to_string()]);
    // Ranges this process handed out and may not see in its cache yet (one worker: no race
    // among its own allocations; a new leader starts from the nodes it observes).
    let handed_out: std::sync::Arc<parking_lot::Mutex<HashSet<u32>>> = Default::default();
    crate::spawn_workers("nodeipam", q, lead, 1, move |name| {
        let (client, nodes, plan, handed_out) = (client.clone(), nodes.clone(), plan.clone(), handed_out.clone());
        async move {
            let Some(node) = nodes.get(&name) else { return Ok(()) };
            if node.pointer("/spec/podCIDR").and_then(Value::as_str).is_some_and(|c| !c.is_empty()) {
                return Ok(());
            }
            let mut used: HashSet<u32> = nodes.list(|_| true).iter().filter_map(|n| n.pointer("/spec/podCIDR").and_then(Value::as_str)).filter_map(|c| Cidr::parse(c).ok()).map(|c| c.base).collect();
            used.extend(handed_out.lock().iter().copied());
            let Some(cidr) = plan.next_free(&used) else {
                crate::events::record(&client, &node, "Warning", "CIDRNotAvailable", &format!("Node {name} status is now: CIDRNotAvailable"), "node-ipam-controller").await;
                return Err("no pod CIDR left".into());
            };
            // Conditioned on the node's resourceVersion: two allocations cannot race.
            let patch = json!({"metadata": {"resourceVersion": node.pointer("/metadata/resourceVersion")}, "spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]}});
            client.merge_patch(&format!("/api/v1/nodes/{name}"), &patch).await.map_err(|e| e.to_string())?;
            handed_out.lock().insert(cidr.base);
            Ok(())
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let p = Plan::default();
        p.validate().unwrap();
        let mut used = HashSet::new();
        let first = p.next_free(&used).unwrap();
        assert_eq!(first.to_string(), "10.0.0.0/24");
        used.insert(first.base);
        assert_eq!(p.next_free(&used).unwrap().to_string(), "10.0.1.0/24");
        // The service range is skipped.
        let mut full: HashSet<u32> = (0..0x6000u32).map(|i| 0x0A00_0000 + (i << 8)).collect();
        full.insert(first.base);
        assert_eq!(p.next_free(&full).unwrap().to_string(), "10.112.0.0/24");
        assert!(Plan { node_mask: 8, ..Plan::default() }.validate().is_err());
        assert!(Plan { cluster: Cidr::parse("10.96.0.0/16").unwrap(), ..Plan::default() }.validate().is_err());
        assert!(Plan { service: Cidr::parse("10.0.0.0/7").unwrap(), ..Plan::default() }.validate().is_err());
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("host bits"));
    }
}
