//! `shoal up`: a whole single-machine cluster in one command. It runs `shoal server` (store,
//! API server, scheduler, controllers) and `shoal agent` (runc, pod network, eBPF service
//! proxy) as two child processes of this binary, waits for the API and for the node to be
//! Ready (showing progress), prints how to use it, and on Ctrl-C or SIGTERM stops the agent
//! and then the server. Pods keep running across a restart: running it again on the same
//! data directory resumes the same cluster.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where the cluster keeps everything: the server's data and `kubeconfig` here, the
    /// node's (images, containers, logs) in `DATA_DIR/node`, each process's log in
    /// `DATA_DIR/server.log` and `DATA_DIR/node.log`.
    #[arg(long, default_value = "shoal-data")]
    pub data_dir: PathBuf,
    /// The node's name (default: this machine's hostname).
    #[arg(long, default_value = "")]
    pub node_name: String,
    /// The node's address (default: the address of the interface with the default route,
    /// else 127.0.0.1).
    #[arg(long, default_value = "")]
    pub node_ip: String,
    /// An extra flag for `shoal server` (repeatable), e.g. `--server-arg=--scheduler-profile=kubernetes`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// An extra flag for `shoal agent` (repeatable), e.g. `--agent-arg=--proxy-mode=nftables`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// Give up when the cluster is not ready after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

/// The address of the interface holding the default route (`ip -4 route get 1.1.1.1`
/// tells it without sending anything), else loopback.
fn default_ip() -> String {
    let out = Command::new("ip").args(["-4", "-o", "route", "get", "1.1.1.1"]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "src" {
            if let Some(ip) = words.next() {
                return ip.to_string();
            }
        }
    }
    "127.0.0.1".into()
}

fn spawn(argv: &[String], log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("while opening {}", log.display()))?;
    let exe = std::env::current_exe().context("finding the shoal binary")?;
    use std::os::unix::process::CommandExt;
    // a process group of its own: the terminal's Ctrl-C reaches only `shoal up`, which
    // stops the agent before the server
    Command::new(exe).args(argv).stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f).process_group(0).spawn().with_context(|| format!("while starting shoal {}", argv[0]))
}

/// A child stopped (SIGTERM, then SIGKILL) when dropped: no early return leaves one behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        stop(&mut self.0, Duration::from_secs(20));
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Stops a child with SIGTERM, then SIGKILL after `grace`.
fn stop(child: &mut Child, grace: Duration) {
    // reaped already: its pid may belong to another process by now
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    // SAFETY: kill(2) on our own child's pid, not yet reaped
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub fn run(a: UpArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions
    if unsafe { libc::geteuid() } != 0 {
        bail!("shoal up runs a node (containers with runc, a pod network, BPF programs): run it as root");
    }
    std::fs::create_dir_all(&a.data_dir).with_context(|| format!("while creating {}", a.data_dir.display()))?;
    let dir = std::fs::canonicalize(&a.data_dir)?;
    let node_name = if a.node_name.is_empty() { std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_ascii_lowercase() } else { a.node_name.clone() };
    let node_ip = if a.node_ip.is_empty() { default_ip() } else { a.node_ip.clone() };
    // SAFETY: plain signal handlers that only set an atomic flag
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message("starting the store, API server, scheduler and controllers");
    let (server_log, node_log) = (dir.join("server.log"), dir.join("node.log"));
    let mut server_argv: Vec<String> = vec!["server".into(), "--name".into(), "default".into(), "--data-dir".into(), dir.display().to_string()];
    server_argv.extend(a.server_args.iter().cloned());
    let mut server = Guard(spawn(&server_argv, &server_log)?);
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let kubeconfig = dir.join("kubeconfig");
    let token_file = dir.join("pki/bootstrap-token");
    // the API is up when its kubeconfig and bootstrap token exist and /readyz answers
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ready = |what: &str, f: &dyn Fn() -> bool, children: &mut [&mut Child]| -> anyhow::Result<()> {
        loop {
            if f() {
                return Ok(());
            }
            for c in children.iter_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("{what}: a process exited ({st})");
                }
            }
            if STOP.load(std::sync::atomic::Ordering::SeqCst) {
                bail!("interrupted");
            }
            if Instant::now() > deadline {
                bail!("{what}: not ready after {} s", a.timeout_s);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let api_ready = || {
        if !kubeconfig.exists() || !token_file.exists() {
            return false;
        }
        let Ok(cfg) = shoal_client::Config::from_kubeconfig(&kubeconfig, "shoal-up") else { return false };
        let Ok(client) = shoal_client::Client::new(cfg, 1) else { return false };
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), client.get_text("/readyz")).await.ok().and_then(Result::ok).is_some_and(|t| t.trim() == "ok") })
    };
    if let Err(e) = ready("the API server", &api_ready, &mut [&mut server.0]) {
        bar.finish_and_clear();
        bail!("{e}; its log ({}):\n{}", server_log.display(), tail(&server_log));
    }
    bar.set_message(format!("joining node {node_name} ({node_ip})"));
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    let api = shoal_client::Config::from_kubeconfig(&kubeconfig, "shoal-up")?.server;
    let mut agent_argv: Vec<String> = vec!["agent".into(), "--server".into(), api.clone(), "--token".into(), token, "--ca-file".into(), dir.join("pki/ca.crt").display().to_string(), "--node-name".into(), node_name.clone(), "--node-ip".into(), node_ip.clone(), "--data-dir".into(), dir.join("node").display().to_string()];
    agent_argv.extend(a.agent_args.iter().cloned());
    let agent_started = shoal_client::time::now_secs();
    let mut agent = Guard(spawn(&agent_argv, &node_log)?);
    // Ready as reported by this agent: a Node from an earlier run may still say Ready
    let node_ready = || {
        let Ok(cfg) = shoal_client::Config::from_kubeconfig(&kubeconfig, "shoal-up") else { return false };
        let Ok(client) = shoal_client::Client::new(cfg, 1) else { return false };
        let node = rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), client.get(&format!("/api/v1/nodes/{node_name}"))).await.ok().and_then(Result::ok).flatten() });
        node.and_then(|n| n.pointer("/status/conditions").and_then(|c| c.as_array()).map(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True" && c["lastHeartbeatTime"].as_str().and_then(shoal_client::time::parse).is_some_and(|t| t >= agent_started - 1)))).unwrap_or(false)
    };
    if let Err(e) = ready(&format!("node {node_name}"), &node_ready, &mut [&mut server.0, &mut agent.0]) {
        bar.finish_and_clear();
        drop(agent);
        bail!("{e}; the node's log ({}):\n{}", node_log.display(), tail(&node_log));
    }
    bar.finish_and_clear();
    let kc = kubeconfig.display();
    // written without println!: a closed stdout (the terminal gone, a reader that stopped
    // reading) must not take the cluster down with a panic
    let usage = format!(
        "Shoal is up: the API at {api}, node {node_name} ({node_ip}) Ready.\n\n  kubectl --kubeconfig {kc} get nodes\n  kubectl --kubeconfig {kc} run bb --image=busybox -- sleep 3600\n  kubectl --kubeconfig {kc} logs bb; kubectl --kubeconfig {kc} exec -it bb -- sh\n  kubectl --kubeconfig {kc} expose pod bb --port 80   # a Service, proxied by eBPF\n\nLogs: {} and {}. Ctrl-C stops the cluster; `shoal up --data-dir {}` resumes it.\n",
        server_log.display(),
        node_log.display(),
        a.data_dir.display()
    );
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = out.write_all(usage.as_bytes());
        let _ = out.flush();
    }
    // wait for a signal, or for a process that dies on its own
    let failed = loop {
        if STOP.load(std::sync::atomic::Ordering::SeqCst) {
            break None;
        }
        if let Ok(Some(st)) = server.0.try_wait() {
            break Some(format!("the server exited ({st}); its log ({}):\n{}", server_log.display(), tail(&server_log)));
        }
        if let Ok(Some(st)) = agent.0.try_wait() {
            break Some(format!("the agent exited ({st}); its log ({}):\n{}", node_log.display(), tail(&node_log)));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "stopping the node agent (pods keep running until it is back), then the server");
    }
    drop(agent);
    drop(server);
    match failed {
        Some(why) => bail!("{why}"),
        None => Ok(()),
    }
}
