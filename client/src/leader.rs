//! Leader election through a coordination.k8s.io Lease in `kube-system` (the controllers use
//! `shoal-controller-manager`, the scheduler `shoal-scheduler`), as upstream components do: the holder renews it every 2 s; another candidate takes
//! it once it has not been renewed for its duration (15 s). Every write is conditioned on
//! the Lease's resourceVersion, so two candidates never both win.

use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::{time, Client};

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";
const DURATION_S: i64 = 15;

/// Whether this process currently holds the Lease; act only while it does.
#[derive(Clone, Default)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
    fn set(&self, v: bool) {
        self.0.store(v, Ordering::Release);
    }
}

/// Campaigns for and renews Lease `kube-system/<name>` as `me` until the process ends.
pub async fn run(client: Client, name: &'static str, me: String, lead: Leadership) {
    loop {
        let ok = try_acquire_or_renew(&client, name, &me).await;
        if ok != lead.is_leader() {
            tracing::info!(lease = name, identity = %me, leader = ok, "leadership changed");
        }
        lead.set(ok);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn try_acquire_or_renew(client: &Client, name: &str, me: &str) -> bool {
    let now = time::now_micro();
    match client.get(&format!("{PATH}/{name}")).await {
        Ok(None) => {
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name, "namespace": "kube-system"},
                "spec": {"holderIdentity": me, "leaseDurationSeconds": DURATION_S, "acquireTime": now, "renewTime": now, "leaseTransitions": 0}});
            client.create(PATH, &lease).await.is_ok()
        }
        Ok(Some(mut l)) => {
            let holder = l.pointer("/spec/holderIdentity").and_then(Value::as_str).unwrap_or("").to_string();
            let renewed = l.pointer("/spec/renewTime").and_then(Value::as_str).and_then(time::parse).unwrap_or(0);
            let dur = l.pointer("/spec/leaseDurationSeconds").and_then(Value::as_i64).unwrap_or(DURATION_S);
            let expired = renewed + dur < time::now_secs();
            if holder != me && !expired {
                return false;
            }
            if holder != me {
                let t = l.pointer("/spec/leaseTransitions").and_then(Value::as_i64).unwrap_or(0);
                l["spec"]["leaseTransitions"] = json!(t + 1);
                l["spec"]["acquireTime"] = json!(now);
                l["spec"]["holderIdentity"] = json!(me);
            }
            l["spec"]["renewTime"] = json!(now);
            l["spec"]["leaseDurationSeconds"] = json!(DURATION_S);
            client.update(&format!("{PATH}/{name}"), &l).await.is_ok()
        }
        Err(_) => false,
    }
}
