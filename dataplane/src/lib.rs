//! Shoal's service proxy, user space: the programs of `bpf/` are loaded and attached by
//! `loader`, and `table` turns services and their endpoints into the fewest map writes.
pub mod abi;
pub mod loader;
pub mod nft;
pub mod proxy;
pub mod policy;
pub mod sockdiag;
pub mod table;

pub use loader::{Config, Dataplane, Error};
pub use proxy::{NodeView, Object, Proxy, ProxyHandle, ProxyMetrics};
pub use table::{Endpoint, Frontend, ServicePort, Table};
