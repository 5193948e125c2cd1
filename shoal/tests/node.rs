//! The real node agent (`shoal agent`): runc containers from an imported busybox image, the
//! pod network, volumes, environment, restart policy and logs, driven by kubectl. Each test
//! runs in a network namespace of its own (its thread's, inherited by every process it
//! starts), so pod ranges never touch the machine's own namespace.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::kube::{kubectl_bin, K};
use common::Server;
use serde_json::Value;

/// Moves this test's thread into a new network namespace; processes it starts inherit it.
fn own_netns() {
    // SAFETY: unshare(CLONE_NEWNET) changes only the calling thread's network namespace;
    // no memory is touched.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    let st = Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap();
    assert!(st.success());
}

/// Builds the busybox test image (docker-archive) into `dir`.
fn busybox_image(dir: &Path) -> PathBuf {
    let out = dir.join("busybox.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/busybox-image.py");
    let o = Command::new("python3").arg(script).arg(&out).args(["--name", "busybox:test"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A `shoal agent` process; on drop it is killed and what it ran is cleaned up.
struct AgentProc {
    child: Child,
    data: PathBuf,
    log: PathBuf,
    node: String,
    /// The command line, to start it again on the same data.
    argv: Vec<std::ffi::OsString>,
}

impl AgentProc {
    fn start(server: &Server, dir: &Path, node: &str) -> AgentProc {
        AgentProc::start_in(&format!("https://{}", server.api), &server.data_dir, dir, node, None, "127.0.0.1")
    }

    /// As [`AgentProc::start`], with more flags.
    fn start_with(server: &Server, dir: &Path, node: &str, extra: &[&str]) -> AgentProc {
        let mut a = AgentProc::start(server, dir, node);
        if extra.is_empty() {
            return a;
        }
        let _ = a.child.kill();
        let _ = a.child.wait();
        // A flag given again replaces the default one (clap takes each once).
        for f in extra.iter().filter(|f| f.starts_with("--")) {
            if let Some(i) = a.argv.iter().position(|x| x == f) {
                a.argv.drain(i..i + 2);
            }
        }
        a.argv.extend(extra.iter().map(Into::into));
        a.child = AgentProc::spawn(&a.argv, &a.log);
        a
    }

    /// Starts an agent joined to `url` (server data in `server_dir`), inside the named
    /// network namespace when given (nsenter: unlike `ip netns exec` it keeps /sys, whose
    /// cgroup mounts runc needs).
    fn start_in(url: &str, server_dir: &Path, dir: &Path, node: &str, netns: Option<&str>, node_ip: &str) -> AgentProc {
        let data = dir.join(node);
        let log = dir.join(format!("{node}.log"));
        let token = std::fs::read_to_string(server_dir.join("pki/bootstrap-token")).unwrap();
        let mut argv: Vec<std::ffi::OsString> = vec![];
        if let Some(ns) = netns {
            argv.extend(["nsenter".into(), format!("--net=/run/netns/{ns}").into()]);
        }
        argv.push(env!("CARGO_BIN_EXE_shoal").into());
        // No disk threshold: the test machines' shared disk is often nearly full, and tests
        // must not depend on it (eviction is tested on memory, thresholds in unit tests).
        for a in ["agent", "--server", url, "--token", token.trim(), "--node-name", node, "--node-ip", node_ip, "--log", "info,shoal_agent=debug", "--eviction-hard", "memory.available<100Mi"] {
            argv.push(a.into());
        }
        argv.extend(["--ca-file".into(), server_dir.join("pki/ca.crt").into(), "--data-dir".into(), data.clone().into()]);
        // bpffs is the machine's: each agent pins its service maps in a directory of its own
        argv.extend(["--bpf-dir".into(), bpf_dir(node).into()]);
        let child = AgentProc::spawn(&argv, &log);
        AgentProc { child, data, log, node: node.to_string(), argv }
    }

    fn spawn(argv: &[std::ffi::OsString], log: &Path) -> Child {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::null()).stderr(f).spawn().unwrap()
    }

    /// SIGKILL (no shutdown code runs) and the same command again on the same data.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = AgentProc::spawn(&self.argv, &self.log);
    }

    fn import(data: &Path, image: &Path) {
        let o = Command::new(env!("CARGO_BIN_EXE_shoal")).args(["image", "--data-dir"]).arg(data).arg("import").arg(image).output().unwrap();
        assert!(o.status.success(), "import: {}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("docker.io/library/busybox:test"));
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Container ids runc knows in this agent's state root.
    fn runc_ids(&self) -> Vec<String> {
        let o = Command::new("runc").arg("--root").arg(self.data.join("run/state")).args(["list", "-q"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        clean_node(&self.data, &self.node);
    }
}

/// Removes what a node left behind: its containers, mounts, pod namespaces, cgroups and
/// pinned BPF maps (pods outlive their agent by design).
fn clean_node(data: &Path, node: &str) {
    let runc_ids = || {
        let o = Command::new("runc").arg("--root").arg(data.join("run/state")).args(["list", "-q"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect::<Vec<_>>()
    };
    for id in runc_ids() {
        let _ = Command::new("runc").arg("--root").arg(data.join("run/state")).args(["delete", "--force", &id]).status();
    }
    for e in std::fs::read_dir(data.join("run/containers")).into_iter().flatten().flatten() {
        let _ = Command::new("umount").arg("-l").arg(e.path().join("rootfs")).stderr(Stdio::null()).status();
    }
    for e in std::fs::read_dir(data.join("run/sandboxes")).into_iter().flatten().flatten() {
        let ns = format!("shoal-{}", e.file_name().to_string_lossy());
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
    }
    for e in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        let _ = std::fs::remove_dir(e.path().join("shoal").join(node));
    }
    let pins = bpf_dir(node);
    for e in std::fs::read_dir(&pins).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    let _ = std::fs::remove_dir(pins);
}

fn bpf_dir(node: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/shoal-test-{node}"))
}

fn pod(k: &K, name: &str) -> Value {
    let (ok, out) = k.run(&["get", "pod", name, "-o", "json"], None);
    if !ok {
        return Value::Null;
    }
    serde_json::from_str(&out).unwrap_or(Value::Null)
}

/// Waits (up to `secs`) until `f` holds for the pod's JSON.
fn wait_pod(k: &K, agent: &AgentProc, name: &str, secs: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let p = pod(k, name);
        if f(&p) {
            return p;
        }
        assert!(t.elapsed() < Duration::from_secs(secs), "{what}: pod {name} is {}\nagent log tail:\n{}", serde_json::to_string_pretty(&p["status"]).unwrap(), tail(&agent.log_text(), 30));
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

const APP: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: app-config}
data: {greeting: hello-config}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: web
        image: busybox:test
        command: [sh, -c]
        args:
        - 'echo "greeting=$GREETING file=$(cat /etc/app/greeting) pod=$POD_NAME ip=$POD_IP"; echo ok > /tmp/index.html; exec httpd -f -p 8080 -h /tmp'
        env:
        - {name: GREETING, valueFrom: {configMapKeyRef: {name: app-config, key: greeting}}}
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
        resources: {limits: {cpu: 200m, memory: 64Mi}}
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /index.html, port: http}, periodSeconds: 1}
        volumeMounts: [{name: config, mountPath: /etc/app, readOnly: true}]
      volumes: [{name: config, configMap: {name: app-config}}]
"#;

/// A server and one agent, in this test's own network namespace; the busybox test image
/// imported into the node unless `import` is false.
struct OneNode {
    dir: tempfile::TempDir,
    server: Server,
    agent: AgentProc,
    k: K,
    node: String,
}

impl OneNode {
    fn start(prefix: &str, extra: &[&str], import: bool) -> OneNode {
        // Fetched (when not cached) before leaving the machine's namespace.
        let kubectl = kubectl_bin();
        own_netns();
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_api(dir.path(), "s1", &[]);
        server.wait_api();
        // Unique per run: cgroups are the machine's, shared with any other run.
        let node = format!("{prefix}-{}", std::process::id());
        if import {
            let image = busybox_image(dir.path());
            AgentProc::import(&dir.path().join(&node), &image);
        }
        let agent = AgentProc::start_with(&server, dir.path(), &node, extra);
        let k = K { bin: kubectl, cfg: server.kubeconfig() };
        k.eventually(&["get", "node", &node], "node Ready", |o| o.contains(" Ready "));
        OneNode { dir, server, agent, k, node }
    }
}

#[test]
fn runc_pods_run_network_restart_and_log() {
    let OneNode { dir, server: _server, mut agent, k, node } = OneNode::start("node", &[], true);
    let n: Value = serde_json::from_str(&k.ok(&["get", "node", &node, "-o", "json"])).unwrap();
    assert_eq!(n["status"]["nodeInfo"]["containerRuntimeVersion"], "runc://1.1");

    // A Deployment of busybox pods becomes Ready, with its environment and volume.
    k.apply(APP);
    let out = k.ok(&["rollout", "status", "deploy/web", "--timeout", "60s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    let pods: Value = serde_json::from_str(&k.ok(&["get", "pods", "-l", "app=web", "-o", "json"])).unwrap();
    let items = pods["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let (a, b) = (&items[0], &items[1]);
    let (a_name, a_ip, b_ip) = (a["metadata"]["name"].as_str().unwrap(), a["status"]["podIP"].as_str().unwrap(), b["status"]["podIP"].as_str().unwrap());
    assert_ne!(a_ip, b_ip);
    assert!(a["status"]["containerStatuses"][0]["containerID"].as_str().unwrap().starts_with("runc://"));
    let logs = k.ok(&["logs", a_name]);
    assert!(logs.contains(&format!("greeting=hello-config file=hello-config pod={a_name} ip={a_ip}")), "{logs}");
    let ts = k.ok(&["logs", a_name, "--timestamps"]);
    assert!(ts.starts_with("20") && ts.contains("Z greeting="), "{ts}");

    // The kubelet's events about the pod: image, created, started.
    let events = |name: &str| k.ok(&["get", "events", "--field-selector", &format!("involvedObject.name={name}"), "-o", "custom-columns=REASON:.reason,MESSAGE:.message,SOURCE:.source.component,COUNT:.count,FIELD:.involvedObject.fieldPath", "--no-headers"]);
    k.eventually(&["get", "events", "--field-selector", &format!("involvedObject.name={a_name}"), "-o", "custom-columns=REASON:.reason", "--no-headers"], "kubelet events", |o| o.contains("Started"));
    let ev = events(a_name);
    assert!(ev.contains("Pulled") && ev.contains("Container image \"busybox:test\" already present on machine") && ev.contains("Created") && ev.contains("Started container web") && ev.contains("kubelet") && ev.contains("spec.containers{web}"), "{ev}");

    // The agent's metrics, and its images in the node's status (for ImageLocality).
    let m = Command::new("curl").args(["-s", "--max-time", "5", "http://127.0.0.1:10255/metrics"]).output().unwrap();
    let m = String::from_utf8_lossy(&m.stdout);
    assert!(m.contains("kubelet_running_pods 2") && m.contains("kubelet_pod_start_duration_seconds_count 2"), "{m}");
    assert!(m.contains("kubelet_runtime_operations_total{operation_type=\"start_container\"} 2"), "{m}");
    k.eventually(&["get", "node", &node, "-o", "jsonpath={.status.images[*].names}"], "images in node status", |o| o.contains("docker.io/library/busybox:test"));

    // exec: output, exit codes and standard input through the API server to the agent.
    assert_eq!(k.ok(&["exec", a_name, "--", "echo", "hi"]), "hi\n");
    assert_eq!(k.ok(&["exec", a_name, "--", "cat", "/etc/app/greeting"]), "hello-config");
    let (ok, out) = k.run(&["exec", a_name, "--", "sh", "-c", "echo to-stderr >&2; exit 3"], None);
    assert!(!ok && out.contains("to-stderr") && out.contains("command terminated with exit code 3"), "{out}");
    let st = Command::new(&k.bin).arg("--kubeconfig").arg(&k.cfg).args(["exec", a_name, "--", "sh", "-c", "exit 3"]).status().unwrap();
    assert_eq!(st.code(), Some(3), "kubectl exits with the command's code");
    let (ok, out) = k.run(&["exec", "-i", a_name, "--", "sh", "-c", "tr a-z A-Z"], Some("shout\n"));
    assert!(ok && out == "SHOUT\n", "stdin: {out}");
    // With a TTY (util-linux's script gives kubectl a terminal of its own).
    let cmd = format!("{} --kubeconfig {} exec -it {a_name} -- sh -c 'tty; echo tty-ok'", k.bin.display(), k.cfg.display());
    let o = Command::new("timeout").args(["30", "script", "-qec", &cmd, "/dev/null"]).stdin(Stdio::null()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("/dev/pts/") && out.contains("tty-ok"), "exec -it: {out} {}", String::from_utf8_lossy(&o.stderr));
    let (ok, out) = k.run(&["exec", a_name, "-c", "nope", "--", "true"], None);
    assert!(!ok && out.contains("container nope is not valid for pod"), "{out}");

    // hostPort: the node's own addresses forward the port to the pod.
    k.apply(r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hostport"}, "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "c", "image": "busybox:test", "command": ["sh", "-c", "echo via-hostport > /tmp/index.html; exec httpd -f -p 8080 -h /tmp"], "ports": [{"containerPort": 8080, "hostPort": 18080}]}]}}"#);
    wait_pod(&k, &agent, "hostport", 30, "hostport pod runs", |p| p["status"]["phase"] == "Running");
    let gw = format!("{}.1", a_ip.rsplitn(2, '.').nth(1).unwrap());
    let t = Instant::now();
    loop {
        let body = Command::new("curl").args(["-s", "--max-time", "2"]).arg(format!("http://{gw}:18080/index.html")).output().unwrap();
        if String::from_utf8_lossy(&body.stdout) == "via-hostport\n" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "hostPort 18080 on {gw}: {:?}", String::from_utf8_lossy(&body.stdout));
        std::thread::sleep(Duration::from_millis(200));
    }
    k.ok(&["delete", "pod", "hostport", "--wait=true", "--timeout=60s"]);
    let body = Command::new("curl").args(["-s", "--max-time", "2"]).arg(format!("http://{gw}:18080/index.html")).output().unwrap();
    assert!(!body.status.success(), "the hostPort is gone with its pod");

    // logs -f follows a running container until the client stops.
    k.apply(r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ticker"}, "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "c", "image": "busybox:test", "command": ["sh", "-c", "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.2; done"]}]}}"#);
    wait_pod(&k, &agent, "ticker", 30, "ticker runs", |p| p["status"]["phase"] == "Running");
    let o = Command::new("timeout").arg("3").arg(&k.bin).arg("--kubeconfig").arg(&k.cfg).args(["logs", "-f", "ticker"]).output().unwrap();
    let followed = String::from_utf8_lossy(&o.stdout);
    assert!(followed.lines().count() >= 8 && followed.lines().all(|l| l.starts_with("tick-")), "logs -f: {followed}");
    // attach: the container's output from now on, live.
    let o = Command::new("timeout").arg("3").arg(&k.bin).arg("--kubeconfig").arg(&k.cfg).args(["attach", "ticker"]).output().unwrap();
    let attached = String::from_utf8_lossy(&o.stdout);
    assert!(attached.lines().filter(|l| l.starts_with("tick-")).count() >= 5, "attach: {attached} {}", String::from_utf8_lossy(&o.stderr));
    // A follow of a container that exits ends by itself.
    k.apply(r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "short"}, "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox:test", "command": ["sh", "-c", "sleep 1; echo one; sleep 1; echo two"]}]}}"#);
    wait_pod(&k, &agent, "short", 30, "short runs", |p| p["status"]["phase"] == "Running" || p["status"]["phase"] == "Succeeded");
    let (ok, out) = k.run(&["logs", "-f", "short"], None);
    assert!(ok && out == "one\ntwo\n", "logs -f of an exiting container: {out:?}");

    // Node to pod: the pod's address answers from this (the node's) namespace.
    let body = Command::new("curl").args(["-s", "--max-time", "5"]).arg(format!("http://{a_ip}:8080/index.html")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&body.stdout), "ok\n", "node to pod");

    // Pod to pod: a client pod fetches from the other pod and completes (busybox's nc:
    // Debian's static busybox wget crashes).
    let client = format!(
        r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "client"}}, "spec": {{"restartPolicy": "Never", "containers": [{{"name": "c", "image": "busybox:test", "command": ["sh", "-c", "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {b_ip} 8080"]}}]}}}}"#
    );
    k.apply(&client);
    let p = wait_pod(&k, &agent, "client", 30, "client completes", |p| p["status"]["phase"] == "Succeeded");
    assert_eq!(p["status"]["containerStatuses"][0]["state"]["terminated"]["reason"], "Completed");
    let got = k.ok(&["logs", "client"]);
    assert!(got.starts_with("HTTP/1.") && got.ends_with("\nok\n"), "pod to pod: {got}");

    // A failing init container: the app container never starts and the pod fails.
    k.apply(r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "init-fails"}, "spec": {"restartPolicy": "Never", "initContainers": [{"name": "setup", "image": "busybox:test", "command": ["sh", "-c", "echo setting up; exit 2"]}], "containers": [{"name": "app", "image": "busybox:test", "command": ["sh", "-c", "echo app ran"]}]}}"#);
    let p = wait_pod(&k, &agent, "init-fails", 30, "init failure", |p| p["status"]["phase"] == "Failed");
    assert_eq!(p["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"], 2);
    assert_eq!(p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"], "PodInitializing");
    assert!(k.ok(&["logs", "init-fails", "-c", "setup"]).contains("setting up"));

    // An image no registry has: ErrImagePull, then ImagePullBackOff, with the registry's
    // (here: the dialer's) message.
    k.apply(r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad-image"}, "spec": {"containers": [{"name": "c", "image": "127.0.0.1:1/nope:1"}]}}"#);
    let p = wait_pod(&k, &agent, "bad-image", 30, "image pull failure", |p| p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff");
    let msg = p["status"]["containerStatuses"][0]["state"]["waiting"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("127.0.0.1:1/nope:1") && msg.contains("connection refused"), "{msg}");
    let out = k.ok(&["get", "pod", "bad-image"]);
    assert!(out.contains("ErrImagePull") || out.contains("ImagePullBackOff"), "{out}");
    k.eventually(&["describe", "pod", "bad-image"], "pull failure events", |o| o.contains("Failed to pull image \"127.0.0.1:1/nope:1\"") && o.contains("Back-off pulling image"));

    // A container that keeps failing is restarted with a back-off; the previous run's
    // logs stay readable.
    k.apply(r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crasher"}, "spec": {"containers": [{"name": "c", "image": "busybox:test", "command": ["sh", "-c", "echo crashing; exit 3"]}]}}"#);
    let p = wait_pod(&k, &agent, "crasher", 40, "crash loop", |p| p["status"]["containerStatuses"][0]["restartCount"].as_u64() >= Some(1) && p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "CrashLoopBackOff");
    assert_eq!(p["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"], 3);
    assert_eq!(p["status"]["phase"], "Running");
    assert!(k.ok(&["logs", "crasher", "--previous"]).contains("crashing"));

    // A failing liveness probe restarts the container; a failing readiness probe keeps the
    // pod out of Ready while it runs.
    k.apply(r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "unhealthy"}, "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "c", "image": "busybox:test", "command": ["sh", "-c", "touch /tmp/healthy; sleep 2; rm /tmp/healthy; sleep 600"],
        "livenessProbe": {"exec": {"command": ["cat", "/tmp/healthy"]}, "periodSeconds": 1, "failureThreshold": 2},
        "readinessProbe": {"tcpSocket": {"port": 9}, "periodSeconds": 1}}]}}"#);
    let p = wait_pod(&k, &agent, "unhealthy", 40, "liveness restart", |p| p["status"]["containerStatuses"][0]["restartCount"].as_u64() >= Some(1));
    let cs = &p["status"]["containerStatuses"][0];
    assert_eq!(cs["ready"], false, "readiness probe fails: {cs}");
    assert!(cs["lastState"]["terminated"]["exitCode"].as_i64().is_some_and(|c| c == 137 || c == 143), "{cs}");
    assert!(p["status"]["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Ready" && c["status"] == "False"));
    k.eventually(&["get", "events", "--field-selector", "involvedObject.name=unhealthy", "-o", "custom-columns=REASON:.reason,MESSAGE:.message", "--no-headers"], "probe events", |o| o.contains("Liveness probe failed") && o.contains("Readiness probe failed: dial tcp") && o.contains("Killing"));

    // Lifecycle hooks: postStart runs before the pod counts the container as started,
    // preStop runs before the container is signalled.
    let hooks_dir = dir.path().join("hooks");
    k.apply(&format!(r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "hooks"}}, "spec": {{"terminationGracePeriodSeconds": 5,
        "volumes": [{{"name": "out", "hostPath": {{"path": "{}", "type": "DirectoryOrCreate"}}}}],
        "containers": [{{"name": "c", "image": "busybox:test", "command": ["sh", "-c", "while [ ! -f /tmp/started ]; do sleep 0.1; done; echo post-start-ran; sleep 600"],
            "volumeMounts": [{{"name": "out", "mountPath": "/out"}}],
            "lifecycle": {{"postStart": {{"exec": {{"command": ["touch", "/tmp/started"]}}}}, "preStop": {{"exec": {{"command": ["sh", "-c", "echo bye > /out/prestop"]}}}}}}}}]}}}}"#, hooks_dir.display()));
    wait_pod(&k, &agent, "hooks", 30, "hooks pod runs", |p| p["status"]["phase"] == "Running");
    k.eventually(&["logs", "hooks"], "postStart ran", |o| o.contains("post-start-ran"));
    k.ok(&["delete", "pod", "hooks", "--wait=true", "--timeout=60s"]);
    assert_eq!(std::fs::read_to_string(hooks_dir.join("prestop")).unwrap_or_default(), "bye\n", "preStop ran before the container stopped");

    // A ConfigMap update appears in the volume of a running pod.
    k.apply(r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "watcher"}, "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "c", "image": "busybox:test", "command": ["sh", "-c", "while true; do cat /cfg/greeting; echo; sleep 0.5; done"], "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}], "volumes": [{"name": "cfg", "configMap": {"name": "app-config"}}]}}"#);
    wait_pod(&k, &agent, "watcher", 30, "watcher runs", |p| p["status"]["phase"] == "Running");
    k.ok(&["patch", "configmap", "app-config", "-p", r#"{"data":{"greeting":"updated-config"}}"#]);
    k.eventually(&["logs", "watcher", "--tail", "2"], "the new value in the volume", |o| o.contains("updated-config"));

    // An agent restart (kill -9) adopts the running containers: same container IDs, no
    // restarts, logs and exec still work; a pod deleted meanwhile is cleaned up.
    let ids = |k: &K| -> Vec<String> {
        let v: Value = serde_json::from_str(&k.ok(&["get", "pods", "-l", "app=web", "-o", "json"])).unwrap();
        v["items"].as_array().unwrap().iter().map(|p| format!("{} {}", p["status"]["containerStatuses"][0]["containerID"].as_str().unwrap_or(""), p["status"]["containerStatuses"][0]["restartCount"])).collect()
    };
    let before = ids(&k);
    agent.restart();
    k.eventually(&["get", "node", &node], "node Ready after the agent restart", |o| o.contains(" Ready "));
    std::thread::sleep(Duration::from_secs(2));
    k.eventually(&["get", "pods", "-l", "app=web"], "web pods Ready after the restart", |o| o.matches("1/1").count() == 2);
    assert_eq!(ids(&k), before, "containers adopted, not restarted");
    assert!(agent.log_text().contains("adopted the containers an earlier agent left"), "{}", tail(&agent.log_text(), 20));
    assert_eq!(k.ok(&["exec", a_name, "--", "echo", "still-here"]), "still-here\n");
    assert!(k.ok(&["logs", a_name]).contains("greeting=hello-config"));
    k.eventually(&["logs", "watcher", "--tail", "1"], "the watcher keeps logging through its shim", |o| o.contains("updated-config"));

    // Deleting pods stops their containers and removes them.
    let before = agent.runc_ids().len();
    assert!(before >= 4, "runc runs {before} containers");
    k.ok(&["delete", "deployment", "web"]);
    k.ok(&["delete", "pod", "crasher", "watcher", "bad-image", "client", "init-fails", "ticker", "short", "unhealthy", "--wait=true", "--timeout=60s"]);
    k.eventually(&["get", "pods", "-o", "name"], "all pods gone", |o| o.trim().is_empty() || o.contains("No resources"));
    let t = Instant::now();
    while !agent.runc_ids().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(20), "containers left: {:?}", agent.runc_ids());
        std::thread::sleep(Duration::from_millis(200));
    }
    // A namespace (and its link) lives until its last process has gone.
    let t = Instant::now();
    loop {
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        let links = String::from_utf8_lossy(&links.stdout).to_string();
        if links.matches("veth").count() == 0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "pod links left: {links}\n{}", tail(&agent.log_text(), 40));
        std::thread::sleep(Duration::from_millis(200));
    }
    let cgroups = std::fs::read_dir(format!("/sys/fs/cgroup/memory/shoal/{node}")).map(|d| d.flatten().filter(|e| e.path().is_dir()).count()).unwrap_or(0);
    assert_eq!(cgroups, 0, "pod cgroups removed");
}

/// A named network namespace standing for a machine on the test's LAN; deleted on drop.
struct Host {
    netns: String,
}

impl Host {
    /// Creates it with `eth0` at `ip`/24 plugged into the LAN bridge `lan` of the test's
    /// own namespace, with a default route through `gateway` when given.
    fn new(netns: &str, ip: &str, veth: &str, lan: &str, gateway: Option<&str>) -> Host {
        let run = |args: &[&str]| {
            let o = Command::new("ip").args(args).output().unwrap();
            assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        };
        run(&["netns", "add", netns]);
        run(&["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns]);
        run(&["link", "set", veth, "master", lan, "up"]);
        run(&["-n", netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        run(&["-n", netns, "link", "set", "eth0", "up"]);
        run(&["-n", netns, "link", "set", "lo", "up"]);
        if let Some(gw) = gateway {
            run(&["-n", netns, "route", "add", "default", "via", gw]);
        }
        Host { netns: netns.to_string() }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

/// Two nodes on one LAN, each in a namespace of its own, the server on the LAN: a pod on
/// node A reaches a pod on node B (routes between nodes' pod ranges, learnt from the
/// server), and a pod reaches an address outside the cluster (masqueraded as its node).
#[test]
fn pods_on_two_nodes_reach_each_other_and_the_outside() {
    two_nodes(false);
}

/// As above with the nodes in two subnets routed through the test's namespace: pod traffic
/// between them goes through the VXLAN device.
#[test]
fn pods_on_nodes_in_two_subnets_reach_each_other_over_vxlan() {
    two_nodes(true);
}

fn two_nodes(routed: bool) {
    let kubectl = kubectl_bin();
    own_netns();
    let run = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    for (lan, addr) in [("lan0", "192.168.77.1/24"), ("lan1", "192.168.78.1/24")] {
        run(&["link", "add", lan, "type", "bridge"]);
        run(&["addr", "add", addr, "dev", lan]);
        run(&["link", "set", lan, "up"]);
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    let (b_ip, b_lan, gw_a, gw_b) = if routed { ("192.168.78.12", "lan1", Some("192.168.77.1"), Some("192.168.78.1")) } else { ("192.168.77.12", "lan0", None, None) };
    // Names unique per process and variant (both variants may run at once).
    let id = format!("{}{}", std::process::id(), if routed { "r" } else { "d" });
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    // The server listens on the LAN address (this namespace is fresh: fixed ports are free).
    let data = dir.path().join("server");
    let slog = dir.path().join("server.log");
    let mut server = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["server", "--name", "s1", "--etcd-addr", "127.0.0.1:2379", "--peer-addr", "127.0.0.1:2380", "--metrics-addr", "", "--admin-addr", "", "--api-addr", "192.168.77.1:6443"])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&slog).unwrap())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(&mut server);
    let t = Instant::now();
    loop {
        let o = Command::new("curl").args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "https://192.168.77.1:6443/readyz"]).output().unwrap();
        if String::from_utf8_lossy(&o.stdout) == "200" && data.join("pki/bootstrap-token").exists() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "server not ready: {}", std::fs::read_to_string(&slog).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    let k = K { bin: kubectl, cfg: data.join("kubeconfig") };
    let (na, nb) = (format!("na-{id}"), format!("nb-{id}"));
    let _ha = Host::new(&format!("shoal-t{id}-a"), "192.168.77.11", &format!("va{id}"), "lan0", gw_a);
    let _hb = Host::new(&format!("shoal-t{id}-b"), b_ip, &format!("vb{id}"), b_lan, gw_b);
    AgentProc::import(&dir.path().join(&na), &image);
    AgentProc::import(&dir.path().join(&nb), &image);
    let url = "https://192.168.77.1:6443";
    let a = AgentProc::start_in(url, &data, dir.path(), &na, Some(&format!("shoal-t{id}-a")), "192.168.77.11");
    let _b = AgentProc::start_in(url, &data, dir.path(), &nb, Some(&format!("shoal-t{id}-b")), b_ip);
    k.eventually(&["get", "nodes"], "two nodes Ready", |o| o.matches(" Ready ").count() == 2);

    let pod = |name: &str, node: &str, cmd: &str, restart: &str| {
        format!(r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{name}"}}, "spec": {{"nodeName": "{node}", "restartPolicy": "{restart}", "terminationGracePeriodSeconds": 1, "containers": [{{"name": "c", "image": "busybox:test", "command": ["sh", "-c", "{cmd}"]}}]}}}}"#)
    };
    k.apply(&pod("server-b", &nb, "echo from-b > /tmp/index.html; exec httpd -f -p 8080 -h /tmp", "Always"));
    let p = wait_pod(&k, &a, "server-b", 30, "server on b runs", |p| p["status"]["phase"] == "Running");
    let b_ip = p["status"]["podIP"].as_str().unwrap().to_string();
    // Pod on A to pod on B, by the pod address (no NAT between nodes).
    k.apply(&pod("client-a", &na, &format!("printf 'GET /index.html HTTP/1.0\\\\r\\\\n\\\\r\\\\n' | nc -w 5 {b_ip} 8080"), "Never"));
    wait_pod(&k, &a, "client-a", 40, "cross-node client completes", |p| p["status"]["phase"] == "Succeeded" || p["status"]["phase"] == "Failed");
    let got = k.ok(&["logs", "client-a"]);
    assert!(got.ends_with("from-b\n"), "pod on A to pod on B: {got:?}\n{}", tail(&a.log_text(), 20));
    let vx = Command::new("ip").args(["-n", &format!("shoal-t{id}-a"), "-d", "link", "show", "shoal.vx"]).output().unwrap();
    assert_eq!(vx.status.success(), routed, "a VXLAN device exactly when the nodes do not share a link: {}", String::from_utf8_lossy(&vx.stdout));

    // Pod to outside the cluster: a listener on the LAN sees the node's address (masquerade).
    let l = std::net::TcpListener::bind("192.168.77.1:8099").unwrap();
    let seen = std::thread::spawn(move || {
        let (mut s, peer) = l.accept().unwrap();
        use std::io::Write;
        let _ = s.write_all(b"outside-ok\n");
        peer.ip().to_string()
    });
    k.apply(&pod("egress-a", &na, "echo hi | nc -w 5 192.168.77.1 8099", "Never"));
    wait_pod(&k, &a, "egress-a", 40, "egress completes", |p| p["status"]["phase"] == "Succeeded");
    assert_eq!(k.ok(&["logs", "egress-a"]), "outside-ok\n");
    assert_eq!(seen.join().unwrap(), "192.168.77.11", "traffic leaving the cluster is masqueraded as its node");
    k.ok(&["delete", "pod", "server-b", "client-a", "egress-a", "--wait=true", "--timeout=60s"]);
}

/// Images pulled from a registry (Debian's `docker-registry`, loaded with skopeo from the
/// test image): by tag and by digest, the digest reported as imageID and in node status,
/// and a missing tag reported as ImagePullBackOff with the registry's answer.
#[test]
fn images_are_pulled_from_a_registry() {
    let kubectl = kubectl_bin();
    own_netns();
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let cfg = dir.path().join("registry.yml");
    std::fs::write(&cfg, format!("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:5000\n", dir.path().join("registry").display())).unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _registry = Kill(Command::new("docker-registry").arg("serve").arg(&cfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("docker-registry (Debian package docker-registry)"));
    let t = Instant::now();
    while std::net::TcpStream::connect("127.0.0.1:5000").is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = Command::new("skopeo").args(["copy", "--dest-tls-verify=false"]).arg(format!("docker-archive:{}", image.display())).arg("docker://127.0.0.1:5000/tools/busybox:1").output().unwrap();
    assert!(o.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&o.stderr));
    let server = Server::start_api(dir.path(), "s1", &[]);
    server.wait_api();
    let node = format!("reg-{}", std::process::id());
    let agent = AgentProc::start(&server, dir.path(), &node);
    let k = K { bin: kubectl, cfg: server.kubeconfig() };
    k.eventually(&["get", "node", &node], "node Ready", |o| o.contains(" Ready "));
    let pod = |name: &str, image: &str| format!(r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{name}"}}, "spec": {{"terminationGracePeriodSeconds": 1, "containers": [{{"name": "c", "image": "{image}", "command": ["sh", "-c", "echo pulled; sleep 600"]}}]}}}}"#);
    k.apply(&pod("by-tag", "127.0.0.1:5000/tools/busybox:1"));
    let p = wait_pod(&k, &agent, "by-tag", 60, "pulled by tag", |p| p["status"]["phase"] == "Running");
    let image_id = p["status"]["containerStatuses"][0]["imageID"].as_str().unwrap().to_string();
    assert!(image_id.starts_with("127.0.0.1:5000/tools/busybox@sha256:"), "{image_id}");
    let digest = image_id.split('@').nth(1).unwrap();
    k.apply(&pod("by-digest", &format!("127.0.0.1:5000/tools/busybox@{digest}")));
    wait_pod(&k, &agent, "by-digest", 60, "pulled by digest", |p| p["status"]["phase"] == "Running");
    k.eventually(&["logs", "by-digest"], "logs", |o| o == "pulled\n");
    k.eventually(&["get", "node", &node, "-o", "jsonpath={.status.images[*].names}"], "pulled image in node status", |o| o.contains(&image_id));
    k.apply(&pod("no-tag", "127.0.0.1:5000/tools/busybox:nope"));
    let p = wait_pod(&k, &agent, "no-tag", 30, "missing tag", |p| p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff");
    let msg = p["status"]["containerStatuses"][0]["state"]["waiting"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("failed to resolve reference \"127.0.0.1:5000/tools/busybox:nope\"") && msg.contains("not found"), "{msg}");
    k.ok(&["delete", "pod", "by-tag", "by-digest", "no-tag", "--wait=true", "--timeout=60s"]);
}

/// Node pressure: below a hard eviction threshold the node reports MemoryPressure and
/// evicts a running pod (Failed, reason Evicted, upstream's message). The threshold is set
/// absurdly high so the machine's real memory is "short".
#[test]
fn memory_pressure_evicts_pods() {
    let OneNode { dir: _dir, server: _server, agent, k, node } = OneNode::start("ev", &["--eviction-hard", "memory.available<1000Ti", "--housekeeping-interval", "1s"], true);
    k.eventually(&["get", "node", &node, "-o", "jsonpath={.status.conditions[?(@.type==\"MemoryPressure\")].status}"], "MemoryPressure reported", |o| o == "True");
    let out = k.ok(&["describe", "node", &node]);
    assert!(out.contains("KubeletHasInsufficientMemory"), "{out}");
    k.apply(&format!(r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "victim"}}, "spec": {{"nodeName": "{node}", "terminationGracePeriodSeconds": 1, "containers": [{{"name": "c", "image": "busybox:test", "command": ["sleep", "600"]}}]}}}}"#));
    let p = wait_pod(&k, &agent, "victim", 40, "evicted", |p| p["status"]["reason"] == "Evicted");
    assert_eq!(p["status"]["phase"], "Failed");
    let msg = p["status"]["message"].as_str().unwrap_or_default();
    assert!(msg.starts_with("The node was low on resource: memory."), "{msg}");
    assert!(p["status"]["containerStatuses"][0]["state"]["terminated"].is_object(), "{}", p["status"]);
    k.ok(&["delete", "pod", "victim", "--wait=true", "--timeout=60s"]);
    let t = Instant::now();
    while !agent.runc_ids().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(20), "containers left: {:?}", agent.runc_ids());
        std::thread::sleep(Duration::from_millis(200));
    }
}

const SERVED: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: busybox:test
        command: [sh, -c, 'echo $POD_NAME > /tmp/index.html; exec httpd -f -p 8080 -h /tmp']
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: busybox:test, command: [sleep, "600"]}]
"#;

#[test]
fn pods_reach_services_through_the_ebpf_proxy() {
    services_on_one_node("svc", &["--socket-lb=false"], true);
}

#[test]
fn pods_reach_services_with_socket_level_translation() {
    services_on_one_node("svcsock", &[], true);
}

#[test]
fn pods_reach_services_through_the_nftables_proxy() {
    services_on_one_node("svcnft", &["--proxy-mode", "nftables"], false);
}

fn services_on_one_node(prefix: &str, flags: &[&str], bpf: bool) {
    let OneNode { dir: _dir, server: _server, agent, k, node: _node } = OneNode::start(prefix, flags, true);
    // a default route, as a real node has: nftables rejects a service without endpoints in
    // the forward hook, which a packet reaches only once it is routed (this kernel has no
    // dummy device: a veth pair with nothing behind it)
    for cmd in [&["link", "add", "gw0", "type", "veth", "peer", "name", "gw1"][..], &["link", "set", "gw0", "up"], &["route", "add", "default", "dev", "gw0"]] {
        assert!(Command::new("ip").args(cmd).status().unwrap().success(), "ip {cmd:?}");
    }
    k.apply(SERVED);
    k.ok(&["expose", "deployment", "web", "--port", "80", "--target-port", "http"]);
    k.ok(&["create", "service", "clusterip", "nothing", "--tcp", "80:8080"]);
    wait_pod(&k, &agent, "client", 60, "client running", |p| p["status"]["phase"] == "Running");
    k.eventually(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web", "-o", "jsonpath={.items[*].endpoints[*].conditions.ready}"], "two ready endpoints", |o| o == "true true");
    let ip = k.ok(&["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    let pods = k.ok(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].metadata.name}"]);
    let pods: Vec<&str> = pods.split_whitespace().collect();
    // the node's maps, as an operator reads them
    if bpf {
    let o = Command::new(env!("CARGO_BIN_EXE_shoal")).args(["admin", "-o", "json", "dataplane", "--bpf-dir"]).arg(bpf_dir(&agent.node)).arg("services").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    let web = listed.as_array().unwrap().iter().find(|r| r["frontend"] == format!("{ip}:80/TCP")).unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(web["backends"].as_array().unwrap().len(), 2, "{web}");
    let human = Command::new(env!("CARGO_BIN_EXE_shoal")).args(["admin", "dataplane", "--bpf-dir"]).arg(bpf_dir(&agent.node)).arg("conntrack").output().unwrap();
    assert!(human.status.success() && String::from_utf8_lossy(&human.stdout).contains("entries"), "{human:?}");
    let missing = Command::new(env!("CARGO_BIN_EXE_shoal")).args(["admin", "dataplane", "--bpf-dir", "/sys/fs/bpf/no-such-dir", "services"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no service proxy maps in /sys/fs/bpf/no-such-dir"));
    }
    // 30 connections from the client pod to the ClusterIP reach both backends (busybox's
    // nc: its wget crashes in the static Debian build)
    let get = |ip: &str, n: u32| format!("for i in $(seq {n}); do printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 80 | tail -n 1 || echo FAILED; done");
    let script = get(&ip, 30);
    let out = k.ok(&["exec", "client", "--", "sh", "-c", &script]);
    let answers: Vec<&str> = out.lines().collect();
    assert_eq!(answers.len(), 30, "{out}");
    for p in &pods {
        let n = answers.iter().filter(|a| a == &p).count();
        assert!(n >= 3, "backend {p} answered {n} of 30: {out}\nagent log:\n{}", tail(&agent.log_text(), 30));
    }
    assert!(!out.contains("FAILED"), "{out}");
    // a backend reaches its own service (hairpin)
    let out = k.ok(&["exec", pods[0], "--", "sh", "-c", &get(&ip, 10)]);
    assert_eq!(out.lines().filter(|l| pods.contains(l)).count(), 10, "{out}");
    // a service without endpoints refuses at once, as kube-proxy's REJECT does
    let nothing = k.ok(&["get", "service", "nothing", "-o", "jsonpath={.spec.clusterIP}"]);
    let (ok, out) = k.run(&["exec", "client", "--", "nc", "-w", "5", &nothing, "80"], Some(""));
    assert!(!ok && out.contains("Connection refused"), "{out}");
    // scaled to one: new connections go only to the pod that stays
    k.ok(&["scale", "deployment", "web", "--replicas", "1"]);
    k.eventually(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web", "-o", "jsonpath={.items[*].endpoints[*].conditions.ready}"], "one ready endpoint", |o| o == "true");
    let left = k.ok(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web", "-o", "jsonpath={.items[*].endpoints[*].targetRef.name}"]);
    let out = k.ok(&["exec", "client", "--", "sh", "-c", &script]);
    assert!(out.lines().all(|l| l == left.trim()), "only {left} may answer: {out}");
    // the proxy's metrics
    let m = Command::new("curl").args(["-s", "--max-time", "5", "http://127.0.0.1:10255/metrics"]).output().unwrap();
    let m = String::from_utf8_lossy(&m.stdout);
    let value = |name: &str| m.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse::<f64>().ok()).unwrap_or(-1.0);
    assert!(value("shoal_proxy_service_ports ") >= 2.0, "{m}");
    if bpf {
        assert!(value("shoal_proxy_map_writes_total") > 0.0, "{m}");
        // with --socket-lb the pods' connects were translated at connect(), else by tc
        let sock = m.lines().find(|l| l.starts_with("shoal_proxy_packets{") && l.contains("sock_translated")).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse::<f64>().ok());
        if !flags.contains(&"--socket-lb=false") {
            assert!(sock.is_some_and(|n| n >= 30.0), "sock_translated: {sock:?}");
        } else {
            assert_eq!(sock, Some(0.0), "no socket-level translation with --socket-lb=false");
        }
    }
    network_policy(&k, &agent, &ip, left.trim(), bpf);
}

/// NetworkPolicy on the node's one web pod `web` behind ClusterIP `ip`: denied, allowed by
/// labels and a named port, denied again when the client loses its label.
fn network_policy(k: &K, agent: &AgentProc, ip: &str, web: &str, bpf: bool) {
    let once = format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 80 | tail -n 1");
    let answer = |k: &K| k.run(&["exec", "client", "--", "sh", "-c", &once], None).1.trim().to_string();
    assert_eq!(answer(k), web);
    k.apply("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-deny}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n");
    k.eventually(&["exec", "client", "--", "sh", "-c", &once], "the policy denies the client", |o| o.contains("timed out"));
    // probes come from the node, which policy always admits: the pod stays ready
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(k.ok(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web", "-o", "jsonpath={.items[*].endpoints[*].conditions.ready}"]), "true");
    // allowed: pods labelled role=client, on the pod's port named http
    k.apply("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-allow-clients}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}], ports: [{port: http}]}]\n");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let a = answer(k);
    assert!(a.contains("timed out"), "the client has no role=client label yet: {a}");
    k.ok(&["label", "pod", "client", "role=client"]);
    k.eventually(&["exec", "client", "--", "sh", "-c", &once], "the labelled client is allowed", |o| o.trim() == web);
    if bpf {
        // as an operator reads it: the web pod is isolated for ingress, TCP 8080 allowed
        let web_ip = k.ok(&["get", "pod", web, "-o", "jsonpath={.status.podIP}"]);
        let o = Command::new(env!("CARGO_BIN_EXE_shoal")).args(["admin", "-o", "json", "dataplane", "--bpf-dir"]).arg(bpf_dir(&agent.node)).arg("policy").output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
        let pod = listed.as_array().unwrap().iter().find(|r| r["pod"] == web_ip.trim()).unwrap_or_else(|| panic!("{web_ip} not in {listed}"));
        assert_eq!(pod["isolated"], "ingress", "{pod}");
        assert!(pod["allow"].as_array().unwrap().iter().any(|a| a["protocol"] == "TCP" && a["ports"] == "8080" && a["direction"] == "ingress"), "{pod}");
        let o = Command::new(env!("CARGO_BIN_EXE_shoal")).args(["admin", "dataplane", "--bpf-dir"]).arg(bpf_dir(&agent.node)).arg("ipcache").output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && text.contains(&format!("{}/32", web_ip.trim())) && text.contains("host"), "{text}");
    }
    k.ok(&["label", "pod", "client", "role-"]);
    k.eventually(&["exec", "client", "--", "sh", "-c", &once], "the unlabelled client is denied again", |o| o.contains("timed out"));
    if !bpf {
        // nftables mode: the drops are counted in the policy table
        let t = Command::new("nft").args(["list", "table", "ip", "shoal-policy"]).output().unwrap();
        let t = String::from_utf8_lossy(&t.stdout);
        assert!(t.lines().any(|l| l.contains("counter packets") && !l.contains("counter packets 0 ")), "{t}");
    }
    // the policies go: open again
    k.ok(&["delete", "networkpolicy", "web-deny", "web-allow-clients"]);
    k.eventually(&["exec", "client", "--", "sh", "-c", &once], "no policy, no isolation", |o| o.trim() == web);
    if !bpf {
        return;
    }
    let m = Command::new("curl").args(["-s", "--max-time", "5", "http://127.0.0.1:10255/metrics"]).output().unwrap();
    let m = String::from_utf8_lossy(&m.stdout);
    let denied = m.lines().find(|l| l.starts_with("shoal_proxy_packets{") && l.contains("policy_denied")).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse::<f64>().ok());
    assert!(denied.is_some_and(|d| d >= 2.0), "policy_denied: {denied:?}\nagent log:\n{}", tail(&agent.log_text(), 30));
    // the same counter as an operator reads it from the node's pinned maps
    let o = Command::new(env!("CARGO_BIN_EXE_shoal")).args(["admin", "-o", "json", "dataplane", "--bpf-dir"]).arg(bpf_dir(&agent.node)).arg("stats").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stats: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(stats["policy_denied"].as_u64().is_some_and(|d| d >= 2), "{stats}");
}

/// Reads a child's stdout lines on a thread of their own.
fn lines_of(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // read to the end even when no one listens any more: the child must never see a
        // closed pipe
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

#[test]
fn shoal_up_runs_a_cluster_and_resumes_it() {
    let kubectl = kubectl_bin();
    own_netns();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cluster");
    let node = format!("up-{}", std::process::id());
    AgentProc::import(&data.join("node"), &busybox_image(dir.path()));
    let start = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["up", "--data-dir"])
            .arg(&data)
            .args(["--node-name", &node, "--agent-arg=--eviction-hard=memory.available<100Mi", &format!("--agent-arg=--bpf-dir={}", bpf_dir(&node).display())])
            .stdout(Stdio::piped())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(dir.path().join("up.stderr")).unwrap())
            .spawn()
            .unwrap();
        let lines = lines_of(&mut c);
        let t = Instant::now();
        loop {
            match lines.recv_timeout(Duration::from_secs(1)) {
                Ok(l) if l.starts_with("Shoal is up") => break,
                Ok(_) => {}
                Err(_) => {
                    let log = std::fs::read_to_string(data.join("node.log")).unwrap_or_default();
                    assert!(t.elapsed() < Duration::from_secs(150), "shoal up did not come up; node log:\n{}", tail(&log, 30));
                    assert!(c.try_wait().unwrap().is_none(), "shoal up exited; node log:\n{}", tail(&log, 30));
                }
            }
        }
        c
    };
    let interrupt = |c: &mut Child| {
        // SAFETY: kill(2) on our own child
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "shoal up exited with {st} after Ctrl-C");
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "shoal up did not stop after Ctrl-C");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut up = start();
    let k = K { bin: kubectl, cfg: data.join("kubeconfig") };
    k.ok(&["run", "bb", "--image=busybox:test", "--restart=Never", "--command", "--", "sh", "-c", "echo hello-from-up; sleep 600"]);
    k.eventually(&["get", "pod", "bb", "-o", "jsonpath={.status.phase}"], "bb Running", |o| o == "Running");
    k.eventually(&["logs", "bb"], "bb's output", |o| o.contains("hello-from-up"));
    assert_eq!(k.ok(&["exec", "bb", "--", "echo", "exec-ok"]).trim(), "exec-ok");
    interrupt(&mut up);
    // the same data directory: the same cluster, with its pod
    let mut up = start();
    let t = Instant::now();
    loop {
        let (_, out) = k.run(&["get", "pod", "bb", "-o", "jsonpath={.status.phase}"], None);
        if out == "Running" {
            break;
        }
        let log = |f: &str| tail(&std::fs::read_to_string(data.join(f)).unwrap_or_default(), 25);
        assert!(t.elapsed() < Duration::from_secs(60), "bb not Running after the restart ({out}); up exited: {:?}; its stderr:\n{}\nserver log:\n{}\nnode log:\n{}", up.try_wait(), tail(&std::fs::read_to_string(dir.path().join("up.stderr")).unwrap_or_default(), 25), log("server.log"), log("node.log"));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(k.ok(&["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"]).trim(), node);
    interrupt(&mut up);
    clean_node(&data.join("node"), &node);
}
