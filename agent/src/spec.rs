//! From a pod's JSON to what the runtime runs: volumes made ready on the node (emptyDir,
//! hostPath, configMap, secret, downwardAPI, projected, claims bound to node-local volumes)
//! and each container's [`RunSpec`] (command, resolved environment, limits,
//! securityContext, mounts). Errors are the messages kubelet reports with
//! `CreateContainerConfigError`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use parking_lot::Mutex;
use serde_json::Value;

use crate::runtime::{Mount, RunSpec};

/// ConfigMaps, Secrets, claims and volumes the server sent for this node's pods.
#[derive(Default)]
pub struct Objects {
    map: Mutex<HashMap<(String, String, String), Arc<Value>>>,
}

impl Objects {
    pub fn put(&self, kind: &str, ns: &str, name: &str, v: Value) {
        self.map.lock().insert((kind.into(), ns.into(), name.into()), Arc::new(v));
    }
    pub fn remove(&self, kind: &str, ns: &str, name: &str) {
        self.map.lock().remove(&(kind.into(), ns.into(), name.into()));
    }
    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.map.lock().get(&(kind.to_string(), ns.to_string(), name.to_string())).cloned()
    }
    /// Key → bytes of a ConfigMap (data and binaryData) or a Secret (data, base64).
    pub fn data(&self, kind: &str, ns: &str, name: &str) -> Option<Vec<(String, Vec<u8>)>> {
        let o = self.get(kind, ns, name)?;
        let mut out = vec![];
        for (k, v) in o["data"].as_object().into_iter().flatten() {
            let s = v.as_str().unwrap_or_default();
            let b = if kind == "Secret" { base64::engine::general_purpose::STANDARD.decode(s).unwrap_or_default() } else { s.as_bytes().to_vec() };
            out.push((k.clone(), b));
        }
        if kind == "ConfigMap" {
            for (k, v) in o["binaryData"].as_object().into_iter().flatten() {
                out.push((k.clone(), base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()).unwrap_or_default()));
            }
        }
        out.sort();
        Some(out)
    }
}

/// What a pod's environment and downward API can refer to.
pub struct PodFacts<'a> {
    pub pod: &'a Value,
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: String,
}

impl PodFacts<'_> {
    fn field(&self, path: &str) -> Result<String, String> {
        let m = &self.pod["metadata"];
        Ok(match path {
            "metadata.name" => m["name"].as_str().unwrap_or_default().into(),
            "metadata.namespace" => m["namespace"].as_str().unwrap_or_default().into(),
            "metadata.uid" => m["uid"].as_str().unwrap_or_default().into(),
            "spec.nodeName" => self.node_name.clone(),
            "spec.serviceAccountName" => self.pod["spec"]["serviceAccountName"].as_str().unwrap_or("default").into(),
            "status.podIP" | "status.podIPs" => self.pod_ip.clone(),
            "status.hostIP" | "status.hostIPs" => self.host_ip.clone(),
            "metadata.labels" | "metadata.annotations" => {
                let key = path.trim_start_matches("metadata.");
                let mut kv: Vec<String> = m[key].as_object().into_iter().flatten().map(|(k, v)| format!("{k}={}", Value::from(v.as_str().unwrap_or_default()))).collect();
                kv.sort();
                kv.join("\n")
            }
            p => {
                if let Some(k) = p.strip_prefix("metadata.labels['").and_then(|k| k.strip_suffix("']")) {
                    m["labels"][k].as_str().unwrap_or_default().into()
                } else if let Some(k) = p.strip_prefix("metadata.annotations['").and_then(|k| k.strip_suffix("']")) {
                    m["annotations"][k].as_str().unwrap_or_default().into()
                } else {
                    return Err(format!("unsupported fieldRef fieldPath {p:?}"));
                }
            }
        })
    }
}

/// Expands `$(VAR)` from `env` (`$$(VAR)` escapes), as upstream's expansion does.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'(' {
                if let Some(end) = s[i + 2..].find(')') {
                    let name = &s[i + 2..i + 2 + end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&s[i..i + 3 + end]),
                    }
                    i += 3 + end;
                    continue;
                }
            }
        }
        let ch = s[i..].chars().next().unwrap_or('\0');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

/// Writes `files` into `dir` the way upstream's AtomicWriter does: a timestamped directory,
/// a `..data` symlink switched atomically, and per-file symlinks through `..data`.
pub fn write_atomic(dir: &Path, files: &[(String, Vec<u8>, u32)]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let stamp = format!("..{}", shoal_client::time::now_nanos().replace([':', '-'], "_"));
    let ts = dir.join(&stamp);
    std::fs::create_dir_all(&ts)?;
    for (name, data, mode) in files {
        if name.split('/').any(|c| c == ".." || c.is_empty()) || name.starts_with("..") {
            continue;
        }
        let p = ts.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, data)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::fs::rename(&tmp, dir.join("..data"))?;
    for (name, _, _) in files {
        let top = name.split('/').next().unwrap_or(name);
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), &link)?;
        }
    }
    // Files gone from the object go from the volume.
    for e in std::fs::read_dir(dir)?.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if !n.starts_with("..") && !files.iter().any(|(f, _, _)| f.split('/').next() == Some(n.as_str())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if let Some(old) = old.filter(|o| o.as_os_str() != stamp.as_str()) {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// The files of a configMap/secret volume source (all keys, or `items`).
fn source_files(objects: &Objects, kind: &str, ns: &str, src: &Value, default_mode: u32) -> Result<Option<Vec<(String, Vec<u8>, u32)>>, String> {
    let name = src["name"].as_str().or(src["secretName"].as_str()).unwrap_or_default();
    let optional = src["optional"].as_bool().unwrap_or(false);
    let Some(data) = objects.data(kind, ns, name) else {
        if optional {
            return Ok(None);
        }
        return Err(format!("{} \"{name}\" not found", kind.to_ascii_lowercase()));
    };
    let mode = src["defaultMode"].as_u64().map(|m| m as u32).unwrap_or(default_mode);
    let items = src["items"].as_array();
    let mut out = vec![];
    match items {
        Some(items) => {
            for it in items {
                let key = it["key"].as_str().unwrap_or_default();
                let path = it["path"].as_str().unwrap_or(key);
                let Some((_, b)) = data.iter().find(|(k, _)| k == key) else {
                    if optional {
                        continue;
                    }
                    return Err(format!("configmap references non-existent config key: {key}"));
                };
                out.push((path.to_string(), b.clone(), it["mode"].as_u64().map(|m| m as u32).unwrap_or(mode)));
            }
        }
        None => out.extend(data.into_iter().map(|(k, b)| (k, b, mode))),
    }
    Ok(Some(out))
}

/// Makes each volume of the pod ready under `dir`; returns volume name → host path.
pub fn prepare_volumes(facts: &PodFacts, objects: &Objects, dir: &Path) -> Result<HashMap<String, PathBuf>, String> {
    let ns = facts.pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let mut out = HashMap::new();
    for v in facts.pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let vdir = dir.join("volumes").join(&name);
        let io = |e: std::io::Error| format!("volume {name:?}: {e}");
        let path = if let Some(ed) = v.get("emptyDir") {
            std::fs::create_dir_all(&vdir).map_err(io)?;
            if ed["medium"] == "Memory" && !is_mountpoint(&vdir) {
                let size = ed["sizeLimit"].as_str().and_then(shoal_client::quantity::parse).map(|m| (m / 1000) as u64);
                let opts = match size {
                    Some(s) if s > 0 => format!("size={s}"),
                    _ => String::new(),
                };
                let opts = std::ffi::CString::new(opts).map_err(|e| e.to_string())?;
                rustix::mount::mount("tmpfs", &vdir, "tmpfs", rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV, Some(opts.as_c_str())).map_err(|e| format!("volume {name:?}: mounting tmpfs: {e}"))?;
            }
            vdir
        } else if let Some(hp) = v.get("hostPath") {
            let p = PathBuf::from(hp["path"].as_str().unwrap_or_default());
            match hp["type"].as_str().unwrap_or_default() {
                "DirectoryOrCreate" => std::fs::create_dir_all(&p).map_err(io)?,
                "Directory" if !p.is_dir() => return Err(format!("hostPath type check failed: {} is not a directory", p.display())),
                "File" if !p.is_file() => return Err(format!("hostPath type check failed: {} is not a file", p.display())),
                "FileOrCreate" if !p.exists() => {
                    std::fs::File::create(&p).map_err(io)?;
                }
                _ => {}
            }
            p
        } else if let Some(src) = v.get("configMap").or(v.get("secret")) {
            let kind = if v.get("configMap").is_some() { "ConfigMap" } else { "Secret" };
            let files = source_files(objects, kind, ns, src, 0o644)?.unwrap_or_default();
            write_atomic(&vdir, &files).map_err(io)?;
            vdir
        } else if let Some(d) = v.get("downwardAPI") {
            let mut files = vec![];
            for it in d["items"].as_array().into_iter().flatten() {
                let fp = it["fieldRef"]["fieldPath"].as_str().unwrap_or_default();
                files.push((it["path"].as_str().unwrap_or_default().to_string(), facts.field(fp)?.into_bytes(), 0o644));
            }
            write_atomic(&vdir, &files).map_err(io)?;
            vdir
        } else if let Some(p) = v.get("projected") {
            let mut files = vec![];
            for s in p["sources"].as_array().into_iter().flatten() {
                if let Some(src) = s.get("configMap") {
                    files.extend(source_files(objects, "ConfigMap", ns, src, 0o644)?.unwrap_or_default());
                } else if let Some(src) = s.get("secret") {
                    files.extend(source_files(objects, "Secret", ns, src, 0o644)?.unwrap_or_default());
                } else if let Some(d) = s.get("downwardAPI") {
                    for it in d["items"].as_array().into_iter().flatten() {
                        files.push((it["path"].as_str().unwrap_or_default().to_string(), facts.field(it["fieldRef"]["fieldPath"].as_str().unwrap_or_default())?.into_bytes(), 0o644));
                    }
                }
                // serviceAccountToken sources need the token controller (not built yet):
                // the projected volume carries the other sources.
            }
            write_atomic(&vdir, &files).map_err(io)?;
            vdir
        } else if let Some(c) = v.get("persistentVolumeClaim") {
            let claim = c["claimName"].as_str().unwrap_or_default();
            let pvc = objects.get("PersistentVolumeClaim", ns, claim).ok_or_else(|| format!("persistentvolumeclaim \"{claim}\" not found"))?;
            let pv_name = pvc["spec"]["volumeName"].as_str().ok_or_else(|| format!("persistentvolumeclaim \"{claim}\" is not bound"))?;
            let pv = objects.get("PersistentVolume", "", pv_name).ok_or_else(|| format!("persistentvolume \"{pv_name}\" not found"))?;
            let p = pv["spec"]["local"]["path"].as_str().or(pv["spec"]["hostPath"]["path"].as_str()).ok_or_else(|| format!("persistentvolume \"{pv_name}\" is neither local nor hostPath (other volume plugins are not supported)"))?;
            std::fs::create_dir_all(p).map_err(io)?;
            PathBuf::from(p)
        } else {
            return Err(format!("volume {name:?}: this volume type is not supported by this node"));
        };
        out.insert(name, path);
    }
    Ok(out)
}

fn is_mountpoint(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

/// Registry credentials for `image` from the pod's imagePullSecrets
/// (`kubernetes.io/dockerconfigjson` and `kubernetes.io/dockercfg`).
pub fn pull_credentials(image: &str, ns: &str, secrets: &[String], objects: &Objects) -> Vec<crate::image::Credentials> {
    let Ok(r) = crate::image::Reference::parse(image) else { return vec![] };
    let mut out = vec![];
    for name in secrets {
        let Some(data) = objects.data("Secret", ns, name) else { continue };
        for (key, bytes) in data {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let auths = match key.as_str() {
                ".dockerconfigjson" => &v["auths"],
                ".dockercfg" => &v,
                _ => continue,
            };
            for (host, a) in auths.as_object().into_iter().flatten() {
                let h = host.trim_start_matches("https://").trim_start_matches("http://").split('/').next().unwrap_or_default();
                let matches = h == r.registry || (r.registry == "docker.io" && (h == "index.docker.io" || h == "registry-1.docker.io"));
                if !matches {
                    continue;
                }
                let (mut username, mut password) = (a["username"].as_str().unwrap_or_default().to_string(), a["password"].as_str().unwrap_or_default().to_string());
                if let Some(auth) = a["auth"].as_str().and_then(|x| base64::engine::general_purpose::STANDARD.decode(x).ok()) {
                    if let Some((u, p)) = String::from_utf8_lossy(&auth).split_once(':') {
                        (username, password) = (u.to_string(), p.to_string());
                    }
                }
                out.push(crate::image::Credentials { username, password });
            }
        }
    }
    out
}

fn milli(v: &Value) -> u64 {
    v.as_str().and_then(shoal_client::quantity::parse).map(|m| m.max(0) as u64).unwrap_or(0)
}

/// The container's [`RunSpec`].
pub fn run_spec(c: &Value, facts: &PodFacts, objects: &Objects, volumes: &HashMap<String, PathBuf>) -> Result<RunSpec, String> {
    let ns = facts.pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let mut env: Vec<(String, String)> = vec![];
    for ef in c["envFrom"].as_array().into_iter().flatten() {
        let prefix = ef["prefix"].as_str().unwrap_or_default();
        let (kind, src) = if let Some(s) = ef.get("configMapRef") { ("ConfigMap", s) } else if let Some(s) = ef.get("secretRef") { ("Secret", s) } else { continue };
        let name = src["name"].as_str().unwrap_or_default();
        match objects.data(kind, ns, name) {
            Some(d) => env.extend(d.into_iter().map(|(k, v)| (format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned()))),
            None if src["optional"].as_bool() == Some(true) => {}
            None => return Err(format!("{} \"{name}\" not found", kind.to_ascii_lowercase())),
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else if let Some(vf) = e.get("valueFrom") {
            if let Some(f) = vf.get("fieldRef") {
                facts.field(f["fieldPath"].as_str().unwrap_or_default())?
            } else if let Some(r) = vf.get("resourceFieldRef") {
                let res = r["resource"].as_str().unwrap_or_default();
                let (sect, what) = res.split_once('.').unwrap_or(("", res));
                let q = milli(&c["resources"][sect][what]);
                if what == "cpu" { q.div_ceil(1000).max(1).to_string() } else { (q / 1000).to_string() }
            } else {
                let (kind, sel) = if let Some(s) = vf.get("configMapKeyRef") { ("ConfigMap", s) } else if let Some(s) = vf.get("secretKeyRef") { ("Secret", s) } else { continue };
                let (oname, key) = (sel["name"].as_str().unwrap_or_default(), sel["key"].as_str().unwrap_or_default());
                let optional = sel["optional"].as_bool() == Some(true);
                match objects.data(kind, ns, oname) {
                    Some(d) => match d.into_iter().find(|(k, _)| k == key) {
                        Some((_, v)) => String::from_utf8_lossy(&v).into_owned(),
                        None if optional => continue,
                        None => return Err(format!("couldn't find key {key} in {} {ns}/{oname}", if kind == "Secret" { "Secret" } else { "ConfigMap" })),
                    },
                    None if optional => continue,
                    None => return Err(format!("{} \"{oname}\" not found", kind.to_ascii_lowercase())),
                }
            }
        } else {
            String::new()
        };
        env.push((name, value));
    }
    let mut mounts = vec![];
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let vname = m["name"].as_str().unwrap_or_default();
        let base = volumes.get(vname).ok_or_else(|| format!("cannot find volume {vname:?} to mount into container {:?}", c["name"].as_str().unwrap_or_default()))?;
        let sub = m["subPath"].as_str().unwrap_or_default();
        if sub.split('/').any(|p| p == "..") || sub.starts_with('/') {
            return Err(format!("subPath {sub:?} must be a relative path without '..'"));
        }
        let host_path = if sub.is_empty() { base.clone() } else { base.join(sub) };
        mounts.push(Mount { host_path, container_path: m["mountPath"].as_str().unwrap_or_default().to_string(), read_only: m["readOnly"].as_bool().unwrap_or(false) });
    }
    let sc = &c["securityContext"];
    let psc = &facts.pod["spec"]["securityContext"];
    let exp = |v: Vec<String>| v.into_iter().map(|s| expand(&s, &env)).collect::<Vec<_>>();
    Ok(RunSpec {
        command: exp(strs(&c["command"])),
        args: exp(strs(&c["args"])),
        working_dir: c["workingDir"].as_str().map(str::to_string),
        // A request defaults to the limit, as the API server defaults it.
        cpu_request_milli: if c["resources"]["requests"]["cpu"].is_null() { milli(&c["resources"]["limits"]["cpu"]) } else { milli(&c["resources"]["requests"]["cpu"]) },
        cpu_limit_milli: milli(&c["resources"]["limits"]["cpu"]),
        memory_limit_bytes: milli(&c["resources"]["limits"]["memory"]) / 1000,
        run_as_user: sc["runAsUser"].as_u64().or(psc["runAsUser"].as_u64()).map(|u| u as u32),
        run_as_group: sc["runAsGroup"].as_u64().or(psc["runAsGroup"].as_u64()).map(|u| u as u32),
        privileged: sc["privileged"].as_bool().unwrap_or(false),
        read_only_root: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
        cap_add: strs(&sc["capabilities"]["add"]),
        cap_drop: strs(&sc["capabilities"]["drop"]),
        tty: c["tty"].as_bool().unwrap_or(false),
        mounts,
        env,
    })
}

/// How a probe checks a container.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeAction {
    Exec(Vec<String>),
    Http { port: u16, path: String, host: Option<String>, headers: Vec<(String, String)>, https: bool },
    Tcp { port: u16, host: Option<String> },
    Grpc { port: u16, service: String },
}

/// A probe with upstream's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    pub action: ProbeAction,
    pub initial_delay: std::time::Duration,
    pub period: std::time::Duration,
    pub timeout: std::time::Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// A container's startup, liveness and readiness probes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Probes {
    pub startup: Option<Probe>,
    pub liveness: Option<Probe>,
    pub readiness: Option<Probe>,
}

/// A port given as a number or as the name of one of the container's ports.
fn probe_port(v: &Value, c: &Value) -> Result<u16, String> {
    if let Some(n) = v.as_u64() {
        return u16::try_from(n).ok().filter(|p| *p > 0).ok_or_else(|| format!("invalid probe port {n}"));
    }
    let name = v.as_str().unwrap_or_default();
    if let Ok(n) = name.parse::<u16>() {
        return Ok(n);
    }
    c["ports"].as_array().into_iter().flatten().find(|p| p["name"] == name).and_then(|p| p["containerPort"].as_u64()).and_then(|n| u16::try_from(n).ok()).ok_or_else(|| format!("probe port {name:?} is not a port of the container"))
}

fn probe(p: &Value, c: &Value) -> Result<Option<Probe>, String> {
    if !p.is_object() {
        return Ok(None);
    }
    let secs = |k: &str, d: u64| std::time::Duration::from_secs(p[k].as_u64().unwrap_or(d));
    let action = if let Some(e) = p.get("exec") {
        ProbeAction::Exec(strs(&e["command"]))
    } else if let Some(h) = p.get("httpGet") {
        let https = h["scheme"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
        let headers = h["httpHeaders"].as_array().into_iter().flatten().map(|x| (x["name"].as_str().unwrap_or_default().to_string(), x["value"].as_str().unwrap_or_default().to_string())).collect();
        ProbeAction::Http { port: probe_port(&h["port"], c)?, path: h["path"].as_str().filter(|p| !p.is_empty()).unwrap_or("/").to_string(), host: h["host"].as_str().filter(|h| !h.is_empty()).map(str::to_string), headers, https }
    } else if let Some(t) = p.get("tcpSocket") {
        ProbeAction::Tcp { port: probe_port(&t["port"], c)?, host: t["host"].as_str().filter(|h| !h.is_empty()).map(str::to_string) }
    } else if let Some(g) = p.get("grpc") {
        ProbeAction::Grpc { port: probe_port(&g["port"], c)?, service: g["service"].as_str().unwrap_or_default().to_string() }
    } else {
        return Err("a probe needs one of exec, httpGet, tcpSocket or grpc".into());
    };
    Ok(Some(Probe {
        action,
        initial_delay: secs("initialDelaySeconds", 0),
        period: secs("periodSeconds", 10).max(std::time::Duration::from_secs(1)),
        timeout: secs("timeoutSeconds", 1).max(std::time::Duration::from_secs(1)),
        success_threshold: p["successThreshold"].as_u64().unwrap_or(1).max(1) as u32,
        failure_threshold: p["failureThreshold"].as_u64().unwrap_or(3).max(1) as u32,
    }))
}

/// A lifecycle hook's handler.
#[derive(Clone, Debug, PartialEq)]
pub enum Hook {
    Action(ProbeAction),
    Sleep(std::time::Duration),
}

/// A container's postStart and preStop hooks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hooks {
    pub post_start: Option<Hook>,
    pub pre_stop: Option<Hook>,
}

fn hook(h: &Value, c: &Value) -> Result<Option<Hook>, String> {
    if !h.is_object() {
        return Ok(None);
    }
    if let Some(s) = h.get("sleep") {
        return Ok(Some(Hook::Sleep(std::time::Duration::from_secs(s["seconds"].as_u64().unwrap_or(0)))));
    }
    // A hook's handler is a probe's action (exec, httpGet, tcpSocket).
    Ok(probe(h, c)?.map(|p| Hook::Action(p.action)))
}

/// The lifecycle hooks of a container spec.
pub fn hooks(c: &Value) -> Result<Hooks, String> {
    let l = &c["lifecycle"];
    Ok(Hooks { post_start: hook(&l["postStart"], c)?, pre_stop: hook(&l["preStop"], c)? })
}

/// The probes of a container spec.
pub fn probes(c: &Value) -> Result<Probes, String> {
    Ok(Probes { startup: probe(&c["startupProbe"], c)?, liveness: probe(&c["livenessProbe"], c)?, readiness: probe(&c["readinessProbe"], c)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn probes_parse_with_upstream_defaults_and_named_ports() {
        let c = json!({"ports": [{"name": "http", "containerPort": 8080}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 2},
            "readinessProbe": {"tcpSocket": {"port": 8080}, "failureThreshold": 1},
            "startupProbe": {"exec": {"command": ["cat", "/ready"]}, "initialDelaySeconds": 1}});
        let p = probes(&c).unwrap();
        let l = p.liveness.unwrap();
        assert_eq!(l.action, ProbeAction::Http { port: 8080, path: "/healthz".into(), host: None, headers: vec![], https: false });
        assert_eq!((l.period.as_secs(), l.timeout.as_secs(), l.failure_threshold, l.success_threshold), (2, 1, 3, 1));
        assert_eq!(p.readiness.unwrap().failure_threshold, 1);
        assert_eq!(p.startup.unwrap().action, ProbeAction::Exec(vec!["cat".into(), "/ready".into()]));
        assert!(probes(&json!({"livenessProbe": {"tcpSocket": {"port": "nope"}}})).unwrap_err().contains("not a port"));
        assert_eq!(probes(&json!({})).unwrap(), Probes::default());
    }

    #[test]
    fn environment_resolves_as_upstream() {
        let objects = Objects::default();
        objects.put("ConfigMap", "ns", "cfg", json!({"data": {"MODE": "fast", "LEVEL": "3"}}));
        objects.put("Secret", "ns", "sec", json!({"data": {"PASSWORD": "c2VjcmV0"}}));
        let pod = json!({"metadata": {"name": "web", "namespace": "ns", "labels": {"app": "w"}}, "spec": {}});
        let facts = PodFacts { pod: &pod, pod_ip: "10.0.1.5".into(), host_ip: "192.168.1.2".into(), node_name: "n1".into() };
        let c = json!({"name": "app", "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}], "env": [
            {"name": "A", "value": "x"}, {"name": "B", "value": "$(A)-$(CFG_MODE)-$$(A)-$(NOPE)"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "PASSWORD"}}}],
            "command": ["sh", "-c"], "args": ["echo $(A)"], "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}}});
        let r = run_spec(&c, &facts, &objects, &HashMap::new()).unwrap();
        let get = |k: &str| r.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CFG_MODE"), Some("fast"));
        assert_eq!(get("B"), Some("x-fast-$(A)-$(NOPE)"));
        assert_eq!((get("POD"), get("IP"), get("APP"), get("PW")), (Some("web"), Some("10.0.1.5"), Some("w"), Some("secret")));
        assert_eq!(r.args, vec!["echo x"]);
        assert_eq!((r.cpu_limit_milli, r.cpu_request_milli, r.memory_limit_bytes), (500, 500, 64 << 20), "requests default to limits");
        let missing = json!({"name": "app", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}]});
        assert_eq!(run_spec(&missing, &facts, &objects, &HashMap::new()).unwrap_err(), "configmap \"nope\" not found");
        let missing_key = json!({"name": "app", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}}]});
        assert_eq!(run_spec(&missing_key, &facts, &objects, &HashMap::new()).unwrap_err(), "couldn't find key k in ConfigMap ns/cfg");
    }

    #[test]
    fn configmap_volumes_are_written_atomically_and_follow_updates() {
        let d = tempfile::tempdir().unwrap();
        let objects = Objects::default();
        objects.put("ConfigMap", "ns", "cfg", json!({"data": {"a.conf": "one", "b.conf": "two"}}));
        let pod = json!({"metadata": {"name": "web", "namespace": "ns"}, "spec": {"volumes": [{"name": "conf", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}}, {"name": "info", "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}}]}});
        let facts = PodFacts { pod: &pod, pod_ip: String::new(), host_ip: String::new(), node_name: "n1".into() };
        let v = prepare_volumes(&facts, &objects, d.path()).unwrap();
        assert_eq!(std::fs::read_to_string(v["conf"].join("a.conf")).unwrap(), "one");
        assert_eq!(std::fs::read_to_string(v["info"].join("name")).unwrap(), "web");
        assert!(v["scratch"].is_dir());
        objects.put("ConfigMap", "ns", "cfg", json!({"data": {"a.conf": "uno"}}));
        prepare_volumes(&facts, &objects, d.path()).unwrap();
        assert_eq!(std::fs::read_to_string(v["conf"].join("a.conf")).unwrap(), "uno");
        assert!(!v["conf"].join("b.conf").exists(), "a key gone from the object goes from the volume");
        let n = std::fs::read_dir(&v["conf"]).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("..2")).count();
        assert_eq!(n, 1, "the old data directory is removed");
        let c = json!({"name": "app", "volumeMounts": [{"name": "conf", "mountPath": "/etc/app", "readOnly": true}, {"name": "nope", "mountPath": "/x"}]});
        assert!(run_spec(&c, &facts, &objects, &v).unwrap_err().contains("cannot find volume \"nope\""));
        let missing = json!({"metadata": {"name": "web", "namespace": "ns"}, "spec": {"volumes": [{"name": "s", "secret": {"secretName": "gone"}}]}});
        let facts = PodFacts { pod: &missing, pod_ip: String::new(), host_ip: String::new(), node_name: "n1".into() };
        assert_eq!(prepare_volumes(&facts, &objects, d.path()).unwrap_err(), "secret \"gone\" not found");
    }
}
