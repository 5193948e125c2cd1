//! The `etcd-client` crate (the Rust etcd v3 client) against a real `shoal server`,
//! unchanged: KV, txn, watch, lease and maintenance calls.

mod common;

use std::time::Duration;

use common::Server;
use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_crate_works_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), "m1", &[]);
    let mut c = Client::connect([s.endpoint()], None).await.unwrap();

    // KV.
    let put = c.put("/ec/a", "1", None).await.unwrap();
    let rev = put.header().unwrap().revision();
    c.put("/ec/b", "2", None).await.unwrap();
    let got = c.get("/ec/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(got.count(), 2);
    assert_eq!(got.kvs()[0].value(), b"1");
    assert_eq!(got.kvs()[0].mod_revision(), rev);

    // Watch from the current revision, then a put and a delete.
    let mut stream = c.watch("/ec/", Some(WatchOptions::new().with_prefix().with_prev_key())).await.unwrap();
    let created = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
    assert!(created.created());
    let watch_id = created.watch_id();
    c.put("/ec/a", "3", None).await.unwrap();
    c.delete("/ec/b", None).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let resp = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("watch event within 5 s").unwrap().unwrap();
        for e in resp.events() {
            let kv = e.kv().unwrap();
            seen.push((e.event_type(), kv.key_str().unwrap().to_string(), e.prev_kv().map(|p| p.value_str().unwrap().to_string())));
        }
    }
    assert_eq!(seen[0], (EventType::Put, "/ec/a".into(), Some("1".into())));
    assert_eq!(seen[1], (EventType::Delete, "/ec/b".into(), Some("2".into())));
    stream.cancel(watch_id).await.unwrap();
    let canceled = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
    assert!(canceled.canceled());

    // Txn: the kube-apiserver update (compare mod revision) and its failure branch.
    let cur = c.get("/ec/a", None).await.unwrap().kvs()[0].mod_revision();
    let txn = Txn::new()
        .when([Compare::mod_revision("/ec/a", CompareOp::Equal, cur)])
        .and_then([TxnOp::put("/ec/a", "4", None)])
        .or_else([TxnOp::get("/ec/a", None)]);
    assert!(c.txn(txn.clone()).await.unwrap().succeeded());
    assert!(!c.txn(txn).await.unwrap().succeeded());

    // Leases: grant, attach, time-to-live, keep-alive, revoke deletes the key.
    let lease = c.lease_grant(30, None).await.unwrap();
    c.put("/ec/leased", "x", Some(PutOptions::new().with_lease(lease.id()))).await.unwrap();
    let ttl = c.lease_time_to_live(lease.id(), None).await.unwrap();
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 30);
    let (mut keeper, mut ka) = c.lease_keep_alive(lease.id()).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let ka = ka.message().await.unwrap().unwrap();
    assert_eq!(ka.ttl(), 30);
    c.lease_revoke(lease.id()).await.unwrap();
    assert_eq!(c.get("/ec/leased", None).await.unwrap().count(), 0);

    // Errors carry etcd's codes and messages.
    let err = c.get("/ec/a", Some(GetOptions::new().with_revision(1_000_000))).await.unwrap_err();
    assert!(err.to_string().contains("required revision is a future revision"), "{err}");

    // Maintenance and cluster.
    let st = c.status().await.unwrap();
    assert_eq!(st.leader(), st.header().unwrap().member_id());
    let members = c.member_list().await.unwrap();
    assert_eq!(members.members().len(), 1);
    assert_eq!(members.members()[0].name(), "m1");
}
