//! Server-side apply and field ownership (`metadata.managedFields`): every write records
//! which manager set which fields; an apply conflicts with fields another manager set to a
//! different value (unless forced), and fields an applier stops applying are removed when
//! no one else owns them. Field paths use upstream's `FieldsV1` encoding (`f:name`,
//! `k:{"name":"c"}` for list items with a merge key, `v:"x"` for set members, `.` for the
//! item itself).

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

/// One leaf of a field set: the FieldsV1 tokens from the object root.
pub type Path = Vec<String>;
pub type FieldSet = BTreeSet<Path>;

/// Field names of the tokens (for merge-key lookups).
fn names(path: &[String]) -> Vec<String> {
    path.iter().filter_map(|t| t.strip_prefix("f:").map(String::from)).collect()
}

fn walk(v: &Value, path: &mut Path, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                path.push(format!("f:{k}"));
                walk(x, path, out);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let ns = names(path);
            match crate::strategic::list_merge_key(&ns) {
                Some(Some(key)) if items.iter().all(|i| i.get(key).is_some()) => {
                    for it in items {
                        let mut k = Map::new();
                        k.insert(key.to_string(), it[key].clone());
                        path.push(format!("k:{}", Value::Object(k)));
                        path.push(".".into());
                        out.insert(path.clone());
                        path.pop();
                        walk(it, path, out);
                        path.pop();
                    }
                }
                Some(None) => {
                    for it in items {
                        path.push(format!("v:{it}"));
                        out.insert(path.clone());
                        path.pop();
                    }
                }
                _ => {
                    out.insert(path.clone());
                }
            }
        }
        _ => {
            if !path.is_empty() {
                out.insert(path.clone());
            }
        }
    }
}

/// The fields an object sets, excluding identity and system metadata and (when
/// `with_status` is false) the status.
pub fn field_set(obj: &Value, with_status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(m) = obj.as_object() else { return out };
    for (k, v) in m {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "status" if !with_status => {}
            "metadata" => {
                for mk in ["labels", "annotations", "finalizers", "ownerReferences"] {
                    if let Some(x) = v.get(mk) {
                        let mut p = vec!["f:metadata".to_string(), format!("f:{mk}")];
                        walk(x, &mut p, &mut out);
                    }
                }
            }
            _ => {
                let mut p = vec![format!("f:{k}")];
                walk(v, &mut p, &mut out);
            }
        }
    }
    out
}

/// The FieldsV1 tree of a set.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for p in set {
        let mut cur = &mut root;
        for t in p {
            cur = cur.entry(t.clone()).or_insert_with(|| json!({})).as_object_mut().expect("only objects are inserted");
        }
    }
    Value::Object(root)
}

/// The set a FieldsV1 tree describes.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn rec(v: &Value, path: &mut Path, out: &mut FieldSet) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, x) in m {
                    path.push(k.clone());
                    rec(x, path, out);
                    path.pop();
                }
            }
            _ => {
                if !path.is_empty() {
                    out.insert(path.clone());
                }
            }
        }
    }
    let mut out = FieldSet::new();
    rec(v, &mut Vec::new(), &mut out);
    out
}

/// The value at a path, if the object has it.
pub fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for t in path {
        if t == "." {
            continue;
        }
        if let Some(f) = t.strip_prefix("f:") {
            cur = cur.get(f)?;
        } else if let Some(k) = t.strip_prefix("k:") {
            let key: Value = serde_json::from_str(k).ok()?;
            let km = key.as_object()?;
            cur = cur.as_array()?.iter().find(|it| km.iter().all(|(kk, kv)| it.get(kk) == Some(kv)))?;
        } else if let Some(v) = t.strip_prefix("v:") {
            let val: Value = serde_json::from_str(v).ok()?;
            cur = cur.as_array()?.iter().find(|it| **it == val)?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Removes the value at a path (a map key, a list item, a set member).
fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, head)) = path.split_last() else { return };
    if last == "." {
        return remove_at(obj, head);
    }
    let mut cur = obj;
    for t in head {
        if t == "." {
            continue;
        }
        let next = if let Some(f) = t.strip_prefix("f:") {
            cur.get_mut(f)
        } else if let Some(k) = t.strip_prefix("k:") {
            let Ok(Value::Object(km)) = serde_json::from_str::<Value>(k) else { return };
            cur.as_array_mut().and_then(|a| a.iter_mut().find(|it| km.iter().all(|(kk, kv)| it.get(kk) == Some(kv))))
        } else {
            None
        };
        let Some(n) = next else { return };
        cur = n;
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        if let (Ok(Value::Object(km)), Some(a)) = (serde_json::from_str::<Value>(k), cur.as_array_mut()) {
            a.retain(|it| !km.iter().all(|(kk, kv)| it.get(kk) == Some(kv)));
        }
    } else if let Some(v) = last.strip_prefix("v:") {
        if let (Ok(val), Some(a)) = (serde_json::from_str::<Value>(v), cur.as_array_mut()) {
            a.retain(|it| *it != val);
        }
    }
}

/// Whether `owned` covers `p` (the same leaf, or an ancestor owned as a whole).
fn owns(owned: &FieldSet, p: &Path) -> bool {
    (1..=p.len()).any(|n| owned.contains(&p[..n].to_vec()))
}

/// One `managedFields` entry.
#[derive(Clone, Debug)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    subresource: String,
    set: FieldSet,
}

fn entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| Entry {
            manager: e["manager"].as_str().unwrap_or("").to_string(),
            operation: e["operation"].as_str().unwrap_or("Update").to_string(),
            api_version: e["apiVersion"].as_str().unwrap_or("").to_string(),
            subresource: e["subresource"].as_str().unwrap_or("").to_string(),
            set: from_fields_v1(e.get("fieldsV1").unwrap_or(&Value::Null)),
        })
        .collect()
}

fn store_entries(obj: &mut Value, list: Vec<Entry>, now: &str) {
    let out: Vec<Value> = list
        .into_iter()
        .filter(|e| !e.set.is_empty())
        .map(|e| {
            let mut v = json!({"manager": e.manager, "operation": e.operation, "apiVersion": e.api_version, "time": now, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(&e.set)});
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if out.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(out));
        }
    }
}

/// Records an Update-operation write by `manager`: fields it changed (relative to `old`)
/// become its own and leave other managers' sets; removed fields leave every set.
pub fn record_update(old: Option<&Value>, new: &mut Value, manager: &str, api_version: &str, subresource: &str) {
    let with_status = subresource == "status";
    let new_set = field_set(new, with_status);
    let mut list = old.map(entries).unwrap_or_default();
    let old_set = old.map(|o| field_set(o, with_status)).unwrap_or_default();
    let changed: FieldSet = new_set.iter().filter(|p| old.is_none_or(|o| value_at(o, p) != value_at(new, p))).cloned().collect();
    let removed: FieldSet = old_set.difference(&new_set).cloned().collect();
    for e in list.iter_mut() {
        e.set.retain(|p| !removed.contains(p) && !(changed.contains(p) && !(e.manager == manager && e.operation == "Update")));
    }
    match list.iter_mut().find(|e| e.manager == manager && e.operation == "Update" && e.subresource == subresource) {
        Some(e) => e.set.extend(changed),
        None => list.push(Entry { manager: manager.into(), operation: "Update".into(), api_version: api_version.into(), subresource: subresource.into(), set: changed }),
    }
    store_entries(new, list, &crate::meta::now());
}

/// A conflict between an apply and another manager's fields.
#[derive(Debug)]
pub struct Conflicts(pub Vec<(String, String)>);

impl Conflicts {
    /// Upstream's message: `Apply failed with 1 conflict: conflict with "m" using v1: .data.k`.
    pub fn message(&self, api_version: &str) -> String {
        let n = self.0.len();
        let parts: Vec<String> = self.0.iter().map(|(m, p)| format!("conflict with \"{m}\" using {api_version}: {p}")).collect();
        if n == 1 {
            format!("Apply failed with 1 conflict: {}", parts[0])
        } else {
            format!("Apply failed with {n} conflicts: {}", parts.join("\n"))
        }
    }
}

fn dotted(p: &Path) -> String {
    let mut s = String::new();
    for t in p {
        if let Some(f) = t.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = t.strip_prefix("k:") {
            s.push('[');
            s.push_str(k);
            s.push(']');
        } else if let Some(v) = t.strip_prefix("v:") {
            s.push('[');
            s.push_str(v);
            s.push(']');
        }
    }
    s
}

/// Applies configuration `applied` by `manager` to `live` (None: the object is created).
/// Returns the new object, with managedFields updated, or the conflicts.
pub fn apply(live: Option<&Value>, applied: &Value, manager: &str, api_version: &str, force: bool) -> Result<Value, Conflicts> {
    let new_set = field_set(applied, false);
    let mut list = live.map(entries).unwrap_or_default();
    let mut result = live.cloned().unwrap_or_else(|| json!({}));
    let mine = |e: &Entry| e.manager == manager && e.operation == "Apply";
    if let Some(l) = live {
        let mut conflicts = Vec::new();
        let mut forced: Vec<(usize, Path)> = Vec::new();
        for p in &new_set {
            let (a, cur) = (value_at(applied, p), value_at(l, p));
            if cur.is_none() || a == cur {
                continue;
            }
            for (i, e) in list.iter().enumerate() {
                if !mine(e) && owns(&e.set, p) {
                    conflicts.push((e.manager.clone(), dotted(p)));
                    forced.push((i, p.clone()));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(Conflicts(conflicts));
        }
        for (i, p) in forced {
            let e = &mut list[i];
            e.set.retain(|q| !(q.starts_with(&p) || p.starts_with(q)));
        }
        // Fields this manager applied before and no longer applies, owned by no one else.
        if let Some(prev) = list.iter().find(|e| mine(e)).map(|e| e.set.clone()) {
            for p in prev.difference(&new_set) {
                if !list.iter().any(|e| !mine(e) && owns(&e.set, p)) {
                    remove_at(&mut result, p);
                }
            }
        }
    }
    let mut cfg = applied.clone();
    if let Some(m) = cfg.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
        m.remove("resourceVersion");
    }
    crate::strategic::apply(&mut result, &cfg).map_err(|e| Conflicts(vec![("(invalid apply configuration)".into(), e)]))?;
    match list.iter_mut().find(|e| mine(e)) {
        Some(e) => {
            e.set = new_set;
            e.api_version = api_version.into();
        }
        None => list.push(Entry { manager: manager.into(), operation: "Apply".into(), api_version: api_version.into(), subresource: String::new(), set: new_set }),
    }
    store_entries(&mut result, list, &crate::meta::now());
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_v1_round_trip() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "1"}, "finalizers": ["x"]}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let set = field_set(&pod, false);
        let tree = to_fields_v1(&set);
        assert_eq!(tree["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"]["f:image"], json!({}));
        assert_eq!(tree["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"]["."], json!({}));
        assert_eq!(tree["f:metadata"]["f:finalizers"]["v:\"x\""], json!({}));
        assert!(tree["f:metadata"].get("f:name").is_none());
        assert_eq!(from_fields_v1(&tree), set);
        assert_eq!(value_at(&pod, &["f:spec".into(), "f:containers".into(), "k:{\"name\":\"c\"}".into(), "f:image".into()]), Some(&json!("i")));
    }

    #[test]
    fn apply_removes_dropped_fields_and_detects_conflicts() {
        let a1 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v1", "j": "x"}});
        let o1 = apply(None, &a1, "kubectl", "v1", false).unwrap();
        assert_eq!(o1["data"], json!({"k": "v1", "j": "x"}));
        let a2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v2"}});
        let o2 = apply(Some(&o1), &a2, "kubectl", "v1", false).unwrap();
        assert_eq!(o2["data"], json!({"k": "v2"}), "a field no longer applied is removed");
        let theirs = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "theirs"}});
        let c = apply(Some(&o2), &theirs, "other", "v1", false).unwrap_err();
        assert_eq!(c.message("v1"), "Apply failed with 1 conflict: conflict with \"kubectl\" using v1: .data.k");
        let o3 = apply(Some(&o2), &theirs, "other", "v1", true).unwrap();
        assert_eq!(o3["data"]["k"], "theirs");
        // After the force, the first applier no longer owns .data.k: re-applying its own
        // value conflicts with "other".
        assert!(apply(Some(&o3), &a2, "kubectl", "v1", false).is_err());
        // The same value is shared, not a conflict.
        assert!(apply(Some(&o3), &theirs, "third", "v1", false).is_ok());
    }

    #[test]
    fn updates_take_ownership() {
        let mut created = json!({"metadata": {"name": "c"}, "data": {"a": "1"}});
        record_update(None, &mut created, "kubectl-create", "v1", "");
        assert_eq!(created["metadata"]["managedFields"][0]["manager"], "kubectl-create");
        let mut edited = created.clone();
        edited["data"]["a"] = json!("2");
        record_update(Some(&created), &mut edited, "kubectl-edit", "v1", "");
        let mf = edited["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(mf.len(), 1, "kubectl-create lost its only field: {mf:?}");
        assert_eq!(mf[0]["manager"], "kubectl-edit");
    }
}
