//! JSON patch (RFC 6902) and JSON merge patch (RFC 7386) over `serde_json::Value`.

use serde_json::Value;

/// Applies a JSON merge patch: objects merge recursively, `null` deletes, anything else
/// replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn unescape(tok: &str) -> String {
    tok.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(vec![]);
    }
    if !path.starts_with('/') {
        return Err(format!("invalid JSON pointer {path:?}: must start with '/'"));
    }
    Ok(path[1..].split('/').map(unescape).collect())
}

fn parent<'a>(doc: &'a mut Value, toks: &[String], path: &str) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m.get_mut(t).ok_or_else(|| format!("doc is missing path: \"{path}\": missing value"))?,
            Value::Array(a) => {
                let i: usize = t.parse().map_err(|_| format!("invalid array index {t:?} in \"{path}\""))?;
                a.get_mut(i).ok_or_else(|| format!("doc is missing path: \"{path}\": missing value"))?
            }
            _ => return Err(format!("doc is missing path: \"{path}\": missing value")),
        };
    }
    Ok(cur)
}

fn get(doc: &Value, path: &str) -> Result<Value, String> {
    let toks = split_pointer(path)?;
    let mut cur = doc;
    for t in &toks {
        cur = match cur {
            Value::Object(m) => m.get(t),
            Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| format!("doc is missing path: \"{path}\": missing value"))?;
    }
    Ok(cur.clone())
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let toks = split_pointer(path)?;
    let Some((last, head)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent(doc, head, path)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
            } else {
                let i: usize = last.parse().map_err(|_| format!("invalid array index {last:?} in \"{path}\""))?;
                if i > a.len() {
                    return Err(format!("add operation does not apply: doc is missing path: \"{path}\": missing value"));
                }
                a.insert(i, value);
            }
        }
        _ => return Err(format!("add operation does not apply: doc is missing path: \"{path}\": missing value")),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let toks = split_pointer(path)?;
    let Some((last, head)) = toks.split_last() else {
        return Err("remove operation does not apply to the whole document".into());
    };
    match parent(doc, head, path)? {
        Value::Object(m) => m.remove(last).ok_or_else(|| format!("remove operation does not apply: doc is missing path: \"{path}\": missing value")),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("invalid array index {last:?} in \"{path}\""))?;
            if i >= a.len() {
                return Err(format!("remove operation does not apply: doc is missing path: \"{path}\": missing value"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("remove operation does not apply: doc is missing path: \"{path}\": missing value")),
    }
}

/// Applies a JSON patch (a list of operations). All or nothing: on error the target is
/// left unchanged.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch.as_array().ok_or("a JSON patch must be a list of operations")?;
    let mut doc = target.clone();
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).ok_or("a JSON patch operation needs an \"op\"")?;
        let path = op.get("path").and_then(Value::as_str).ok_or_else(|| format!("operation {name:?} needs a \"path\""))?;
        let value = || op.get("value").cloned().ok_or_else(|| format!("operation {name:?} needs a \"value\""));
        let from = || op.get("from").and_then(Value::as_str).ok_or_else(|| format!("operation {name:?} needs a \"from\""));
        match name {
            "add" => add(&mut doc, path, value()?)?,
            "remove" => {
                remove(&mut doc, path)?;
            }
            "replace" => {
                get(&doc, path).map_err(|e| format!("replace operation does not apply: {e}"))?;
                if path.is_empty() {
                    doc = value()?;
                } else {
                    remove(&mut doc, path)?;
                    add(&mut doc, path, value()?)?;
                }
            }
            "move" => {
                let v = remove(&mut doc, from()?)?;
                add(&mut doc, path, v)?;
            }
            "copy" => {
                let v = get(&doc, from()?)?;
                add(&mut doc, path, v)?;
            }
            "test" => {
                let got = get(&doc, path).ok();
                let want = value()?;
                if got.as_ref() != Some(&want) {
                    return Err(format!("testing value {path} failed: test failed"));
                }
            }
            other => return Err(format!("Unexpected kind: {other}")),
        }
    }
    *target = doc;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(t, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn json_ops() {
        let mut t = json!({"metadata": {"labels": {"a": "1"}}, "list": [1, 2, 3]});
        json_patch(&mut t, &json!([
            {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
            {"op": "replace", "path": "/list/0", "value": 9},
            {"op": "remove", "path": "/list/1"},
            {"op": "add", "path": "/list/-", "value": 4},
            {"op": "test", "path": "/metadata/labels/a", "value": "1"},
            {"op": "copy", "from": "/metadata/labels/a", "path": "/x"},
            {"op": "move", "from": "/x", "path": "/y"},
        ]))
        .unwrap();
        assert_eq!(t, json!({"metadata": {"labels": {"a": "1", "b/c": "2"}}, "list": [9, 3, 4], "y": "1"}));
        let before = t.clone();
        let e = json_patch(&mut t, &json!([{"op": "add", "path": "/z", "value": 1}, {"op": "test", "path": "/y", "value": "2"}])).unwrap_err();
        assert!(e.contains("testing value /y failed"), "{e}");
        assert_eq!(t, before, "a failed patch changes nothing");
        assert!(json_patch(&mut t, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        assert!(json_patch(&mut t, &json!([{"op": "replace", "path": "/nope", "value": 1}])).is_err());
    }
}
