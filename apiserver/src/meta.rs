//! Object metadata: names, labels, timestamps and identifiers, validated and generated as
//! upstream's apimachinery does (same rules, same messages).

use serde_json::{Map, Value};

use crate::status::FieldError;

const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= DNS1123_LABEL_MAX
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Messages for a value that is not a DNS-1123 label (empty when it is one).
pub fn dns1123_label(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > DNS1123_LABEL_MAX {
        out.push(format!("must be no more than {DNS1123_LABEL_MAX} characters"));
    }
    if !is_label(&s[..s.len().min(DNS1123_LABEL_MAX)]) || s.is_empty() {
        out.push(LABEL_MSG.to_string());
    }
    out
}

/// Messages for a value that is not a DNS-1123 subdomain.
pub fn dns1123_subdomain(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > DNS1123_SUBDOMAIN_MAX {
        out.push(format!("must be no more than {DNS1123_SUBDOMAIN_MAX} characters"));
    }
    if s.is_empty() || !s.split('.').all(is_label) {
        out.push(SUBDOMAIN_MSG.to_string());
    }
    out
}

/// Messages for a value that is not a DNS-1035 label (service names).
pub fn dns1035_label(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > DNS1123_LABEL_MAX {
        out.push(format!("must be no more than {DNS1123_LABEL_MAX} characters"));
    }
    if !is_label(s) || !s.as_bytes()[0].is_ascii_lowercase() {
        out.push(DNS1035_MSG.to_string());
    }
    out
}

/// Which rule a kind's object names follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    Subdomain,
    Label,
    Dns1035,
    /// Path segment only (RBAC names may contain ':').
    PathSegment,
}

pub fn name_rule(kind: &str) -> NameRule {
    match kind {
        "Namespace" => NameRule::Label,
        "Service" => NameRule::Dns1035,
        "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => NameRule::PathSegment,
        _ => NameRule::Subdomain,
    }
}

/// Messages for a name under a rule.
pub fn check_name(rule: NameRule, name: &str) -> Vec<String> {
    match rule {
        NameRule::Subdomain => dns1123_subdomain(name),
        NameRule::Label => dns1123_label(name),
        NameRule::Dns1035 => dns1035_label(name),
        NameRule::PathSegment => {
            if name == "." || name == ".." {
                vec![format!("may not be '{name}'")]
            } else if name.contains('/') || name.contains('%') {
                vec!["may not contain '/'".to_string()]
            } else {
                vec![]
            }
        }
    }
}

/// A qualified name (`prefix/name`) as label and annotation keys must be.
fn qualified_name(s: &str) -> Vec<String> {
    const MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let mut out = Vec::new();
    if let Some(p) = prefix {
        if p.is_empty() {
            out.push("prefix part must be non-empty".to_string());
        } else {
            out.extend(dns1123_subdomain(p).into_iter().map(|m| format!("prefix part {m}")));
        }
    }
    if name.is_empty() {
        out.push("name part must be non-empty".to_string());
    } else {
        if name.len() > 63 {
            out.push("name part must be no more than 63 characters".to_string());
        }
        let b = name.as_bytes();
        let ok = b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')) && b[0].is_ascii_alphanumeric() && b[b.len() - 1].is_ascii_alphanumeric();
        if !ok {
            out.push(MSG.to_string());
        }
    }
    out
}

fn label_value(s: &str) -> Vec<String> {
    const MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
    let mut out = Vec::new();
    if s.len() > 63 {
        out.push("must be no more than 63 characters".to_string());
    }
    if !s.is_empty() {
        let b = s.as_bytes();
        let ok = b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')) && b[0].is_ascii_alphanumeric() && b[b.len() - 1].is_ascii_alphanumeric();
        if !ok {
            out.push(MSG.to_string());
        }
    }
    out
}

/// Validates `metadata` of an object (name, namespace, labels, annotations, owner
/// references, finalizers), appending field errors.
pub fn validate_object_meta(meta: &Map<String, Value>, kind: &str, namespaced: bool, errs: &mut Vec<FieldError>) {
    let name = meta.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        errs.push(FieldError::required("metadata.name", "name or generateName is required"));
    } else {
        for m in check_name(name_rule(kind), name) {
            errs.push(FieldError::invalid("metadata.name", name, m));
        }
    }
    let ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
    if namespaced {
        if ns.is_empty() {
            errs.push(FieldError::required("metadata.namespace", ""));
        } else {
            for m in dns1123_label(ns) {
                errs.push(FieldError::invalid("metadata.namespace", ns, m));
            }
        }
    } else if !ns.is_empty() {
        errs.push(FieldError::forbidden("metadata.namespace", "not allowed on this type"));
    }
    if let Some(labels) = meta.get("labels") {
        match labels.as_object() {
            Some(l) => {
                for (k, v) in l {
                    for m in qualified_name(k) {
                        errs.push(FieldError::invalid("metadata.labels", k.as_str(), m));
                    }
                    match v.as_str() {
                        Some(s) => {
                            for m in label_value(s) {
                                errs.push(FieldError::invalid(format!("metadata.labels"), s, m));
                            }
                        }
                        None if v.is_null() => {}
                        None => errs.push(FieldError::invalid(format!("metadata.labels[{k}]"), v.clone(), "must be a string")),
                    }
                }
            }
            None if labels.is_null() => {}
            None => errs.push(FieldError::invalid("metadata.labels", labels.clone(), "must be a map of strings")),
        }
    }
    if let Some(ann) = meta.get("annotations") {
        match ann.as_object() {
            Some(a) => {
                let mut total = 0usize;
                for (k, v) in a {
                    for m in qualified_name(k) {
                        errs.push(FieldError::invalid("metadata.annotations", k.as_str(), m));
                    }
                    total += k.len() + v.as_str().map_or(0, str::len);
                    if !v.is_string() && !v.is_null() {
                        errs.push(FieldError::invalid(format!("metadata.annotations[{k}]"), v.clone(), "must be a string"));
                    }
                }
                if total > 256 * 1024 {
                    errs.push(FieldError::too_long("metadata.annotations", 256 * 1024));
                }
            }
            None if ann.is_null() => {}
            None => errs.push(FieldError::invalid("metadata.annotations", ann.clone(), "must be a map of strings")),
        }
    }
    if let Some(refs) = meta.get("ownerReferences").and_then(Value::as_array) {
        for (i, r) in refs.iter().enumerate() {
            for f in ["apiVersion", "kind", "name", "uid"] {
                if r.get(f).and_then(Value::as_str).unwrap_or("").is_empty() {
                    errs.push(FieldError::invalid(format!("metadata.ownerReferences[{i}].{f}"), r.get(f).cloned().unwrap_or(Value::String(String::new())), format!("{f} must not be empty")));
                }
            }
        }
    }
    if let Some(fins) = meta.get("finalizers").and_then(Value::as_array) {
        for (i, f) in fins.iter().enumerate() {
            let s = f.as_str().unwrap_or("");
            for m in qualified_name(s) {
                errs.push(FieldError::invalid(format!("metadata.finalizers[{i}]"), s, m));
            }
        }
    }
}

/// RFC 3339 UTC timestamp with second precision, as `metav1.Time` serializes.
pub fn format_time(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Parses an RFC 3339 timestamp (`Z` or numeric offset, fractional seconds ignored) to
/// Unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || (b[10] != b'T' && b[10] != b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        let digits = r.bytes().take_while(u8::is_ascii_digit).count();
        rest = &r[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if mo > 2 { mo - 3 } else { mo + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se - offset)
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// `now` as an RFC 3339 timestamp.
pub fn now() -> String {
    format_time(now_secs())
}

/// `now` as a MicroTime (`2006-01-02T15:04:05.000000Z`, what Lease renewTime holds).
pub fn now_micro_time() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let base = format_time(d.as_secs() as i64);
    format!("{}.{:06}Z", base.trim_end_matches('Z'), d.subsec_micros())
}

/// A random (version 4) UUID.
pub fn new_uid() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the kernel's random source is always available");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// The suffix `generateName` gets: 5 characters from upstream's alphabet (no vowels, no
/// look-alikes).
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut b = [0u8; 5];
    getrandom::fill(&mut b).expect("the kernel's random source is always available");
    b.iter().map(|x| ALPHABET[*x as usize % ALPHABET.len()] as char).collect()
}

/// Random bytes as lowercase hex (tokens).
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("the kernel's random source is always available");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(dns1123_subdomain("web-1.example").is_empty());
        assert!(!dns1123_subdomain("Invalid_Name").is_empty());
        assert!(!dns1123_subdomain("").is_empty());
        assert!(!dns1123_subdomain("-a").is_empty());
        assert!(dns1123_label("a-b").is_empty());
        assert!(!dns1123_label("a.b").is_empty());
        assert!(!dns1035_label("1abc").is_empty());
        assert!(dns1035_label("abc-1").is_empty());
        assert_eq!(dns1123_label(&"a".repeat(64)).len(), 1);
        assert!(qualified_name("app.kubernetes.io/name").is_empty());
        assert!(!qualified_name("/x").is_empty());
        assert!(!qualified_name("a b").is_empty());
        assert!(label_value("").is_empty());
        assert!(!label_value("-x").is_empty());
    }

    #[test]
    fn time_round_trips() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_795_564_800), "2026-11-25T00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        for t in [0i64, 951_782_400, 1_795_564_861, 4_102_444_799] {
            assert_eq!(parse_time(&format_time(t)), Some(t));
        }
        assert_eq!(parse_time("2026-11-25T01:00:00+01:00"), Some(1_795_564_800));
        assert_eq!(parse_time("2026-11-25T00:00:00.123456Z"), Some(1_795_564_800));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn generated_ids() {
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(new_uid(), u);
        let s = random_suffix();
        assert_eq!(s.len(), 5);
        assert!(s.bytes().all(|c| b"bcdfghjklmnpqrstvwxz2456789".contains(&c)));
    }
}
