//! The runc runtime: a sandbox is the pod's network namespace (from [`crate::net`]) plus a
//! directory with its `hosts`, `resolv.conf` and `hostname`; a container is an OCI bundle
//! (config.json + an overlayfs root stacked from the image's layers) run by the `runc`
//! binary in detached mode.
//!
//! Each container has a shim (`shoal shim`, [`crate::shim`]) that runs `runc create`, holds
//! its stdout/stderr and writes them to the log in the CRI format, reaps it and writes its
//! exit status; so containers and their logs outlive an agent restart, and the agent that
//! starts next adopts them (bundles carry `meta.json`, sandboxes theirs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
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
    /// The `shoal` binary (its `shim` command runs each container).
    pub shim: PathBuf,
    /// Container log rotation: size (0: never) and files kept.
    pub log_max_bytes: u64,
    pub log_max_files: u32,
}

/// What a bundle records for the agent that adopts it after a restart.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, Default)]
struct Meta {
    pod_uid: String,
    container: String,
    sandbox: String,
    log: PathBuf,
    cgroup: String,
    image_id: String,
    restarts: u32,
}

/// What a sandbox records (`sandboxes/UID/meta.json`).
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, Default)]
struct SandboxMeta {
    ip: Option<std::net::Ipv4Addr>,
    hostname: String,
    netns: Option<PathBuf>,
    #[serde(default)]
    host_ports: Vec<(String, u16, u16)>,
}

struct Sandbox {
    uid: String,
    dir: PathBuf,
    netns: Option<PathBuf>,
    hostname: String,
    host_ports: Vec<(String, u16, u16)>,
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
    /// The image it runs (a repo digest or the image ID), which image GC keeps.
    image_id: String,
}

/// A container found at start-up, not yet claimed by its pod.
#[derive(Clone, Debug)]
pub struct AdoptedCtr {
    pub id: String,
    pub container: String,
    pub state: ContainerState,
    pub image_id: String,
    pub restarts: u32,
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
    /// When each image (by the id containers record) was last used to create a container.
    image_last_used: Mutex<HashMap<String, i64>>,
    /// Route updates, applied in order by one task.
    peers: tokio::sync::mpsc::UnboundedSender<(Vec<(String, String, String)>, bool)>,
    /// Per pod: held while its network is set up or torn down.
    sandbox_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Containers and sandboxes found at start-up, by pod uid, until their pod claims them.
    adopted: Mutex<HashMap<String, Vec<AdoptedCtr>>>,
    adopted_sandboxes: Mutex<HashMap<String, Option<std::net::Ipv4Addr>>>,
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


/// The container's shim runs `runc create`; then `runc start`. The shim's exit (or, for an
/// adopted container, its exit file) ends the container.
async fn start(s: &RuncSettings, id: &str, dir: &Path, log: &Path, ctrs: &Arc<Mutex<HashMap<String, Ctr>>>, v2: bool) -> Result<()> {
    let root = s.root.join("state");
    let mut child = Command::new(&s.shim)
        .arg("shim")
        .args(["--id", id])
        .arg("--bundle")
        .arg(dir)
        .arg("--root")
        .arg(&root)
        .arg("--runc")
        .arg(&s.runc)
        .arg("--log-file")
        .arg(log)
        .args(["--log-max-bytes", &s.log_max_bytes.to_string(), "--log-max-files", &s.log_max_files.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| other(format!("starting the shim {}: {e}", s.shim.display())))?;
    let mut out = tokio::io::BufReader::new(child.stdout.take().ok_or_else(|| other("the shim has no stdout"))?);
    let mut line = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), out.read_line(&mut line)).await;
    let pid: i32 = match line.trim().split_once(' ') {
        Some(("ok", pid)) => pid.parse().map_err(other)?,
        Some(("err", why)) => return Err(RuntimeError::Other(format!("failed to create containerd task: failed to create shim task: OCI runtime create failed: {why}"))),
        _ => return Err(other(format!("the shim answered {:?}", line.trim()))),
    };
    let cgroup = match ctrs.lock().get_mut(id) {
        Some(c) => {
            c.pid = Some(pid);
            c.cgroup.clone()
        }
        None => String::new(),
    };
    watch_exit(ctrs.clone(), id.to_string(), dir.to_path_buf(), cgroup, v2, Some(child));
    let out = Command::new(&s.runc).arg("--root").arg(&root).args(["start", id]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output().await.map_err(|e| other(format!("running runc: {e}")))?;
    if !out.status.success() {
        return Err(other(format!("runc start: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    let started = now();
    let _ = std::fs::write(dir.join("started"), started.to_string());
    if let Some(c) = ctrs.lock().get(id) {
        c.state.send_if_modified(|s| {
            if *s == ContainerState::Created {
                *s = ContainerState::Running { started_at: started };
                true
            } else {
                false
            }
        });
    }
    Ok(())
}

/// Waits for a container's end: its shim's exit when the agent started it, else (adopted)
/// its exit file, polled. Then records the exit.
fn watch_exit(ctrs: Arc<Mutex<HashMap<String, Ctr>>>, id: String, dir: PathBuf, cgroup: String, v2: bool, shim: Option<tokio::process::Child>) {
    tokio::spawn(async move {
        match shim {
            Some(mut child) => {
                let _ = child.wait().await;
            }
            None => {
                while crate::shim::read_exit(&dir).is_none() {
                    if !ctrs.lock().contains_key(&id) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        let (code, signal) = crate::shim::read_exit(&dir).unwrap_or((255, 0));
        let finished_at = now();
        let mut g = ctrs.lock();
        let Some(c) = g.get_mut(&id) else { return };
        let started_at = match *c.state.borrow() {
            ContainerState::Running { started_at } => started_at,
            _ => finished_at,
        };
        let oom = signal == 9 && oom_killed(&cgroup, v2);
        let reason = if oom { "OOMKilled" } else if code == 0 { "Completed" } else { "Error" };
        c.pid = None;
        c.state.send_replace(ContainerState::Exited { exit_code: code, reason: reason.into(), started_at, finished_at });
    });
}

impl Runc {
    /// Sets up the runtime and adopts the containers and sandboxes an earlier agent left
    /// (running ones keep running; their pods claim them when the server sends the pods).
    pub async fn new(s: RuncSettings, images: Arc<ImageStore>, net: Arc<PodNetwork>) -> anyhow::Result<Arc<Runc>> {
        std::fs::create_dir_all(s.root.join("state"))?;
        std::fs::create_dir_all(s.root.join("containers"))?;
        std::fs::create_dir_all(s.root.join("sandboxes"))?;
        let cgroup_v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        // Detached execs (with a terminal) are re-parented to the agent, which reaps them.
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
        let (peers, mut peer_rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<(String, String, String)>, bool)>();
        let routing = net.clone();
        tokio::spawn(async move {
            while let Some((p, full)) = peer_rx.recv().await {
                routing.set_peers(p, full).await;
            }
        });
        let rt = Arc::new(Runc { image_last_used: Default::default(), peers, s, images, net, sandboxes: Mutex::new(HashMap::new()), ctrs: Arc::new(Mutex::new(HashMap::new())), seq: Default::default(), cgroup_v2, bridge: Default::default(), adopted: Default::default(), adopted_sandboxes: Default::default(), sandbox_locks: Default::default() });
        rt.adopt().await;
        Ok(rt)
    }

    async fn runc(&self, args: &[&str]) -> Result<()> {
        let out = Command::new(&self.s.runc).arg("--root").arg(self.s.root.join("state")).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output().await.map_err(|e| other(format!("running {}: {e}", self.s.runc.display())))?;
        if !out.status.success() {
            return Err(other(format!("runc {}: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&out.stderr).trim())));
        }
        Ok(())
    }

    fn sandbox_lock(&self, uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.sandbox_locks.lock().entry(uid.to_string()).or_default().clone()
    }

    /// Takes over what an earlier agent left: running containers (their shims still run)
    /// and exited ones are kept for their pods; anything half-made is removed.
    async fn adopt(&self) {
        let mut kept = 0;
        for e in std::fs::read_dir(self.s.root.join("containers")).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            let dir = e.path();
            let meta: Option<Meta> = std::fs::read(dir.join("meta.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let started_at: Option<i64> = std::fs::read_to_string(dir.join("started")).ok().and_then(|s| s.trim().parse().ok());
            let pid: Option<i32> = std::fs::read_to_string(dir.join("pid")).ok().and_then(|s| s.trim().parse().ok());
            let exit = crate::shim::read_exit(&dir);
            let state = match (&meta, started_at, exit, pid) {
                (Some(_), Some(st), Some((code, signal)), _) => {
                    let finished_at = std::fs::metadata(dir.join("exit")).ok().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(st, |d| d.as_secs() as i64);
                    let reason = if signal == 9 && meta.as_ref().is_some_and(|m| oom_killed(&m.cgroup, self.cgroup_v2)) { "OOMKilled" } else if code == 0 { "Completed" } else { "Error" };
                    Some(ContainerState::Exited { exit_code: code, reason: reason.into(), started_at: st, finished_at })
                }
                (Some(_), Some(st), None, Some(pid)) if Path::new(&format!("/proc/{pid}")).exists() => Some(ContainerState::Running { started_at: st }),
                _ => None,
            };
            let (Some(meta), Some(state)) = (meta, state) else {
                let _ = self.runc(&["delete", "--force", &id]).await;
                let _ = rustix::mount::unmount(dir.join("rootfs"), rustix::mount::UnmountFlags::DETACH);
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            };
            let running = matches!(state, ContainerState::Running { .. });
            let (tx, _) = watch::channel(state.clone());
            self.ctrs.lock().insert(id.clone(), Ctr { dir: dir.clone(), log: meta.log.clone(), pid: if running { pid } else { None }, state: tx, cgroup: meta.cgroup.clone(), cpu_sample: None, op: Default::default(), image_id: meta.image_id.clone() });
            if running {
                watch_exit(self.ctrs.clone(), id.clone(), dir.clone(), meta.cgroup.clone(), self.cgroup_v2, None);
            }
            self.adopted.lock().entry(meta.pod_uid.clone()).or_default().push(AdoptedCtr { id, container: meta.container, state, image_id: meta.image_id, restarts: meta.restarts });
            kept += 1;
        }
        for e in std::fs::read_dir(self.s.root.join("sandboxes")).into_iter().flatten().flatten() {
            let uid = e.file_name().to_string_lossy().to_string();
            let meta: Option<SandboxMeta> = std::fs::read(e.path().join("meta.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
            match meta {
                Some(m) if m.netns.as_ref().is_none_or(|n| n.exists()) => {
                    self.sandboxes.lock().insert(uid.clone(), Sandbox { uid: uid.clone(), dir: e.path(), netns: m.netns, hostname: m.hostname, host_ports: m.host_ports });
                    self.adopted_sandboxes.lock().insert(uid, m.ip);
                }
                _ => {
                    let _ = self.net.teardown(&uid).await;
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        if kept > 0 {
            tracing::info!(containers = kept, "adopted the containers an earlier agent left");
        }
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

/// Waits for a process re-parented to the agent (a detached exec) and reaps it: its exit
/// code (128 + signal when killed).
pub async fn wait_exit(pid: i32) -> i32 {
    let Some(p) = rustix::process::Pid::from_raw(pid) else { return 255 };
    loop {
        match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
            Ok(Some((_, st))) => return st.exit_status().or_else(|| st.terminating_signal().map(|s| 128 + s)).unwrap_or(255),
            Ok(None) => {}
            // Not (yet) ours: runc's exit re-parents it; gone without a status otherwise.
            Err(_) if !Path::new(&format!("/proc/{pid}")).exists() => return 255,
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Receives one file descriptor sent with SCM_RIGHTS.
fn recv_fd(sock: &std::os::unix::net::UnixStream) -> Result<std::os::fd::OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut buf = [0u8; 4096];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    rustix::net::recvmsg(sock, &mut iov, &mut anc, RecvFlags::empty()).map_err(other)?;
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = m {
            if let Some(fd) = fds.next() {
                return Ok(fd);
            }
        }
    }
    Err(other("runc sent no terminal"))
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

    fn images_generation(&self) -> u64 {
        self.images.generation()
    }

    fn images(&self) -> Vec<(Vec<String>, u64)> {
        self.images.list().into_iter().map(|i| (i.repo_digests.iter().chain(i.repo_tags.iter()).cloned().collect(), i.size)).collect()
    }

    fn adopted_sandbox(&self, pod_uid: &str) -> Option<(String, Option<std::net::Ipv4Addr>)> {
        let ip = self.adopted_sandboxes.lock().remove(pod_uid)?;
        Some((pod_uid.to_string(), ip))
    }

    fn has_image(&self, image: &str) -> bool {
        self.images.get(image).is_some()
    }

    async fn gc_images(&self) {
        let used: std::collections::HashSet<String> = self.ctrs.lock().values().map(|c| c.image_id.clone()).collect();
        let now = now();
        for img in self.images.list() {
            let names: Vec<&String> = img.repo_digests.iter().chain(std::iter::once(&img.id)).collect();
            if names.iter().any(|n| used.contains(*n)) {
                continue;
            }
            // imageMinimumGCAge: an image pulled, imported or last used less than two minutes
            // ago stays (a pod is likely about to use it).
            let last = names.iter().filter_map(|n| self.image_last_used.lock().get(*n).copied()).max().unwrap_or(0).max(img.added);
            if now - last < 120 {
                continue;
            }
            match self.images.remove(&img.id) {
                Ok(()) => tracing::info!(image = %img.repo_tags.first().or(img.repo_digests.first()).unwrap_or(&img.id), bytes = img.size, "unused image removed (disk pressure)"),
                Err(e) => tracing::warn!(image = %img.id, error = %e, "image garbage collection"),
            }
        }
    }

    fn adopted_ips(&self) -> Vec<std::net::Ipv4Addr> {
        self.adopted_sandboxes.lock().values().flatten().copied().collect()
    }

    fn adopted_containers(&self, pod_uid: &str) -> Vec<AdoptedCtr> {
        self.adopted.lock().remove(pod_uid).unwrap_or_default()
    }

    async fn gc_adopted(&self, keep: &std::collections::HashSet<String>) {
        let ctrs: Vec<AdoptedCtr> = {
            let mut g = self.adopted.lock();
            let gone: Vec<String> = g.keys().filter(|u| !keep.contains(*u)).cloned().collect();
            gone.iter().filter_map(|u| g.remove(u)).flatten().collect()
        };
        for c in &ctrs {
            let _ = self.stop_container(&c.id, Duration::ZERO).await;
            let _ = self.remove_container(&c.id).await;
        }
        let sandboxes: Vec<String> = {
            let mut g = self.adopted_sandboxes.lock();
            let gone: Vec<String> = g.keys().filter(|u| !keep.contains(*u)).cloned().collect();
            gone.into_iter().filter(|u| g.remove(u).is_some()).collect()
        };
        for uid in &sandboxes {
            let _ = self.stop_sandbox(uid).await;
            let _ = self.remove_sandbox(uid).await;
        }
        if !ctrs.is_empty() || !sandboxes.is_empty() {
            tracing::info!(containers = ctrs.len(), sandboxes = sandboxes.len(), "removed what an earlier agent left for pods no longer here");
        }
    }

    fn set_peers(&self, peers: Vec<(String, String, String)>, full: bool) {
        // One worker applies updates in arrival order (a full list must not overtake a
        // later change).
        let _ = self.peers.send((peers, full));
    }

    fn set_pod_cidr(&self, cidr: &str) {
        *self.s.pod_cidr.lock() = Some(cidr.to_string());
        let (net, cidr) = (self.net.clone(), cidr.to_string());
        tokio::spawn(async move { *net.own_cidr.lock().await = Some(cidr) });
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
                // In a task of its own under the pod's lock: a caller that gives up must not
                // leave a namespace half made, and a stop waits for it.
                let lock = self.sandbox_lock(&cfg.uid).lock_owned().await;
                let (net, uid) = (self.net.clone(), cfg.uid.clone());
                let task = tokio::spawn(async move {
                    let _lock = lock;
                    net.setup(&uid, ip, &cidr).await
                });
                let ns = task.await.map_err(other)?.map_err(other)?;
                self.net.add_host_ports(ip, &cfg.host_ports).await.map_err(other)?;
                Some(ns)
            }
            _ => None,
        };
        let meta = SandboxMeta { ip: cfg.ip, hostname: cfg.hostname.clone(), netns: netns.clone(), host_ports: cfg.host_ports.clone() };
        std::fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).map_err(other)?).map_err(other)?;
        let id = cfg.uid.clone();
        self.sandboxes.lock().insert(id.clone(), Sandbox { uid: cfg.uid.clone(), dir, netns, hostname: cfg.hostname.clone(), host_ports: cfg.host_ports.clone() });
        Ok(id)
    }

    async fn stop_sandbox(&self, id: &str) -> Result<()> {
        // The sandbox id is the pod's uid: a sandbox whose setup was abandoned is found too.
        let (uid, ports) = self.sandboxes.lock().get(id).map(|s| (s.uid.clone(), s.host_ports.clone())).unwrap_or_else(|| (id.to_string(), vec![]));
        let _lock = self.sandbox_lock(&uid).lock_owned().await;
        self.net.remove_host_ports(&ports).await;
        self.net.teardown(&uid).await.map_err(other)?;
        Ok(())
    }

    async fn remove_sandbox(&self, id: &str) -> Result<()> {
        self.sandbox_locks.lock().remove(id);
        if let Some(sb) = self.sandboxes.lock().remove(id) {
            let _ = std::fs::remove_dir_all(&sb.dir);
            self.remove_pod_cgroups(&sb.uid);
        } else {
            let _ = std::fs::remove_dir_all(self.s.root.join("sandboxes").join(id));
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
        let id = format!("{}{n:04x}", crate::image::random_hex(6));
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
        let n = std::fs::read_dir(&log_dir).map(|r| r.count()).unwrap_or(0);
        let log = log_dir.join(format!("{n}.log"));
        self.image_last_used.lock().insert(img.repo_digests.first().cloned().unwrap_or(img.id.clone()), now());
        let meta = Meta { pod_uid: sb_uid.clone(), container: c.name.clone(), sandbox: sandbox.to_string(), log: log.clone(), cgroup: cgroup.clone(), image_id: img.repo_digests.first().cloned().unwrap_or(img.id.clone()), restarts: c.restart_count };
        std::fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).map_err(other)?).map_err(other)?;
        let (state, _) = watch::channel(ContainerState::Created);
        self.ctrs.lock().insert(id.clone(), Ctr { dir, log, pid: None, state, cgroup, cpu_sample: None, op: Default::default(), image_id: meta.image_id.clone() });
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
        let (settings, ctrs, id, v2) = (self.s.clone(), self.ctrs.clone(), id.to_string(), self.cgroup_v2);
        let task = tokio::spawn(async move {
            let _guard = guard;
            start(&settings, &id, &dir, &log, &ctrs, v2).await
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

    async fn exec_tty(&self, id: &str, cmd: &[String]) -> Result<(i32, std::os::fd::OwnedFd)> {
        let dir = {
            let g = self.ctrs.lock();
            let c = g.get(id).ok_or_else(|| RuntimeError::NotFound(id.into()))?;
            if !matches!(*c.state.borrow(), ContainerState::Running { .. }) {
                return Err(other("container not running"));
            }
            c.dir.clone()
        };
        if cmd.is_empty() {
            return Err(other("a command is required"));
        }
        // runc hands the terminal's master over a unix socket (SCM_RIGHTS).
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sock = dir.join(format!("console-{n}.sock"));
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).map_err(other)?;
        // runc passes a terminal only when it detaches; the process is then re-parented
        // to the agent (its subreaper), which reaps it for the exit code.
        let pid_file = dir.join(format!("exec-{n}.pid"));
        let child = Command::new(&self.s.runc)
            .arg("--root")
            .arg(self.s.root.join("state"))
            .args(["exec", "--detach", "--tty", "--pid-file"])
            .arg(&pid_file)
            .arg("--console-socket")
            .arg(&sock)
            .arg(id)
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| other(format!("running runc exec: {e}")))?;
        let mut child = child;
        let accepted = tokio::select! {
            a = listener.accept() => a.map_err(other),
            st = child.wait() => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut err).await;
                }
                Err(other(format!("runc exec exited ({}) before handing over the terminal: {}", st.map(|s| s.to_string()).unwrap_or_default(), err.trim())))
            }
            _ = tokio::time::sleep(Duration::from_secs(10)) => Err(other("runc did not hand over the terminal")),
        };
        let _ = std::fs::remove_file(&sock);
        let (stream, _) = accepted?;
        let stream = stream.into_std().map_err(other)?;
        stream.set_nonblocking(false).map_err(other)?;
        let master = tokio::task::spawn_blocking(move || recv_fd(&stream)).await.map_err(other)??;
        let st = child.wait().await.map_err(other)?;
        if !st.success() {
            return Err(other(format!("runc exec exited with {st}")));
        }
        let pid: i32 = std::fs::read_to_string(&pid_file).map_err(other)?.trim().parse().map_err(other)?;
        let _ = std::fs::remove_file(&pid_file);
        Ok((pid, master))
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
        use crate::shim::cri_line;
        let l = String::from_utf8(cri_line("stdout", false, b"hello")).unwrap();
        let parts: Vec<&str> = l.splitn(4, ' ').collect();
        assert!(parts[0].ends_with('Z') && parts[0].contains('.'), "{l}");
        assert_eq!(&parts[1..], &["stdout", "F", "hello\n"]);
        assert!(String::from_utf8(cri_line("stderr", true, b"x")).unwrap().contains(" stderr P x"));
        assert_eq!(parse_user("1000:2000"), (1000, 2000));
        assert_eq!(parse_user("nobody"), (0, 0));
    }
}
