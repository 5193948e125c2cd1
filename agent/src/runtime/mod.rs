//! The runtime interface, shaped like the CRI: pod sandboxes and their containers. The pod
//! lifecycle (`pods.rs`) drives it; backends: [`sim`] (hollow nodes) today, `runc` and a
//! CRI client next.

pub mod sim;

use std::future::Future;
use std::time::Duration;

/// What a sandbox is created from.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub host_network: bool,
    /// The address the pod network gave the pod (None with host networking).
    pub ip: Option<std::net::Ipv4Addr>,
    /// The pod's `shoal.io/` annotations (the simulated runtime reads `shoal.io/sim-cpu`
    /// and `shoal.io/sim-memory` from them).
    pub annotations: Vec<(String, String)>,
}

/// An init container runs to completion before the next one; app containers run together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerKind {
    Init,
    App,
}

#[derive(Clone, Debug)]
pub struct ContainerConfig {
    pub name: String,
    pub image: String,
    pub kind: ContainerKind,
}

/// A container's state as the runtime reports it.
#[derive(Clone, Debug, PartialEq)]
pub enum ContainerState {
    Created,
    Running {
        started_at: i64,
    },
    Exited {
        exit_code: i32,
        reason: String,
        started_at: i64,
        finished_at: i64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The image could not be pulled (reported as `ErrImagePull` with this message).
    #[error("{0}")]
    ImagePull(String),
    #[error("no such container or sandbox: {0}")]
    NotFound(String),
    #[error("{0}")]
    Other(String),
}

/// CPU and memory use of the node (for node stats and the metrics API).
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub cpu_nanocores: u64,
    pub memory_bytes: u64,
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

/// A container runtime. Every call is cheap to cancel (dropping the future).
pub trait Runtime: Send + Sync + 'static {
    /// Short name, shown as `containerRuntimeVersion` (`sim://0.1`).
    fn version(&self) -> String;
    fn run_sandbox(&self, cfg: &SandboxConfig) -> impl Future<Output = Result<String>> + Send;
    fn stop_sandbox(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn remove_sandbox(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Makes the image available; returns its digest reference (`imageID`).
    fn pull_image(&self, image: &str) -> impl Future<Output = Result<String>> + Send;
    fn create_container(
        &self,
        sandbox: &str,
        c: &ContainerConfig,
    ) -> impl Future<Output = Result<String>> + Send;
    fn start_container(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Stops with SIGTERM, then SIGKILL after `grace`.
    fn stop_container(&self, id: &str, grace: Duration) -> impl Future<Output = Result<()>> + Send;
    fn remove_container(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn container_state(&self, id: &str) -> Result<ContainerState>;
    /// Resolves when the container has exited, with its final state.
    fn wait_container(&self, id: &str) -> impl Future<Output = Result<ContainerState>> + Send;
    /// The container's log (CRI log format lines), the last `tail` lines when given.
    fn logs(&self, id: &str, tail: Option<usize>) -> Result<Vec<u8>>;
    fn usage(&self) -> Usage;
    /// CPU and memory of one running container (None when it is not running).
    fn container_usage(&self, id: &str) -> Option<Usage>;
}
