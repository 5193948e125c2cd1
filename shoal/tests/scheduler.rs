//! The scheduler inside `shoal server`, driven and observed with kubectl: pending pods get
//! bound within what nodes allocate, a pod that fits nowhere gets upstream's condition and
//! event, and a new node makes it schedulable.

mod common;

use common::kube::{kubectl_bin, patch_status, K};
use common::Server;

fn add_node(k: &K, s: &Server, name: &str, cpu: &str, labels: &str) {
    k.apply(&format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n"));
    patch_status(s, &format!("/api/v1/nodes/{name}/status"), &format!(r#"{{"status":{{"allocatable":{{"cpu":"{cpu}","memory":"4Gi","pods":"110"}},"capacity":{{"cpu":"{cpu}","memory":"4Gi","pods":"110"}}}}}}"#));
}

const DEPLOY: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 6
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, image: busybox, resources: {requests: {cpu: 500m}}}]}
";

fn nodes_of(k: &K, selector: &str) -> Vec<String> {
    let out = k.ok(&["get", "pods", "-l", selector, "-o", "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}"]);
    out.lines().map(String::from).collect()
}

#[test]
fn pending_pods_are_bound_within_capacity_and_unschedulable_ones_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "sched", &["--scheduler-profile", "kubernetes"]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    for (n, zone) in [("n1", "a"), ("n2", "a"), ("n3", "b")] {
        add_node(&k, &s, n, "1", &format!("zone: {zone}"));
    }
    // 6 pods of 500m on three 1-CPU nodes: exactly two per node.
    k.apply(DEPLOY);
    k.eventually(&["get", "pods", "-l", "app=web", "-o", "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}"], "6 bound", |o| o.lines().filter(|l| !l.is_empty()).count() == 6);
    let mut per_node = nodes_of(&k, "app=web");
    per_node.sort();
    assert_eq!(per_node, ["n1", "n1", "n2", "n2", "n3", "n3"]);
    k.eventually(&["get", "events", "--field-selector", "reason=Scheduled", "-o", "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}"], "Scheduled events", |o| {
        o.lines().filter(|l| l.starts_with("Successfully assigned default/web-")).count() == 6
    });

    // A seventh fits nowhere: PodScheduled=False/Unschedulable and a FailedScheduling event
    // with upstream's summary.
    k.ok(&["scale", "deployment", "web", "--replicas", "7"]);
    let msg = "0/3 nodes are available: 3 Insufficient cpu.";
    k.eventually(&["get", "pods", "-l", "app=web", "-o", "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"PodScheduled\")].reason}|{.status.conditions[?(@.type==\"PodScheduled\")].message}{\"\\n\"}{end}"], "unschedulable condition", |o| {
        o.lines().any(|l| l == format!("Unschedulable|{msg}"))
    });
    k.eventually(&["get", "events", "--field-selector", "reason=FailedScheduling", "-o", "jsonpath={range .items[*]}{.type} {.message}{\"\\n\"}{end}"], "FailedScheduling event", |o| o.lines().any(|l| l == format!("Warning {msg}")));

    // A new node makes it schedulable.
    add_node(&k, &s, "n4", "1", "zone: c");
    k.eventually(&["get", "pods", "-l", "app=web", "-o", "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}"], "7th bound to n4", |o| o.lines().filter(|l| *l == "n4").count() == 1 && o.lines().filter(|l| !l.is_empty()).count() == 7);

    // nodeSelector and a toleration-less pod against a tainted node.
    k.ok(&["taint", "node", "n4", "dedicated=batch:NoSchedule"]);
    k.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: zoned, labels: {app: zoned}}\nspec:\n  nodeSelector: {zone: c}\n  containers: [{name: c, image: busybox}]\n");
    k.eventually(&["get", "pod", "zoned", "-o", "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].message}"], "taint blocks zone c", |o| {
        o == "0/4 nodes are available: 1 node(s) had untolerated taint {dedicated: batch}, 3 node(s) didn't match Pod's node affinity/selector."
    });
    k.ok(&["taint", "node", "n4", "dedicated-"]);
    k.eventually(&["get", "pod", "zoned", "-o", "jsonpath={.spec.nodeName}"], "zoned pod bound once the taint is gone", |o| o == "n4");

    // Deleting pods frees their share: scale down, and a big pod fits again.
    // (No agent runs here to finish graceful deletion: force it, as for a lost node.)
    k.ok(&["scale", "deployment", "web", "--replicas", "0"]);
    k.eventually(&["get", "pods", "-l", "app=web", "-o", "jsonpath={range .items[*]}{.metadata.deletionTimestamp}{\"\\n\"}{end}"], "all terminating", |o| o.lines().count() == 7 && o.lines().all(|l| !l.is_empty()));
    k.ok(&["delete", "pods", "-l", "app=web", "--force", "--grace-period=0"]);
    k.eventually(&["get", "pods", "-l", "app=web", "-o", "name"], "scaled down", |o| o.trim().is_empty());
    k.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: big}\nspec:\n  containers: [{name: c, image: busybox, resources: {requests: {cpu: '1'}}}]\n");
    k.eventually(&["get", "pod", "big", "-o", "jsonpath={.spec.nodeName}"], "big pod bound", |o| o.starts_with('n'));
    let scheduled = k.ok(&["get", "--raw", "/metrics"]);
    assert!(scheduled.contains("scheduler_schedule_attempts_total{result=\"scheduled\",profile=\"default-scheduler\"}"), "metrics: {}", scheduled.lines().filter(|l| l.contains("scheduler_")).collect::<Vec<_>>().join("\n"));
}

#[test]
fn a_higher_priority_pod_preempts_a_lower_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "sched", &[]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    add_node(&k, &s, "n1", "1", "zone: a");
    k.ok(&["create", "priorityclass", "low", "--value=10"]);
    k.ok(&["create", "priorityclass", "high", "--value=1000"]);
    let pod = |name: &str, class: &str| format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  priorityClassName: {class}\n  containers: [{{name: c, image: busybox, resources: {{requests: {{cpu: '1'}}}}}}]\n");
    k.apply(&pod("victim", "low"));
    k.eventually(&["get", "pod", "victim", "-o", "jsonpath={.spec.nodeName}"], "victim bound", |o| o == "n1");
    // A pod that never preempts waits.
    k.ok(&["create", "priorityclass", "polite", "--value=2000", "--preemption-policy=Never"]);
    k.apply(&pod("polite", "polite"));
    k.eventually(&["get", "pod", "polite", "-o", "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].reason}"], "polite waits", |o| o == "Unschedulable");
    k.ok(&["delete", "pod", "polite", "--wait=false"]);
    // The high-priority pod evicts the victim and nominates the node.
    k.apply(&pod("vip", "high"));
    k.eventually(&["get", "pod", "vip", "-o", "jsonpath={.status.nominatedNodeName}"], "nominated", |o| o == "n1");
    k.eventually(&["get", "pod", "victim", "-o", "jsonpath={.metadata.deletionTimestamp}|{.status.conditions[?(@.type==\"DisruptionTarget\")].reason}"], "victim evicted", |o| {
        o.ends_with("|PreemptionByScheduler") && !o.starts_with('|')
    });
    k.eventually(&["get", "events", "--field-selector", "reason=Preempted", "-o", "jsonpath={.items[*].message}"], "Preempted event", |o| o.contains("Preempted by pod default/vip on node n1"));
    // No agent finishes the graceful deletion here: force it, as the kubelet would.
    k.ok(&["delete", "pod", "victim", "--force", "--grace-period=0"]);
    k.eventually(&["get", "pod", "vip", "-o", "jsonpath={.spec.nodeName}"], "vip bound", |o| o == "n1");
}

fn admin(s: &Server, token_file: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["admin", "--server", &format!("http://{}", s.admin), "--token-file"])
        .arg(token_file)
        .args(args)
        .output()
        .unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

#[test]
fn admin_api_tunes_the_scheduler_live_and_explains_a_pod() {
    let dir = tempfile::tempdir().unwrap();
    // A profile from a KubeSchedulerConfiguration file.
    let cfg_file = dir.path().join("scheduler.yaml");
    std::fs::write(&cfg_file, "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\nprofiles:\n- schedulerName: batch\n  plugins:\n    score:\n      disabled: [{name: '*'}]\n      enabled: [{name: NodeResourcesFit, weight: 9}]\n").unwrap();
    let s = Server::start_api(dir.path(), "sched", &["--scheduler-config", cfg_file.to_str().unwrap()]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    let token = s.data_dir.join("pki/admin.token");
    add_node(&k, &s, "n1", "1", "zone: a");
    k.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: big}\nspec:\n  containers: [{name: c, image: busybox, resources: {requests: {cpu: '2'}}}]\n");
    k.eventually(&["get", "pod", "big", "-o", "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].reason}"], "big is unschedulable", |o| o == "Unschedulable");

    let (code, out, err) = admin(&s, &token, &["-o", "json", "scheduler", "config"]);
    assert_eq!(code, 0, "{err}");
    let cfg: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dflt = cfg["profiles"].as_array().unwrap().iter().find(|p| p["schedulerName"] == "default-scheduler").unwrap().clone();
    assert_eq!((dflt["base"].as_str(), dflt["weights"]["ImageLocality"].as_i64()), (Some("shoal"), Some(20)));
    let batch = cfg["profiles"].as_array().unwrap().iter().find(|p| p["schedulerName"] == "batch").expect("the file's profile").clone();
    assert_eq!((batch["weights"]["NodeResourcesFit"].as_i64(), batch["weights"]["ImageLocality"].as_i64()), (Some(9), Some(0)), "{batch}");

    // A bad change is refused with the reason and changes nothing.
    let (code, _, err) = admin(&s, &token, &["scheduler", "set", "--weight", "ImageLocality=7", "--percentage-of-nodes-to-score", "0"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("percentageOfNodesToScore must be between 1 and 100, got 0"), "{err}");
    let (code, _, err) = admin(&s, &token, &["scheduler", "set", "--weight", "Bogus=1"]);
    assert_eq!(code, 5);
    assert!(err.contains("unknown score plugin \"Bogus\""), "{err}");
    let (_, out, _) = admin(&s, &token, &["-o", "json", "scheduler", "config"]);
    assert!(out.contains("\"ImageLocality\":20"), "unchanged: {out}");
    // A good one applies at once.
    let (code, out, err) = admin(&s, &token, &["scheduler", "set", "--weight", "ImageLocality=7", "--parallelism", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.starts_with("default-scheduler") && l.split_whitespace().nth(4) == Some("7")), "{out}");

    // Queue and explain.
    // (The profile change sent the unschedulable pod to the backoff queue for another try.)
    let (code, out, _) = admin(&s, &token, &["-o", "json", "scheduler", "queue"]);
    assert_eq!(code, 0);
    let q: serde_json::Value = serde_json::from_str(&out).unwrap();
    let waiting = ["active", "backoff", "unschedulable", "inFlight"].iter().map(|k| q[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!((waiting, q["nodes"].as_u64()), (1, Some(1)), "{out}");
    let (code, out, err) = admin(&s, &token, &["scheduler", "explain", "default/big"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no node fits: 0/1 nodes are available: 1 Insufficient cpu."), "{out}");
    assert!(out.lines().any(|l| l.starts_with("n1") && l.contains("false") && l.contains("Insufficient cpu")), "{out}");
    let (code, _, err) = admin(&s, &token, &["scheduler", "explain", "default/nope"]);
    assert_eq!(code, 6, "{err}");

    // Wrong token, no token file, nobody listening.
    let bad = dir.path().join("bad.token");
    std::fs::write(&bad, "not-the-token").unwrap();
    let (code, _, err) = admin(&s, &bad, &["scheduler", "config"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("the admin token is not valid"), "{err}");
    let (code, _, _) = admin(&s, &dir.path().join("missing"), &["scheduler", "config"]);
    assert_eq!(code, 4);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_shoal")).args(["admin", "--server", &format!("http://127.0.0.1:{}", common::free_port()), "--token-file"]).arg(&token).args(["scheduler", "config"]).output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach the admin API"));
}

#[test]
fn a_gang_is_bound_all_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "sched", &[]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    add_node(&k, &s, "n1", "1", "zone: a");
    add_node(&k, &s, "n2", "1", "zone: a");
    // Three members of one CPU each, at least three together: only two fit.
    for i in 0..3 {
        k.apply(&format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: w{i}\n  labels: {{shoal.io/pod-group: train}}\n  annotations: {{shoal.io/pod-group-min-member: '3', shoal.io/pod-group-timeout-seconds: '2'}}\nspec:\n  containers: [{{name: c, image: busybox, resources: {{requests: {{cpu: '1'}}}}}}]\n"));
    }
    let bound = ["get", "pods", "-l", "shoal.io/pod-group=train", "-o", "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}"];
    k.eventually(&["get", "events", "--field-selector", "reason=FailedScheduling", "-o", "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}"], "the group timed out", |o| {
        o.contains("pod group default/train: only 2 of 3 members could be placed before the group's timeout")
    });
    assert!(k.ok(&bound).lines().all(|l| l.is_empty()), "no member bound while the group is incomplete");
    // Room for the third: all three are bound.
    add_node(&k, &s, "n3", "1", "zone: b");
    k.eventually(&bound, "all members bound", |o| {
        let mut v: Vec<&str> = o.lines().filter(|l| !l.is_empty()).collect();
        v.sort();
        v == ["n1", "n2", "n3"]
    });
}

#[test]
fn pods_with_claims_get_local_volumes_on_their_node() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "sched", &[]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    add_node(&k, &s, "n1", "2", "kubernetes.io/hostname: n1");
    add_node(&k, &s, "n2", "2", "kubernetes.io/hostname: n2");
    // The default class (standard: the node-local provisioner, WaitForFirstConsumer).
    k.eventually(&["get", "storageclass", "-o", "jsonpath={range .items[*]}{.metadata.name} {.provisioner} {.volumeBindingMode}{end}"], "default class", |o| o == "standard shoal.io/local-path WaitForFirstConsumer");
    k.apply("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data}\nspec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 64Mi}}}\n");
    assert_eq!(k.ok(&["get", "pvc", "data", "-o", "jsonpath={.spec.storageClassName}"]), "standard", "DefaultStorageClass admission");
    k.eventually(&["get", "events", "--field-selector", "reason=WaitForFirstConsumer", "-o", "name"], "waits for its first consumer", |o| !o.trim().is_empty());
    let user = |name: &str, claim: &str| format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers: [{{name: c, image: busybox, volumeMounts: [{{name: d, mountPath: /data}}]}}]\n  volumes: [{{name: d, persistentVolumeClaim: {{claimName: {claim}}}}}]\n");
    k.apply(&user("first", "data"));
    k.eventually(&["get", "pod", "first", "-o", "jsonpath={.spec.nodeName}"], "first bound", |o| o.starts_with('n'));
    let node = k.ok(&["get", "pod", "first", "-o", "jsonpath={.spec.nodeName}"]);
    assert_eq!(k.ok(&["get", "pvc", "data", "-o", "jsonpath={.status.phase}"]), "Bound");
    let pv = k.ok(&["get", "pvc", "data", "-o", "jsonpath={.spec.volumeName}"]);
    assert_eq!(k.ok(&["get", "pv", &pv, "-o", "jsonpath={.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}"]), node, "the volume lives on the pod's node");
    // A second user of the claim follows the volume to its node.
    k.apply(&user("second", "data"));
    k.eventually(&["get", "pod", "second", "-o", "jsonpath={.spec.nodeName}"], "second bound to the volume's node", |o| o == node);
    // A claim that does not exist, and an Immediate claim nothing can bind.
    k.apply(&user("lost", "nope"));
    k.eventually(&["get", "pod", "lost", "-o", "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].message}"], "missing claim", |o| o == "0/2 nodes are available: persistentvolumeclaim \"nope\" not found.");
    k.apply("apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: manual}\nprovisioner: kubernetes.io/no-provisioner\nvolumeBindingMode: Immediate\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: imm}\nspec: {storageClassName: manual, accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n");
    k.apply(&user("early", "imm"));
    k.eventually(&["get", "pod", "early", "-o", "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].message}"], "unbound immediate claim", |o| o == "0/2 nodes are available: pod has unbound immediate PersistentVolumeClaims.");
    // A matching volume appears: the binder binds the claim, then the pod is scheduled.
    k.apply("apiVersion: v1\nkind: PersistentVolume\nmetadata: {name: static}\nspec: {capacity: {storage: 2Gi}, accessModes: [ReadWriteOnce], storageClassName: manual, hostPath: {path: /tmp/static}}\n");
    k.eventually(&["get", "pvc", "imm", "-o", "jsonpath={.status.phase}/{.spec.volumeName}"], "static volume bound", |o| o == "Bound/static");
    k.eventually(&["get", "pod", "early", "-o", "jsonpath={.spec.nodeName}"], "early bound", |o| o.starts_with('n'));
    // Deleting a claim deletes its provisioned volume (reclaim policy Delete).
    k.ok(&["delete", "pod", "first", "second", "--force", "--grace-period=0"]);
    k.ok(&["delete", "pvc", "data", "--wait=false"]);
    k.eventually(&["get", "pv", "-o", "name"], "provisioned volume deleted", |o| !o.contains(&pv));
}
