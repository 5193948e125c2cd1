//! Watch streams: `?watch=true` on a collection (or the legacy `/watch/` paths) answers a
//! stream of `{"type": ..., "object": ...}` lines, with upstream's resourceVersion rules:
//! unset or `0` first replays the current state as ADDED events; `N` resumes after N; a
//! compacted N gets one ERROR event with a 410 Expired status; `sendInitialEvents=true`
//! replays the state and ends it with a bookmark annotated `k8s.io/initial-events-end`.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use shoal_proto::mvccpb::{event::EventType, Event};
use tokio::sync::mpsc;

use crate::backend::{prefix_end, Backend, BackendError};
use crate::resources::ResourceDef;
use crate::rest::{self, decode_kv, set_rv, Filter, Query};
use crate::status::ApiError;
use crate::table::{self, Include};

/// How each event's object is rendered.
#[derive(Clone, Copy, Debug)]
pub enum Render {
    Object,
    Table(Include),
    Metadata,
}

fn line(kind: &str, obj: &Value, def: &ResourceDef, served: &ResourceDef, render: Render) -> Bytes {
    let o = match render {
        Render::Object => crate::conversion::convert(obj.clone(), served),
        Render::Table(inc) => {
            let rv = obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""));
            if kind == "BOOKMARK" || kind == "ERROR" {
                obj.clone()
            } else {
                table::table(table::kind_of(def), std::slice::from_ref(obj), json!({"resourceVersion": rv}), inc)
            }
        }
        Render::Metadata => {
            if kind == "ERROR" {
                obj.clone()
            } else {
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"].clone()})
            }
        }
    };
    let mut b = serde_json::to_vec(&json!({"type": kind, "object": o})).expect("JSON values always serialize");
    b.push(b'\n');
    Bytes::from(b)
}

fn bookmark(def: &ResourceDef, rev: i64, initial_end: bool) -> Value {
    // Bookmarks carry only a resourceVersion; their kind is the served kind.
    let mut md = json!({"resourceVersion": rev.to_string()});
    if initial_end {
        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": md})
}

fn expired(rv: &str, compact: i64) -> Value {
    let msg = if compact > 0 { format!("too old resource version: {rv} ({compact})") } else { format!("too old resource version: {rv}") };
    ApiError::gone(msg).to_status()
}

/// Converts one store event into a watch event type and object, applying the selectors
/// with upstream's transition rules (an object that stops matching is DELETED for this
/// watcher, one that starts matching is ADDED).
fn convert(ev: &Event, filter: &Filter) -> Option<(&'static str, Value)> {
    let kv = ev.kv.as_ref()?;
    let prev = ev.prev_kv.as_ref().and_then(|p| decode_kv(p).ok());
    if ev.r#type == EventType::Delete as i32 {
        let mut obj = prev?;
        set_rv(&mut obj, kv.mod_revision);
        return filter.matches(&obj).then_some(("DELETED", obj));
    }
    let cur = decode_kv(kv).ok()?;
    let now = filter.matches(&cur);
    let before = prev.as_ref().is_some_and(|p| filter.matches(p));
    match (prev.is_some() && kv.create_revision != kv.mod_revision, before, now) {
        (false, _, true) => Some(("ADDED", cur)),
        (true, true, true) => Some(("MODIFIED", cur)),
        (true, false, true) => Some(("ADDED", cur)),
        (true, true, false) => Some(("DELETED", cur)),
        _ => None,
    }
}

/// The watch parameters of a request.
struct Params {
    filter: Filter,
    rv: String,
    send_initial: bool,
    bookmarks: bool,
    timeout: Duration,
}

impl Params {
    fn from_query(def: &ResourceDef, q: &Query) -> Result<Params, ApiError> {
        let send_initial = q.flag("sendInitialEvents");
        if send_initial && q.get("resourceVersionMatch") != Some("NotOlderThan") {
            return Err(ApiError::invalid("ListOptions", "meta.k8s.io", "", &[crate::status::FieldError::forbidden("resourceVersionMatch", "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan")]));
        }
        let timeout = match q.get("timeoutSeconds") {
            Some(t) => Duration::from_secs(t.parse().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?),
            // Upstream spreads default watch lifetimes over 30-60 minutes.
            None => Duration::from_secs(1800 + (crate::meta::now_secs() as u64 % 1800)),
        };
        Ok(Params {
            filter: Filter::from_query(def, q)?,
            rv: q.get("resourceVersion").unwrap_or("").to_string(),
            send_initial,
            bookmarks: q.flag("allowWatchBookmarks"),
            timeout,
        })
    }
}

/// Starts a watch; the returned receiver yields the body's lines and ends when the watch
/// does (timeout, store error, or client gone).
pub async fn start(backend: &Backend, def: &'static ResourceDef, served: &'static ResourceDef, ns: &str, q: &Query, render: Render) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let Params { filter, rv, send_initial, bookmarks, timeout } = Params::from_query(def, q)?;
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut initial = Vec::new();
    let start_rev = if send_initial || rv.is_empty() || rv == "0" {
        let mut lq = Query(q.0.clone());
        for k in ["limit", "continue", "watch", "resourceVersionMatch", "sendInitialEvents"] {
            lq.0.remove(k);
        }
        if send_initial && rv != "0" && !rv.is_empty() {
            // NotOlderThan N: the state at the latest revision is at least as new.
            lq.0.remove("resourceVersion");
        }
        let page = rest::list(backend, def, ns, &lq).await?;
        initial = page.items;
        page.rev + 1
    } else {
        let n: i64 = rv.parse().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?;
        n + 1
    };
    let prefix = def.prefix(ns);
    let stream = backend.watch(prefix.clone().into_bytes(), prefix_end(prefix.as_bytes()), start_rev).await;
    let mut stream = match stream {
        Ok(s) => s,
        Err(BackendError::Compacted(c)) => {
            let _ = tx.try_send(line("ERROR", &expired(&rv, c), def, served, render));
            return Ok(rx);
        }
        Err(e) => return Err(rest::backend_error(e)),
    };
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        for obj in &initial {
            if tx.send(line("ADDED", obj, def, served, render)).await.is_err() {
                return;
            }
        }
        let mut last_rev = start_rev - 1;
        if send_initial && bookmarks {
            if tx.send(line("BOOKMARK", &bookmark(served, last_rev, true), def, served, render)).await.is_err() {
                return;
            }
        }
        drop(initial);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(60), Duration::from_secs(60));
        loop {
            let chunk = tokio::select! {
                c = stream.next() => c,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick() => {
                    if bookmarks && tx.send(line("BOOKMARK", &bookmark(served, last_rev, false), def, served, render)).await.is_err() {
                        return;
                    }
                    continue;
                }
                _ = tx.closed() => return,
            };
            match chunk {
                None => return,
                Some(Ok(c)) => {
                    for ev in &c.events {
                        if let Some(kv) = ev.kv.as_ref() {
                            last_rev = last_rev.max(kv.mod_revision);
                        }
                        if let Some((ty, obj)) = convert(ev, &filter) {
                            if tx.send(line(ty, &obj, def, served, render)).await.is_err() {
                                return;
                            }
                        }
                    }
                    if c.events.is_empty() {
                        last_rev = last_rev.max(c.revision);
                    }
                }
                Some(Err(BackendError::Compacted(c))) => {
                    let _ = tx.send(line("ERROR", &expired(&rv, c), def, served, render)).await;
                    return;
                }
                Some(Err(e)) => {
                    let status = rest::backend_error(e).to_status();
                    let _ = tx.send(line("ERROR", &status, def, served, render)).await;
                    return;
                }
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::mvccpb::KeyValue;

    fn kv(name: &str, app: &str, create: i64, modr: i64) -> KeyValue {
        KeyValue {
            key: format!("/registry/pods/d/{name}").into_bytes().into(),
            value: serde_json::to_vec(&json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": app}}})).unwrap().into(),
            create_revision: create,
            mod_revision: modr,
            version: 1,
            lease: 0,
        }
    }

    #[test]
    fn selector_transitions() {
        let def = crate::resources::find("", "v1", "pods").unwrap();
        let f = Filter::from_query(def, &Query::parse(Some("labelSelector=app%3Dweb"))).unwrap();
        let put = |cur: KeyValue, prev: Option<KeyValue>| Event { r#type: EventType::Put as i32, kv: Some(cur), prev_kv: prev };
        assert_eq!(convert(&put(kv("a", "web", 5, 5), None), &f).unwrap().0, "ADDED");
        assert_eq!(convert(&put(kv("a", "web", 5, 6), Some(kv("a", "web", 5, 5))), &f).unwrap().0, "MODIFIED");
        assert_eq!(convert(&put(kv("a", "db", 5, 7), Some(kv("a", "web", 5, 6))), &f).unwrap().0, "DELETED");
        assert_eq!(convert(&put(kv("a", "web", 5, 8), Some(kv("a", "db", 5, 7))), &f).unwrap().0, "ADDED");
        assert!(convert(&put(kv("a", "db", 5, 9), Some(kv("a", "db", 5, 8))), &f).is_none());
        let del = Event { r#type: EventType::Delete as i32, kv: Some(KeyValue { key: b"/registry/pods/d/a".to_vec().into(), mod_revision: 10, ..Default::default() }), prev_kv: Some(kv("a", "web", 5, 9)) };
        let (ty, obj) = convert(&del, &f).unwrap();
        assert_eq!(ty, "DELETED");
        assert_eq!(obj["metadata"]["resourceVersion"], "10");
    }
}

/// Serves a watch from the watch cache. `Ok(None)` means the cache cannot serve it (not
/// synced, or the resourceVersion is older than the cache's ring): the caller falls back
/// to a store watch.
pub async fn start_cached(cache: &std::sync::Arc<crate::cache::Cache>, def: &'static ResourceDef, served: &'static ResourceDef, ns: &str, q: &Query, render: Render) -> Result<Option<mpsc::Receiver<Bytes>>, ApiError> {
    use crate::cache::Delivery;
    let Params { filter, rv, send_initial, bookmarks, timeout } = Params::from_query(def, q)?;
    let since = if send_initial || rv.is_empty() || rv == "0" {
        if rv.is_empty() && cache.wait_fresh().await.is_err() {
            return Ok(None);
        }
        if send_initial && !rv.is_empty() && rv != "0" {
            let n: i64 = rv.parse().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?;
            if !cache.wait_for(n, Duration::from_secs(3)).await {
                return Ok(None);
            }
        }
        None
    } else {
        Some(rv.parse::<i64>().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?)
    };
    let prefix = def.prefix(ns);
    let Some((mut sub, initial, replay, start_rev)) = cache.subscribe(&prefix, &filter, since) else { return Ok(None) };
    let shared = matches!(render, Render::Object) && std::ptr::eq(def, served);
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let render_entry = |ty: &str, e: &crate::cache::Entry| -> Bytes {
            if shared {
                crate::cache::line_bytes(ty, e)
            } else {
                line(ty, &e.value(), def, served, render)
            }
        };
        for e in &initial {
            if tx.send(render_entry("ADDED", e)).await.is_err() {
                return;
            }
        }
        drop(initial);
        let mut last_rev = since.unwrap_or(start_rev);
        if send_initial && bookmarks && tx.send(line("BOOKMARK", &bookmark(served, start_rev, true), def, served, render)).await.is_err() {
            return;
        }
        let send_event = |ev: &crate::cache::CacheEvent| -> Option<Bytes> {
            let ty = ev.type_for(&filter)?;
            Some(if shared {
                ev.line(ty)
            } else {
                let name = match ty {
                    crate::cache::EvType::Added => "ADDED",
                    crate::cache::EvType::Modified => "MODIFIED",
                    crate::cache::EvType::Deleted => "DELETED",
                };
                line(name, &ev.obj.value(), def, served, render)
            })
        };
        for ev in &replay {
            last_rev = last_rev.max(ev.rev);
            if let Some(b) = send_event(ev) {
                if tx.send(b).await.is_err() {
                    return;
                }
            }
        }
        drop(replay);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(60), Duration::from_secs(60));
        loop {
            let d = tokio::select! {
                d = sub.rx.recv() => d,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick() => {
                    if bookmarks && tx.send(line("BOOKMARK", &bookmark(served, last_rev, false), def, served, render)).await.is_err() {
                        return;
                    }
                    continue;
                }
                _ = tx.closed() => return,
            };
            match d {
                None | Some(Delivery::Reset) => return,
                Some(Delivery::Progress(r)) => last_rev = last_rev.max(r),
                Some(Delivery::Event(ev)) => {
                    last_rev = last_rev.max(ev.rev);
                    if let Some(b) = send_event(&ev) {
                        if tx.send(b).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    Ok(Some(rx))
}
