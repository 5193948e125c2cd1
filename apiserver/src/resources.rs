//! The table of resources the server serves: names, scope, verbs, short names,
//! categories, subresources and where each is stored. Discovery, routing and storage keys
//! all read this one table, so a kind is added in one place.

/// Verbs of a fully writable resource (discovery order as upstream).
pub const ALL_VERBS: &[&str] = &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

/// One served resource.
#[derive(Debug)]
pub struct ResourceDef {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub verbs: &'static [&'static str],
    /// Subresources served besides the object itself (`status`, `scale`, ...).
    pub subresources: &'static [&'static str],
    /// Store key prefix after `/registry/` (upstream's layout).
    pub storage: &'static str,
    /// Served from a CustomResourceDefinition (crd.rs), not built in.
    pub custom: bool,
    /// For custom resources: whether this version is the CRD's storage version.
    pub stored: bool,
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    /// Whether objects of this kind are stored in this version (the others are converted).
    pub fn is_storage_version(&self) -> bool {
        if self.custom {
            return self.stored;
        }
        !(self.group == "autoscaling" && self.version == "v1") && self.group != "events.k8s.io"
    }

    /// Reviews and other kinds that are computed, not stored.
    pub fn is_virtual(&self) -> bool {
        self.storage.starts_with('-')
    }
    pub fn has_status(&self) -> bool {
        self.subresources.contains(&"status")
    }
    pub fn has_sub(&self, s: &str) -> bool {
        self.subresources.contains(&s)
    }
    /// The store key of one object.
    pub fn key(&self, ns: &str, name: &str) -> String {
        if self.namespaced {
            format!("/registry/{}/{ns}/{name}", self.storage)
        } else {
            format!("/registry/{}/{name}", self.storage)
        }
    }
    /// The store prefix holding every object of this resource in `ns` (all namespaces when
    /// `ns` is empty or the resource is cluster-scoped).
    pub fn prefix(&self, ns: &str) -> String {
        if self.namespaced && !ns.is_empty() {
            format!("/registry/{}/{ns}/", self.storage)
        } else {
            format!("/registry/{}/", self.storage)
        }
    }
    /// `metadata.generation` counts spec changes for kinds that have a spec worth
    /// observing (workloads, services, pods...), as upstream strategies do.
    pub fn tracks_generation(&self) -> bool {
        !matches!(self.kind, "ConfigMap" | "Secret" | "Event" | "Endpoints" | "EndpointSlice" | "Lease" | "ServiceAccount" | "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" | "Namespace" | "ControllerRevision")
    }
}

macro_rules! r {
    ($g:expr, $v:expr, $kind:expr, $plural:expr, $singular:expr, $ns:expr, $short:expr, $cat:expr, $verbs:expr, $subs:expr, $storage:expr) => {
        ResourceDef { group: $g, version: $v, kind: $kind, plural: $plural, singular: $singular, namespaced: $ns, short_names: $short, categories: $cat, verbs: $verbs, subresources: $subs, storage: $storage, custom: false, stored: true }
    };
}

const NONE: &[&str] = &[];
const ALL: &[&str] = &["all"];
const STATUS: &[&str] = &["status"];
const WORKLOAD_SUBS: &[&str] = &["status", "scale"];
const CREATE_ONLY: &[&str] = &["create"];

/// Every built-in resource.
pub static BUILTIN: &[ResourceDef] = &[
    // core/v1
    r!("", "v1", "Binding", "bindings", "binding", true, NONE, NONE, CREATE_ONLY, NONE, "bindings"),
    r!("", "v1", "ConfigMap", "configmaps", "configmap", true, &["cm"], NONE, ALL_VERBS, NONE, "configmaps"),
    r!("", "v1", "Endpoints", "endpoints", "endpoints", true, &["ep"], NONE, ALL_VERBS, NONE, "services/endpoints"),
    r!("", "v1", "Event", "events", "event", true, &["ev"], NONE, ALL_VERBS, NONE, "events"),
    r!("", "v1", "LimitRange", "limitranges", "limitrange", true, &["limits"], NONE, ALL_VERBS, NONE, "limitranges"),
    r!("", "v1", "Namespace", "namespaces", "namespace", false, &["ns"], NONE, &["create", "delete", "get", "list", "patch", "update", "watch"], &["status", "finalize"], "namespaces"),
    r!("", "v1", "Node", "nodes", "node", false, &["no"], NONE, ALL_VERBS, &["status", "proxy"], "minions"),
    r!("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", "persistentvolumeclaim", true, &["pvc"], NONE, ALL_VERBS, STATUS, "persistentvolumeclaims"),
    r!("", "v1", "PersistentVolume", "persistentvolumes", "persistentvolume", false, &["pv"], NONE, ALL_VERBS, STATUS, "persistentvolumes"),
    r!("", "v1", "Pod", "pods", "pod", true, &["po"], ALL, ALL_VERBS, &["status", "binding", "eviction", "log", "exec", "attach", "portforward", "ephemeralcontainers"], "pods"),
    r!("", "v1", "ResourceQuota", "resourcequotas", "resourcequota", true, &["quota"], NONE, ALL_VERBS, STATUS, "resourcequotas"),
    r!("", "v1", "Secret", "secrets", "secret", true, NONE, NONE, ALL_VERBS, NONE, "secrets"),
    r!("", "v1", "ServiceAccount", "serviceaccounts", "serviceaccount", true, &["sa"], NONE, ALL_VERBS, &["token"], "serviceaccounts"),
    r!("", "v1", "Service", "services", "service", true, &["svc"], ALL, &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"], &["status", "proxy"], "services/specs"),
    // apps/v1
    r!("apps", "v1", "ControllerRevision", "controllerrevisions", "controllerrevision", true, NONE, NONE, ALL_VERBS, NONE, "controllerrevisions"),
    r!("apps", "v1", "DaemonSet", "daemonsets", "daemonset", true, &["ds"], ALL, ALL_VERBS, STATUS, "daemonsets"),
    r!("apps", "v1", "Deployment", "deployments", "deployment", true, &["deploy"], ALL, ALL_VERBS, WORKLOAD_SUBS, "deployments"),
    r!("apps", "v1", "ReplicaSet", "replicasets", "replicaset", true, &["rs"], ALL, ALL_VERBS, WORKLOAD_SUBS, "replicasets"),
    r!("apps", "v1", "StatefulSet", "statefulsets", "statefulset", true, &["sts"], ALL, ALL_VERBS, WORKLOAD_SUBS, "statefulsets"),
    // autoscaling: v2 is stored, v1 is converted (conversion.rs)
    r!("autoscaling", "v1", "HorizontalPodAutoscaler", "horizontalpodautoscalers", "horizontalpodautoscaler", true, &["hpa"], ALL, ALL_VERBS, STATUS, "horizontalpodautoscalers"),
    r!("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", "horizontalpodautoscaler", true, &["hpa"], ALL, ALL_VERBS, STATUS, "horizontalpodautoscalers"),
    // coordination.k8s.io/v1
    r!("coordination.k8s.io", "v1", "Lease", "leases", "lease", true, NONE, NONE, ALL_VERBS, NONE, "leases"),
    // discovery.k8s.io/v1
    r!("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", "endpointslice", true, NONE, NONE, ALL_VERBS, NONE, "endpointslices"),
    // networking.k8s.io/v1
    r!("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", "networkpolicy", true, &["netpol"], NONE, ALL_VERBS, NONE, "networkpolicies"),
    // policy/v1
    r!("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", "poddisruptionbudget", true, &["pdb"], NONE, ALL_VERBS, STATUS, "poddisruptionbudgets"),
    // rbac.authorization.k8s.io/v1
    r!("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", "clusterrolebinding", false, NONE, NONE, ALL_VERBS, NONE, "clusterrolebindings"),
    r!("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", "clusterrole", false, NONE, NONE, ALL_VERBS, NONE, "clusterroles"),
    r!("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", "rolebinding", true, NONE, NONE, ALL_VERBS, NONE, "rolebindings"),
    r!("rbac.authorization.k8s.io", "v1", "Role", "roles", "role", true, NONE, NONE, ALL_VERBS, NONE, "roles"),
    // scheduling.k8s.io/v1
    r!("scheduling.k8s.io", "v1", "PriorityClass", "priorityclasses", "priorityclass", false, &["pc"], NONE, ALL_VERBS, NONE, "priorityclasses"),
    // storage.k8s.io/v1
    r!("storage.k8s.io", "v1", "StorageClass", "storageclasses", "storageclass", false, &["sc"], NONE, ALL_VERBS, NONE, "storageclasses"),
    // events.k8s.io/v1: the same objects as core events, converted (conversion.rs)
    r!("events.k8s.io", "v1", "Event", "events", "event", true, &["ev"], NONE, ALL_VERBS, NONE, "events"),
    // Reviews: computed per request, never stored.
    r!("authentication.k8s.io", "v1", "SelfSubjectReview", "selfsubjectreviews", "selfsubjectreview", false, NONE, NONE, CREATE_ONLY, NONE, "-selfsubjectreviews"),
    r!("authorization.k8s.io", "v1", "SelfSubjectAccessReview", "selfsubjectaccessreviews", "selfsubjectaccessreview", false, NONE, NONE, CREATE_ONLY, NONE, "-selfsubjectaccessreviews"),
    r!("authorization.k8s.io", "v1", "SubjectAccessReview", "subjectaccessreviews", "subjectaccessreview", false, NONE, NONE, CREATE_ONLY, NONE, "-subjectaccessreviews"),
    r!("authorization.k8s.io", "v1", "LocalSubjectAccessReview", "localsubjectaccessreviews", "localsubjectaccessreview", true, NONE, NONE, CREATE_ONLY, NONE, "-localsubjectaccessreviews"),
    // apiextensions.k8s.io/v1
    r!("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", "customresourcedefinition", false, &["crd", "crds"], &["api-extensions"], ALL_VERBS, STATUS, "apiextensions.k8s.io/customresourcedefinitions"),
];

/// Resources served from CustomResourceDefinitions (replaced as a whole by crd.rs).
static DYNAMIC: parking_lot::RwLock<Vec<&'static ResourceDef>> = parking_lot::RwLock::new(Vec::new());

/// Replaces the custom resources served.
pub fn set_dynamic(defs: Vec<&'static ResourceDef>) {
    *DYNAMIC.write() = defs;
}

/// Every served resource: built in, then custom.
pub fn all() -> Vec<&'static ResourceDef> {
    let mut v: Vec<&'static ResourceDef> = BUILTIN.iter().collect();
    v.extend(DYNAMIC.read().iter().copied());
    v
}

/// Group versions in discovery order, with their preferred version first.
pub fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    let all = all();
    for r in all.iter().copied() {
        if r.group.is_empty() {
            continue;
        }
        match out.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, vs)) => {
                if !vs.contains(&r.version) {
                    vs.push(r.version)
                }
            }
            None => out.push((r.group, vec![r.version])),
        }
    }
    // The preferred (first) version is the stored one.
    for (g, vs) in out.iter_mut() {
        if let Some(i) = vs.iter().position(|v| all.iter().any(|r| r.group == *g && r.version == *v && r.is_storage_version())) {
            let v = vs.remove(i);
            vs.insert(0, v);
        }
    }
    out
}

/// Looks a resource up by group, version and plural name.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
    BUILTIN.iter().find(|r| r.group == group && r.version == version && r.plural == plural).or_else(|| DYNAMIC.read().iter().copied().find(|r| r.group == group && r.version == version && r.plural == plural))
}

/// Whether the server serves this group/version at all.
pub fn serves(group: &str, version: &str) -> bool {
    BUILTIN.iter().any(|r| r.group == group && r.version == version) || DYNAMIC.read().iter().any(|r| r.group == group && r.version == version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        for (i, a) in BUILTIN.iter().enumerate() {
            assert!(a.plural.chars().all(|c| c.is_ascii_lowercase()), "{}", a.plural);
            for b in &BUILTIN[i + 1..] {
                assert!(!(a.group == b.group && a.version == b.version && a.plural == b.plural), "duplicate {}", a.plural);
                if a.storage == b.storage {
                    assert!(a.kind == b.kind && a.is_storage_version() != b.is_storage_version(), "{} and {} share a key space", a.plural, b.plural);
                }
            }
        }
        assert_eq!(find("", "v1", "pods").unwrap().key("ns", "p"), "/registry/pods/ns/p");
        assert_eq!(find("", "v1", "nodes").unwrap().key("", "n1"), "/registry/minions/n1");
        assert_eq!(find("", "v1", "services").unwrap().prefix(""), "/registry/services/specs/");
    }
}
