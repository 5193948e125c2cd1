//! The runc runtime: a sandbox is the pod's network namespace (from [`crate::net`]) plus a
//! directory with its `hosts`, `resolv.conf` and `hostname`; a container is an OCI bundle
//! (config.json + an overlayfs root stacked from the image's layers) run by the `runc`
//! binary in detached mode.
//!
//! The agent is the containers' subreaper: when `runc create` exits, the container's
//! process is re-parented to the agent, which reaps it and so learns its exit code. The
//! container's stdout and stderr are pipes the agent reads and writes to the pod's log
//! files in the CRI log format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::watch;

use super::{ContainerConfig, ContainerState, Result, Runtime, RuntimeError, SandboxConfig, Usage};
use crate::image::ImageStore;
use crate::net::PodNetwork;
use crate::pods::now;

/// How the runc runtime is set up.
#[derive(Clone, Debug)]
pub struct RuncSettings {
    /// Where bundles, sandboxes and logs live (`DATA/run`).
    pub root: PathBuf,
    /// The runc binary.
    pub runc: PathBuf,
    /// Parent cgroup of all pods (`/shoal/NODE`).
    pub cgroup_parent: String,
    /// The node's pod range, for the gateway of pod networks (set when known).
    pub pod_cidr: Arc<Mutex<Option<String>>>,
}

struct Sandbox {
    uid: String,
    dir: PathBuf,
    netns: Option<PathBuf>,
    hostname: String,
}

struct Ctr {
    dir: PathBuf,
    log: PathBuf,
    pid: Option<i32>,
    state: watch::Sender<ContainerState>,
    cgroup: String,
    /// (when, cpu ns) of the last usage sample, for a rate.
    cpu_sample: Option<(Instant, u64)>,
    /// Held while runc creates and starts it: stop and remove wait for a start in flight.
    op: Arc<tokio::sync::Mutex<()>>,
}

/// The runtime.
pub struct Runc {
    s: RuncSettings,
    images: Arc<ImageStore>,
    net: Arc<PodNetwork>,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    ctrs: Arc<Mutex<HashMap<String, Ctr>>>,
    seq: std::sync::atomic::AtomicU64,
    cgroup_v2: bool,
    /// The pod range the bridge was set up for.
    bridge: tokio::sync::Mutex<Option<String>>,
}

fn other(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Other(e.to_string())
}

/// Capabilities a container has by default (the container runtimes' default set).
const DEFAULT_CAPS: &[&str] = &["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"];

/// Every capability, for privileged containers.
const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
];

/// `NET_ADMIN` or `CAP_NET_ADMIN` → `CAP_NET_ADMIN`; `ALL` stays.
fn cap_name(c: &str) -> String {
    let u = c.to_ascii_uppercase();
    if u == "ALL" || u.starts_with("CAP_") {
        u
    } else {
        format!("CAP_{u}")
    }
}

/// The container's capability set from the defaults and its securityContext.
pub fn capabilities(privileged: bool, add: &[String], drop: &[String]) -> Vec<String> {
    if privileged {
        return ALL_CAPS.iter().map(|c| c.to_string()).collect();
    }
    let drop: Vec<String> = drop.iter().map(|c| cap_name(c)).collect();
    let add: Vec<String> = add.iter().map(|c| cap_name(c)).collect();
    let mut caps: Vec<String> = if drop.iter().any(|d| d == "ALL") { vec![] } else { DEFAULT_CAPS.iter().map(|c| c.to_string()).filter(|c| !drop.contains(c)).collect() };
    if add.iter().any(|a| a == "ALL") {
        return ALL_CAPS.iter().map(|c| c.to_string()).collect();
    }
    for a in add {
        if !caps.contains(&a) && ALL_CAPS.contains(&a.as_str()) {
            caps.push(a);
        }
    }
    caps
}

/// One CRI log line: `TIME STREAM TAG MESSAGE` (`F` full line, `P` partial).
fn cri_line(stream: &str, partial: bool, msg: &[u8]) -> Vec<u8> {
    let ts = shoal_client::time::now_nanos();
    let mut out = Vec::with_capacity(msg.len() + 48);
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(msg);
    out.push(b'\n');
    out
}

/// Copies one stream of a container into its log file, line by line.
async fn copy_log(pipe: std::io::PipeReader, stream: &'static str, log: Arc<tokio::sync::Mutex<tokio::fs::File>>) {
    let Ok(fd) = tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(pipe)) else { return };
    let mut r = tokio::io::BufReader::with_capacity(16 << 10, fd);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Long lines are split into 16 KiB partial records, as the CRI runtimes do.
        let n = match (&mut r).take(16 << 10).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let full = line.last() == Some(&b'\n');
        let msg = if full { &line[..n - 1] } else { &line[..] };
        let rec = cri_line(stream, !full, msg);
        let mut f = log.lock().await;
        if f.write_all(&rec).await.is_err() {
            return;
        }
    }
}

use tokio::io::AsyncReadExt as _;

/// `runc create` (stdio to the log pipes, the pid recorded) then `runc start`.
async fn start(runc: &Path, root: &Path, id: &str, dir: &Path, log: &Path, ctrs: &Mutex<HashMap<String, Ctr>>) -> Result<()> {
    let (out_r, out_w) = std::io::pipe().map_err(other)?;
    let (err_r, err_w) = std::io::pipe().map_err(other)?;
    let file = tokio::fs::OpenOptions::new().create(true).append(true).open(log).await.map_err(other)?;
    let file = Arc::new(tokio::sync::Mutex::new(file));
    tokio::spawn(copy_log(out_r, "stdout", file.clone()));
    tokio::spawn(copy_log(err_r, "stderr", file));
    let pid_file = dir.join("pid");
    let runc_log = dir.join("runc.log");
    let st = Command::new(runc)
        .arg("--root")
        .arg(root)
        .arg("--log")
        .arg(&runc_log)
        .args(["--log-format", "json", "create", "--bundle"])
        .arg(dir)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .status()
        .await
        .map_err(|e| other(format!("running runc: {e}")))?;
    if !st.success() {
        // runc writes why to its log, one JSON object per line.
        let why = std::fs::read_to_string(&runc_log).unwrap_or_default().lines().rev().find_map(|l| serde_json::from_str::<Value>(l).ok().filter(|v| v["level"] == "error").and_then(|v| v["msg"].as_str().map(str::to_string))).unwrap_or_else(|| format!("runc create exited with {st}"));
        return Err(RuntimeError::Other(format!("failed to create containerd task: failed to create shim task: OCI runtime create failed: {why}")));
    }
    let pid: i32 = std::fs::read_to_string(&pid_file).map_err(other)?.trim().parse().map_err(other)?;
    if let Some(c) = ctrs.lock().get_mut(id) {
        c.pid = Some(pid);
    }
    let out = Command::new(runc).arg("--root").arg(root).args(["start", id]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output().await.map_err(|e| other(format!("running runc: {e}")))?;
    if !out.status.success() {
        return Err(other(format!("runc start: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    if let Some(c) = ctrs.lock().get(id) {
        c.state.send_if_modified(|s| {
            if *s == ContainerState::Created {
                *s = ContainerState::Running { started_at: now() };
                true
            } else {
                false
            }
        });
    }
    Ok(())
}

impl Runc {
    /// Sets up the runtime: makes the agent the subreaper of its containers and clears
    /// containers left by an earlier agent (they are started again from the pods).
    pub async fn new(s: RuncSettings, images: Arc<ImageStore>, net: Arc<PodNetwork>) -> anyhow::Result<Arc<Runc>> {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
        std::fs::create_dir_all(s.root.join("state"))?;
        std::fs::create_dir_all(s.root.join("containers"))?;
        std::fs::create_dir_all(s.root.join("sandboxes"))?;
        let cgroup_v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let rt = Arc::new(Runc { s, images, net, sandboxes: Mutex::new(HashMap::new()), ctrs: Arc::new(Mutex::new(HashMap::new())), seq: Default::default(), cgroup_v2, bridge: Default::default() });
        rt.clean_leftovers().await;
        rt.clone().reap();
        Ok(rt)
    }

    async fn runc(&self, args: &[&str]) -> Result<()> {
        let out = Command::new(&self.s.runc).arg("--root").arg(self.s.root.join("state")).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output().await.map_err(|e| other(format!("running {}: {e}", self.s.runc.display())))?;
        if !out.status.success() {
            return Err(other(format!("runc {}: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&out.stderr).trim())));
        }
        Ok(())
    }

    async fn clean_leftovers(&self) {
        let Ok(rd) = std::fs::read_dir(self.s.root.join("containers")) else { return };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            let _ = self.runc(&["delete", "--force", &id]).await;
            let _ = rustix::mount::unmount(e.path().join("rootfs"), rustix::mount::UnmountFlags::DETACH);
            let _ = std::fs::remove_dir_all(e.path());
        }
        if let Ok(rd) = std::fs::read_dir(self.s.root.join("sandboxes")) {
            for e in rd.flatten() {
                let uid = e.file_name().to_string_lossy().to_string();
                let _ = self.net.teardown(&uid).await;
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Reaps exited containers (the agent is their subreaper) and records exit codes.
    fn reap(self: Arc<Self>) {
        let ctrs = self.ctrs.clone();
        tokio::spawn(async move {
            let Ok(mut sig) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) else {
                tracing::error!("cannot watch SIGCHLD: container exits will not be seen");
                return;
            };
            loop {
                // SIGCHLD may coalesce: poll every second as well.
                let _ = tokio::time::timeout(Duration::from_secs(1), sig.recv()).await;
                let mut g = ctrs.lock();
                for c in g.values_mut() {
                    let Some(pid) = c.pid else { continue };
                    let Some(p) = rustix::process::Pid::from_raw(pid) else { continue };
                    if let Ok(Some((_, st))) = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
                        let code = st.exit_status().or_else(|| st.terminating_signal().map(|s| 128 + s)).unwrap_or(255);
                        let started_at = match *c.state.borrow() {
                            ContainerState::Running { started_at } => started_at,
                            _ => now(),
                        };
                        let oom = st.terminating_signal() == Some(9) && oom_killed(&c.cgroup, self.cgroup_v2);
                        let reason = if oom { "OOMKilled" } else if code == 0 { "Completed" } else { "Error" };
                        c.pid = None;
                        c.state.send_replace(ContainerState::Exited { exit_code: code, reason: reason.into(), started_at, finished_at: now() });
                    }
                }
            }
        });
    }

    /// Removes the pod's (empty, its containers gone) cgroup in every hierarchy.
    fn remove_pod_cgroups(&self, uid: &str) {
        let rel = format!("{}/pod{uid}", self.s.cgroup_parent);
        if self.cgroup_v2 {
            let _ = std::fs::remove_dir(format!("/sys/fs/cgroup{rel}"));
            return;
        }
        for e in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
            let _ = std::fs::remove_dir(e.path().join(rel.trim_start_matches('/')));
        }
    }

    fn cgroup_file(&self, cgroup: &str, controller: &str, file: &str) -> PathBuf {
        if self.cgroup_v2 {
            PathBuf::from(format!("/sys/fs/cgroup{cgroup}/{file}"))
        } else {
            PathBuf::from(format!("/sys/fs/cgroup/{controller}{cgroup}/{file}"))
        }
    }

    fn read_u64(p: &Path) -> Option<u64> {
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    }

    /// (cpu ns used, memory working set) of a cgroup.
    fn cgroup_usage(&self, cg: &str) -> Option<(u64, u64)> {
        if self.cgroup_v2 {
            let stat = std::fs::read_to_string(self.cgroup_file(cg, "", "cpu.stat")).ok()?;
            let usec: u64 = stat.lines().find_map(|l| l.strip_prefix("usage_usec ")).and_then(|v| v.trim().parse().ok())?;
            let mem = Self::read_u64(&self.cgroup_file(cg, "", "memory.current"))?;
            Some((usec * 1000, mem))
        } else {
            let cpu = Self::read_u64(&self.cgroup_file(cg, "cpuacct", "cpuacct.usage"))?;
            let mem = Self::read_u64(&self.cgroup_file(cg, "memory", "memory.usage_in_bytes"))?;
            let stat = std::fs::read_to_string(self.cgroup_file(cg, "memory", "memory.stat")).unwrap_or_default();
            let inactive: u64 = stat.lines().find_map(|l| l.strip_prefix("total_inactive_file ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            Some((cpu, mem.saturating_sub(inactive)))
        }
    }

    fn bundle(&self, id: &str, sb: &Sandbox, c: &ContainerConfig, img: &crate::image::Image, cgroup: &str) -> Value {
        let r = &c.run;
        let mut args: Vec<String> = if r.command.is_empty() { img.config.entrypoint.clone() } else { r.command.clone() };
        if !r.args.is_empty() {
            args.extend(r.args.iter().cloned());
        } else if r.command.is_empty() {
            args.extend(img.config.cmd.iter().cloned());
        }
        let mut env: Vec<String> = img.config.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        env.push(format!("HOSTNAME={}", sb.hostname));
        for (k, v) in &r.env {
            env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k));
            env.push(format!("{k}={v}"));
        }
        let (img_uid, img_gid) = parse_user(&img.config.user);
        let uid = r.run_as_user.unwrap_or(img_uid);
        let gid = r.run_as_group.unwrap_or(if r.run_as_user.is_some() && img.config.user.is_empty() { 0 } else { img_gid });
        let caps = capabilities(r.privileged, &r.cap_add, &r.cap_drop);
        let cwd = r.working_dir.clone().filter(|w| !w.is_empty()).or_else(|| Some(img.config.working_dir.clone()).filter(|w| !w.is_empty())).unwrap_or_else(|| "/".into());
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", if r.privileged { "rw" } else { "ro" }]}),
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
        ];
        for f in ["hosts", "resolv.conf", "hostname"] {
            mounts.push(json!({"destination": format!("/etc/{f}"), "type": "bind", "source": sb.dir.join(f), "options": ["rbind", "rprivate", "rw"]}));
        }
        for m in &r.mounts {
            mounts.push(json!({"destination": m.container_path, "type": "bind", "source": m.host_path, "options": ["rbind", "rprivate", if m.read_only { "ro" } else { "rw" }]}));
        }
        let mut namespaces = vec![json!({"type": "pid"}), json!({"type": "ipc"}), json!({"type": "uts"}), json!({"type": "mount"})];
        if let Some(ns) = &sb.netns {
            namespaces.push(json!({"type": "network", "path": ns}));
        }
        let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
        if r.memory_limit_bytes > 0 {
            resources["memory"] = json!({"limit": r.memory_limit_bytes});
        }
        // Shares from the request (2 minimum, as upstream), quota from the limit.
        let shares = (r.cpu_request_milli * 1024 / 1000).max(2);
        resources["cpu"] = json!({"shares": shares});
        if r.cpu_limit_milli > 0 {
            resources["cpu"]["quota"] = json!((r.cpu_limit_milli * 100_000 / 1000).max(1000));
            resources["cpu"]["period"] = json!(100_000);
        }
        let _ = id;
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": uid, "gid": gid},
                "args": args,
                "env": env,
                "cwd": cwd,
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "noNewPrivileges": false,
                "oomScoreAdj": if r.memory_limit_bytes > 0 { 999 } else { 1000 },
            },
            "root": {"path": "rootfs", "readonly": r.read_only_root},
            "hostname": sb.hostname,
            "mounts": mounts,
            "linux": {
                "namespaces": namespaces,
                "cgroupsPath": cgroup,
                "resources": resources,
                "maskedPaths": if r.privileged { json!([]) } else { json!(["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"]) },
                "readonlyPaths": if r.privileged { json!([]) } else { json!(["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]) },
            },
        })
    }
}

/// `1000`, `1000:1000`; names (which need the image's /etc/passwd) count as root.
fn parse_user(u: &str) -> (u32, u32) {
    let (a, b) = u.split_once(':').unwrap_or((u, ""));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

fn oom_killed(cgroup: &str, v2: bool) -> bool {
    let p = if v2 { format!("/sys/fs/cgroup{cgroup}/memory.events") } else { format!("/sys/fs/cgroup/memory{cgroup}/memory.oom_control") };
    let s = std::fs::read_to_string(p).unwrap_or_default();
    s.lines().any(|l| (l.starts_with("oom_kill ") && !l.ends_with(" 0")) || l == "under_oom 1")
}

impl Runtime for Runc {
    fn version(&self) -> String {
        "runc://1.1".into()
    }

    fn keeps_specs(&self) -> bool {
        true
    }

    fn images(&self) -> (u64, Vec<(Vec<String>, u64)>) {
        let list = self.images.list();
        let r#gen = self.images.generation();
        (r#gen, list.into_iter().map(|i| (i.repo_digests.iter().chain(i.repo_tags.iter()).cloned().collect(), i.size)).collect())
    }

    fn set_peers(&self, peers: Vec<(String, String, String)>, full: bool) {
        let net = self.net.clone();
        tokio::spawn(async move { net.set_peers(peers, full).await });
    }

    fn set_pod_cidr(&self, cidr: &str) {
        *self.s.pod_cidr.lock() = Some(cidr.to_string());
    }

    async fn run_sandbox(&self, cfg: &SandboxConfig) -> Result<String> {
        let dir = self.s.root.join("sandboxes").join(&cfg.uid);
        std::fs::create_dir_all(&dir).map_err(other)?;
        let ip = cfg.ip.map(|i| i.to_string()).unwrap_or_else(|| "127.0.0.1".into());
        let hosts = format!("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n{ip}\t{}\n", cfg.hostname);
        std::fs::write(dir.join("hosts"), hosts).map_err(other)?;
        std::fs::write(dir.join("hostname"), format!("{}\n", cfg.hostname)).map_err(other)?;
        // Without a cluster DNS service yet, pods resolve as the node does (dnsPolicy Default).
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        std::fs::write(dir.join("resolv.conf"), resolv).map_err(other)?;
        let netns = match (cfg.host_network, cfg.ip) {
            (false, Some(ip)) => {
                let cidr = self.s.pod_cidr.lock().clone().ok_or_else(|| other("the node has no podCIDR yet"))?;
                {
                    let mut b = self.bridge.lock().await;
                    if b.as_deref() != Some(cidr.as_str()) {
                        self.net.ensure_bridge(&cidr).await.map_err(other)?;
                        *b = Some(cidr.clone());
                    }
                }
                Some(self.net.setup(&cfg.uid, ip, &cidr).await.map_err(other)?)
            }
            _ => None,
        };
        let id = cfg.uid.clone();
        self.sandboxes.lock().insert(id.clone(), Sandbox { uid: cfg.uid.clone(), dir, netns, hostname: cfg.hostname.clone() });
        Ok(id)
    }

    async fn stop_sandbox(&self, id: &str) -> Result<()> {
        let uid = self.sandboxes.lock().get(id).map(|s| s.uid.clone());
        if let Some(uid) = uid {
            self.net.teardown(&uid).await.map_err(other)?;
        }
        Ok(())
    }

    async fn remove_sandbox(&self, id: &str) -> Result<()> {
        if let Some(sb) = self.sandboxes.lock().remove(id) {
            let _ = std::fs::remove_dir_all(&sb.dir);
            self.remove_pod_cgroups(&sb.uid);
        }
        Ok(())
    }

    async fn pull_image(&self, image: &str, policy: super::PullPolicy, creds: &[crate::image::Credentials]) -> Result<String> {
        let have = self.images.get(image);
        let img = match (policy, have) {
            (super::PullPolicy::Never, None) => return Err(RuntimeError::ImageNeverPull(format!("Container image \"{image}\" is not present with pull policy of Never"))),
            (super::PullPolicy::Never | super::PullPolicy::IfNotPresent, Some(i)) => i,
            (_, _) => {
                let mut last = None;
                let mut got = None;
                for c in creds.iter().map(Some).chain(creds.is_empty().then_some(None)) {
                    match self.images.pull(image, c, true).await {
                        Ok(i) => {
                            got = Some(i);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                match got {
                    Some(i) => i,
                    None => {
                        let e = last.map(|e| e.to_string()).unwrap_or_default();
                        let canon = crate::image::Reference::parse(image).map(|r| r.to_string()).unwrap_or_else(|_| image.to_string());
                        return Err(RuntimeError::ImagePull(format!("failed to pull and unpack image \"{canon}\": {e}")));
                    }
                }
            }
        };
        Ok(img.repo_digests.first().cloned().unwrap_or(img.id))
    }

    async fn create_container(&self, sandbox: &str, c: &ContainerConfig) -> Result<String> {
        let img = self.images.get(&c.image).ok_or_else(|| RuntimeError::ImagePull(format!("image {} is not present", c.image)))?;
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut rnd = [0u8; 6];
        let _ = std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").map_err(other)?, &mut rnd);
        let id = format!("{}{n:04x}", crate::image::unpack::hex(&rnd));
        let (sb_uid, log_dir) = {
            let g = self.sandboxes.lock();
            let sb = g.get(sandbox).ok_or_else(|| RuntimeError::NotFound(sandbox.into()))?;
            (sb.uid.clone(), sb.dir.join("logs").join(&c.name))
        };
        let dir = self.s.root.join("containers").join(&id);
        let rootfs = dir.join("rootfs");
        for d in [&rootfs, &dir.join("upper"), &dir.join("work"), &log_dir] {
            std::fs::create_dir_all(d).map_err(other)?;
        }
        let lower: Vec<String> = self.images.layer_dirs(&img).iter().map(|p| p.display().to_string()).collect();
        let opts = format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), dir.join("upper").display(), dir.join("work").display());
        let opts = std::ffi::CString::new(opts).map_err(other)?;
        rustix::mount::mount("overlay", &rootfs, "overlay", rustix::mount::MountFlags::empty(), Some(opts.as_c_str())).map_err(|e| other(format!("mounting the container's root: {e}")))?;
        let cgroup = format!("{}/pod{sb_uid}/{id}", self.s.cgroup_parent);
        let spec = {
            let g = self.sandboxes.lock();
            let sb = g.get(sandbox).ok_or_else(|| RuntimeError::NotFound(sandbox.into()))?;
            self.bundle(&id, sb, c, &img, &cgroup)
        };
        std::fs::write(dir.join("config.json"), serde_json::to_vec(&spec).map_err(other)?).map_err(other)?;
        // One log file per start, numbered as the kubelet numbers restarts.
        let restarts = std::fs::read_dir(&log_dir).map(|r| r.count()).unwrap_or(0);
        let log = log_dir.join(format!("{restarts}.log"));
        let (state, _) = watch::channel(ContainerState::Created);
        self.ctrs.lock().insert(id.clone(), Ctr { dir, log, pid: None, state, cgroup, cpu_sample: None, op: Default::default() });
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        let (dir, log, op) = {
            let g = self.ctrs.lock();
            let c = g.get(id).ok_or_else(|| RuntimeError::NotFound(id.into()))?;
            (c.dir.clone(), c.log.clone(), c.op.clone())
        };
        // In a task of its own: a caller that gives up (the pod was deleted) must not leave
        // a half-created container behind; stop and remove wait for it through `op`.
        let guard = op.lock_owned().await;
        let (runc, root, ctrs, id) = (self.s.runc.clone(), self.s.root.join("state"), self.ctrs.clone(), id.to_string());
        let task = tokio::spawn(async move {
            let _guard = guard;
            start(&runc, &root, &id, &dir, &log, &ctrs).await
        });
        task.await.map_err(|e| other(format!("start task failed: {e}")))?
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<()> {
        let op = self.ctrs.lock().get(id).map(|c| c.op.clone()).ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        let _op = op.lock().await;
        let mut rx = {
            let g = self.ctrs.lock();
            let c = g.get(id).ok_or_else(|| RuntimeError::NotFound(id.into()))?;
            if c.pid.is_none() {
                return Ok(());
            }
            c.state.subscribe()
        };
        let exited = |s: &ContainerState| matches!(s, ContainerState::Exited { .. });
        if grace > Duration::ZERO {
            let _ = self.runc(&["kill", id, "TERM"]).await;
            if tokio::time::timeout(grace, rx.wait_for(exited)).await.is_ok() {
                return Ok(());
            }
        }
        let _ = self.runc(&["kill", "--all", id, "KILL"]).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(exited)).await;
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        let op = self.ctrs.lock().get(id).map(|c| c.op.clone());
        let _op = match &op {
            Some(op) => Some(op.lock().await),
            None => None,
        };
        let dir = self.ctrs.lock().remove(id).map(|c| c.dir);
        let _ = self.runc(&["delete", "--force", id]).await;
        if let Some(dir) = dir {
            let _ = rustix::mount::unmount(dir.join("rootfs"), rustix::mount::UnmountFlags::DETACH);
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(())
    }

    fn container_state(&self, id: &str) -> Result<ContainerState> {
        self.ctrs.lock().get(id).map(|c| c.state.borrow().clone()).ok_or_else(|| RuntimeError::NotFound(id.into()))
    }

    async fn wait_container(&self, id: &str) -> Result<ContainerState> {
        let mut rx = self.ctrs.lock().get(id).map(|c| c.state.subscribe()).ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        let st = rx.wait_for(|s| matches!(s, ContainerState::Exited { .. })).await.map_err(|_| RuntimeError::NotFound(id.into()))?;
        Ok(st.clone())
    }

    fn log_path(&self, id: &str) -> Option<PathBuf> {
        self.ctrs.lock().get(id).map(|c| c.log.clone())
    }

    fn logs(&self, id: &str) -> Result<Vec<u8>> {
        let log = self.ctrs.lock().get(id).map(|c| c.log.clone()).ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        Ok(std::fs::read(log).unwrap_or_default())
    }

    fn usage(&self) -> Usage {
        let ids: Vec<String> = self.ctrs.lock().keys().cloned().collect();
        ids.iter().filter_map(|id| self.container_usage(id)).fold(Usage::default(), |a, u| Usage { cpu_nanocores: a.cpu_nanocores + u.cpu_nanocores, memory_bytes: a.memory_bytes + u.memory_bytes })
    }

    fn exec(&self, id: &str, cmd: &[String], stdin: bool) -> Result<tokio::process::Child> {
        if !matches!(self.container_state(id)?, ContainerState::Running { .. }) {
            return Err(other("container not running"));
        }
        if cmd.is_empty() {
            return Err(other("a command is required"));
        }
        Command::new(&self.s.runc)
            .arg("--root")
            .arg(self.s.root.join("state"))
            .args(["exec", id])
            .args(cmd)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| other(format!("running runc exec: {e}")))
    }

    fn container_usage(&self, id: &str) -> Option<Usage> {
        let cg = {
            let g = self.ctrs.lock();
            let c = g.get(id)?;
            if c.pid.is_none() {
                return None;
            }
            c.cgroup.clone()
        };
        let (cpu, mem) = self.cgroup_usage(&cg)?;
        let now = Instant::now();
        let mut g = self.ctrs.lock();
        let c = g.get_mut(id)?;
        let rate = match c.cpu_sample {
            Some((t, prev)) if now > t => (cpu.saturating_sub(prev) as f64 / (now - t).as_secs_f64()) as u64,
            _ => 0,
        };
        c.cpu_sample = Some((now, cpu));
        Some(Usage { cpu_nanocores: rate, memory_bytes: mem })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_sets_follow_the_security_context() {
        let d = capabilities(false, &[], &[]);
        assert!(d.contains(&"CAP_CHOWN".to_string()) && !d.contains(&"CAP_NET_ADMIN".to_string()));
        let c = capabilities(false, &["NET_ADMIN".into()], &["ALL".into()]);
        assert_eq!(c, vec!["CAP_NET_ADMIN"]);
        let c = capabilities(false, &[], &["CHOWN".into(), "cap_kill".into()]);
        assert!(!c.contains(&"CAP_CHOWN".to_string()) && !c.contains(&"CAP_KILL".to_string()));
        assert_eq!(capabilities(true, &[], &["ALL".into()]).len(), ALL_CAPS.len());
        assert!(!capabilities(false, &["NOT_A_CAP".into()], &[]).contains(&"CAP_NOT_A_CAP".to_string()));
    }

    #[test]
    fn cri_log_lines() {
        let l = String::from_utf8(cri_line("stdout", false, b"hello")).unwrap();
        let parts: Vec<&str> = l.splitn(4, ' ').collect();
        assert!(parts[0].ends_with('Z') && parts[0].contains('.'), "{l}");
        assert_eq!(&parts[1..], &["stdout", "F", "hello\n"]);
        assert!(String::from_utf8(cri_line("stderr", true, b"x")).unwrap().contains(" stderr P x"));
        assert_eq!(parse_user("1000:2000"), (1000, 2000));
        assert_eq!(parse_user("nobody"), (0, 0));
    }
}
