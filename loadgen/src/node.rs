//! `loadgen node`: one real node. Starts `shoal server` and `shoal agent` (runc, pod
//! network) inside a network namespace of the load generator's own, imports the busybox
//! test image, then creates pods at a steady rate and measures how long each takes to be
//! Running with the image cached (the target: p99 ≤ 1 s for 100 pods), the
//! agent's memory and CPU per pod, and how long deleting them all takes.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

use crate::hollow::{bar, pct, watch_pods};

#[derive(Parser, Debug)]
pub struct NodeArgs {
    /// Pods to start.
    #[arg(long, default_value_t = 100)]
    pub pods: usize,
    /// Pods created per second (a steady rate measures per-pod latency, not a queue).
    #[arg(long, default_value_t = 10.0)]
    pub qps: f64,
    /// The `shoal` binary (default: beside this one).
    #[arg(long)]
    pub shoal_bin: Option<PathBuf>,
    /// The image builder (builds the busybox test image from /bin/busybox).
    #[arg(long, default_value = "scripts/busybox-image.py")]
    pub image_script: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
}

/// Moves the whole process into a new network namespace (before any thread starts: threads
/// and children inherit it), with loopback up.
pub fn enter_own_netns() -> Result<()> {
    // SAFETY: unshare(CLONE_NEWNET) touches no memory; called before other threads exist.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("unshare(CLONE_NEWNET): {} (loadgen node needs root)", std::io::Error::last_os_error());
    }
    let st = Command::new("ip").args(["link", "set", "lo", "up"]).status().context("running ip")?;
    if !st.success() {
        bail!("ip link set lo up failed");
    }
    Ok(())
}

/// The agent process; killed and cleaned up (containers, mounts, namespaces) on drop.
struct AgentProc {
    child: std::process::Child,
    data: PathBuf,
    node: String,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let state = self.data.join("run/state");
        if let Ok(o) = Command::new("runc").arg("--root").arg(&state).args(["list", "-q"]).output() {
            for id in String::from_utf8_lossy(&o.stdout).lines() {
                let _ = Command::new("runc").arg("--root").arg(&state).args(["delete", "--force", id]).stderr(Stdio::null()).status();
            }
        }
        for e in std::fs::read_dir(self.data.join("run/containers")).into_iter().flatten().flatten() {
            let _ = Command::new("umount").arg("-l").arg(e.path().join("rootfs")).stderr(Stdio::null()).status();
        }
        for e in std::fs::read_dir(self.data.join("run/sandboxes")).into_iter().flatten().flatten() {
            let _ = Command::new("ip").args(["netns", "del", &format!("shoal-{}", e.file_name().to_string_lossy())]).stderr(Stdio::null()).status();
        }
        for e in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
            let d = e.path().join("shoal").join(&self.node);
            for p in std::fs::read_dir(&d).into_iter().flatten().flatten().filter(|p| p.path().is_dir()) {
                let _ = std::fs::remove_dir(p.path());
            }
            let _ = std::fs::remove_dir(d);
        }
        let pins = bpf_dir(&self.node);
        for e in std::fs::read_dir(&pins).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let _ = std::fs::remove_dir(pins);
    }
}

/// Where this run's agent pins its service maps (bpffs is the machine's).
fn bpf_dir(node: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/sys/fs/bpf/shoal-loadgen-{node}"))
}

/// Marks this run's shims (their command lines name the node's data directory).
fn data_marker() -> &'static [u8] {
    b"/node/run/"
}

/// Private (not shared) memory of a process, KiB (/proc/PID/smaps_rollup).
fn private_kib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |k: &str| s.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok()).unwrap_or(0.0);
    Some(field("Private_Clean:") + field("Private_Dirty:"))
}

pub async fn node(a: NodeArgs) -> Result<Value> {
    if a.pods == 0 || a.qps <= 0.0 {
        bail!("--pods and --qps must be positive");
    }
    let bin = a.shoal_bin.clone().unwrap_or_else(crate::procs::default_shoal_bin);
    let (server, dir) = crate::procs::start_shoal_api(&bin, None, None, &[])?;
    let t = Instant::now();
    while !std::fs::read_to_string(dir.join("kubeconfig")).is_ok_and(|k| k.contains("token:")) || !dir.join("pki/bootstrap-token").exists() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("shoal server wrote no kubeconfig in {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cfg = shoal_client::Config::from_kubeconfig(&dir.join("kubeconfig"), "loadgen")?;
    let client = shoal_client::Client::new(cfg.clone(), 2)?;

    // The image, imported as a node without a registry would.
    let node_name = format!("bench-{}", std::process::id());
    let data = dir.parent().unwrap_or(&dir).join("node");
    let tar = dir.parent().unwrap_or(&dir).join("busybox.tar");
    let st = Command::new("python3").arg(&a.image_script).arg(&tar).args(["--name", "busybox:bench"]).status().with_context(|| format!("running {}", a.image_script.display()))?;
    if !st.success() {
        bail!("{} failed (run loadgen from the repository root, or pass --image-script)", a.image_script.display());
    }
    let st = Command::new(&bin).args(["image", "--data-dir"]).arg(&data).arg("import").arg(&tar).stdout(Stdio::null()).status()?;
    if !st.success() {
        bail!("shoal image import failed");
    }
    let token = std::fs::read_to_string(dir.join("pki/bootstrap-token"))?;
    let child = Command::new(&bin)
        .arg("agent")
        .args(["--server", &cfg.server, "--token", token.trim(), "--node-name", &node_name, "--metrics-addr", "", "--log", "warn", "--eviction-hard", "memory.available<100Mi"])
        .arg("--ca-file")
        .arg(dir.join("pki/ca.crt"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--bpf-dir")
        .arg(bpf_dir(&node_name))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting shoal agent")?;
    let agent = AgentProc { child, data, node: node_name.clone() };
    let agent_pid = agent.child.id();
    loop {
        let n = client.get(&format!("/api/v1/nodes/{node_name}")).await.ok().flatten();
        let ready = n.as_ref().and_then(|n| n.pointer("/status/conditions")).and_then(Value::as_array).is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        if ready {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the node did not become Ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ns = "node-bench";
    client.create("/api/v1/namespaces", &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})).await.map_err(|e| anyhow::anyhow!("namespace: {e}"))?;
    let pods_path = format!("/api/v1/namespaces/{ns}/pods");
    let (seen, mut running_rx) = watch_pods(&client, &pods_path).await?;
    let pod = |name: &str| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "main", "image": "busybox:bench", "imagePullPolicy": "IfNotPresent", "command": ["sleep", "3600"],
            "resources": {"requests": {"cpu": "1m", "memory": "1Mi"}}}]}});
    // One warm-up pod (the bridge and the first sandbox), not measured.
    client.create(&pods_path, &pod("warmup")).await.map_err(|e| anyhow::anyhow!("warm-up pod: {e}"))?;
    while *running_rx.borrow() < 1 {
        if t.elapsed() > Duration::from_secs(a.timeout_s) {
            bail!("the warm-up pod did not run");
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), running_rx.changed()).await;
    }
    let rss_idle = crate::procs::rss_mib(agent_pid).unwrap_or(0.0);
    let cpu0 = crate::procs::cpu_seconds(agent_pid).unwrap_or(0.0);
    let start = Instant::now();
    let b = bar(a.pods as u64, "pods created");
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.qps));
    for i in 0..a.pods {
        tick.tick().await;
        client.create(&pods_path, &pod(&format!("p-{i}"))).await.map_err(|e| anyhow::anyhow!("pod {i}: {e}"))?;
        b.inc(1);
    }
    b.finish_and_clear();
    let b = bar(a.pods as u64, "pods Running");
    while *running_rx.borrow() < a.pods + 1 {
        b.set_position((*running_rx.borrow()).saturating_sub(1) as u64);
        if start.elapsed() > Duration::from_secs(a.timeout_s) {
            bail!("only {} of {} pods Running after {:.0} s", (*running_rx.borrow()).saturating_sub(1), a.pods, start.elapsed().as_secs_f64());
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), running_rx.changed()).await;
    }
    b.finish_and_clear();
    let all_running_s = start.elapsed().as_secs_f64();
    let cpu = crate::procs::cpu_seconds(agent_pid).unwrap_or(0.0) - cpu0;
    let rss = crate::procs::rss_mib(agent_pid).unwrap_or(0.0);
    // The per-container shims (their private memory: the binary's pages are shared).
    let shims: Vec<u32> = std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| (c.split(|b| *b == 0).nth(1) == Some(b"shim".as_slice()) || c.split(|b| *b == 0).next().is_some_and(|a| a.ends_with(b"shoal-shim"))) && c.windows(data_marker().len()).any(|w| w == data_marker()))).collect();
    let shim_private_kib: f64 = shims.iter().filter_map(|pid| private_kib(*pid)).sum();
    let mut lat: Vec<f64> = seen.lock().iter().filter(|(n, _)| n.starts_with("p-")).filter_map(|(_, s)| Some(s.running?.duration_since(s.created?).as_secs_f64())).collect();
    let (p50, p90, p99, max) = (pct(&mut lat, 0.5), pct(&mut lat, 0.9), pct(&mut lat, 0.99), pct(&mut lat, 1.0));
    // Delete them all and wait until the node has stopped every container.
    let del = Instant::now();
    client.delete(&pods_path, None).await.map_err(|e| anyhow::anyhow!("deleting pods: {e}"))?;
    loop {
        let (left, _) = client.list(&pods_path).await.map_err(|e| anyhow::anyhow!("listing pods: {e}"))?;
        if left.is_empty() {
            break;
        }
        if del.elapsed() > Duration::from_secs(a.timeout_s) {
            bail!("{} pods still there after {:.0} s", left.len(), del.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let delete_all_s = del.elapsed().as_secs_f64();
    let shim_kib = if shims.is_empty() { 0.0 } else { shim_private_kib / shims.len() as f64 };
    println!("{:<6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>14} {:>12} {:>14} {:>14} {:>12}", "node", "pods", "p50 s", "p90 s", "p99 s", "max s", "all running s", "agent RSS", "CPU ms/pod", "delete all s", "shim KiB");
    println!("{:<6} {:>6} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>14.1} {:>12.1} {:>14.1} {:>14.1} {:>12.0}", "", a.pods, p50, p90, p99, max, all_running_s, rss, cpu * 1000.0 / a.pods as f64, delete_all_s, shim_kib);
    drop(agent);
    drop(server);
    Ok(json!({
        "scenario": "node", "pods": a.pods, "qps": a.qps,
        "startup_p50_s": p50, "startup_p90_s": p90, "startup_p99_s": p99, "startup_max_s": max,
        "all_running_s": all_running_s, "agent_rss_mib": rss, "agent_rss_idle_mib": rss_idle,
        "agent_cpu_ms_per_pod": cpu * 1000.0 / a.pods as f64, "delete_all_s": delete_all_s,
        "shims": shims.len(), "shim_private_kib": shim_kib,
    }))
}
