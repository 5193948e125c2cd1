//! Controllers running inside `shoal server`, driven and observed with kubectl.

mod common;

use std::process::Command;
use std::time::Duration;

use common::kube::{kubectl_bin, now_rfc3339, patch_status, K};
use common::Server;

fn pod_names(out: &str) -> Vec<String> {
    out.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

const RS: &str = "apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: rs1, namespace: c1}
spec:
  replicas: 3
  selector: {matchLabels: {app: r}}
  template:
    metadata: {labels: {app: r}}
    spec: {containers: [{name: c, image: busybox}]}
";

#[test]
fn replicasets_garbage_collection_and_namespace_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "ctl", &[]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    k.ok(&["create", "namespace", "c1"]);
    // An orphan pod matching the selector is adopted, and counts.
    k.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: orphan, namespace: c1, labels: {app: r}}\nspec: {containers: [{name: c, image: busybox}]}\n");
    k.apply(RS);
    let names = ["get", "pods", "-n", "c1", "-o", "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}"];
    k.eventually(&names, "3 pods", |o| pod_names(o).len() == 3);
    k.eventually(&["get", "pod", "orphan", "-n", "c1", "-o", "jsonpath={.metadata.ownerReferences[0].name}"], "adoption", |o| o == "rs1");
    k.eventually(&["get", "rs", "rs1", "-n", "c1", "-o", "jsonpath={.status.replicas}/{.status.observedGeneration}"], "status", |o| o == "3/1");
    // A deleted pod is replaced.
    let first = pod_names(&k.ok(&names)).into_iter().find(|n| n != "orphan").unwrap();
    k.ok(&["delete", "pod", &first, "-n", "c1"]);
    k.eventually(&names, "replacement", |o| pod_names(o).len() == 3 && !pod_names(o).contains(&first));
    // Scale down, then up (through the scale subresource).
    k.ok(&["scale", "rs", "rs1", "-n", "c1", "--replicas=1"]);
    k.eventually(&names, "scaled to 1", |o| pod_names(o).len() == 1);
    k.ok(&["scale", "rs", "rs1", "-n", "c1", "--replicas=2"]);
    k.eventually(&names, "scaled to 2", |o| pod_names(o).len() == 2);
    // Orphan propagation keeps the pods, without their owner reference.
    k.ok(&["delete", "rs", "rs1", "-n", "c1", "--cascade=orphan"]);
    k.eventually(&["get", "rs", "-n", "c1", "-o", "name"], "rs gone", |o| !o.contains("rs1"));
    k.eventually(&["get", "pods", "-n", "c1", "-o", "jsonpath={range .items[*]}{.metadata.ownerReferences}{\"|\"}{end}"], "references removed", |o| o == "||");
    // A new ReplicaSet adopts them; background deletion then removes them with it.
    k.apply(RS);
    k.eventually(&names, "3 pods again", |o| pod_names(o).len() == 3);
    k.ok(&["delete", "rs", "rs1", "-n", "c1"]);
    k.eventually(&names, "pods collected", |o| pod_names(o).is_empty());
    // Foreground: the owner goes only after its dependents.
    k.apply(RS);
    k.eventually(&names, "3 pods for foreground", |o| pod_names(o).len() == 3);
    k.ok(&["delete", "rs", "rs1", "-n", "c1", "--cascade=foreground"]);
    k.eventually(&names, "foreground dependents", |o| pod_names(o).is_empty());
    k.eventually(&["get", "rs", "-n", "c1", "-o", "name"], "foreground owner", |o| !o.contains("rs1"));
    // Namespace deletion removes everything inside, then the namespace.
    k.ok(&["create", "configmap", "cm", "-n", "c1"]);
    k.apply(RS);
    k.ok(&["delete", "namespace", "c1", "--wait=false"]);
    k.eventually(&["get", "namespace", "c1"], "namespace gone", |o| o.contains("NotFound"));
    // Every namespace gets its default ServiceAccount back when it is deleted.
    k.ok(&["create", "namespace", "c2"]);
    k.eventually(&["get", "serviceaccount", "default", "-n", "c2", "-o", "name"], "default account", |o| o.trim() == "serviceaccount/default");
    k.ok(&["delete", "serviceaccount", "default", "-n", "c2"]);
    k.eventually(&["get", "serviceaccount", "default", "-n", "c2", "-o", "name"], "default account re-created", |o| o.trim() == "serviceaccount/default");
    // ResourceQuota status counts what the namespace holds.
    k.apply("apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: q, namespace: c2}\nspec: {hard: {pods: '10', configmaps: '5', requests.cpu: '4'}}\n");
    k.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: c2}\nspec: {containers: [{name: c, image: busybox, resources: {requests: {cpu: 250m}}}, {name: d, image: busybox, resources: {requests: {cpu: 250m}}}]}\n");
    k.ok(&["create", "configmap", "cfg", "-n", "c2"]);
    k.eventually(&["get", "quota", "q", "-n", "c2", "-o", "jsonpath={.status.used.pods}/{.status.used.requests\\.cpu}/{.status.hard.pods}"], "quota usage", |o| o == "1/500m/10");
    // The controllers hold the leader Lease.
    assert!(k.ok(&["get", "lease", "shoal-controller-manager", "-n", "kube-system", "-o", "jsonpath={.spec.holderIdentity}"]).starts_with("ctl-"));
}

#[test]
fn deployments_roll_out_scale_and_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "ctl", &[]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    k.ok(&["create", "deployment", "web", "--image=busybox:1.36", "--replicas=3"]);
    let rs_of = |rev: &str| format!("jsonpath={{range .items[?(@.metadata.annotations.deployment\\.kubernetes\\.io/revision==\"{rev}\")]}}{{.metadata.name}} {{.spec.replicas}} {{.metadata.ownerReferences[0].kind}}{{end}}");
    k.eventually(&["get", "rs", "-l", "app=web", "-o", &rs_of("1")], "revision 1", |o| o.ends_with(" 3 Deployment"));
    k.eventually(&["get", "pods", "-l", "app=web", "-o", "name"], "3 pods", |o| o.lines().count() == 3);
    k.eventually(&["get", "deploy", "web", "-o", "jsonpath={.status.replicas}/{.status.updatedReplicas}/{.status.observedGeneration}"], "status", |o| o == "3/3/1");
    // A new template is a new ReplicaSet and revision; the old one is scaled away.
    k.ok(&["set", "image", "deploy/web", "busybox=busybox:1.37"]);
    k.eventually(&["get", "rs", "-l", "app=web", "-o", &rs_of("2")], "revision 2", |o| o.ends_with(" 3 Deployment"));
    k.eventually(&["get", "rs", "-l", "app=web", "-o", &rs_of("1")], "old scaled to 0", |o| o.ends_with(" 0 Deployment"));
    k.eventually(&["rollout", "history", "deploy/web"], "history", |o| o.lines().any(|l| l.starts_with('1')) && o.lines().any(|l| l.starts_with('2')));
    assert!(k.ok(&["rollout", "history", "deploy/web", "--revision=2"]).contains("busybox:1.37"));
    // Undo restores the previous template, which becomes revision 3.
    assert!(k.ok(&["rollout", "undo", "deploy/web"]).contains("rolled back"));
    k.eventually(&["get", "deploy", "web", "-o", "jsonpath={.spec.template.spec.containers[0].image}"], "undo", |o| o == "busybox:1.36");
    k.eventually(&["get", "rs", "-l", "app=web", "-o", &rs_of("3")], "revision 3 reuses the first ReplicaSet", |o| o.ends_with(" 3 Deployment"));
    // Scaling goes to the current ReplicaSet.
    k.ok(&["scale", "deploy", "web", "--replicas=5"]);
    k.eventually(&["get", "pods", "-l", "app=web", "-o", "name"], "5 pods", |o| o.lines().count() == 5);
    // Deleting the Deployment removes its ReplicaSets and pods (garbage collector).
    k.ok(&["delete", "deploy", "web"]);
    k.eventually(&["get", "rs,pods", "-l", "app=web", "-o", "name"], "cascade", |o| o.trim().is_empty() || o.contains("No resources"));
}

#[test]
fn services_get_endpoints_and_slices_that_follow_pods() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "ctl", &[]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    k.ok(&["create", "deployment", "web", "--image=busybox", "--replicas=2"]);
    k.ok(&["expose", "deployment", "web", "--port=80", "--target-port=8080"]);
    k.eventually(&["get", "endpoints", "web", "-o", "name"], "endpoints", |o| o.contains("endpoints/web"));
    k.eventually(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web", "-o", "jsonpath={.items[0].metadata.labels.endpointslice\\.kubernetes\\.io/managed-by}/{.items[0].ports[0].port}"], "slice", |o| o == "endpointslice-controller.k8s.io/8080");
    k.eventually(&["get", "pods", "-l", "app=web", "-o", "name"], "pods", |o| o.lines().count() == 2);
    // A pod turning Ready with an IP (what the agent reports) becomes a ready endpoint.
    let pod = k.ok(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[0].metadata.name}"]);
    let token = std::fs::read_to_string(s.data_dir.join("pki/admin.token")).unwrap();
    let o = Command::new("curl")
        .args(["-sk", "-X", "PATCH", "-H", &format!("Authorization: Bearer {}", token.trim()), "-H", "Content-Type: application/merge-patch+json", "-d", r#"{"status":{"podIP":"10.0.0.7","phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}"#])
        .arg(format!("https://{}/api/v1/namespaces/default/pods/{pod}/status", s.api))
        .output()
        .unwrap();
    assert!(o.status.success());
    k.eventually(&["get", "endpoints", "web", "-o", "jsonpath={.subsets[0].addresses[0].ip}:{.subsets[0].ports[0].port}"], "ready address", |o| o == "10.0.0.7:8080");
    k.eventually(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web", "-o", "jsonpath={.items[0].endpoints[0].addresses[0]}/{.items[0].endpoints[0].conditions.ready}"], "ready slice endpoint", |o| o == "10.0.0.7/true");
    // Controllers record events.
    k.eventually(&["get", "events", "-o", "jsonpath={range .items[*]}{.reason}{\" \"}{end}"], "events", |o| o.contains("ScalingReplicaSet") && o.contains("SuccessfulCreate"));
    // Deleting the Service removes both.
    k.ok(&["delete", "service", "web"]);
    k.eventually(&["get", "endpoints,endpointslices", "-o", "name"], "cleanup", |o| !o.contains("web"));
}

#[test]
fn silent_nodes_are_tainted_and_their_pods_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "ctl", &["--node-monitor-grace-period", "3s", "--node-eviction-rate", "10", "--scheduler=false"]); // binds by hand
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    k.apply("apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n");
    let ready = |s: &Server| patch_status(s, "/api/v1/nodes/n1/status", &format!(r#"{{"status":{{"conditions":[{{"type":"Ready","status":"True","reason":"KubeletReady","lastHeartbeatTime":"{}"}}]}}}}"#, now_rfc3339()));
    ready(&s);
    // Node IPAM: each node gets the next /24 of the cluster range.
    k.apply("apiVersion: v1\nkind: Node\nmetadata: {name: n2}\n");
    k.eventually(&["get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.name}={.spec.podCIDR} {end}"], "pod CIDRs", |o| {
        let mut cidrs: Vec<&str> = o.split_whitespace().filter_map(|x| x.split_once('=').map(|(_, c)| c)).collect();
        cidrs.sort();
        cidrs == ["10.0.0.0/24", "10.0.1.0/24"]
    });
    // n2 keeps reporting (a node lifecycle controller that sees every node silent assumes
    // it is the one cut off and evicts nothing: checked at the end).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = {
        let (stop, api) = (stop.clone(), s.api.to_string());
        let token = std::fs::read_to_string(s.data_dir.join("pki/admin.token")).unwrap();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = format!(r#"{{"status":{{"conditions":[{{"type":"Ready","status":"True","reason":"KubeletReady","lastHeartbeatTime":"{}"}}]}}}}"#, now_rfc3339());
                let _ = Command::new("curl").args(["-sk", "-o", "/dev/null", "-X", "PATCH", "-H", &format!("Authorization: Bearer {}", token.trim()), "-H", "Content-Type: application/merge-patch+json", "-d", &body]).arg(format!("https://{api}/api/v1/nodes/n2/status")).output();
                std::thread::sleep(Duration::from_millis(700));
            }
        })
    };
    // Pods tolerate an unreachable node for 300 s by default (DefaultTolerationSeconds);
    // these for 1 s.
    k.apply("apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: rs1}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: nodetest}}\n  template:\n    metadata: {labels: {app: nodetest}}\n    spec:\n      tolerations: [{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 1}]\n      containers: [{name: c, image: busybox}]\n");
    let names = ["get", "pods", "-l", "app=nodetest", "-o", "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}"];
    k.eventually(&names, "2 pods", |o| pod_names(o).len() == 2);
    let token = std::fs::read_to_string(s.data_dir.join("pki/admin.token")).unwrap();
    for p in pod_names(&k.ok(&names)) {
        let binding = format!(r#"{{"apiVersion":"v1","kind":"Binding","metadata":{{"name":"{p}"}},"target":{{"kind":"Node","name":"n1"}}}}"#);
        let o = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", &format!("Authorization: Bearer {}", token.trim()), "-H", "Content-Type: application/json", "-d", &binding])
            .arg(format!("https://{}/api/v1/namespaces/default/pods/{p}/binding", s.api))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&o.stdout), "201", "binding {p}");
    }
    k.eventually(&["get", "pods", "-l", "app=nodetest", "-o", "jsonpath={range .items[*]}{.spec.nodeName}{\" \"}{end}"], "bound", |o| o.trim() == "n1 n1");
    // No heartbeat for longer than the grace period: Unknown, tainted, pods evicted and replaced.
    k.eventually(&["get", "node", "n1", "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"], "Unknown", |o| o == "Unknown");
    k.eventually(&["get", "node", "n1", "-o", "jsonpath={.spec.taints[*].key}"], "taint", |o| o.contains("node.kubernetes.io/unreachable"));
    k.eventually(&["get", "pods", "-l", "app=nodetest", "-o", "jsonpath={range .items[*]}{.metadata.deletionTimestamp}|{.spec.nodeName}{\"\\n\"}{end}"], "evicted and replaced", |o| {
        let lines: Vec<&str> = o.lines().collect();
        lines.iter().filter(|l| !l.starts_with('|')).count() == 2 && lines.iter().filter(|l| **l == "|").count() == 2
    });
    // The node reports Ready again: the taint goes away.
    ready(&s);
    k.eventually(&["get", "node", "n1", "-o", "jsonpath={.spec.taints}"], "untainted", |o| !o.contains("unreachable"));
    // Every node silent: master disruption mode, no NoExecute taint (nothing is evicted).
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    keeper.join().unwrap();
    k.eventually(&["get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.name}={.spec.taints[*].effect} {end}"], "NoSchedule only on every node", |o| {
        let mut v: Vec<&str> = o.split_whitespace().collect();
        v.sort();
        v == ["n1=NoSchedule", "n2=NoSchedule"]
    });
}

#[test]
fn daemonsets_run_one_pod_per_eligible_node() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "ctl", &[]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    for (n, role) in [("e1", "edge"), ("e2", "edge"), ("c1", "core")] {
        k.apply(&format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {n}, labels: {{role: {role}}}}}\n"));
    }
    k.apply("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: agent}\nspec:\n  selector: {matchLabels: {app: agent}}\n  template:\n    metadata: {labels: {app: agent}}\n    spec:\n      nodeSelector: {role: edge}\n      containers: [{name: c, image: busybox}]\n");
    // The scheduler binds daemon pods to their nodes, so removed ones stay Terminating
    // (no agent here finishes their graceful deletion): count only live pods.
    let pinned = ["get", "pods", "-l", "app=agent", "-o", "jsonpath={range .items[*]}{.metadata.deletionTimestamp}|{.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchFields[0].values[0]} {end}"];
    let sorted = |o: &str| {
        let mut v: Vec<String> = o.split_whitespace().filter_map(|x| x.strip_prefix('|')).map(String::from).collect();
        v.sort();
        v
    };
    k.eventually(&pinned, "a pod per edge node", |o| sorted(o) == ["e1", "e2"]);
    k.eventually(&["get", "ds", "agent", "-o", "jsonpath={.status.desiredNumberScheduled}/{.status.currentNumberScheduled}"], "status", |o| o == "2/2");
    // A node joining the selection gets a pod; one leaving it loses its pod.
    k.ok(&["label", "node", "c1", "role=edge", "--overwrite"]);
    k.eventually(&pinned, "three edge nodes", |o| sorted(o) == ["c1", "e1", "e2"]);
    k.ok(&["label", "node", "e2", "role=core", "--overwrite"]);
    k.eventually(&pinned, "e2 left", |o| sorted(o) == ["c1", "e1"]);
    // Deleting the DaemonSet removes its pods.
    k.eventually(&["get", "pods", "-l", "app=agent", "-o", "jsonpath={range .items[*]}{.spec.nodeName} {end}"], "bound by the scheduler", |o| {
        let mut v: Vec<&str> = o.split_whitespace().collect();
        v.sort();
        v.starts_with(&["c1", "e1"])
    });
    k.ok(&["delete", "ds", "agent"]);
    k.eventually(&pinned, "cleanup", |o| sorted(o).is_empty());
}

#[test]
fn statefulsets_create_in_order_with_stable_names_and_claims() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "ctl", &[]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    k.apply("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\nspec:\n  replicas: 3\n  serviceName: db\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}}\n    spec: {containers: [{name: c, image: busybox, volumeMounts: [{name: data, mountPath: /data}]}]}\n  volumeClaimTemplates:\n  - metadata: {name: data}\n    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n");
    let names = ["get", "pods", "-l", "app=db", "-o", "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}"];
    // OrderedReady: db-1 waits until db-0 is Running and Ready.
    k.eventually(&names, "db-0 first", |o| pod_names(o) == ["db-0"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pod_names(&k.ok(&names)), ["db-0"], "db-1 must wait for db-0");
    let running = r#"{"status":{"phase":"Running","podIP":"10.0.0.9","conditions":[{"type":"Ready","status":"True"}]}}"#;
    patch_status(&s, "/api/v1/namespaces/default/pods/db-0/status", running);
    k.eventually(&names, "db-1", |o| pod_names(o) == ["db-0", "db-1"]);
    patch_status(&s, "/api/v1/namespaces/default/pods/db-1/status", running);
    k.eventually(&names, "db-2", |o| pod_names(o) == ["db-0", "db-1", "db-2"]);
    assert_eq!(k.ok(&["get", "pod", "db-1", "-o", "jsonpath={.spec.hostname}.{.spec.subdomain} {.spec.volumes[?(@.name==\"data\")].persistentVolumeClaim.claimName}"]), "db-1.db data-db-1");
    k.eventually(&["get", "pvc", "-o", "name"], "claims", |o| o.lines().count() == 3 && o.contains("data-db-2"));
    // Scale down removes the highest ordinal; the claims stay.
    k.ok(&["scale", "sts", "db", "--replicas=2"]);
    k.eventually(&names, "db-2 removed", |o| pod_names(o) == ["db-0", "db-1"]);
    assert!(k.ok(&["get", "pvc", "data-db-2", "-o", "name"]).contains("data-db-2"));
    // A deleted pod comes back with the same name.
    k.ok(&["delete", "pod", "db-1", "--grace-period=0"]);
    k.eventually(&["get", "pod", "db-1", "-o", "jsonpath={.metadata.name}/{.metadata.deletionTimestamp}"], "db-1 recreated", |o| o == "db-1/");
}

#[test]
fn load_balancer_services_get_addresses_from_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    // A pool that overlaps the cluster CIDR is refused at start-up, with the reason.
    let o = Command::new(env!("CARGO_BIN_EXE_shoal")).args(["server", "--data-dir"]).arg(dir.path().join("bad")).args(["--load-balancer-ip-pool", "10.1.0.0/28"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--load-balancer-ip-pool overlaps the cluster CIDR 10.0.0.0/8"), "{}", String::from_utf8_lossy(&o.stderr));

    let s = Server::start_api(dir.path(), "ctl", &["--load-balancer-ip-pool", "192.0.2.10-192.0.2.11"]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    let ip = |name: &str| k.ok(&["get", "service", name, "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"]);
    k.ok(&["create", "service", "loadbalancer", "a", "--tcp=80:8080"]);
    k.eventually(&["get", "service", "a", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"], "first address", |o| o == "192.0.2.10");
    k.ok(&["create", "service", "loadbalancer", "b", "--tcp=80:8080"]);
    k.eventually(&["get", "service", "b", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"], "second address", |o| o == "192.0.2.11");
    k.eventually(&["get", "service", "b", "--no-headers"], "EXTERNAL-IP column", |o| o.contains("192.0.2.11"));
    // The pool is empty: the third waits, with a warning.
    k.ok(&["create", "service", "loadbalancer", "c", "--tcp=80:8080"]);
    k.eventually(&["get", "events", "--field-selector", "involvedObject.name=c,reason=AllocationFailed", "-o", "jsonpath={.items[*].message}"], "allocation failure", |o| o.contains("no available IPs in the load balancer pool"));
    assert_eq!(ip("c"), "");
    k.eventually(&["get", "events", "--field-selector", "involvedObject.name=a", "-o", "jsonpath={.items[*].reason}"], "upstream's events", |o| o.contains("EnsuringLoadBalancer") && o.contains("EnsuredLoadBalancer"));
    // Deleting a frees its address for c; b turning into a ClusterIP service loses its own.
    k.ok(&["delete", "service", "a"]);
    k.eventually(&["get", "service", "c", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"], "c gets a's address", |o| o == "192.0.2.10");
    k.ok(&["patch", "service", "b", "-p", r#"{"spec":{"type":"ClusterIP","ports":[{"port":80,"targetPort":8080,"protocol":"TCP","name":"80-8080","nodePort":null}]}}"#]);
    k.eventually(&["get", "service", "b", "-o", "jsonpath={.status.loadBalancer}"], "b's address released", |o| o.is_empty() || o == "{}");
    // A service of another class is not ours.
    k.apply("apiVersion: v1\nkind: Service\nmetadata: {name: other}\nspec: {type: LoadBalancer, loadBalancerClass: example.com/lb, ports: [{port: 80}]}\n");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ip("other"), "");
}
