//! Who is asking and what they may do. Today: the admin credential (a bearer token,
//! member of `system:masters`) and impersonation by the admin (`kubectl --as`). An
//! impersonated identity is authorized as upstream RBAC authorizes a user with no bindings:
//! discovery only. Full authentication (x509, service account tokens) and RBAC are the next
//! issue; this module is where they plug in.

use serde_json::{json, Value};

/// An authenticated identity.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

pub const ADMIN: &str = "shoal-admin";

impl User {
    pub fn admin() -> User {
        User { name: ADMIN.into(), groups: vec!["system:masters".into(), "system:authenticated".into()] }
    }

    /// The identity an admin impersonates (`Impersonate-User`, `Impersonate-Group`).
    pub fn impersonated(name: &str, groups: Vec<String>) -> User {
        let mut g = groups;
        if let Some(rest) = name.strip_prefix("system:serviceaccount:") {
            if let Some((ns, _)) = rest.split_once(':') {
                for x in ["system:serviceaccounts".to_string(), format!("system:serviceaccounts:{ns}")] {
                    if !g.contains(&x) {
                        g.push(x);
                    }
                }
            }
        }
        if !g.iter().any(|x| x == "system:authenticated") {
            g.push("system:authenticated".into());
        }
        User { name: name.to_string(), groups: g }
    }

    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// What a request wants to do, as an access review describes it.
#[derive(Clone, Debug, Default)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// For non-resource requests (`/version`, `/apis`).
    pub path: String,
}

const DISCOVERY: &[&str] = &["/api", "/apis", "/version", "/openapi", "/healthz", "/livez", "/readyz"];

/// Whether `user` may do `a`, and why not.
pub fn authorize(user: &User, a: &Attributes) -> Result<(), String> {
    if user.is_master() {
        return Ok(());
    }
    if !a.path.is_empty() && a.verb == "get" && DISCOVERY.iter().any(|d| a.path == *d || a.path.starts_with(&format!("{d}/"))) {
        return Ok(());
    }
    // Self reviews are allowed to every authenticated user (upstream's basic-user role).
    if a.verb == "create" && matches!(a.resource.as_str(), "selfsubjectaccessreviews" | "selfsubjectreviews" | "selfsubjectrulesreviews") {
        return Ok(());
    }
    Err(forbidden_message(user, a))
}

/// Upstream's wording of an RBAC denial.
pub fn forbidden_message(user: &User, a: &Attributes) -> String {
    if !a.path.is_empty() {
        return format!("User \"{}\" cannot {} path \"{}\"", user.name, a.verb, a.path);
    }
    let res = if a.subresource.is_empty() { a.resource.clone() } else { format!("{}/{}", a.resource, a.subresource) };
    let scope = if a.namespace.is_empty() { "at the cluster scope".to_string() } else { format!("in the namespace \"{}\"", a.namespace) };
    format!("User \"{}\" cannot {} resource \"{res}\" in API group \"{}\" {scope}", user.name, a.verb, a.group)
}

fn attrs_from_spec(spec: &Value) -> Attributes {
    if let Some(r) = spec.get("resourceAttributes") {
        let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Attributes { verb: s("verb"), group: s("group"), resource: s("resource"), subresource: s("subresource"), namespace: s("namespace"), name: s("name"), path: String::new() }
    } else {
        let n = spec.get("nonResourceAttributes").cloned().unwrap_or(json!({}));
        Attributes { verb: n["verb"].as_str().unwrap_or("").into(), path: n["path"].as_str().unwrap_or("").into(), ..Default::default() }
    }
}

/// Answers a review object posted by `caller` (SelfSubjectReview, SelfSubjectAccessReview,
/// SubjectAccessReview, LocalSubjectAccessReview).
pub fn review(kind: &str, api_version: &str, caller: &User, ns: &str, mut body: Value) -> Result<Value, crate::status::ApiError> {
    let spec = body.get("spec").cloned().unwrap_or(json!({}));
    let status = match kind {
        "SelfSubjectReview" => json!({"userInfo": {"username": caller.name, "groups": caller.groups}}),
        _ => {
            let subject = if kind == "SelfSubjectAccessReview" {
                caller.clone()
            } else {
                let user = spec.get("user").and_then(Value::as_str).unwrap_or("");
                let groups: Vec<String> = spec.get("groups").and_then(Value::as_array).map(|g| g.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default();
                if user.is_empty() && groups.is_empty() {
                    return Err(crate::status::ApiError::invalid(kind, "authorization.k8s.io", "", &[crate::status::FieldError::invalid("spec.user", "", "at least one of user or group must be specified")]));
                }
                User { name: user.to_string(), groups }
            };
            let mut a = attrs_from_spec(&spec);
            if kind == "LocalSubjectAccessReview" {
                a.namespace = ns.to_string();
            }
            match authorize(&subject, &a) {
                Ok(()) => json!({"allowed": true}),
                // RBAC gives no reason when no rule matched.
                Err(_) => json!({"allowed": false}),
            }
        }
    };
    body["status"] = status;
    body["apiVersion"] = json!(api_version);
    body["kind"] = json!(kind);
    if !body.get("metadata").is_some_and(Value::is_object) {
        body["metadata"] = json!({});
    }
    body["metadata"]["creationTimestamp"] = Value::Null;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_may_everything_an_impersonated_account_only_discovery() {
        let a = Attributes { verb: "create".into(), resource: "pods".into(), namespace: "d".into(), ..Default::default() };
        assert!(authorize(&User::admin(), &a).is_ok());
        let sa = User::impersonated("system:serviceaccount:d:default", vec![]);
        assert!(sa.groups.contains(&"system:serviceaccounts:d".to_string()));
        assert_eq!(authorize(&sa, &a).unwrap_err(), "User \"system:serviceaccount:d:default\" cannot create resource \"pods\" in API group \"\" in the namespace \"d\"");
        assert!(authorize(&sa, &Attributes { verb: "get".into(), path: "/apis/apps/v1".into(), ..Default::default() }).is_ok());
        let r = review("SelfSubjectAccessReview", "authorization.k8s.io/v1", &sa, "", json!({"spec": {"resourceAttributes": {"verb": "create", "resource": "pods", "namespace": "d"}}})).unwrap();
        assert_eq!(r["status"]["allowed"], false);
        let r = review("SelfSubjectReview", "authentication.k8s.io/v1", &User::admin(), "", json!({})).unwrap();
        assert_eq!(r["status"]["userInfo"]["username"], ADMIN);
    }
}
