//! Starting the systems under test on loopback: a real etcd (Debian `etcd-server`) and
//! Shoal, each in a temporary data directory, and reading their CPU time.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A server process the load generator started; killed when dropped.
pub struct Proc {
    pub endpoint: SocketAddr,
    child: Child,
    /// How it was started, to start it again on the same data.
    cmd: Vec<std::ffi::OsString>,
    _dir: tempfile::TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(child: &mut Child, addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if let Some(st) = child.try_wait()? {
            bail!("{what} exited with {st} before listening on {addr}");
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("{what} did not listen on {addr} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Where the data directories go: `dir` if given (a real disk matters for fsync), else /var/tmp.
fn tempdir(base: Option<&Path>) -> anyhow::Result<tempfile::TempDir> {
    let base = base.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/var/tmp"));
    tempfile::Builder::new().prefix("loadgen-").tempdir_in(&base).with_context(|| format!("while creating a data directory under {}", base.display()))
}

/// Starts an etcd cluster of `n` members with fsync on (its default).
pub fn start_etcd(bin: &str, base: Option<&Path>, n: usize) -> anyhow::Result<Vec<Proc>> {
    let ports: Vec<(u16, u16)> = (0..n).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
    let ic = ports.iter().enumerate().map(|(i, (_, p))| format!("lg{i}=http://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let mut out = Vec::new();
    for (i, (c, p)) in ports.iter().enumerate() {
        let dir = tempdir(base)?;
        let client = format!("http://127.0.0.1:{c}");
        let peer = format!("http://127.0.0.1:{p}");
        let mut cmd: Vec<std::ffi::OsString> = vec![bin.into(), "--name".into(), format!("lg{i}").into(), "--data-dir".into(), dir.path().join("etcd").into()];
        for a in [
            "--listen-client-urls", &client, "--advertise-client-urls", &client, "--listen-peer-urls", &peer,
            "--initial-advertise-peer-urls", &peer, "--initial-cluster", &ic, "--log-level", "error",
            "--quota-backend-bytes", &(8u64 << 30).to_string(),
        ] {
            cmd.push(a.into());
        }
        let child = spawn(&cmd).with_context(|| format!("while starting {bin} (install Debian etcd-server, or pass --etcd-bin)"))?;
        out.push(Proc { endpoint: format!("127.0.0.1:{c}").parse()?, child, cmd, _dir: dir });
    }
    for p in &mut out {
        wait_listening(&mut p.child, p.endpoint, "etcd")?;
    }
    Ok(out)
}

/// Starts a Shoal store cluster of `n` members.
pub fn start_shoal(bin: &Path, base: Option<&Path>, extra: &[String], n: usize) -> anyhow::Result<Vec<Proc>> {
    let ports: Vec<(u16, u16)> = (0..n).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
    let ic = ports.iter().enumerate().map(|(i, (_, p))| format!("lg{i}=127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let mut out = Vec::new();
    for (i, (c, p)) in ports.iter().enumerate() {
        let dir = tempdir(base)?;
        let mut cmd: Vec<std::ffi::OsString> = vec![bin.into(), "server".into(), "--name".into(), format!("lg{i}").into(), "--data-dir".into(), dir.path().join("shoal").into()];
        for a in ["--etcd-addr", &format!("127.0.0.1:{c}"), "--peer-addr", &format!("127.0.0.1:{p}"), "--metrics-addr", "", "--api-addr", "", "--log", "warn"] {
            cmd.push(a.into());
        }
        if n > 1 {
            cmd.push("--initial-cluster".into());
            cmd.push(ic.clone().into());
        }
        cmd.extend(extra.iter().map(Into::into));
        let child = spawn(&cmd).with_context(|| format!("while starting {} (build it with cargo build --release -p shoal, or pass --shoal-bin)", bin.display()))?;
        out.push(Proc { endpoint: format!("127.0.0.1:{c}").parse()?, child, cmd, _dir: dir });
    }
    for p in &mut out {
        wait_listening(&mut p.child, p.endpoint, "shoal")?;
    }
    Ok(out)
}

/// Starts `shoal server` with the Kubernetes API on a free port, on its embedded store or
/// (with `store = Some("etcd://...")`) on an external etcd. Returns the process (its
/// endpoint is the API address) and its data directory.
pub fn start_shoal_api(bin: &Path, base: Option<&Path>, store: Option<&str>, extra: &[String]) -> anyhow::Result<(Proc, PathBuf)> {
    let (c, p, api) = (free_port()?, free_port()?, free_port()?);
    let dir = tempdir(base)?;
    let data = dir.path().join("shoal");
    let mut cmd: Vec<std::ffi::OsString> = vec![bin.into(), "server".into(), "--name".into(), "lg".into(), "--data-dir".into(), data.clone().into()];
    for a in ["--etcd-addr", &format!("127.0.0.1:{c}"), "--peer-addr", &format!("127.0.0.1:{p}"), "--metrics-addr", "", "--api-addr", &format!("127.0.0.1:{api}"), "--admin-addr", "", "--log", "warn"] {
        cmd.push(a.into());
    }
    if let Some(s) = store {
        cmd.push("--store".into());
        cmd.push(s.into());
    }
    cmd.extend(extra.iter().map(Into::into));
    let child = spawn(&cmd).with_context(|| format!("while starting {} (build it with cargo build --release -p shoal, or pass --shoal-bin)", bin.display()))?;
    let mut proc_ = Proc { endpoint: format!("127.0.0.1:{api}").parse()?, child, cmd, _dir: dir };
    wait_listening(&mut proc_.child, proc_.endpoint, "shoal")?;
    Ok((proc_, data))
}

/// Resident memory of a process in MiB, from /proc/PID/status.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn spawn(cmd: &[std::ffi::OsString]) -> std::io::Result<Child> {
    Command::new(&cmd[0]).args(&cmd[1..]).stdout(Stdio::null()).stderr(Stdio::null()).spawn()
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (a crash: no shutdown code runs), then the same command again on the same
    /// data. Returns once the process has been started; the caller measures readiness.
    pub fn kill9_and_restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.cmd)?;
        Ok(())
    }
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / if hz > 0.0 { hz } else { 100.0 })
}

/// The `shoal` binary beside this one (same cargo target directory).
pub fn default_shoal_bin() -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("shoal"))).unwrap_or_else(|| PathBuf::from("shoal"))
}
