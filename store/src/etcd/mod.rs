//! The etcd v3 gRPC API over a [`Member`]: KV, Watch, Lease, Cluster, Maintenance.
//!
//! Everything from the wire is checked here or in `state::validate` before it reaches
//! the log (Architecture Invariant 5); errors carry etcd's codes and messages.

mod bolt;
mod cluster;
mod kv;
mod lease;
mod maintenance;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use shoal_proto::etcdserverpb::cluster_server::ClusterServer;
use shoal_proto::etcdserverpb::kv_server::KvServer;
use shoal_proto::etcdserverpb::lease_server::LeaseServer;
use shoal_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use shoal_proto::raw_watch::watch_server::WatchServer;

use crate::member::Member;

pub use cluster::ClusterService;

/// Extra bytes a gRPC message may carry beyond the request limit (etcd's allowance).
const GRPC_OVERHEAD: usize = 512 * 1024;

/// The tonic router of every etcd service of `member`.
pub fn router(member: &Arc<Member>) -> tonic::service::Routes {
    let max = member.config.max_request_bytes + GRPC_OVERHEAD;
    let svc = EtcdService { m: member.clone() };
    tonic::service::Routes::new(KvServer::new(svc.clone()).max_decoding_message_size(max).max_encoding_message_size(usize::MAX))
        .add_service(WatchServer::new(svc.clone()).max_decoding_message_size(max))
        .add_service(LeaseServer::new(svc.clone()).max_decoding_message_size(max))
        .add_service(MaintenanceServer::new(svc.clone()).max_decoding_message_size(max))
        .add_service(ClusterServer::new(ClusterService { m: member.clone() }).max_decoding_message_size(max))
}

/// All etcd services share this handle.
#[derive(Clone)]
pub struct EtcdService {
    pub(crate) m: Arc<Member>,
}

/// Binds `addr` once per executor thread with SO_REUSEPORT, so each thread accepts its
/// own connections. The first bind is exclusive, so a port already taken by anyone
/// (including another Shoal) is reported instead of silently shared.
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
    }
    (0..count)
        .map(|_| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            Ok(s.into())
        })
        .collect()
}

/// Serves the etcd API on `listener` until the runtime stops. Run one per executor.
pub async fn serve(member: Arc<Member>, listener: std::net::TcpListener) -> Result<(), tonic::transport::Error> {
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener is non-blocking and the runtime has I/O enabled");
    // Options given to tonic's builder only apply to sockets tonic accepts itself, so
    // Nagle is disabled here: with it, small responses wait for delayed ACKs (40 ms).
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
        s.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_routes(router(&member))
        .serve_with_incoming(incoming)
        .await
}
