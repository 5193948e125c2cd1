//! etcd KV service.

use shoal_proto::etcdserverpb::kv_server::Kv;
use shoal_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use shoal_proto::shoalstore::{log_command::Cmd, LogCommand};
use tonic::{Request, Response, Status};

use super::EtcdService;
use crate::error::StoreError;
use crate::state::{self, Applied};

impl EtcdService {
    /// Replaces a response header with this member's, keeping the revision.
    fn stamp(&self, h: Option<shoal_proto::etcdserverpb::ResponseHeader>) -> Option<shoal_proto::etcdserverpb::ResponseHeader> {
        let rev = h.map_or(0, |h| h.revision);
        self.m.header_at(rev)
    }

    pub(crate) async fn propose(&self, cmd: Cmd) -> Result<Applied, Status> {
        Ok(self.m.propose(LogCommand { cmd: Some(cmd) }).await?)
    }
}

/// A read-only txn is served member-locally only when all its ranges ask for it (etcd).
fn txn_serializable(t: &TxnRequest) -> bool {
    use shoal_proto::etcdserverpb::request_op::Request;
    t.success.iter().chain(&t.failure).all(|op| match &op.request {
        Some(Request::RequestRange(r)) => r.serializable,
        Some(Request::RequestTxn(t)) => txn_serializable(t),
        _ => true,
    })
}

fn unexpected(a: Applied) -> Status {
    Status::internal(format!("etcdserver: unexpected apply result {a:?}"))
}

#[tonic::async_trait]
impl Kv for EtcdService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let r = req.into_inner();
        if r.key.is_empty() {
            return Err(StoreError::EmptyKey.into());
        }
        if !r.serializable {
            self.m.read_barrier().await?;
        }
        let mut resp = self.m.state.read().range(&r)?;
        resp.header = self.stamp(resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        match self.propose(Cmd::Put(req.into_inner())).await? {
            Applied::Put(mut r) => {
                r.header = self.stamp(r.header);
                Ok(Response::new(r))
            }
            a => Err(unexpected(a)),
        }
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        match self.propose(Cmd::DeleteRange(req.into_inner())).await? {
            Applied::DeleteRange(mut r) => {
                r.header = self.stamp(r.header);
                Ok(Response::new(r))
            }
            a => Err(unexpected(a)),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let t = req.into_inner();
        let mut resp = if state::txn_is_read_only(&t) {
            state::validate(&LogCommand { cmd: Some(Cmd::Txn(t.clone())) })?;
            if !txn_serializable(&t) {
                self.m.read_barrier().await?;
            }
            self.m.state.read().txn_read(&t)?
        } else {
            match self.propose(Cmd::Txn(t)).await? {
                Applied::Txn(r) => r,
                a => return Err(unexpected(a)),
            }
        };
        resp.header = self.stamp(resp.header);
        Ok(Response::new(resp))
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let r = req.into_inner();
        match self.propose(Cmd::Compaction(r)).await? {
            Applied::Compaction => Ok(Response::new(CompactionResponse { header: self.m.header() })),
            a => Err(unexpected(a)),
        }
    }
}
