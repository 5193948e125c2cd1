//! Shoal's API server: the Kubernetes REST API that kubectl and the client libraries use
//! unchanged, over HTTPS (HTTP/2 and HTTP/1.1), on the embedded store or an external etcd.
//!
//! Map:
//! - [`server`]: listeners (one per core, SO_REUSEPORT), TLS, authentication, routing.
//! - [`rest`]: the verbs on stored objects; [`watch`]: watch streams.
//! - [`resources`]: the table of served resources; [`discovery`]: documents built from it.
//! - [`kinds`]: per-kind defaulting, validation and field selectors; [`meta`]: metadata rules.
//! - [`patch`], [`strategic`]: patch formats; [`selector`]: label and field selectors;
//!   [`table`]: server-side printing; [`status`]: errors as `Status` objects.
//! - [`backend`]: the store (embedded member or etcd over gRPC); [`tls`]: CA, certificates,
//!   admin credential and kubeconfig.
//!
//! Architecture Invariant: every input from outside is validated here, at the edge; a
//! rejected request gets a `Status` with upstream's code and reason and writes nothing
//! (Invariant 5). This crate never reaches into the store's internals beyond the etcd-shaped
//! calls in [`backend`].

#![forbid(unsafe_code)]

pub mod agents;
pub mod apply;
pub mod auth;
pub mod backend;
pub mod cache;
pub mod conversion;
pub mod crd;
pub mod discovery;
pub mod exec;
pub mod gnostic;
pub mod kinds;
pub mod meta;
pub mod openapi;
pub mod metrics;
pub mod patch;
pub mod priority;
pub use shoal_client::quantity;
pub mod resource_metrics;
pub mod resources;
pub mod rest;
pub mod schema;
pub mod selector;
pub mod server;
pub mod status;
pub mod storage;
pub mod strategic;
pub mod table;
pub mod tls;
pub mod token;
pub mod watch;
