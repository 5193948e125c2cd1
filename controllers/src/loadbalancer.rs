//! Services of type LoadBalancer get an address from a configured pool
//! (`--load-balancer-ip-pool`), as a bare-metal load-balancer controller (MetalLB-style)
//! does: written to `status.loadBalancer.ingress`, kept across restarts (read back from
//! the services), released when the service goes or changes type. Services with a
//! `loadBalancerClass` belong to another controller and are left alone. Without a pool,
//! LoadBalancer services stay pending, as on a cluster without a cloud provider.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{json, Value};
use shoal_client::Client;

use crate::informer::Informer;
use crate::ipam::Cidr;
use crate::queue::WorkQueue;
use crate::Leadership;

/// Address ranges (inclusive) to hand out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pool {
    pub ranges: Vec<(u32, u32)>,
}

impl Pool {
    /// `a.b.c.d/n` and `a.b.c.d-a.b.c.e`, comma separated. A CIDR wider than /31 leaves out
    /// its network and broadcast addresses.
    pub fn parse(s: &str) -> Result<Pool, String> {
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let a: Ipv4Addr = a.trim().parse().map_err(|_| format!("{part:?}: {a:?} is not an IPv4 address"))?;
                let b: Ipv4Addr = b.trim().parse().map_err(|_| format!("{part:?}: {b:?} is not an IPv4 address"))?;
                if u32::from(a) > u32::from(b) {
                    return Err(format!("{part:?}: the range ends before it starts"));
                }
                ranges.push((u32::from(a), u32::from(b)));
            } else {
                let c = Cidr::parse(part)?;
                let last = c.base + ((1u64 << (32 - c.prefix)) - 1) as u32;
                ranges.push(if c.prefix < 31 { (c.base + 1, last - 1) } else { (c.base, last) });
            }
        }
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                if a.0 <= b.1 && b.0 <= a.1 {
                    return Err(format!("the pool's ranges {}-{} and {}-{} overlap", Ipv4Addr::from(a.0), Ipv4Addr::from(a.1), Ipv4Addr::from(b.0), Ipv4Addr::from(b.1)));
                }
            }
        }
        Ok(Pool { ranges })
    }

    pub fn contains(&self, ip: u32) -> bool {
        self.ranges.iter().any(|(a, b)| (*a..=*b).contains(&ip))
    }

    /// Whether any address of the pool lies in `c`.
    pub fn overlaps(&self, c: &Cidr) -> bool {
        let end = u64::from(c.base) + (1u64 << (32 - c.prefix));
        self.ranges.iter().any(|(a, b)| u64::from(*a) < end && u64::from(c.base) <= u64::from(*b))
    }

    /// The lowest address not in `used`.
    pub fn first_free(&self, used: &dyn Fn(u32) -> bool) -> Option<u32> {
        self.ranges.iter().flat_map(|(a, b)| *a..=*b).find(|ip| !used(*ip))
    }
}

fn ingress_ip(svc: &Value) -> Option<u32> {
    svc.pointer("/status/loadBalancer/ingress/0/ip").and_then(Value::as_str).and_then(|s| s.parse::<Ipv4Addr>().ok()).map(u32::from)
}

fn wants_address(svc: &Value) -> bool {
    svc.pointer("/spec/type").and_then(Value::as_str) == Some("LoadBalancer") && svc.pointer("/spec/loadBalancerClass").and_then(Value::as_str).is_none_or(str::is_empty) && svc.pointer("/metadata/deletionTimestamp").is_none()
}

pub fn start(client: Client, services: Informer, pool: Pool, lead: Leadership) {
    if pool.ranges.is_empty() {
        return;
    }
    let q = WorkQueue::default();
    crate::feed(&services, &q, |k, _, _| vec![k.to_string()]);
    // Addresses this controller handed out, by service key, until the informer shows them.
    let claimed: Arc<Mutex<BTreeMap<u32, String>>> = Default::default();
    // A freed address may unblock a pending service: every pending one is requeued.
    let pending: Arc<Mutex<HashMap<String, ()>>> = Default::default();
    let requeue = q.clone();
    crate::spawn_workers("loadbalancer", q, lead, 1, move |key| {
        let (client, services, pool, claimed, pending, requeue) = (client.clone(), services.clone(), pool.clone(), claimed.clone(), pending.clone(), requeue.clone());
        async move {
            let svc = services.get(&key);
            let path = |s: &Value| format!("/api/v1/namespaces/{}/services/{}/status", s.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(""), s.pointer("/metadata/name").and_then(Value::as_str).unwrap_or(""));
            let Some(svc) = svc.filter(|s| wants_address(s)) else {
                // Gone or no longer a LoadBalancer: release, clear what we wrote.
                let freed = {
                    let mut c = claimed.lock();
                    let before = c.len();
                    c.retain(|_, k| *k != key);
                    before != c.len()
                };
                pending.lock().remove(&key);
                if let Some(s) = services.get(&key) {
                    if ingress_ip(&s).is_some_and(|ip| pool.contains(ip)) && s.pointer("/spec/loadBalancerClass").and_then(Value::as_str).is_none_or(str::is_empty) {
                        client.merge_patch(&path(&s), &json!({"status": {"loadBalancer": {"ingress": null}}})).await.map_err(|e| e.to_string())?;
                    }
                }
                if freed {
                    for k in pending.lock().keys() {
                        requeue.add(k);
                    }
                }
                return Ok(());
            };
            // Addresses in use: every other service's, and our recent claims.
            let others: HashMap<u32, String> = services.list(|s| wants_address(s)).iter().filter_map(|s| Some((ingress_ip(s)?, crate::informer::key_of(s)))).filter(|(_, k)| *k != key).collect();
            let used = |ip: u32| others.contains_key(&ip) || claimed.lock().get(&ip).is_some_and(|k| *k != key);
            if let Some(ip) = ingress_ip(&svc).filter(|ip| pool.contains(*ip)) {
                if !used(ip) {
                    claimed.lock().insert(ip, key.clone());
                    return Ok(());
                }
            }
            let requested = svc.pointer("/spec/loadBalancerIP").and_then(Value::as_str).filter(|s| !s.is_empty());
            let ip = match requested {
                Some(r) => match r.parse::<Ipv4Addr>().map(u32::from) {
                    Ok(ip) if pool.contains(ip) && !used(ip) => Some(ip),
                    Ok(ip) if pool.contains(ip) => {
                        crate::events::record(&client, &svc, "Warning", "AllocationFailed", &format!("Failed to allocate IP for \"{key}\": {} is already in use", Ipv4Addr::from(ip)), "service-controller").await;
                        None
                    }
                    _ => {
                        crate::events::record(&client, &svc, "Warning", "AllocationFailed", &format!("Failed to allocate IP for \"{key}\": {r} is not in the load balancer pool"), "service-controller").await;
                        None
                    }
                },
                None => pool.first_free(&used),
            };
            let Some(ip) = ip else {
                if requested.is_none() && !pending.lock().contains_key(&key) {
                    crate::events::record(&client, &svc, "Warning", "AllocationFailed", &format!("Failed to allocate IP for \"{key}\": no available IPs in the load balancer pool"), "service-controller").await;
                }
                pending.lock().insert(key.clone(), ());
                return Ok(());
            };
            pending.lock().remove(&key);
            claimed.lock().insert(ip, key.clone());
            crate::events::record(&client, &svc, "Normal", "EnsuringLoadBalancer", "Ensuring load balancer", "service-controller").await;
            client.merge_patch(&path(&svc), &json!({"status": {"loadBalancer": {"ingress": [{"ip": Ipv4Addr::from(ip).to_string(), "ipMode": "VIP"}]}}})).await.map_err(|e| e.to_string())?;
            crate::events::record(&client, &svc, "Normal", "EnsuredLoadBalancer", "Ensured load balancer", "service-controller").await;
            Ok(())
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_parse_and_allocate_lowest_first() {
        let p = Pool::parse("192.0.2.0/30, 198.51.100.10-198.51.100.11").unwrap();
        let ip = |s: &str| u32::from(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(p.ranges, vec![(ip("192.0.2.1"), ip("192.0.2.2")), (ip("198.51.100.10"), ip("198.51.100.11"))]);
        assert_eq!(p.first_free(&|_| false), Some(ip("192.0.2.1")));
        assert_eq!(p.first_free(&|x| x < ip("198.51.100.11")), Some(ip("198.51.100.11")));
        assert_eq!(p.first_free(&|_| true), None);
        assert!(p.overlaps(&Cidr::parse("192.0.2.0/24").unwrap()));
        assert!(!p.overlaps(&Cidr::parse("10.0.0.0/8").unwrap()));
        assert!(Pool::parse("192.0.2.9-192.0.2.1").is_err());
        assert!(Pool::parse("192.0.2.0/24,192.0.2.5-192.0.2.6").unwrap_err().contains("overlap"));
        assert!(Pool::parse("nope").is_err());
        assert_eq!(Pool::parse("").unwrap(), Pool::default());
    }
}
