//! The Kubernetes API driven by the official Python client, by raw HTTP for bad input, and
//! served from an external etcd by two API servers at once.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Server};

const PY_CLIENT: &str = r#"
import datetime, sys, threading, time
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config(config_file=sys.argv[1])
core = client.CoreV1Api()
apps = client.AppsV1Api()

core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="py")))
pod = client.V1Pod(metadata=client.V1ObjectMeta(name="p1", labels={"app": "web"}),
                   spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]))
created = core.create_namespaced_pod("py", pod)
assert created.metadata.uid and created.metadata.resource_version, created.metadata
assert created.status.phase == "Pending", created.status
assert created.spec.restart_policy == "Always"

pods = core.list_namespaced_pod("py", label_selector="app=web")
assert [p.metadata.name for p in pods.items] == ["p1"], pods.items
assert core.list_namespaced_pod("py", label_selector="app=db").items == []

def expect(status, reason, f, *a, **kw):
    try:
        f(*a, **kw)
    except ApiException as e:
        assert e.status == status, (e.status, e.body)
        assert ('"reason":"%s"' % reason) in e.body.replace(" ", ""), e.body
        return
    raise AssertionError("expected %d %s" % (status, reason))

expect(409, "AlreadyExists", core.create_namespaced_pod, "py", pod)
expect(404, "NotFound", core.read_namespaced_pod, "nope", "py")
bad = client.V1Pod(metadata=client.V1ObjectMeta(name="Bad_Name"), spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]))
expect(422, "Invalid", core.create_namespaced_pod, "py", bad)

cm = core.create_namespaced_config_map("py", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm"), data={"a": "1"}))
core.patch_namespaced_config_map("cm", "py", {"data": {"b": "2"}})
cur = core.read_namespaced_config_map("cm", "py")
assert cur.data == {"a": "1", "b": "2"}, cur.data
stale = cm
stale.data = {"a": "stale"}
expect(409, "Conflict", core.replace_namespaced_config_map, "cm", "py", stale)

dep = client.V1Deployment(metadata=client.V1ObjectMeta(name="d"), spec=client.V1DeploymentSpec(
    replicas=0, selector=client.V1LabelSelector(match_labels={"a": "b"}),
    template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels={"a": "b"}),
                                      spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]))))
d = apps.create_namespaced_deployment("py", dep)
assert d.spec.replicas == 0 and d.spec.strategy.type == "RollingUpdate", d.spec
s = apps.patch_namespaced_deployment_scale("d", "py", {"spec": {"replicas": 3}})
assert s.spec.replicas == 3, s
assert apps.read_namespaced_deployment("d", "py").spec.replicas == 3

# Watch: the existing object, then one created while watching, then its deletion.
rv = core.list_namespaced_config_map("py").metadata.resource_version
def later():
    time.sleep(0.5)
    core.create_namespaced_config_map("py", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="w1")))
    core.delete_namespaced_config_map("w1", "py")
threading.Thread(target=later).start()
seen = []
w = watch.Watch()
for ev in w.stream(core.list_namespaced_config_map, "py", resource_version=rv, timeout_seconds=10):
    seen.append((ev["type"], ev["object"].metadata.name))
    if ("DELETED", "w1") in seen:
        w.stop()
assert seen == [("ADDED", "w1"), ("DELETED", "w1")], seen

# One stored Event, served as core/v1 and as events.k8s.io/v1.
ev = client.EventsV1Api().create_namespaced_event("py", client.EventsV1Event(
    metadata=client.V1ObjectMeta(name="e1"), event_time=datetime.datetime.now(datetime.timezone.utc), reason="Tested", note="hello", type="Normal",
    action="Test", reporting_controller="loadtest", reporting_instance="i1",
    regarding=client.V1ObjectReference(kind="Pod", name="ghost", namespace="py")))
assert ev.note == "hello", ev
core_ev = core.read_namespaced_event("e1", "py")
assert core_ev.message == "hello" and core_ev.involved_object.name == "ghost", core_ev
# (A pod that exists would also have the scheduler's events.)
evs = core.list_namespaced_event("py", field_selector="involvedObject.name=ghost")
assert [e.metadata.name for e in evs.items] == ["e1"], evs.items

# Eviction respects the PodDisruptionBudget's allowance.
policy = client.PolicyV1Api()
policy.create_namespaced_pod_disruption_budget("py", client.V1PodDisruptionBudget(
    metadata=client.V1ObjectMeta(name="pdb"), spec=client.V1PodDisruptionBudgetSpec(min_available=1, selector=client.V1LabelSelector(match_labels={"app": "web"}))))
evict = client.V1Eviction(metadata=client.V1ObjectMeta(name="p1", namespace="py"))
expect(429, "TooManyRequests", core.create_namespaced_pod_eviction, "p1", "py", evict)
core.read_namespaced_pod("p1", "py")
policy.patch_namespaced_pod_disruption_budget_status("pdb", "py", {"status": {"disruptionsAllowed": 1, "observedGeneration": 1, "currentHealthy": 2, "desiredHealthy": 1, "expectedPods": 2}})
core.create_namespaced_pod_eviction("p1", "py", evict)
expect(404, "NotFound", core.read_namespaced_pod, "p1", "py")
assert policy.read_namespaced_pod_disruption_budget("pdb", "py").status.disruptions_allowed == 0
print("OK")
"#;

#[test]
fn python_client() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "api", &[]);
    s.wait_api();
    let script = dir.path().join("client.py");
    std::fs::write(&script, PY_CLIENT).unwrap();
    // Debian's python3-kubernetes lives in the system interpreter.
    let o = Command::new("/usr/bin/python3").arg(&script).arg(s.kubeconfig()).output().expect("running /usr/bin/python3");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("OK"), "python client failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

fn token(s: &Server) -> String {
    std::fs::read_to_string(s.data_dir.join("pki/admin.token")).unwrap().trim().to_string()
}

/// `curl` with the admin token: (status, body).
fn curl(s: &Server, method: &str, path: &str, ctype: &str, body: Option<&[u8]>, auth: bool) -> (u16, serde_json::Value) {
    let mut c = Command::new("curl");
    c.args(["-sk", "-X", method, "-w", "\n%{http_code}", "-H", &format!("Content-Type: {ctype}")]);
    if auth {
        c.args(["-H", &format!("Authorization: Bearer {}", token(s))]);
    }
    if body.is_some() {
        c.args(["--data-binary", "@-"]);
    }
    c.arg(format!("https://{}{path}", s.api)).stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut si = child.stdin.take().unwrap();
        if let Some(b) = body {
            si.write_all(b).unwrap();
        }
    }
    let o = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let (b, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), serde_json::from_str(b).unwrap_or(serde_json::Value::Null))
}

#[test]
fn bad_input_gets_a_status_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "api", &["--controllers=false"]);
    s.wait_api();
    let cms = "/api/v1/namespaces/default/configmaps";
    let count = |s: &Server| curl(s, "GET", cms, "application/json", None, true).1["items"].as_array().map_or(0, Vec::len);

    let (code, st) = curl(&s, "GET", cms, "application/json", None, false);
    assert_eq!((code, st["reason"].as_str()), (401, Some("Unauthorized")));
    let (code, st) = curl(&s, "POST", cms, "application/json", Some(b"{not json"), true);
    assert_eq!((code, st["reason"].as_str(), st["kind"].as_str()), (400, Some("BadRequest"), Some("Status")), "{st}");
    let big = format!("{{\"metadata\":{{\"name\":\"big\"}},\"data\":{{\"a\":\"{}\"}}}}", "x".repeat(4 << 20));
    let (code, st) = curl(&s, "POST", cms, "application/json", Some(big.as_bytes()), true);
    assert_eq!((code, st["reason"].as_str()), (413, Some("RequestEntityTooLarge")), "{st}");
    let (code, st) = curl(&s, "POST", cms, "text/plain", Some(b"hello"), true);
    assert_eq!((code, st["reason"].as_str()), (415, Some("UnsupportedMediaType")), "{st}");
    let (code, st) = curl(&s, "POST", &format!("{cms}?fieldValidation=Strict"), "application/json", Some(br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"s"},"dataa":{}}"#), true);
    assert_eq!(code, 400, "{st}");
    assert!(st["message"].as_str().unwrap().contains("unknown field \"dataa\""), "{st}");
    let (code, st) = curl(&s, "POST", cms, "application/json", Some(br#"{"metadata":{"name":"t","labels":"oops"},"data":{"a":1}}"#), true);
    assert_eq!(code, 400, "{st}");
    assert!(st["message"].as_str().unwrap().contains("json: cannot unmarshal"), "{st}");
    let (code, st) = curl(&s, "POST", "/api/v1/namespaces/default/pods", "application/json", Some(br#"{"metadata":{"name":"p"},"spec":{"containers":{"name":"c"}}}"#), true);
    assert_eq!(code, 400, "{st}");
    assert!(st["message"].as_str().unwrap().contains("of type []v1.Container"), "{st}");
    let (code, st) = curl(&s, "POST", "/api/v1/namespaces/missing/configmaps", "application/json", Some(br#"{"metadata":{"name":"m"}}"#), true);
    assert_eq!((code, st["message"].as_str()), (404, Some("namespaces \"missing\" not found")), "{st}");
    let (code, st) = curl(&s, "POST", cms, "application/json", Some(br#"{"metadata":{"name":"m"},"data":{"bad key":"v"}}"#), true);
    assert_eq!((code, st["reason"].as_str()), (422, Some("Invalid")), "{st}");
    assert_eq!(st["details"]["causes"][0]["field"], "data[bad key]", "{st}");
    let (code, st) = curl(&s, "POST", cms, "application/yaml", Some(b"metadata:\n  name: [unclosed\n"), true);
    assert_eq!((code, st["reason"].as_str()), (400, Some("BadRequest")), "{st}");
    assert!(st["message"].as_str().unwrap().starts_with("error converting YAML to JSON"), "{st}");
    let (code, _) = curl(&s, "GET", "/api/v1/nothing-here", "application/json", None, true);
    assert_eq!(code, 404);
    let (code, st) = curl(&s, "GET", &format!("{cms}?labelSelector=a%3D%3D%3Db"), "application/json", None, true);
    assert_eq!(code, 400, "{st}");
    let (code, st) = curl(&s, "GET", &format!("{cms}?continue=garbage"), "application/json", None, true);
    assert_eq!(code, 400, "{st}");

    assert_eq!(count(&s), 0, "nothing was written");
    // A YAML body is accepted too.
    let (code, st) = curl(&s, "POST", cms, "application/yaml", Some(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-yaml\ndata:\n  k: v\n"), true);
    assert_eq!(code, 201, "{st}");
    let (_, l) = curl(&s, "GET", cms, "application/json", None, true);
    assert_eq!(l["items"][0]["data"]["k"], "v");
    let (code, _) = curl(&s, "DELETE", &format!("{cms}/from-yaml"), "application/json", None, true);
    assert_eq!(code, 200);
    let before_rv = curl(&s, "GET", cms, "application/json", None, true).1["metadata"]["resourceVersion"].clone();
    assert_eq!(curl(&s, "GET", cms, "application/json", None, true).1["metadata"]["resourceVersion"], before_rv);
    // Protobuf responses for clients that prefer them (client-go's protobuf content type).
    let o = Command::new("curl")
        .args(["-sk", "-H", &format!("Authorization: Bearer {}", token(&s)), "-H", "Accept: application/vnd.kubernetes.protobuf,application/json", "-D", "-"])
        .arg(format!("https://{}/api/v1/namespaces/default", s.api))
        .output()
        .unwrap();
    let raw = o.stdout;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    assert!(head.contains("content-type: application/vnd.kubernetes.protobuf"), "{head}");
    assert!(raw[split..].starts_with(b"k8s\0"), "protobuf body");
    // The server is still healthy.
    let (code, _) = curl(&s, "POST", cms, "application/json", Some(br#"{"metadata":{"name":"fine"}}"#), true);
    assert_eq!(code, 201);
}

/// A real etcd 3.4 (Debian etcd-server) on free loopback ports, killed when dropped.
struct Etcd {
    child: std::process::Child,
    client: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_etcd(dir: &std::path::Path) -> Etcd {
    let (c, p) = (free_port(), free_port());
    let client = format!("127.0.0.1:{c}");
    let child = Command::new("etcd")
        .args(["--name", "ext", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &format!("http://{client}"), "--advertise-client-urls", &format!("http://{client}")])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}"), "--initial-advertise-peer-urls", &format!("http://127.0.0.1:{p}")])
        .args(["--initial-cluster", &format!("ext=http://127.0.0.1:{p}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (Debian etcd-server) must be installed; scripts/deps.sh installs it");
    let t = Instant::now();
    while std::net::TcpStream::connect(&client).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "etcd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Etcd { child, client }
}

#[test]
fn two_api_servers_on_external_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = start_etcd(dir.path());
    let store = format!("etcd://{}", etcd.client);
    let a = Server::start_api(dir.path(), "a", &["--store", &store]);
    let b = Server::start_api(dir.path(), "b", &["--store", &store]);
    a.wait_api();
    b.wait_api();
    // A watch on A sees a write made through B.
    let (code, list) = curl(&a, "GET", "/api/v1/namespaces/default/configmaps", "application/json", None, true);
    assert_eq!(code, 200, "{list}");
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let mut w = Command::new("curl")
        .args(["-sNk", "-H", &format!("Authorization: Bearer {}", token(&a)), "--max-time", "10"])
        .arg(format!("https://{}/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}", a.api))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (code, created) = curl(&b, "POST", "/api/v1/namespaces/default/configmaps", "application/json", Some(br#"{"metadata":{"name":"via-b"},"data":{"k":"v"}}"#), true);
    assert_eq!(code, 201, "{created}");
    let out = w.stdout.take().unwrap();
    let first = {
        use std::io::BufRead;
        let mut l = String::new();
        std::io::BufReader::new(out).read_line(&mut l).unwrap();
        l
    };
    let _ = w.kill();
    let _ = w.wait();
    let ev: serde_json::Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first:?}"));
    assert_eq!(ev["type"], "ADDED");
    assert_eq!(ev["object"]["metadata"]["name"], "via-b");
    assert_eq!(ev["object"]["metadata"]["resourceVersion"], created["metadata"]["resourceVersion"]);
    // The object is really in etcd, under upstream's key layout.
    let o = Command::new("etcdctl").args(["--endpoints", &etcd.client, "get", "/registry/configmaps/default/via-b", "--print-value-only"]).env("ETCDCTL_API", "3").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"via-b\""), "{}", String::from_utf8_lossy(&o.stdout));
    // Reads through A see it, and a stale update through A conflicts.
    let (code, got) = curl(&a, "GET", "/api/v1/namespaces/default/configmaps/via-b", "application/json", None, true);
    assert_eq!((code, &got["data"]["k"]), (200, &serde_json::json!("v")));
}

/// Reads watch lines from a streaming curl until `n` lines or the deadline.
fn watch_lines(s: &Server, path: &str, n: usize, action: impl FnOnce()) -> Vec<serde_json::Value> {
    let mut w = Command::new("curl")
        .args(["-sNk", "-H", &format!("Authorization: Bearer {}", token(s)), "--max-time", "10"])
        .arg(format!("https://{}{path}", s.api))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = w.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    action();
    let mut got = Vec::new();
    let t = Instant::now();
    while got.len() < n && t.elapsed() < Duration::from_secs(10) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            got.push(serde_json::from_str(&l).unwrap());
        }
    }
    let _ = w.kill();
    let _ = w.wait();
    got
}

#[test]
fn watch_cache_lists_and_watches() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "api", &["--controllers=false"]);
    s.wait_api();
    let cms = "/api/v1/namespaces/default/configmaps";
    // A list right after a write sees it (consistent read from the cache).
    for i in 0..20 {
        let (code, c) = curl(&s, "POST", cms, "application/json", Some(format!(r#"{{"metadata":{{"name":"c{i}","labels":{{"x":"{}"}}}}}}"#, i % 2).as_bytes()), true);
        assert_eq!(code, 201, "{c}");
        let (_, l) = curl(&s, "GET", cms, "application/json", None, true);
        assert_eq!(l["items"].as_array().unwrap().len(), i + 1, "list after create {i}");
        assert_eq!(l["metadata"]["resourceVersion"], c["metadata"]["resourceVersion"]);
    }
    let (_, l) = curl(&s, "GET", &format!("{cms}?labelSelector=x%3D1&limit=4"), "application/json", None, true);
    assert_eq!(l["items"].as_array().unwrap().len(), 4);
    let cont = l["metadata"]["continue"].as_str().expect("a continue token").to_string();
    let (_, l2) = curl(&s, "GET", &format!("{cms}?labelSelector=x%3D1&limit=100&continue={cont}"), "application/json", None, true);
    assert_eq!(l2["items"].as_array().unwrap().len(), 6, "the rest of the 10 matching objects");
    let rv = l["metadata"]["resourceVersion"].as_str().unwrap().to_string();

    // Selector transitions: c1 stops matching (DELETED for this watcher), c0 starts (ADDED).
    let got = watch_lines(&s, &format!("{cms}?watch=1&labelSelector=x%3D1&resourceVersion={rv}"), 2, || {
        let p = |name: &str, x: &str| curl(&s, "PATCH", &format!("{cms}/{name}"), "application/merge-patch+json", Some(format!(r#"{{"metadata":{{"labels":{{"x":"{x}"}}}}}}"#).as_bytes()), true);
        assert_eq!(p("c1", "0").0, 200);
        assert_eq!(p("c0", "1").0, 200);
    });
    let evs: Vec<(String, String)> = got.iter().map(|e| (e["type"].as_str().unwrap().to_string(), e["object"]["metadata"]["name"].as_str().unwrap().to_string())).collect();
    assert_eq!(evs, [("DELETED".to_string(), "c1".to_string()), ("ADDED".to_string(), "c0".to_string())]);

    // A watch from a recent revision replays what happened since.
    let got = watch_lines(&s, &format!("{cms}?watch=true&resourceVersion={rv}"), 2, || {});
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|e| e["type"] == "MODIFIED"));
    // A watch from revision 1 (older than the cache) is served by the store's history.
    let got = watch_lines(&s, &format!("{cms}?watch=true&resourceVersion=1"), 22, || {});
    assert_eq!(got.iter().filter(|e| e["type"] == "ADDED").count(), 20, "{got:?}");

    // Initial events end with the bookmark kubectl and informers wait for.
    let got = watch_lines(&s, &format!("{cms}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"), 21, || {});
    assert_eq!(got.iter().filter(|e| e["type"] == "ADDED").count(), 20);
    let last = got.last().unwrap();
    assert_eq!(last["type"], "BOOKMARK");
    assert_eq!(last["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
}

#[test]
fn api_server_compacts_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_api(dir.path(), "api", &["--etcd-compaction-interval", "1s", "--controllers=false"]);
    s.wait_api();
    let cms = "/api/v1/namespaces/default/configmaps";
    let (code, c) = curl(&s, "POST", cms, "application/json", Some(br#"{"metadata":{"name":"h"},"data":{"v":"0"}}"#), true);
    assert_eq!(code, 201, "{c}");
    let first = c["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    for i in 1..5 {
        let (code, _) = curl(&s, "PATCH", &format!("{cms}/h"), "application/merge-patch+json", Some(format!(r#"{{"data":{{"v":"{i}"}}}}"#).as_bytes()), true);
        assert_eq!(code, 200);
    }
    // Two intervals later the revision of the first write is compacted away.
    let t = Instant::now();
    loop {
        let o = s.etcdctl(&["get", "/registry/configmaps/default/h", "--rev", &first]);
        if !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("compacted") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "history was not compacted: {}", String::from_utf8_lossy(&o.stdout));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(s.ok(&["get", "compact_rev_key", "--print-value-only"]).trim().parse::<i64>().is_ok());
    // A watch from before the watch cache's window goes to the store, which has compacted
    // it: 410 Expired (recent revisions are still served from the cache, as upstream). A
    // restarted server's cache starts at the current revision.
    s.kill9();
    s.spawn();
    s.wait_api();
    let got = watch_lines(&s, &format!("{cms}?watch=true&resourceVersion=1"), 1, || {});
    assert_eq!(got[0]["type"], "ERROR", "{got:?}");
    assert_eq!(got[0]["object"]["code"], 410);
}

#[test]
fn node_watchers_get_their_pods_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_api(dir.path(), "api", &["--controllers=false"]);
    s.wait_api();
    let pods = "/api/v1/namespaces/default/pods";
    let pod = |name: &str, node: &str| {
        let node = if node.is_empty() { String::new() } else { format!(r#","nodeName":"{node}""#) };
        format!(r#"{{"metadata":{{"name":"{name}"}},"spec":{{"containers":[{{"name":"c","image":"i"}}]{node}}}}}"#)
    };
    let got = watch_lines(&s, "/api/v1/pods?watch=1&fieldSelector=spec.nodeName%3Dnode-a", 3, || {
        assert_eq!(curl(&s, "POST", pods, "application/json", Some(pod("on-a", "node-a").as_bytes()), true).0, 201);
        assert_eq!(curl(&s, "POST", pods, "application/json", Some(pod("on-b", "node-b").as_bytes()), true).0, 201);
        assert_eq!(curl(&s, "POST", pods, "application/json", Some(pod("pending", "").as_bytes()), true).0, 201);
        // The scheduler's binding moves "pending" onto node-a: the node's watcher gets it.
        let (code, st) = curl(&s, "POST", &format!("{pods}/pending/binding"), "application/json", Some(br#"{"apiVersion":"v1","kind":"Binding","metadata":{"name":"pending"},"target":{"kind":"Node","name":"node-a"}}"#), true);
        assert_eq!(code, 201, "{st}");
        let (code, st) = curl(&s, "POST", &format!("{pods}/pending/binding"), "application/json", Some(br#"{"metadata":{"name":"pending"},"target":{"name":"node-b"}}"#), true);
        assert_eq!(code, 409, "a bound pod is not bound again: {st}");
        assert_eq!(curl(&s, "DELETE", &format!("{pods}/on-a?gracePeriodSeconds=0"), "application/json", None, true).0, 200);
    });
    let evs: Vec<(String, String)> = got.iter().map(|e| (e["type"].as_str().unwrap().to_string(), e["object"]["metadata"]["name"].as_str().unwrap().to_string())).collect();
    assert_eq!(evs, [("ADDED".into(), "on-a".into()), ("ADDED".into(), "pending".into()), ("DELETED".into(), "on-a".into())]);
    let (_, p) = curl(&s, "GET", &format!("{pods}/pending"), "application/json", None, true);
    assert_eq!(p["spec"]["nodeName"], "node-a");
    assert_eq!(p["status"]["conditions"][0]["type"], "PodScheduled");
}
