//! The REST verbs on stored objects: get, list, create, update, patch, delete,
//! deletecollection, and the status, scale and binding subresources. Objects are JSON in
//! the store under upstream's key layout; `resourceVersion` is the store's mod revision.
//!
//! Architecture Invariant: a rejected request writes nothing. Every write is a store
//! transaction conditioned on the revision the decision was made on (create: the key does
//! not exist; update/delete: its mod revision is unchanged), so concurrent writers get a
//! 409 Conflict or a retry, never a lost update.

use std::collections::HashMap;

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use shoal_proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request as Op,
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use shoal_proto::mvccpb::KeyValue;

use crate::backend::{prefix_end, Backend, BackendError};
use crate::kinds;
use crate::meta;
use crate::patch;
use crate::resources::ResourceDef;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{ApiError, FieldError, Gr};

/// Parsed query parameters (last value wins, as upstream).
#[derive(Default, Debug, Clone)]
pub struct Query(pub HashMap<String, String>);

impl Query {
    pub fn parse(q: Option<&str>) -> Query {
        let mut m = HashMap::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            m.insert(percent_decode(k), percent_decode(v));
        }
        Query(m)
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    /// A boolean parameter, parsed as Go's `strconv.ParseBool` (Python sends `True`).
    pub fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("1" | "t" | "T" | "true" | "TRUE" | "True"))
    }
    /// Key under which the server stores the request's User-Agent.
    pub const USER_AGENT: &'static str = "@user-agent";

    /// The field manager of a write: `fieldManager`, else the User-Agent's product name
    /// (as upstream derives it).
    pub fn field_manager(&self) -> String {
        match self.get("fieldManager").filter(|m| !m.is_empty()) {
            Some(m) => m.to_string(),
            None => self.get(Self::USER_AGENT).and_then(|ua| ua.split('/').next()).filter(|s| !s.is_empty()).unwrap_or("unknown").to_string(),
        }
    }

    pub fn dry_run(&self) -> Result<bool, ApiError> {
        match self.get("dryRun") {
            None | Some("") => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!("dryRun: Unsupported value: \"{other}\": supported values: \"All\""))),
        }
    }
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() + 0 && i + 2 <= b.len() - 1 => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(x) => {
                        out.push(x);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One request on a resource, after routing.
pub struct Target<'a> {
    pub def: &'static ResourceDef,
    pub ns: &'a str,
    pub name: &'a str,
    pub sub: &'a str,
}

impl Target<'_> {
    pub fn gr(&self) -> Gr<'static> {
        Gr { group: self.def.group, resource: self.def.plural }
    }
    fn key(&self) -> String {
        self.def.key(self.ns, self.name)
    }
}

pub fn backend_error(e: BackendError) -> ApiError {
    match e {
        BackendError::Compacted(_) => ApiError::gone("The resourceVersion for the provided list is too old."),
        BackendError::FutureRev => ApiError::timeout("Too large resource version"),
        BackendError::Unavailable(m) => ApiError::timeout(format!("etcdserver: {}", m.trim_start_matches("etcdserver: "))),
        BackendError::Other(m) => ApiError::internal(m),
    }
}

/// Decodes a stored object and stamps its resourceVersion.
pub fn decode_kv(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value).map_err(|e| ApiError::internal(format!("undecodable object at {}: {e}", String::from_utf8_lossy(&kv.key))))?;
    set_rv(&mut v, kv.mod_revision);
    Ok(v)
}

pub fn set_rv(v: &mut Value, rev: i64) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), Value::String(rev.to_string()));
    }
}

fn encode_for_store(v: &Value) -> Bytes {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("selfLink");
    }
    Bytes::from(serde_json::to_vec(&v).expect("JSON values always serialize"))
}

fn rv_of(v: &Value) -> Option<&str> {
    v.pointer("/metadata/resourceVersion").and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Reads one object linearizably: the object and its mod revision.
pub async fn get_current(backend: &Backend, key: &str) -> Result<Option<(Value, i64)>, ApiError> {
    let r = backend.range(RangeRequest { key: key.as_bytes().to_vec().into(), ..Default::default() }).await.map_err(backend_error)?;
    match r.kvs.first() {
        Some(kv) => Ok(Some((decode_kv(kv)?, kv.mod_revision))),
        None => Ok(None),
    }
}

fn cmp_mod(key: &str, rev: i64) -> Compare {
    Compare { result: CompareResult::Equal as i32, target: CompareTarget::Mod as i32, key: key.as_bytes().to_vec().into(), target_union: Some(TargetUnion::ModRevision(rev)), range_end: Default::default() }
}

fn put_op(key: &str, value: Bytes) -> RequestOp {
    RequestOp { request: Some(Op::RequestPut(PutRequest { key: key.as_bytes().to_vec().into(), value, ..Default::default() })) }
}

fn cmp_absent(key: &str) -> Compare {
    Compare { result: CompareResult::Equal as i32, target: CompareTarget::Create as i32, key: key.as_bytes().to_vec().into(), target_union: Some(TargetUnion::CreateRevision(0)), range_end: Default::default() }
}

/// The service CIDR ClusterIPs come from (upstream's default 10.96.0.0/12).
pub const SERVICE_CIDR: (u32, u8) = (0x0A60_0000, 12);
/// The NodePort range (upstream's default).
pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

fn ip_key(ip: std::net::Ipv4Addr) -> String {
    format!("/registry/ipaddresses/{ip}")
}

fn node_port_key(proto: &str, port: u16) -> String {
    format!("/registry/nodeports/{}/{port}", proto.to_ascii_lowercase())
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the kernel's random source is always available");
    u32::from_le_bytes(b)
}

/// Keys holding a service's ClusterIP and NodePort allocations.
fn service_alloc_keys(svc: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(ip) = svc.pointer("/spec/clusterIP").and_then(Value::as_str).and_then(|s| s.parse::<std::net::Ipv4Addr>().ok()) {
        keys.push(ip_key(ip));
    }
    for p in svc.pointer("/spec/ports").and_then(Value::as_array).into_iter().flatten() {
        if let Some(np) = p.get("nodePort").and_then(Value::as_u64).filter(|n| *n > 0) {
            keys.push(node_port_key(p["protocol"].as_str().unwrap_or("TCP"), np as u16));
        }
    }
    keys
}

/// Creates a Service together with its ClusterIP and NodePort allocations, in one
/// transaction: an address or port is never handed to two services.
async fn create_service(backend: &Backend, t: &Target<'_>, obj: Value, key: &str, name: &str) -> Result<(u16, Value), ApiError> {
    let ty = obj.pointer("/spec/type").and_then(Value::as_str).unwrap_or("ClusterIP").to_string();
    let asked_ip = obj.pointer("/spec/clusterIP").and_then(Value::as_str).unwrap_or("").to_string();
    let (base, bits) = SERVICE_CIDR;
    let size = 1u32 << (32 - bits);
    let wants_ip = ty != "ExternalName" && asked_ip != "None";
    let fixed_ip = if wants_ip && !asked_ip.is_empty() {
        let ip: std::net::Ipv4Addr = asked_ip.parse().map_err(|_| invalid(t.def, name, &[FieldError::invalid("spec.clusterIPs[0]", asked_ip.as_str(), "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)")]))?;
        let n = u32::from(ip);
        if n & !(size - 1) != base || n == base || n == base + size - 1 {
            return Err(invalid(t.def, name, &[FieldError::invalid("spec.clusterIPs", json!([asked_ip]), format!("failed to allocate IP {asked_ip}: the provided IP ({asked_ip}) is not in the valid range. The range of valid IPs is 10.96.0.0/12"))]));
        }
        Some(ip)
    } else {
        None
    };
    let node_ports = matches!(ty.as_str(), "NodePort" | "LoadBalancer");
    for p in obj.pointer("/spec/ports").and_then(Value::as_array).into_iter().flatten() {
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64).filter(|n| *n != 0) {
            if !node_ports {
                return Err(invalid(t.def, name, &[FieldError::forbidden("spec.ports[0].nodePort", "may not be used when `type` is 'ClusterIP'")]));
            }
            if np < *NODE_PORTS.start() as i64 || np > *NODE_PORTS.end() as i64 {
                return Err(invalid(t.def, name, &[FieldError::invalid("spec.ports[0].nodePort", np, "provided port is not in the valid range. The range of valid ports is 30000-32767")]));
            }
        }
    }
    for _attempt in 0..64 {
        let mut cand = obj.clone();
        let mut compares = vec![cmp_absent(key)];
        if wants_ip {
            let ip = fixed_ip.unwrap_or_else(|| std::net::Ipv4Addr::from(base + 2 + random_u32() % (size - 3)));
            cand["spec"]["clusterIP"] = json!(ip.to_string());
            cand["spec"]["clusterIPs"] = json!([ip.to_string()]);
        } else if asked_ip == "None" {
            cand["spec"]["clusterIPs"] = json!(["None"]);
        }
        if node_ports {
            if let Some(ports) = cand["spec"]["ports"].as_array_mut() {
                for p in ports.iter_mut() {
                    if p.get("nodePort").and_then(Value::as_i64).unwrap_or(0) == 0 {
                        let span = (*NODE_PORTS.end() - *NODE_PORTS.start() + 1) as u32;
                        p["nodePort"] = json!(*NODE_PORTS.start() as u32 + random_u32() % span);
                    }
                }
            }
        }
        let allocs = service_alloc_keys(&cand);
        let owner = Bytes::from(format!("{}/{}", t.ns, name));
        let mut success = vec![put_op(key, encode_for_store(&cand))];
        for k in &allocs {
            compares.push(cmp_absent(k));
            success.push(put_op(k, owner.clone()));
        }
        let r = backend.txn(TxnRequest { compare: compares, success, failure: vec![] }).await.map_err(backend_error)?;
        if r.succeeded {
            set_rv(&mut cand, r.header.map_or(0, |h| h.revision));
            return Ok((201, cand));
        }
        if get_current(backend, key).await?.is_some() {
            return Err(ApiError::already_exists(t.gr(), name));
        }
        if let Some(ip) = fixed_ip {
            if get_current_raw(backend, &ip_key(ip)).await? {
                return Err(invalid(t.def, name, &[FieldError::invalid("spec.clusterIPs", json!([asked_ip]), format!("failed to allocate IP {asked_ip}: provided IP is already allocated"))]));
            }
        }
        let fixed_ports: Vec<String> = obj.pointer("/spec/ports").and_then(Value::as_array).into_iter().flatten().filter_map(|p| p.get("nodePort").and_then(Value::as_u64).filter(|n| *n > 0).map(|n| node_port_key(p["protocol"].as_str().unwrap_or("TCP"), n as u16))).collect();
        for k in fixed_ports {
            if get_current_raw(backend, &k).await? {
                let port = k.rsplit('/').next().unwrap_or("");
                return Err(invalid(t.def, name, &[FieldError::invalid("spec.ports[0].nodePort", port.parse::<i64>().unwrap_or(0), "provided port is already allocated")]));
            }
        }
    }
    Err(ApiError::internal("failed to allocate a service IP: the range is full or too contended"))
}

async fn get_current_raw(backend: &Backend, key: &str) -> Result<bool, ApiError> {
    let r = backend.range(RangeRequest { key: key.as_bytes().to_vec().into(), count_only: true, ..Default::default() }).await.map_err(backend_error)?;
    Ok(r.count > 0)
}

/// Outcome of a conditional write.
enum Written {
    /// Committed at this revision.
    At(i64),
    /// The condition failed: someone else changed the key.
    Lost,
}

async fn txn_put(backend: &Backend, key: &str, cond: Compare, value: Bytes) -> Result<Written, ApiError> {
    let t = TxnRequest { compare: vec![cond], success: vec![put_op(key, value)], failure: vec![] };
    let r = backend.txn(t).await.map_err(backend_error)?;
    Ok(if r.succeeded { Written::At(r.header.map_or(0, |h| h.revision)) } else { Written::Lost })
}

/// Writes `obj`, a new version of the object at `key` derived by the caller from a copy at
/// revision `rev`, only if the key is still at `rev` (no read first). Ok(false) when it
/// moved: the caller falls back to `update`. Used for writes the server makes itself
/// (node Lease renewals from the watch cache's copy).
pub async fn put_if_unchanged(backend: &Backend, key: &str, rev: i64, obj: &Value) -> Result<bool, ApiError> {
    Ok(matches!(txn_put(backend, key, cmp_mod(key, rev), encode_for_store(obj)).await?, Written::At(_)))
}

/// Deletes `key` at `rev` together with `also` (allocation records it owns).
async fn txn_delete_with(backend: &Backend, key: &str, rev: i64, also: &[String]) -> Result<Written, ApiError> {
    let del = |k: &str| RequestOp { request: Some(Op::RequestDeleteRange(DeleteRangeRequest { key: k.as_bytes().to_vec().into(), ..Default::default() })) };
    let mut success = vec![del(key)];
    success.extend(also.iter().map(|k| del(k)));
    let r = backend.txn(TxnRequest { compare: vec![cmp_mod(key, rev)], success, failure: vec![] }).await.map_err(backend_error)?;
    Ok(if r.succeeded { Written::At(r.header.map_or(0, |h| h.revision)) } else { Written::Lost })
}

/// Checks the `apiVersion`/`kind` of a body against the endpoint it was sent to and fills
/// them in when absent... as upstream's decoder does for a typed endpoint.
fn check_type(def: &ResourceDef, obj: &mut Value, expect_kind: &str, expect_api: &str) -> Result<(), ApiError> {
    let Some(m) = obj.as_object_mut() else {
        return Err(ApiError::bad_request("the body of the request must be a JSON object"));
    };
    let kind = m.get("kind").and_then(Value::as_str).unwrap_or("");
    let api = m.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if !kind.is_empty() && kind != expect_kind {
        return Err(ApiError::bad_request(format!("{kind} in version \"{api}\" cannot be handled as a {expect_kind}: the kind in the body does not match the endpoint")));
    }
    if !api.is_empty() && api != expect_api {
        return Err(ApiError::bad_request(format!("the API version in the data ({api}) does not match the expected API version ({expect_api})")));
    }
    let _ = def;
    m.insert("kind".into(), json!(expect_kind));
    m.insert("apiVersion".into(), json!(expect_api));
    if !m.get("metadata").is_some_and(Value::is_object) {
        if m.get("metadata").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
        m.insert("metadata".into(), json!({}));
    }
    Ok(())
}

/// Validation of a whole object: built-in kinds by `kinds::validate`, custom resources'
/// metadata here (their schema is checked in `check_fields`), CRDs by crd.rs too.
fn validate_obj(def: &ResourceDef, obj: &Value) -> Vec<FieldError> {
    if def.custom {
        let mut errs = Vec::new();
        match obj.get("metadata").and_then(Value::as_object) {
            Some(m) => crate::meta::validate_object_meta(m, def.kind, def.namespaced, &mut errs),
            None => errs.push(FieldError::required("metadata", "")),
        }
        return errs;
    }
    let mut errs = kinds::validate(def.kind, def.namespaced, obj);
    if def.kind == "CustomResourceDefinition" {
        errs.extend(crate::crd::validate_crd(obj));
    }
    errs
}

/// Drops the fields the kind does not define (as upstream's typed decoding does) and,
/// with `fieldValidation=Strict`, rejects the request naming them.
pub fn check_fields(def: &ResourceDef, obj: &mut Value, q: &Query) -> Result<(), ApiError> {
    let mode = q.get("fieldValidation").unwrap_or("Warn");
    if !matches!(mode, "Strict" | "Warn" | "Ignore") {
        return Err(ApiError::bad_request(format!("fieldValidation: Unsupported value: \"{mode}\": supported values: \"Ignore\", \"Strict\", \"Warn\"")));
    }
    let mut unknown = Vec::new();
    if def.custom {
        let (errs, pruned) = crate::crd::validate_custom(def, obj);
        unknown = pruned;
        if !errs.is_empty() && !(mode == "Strict" && !unknown.is_empty()) {
            let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
            return Err(invalid(def, &name, &errs));
        }
    } else {
        let Some(name) = crate::schema::message_for(&def.api_version(), def.kind) else { return Ok(()) };
        let mut wrong = Vec::new();
        crate::schema::schema().type_errors(&name, obj, "", &mut wrong);
        if let Some(first) = wrong.first() {
            return Err(ApiError::bad_request(format!("{} in version \"{}\" cannot be handled as a {}: {first}", def.kind, def.version, def.kind)));
        }
        crate::schema::schema().prune(&name, obj, "", &mut unknown);
    }
    if mode == "Strict" && !unknown.is_empty() {
        unknown.sort();
        let list: Vec<String> = unknown.iter().map(|u| format!("unknown field \"{u}\"")).collect();
        return Err(ApiError::bad_request(format!("{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}", def.kind, def.version, def.kind, list.join(", "))));
    }
    Ok(())
}

fn metadata(v: &mut Value) -> &mut Map<String, Value> {
    v["metadata"].as_object_mut().expect("checked by check_type")
}

fn invalid(def: &ResourceDef, name: &str, errs: &[FieldError]) -> ApiError {
    ApiError::invalid(def.kind, def.group, name, errs)
}

/// Fails unless the namespace exists and is not being deleted (upstream's
/// NamespaceLifecycle rule for creates).
async fn check_namespace(backend: &Backend, t: &Target<'_>, name: &str) -> Result<(), ApiError> {
    if !t.def.namespaced {
        return Ok(());
    }
    let Some((ns, _)) = get_current(backend, &format!("/registry/namespaces/{}", t.ns)).await? else {
        return Err(ApiError::not_found(Gr { group: "", resource: "namespaces" }, t.ns));
    };
    if ns.pointer("/status/phase").and_then(Value::as_str) == Some("Terminating") {
        return Err(ApiError::forbidden(t.gr(), name, &format!("unable to create new content in namespace {} because it is being terminated", t.ns)));
    }
    Ok(())
}

/// POST on a collection.
pub async fn create(backend: &Backend, t: &Target<'_>, mut obj: Value, q: &Query) -> Result<(u16, Value), ApiError> {
    let dry = q.dry_run()?;
    let def = t.def;
    check_type(def, &mut obj, def.kind, &def.api_version())?;
    check_fields(def, &mut obj, q)?;
    let md = metadata(&mut obj);
    if def.namespaced {
        match md.get("namespace").and_then(Value::as_str).unwrap_or("") {
            "" => {
                md.insert("namespace".into(), json!(t.ns));
            }
            ns if ns != t.ns => return Err(ApiError::bad_request("the namespace of the provided object does not match the namespace sent on the request")),
            _ => {}
        }
    } else {
        md.remove("namespace");
    }
    if md.get("name").and_then(Value::as_str).unwrap_or("").is_empty() {
        if let Some(g) = md.get("generateName").and_then(Value::as_str).filter(|g| !g.is_empty()) {
            let base: String = g.chars().take(63 - 5).collect();
            md.insert("name".into(), json!(format!("{base}{}", meta::random_suffix())));
        }
    }
    md.insert("uid".into(), json!(meta::new_uid()));
    md.insert("creationTimestamp".into(), json!(meta::now()));
    for f in ["resourceVersion", "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds"] {
        md.remove(f);
    }
    if def.tracks_generation() {
        md.insert("generation".into(), json!(1));
    } else {
        md.remove("generation");
    }
    let name = md.get("name").and_then(Value::as_str).unwrap_or("").to_string();
    if !def.custom {
        kinds::apply_defaults(def.kind, &mut obj);
        kinds::prepare_for_create(def.kind, &mut obj);
    }
    if def.kind == "CustomResourceDefinition" && !def.custom {
        crate::crd::initial_status(&mut obj);
    }
    match def.kind {
        "Pod" if !def.custom => {
            kinds::default_toleration_seconds(&mut obj);
            crate::priority::admit_pod(backend, &mut obj, &name).await?
        }
        "PriorityClass" if !def.custom => crate::priority::admit_class(backend, &obj, &name).await?,
        "PersistentVolumeClaim" if !def.custom => crate::storage::admit_claim(backend, &mut obj).await?,
        _ => {}
    }
    if obj.pointer("/metadata/managedFields").is_none() || q.get("@applied") != Some("1") {
        crate::apply::record_update(None, &mut obj, &q.field_manager(), &def.api_version(), "");
    }
    let errs = validate_obj(def, &obj);
    if !errs.is_empty() {
        return Err(invalid(def, &name, &errs));
    }
    let target = Target { def, ns: t.ns, name: &name, sub: "" };
    check_namespace(backend, &target, &name).await?;
    let key = target.key();
    if dry {
        if get_current(backend, &key).await?.is_some() {
            return Err(ApiError::already_exists(t.gr(), &name));
        }
        return Ok((201, obj));
    }
    if def.kind == "Service" {
        return create_service(backend, t, obj, &key, &name).await;
    }
    match txn_put(backend, &key, cmp_absent(&key), encode_for_store(&obj)).await? {
        Written::At(rev) => {
            set_rv(&mut obj, rev);
            Ok((201, obj))
        }
        Written::Lost => Err(ApiError::already_exists(t.gr(), &name)),
    }
}

/// GET of one object.
pub async fn get(backend: &Backend, t: &Target<'_>) -> Result<Value, ApiError> {
    match get_current(backend, &t.key()).await? {
        Some((v, _)) => Ok(v),
        None => Err(ApiError::not_found(t.gr(), t.name)),
    }
}

/// Merges an incoming full object (PUT) with the stored one: system-owned metadata is kept,
/// the status or everything but the status is kept depending on the subresource, and the
/// generation counts spec changes.
fn merge_update(def: &ResourceDef, sub: &str, old: &Value, mut new: Value) -> Value {
    let keep = ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation", "namespace", "name", "managedFields"];
    if sub == "status" {
        let mut out = old.clone();
        match new.get_mut("status").map(Value::take) {
            Some(s) => out["status"] = s,
            None => {
                if let Some(m) = out.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        return out;
    }
    {
        let om = old.get("metadata").and_then(Value::as_object);
        let nm = metadata(&mut new);
        for k in keep {
            match om.and_then(|m| m.get(k)) {
                Some(v) => {
                    nm.insert(k.into(), v.clone());
                }
                None => {
                    nm.remove(k);
                }
            }
        }
    }
    if def.has_status() {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    if !def.custom {
        kinds::apply_defaults(def.kind, &mut new);
    }
    if def.kind == "CustomResourceDefinition" && !def.custom && sub != "status" {
        crate::crd::initial_status(&mut new);
    }
    if def.tracks_generation() && def.has_status() {
        let changed = old.get("spec") != new.get("spec");
        let g = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
        metadata(&mut new).insert("generation".into(), json!(if changed { g + 1 } else { g }));
    }
    new
}

/// Fields that never change after create, with upstream's message.
fn immutable_errors(def: &ResourceDef, old: &Value, new: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let same = |p: &str| old.pointer(p) == new.pointer(p);
    match def.kind {
        "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" if !same("/spec/selector") => {
            errs.push(FieldError::invalid("spec.selector", new.pointer("/spec/selector").cloned().unwrap_or(Value::Null), "field is immutable"));
        }
        "Service" => {
            let old_ip = old.pointer("/spec/clusterIP").and_then(Value::as_str).unwrap_or("");
            let new_ip = new.pointer("/spec/clusterIP").and_then(Value::as_str).unwrap_or("");
            if !old_ip.is_empty() && !new_ip.is_empty() && old_ip != new_ip {
                errs.push(FieldError::invalid("spec.clusterIPs[0]", new_ip, "may not change once set"));
            }
        }
        "Pod" => {
            let mut o = old.get("spec").cloned().unwrap_or(Value::Null);
            let mut n = new.get("spec").cloned().unwrap_or(Value::Null);
            // Mutable in place: container images, activeDeadlineSeconds, tolerations
            // (additions), and the node once (binding).
            for v in [&mut o, &mut n] {
                for list in ["containers", "initContainers"] {
                    if let Some(cs) = v.get_mut(list).and_then(Value::as_array_mut) {
                        for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                            c.remove("image");
                        }
                    }
                }
                if let Some(m) = v.as_object_mut() {
                    m.remove("activeDeadlineSeconds");
                    m.remove("tolerations");
                }
            }
            if o.get("nodeName").is_none() {
                if let Some(m) = n.as_object_mut() {
                    m.remove("nodeName");
                }
            }
            if o != n {
                errs.push(FieldError::forbidden("spec", "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"));
            }
        }
        "Secret" | "ConfigMap" if old.get("immutable") == Some(&Value::Bool(true)) => {
            if !same("/data") || !same("/binaryData") || !same("/stringData") {
                errs.push(FieldError::forbidden("data", "field is immutable when `immutable` is set"));
            }
        }
        _ => {}
    }
    errs
}

/// Writes `new` over the stored object at `cur_rev`; deletes it instead when an object
/// being deleted has lost its last finalizer. Returns the stored object.
async fn commit_update(backend: &Backend, t: &Target<'_>, old: &Value, cur_rev: i64, mut new: Value, dry: bool, manager: Option<&str>) -> Result<Option<Value>, ApiError> {
    let errs = {
        let mut e = validate_obj(t.def, &new);
        e.extend(immutable_errors(t.def, old, &new));
        e
    };
    if !errs.is_empty() {
        return Err(invalid(t.def, t.name, &errs));
    }
    let key = t.key();
    let mut old_cmp = old.clone();
    set_rv(&mut old_cmp, cur_rev);
    set_rv(&mut new, cur_rev);
    let unmanaged = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("managedFields");
        }
        v
    };
    if new == old_cmp || (manager.is_some() && unmanaged(&new) == unmanaged(&old_cmp)) {
        // No change: no write, no event, same resourceVersion (as upstream).
        return Ok(Some(old_cmp));
    }
    if let Some(m) = manager {
        crate::apply::record_update(Some(old), &mut new, m, &t.def.api_version(), t.sub);
    }
    // A namespace also waits for its spec finalizers (the namespace controller's).
    let finalizing = new.pointer("/metadata/deletionTimestamp").is_some()
        && new.pointer("/metadata/finalizers").and_then(Value::as_array).is_none_or(|f| f.is_empty())
        && (t.def.kind != "Namespace" || new.pointer("/spec/finalizers").and_then(Value::as_array).is_none_or(|f| f.is_empty()));
    if dry {
        return Ok(Some(new));
    }
    if finalizing {
        let also = if t.def.kind == "Service" { service_alloc_keys(&new) } else { vec![] };
        return match txn_delete_with(backend, &key, cur_rev, &also).await? {
            Written::At(_) => Ok(Some(new)),
            Written::Lost => Ok(None),
        };
    }
    match txn_put(backend, &key, cmp_mod(&key, cur_rev), encode_for_store(&new)).await? {
        Written::At(rev) => {
            set_rv(&mut new, rev);
            Ok(Some(new))
        }
        Written::Lost => Ok(None),
    }
}

/// PUT of a whole object (or its status).
pub async fn update(backend: &Backend, t: &Target<'_>, mut obj: Value, q: &Query) -> Result<(u16, Value), ApiError> {
    let dry = q.dry_run()?;
    check_type(t.def, &mut obj, t.def.kind, &t.def.api_version())?;
    check_fields(t.def, &mut obj, q)?;
    let body_name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    if body_name != t.name {
        return Err(ApiError::bad_request(format!("the name of the object ({body_name}) does not match the name on the URL ({})", t.name)));
    }
    if t.def.namespaced {
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
        if !ns.is_empty() && ns != t.ns {
            return Err(ApiError::bad_request("the namespace of the provided object does not match the namespace sent on the request"));
        }
    }
    let want_rv: Option<i64> = match rv_of(&obj) {
        Some(s) => Some(s.parse().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}")))?),
        None => None,
    };
    loop {
        let Some((old, cur)) = get_current(backend, &t.key()).await? else {
            return Err(ApiError::not_found(t.gr(), t.name));
        };
        if want_rv.is_some_and(|w| w != cur) {
            return Err(ApiError::conflict(t.gr(), t.name));
        }
        if let (Some(u), Some(o)) = (obj.pointer("/metadata/uid").and_then(Value::as_str), old.pointer("/metadata/uid").and_then(Value::as_str)) {
            if !u.is_empty() && u != o {
                return Err(ApiError::conflict_msg(t.gr(), t.name, &format!("Precondition failed: UID in precondition: {u}, UID in object meta: {o}")));
            }
        }
        let new = merge_update(t.def, t.sub, &old, obj.clone());
        match commit_update(backend, t, &old, cur, new, dry, Some(&q.field_manager())).await? {
            Some(v) => return Ok((200, v)),
            None if want_rv.is_some() => return Err(ApiError::conflict(t.gr(), t.name)),
            None => continue,
        }
    }
}

/// Supported patch media types.
pub const PATCH_TYPES: &[&str] = &["application/json-patch+json", "application/merge-patch+json", "application/strategic-merge-patch+json", "application/apply-patch+yaml"];

/// PATCH of an object (or its status): applied to the current object, retried on a
/// concurrent change unless the patch itself pins a resourceVersion.
pub async fn patch(backend: &Backend, t: &Target<'_>, served: &'static ResourceDef, content_type: &str, body: &[u8], q: &Query) -> Result<(u16, Value), ApiError> {
    let dry = q.dry_run()?;
    let ct = content_type.split(';').next().unwrap_or("").trim();
    if !PATCH_TYPES.contains(&ct) {
        return Err(ApiError::unsupported_media(ct, PATCH_TYPES));
    }
    let patch_doc: Value = if ct == "application/apply-patch+yaml" {
        crate::server::parse_yaml(body)?
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
    };
    if ct == "application/apply-patch+yaml" {
        let mut applied = patch_doc;
        check_type(served, &mut applied, served.kind, &served.api_version())?;
        crate::conversion::default_served(&mut applied, served);
        return server_side_apply(backend, t, crate::conversion::convert(applied, t.def), q).await;
    }
    let pinned_rv: Option<i64> = patch_doc.pointer("/metadata/resourceVersion").and_then(Value::as_str).and_then(|s| s.parse().ok());
    for _ in 0..16 {
        let Some((old, cur)) = get_current(backend, &t.key()).await? else {
            return Err(ApiError::not_found(t.gr(), t.name));
        };
        if pinned_rv.is_some_and(|p| p != cur) {
            return Err(ApiError::conflict(t.gr(), t.name));
        }
        // Patches apply to the version the client speaks.
        let mut doc = crate::conversion::convert(old.clone(), served);
        match ct {
            "application/json-patch+json" => {
                patch::json_patch(&mut doc, &patch_doc).map_err(|e| ApiError { details: Some(json!({"causes": [{"message": e}]})), ..ApiError::new(422, "Invalid", format!("the server rejected our request due to an error in our request: {e}")) })?;
            }
            "application/merge-patch+json" => patch::merge_patch(&mut doc, &patch_doc),
            _ => crate::strategic::apply(&mut doc, &patch_doc).map_err(ApiError::bad_request)?,
        }
        if doc.pointer("/metadata/name").and_then(Value::as_str) != Some(t.name) {
            return Err(ApiError::bad_request(format!("the name of the object ({}) does not match the name on the URL ({})", doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or(""), t.name)));
        }
        check_type(served, &mut doc, served.kind, &served.api_version())?;
        check_fields(served, &mut doc, q)?;
        let doc = crate::conversion::convert(doc, t.def);
        let new = merge_update(t.def, t.sub, &old, doc);
        if let Some(v) = commit_update(backend, t, &old, cur, new, dry, Some(&q.field_manager())).await? {
            return Ok((200, v));
        }
        if pinned_rv.is_some() {
            return Err(ApiError::conflict(t.gr(), t.name));
        }
    }
    Err(ApiError::conflict(t.gr(), t.name))
}

/// PATCH with `application/apply-patch+yaml`: server-side apply by `fieldManager`,
/// creating the object when it does not exist.
async fn server_side_apply(backend: &Backend, t: &Target<'_>, mut applied: Value, q: &Query) -> Result<(u16, Value), ApiError> {
    let dry = q.dry_run()?;
    let Some(manager) = q.get("fieldManager").filter(|m| !m.is_empty()).map(String::from) else {
        return Err(ApiError::invalid("PatchOptions", "meta.k8s.io", "", &[FieldError::required("fieldManager", "is required for apply requests")]));
    };
    check_type(t.def, &mut applied, t.def.kind, &t.def.api_version())?;
    check_fields(t.def, &mut applied, q)?;
    let name = applied.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    if name != t.name {
        return Err(ApiError::bad_request(format!("the name of the object ({name}) does not match the name on the URL ({})", t.name)));
    }
    let force = q.flag("force");
    let api = t.def.api_version();
    for _ in 0..16 {
        let current = get_current(backend, &t.key()).await?;
        let conflict = |c: crate::apply::Conflicts| {
            let causes: Vec<Value> = c.0.iter().map(|(m, p)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\" using {api}"), "field": p})).collect();
            ApiError { details: Some(json!({"name": t.name, "group": t.def.group, "kind": t.def.plural, "causes": causes})), ..ApiError::new(409, "Conflict", c.message(&api)) }
        };
        match current {
            None => {
                let obj = crate::apply::apply(None, &applied, &manager, &api, force).map_err(conflict)?;
                let mut cq = q.clone();
                cq.0.insert("@applied".into(), "1".into());
                match create(backend, t, obj, &cq).await {
                    Err(e) if e.code == 409 && e.reason == "AlreadyExists" => continue,
                    other => return other,
                }
            }
            Some((old, cur)) => {
                let applied_obj = crate::apply::apply(Some(&old), &applied, &manager, &api, force).map_err(conflict)?;
                let mf = applied_obj.pointer("/metadata/managedFields").cloned();
                let mut new = merge_update(t.def, t.sub, &old, applied_obj);
                match mf {
                    Some(mf) => new["metadata"]["managedFields"] = mf,
                    None => {
                        if let Some(m) = new["metadata"].as_object_mut() {
                            m.remove("managedFields");
                        }
                    }
                }
                if let Some(v) = commit_update(backend, t, &old, cur, new, dry, None).await? {
                    return Ok((200, v));
                }
            }
        }
    }
    Err(ApiError::conflict(t.gr(), t.name))
}

/// DELETE of one object: immediate, or marked with a deletionTimestamp when finalizers (or
/// a graceful pod stop) must run first.
pub async fn delete(backend: &Backend, t: &Target<'_>, body: &[u8], q: &Query) -> Result<(u16, Value), ApiError> {
    let dry = q.dry_run()?;
    let opts: Value = if body.iter().all(u8::is_ascii_whitespace) { json!({}) } else { serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))? };
    if opts.get("dryRun").and_then(Value::as_array).is_some_and(|d| d.iter().any(|x| x == "All")) && !dry {
        return Box::pin(delete(backend, t, b"", &Query({ let mut m = q.0.clone(); m.insert("dryRun".into(), "All".into()); m }))).await;
    }
    let grace: Option<i64> = match q.get("gracePeriodSeconds") {
        Some(g) => Some(g.parse().map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}")))?),
        None => opts.get("gracePeriodSeconds").and_then(Value::as_i64),
    };
    let policy = q.get("propagationPolicy").map(String::from).or_else(|| opts.get("propagationPolicy").and_then(Value::as_str).map(String::from));
    if let Some(p) = &policy {
        if !["Orphan", "Background", "Foreground"].contains(&p.as_str()) {
            return Err(ApiError::invalid("DeleteOptions", "", "", &[FieldError::not_supported("propagationPolicy", p.as_str(), &["Foreground", "Background", "Orphan"])]));
        }
    }
    loop {
        let Some((mut obj, cur)) = get_current(backend, &t.key()).await? else {
            return Err(ApiError::not_found(t.gr(), t.name));
        };
        if let Some(pre) = opts.get("preconditions") {
            if let Some(u) = pre.get("uid").and_then(Value::as_str) {
                let have = obj.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("");
                if u != have {
                    return Err(ApiError::conflict_msg(t.gr(), t.name, &format!("Precondition failed: UID in precondition: {u}, UID in object meta: {have}")));
                }
            }
            if let Some(r) = pre.get("resourceVersion").and_then(Value::as_str) {
                if r != cur.to_string() {
                    return Err(ApiError::conflict_msg(t.gr(), t.name, &format!("Precondition failed: ResourceVersion in precondition: {r}, ResourceVersion in object meta: {cur}")));
                }
            }
        }
        let mut fins: Vec<Value> = obj.pointer("/metadata/finalizers").and_then(Value::as_array).cloned().unwrap_or_default();
        let add_fin = match policy.as_deref() {
            Some("Orphan") => Some("orphan"),
            Some("Foreground") => Some("foregroundDeletion"),
            _ => None,
        };
        if let Some(f) = add_fin {
            if !fins.iter().any(|x| x == f) {
                fins.push(json!(f));
            }
        }
        let node = obj.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
        let phase = obj.pointer("/status/phase").and_then(Value::as_str).unwrap_or("");
        let pod_grace = if t.def.kind == "Pod" && !node.is_empty() && phase != "Succeeded" && phase != "Failed" {
            grace.unwrap_or_else(|| obj.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_i64).unwrap_or(30)).max(0)
        } else {
            0
        };
        let already = obj.pointer("/metadata/deletionTimestamp").is_some();
        if !fins.is_empty() || pod_grace > 0 || t.def.kind == "Namespace" {
            if already && add_fin.is_none() && pod_grace == 0 {
                return Ok((200, obj));
            }
            let md = metadata(&mut obj);
            if !already {
                md.insert("deletionTimestamp".into(), json!(meta::format_time(meta::now_secs() + pod_grace)));
            }
            md.insert("deletionGracePeriodSeconds".into(), json!(pod_grace));
            if !fins.is_empty() {
                md.insert("finalizers".into(), Value::Array(fins));
            }
            if t.def.kind == "Namespace" {
                obj["status"]["phase"] = json!("Terminating");
            }
            if dry {
                return Ok((200, obj));
            }
            let key = t.key();
            match txn_put(backend, &key, cmp_mod(&key, cur), encode_for_store(&obj)).await? {
                Written::At(rev) => {
                    set_rv(&mut obj, rev);
                    return Ok((200, obj));
                }
                Written::Lost => continue,
            }
        }
        if dry {
            return Ok((200, obj));
        }
        let also = if t.def.kind == "Service" { service_alloc_keys(&obj) } else { vec![] };
        match txn_delete_with(backend, &t.key(), cur, &also).await? {
            Written::At(_) => {
                if t.def.kind == "CustomResourceDefinition" && !t.def.custom {
                    // Its custom resources go with it (upstream's customresourcecleanup).
                    let group = obj.pointer("/spec/group").and_then(Value::as_str).unwrap_or("");
                    let plural = obj.pointer("/spec/names/plural").and_then(Value::as_str).unwrap_or("");
                    if !group.is_empty() && !plural.is_empty() {
                        let prefix = format!("/registry/{group}/{plural}/");
                        let del = RequestOp { request: Some(Op::RequestDeleteRange(DeleteRangeRequest { key: prefix.as_bytes().to_vec().into(), range_end: prefix_end(prefix.as_bytes()).into(), ..Default::default() })) };
                        backend.txn(TxnRequest { compare: vec![], success: vec![del], failure: vec![] }).await.map_err(backend_error)?;
                    }
                }
                return Ok((200, obj));
            }
            Written::Lost => continue,
        }
    }
}

/// Label and field selectors of a request, validated against the kind.
pub struct Filter {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub kind: &'static str,
}

impl Filter {
    pub fn from_query(def: &ResourceDef, q: &Query) -> Result<Filter, ApiError> {
        let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or("")).map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(q.get("fieldSelector").unwrap_or("")).map_err(ApiError::bad_request)?;
        let probe = json!({});
        for f in fields.fields() {
            if kinds::field_value(def.kind, &probe, f).is_none() {
                return Err(ApiError::bad_request(format!("field label not supported: {f}")));
            }
        }
        Ok(Filter { labels, fields, kind: def.kind })
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj.pointer("/metadata/labels").and_then(Value::as_object)) && self.fields.matches(|f| kinds::field_value(self.kind, obj, f))
    }
    /// Matches precomputed labels and field values (the watch cache's entries).
    pub fn matches_parts(&self, labels: Option<&Map<String, Value>>, field: impl Fn(&str) -> Option<String>) -> bool {
        self.labels.matches(labels) && self.fields.matches(field)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    v: String,
    rv: i64,
    start: String,
}

/// A continue token for a list at `rev` resuming at key suffix `start` (upstream's format).
pub fn continue_token(rev: i64, start: &str) -> String {
    let tok = ContinueToken { v: "meta.k8s.io/v1".into(), rv: rev, start: start.to_string() };
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&tok).expect("serializable"))
}

/// A page of a list.
pub struct Page {
    pub items: Vec<Value>,
    pub rev: i64,
    pub cont: Option<String>,
    pub remaining: Option<i64>,
}

/// LIST of a collection with selectors, `limit`/`continue` and `resourceVersion`
/// semantics (unset: latest, linearizable; `0`: any, served locally; N: not older than N,
/// or exactly N with `resourceVersionMatch=Exact`).
pub async fn list(backend: &Backend, def: &ResourceDef, ns: &str, q: &Query) -> Result<Page, ApiError> {
    let filter = Filter::from_query(def, q)?;
    let limit: i64 = match q.get("limit") {
        Some(l) if !l.is_empty() => l.parse().map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        _ => 0,
    };
    let prefix = def.prefix(ns);
    let end = prefix_end(prefix.as_bytes());
    let (mut start, mut revision, serializable, from_token) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c.trim_end_matches('=')).map_err(|_| ApiError::bad_request("continue key is not valid: illegal base64 data"))?;
            let tok: ContinueToken = serde_json::from_slice(&raw).map_err(|_| ApiError::bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)"))?;
            if tok.v != "meta.k8s.io/v1" || tok.rv <= 0 || tok.start.contains("..") {
                return Err(ApiError::bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)"));
            }
            (format!("{prefix}{}", tok.start).into_bytes(), tok.rv, true, true)
        }
        None => {
            let rv = q.get("resourceVersion").unwrap_or("");
            let exact = q.get("resourceVersionMatch") == Some("Exact");
            match q.get("resourceVersionMatch") {
                None | Some("" | "Exact" | "NotOlderThan") => {}
                Some(other) => return Err(ApiError::bad_request(format!("resourceVersionMatch: Unsupported value: \"{other}\": supported values: \"Exact\", \"NotOlderThan\""))),
            }
            match rv {
                "" => (prefix.clone().into_bytes(), 0, false, false),
                "0" => (prefix.clone().into_bytes(), 0, true, false),
                n => {
                    let n: i64 = n.parse().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {n:?}")))?;
                    if exact {
                        (prefix.clone().into_bytes(), n, true, false)
                    } else {
                        let cur = backend.current_revision().await.map_err(backend_error)?;
                        if cur < n {
                            return Err(ApiError::timeout(format!("Too large resource version: {n}, current: {cur}")));
                        }
                        (prefix.clone().into_bytes(), 0, true, false)
                    }
                }
            }
        }
    };
    let want = if limit > 0 { limit as usize } else { usize::MAX };
    let mut items = Vec::new();
    let mut cont = None;
    let mut remaining = None;
    loop {
        let batch = if limit > 0 { (want - items.len()).max(if filter.is_empty() { 0 } else { 256 }) as i64 + 0 } else { 0 };
        let r = backend
            .range(RangeRequest { key: start.clone().into(), range_end: end.clone().into(), revision, limit: batch, serializable, ..Default::default() })
            .await
            .map_err(|e| match e {
                BackendError::Compacted(_) if from_token => ApiError::gone("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list."),
                other => backend_error(other),
            })?;
        if revision == 0 {
            revision = r.header.as_ref().map_or(0, |h| h.revision);
        }
        let n = r.kvs.len();
        let mut last_key: Option<Vec<u8>> = None;
        for kv in &r.kvs {
            if items.len() >= want {
                break;
            }
            let v = decode_kv(kv)?;
            last_key = Some(kv.key.to_vec());
            if filter.matches(&v) {
                items.push(v);
            }
        }
        let more_in_store = r.more || (last_key.is_some() && last_key.as_deref() != r.kvs.last().map(|k| k.key.as_ref()));
        if items.len() >= want && more_in_store {
            let lk = last_key.expect("items were taken from this batch");
            let mut next = lk[prefix.len()..].to_vec();
            next.push(0);
            let tok = ContinueToken { v: "meta.k8s.io/v1".into(), rv: revision, start: String::from_utf8_lossy(&next).into_owned() };
            cont = Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&tok).expect("serializable")));
            if filter.is_empty() {
                let taken = r.kvs.iter().position(|k| k.key.as_ref() == lk.as_slice()).map_or(0, |i| i + 1) as i64;
                remaining = Some((r.count - taken).max(0));
            }
            break;
        }
        if !r.more || n == 0 || batch == 0 {
            break;
        }
        let mut next = r.kvs.last().expect("n > 0").key.to_vec();
        next.push(0);
        start = next;
    }
    Ok(Page { items, rev: revision, cont, remaining })
}

/// Builds the `<Kind>List` object of a page.
pub fn list_object(def: &ResourceDef, page: Page) -> Value {
    let mut md = json!({"resourceVersion": page.rev.to_string()});
    if let Some(c) = page.cont {
        md["continue"] = json!(c);
    }
    if let Some(r) = page.remaining.filter(|r| *r > 0) {
        md["remainingItemCount"] = json!(r);
    }
    json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(), "metadata": md, "items": page.items})
}

/// DELETE of a collection: every object matching the selectors, one by one.
pub async fn delete_collection(backend: &Backend, def: &'static ResourceDef, ns: &str, body: &[u8], q: &Query) -> Result<Value, ApiError> {
    let mut lq = q.clone();
    lq.0.remove("limit");
    lq.0.remove("continue");
    let page = list(backend, def, ns, &lq).await?;
    let mut deleted = Vec::new();
    for item in page.items {
        let name = item.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
        let ins = item.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string();
        let t = Target { def, ns: &ins, name: &name, sub: "" };
        match delete(backend, &t, body, q).await {
            Ok((_, v)) => deleted.push(v),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(), "metadata": {"resourceVersion": page.rev.to_string()}, "items": deleted}))
}

/// The autoscaling/v1 Scale view of a workload.
pub fn scale_of(obj: &Value) -> Value {
    let md = &obj["metadata"];
    let sel = obj.pointer("/spec/selector").map(|s| selector_string(s)).unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": md["name"], "namespace": md["namespace"], "uid": md["uid"], "resourceVersion": md["resourceVersion"], "creationTimestamp": md["creationTimestamp"]},
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {"replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": sel},
    })
}

/// A `metav1.LabelSelector` as the string form (`a=b,c in (d)`).
pub fn selector_string(sel: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in m {
            parts.push(format!("{k}={}", v.as_str().unwrap_or("")));
        }
    }
    for e in sel.get("matchExpressions").and_then(Value::as_array).into_iter().flatten() {
        let key = e["key"].as_str().unwrap_or("");
        let vals: Vec<&str> = e.get("values").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        match e["operator"].as_str().unwrap_or("") {
            "In" => parts.push(format!("{key} in ({})", vals.join(","))),
            "NotIn" => parts.push(format!("{key} notin ({})", vals.join(","))),
            "Exists" => parts.push(key.to_string()),
            "DoesNotExist" => parts.push(format!("!{key}")),
            _ => {}
        }
    }
    parts.join(",")
}

/// GET/PUT/PATCH of the scale subresource.
pub async fn scale(backend: &Backend, t: &Target<'_>, method: &http::Method, content_type: &str, body: &[u8], q: &Query) -> Result<(u16, Value), ApiError> {
    let dry = q.dry_run()?;
    loop {
        let Some((obj, cur)) = get_current(backend, &t.key()).await? else {
            return Err(ApiError::not_found(t.gr(), t.name));
        };
        let current = scale_of(&obj);
        if *method == http::Method::GET {
            return Ok((200, current));
        }
        let mut wanted = current.clone();
        let pinned;
        if *method == http::Method::PUT {
            wanted = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding Scale: {e}")))?;
            pinned = rv_of(&wanted).map(String::from);
        } else {
            let p: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            match content_type.split(';').next().unwrap_or("").trim() {
                "application/json-patch+json" => patch::json_patch(&mut wanted, &p).map_err(|e| ApiError::new(422, "Invalid", e))?,
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => patch::merge_patch(&mut wanted, &p),
                other => return Err(ApiError::unsupported_media(other, &PATCH_TYPES[..3])),
            }
            pinned = p.pointer("/metadata/resourceVersion").and_then(Value::as_str).map(String::from);
        }
        if pinned.as_deref().is_some_and(|p| p != cur.to_string()) {
            return Err(ApiError::conflict(t.gr(), t.name));
        }
        let replicas = wanted.pointer("/spec/replicas").cloned().unwrap_or(Value::Null);
        if replicas.as_i64().is_none_or(|r| r < 0) {
            return Err(ApiError::invalid("Scale", "autoscaling", t.name, &[FieldError::invalid("spec.replicas", replicas, "must be greater than or equal to 0")]));
        }
        let mut new = obj.clone();
        new["spec"]["replicas"] = replicas;
        let new = merge_update(t.def, "", &obj, new);
        if let Some(v) = commit_update(backend, t, &obj, cur, new, dry, Some(&q.field_manager())).await? {
            return Ok((200, scale_of(&v)));
        }
        if pinned.is_some() {
            return Err(ApiError::conflict(t.gr(), t.name));
        }
    }
}

/// POST of a Binding: assigns an unscheduled pod to a node (what a scheduler does).
pub async fn bind(backend: &Backend, t: &Target<'_>, binding: Value, q: &Query) -> Result<(u16, Value), ApiError> {
    let dry = q.dry_run()?;
    let name = if t.name.is_empty() { binding.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string() } else { t.name.to_string() };
    let node = binding.pointer("/target/name").and_then(Value::as_str).unwrap_or("").to_string();
    if node.is_empty() {
        return Err(ApiError::invalid("Binding", "", &name, &[FieldError::required("target.name", "")]));
    }
    let pods = crate::resources::find("", "v1", "pods").expect("pods are built in");
    let pt = Target { def: pods, ns: t.ns, name: &name, sub: "" };
    loop {
        let Some((obj, cur)) = get_current(backend, &pt.key()).await? else {
            return Err(ApiError::not_found(pt.gr(), &name));
        };
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::conflict_msg(pt.gr(), &name, "pod is being deleted, cannot be assigned to a host"));
        }
        if let Some(n) = obj.pointer("/spec/nodeName").and_then(Value::as_str).filter(|n| !n.is_empty()) {
            return Err(ApiError::conflict_msg(pt.gr(), &name, &format!("pod {name} is already assigned to node \"{n}\"")));
        }
        let mut new = obj.clone();
        new["spec"]["nodeName"] = json!(node);
        let conds = new["status"].as_object_mut().map(|s| s.entry("conditions").or_insert(json!([])));
        if let Some(Value::Array(c)) = conds {
            c.retain(|x| x["type"] != "PodScheduled");
            c.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": meta::now()}));
        }
        if dry {
            return Ok((201, crate::status::success_status(None)));
        }
        let key = pt.key();
        match txn_put(backend, &key, cmp_mod(&key, cur), encode_for_store(&new)).await? {
            Written::At(_) => return Ok((201, crate::status::success_status(None))),
            Written::Lost => continue,
        }
    }
}

/// POST of an Eviction: deletes the pod unless that would violate its PodDisruptionBudget
/// (upstream's rules: at most one budget per pod; a budget allows the eviction while its
/// `status.disruptionsAllowed` is positive, and the eviction decrements it).
pub async fn evict(backend: &Backend, t: &Target<'_>, eviction: Value, q: &Query) -> Result<(u16, Value), ApiError> {
    let pods = crate::resources::find("", "v1", "pods").expect("pods are built in");
    let pt = Target { def: pods, ns: t.ns, name: t.name, sub: "" };
    let Some((pod, _)) = get_current(backend, &pt.key()).await? else {
        return Err(ApiError::not_found(pt.gr(), t.name));
    };
    if let Some(n) = eviction.pointer("/metadata/name").and_then(Value::as_str) {
        if n != t.name {
            return Err(ApiError::bad_request(format!("name in URL does not match name in Eviction object: {} != {n}", t.name)));
        }
    }
    let opts = eviction.get("deleteOptions").map(|o| serde_json::to_vec(o).unwrap_or_default()).unwrap_or_default();
    let phase = pod.pointer("/status/phase").and_then(Value::as_str).unwrap_or("");
    let terminal = matches!(phase, "Succeeded" | "Failed") || pod.pointer("/metadata/deletionTimestamp").is_some();
    if !terminal {
        let pdbs_def = crate::resources::find("policy", "v1", "poddisruptionbudgets").expect("PDBs are built in");
        let page = list(backend, pdbs_def, t.ns, &Query::default()).await?;
        let labels = pod.pointer("/metadata/labels").and_then(Value::as_object);
        let matching: Vec<Value> = page.items.into_iter().filter(|p| p.pointer("/spec/selector").and_then(|s| LabelSelector::from_object(s).ok()).is_some_and(|s| !s.is_empty() && s.matches(labels))).collect();
        if matching.len() > 1 {
            return Err(ApiError::internal("This pod has more than one PodDisruptionBudget, which the eviction subresource does not support."));
        }
        if let Some(pdb) = matching.into_iter().next() {
            let name = pdb.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
            let allowed = pdb.pointer("/status/disruptionsAllowed").and_then(Value::as_i64).unwrap_or(0);
            let observed = pdb.pointer("/status/observedGeneration").and_then(Value::as_i64).unwrap_or(0);
            let generation = pdb.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
            if allowed <= 0 || observed < generation {
                let healthy = pdb.pointer("/status/currentHealthy").and_then(Value::as_i64).unwrap_or(0);
                let desired = pdb.pointer("/status/desiredHealthy").and_then(Value::as_i64).unwrap_or(0);
                let why = format!("The disruption budget {name} needs {desired} healthy pods and has {healthy} currently");
                return Err(ApiError {
                    details: Some(json!({"causes": [{"reason": "DisruptionBudget", "message": why}]})),
                    retry_after: Some(10),
                    ..ApiError::new(429, "TooManyRequests", "Cannot evict pod as it would violate the pod's disruption budget.")
                });
            }
            let mut new = pdb.clone();
            new["status"]["disruptionsAllowed"] = json!(allowed - 1);
            new["status"]["disruptedPods"][t.name] = json!(meta::now());
            let key = pdbs_def.key(t.ns, &name);
            let rev: i64 = pdb.pointer("/metadata/resourceVersion").and_then(Value::as_str).and_then(|r| r.parse().ok()).unwrap_or(0);
            if q.dry_run()? {
                return Ok((201, crate::status::success_status(None)));
            }
            if let Written::Lost = txn_put(backend, &key, cmp_mod(&key, rev), encode_for_store(&new)).await? {
                return Err(ApiError::conflict_msg(Gr { group: "policy", resource: "poddisruptionbudgets" }, &name, "the object has been modified; please apply your changes to the latest version and try again"));
            }
        }
    }
    delete(backend, &pt, &opts, q).await?;
    Ok((201, crate::status::success_status(None)))
}

/// POST of a TokenRequest to `serviceaccounts/<name>/token`: a signed, expiring token for
/// the service account, optionally bound to a pod, secret or node that must exist.
pub async fn token_request(backend: &Backend, t: &Target<'_>, req: Value, signer: &crate::token::Signer) -> Result<(u16, Value), ApiError> {
    let Some((sa, _)) = get_current(backend, &t.key()).await? else {
        return Err(ApiError::not_found(t.gr(), t.name));
    };
    let (auds, exp, bound) = crate::token::check_request(&req, t.name)?;
    let mut bound_ids = None;
    if let Some(b) = &bound {
        let kind = b["kind"].as_str().unwrap_or("");
        let name = b["name"].as_str().unwrap_or("");
        let (plural, ns) = match kind {
            "Pod" => ("pods", t.ns),
            "Secret" => ("secrets", t.ns),
            _ => ("nodes", ""),
        };
        let def = crate::resources::find("", "v1", plural).expect("built-in kinds");
        let Some((obj, _)) = get_current(backend, &def.key(ns, name)).await? else {
            return Err(ApiError::not_found(Gr { group: "", resource: plural }, name));
        };
        let uid = obj.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("").to_string();
        if let Some(want) = b.get("uid").and_then(Value::as_str).filter(|u| !u.is_empty()) {
            if want != uid {
                return Err(ApiError::conflict_msg(Gr { group: "", resource: plural }, name, &format!("the UID in the bound object reference ({want}) does not match the UID in record. The object might have been deleted and then recreated")));
            }
        }
        bound_ids = Some((kind.to_string(), name.to_string(), uid));
    }
    let now = meta::now_secs();
    let claims = crate::token::claims(t.ns, &sa, &auds, exp, bound_ids.as_ref().map(|(k, n, u)| (k.as_str(), n.as_str(), u.as_str())), now);
    let token = signer.sign(&claims)?;
    let mut spec = json!({"audiences": auds, "expirationSeconds": exp});
    if let Some(b) = bound {
        spec["boundObjectRef"] = b;
    }
    Ok((201, json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": t.name, "namespace": t.ns, "creationTimestamp": null},
        "spec": spec,
        "status": {"token": token, "expirationTimestamp": meta::format_time(now + exp)},
    })))
}

/// Re-reads every CRD from the store and serves what they define (called after a CRD
/// write, so the next request can use it without waiting for the watch cache).
pub async fn refresh_crds(backend: &Backend) -> Result<(), ApiError> {
    let prefix = "/registry/apiextensions.k8s.io/customresourcedefinitions/";
    let r = backend.range(RangeRequest { key: prefix.as_bytes().to_vec().into(), range_end: prefix_end(prefix.as_bytes()).into(), ..Default::default() }).await.map_err(backend_error)?;
    let crds: Vec<Value> = r.kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect();
    crate::crd::rebuild(&crds);
    Ok(())
}

/// Creates the namespaces every cluster has (`default`, `kube-system`, `kube-public`,
/// `kube-node-lease`) when missing, as kube-apiserver's bootstrap controller does.
pub async fn ensure_system_namespaces(backend: &Backend, api_port: u16) -> Result<(), ApiError> {
    let def = crate::resources::find("", "v1", "namespaces").expect("namespaces are built in");
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let t = Target { def, ns: "", name: ns, sub: "" };
        match create(backend, &t, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}), &Query::default()).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    crate::priority::ensure_system_classes(backend).await?;
    crate::storage::ensure_default_class(backend).await?;
    // The `kubernetes` service, first address of the service range (pods reach the API
    // through it once the service proxy runs).
    let svc = crate::resources::find("", "v1", "services").expect("services are built in");
    let t = Target { def: svc, ns: "default", name: "kubernetes", sub: "" };
    let obj = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"component": "apiserver", "provider": "kubernetes"}}, "spec": {"clusterIP": std::net::Ipv4Addr::from(SERVICE_CIDR.0 + 1).to_string(), "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": api_port}], "sessionAffinity": "None", "type": "ClusterIP"}});
    match create(backend, &t, obj, &Query::default()).await {
        Ok(_) => {}
        Err(e) if e.code == 409 || e.code == 422 => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = Query::parse(Some("labelSelector=app%3Dweb%2Ctier+in+%28a%29&limit=7&watch=1"));
        assert_eq!(q.get("labelSelector"), Some("app=web,tier in (a)"));
        assert_eq!(q.get("limit"), Some("7"));
        assert!(q.flag("watch"));
        assert_eq!(Query::parse(Some("a=%zz")).get("a"), Some("%zz"));
        assert_eq!(Query::parse(Some("a=%4")).get("a"), Some("%4"));
    }

    #[test]
    fn update_keeps_system_fields_and_counts_generation() {
        let def = crate::resources::find("apps", "v1", "deployments").unwrap();
        let old = json!({"metadata": {"name": "d", "namespace": "n", "uid": "u1", "generation": 3, "creationTimestamp": "t"}, "spec": {"replicas": 1}, "status": {"replicas": 1}});
        let new = json!({"metadata": {"name": "d", "namespace": "n", "uid": "x", "generation": 99}, "spec": {"replicas": 2}, "status": {"replicas": 7}});
        let m = merge_update(def, "", &old, new);
        assert_eq!(m["metadata"]["uid"], "u1");
        assert_eq!(m["metadata"]["generation"], 4);
        assert_eq!(m["status"]["replicas"], 1, "status is only written through /status");
        let s = merge_update(def, "status", &old, json!({"metadata": {"name": "d"}, "spec": {"replicas": 9}, "status": {"replicas": 5}}));
        assert_eq!(s["spec"]["replicas"], 1);
        assert_eq!(s["status"]["replicas"], 5);
    }

    #[test]
    fn selector_strings() {
        assert_eq!(selector_string(&json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "t", "operator": "In", "values": ["a", "b"]}]})), "app=web,t in (a,b)");
    }
}
