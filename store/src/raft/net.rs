//! The raft transport over tonic gRPC (`shoalraft.Raft`), client and server, plus the
//! follower → leader calls. A fault set (tests) can cut a member off: its messages are
//! dropped in both directions, as a network partition would.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use parking_lot::{Mutex, RwLock};
use shoal_proto::etcdserverpb::{
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, MemberAddRequest,
    MemberAddResponse, MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
};
use shoal_proto::shoalraft::{self as pb, raft_client::RaftClient, raft_server::Raft as RaftRpc};
use shoal_proto::shoalstore::LogCommand;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::codec::{self, entry_from_pb, entry_to_pb, opt_log_id_from_pb, opt_log_id_to_pb, vote_from_pb, vote_to_pb};
use super::{Node, Raft, TypeConfig};

/// Header naming the sending member on every raft RPC (for fault injection).
const FROM: &str = "shoal-from";

/// Members whose traffic is dropped (a simulated partition). Empty outside tests.
#[derive(Default)]
pub struct Faults {
    blocked: RwLock<HashSet<u64>>,
    /// File listing blocked member IDs (decimal, whitespace separated), re-read on change.
    file: Option<std::path::PathBuf>,
    seen: Mutex<Option<std::time::SystemTime>>,
}

impl Faults {
    pub fn from_file(file: Option<std::path::PathBuf>) -> Faults {
        Faults { file, ..Default::default() }
    }

    fn refresh(&self) {
        let Some(f) = &self.file else { return };
        let mtime = std::fs::metadata(f).and_then(|m| m.modified()).ok();
        let mut seen = self.seen.lock();
        if *seen == mtime {
            return;
        }
        *seen = mtime;
        let ids = std::fs::read_to_string(f).unwrap_or_default().split_whitespace().filter_map(|s| s.parse().ok()).collect();
        *self.blocked.write() = ids;
    }

    /// True when traffic between `me` and `peer` is cut.
    pub fn cut(&self, me: u64, peer: u64) -> bool {
        self.refresh();
        let b = self.blocked.read();
        b.contains(&me) || b.contains(&peer)
    }
}

/// Creates connections to peers; one lazily connected channel per peer address.
#[derive(Clone)]
pub struct Network {
    pub me: u64,
    pub faults: Arc<Faults>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Network {
    pub fn new(me: u64, faults: Arc<Faults>) -> Network {
        Network { me, faults, channels: Arc::default() }
    }

    /// A client for the member at `addr` (host:port).
    pub fn client(&self, addr: &str) -> Result<RaftClient<Channel>, Status> {
        let mut chans = self.channels.lock();
        let ch = match chans.get(addr) {
            Some(c) => c.clone(),
            None => {
                let ch = Channel::from_shared(format!("http://{addr}"))
                    .map_err(|e| Status::invalid_argument(format!("bad peer address {addr:?}: {e}")))?
                    .connect_timeout(Duration::from_millis(500))
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(Duration::from_secs(2))
                    .keep_alive_while_idle(true)
                    .tcp_nodelay(true)
                    .connect_lazy();
                chans.insert(addr.to_string(), ch.clone());
                ch
            }
        };
        Ok(RaftClient::new(ch).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20))
    }

    /// Wraps a message with the sender header and a deadline (a dead peer must not hold
    /// a forwarded request until TCP gives up).
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(FROM, self.me.to_string().parse().expect("a number is valid metadata"));
        r.set_timeout(Duration::from_secs(5));
        r
    }
}

pub struct Conn {
    net: Network,
    target: u64,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: u64, node: &Node) -> Conn {
        Conn { net: self.clone(), target, addr: node.peer_addr.clone() }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, Node, RaftError<u64, E>>;

impl Conn {
    fn client<E: std::error::Error>(&self) -> Result<RaftClient<Channel>, RpcErr<E>> {
        if self.net.faults.cut(self.net.me, self.target) {
            return Err(RPCError::Unreachable(Unreachable::new(&Status::unavailable("partitioned (fault injection)"))));
        }
        self.net.client(&self.addr).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }
}

fn net_err<E: std::error::Error>(s: Status) -> RpcErr<E> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => RPCError::Unreachable(Unreachable::new(&s)),
        _ => RPCError::Network(NetworkError::new(&s)),
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(&mut self, rpc: AppendEntriesRequest<TypeConfig>, option: RPCOption) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        let mut c = self.client()?;
        let msg = pb::AppendEntriesRequest {
            vote: Some(vote_to_pb(&rpc.vote)),
            prev_log_id: opt_log_id_to_pb(&rpc.prev_log_id),
            entries: rpc.entries.iter().map(entry_to_pb).collect(),
            leader_commit: opt_log_id_to_pb(&rpc.leader_commit),
        };
        let mut req = self.net.request(msg);
        req.set_timeout(option.hard_ttl());
        let r = c.append_entries(req).await.map_err(net_err)?.into_inner();
        use pb::append_entries_response::Result as R;
        Ok(match r.result {
            Some(R::Success(_)) => AppendEntriesResponse::Success,
            Some(R::PartialSuccess(p)) => AppendEntriesResponse::PartialSuccess(opt_log_id_from_pb(&p.matching)),
            Some(R::Conflict(_)) => AppendEntriesResponse::Conflict,
            Some(R::HigherVote(v)) => AppendEntriesResponse::HigherVote(vote_from_pb(Some(&v)).map_err(net_err)?),
            None => return Err(net_err(Status::internal("empty append-entries response"))),
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        let mut c = self.client()?;
        let msg = pb::InstallSnapshotRequest {
            vote: Some(vote_to_pb(&rpc.vote)),
            meta: Some(codec::snapshot_meta_to_pb(&rpc.meta)),
            offset: rpc.offset,
            data: rpc.data.into(),
            done: rpc.done,
        };
        let mut req = self.net.request(msg);
        req.set_timeout(option.hard_ttl());
        let r = c.install_snapshot(req).await.map_err(net_err)?.into_inner();
        Ok(InstallSnapshotResponse { vote: vote_from_pb(r.vote.as_ref()).map_err(net_err)? })
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> Result<VoteResponse<u64>, RpcErr> {
        let mut c = self.client()?;
        let msg = pb::VoteRequest { vote: Some(vote_to_pb(&rpc.vote)), last_log_id: opt_log_id_to_pb(&rpc.last_log_id) };
        let mut req = self.net.request(msg);
        req.set_timeout(option.hard_ttl());
        let r = c.vote(req).await.map_err(net_err)?.into_inner();
        Ok(VoteResponse { vote: vote_from_pb(r.vote.as_ref()).map_err(net_err)?, vote_granted: r.vote_granted, last_log_id: opt_log_id_from_pb(&r.last_log_id) })
    }
}

/// What only the leader can answer; a member implements it (see `Member`).
#[tonic::async_trait]
pub trait LeaderDuties: Send + Sync + 'static {
    async fn forward(&self, cmd: LogCommand) -> Result<pb::ApplyResult, Status>;
    async fn read_index(&self) -> Result<u64, Status>;
    async fn lease_keep_alive(&self, req: LeaseKeepAliveRequest) -> Result<LeaseKeepAliveResponse, Status>;
    async fn lease_time_to_live(&self, req: LeaseTimeToLiveRequest) -> Result<LeaseTimeToLiveResponse, Status>;
    async fn publish(&self, node: Node) -> Result<(), Status>;
    async fn member_add(&self, req: MemberAddRequest) -> Result<MemberAddResponse, Status>;
    async fn member_remove(&self, req: MemberRemoveRequest) -> Result<MemberRemoveResponse, Status>;
    async fn member_promote(&self, req: MemberPromoteRequest) -> Result<MemberPromoteResponse, Status>;
}

/// The server side of `shoalraft.Raft`.
pub struct RaftService {
    pub raft: Raft,
    pub me: u64,
    pub faults: Arc<Faults>,
    pub duties: Arc<dyn LeaderDuties>,
}

impl RaftService {
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let from = req.metadata().get(FROM).and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok());
        if let Some(from) = from {
            if self.faults.cut(self.me, from) {
                return Err(Status::unavailable("partitioned (fault injection)"));
            }
        }
        Ok(())
    }
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft: {e}"))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<pb::AppendEntriesRequest>) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        self.admit(&req)?;
        let m = req.into_inner();
        let entries = m.entries.into_iter().map(entry_from_pb).collect::<Result<Vec<_>, _>>()?;
        let rpc = AppendEntriesRequest {
            vote: vote_from_pb(m.vote.as_ref())?,
            prev_log_id: opt_log_id_from_pb(&m.prev_log_id),
            entries,
            leader_commit: opt_log_id_from_pb(&m.leader_commit),
        };
        let r = self.raft.append_entries(rpc).await.map_err(fatal)?;
        use pb::append_entries_response::Result as R;
        let result = match r {
            AppendEntriesResponse::Success => R::Success(pb::Empty {}),
            AppendEntriesResponse::PartialSuccess(l) => R::PartialSuccess(pb::PartialSuccess { matching: opt_log_id_to_pb(&l) }),
            AppendEntriesResponse::Conflict => R::Conflict(pb::Empty {}),
            AppendEntriesResponse::HigherVote(v) => R::HigherVote(vote_to_pb(&v)),
        };
        Ok(Response::new(pb::AppendEntriesResponse { result: Some(result) }))
    }

    async fn vote(&self, req: Request<pb::VoteRequest>) -> Result<Response<pb::VoteResponse>, Status> {
        self.admit(&req)?;
        let m = req.into_inner();
        let rpc = VoteRequest { vote: vote_from_pb(m.vote.as_ref())?, last_log_id: opt_log_id_from_pb(&m.last_log_id) };
        let r = self.raft.vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(pb::VoteResponse { vote: Some(vote_to_pb(&r.vote)), vote_granted: r.vote_granted, last_log_id: opt_log_id_to_pb(&r.last_log_id) }))
    }

    async fn install_snapshot(&self, req: Request<pb::InstallSnapshotRequest>) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        self.admit(&req)?;
        let m = req.into_inner();
        let meta = m.meta.as_ref().ok_or_else(|| Status::invalid_argument("snapshot without metadata"))?;
        let rpc = InstallSnapshotRequest { vote: vote_from_pb(m.vote.as_ref())?, meta: codec::snapshot_meta_from_pb(meta), offset: m.offset, data: m.data.to_vec(), done: m.done };
        let r = self.raft.install_snapshot(rpc).await.map_err(fatal)?;
        Ok(Response::new(pb::InstallSnapshotResponse { vote: Some(vote_to_pb(&r.vote)) }))
    }

    async fn forward(&self, req: Request<LogCommand>) -> Result<Response<pb::ApplyResult>, Status> {
        self.admit(&req)?;
        Ok(Response::new(self.duties.forward(req.into_inner()).await?))
    }

    async fn read_index(&self, req: Request<pb::Empty>) -> Result<Response<pb::ReadIndexResponse>, Status> {
        self.admit(&req)?;
        Ok(Response::new(pb::ReadIndexResponse { index: self.duties.read_index().await? }))
    }

    async fn lease_keep_alive(&self, req: Request<LeaseKeepAliveRequest>) -> Result<Response<LeaseKeepAliveResponse>, Status> {
        self.admit(&req)?;
        Ok(Response::new(self.duties.lease_keep_alive(req.into_inner()).await?))
    }

    async fn lease_time_to_live(&self, req: Request<LeaseTimeToLiveRequest>) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        self.admit(&req)?;
        Ok(Response::new(self.duties.lease_time_to_live(req.into_inner()).await?))
    }

    async fn publish(&self, req: Request<pb::Node>) -> Result<Response<pb::Empty>, Status> {
        self.admit(&req)?;
        self.duties.publish(codec::node_from_pb(req.get_ref())).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        self.admit(&req)?;
        Ok(Response::new(self.duties.member_add(req.into_inner()).await?))
    }

    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        self.admit(&req)?;
        Ok(Response::new(self.duties.member_remove(req.into_inner()).await?))
    }

    async fn member_promote(&self, req: Request<MemberPromoteRequest>) -> Result<Response<MemberPromoteResponse>, Status> {
        self.admit(&req)?;
        Ok(Response::new(self.duties.member_promote(req.into_inner()).await?))
    }
}
