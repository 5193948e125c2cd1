//! What is specific to each kind: defaulting, validation, the fields a field selector may
//! name, and the state an object starts in. The generic REST path (`rest.rs`) calls these;
//! everything here is a pure function over JSON, so it is tested without a server.

use serde_json::{json, Map, Value};

use crate::meta;
use crate::status::FieldError;

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    v[key].as_object_mut().expect("made an object above")
}

fn default(m: &mut Map<String, Value>, key: &str, v: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_string(), v);
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

/// Applies upstream's defaults for the kind (what `SetDefaults_*` and the strategies'
/// `PrepareForCreate` fill in).
pub fn apply_defaults(kind: &str, obj: &mut Value) {
    match kind {
        "PriorityClass" => {
            if let Some(o) = obj.as_object_mut() {
                default(o, "preemptionPolicy", json!("PreemptLowerPriority"));
            }
        }
        "Pod" => {
            default_pod_spec(obj_mut(obj, "spec"));
        }
        "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" => {
            let spec = obj_mut(obj, "spec");
            if kind != "DaemonSet" {
                default(spec, "replicas", json!(1));
            }
            match kind {
                "Deployment" => {
                    default(spec, "strategy", json!({}));
                    let st = spec["strategy"].as_object_mut().expect("defaulted above");
                    default(st, "type", json!("RollingUpdate"));
                    if st["type"] == "RollingUpdate" {
                        default(st, "rollingUpdate", json!({}));
                        let ru = st["rollingUpdate"].as_object_mut().expect("defaulted above");
                        default(ru, "maxUnavailable", json!("25%"));
                        default(ru, "maxSurge", json!("25%"));
                    }
                    default(spec, "revisionHistoryLimit", json!(10));
                    default(spec, "progressDeadlineSeconds", json!(600));
                }
                "DaemonSet" => {
                    default(spec, "updateStrategy", json!({}));
                    let st = spec["updateStrategy"].as_object_mut().expect("defaulted above");
                    default(st, "type", json!("RollingUpdate"));
                    if st["type"] == "RollingUpdate" {
                        default(st, "rollingUpdate", json!({}));
                        let ru = st["rollingUpdate"].as_object_mut().expect("defaulted above");
                        default(ru, "maxUnavailable", json!(1));
                        default(ru, "maxSurge", json!(0));
                    }
                    default(spec, "revisionHistoryLimit", json!(10));
                }
                "StatefulSet" => {
                    default(spec, "podManagementPolicy", json!("OrderedReady"));
                    default(spec, "updateStrategy", json!({}));
                    let st = spec["updateStrategy"].as_object_mut().expect("defaulted above");
                    default(st, "type", json!("RollingUpdate"));
                    if st["type"] == "RollingUpdate" {
                        default(st, "rollingUpdate", json!({"partition": 0}));
                    }
                    default(spec, "revisionHistoryLimit", json!(10));
                    default(spec, "persistentVolumeClaimRetentionPolicy", json!({"whenDeleted": "Retain", "whenScaled": "Retain"}));
                }
                _ => {}
            }
            default(spec, "template", json!({}));
            let tmpl = &mut spec["template"];
            let tm = obj_mut(tmpl, "metadata");
            default(tm, "creationTimestamp", Value::Null);
            default_pod_spec(obj_mut(tmpl, "spec"));
        }
        "Service" => {
            let spec = obj_mut(obj, "spec");
            default(spec, "type", json!("ClusterIP"));
            default(spec, "sessionAffinity", json!("None"));
            if spec["type"] != "ExternalName" {
                default(spec, "internalTrafficPolicy", json!("Cluster"));
                default(spec, "ipFamilies", json!(["IPv4"]));
                default(spec, "ipFamilyPolicy", json!("SingleStack"));
            }
            if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
                default(spec, "externalTrafficPolicy", json!("Cluster"));
            }
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    default(p, "protocol", json!("TCP"));
                    if p.get("targetPort").is_none_or(Value::is_null) {
                        let port = p.get("port").cloned().unwrap_or(Value::Null);
                        p.insert("targetPort".into(), port);
                    }
                }
            }
        }
        "Namespace" => {
            let name = str_at(obj, &["metadata", "name"]).unwrap_or("").to_string();
            let md = obj_mut(obj, "metadata");
            default(md, "labels", json!({}));
            if let Some(l) = md.get_mut("labels").and_then(Value::as_object_mut) {
                l.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
            let spec = obj_mut(obj, "spec");
            default(spec, "finalizers", json!(["kubernetes"]));
            let status = obj_mut(obj, "status");
            default(status, "phase", json!("Active"));
        }
        "Secret" => {
            let m = obj.as_object_mut().expect("objects are JSON objects");
            default(m, "type", json!("Opaque"));
            if let Some(Value::Object(sd)) = m.remove("stringData") {
                use base64::Engine;
                let data = m.entry("data").or_insert(json!({}));
                if !data.is_object() {
                    *data = json!({});
                }
                for (k, v) in sd {
                    let s = v.as_str().unwrap_or("").to_string();
                    data[k.as_str()] = json!(base64::engine::general_purpose::STANDARD.encode(s));
                }
            }
        }
        "PersistentVolumeClaim" => {
            let spec = obj_mut(obj, "spec");
            default(spec, "volumeMode", json!("Filesystem"));
            default(obj_mut(obj, "status"), "phase", json!("Pending"));
        }
        "PersistentVolume" => {
            let spec = obj_mut(obj, "spec");
            default(spec, "persistentVolumeReclaimPolicy", json!("Retain"));
            default(spec, "volumeMode", json!("Filesystem"));
            default(obj_mut(obj, "status"), "phase", json!("Pending"));
        }
        "StorageClass" => {
            let m = obj.as_object_mut().expect("objects are JSON objects");
            default(m, "reclaimPolicy", json!("Delete"));
            default(m, "volumeBindingMode", json!("Immediate"));
        }
        "HorizontalPodAutoscaler" => {
            let spec = obj_mut(obj, "spec");
            default(spec, "minReplicas", json!(1));
        }
        "EndpointSlice" => {
            if let Some(ports) = obj.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    default(p, "protocol", json!("TCP"));
                }
            }
        }
        "NetworkPolicy" => {
            let spec = obj_mut(obj, "spec");
            for dir in ["ingress", "egress"] {
                for rule in spec.get_mut(dir).and_then(Value::as_array_mut).into_iter().flatten() {
                    for p in rule.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten().filter_map(Value::as_object_mut) {
                        default(p, "protocol", json!("TCP"));
                    }
                }
            }
            // SetDefaults_NetworkPolicy: Ingress always, Egress when there are egress rules
            if spec.get("policyTypes").and_then(Value::as_array).is_none_or(|t| t.is_empty()) {
                let egress = spec.get("egress").and_then(Value::as_array).is_some_and(|e| !e.is_empty());
                spec.insert("policyTypes".into(), if egress { json!(["Ingress", "Egress"]) } else { json!(["Ingress"]) });
            }
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            if let Some(subs) = obj.get_mut("subjects").and_then(Value::as_array_mut) {
                for s in subs.iter_mut().filter_map(Value::as_object_mut) {
                    if matches!(s.get("kind").and_then(Value::as_str), Some("User" | "Group")) {
                        default(s, "apiGroup", json!("rbac.authorization.k8s.io"));
                    }
                }
            }
        }
        _ => {}
    }
}

fn default_container(c: &mut Map<String, Value>) {
    let image = c.get("image").and_then(Value::as_str).unwrap_or("");
    let tag = image.rsplit('/').next().unwrap_or("");
    let pull = if image.contains('@') {
        "IfNotPresent"
    } else if !tag.contains(':') || tag.ends_with(":latest") {
        "Always"
    } else {
        "IfNotPresent"
    };
    default(c, "imagePullPolicy", json!(pull));
    default(c, "terminationMessagePath", json!("/dev/termination-log"));
    default(c, "terminationMessagePolicy", json!("File"));
    default(c, "resources", json!({}));
    if let Some(res) = c.get_mut("resources").and_then(Value::as_object_mut) {
        // Requests default to limits (SetDefaults_Container).
        if let Some(limits) = res.get("limits").and_then(Value::as_object).cloned() {
            let req = res.entry("requests").or_insert(json!({}));
            if let Some(r) = req.as_object_mut() {
                for (k, v) in limits {
                    r.entry(k).or_insert(v);
                }
            }
        }
    }
    if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            default(p, "protocol", json!("TCP"));
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe).and_then(Value::as_object_mut) {
            default(p, "timeoutSeconds", json!(1));
            default(p, "periodSeconds", json!(10));
            default(p, "successThreshold", json!(1));
            default(p, "failureThreshold", json!(3));
            if let Some(h) = p.get_mut("httpGet").and_then(Value::as_object_mut) {
                default(h, "scheme", json!("HTTP"));
                default(h, "path", json!("/"));
            }
        }
    }
}

/// The DefaultTolerationSeconds admission step: a new pod tolerates its node being
/// not-ready or unreachable for 300 s (then the node lifecycle controller evicts it),
/// unless it already has a toleration for that taint.
pub fn default_toleration_seconds(pod: &mut Value) {
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else { return };
    let mut tols: Vec<Value> = spec.get("tolerations").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut added = false;
    for key in ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"] {
        let covered = tols.iter().any(|t| {
            let key_ok = t["key"].as_str() == Some(key) || (t["key"].as_str().unwrap_or("").is_empty() && t["operator"] == "Exists");
            let effect_ok = t["effect"].as_str().is_none_or(|e| e.is_empty() || e == "NoExecute");
            key_ok && effect_ok
        });
        if !covered {
            tols.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
            added = true;
        }
    }
    if added {
        spec.insert("tolerations".into(), Value::Array(tols));
    }
}

fn default_pod_spec(spec: &mut Map<String, Value>) {
    default(spec, "restartPolicy", json!("Always"));
    default(spec, "dnsPolicy", json!("ClusterFirst"));
    default(spec, "terminationGracePeriodSeconds", json!(30));
    default(spec, "securityContext", json!({}));
    default(spec, "schedulerName", json!("default-scheduler"));
    default(spec, "enableServiceLinks", json!(true));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                default_container(c);
            }
        }
    }
    if let Some(vols) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
        for v in vols.iter_mut().filter_map(Value::as_object_mut) {
            for src in ["configMap", "secret"] {
                if let Some(s) = v.get_mut(src).and_then(Value::as_object_mut) {
                    default(s, "defaultMode", json!(420));
                }
            }
        }
    }
}

/// The QoS class of a pod spec (upstream's `GetPodQOS`, for cpu and memory).
pub fn qos_class(spec: &Value) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for c in spec.get("containers").and_then(Value::as_array).into_iter().flatten().chain(spec.get("initContainers").and_then(Value::as_array).into_iter().flatten()) {
        let req = c.pointer("/resources/requests");
        let lim = c.pointer("/resources/limits");
        for r in ["cpu", "memory"] {
            let rq = req.and_then(|x| x.get(r));
            let lm = lim.and_then(|x| x.get(r));
            if rq.is_some() || lm.is_some() {
                any = true;
            }
            match (rq, lm) {
                (Some(a), Some(b)) if a == b => {}
                _ => guaranteed = false,
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// The state a new object starts in: what the create strategy resets (status of pods and
/// workloads is owned by the system, not the creator).
pub fn prepare_for_create(kind: &str, obj: &mut Value) {
    match kind {
        "Pod" => {
            let qos = qos_class(&obj["spec"]);
            obj["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" | "HorizontalPodAutoscaler" | "PodDisruptionBudget" => {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        "Service" => {
            obj["status"] = json!({"loadBalancer": {}});
        }
        _ => {}
    }
}

const PULL_POLICIES: &[&str] = &["Always", "IfNotPresent", "Never"];
const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];

fn check_port(v: Option<&Value>, path: String, errs: &mut Vec<FieldError>, required: bool) {
    match v {
        None | Some(Value::Null) if required => errs.push(FieldError::required(path, "")),
        None | Some(Value::Null) => {}
        Some(v) => {
            let ok = v.as_i64().is_some_and(|p| (1..=65535).contains(&p));
            if !ok {
                errs.push(FieldError::invalid(path, v.clone(), "must be between 1 and 65535, inclusive"));
            }
        }
    }
}

fn validate_containers(list: &[Value], path: &str, errs: &mut Vec<FieldError>, names: &mut Vec<String>) {
    for (i, c) in list.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let name = c.get("name").and_then(Value::as_str).unwrap_or("");
        if name.is_empty() {
            errs.push(FieldError::required(format!("{p}.name"), ""));
        } else {
            for m in meta::dns1123_label(name) {
                errs.push(FieldError::invalid(format!("{p}.name"), name, m));
            }
            if names.iter().any(|n| n == name) {
                errs.push(FieldError::duplicate(format!("{p}.name"), name));
            }
            names.push(name.to_string());
        }
        if c.get("image").and_then(Value::as_str).unwrap_or("").trim().is_empty() {
            errs.push(FieldError::required(format!("{p}.image"), ""));
        }
        if let Some(pp) = c.get("imagePullPolicy").and_then(Value::as_str) {
            if !PULL_POLICIES.contains(&pp) {
                errs.push(FieldError::not_supported(format!("{p}.imagePullPolicy"), pp, PULL_POLICIES));
            }
        }
        for (j, port) in c.get("ports").and_then(Value::as_array).into_iter().flatten().enumerate() {
            check_port(port.get("containerPort"), format!("{p}.ports[{j}].containerPort"), errs, true);
            if let Some(proto) = port.get("protocol").and_then(Value::as_str) {
                if !PROTOCOLS.contains(&proto) {
                    errs.push(FieldError::not_supported(format!("{p}.ports[{j}].protocol"), proto, PROTOCOLS));
                }
            }
        }
        for section in ["requests", "limits"] {
            if let Some(res) = c.pointer(&format!("/resources/{section}")).and_then(Value::as_object) {
                for (k, v) in res {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => String::new(),
                    };
                    if crate::quantity::parse(&s).is_none() {
                        errs.push(FieldError::invalid(format!("{p}.resources.{section}[{k}]"), v.clone(), "must be a valid quantity"));
                    }
                }
            }
        }
    }
}

fn validate_pod_spec(spec: &Value, path: &str, errs: &mut Vec<FieldError>, template: bool) {
    let containers = spec.get("containers").and_then(Value::as_array);
    let mut names = Vec::new();
    match containers {
        Some(cs) if !cs.is_empty() => validate_containers(cs, &format!("{path}.containers"), errs, &mut names),
        _ => errs.push(FieldError::required(format!("{path}.containers"), "")),
    }
    if let Some(ic) = spec.get("initContainers").and_then(Value::as_array) {
        validate_containers(ic, &format!("{path}.initContainers"), errs, &mut names);
    }
    let rp = spec.get("restartPolicy").and_then(Value::as_str).unwrap_or("Always");
    let allowed: &[&str] = if template { &["Always"] } else { &["Always", "OnFailure", "Never"] };
    if !allowed.contains(&rp) {
        errs.push(FieldError::not_supported(format!("{path}.restartPolicy"), rp, allowed));
    }
    if let Some(dp) = spec.get("dnsPolicy").and_then(Value::as_str) {
        const DNS: &[&str] = &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"];
        if !DNS.contains(&dp) {
            errs.push(FieldError::not_supported(format!("{path}.dnsPolicy"), dp, DNS));
        }
    }
    if let Some(g) = spec.get("terminationGracePeriodSeconds") {
        if g.as_i64().is_none_or(|g| g < 0) {
            errs.push(FieldError::invalid(format!("{path}.terminationGracePeriodSeconds"), g.clone(), "must be greater than or equal to 0"));
        }
    }
    let mut vol_names: Vec<&str> = Vec::new();
    for (i, v) in spec.get("volumes").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let n = v.get("name").and_then(Value::as_str).unwrap_or("");
        if n.is_empty() {
            errs.push(FieldError::required(format!("{path}.volumes[{i}].name"), ""));
        } else if vol_names.contains(&n) {
            errs.push(FieldError::duplicate(format!("{path}.volumes[{i}].name"), n));
        } else {
            vol_names.push(n);
        }
    }
}

/// Validates a new or updated object of `kind` (metadata included), as upstream's
/// `Validate*` functions. Returns every problem found, not just the first.
pub fn validate(kind: &str, namespaced: bool, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    match obj.get("metadata").and_then(Value::as_object) {
        Some(m) => meta::validate_object_meta(m, kind, namespaced, &mut errs),
        None => errs.push(FieldError::required("metadata", "")),
    }
    match kind {
        "Pod" => validate_pod_spec(obj.get("spec").unwrap_or(&Value::Null), "spec", &mut errs, false),
        "PriorityClass" => {
            let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
            let system = crate::priority::SYSTEM.iter().any(|(n, _)| *n == name);
            match obj.get("value") {
                Some(v) if v.as_i64().is_some_and(|x| i32::try_from(x).is_ok()) => {
                    let x = v.as_i64().unwrap_or(0);
                    if !system && x > crate::priority::HIGHEST_USER_DEFINABLE {
                        errs.push(FieldError::forbidden("value", format!("maximum allowed value of a user defined priority is {}", crate::priority::HIGHEST_USER_DEFINABLE)));
                    }
                }
                Some(v) => errs.push(FieldError::invalid("value", v.clone(), "must be a 32-bit integer")),
                None => errs.push(FieldError::required("value", "")),
            }
            if !system && name.starts_with("system-") {
                errs.push(FieldError::forbidden("metadata.name", "priority class names with 'system-' prefix are reserved"));
            }
            if let Some(p) = obj.get("preemptionPolicy").filter(|p| !p.is_null()) {
                if !matches!(p.as_str(), Some("PreemptLowerPriority" | "Never")) {
                    errs.push(FieldError::not_supported("preemptionPolicy", p.clone(), &["Never", "PreemptLowerPriority"]));
                }
            }
        }
        "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" => {
            let spec = obj.get("spec").unwrap_or(&Value::Null);
            if let Some(r) = spec.get("replicas") {
                if r.as_i64().is_none_or(|r| r < 0) {
                    errs.push(FieldError::invalid("spec.replicas", r.clone(), "must be greater than or equal to 0"));
                }
            }
            match spec.get("selector") {
                None | Some(Value::Null) => errs.push(FieldError::required("spec.selector", "")),
                Some(sel) => {
                    let empty = sel.get("matchLabels").and_then(Value::as_object).is_none_or(|m| m.is_empty())
                        && sel.get("matchExpressions").and_then(Value::as_array).is_none_or(|m| m.is_empty());
                    if empty {
                        errs.push(FieldError::invalid("spec.selector", sel.clone(), "empty selector is invalid for deployment"));
                    } else {
                        match crate::selector::LabelSelector::from_object(sel) {
                            Ok(s) => {
                                let labels = spec.pointer("/template/metadata/labels").and_then(Value::as_object);
                                if !s.matches(labels) {
                                    errs.push(FieldError::invalid(
                                        "spec.template.metadata.labels",
                                        labels.map(|l| Value::Object(l.clone())).unwrap_or(json!({})),
                                        "`selector` does not match template `labels`",
                                    ));
                                }
                            }
                            Err(e) => errs.push(FieldError::invalid("spec.selector", sel.clone(), e)),
                        }
                    }
                }
            }
            if kind == "Deployment" {
                let st = spec.pointer("/strategy/type").and_then(Value::as_str).unwrap_or("RollingUpdate");
                if !["Recreate", "RollingUpdate"].contains(&st) {
                    errs.push(FieldError::not_supported("spec.strategy.type", st, &["Recreate", "RollingUpdate"]));
                }
            }
            validate_pod_spec(spec.pointer("/template/spec").unwrap_or(&Value::Null), "spec.template.spec", &mut errs, true);
        }
        "Service" => {
            let spec = obj.get("spec").unwrap_or(&Value::Null);
            let ty = spec.get("type").and_then(Value::as_str).unwrap_or("ClusterIP");
            const TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
            if !TYPES.contains(&ty) {
                errs.push(FieldError::not_supported("spec.type", ty, TYPES));
            }
            let ports = spec.get("ports").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
            let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
            if ports.is_empty() && ty != "ExternalName" && !headless {
                errs.push(FieldError::required("spec.ports", ""));
            }
            if ty == "ExternalName" && spec.get("externalName").and_then(Value::as_str).unwrap_or("").is_empty() {
                errs.push(FieldError::required("spec.externalName", ""));
            }
            let mut names: Vec<&str> = Vec::new();
            for (i, p) in ports.iter().enumerate() {
                check_port(p.get("port"), format!("spec.ports[{i}].port"), &mut errs, true);
                let name = p.get("name").and_then(Value::as_str).unwrap_or("");
                if ports.len() > 1 && name.is_empty() {
                    errs.push(FieldError::required(format!("spec.ports[{i}].name"), ""));
                }
                if !name.is_empty() {
                    if names.contains(&name) {
                        errs.push(FieldError::duplicate(format!("spec.ports[{i}].name"), name));
                    }
                    names.push(name);
                }
                if let Some(proto) = p.get("protocol").and_then(Value::as_str) {
                    if !PROTOCOLS.contains(&proto) {
                        errs.push(FieldError::not_supported(format!("spec.ports[{i}].protocol"), proto, PROTOCOLS));
                    }
                }
                if let Some(np) = p.get("nodePort").filter(|v| !v.is_null() && v.as_i64() != Some(0)) {
                    check_port(Some(np), format!("spec.ports[{i}].nodePort"), &mut errs, false);
                }
            }
            const AFF: &[&str] = &["ClientIP", "None"];
            if let Some(a) = spec.get("sessionAffinity").and_then(Value::as_str) {
                if !AFF.contains(&a) {
                    errs.push(FieldError::not_supported("spec.sessionAffinity", a, AFF));
                }
            }
        }
        "NetworkPolicy" => validate_network_policy(obj.get("spec").unwrap_or(&Value::Null), &mut errs),
        "ConfigMap" | "Secret" => {
            let mut total = 0usize;
            for section in ["data", "binaryData"] {
                for (k, v) in obj.get(section).and_then(Value::as_object).into_iter().flatten() {
                    let ok = !k.is_empty() && k.len() <= 253 && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) && k != "." && k != "..";
                    if !ok {
                        errs.push(FieldError::invalid(format!("{section}[{k}]"), k.as_str(), "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"));
                    }
                    match v.as_str() {
                        Some(s) => {
                            total += s.len();
                            if (kind == "Secret" || section == "binaryData") && !is_base64(s) {
                                errs.push(FieldError::invalid(format!("{section}[{k}]"), "<value omitted>", "illegal base64 data"));
                            }
                        }
                        None => errs.push(FieldError::invalid(format!("{section}[{k}]"), v.clone(), "must be a string")),
                    }
                }
            }
            if total > 1 << 20 {
                errs.push(FieldError::too_long(if kind == "Secret" { "data" } else { "[]" }, 1 << 20));
            }
        }
        _ => {}
    }
    errs
}

fn check_selector(sel: Option<&Value>, path: &str, errs: &mut Vec<FieldError>) {
    if let Some(sel) = sel.filter(|s| !s.is_null()) {
        if let Err(e) = crate::selector::LabelSelector::from_object(sel) {
            errs.push(FieldError::invalid(path, sel.clone(), e));
        }
    }
}

/// A port name as `validation.IsValidPortName`: 1-15 lowercase letters, digits and '-',
/// at least one letter, no leading, trailing or double '-'.
fn port_name_error(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 15 {
        Some("must be no more than 15 characters")
    } else if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        Some("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    } else if name.contains("--") {
        Some("must not contain consecutive hyphens")
    } else if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        Some("must contain at least one letter (a-z)")
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("must not begin or end with a hyphen")
    } else {
        None
    }
}

/// An IPv4 or IPv6 CIDR: (address, prefix length, bits of the family).
pub fn parse_cidr(s: &str) -> Option<(std::net::IpAddr, u8, u8)> {
    let (a, l) = s.split_once('/')?;
    let addr: std::net::IpAddr = a.parse().ok()?;
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = l.parse().ok().filter(|l| *l <= bits)?;
    Some((addr, len, bits))
}

fn cidr_contains(outer: (std::net::IpAddr, u8), inner: (std::net::IpAddr, u8)) -> bool {
    let bits = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(v) => (u128::from(u32::from(v)) << 96, 32u32),
        std::net::IpAddr::V6(v) => (u128::from(v), 128u32),
    };
    let ((o, ob), (i, ib)) = (bits(outer.0), bits(inner.0));
    if ob != ib || inner.1 < outer.1 {
        return false;
    }
    // both families sit in the top bits, so a prefix is the top `outer.1` bits
    let mask = if outer.1 == 0 { 0 } else { u128::MAX << (128 - u32::from(outer.1)) };
    (o & mask) == (i & mask)
}

/// `ValidateNetworkPolicySpec` of upstream, with its messages.
fn validate_network_policy(spec: &Value, errs: &mut Vec<FieldError>) {
    match spec.get("podSelector") {
        None | Some(Value::Null) => errs.push(FieldError::required("spec.podSelector", "")),
        sel => check_selector(sel, "spec.podSelector", errs),
    }
    for (dir, peers_key) in [("ingress", "from"), ("egress", "to")] {
        for (i, rule) in spec.get(dir).and_then(Value::as_array).into_iter().flatten().enumerate() {
            for (j, p) in rule.get("ports").and_then(Value::as_array).into_iter().flatten().enumerate() {
                let path = format!("spec.{dir}[{i}].ports[{j}]");
                if let Some(proto) = p.get("protocol").and_then(Value::as_str) {
                    if !PROTOCOLS.contains(&proto) {
                        errs.push(FieldError::not_supported(format!("{path}.protocol"), proto, &["TCP", "UDP", "SCTP"]));
                    }
                }
                let end = p.get("endPort").filter(|v| !v.is_null());
                match p.get("port").filter(|v| !v.is_null()) {
                    Some(Value::String(name)) => {
                        if let Some(e) = end {
                            errs.push(FieldError::invalid(format!("{path}.endPort"), e.clone(), "may not be specified when `port` is non-numeric"));
                        }
                        if let Some(msg) = port_name_error(name) {
                            errs.push(FieldError::invalid(format!("{path}.port"), json!(name), msg));
                        }
                    }
                    Some(port) => {
                        check_port(Some(port), format!("{path}.port"), errs, true);
                        if let Some(e) = end {
                            if e.as_i64() < port.as_i64() {
                                errs.push(FieldError::invalid(format!("{path}.endPort"), port.clone(), "must be greater than or equal to `port`"));
                            }
                            check_port(Some(e), format!("{path}.endPort"), errs, true);
                        }
                    }
                    None => {
                        if let Some(e) = end {
                            errs.push(FieldError::invalid(format!("{path}.endPort"), e.clone(), "may not be specified when `port` is not specified"));
                        }
                    }
                }
            }
            for (j, peer) in rule.get(peers_key).and_then(Value::as_array).into_iter().flatten().enumerate() {
                let path = format!("spec.{dir}[{i}].{peers_key}[{j}]");
                let has = |k: &str| peer.get(k).is_some_and(|v| !v.is_null());
                let n = ["podSelector", "namespaceSelector", "ipBlock"].iter().filter(|k| has(k)).count();
                if n == 0 {
                    errs.push(FieldError::required(path.clone(), "must specify a peer"));
                } else if n > 1 && has("ipBlock") {
                    errs.push(FieldError::forbidden(path.clone(), "may not specify both ipBlock and another peer"));
                }
                check_selector(peer.get("podSelector"), &format!("{path}.podSelector"), errs);
                check_selector(peer.get("namespaceSelector"), &format!("{path}.namespaceSelector"), errs);
                if let Some(b) = peer.get("ipBlock").filter(|v| !v.is_null()) {
                    let cidr = b.get("cidr").and_then(Value::as_str).unwrap_or("");
                    if cidr.is_empty() {
                        errs.push(FieldError::required(format!("{path}.ipBlock.cidr"), ""));
                        continue;
                    }
                    let Some((addr, len, _)) = parse_cidr(cidr) else {
                        errs.push(FieldError::invalid(format!("{path}.ipBlock.cidr"), json!(cidr), "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"));
                        continue;
                    };
                    for (k, ex) in b.get("except").and_then(Value::as_array).into_iter().flatten().enumerate() {
                        let s = ex.as_str().unwrap_or("");
                        let epath = format!("{path}.ipBlock.except[{k}]");
                        match parse_cidr(s) {
                            None => {
                                errs.push(FieldError::invalid(epath, json!(s), "must be a valid CIDR"));
                                break;
                            }
                            Some((ea, el, _)) => {
                                if !(cidr_contains((addr, len), (ea, el)) && el > len) {
                                    errs.push(FieldError::invalid(epath, json!(s), "must be a strict subset of `cidr`"));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    if let Some(types) = spec.get("policyTypes").and_then(Value::as_array) {
        if types.len() > 2 {
            errs.push(FieldError::invalid("spec.policyTypes", Value::Array(types.clone()), "may not specify more than two policyTypes"));
            return;
        }
        for (i, t) in types.iter().enumerate() {
            if !matches!(t.as_str(), Some("Ingress" | "Egress")) {
                errs.push(FieldError::not_supported(format!("spec.policyTypes[{i}]"), t.clone(), &["Ingress", "Egress"]));
            }
        }
    }
}

fn is_base64(s: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).is_ok()
}

/// Every field-selector field `kind` supports (besides metadata.name and
/// metadata.namespace), for precomputing them where objects are cached.
pub fn field_names(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => &["spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName", "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"],
        "Node" => &["spec.unschedulable"],
        "Namespace" => &["status.phase"],
        "Secret" => &["type"],
        "ReplicaSet" => &["status.replicas"],
        "Service" => &["spec.clusterIP", "spec.type"],
        "Event" => &["involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"],
        _ => &[],
    }
}

/// The value of a field-selector field for an object of `kind`: `None` when the kind does
/// not support the field (a 400), `Some("")` when it is supported but unset.
pub fn field_value(kind: &str, obj: &Value, field: &str) -> Option<String> {
    let s = |path: &str| obj.pointer(path).map(|v| match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }).unwrap_or_default();
    match field {
        "metadata.name" => return Some(s("/metadata/name")),
        "metadata.namespace" => return Some(s("/metadata/namespace")),
        _ => {}
    }
    let v = match (kind, field) {
        ("Pod", "spec.nodeName") => s("/spec/nodeName"),
        ("Pod", "spec.restartPolicy") => s("/spec/restartPolicy"),
        ("Pod", "spec.schedulerName") => s("/spec/schedulerName"),
        ("Pod", "spec.serviceAccountName") => s("/spec/serviceAccountName"),
        ("Pod", "spec.hostNetwork") => {
            if obj.pointer("/spec/hostNetwork").and_then(Value::as_bool).unwrap_or(false) { "true".into() } else { "false".into() }
        }
        ("Pod", "status.phase") => s("/status/phase"),
        ("Pod", "status.podIP") => s("/status/podIP"),
        ("Pod", "status.nominatedNodeName") => s("/status/nominatedNodeName"),
        ("Node", "spec.unschedulable") => {
            if obj.pointer("/spec/unschedulable").and_then(Value::as_bool).unwrap_or(false) { "true".into() } else { "false".into() }
        }
        ("Namespace", "status.phase") => s("/status/phase"),
        ("Secret", "type") => s("/type"),
        ("ReplicaSet", "status.replicas") => s("/status/replicas"),
        ("Service", "spec.clusterIP") => s("/spec/clusterIP"),
        ("Service", "spec.type") => s("/spec/type"),
        ("Event", f) => match f {
            "involvedObject.kind" | "involvedObject.namespace" | "involvedObject.name" | "involvedObject.uid" | "involvedObject.apiVersion" | "involvedObject.resourceVersion" | "involvedObject.fieldPath" => {
                s(&format!("/{}", f.replace('.', "/")))
            }
            "reason" => s("/reason"),
            "reportingComponent" => s("/reportingComponent"),
            "source" => s("/source/component"),
            "type" => s("/type"),
            _ => return None,
        },
        _ => return None,
    };
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_defaults_and_status() {
        let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox", "ports": [{"containerPort": 80}]}, {"name": "d", "image": "busybox:1.36"}]}});
        apply_defaults("Pod", &mut p);
        prepare_for_create("Pod", &mut p);
        assert_eq!(p["spec"]["restartPolicy"], "Always");
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(p["spec"]["containers"][1]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(p["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(p["status"]["phase"], "Pending");
        assert_eq!(p["status"]["qosClass"], "BestEffort");
    }

    #[test]
    fn deployment_defaults_match_upstream() {
        let mut d = json!({"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}});
        apply_defaults("Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"], json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}));
        assert_eq!(d["spec"]["revisionHistoryLimit"], 10);
        assert_eq!(d["spec"]["progressDeadlineSeconds"], 600);
        assert_eq!(d["spec"]["template"]["spec"]["dnsPolicy"], "ClusterFirst");
    }

    #[test]
    fn validation_table() {
        let cases: &[(&str, Value, &[&str])] = &[
            ("Pod", json!({"metadata": {"name": "ok", "namespace": "d"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}), &[]),
            ("Pod", json!({"metadata": {"name": "Invalid_Name", "namespace": "d"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}), &["metadata.name"]),
            ("Pod", json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {}}), &["spec.containers"]),
            ("Pod", json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": [{"name": "c"}, {"name": "c", "image": "i"}]}}), &["spec.containers[0].image", "spec.containers[1].name"]),
            ("Pod", json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 70000}]}]}}), &["spec.containers[0].ports[0].containerPort"]),
            ("Deployment", json!({"metadata": {"name": "d", "namespace": "d"}, "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "c"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}), &["spec.template.metadata.labels"]),
            ("Service", json!({"metadata": {"name": "1svc", "namespace": "d"}, "spec": {"ports": [{"port": 80}]}}), &["metadata.name"]),
            ("Service", json!({"metadata": {"name": "s", "namespace": "d"}, "spec": {"ports": [{"port": 80}, {"port": 81}]}}), &["spec.ports[0].name", "spec.ports[1].name"]),
            ("ConfigMap", json!({"metadata": {"name": "c", "namespace": "d"}, "data": {"bad key": "v"}}), &["data[bad key]"]),
            ("Namespace", json!({"metadata": {"name": "a.b"}}), &["metadata.name"]),
            ("ConfigMap", json!({"metadata": {"name": "c"}}), &["metadata.namespace"]),
            ("NetworkPolicy", json!({"metadata": {"name": "n", "namespace": "d"}, "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}, {"podSelector": {"matchLabels": {"a": "b"}}, "namespaceSelector": {}}], "ports": [{"port": 80, "endPort": 90}, {"port": "http"}]}]}}), &[]),
            ("NetworkPolicy", json!({"metadata": {"name": "n", "namespace": "d"}, "spec": {}}), &["spec.podSelector"]),
            ("NetworkPolicy", json!({"metadata": {"name": "n", "namespace": "d"}, "spec": {"podSelector": {}, "ingress": [{"from": [{}, {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}}), &["spec.ingress[0].from[0]", "spec.ingress[0].from[1]"]),
            ("NetworkPolicy", json!({"metadata": {"name": "n", "namespace": "d"}, "spec": {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16", "10.2.0.0/24", "x"]}}]}]}}), &["spec.egress[0].to[0].ipBlock.except[0]", "spec.egress[0].to[0].ipBlock.except[1]", "spec.egress[0].to[0].ipBlock.except[2]"]),
            ("NetworkPolicy", json!({"metadata": {"name": "n", "namespace": "d"}, "spec": {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.300/16"}}], "ports": [{"port": 90, "endPort": 80}, {"port": "Bad_Name"}, {"port": "web", "endPort": 9}, {"protocol": "ICMP"}, {"endPort": 3}]}]}}), &["spec.egress[0].ports[0].endPort", "spec.egress[0].ports[1].port", "spec.egress[0].ports[2].endPort", "spec.egress[0].ports[3].protocol", "spec.egress[0].ports[4].endPort", "spec.egress[0].to[0].ipBlock.cidr"]),
            ("NetworkPolicy", json!({"metadata": {"name": "n", "namespace": "d"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Sideways"]}}), &["spec.policyTypes[1]"]),
        ];
        for (kind, obj, want) in cases {
            let namespaced = *kind != "Namespace";
            let got: Vec<String> = validate(kind, namespaced, obj).into_iter().map(|e| e.field).collect();
            assert_eq!(got, want.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{kind} {obj}");
        }
    }

    #[test]
    fn network_policy_defaults_match_upstream() {
        let mut n = json!({"metadata": {"name": "n"}, "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}});
        apply_defaults("NetworkPolicy", &mut n);
        assert_eq!(n["spec"]["policyTypes"], json!(["Ingress"]));
        assert_eq!(n["spec"]["ingress"][0]["ports"][0]["protocol"], "TCP");
        let mut n = json!({"metadata": {"name": "n"}, "spec": {"podSelector": {}, "egress": [{}]}});
        apply_defaults("NetworkPolicy", &mut n);
        assert_eq!(n["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        let mut n = json!({"metadata": {"name": "n"}, "spec": {"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]}});
        apply_defaults("NetworkPolicy", &mut n);
        assert_eq!(n["spec"]["policyTypes"], json!(["Egress"]));
    }

    #[test]
    fn field_selector_values() {
        let p = json!({"metadata": {"name": "p", "namespace": "n"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        assert_eq!(field_value("Pod", &p, "spec.nodeName").as_deref(), Some("n1"));
        assert_eq!(field_value("Pod", &p, "status.phase").as_deref(), Some("Running"));
        assert_eq!(field_value("Pod", &p, "spec.hostNetwork").as_deref(), Some("false"));
        assert_eq!(field_value("Pod", &p, "spec.bogus"), None);
        assert_eq!(field_value("ConfigMap", &p, "metadata.name").as_deref(), Some("p"));
    }

    #[test]
    fn field_names_are_supported() {
        for kind in ["Pod", "Node", "Namespace", "Secret", "ReplicaSet", "Service", "Event"] {
            for f in field_names(kind) {
                assert!(field_value(kind, &json!({}), f).is_some(), "{kind} {f}");
            }
        }
    }

    #[test]
    fn secret_string_data_folds_into_data() {
        let mut s = json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}});
        apply_defaults("Secret", &mut s);
        assert_eq!(s["data"]["k"], "dg==");
        assert_eq!(s["type"], "Opaque");
        assert!(s.get("stringData").is_none());
    }
}
