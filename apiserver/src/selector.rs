//! Label and field selectors: parsed once per request, matched per object.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Exists,
    NotExists,
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Gt(i64),
    Lt(i64),
}

#[derive(Clone, Debug, PartialEq)]
struct Req {
    key: String,
    op: Op,
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector {
    reqs: Vec<Req>,
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

struct Lexer<'a> {
    s: &'a str,
    pos: usize,
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Eq,
    DoubleEq,
    NotEq,
    Not,
    Gt,
    Lt,
    Comma,
    Open,
    Close,
    End,
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => s.clone(),
        Tok::Eq => "=".into(),
        Tok::DoubleEq => "==".into(),
        Tok::NotEq => "!=".into(),
        Tok::Not => "!".into(),
        Tok::Gt => ">".into(),
        Tok::Lt => "<".into(),
        Tok::Comma => ",".into(),
        Tok::Open => "(".into(),
        Tok::Close => ")".into(),
        Tok::End => "end of string".into(),
    }
}

impl Lexer<'_> {
    fn next(&mut self) -> Tok {
        let rest = &self.s[self.pos..];
        let trimmed = rest.trim_start();
        self.pos += rest.len() - trimmed.len();
        let mut chars = trimmed.chars();
        let Some(c) = chars.next() else { return Tok::End };
        let two = trimmed.get(..2).unwrap_or("");
        let (tok, len) = match c {
            '=' if two == "==" => (Tok::DoubleEq, 2),
            '=' => (Tok::Eq, 1),
            '!' if two == "!=" => (Tok::NotEq, 2),
            '!' => (Tok::Not, 1),
            '>' => (Tok::Gt, 1),
            '<' => (Tok::Lt, 1),
            ',' => (Tok::Comma, 1),
            '(' => (Tok::Open, 1),
            ')' => (Tok::Close, 1),
            _ => {
                let n = trimmed.find(|c: char| !(is_key_char(c))).unwrap_or(trimmed.len());
                let n = if n == 0 { c.len_utf8() } else { n };
                (Tok::Ident(trimmed[..n].to_string()), n)
            }
        };
        self.pos += len;
        tok
    }
    fn peek(&mut self) -> Tok {
        let p = self.pos;
        let t = self.next();
        self.pos = p;
        t
    }
}

fn err(msg: String) -> String {
    format!("unable to parse requirement: {msg}")
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut lx = Lexer { s, pos: 0 };
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector { reqs });
        }
        loop {
            let mut negate = false;
            let mut t = lx.next();
            if t == Tok::Not {
                negate = true;
                t = lx.next();
            }
            let key = match t {
                Tok::Ident(k) => k,
                other => return Err(err(format!("found '{}', expected: !, identifier, or 'end of string'", describe(&other)))),
            };
            validate_key(&key)?;
            if negate {
                reqs.push(Req { key, op: Op::NotExists });
            } else {
                let op = match lx.peek() {
                    Tok::Comma | Tok::End => Op::Exists,
                    Tok::Eq | Tok::DoubleEq | Tok::NotEq => {
                        let o = lx.next();
                        let v = match lx.peek() {
                            Tok::Ident(v) => {
                                lx.next();
                                v
                            }
                            Tok::Comma | Tok::End => String::new(),
                            other => return Err(err(format!("found '{}', expected: identifier", describe(&other)))),
                        };
                        validate_value(&v)?;
                        if o == Tok::NotEq {
                            Op::NotEq(v)
                        } else {
                            Op::Eq(v)
                        }
                    }
                    Tok::Gt | Tok::Lt => {
                        let o = lx.next();
                        let v = match lx.next() {
                            Tok::Ident(v) => v,
                            other => return Err(err(format!("found '{}', expected: identifier", describe(&other)))),
                        };
                        let n: i64 = v.parse().map_err(|_| err(format!("for 'Gt', 'Lt' operators, the value must be an integer")))?;
                        if o == Tok::Gt {
                            Op::Gt(n)
                        } else {
                            Op::Lt(n)
                        }
                    }
                    Tok::Ident(w) if w == "in" || w == "notin" => {
                        lx.next();
                        if lx.next() != Tok::Open {
                            return Err(err("found unexpected token, expected: '('".into()));
                        }
                        let mut vals = Vec::new();
                        loop {
                            match lx.next() {
                                Tok::Ident(v) => {
                                    validate_value(&v)?;
                                    vals.push(v);
                                    match lx.next() {
                                        Tok::Comma => continue,
                                        Tok::Close => break,
                                        other => return Err(err(format!("found '{}', expected: ',' or ')'", describe(&other)))),
                                    }
                                }
                                Tok::Close if vals.is_empty() => {
                                    return Err(err("for 'in', 'notin' operators, values set can't be empty".into()));
                                }
                                other => return Err(err(format!("found '{}', expected: ',', ')' or identifier", describe(&other)))),
                            }
                        }
                        if w == "in" {
                            Op::In(vals)
                        } else {
                            Op::NotIn(vals)
                        }
                    }
                    other => return Err(err(format!("found '{}', expected: in, notin, =, ==, !=, gt, lt", describe(&other)))),
                };
                reqs.push(Req { key, op });
            }
            match lx.next() {
                Tok::Comma => continue,
                Tok::End => break,
                other => return Err(err(format!("found '{}', expected: ',' or 'end of string'", describe(&other)))),
            }
        }
        Ok(LabelSelector { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Matches a `metadata.labels` map (None: no labels).
    pub fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        self.reqs.iter().all(|r| {
            let v = labels.and_then(|l| l.get(&r.key)).and_then(Value::as_str);
            match &r.op {
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
                Op::Eq(x) => v == Some(x.as_str()),
                Op::NotEq(x) => v != Some(x.as_str()),
                Op::In(xs) => v.is_some_and(|v| xs.iter().any(|x| x == v)),
                Op::NotIn(xs) => v.is_none_or(|v| !xs.iter().any(|x| x == v)),
                Op::Gt(n) => v.and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v > *n),
                Op::Lt(n) => v.and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v < *n),
            }
        })
    }

    /// Builds a selector from a `metav1.LabelSelector` object (matchLabels +
    /// matchExpressions), as workload controllers and `kubectl` use.
    pub fn from_object(sel: &Value) -> Result<LabelSelector, String> {
        let mut reqs = Vec::new();
        if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in m {
                reqs.push(Req { key: k.clone(), op: Op::Eq(v.as_str().unwrap_or("").to_string()) });
            }
        }
        if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e.get("key").and_then(Value::as_str).unwrap_or("").to_string();
                let vals: Vec<String> = e.get("values").and_then(Value::as_array).map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default();
                let op = match e.get("operator").and_then(Value::as_str).unwrap_or("") {
                    "In" => Op::In(vals),
                    "NotIn" => Op::NotIn(vals),
                    "Exists" => Op::Exists,
                    "DoesNotExist" => Op::NotExists,
                    other => return Err(format!("{other:?} is not a valid label selector operator")),
                };
                reqs.push(Req { key, op });
            }
        }
        Ok(LabelSelector { reqs })
    }
}

fn validate_key(k: &str) -> Result<(), String> {
    if k.is_empty() || k.len() > 317 || k.starts_with('/') || k.ends_with('/') {
        return Err(err(format!("invalid label key \"{k}\"")));
    }
    Ok(())
}

fn validate_value(v: &str) -> Result<(), String> {
    if v.len() > 63 || !v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(err(format!("invalid label value: \"{v}\": at key: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.'")));
    }
    Ok(())
}

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`, comma
/// separated (a `\` escapes `,`, `=` and `!`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<FieldSelector, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector { reqs });
        }
        for part in split_unescaped(s, ',') {
            let (field, eq, value) = if let Some(i) = find_unescaped(&part, "!=") {
                (&part[..i], false, &part[i + 2..])
            } else if let Some(i) = find_unescaped(&part, "==") {
                (&part[..i], true, &part[i + 2..])
            } else if let Some(i) = find_unescaped(&part, "=") {
                (&part[..i], true, &part[i + 1..])
            } else {
                return Err(format!("invalid selector: '{s}'; can't understand '{part}'"));
            };
            reqs.push((field.trim().to_string(), eq, unescape(value)));
        }
        Ok(FieldSelector { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// The fields the selector names, to check against what a kind supports.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.reqs.iter().map(|(f, _, _)| f.as_str())
    }

    /// Matches with a function giving each field's value for the object.
    pub fn matches(&self, field: impl Fn(&str) -> Option<String>) -> bool {
        self.reqs.iter().all(|(f, eq, v)| {
            let got = field(f).unwrap_or_default();
            (got == *v) == *eq
        })
    }

    /// The value of `field` if the selector pins it with `=` (used to narrow a scan).
    pub fn exact(&self, field: &str) -> Option<&str> {
        self.reqs.iter().find(|(f, eq, _)| f == field && *eq).map(|(_, _, v)| v.as_str())
    }
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut esc = false;
    for c in s.chars() {
        if esc {
            out.last_mut().expect("never empty").push('\\');
            out.last_mut().expect("never empty").push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else if c == sep {
            out.push(String::new());
        } else {
            out.last_mut().expect("never empty").push(c);
        }
    }
    out
}

fn find_unescaped(s: &str, pat: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
            continue;
        }
        if s[i..].starts_with(pat) {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in s.chars() {
        if esc {
            out.push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(sel: &str, labels: Value) -> bool {
        LabelSelector::parse(sel).unwrap().matches(labels.as_object())
    }

    #[test]
    fn label_selectors() {
        let l = json!({"app": "web", "tier": "front", "n": "7"});
        let table = [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, db)", true),
            ("app notin (web,db)", false),
            ("missing notin (a)", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app=web,tier=back", false),
            ("app=web, tier=front", true),
            ("n>5", true),
            ("n<5", false),
            ("missing=", false),
        ];
        for (sel, want) in table {
            assert_eq!(m(sel, l.clone()), want, "{sel}");
        }
        for bad in ["app=web=x", "in (", "app in ()", "a,", "app in (a b)"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_selectors() {
        let f = FieldSelector::parse("status.phase!=Running,spec.nodeName=n1").unwrap();
        let get = |phase: &'static str| move |k: &str| Some(if k == "status.phase" { phase.to_string() } else { "n1".to_string() });
        assert!(f.matches(get("Pending")));
        assert!(!f.matches(get("Running")));
        assert_eq!(f.exact("spec.nodeName"), Some("n1"));
        let esc = FieldSelector::parse(r"metadata.name=a\,b").unwrap();
        assert!(esc.matches(|_| Some("a,b".into())));
        assert!(FieldSelector::parse("nonsense").is_err());
    }

    #[test]
    fn object_selector() {
        let s = LabelSelector::from_object(&json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]})).unwrap();
        assert!(s.matches(json!({"app": "web", "tier": "a"}).as_object()));
        assert!(!s.matches(json!({"app": "web"}).as_object()));
    }
}
