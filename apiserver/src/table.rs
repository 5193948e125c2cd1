//! Server-side printing (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`): the
//! same columns kubectl shows against Kubernetes, computed here for every kind kubectl
//! `get` prints. Kinds without their own columns get upstream's default (Name, Created At).

use serde_json::{json, Value};

use crate::meta;

/// Upstream's `duration.HumanDuration` (the AGE column).
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 { format!("{minutes}m") } else { format!("{minutes}m{s}s") };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 { format!("{hours}h") } else { format!("{hours}h{m}m") };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 { format!("{}d", hours / 24) } else { format!("{}d{h}h", hours / 24) };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 { format!("{}y", hours / 24 / 365) } else { format!("{}y{dy}d", hours / 24 / 365) };
    }
    format!("{}y", hours / 24 / 365)
}

fn age_of(ts: Option<&str>) -> String {
    match ts.and_then(meta::parse_time) {
        Some(t) => human_duration(meta::now_secs() - t),
        None => "<unknown>".into(),
    }
}

fn age(o: &Value) -> Value {
    json!(age_of(o.pointer("/metadata/creationTimestamp").and_then(Value::as_str)))
}

fn s<'a>(o: &'a Value, p: &str) -> &'a str {
    o.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn i(o: &Value, p: &str) -> i64 {
    o.pointer(p).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(x: &str) -> String {
    if x.is_empty() { "<none>".into() } else { x.to_string() }
}

struct Col {
    name: &'static str,
    ty: &'static str,
    priority: u8,
    desc: &'static str,
}

const fn c(name: &'static str, ty: &'static str, priority: u8, desc: &'static str) -> Col {
    Col { name, ty, priority, desc }
}

const NAME: Col = c("Name", "string", 0, "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names");
const AGE: Col = c("Age", "string", 0, "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata");

fn containers_and_images(spec: Option<&Value>) -> (String, String) {
    let cs = spec.and_then(|s| s.get("containers")).and_then(Value::as_array).cloned().unwrap_or_default();
    let names: Vec<&str> = cs.iter().map(|c| c["name"].as_str().unwrap_or("")).collect();
    let images: Vec<&str> = cs.iter().map(|c| c["image"].as_str().unwrap_or("")).collect();
    (names.join(","), images.join(","))
}

fn selector(o: &Value) -> String {
    o.pointer("/spec/selector").map(crate::rest::selector_string).filter(|s| !s.is_empty()).unwrap_or_else(|| "<none>".into())
}

/// Pod STATUS column, following upstream's printPod.
fn pod_status(o: &Value) -> (String, i64, i64, i64) {
    let mut reason = s(o, "/status/reason").to_string();
    if reason.is_empty() {
        reason = s(o, "/status/phase").to_string();
    }
    let statuses = o.pointer("/status/containerStatuses").and_then(Value::as_array).cloned().unwrap_or_default();
    let total = o.pointer("/spec/containers").and_then(Value::as_array).map_or(0, Vec::len) as i64;
    let mut ready = 0;
    let mut restarts = 0;
    let mut init_failed = false;
    for (idx, st) in o.pointer("/status/initContainerStatuses").and_then(Value::as_array).cloned().unwrap_or_default().iter().enumerate() {
        restarts += i(st, "/restartCount");
        if let Some(t) = st.pointer("/state/terminated") {
            if t["exitCode"].as_i64() == Some(0) {
                continue;
            }
            reason = if !s(t, "/reason").is_empty() { format!("Init:{}", s(t, "/reason")) } else { format!("Init:ExitCode:{}", i(t, "/exitCode")) };
            init_failed = true;
        } else if let Some(w) = st.pointer("/state/waiting").filter(|w| !s(w, "/reason").is_empty() && s(w, "/reason") != "PodInitializing") {
            reason = format!("Init:{}", s(w, "/reason"));
            init_failed = true;
        } else {
            reason = format!("Init:{idx}/{}", o.pointer("/spec/initContainers").and_then(Value::as_array).map_or(0, Vec::len));
            init_failed = true;
        }
        break;
    }
    if !init_failed {
        let mut has_running = false;
        for st in statuses.iter().rev() {
            restarts += i(st, "/restartCount");
            if let Some(w) = st.pointer("/state/waiting").filter(|w| !s(w, "/reason").is_empty()) {
                reason = s(w, "/reason").to_string();
            } else if let Some(t) = st.pointer("/state/terminated") {
                reason = if !s(t, "/reason").is_empty() {
                    s(t, "/reason").to_string()
                } else if i(t, "/signal") != 0 {
                    format!("Signal:{}", i(t, "/signal"))
                } else {
                    format!("ExitCode:{}", i(t, "/exitCode"))
                };
            } else if st.pointer("/state/running").is_some() && st["ready"].as_bool() == Some(true) {
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && has_running {
            reason = "Running".into();
        }
    }
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        reason = if s(o, "/status/reason") == "NodeLost" { "Unknown".into() } else { "Terminating".into() };
    }
    (reason, ready, total, restarts)
}

fn node_status(o: &Value) -> String {
    let mut parts = Vec::new();
    let conds = o.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
    match conds.iter().find(|c| c["type"] == "Ready") {
        Some(c) if c["status"] == "True" => parts.push("Ready".to_string()),
        Some(_) => parts.push("NotReady".to_string()),
        None => parts.push("Unknown".to_string()),
    }
    if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        parts.push("SchedulingDisabled".into());
    }
    parts.join(",")
}

fn node_roles(o: &Value) -> String {
    let mut roles: Vec<String> = o
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|l| {
            l.iter()
                .filter_map(|(k, v)| {
                    if let Some(r) = k.strip_prefix("node-role.kubernetes.io/") {
                        Some(r.to_string())
                    } else if k == "kubernetes.io/role" {
                        v.as_str().map(String::from)
                    } else {
                        None
                    }
                })
                .filter(|r| !r.is_empty())
                .collect()
        })
        .unwrap_or_default();
    roles.sort();
    if roles.is_empty() { "<none>".into() } else { roles.join(",") }
}

fn node_address(o: &Value, ty: &str) -> String {
    o.pointer("/status/addresses").and_then(Value::as_array).and_then(|a| a.iter().find(|x| x["type"] == ty)).and_then(|x| x["address"].as_str()).map(String::from).unwrap_or_else(|| "<none>".into())
}

fn service_ports(o: &Value) -> String {
    let ports = o.pointer("/spec/ports").and_then(Value::as_array).cloned().unwrap_or_default();
    if ports.is_empty() {
        return "<none>".into();
    }
    ports
        .iter()
        .map(|p| {
            let np = p["nodePort"].as_i64().filter(|n| *n > 0).map(|n| format!(":{n}")).unwrap_or_default();
            format!("{}{np}/{}", p["port"].as_i64().unwrap_or(0), p["protocol"].as_str().unwrap_or("TCP"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn external_ip(o: &Value) -> String {
    let ty = s(o, "/spec/type");
    let mut ips: Vec<String> = o.pointer("/spec/externalIPs").and_then(Value::as_array).map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default();
    match ty {
        "ExternalName" => return s(o, "/spec/externalName").to_string(),
        "LoadBalancer" => {
            let lb: Vec<String> = o.pointer("/status/loadBalancer/ingress").and_then(Value::as_array).map(|a| a.iter().filter_map(|x| x["ip"].as_str().or(x["hostname"].as_str()).map(String::from)).collect()).unwrap_or_default();
            ips.extend(lb);
            if ips.is_empty() {
                return "<pending>".into();
            }
        }
        _ => {}
    }
    if ips.is_empty() { "<none>".into() } else { ips.join(",") }
}

fn object_ref(o: &Value) -> String {
    let kind = s(o, "/involvedObject/kind").to_lowercase();
    let name = s(o, "/involvedObject/name");
    format!("{kind}/{name}")
}

/// The table kind of a resource: custom resources get the generic columns even when their
/// kind is named like a built-in one.
pub fn kind_of(def: &crate::resources::ResourceDef) -> &'static str {
    if def.custom { "@custom" } else { def.kind }
}

/// Columns and the cells of one object for `kind`.
fn columns(kind: &str) -> Vec<Col> {
    match kind {
        "Pod" => vec![NAME, c("Ready", "string", 0, "The aggregate readiness state of this pod for accepting traffic."), c("Status", "string", 0, "The aggregate status of the containers in this pod."), c("Restarts", "string", 0, "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."), AGE, c("IP", "string", 1, "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated."), c("Node", "string", 1, "NodeName is a request to schedule this pod onto a specific node."), c("Nominated Node", "string", 1, "nominatedNodeName is set only when this pod preempts other pods on the node."), c("Readiness Gates", "string", 1, "If specified, all readiness gates will be evaluated for pod readiness.")],
        "Deployment" => vec![NAME, c("Ready", "string", 0, "Number of the pod with ready state"), c("Up-to-date", "string", 0, "Total number of non-terminated pods targeted by this deployment that have the desired template spec."), c("Available", "string", 0, "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment."), AGE, c("Containers", "string", 1, "Names of each container in the template."), c("Images", "string", 1, "Images referenced by each container in the template."), c("Selector", "string", 1, "Label selector for pods.")],
        "ReplicaSet" => vec![NAME, c("Desired", "integer", 0, "Replicas is the number of desired replicas."), c("Current", "integer", 0, "Replicas is the most recently observed number of replicas."), c("Ready", "integer", 0, "The number of ready replicas for this replica set."), AGE, c("Containers", "string", 1, "Names of each container in the template."), c("Images", "string", 1, "Images referenced by each container in the template."), c("Selector", "string", 1, "Selector is a label query over pods that should match the replica count.")],
        "DaemonSet" => vec![NAME, c("Desired", "integer", 0, "The total number of nodes that should be running the daemon pod."), c("Current", "integer", 0, "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod."), c("Ready", "integer", 0, "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and ready."), c("Up-to-date", "integer", 0, "The total number of nodes that are running updated daemon pod"), c("Available", "integer", 0, "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available."), c("Node Selector", "string", 0, "NodeSelector is a selector which must be true for the pod to fit on a node."), AGE, c("Containers", "string", 1, "Names of each container in the template."), c("Images", "string", 1, "Images referenced by each container in the template."), c("Selector", "string", 1, "A label query over pods that are managed by the daemon set.")],
        "StatefulSet" => vec![NAME, c("Ready", "string", 0, "Number of the pod with ready state"), AGE, c("Containers", "string", 1, "Names of each container in the template."), c("Images", "string", 1, "Images referenced by each container in the template.")],
        "Service" => vec![NAME, c("Type", "string", 0, "type determines how the Service is exposed."), c("Cluster-IP", "string", 0, "clusterIP is the IP address of the service and is usually assigned randomly."), c("External-IP", "string", 0, "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service."), c("Port(s)", "string", 0, "The list of ports that are exposed by this service."), AGE, c("Selector", "string", 1, "Route service traffic to pods with label keys and values matching this selector.")],
        "Endpoints" => vec![NAME, c("Endpoints", "string", 0, "Endpoints is the list of endpoints."), AGE],
        "Namespace" => vec![NAME, c("Status", "string", 0, "The status of the namespace"), AGE],
        "Node" => vec![NAME, c("Status", "string", 0, "The status of the node"), c("Roles", "string", 0, "The roles of the node"), AGE, c("Version", "string", 0, "Kubelet Version reported by the node."), c("Internal-IP", "string", 1, "List of addresses reachable to the node."), c("External-IP", "string", 1, "List of addresses reachable to the node."), c("OS-Image", "string", 1, "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy))."), c("Kernel-Version", "string", 1, "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64)."), c("Container-Runtime", "string", 1, "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).")],
        "ConfigMap" => vec![NAME, c("Data", "string", 0, "Data contains the configuration data."), AGE],
        "Secret" => vec![NAME, c("Type", "string", 0, "The type of data stored in the secret"), c("Data", "string", 0, "The total number of data fields in the secret"), AGE],
        "ServiceAccount" => vec![NAME, c("Secrets", "string", 0, "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use."), AGE],
        "Event" => vec![c("Last Seen", "string", 0, "Time when last occurrence of event was recorded"), c("Type", "string", 0, "Type of this event"), c("Reason", "string", 0, "This should be a short, machine understandable string that gives the reason for this event being generated."), c("Object", "string", 0, "The object that this event is about."), c("Subobject", "string", 1, "The subobject of the object that this event is about."), c("Source", "string", 1, "The component reporting this event."), c("Message", "string", 0, "A human-readable description of the status of this operation."), c("First Seen", "string", 1, "The time at which the event was first recorded."), c("Count", "string", 1, "The number of times this event has occurred."), c("Name", "string", 1, "Name of the event")],
        "PersistentVolumeClaim" => vec![NAME, c("Status", "string", 0, "Phase represents the current phase of PersistentVolumeClaim."), c("Volume", "string", 0, "VolumeName is the binding reference to the PersistentVolume backing this claim."), c("Capacity", "string", 0, "Capacity represents the actual resources of the underlying volume."), c("Access Modes", "string", 0, "AccessModes contains the desired access modes the volume should have."), c("StorageClass", "string", 0, "StorageClassName is the name of the StorageClass required by the claim."), c("VolumeAttributesClass", "string", 0, "VolumeAttributesClass is the name of the VolumeAttributesClass the claim uses."), AGE, c("VolumeMode", "string", 1, "VolumeMode defines what type of volume is required by the claim.")],
        "PersistentVolume" => vec![NAME, c("Capacity", "string", 0, "capacity is the description of the persistent volume's resources and capacity."), c("Access Modes", "string", 0, "accessModes contains all ways the volume can be mounted."), c("Reclaim Policy", "string", 0, "persistentVolumeReclaimPolicy defines what happens to a persistent volume when released from its claim."), c("Status", "string", 0, "phase indicates if a volume is available, bound to a claim, or released by a claim."), c("Claim", "string", 0, "claimRef is part of a bi-directional binding between PersistentVolume and PersistentVolumeClaim."), c("StorageClass", "string", 0, "storageClassName is the name of StorageClass to which this persistent volume belongs."), c("VolumeAttributesClass", "string", 0, "Name of VolumeAttributesClass to which this persistent volume belongs."), c("Reason", "string", 0, "reason is a brief CamelCase string that describes any failure."), AGE, c("VolumeMode", "string", 1, "volumeMode defines if a volume is intended to be used with a formatted filesystem or to remain in raw block state.")],
        "StorageClass" => vec![NAME, c("Provisioner", "string", 0, "Indicates the type of the provisioner."), c("ReclaimPolicy", "string", 0, "Dynamically provisioned PersistentVolumes of this storage class are created with this reclaimPolicy."), c("VolumeBindingMode", "string", 0, "VolumeBindingMode indicates how PersistentVolumeClaims should be provisioned and bound."), c("AllowVolumeExpansion", "string", 0, "AllowVolumeExpansion shows whether the storage class allow volume expand."), AGE],
        "Lease" => vec![NAME, c("Holder", "string", 0, "The holder of the lease"), AGE],
        "PriorityClass" => vec![NAME, c("Value", "integer", 0, "value is the integer value of this priority class."), c("Global-Default", "boolean", 0, "globalDefault specifies whether this PriorityClass should be considered as the default priority for pods that do not have any priority class."), AGE, c("PreemptionPolicy", "string", 0, "preemptionPolicy is the Policy for preempting pods with lower priority.")],
        "HorizontalPodAutoscaler" => vec![NAME, c("Reference", "string", 0, "reference to scaled resource"), c("Targets", "string", 0, "metrics the autoscaler scales on"), c("MinPods", "string", 0, "lower limit for the number of pods"), c("MaxPods", "integer", 0, "upper limit for the number of pods"), c("Replicas", "integer", 0, "current number of replicas of pods managed by this autoscaler"), AGE],
        "EndpointSlice" => vec![NAME, c("AddressType", "string", 0, "The IP protocol for this slice"), c("Ports", "string", 0, "The ports for this slice"), c("Endpoints", "string", 0, "The endpoints for this slice"), AGE],
        "NetworkPolicy" => vec![NAME, c("Pod-Selector", "string", 0, "podSelector selects the pods to which this NetworkPolicy object applies. The array of rules is applied to any pods selected by this field. An empty selector matches all pods in the policy's namespace."), AGE],
        "PodDisruptionBudget" => vec![NAME, c("Min Available", "string", 0, "The minimum number of pods that must be available"), c("Max Unavailable", "string", 0, "The maximum number of pods that may be unavailable"), c("Allowed Disruptions", "integer", 0, "Calculated number of pods that may be disrupted at this time"), AGE],
        "RoleBinding" | "ClusterRoleBinding" => vec![NAME, c("Role", "string", 0, "Role"), AGE, c("Users", "string", 1, "Users in the roleBinding"), c("Groups", "string", 1, "Groups in the roleBinding"), c("ServiceAccounts", "string", 1, "ServiceAccounts in the roleBinding")],
        "Role" | "ClusterRole" => vec![NAME, c("Created At", "date", 0, "")],
        "@custom" => vec![NAME, AGE],
        _ => vec![NAME, c("Created At", "date", 0, "CreationTimestamp is a timestamp representing the server time when this object was created.")],
    }
}

fn quantity_cell(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn access_modes(v: Option<&Value>) -> String {
    let modes: Vec<&str> = v.and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let short: Vec<&str> = modes
        .iter()
        .map(|m| match *m {
            "ReadWriteOnce" => "RWO",
            "ReadOnlyMany" => "ROX",
            "ReadWriteMany" => "RWX",
            "ReadWriteOncePod" => "RWOP",
            other => other,
        })
        .collect();
    short.join(",")
}

fn cells(kind: &str, o: &Value) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    match kind {
        "Pod" => {
            let (status, ready, total, restarts) = pod_status(o);
            let gates = o.pointer("/spec/readinessGates").and_then(Value::as_array).map(|g| {
                let conds = o.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
                let ok = g.iter().filter(|gt| conds.iter().any(|c| c["type"] == gt["conditionType"] && c["status"] == "True")).count();
                format!("{ok}/{}", g.len())
            });
            vec![name, json!(format!("{ready}/{total}")), json!(status), json!(restarts.to_string()), age(o), json!(or_none(s(o, "/status/podIP"))), json!(or_none(s(o, "/spec/nodeName"))), json!(or_none(s(o, "/status/nominatedNodeName"))), json!(gates.unwrap_or_else(|| "<none>".into()))]
        }
        "Deployment" => {
            let (cn, im) = containers_and_images(o.pointer("/spec/template/spec"));
            vec![name, json!(format!("{}/{}", i(o, "/status/readyReplicas"), i(o, "/spec/replicas"))), json!(i(o, "/status/updatedReplicas")), json!(i(o, "/status/availableReplicas")), age(o), json!(cn), json!(im), json!(selector(o))]
        }
        "ReplicaSet" => {
            let (cn, im) = containers_and_images(o.pointer("/spec/template/spec"));
            vec![name, json!(i(o, "/spec/replicas")), json!(i(o, "/status/replicas")), json!(i(o, "/status/readyReplicas")), age(o), json!(cn), json!(im), json!(selector(o))]
        }
        "DaemonSet" => {
            let (cn, im) = containers_and_images(o.pointer("/spec/template/spec"));
            let ns = o.pointer("/spec/template/spec/nodeSelector").and_then(Value::as_object).map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(",")).filter(|s| !s.is_empty()).unwrap_or_else(|| "<none>".into());
            vec![name, json!(i(o, "/status/desiredNumberScheduled")), json!(i(o, "/status/currentNumberScheduled")), json!(i(o, "/status/numberReady")), json!(i(o, "/status/updatedNumberScheduled")), json!(i(o, "/status/numberAvailable")), json!(ns), age(o), json!(cn), json!(im), json!(selector(o))]
        }
        "StatefulSet" => {
            let (cn, im) = containers_and_images(o.pointer("/spec/template/spec"));
            vec![name, json!(format!("{}/{}", i(o, "/status/readyReplicas"), i(o, "/spec/replicas"))), age(o), json!(cn), json!(im)]
        }
        "Service" => {
            let sel = o.pointer("/spec/selector").and_then(Value::as_object).map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(",")).filter(|s| !s.is_empty()).unwrap_or_else(|| "<none>".into());
            vec![name, json!(s(o, "/spec/type")), json!(or_none(s(o, "/spec/clusterIP"))), json!(external_ip(o)), json!(service_ports(o)), age(o), json!(sel)]
        }
        "Endpoints" => {
            let mut eps = Vec::new();
            for sub in o.get("subsets").and_then(Value::as_array).into_iter().flatten() {
                let ports: Vec<i64> = sub.get("ports").and_then(Value::as_array).map(|p| p.iter().filter_map(|x| x["port"].as_i64()).collect()).unwrap_or_default();
                for a in sub.get("addresses").and_then(Value::as_array).into_iter().flatten() {
                    let ip = a["ip"].as_str().unwrap_or("");
                    if ports.is_empty() {
                        eps.push(ip.to_string());
                    }
                    for p in &ports {
                        eps.push(format!("{ip}:{p}"));
                    }
                }
            }
            let shown = if eps.len() > 3 { format!("{} + {} more...", eps[..3].join(","), eps.len() - 3) } else if eps.is_empty() { "<none>".into() } else { eps.join(",") };
            vec![name, json!(shown), age(o)]
        }
        "Namespace" => vec![name, json!(s(o, "/status/phase")), age(o)],
        "Node" => vec![
            name,
            json!(node_status(o)),
            json!(node_roles(o)),
            age(o),
            json!(s(o, "/status/nodeInfo/kubeletVersion")),
            json!(node_address(o, "InternalIP")),
            json!(node_address(o, "ExternalIP")),
            json!(or_none(s(o, "/status/nodeInfo/osImage"))),
            json!(or_none(s(o, "/status/nodeInfo/kernelVersion"))),
            json!(or_none(s(o, "/status/nodeInfo/containerRuntimeVersion"))),
        ],
        "ConfigMap" => {
            let n = o.get("data").and_then(Value::as_object).map_or(0, |m| m.len()) + o.get("binaryData").and_then(Value::as_object).map_or(0, |m| m.len());
            vec![name, json!(n.to_string()), age(o)]
        }
        "Secret" => vec![name, json!(s(o, "/type")), json!(o.get("data").and_then(Value::as_object).map_or(0, |m| m.len()).to_string()), age(o)],
        "ServiceAccount" => vec![name, json!(o.get("secrets").and_then(Value::as_array).map_or(0, Vec::len).to_string()), age(o)],
        "Event" => {
            let last = o.get("lastTimestamp").and_then(Value::as_str).or(o.get("eventTime").and_then(Value::as_str)).or(o.pointer("/metadata/creationTimestamp").and_then(Value::as_str));
            let first = o.get("firstTimestamp").and_then(Value::as_str).or(last);
            let src = s(o, "/source/component");
            vec![json!(age_of(last)), json!(s(o, "/type")), json!(s(o, "/reason")), json!(object_ref(o)), json!(s(o, "/involvedObject/fieldPath")), json!(if src.is_empty() { s(o, "/reportingComponent") } else { src }), json!(s(o, "/message")), json!(age_of(first)), json!(i(o, "/count").max(1).to_string()), name]
        }
        "PersistentVolumeClaim" => vec![name, json!(s(o, "/status/phase")), json!(s(o, "/spec/volumeName")), json!(quantity_cell(o.pointer("/status/capacity/storage"))), json!(access_modes(o.pointer("/status/accessModes"))), json!(or_none(s(o, "/spec/storageClassName"))), json!(or_unset(s(o, "/spec/volumeAttributesClassName"))), age(o), json!(s(o, "/spec/volumeMode"))],
        "PersistentVolume" => {
            let claim = if s(o, "/spec/claimRef/name").is_empty() { String::new() } else { format!("{}/{}", s(o, "/spec/claimRef/namespace"), s(o, "/spec/claimRef/name")) };
            vec![name, json!(quantity_cell(o.pointer("/spec/capacity/storage"))), json!(access_modes(o.pointer("/spec/accessModes"))), json!(s(o, "/spec/persistentVolumeReclaimPolicy")), json!(s(o, "/status/phase")), json!(claim), json!(s(o, "/spec/storageClassName")), json!(or_unset(s(o, "/spec/volumeAttributesClassName"))), json!(s(o, "/status/reason")), age(o), json!(s(o, "/spec/volumeMode"))]
        }
        "PriorityClass" => vec![json!(s(o, "/metadata/name")), json!(o.get("value").and_then(Value::as_i64).unwrap_or(0)), json!(o.get("globalDefault").and_then(Value::as_bool).unwrap_or(false)), age(o), json!(s(o, "/preemptionPolicy"))],
        "StorageClass" => {
            let default = o.pointer("/metadata/annotations/storageclass.kubernetes.io~1is-default-class").and_then(Value::as_str) == Some("true");
            let n = if default { format!("{} (default)", s(o, "/metadata/name")) } else { s(o, "/metadata/name").to_string() };
            vec![json!(n), json!(s(o, "/provisioner")), json!(s(o, "/reclaimPolicy")), json!(s(o, "/volumeBindingMode")), json!(o.get("allowVolumeExpansion").and_then(Value::as_bool).unwrap_or(false).to_string()), age(o)]
        }
        "Lease" => vec![name, json!(s(o, "/spec/holderIdentity")), age(o)],
        "HorizontalPodAutoscaler" => {
            let r = format!("{}/{}", s(o, "/spec/scaleTargetRef/kind"), s(o, "/spec/scaleTargetRef/name"));
            let targets: Vec<String> = o.pointer("/spec/metrics").and_then(Value::as_array).map(|ms| ms.iter().map(|m| {
                let util = m.pointer("/resource/target/averageUtilization").and_then(Value::as_i64);
                let cur = o.pointer("/status/currentMetrics").and_then(Value::as_array).and_then(|c| c.iter().find(|x| x.pointer("/resource/name") == m.pointer("/resource/name"))).and_then(|x| x.pointer("/resource/current/averageUtilization")).and_then(Value::as_i64);
                match util {
                    Some(u) => format!("{}: {}/{u}%", m.pointer("/resource/name").and_then(Value::as_str).unwrap_or(""), cur.map_or("<unknown>".to_string(), |c| format!("{c}%"))),
                    None => "<unknown>".into(),
                }
            }).collect()).unwrap_or_default();
            let t = if targets.is_empty() { "<none>".to_string() } else { targets.join(", ") };
            vec![name, json!(r), json!(t), json!(o.pointer("/spec/minReplicas").and_then(Value::as_i64).map_or("<unset>".into(), |m| m.to_string())), json!(i(o, "/spec/maxReplicas")), json!(i(o, "/status/currentReplicas")), age(o)]
        }
        "EndpointSlice" => {
            let ports: Vec<String> = o.get("ports").and_then(Value::as_array).map(|p| p.iter().map(|x| x["port"].as_i64().map_or("<unset>".into(), |p| p.to_string())).collect()).unwrap_or_default();
            let addrs: Vec<String> = o.get("endpoints").and_then(Value::as_array).map(|e| e.iter().flat_map(|x| x["addresses"].as_array().cloned().unwrap_or_default()).filter_map(|a| a.as_str().map(String::from)).collect()).unwrap_or_default();
            let shown = if addrs.len() > 3 { format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3) } else if addrs.is_empty() { "<unset>".into() } else { addrs.join(",") };
            vec![name, json!(s(o, "/addressType")), json!(if ports.is_empty() { "<unset>".into() } else { ports.join(",") }), json!(shown), age(o)]
        }
        "NetworkPolicy" => {
            let sel = o.pointer("/spec/podSelector").map(crate::rest::selector_string).filter(|s| !s.is_empty()).unwrap_or_else(|| "<none>".into());
            vec![name, json!(sel), age(o)]
        }
        "PodDisruptionBudget" => {
            let cell = |p: &str| match o.pointer(p) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => "N/A".into(),
            };
            vec![name, json!(cell("/spec/minAvailable")), json!(cell("/spec/maxUnavailable")), json!(i(o, "/status/disruptionsAllowed")), age(o)]
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let subs = o.get("subjects").and_then(Value::as_array).cloned().unwrap_or_default();
            let of = |k: &str| subs.iter().filter(|x| x["kind"] == k).map(|x| if k == "ServiceAccount" { format!("{}/{}", x["namespace"].as_str().unwrap_or(""), x["name"].as_str().unwrap_or("")) } else { x["name"].as_str().unwrap_or("").to_string() }).collect::<Vec<_>>().join(", ");
            vec![name, json!(format!("{}/{}", s(o, "/roleRef/kind"), s(o, "/roleRef/name"))), age(o), json!(of("User")), json!(of("Group")), json!(of("ServiceAccount"))]
        }
        "@custom" => vec![name, age(o)],
        _ => vec![name, json!(s(o, "/metadata/creationTimestamp"))],
    }
}

fn or_unset(x: &str) -> String {
    if x.is_empty() { "<unset>".into() } else { x.to_string() }
}

/// How much of each object a row carries (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Include {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

fn row(kind: &str, o: &Value, include: Include) -> Value {
    let mut r = json!({"cells": cells(kind, o)});
    match include {
        Include::None => {}
        Include::Metadata => r["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"].clone()}),
        Include::Object => r["object"] = o.clone(),
    }
    r
}

/// A Table of `objects`; `list_meta` is the list's metadata (resourceVersion, continue).
pub fn table(kind: &str, objects: &[Value], list_meta: Value, include: Include) -> Value {
    let cols: Vec<Value> = columns(kind).iter().map(|c| json!({"name": c.name, "type": c.ty, "format": if c.name == "Name" { "name" } else { "" }, "description": c.desc, "priority": c.priority})).collect();
    let rows: Vec<Value> = objects.iter().map(|o| row(kind, o, include)).collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta, "columnDefinitions": cols, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_match_upstream() {
        let table = [(-5, "<invalid>"), (0, "0s"), (119, "119s"), (125, "2m5s"), (600, "10m"), (3 * 3600, "3h"), (7 * 3600 + 60, "7h1m"), (47 * 3600, "47h"), (3 * 86400 + 3600, "3d1h"), (400 * 86400, "400d"), (3 * 365 * 86400, "3y"), (10 * 365 * 86400, "10y")];
        for (secs, want) in table {
            assert_eq!(human_duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn every_row_has_one_cell_per_column() {
        let kinds = ["Pod", "Deployment", "ReplicaSet", "DaemonSet", "StatefulSet", "Service", "Endpoints", "Namespace", "Node", "ConfigMap", "Secret", "ServiceAccount", "Event", "PersistentVolumeClaim", "PersistentVolume", "StorageClass", "Lease", "HorizontalPodAutoscaler", "EndpointSlice", "PodDisruptionBudget", "RoleBinding", "Role", "Whatever"];
        let o = json!({"metadata": {"name": "x", "creationTimestamp": "2026-01-01T00:00:00Z"}});
        for k in kinds {
            let t = table(k, &[o.clone()], json!({}), Include::Metadata);
            assert_eq!(t["rows"][0]["cells"].as_array().unwrap().len(), t["columnDefinitions"].as_array().unwrap().len(), "{k}");
        }
    }

    #[test]
    fn pod_columns() {
        let p = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"}, "status": {"phase": "Running", "podIP": "10.0.0.5", "containerStatuses": [{"name": "a", "ready": true, "restartCount": 1, "state": {"running": {}}}, {"name": "b", "ready": false, "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let c = cells("Pod", &p);
        assert_eq!(c[1], "1/2");
        assert_eq!(c[2], "CrashLoopBackOff");
        assert_eq!(c[3], "3");
        assert_eq!(c[5], "10.0.0.5");
    }
}
