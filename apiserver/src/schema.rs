//! The Kubernetes API types as data: every message with its fields' protobuf tags, JSON
//! names and types (generated into `schema/k8s-types.json` by `scripts/gen-k8s-schema.py`).
//! From it the server decodes `application/vnd.kubernetes.protobuf` bodies, prunes or
//! rejects unknown fields (`fieldValidation`), and builds the OpenAPI schemas kubectl
//! reads for `explain` and client-side validation.

use std::collections::HashMap;
use std::sync::OnceLock;

use base64::Engine;
use serde_json::{json, Map, Value};

const TIME: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Time";
const MICRO_TIME: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime";
const QUANTITY: &str = "io.k8s.apimachinery.pkg.api.resource.Quantity";
const INT_OR_STRING: &str = "io.k8s.apimachinery.pkg.util.intstr.IntOrString";
const DURATION: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Duration";

/// How a message maps to JSON when it is not a plain object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Special {
    None,
    Time { micro: bool },
    Quantity,
    IntOrString,
    Duration,
    /// Embedded JSON in a `raw` bytes field (RawExtension, FieldsV1, apiextensions JSON).
    Raw,
    /// JSONSchemaPropsOrBool / OrArray / OrStringArray.
    SchemaOr(u8),
}

fn special_of(name: &str) -> Special {
    match name {
        TIME => Special::Time { micro: false },
        MICRO_TIME => Special::Time { micro: true },
        QUANTITY => Special::Quantity,
        INT_OR_STRING => Special::IntOrString,
        DURATION => Special::Duration,
        "io.k8s.apimachinery.pkg.runtime.RawExtension" | "io.k8s.apimachinery.pkg.apis.meta.v1.FieldsV1" => Special::Raw,
        n if n.starts_with("io.k8s.apiextensions-apiserver.") && n.ends_with(".Json") => Special::Raw,
        n if n.ends_with(".JsonSchemaPropsOrBool") => Special::SchemaOr(0),
        n if n.ends_with(".JsonSchemaPropsOrArray") => Special::SchemaOr(1),
        n if n.ends_with(".JsonSchemaPropsOrStringArray") => Special::SchemaOr(2),
        _ => Special::None,
    }
}

/// Fields that are pointers in the Go types: present on the wire means set, even to 0 or
/// false (everything else at its zero value is omitted from JSON, as `omitempty` does).
const KEEP_ZERO: &[&str] = &[
    "replicas", "minReplicas", "maxReplicas", "revisionHistoryLimit", "progressDeadlineSeconds", "terminationGracePeriodSeconds",
    "activeDeadlineSeconds", "priority", "partition", "backoffLimit", "backoffLimitPerIndex", "maxFailedIndexes", "parallelism",
    "completions", "ttlSecondsAfterFinished", "startingDeadlineSeconds", "successfulJobsHistoryLimit", "failedJobsHistoryLimit",
    "runAsUser", "runAsGroup", "fsGroup", "defaultMode", "mode", "expirationSeconds", "automountServiceAccountToken",
    "readOnlyRootFilesystem", "privileged", "allowPrivilegeEscalation", "runAsNonRoot", "enableServiceLinks", "setHostnameAsFQDN",
    "shareProcessNamespace", "immutable", "optional", "hostUsers", "suspend", "manualSelector", "allowVolumeExpansion",
    "deletionGracePeriodSeconds", "gracePeriodSeconds", "allowWatchBookmarks", "sendInitialEvents", "blockOwnerDeletion", "controller",
    "readOnly", "value", "limit", "seconds", "tolerationSeconds", "weight", "minAvailable", "maxUnavailable", "maxSurge", "port",
    "exitCode", "restartCount", "ready", "started", "allowed", "denied", "intVal", "publishNotReadyAddresses", "serving", "terminating",
];

#[derive(Clone, Debug, PartialEq)]
pub enum Ty {
    String,
    Bytes,
    Bool,
    Int32,
    Int64,
    Double,
    Float,
    Message(String),
    /// map<string, T>
    Map(Box<Ty>),
}

#[derive(Clone, Debug)]
pub struct Field {
    pub tag: u32,
    pub name: String,
    pub ty: Ty,
    pub repeated: bool,
    /// Embedded with `json:",inline"`: its members are the parent's in JSON.
    pub inline: bool,
}

#[derive(Debug, Default)]
pub struct Message {
    pub fields: Vec<Field>,
    by_tag: HashMap<u32, usize>,
    by_name: HashMap<String, usize>,
}

impl Message {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.by_name.get(name).map(|i| &self.fields[*i])
    }
}

pub struct Schema {
    messages: HashMap<String, Message>,
}

fn parse_ty(s: &str) -> Ty {
    match s {
        "string" => Ty::String,
        "bytes" => Ty::Bytes,
        "bool" => Ty::Bool,
        "int32" | "uint32" | "sint32" => Ty::Int32,
        "int64" | "uint64" | "sint64" => Ty::Int64,
        "double" => Ty::Double,
        "float" => Ty::Float,
        m if m.starts_with("map:") => Ty::Map(Box::new(parse_ty(&m[4..]))),
        m => Ty::Message(m.to_string()),
    }
}

/// The schema, loaded once.
pub fn schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| {
        let raw: Value = serde_json::from_str(include_str!("../schema/k8s-types.json")).expect("the generated schema is valid JSON");
        let mut messages = HashMap::new();
        for (name, fields) in raw["messages"].as_object().expect("messages is an object") {
            let mut m = Message::default();
            for f in fields.as_array().into_iter().flatten() {
                let field = Field {
                    tag: f[0].as_u64().unwrap_or(0) as u32,
                    name: f[1].as_str().unwrap_or("").to_string(),
                    ty: parse_ty(f[2].as_str().unwrap_or("")),
                    repeated: f[3].as_u64().unwrap_or(0) & 1 == 1,
                    inline: f[3].as_u64().unwrap_or(0) & 2 == 2,
                };
                m.by_tag.insert(field.tag, m.fields.len());
                m.by_name.insert(field.name.clone(), m.fields.len());
                m.fields.push(field);
            }
            messages.insert(name.clone(), m);
        }
        Schema { messages }
    })
}

impl Schema {
    pub fn message(&self, name: &str) -> Option<&Message> {
        self.messages.get(name)
    }

    /// The field a JSON key names in message `msg`, looking through inline members.
    fn json_field<'a>(&'a self, msg: &'a Message, key: &str) -> Option<&'a Field> {
        if let Some(f) = msg.field(key) {
            if !f.inline {
                return Some(f);
            }
        }
        msg.fields.iter().filter(|f| f.inline).find_map(|f| match &f.ty {
            Ty::Message(m) => self.messages.get(m).and_then(|im| self.json_field(im, key)),
            _ => None,
        })
    }

    /// Decodes a protobuf message into its Kubernetes JSON form.
    pub fn decode(&self, name: &str, buf: &[u8]) -> Result<Value, String> {
        let msg = self.messages.get(name).ok_or_else(|| format!("no schema for {name}"))?;
        let mut out = Map::new();
        let mut raw: HashMap<u32, Value> = HashMap::new();
        let special = special_of(name);
        let mut r = Reader { buf, pos: 0 };
        while !r.done() {
            let key = r.varint()?;
            let (tag, wt) = ((key >> 3) as u32, (key & 7) as u8);
            let Some(field) = msg.by_tag.get(&tag).map(|i| &msg.fields[*i]) else {
                r.skip(wt)?;
                continue;
            };
            let mut vals = Vec::new();
            match (&field.ty, wt) {
                (Ty::Int32 | Ty::Int64 | Ty::Bool, 2) => {
                    // Packed repeated scalars.
                    let b = r.bytes()?;
                    let mut pr = Reader { buf: b, pos: 0 };
                    while !pr.done() {
                        vals.push(scalar(&field.ty, pr.varint()?));
                    }
                }
                _ => vals.push(self.value(&field.ty, wt, &mut r)?),
            }
            for v in vals {
                if special != Special::None {
                    raw.insert(tag, v);
                    continue;
                }
                if field.repeated {
                    let e = out.entry(field.name.clone()).or_insert_with(|| Value::Array(vec![]));
                    if let Value::Array(a) = e {
                        a.push(v);
                    }
                } else if let Ty::Map(_) = field.ty {
                    let e = out.entry(field.name.clone()).or_insert_with(|| Value::Object(Map::new()));
                    if let (Value::Object(m), Value::Array(kv)) = (e, v) {
                        if let [Value::String(k), val] = kv.as_slice() {
                            m.insert(k.clone(), val.clone());
                        }
                    }
                } else if field.inline {
                    if let Value::Object(m) = v {
                        out.extend(m);
                    }
                } else {
                    out.insert(field.name.clone(), v);
                }
            }
        }
        Ok(match special {
            Special::None => {
                // gogo protobuf writes non-pointer fields even when zero; their JSON form
                // omits them. Pointer fields, whose zero is meaningful, are kept.
                out.retain(|k, v| match v {
                    Value::Null => false,
                    Value::String(s) => !s.is_empty(),
                    Value::Bool(false) => KEEP_ZERO.contains(&k.as_str()),
                    Value::Number(n) if n.as_f64() == Some(0.0) => KEEP_ZERO.contains(&k.as_str()),
                    _ => true,
                });
                Value::Object(out)
            }
            Special::Time { micro } => {
                let secs = raw.get(&1).and_then(Value::as_i64).unwrap_or(0);
                let nanos = raw.get(&2).and_then(Value::as_i64).unwrap_or(0);
                if secs == 0 && nanos == 0 {
                    Value::Null
                } else if micro {
                    let t = crate::meta::format_time(secs);
                    Value::String(format!("{}.{:06}Z", t.trim_end_matches('Z'), nanos / 1000))
                } else {
                    Value::String(crate::meta::format_time(secs))
                }
            }
            Special::Quantity => raw.remove(&1).unwrap_or(Value::String(String::new())),
            Special::IntOrString => {
                if raw.get(&1).and_then(Value::as_i64).unwrap_or(0) == 1 {
                    raw.remove(&3).unwrap_or(Value::String(String::new()))
                } else {
                    raw.remove(&2).unwrap_or(json!(0))
                }
            }
            Special::Duration => Value::String(go_duration(raw.get(&1).and_then(Value::as_i64).unwrap_or(0))),
            Special::Raw => match raw.get(&1).and_then(Value::as_str) {
                Some(b64) => {
                    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| e.to_string())?;
                    if bytes.is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_slice(&bytes).map_err(|e| format!("embedded object is not JSON: {e}"))?
                    }
                }
                None => Value::Null,
            },
            Special::SchemaOr(which) => match which {
                0 => raw.remove(&2).unwrap_or_else(|| raw.remove(&1).unwrap_or(Value::Bool(false))),
                1 => raw.remove(&2).map(|v| if v.is_array() { v } else { json!([v]) }).or_else(|| raw.remove(&1)).unwrap_or(Value::Null),
                _ => raw.remove(&2).map(|v| if v.is_array() { v } else { json!([v]) }).or_else(|| raw.remove(&1)).unwrap_or(Value::Null),
            },
        })
    }

    fn value(&self, ty: &Ty, wt: u8, r: &mut Reader<'_>) -> Result<Value, String> {
        Ok(match (ty, wt) {
            (Ty::String, 2) => Value::String(String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "invalid UTF-8 in a string field".to_string())?),
            (Ty::Bytes, 2) => Value::String(base64::engine::general_purpose::STANDARD.encode(r.bytes()?)),
            (Ty::Int32 | Ty::Int64 | Ty::Bool, 0) => scalar(ty, r.varint()?),
            (Ty::Double, 1) => json!(f64::from_le_bytes(r.fixed::<8>()?)),
            (Ty::Float, 5) => json!(f32::from_le_bytes(r.fixed::<4>()?) as f64),
            (Ty::Message(m), 2) => {
                let b = r.bytes()?;
                self.decode(m, b)?
            }
            (Ty::Map(v), 2) => {
                let b = r.bytes()?;
                let mut er = Reader { buf: b, pos: 0 };
                let (mut key, mut val) = (Value::String(String::new()), Value::Null);
                while !er.done() {
                    let k = er.varint()?;
                    match ((k >> 3) as u32, (k & 7) as u8) {
                        (1, 2) => key = self.value(&Ty::String, 2, &mut er)?,
                        (2, w) => val = self.value(v, w, &mut er)?,
                        (_, w) => er.skip(w)?,
                    }
                }
                if val.is_null() {
                    val = match **v {
                        Ty::String | Ty::Bytes => Value::String(String::new()),
                        Ty::Message(_) => json!({}),
                        _ => json!(0),
                    };
                }
                Value::Array(vec![key, val])
            }
            (_, w) => return Err(format!("wire type {w} does not match the field type {ty:?}")),
        })
    }

    /// Removes the fields `v` has that `name` does not define, returning their paths
    /// (`spec.template.spec.containers[0].imagee`), as upstream's decoder reports them.
    pub fn prune(&self, name: &str, v: &mut Value, path: &str, out: &mut Vec<String>) {
        let Some(msg) = self.messages.get(name) else { return };
        if special_of(name) != Special::None {
            return;
        }
        let Some(obj) = v.as_object_mut() else { return };
        let mut unknown = Vec::new();
        for (k, val) in obj.iter_mut() {
            let Some(f) = self.json_field(msg, k) else {
                if !(path.is_empty() && (k == "apiVersion" || k == "kind")) {
                    unknown.push(k.clone());
                }
                continue;
            };
            let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            match (&f.ty, f.repeated) {
                // Quantities are strings in JSON ("1", "500m"); clients may send numbers.
                (Ty::Message(m), false) if m == QUANTITY => normalize_quantity(val),
                (Ty::Map(inner), _) if matches!(&**inner, Ty::Message(m) if m == QUANTITY) => {
                    if let Some(map) = val.as_object_mut() {
                        map.values_mut().for_each(normalize_quantity);
                    }
                }
                (Ty::Message(m), true) => {
                    if let Some(items) = val.as_array_mut() {
                        for (i, it) in items.iter_mut().enumerate() {
                            self.prune(m, it, &format!("{p}[{i}]"), out);
                        }
                    }
                }
                (Ty::Message(m), false) => self.prune(m, val, &p, out),
                (Ty::Map(inner), _) => {
                    if let (Ty::Message(m), Some(map)) = (&**inner, val.as_object_mut()) {
                        for (mk, mv) in map.iter_mut() {
                            self.prune(m, mv, &format!("{p}.{mk}"), out);
                        }
                    }
                }
                _ => {}
            }
        }
        for k in unknown {
            obj.remove(&k);
            out.push(if path.is_empty() { k } else { format!("{path}.{k}") });
        }
    }

    /// Values whose JSON type does not match the schema, reported as Go's decoder words
    /// them (`json: cannot unmarshal string into Go struct field DeploymentSpec.spec.replicas
    /// of type int32`). Nulls are accepted (an unset field).
    pub fn type_errors(&self, name: &str, v: &Value, path: &str, out: &mut Vec<String>) {
        let Some(msg) = self.messages.get(name) else { return };
        if special_of(name) != Special::None {
            return;
        }
        let Some(obj) = v.as_object() else { return };
        let simple = name.rsplit('.').next().unwrap_or("");
        for (k, val) in obj {
            let Some(f) = self.json_field(msg, k) else { continue };
            let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            if val.is_null() {
                continue;
            }
            if f.repeated {
                match val.as_array() {
                    Some(items) => {
                        for (i, it) in items.iter().enumerate() {
                            self.check_value(&f.ty, it, &format!("{p}[{i}]"), simple, out);
                        }
                    }
                    None => out.push(format!("json: cannot unmarshal {} into Go struct field {simple}.{p} of type []{}", json_kind(val), go_type(&f.ty))),
                }
            } else {
                self.check_value(&f.ty, val, &p, simple, out);
            }
        }
    }

    fn check_value(&self, ty: &Ty, v: &Value, p: &str, parent: &str, out: &mut Vec<String>) {
        if v.is_null() {
            return;
        }
        let ok = match ty {
            Ty::String | Ty::Bytes => v.is_string(),
            Ty::Bool => v.is_boolean(),
            Ty::Int32 | Ty::Int64 => v.is_i64() || v.is_u64(),
            Ty::Double | Ty::Float => v.is_number(),
            Ty::Map(inner) => match v.as_object() {
                Some(m) => {
                    for (mk, mv) in m {
                        self.check_value(inner, mv, &format!("{p}.{mk}"), parent, out);
                    }
                    true
                }
                None => false,
            },
            Ty::Message(m) => match special_of(m) {
                Special::Time { .. } | Special::Duration => v.is_string(),
                Special::Quantity => v.is_string() || v.is_number(),
                Special::IntOrString => v.is_string() || v.is_i64() || v.is_u64(),
                Special::Raw | Special::SchemaOr(_) => true,
                Special::None => {
                    if v.is_object() {
                        self.type_errors(m, v, p, out);
                        true
                    } else {
                        false
                    }
                }
            },
        };
        if !ok {
            out.push(format!("json: cannot unmarshal {} into Go struct field {parent}.{p} of type {}", json_kind(v), go_type(ty)));
        }
    }

    /// OpenAPI schemas for `roots` and every message they reach, keyed by message name.
    /// `refs` is the JSON pointer prefix (`#/components/schemas/` or `#/definitions/`).
    pub fn openapi(&self, roots: &[String], refs: &str, v3: bool) -> Map<String, Value> {
        let mut out = Map::new();
        let mut todo: Vec<String> = roots.to_vec();
        while let Some(name) = todo.pop() {
            if out.contains_key(&name) {
                continue;
            }
            let Some(msg) = self.messages.get(&name) else { continue };
            let s = match special_of(&name) {
                Special::Time { .. } => json!({"type": "string", "format": "date-time"}),
                Special::Quantity => if v3 { json!({"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]}) } else { json!({"type": "string", "format": "int-or-string"}) },
                Special::IntOrString => if v3 { json!({"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]}) } else { json!({"type": "string", "format": "int-or-string"}) },
                Special::Duration => json!({"type": "string"}),
                Special::Raw | Special::SchemaOr(_) => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
                Special::None => {
                    let mut props = Map::new();
                    let simple = name.rsplit('.').next().unwrap_or("");
                    let mut fields: Vec<&Field> = Vec::new();
                    let mut stack: Vec<&Message> = vec![msg];
                    while let Some(m) = stack.pop() {
                        for f in &m.fields {
                            match (&f.ty, f.inline) {
                                (Ty::Message(im), true) => stack.extend(self.messages.get(im)),
                                _ => fields.push(f),
                            }
                        }
                    }
                    for f in fields {
                        let mut t = self.type_schema(&f.ty, refs, &mut todo);
                        if f.repeated {
                            t = json!({"type": "array", "items": t});
                            match crate::strategic::merge_key_for(simple, &f.name) {
                                Some("") => {
                                    t["x-kubernetes-patch-strategy"] = json!("merge");
                                    t["x-kubernetes-list-type"] = json!("set");
                                }
                                Some(k) => {
                                    t["x-kubernetes-patch-strategy"] = json!("merge");
                                    t["x-kubernetes-patch-merge-key"] = json!(k);
                                    t["x-kubernetes-list-type"] = json!("map");
                                    t["x-kubernetes-list-map-keys"] = json!([k]);
                                }
                                None => {}
                            }
                        }
                        props.insert(f.name.clone(), t);
                    }
                    json!({"type": "object", "properties": props})
                }
            };
            out.insert(name, s);
        }
        out
    }

    fn type_schema(&self, ty: &Ty, refs: &str, todo: &mut Vec<String>) -> Value {
        match ty {
            Ty::String => json!({"type": "string"}),
            Ty::Bytes => json!({"type": "string", "format": "byte"}),
            Ty::Bool => json!({"type": "boolean"}),
            Ty::Int32 => json!({"type": "integer", "format": "int32"}),
            Ty::Int64 => json!({"type": "integer", "format": "int64"}),
            Ty::Double | Ty::Float => json!({"type": "number", "format": "double"}),
            Ty::Message(m) if self.messages.contains_key(m) => {
                todo.push(m.clone());
                json!({"$ref": format!("{refs}{m}")})
            }
            Ty::Message(_) => json!({"type": "object"}),
            Ty::Map(v) => json!({"type": "object", "additionalProperties": self.type_schema(v, refs, todo)}),
        }
    }
}

/// The JSON type name Go's decoder prints.
fn json_kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "bool".into(),
        Value::Number(n) => format!("number {n}"),
        Value::String(_) => "string".into(),
        Value::Array(_) => "array".into(),
        Value::Object(_) => "object".into(),
    }
}

fn go_type(ty: &Ty) -> String {
    match ty {
        Ty::String => "string".into(),
        Ty::Bytes => "[]uint8".into(),
        Ty::Bool => "bool".into(),
        Ty::Int32 => "int32".into(),
        Ty::Int64 => "int64".into(),
        Ty::Double => "float64".into(),
        Ty::Float => "float32".into(),
        Ty::Map(v) => format!("map[string]{}", go_type(v)),
        Ty::Message(m) => {
            let mut parts = m.rsplit('.');
            let kind = parts.next().unwrap_or("");
            let version = parts.next().unwrap_or("");
            format!("{version}.{kind}")
        }
    }
}

fn normalize_quantity(v: &mut Value) {
    if let Value::Number(n) = v {
        *v = Value::String(n.to_string());
    }
}

fn scalar(ty: &Ty, v: u64) -> Value {
    match ty {
        Ty::Bool => Value::Bool(v != 0),
        Ty::Int32 => json!(v as i64 as i32),
        _ => json!(v as i64),
    }
}

/// Go's `time.Duration.String()` for whole nanoseconds.
fn go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let neg = ns < 0;
    let ns = ns.unsigned_abs();
    let s = if ns < 1_000_000_000 {
        if ns % 1_000_000 == 0 {
            format!("{}ms", ns / 1_000_000)
        } else if ns % 1000 == 0 {
            format!("{}µs", ns / 1000)
        } else {
            format!("{ns}ns")
        }
    } else {
        let total = ns / 1_000_000_000;
        let frac = ns % 1_000_000_000;
        let (h, m, sec) = (total / 3600, total / 60 % 60, total % 60);
        let secs = if frac == 0 { format!("{sec}s") } else { format!("{sec}.{}s", format!("{frac:09}").trim_end_matches('0')) };
        if h > 0 {
            format!("{h}h{m}m{secs}")
        } else if m > 0 {
            format!("{m}m{secs}")
        } else {
            secs
        }
    };
    if neg { format!("-{s}") } else { s }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()? as usize;
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or("truncated length-delimited field")?;
        let b = &self.buf[self.pos..end];
        self.pos = end;
        Ok(b)
    }
    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let end = self.pos + N;
        let b: [u8; N] = self.buf.get(self.pos..end).ok_or("truncated fixed-width field")?.try_into().map_err(|_| "truncated".to_string())?;
        self.pos = end;
        Ok(b)
    }
    fn skip(&mut self, wt: u8) -> Result<(), String> {
        match wt {
            0 => {
                self.varint()?;
            }
            1 => {
                self.fixed::<8>()?;
            }
            2 => {
                self.bytes()?;
            }
            5 => {
                self.fixed::<4>()?;
            }
            w => return Err(format!("unsupported wire type {w}")),
        }
        Ok(())
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, tag: u32, wire: u8) {
    put_varint(out, (u64::from(tag) << 3) | u64::from(wire));
}

fn put_bytes(out: &mut Vec<u8>, tag: u32, b: &[u8]) {
    put_key(out, tag, 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Parses Go's duration text (`1h2m3.5s`, `300ms`) to nanoseconds.
fn parse_go_duration(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let num: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += num * scale;
    }
    Some(if neg { -(total as i64) } else { total as i64 })
}

impl Schema {
    /// Encodes a JSON object as the protobuf message `name` (the inverse of `decode`).
    pub fn encode(&self, name: &str, v: &Value) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        match special_of(name) {
            Special::Time { micro } => {
                let s = v.as_str().ok_or("a time must be a string")?;
                let secs = crate::meta::parse_time(s).ok_or_else(|| format!("invalid time {s:?}"))?;
                put_key(&mut out, 1, 0);
                put_varint(&mut out, secs as u64);
                if micro {
                    let frac = s.split_once('.').map(|(_, f)| f.trim_end_matches(|c: char| !c.is_ascii_digit())).unwrap_or("");
                    let nanos: i64 = format!("{:0<9}", &frac[..frac.len().min(9)]).parse().unwrap_or(0);
                    if nanos > 0 {
                        put_key(&mut out, 2, 0);
                        put_varint(&mut out, nanos as u64);
                    }
                }
            }
            Special::Quantity => {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return Err("a quantity must be a string".into()),
                };
                put_bytes(&mut out, 1, s.as_bytes());
            }
            Special::IntOrString => match v {
                Value::String(s) => {
                    put_key(&mut out, 1, 0);
                    put_varint(&mut out, 1);
                    put_bytes(&mut out, 3, s.as_bytes());
                }
                Value::Number(n) => {
                    put_key(&mut out, 1, 0);
                    put_varint(&mut out, 0);
                    put_key(&mut out, 2, 0);
                    put_varint(&mut out, n.as_i64().unwrap_or(0) as u64);
                }
                _ => return Err("an int-or-string must be an integer or a string".into()),
            },
            Special::Duration => {
                let ns = v.as_str().and_then(parse_go_duration).ok_or("invalid duration")?;
                put_key(&mut out, 1, 0);
                put_varint(&mut out, ns as u64);
            }
            Special::Raw => put_bytes(&mut out, 1, &serde_json::to_vec(v).map_err(|e| e.to_string())?),
            Special::SchemaOr(which) => {
                let props = name.replace("JsonSchemaPropsOrBool", "JsonSchemaProps").replace("JsonSchemaPropsOrArray", "JsonSchemaProps").replace("JsonSchemaPropsOrStringArray", "JsonSchemaProps");
                match (which, v) {
                    (0, Value::Bool(b)) => {
                        put_key(&mut out, 1, 0);
                        put_varint(&mut out, u64::from(*b));
                    }
                    (0, o) => {
                        put_key(&mut out, 1, 0);
                        put_varint(&mut out, 1);
                        put_bytes(&mut out, 2, &self.encode(&props, o)?);
                    }
                    (1, Value::Array(a)) => {
                        for x in a {
                            put_bytes(&mut out, 2, &self.encode(&props, x)?);
                        }
                    }
                    (2, Value::Array(a)) => {
                        for x in a {
                            put_bytes(&mut out, 2, x.as_str().unwrap_or("").as_bytes());
                        }
                    }
                    (_, o) => put_bytes(&mut out, 1, &self.encode(&props, o)?),
                }
            }
            Special::None => {
                let msg = self.messages.get(name).ok_or_else(|| format!("no schema for {name}"))?;
                let Some(obj) = v.as_object() else { return Err(format!("{name} must be an object")) };
                for f in &msg.fields {
                    if f.inline {
                        if let Ty::Message(m) = &f.ty {
                            let inner = self.messages.get(m).ok_or_else(|| format!("no schema for {m}"))?;
                            let sub: Map<String, Value> = obj.iter().filter(|(k, _)| self.json_field(inner, k).is_some()).map(|(k, v)| (k.clone(), v.clone())).collect();
                            if !sub.is_empty() {
                                put_bytes(&mut out, f.tag, &self.encode(m, &Value::Object(sub))?);
                            }
                        }
                        continue;
                    }
                    let Some(val) = obj.get(&f.name) else { continue };
                    if val.is_null() {
                        continue;
                    }
                    if f.repeated {
                        for x in val.as_array().ok_or_else(|| format!("{} must be a list", f.name))? {
                            self.encode_field(&mut out, f.tag, &f.ty, x)?;
                        }
                    } else {
                        self.encode_field(&mut out, f.tag, &f.ty, val)?;
                    }
                }
            }
        }
        Ok(out)
    }

    fn encode_field(&self, out: &mut Vec<u8>, tag: u32, ty: &Ty, v: &Value) -> Result<(), String> {
        match ty {
            Ty::String => put_bytes(out, tag, v.as_str().ok_or("expected a string")?.as_bytes()),
            Ty::Bytes => {
                let b = base64::engine::general_purpose::STANDARD.decode(v.as_str().ok_or("expected base64 text")?).map_err(|e| e.to_string())?;
                put_bytes(out, tag, &b);
            }
            Ty::Bool => {
                put_key(out, tag, 0);
                put_varint(out, u64::from(v.as_bool().ok_or("expected a bool")?));
            }
            Ty::Int32 | Ty::Int64 => {
                put_key(out, tag, 0);
                put_varint(out, v.as_i64().ok_or("expected an integer")? as u64);
            }
            Ty::Double => {
                put_key(out, tag, 1);
                out.extend_from_slice(&v.as_f64().ok_or("expected a number")?.to_le_bytes());
            }
            Ty::Float => {
                put_key(out, tag, 5);
                out.extend_from_slice(&(v.as_f64().ok_or("expected a number")? as f32).to_le_bytes());
            }
            Ty::Message(m) => {
                let b = self.encode(m, v)?;
                put_bytes(out, tag, &b);
            }
            Ty::Map(inner) => {
                for (k, x) in v.as_object().ok_or("expected a map")? {
                    let mut entry = Vec::new();
                    put_bytes(&mut entry, 1, k.as_bytes());
                    if !x.is_null() {
                        self.encode_field(&mut entry, 2, inner, x)?;
                    }
                    put_bytes(out, tag, &entry);
                }
            }
        }
        Ok(())
    }
}

/// Encodes an object (with apiVersion and kind) as a Kubernetes protobuf body: the magic,
/// then a `runtime.Unknown` naming its type around the encoded message.
pub fn encode_k8s_protobuf(v: &Value) -> Result<Vec<u8>, String> {
    let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = message_for(api, kind).ok_or_else(|| format!("no protobuf message for {api} {kind}"))?;
    let raw = schema().encode(&name, v)?;
    let mut tm = Vec::new();
    put_bytes(&mut tm, 1, api.as_bytes());
    put_bytes(&mut tm, 2, kind.as_bytes());
    let mut out = PROTOBUF_MAGIC.to_vec();
    put_bytes(&mut out, 1, &tm);
    put_bytes(&mut out, 2, &raw);
    put_bytes(&mut out, 3, b"");
    put_bytes(&mut out, 4, b"");
    Ok(out)
}

/// The message of a (apiVersion, kind), when the schema has it.
pub fn message_for(api_version: &str, kind: &str) -> Option<String> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let candidates = match group {
        "" => vec![format!("io.k8s.api.core.{version}.{kind}"), format!("io.k8s.apimachinery.pkg.apis.meta.{version}.{kind}")],
        "apiextensions.k8s.io" => vec![format!("io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.{version}.{kind}")],
        "meta.k8s.io" => vec![format!("io.k8s.apimachinery.pkg.apis.meta.{version}.{kind}")],
        g => vec![format!("io.k8s.api.{}.{version}.{kind}", g.split('.').next().unwrap_or(g)), format!("io.k8s.apimachinery.pkg.apis.meta.{version}.{kind}")],
    };
    candidates.into_iter().find(|c| schema().message(c).is_some())
}

/// The 4-byte prefix of Kubernetes protobuf bodies.
pub const PROTOBUF_MAGIC: &[u8] = b"k8s\0";

/// Decodes an `application/vnd.kubernetes.protobuf` body: the magic, a `runtime.Unknown`
/// envelope naming apiVersion and kind, and the message. `message_for` maps
/// (apiVersion, kind) to a message name.
pub fn decode_k8s_protobuf(body: &[u8], message_for: impl Fn(&str, &str) -> Option<String>) -> Result<Value, String> {
    let rest = body.strip_prefix(PROTOBUF_MAGIC).ok_or("the body does not start with the Kubernetes protobuf magic number")?;
    let s = schema();
    let env = s.decode("io.k8s.apimachinery.pkg.runtime.Unknown", rest)?;
    let api = env.pointer("/typeMeta/apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
    let kind = env.pointer("/typeMeta/kind").and_then(Value::as_str).unwrap_or("").to_string();
    let name = message_for(&api, &kind).ok_or_else(|| format!("no kind \"{kind}\" is registered for version \"{api}\""))?;
    let raw = base64::engine::general_purpose::STANDARD.decode(env.get("raw").and_then(Value::as_str).unwrap_or("")).map_err(|e| e.to_string())?;
    let mut v = s.decode(&name, &raw)?;
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), Value::String(api));
        m.insert("kind".into(), Value::String(kind));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tag: u32, wt: u8) -> Vec<u8> {
        varint((tag as u64) << 3 | wt as u64)
    }
    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = vec![];
        loop {
            if v < 0x80 {
                out.push(v as u8);
                return out;
            }
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
    }
    fn ld(tag: u32, b: &[u8]) -> Vec<u8> {
        let mut out = key(tag, 2);
        out.extend(varint(b.len() as u64));
        out.extend(b);
        out
    }

    #[test]
    fn decodes_a_configmap_envelope() {
        // ObjectMeta{name: "cm1", namespace: "", creationTimestamp: {}}, data {"a": "1"}
        let mut meta = ld(1, b"cm1");
        meta.extend(ld(3, b""));
        meta.extend(ld(8, b""));
        let mut cm = ld(1, &meta);
        let mut entry = ld(1, b"a");
        entry.extend(ld(2, b"1"));
        cm.extend(ld(2, &entry));
        let mut tm = ld(1, b"v1");
        tm.extend(ld(2, b"ConfigMap"));
        let mut env = ld(1, &tm);
        env.extend(ld(2, &cm));
        let mut body = PROTOBUF_MAGIC.to_vec();
        body.extend(env);
        let v = decode_k8s_protobuf(&body, |a, k| (a == "v1" && k == "ConfigMap").then(|| "io.k8s.api.core.v1.ConfigMap".to_string())).unwrap();
        assert_eq!(v, json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm1"}, "data": {"a": "1"}}));
        assert!(decode_k8s_protobuf(b"nope", |_, _| None).is_err());
        assert!(decode_k8s_protobuf(&body[..body.len() - 2], |_, _| Some("io.k8s.api.core.v1.ConfigMap".into())).is_err());
    }

    #[test]
    fn special_types() {
        let s = schema();
        // IntOrString{type: 1, strVal: "http"}
        let mut ios = key(1, 0);
        ios.extend(varint(1));
        ios.extend(ld(3, b"http"));
        assert_eq!(s.decode(INT_OR_STRING, &ios).unwrap(), json!("http"));
        let mut ioi = key(1, 0);
        ioi.extend(varint(0));
        ioi.extend(key(2, 0));
        ioi.extend(varint(8080));
        assert_eq!(s.decode(INT_OR_STRING, &ioi).unwrap(), json!(8080));
        let mut t = key(1, 0);
        t.extend(varint(1_795_564_800));
        assert_eq!(s.decode(TIME, &t).unwrap(), json!("2026-11-25T00:00:00Z"));
        assert_eq!(s.decode(QUANTITY, &ld(1, b"500m")).unwrap(), json!("500m"));
        assert_eq!(go_duration(3_600_000_000_000), "1h0m0s");
        assert_eq!(go_duration(1_500_000_000), "1.5s");
    }

    #[test]
    fn protobuf_round_trips() {
        let objs = [
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "n", "labels": {"a": "b"}, "creationTimestamp": "2026-11-25T10:00:00Z", "resourceVersion": "7", "generation": 2},
                   "spec": {"replicas": 0, "selector": {"matchLabels": {"a": "b"}}, "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
                            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80, "protocol": "TCP"}], "resources": {"limits": {"cpu": "500m", "memory": "1Gi"}}}]}}},
                   "status": {"replicas": 1, "conditions": [{"type": "Available", "status": "True", "lastTransitionTime": "2026-11-25T10:00:01Z"}]}}),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"k": "dg=="}, "type": "Opaque"}),
            json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "message": "m", "reason": "NotFound", "code": 404, "details": {"name": "x", "kind": "pods"}}),
            json!({"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {"resourceVersion": "9", "continue": "c"}, "items": [{"metadata": {"name": "a"}, "data": {"x": "y"}}]}),
            json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "metadata": {}, "spec": {"resourceAttributes": {"verb": "create", "resource": "pods"}}, "status": {"allowed": true}}),
        ];
        for o in objs {
            let enc = encode_k8s_protobuf(&o).unwrap();
            let back = decode_k8s_protobuf(&enc, message_for).unwrap();
            assert_eq!(back, o, "round trip of {}", o["kind"]);
        }
        assert_eq!(parse_go_duration("1h0m0s"), Some(3_600_000_000_000));
        assert_eq!(parse_go_duration("1.5s"), Some(1_500_000_000));
        assert!(encode_k8s_protobuf(&json!({"apiVersion": "v1", "kind": "Nope"})).is_err());
    }

    #[test]
    fn prune_reports_paths() {
        let mut d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "bogus": 1}, "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "c", "imagee": "x"}]}}}});
        let mut out = vec![];
        schema().prune("io.k8s.api.apps.v1.Deployment", &mut d, "", &mut out);
        out.sort();
        assert_eq!(out, vec!["metadata.bogus", "spec.template.spec.containers[0].imagee"]);
        assert!(d["metadata"].get("bogus").is_none());
        let mut p = json!({"spec": {"containers": [{"name": "c", "resources": {"limits": {"cpu": 1, "memory": "1Gi"}}}]}});
        schema().prune("io.k8s.api.core.v1.Pod", &mut p, "", &mut vec![]);
        assert_eq!(p["spec"]["containers"][0]["resources"]["limits"]["cpu"], "1");
        // Inline members (Go's `json:",inline"`) are the parent's fields in JSON.
        let mut pv = json!({"spec": {"capacity": {"storage": "1Gi"}, "hostPath": {"path": "/x"}, "volumes": 1}});
        let mut unknown = vec![];
        schema().prune("io.k8s.api.core.v1.PersistentVolume", &mut pv, "", &mut unknown);
        assert_eq!(unknown, ["spec.volumes"]);
        let full = json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv"}, "spec": {"capacity": {"storage": "1Gi"}, "hostPath": {"path": "/x"}}});
        assert_eq!(decode_k8s_protobuf(&encode_k8s_protobuf(&full).unwrap(), message_for).unwrap(), full);
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "readinessProbe": {"httpGet": {"path": "/", "port": 80}, "periodSeconds": 5}, "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}]}], "volumes": [{"name": "v", "emptyDir": {}}]}});
        assert_eq!(decode_k8s_protobuf(&encode_k8s_protobuf(&pod).unwrap(), message_for).unwrap(), pod);
        let bad = json!({"spec": {"replicas": "three", "template": {"spec": {"containers": {"name": "c"}}}, "selector": {"matchLabels": {"a": 1}}}});
        let mut errs = vec![];
        schema().type_errors("io.k8s.api.apps.v1.Deployment", &bad, "", &mut errs);
        errs.sort();
        assert_eq!(errs, vec![
            "json: cannot unmarshal number 1 into Go struct field LabelSelector.spec.selector.matchLabels.a of type string".to_string(),
            "json: cannot unmarshal object into Go struct field PodSpec.spec.template.spec.containers of type []v1.Container".to_string(),
            "json: cannot unmarshal string into Go struct field DeploymentSpec.spec.replicas of type int32".to_string(),
        ]);
    }
}
