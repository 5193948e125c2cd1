//! Shoal's node agent.
//!
//! Map:
//! - [`session`]: the agent protocol client (`proto/agent.proto`): registration, the node's
//!   session, batched statuses, heartbeats, reverse requests; reconnects with what it holds.
//! - [`pods`]: pod lifecycle on a [`runtime::Runtime`] (restart policy, back-offs), pod
//!   statuses, pod addresses.
//! - [`runtime`]: the CRI-shaped runtime interface; [`runtime::runc`] runs real containers,
//!   [`runtime::sim`] is the simulated runtime of hollow nodes.
//! - [`image`]: the image store (registry pulls, tarball imports, layers unpacked once).
//! - [`net`]: the pod network (bridge, veth, network namespaces, masquerade).
//! - [`spec`]: volumes and container environment from the pod and the objects it uses.
//! - [`logs`]: the CRI log format rendered as kubectl shows it.
//! - [`metrics`]: the agent's Prometheus metrics.
//! - [`node`]: a real node wired together (`shoal agent`).
//! - [`connect`]: the TLS channel to the API server.
//!
//! Architecture Invariant: the agent is level-triggered. It acts on the server's current
//! version of each object it holds, and after any disconnect it tells the server what it
//! holds and converges on the difference (Invariant 3).

#![forbid(unsafe_code)]

pub mod connect;
pub mod eviction;
pub mod image;
pub mod logs;
pub mod metrics;
pub mod net;
pub mod node;
pub mod pods;
pub mod probe;
pub mod runtime;
pub mod session;
pub mod shim;
pub mod spec;

pub use session::{Agent, AgentConfig, AgentStats};
