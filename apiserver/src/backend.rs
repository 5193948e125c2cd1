//! Where objects are kept: the embedded Shoal store (called in-process, no RPC) or an
//! external etcd v3 cluster (over gRPC). Both are spoken to in etcd's own terms (Range,
//! Txn, Watch), so the REST layer above has one code path and the etcd compatibility of
//! the embedded store is what makes `--store etcd://...` work.

use std::sync::Arc;

use prost::Message;
use shoal_proto::etcdserverpb::kv_client::KvClient;
use shoal_proto::etcdserverpb::watch_client::WatchClient;
use shoal_proto::etcdserverpb::{
    watch_request::RequestUnion, RangeRequest, RangeResponse, TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest,
};
use shoal_proto::mvccpb;
use shoal_store::mvcc::KeyRange;
use shoal_store::watch::{WatchBatch, WatchSpec};
use shoal_store::{Member, StoreError};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// A store failure as the REST layer must treat it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The revision asked for is older than the store keeps.
    #[error("required revision has been compacted (compacted at {0})")]
    Compacted(i64),
    #[error("required revision is a future revision")]
    FutureRev,
    /// No leader, timeout, connection failure: the client may retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

impl From<StoreError> for BackendError {
    fn from(e: StoreError) -> BackendError {
        match e {
            StoreError::Compacted { compact_rev } => BackendError::Compacted(compact_rev),
            StoreError::FutureRev => BackendError::FutureRev,
            StoreError::NoLeader | StoreError::NotLeader | StoreError::Timeout | StoreError::Stopped => BackendError::Unavailable(e.to_string()),
            other => BackendError::Other(other.to_string()),
        }
    }
}

impl From<tonic::Status> for BackendError {
    fn from(s: tonic::Status) -> BackendError {
        let msg = s.message();
        if msg.contains("required revision has been compacted") {
            return BackendError::Compacted(0);
        }
        if msg.contains("future revision") {
            return BackendError::FutureRev;
        }
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => BackendError::Unavailable(msg.to_string()),
            _ => BackendError::Other(format!("{}: {msg}", s.code())),
        }
    }
}

/// Events of one watch response, in revision order.
#[derive(Debug)]
pub struct WatchChunk {
    pub events: Vec<mvccpb::Event>,
    /// Revision of the store when the response was sent (a progress notification has no
    /// events and only this).
    pub revision: i64,
}

/// A running watch; dropping it cancels the watch in the store.
pub struct WatchStream {
    rx: mpsc::Receiver<Result<WatchChunk, BackendError>>,
    progress: Box<dyn Fn() + Send + Sync>,
}

impl WatchStream {
    pub async fn next(&mut self) -> Option<Result<WatchChunk, BackendError>> {
        self.rx.recv().await
    }

    /// Asks the store for a progress notification: a chunk with no events carrying the
    /// store's current revision once every earlier event was delivered.
    pub fn request_progress(&self) {
        (self.progress)()
    }
}

/// The store the API server keeps objects in.
#[derive(Clone)]
pub enum Backend {
    Embedded(Arc<Member>),
    Etcd { kv: KvClient<Channel>, watch: WatchClient<Channel> },
}

impl Backend {
    /// Connects to an external etcd cluster (`host:port` endpoints, plain gRPC), balancing
    /// requests over the endpoints.
    pub fn connect_etcd(endpoints: &[String]) -> anyhow::Result<Backend> {
        let mut eps = Vec::new();
        for e in endpoints {
            let url = if e.contains("://") { e.replace("etcd://", "http://") } else { format!("http://{e}") };
            eps.push(
                Channel::from_shared(url.clone())
                    .map_err(|err| anyhow::anyhow!("invalid etcd endpoint {e:?}: {err}"))?
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(std::time::Duration::from_secs(10)),
            );
        }
        if eps.is_empty() {
            anyhow::bail!("no etcd endpoints given");
        }
        let ch = Channel::balance_list(eps.into_iter());
        Ok(Backend::Etcd {
            kv: KvClient::new(ch.clone()).max_decoding_message_size(512 << 20),
            watch: WatchClient::new(ch).max_decoding_message_size(512 << 20),
        })
    }

    pub async fn range(&self, r: RangeRequest) -> Result<RangeResponse, BackendError> {
        match self {
            Backend::Embedded(m) => Ok(m.range(r).await?),
            Backend::Etcd { kv, .. } => Ok(kv.clone().range(r).await?.into_inner()),
        }
    }

    pub async fn txn(&self, t: TxnRequest) -> Result<TxnResponse, BackendError> {
        match self {
            Backend::Embedded(m) => Ok(m.txn(t).await?),
            Backend::Etcd { kv, .. } => Ok(kv.clone().txn(t).await?.into_inner()),
        }
    }

    /// Compacts the store's history up to `rev` (older revisions become unreadable).
    pub async fn compact(&self, rev: i64) -> Result<(), BackendError> {
        let req = shoal_proto::etcdserverpb::CompactionRequest { revision: rev, physical: false };
        match self {
            Backend::Embedded(m) => {
                use shoal_proto::shoalstore::{log_command::Cmd, LogCommand};
                m.propose(LogCommand { cmd: Some(Cmd::Compaction(req)) }).await?;
                Ok(())
            }
            Backend::Etcd { kv, .. } => {
                kv.clone().compact(req).await?;
                Ok(())
            }
        }
    }

    /// The current revision (linearizable).
    pub async fn current_revision(&self) -> Result<i64, BackendError> {
        let r = self.range(RangeRequest { key: b"/registry/".to_vec().into(), range_end: b"/registry0".to_vec().into(), count_only: true, limit: 1, ..Default::default() }).await?;
        Ok(r.header.map_or(0, |h| h.revision))
    }

    /// Watches `[key, range_end)` from `start_rev` (0: from now), with previous values.
    pub async fn watch(&self, key: Vec<u8>, range_end: Vec<u8>, start_rev: i64) -> Result<WatchStream, BackendError> {
        let (tx, rx) = mpsc::channel(64);
        let progress: Box<dyn Fn() + Send + Sync>;
        match self {
            Backend::Embedded(m) => {
                let (btx, mut brx) = mpsc::channel::<WatchBatch>(256);
                let stream = m.hub.open_stream(btx);
                let spec = WatchSpec {
                    range: KeyRange::from_etcd(&key.clone().into(), &range_end.clone().into()),
                    start_rev,
                    prev_kv: true,
                    no_put: false,
                    no_delete: false,
                    fragment: false,
                    progress_notify: true,
                };
                m.hub.add(&m.state, stream, 1, spec);
                let pm = m.clone();
                progress = Box::new(move || pm.hub.request_progress(&pm.state, stream));
                let m = m.clone();
                tokio::spawn(async move {
                    loop {
                        let batch = tokio::select! {
                            b = brx.recv() => b,
                            _ = tx.closed() => None,
                        };
                        let Some(batch) = batch else { break };
                        for item in batch {
                            let out = match item {
                                Ok(r) if r.canceled => {
                                    Err(if r.compact_revision > 0 { BackendError::Compacted(r.compact_revision) } else { BackendError::Other(r.cancel_reason) })
                                }
                                Ok(r) => {
                                    let mut events = Vec::with_capacity(r.events.len());
                                    for e in &r.events {
                                        match mvccpb::Event::decode(e.as_ref()) {
                                            Ok(e) => events.push(e),
                                            Err(e) => tracing::error!(error = %e, "undecodable watch event from the store"),
                                        }
                                    }
                                    if r.created && events.is_empty() {
                                        continue;
                                    }
                                    Ok(WatchChunk { events, revision: r.header.map_or(0, |h| h.revision) })
                                }
                                Err(s) => Err(BackendError::from(s)),
                            };
                            if tx.send(out).await.is_err() {
                                break;
                            }
                        }
                    }
                    m.hub.close_stream(stream);
                });
            }
            Backend::Etcd { watch, .. } => {
                let create = WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                        key: key.into(),
                        range_end: range_end.into(),
                        start_revision: start_rev,
                        prev_kv: true,
                        progress_notify: true,
                        ..Default::default()
                    })),
                };
                // The request stream stays open as long as the watch: ending it would
                // make etcd close the watch.
                let (req_tx, req_rx) = mpsc::channel::<WatchRequest>(1);
                req_tx.send(create).await.map_err(|_| BackendError::Other("watch request channel closed".into()))?;
                let mut inbound = watch.clone().watch(tokio_stream::wrappers::ReceiverStream::new(req_rx)).await?.into_inner();
                let ptx = req_tx.clone();
                progress = Box::new(move || {
                    let _ = ptx.try_send(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(Default::default())) });
                });
                tokio::spawn(async move {
                    let _keep = req_tx;
                    loop {
                        let msg = tokio::select! {
                            m = inbound.message() => m,
                            _ = tx.closed() => break,
                        };
                        let out = match msg {
                            Ok(Some(r)) if r.canceled => {
                                Err(if r.compact_revision > 0 { BackendError::Compacted(r.compact_revision) } else { BackendError::Other(r.cancel_reason) })
                            }
                            Ok(Some(r)) => {
                                if r.created && r.events.is_empty() {
                                    continue;
                                }
                                Ok(WatchChunk { events: r.events, revision: r.header.map_or(0, |h| h.revision) })
                            }
                            Ok(None) => Err(BackendError::Unavailable("etcd closed the watch stream".into())),
                            Err(s) => Err(BackendError::from(s)),
                        };
                        let stop = out.is_err();
                        if tx.send(out).await.is_err() || stop {
                            break;
                        }
                    }
                });
            }
        }
        Ok(WatchStream { rx, progress })
    }
}

/// The end of the key range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Key through which API servers sharing a store agree on compaction (upstream's name).
const COMPACT_KEY: &str = "compact_rev_key";

/// Compacts the store's history periodically, as kube-apiserver does: at each interval,
/// the API server that wins a transaction on `compact_rev_key` compacts to the revision
/// recorded at the previous interval, so at least one interval of history is kept and
/// several API servers on one store compact once per interval between them.
pub async fn run_compactor(backend: Backend, interval: std::time::Duration) {
    use shoal_proto::etcdserverpb::{compare, request_op, Compare, PutRequest, RequestOp};
    let mut version = 0i64;
    let mut previous = 0i64;
    loop {
        tokio::time::sleep(interval).await;
        let cur = match backend.current_revision().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "compactor: reading the current revision failed");
                continue;
            }
        };
        let t = TxnRequest {
            compare: vec![Compare { result: compare::CompareResult::Equal as i32, target: compare::CompareTarget::Version as i32, key: COMPACT_KEY.as_bytes().to_vec().into(), target_union: Some(compare::TargetUnion::Version(version)), range_end: Default::default() }],
            success: vec![RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key: COMPACT_KEY.as_bytes().to_vec().into(), value: cur.to_string().into_bytes().into(), ..Default::default() })) }],
            failure: vec![RequestOp { request: Some(request_op::Request::RequestRange(RangeRequest { key: COMPACT_KEY.as_bytes().to_vec().into(), ..Default::default() })) }],
        };
        match backend.txn(t).await {
            Ok(r) if r.succeeded => {
                version += 1;
                if previous > 0 {
                    match backend.compact(previous).await {
                        Ok(()) => tracing::info!(revision = previous, "compacted the store's history"),
                        Err(BackendError::Compacted(_)) => {}
                        Err(e) => tracing::warn!(error = %e, revision = previous, "compaction failed"),
                    }
                }
                previous = cur;
            }
            Ok(r) => {
                // Another API server compacted this interval; follow its key version.
                let kv = r.responses.into_iter().find_map(|op| match op.response {
                    Some(shoal_proto::etcdserverpb::response_op::Response::ResponseRange(rr)) => rr.kvs.into_iter().next(),
                    _ => None,
                });
                version = kv.as_ref().map_or(0, |k| k.version);
                previous = kv.and_then(|k| String::from_utf8(k.value.to_vec()).ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
            }
            Err(e) => tracing::warn!(error = %e, "compactor: transaction failed"),
        }
    }
}
