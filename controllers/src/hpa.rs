//! HorizontalPodAutoscaler (`autoscaling/v2`, v1 served by conversion): every sync period
//! each HPA reads its target's scale and the resource metrics API (`metrics.k8s.io`) for
//! the target's pods, computes the replicas as upstream's replica calculator does
//! (utilization or average value of CPU/memory, 10% tolerance, missing and not-yet-ready
//! pods counted conservatively), applies the `behavior` (stabilization windows, scale-up
//! and scale-down policies; upstream's defaults), writes the scale and the status
//! (current metrics, AbleToScale/ScalingActive/ScalingLimited), and records
//! `SuccessfulRescale` events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use shoal_client::Client;

use crate::informer::Informer;
use crate::pod::{Phase, Pod};
use crate::Leadership;

/// Upstream's `--horizontal-pod-autoscaler-tolerance`.
pub const TOLERANCE: f64 = 0.1;

/// One metric's recommendation.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    pub replicas: i64,
    /// For the status: (metric name, utilization % if a utilization target, average value in milli-units).
    pub utilization: Option<i64>,
    pub average_milli: i128,
}

/// A pod as the calculator sees it: its request (milli-units, 0 = none), its usage if
/// the metrics API has it, and whether it counts as ready.
#[derive(Debug, Clone)]
pub struct Sample {
    pub request: i128,
    pub usage: Option<i128>,
    pub ready: bool,
}

/// The target of one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Percent of the pods' requests.
    Utilization(i64),
    /// Milli-units per pod.
    AverageValue(i128),
}

/// Upstream's replica calculator for a resource metric. `current` is the target's
/// replicas now. Err carries the reason for the ScalingActive=False condition.
pub fn calculate(current: i64, samples: &[Sample], target: Target) -> Result<Recommendation, (&'static str, String)> {
    if samples.is_empty() {
        return Err(("FailedGetResourceMetric", "no pods matched the target's selector".into()));
    }
    let with_metrics: Vec<&Sample> = samples.iter().filter(|s| s.usage.is_some() && s.ready).collect();
    if with_metrics.is_empty() {
        return Err(("FailedGetResourceMetric", "did not receive metrics for targeted pods (pods might be unready)".into()));
    }
    let missing = samples.iter().filter(|s| s.usage.is_none()).count() as i64;
    let unready = samples.iter().filter(|s| s.usage.is_some() && !s.ready).count() as i64;
    let usage: i128 = with_metrics.iter().map(|s| s.usage.unwrap_or(0)).sum();
    let ready_n = with_metrics.len() as i64;
    let ratio_of = |usage: i128, requests: i128, n: i64| -> f64 {
        match target {
            Target::Utilization(t) => (usage as f64 * 100.0 / requests.max(1) as f64) / t as f64,
            Target::AverageValue(v) => (usage as f64 / n.max(1) as f64) / v.max(1) as f64,
        }
    };
    let requests: i128 = with_metrics.iter().map(|s| s.request).sum();
    if matches!(target, Target::Utilization(_)) && with_metrics.iter().any(|s| s.request <= 0) {
        return Err(("FailedGetResourceMetric", "missing request for the resource in a targeted pod".into()));
    }
    let ratio = ratio_of(usage, requests, ready_n);
    let utilization = matches!(target, Target::Utilization(_)).then(|| (usage * 100 / requests.max(1)) as i64);
    let average_milli = usage / ready_n as i128;
    let rec = |replicas: i64| Recommendation { replicas, utilization, average_milli };
    if missing == 0 && unready == 0 {
        if (ratio - 1.0).abs() <= TOLERANCE {
            return Ok(rec(current));
        }
        return Ok(rec((ratio * ready_n as f64).ceil() as i64));
    }
    // Pods without metrics count as using the whole target when scaling down and nothing
    // when scaling up; unready pods count as using nothing, and only when scaling up.
    let (mut u, mut req, mut n) = (usage, requests, ready_n);
    let per_target = |s: &Sample| match target {
        Target::Utilization(t) => s.request * t as i128 / 100,
        Target::AverageValue(v) => v,
    };
    for s in samples.iter().filter(|s| s.usage.is_none()) {
        if ratio < 1.0 {
            u += per_target(s);
        }
        req += s.request;
        n += 1;
    }
    if ratio > 1.0 {
        for s in samples.iter().filter(|s| s.usage.is_some() && !s.ready) {
            req += s.request;
            n += 1;
        }
    }
    let new_ratio = ratio_of(u, req, n);
    if (new_ratio - 1.0).abs() <= TOLERANCE || (ratio < 1.0 && new_ratio > 1.0) || (ratio > 1.0 && new_ratio < 1.0) {
        return Ok(rec(current));
    }
    let desired = (new_ratio * n as f64).ceil() as i64;
    // Never move against the direction the measured pods asked for.
    if (new_ratio < 1.0 && desired > current) || (new_ratio > 1.0 && desired < current) {
        return Ok(rec(current));
    }
    Ok(rec(desired))
}

/// Scaling rules of one direction (`spec.behavior.scaleUp|scaleDown`).
#[derive(Debug, Clone)]
pub struct Rules {
    pub window: i64,
    /// (type Pods|Percent, value, period seconds)
    pub policies: Vec<(String, i64, i64)>,
    /// Max, Min or Disabled.
    pub select: String,
}

impl Rules {
    pub fn from(v: Option<&Value>, up: bool) -> Rules {
        let default = if up { Rules { window: 0, policies: vec![("Percent".into(), 100, 15), ("Pods".into(), 4, 15)], select: "Max".into() } } else { Rules { window: 300, policies: vec![("Percent".into(), 100, 15)], select: "Max".into() } };
        let Some(v) = v else { return default };
        Rules {
            window: v.get("stabilizationWindowSeconds").and_then(Value::as_i64).unwrap_or(default.window),
            policies: v.get("policies").and_then(Value::as_array).map(|a| a.iter().map(|p| (p["type"].as_str().unwrap_or("").to_string(), p["value"].as_i64().unwrap_or(0), p["periodSeconds"].as_i64().unwrap_or(15))).collect()).unwrap_or(default.policies),
            select: v.get("selectPolicy").and_then(Value::as_str).unwrap_or(&default.select).to_string(),
        }
    }
}

/// What the controller remembers per HPA: recent recommendations and scale events.
#[derive(Default, Debug, Clone)]
pub struct History {
    pub recommendations: Vec<(i64, i64)>,
    /// (time, replica change; positive up)
    pub events: Vec<(i64, i64)>,
}

/// Applies stabilization and policies to a raw recommendation (upstream's
/// normalizeDesiredReplicasWithBehaviors). Returns (replicas, limited-by reason).
pub fn normalize(now: i64, current: i64, raw: i64, min: i64, max: i64, up: &Rules, down: &Rules, h: &mut History) -> (i64, Option<&'static str>) {
    h.recommendations.push((now, raw));
    let keep = up.window.max(down.window);
    h.recommendations.retain(|(t, _)| now - t <= keep);
    // Stabilization: scaling up goes to the lowest recommendation of the up window, down
    // to the highest of the down window.
    let up_floor = h.recommendations.iter().filter(|(t, _)| now - t <= up.window).map(|(_, r)| *r).min().unwrap_or(raw);
    let down_ceiling = h.recommendations.iter().filter(|(t, _)| now - t <= down.window).map(|(_, r)| *r).max().unwrap_or(raw);
    let mut desired = current;
    if up_floor > current {
        desired = up_floor;
    }
    if down_ceiling < current {
        desired = down_ceiling;
    }
    // Policies.
    let changed_in = |period: i64, sign: i64| -> i64 { h.events.iter().filter(|(t, d)| now - t < period && d.signum() == sign).map(|(_, d)| d.abs()).sum() };
    let mut limited = None;
    if desired > current {
        if up.select == "Disabled" {
            desired = current;
        } else {
            let limits: Vec<i64> = up.policies.iter().map(|(ty, v, p)| {
                let base = current - changed_in(*p, 1);
                if ty == "Pods" { base + v } else { (base as f64 * (1.0 + *v as f64 / 100.0)).ceil() as i64 }
            }).collect();
            let limit = if up.select == "Min" { limits.iter().copied().min() } else { limits.iter().copied().max() }.unwrap_or(desired);
            if desired > limit {
                desired = limit;
                limited = Some("ScaleUpLimit");
            }
        }
    } else if desired < current {
        if down.select == "Disabled" {
            desired = current;
        } else {
            let limits: Vec<i64> = down.policies.iter().map(|(ty, v, p)| {
                let base = current + changed_in(*p, -1);
                if ty == "Pods" { base - v } else { (base as f64 * (1.0 - *v as f64 / 100.0)).ceil() as i64 }
            }).collect();
            let limit = if down.select == "Min" { limits.iter().copied().max() } else { limits.iter().copied().min() }.unwrap_or(desired);
            if desired < limit {
                desired = limit;
                limited = Some("ScaleDownLimit");
            }
        }
    }
    if desired > max {
        return (max, Some("TooManyReplicas"));
    }
    if desired < min {
        return (min, Some("TooFewReplicas"));
    }
    (desired, limited)
}

fn cond(ty: &str, ok: bool, reason: &str, message: &str, old: &Value) -> Value {
    let status = if ok { "True" } else { "False" };
    let since = old.pointer("/status/conditions").and_then(Value::as_array).and_then(|cs| cs.iter().find(|c| c["type"] == ty && c["status"] == status)).and_then(|c| c["lastTransitionTime"].as_str()).map(String::from).unwrap_or_else(|| shoal_client::time::format(shoal_client::time::now_secs()));
    json!({"type": ty, "status": status, "reason": reason, "message": message, "lastTransitionTime": since})
}

fn plural(kind: &str) -> Option<(&'static str, &'static str)> {
    match kind {
        "Deployment" => Some(("apps/v1", "deployments")),
        "ReplicaSet" => Some(("apps/v1", "replicasets")),
        "StatefulSet" => Some(("apps/v1", "statefulsets")),
        "ReplicationController" => Some(("v1", "replicationcontrollers")),
        _ => None,
    }
}

fn milli_of(q: &str) -> Option<i128> {
    shoal_client::quantity::parse(q)
}

/// Starts the controller: every `period` each HPA is reconciled.
pub fn start(client: Client, hpas: Informer, pods: Informer<Pod>, lead: Leadership, period: Duration) {
    let history: Arc<Mutex<HashMap<String, History>>> = Default::default();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !lead.is_leader() || !hpas.is_synced() || !pods.is_synced() {
                continue;
            }
            let all = hpas.list(|_| true);
            let live: std::collections::HashSet<String> = all.iter().map(|h| crate::informer::key_of(h)).collect();
            history.lock().retain(|k, _| live.contains(k));
            for hpa in all {
                let key = crate::informer::key_of(&hpa);
                if let Err(e) = reconcile(&client, &hpa, &pods, &history, &key).await {
                    tracing::debug!(hpa = %key, error = %e, "autoscaler sync failed");
                }
            }
        }
    });
}

async fn reconcile(client: &Client, hpa: &Value, pods: &Informer<Pod>, history: &Mutex<HashMap<String, History>>, key: &str) -> Result<(), String> {
    let ns = hpa.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    let name = hpa.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    let spec = &hpa["spec"];
    let kind = spec.pointer("/scaleTargetRef/kind").and_then(Value::as_str).unwrap_or("");
    let target_name = spec.pointer("/scaleTargetRef/name").and_then(Value::as_str).unwrap_or("");
    let hpa_path = format!("/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/{name}");
    let now = shoal_client::time::now_secs();
    let set_status = |conditions: Vec<Value>, current: i64, desired: i64, metrics: Vec<Value>, scaled: bool| {
        let mut st = json!({"currentReplicas": current, "desiredReplicas": desired, "currentMetrics": metrics, "conditions": conditions});
        match (scaled, hpa.pointer("/status/lastScaleTime")) {
            (true, _) => st["lastScaleTime"] = json!(shoal_client::time::format(now)),
            (false, Some(t)) => st["lastScaleTime"] = t.clone(),
            _ => {}
        }
        if let Some(g) = hpa.pointer("/metadata/generation") {
            st["observedGeneration"] = g.clone();
        }
        st
    };
    let Some((api, plural)) = plural(kind) else {
        let st = set_status(vec![cond("AbleToScale", false, "FailedGetScale", &format!("the HPA controller was unable to get the target's current scale: no scale subresource for kind {kind:?}"), hpa)], 0, 0, vec![], false);
        client.merge_patch(&format!("{hpa_path}/status"), &json!({"status": st})).await.map_err(|e| e.to_string())?;
        return Ok(());
    };
    let base = if api == "v1" { "/api/v1".to_string() } else { format!("/apis/{api}") };
    let target_path = format!("{base}/namespaces/{ns}/{plural}/{target_name}");
    let Some(target) = client.get(&target_path).await.map_err(|e| e.to_string())? else {
        let st = set_status(vec![cond("AbleToScale", false, "FailedGetScale", &format!("the HPA controller was unable to get the target's current scale: {plural}.{} \"{target_name}\" not found", api.split('/').next().unwrap_or("")), hpa)], 0, 0, vec![], false);
        client.merge_patch(&format!("{hpa_path}/status"), &json!({"status": st})).await.map_err(|e| e.to_string())?;
        return Ok(());
    };
    let current = target.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
    let min = spec.get("minReplicas").and_then(Value::as_i64).unwrap_or(1);
    let max = spec.get("maxReplicas").and_then(Value::as_i64).unwrap_or(current);
    let selector = target.pointer("/spec/selector").cloned().unwrap_or(Value::Null);
    let mut conditions = vec![cond("AbleToScale", true, "SucceededGetScale", "the HPA controller was able to get the target's current scale", hpa)];
    if current == 0 && min > 0 {
        // Upstream: a target scaled to zero by hand disables autoscaling.
        conditions.push(cond("ScalingActive", false, "ScalingDisabled", "scaling is disabled since the replica count of the target is zero", hpa));
        client.merge_patch(&format!("{hpa_path}/status"), &json!({"status": set_status(conditions, 0, 0, vec![], false)})).await.map_err(|e| e.to_string())?;
        return Ok(());
    }
    // The target's pods and their usage.
    let matched: Vec<Arc<Pod>> = pods.list_in(ns, |p| !p.deleting && p.phase != Phase::Failed && p.phase != Phase::Succeeded && shoal_client::selector::matches_with(&selector, |k| p.labels.iter().find(|(lk, _)| &**lk == k).map(|(_, v)| &**v)));
    let metrics = client.get(&format!("/apis/metrics.k8s.io/v1beta1/namespaces/{ns}/pods")).await.map_err(|e| e.to_string())?.unwrap_or(Value::Null);
    let mut usage: HashMap<(String, String), HashMap<String, i128>> = HashMap::new();
    for m in metrics["items"].as_array().into_iter().flatten() {
        let pod = m.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
        let e = usage.entry((pod, String::new())).or_default();
        for c in m["containers"].as_array().into_iter().flatten() {
            for (res, q) in c["usage"].as_object().into_iter().flatten() {
                *e.entry(res.clone()).or_default() += q.as_str().and_then(milli_of).unwrap_or(0);
            }
        }
    }
    let mut best: Option<(i64, String)> = None;
    let mut current_metrics = Vec::new();
    let mut failure: Option<(&'static str, String)> = None;
    for m in spec["metrics"].as_array().into_iter().flatten() {
        if m["type"] != "Resource" && m["type"] != "ContainerResource" {
            failure = Some(("InvalidMetricSourceType", format!("the HPA was unable to compute the replica count: metric type {} is not served by this cluster (no custom or external metrics API)", m["type"])));
            continue;
        }
        let src = if m["type"] == "Resource" { &m["resource"] } else { &m["containerResource"] };
        let res = src["name"].as_str().unwrap_or("");
        let target = match src.pointer("/target/type").and_then(Value::as_str) {
            Some("Utilization") => Target::Utilization(src.pointer("/target/averageUtilization").and_then(Value::as_i64).unwrap_or(80)),
            Some("AverageValue") => Target::AverageValue(src.pointer("/target/averageValue").and_then(Value::as_str).and_then(milli_of).unwrap_or(0)),
            other => {
                failure = Some(("InvalidMetricSourceType", format!("unsupported target type {other:?} for resource {res}")));
                continue;
            }
        };
        let samples: Vec<Sample> = matched.iter().map(|p| Sample { request: p.resource_sum(false, res), usage: usage.get(&(p.name.to_string(), String::new())).and_then(|u| u.get(res)).copied(), ready: p.phase == Phase::Running && p.ready }).collect();
        match calculate(current, &samples, target) {
            Ok(r) => {
                let mut cur = json!({"averageValue": crate::quota::format_milli(r.average_milli)});
                if let Some(u) = r.utilization {
                    cur["averageUtilization"] = json!(u);
                }
                current_metrics.push(json!({"type": "Resource", "resource": {"name": res, "current": cur}}));
                let why = if r.replicas > current { format!("{res} resource{} above target", if r.utilization.is_some() { " utilization (percentage of request)" } else { "" }) } else { "All metrics below target".to_string() };
                if best.as_ref().is_none_or(|(b, _)| r.replicas > *b) {
                    best = Some((r.replicas, why));
                }
            }
            Err(f) => failure = Some(f),
        }
    }
    let Some((raw, why)) = best else {
        let (reason, msg) = failure.unwrap_or(("FailedGetResourceMetric", "no metrics in the spec".into()));
        conditions.push(cond("ScalingActive", false, reason, &msg, hpa));
        client.merge_patch(&format!("{hpa_path}/status"), &json!({"status": set_status(conditions, current, current, current_metrics, false)})).await.map_err(|e| e.to_string())?;
        shoal_client::events::record(client, hpa, "Warning", reason, &msg, "horizontal-pod-autoscaler").await;
        return Ok(());
    };
    let up = Rules::from(spec.pointer("/behavior/scaleUp"), true);
    let down = Rules::from(spec.pointer("/behavior/scaleDown"), false);
    let (desired, limited) = {
        let mut g = history.lock();
        let h = g.entry(key.to_string()).or_default();
        normalize(now, current, raw, min, max, &up, &down, h)
    };
    conditions.push(cond("ScalingActive", true, "ValidMetricFound", "the HPA was able to successfully calculate a replica count from the metrics", hpa));
    conditions.push(match limited {
        Some(r @ ("TooManyReplicas" | "TooFewReplicas")) => cond("ScalingLimited", true, r, &format!("the desired replica count is {} than the {} replica count", if r == "TooManyReplicas" { "more" } else { "less" }, if r == "TooManyReplicas" { "maximum" } else { "minimum" }), hpa),
        Some(r) => cond("ScalingLimited", true, r, "the desired replica count is limited by the scaling policies", hpa),
        None => cond("ScalingLimited", false, "DesiredWithinRange", "the desired count is within the acceptable range", hpa),
    });
    let scaled = desired != current;
    if scaled {
        client.merge_patch(&format!("{target_path}/scale"), &json!({"spec": {"replicas": desired}})).await.map_err(|e| e.to_string())?;
        history.lock().entry(key.to_string()).or_default().events.push((now, desired - current));
        conditions[0] = cond("AbleToScale", true, "SucceededRescale", &format!("the HPA controller was able to update the target scale to {desired}"), hpa);
        shoal_client::events::record(client, hpa, "Normal", "SuccessfulRescale", &format!("New size: {desired}; reason: {why}"), "horizontal-pod-autoscaler").await;
    }
    let st = set_status(conditions, current, desired, current_metrics, scaled);
    if hpa.get("status") != Some(&st) {
        client.merge_patch(&format!("{hpa_path}/status"), &json!({"status": st})).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(request: i128, usage: Option<i128>) -> Sample {
        Sample { request, usage, ready: true }
    }

    #[test]
    fn utilization_scales_as_upstream() {
        // 4 pods of 200m using 400m each against 50%: 400% of target → 16.
        let pods: Vec<Sample> = (0..4).map(|_| s(200, Some(400))).collect();
        let r = calculate(4, &pods, Target::Utilization(50)).unwrap();
        assert_eq!((r.replicas, r.utilization), (16, Some(200)));
        // Within the 10% tolerance: no change.
        let pods: Vec<Sample> = (0..4).map(|_| s(200, Some(105))).collect();
        assert_eq!(calculate(4, &pods, Target::Utilization(50)).unwrap().replicas, 4);
        // Low use: down to ceil(ratio * n).
        let pods: Vec<Sample> = (0..10).map(|_| s(100, Some(10))).collect();
        assert_eq!(calculate(10, &pods, Target::Utilization(50)).unwrap().replicas, 2);
        // Average value: 900m across 3 pods against 100m each → 9.
        let pods: Vec<Sample> = (0..3).map(|_| s(0, Some(300))).collect();
        assert_eq!(calculate(3, &pods, Target::AverageValue(100)).unwrap().replicas, 9);
    }

    #[test]
    fn missing_metrics_are_counted_conservatively() {
        // Scaling down with a pod without metrics: it counts as at target, which pulls the
        // ratio back inside the tolerance or at least limits the step.
        let pods = vec![s(100, Some(10)), s(100, Some(10)), s(100, None)];
        let r = calculate(3, &pods, Target::Utilization(50)).unwrap();
        assert!(r.replicas >= 2 && r.replicas <= 3, "{r:?}");
        // Scaling up with an unready pod: it counts as using nothing.
        let mut pods = vec![s(100, Some(200)), s(100, Some(200))];
        pods.push(Sample { request: 100, usage: Some(0), ready: false });
        let r = calculate(3, &pods, Target::Utilization(50)).unwrap();
        assert_eq!(r.replicas, 8, "400m over 3 pods of 100m at 50%: ceil(2.67*3)");
        assert!(calculate(1, &[s(0, Some(5))], Target::Utilization(50)).is_err(), "no request: utilization cannot be computed");
        assert!(calculate(1, &[], Target::Utilization(50)).is_err());
    }

    #[test]
    fn behavior_stabilizes_and_limits() {
        let (up, down) = (Rules::from(None, true), Rules::from(None, false));
        let mut h = History::default();
        // Up by at most max(100%, 4 pods) per 15 s: 2 → 6 (4 pods beats 100%).
        assert_eq!(normalize(0, 2, 50, 1, 100, &up, &down, &mut h), (6, Some("ScaleUpLimit")));
        h.events.push((0, 4));
        // Within the same period the budget is spent.
        assert_eq!(normalize(5, 6, 50, 1, 100, &up, &down, &mut h).0, 6);
        // A later drop in load is held for the 300 s down window.
        let mut h = History::default();
        assert_eq!(normalize(0, 10, 10, 1, 100, &up, &down, &mut h).0, 10);
        assert_eq!(normalize(100, 10, 3, 1, 100, &up, &down, &mut h).0, 10, "the window still holds a recommendation of 10");
        assert_eq!(normalize(301, 10, 3, 1, 100, &up, &down, &mut h).0, 3);
        // Bounds.
        let mut h = History::default();
        assert_eq!(normalize(0, 4, 50, 1, 5, &up, &down, &mut h), (5, Some("TooManyReplicas")));
        let quick = Rules { window: 0, policies: vec![("Percent".into(), 100, 15)], select: "Max".into() };
        let mut h = History::default();
        assert_eq!(normalize(0, 4, 0, 2, 10, &up, &quick, &mut h), (2, Some("TooFewReplicas")));
    }
}
