//! kubectl (v1.35 from the shared acceptance kit) and small API helpers for tests.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::Server;

pub fn kubectl_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KUBECTL_135") {
        return PathBuf::from(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/acceptance/get-kubectl.sh");
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let o = Command::new("bash").arg(&script).output().expect("running get-kubectl.sh");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
}

pub struct K {
    pub bin: PathBuf,
    pub cfg: PathBuf,
}

impl K {
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        use std::io::Write;
        // Bounded: a hung request fails the test instead of hanging CI.
        let mut c = Command::new("timeout").arg("90").arg(&self.bin).arg("--kubeconfig").arg(&self.cfg).args(args).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        c.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        let o = c.wait_with_output().unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    }
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.run(args, None);
        assert!(ok, "kubectl {args:?}: {out}");
        out
    }
    pub fn apply(&self, yaml: &str) {
        let (ok, out) = self.run(&["apply", "-f", "-"], Some(yaml));
        assert!(ok, "apply: {out}");
    }
    /// Waits until `f(output of kubectl args)` holds.
    pub fn eventually(&self, args: &[&str], what: &str, f: impl Fn(&str) -> bool) {
        let t = Instant::now();
        loop {
            let (_, out) = self.run(args, None);
            if f(&out) {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "{what}: last output of kubectl {args:?}: {out}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

pub fn patch_status(s: &Server, path: &str, body: &str) {
    let token = std::fs::read_to_string(s.data_dir.join("pki/admin.token")).unwrap();
    let o = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH", "-H", &format!("Authorization: Bearer {}", token.trim()), "-H", "Content-Type: application/merge-patch+json", "-d", body])
        .arg(format!("https://{}{path}", s.api))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200", "PATCH {path}");
}

pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let o = Command::new("date").args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"]).output().unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

