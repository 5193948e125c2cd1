//! Helpers for integration tests that run the real `shoal` binary and real clients.
#![allow(dead_code)]

pub mod kube;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `shoal server` process, killed (SIGKILL) when dropped.
pub struct Server {
    pub child: Option<Child>,
    pub name: String,
    pub data_dir: PathBuf,
    pub etcd: SocketAddr,
    pub peer: SocketAddr,
    pub metrics: SocketAddr,
    /// Kubernetes API (HTTPS); only served when `with_api` is set.
    pub api: SocketAddr,
    /// The operator gRPC API (`shoal admin`).
    pub admin: SocketAddr,
    pub with_api: bool,
    pub port_retries: u32,
    /// Set once the process listened: restarts keep their ports (clients know them).
    pub started_once: bool,
    pub extra: Vec<String>,
    pub log: PathBuf,
}

impl Server {
    /// Starts a single-member store (no API server: it would write the system namespaces
    /// into the store) with its data in `dir`.
    pub fn start(dir: &Path, name: &str, extra: &[&str]) -> Server {
        Server::start_with(dir, name, extra, false)
    }

    /// Starts a server with the Kubernetes API on a free port.
    pub fn start_api(dir: &Path, name: &str, extra: &[&str]) -> Server {
        Server::start_with(dir, name, extra, true)
    }

    fn start_with(dir: &Path, name: &str, extra: &[&str], with_api: bool) -> Server {
        let mut s = Server {
            child: None,
            name: name.into(),
            data_dir: dir.join(name),
            etcd: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            peer: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            metrics: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            api: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            admin: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            with_api,
            port_retries: 0,
            started_once: false,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: dir.join(format!("{name}.log")),
        };
        s.spawn();
        s
    }

    /// The admin kubeconfig the server wrote.
    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir.join("kubeconfig")
    }

    /// Waits until the API answers /readyz (the store has a leader and the system
    /// namespaces exist).
    pub fn wait_api(&self) {
        let t = Instant::now();
        loop {
            let o = Command::new("curl").args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"]).arg(format!("https://{}/readyz", self.api)).output().expect("curl");
            if String::from_utf8_lossy(&o.stdout) == "200" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "API not ready; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        // The bootstrap namespaces are written right after start.
        while !std::fs::read_to_string(self.kubeconfig()).is_ok_and(|k| k.contains("token:")) {
            assert!(t.elapsed() < Duration::from_secs(30), "no kubeconfig written");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
        c.arg("server")
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--etcd-addr", &self.etcd.to_string()])
            .args(["--peer-addr", &self.peer.to_string()])
            .args(["--metrics-addr", &self.metrics.to_string()])
            .args(["--api-addr", &if self.with_api { self.api.to_string() } else { String::new() }])
            .args(["--admin-addr", &if self.with_api { self.admin.to_string() } else { String::new() }])
            .args(&self.extra);
        c
    }

    /// (Re)starts the process and waits until the etcd port accepts connections.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = self.command().stdout(Stdio::null()).stderr(log).spawn().expect("spawning shoal");
        self.child = Some(child);
        let t = Instant::now();
        // With --store the embedded store (and its etcd port) is not started.
        let port = if self.extra.iter().any(|a| a == "--store") { self.api } else { self.etcd };
        loop {
            let listening = TcpStream::connect(port).is_ok();
            if listening {
                // Someone listens there; make sure it is this process (a port taken between
                // free_port() and our bind makes ours exit).
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                // free_port() releases its port before shoal binds it; another test may take
                // it in between. A fresh single server (no data yet) retries on new ports.
                let fresh = !self.extra.iter().any(|a| a == "--initial-cluster") && !self.started_once;
                if fresh && self.log_text().contains("Address already in use") && self.port_retries < 5 {
                    self.port_retries += 1;
                    self.etcd = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                    self.peer = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                    self.metrics = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                    self.api = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                    self.admin = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                    let _ = std::fs::write(&self.log, "");
                    return self.spawn();
                }
                panic!("shoal exited with {st} before listening; log:\n{}", self.log_text());
            }
            if listening {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "shoal did not start listening; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.started_once = true;
    }

    /// SIGKILL, like a crash: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        self.etcd.to_string()
    }

    /// Runs etcdctl against this server.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        etcdctl(&self.endpoint(), args, None)
    }

    /// Runs etcdctl and returns stdout, failing the test on a non-zero exit.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.etcdctl(args);
        assert!(o.status.success(), "etcdctl {args:?} failed: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    /// Runs etcdctl expecting failure; returns stderr.
    pub fn err(&self, args: &[&str]) -> String {
        let o = self.etcdctl(args);
        assert!(!o.status.success(), "etcdctl {args:?} unexpectedly succeeded: {}", String::from_utf8_lossy(&o.stdout));
        String::from_utf8(o.stderr).unwrap()
    }
}

impl Server {
    /// A (not yet started) cluster member with fast raft timing and its own fault file.
    pub fn member(dir: &Path, name: &str, peer: SocketAddr, initial_cluster: &str, state: &str) -> Server {
        let faults = dir.join(format!("faults-{name}"));
        std::fs::write(&faults, b"").unwrap();
        Server {
            child: None,
            name: name.to_string(),
            data_dir: dir.join(name),
            etcd: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            peer,
            metrics: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            api: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            admin: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            with_api: false,
            port_retries: 0,
            started_once: false,
            extra: ["--initial-cluster", initial_cluster, "--initial-cluster-state", state, "--heartbeat-interval", "50", "--election-timeout", "400", "--fault-file"]
                .iter()
                .map(|s| s.to_string())
                .chain([faults.display().to_string()])
                .collect(),
            log: dir.join(format!("{name}.log")),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `etcdctl` (v3 API) against `endpoint`, with optional stdin.
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--command-timeout", "10s", "--dial-timeout", "5s"])
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("etcdctl must be installed (scripts/deps.sh installs etcd-client)");
    if let Some(data) = stdin {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Parses etcdctl `-w json` output.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Decodes a base64 field of etcdctl's JSON output.
pub fn b64(v: &serde_json::Value) -> String {
    let s = v.as_str().unwrap_or("");
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = table.iter().position(|t| *t == c).expect("base64") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// A cluster of `shoal server` processes on loopback, with per-member fault files.
pub struct Cluster {
    pub members: Vec<Server>,
    pub dir: PathBuf,
}

impl Cluster {
    /// Starts `n` members bootstrapping one cluster (fast raft timing for tests).
    pub fn start(dir: &Path, n: usize) -> Cluster {
        let peers: Vec<(String, u16)> = (0..n).map(|i| (format!("m{i}"), free_port())).collect();
        let ic = peers.iter().map(|(name, p)| format!("{name}=127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let mut members = Vec::new();
        for (name, p) in &peers {
            let mut s = Server::member(dir, name, format!("127.0.0.1:{p}").parse().unwrap(), &ic, "new");
            s.spawn();
            members.push(s);
        }
        Cluster { members, dir: dir.to_path_buf() }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint()).collect()
    }

    /// Member IDs as the servers compute them (FNV-1a of the peer address, low bit set).
    pub fn member_id(&self, i: usize) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.members[i].peer.to_string().as_bytes() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h | 1
    }

    /// Index of the member that reports itself leader, if any answers.
    pub fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let o = etcdctl(&m.endpoint(), &["endpoint", "status", "-w", "json"], None);
            if !o.status.success() {
                continue;
            }
            let v: serde_json::Value = match serde_json::from_slice(&o.stdout) {
                Ok(v) => v,
                Err(_) => continue,
            };
            let st = &v[0]["Status"];
            if st["leader"].as_u64().is_some() && st["leader"] == st["header"]["member_id"] {
                return Some(i);
            }
        }
        None
    }

    /// Cuts member `i` off from every peer (both directions), or heals all when None.
    pub fn partition(&self, i: Option<usize>) {
        let content = i.map(|i| self.member_id(i).to_string()).unwrap_or_default();
        for m in &self.members {
            let f = self.dir.join(format!("faults-{}", m.name));
            std::fs::write(&f, content.as_bytes()).unwrap();
        }
    }
}

impl Cluster {
    /// Adds a member through `etcdctl member add` on member 0, then starts it joining the
    /// existing cluster. Returns its index.
    pub fn add_member(&mut self) -> usize {
        let i = self.members.len();
        let name = format!("m{i}");
        let peer: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let out = self.members[0].ok(&["member", "add", &name, &format!("--peer-urls=http://{peer}")]);
        assert!(out.contains("added to cluster"), "{out}");
        let mut ic: Vec<String> = self.members.iter().map(|m| format!("{}={}", m.name, m.peer)).collect();
        ic.push(format!("{name}={peer}"));
        let mut s = Server::member(&self.dir, &name, peer, &ic.join(","), "existing");
        s.spawn();
        self.members.push(s);
        i
    }
}
