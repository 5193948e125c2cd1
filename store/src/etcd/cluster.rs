//! etcd Cluster service over the raft membership. Changes run on the leader; a follower
//! passes the request on (`shoalraft.Raft/Member*`).

use std::collections::BTreeSet;
use std::sync::Arc;

use shoal_proto::etcdserverpb::cluster_server::Cluster;
use shoal_proto::etcdserverpb::{
    Member as PbMember, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use tonic::{Request, Response, Status};

use crate::error::StoreError;
use crate::member::Member;
use crate::raft::{member_id, Node};

#[derive(Clone)]
pub struct ClusterService {
    pub(crate) m: Arc<Member>,
}

/// The members in etcd's shape.
pub fn members_pb(m: &Member) -> Vec<PbMember> {
    m.members()
        .into_iter()
        .map(|(id, n, learner)| PbMember {
            id,
            name: n.name,
            peer_ur_ls: vec![format!("http://{}", n.peer_addr)],
            client_ur_ls: if n.client_url.is_empty() { vec![] } else { vec![n.client_url] },
            is_learner: learner,
        })
        .collect()
}

fn change_failed(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("etcdserver: membership change failed: {e}"))
}

/// `http://host:port` or `host:port` → `host:port`, validated.
fn peer_addr(url: &str) -> Result<String, Status> {
    let a = url.trim_start_matches("http://");
    a.parse::<std::net::SocketAddr>().map_err(|_| Status::invalid_argument(format!("etcdserver: invalid peer URL {url:?} (want http://host:port)")))?;
    Ok(a.to_string())
}

fn voters(m: &Member) -> BTreeSet<u64> {
    m.members().into_iter().filter(|(_, _, learner)| !learner).map(|(id, _, _)| id).collect()
}

/// Membership changes as the leader runs them.
impl Member {
    pub async fn member_add_local(&self, r: MemberAddRequest) -> Result<MemberAddResponse, Status> {
        let [url] = r.peer_ur_ls.as_slice() else {
            return Err(Status::invalid_argument("etcdserver: a member needs exactly one peer URL"));
        };
        let addr = peer_addr(url)?;
        let id = member_id(&addr);
        if self.members().iter().any(|(i, n, _)| *i == id || n.peer_addr == addr) {
            return Err(Status::failed_precondition("etcdserver: Peer URLs already exists"));
        }
        // As a learner first (it catches up without counting for quorum), then a voter
        // unless the caller asked for a learner.
        let node = Node { name: String::new(), peer_addr: addr, client_url: String::new() };
        self.raft.add_learner(id, node, false).await.map_err(change_failed)?;
        if !r.is_learner {
            let mut v = voters(self);
            v.insert(id);
            self.raft.change_membership(v, true).await.map_err(change_failed)?;
        }
        let members = members_pb(self);
        let member = members.iter().find(|m| m.id == id).cloned();
        Ok(MemberAddResponse { header: self.header(), member, members })
    }

    pub async fn member_remove_local(&self, r: MemberRemoveRequest) -> Result<MemberRemoveResponse, Status> {
        if !self.members().iter().any(|(i, _, _)| *i == r.id) {
            return Err(StoreError::MemberNotFound.into());
        }
        let mut v = voters(self);
        v.remove(&r.id);
        if v.is_empty() {
            return Err(Status::failed_precondition("etcdserver: cannot remove the last voting member"));
        }
        self.raft.change_membership(v, false).await.map_err(change_failed)?;
        Ok(MemberRemoveResponse { header: self.header(), members: members_pb(self) })
    }

    pub async fn member_promote_local(&self, r: MemberPromoteRequest) -> Result<MemberPromoteResponse, Status> {
        match self.members().iter().find(|(i, _, _)| *i == r.id) {
            None => return Err(StoreError::MemberNotFound.into()),
            Some((_, _, false)) => return Err(Status::failed_precondition("etcdserver: can only promote a learner member")),
            _ => {}
        }
        let mut v = voters(self);
        v.insert(r.id);
        self.raft.change_membership(v, true).await.map_err(change_failed)?;
        Ok(MemberPromoteResponse { header: self.header(), members: members_pb(self) })
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        let r = req.into_inner();
        if self.m.is_leader() {
            return Ok(Response::new(self.m.member_add_local(r).await?));
        }
        let mut c = self.m.leader_client()?;
        Ok(Response::new(c.member_add(self.m.net.request(r)).await?.into_inner()))
    }

    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        let r = req.into_inner();
        if self.m.is_leader() {
            return Ok(Response::new(self.m.member_remove_local(r).await?));
        }
        let mut c = self.m.leader_client()?;
        Ok(Response::new(c.member_remove(self.m.net.request(r)).await?.into_inner()))
    }

    async fn member_update(&self, req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        if !self.m.members().iter().any(|(i, _, _)| *i == req.get_ref().id) {
            return Err(StoreError::MemberNotFound.into());
        }
        Err(Status::unimplemented("etcdserver: changing a member's peer URLs is not supported: remove the member and add it again"))
    }

    async fn member_list(&self, _req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        Ok(Response::new(MemberListResponse { header: self.m.header(), members: members_pb(&self.m) }))
    }

    async fn member_promote(&self, req: Request<MemberPromoteRequest>) -> Result<Response<MemberPromoteResponse>, Status> {
        let r = req.into_inner();
        if self.m.is_leader() {
            return Ok(Response::new(self.m.member_promote_local(r).await?));
        }
        let mut c = self.m.leader_client()?;
        Ok(Response::new(c.member_promote(self.m.net.request(r)).await?.into_inner()))
    }
}
