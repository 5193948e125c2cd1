//! Events components record (core/v1 Events, as `kubectl get events` and `describe` show
//! them), with upstream's event correlation (client-go's EventCorrelator): an event
//! identical to one recorded in the last 10 minutes increments that event's `count` and
//! `lastTimestamp` instead of creating another; more than 10 similar events (same object,
//! reason and type, other messages) in 10 minutes are combined into one
//! "(combined from similar events): ..." event. Writes happen in the background, bumps of
//! one event in order. Best effort: a failed event never fails the work it reports on.
//! (Found by the 5,000-node density run: recording inline, every SuccessfulCreate bump of a
//! ReplicaSet's combined event made the pod creations wait, and the run went several times slower.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::{time, Client};

/// Upstream's defaults.
const WINDOW: Duration = Duration::from_secs(600);
const SIMILAR_MAX: usize = 10;
const CACHE_MAX: usize = 4096;

/// What the correlator decided for one event.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Create a new event with this message.
    Create(String),
    /// Bump the event `name` (in the namespace) to `count`, with this message.
    Bump { name: String, count: u64, message: String },
}

#[derive(Default)]
struct Seen {
    /// Identical events: key → (event name, count, last seen).
    identical: HashMap<String, (String, u64, Instant)>,
    /// Similar events: key → distinct messages seen in the window, with when.
    similar: HashMap<String, HashMap<String, Instant>>,
}

/// The correlation state (per process, as a client-go broadcaster's).
#[derive(Default)]
pub struct Correlator {
    seen: Mutex<Seen>,
}

impl Correlator {
    /// Decides for an event about `object` (a key naming it) at `now`.
    pub fn decide(&self, object: &str, ty: &str, reason: &str, message: &str, component: &str, now: Instant) -> Action {
        let mut g = self.seen.lock();
        if g.identical.len() > CACHE_MAX || g.similar.len() > CACHE_MAX {
            // Bounded like client-go's LRU: drop what expired, and if that is not enough
            // start over (each pass is O(entries) and then the maps can grow to the limit
            // again, so the cost per event stays O(1); a pass on every event once 4,096
            // objects had events made the 5,000-node density run several times slower).
            g.identical.retain(|_, (_, _, t)| now.duration_since(*t) < WINDOW);
            g.similar.retain(|_, ts| ts.values().any(|t| now.duration_since(*t) < WINDOW));
            if g.identical.len() > CACHE_MAX / 2 {
                g.identical.clear();
            }
            if g.similar.len() > CACHE_MAX / 2 {
                g.similar.clear();
            }
        }
        let similar_key = format!("{component}\u{0}{object}\u{0}{ty}\u{0}{reason}");
        let times = g.similar.entry(similar_key.clone()).or_default();
        times.retain(|_, t| now.duration_since(*t) < WINDOW);
        times.insert(message.to_string(), now);
        // Past the limit every similar event goes to one combined event (keyed without
        // its message), whose message is the latest.
        let (key, message) = if times.len() > SIMILAR_MAX { (format!("{similar_key}\u{0}*"), format!("(combined from similar events): {message}")) } else { (format!("{similar_key}\u{0}{message}"), message.to_string()) };
        match g.identical.get_mut(&key) {
            Some((name, count, last)) if now.duration_since(*last) < WINDOW && !name.is_empty() => {
                *count += 1;
                *last = now;
                Action::Bump { name: name.clone(), count: *count, message }
            }
            _ => {
                g.identical.insert(key, (String::new(), 1, now));
                Action::Create(message)
            }
        }
    }

    fn key(object: &str, ty: &str, reason: &str, message: &str, component: &str) -> String {
        let m = if message.starts_with("(combined from similar events): ") { "*" } else { message };
        format!("{component}\u{0}{object}\u{0}{ty}\u{0}{reason}\u{0}{m}")
    }

    /// Remembers the name the server gave the event created for this key.
    pub fn created(&self, object: &str, ty: &str, reason: &str, message: &str, component: &str, name: &str) {
        let key = Self::key(object, ty, reason, message, component);
        if let Some(e) = self.seen.lock().identical.get_mut(&key) {
            e.0 = name.to_string();
        }
    }

    /// Forgets an event (its write failed, or it is gone).
    pub fn forget(&self, object: &str, ty: &str, reason: &str, message: &str, component: &str) {
        let key = Self::key(object, ty, reason, message, component);
        self.seen.lock().identical.remove(&key);
    }
}

fn correlator() -> &'static Correlator {
    static C: std::sync::OnceLock<Correlator> = std::sync::OnceLock::new();
    C.get_or_init(Correlator::default)
}

/// Per event name, so bumps of one event are written one after another.
fn event_lock(name: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: std::sync::OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = std::sync::OnceLock::new();
    let mut g = LOCKS.get_or_init(Default::default).lock();
    if g.len() > CACHE_MAX {
        g.retain(|_, l| Arc::strong_count(l) > 1);
    }
    g.entry(name.to_string()).or_default().clone()
}

/// Records a Normal or Warning event about `obj`. The write happens in the background
/// (as client-go's broadcaster does): a controller never waits on its events.
pub async fn record(client: &Client, obj: &Value, ty: &str, reason: &str, message: &str, component: &str) {
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default").to_string();
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
    let object = format!("{}/{}/{ns}/{name}/{}", obj.get("kind").and_then(Value::as_str).unwrap_or(""), obj.get("apiVersion").and_then(Value::as_str).unwrap_or(""), obj.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or(""));
    let action = correlator().decide(&object, ty, reason, message, component, Instant::now());
    let involved = json!({"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": name, "namespace": ns, "uid": obj.pointer("/metadata/uid"), "resourceVersion": obj.pointer("/metadata/resourceVersion")});
    let (client, ty, reason, component) = (client.clone(), ty.to_string(), reason.to_string(), component.to_string());
    tokio::spawn(async move {
        let c = correlator();
        let now = time::format(time::now_secs());
        let message = match action {
            Action::Bump { name: ev, count, message: m } => {
                let lock = event_lock(&ev);
                let _g = lock.lock().await;
                match client.merge_patch(&format!("/api/v1/namespaces/{ns}/events/{ev}"), &json!({"count": count, "lastTimestamp": now, "message": m})).await {
                    Ok(_) => return,
                    Err(e) => {
                        // Gone (expired, deleted): start again with a new event.
                        tracing::debug!(error = %e, reason, "bumping an event failed; creating a new one");
                        c.forget(&object, &ty, &reason, &m, &component);
                        m
                    }
                }
            }
            Action::Create(m) => m,
        };
        let ev = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": format!("{name}."), "namespace": ns},
            "involvedObject": involved,
            "reason": reason, "message": message, "type": ty,
            "source": {"component": component},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "reportingComponent": component, "reportingInstance": component,
        });
        match client.create(&format!("/api/v1/namespaces/{ns}/events"), &ev).await {
            Ok(v) => c.created(&object, &ty, &reason, &message, &component, v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("")),
            Err(e) => {
                c.forget(&object, &ty, &reason, &message, &component);
                tracing::debug!(error = %e, reason, "recording an event failed");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_stays_bounded() {
        let c = Correlator::default();
        let t = Instant::now();
        for i in 0..3 * CACHE_MAX {
            c.decide(&format!("pod-{i}"), "Normal", "Scheduled", "m", "x", t);
        }
        let g = c.seen.lock();
        assert!(g.identical.len() <= CACHE_MAX + 1 && g.similar.len() <= CACHE_MAX + 1);
    }

    #[test]
    fn identical_events_are_counted_and_similar_ones_combined() {
        let c = Correlator::default();
        let t = Instant::now();
        assert_eq!(c.decide("o", "Warning", "R", "m", "x", t), Action::Create("m".into()));
        c.created("o", "Warning", "R", "m", "x", "o.1");
        assert_eq!(c.decide("o", "Warning", "R", "m", "x", t), Action::Bump { name: "o.1".into(), count: 2, message: "m".into() });
        assert_eq!(c.decide("o", "Warning", "R", "m", "x", t), Action::Bump { name: "o.1".into(), count: 3, message: "m".into() });
        // Repeating one message is not "similar events".
        for _ in 0..20 {
            assert!(matches!(c.decide("o", "Warning", "R", "m", "x", t), Action::Bump { .. }));
        }
        // Another object, type or reason is another event.
        assert_eq!(c.decide("p", "Warning", "R", "m", "x", t), Action::Create("m".into()));
        // After the window, a new event.
        let late = t + WINDOW + Duration::from_secs(1);
        assert!(matches!(c.decide("o", "Warning", "R", "m", "x", late), Action::Create(_)));
        // Many different messages for the same object and reason are combined.
        let c = Correlator::default();
        for i in 0..SIMILAR_MAX {
            assert_eq!(c.decide("o", "Normal", "S", &format!("m{i}"), "x", t), Action::Create(format!("m{i}")));
        }
        assert_eq!(c.decide("o", "Normal", "S", "m99", "x", t), Action::Create("(combined from similar events): m99".into()));
        c.created("o", "Normal", "S", "(combined from similar events): m99", "x", "o.9");
        assert_eq!(c.decide("o", "Normal", "S", "m100", "x", t), Action::Bump { name: "o.9".into(), count: 2, message: "(combined from similar events): m100".into() });
    }
}
