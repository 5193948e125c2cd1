//! `loadgen dataplane`: the service proxy against kube-proxy's ways, in one run.
//!
//! Topology (built here, inside the load generator's own network namespace, which stands
//! for the node): a client namespace and a backend namespace, each with a veth into the
//! node; the backend's interface holds one address per endpoint and a server that accepts
//! and closes. `--services` ClusterIP services of `--endpoints` endpoints each are
//! programmed four ways in turn and the client connects (and closes, with RST so that no
//! TIME_WAIT limits the rate) to the last service for `--seconds`:
//!
//! - baseline: no rules, straight to one backend address;
//! - ebpf: Shoal's programs as the agent runs them by default: tc on both veths and the
//!   socket-level programs on a cgroup this process joins (cold load and one-change cost
//!   measured); `ebpf_tc_only`: tc alone (`--socket-lb=false`);
//! - nftables: one verdict map from service to a chain per service that DNATs by
//!   `numgen random` (the best nftables layout);
//! - iptables: iptables-legacy rules shaped like kube-proxy's (KUBE-SERVICES ->
//!   KUBE-SVC-* -> KUBE-SEP-* with `statistic random`).
//!
//! Throughput pod -> service -> pod is iperf3 through the eBPF service vs direct.
//!
//! NetworkPolicy (eBPF mode, after the plain run): `--policy-pods` pods on other nodes
//! (with labels shared by 50 pods each, over 100 namespaces) and `--policies` policies are
//! held; the backends are isolated by a policy admitting the client's labels on the
//! server port, so every connection's SYN is judged. Measured: the cold sync (ipcache,
//! endpoints, rules), one pod added, one policy added, and the connect rate with the
//! policy judged (`ebpf_policy`).
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Map, Value};
use shoal_dataplane::abi::Proto;
use shoal_dataplane::{Config, Dataplane, Endpoint, Frontend, ServicePort, Table};

#[derive(Parser, Debug)]
pub struct DataplaneArgs {
    /// ClusterIP services to program.
    #[arg(long, default_value_t = 10000)]
    pub services: usize,
    /// Endpoints per service (addresses of the backend namespace, at most 200).
    #[arg(long, default_value_t = 10)]
    pub endpoints: usize,
    /// Seconds of connecting per mode.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Modes to measure, in order (baseline, ebpf, nftables, iptables); a mode given twice
    /// is reported as `<mode>_2` (the baseline is taken before and after eBPF: the
    /// comparison uses the better of the two).
    #[arg(long, default_value = "baseline,ebpf,baseline,nftables,iptables")]
    pub modes: String,
    /// Seconds of each iperf3 run (0: no throughput measurement).
    #[arg(long, default_value_t = 3)]
    pub iperf_seconds: u64,
    /// One-service changes timed in eBPF mode.
    #[arg(long, default_value_t = 200)]
    pub changes: usize,
    /// Pods on other nodes that NetworkPolicy knows (eBPF mode; 0: no policy measurement).
    #[arg(long, default_value_t = 150000)]
    pub policy_pods: usize,
    /// NetworkPolicies among them (each selects one label set, admits the next one).
    #[arg(long, default_value_t = 1000)]
    pub policies: usize,
}

const SERVER_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const IPERF_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 254);

fn sh(args: &[&str]) -> Result<String> {
    let o = Command::new(args[0]).args(&args[1..]).stderr(Stdio::piped()).stdout(Stdio::piped()).output().with_context(|| format!("running {}", args[0]))?;
    if !o.status.success() {
        bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32 + 1)
}

fn backend(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 2 + j as u8)
}

fn enter(ns: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns changes only this thread's network namespace
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The namespaces and the accept-and-close server; removed on drop.
struct Topology {
    client: String,
    backend: String,
    stop: Arc<AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl Topology {
    fn build(endpoints: usize) -> Result<Topology> {
        let prefix = format!("shoal-bench-{}", std::process::id());
        let (client, backend_ns) = (format!("{prefix}-client"), format!("{prefix}-backend"));
        let mut t = Topology { client: client.clone(), backend: backend_ns.clone(), stop: Arc::new(AtomicBool::new(false)), server: None };
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        for (ns, host, net) in [(&client, "cli0", "10.0.1"), (&backend_ns, "be0", "10.1.0")] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
            sh(&["ip", "addr", "add", &format!("{net}.1/24"), "dev", host])?;
            sh(&["ip", "link", "set", host, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        }
        sh(&["ip", "-n", &client, "addr", "add", "10.0.1.2/24", "dev", "eth0"])?;
        sh(&["ip", "-n", &client, "route", "add", "default", "via", "10.0.1.1"])?;
        sh(&["ip", "netns", "exec", &client, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
        for j in 0..endpoints {
            sh(&["ip", "-n", &backend_ns, "addr", "add", &format!("{}/24", backend(j)), "dev", "eth0"])?;
        }
        sh(&["ip", "-n", &backend_ns, "route", "add", "default", "via", "10.1.0.1"])?;
        let (stop, ns) = (t.stop.clone(), backend_ns.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        t.server = Some(std::thread::spawn(move || {
            let l = enter(&ns).and_then(|_| Ok(TcpListener::bind(("0.0.0.0", SERVER_PORT))?));
            let l = match l {
                Ok(l) => {
                    // std listens with a backlog of 128: at 25,000 connections/s a few
                    // milliseconds without the server thread overflow it (a lost
                    // handshake, a 1-second stall); listening again raises it
                    // SAFETY: listen(2) on the listening socket we own
                    unsafe { libc::listen(l.as_raw_fd(), 4096) };
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !stop.load(Ordering::Relaxed) {
                // closed with RST, as the client does: no TIME_WAIT on either side (a client
                // port reused within a minute would otherwise stall on the old connection;
                // measured: 1-second SYN retransmits that ruined whole runs)
                if let Ok((s, _)) = l.accept() {
                    rst_on_close(&s);
                }
            }
        }));
        rx.recv()??;
        Ok(t)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // wake the accept loop (from the backend's namespace: the node routes to it)
        let _ = TcpStream::connect_timeout(&SocketAddr::from((backend(0), SERVER_PORT)), Duration::from_secs(1));
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        for ns in [&self.client, &self.backend] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// SO_LINGER 0: close() sends RST and leaves no TIME_WAIT.
fn rst_on_close(s: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket fd and a linger struct of the size given
    unsafe { libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &linger as *const _ as *const libc::c_void, size_of::<libc::linger>() as u32) };
}

/// Connects and closes (RST) to `target` from the client namespace for `secs` seconds.
fn connect_loop(client: &str, target: SocketAddr, secs: f64) -> Result<Value> {
    connect_loop_to(client, vec![target], secs)
}

/// As `connect_loop`, over several targets in turn (the baseline goes straight to the
/// endpoints in turn, so that it reuses address pairs as often as the service modes do:
/// one address alone stalls on 1-second SYN retransmits when a client port comes round
/// again too soon).
fn connect_loop_to(client: &str, targets: Vec<SocketAddr>, secs: f64) -> Result<Value> {
    let ns = client.to_string();
    std::thread::spawn(move || -> Result<Value> {
        enter(&ns)?;
        let mut lat: Vec<u32> = Vec::with_capacity(200_000);
        let mut errors = 0u64;
        let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        while Instant::now() < deadline && lat.len() < 5_000_000 {
            let t0 = Instant::now();
            let target = targets[lat.len() % targets.len()];
            match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                Ok(s) => {
                    rst_on_close(&s);
                    lat.push(t0.elapsed().as_micros() as u32);
                }
                // the server resets every connection it accepted: a reset seen by connect()
                // means the handshake completed (the server only resets accepted ones)
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => lat.push(t0.elapsed().as_micros() as u32),
                Err(e) => {
                    errors += 1;
                    *kinds.entry(e.kind().to_string()).or_insert(0u64) += 1;
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        if lat.is_empty() {
            bail!("no connection to {:?} succeeded ({errors} errors)", targets);
        }
        lat.sort_unstable();
        let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
        Ok(json!({"connects_per_s": (lat.len() as f64 / elapsed).round(), "p50_us": p(0.5), "p99_us": p(0.99), "errors": errors, "error_kinds": kinds}))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// iperf3 from the client namespace to `addr`: Gbit/s received.
fn iperf(topo: &Topology, addr: Ipv4Addr, secs: u64) -> Result<f64> {
    let mut server = Command::new("ip").args(["netns", "exec", &topo.backend, "iperf3", "-s", "-1", "-p", &IPERF_PORT.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("starting iperf3 (apt-get install iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = sh(&["ip", "netns", "exec", &topo.client, "timeout", &(secs + 20).to_string(), "iperf3", "-c", &addr.to_string(), "-p", &IPERF_PORT.to_string(), "-t", &secs.to_string(), "-J"]);
    let _ = server.kill();
    let _ = server.wait();
    let v: Value = serde_json::from_str(&out?)?;
    Ok(v.pointer("/end/sum_received/bits_per_second").and_then(Value::as_f64).unwrap_or(0.0) / 1e9)
}

fn service_port(i: usize, endpoints: usize) -> ServicePort {
    ServicePort {
        proto: Proto::Tcp,
        frontends: vec![Frontend { addr: vip(i), port: 80, flags: 0 }],
        endpoints: (0..endpoints).map(|j| Endpoint { addr: backend(j), port: SERVER_PORT, ready: true, serving: true, terminating: false }).collect(),
        affinity_timeout: 0,
        external_local: false,
        maglev: false,
    }
}

fn ebpf(a: &DataplaneArgs, topo: &Topology, out: &mut Map<String, Value>) -> Result<()> {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/shoal-bench-{}", std::process::id()));
    let mut dp = Dataplane::load(&Config { pin_dir, ..Config::default() }).context("loading the BPF programs")?;
    let result = (|| -> Result<()> {
        dp.attach("cli0")?;
        dp.attach("be0")?;
        let ports: Vec<ServicePort> = (0..a.services).map(|i| service_port(i, a.endpoints)).collect();
        let mut table = Table::new();
        let bar = crate::hollow::bar(a.services as u64, "ebpf: programming services");
        let t = Instant::now();
        let mut writes = 0;
        {
            let mut maps = dp.maps();
            for (i, p) in ports.iter().enumerate() {
                writes += table.sync(&format!("bench/svc-{i}:80/TCP"), Some(p), &mut maps)?.total();
                if i % 500 == 0 {
                    bar.set_position(i as u64);
                }
            }
        }
        let cold = t.elapsed().as_secs_f64();
        bar.finish_and_clear();
        out.insert("cold_load_s".into(), json!(cold));
        out.insert("cold_load_map_writes".into(), json!(writes));
        // one service change: an endpoint added, then removed again
        let mid = a.services / 2;
        let (grown, base) = (ServicePort { endpoints: (0..=a.endpoints).map(|j| Endpoint { addr: backend(j), port: SERVER_PORT, ready: true, serving: true, terminating: false }).collect(), ..ports[mid].clone() }, ports[mid].clone());
        let name = format!("bench/svc-{mid}:80/TCP");
        let (mut total, mut change_writes) = (Duration::ZERO, 0);
        {
            let mut maps = dp.maps();
            for k in 0..a.changes {
                let want = if k % 2 == 0 { &grown } else { &base };
                let t = Instant::now();
                change_writes += table.sync(&name, Some(want), &mut maps)?.total();
                total += t.elapsed();
            }
            table.sync(&name, Some(&base), &mut maps)?;
        }
        out.insert("update_ms".into(), json!(total.as_secs_f64() * 1000.0 / a.changes.max(1) as f64));
        out.insert("update_map_writes".into(), json!(change_writes as f64 / a.changes.max(1) as f64));
        // with the socket-level programs on a cgroup holding this process (as the agent
        // attaches them to the pods' cgroup), then tc alone: in this order the socket
        // phase meets no backend that had translated flows (whose replies would each cost
        // a conntrack lookup, as on a node where UDP or affinity flows reach them too)
        let joined = SockCgroup::join(&mut dp)?;
        let r = connect_loop(&topo.client, SocketAddr::from((vip(a.services - 1), 80)), a.seconds);
        drop(joined);
        out.insert("ebpf".into(), r?);
        let r = connect_loop(&topo.client, SocketAddr::from((vip(a.services - 1), 80)), a.seconds)?;
        out.insert("ebpf_tc_only".into(), r);
        if a.iperf_seconds > 0 {
            let one = ServicePort { frontends: vec![Frontend { addr: IPERF_VIP, port: IPERF_PORT, flags: 0 }], endpoints: vec![Endpoint { addr: backend(0), port: IPERF_PORT, ready: true, serving: true, terminating: false }], ..ports[0].clone() };
            table.sync("bench/iperf:5201/TCP", Some(&one), &mut dp.maps())?;
            // single iperf3 runs here vary by +-20%: direct and through the service in
            // turn, three times each, and the medians compared
            let (mut direct, mut service) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                direct.push(iperf(topo, backend(0), a.iperf_seconds)?);
                service.push(iperf(topo, IPERF_VIP, a.iperf_seconds)?);
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(|x, y| x.total_cmp(y));
                v[v.len() / 2]
            };
            out.insert("iperf_direct_runs_gbps".into(), json!(direct.clone()));
            out.insert("iperf_service_runs_gbps".into(), json!(service.clone()));
            out.insert("service_gbps".into(), json!(median(&mut service)));
            out.insert("direct_median_gbps".into(), json!(median(&mut direct)));
        }
        if a.policy_pods > 0 {
            policy(a, topo, &mut dp, out)?;
        }
        let stats: Map<String, Value> = dp.stats().into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        out.insert("ebpf_counters".into(), Value::Object(stats));
        Ok(())
    })();
    let _ = dp.detach("cli0");
    let _ = dp.detach("be0");
    let _ = dp.unpin();
    result
}

/// This process in a cgroup of its own with the socket-level programs attached (the
/// agent's default); back in
/// its own cgroup (and the programs detached) on drop.
struct SockCgroup {
    cgroup: PathBuf,
    home: PathBuf,
    pin_dir: PathBuf,
}

impl SockCgroup {
    fn join(dp: &mut Dataplane) -> Result<SockCgroup> {
        let root = shoal_dataplane::loader::cgroup2_root().context("no cgroup v2 hierarchy for the socket-level programs")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).context("this process has no cgroup v2 path")?;
        let home = root.join(rel.trim_start_matches('/'));
        let cgroup = root.join(format!("shoal-bench-{}", std::process::id()));
        if !dp.attach_cgroup(&cgroup)? {
            bail!("the socket-level programs did not load");
        }
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(SockCgroup { cgroup, home, pin_dir: PathBuf::from(format!("/sys/fs/bpf/shoal-bench-{}", std::process::id())) })
    }
}

impl Drop for SockCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.home.join("cgroup.procs"), std::process::id().to_string());
        let _ = shoal_dataplane::loader::detach_cgroup_links(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// NetworkPolicy at cluster scale on this node's maps, and its cost per connection.
fn policy(a: &DataplaneArgs, topo: &Topology, dp: &mut Dataplane, out: &mut Map<String, Value>) -> Result<()> {
    use shoal_dataplane::policy::Policies;
    let pod = |ns: &str, name: &str, node: &str, ip: Ipv4Addr, labels: Value| json!({"metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": {"nodeName": node}, "status": {"podIP": ip.to_string()}});
    let mut p = Policies::new("bench");
    p.set_host([Ipv4Addr::new(10, 0, 1, 1), Ipv4Addr::new(10, 1, 0, 1)]);
    let t = Instant::now();
    let sets = (a.policy_pods / 50).max(1);
    for n in 0..100 {
        let name = format!("ns-{n}");
        p.hold("Namespace", "", &name, Some(&json!({"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})));
    }
    p.hold("Namespace", "", "bench", Some(&json!({"metadata": {"name": "bench"}})));
    let bar = crate::hollow::bar(a.policy_pods as u64, "ebpf: pods for network policy");
    for i in 0..a.policy_pods {
        // 10.2.0.0/15 and up: clear of the client, backend and service ranges
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + i as u32);
        let set = i % sets;
        let ns = format!("ns-{}", set % 100);
        p.hold("Pod", &ns, &format!("p-{i}"), Some(&pod(&ns, &format!("p-{i}"), &format!("node-{}", i % 5000), ip, json!({"app": format!("app-{set}")}))));
        if i % 5000 == 0 {
            bar.set_position(i as u64);
        }
    }
    bar.finish_and_clear();
    for k in 0..a.policies {
        let (set, next) = (k % sets, (k + 1) % sets);
        let ns = format!("ns-{}", set % 100);
        p.hold("NetworkPolicy", &ns, &format!("np-{k}"), Some(&json!({"spec": {"podSelector": {"matchLabels": {"app": format!("app-{set}")}}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": format!("app-{next}")}}}, {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}], "ports": [{"port": 8080}]}]}})));
    }
    // this node: the client pod and the backends, isolated by a policy for the client
    p.hold("Pod", "bench", "client", Some(&pod("bench", "client", "bench", Ipv4Addr::new(10, 0, 1, 2), json!({"role": "client"}))));
    for j in 0..a.endpoints {
        p.hold("Pod", "bench", &format!("backend-{j}"), Some(&pod("bench", &format!("backend-{j}"), "bench", backend(j), json!({"app": "backend"}))));
    }
    p.hold("NetworkPolicy", "bench", "backend", Some(&json!({"spec": {"podSelector": {"matchLabels": {"app": "backend"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": SERVER_PORT}]}]}})));
    let held = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let s = p.sync(dp.policy_maps());
    let cold = t.elapsed().as_secs_f64();
    if !s.errors.is_empty() {
        bail!("policy sync: {} errors, first {}", s.errors.len(), s.errors[0]);
    }
    let (ipcache, endpoints, rules) = p.sizes();
    out.insert("policy".into(), json!({
        "pods": a.policy_pods, "policies": a.policies + 1, "hold_all_s": held, "cold_sync_s": cold, "cold_sync_map_writes": s.writes,
        "ipcache_entries": ipcache, "isolated_local_pods": endpoints, "rules": rules,
    }));
    // one pod of a known label set comes, then goes
    let (mut total, mut writes) = (Duration::ZERO, 0);
    for k in 0..a.changes {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + (a.policy_pods + 1) as u32);
        let v = (k % 2 == 0).then(|| pod("ns-1", "extra", "node-7", ip, json!({"app": "app-1"})));
        let t = Instant::now();
        p.hold("Pod", "ns-1", "extra", v.as_ref());
        writes += p.sync(dp.policy_maps()).writes;
        total += t.elapsed();
    }
    out["policy"]["pod_change_ms"] = json!(total.as_secs_f64() * 1000.0 / a.changes.max(1) as f64);
    out["policy"]["pod_change_map_writes"] = json!(writes as f64 / a.changes.max(1) as f64);
    // one policy selecting this node's backends changes its port, and back
    let (mut total, mut writes) = (Duration::ZERO, 0);
    let n = a.changes.min(20);
    for k in 0..n {
        let port = if k % 2 == 0 { 9090 } else { SERVER_PORT };
        let v = json!({"spec": {"podSelector": {"matchLabels": {"app": "backend"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": SERVER_PORT}, {"port": port}]}]}});
        let t = Instant::now();
        p.hold("NetworkPolicy", "bench", "backend-extra", Some(&v));
        writes += p.sync(dp.policy_maps()).writes;
        total += t.elapsed();
    }
    out["policy"]["policy_change_ms"] = json!(total.as_secs_f64() * 1000.0 / n.max(1) as f64);
    out["policy"]["policy_change_map_writes"] = json!(writes as f64 / n.max(1) as f64);
    let joined = SockCgroup::join(dp)?;
    let r = connect_loop(&topo.client, SocketAddr::from((vip(a.services - 1), 80)), a.seconds);
    drop(joined);
    out.insert("ebpf_policy".into(), r?);
    // the maps emptied again for the modes after this one
    p.reset();
    p.sync(dp.policy_maps());
    Ok(())
}

fn nftables(a: &DataplaneArgs, topo: &Topology, out: &mut Map<String, Value>) -> Result<()> {
    let mut f = String::from("table ip shoal-bench {\n");
    for i in 0..a.services {
        let map: Vec<String> = (0..a.endpoints).map(|j| format!("{j} : {} . {SERVER_PORT}", backend(j))).collect();
        f.push_str(&format!("  chain svc{i} {{\n    meta l4proto tcp dnat ip to numgen random mod {} map {{ {} }}\n  }}\n", a.endpoints, map.join(", ")));
    }
    let elems: Vec<String> = (0..a.services).map(|i| format!("{} . 80 : goto svc{i}", vip(i))).collect();
    f.push_str(&format!("  map services {{\n    type ipv4_addr . inet_service : verdict\n    elements = {{ {} }}\n  }}\n", elems.join(", ")));
    f.push_str("  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr . tcp dport vmap @services\n  }\n}\n");
    let path = std::env::temp_dir().join(format!("shoal-bench-{}.nft", std::process::id()));
    std::fs::File::create(&path)?.write_all(f.as_bytes())?;
    eprintln!("nftables: loading {} services (this takes a while)", a.services);
    let t = Instant::now();
    let loaded = sh(&["nft", "-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    loaded?;
    out.insert("nftables_load_s".into(), json!(t.elapsed().as_secs_f64()));
    let r = connect_loop(&topo.client, SocketAddr::from((vip(a.services - 1), 80)), a.seconds);
    let _ = sh(&["nft", "delete", "table", "ip", "shoal-bench"]);
    out.insert("nftables".into(), r?);
    Ok(())
}

fn iptables(a: &DataplaneArgs, topo: &Topology, out: &mut Map<String, Value>) -> Result<()> {
    let mut f = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..a.services {
        f.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n"));
        for j in 0..a.endpoints {
            f.push_str(&format!(":KUBE-SEP-{i}-{j} - [0:0]\n"));
        }
    }
    f.push_str("-A PREROUTING -j KUBE-SERVICES\n");
    for i in 0..a.services {
        f.push_str(&format!("-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}\n", vip(i)));
        for j in 0..a.endpoints {
            let left = a.endpoints - j;
            if left > 1 {
                f.push_str(&format!("-A KUBE-SVC-{i} -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i}-{j}\n", 1.0 / left as f64));
            } else {
                f.push_str(&format!("-A KUBE-SVC-{i} -j KUBE-SEP-{i}-{j}\n"));
            }
            f.push_str(&format!("-A KUBE-SEP-{i}-{j} -p tcp -m tcp -j DNAT --to-destination {}:{SERVER_PORT}\n", backend(j)));
        }
    }
    f.push_str("COMMIT\n");
    eprintln!("iptables-legacy: loading {} services", a.services);
    let t = Instant::now();
    let mut p = Command::new("iptables-legacy-restore").stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().context("running iptables-legacy-restore (apt-get install iptables)")?;
    p.stdin.take().unwrap().write_all(f.as_bytes())?;
    let o = p.wait_with_output()?;
    if !o.status.success() {
        bail!("iptables-legacy-restore: {}", String::from_utf8_lossy(&o.stderr));
    }
    out.insert("iptables_load_s".into(), json!(t.elapsed().as_secs_f64()));
    let r = connect_loop(&topo.client, SocketAddr::from((vip(a.services - 1), 80)), a.seconds);
    let _ = sh(&["iptables-legacy", "-t", "nat", "-F"]);
    let _ = sh(&["iptables-legacy", "-t", "nat", "-X"]);
    out.insert("iptables".into(), r?);
    Ok(())
}

pub fn run(a: DataplaneArgs) -> Result<Value> {
    if a.endpoints == 0 || a.endpoints > 200 || a.services == 0 || a.services > 60000 {
        bail!("--endpoints must be 1..=200 and --services 1..=60000");
    }
    let topo = Topology::build(a.endpoints)?;
    let mut out = Map::new();
    out.insert("scenario".into(), json!("dataplane"));
    out.insert("services".into(), json!(a.services));
    out.insert("endpoints".into(), json!(a.endpoints));
    for mode in a.modes.split(',').map(str::trim) {
        eprintln!("dataplane: {mode}");
        match mode {
            "baseline" => {
                let again = out.contains_key("baseline");
                let suffix = if again { "_2" } else { "" };
                let targets = (0..a.endpoints).map(|j| SocketAddr::from((backend(j), SERVER_PORT))).collect();
                out.insert(format!("baseline{suffix}"), connect_loop_to(&topo.client, targets, a.seconds)?);
                if a.iperf_seconds > 0 {
                    out.insert(format!("direct_gbps{suffix}"), json!(iperf(&topo, backend(0), a.iperf_seconds)?));
                }
            }
            "ebpf" | "nftables" | "iptables" => {
                let r = match mode {
                    "ebpf" => ebpf(&a, &topo, &mut out),
                    "nftables" => nftables(&a, &topo, &mut out),
                    _ => iptables(&a, &topo, &mut out),
                };
                // one mode failing (say, no iptables-legacy here) still reports the others
                if let Err(e) = r {
                    eprintln!("dataplane: {mode} failed: {e:#}");
                    out.insert(format!("{mode}_error"), json!(format!("{e:#}")));
                }
            }
            other => bail!("unknown mode {other:?} (baseline, ebpf, nftables, iptables)"),
        }
    }
    if let Ok(n) = sh(&["ip", "netns", "exec", &topo.backend, "nstat", "-az", "TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPReqQFullDrop", "TcpExtSyncookiesSent"]) {
        let counters: Map<String, Value> = n.lines().filter_map(|l| {
            let mut f = l.split_whitespace();
            let (k, v) = (f.next()?, f.next()?.parse::<u64>().ok()?);
            Some((k.to_string(), json!(v)))
        }).collect();
        out.insert("backend_tcp_drops".into(), Value::Object(counters));
    }
    let rate = |m: &str| out.get(m).and_then(|v| v["connects_per_s"].as_f64());
    let b = match (rate("baseline"), rate("baseline_2")) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    let (e, i, tc) = (rate("ebpf"), rate("iptables"), rate("ebpf_tc_only"));
    if let (Some(e), Some(b)) = (e, b) {
        out.insert("ebpf_vs_baseline".into(), json!(e / b));
    }
    if let (Some(e), Some(b)) = (tc, b) {
        out.insert("ebpf_tc_only_vs_baseline".into(), json!(e / b));
    }
    if let (Some(e), Some(i)) = (e, i) {
        out.insert("ebpf_vs_iptables".into(), json!(e / i));
    }
    // the median of the direct runs taken between the service runs (else the baselines')
    let direct = out.get("direct_median_gbps").and_then(Value::as_f64).or_else(|| ["direct_gbps", "direct_gbps_2"].iter().filter_map(|k| out.get(*k).and_then(Value::as_f64)).fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))));
    if let (Some(s), Some(d)) = (out.get("service_gbps").and_then(Value::as_f64), direct) {
        out.insert("throughput_vs_direct".into(), json!(s / d));
    }
    Ok(Value::Object(out))
}
