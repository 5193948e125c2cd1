//! CustomResourceDefinitions: validating CRDs, making them Established, serving the
//! custom resources they define (discovery, routing, storage under
//! `/registry/<group>/<plural>/`), and validating, defaulting and pruning custom objects
//! against the CRD's `openAPIV3Schema` with upstream's messages.
//!
//! Every API server process derives the served set from the CRDs in its watch cache, so
//! all API servers of a cluster serve the same custom resources.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{json, Map, Value};

use crate::resources::{self, ResourceDef, ALL_VERBS};
use crate::status::FieldError;

/// Schemas of served custom resources, by (group, version, plural).
static SCHEMAS: Mutex<Option<HashMap<(String, String, String), Arc<Value>>>> = Mutex::new(None);
/// Definitions leaked once and reused while unchanged (CRD churn is rare; a changed CRD
/// leaks its old definition, a few hundred bytes).
static LEAKED: Mutex<Option<HashMap<String, &'static ResourceDef>>> = Mutex::new(None);

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

fn leak_list(v: &[String]) -> &'static [&'static str] {
    Box::leak(v.iter().map(|s| leak(s)).collect::<Vec<_>>().into_boxed_slice())
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array).map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default()
}

/// Rebuilds the served custom resources from every CRD object.
pub fn rebuild(crds: &[Value]) {
    let mut defs = Vec::new();
    let mut schemas = HashMap::new();
    let mut leaked = LEAKED.lock();
    let cache = leaked.get_or_insert_with(HashMap::new);
    for crd in crds {
        if crd.pointer("/metadata/deletionTimestamp").is_some() {
            continue;
        }
        let spec = &crd["spec"];
        let group = spec["group"].as_str().unwrap_or("");
        let names = &spec["names"];
        let (plural, kind) = (names["plural"].as_str().unwrap_or(""), names["kind"].as_str().unwrap_or(""));
        if group.is_empty() || plural.is_empty() || kind.is_empty() {
            continue;
        }
        let singular = names["singular"].as_str().map(String::from).unwrap_or_else(|| kind.to_lowercase());
        let namespaced = spec["scope"].as_str() != Some("Cluster");
        for v in spec["versions"].as_array().into_iter().flatten() {
            if v["served"].as_bool() != Some(true) {
                continue;
            }
            let version = v["name"].as_str().unwrap_or("");
            let mut subs = Vec::new();
            if v.pointer("/subresources/status").is_some() {
                subs.push("status".to_string());
            }
            let stored = v["storage"].as_bool() == Some(true);
            let ident = format!("{group}|{version}|{plural}|{kind}|{singular}|{namespaced}|{stored}|{subs:?}|{:?}|{:?}", strings(names.get("shortNames")), strings(names.get("categories")));
            let def = *cache.entry(ident).or_insert_with(|| {
                Box::leak(Box::new(ResourceDef {
                    group: leak(group),
                    version: leak(version),
                    kind: leak(kind),
                    plural: leak(plural),
                    singular: leak(&singular),
                    namespaced,
                    short_names: leak_list(&strings(names.get("shortNames"))),
                    categories: leak_list(&strings(names.get("categories"))),
                    verbs: ALL_VERBS,
                    subresources: leak_list(&subs),
                    storage: leak(&format!("{group}/{plural}")),
                    custom: true,
                    stored,
                }))
            });
            defs.push(def);
            let schema = v.pointer("/schema/openAPIV3Schema").cloned().unwrap_or(json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
            schemas.insert((group.to_string(), version.to_string(), plural.to_string()), Arc::new(schema));
        }
    }
    drop(leaked);
    *SCHEMAS.lock() = Some(schemas);
    resources::set_dynamic(defs);
}

/// The openAPIV3Schema of a served custom resource.
pub fn schema_of(def: &ResourceDef) -> Option<Arc<Value>> {
    SCHEMAS.lock().as_ref()?.get(&(def.group.to_string(), def.version.to_string(), def.plural.to_string())).cloned()
}

/// Validates a CRD (upstream's most important rules).
pub fn validate_crd(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &obj["spec"];
    let group = spec["group"].as_str().unwrap_or("");
    let plural = spec.pointer("/names/plural").and_then(Value::as_str).unwrap_or("");
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    if group.is_empty() {
        errs.push(FieldError::required("spec.group", ""));
    } else if !group.contains('.') {
        errs.push(FieldError::invalid("spec.group", group, "should be a domain with at least one dot"));
    }
    if plural.is_empty() {
        errs.push(FieldError::required("spec.names.plural", ""));
    }
    if spec.pointer("/names/kind").and_then(Value::as_str).unwrap_or("").is_empty() {
        errs.push(FieldError::required("spec.names.kind", ""));
    }
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        errs.push(FieldError::invalid("metadata.name", name, "must be spec.names.plural+\".\"+spec.group"));
    }
    match spec["scope"].as_str() {
        Some("Namespaced" | "Cluster") => {}
        Some(s) => errs.push(FieldError::not_supported("spec.scope", s, &["Cluster", "Namespaced"])),
        None => errs.push(FieldError::required("spec.scope", "")),
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        errs.push(FieldError::invalid("spec.versions", json!([]), "must have exactly one version marked as storage version"));
    } else {
        let storage = versions.iter().filter(|v| v["storage"].as_bool() == Some(true)).count();
        if storage != 1 {
            errs.push(FieldError::invalid("spec.versions", Value::Array(versions.clone()), "must have exactly one version marked as storage version"));
        }
        for (i, v) in versions.iter().enumerate() {
            if v.pointer("/schema/openAPIV3Schema").is_none() {
                errs.push(FieldError::required(format!("spec.versions[{i}].schema.openAPIV3Schema"), "schemas are required"));
            }
        }
    }
    errs
}

/// What a new CRD's status says once it is served (upstream's naming and establishing
/// controllers; here names are accepted at once).
pub fn initial_status(obj: &mut Value) {
    let names = obj.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let mut accepted = names.clone();
    if accepted.get("singular").is_none() {
        if let Some(k) = names["kind"].as_str() {
            accepted["singular"] = json!(k.to_lowercase());
        }
    }
    if accepted.get("listKind").is_none() {
        if let Some(k) = names["kind"].as_str() {
            accepted["listKind"] = json!(format!("{k}List"));
        }
    }
    let now = crate::meta::now();
    let stored: Vec<Value> = obj.pointer("/spec/versions").and_then(Value::as_array).into_iter().flatten().filter(|v| v["storage"].as_bool() == Some(true)).map(|v| v["name"].clone()).collect();
    obj["status"] = json!({
        "acceptedNames": accepted,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
        "storedVersions": stored,
    });
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Validates `v` against a structural schema, applying `default`s and pruning fields the
/// schema does not declare (unless it preserves unknown fields). Upstream's messages:
/// `spec.replicas: Invalid value: "string": spec.replicas in body must be of type integer: "string"`.
fn check(schema: &Value, v: &mut Value, path: &str, errs: &mut Vec<FieldError>, pruned: &mut Vec<String>) {
    if schema.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true) {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            errs.push(FieldError::invalid(path, type_name(v), format!("{path} in body must be of type integer,string: \"{}\"", type_name(v))));
        }
        return;
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "string" => v.is_string(),
            "boolean" => v.is_boolean(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            _ => true,
        };
        if !ok {
            if v.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
                return;
            }
            errs.push(FieldError::invalid(path, type_name(v), format!("{path} in body must be of type {t}: \"{}\"", type_name(v))));
            return;
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            let allowed: Vec<&str> = e.iter().filter_map(Value::as_str).collect();
            errs.push(FieldError::not_supported(path, v.clone(), &allowed));
        }
    }
    match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            let v = &Value::Number(n.clone());
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                if x < min {
                    errs.push(FieldError::invalid(path, v.clone(), format!("{path} in body should be greater than or equal to {min}")));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                if x > max {
                    errs.push(FieldError::invalid(path, v.clone(), format!("{path} in body should be less than or equal to {max}")));
                }
            }
        }
        Value::String(s) => {
            let n = s.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
                if n < min {
                    errs.push(FieldError::invalid(path, Value::String(s.clone()), format!("{path} in body should be at least {min} chars long")));
                }
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
                if n > max {
                    errs.push(FieldError::too_long(path, max as usize));
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
                if (items.len() as u64) < min {
                    errs.push(FieldError::invalid(path, Value::Array(items.clone()), format!("{path} in body should have at least {min} items")));
                }
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    errs.push(FieldError::too_long(path, max as usize));
                }
            }
            if let Some(is) = schema.get("items") {
                for (i, it) in items.iter_mut().enumerate() {
                    check(is, it, &format!("{path}[{i}]"), errs, pruned);
                }
            }
        }
        Value::Object(m) => {
            let preserve = schema.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool) == Some(true);
            let props = schema.get("properties").and_then(Value::as_object);
            if let Some(props) = props {
                for (k, ps) in props {
                    if !m.contains_key(k) {
                        if let Some(d) = ps.get("default") {
                            m.insert(k.clone(), d.clone());
                        }
                    }
                }
            }
            for req in schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
                if !m.contains_key(req) {
                    errs.push(FieldError::required(if path.is_empty() { req.to_string() } else { format!("{path}.{req}") }, ""));
                }
            }
            let additional = schema.get("additionalProperties");
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match props.and_then(|ps| ps.get(&k)) {
                    Some(ps) => check(ps, m.get_mut(&k).expect("key listed above"), &p, errs, pruned),
                    None => match additional {
                        Some(a) if a.is_object() => check(a, m.get_mut(&k).expect("key listed above"), &p, errs, pruned),
                        Some(Value::Bool(true)) => {}
                        _ if preserve || (props.is_none() && additional.is_none() && schema.get("type").is_none()) => {}
                        _ => {
                            m.remove(&k);
                            pruned.push(p);
                        }
                    },
                }
            }
        }
        _ => {}
    }
}

/// Validates, defaults and prunes a custom object (everything but `apiVersion`, `kind`
/// and `metadata`, which the generic path validates). Returns the field errors and the
/// pruned (unknown) field paths.
pub fn validate_custom(def: &ResourceDef, obj: &mut Value) -> (Vec<FieldError>, Vec<String>) {
    let mut errs = Vec::new();
    let mut pruned = Vec::new();
    let Some(schema) = schema_of(def) else { return (errs, pruned) };
    let mut s = (*schema).clone();
    if let Some(p) = s.get_mut("properties").and_then(Value::as_object_mut) {
        for k in ["apiVersion", "kind", "metadata"] {
            p.remove(k);
        }
    }
    let Some(m) = obj.as_object_mut() else { return (errs, pruned) };
    let mut rest = Value::Object(m.iter().filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata")).map(|(k, v)| (k.clone(), v.clone())).collect::<Map<_, _>>());
    check(&s, &mut rest, "", &mut errs, &mut pruned);
    if let Value::Object(r) = rest {
        m.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata"));
        m.extend(r);
    }
    (errs, pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd() -> Value {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "crontabs.stable.example.com"},
          "spec": {"group": "stable.example.com", "scope": "Namespaced", "names": {"plural": "crontabs", "singular": "crontab", "kind": "CronTab", "shortNames": ["ct"]},
            "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
              "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "required": ["cronSpec"], "properties": {
                  "cronSpec": {"type": "string", "minLength": 1}, "image": {"type": "string"},
                  "replicas": {"type": "integer", "minimum": 1, "default": 1},
                  "mode": {"type": "string", "enum": ["a", "b"]}}},
                "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}}}}]}})
    }

    #[test]
    fn crds_are_validated_and_served() {
        assert!(validate_crd(&crd()).is_empty());
        let mut bad = crd();
        bad["metadata"]["name"] = json!("wrong");
        bad["spec"]["versions"][0]["storage"] = json!(false);
        let fields: Vec<String> = validate_crd(&bad).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["metadata.name", "spec.versions"]);
        rebuild(&[crd()]);
        let def = resources::find("stable.example.com", "v1", "crontabs").expect("served after rebuild");
        assert!(def.custom && def.namespaced && def.has_status());
        assert_eq!(def.key("d", "x"), "/registry/stable.example.com/crontabs/d/x");
        let mut o = json!({"apiVersion": "stable.example.com/v1", "kind": "CronTab", "metadata": {"name": "x"}, "spec": {"cronSpec": "* * * * */5", "extra": 1}});
        let (errs, pruned) = validate_custom(def, &mut o);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(pruned, ["spec.extra"]);
        assert_eq!(o["spec"]["replicas"], 1, "defaulted");
        let mut o = json!({"spec": {"replicas": "three", "mode": "c"}});
        let (errs, _) = validate_custom(def, &mut o);
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(msgs.contains(&"spec.cronSpec: Required value".to_string()), "{msgs:?}");
        assert!(msgs.contains(&"spec.replicas: Invalid value: \"string\": spec.replicas in body must be of type integer: \"string\"".to_string()), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.starts_with("spec.mode: Unsupported value: \"c\"")), "{msgs:?}");
        rebuild(&[]);
        assert!(resources::find("stable.example.com", "v1", "crontabs").is_none());
    }
}
