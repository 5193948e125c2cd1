//! The scheduler's side of the operator API (`shoal.admin.v1.SchedulerAdmin`): show and
//! change profiles at runtime (validated as a whole; a refused change leaves the old
//! profile in place), queue statistics, and "explain" — every node's filter verdict and
//! score for a pending pod.

use std::collections::HashMap;
use std::sync::Arc;

use shoal_proto::admin as pb;
use tonic::{Request, Response, Status};

use crate::driver::Handle;
use crate::framework::{feasible_nodes, filter, schedule_one, score, Profile, Rng, Weights};
use crate::plugins::{messages, podtopology::State};

fn to_pb(scheduler_name: &str, p: &Profile) -> pb::Profile {
    let w = &p.weights;
    pb::Profile {
        scheduler_name: scheduler_name.to_string(),
        base: p.name.clone(),
        weights: Some(pb::Weights {
            node_resources_least_allocated: w.node_resources_least_allocated,
            node_resources_balanced_allocation: w.node_resources_balanced_allocation,
            image_locality: w.image_locality,
            node_affinity: w.node_affinity,
            taint_toleration: w.taint_toleration,
            inter_pod_affinity: w.inter_pod_affinity,
            pod_topology_spread: w.pod_topology_spread,
        }),
        percentage_of_nodes_to_score: p.percentage_of_nodes_to_score,
        parallelism: p.parallelism,
    }
}

/// Applies an update to a copy of `cur`; the copy is returned only if it validates.
pub fn apply_update(cur: &Profile, req: &pb::UpdateProfileRequest) -> Result<Profile, String> {
    let mut p = match req.reset_to.as_deref() {
        Some(base) => Profile::builtin(base).ok_or_else(|| format!("reset_to {base:?}: expected shoal or kubernetes"))?,
        None => cur.clone(),
    };
    let mut names: Vec<&String> = req.weights.keys().collect();
    names.sort();
    for name in names {
        let slot = p.weights.of_plugin_mut(name).ok_or_else(|| format!("unknown score plugin {name:?}; known: {}", Weights::PLUGINS.join(", ")))?;
        *slot = req.weights[name];
    }
    if let Some(v) = req.percentage_of_nodes_to_score {
        p.percentage_of_nodes_to_score = v;
    }
    if let Some(v) = req.parallelism {
        p.parallelism = v;
    }
    p.validate()?;
    Ok(p)
}

/// The gRPC service over a running scheduler.
pub struct Service {
    pub handle: Handle,
    pub workers: u32,
}

impl Service {
    fn config(&self) -> pb::SchedulerConfig {
        let profiles = self.handle.profiles.read();
        let mut names: Vec<&String> = profiles.keys().collect();
        names.sort();
        pb::SchedulerConfig { profiles: names.into_iter().map(|n| to_pb(n, &profiles[n])).collect(), workers: self.workers, leader: self.handle.leadership.is_leader() }
    }
}

#[tonic::async_trait]
impl pb::scheduler_admin_server::SchedulerAdmin for Service {
    async fn get_config(&self, _: Request<pb::GetSchedulerConfigRequest>) -> Result<Response<pb::SchedulerConfig>, Status> {
        Ok(Response::new(self.config()))
    }

    async fn update_profile(&self, req: Request<pb::UpdateProfileRequest>) -> Result<Response<pb::SchedulerConfig>, Status> {
        let req = req.into_inner();
        {
            let mut profiles = self.handle.profiles.write();
            let cur = profiles.get(&req.scheduler_name).ok_or_else(|| {
                let mut known: Vec<&String> = profiles.keys().collect();
                known.sort();
                Status::not_found(format!("no profile for schedulerName {:?}; known: {known:?}", req.scheduler_name))
            })?;
            let next = apply_update(cur, &req).map_err(Status::invalid_argument)?;
            tracing::info!(scheduler_name = %req.scheduler_name, profile = ?next, "scheduler profile changed");
            profiles.insert(req.scheduler_name.clone(), next);
        }
        // Pods parked as unschedulable may fit under the new settings.
        self.handle.queue.cluster_changed(true);
        Ok(Response::new(self.config()))
    }

    async fn get_queue_stats(&self, _: Request<pb::QueueStatsRequest>) -> Result<Response<pb::QueueStats>, Status> {
        let s = self.handle.queue.stats();
        let c = self.handle.cache.read();
        Ok(Response::new(pb::QueueStats {
            active: s.active as u64,
            backoff: s.backoff as u64,
            unschedulable: s.unschedulable as u64,
            in_flight: s.in_flight as u64,
            nodes: c.live_nodes() as u64,
            placed_pods: c.pod_count() as u64,
        }))
    }

    async fn explain(&self, req: Request<pb::ExplainRequest>) -> Result<Response<pb::ExplainResponse>, Status> {
        let req = req.into_inner();
        let key = format!("{}/{}", req.namespace, req.name);
        let pod = self.handle.queue.get(&key).ok_or_else(|| Status::not_found(format!("pod {key} is not waiting in the scheduler's queue (it is bound, gone, or not for this scheduler)")))?;
        let profile = self.handle.profiles.read().get(&*pod.scheduler_name).cloned().ok_or_else(|| Status::failed_precondition(format!("no profile for schedulerName {:?}", pod.scheduler_name)))?;
        let cache = self.handle.cache.read();
        let c = cache.ctx();
        let st = State::compute(&pod, &c);
        let mut nodes = Vec::new();
        let feasible = feasible_nodes(&pod, &c, st.as_ref(), &profile, 0).unwrap_or_default();
        let scores: HashMap<u32, i64> = feasible.iter().copied().zip(score(&pod, &c, st.as_ref(), &profile, &feasible)).collect();
        for i in 0..c.t.len() {
            if !c.t.live[i] {
                continue;
            }
            let f = filter(&pod, &c, st.as_ref(), i);
            nodes.push(pb::NodeVerdict { node: c.t.names[i].to_string(), feasible: f.bits == 0, reasons: messages(&f, c.names), score: scores.get(&(i as u32)).copied().unwrap_or(0) });
        }
        nodes.sort_by(|a, b| b.feasible.cmp(&a.feasible).then(b.score.cmp(&a.score)).then(a.node.cmp(&b.node)));
        let (summary, chosen) = match schedule_one(&pod, &c, &profile, &mut Rng::from_entropy()) {
            Ok(i) => (String::new(), c.t.names[i].to_string()),
            Err(e) => (e.to_string(), String::new()),
        };
        Ok(Response::new(pb::ExplainResponse { pod: key, profile: pod.scheduler_name.to_string(), summary, nodes, chosen }))
    }
}

/// Checks the bearer token of every call.
#[derive(Clone)]
pub struct TokenCheck(pub Arc<str>);

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let got = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match got {
            Some(t) if ring_eq(t.as_bytes(), self.0.as_bytes()) => Ok(req),
            Some(_) => Err(Status::permission_denied("the admin token is not valid")),
            None => Err(Status::unauthenticated("an admin token is required: send `authorization: Bearer <token>` (DATA_DIR/pki/admin.token)")),
        }
    }
}

/// Constant-time comparison (a token check must not leak how much matched).
fn ring_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_are_validated_as_a_whole() {
        let cur = Profile::shoal();
        let mut req = pb::UpdateProfileRequest { scheduler_name: "default-scheduler".into(), ..Default::default() };
        req.weights.insert("ImageLocality".into(), 5);
        req.percentage_of_nodes_to_score = Some(50);
        let p = apply_update(&cur, &req).unwrap();
        assert_eq!((p.weights.image_locality, p.percentage_of_nodes_to_score), (5, 50));
        req.weights.insert("Bogus".into(), 1);
        assert!(apply_update(&cur, &req).unwrap_err().contains("unknown score plugin \"Bogus\""));
        req.weights.remove("Bogus");
        req.parallelism = Some(0);
        assert_eq!(apply_update(&cur, &req).unwrap_err(), "parallelism must be between 1 and 256, got 0");
        let reset = pb::UpdateProfileRequest { reset_to: Some("kubernetes".into()), ..Default::default() };
        assert_eq!(apply_update(&cur, &reset).unwrap(), Profile::kubernetes());
    }

    #[test]
    fn tokens() {
        use tonic::service::Interceptor;
        let mut chk = TokenCheck(Arc::from("s3cret"));
        assert!(chk.call(Request::new(())).unwrap_err().code() == tonic::Code::Unauthenticated);
        let mut r = Request::new(());
        r.metadata_mut().insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(chk.call(r).unwrap_err().code(), tonic::Code::PermissionDenied);
        let mut r = Request::new(());
        r.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(chk.call(r).is_ok());
    }
}
