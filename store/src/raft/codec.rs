//! Field-by-field conversion between openraft's types and the `shoalraft` protobuf
//! messages used on the wire and in the write-ahead log. A malformed message from a peer
//! is an `InvalidArgument`, never a panic.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, SnapshotMeta, StoredMembership, Vote};
use shoal_proto::shoalraft as pb;
use tonic::Status;

use super::{Node, TypeConfig};

pub type Entry = openraft::Entry<TypeConfig>;

pub fn log_id_to_pb(l: &LogId<u64>) -> pb::LogId {
    pb::LogId { term: l.leader_id.term, node_id: l.leader_id.node_id, index: l.index }
}

pub fn log_id_from_pb(l: &pb::LogId) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(l.term, l.node_id), l.index)
}

pub fn opt_log_id_to_pb(l: &Option<LogId<u64>>) -> Option<pb::LogId> {
    l.as_ref().map(log_id_to_pb)
}

pub fn opt_log_id_from_pb(l: &Option<pb::LogId>) -> Option<LogId<u64>> {
    l.as_ref().map(log_id_from_pb)
}

pub fn vote_to_pb(v: &Vote<u64>) -> pb::Vote {
    pb::Vote { term: v.leader_id.term, node_id: v.leader_id.node_id, committed: v.committed }
}

pub fn vote_from_pb(v: Option<&pb::Vote>) -> Result<Vote<u64>, Status> {
    let v = v.ok_or_else(|| Status::invalid_argument("raft message without a vote"))?;
    Ok(if v.committed { Vote::new_committed(v.term, v.node_id) } else { Vote::new(v.term, v.node_id) })
}

pub fn node_to_pb(n: &Node) -> pb::Node {
    pb::Node { name: n.name.clone(), peer_addr: n.peer_addr.clone(), client_url: n.client_url.clone() }
}

pub fn node_from_pb(n: &pb::Node) -> Node {
    Node { name: n.name.clone(), peer_addr: n.peer_addr.clone(), client_url: n.client_url.clone() }
}

pub fn membership_to_pb(m: &Membership<u64, Node>) -> pb::Membership {
    pb::Membership {
        configs: m.get_joint_config().iter().map(|c| pb::VoterSet { ids: c.iter().copied().collect() }).collect(),
        nodes: m.nodes().map(|(id, n)| (*id, node_to_pb(n))).collect(),
    }
}

pub fn membership_from_pb(m: &pb::Membership) -> Membership<u64, Node> {
    let configs: Vec<BTreeSet<u64>> = m.configs.iter().map(|c| c.ids.iter().copied().collect()).collect();
    let nodes: BTreeMap<u64, Node> = m.nodes.iter().map(|(id, n)| (*id, node_from_pb(n))).collect();
    Membership::new(configs, nodes)
}

pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Empty {}),
        EntryPayload::Normal(cmd) => pb::entry::Payload::Normal(cmd.clone()),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to_pb(m)),
    };
    pb::Entry { log_id: Some(log_id_to_pb(&e.log_id)), payload: Some(payload) }
}

pub fn entry_from_pb(e: pb::Entry) -> Result<Entry, Status> {
    let log_id = e.log_id.as_ref().map(log_id_from_pb).ok_or_else(|| Status::invalid_argument("log entry without a log id"))?;
    let payload = match e.payload {
        Some(pb::entry::Payload::Blank(_)) => EntryPayload::Blank,
        Some(pb::entry::Payload::Normal(cmd)) => EntryPayload::Normal(cmd),
        Some(pb::entry::Payload::Membership(m)) => EntryPayload::Membership(membership_from_pb(&m)),
        None => return Err(Status::invalid_argument("log entry without a payload")),
    };
    Ok(Entry { log_id, payload })
}

pub fn snapshot_meta_to_pb(m: &SnapshotMeta<u64, Node>) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: opt_log_id_to_pb(&m.last_log_id),
        membership_log_id: opt_log_id_to_pb(m.last_membership.log_id()),
        membership: Some(membership_to_pb(m.last_membership.membership())),
        snapshot_id: m.snapshot_id.clone(),
    }
}

pub fn snapshot_meta_from_pb(m: &pb::SnapshotMeta) -> SnapshotMeta<u64, Node> {
    SnapshotMeta {
        last_log_id: opt_log_id_from_pb(&m.last_log_id),
        last_membership: StoredMembership::new(
            opt_log_id_from_pb(&m.membership_log_id),
            m.membership.as_ref().map(membership_from_pb).unwrap_or_default(),
        ),
        snapshot_id: m.snapshot_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::etcdserverpb::PutRequest;
    use shoal_proto::shoalstore::{log_command::Cmd, LogBatch, LogCommand};

    #[test]
    fn entries_round_trip() {
        let nodes: BTreeMap<u64, Node> = [(1, Node { name: "a".into(), peer_addr: "127.0.0.1:1".into(), client_url: "http://x".into() })].into();
        let m = Membership::new(vec![[1u64].into()], nodes);
        let lid = LogId::new(CommittedLeaderId::new(3, 1), 9);
        let cmd = LogCommand { cmd: Some(Cmd::Put(PutRequest { key: "k".into(), value: "v".into(), ..Default::default() })) };
        for payload in [EntryPayload::Blank, EntryPayload::Normal(LogBatch { cmds: vec![cmd] }), EntryPayload::Membership(m)] {
            let e = Entry { log_id: lid, payload };
            let back = entry_from_pb(entry_to_pb(&e)).unwrap();
            assert_eq!(format!("{back:?}"), format!("{e:?}"));
        }
        let v = Vote::new_committed(4, 2);
        assert_eq!(vote_from_pb(Some(&vote_to_pb(&v))).unwrap(), v);
        assert!(entry_from_pb(pb::Entry::default()).is_err());
    }
}
