//! OpenAPI v2 as protocol buffers (gnostic's `openapi.v2.Document`), the form kubectl up to
//! 1.2x downloads (`Accept: application/com.github.proto-openapi.spec.v2@v1.0+protobuf`)
//! for client-side validation and patch computation. Encodes the JSON document built in
//! openapi.rs; only the parts kubectl reads are written (swagger, info, definitions with
//! types, properties, items, references and vendor extensions).

use serde_json::Value;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn string_field(out: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        bytes_field(out, field, s.as_bytes());
    }
}

/// `NamedAny { name = 1; value = Any { yaml = 2 } }`: the value as YAML text (JSON is YAML).
fn named_any(name: &str, v: &Value) -> Vec<u8> {
    let yaml = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut any = Vec::new();
    string_field(&mut any, 2, &yaml);
    let mut out = Vec::new();
    string_field(&mut out, 1, name);
    bytes_field(&mut out, 2, &any);
    out
}

/// Encodes a JSON schema as `openapi.v2.Schema`.
fn schema(s: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(m) = s.as_object() else { return out };
    if let Some(r) = m.get("$ref").and_then(Value::as_str) {
        string_field(&mut out, 1, r);
    }
    if let Some(f) = m.get("format").and_then(Value::as_str) {
        string_field(&mut out, 2, f);
    }
    if let Some(d) = m.get("description").and_then(Value::as_str) {
        string_field(&mut out, 4, d);
    }
    for r in m.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
        string_field(&mut out, 19, r);
    }
    if let Some(ap) = m.get("additionalProperties") {
        let mut item = Vec::new();
        match ap {
            Value::Bool(b) => {
                key(&mut item, 2, 0);
                varint(&mut item, u64::from(*b));
            }
            other => bytes_field(&mut item, 1, &schema(other)),
        }
        bytes_field(&mut out, 21, &item);
    }
    if let Some(t) = m.get("type").and_then(Value::as_str) {
        let mut ti = Vec::new();
        string_field(&mut ti, 1, t);
        bytes_field(&mut out, 22, &ti);
    }
    if let Some(items) = m.get("items") {
        let mut ii = Vec::new();
        bytes_field(&mut ii, 1, &schema(items));
        bytes_field(&mut out, 23, &ii);
    }
    for a in m.get("allOf").and_then(Value::as_array).into_iter().flatten() {
        bytes_field(&mut out, 24, &schema(a));
    }
    if let Some(props) = m.get("properties").and_then(Value::as_object) {
        let mut p = Vec::new();
        for (name, ps) in props {
            let mut ns = Vec::new();
            string_field(&mut ns, 1, name);
            bytes_field(&mut ns, 2, &schema(ps));
            bytes_field(&mut p, 1, &ns);
        }
        bytes_field(&mut out, 25, &p);
    }
    for (k, v) in m.iter().filter(|(k, _)| k.starts_with("x-")) {
        bytes_field(&mut out, 31, &named_any(k, v));
    }
    out
}

/// Encodes a Swagger 2.0 JSON document as `openapi.v2.Document`.
pub fn encode_document(doc: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    string_field(&mut out, 1, doc.get("swagger").and_then(Value::as_str).unwrap_or("2.0"));
    let mut info = Vec::new();
    string_field(&mut info, 1, doc.pointer("/info/title").and_then(Value::as_str).unwrap_or(""));
    string_field(&mut info, 2, doc.pointer("/info/version").and_then(Value::as_str).unwrap_or(""));
    bytes_field(&mut out, 2, &info);
    let mut defs = Vec::new();
    for (name, s) in doc.get("definitions").and_then(Value::as_object).into_iter().flatten() {
        let mut ns = Vec::new();
        string_field(&mut ns, 1, name);
        bytes_field(&mut ns, 2, &schema(s));
        bytes_field(&mut defs, 1, &ns);
    }
    bytes_field(&mut out, 9, &defs);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A minimal reader of the fields written above, to check the encoding round trips.
    fn fields(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        let rd = |b: &mut &[u8]| {
            let (mut v, mut s) = (0u64, 0);
            loop {
                let x = b[0];
                *b = &b[1..];
                v |= u64::from(x & 0x7f) << s;
                s += 7;
                if x < 0x80 {
                    return v;
                }
            }
        };
        while !b.is_empty() {
            let k = rd(&mut b);
            let (f, w) = ((k >> 3) as u32, k & 7);
            if w == 2 {
                let n = rd(&mut b) as usize;
                out.push((f, b[..n].to_vec()));
                b = &b[n..];
            } else {
                out.push((f, vec![rd(&mut b) as u8]));
            }
        }
        out
    }

    #[test]
    fn document_structure() {
        let doc = json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.35.0"}, "definitions": {
            "io.k8s.api.apps.v1.Deployment": {"type": "object", "properties": {"spec": {"$ref": "#/definitions/io.k8s.api.apps.v1.DeploymentSpec"}}, "x-kubernetes-group-version-kind": [{"group": "apps", "kind": "Deployment", "version": "v1"}]}}});
        let enc = encode_document(&doc);
        let top = fields(&enc);
        assert_eq!(top[0], (1, b"2.0".to_vec()));
        let defs = fields(&top.iter().find(|(f, _)| *f == 9).unwrap().1);
        let named = fields(&defs[0].1);
        assert_eq!(named[0], (1, b"io.k8s.api.apps.v1.Deployment".to_vec()));
        let s = fields(&named[1].1);
        let ty = fields(&s.iter().find(|(f, _)| *f == 22).unwrap().1);
        assert_eq!(ty[0], (1, b"object".to_vec()));
        let ext = fields(&s.iter().find(|(f, _)| *f == 31).unwrap().1);
        assert_eq!(ext[0], (1, b"x-kubernetes-group-version-kind".to_vec()));
        let any = fields(&ext[1].1);
        assert!(String::from_utf8(any[0].1.clone()).unwrap().contains("\"Deployment\""));
    }
}
