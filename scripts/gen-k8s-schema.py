#!/usr/bin/python3
"""Generates apiserver/schema/k8s-types.json: every Kubernetes API message with its fields
(protobuf tag, JSON name, type, repeated), used by the API server to decode protobuf
bodies, reject unknown fields and serve OpenAPI schemas.

Sources (both Apache-2.0 interface descriptions, no prose is taken):
- the `k8s-pb` crate's prost definitions (protobuf tags and types), found in the cargo
  registry (run `cargo fetch` in a crate depending on k8s-pb first);
- the Python `kubernetes` client's `attribute_map`s (JSON field names), /usr/bin/python3.

Usage: scripts/gen-k8s-schema.py [PATH-TO-k8s-pb-src] > apiserver/schema/k8s-types.json
"""
import glob, json, os, re, sys

def find_src():
    if len(sys.argv) > 1:
        return sys.argv[1]
    c = sorted(glob.glob(os.path.expanduser("~/.cargo/registry/src/*/k8s-pb-*/src")))
    if not c:
        sys.exit("k8s-pb sources not found in the cargo registry")
    return c[-1]

def package_of(parts):
    if parts[0] == "api":
        return "io.k8s.api." + ".".join(parts[1:])
    if parts[0] == "apimachinery":
        return "io.k8s.apimachinery." + ".".join(parts[1:])
    if parts[0] == "apiextensions_apiserver":
        return "io.k8s.apiextensions-apiserver." + ".".join(parts[1:])
    if parts[0] == "kube_aggregator":
        return "io.k8s.kube-aggregator." + ".".join(parts[1:])
    return "io.k8s." + ".".join(parts)

def json_names():
    import kubernetes.client.models as models
    names = {}
    for n in dir(models):
        cls = getattr(models, n)
        am = getattr(cls, "attribute_map", None)
        if isinstance(am, dict):
            for k, v in am.items():
                names.setdefault(k, v)
    return names

ACRONYMS = {"ip": "IP", "ips": "IPs", "cidr": "CIDR", "cidrs": "CIDRs", "id": "ID", "ids": "IDs", "url": "URL", "urls": "URLs", "uid": "UID", "uuid": "UUID", "tls": "TLS", "dns": "DNS", "os": "OS", "fqdn": "FQDN", "pid": "PID", "ipc": "IPC", "uri": "URI", "wwns": "WWNs", "cpu": "CPU", "api": "API"}

def camel(snake, known):
    if snake in known:
        return known[snake]
    parts = snake.split("_")
    out = parts[0]
    for p in parts[1:]:
        out += ACRONYMS.get(p, p[:1].upper() + p[1:])
    return out

# Fields the Go types embed with `json:",inline"`: their members appear at the parent's
# level in JSON while protobuf nests them (flag 2 in the output).
INLINE = {
    ("Volume", "volumeSource"), ("PersistentVolumeSpec", "persistentVolumeSource"), ("Probe", "handler"),
    ("EphemeralContainer", "ephemeralContainerCommon"),
    ("ConfigMapEnvSource", "localObjectReference"), ("ConfigMapKeySelector", "localObjectReference"),
    ("ConfigMapProjection", "localObjectReference"), ("ConfigMapVolumeSource", "localObjectReference"),
    ("SecretEnvSource", "localObjectReference"), ("SecretKeySelector", "localObjectReference"),
    ("SecretProjection", "localObjectReference"),
    ("RuleWithOperations", "rule"), ("NamedRuleWithOperations", "ruleWithOperations"), ("IngressRule", "ingressRuleValue"),
}

FIELD_RE = re.compile(r'#\[prost\((.*?)\)\]\s*pub (r#)?(\w+):\s*(.*?),\s*$', re.S)

def main():
    src = find_src()
    known = json_names()
    messages = {}
    for path in sorted(glob.glob(os.path.join(src, "**", "mod.rs"), recursive=True)):
        rel = os.path.relpath(os.path.dirname(path), src)
        parts = rel.split(os.sep)
        text = open(path).read()
        pkg = package_of(parts)
        for m in re.finditer(r'pub struct (\w+) \{\}', text):
            messages[pkg + "." + m.group(1)] = []
        for m in re.finditer(r'pub struct (\w+) \{\n(.*?)\n\}', text, re.S):
            name, body = m.group(1), m.group(2)
            # Strip doc comments, then split into attribute+field chunks.
            lines = [l for l in body.split("\n") if not l.strip().startswith("///")]
            body = "\n".join(lines)
            fields = []
            for chunk in re.split(r'(?=#\[prost\()', body):
                fm = FIELD_RE.search(chunk.strip() + "\n")
                if not fm:
                    continue
                attr, _, fname, rtype = fm.groups()
                tag = int(re.search(r'tag = "(\d+)"', attr).group(1))
                repeated = "repeated" in attr
                kind = attr.split(",")[0].strip()
                rtype = re.sub(r'\s+', '', rtype)
                def resolve(t):
                    t = t.replace("::core::option::Option<", "").replace("::prost::alloc::vec::Vec<", "").replace("::prost::alloc::boxed::Box<", "")
                    t = t.rstrip(">,")
                    ups = t.count("super::")
                    t = t.replace("super::", "")
                    segs = t.split("::")
                    base = parts[: len(parts) - ups] if ups else parts
                    return package_of(base + segs[:-1]) + "." + segs[-1] if len(base + segs[:-1]) else segs[-1]
                if kind.startswith("btree_map") or kind.startswith("map"):
                    kv = re.search(r'map = "([^"]*)"', attr).group(1)
                    vt = kv.split(",")[1].strip()
                    if vt == "message":
                        inner = rtype.split("::prost::alloc::string::String,", 1)[1]
                        vt = resolve(inner.rstrip(","))
                    ftype = "map:" + vt
                elif kind == "message":
                    ftype = resolve(rtype)
                elif kind.startswith("bytes"):
                    ftype = "bytes"
                else:
                    ftype = kind
                jname = camel(fname, known)
                flags = (1 if repeated else 0) | (2 if (name, jname) in INLINE else 0)
                fields.append([tag, jname, ftype, flags])
            if name.startswith("JsonSchemaProps"):
                # Go's JSON names these fields with a '$' the client models spell otherwise.
                for f in fields:
                    if name == "JsonSchemaProps" and f[0] == 2:
                        f[1] = "$schema"
            messages[pkg + "." + name] = sorted(fields)
    json.dump({"generator": "scripts/gen-k8s-schema.py", "messages": messages}, sys.stdout, separators=(",", ":"), sort_keys=True)

main()
