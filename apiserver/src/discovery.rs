//! Discovery documents: `/api`, `/apis`, `/apis/<group>`, and the resource list of each
//! group version, built from the resource table.

use serde_json::{json, Value};

use crate::resources::{self, ResourceDef};

/// `/api`.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_doc(name: &str, versions: &[&str]) -> Value {
    let vs: Vec<Value> = versions.iter().map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v})).collect();
    json!({"name": name, "versions": vs, "preferredVersion": vs[0].clone()})
}

/// `/apis`.
pub fn group_list() -> Value {
    let mut groups: Vec<Value> = resources::groups().iter().map(|(g, vs)| group_doc(g, vs)).collect();
    groups.push(crate::resource_metrics::group_doc());
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`, or None when the group is not served.
pub fn group(name: &str) -> Option<Value> {
    if name == crate::resource_metrics::GROUP {
        let mut d = crate::resource_metrics::group_doc();
        d["kind"] = json!("APIGroup");
        d["apiVersion"] = json!("v1");
        return Some(d);
    }
    let (g, vs) = resources::groups().into_iter().find(|(g, _)| *g == name)?;
    let mut d = group_doc(g, &vs);
    d["kind"] = json!("APIGroup");
    d["apiVersion"] = json!("v1");
    Some(d)
}

/// The kind (with group and version when it differs from the parent) and verbs of a
/// subresource.
fn sub_entry(r: &ResourceDef, sub: &str) -> Value {
    let (kind, group, version, verbs): (&str, Option<&str>, Option<&str>, &[&str]) = match sub {
        "status" => (r.kind, None, None, &["get", "patch", "update"]),
        "scale" => ("Scale", Some("autoscaling"), Some("v1"), &["get", "patch", "update"]),
        "binding" => ("Binding", None, None, &["create"]),
        "eviction" => ("Eviction", Some("policy"), Some("v1"), &["create"]),
        "log" => ("Pod", None, None, &["get"]),
        "exec" => ("PodExecOptions", None, None, &["create", "get"]),
        "attach" => ("PodAttachOptions", None, None, &["create", "get"]),
        "portforward" => ("PodPortForwardOptions", None, None, &["create", "get"]),
        "ephemeralcontainers" => ("Pod", None, None, &["get", "patch", "update"]),
        "proxy" => (if r.kind == "Node" { "NodeProxyOptions" } else { "ServiceProxyOptions" }, None, None, &["create", "delete", "get", "patch", "update"]),
        "token" => ("TokenRequest", Some("authentication.k8s.io"), Some("v1"), &["create"]),
        "finalize" => ("Namespace", None, None, &["update"]),
        _ => (r.kind, None, None, &["get"]),
    };
    let mut e = json!({"name": format!("{}/{sub}", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": kind, "verbs": verbs});
    if let Some(g) = group {
        e["group"] = json!(g);
    }
    if let Some(v) = version {
        e["version"] = json!(v);
    }
    e
}

/// The `APIResourceList` of a group version, or None when it is not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    if group == crate::resource_metrics::GROUP && version == crate::resource_metrics::VERSION {
        return Some(crate::resource_metrics::resource_list());
    }
    if !resources::serves(group, version) {
        return None;
    }
    let mut out = Vec::new();
    for r in resources::all().into_iter().filter(|r| r.group == group && r.version == version) {
        let mut e = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs,
        });
        if !r.short_names.is_empty() {
            e["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            e["categories"] = json!(r.categories);
        }
        out.push(e);
        for s in r.subresources {
            out.push(sub_entry(r, s));
        }
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents() {
        let apps = resource_list("apps", "v1").unwrap();
        let names: Vec<&str> = apps["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"deployments") && names.contains(&"deployments/scale"));
        let scale = apps["resources"].as_array().unwrap().iter().find(|r| r["name"] == "deployments/scale").unwrap();
        assert_eq!(scale["group"], "autoscaling");
        assert!(resource_list("nope", "v1").is_none());
        let groups = group_list();
        assert!(groups["groups"].as_array().unwrap().iter().any(|g| g["name"] == "rbac.authorization.k8s.io"));
        assert_eq!(group("apps").unwrap()["preferredVersion"]["groupVersion"], "apps/v1");
    }
}
