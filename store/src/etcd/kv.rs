//! etcd KV service.

use shoal_proto::etcdserverpb::kv_server::Kv;
use shoal_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use shoal_proto::shoalstore::{log_command::Cmd, LogCommand};
use tonic::{Request, Response, Status};

use super::EtcdService;
use crate::state::Applied;

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

fn unexpected(a: Applied) -> Status {
    Status::internal(format!("etcdserver: unexpected apply result {a:?}"))
}

#[tonic::async_trait]
impl Kv for EtcdService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let mut resp = self.m.range(req.into_inner()).await?;
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
        let mut resp = self.m.txn(req.into_inner()).await?;
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
