//! OpenAPI documents: `/openapi/v3` (index and one document per group version) and
//! `/openapi/v2`. They describe every served path with its operations, including the
//! `fieldValidation` parameter of PATCH that tells kubectl to leave validation to the
//! server, and one schema per kind tagged with `x-kubernetes-group-version-kind`.

use std::sync::OnceLock;

use serde_json::{json, Map, Value};
use sha2::Digest;

use crate::resources::{ResourceDef, BUILTIN};

/// The schema name upstream uses for a kind (`io.k8s.api.apps.v1.Deployment`).
pub fn schema_name(r: &ResourceDef) -> String {
    let pkg = match r.group {
        "" => "core".to_string(),
        "apiextensions.k8s.io" => return format!("io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.{}.{}", r.version, r.kind),
        g => g.trim_end_matches(".k8s.io").replace(".authorization", "").to_string(),
    };
    format!("io.k8s.api.{pkg}.{}.{}", r.version, r.kind)
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") }
}

fn op_id(verb: &str, r: &ResourceDef, namespaced_path: bool, suffix: &str) -> String {
    let group: String = if r.group.is_empty() {
        "Core".into()
    } else {
        r.group.trim_end_matches(".k8s.io").split('.').map(|p| {
            let mut c = p.chars();
            c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
        }).collect()
    };
    let v = {
        let mut c = r.version.chars();
        c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
    };
    format!("{verb}{group}{v}{}{}{suffix}", if namespaced_path { "Namespaced" } else { "" }, r.kind)
}

fn query_param(name: &str, ty: &str) -> Value {
    json!({"name": name, "in": "query", "description": "", "schema": {"type": ty, "uniqueItems": true}})
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": "", "schema": {"type": "string", "uniqueItems": true}})
}

fn body_of(schema: &str) -> Value {
    json!({"content": {"*/*": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}, "required": true})
}

fn resp_of(schema: &str) -> Value {
    json!({"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}, "application/yaml": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}}, "401": {"description": "Unauthorized"}})
}

fn operation(action: &str, id: String, r: &ResourceDef, mut params: Vec<Value>, body: Option<Value>, schema: &str) -> Value {
    if matches!(action, "post" | "put" | "patch") {
        params.push(query_param("dryRun", "string"));
        params.push(query_param("fieldManager", "string"));
        params.push(query_param("fieldValidation", "string"));
    }
    if action == "patch" {
        params.push(query_param("force", "boolean"));
    }
    let mut op = json!({
        "tags": [gv_path(r.group, r.version).replace('/', "_")],
        "operationId": id,
        "parameters": params,
        "responses": resp_of(schema),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
    });
    if let Some(b) = body {
        op["requestBody"] = b;
    }
    op
}

fn object_meta_schema() -> Value {
    json!({
        "type": "object",
        "description": "ObjectMeta is metadata that all persisted resources must have, which includes all objects users must create.",
        "properties": {
            "annotations": {"type": "object", "additionalProperties": {"type": "string", "default": ""}},
            "creationTimestamp": {"type": "string", "format": "date-time"},
            "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
            "deletionTimestamp": {"type": "string", "format": "date-time"},
            "finalizers": {"type": "array", "items": {"type": "string", "default": ""}, "x-kubernetes-list-type": "set", "x-kubernetes-patch-strategy": "merge"},
            "generateName": {"type": "string"},
            "generation": {"type": "integer", "format": "int64"},
            "labels": {"type": "object", "additionalProperties": {"type": "string", "default": ""}},
            "managedFields": {"type": "array", "items": {"type": "object"}},
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "ownerReferences": {"type": "array", "items": {"type": "object"}, "x-kubernetes-list-map-keys": ["uid"], "x-kubernetes-list-type": "map", "x-kubernetes-patch-merge-key": "uid", "x-kubernetes-patch-strategy": "merge"},
            "resourceVersion": {"type": "string"},
            "selfLink": {"type": "string"},
            "uid": {"type": "string"},
        },
    })
}

fn kind_schema(r: &ResourceDef) -> Value {
    let mut props = Map::new();
    props.insert("apiVersion".into(), json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
    props.insert("kind".into(), json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
    props.insert("metadata".into(), json!({"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}], "default": {}}));
    props.insert("spec".into(), json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
    props.insert("status".into(), json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
    json!({
        "type": "object",
        "description": format!("{} is a {} resource served by Shoal.", r.kind, r.api_version()),
        "properties": props,
        "x-kubernetes-group-version-kind": [{"group": r.group, "kind": r.kind, "version": r.version}],
    })
}

/// Kinds are serialized with apiVersion and kind, which their protobuf messages lack.
fn add_type_meta(s: &mut Value) {
    if let Some(p) = s.get_mut("properties").and_then(Value::as_object_mut) {
        p.entry("apiVersion").or_insert(json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
        p.entry("kind").or_insert(json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
    }
}

/// The OpenAPI v3 document of one group version, or None when it is not served.
fn build_gv(group: &str, version: &str) -> Option<Value> {
    let rs: Vec<&ResourceDef> = crate::resources::all().into_iter().filter(|r| r.group == group && r.version == version).collect();
    if rs.is_empty() {
        return None;
    }
    let base = format!("/{}", gv_path(group, version));
    let mut paths = Map::new();
    let roots: Vec<String> = rs.iter().map(|r| schema_name(r)).filter(|n| crate::schema::schema().message(n).is_some()).collect();
    let mut schemas = crate::schema::schema().openapi(&roots, "#/components/schemas/", true);
    schemas.entry("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta").or_insert_with(object_meta_schema);
    schemas.insert("io.k8s.apimachinery.pkg.apis.meta.v1.Status".into(), json!({"type": "object", "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "code": {"type": "integer", "format": "int32"}, "message": {"type": "string"}, "reason": {"type": "string"}, "status": {"type": "string"}}, "x-kubernetes-group-version-kind": [{"group": "", "kind": "Status", "version": "v1"}]}));
    schemas.insert("io.k8s.apimachinery.pkg.apis.meta.v1.Patch".into(), json!({"type": "object", "description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body."}));
    for r in rs {
        let schema = schema_name(r);
        if r.custom {
            let mut cs = crate::crd::schema_of(r).map(|s| (*s).clone()).unwrap_or_else(|| json!({"type": "object"}));
            cs["x-kubernetes-group-version-kind"] = json!([{"group": r.group, "kind": r.kind, "version": r.version}]);
            if let Some(p) = cs.get_mut("properties").and_then(Value::as_object_mut) {
                p.insert("metadata".into(), json!({"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}]}));
                p.entry("apiVersion").or_insert(json!({"type": "string"}));
                p.entry("kind").or_insert(json!({"type": "string"}));
            }
            schemas.insert(schema.clone(), cs);
        }
        match schemas.get_mut(&schema) {
            Some(s) => {
                s["x-kubernetes-group-version-kind"] = json!([{"group": r.group, "kind": r.kind, "version": r.version}]);
                add_type_meta(s);
                if let Some(m) = s.get_mut("properties").and_then(|p| p.get_mut("metadata")) {
                    *m = json!({"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}], "default": {}});
                }
            }
            None => {
                schemas.insert(schema.clone(), kind_schema(r));
            }
        }
        let list_schema = format!("{schema}List");
        schemas.insert(list_schema.clone(), json!({"type": "object", "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "items": {"type": "array", "items": {"$ref": format!("#/components/schemas/{schema}")}}, "metadata": {"type": "object"}}, "x-kubernetes-group-version-kind": [{"group": r.group, "kind": format!("{}List", r.kind), "version": r.version}]}));
        let (coll, item, ns_path) = if r.namespaced {
            (format!("{base}/namespaces/{{namespace}}/{}", r.plural), format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural), true)
        } else {
            (format!("{base}/{}", r.plural), format!("{base}/{}/{{name}}", r.plural), false)
        };
        let mut coll_ops = Map::new();
        let mut item_ops = Map::new();
        let mut scope = vec![];
        if ns_path {
            scope.push(path_param("namespace"));
        }
        let mut named = scope.clone();
        named.push(path_param("name"));
        if r.verbs.contains(&"list") {
            let mut p = scope.clone();
            for q in ["labelSelector", "fieldSelector", "continue", "resourceVersion", "resourceVersionMatch"] {
                p.push(query_param(q, "string"));
            }
            p.push(query_param("limit", "integer"));
            p.push(query_param("watch", "boolean"));
            coll_ops.insert("get".into(), operation("list", op_id("list", r, ns_path, ""), r, p, None, &list_schema));
        }
        if r.verbs.contains(&"create") {
            coll_ops.insert("post".into(), operation("post", op_id("create", r, ns_path, ""), r, scope.clone(), Some(body_of(&schema)), &schema));
        }
        if r.verbs.contains(&"deletecollection") {
            coll_ops.insert("delete".into(), operation("deletecollection", op_id("deleteCollection", r, ns_path, ""), r, scope.clone(), None, "io.k8s.apimachinery.pkg.apis.meta.v1.Status"));
        }
        if r.verbs.contains(&"get") {
            item_ops.insert("get".into(), operation("get", op_id("read", r, ns_path, ""), r, named.clone(), None, &schema));
        }
        if r.verbs.contains(&"update") {
            item_ops.insert("put".into(), operation("put", op_id("replace", r, ns_path, ""), r, named.clone(), Some(body_of(&schema)), &schema));
        }
        if r.verbs.contains(&"patch") {
            item_ops.insert("patch".into(), operation("patch", op_id("patch", r, ns_path, ""), r, named.clone(), Some(json!({"content": {"application/json-patch+json": {"schema": {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Patch"}}, "application/merge-patch+json": {"schema": {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Patch"}}, "application/strategic-merge-patch+json": {"schema": {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Patch"}}, "application/apply-patch+yaml": {"schema": {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Patch"}}}, "required": true})), &schema));
        }
        if r.verbs.contains(&"delete") {
            item_ops.insert("delete".into(), operation("delete", op_id("delete", r, ns_path, ""), r, named.clone(), None, "io.k8s.apimachinery.pkg.apis.meta.v1.Status"));
        }
        if !coll_ops.is_empty() {
            paths.insert(coll, Value::Object(coll_ops));
        }
        if !item_ops.is_empty() {
            paths.insert(item.clone(), Value::Object(item_ops));
        }
        if r.has_status() {
            let sub = format!("{item}/status");
            let mut ops = Map::new();
            ops.insert("get".into(), operation("get", op_id("read", r, ns_path, "Status"), r, named.clone(), None, &schema));
            ops.insert("put".into(), operation("put", op_id("replace", r, ns_path, "Status"), r, named.clone(), Some(body_of(&schema)), &schema));
            ops.insert("patch".into(), operation("patch", op_id("patch", r, ns_path, "Status"), r, named.clone(), Some(body_of("io.k8s.apimachinery.pkg.apis.meta.v1.Patch")), &schema));
            paths.insert(sub, Value::Object(ops));
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.35.0"},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"BearerToken": {"type": "apiKey", "description": "Bearer Token authentication", "name": "authorization", "in": "header"}}},
    }))
}

struct Docs {
    /// (group-version path, serialized doc, hash)
    gvs: Vec<(String, bytes::Bytes, String)>,
    v2: bytes::Bytes,
    /// The same v2 document as gnostic protobuf.
    v2_pb: bytes::Bytes,
}

fn docs() -> &'static Docs {
    static DOCS: OnceLock<Docs> = OnceLock::new();
    DOCS.get_or_init(|| {
        let mut gvs = Vec::new();
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for r in BUILTIN {
            if r.is_virtual() || seen.contains(&(r.group, r.version)) {
                continue;
            }
            seen.push((r.group, r.version));
            let doc = build_gv(r.group, r.version).expect("served group version");
            let bytes = serde_json::to_vec(&doc).expect("JSON values always serialize");
            let hash = hex(&sha2::Sha512::digest(&bytes)[..]).to_uppercase();
            gvs.push((gv_path(r.group, r.version), bytes::Bytes::from(bytes), hash));
        }
        let v2 = build_v2();
        Docs { gvs, v2: bytes::Bytes::from(serde_json::to_vec(&v2).expect("JSON values always serialize")), v2_pb: bytes::Bytes::from(crate::gnostic::encode_document(&v2)) }
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Documents of the group versions custom resources add (built per request: CRDs change).
fn custom_docs() -> Vec<(String, bytes::Bytes, String)> {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    let mut out = Vec::new();
    for r in crate::resources::all().into_iter().filter(|r| r.custom) {
        if seen.contains(&(r.group, r.version)) || BUILTIN.iter().any(|b| b.group == r.group && b.version == r.version) {
            continue;
        }
        seen.push((r.group, r.version));
        if let Some(doc) = build_gv(r.group, r.version) {
            let bytes = serde_json::to_vec(&doc).expect("JSON values always serialize");
            let hash = hex(&sha2::Sha512::digest(&bytes)[..]).to_uppercase();
            out.push((gv_path(r.group, r.version), bytes::Bytes::from(bytes), hash));
        }
    }
    out
}

/// `/openapi/v3`: where each group version's document is.
pub fn v3_index() -> Value {
    let mut paths = Map::new();
    for (gv, _, hash) in docs().gvs.iter().cloned().chain(custom_docs()) {
        paths.insert(gv.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={hash}")}));
    }
    json!({"paths": paths})
}

/// `/openapi/v3/<gv path>`.
pub fn v3_doc(gv: &str) -> Option<bytes::Bytes> {
    docs().gvs.iter().find(|(p, _, _)| p == gv).map(|(_, b, _)| b.clone()).or_else(|| custom_docs().into_iter().find(|(p, _, _)| p == gv).map(|(_, b, _)| b))
}

/// `/openapi/v2`: one Swagger 2.0 document with every kind's definition.
pub fn v2() -> bytes::Bytes {
    docs().v2.clone()
}

/// `/openapi/v2` as gnostic protobuf.
pub fn v2_protobuf() -> bytes::Bytes {
    docs().v2_pb.clone()
}

fn build_v2() -> Value {
    let roots: Vec<String> = BUILTIN.iter().map(|r| schema_name(r)).filter(|n| crate::schema::schema().message(n).is_some()).collect();
    let mut defs = crate::schema::schema().openapi(&roots, "#/definitions/", false);
    let mut paths = Map::new();
    for r in BUILTIN {
        match defs.get_mut(&schema_name(r)) {
            Some(s) => {
                s["x-kubernetes-group-version-kind"] = json!([{"group": r.group, "kind": r.kind, "version": r.version}]);
                add_type_meta(s);
            }
            None => {
                let s = kind_schema(r).to_string().replace("#/components/schemas/", "#/definitions/");
                let mut schema: Value = serde_json::from_str(&s).expect("reserialized JSON");
                schema["properties"]["metadata"] = json!({"$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"});
                defs.insert(schema_name(r), schema);
            }
        }
        let base = format!("/{}", gv_path(r.group, r.version));
        let item = if r.namespaced { format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural) } else { format!("{base}/{}/{{name}}", r.plural) };
        if r.verbs.contains(&"patch") {
            paths.insert(item, json!({"patch": {"operationId": op_id("patch", r, r.namespaced, ""), "consumes": ["application/json-patch+json", "application/merge-patch+json", "application/strategic-merge-patch+json", "application/apply-patch+yaml"], "produces": ["application/json"], "parameters": [{"name": "fieldValidation", "in": "query", "type": "string", "uniqueItems": true}], "responses": {"200": {"description": "OK"}}, "x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind}}}));
        }
    }
    json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.35.0"}, "paths": paths, "definitions": defs})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_operations_carry_field_validation() {
        let doc: Value = serde_json::from_slice(&v3_doc("apis/apps/v1").unwrap()).unwrap();
        let op = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(op["x-kubernetes-group-version-kind"]["kind"], "Deployment");
        assert!(op["parameters"].as_array().unwrap().iter().any(|p| p["name"] == "fieldValidation" && p["in"] == "query"));
        assert_eq!(op["operationId"], "patchAppsV1NamespacedDeployment");
        assert!(doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"].is_object());
        let idx = v3_index();
        assert!(idx["paths"]["api/v1"]["serverRelativeURL"].as_str().unwrap().starts_with("/openapi/v3/api/v1?hash="));
        let ns = crate::resources::find("", "v1", "namespaces").unwrap();
        assert_eq!(op_id("patch", ns, false, ""), "patchCoreV1Namespace");
        let rb = crate::resources::find("rbac.authorization.k8s.io", "v1", "roles").unwrap();
        assert_eq!(schema_name(rb), "io.k8s.api.rbac.v1.Role");
    }
}
