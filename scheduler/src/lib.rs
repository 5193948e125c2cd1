//! Shoal's scheduler: decides the node of every pending pod.
//!
//! - `model`: pods and nodes parsed once into compact types (integer resources, interned
//!   labels and taints, compiled selectors).
//! - `cache`: the node table (structure of arrays) and the pods holding resources on each
//!   node, bound or assumed.
//! - `plugins` + `framework`: filters and scores as pure functions; `schedule_one` filters
//!   every node in parallel chunks (rayon), scores the feasible ones and picks the best.
//! - `queue`: active (priority, then age), backoff and unschedulable pods.
//! - `driver`: list + watch of nodes and pods, the worker threads, the binder, events and
//!   the `PodScheduled` condition; leader-elected through a Lease.
//!
//! Architecture Invariant 4: a node is reserved (`Cache::assume`) only after its fit is
//! re-checked under the cache's write lock, so no node is ever given more than it
//! allocates, whatever the number of workers. This crate reaches the API server only
//! through `shoal-client`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod cache;
pub mod config;
pub mod driver;
pub mod framework;
pub mod gang;
pub mod metrics;
pub mod model;
pub mod plugins;
pub mod preemption;
pub mod queue;
