//! The agent protocol end to end: hollow nodes (real protocol clients on the simulated
//! runtime) join `shoal server` with its bootstrap token, run Deployments that kubectl
//! drives (rollout, scale, image change, undo, logs, pod deletion), and resume after a
//! server crash without a relist and without losing a status.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kube::{kubectl_bin, K};
use common::Server;
use serde_json::Value;
use shoal_agent::runtime::sim::{Sim, SimSettings};
use shoal_agent::{Agent, AgentConfig, AgentStats};
use shoal_proto::agent::node_agent_client::NodeAgentClient;

struct Fleet {
    rt: tokio::runtime::Runtime,
    agents: Vec<Arc<Agent<Sim>>>,
    stats: Arc<AgentStats>,
    stop: tokio::sync::watch::Sender<bool>,
}

fn fleet(s: &Server, names: &[&str], start_delay: Duration) -> Fleet {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cfg = shoal_client::Config::from_kubeconfig(&s.kubeconfig(), "test").unwrap();
    let token = std::fs::read_to_string(s.data_dir.join("pki/bootstrap-token")).expect("the server writes a bootstrap token");
    let stats = Arc::new(AgentStats::default());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let _g = rt.enter();
    let channel = shoal_agent::connect::channel(&cfg.server, &cfg.ca_pem).unwrap();
    let agents = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut c = AgentConfig::new(n, token.trim());
            c.host_ip = format!("192.0.2.{}", i + 10);
            c.heartbeat = Duration::from_secs(2);
            let a = Agent::new(c, channel.clone(), Arc::new(Sim::new(SimSettings { start_delay, init_run: Duration::from_millis(50) })), stats.clone());
            rt.spawn(a.clone().run(stop_rx.clone()));
            a
        })
        .collect();
    Fleet { rt, agents, stats, stop }
}

fn wait(what: &str, limit: Duration, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pods(k: &K, sel: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&k.ok(&["get", "pods", "-l", sel, "-o", "json"])).unwrap();
    v["items"].as_array().cloned().unwrap_or_default()
}

fn in_cidr(ip: &str, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let (ip, net): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (ip.parse().unwrap(), net.parse().unwrap());
    let mask = !0u32 << (32 - len.parse::<u32>().unwrap());
    u32::from(ip) & mask == u32::from(net) & mask
}

#[test]
fn hollow_nodes_run_deployments_that_kubectl_drives() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "a", &[]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };

    // Registration is refused without a valid bootstrap token, with the reason.
    let f = fleet(&s, &["hollow-0", "hollow-1", "hollow-2"], Duration::from_millis(100));
    let cfg = shoal_client::Config::from_kubeconfig(&s.kubeconfig(), "test").unwrap();
    f.rt.block_on(async {
        let mut c = NodeAgentClient::new(shoal_agent::connect::channel(&cfg.server, &cfg.ca_pem).unwrap());
        for (tok, want) in [("abcdef.0123456789abcdef", "unknown bootstrap token"), ("not-a-token", "a bootstrap token"), ("", "a bootstrap token")] {
            let e = c.register(shoal_proto::agent::RegisterRequest { bootstrap_token: tok.into(), node_name: "intruder".into(), node_json: Default::default() }).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{tok}: {e:?}");
            assert!(e.message().contains(want), "{tok}: {}", e.message());
        }
        let bad_name = c.register(shoal_proto::agent::RegisterRequest { bootstrap_token: std::fs::read_to_string(s.data_dir.join("pki/bootstrap-token")).unwrap().trim().into(), node_name: "Bad_Name".into(), node_json: Default::default() }).await.unwrap_err();
        assert_eq!(bad_name.code(), tonic::Code::InvalidArgument, "{bad_name:?}");
        // A session needs a node credential.
        let (_tx, rx) = tokio::sync::mpsc::channel::<shoal_proto::agent::AgentMessage>(1);
        let e = c.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    });
    let (ok, out) = k.run(&["get", "node", "intruder"], None);
    assert!(!ok && out.contains("NotFound"), "a refused registration creates nothing: {out}");

    // The nodes register, get pod CIDRs and report Ready.
    k.eventually(&["get", "nodes", "--no-headers"], "3 Ready hollow nodes", |o| o.lines().filter(|l| l.contains(" Ready ")).count() == 3);
    k.eventually(&["get", "leases", "-n", "kube-node-lease", "--no-headers"], "a Lease per node", |o| o.lines().count() == 3);
    // Heartbeats (every 2 s here) keep renewing them.
    let renew = || k.ok(&["get", "lease", "-n", "kube-node-lease", "hollow-0", "-o", "jsonpath={.spec.renewTime}"]);
    let first = renew();
    k.eventually(&["get", "lease", "-n", "kube-node-lease", "hollow-0", "-o", "jsonpath={.spec.renewTime}"], "a renewed Lease", |o| !o.is_empty() && o != first);
    assert_eq!(k.ok(&["get", "lease", "-n", "kube-node-lease", "hollow-0", "-o", "jsonpath={.spec.holderIdentity}"]), "hollow-0");
    let nodes: Value = serde_json::from_str(&k.ok(&["get", "nodes", "-o", "json"])).unwrap();
    for n in nodes["items"].as_array().unwrap() {
        assert_eq!(n["status"]["nodeInfo"]["containerRuntimeVersion"], "sim://0.1.0");
        assert!(n["status"]["allocatable"]["cpu"].is_string());
    }

    k.ok(&["create", "deployment", "web", "--image=nginx:1.27", "--replicas=5"]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let cidr_of = |node: &str| -> String { nodes["items"].as_array().unwrap().iter().find(|n| n["metadata"]["name"] == node).and_then(|n| n["spec"]["podCIDR"].as_str()).map(String::from).unwrap_or_else(|| k.ok(&["get", "node", node, "-o", "jsonpath={.spec.podCIDR}"])) };
    let running = pods(&k, "app=web");
    assert_eq!(running.len(), 5);
    for p in &running {
        assert_eq!(p["status"]["phase"], "Running", "{p}");
        let node = p["spec"]["nodeName"].as_str().unwrap();
        let ip = p["status"]["podIP"].as_str().unwrap();
        assert!(in_cidr(ip, &cidr_of(node)), "pod IP {ip} outside {node}'s podCIDR");
        assert!(p["status"]["hostIP"].as_str().unwrap().starts_with("192.0.2."));
        assert_eq!(p["status"]["containerStatuses"][0]["ready"], true);
        assert_eq!(p["status"]["qosClass"], "BestEffort", "the agent keeps the API server's qosClass");
    }
    let ips: std::collections::HashSet<&str> = running.iter().map(|p| p["status"]["podIP"].as_str().unwrap()).collect();
    assert_eq!(ips.len(), 5, "pod IPs are distinct");
    // The endpoints controller sees the pods' addresses.
    k.ok(&["expose", "deployment", "web", "--port=80"]);
    k.eventually(&["get", "endpoints", "web", "-o", "jsonpath={.subsets[0].addresses[*].ip}"], "endpoints with 5 addresses", |o| o.split_whitespace().count() == 5);

    // Logs come from the pod's agent over its session.
    let name = running[0]["metadata"]["name"].as_str().unwrap().to_string();
    let logs = k.ok(&["logs", &name]);
    assert!(logs.contains("hollow container nginx"), "{logs}");
    let (ok, out) = k.run(&["logs", &name, "-c", "nope"], None);
    assert!(!ok && out.contains("container nope is not valid for pod"), "{out}");
    let (ok, out) = k.run(&["logs", &name, "--tail=-5x"], None);
    assert!(!ok, "{out}");

    // A pod with a claim: the claim is provisioned on the pod's node and the node's agent
    // gets the claim and its volume with the pod (and a ConfigMap it mounts).
    k.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: conf}\ndata: {a: b}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data}\nspec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: store}\nspec:\n  containers: [{name: c, image: busybox}]\n  volumes: [{name: d, persistentVolumeClaim: {claimName: data}}, {name: c, configMap: {name: conf}}]\n");
    k.eventually(&["get", "pod", "store", "-o", "jsonpath={.status.phase}"], "the pod with a claim Running", |o| o == "Running");
    let pv = k.ok(&["get", "pvc", "data", "-o", "jsonpath={.spec.volumeName}"]);
    let node = k.ok(&["get", "pod", "store", "-o", "jsonpath={.spec.nodeName}"]);
    let agent = f.agents.iter().find(|a| a.name() == node).expect("the pod's node is a hollow node");
    wait("the agent holding the claim, its volume and the ConfigMap", Duration::from_secs(10), || agent.holds("PersistentVolumeClaim", "default", "data").is_some() && agent.holds("PersistentVolume", "", &pv).is_some() && agent.holds("ConfigMap", "default", "conf").is_some());
    assert!(f.agents.iter().filter(|a| a.name() != node).all(|a| a.holds("PersistentVolumeClaim", "default", "data").is_none() && a.holds("ConfigMap", "default", "conf").is_none()), "other nodes get nothing of it");
    k.ok(&["delete", "pod", "store", "--timeout=30s"]);
    wait("the agent dropping them with the pod", Duration::from_secs(10), || agent.holds("PersistentVolumeClaim", "default", "data").is_none() && agent.holds("PersistentVolume", "", &pv).is_none() && agent.holds("ConfigMap", "default", "conf").is_none());

    // Graceful delete: the agent stops the pod and the server removes it; a replacement runs.
    let t = Instant::now();
    k.ok(&["delete", "pod", &name, "--timeout=30s"]);
    assert!(t.elapsed() < Duration::from_secs(20), "deleting a pod on a hollow node took {:?}", t.elapsed());
    k.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    k.eventually(&["get", "pods", "-l", "app=web", "--no-headers"], "5 Running pods again", |o| o.lines().filter(|l| l.contains("Running")).count() == 5 && o.lines().count() == 5);

    // Image change and undo roll through the agents.
    k.ok(&["set", "image", "deployment/web", "nginx=nginx:1.28"]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    k.eventually(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].status.containerStatuses[0].image}"], "pods on nginx:1.28", |o| o.split_whitespace().count() == 5 && o.split_whitespace().all(|i| i == "nginx:1.28"));
    k.ok(&["rollout", "undo", "deployment/web"]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    k.ok(&["scale", "deployment/web", "--replicas=2"]);
    k.eventually(&["get", "pods", "-l", "app=web", "--no-headers"], "2 pods after scale-down", |o| o.lines().count() == 2);
    wait("agents holding 2 pods", Duration::from_secs(20), || f.agents.iter().map(|a| a.pods.count()).sum::<usize>() == 2);
    assert_eq!(f.stats.status_errors.load(Ordering::Relaxed), 0, "no status was refused");
    let _ = f.stop.send(true);
}

#[test]
fn an_agent_resumes_after_a_server_crash_without_a_relist_or_a_lost_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_api(dir.path(), "a", &[]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    let fast = fleet(&s, &["steady"], Duration::from_millis(50));
    let slow = fleet(&s, &["slow"], Duration::from_secs(6));
    k.eventually(&["get", "nodes", "--no-headers"], "2 Ready nodes", |o| o.lines().filter(|l| l.contains(" Ready ")).count() == 2);

    let mut yaml = String::new();
    for i in 0..20 {
        yaml.push_str(&format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, labels: {{app: steady}}}}\nspec: {{nodeName: steady, containers: [{{name: c, image: busybox}}]}}\n"));
    }
    k.apply(&yaml);
    k.eventually(&["get", "pods", "-l", "app=steady", "--no-headers"], "20 Running pods", |o| o.lines().filter(|l| l.contains("Running")).count() == 20);
    // Let the echoes of the pods' own status writes arrive.
    std::thread::sleep(Duration::from_secs(1));

    // A pod whose containers take 6 s to start: the crash happens before it is Running.
    k.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: late}\nspec: {nodeName: slow, containers: [{name: c, image: busybox}]}\n");
    wait("the slow agent holding its pod", Duration::from_secs(10), || slow.agents[0].pods.count() == 1);
    let objects_before = fast.stats.objects.load(Ordering::Relaxed);
    let sessions_before = fast.stats.sessions.load(Ordering::Relaxed);
    s.kill9();
    std::thread::sleep(Duration::from_secs(7));
    assert!(slow.agents[0].unsent() >= 1, "the Running status waits for the server");
    s.spawn();
    s.wait_api();
    wait("the steady agent back in session", Duration::from_secs(40), || fast.stats.sessions.load(Ordering::Relaxed) > sessions_before && fast.agents[0].synced.load(Ordering::Relaxed));
    k.eventually(&["get", "pod", "late", "-o", "jsonpath={.status.phase}"], "the status sent while the server was down", |o| o == "Running");
    std::thread::sleep(Duration::from_secs(1));
    let resent = fast.stats.objects.load(Ordering::Relaxed) - objects_before;
    // Only what changed (its Node's status after the reconnect), not its 20 pods again.
    assert!(resent < 5, "the server resent {resent} objects after the reconnect");
    assert_eq!(fast.agents[0].pods.count(), 20);
    let _ = fast.stop.send(true);
    let _ = slow.stop.send(true);
}

#[test]
fn kubectl_top_and_an_autoscaler_follow_hollow_pods_usage() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "a", &["--horizontal-pod-autoscaler-sync-period", "1s"]);
    s.wait_api();
    let k = K { bin: kubectl_bin(), cfg: s.kubeconfig() };
    let f = fleet(&s, &["hollow-0", "hollow-1"], Duration::from_millis(50));
    k.eventually(&["get", "nodes", "--no-headers"], "2 Ready nodes", |o| o.lines().filter(|l| l.contains(" Ready ")).count() == 2);
    // Each container of these pods uses 300m of CPU (the simulated runtime reads it from
    // the annotation) against a request of 100m.
    let busy = |cpu: &str| format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: busy}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: busy}}}}\n  template:\n    metadata: {{labels: {{app: busy}}, annotations: {{shoal.io/sim-cpu: {cpu}, shoal.io/sim-memory: 40Mi}}}}\n    spec: {{containers: [{{name: c, image: busybox, resources: {{requests: {{cpu: 100m}}}}}}]}}\n");
    k.apply(&busy("300m"));
    k.ok(&["rollout", "status", "deployment/busy", "--timeout=60s"]);

    // The metrics API, as metrics-server serves it.
    let (ok, out) = k.run(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes/nope"], None);
    assert!(!ok && out.contains("NotFound"), "{out}");
    k.eventually(&["top", "pods", "--no-headers"], "kubectl top pods", |o| o.contains("busy-") && o.contains("300m") && o.contains("40Mi"));
    k.eventually(&["top", "nodes", "--no-headers"], "kubectl top nodes", |o| o.lines().count() == 2 && o.lines().all(|l| l.starts_with("hollow-") && l.contains('%')));
    let (ok, out) = k.run(&["top", "pods", "-l", "app=nobody", "--no-headers"], None);
    assert!(ok || out.contains("No resources found"), "{out}");

    // 300% of the request against a 50% target: up to the maximum, with upstream's status
    // and event.
    k.apply("apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: busy}\nspec:\n  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: busy}\n  minReplicas: 1\n  maxReplicas: 4\n  metrics: [{type: Resource, resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}}]\n  behavior: {scaleDown: {stabilizationWindowSeconds: 0}}\n");
    k.eventually(&["get", "deployment", "busy", "-o", "jsonpath={.spec.replicas}"], "scaled up to the maximum", |o| o == "4");
    k.eventually(&["get", "hpa", "busy", "-o", "json"], "HPA status", |o| {
        let v: Value = serde_json::from_str(o).unwrap_or(Value::Null);
        let limited = v["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "ScalingLimited" && c["status"] == "True" && c["reason"] == "TooManyReplicas"));
        limited && v["status"]["currentMetrics"][0]["resource"]["current"]["averageUtilization"] == 300 && v["status"]["desiredReplicas"] == 4
    });
    k.eventually(&["get", "events", "--field-selector", "reason=SuccessfulRescale", "-o", "jsonpath={.items[*].message}"], "rescale event", |o| o.contains("New size: 4; reason: cpu resource utilization (percentage of request) above target"));
    k.eventually(&["get", "hpa", "busy", "--no-headers"], "kubectl get hpa", |o| o.contains("cpu: 300%/50%"));

    // Load drops (new pods at 10m): down to the minimum.
    k.ok(&["patch", "deployment", "busy", "-p", r#"{"spec":{"template":{"metadata":{"annotations":{"shoal.io/sim-cpu":"10m"}}}}}"#]);
    k.eventually(&["get", "deployment", "busy", "-o", "jsonpath={.spec.replicas}"], "scaled down to the minimum", |o| o == "1");

    // A metric this cluster cannot serve: ScalingActive=False every sync, recorded as one
    // event whose count grows (upstream's event correlation), not an event per second.
    k.apply("apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: custom}\nspec:\n  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: busy}\n  maxReplicas: 3\n  metrics: [{type: Pods, pods: {metric: {name: qps}, target: {type: AverageValue, averageValue: '10'}}}]\n");
    k.eventually(&["get", "events", "--field-selector", "involvedObject.name=custom,reason=InvalidMetricSourceType", "-o", "jsonpath={range .items[*]}{.count}{\"\\n\"}{end}"], "one counted warning", |o| o.lines().count() == 1 && o.trim().parse::<u64>().is_ok_and(|c| c >= 3));
    let _ = f.stop.send(true);
}
