//! `shoal shim`: one small process per container (what conmon is to CRI-O), so that a
//! container outlives the agent: an agent restart or upgrade adopts running containers
//! instead of killing them, and neither their logs nor their exit codes are lost meanwhile.
//!
//! The shim runs `runc create` with the container's stdout/stderr on pipes it holds, tells
//! the agent "ok" or "err MESSAGE" on its own stdout, then copies the pipes into the
//! container's log in the CRI format, reaps the container's process (it is its subreaper)
//! and writes the exit status to `BUNDLE/exit` (`CODE SIGNAL`, replaced atomically) before
//! it exits. The agent runs `runc start` itself.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// What the shim is told (`shoal shim --id … --bundle … --root … --runc … --log-file …`).
#[derive(Clone, Debug)]
pub struct ShimArgs {
    pub id: String,
    pub bundle: PathBuf,
    /// runc's state root.
    pub root: PathBuf,
    pub runc: PathBuf,
    /// The container's log file (CRI format), appended to.
    pub log: PathBuf,
    /// Rotate the log past this size (0: never).
    pub log_max_bytes: u64,
    /// Log files kept in all (the current one included).
    pub log_max_files: u32,
}

/// One CRI log record: `TIME STREAM TAG MESSAGE`.
pub fn cri_line(stream: &str, partial: bool, msg: &[u8]) -> Vec<u8> {
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

/// The container's log file, rotated by size as the kubelet's containerLogMaxSize and
/// containerLogMaxFiles do: `N.log` is current, `N.log.1` … `N.log.K` older.
pub struct Log {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    max_bytes: u64,
    max_files: u32,
}

impl Log {
    pub fn open(path: &Path, max_bytes: u64, max_files: u32) -> std::io::Result<Log> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Log { path: path.to_path_buf(), file, size, max_bytes, max_files: max_files.max(1) })
    }

    fn write(&mut self, rec: &[u8]) -> std::io::Result<()> {
        if self.max_bytes > 0 && self.size > 0 && self.size + rec.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(rec)?;
        self.size += rec.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let name = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        // Keep max_files files in all: the current one and max_files - 1 rotated ones.
        let keep = self.max_files - 1;
        if keep == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(name(keep));
        for i in (1..keep).rev() {
            let _ = std::fs::rename(name(i), name(i + 1));
        }
        std::fs::rename(&self.path, name(1))?;
        self.file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// Copies one stream into the log, line by line (16 KiB partial records for long lines).
fn copy(pipe: std::io::PipeReader, stream: &'static str, log: Arc<Mutex<Log>>) {
    let mut r = std::io::BufReader::with_capacity(16 << 10, pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut r).take(16 << 10).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let full = line.last() == Some(&b'\n');
        let msg = if full { &line[..n - 1] } else { &line[..] };
        let rec = cri_line(stream, !full, msg);
        let mut f = log.lock().unwrap_or_else(|e| e.into_inner());
        if f.write(&rec).is_err() {
            return;
        }
    }
}

/// The last error runc logged (JSON lines), for the agent's RunContainerError.
pub fn runc_error(log: &Path) -> Option<String> {
    std::fs::read_to_string(log).ok()?.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok().filter(|v| v["level"] == "error").and_then(|v| v["msg"].as_str().map(str::to_string)))
}

/// Runs the shim; returns the process exit code.
pub fn run(a: ShimArgs) -> i32 {
    // A session of its own: nothing sent to the agent's process group reaches it.
    let _ = rustix::process::setsid();
    if rustix::process::set_child_subreaper(Some(rustix::process::getpid())).is_err() {
        println!("err the shim cannot be its container's subreaper");
        return 1;
    }
    let (Ok((out_r, out_w)), Ok((err_r, err_w))) = (std::io::pipe(), std::io::pipe()) else {
        println!("err creating pipes");
        return 1;
    };
    let log = match Log::open(&a.log, a.log_max_bytes, a.log_max_files) {
        Ok(f) => Arc::new(Mutex::new(f)),
        Err(e) => {
            println!("err opening the log {}: {e}", a.log.display());
            return 1;
        }
    };
    let runc_log = a.bundle.join("runc.log");
    let pid_file = a.bundle.join("pid");
    let st = Command::new(&a.runc)
        .arg("--root")
        .arg(&a.root)
        .arg("--log")
        .arg(&runc_log)
        .args(["--log-format", "json", "create", "--bundle"])
        .arg(&a.bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(&a.id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .status();
    let ok = match st {
        Ok(s) if s.success() => true,
        Ok(s) => {
            println!("err {}", runc_error(&runc_log).unwrap_or_else(|| format!("runc create exited with {s}")));
            false
        }
        Err(e) => {
            println!("err running {}: {e}", a.runc.display());
            false
        }
    };
    let pid: Option<i32> = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse().ok());
    let (Some(pid), true) = (pid, ok) else { return 1 };
    println!("ok {pid}");
    let _ = std::io::stdout().flush();
    let (l1, l2) = (log.clone(), log);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let d2 = done_tx.clone();
    std::thread::spawn(move || {
        copy(out_r, "stdout", l1);
        let _ = done_tx.send(());
    });
    std::thread::spawn(move || {
        copy(err_r, "stderr", l2);
        let _ = d2.send(());
    });
    // Reap whatever is re-parented to us until the container's process has exited; should
    // no child be seen, look again for as long as the process exists.
    // `wait` (any child), not `waitpid(None)`: that is pid 0, our process group only, and
    // the container leads a session of its own.
    let status = loop {
        match rustix::process::wait(rustix::process::WaitOptions::empty()) {
            Ok(Some((p, st))) if p.as_raw_nonzero().get() == pid => break Some(st),
            Ok(_) | Err(rustix::io::Errno::INTR) => continue,
            Err(_) => {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break None;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    };
    let Some(status) = status else {
        // Reaped by someone else: the status is lost.
        let _ = std::fs::write(a.bundle.join("exit.tmp"), "255 0\n");
        let _ = std::fs::rename(a.bundle.join("exit.tmp"), a.bundle.join("exit"));
        return 0;
    };
    let signal = status.terminating_signal().unwrap_or(0);
    let code = status.exit_status().unwrap_or(128 + signal);
    // The log is drained before the exit is told (a reader of the exit sees all output),
    // within reason: a descendant that escaped the container could hold a pipe open.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let _ = done_rx.recv_timeout(left);
    }
    let _ = std::fs::write(a.bundle.join("exit.tmp"), format!("{code} {signal}\n"));
    let _ = std::fs::rename(a.bundle.join("exit.tmp"), a.bundle.join("exit"));
    0
}

/// Reads `BUNDLE/exit`: (exit code, terminating signal).
pub fn read_exit(bundle: &Path) -> Option<(i32, i32)> {
    let s = std::fs::read_to_string(bundle.join("exit")).ok()?;
    let mut it = s.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_rotate_by_size_and_keep_max_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("0.log");
        let mut l = Log::open(&p, 100, 3).unwrap();
        for i in 0..10 {
            l.write(format!("{i:02}{}\n", "x".repeat(37)).as_bytes()).unwrap();
        }
        // 40-byte records, 100-byte files: 2 per file; 10 records → current + .1 + .2.
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().next().unwrap()[..2].to_string(), "08");
        assert!(d.path().join("0.log.1").exists() && d.path().join("0.log.2").exists());
        assert!(!d.path().join("0.log.3").exists(), "older files are dropped");
        assert!(std::fs::read_to_string(d.path().join("0.log.1")).unwrap().starts_with("06"));
    }

    #[test]
    fn exit_files_parse() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_exit(d.path()), None);
        std::fs::write(d.path().join("exit"), "137 9\n").unwrap();
        assert_eq!(read_exit(d.path()), Some((137, 9)));
        let l = String::from_utf8(cri_line("stdout", false, b"hi")).unwrap();
        assert!(l.ends_with(" stdout F hi\n"));
    }
}
