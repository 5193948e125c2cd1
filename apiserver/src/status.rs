//! API errors as Kubernetes `Status` objects: the same `code`, `reason`, message wording
//! and `details` that kube-apiserver sends, so kubectl and client libraries print and
//! branch on them as they do against Kubernetes.

use serde_json::{json, Map, Value};

/// What went wrong with one field of an object (upstream `field.Error`).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub kind: FieldErrorKind,
    /// Path of the field, e.g. `spec.containers[0].image`.
    pub field: String,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum FieldErrorKind {
    Required,
    Invalid(Value),
    NotSupported(Value, Vec<String>),
    Duplicate(Value),
    Forbidden,
    TooLong(usize),
    /// A field the request named that the schema does not know (strict decoding).
    Unknown,
}

impl FieldError {
    pub fn required(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
        FieldError { kind: FieldErrorKind::Required, field: field.into(), detail: detail.into() }
    }
    pub fn invalid(field: impl Into<String>, value: impl Into<Value>, detail: impl Into<String>) -> FieldError {
        FieldError { kind: FieldErrorKind::Invalid(value.into()), field: field.into(), detail: detail.into() }
    }
    pub fn not_supported(field: impl Into<String>, value: impl Into<Value>, valid: &[&str]) -> FieldError {
        FieldError {
            kind: FieldErrorKind::NotSupported(value.into(), valid.iter().map(|s| s.to_string()).collect()),
            field: field.into(),
            detail: String::new(),
        }
    }
    pub fn duplicate(field: impl Into<String>, value: impl Into<Value>) -> FieldError {
        FieldError { kind: FieldErrorKind::Duplicate(value.into()), field: field.into(), detail: String::new() }
    }
    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
        FieldError { kind: FieldErrorKind::Forbidden, field: field.into(), detail: detail.into() }
    }
    pub fn too_long(field: impl Into<String>, max: usize) -> FieldError {
        FieldError { kind: FieldErrorKind::TooLong(max), field: field.into(), detail: String::new() }
    }
    /// The `reason` of a `StatusCause`.
    fn cause_reason(&self) -> &'static str {
        match self.kind {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Invalid(_) => "FieldValueInvalid",
            FieldErrorKind::NotSupported(..) => "FieldValueNotSupported",
            FieldErrorKind::Duplicate(_) => "FieldValueDuplicate",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
            FieldErrorKind::TooLong(_) => "FieldValueTooLong",
            FieldErrorKind::Unknown => "FieldValueInvalid",
        }
    }
    /// The message without the field path, as upstream's `ErrorBody`.
    pub fn body(&self) -> String {
        let mut s = match &self.kind {
            FieldErrorKind::Required => "Required value".to_string(),
            FieldErrorKind::Invalid(v) => format!("Invalid value: {}", render(v)),
            FieldErrorKind::NotSupported(v, valid) => {
                let mut s = format!("Unsupported value: {}", render(v));
                if !valid.is_empty() {
                    let q: Vec<String> = valid.iter().map(|v| format!("{v:?}")).collect();
                    s.push_str(": supported values: ");
                    s.push_str(&q.join(", "));
                }
                s
            }
            FieldErrorKind::Duplicate(v) => format!("Duplicate value: {}", render(v)),
            FieldErrorKind::Forbidden => "Forbidden".to_string(),
            FieldErrorKind::TooLong(n) => format!("Too long: may not be more than {n} bytes"),
            FieldErrorKind::Unknown => "unknown field".to_string(),
        };
        if self.kind == FieldErrorKind::Unknown {
            return format!("unknown field \"{}\"", self.field);
        }
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == FieldErrorKind::Unknown {
            return f.write_str(&self.body());
        }
        write!(f, "{}: {}", self.field, self.body())
    }
}

/// A value as upstream prints it in a field error: strings quoted, the rest as JSON.
fn render(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// An error answered to a REST client.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
    /// Seconds the client should wait before retrying (429/503/504).
    pub retry_after: Option<u64>,
}

/// Group and plural resource name, for messages such as `pods "x" not found`.
#[derive(Clone, Copy, Debug)]
pub struct Gr<'a> {
    pub group: &'a str,
    pub resource: &'a str,
}

impl std::fmt::Display for Gr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.group.is_empty() {
            f.write_str(self.resource)
        } else {
            write!(f, "{}.{}", self.resource, self.group)
        }
    }
}

fn details(gr: Gr<'_>, name: &str) -> Value {
    let mut d = Map::new();
    if !name.is_empty() {
        d.insert("name".into(), name.into());
    }
    if !gr.group.is_empty() {
        d.insert("group".into(), gr.group.into());
    }
    d.insert("kind".into(), gr.resource.into());
    Value::Object(d)
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into(), details: None, retry_after: None }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }
    pub fn not_found(gr: Gr<'_>, name: &str) -> ApiError {
        ApiError { details: Some(details(gr, name)), ..ApiError::new(404, "NotFound", format!("{gr} \"{name}\" not found")) }
    }
    /// A path that names no resource the server serves.
    pub fn no_such_path() -> ApiError {
        ApiError { details: Some(json!({})), ..ApiError::new(404, "NotFound", "the server could not find the requested resource") }
    }
    pub fn already_exists(gr: Gr<'_>, name: &str) -> ApiError {
        ApiError { details: Some(details(gr, name)), ..ApiError::new(409, "AlreadyExists", format!("{gr} \"{name}\" already exists")) }
    }
    /// An update based on a stale resourceVersion.
    pub fn conflict(gr: Gr<'_>, name: &str) -> ApiError {
        ApiError::conflict_msg(gr, name, "the object has been modified; please apply your changes to the latest version and try again")
    }
    pub fn conflict_msg(gr: Gr<'_>, name: &str, why: &str) -> ApiError {
        ApiError {
            details: Some(details(gr, name)),
            ..ApiError::new(409, "Conflict", format!("Operation cannot be fulfilled on {gr} \"{name}\": {why}"))
        }
    }
    /// 422 with one cause per field error.
    pub fn invalid(kind: &str, group: &str, name: &str, errs: &[FieldError]) -> ApiError {
        let list: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let joined = if list.len() == 1 { list[0].clone() } else { format!("[{}]", list.join(", ")) };
        let causes: Vec<Value> = errs
            .iter()
            .map(|e| json!({"reason": e.cause_reason(), "message": e.body(), "field": e.field}))
            .collect();
        let mut d = Map::new();
        d.insert("name".into(), name.into());
        if !group.is_empty() {
            d.insert("group".into(), group.into());
        }
        d.insert("kind".into(), kind.into());
        d.insert("causes".into(), Value::Array(causes));
        ApiError {
            details: Some(Value::Object(d)),
            ..ApiError::new(422, "Invalid", format!("{kind}{} \"{name}\" is invalid: {joined}", if group.is_empty() { String::new() } else { format!(".{group}") }))
        }
    }
    pub fn forbidden(gr: Gr<'_>, name: &str, why: &str) -> ApiError {
        let what = if name.is_empty() { format!("{gr}") } else { format!("{gr} \"{name}\"") };
        ApiError { details: Some(details(gr, name)), ..ApiError::new(403, "Forbidden", format!("{what} is forbidden: {why}")) }
    }
    pub fn method_not_allowed(verb: &str, gr: Gr<'_>) -> ApiError {
        ApiError {
            details: Some(details(gr, "")),
            ..ApiError::new(405, "MethodNotAllowed", format!("the server does not allow this method on the requested resource ({verb} {gr})"))
        }
    }
    pub fn unsupported_media(ct: &str, supported: &[&str]) -> ApiError {
        let q: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: {}", if ct.is_empty() { q.join(", ") } else { q.join(", ") }))
    }
    pub fn not_acceptable(supported: &[&str]) -> ApiError {
        let q: Vec<String> = supported.iter().map(|s| s.to_string()).collect();
        ApiError::new(406, "NotAcceptable", format!("only the following media types are accepted: {}", q.join(", ")))
    }
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(413, "RequestEntityTooLarge", format!("Request entity too large: limit is {limit}"))
    }
    /// 410 for a list or watch from a compacted revision.
    pub fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }
    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        let message = message.into();
        ApiError { details: Some(json!({"causes": [{"message": message}]})), ..ApiError::new(500, "InternalError", format!("Internal error occurred: {message}")) }
    }
    pub fn timeout(message: impl Into<String>) -> ApiError {
        ApiError { retry_after: Some(1), ..ApiError::new(504, "Timeout", message) }
    }
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError { retry_after: Some(1), ..ApiError::new(503, "ServiceUnavailable", message) }
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        if let Some(r) = self.retry_after {
            let d = s.as_object_mut().expect("built above").entry("details").or_insert_with(|| json!({}));
            d["retryAfterSeconds"] = r.into();
        }
        s
    }
}

/// A success `Status` (e.g. for a delete of a collection or a delete that returns no object).
pub fn success_status(details: Option<Value>) -> Value {
    let mut s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_message_matches_upstream_shape() {
        let e = ApiError::invalid(
            "Pod",
            "",
            "Invalid_Name",
            &[FieldError::invalid("metadata.name", "Invalid_Name", "a lowercase RFC 1123 subdomain must consist of x")],
        );
        assert_eq!(e.code, 422);
        assert_eq!(e.message, "Pod \"Invalid_Name\" is invalid: metadata.name: Invalid value: \"Invalid_Name\": a lowercase RFC 1123 subdomain must consist of x");
        let s = e.to_status();
        assert_eq!(s["details"]["causes"][0]["reason"], "FieldValueInvalid");
        assert_eq!(s["details"]["causes"][0]["field"], "metadata.name");
        let two = ApiError::invalid("Pod", "", "p", &[FieldError::required("spec.containers", ""), FieldError::not_supported("spec.restartPolicy", "Sometimes", &["Always", "Never"])]);
        assert_eq!(two.message, "Pod \"p\" is invalid: [spec.containers: Required value, spec.restartPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"Never\"]");
    }

    #[test]
    fn group_qualified_messages() {
        let gr = Gr { group: "apps", resource: "deployments" };
        assert_eq!(ApiError::not_found(gr, "web").message, "deployments.apps \"web\" not found");
        let core = Gr { group: "", resource: "pods" };
        assert_eq!(ApiError::already_exists(core, "p").message, "pods \"p\" already exists");
        assert_eq!(
            ApiError::conflict(core, "p").message,
            "Operation cannot be fulfilled on pods \"p\": the object has been modified; please apply your changes to the latest version and try again"
        );
    }
}
