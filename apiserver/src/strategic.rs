//! Strategic merge patch, as kubectl sends for `apply`, `set image`, `edit` and
//! `patch --type strategic` on built-in kinds: like a merge patch, except that lists with
//! a merge key (containers by `name`, container ports by `containerPort`, ...) merge element
//! by element, and the `$patch`, `$retainKeys`, `$deleteFromPrimitiveList` and
//! `$setElementOrder` directives are honoured.

use serde_json::{Map, Value};

/// The merge key of the list at `path` (field names from the object root), or None when
/// the list is replaced whole (upstream's `patchMergeKey` tags).
fn merge_key(path: &[String]) -> Option<&'static str> {
    let field = path.last()?.as_str();
    let in_container = path.iter().any(|p| matches!(p.as_str(), "containers" | "initContainers" | "ephemeralContainers"));
    Some(match field {
        "containers" | "initContainers" | "ephemeralContainers" | "env" | "volumes" | "imagePullSecrets" | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" if in_container => "containerPort",
        "ports" if path.first().map(String::as_str) == Some("spec") && path.len() == 2 => "port",
        "conditions" => "type",
        "addresses" => "type",
        "hostAliases" => "ip",
        "ownerReferences" => "uid",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

/// The patch merge key of list `field` in message `message` (simple name, e.g.
/// `PodSpec`), for the OpenAPI `x-kubernetes-patch-merge-key` extensions kubectl reads to
/// compute the patches it sends; `Some("")` marks a scalar list merged as a set.
pub fn merge_key_for(message: &str, field: &str) -> Option<&'static str> {
    Some(match (message, field) {
        ("PodSpec", "containers" | "initContainers" | "ephemeralContainers" | "volumes" | "imagePullSecrets" | "resourceClaims") => "name",
        ("PodSpec", "hostAliases") => "ip",
        ("PodSpec", "topologySpreadConstraints") => "topologyKey",
        ("Container" | "EphemeralContainer", "env") => "name",
        ("Container" | "EphemeralContainer", "ports") => "containerPort",
        ("Container" | "EphemeralContainer", "volumeMounts") => "mountPath",
        ("Container" | "EphemeralContainer", "volumeDevices") => "devicePath",
        ("ServiceSpec", "ports") => "port",
        ("NodeStatus", "addresses") => "type",
        (m, "conditions") if m.ends_with("Status") => "type",
        ("ObjectMeta", "ownerReferences") => "uid",
        ("ObjectMeta", "finalizers") => "",
        _ => return None,
    })
}

/// How the list at `path` (field names from the root) merges: `Some(Some(key))` by a
/// merge key, `Some(None)` as a set of scalars, `None` atomically.
pub fn list_merge_key(path: &[String]) -> Option<Option<&'static str>> {
    if let Some(k) = merge_key(path) {
        return Some(Some(k));
    }
    if is_set_list(path) {
        return Some(None);
    }
    None
}

/// Lists of scalars that merge as sets.
fn is_set_list(path: &[String]) -> bool {
    matches!(path.last().map(String::as_str), Some("finalizers"))
}

/// Applies `patch` to `doc`.
pub fn apply(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let mut path = Vec::new();
    merge_map(doc, patch, &mut path)
}

fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k.clone(), strip(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().filter(|e| e.get("$patch").is_none()).map(strip).collect()),
        other => other.clone(),
    }
}

fn merge_map(t: &mut Value, p: &Value, path: &mut Vec<String>) -> Result<(), String> {
    let Some(pm) = p.as_object() else {
        *t = p.clone();
        return Ok(());
    };
    match pm.get("$patch").map(|v| v.as_str().unwrap_or("")) {
        Some("replace") => {
            *t = strip(p);
            return Ok(());
        }
        Some("merge") | None => {}
        Some("delete") => {
            *t = Value::Object(Map::new());
            return Ok(());
        }
        Some(other) => return Err(format!("Unknown patch type: {other} in map: {p}")),
    }
    if !t.is_object() {
        *t = Value::Object(Map::new());
    }
    let tm = t.as_object_mut().expect("made an object above");
    for (k, v) in pm {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let drop: Vec<&Value> = v.as_array().map(|a| a.iter().collect()).unwrap_or_default();
            if let Some(Value::Array(list)) = tm.get_mut(field) {
                list.retain(|x| !drop.contains(&x));
            }
            continue;
        }
        if k.starts_with('$') {
            return Err(format!("unknown strategic merge patch directive {k:?}"));
        }
        if v.is_null() {
            tm.remove(k);
            continue;
        }
        path.push(k.clone());
        match v {
            Value::Object(o) if o.get("$patch").and_then(Value::as_str) == Some("delete") => {
                tm.remove(k);
            }
            Value::Object(_) => merge_map(tm.entry(k.clone()).or_insert(Value::Null), v, path)?,
            Value::Array(a) => merge_list(tm.entry(k.clone()).or_insert(Value::Null), a, path)?,
            other => {
                tm.insert(k.clone(), other.clone());
            }
        }
        path.pop();
    }
    if let Some(retain) = pm.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        tm.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(())
}

fn merge_list(t: &mut Value, p: &[Value], path: &mut Vec<String>) -> Result<(), String> {
    if p.iter().any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace")) {
        *t = Value::Array(p.iter().filter(|e| e.get("$patch").is_none()).map(strip).collect());
        return Ok(());
    }
    if let Some(key) = merge_key(path) {
        if !t.is_array() {
            *t = Value::Array(Vec::new());
        }
        let tl = t.as_array_mut().expect("made an array above");
        for e in p {
            let Some(em) = e.as_object() else {
                tl.push(e.clone());
                continue;
            };
            let kv = em.get(key);
            if em.get("$patch").and_then(Value::as_str) == Some("delete") {
                tl.retain(|x| x.get(key) != kv);
                continue;
            }
            match tl.iter_mut().find(|x| kv.is_some() && x.get(key) == kv) {
                Some(existing) => merge_map(existing, e, path)?,
                None => tl.push(strip(e)),
            }
        }
        return Ok(());
    }
    if is_set_list(path) {
        if !t.is_array() {
            *t = Value::Array(Vec::new());
        }
        let tl = t.as_array_mut().expect("made an array above");
        for e in p {
            if !tl.contains(e) {
                tl.push(e.clone());
            }
        }
        return Ok(());
    }
    *t = Value::Array(p.iter().map(strip).collect());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(doc: Value, patch: Value) -> Value {
        let mut d = doc;
        apply(&mut d, &patch).unwrap();
        d
    }

    #[test]
    fn containers_merge_by_name() {
        let pod = json!({"spec": {"containers": [{"name": "a", "image": "x:1", "env": [{"name": "E", "value": "1"}]}, {"name": "b", "image": "y:1"}]}});
        let got = run(pod.clone(), json!({"spec": {"containers": [{"name": "a", "image": "x:2", "env": [{"name": "F", "value": "2"}]}]}}));
        assert_eq!(got, json!({"spec": {"containers": [{"name": "a", "image": "x:2", "env": [{"name": "E", "value": "1"}, {"name": "F", "value": "2"}]}, {"name": "b", "image": "y:1"}]}}));
        let del = run(pod, json!({"spec": {"containers": [{"name": "b", "$patch": "delete"}]}}));
        assert_eq!(del["spec"]["containers"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn directives() {
        let d = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x"]}, "spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}, "args": ["1", "2"]}});
        let got = run(d.clone(), json!({"metadata": {"labels": {"a": null}, "finalizers": ["y"]}, "spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}, "args": ["3"]}}));
        assert_eq!(got, json!({"metadata": {"labels": {"b": "2"}, "finalizers": ["x", "y"]}, "spec": {"strategy": {"type": "Recreate"}, "args": ["3"]}}));
        let rep = run(d.clone(), json!({"metadata": {"labels": {"$patch": "replace", "c": "3"}}}));
        assert_eq!(rep["metadata"]["labels"], json!({"c": "3"}));
        let dl = run(d, json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"], "$setElementOrder/finalizers": []}}));
        assert_eq!(dl["metadata"]["finalizers"], json!([]));
        let mut bad = json!({});
        assert!(apply(&mut bad, &json!({"$bogus": 1})).is_err());
    }

    #[test]
    fn service_ports_merge_by_port() {
        let s = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}});
        let got = run(s, json!({"spec": {"ports": [{"port": 443, "targetPort": 8443}]}}));
        assert_eq!(got["spec"]["ports"][1], json!({"port": 443, "name": "https", "targetPort": 8443}));
    }
}
