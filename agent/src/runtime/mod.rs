//! The runtime interface, shaped like the CRI: pod sandboxes and their containers. The pod
//! lifecycle (`pods.rs`) drives it; backends: [`runc`] (real containers) and [`sim`]
//! (hollow nodes).

pub mod runc;
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
    /// The pod's hostname (`spec.hostname` or its name).
    pub hostname: String,
    /// `hostPort`s: (protocol `tcp`/`udp`, host port, container port).
    pub host_ports: Vec<(String, u16, u16)>,
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
    /// What to run and how; empty for runtimes that run nothing (the simulated one).
    pub run: std::sync::Arc<RunSpec>,
    /// Restarts of this container so far (kept with it, for an agent that adopts it).
    pub restart_count: u32,
}

/// What a container runs and with which limits (from the pod's container spec).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSpec {
    /// Replaces the image's entrypoint when not empty.
    pub command: Vec<String>,
    /// Replaces the image's cmd when not empty (or when `command` is given).
    pub args: Vec<String>,
    /// Resolved environment (`$(VAR)` references expanded), after the image's.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub cpu_request_milli: u64,
    pub cpu_limit_milli: u64,
    pub memory_limit_bytes: u64,
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
    pub privileged: bool,
    pub read_only_root: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub tty: bool,
    /// Bind mounts into the container.
    pub mounts: Vec<Mount>,
}

/// A bind mount.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mount {
    pub host_path: std::path::PathBuf,
    pub container_path: String,
    pub read_only: bool,
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
    /// The image is absent and the pull policy is Never (`ErrImageNeverPull`).
    #[error("{0}")]
    ImageNeverPull(String),
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

/// `imagePullPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// From the container's field, defaulted as the API server does (Always for `:latest`
    /// or no tag, IfNotPresent otherwise).
    pub fn of(field: &str, image: &str) -> PullPolicy {
        match field {
            "Always" => PullPolicy::Always,
            "Never" => PullPolicy::Never,
            "IfNotPresent" => PullPolicy::IfNotPresent,
            _ => {
                let last = image.rsplit('/').next().unwrap_or(image);
                if image.contains('@') || (last.contains(':') && !last.ends_with(":latest")) {
                    PullPolicy::IfNotPresent
                } else {
                    PullPolicy::Always
                }
            }
        }
    }
}

/// A container runtime. Every call is cheap to cancel (dropping the future).
pub trait Runtime: Send + Sync + 'static {
    /// Short name, shown as `containerRuntimeVersion` (`sim://0.1`).
    fn version(&self) -> String;
    /// Whether containers need their full spec ([`RunSpec`], volumes, environment): false
    /// for the simulated runtime, so hollow nodes keep pods small.
    fn keeps_specs(&self) -> bool {
        false
    }
    /// The node's pod range became known (or changed).
    fn set_pod_cidr(&self, _cidr: &str) {}
    /// The sandbox an earlier agent left for this pod, claimed: (id, address).
    fn adopted_sandbox(&self, _pod_uid: &str) -> Option<(String, Option<std::net::Ipv4Addr>)> {
        None
    }
    /// Whether the image is on the node already.
    fn has_image(&self, _image: &str) -> bool {
        true
    }
    /// Removes images no container uses (disk pressure).
    fn gc_images(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// Addresses of the sandboxes an earlier agent left (not to be given to other pods).
    fn adopted_ips(&self) -> Vec<std::net::Ipv4Addr> {
        Vec::new()
    }
    /// The containers an earlier agent left for this pod, claimed.
    fn adopted_containers(&self, _pod_uid: &str) -> Vec<runc::AdoptedCtr> {
        Vec::new()
    }
    /// Removes what an earlier agent left for pods not in `keep` (after the first sync).
    fn gc_adopted(&self, _keep: &std::collections::HashSet<String>) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// Other nodes' (name, podCIDR, InternalIP): routes to their pods. `full` replaces all
    /// known; an empty podCIDR removes a node.
    fn set_peers(&self, _peers: Vec<(String, String, String)>, _full: bool) {}
    /// Images on the node for its status: (names, size).
    fn images(&self) -> Vec<(Vec<String>, u64)> {
        Vec::new()
    }
    /// A number that changes whenever the image list does (the heartbeat compares it).
    fn images_generation(&self) -> u64 {
        0
    }
    fn run_sandbox(&self, cfg: &SandboxConfig) -> impl Future<Output = Result<String>> + Send;
    fn stop_sandbox(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn remove_sandbox(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Makes the image available as the policy says, trying each credential (from the
    /// pod's imagePullSecrets) in turn; returns its digest reference (`imageID`).
    fn pull_image(&self, image: &str, policy: PullPolicy, creds: &[crate::image::Credentials]) -> impl Future<Output = Result<String>> + Send;
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
    /// The container's log as written (CRI log format records).
    fn logs(&self, id: &str) -> Result<Vec<u8>>;
    /// The file the container's log is written to, for following it (`logs -f`).
    fn log_path(&self, _id: &str) -> Option<std::path::PathBuf> {
        None
    }
    fn usage(&self) -> Usage;
    /// Runs `cmd` in a running container with its stdout and stderr piped (stdin too when
    /// asked); the child's exit status is the command's.
    fn exec(&self, _id: &str, _cmd: &[String], _stdin: bool) -> Result<tokio::process::Child> {
        Err(RuntimeError::Other(format!("exec is not supported by the {} runtime", self.version())))
    }
    /// Runs `cmd` in a running container on a new terminal; returns its pid (the agent
    /// reaps it: [`runc::wait_exit`]) and the terminal's master side.
    fn exec_tty(&self, _id: &str, _cmd: &[String]) -> impl Future<Output = Result<(i32, std::os::fd::OwnedFd)>> + Send {
        async { Err(RuntimeError::Other("exec with a TTY is not supported by this runtime".into())) }
    }
    /// CPU and memory of one running container (None when it is not running).
    fn container_usage(&self, id: &str) -> Option<Usage>;
}
