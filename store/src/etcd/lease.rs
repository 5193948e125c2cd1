//! etcd Lease service. Grants and revokes go through the log; keep-alives and
//! time-to-live are answered by the member that keeps the deadlines.

use std::pin::Pin;

use futures::Stream;
use shoal_proto::etcdserverpb::lease_server::Lease;
use shoal_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use shoal_proto::shoalstore::log_command::Cmd;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::EtcdService;
use crate::error::StoreError;
use crate::lease::MIN_TTL;
use crate::state::{Applied, MAX_LEASE_TTL};

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for EtcdService {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        let mut r = req.into_inner();
        if r.ttl > MAX_LEASE_TTL {
            return Err(StoreError::LeaseTtlTooLarge.into());
        }
        r.ttl = r.ttl.max(MIN_TTL);
        if r.id == 0 {
            r.id = self.m.next_lease_id();
        }
        match self.propose(Cmd::LeaseGrant(r)).await? {
            Applied::LeaseGrant { id, ttl } => {
                Ok(Response::new(LeaseGrantResponse { header: self.m.header(), id, ttl, error: String::new() }))
            }
            a => Err(Status::internal(format!("unexpected apply result {a:?}"))),
        }
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        self.propose(Cmd::LeaseRevoke(req.into_inner())).await?;
        Ok(Response::new(LeaseRevokeResponse { header: self.m.header() }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(&self, req: Request<Streaming<LeaseKeepAliveRequest>>) -> Result<Response<KeepAliveStream>, Status> {
        let mut inbound = req.into_inner();
        let m = self.m.clone();
        let out = async_stream(move |tx| async move {
            while let Some(msg) = inbound.next().await {
                let Ok(msg) = msg else { break };
                let resp = m.lease_keep_alive(msg).await.map_err(Status::from);
                if tx.send(resp).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn lease_time_to_live(&self, req: Request<LeaseTimeToLiveRequest>) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        Ok(Response::new(self.m.lease_time_to_live(req.into_inner()).await?))
    }

    async fn lease_leases(&self, _req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        let st = self.m.state.read();
        let leases = st.leases.keys().map(|id| LeaseStatus { id: *id }).collect();
        Ok(Response::new(LeaseLeasesResponse { header: self.m.header_at(st.mvcc.rev()), leases }))
    }
}

/// A response stream fed by a task: the task gets the sender, the client gets the stream.
pub(crate) fn async_stream<T, F, Fut>(f: F) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
