//! The simulated runtime of hollow nodes: no processes, only plausible state. A container
//! starts after `start_delay`, an init container exits 0 after `init_run`, app containers
//! run until stopped. A container uses 1–5m of CPU and 8–24 MiB, or what the pod's
//! annotations `shoal.io/sim-cpu` / `shoal.io/sim-memory` say (quantities, per container):
//! hollow pods can load an autoscaler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::{
    ContainerConfig, ContainerKind, ContainerState, Result, RuntimeError, SandboxConfig, Usage,
};

#[derive(Clone, Copy, Debug)]
pub struct SimSettings {
    /// Time from start_container to Running (image pull, process start).
    pub start_delay: Duration,
    /// How long an init container runs before exiting 0.
    pub init_run: Duration,
}

impl Default for SimSettings {
    fn default() -> Self {
        SimSettings {
            start_delay: Duration::from_millis(200),
            init_run: Duration::from_millis(100),
        }
    }
}

struct Container {
    name: String,
    kind: ContainerKind,
    usage: Usage,
    state: ContainerState,
    /// Woken when the container exits.
    exited: tokio::sync::watch::Sender<bool>,
}

/// Simulated runtime; one per hollow node.
pub struct Sim {
    settings: SimSettings,
    next: AtomicU64,
    containers: Mutex<HashMap<String, Container>>,
    /// Sandbox id → the usage its containers report when the pod says so.
    sandboxes: Mutex<HashMap<String, (Option<u64>, Option<u64>)>>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Sim {
    pub fn new(settings: SimSettings) -> Sim {
        Sim {
            settings,
            next: AtomicU64::new(1),
            containers: Mutex::new(HashMap::new()),
            sandboxes: Mutex::new(HashMap::new()),
        }
    }

    fn id(&self, what: &str) -> String {
        format!("{what}{:016x}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn exit(&self, id: &str, code: i32, reason: &str) {
        let mut g = self.containers.lock();
        if let Some(c) = g.get_mut(id) {
            let started_at = match c.state {
                ContainerState::Running { started_at } => started_at,
                ContainerState::Exited { .. } => return,
                ContainerState::Created => now(),
            };
            c.state = ContainerState::Exited {
                exit_code: code,
                reason: reason.into(),
                started_at,
                finished_at: now(),
            };
            c.exited.send_replace(true);
        }
    }

    pub fn running(&self) -> usize {
        self.containers
            .lock()
            .values()
            .filter(|c| matches!(c.state, ContainerState::Running { .. }))
            .count()
    }
}

impl super::Runtime for Sim {
    fn version(&self) -> String {
        "sim://0.1.0".into()
    }

    async fn run_sandbox(&self, cfg: &SandboxConfig) -> Result<String> {
        let id = self.id("sb");
        let q = |k: &str| {
            cfg.annotations
                .iter()
                .find(|(n, _)| n == k)
                .and_then(|(_, v)| shoal_client::quantity::parse(v))
                .filter(|n| *n >= 0)
        };
        // Quantities parse to milli-units: 1m of CPU is 1e6 nanocores, 1000m of memory a byte.
        let cpu = q("shoal.io/sim-cpu").map(|n| (n * 1_000_000) as u64);
        let mem = q("shoal.io/sim-memory").map(|n| (n / 1000) as u64);
        self.sandboxes.lock().insert(id.clone(), (cpu, mem));
        Ok(id)
    }

    async fn stop_sandbox(&self, _id: &str) -> Result<()> {
        Ok(())
    }

    async fn remove_sandbox(&self, id: &str) -> Result<()> {
        self.sandboxes.lock().remove(id);
        Ok(())
    }

    async fn pull_image(&self, image: &str, _policy: super::PullPolicy, _creds: &[crate::image::Credentials]) -> Result<String> {
        if image.is_empty() {
            return Err(RuntimeError::ImagePull("image name is empty".into()));
        }
        // A stable fake digest per image name.
        let h = image.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        let repo = image
            .split('@')
            .next()
            .unwrap_or(image)
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .map_or(image, |(r, _)| r);
        Ok(format!("{repo}@sha256:{h:016x}{h:016x}{h:016x}{h:016x}"))
    }

    async fn create_container(&self, sandbox: &str, c: &ContainerConfig) -> Result<String> {
        let id = self.id("c");
        let (tx, _) = tokio::sync::watch::channel(false);
        let (cpu, mem) = self
            .sandboxes
            .lock()
            .get(sandbox)
            .copied()
            .unwrap_or((None, None));
        let h = c
            .name
            .bytes()
            .chain(c.image.bytes())
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        let usage = Usage {
            cpu_nanocores: cpu.unwrap_or(1_000_000 + (h % 4) * 1_000_000),
            memory_bytes: mem.unwrap_or((8 + (h % 17)) << 20),
        };
        self.containers.lock().insert(
            id.clone(),
            Container {
                name: c.name.clone(),
                kind: c.kind,
                usage,
                state: ContainerState::Created,
                exited: tx,
            },
        );
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        tokio::time::sleep(self.settings.start_delay).await;
        let kind = {
            let mut g = self.containers.lock();
            let c = g
                .get_mut(id)
                .ok_or_else(|| RuntimeError::NotFound(id.into()))?;
            c.state = ContainerState::Running { started_at: now() };
            c.kind
        };
        if kind == ContainerKind::Init {
            tokio::time::sleep(self.settings.init_run).await;
            self.exit(id, 0, "Completed");
        }
        Ok(())
    }

    async fn stop_container(&self, id: &str, _grace: Duration) -> Result<()> {
        // A simulated process honours SIGTERM at once; exit code as a shell's 128+15.
        self.exit(id, 143, "Error");
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        self.containers.lock().remove(id);
        Ok(())
    }

    fn container_state(&self, id: &str) -> Result<ContainerState> {
        self.containers
            .lock()
            .get(id)
            .map(|c| c.state.clone())
            .ok_or_else(|| RuntimeError::NotFound(id.into()))
    }

    async fn wait_container(&self, id: &str) -> Result<ContainerState> {
        let mut rx = self
            .containers
            .lock()
            .get(id)
            .map(|c| c.exited.subscribe())
            .ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        let _ = rx.wait_for(|x| *x).await;
        self.container_state(id)
    }

    fn logs(&self, id: &str) -> Result<Vec<u8>> {
        let g = self.containers.lock();
        let c = g.get(id).ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        let started = match c.state {
            ContainerState::Running { started_at } | ContainerState::Exited { started_at, .. } => started_at,
            ContainerState::Created => return Ok(Vec::new()),
        };
        let t = shoal_client::time::format(started);
        Ok(format!("{t} stdout F hollow container {} started at {started}\n{t} stdout F hollow container {} is running on a simulated runtime\n", c.name, c.name).into_bytes())
    }

    fn usage(&self) -> Usage {
        // The node: its running containers plus a simulated system overhead.
        let g = self.containers.lock();
        let running = g
            .values()
            .filter(|c| matches!(c.state, ContainerState::Running { .. }));
        let (cpu, mem) = running.fold((20_000_000u64, 200u64 << 20), |(c, m), x| {
            (c + x.usage.cpu_nanocores, m + x.usage.memory_bytes)
        });
        Usage {
            cpu_nanocores: cpu,
            memory_bytes: mem,
        }
    }

    fn container_usage(&self, id: &str) -> Option<Usage> {
        self.containers
            .lock()
            .get(id)
            .filter(|c| matches!(c.state, ContainerState::Running { .. }))
            .map(|c| c.usage)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Runtime;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn init_containers_exit_and_app_containers_run_until_stopped() {
        let s = Sim::new(SimSettings::default());
        let sb = s
            .run_sandbox(&SandboxConfig {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
                host_network: false,
                ip: None,
                hostname: "p".into(),
                host_ports: vec![],
                annotations: vec![
                    ("shoal.io/sim-cpu".into(), "250m".into()),
                    ("shoal.io/sim-memory".into(), "64Mi".into()),
                ],
            })
            .await
            .unwrap();
        let init = s
            .create_container(
                &sb,
                &ContainerConfig {
                    name: "init".into(),
                    image: "busybox".into(),
                    kind: ContainerKind::Init,
                    run: Default::default(),
                    restart_count: 0,
                },
            )
            .await
            .unwrap();
        s.start_container(&init).await.unwrap();
        assert!(matches!(
            s.wait_container(&init).await.unwrap(),
            ContainerState::Exited { exit_code: 0, .. }
        ));
        let app = s
            .create_container(
                &sb,
                &ContainerConfig {
                    name: "app".into(),
                    image: "busybox".into(),
                    kind: ContainerKind::App,
                    run: Default::default(),
                    restart_count: 0,
                },
            )
            .await
            .unwrap();
        assert_eq!(s.container_state(&app).unwrap(), ContainerState::Created);
        s.start_container(&app).await.unwrap();
        assert!(matches!(
            s.container_state(&app).unwrap(),
            ContainerState::Running { .. }
        ));
        assert_eq!(s.running(), 1);
        let u = s.container_usage(&app).unwrap();
        assert_eq!(
            (u.cpu_nanocores, u.memory_bytes),
            (250_000_000, 64 << 20),
            "usage from the pod's annotations"
        );
        assert_eq!(s.usage().cpu_nanocores, 270_000_000);
        assert!(
            s.container_usage(&init).is_none(),
            "an exited container uses nothing"
        );
        s.stop_container(&app, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(matches!(
            s.wait_container(&app).await.unwrap(),
            ContainerState::Exited { exit_code: 143, .. }
        ));
        assert!(String::from_utf8(s.logs(&app).unwrap())
            .unwrap()
            .contains("simulated"));
        s.remove_container(&app).await.unwrap();
        assert!(matches!(
            s.container_state(&app),
            Err(RuntimeError::NotFound(_))
        ));
        assert!(s.pull_image("", super::super::PullPolicy::IfNotPresent, &[]).await.is_err());
        assert!(s
            .pull_image("registry.local/busybox:1.36", super::super::PullPolicy::IfNotPresent, &[])
            .await
            .unwrap()
            .starts_with("registry.local/busybox@sha256:"));
    }
}
