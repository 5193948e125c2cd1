//! Running a store member as a server process: data directory, member, one executor per
//! core serving the etcd API, metrics endpoint, background duties.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::disk::{DirLock, Disk, RealDisk};
use crate::member::{Member, StoreConfig};

/// Everything `shoal server` needs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub data_dir: PathBuf,
    pub etcd_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// Executor threads serving clients.
    pub threads: usize,
    /// How the executor threads are organised.
    pub executor: Executor,
    /// Append the log with io_uring (else write + fdatasync).
    pub uring: bool,
    pub store: StoreConfig,
}

/// Executor model of the client-facing API (chosen by measurement; see ARCHITECTURE.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Executor {
    /// One current-thread runtime per thread, each accepting on its own SO_REUSEPORT socket.
    PerCore,
    /// One work-stealing runtime with `threads` workers sharing one listener.
    WorkStealing,
}

/// A started server: its member and the addresses it listens on.
pub struct Running {
    pub member: Arc<Member>,
    pub etcd_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// Runs raft, the peer transport, background duties and metrics.
    _rt: tokio::runtime::Runtime,
    _lock: DirLock,
}

/// Opens the member and starts serving on background threads; returns once listening.
pub fn start(opts: ServerOptions) -> anyhow::Result<Running> {
    let dir = Member::member_dir(&opts.data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("while creating data directory {}", dir.display()))?;
    let lock = DirLock::acquire(&dir).with_context(|| format!("while locking data directory {}", dir.display()))?;
    let disk: Arc<dyn Disk> = Arc::new(RealDisk::open(&dir, opts.uring).with_context(|| format!("while opening {}", dir.display()))?);
    let sockets = if opts.executor == Executor::PerCore { opts.threads.max(1) } else { 1 };
    let listeners = crate::etcd::bind_reuseport(opts.etcd_addr, sockets)
        .with_context(|| format!("while binding the etcd client address {} (is the port in use?)", opts.etcd_addr))?;
    let etcd_addr = listeners[0].local_addr()?;
    let peer_listener = std::net::TcpListener::bind(opts.peer_addr)
        .with_context(|| format!("while binding the peer address {} (is the port in use?)", opts.peer_addr))?;
    peer_listener.set_nonblocking(true)?;
    let peer_addr = peer_listener.local_addr()?;
    let metrics_listener = match opts.metrics_addr {
        Some(a) => Some(std::net::TcpListener::bind(a).with_context(|| format!("while binding the metrics address {a}"))?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr()).transpose()?;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("store-raft").enable_all().build()?;
    let member = rt.block_on(Member::open(opts.store.clone(), disk)).context("while opening the store")?;
    {
        let _guard = rt.enter();
        member.spawn_background();
        let service = crate::raft::net::RaftService { raft: member.raft.clone(), me: member.member_id, faults: member.net.faults.clone(), duties: member.clone() };
        let peer = tokio::net::TcpListener::from_std(peer_listener)?;
        let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(peer), |s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        });
        let svc = shoal_proto::shoalraft::raft_server::RaftServer::new(service).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20);
        rt.spawn(async move {
            if let Err(e) = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "raft transport server stopped");
            }
        });
        if let Some(l) = metrics_listener {
            let mut reg = prometheus_client::registry::Registry::with_prefix("etcd");
            member.metrics.register(&mut reg);
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            let mm = member.clone();
            rt.spawn(crate::http::serve_metrics(l, Arc::new(reg), Arc::new(move || !mm.is_failed() && mm.leader().is_some())));
        }
    }

    for (i, l) in listeners.into_iter().enumerate() {
        let m = member.clone();
        let (executor, threads) = (opts.executor, opts.threads.max(1));
        std::thread::Builder::new().name(format!("etcd-serve-{i}")).spawn(move || {
            let rt = match executor {
                Executor::PerCore => tokio::runtime::Builder::new_current_thread().enable_all().build(),
                Executor::WorkStealing => tokio::runtime::Builder::new_multi_thread().worker_threads(threads).thread_name("etcd-worker").enable_all().build(),
            };
            let rt = rt.expect("building the API runtime");
            rt.block_on(async move {
                if let Err(e) = crate::etcd::serve(m, l).await {
                    tracing::error!(error = %e, "etcd API server stopped");
                }
            });
        })?;
    }
    tracing::info!(name = %opts.store.name, etcd = %etcd_addr, peer = %peer_addr, metrics = ?metrics_addr, threads = opts.threads, "shoal store serving");
    Ok(Running { member, etcd_addr, peer_addr, metrics_addr, _rt: rt, _lock: lock })
}
