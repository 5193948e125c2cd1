//! Shoal's controllers, run inside `shoal server` while it holds the controller Lease:
//! level-triggered reconcilers over informers (list + watch of the public API) and work
//! queues. Today: namespace deletion, default ServiceAccounts, Deployments, ReplicaSets,
//! Endpoints/EndpointSlices, and the garbage collector.
//!
//! Architecture Invariant 3: a reconcile compares desired and observed state and acts on
//! the difference; every key is reconciled again on a periodic resync, so a missed event
//! only delays convergence. This crate talks to the API server only through
//! `shoal-client` (the REST API), never to its internals.

#![forbid(unsafe_code)]

pub mod daemonset;
pub mod deployment;
pub mod endpoints;
pub mod events;
pub mod gc;
pub mod hpa;
pub mod informer;
pub mod ipam;
pub mod loadbalancer;
pub mod namespace;
pub mod nodelifecycle;
pub mod pod;
pub mod queue;
pub mod quota;
pub mod replicaset;
pub mod serviceaccount;
pub mod statefulset;
pub mod volume;

use std::sync::Arc;
use std::time::Duration;

use shoal_client::Client;

/// Settings of the controller manager.
#[derive(Clone, Debug)]
pub struct Options {
    /// Identity in the leader Lease.
    pub identity: String,
    /// Period of the full resync.
    pub resync: Duration,
    /// Node lifecycle settings.
    pub nodes: nodelifecycle::Settings,
    /// Pod and service address ranges.
    pub plan: ipam::Plan,
    /// How often HorizontalPodAutoscalers are evaluated.
    pub hpa_sync: Duration,
    /// Addresses for Services of type LoadBalancer (empty: they stay pending).
    pub lb_pool: loadbalancer::Pool,
}

impl Default for Options {
    fn default() -> Self {
        Options { identity: format!("shoal-{}", std::process::id()), resync: Duration::from_secs(10), nodes: Default::default(), plan: Default::default(), hpa_sync: Duration::from_secs(15), lb_pool: Default::default() }
    }
}

pub use shoal_client::leader::Leadership;

/// Queues every key `inf` announces, mapped by `to_keys` (the object now and before).
pub(crate) fn feed<T, F>(inf: &informer::Informer<T>, q: &queue::WorkQueue, to_keys: F)
where
    T: informer::Cached,
    F: Fn(&str, Option<Arc<T>>, Option<Arc<T>>) -> Vec<String> + Send + 'static,
{
    let mut rx = inf.subscribe();
    let (q, inf) = (q.clone(), inf.clone());
    tokio::spawn(async move {
        while let Some((k, old)) = rx.recv().await {
            for key in to_keys(&k, inf.get(&k), old) {
                q.add(&key);
            }
        }
    });
}

/// The `namespace/owner` keys of the controller owners of kind `kind` of the objects given.
pub(crate) fn owner_keys<T: informer::Cached>(kind: &str, objs: [Option<Arc<T>>; 2]) -> Vec<String> {
    objs.into_iter()
        .flatten()
        .filter_map(|o| {
            let m = o.meta();
            let owner = m.owners.iter().find(|r| r.controller && &*r.kind == kind)?;
            Some(format!("{}/{}", m.namespace, owner.name))
        })
        .collect()
}

/// Runs a reconcile function over a queue with `workers` concurrent workers; failures are
/// retried with backoff, and nothing runs while another process leads.
pub(crate) fn spawn_workers<F, Fut>(name: &'static str, q: queue::WorkQueue, lead: Leadership, workers: usize, f: F)
where
    F: Fn(String) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    for _ in 0..workers.max(1) {
        let (q, lead, f) = (q.clone(), lead.clone(), f.clone());
        tokio::spawn(async move {
            loop {
                let key = q.next().await;
                if !lead.is_leader() {
                    q.done(&key, false);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                match f(key.clone()).await {
                    Ok(()) => q.done(&key, true),
                    Err(e) => {
                        tracing::debug!(controller = name, key = %key, error = %e, "reconcile failed; retrying");
                        q.done(&key, false);
                    }
                }
            }
        });
    }
}

/// Starts leader election and every controller on the current tokio runtime.
pub fn start(client: Client, opts: Options) -> Leadership {
    let lead = Leadership::default();
    tokio::spawn(shoal_client::leader::run(client.clone(), "shoal-controller-manager", opts.identity.clone(), lead.clone()));
    fn informer<T: informer::Cached>(client: &Client, path: &str, resync: Duration) -> informer::Informer<T> {
        let i = informer::Informer::new(path);
        tokio::spawn(i.clone().run(client.clone(), resync));
        i
    }
    let inf = |path: &str| informer::<serde_json::Value>(&client, path, opts.resync);
    let namespaces = inf("/api/v1/namespaces");
    let pods: informer::Informer<pod::Pod> = informer(&client, "/api/v1/pods", opts.resync);
    let replicasets = inf("/apis/apps/v1/replicasets");
    let deployments = inf("/apis/apps/v1/deployments");
    let services = inf("/api/v1/services");
    let slices = inf("/apis/discovery.k8s.io/v1/endpointslices");
    let accounts = inf("/api/v1/serviceaccounts");
    let nodes = inf("/api/v1/nodes");
    let node_leases = inf("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases");
    nodelifecycle::start(client.clone(), nodes.clone(), node_leases, pods.clone(), lead.clone(), opts.nodes.clone());
    ipam::start(client.clone(), nodes.clone(), lead.clone(), opts.plan.clone());
    let daemonsets = inf("/apis/apps/v1/daemonsets");
    daemonset::start(client.clone(), daemonsets.clone(), pods.clone(), nodes, lead.clone());
    let statefulsets = inf("/apis/apps/v1/statefulsets");
    statefulset::start(client.clone(), statefulsets.clone(), pods.clone(), lead.clone());
    serviceaccount::start(client.clone(), namespaces.clone(), accounts, lead.clone());
    namespace::start(client.clone(), namespaces, lead.clone());
    replicaset::start(client.clone(), replicasets.clone(), pods.clone(), lead.clone());
    deployment::start(client.clone(), deployments.clone(), replicasets.clone(), lead.clone());
    endpoints::start(client.clone(), services.clone(), pods.clone(), lead.clone());
    loadbalancer::start(client.clone(), services.clone(), opts.lb_pool.clone(), lead.clone());
    hpa::start(client.clone(), inf("/apis/autoscaling/v2/horizontalpodautoscalers"), pods.clone(), lead.clone(), opts.hpa_sync);
    let quotas = inf("/api/v1/resourcequotas");
    let claims = inf("/api/v1/persistentvolumeclaims");
    volume::start(client.clone(), claims.clone(), inf("/api/v1/persistentvolumes"), inf("/apis/storage.k8s.io/v1/storageclasses"), lead.clone());
    let counted = vec![
        ("services", services.clone()),
        ("configmaps", inf("/api/v1/configmaps")),
        ("secrets", inf("/api/v1/secrets")),
        ("persistentvolumeclaims", claims),
        ("deployments", deployments.clone()),
        ("replicasets", replicasets.clone()),
    ];
    quota::start(client.clone(), quotas, pods.clone(), counted, lead.clone());
    gc::start(
        client,
        vec![
            ("Pod", Arc::new(pods) as Arc<dyn gc::Watched>),
            ("ReplicaSet", Arc::new(replicasets)),
            ("Deployment", Arc::new(deployments)),
            ("Service", Arc::new(services)),
            ("EndpointSlice", Arc::new(slices)),
            ("DaemonSet", Arc::new(daemonsets)),
            ("StatefulSet", Arc::new(statefulsets)),
        ],
        lead.clone(),
    );
    lead
}
