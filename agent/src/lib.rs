//! Shoal's node agent.
//!
//! Map:
//! - [`session`]: the agent protocol client (`proto/agent.proto`): registration, the node's
//!   session, batched statuses, heartbeats, reverse requests; reconnects with what it holds.
//! - [`pods`]: pod lifecycle on a [`runtime::Runtime`], pod statuses, pod addresses.
//! - [`runtime`]: the CRI-shaped runtime interface; [`runtime::sim`] is the simulated
//!   runtime of hollow nodes.
//! - [`connect`]: the TLS channel to the API server.
//!
//! Architecture Invariant: the agent is level-triggered. It acts on the server's current
//! version of each object it holds, and after any disconnect it tells the server what it
//! holds and converges on the difference (Invariant 3).

#![forbid(unsafe_code)]

pub mod connect;
pub mod net;
pub mod node;
pub mod image;
pub mod logs;
pub mod metrics;
pub mod pods;
pub mod runtime;
pub mod session;
pub mod spec;

pub use session::{Agent, AgentConfig, AgentStats};
