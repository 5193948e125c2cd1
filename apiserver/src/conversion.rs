//! Conversion between versions of a kind that is stored once: autoscaling/v2
//! HorizontalPodAutoscalers are served as autoscaling/v1 too (as upstream: v1's single
//! CPU target is a v2 Resource metric). Pure functions over JSON.

use serde_json::{json, Map, Value};

use crate::resources::ResourceDef;

/// The definition whose version is kept in the store for `def`'s kind.
pub fn storage_of(def: &'static ResourceDef) -> &'static ResourceDef {
    crate::resources::all().into_iter().find(|r| r.kind == def.kind && r.storage == def.storage && r.is_storage_version()).unwrap_or(def)
}

/// Converts an object (of any served version of its kind) to `to`'s version.
pub fn convert(obj: Value, to: &ResourceDef) -> Value {
    let from = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
    let target = to.api_version();
    if from == target || obj.get("kind").and_then(Value::as_str) != Some(to.kind) {
        return obj;
    }
    if to.custom {
        // CRDs here convert with strategy None: only the apiVersion changes.
        let mut obj = obj;
        obj["apiVersion"] = Value::String(target);
        return obj;
    }
    match (to.kind, from.as_str(), target.as_str()) {
        ("HorizontalPodAutoscaler", "autoscaling/v2", "autoscaling/v1") => hpa_v2_to_v1(obj),
        ("HorizontalPodAutoscaler", "autoscaling/v1", "autoscaling/v2") => hpa_v1_to_v2(obj),
        ("Event", "v1", "events.k8s.io/v1") => rename_event(obj, "events.k8s.io/v1", true),
        ("Event", "events.k8s.io/v1", "v1") => rename_event(obj, "v1", false),
        _ => obj,
    }
}

/// Field names that differ between core/v1 and events.k8s.io/v1 Events.
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn rename_event(mut o: Value, api_version: &str, to_events_group: bool) -> Value {
    o["apiVersion"] = json!(api_version);
    if let Some(m) = o.as_object_mut() {
        for (core, ev) in EVENT_FIELDS {
            let (from, to) = if to_events_group { (core, ev) } else { (ev, core) };
            if let Some(v) = m.remove(*from) {
                m.insert(to.to_string(), v);
            }
        }
    }
    o
}

const METRICS_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/metrics";

fn hpa_v2_to_v1(mut o: Value) -> Value {
    o["apiVersion"] = json!("autoscaling/v1");
    let spec = o.get("spec").cloned().unwrap_or(json!({}));
    let mut s = Map::new();
    for k in ["scaleTargetRef", "minReplicas", "maxReplicas"] {
        if let Some(v) = spec.get(k) {
            s.insert(k.into(), v.clone());
        }
    }
    let metrics = spec.get("metrics").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut others = Vec::new();
    for m in metrics {
        let cpu = m["type"] == "Resource" && m.pointer("/resource/name") == Some(&json!("cpu")) && m.pointer("/resource/target/type") == Some(&json!("Utilization"));
        match m.pointer("/resource/target/averageUtilization") {
            Some(u) if cpu && !s.contains_key("targetCPUUtilizationPercentage") => {
                s.insert("targetCPUUtilizationPercentage".into(), u.clone());
            }
            _ => others.push(m),
        }
    }
    if !others.is_empty() {
        // v1 cannot express them: kept in the annotation upstream uses, so a round trip
        // through v1 loses nothing.
        let md = o["metadata"].as_object_mut().map(|m| m.entry("annotations").or_insert(json!({})));
        if let Some(a) = md.and_then(Value::as_object_mut) {
            a.insert(METRICS_ANNOTATION.into(), json!(Value::Array(others).to_string()));
        }
    }
    o["spec"] = Value::Object(s);
    if let Some(st) = o.get("status").cloned() {
        let mut n = Map::new();
        for k in ["observedGeneration", "lastScaleTime", "currentReplicas", "desiredReplicas"] {
            if let Some(v) = st.get(k) {
                n.insert(k.into(), v.clone());
            }
        }
        let cur = st.get("currentMetrics").and_then(Value::as_array).and_then(|c| c.iter().find(|m| m.pointer("/resource/name") == Some(&json!("cpu")))).and_then(|m| m.pointer("/resource/current/averageUtilization")).cloned();
        if let Some(c) = cur {
            n.insert("currentCPUUtilizationPercentage".into(), c);
        }
        o["status"] = Value::Object(n);
    }
    o
}

fn hpa_v1_to_v2(mut o: Value) -> Value {
    o["apiVersion"] = json!("autoscaling/v2");
    let spec = o.get("spec").cloned().unwrap_or(json!({}));
    let mut s = Map::new();
    for k in ["scaleTargetRef", "minReplicas", "maxReplicas"] {
        if let Some(v) = spec.get(k) {
            s.insert(k.into(), v.clone());
        }
    }
    let mut metrics = Vec::new();
    if let Some(u) = spec.get("targetCPUUtilizationPercentage") {
        metrics.push(json!({"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": u}}}));
    }
    let ann = o.pointer(&format!("/metadata/annotations/{}", METRICS_ANNOTATION.replace('/', "~1"))).and_then(Value::as_str).map(String::from);
    if let Some(a) = ann {
        if let Ok(Value::Array(more)) = serde_json::from_str::<Value>(&a) {
            metrics.extend(more);
        }
        if let Some(m) = o.pointer_mut("/metadata/annotations").and_then(Value::as_object_mut) {
            m.remove(METRICS_ANNOTATION);
            if m.is_empty() {
                o["metadata"].as_object_mut().map(|md| md.remove("annotations"));
            }
        }
    }
    if !metrics.is_empty() {
        s.insert("metrics".into(), Value::Array(metrics));
    }
    o["spec"] = Value::Object(s);
    if let Some(st) = o.get("status").cloned() {
        let mut n = Map::new();
        for k in ["observedGeneration", "lastScaleTime", "currentReplicas", "desiredReplicas"] {
            if let Some(v) = st.get(k) {
                n.insert(k.into(), v.clone());
            }
        }
        if let Some(c) = st.get("currentCPUUtilizationPercentage") {
            n.insert("currentMetrics".into(), json!([{"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": c}}}]));
        }
        o["status"] = Value::Object(n);
    }
    o
}

/// Defaults of a v1 HPA applied before conversion (upstream: an unset CPU target is 80%).
pub fn default_served(obj: &mut Value, served: &ResourceDef) {
    if served.kind == "HorizontalPodAutoscaler" && served.version == "v1" {
        if let Some(s) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            s.entry("targetCPUUtilizationPercentage").or_insert(json!(80));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpa_round_trips() {
        let v2 = crate::resources::find("autoscaling", "v2", "horizontalpodautoscalers").unwrap();
        let v1 = crate::resources::find("autoscaling", "v1", "horizontalpodautoscalers").unwrap();
        assert!(std::ptr::eq(storage_of(v1), v2));
        let o = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "h"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "web", "apiVersion": "apps/v1"}, "minReplicas": 1, "maxReplicas": 5,
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}},
                                 {"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "1Gi"}}}]}});
        let down = convert(o.clone(), v1);
        assert_eq!(down["apiVersion"], "autoscaling/v1");
        assert_eq!(down["spec"]["targetCPUUtilizationPercentage"], 80);
        assert!(down["spec"].get("metrics").is_none());
        let up = convert(down, v2);
        assert_eq!(up, o, "nothing is lost through v1");
        let core = crate::resources::find("", "v1", "events").unwrap();
        let ev = crate::resources::find("events.k8s.io", "v1", "events").unwrap();
        assert!(std::ptr::eq(storage_of(ev), core));
        let e = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e"}, "involvedObject": {"kind": "Pod", "name": "p"}, "message": "hi", "reason": "Started", "count": 2});
        let n = convert(e.clone(), ev);
        assert_eq!((n["regarding"]["name"].as_str(), n["note"].as_str(), n["deprecatedCount"].as_i64()), (Some("p"), Some("hi"), Some(2)));
        assert_eq!(convert(n, core), e);
    }
}
