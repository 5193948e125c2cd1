//! A 3-member cluster of real `shoal server` processes under continuous write load while
//! the leader is killed with SIGKILL and restarted (several times) and a member is cut
//! off by the fault-injecting transport. Afterwards: every acknowledged write is present
//! on every member, each writer saw strictly increasing revisions, and no linearizable
//! read returned a value older than a write that completed before the read started.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{etcdctl, Cluster};
use etcd_client::{Client, ConnectOptions, GetOptions};
use parking_lot::Mutex;

async fn connect(endpoints: &[String]) -> Client {
    let opts = ConnectOptions::new().with_timeout(Duration::from_secs(3)).with_connect_timeout(Duration::from_secs(1));
    loop {
        if let Ok(c) = Client::connect(endpoints, Some(opts.clone())).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// key -> (value, revision) of every acknowledged put.
type Acked = Arc<Mutex<BTreeMap<String, (String, i64)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_survive_leader_kills_and_a_partition() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), 3);
    let endpoints = cluster.endpoints();
    // Wait for a leader.
    let t = Instant::now();
    while cluster.leader().is_none() {
        assert!(t.elapsed() < Duration::from_secs(20), "no leader within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    // The newest counter value whose write was acknowledged.
    let counter_acked = Arc::new(AtomicI64::new(0));
    let stale_reads = Arc::new(AtomicI64::new(0));
    let reads_ok = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();

    // Writers: sequential puts each; revisions must grow strictly per writer.
    for w in 0..3 {
        let (stop, acked, counter_acked, eps) = (stop.clone(), acked.clone(), counter_acked.clone(), endpoints.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&eps).await;
            let mut last_rev = 0i64;
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = if w == 0 { "counter".to_string() } else { format!("w{w}/{i:06}") };
                let value = i.to_string();
                match c.put(key.clone(), value.clone(), None).await {
                    Ok(r) => {
                        let rev = r.header().unwrap().revision();
                        assert!(rev > last_rev, "writer {w}: revision {rev} after {last_rev}");
                        last_rev = rev;
                        if w == 0 {
                            counter_acked.fetch_max(i, Ordering::SeqCst);
                        } else {
                            acked.lock().insert(key, (value, rev));
                        }
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        c = connect(&eps).await;
                    }
                }
            }
        }));
    }
    // Readers, one per member: a linearizable read must see at least the counter value
    // acknowledged before it started.
    for ep in endpoints.clone() {
        let (stop, counter_acked, stale_reads, reads_ok) = (stop.clone(), counter_acked.clone(), stale_reads.clone(), reads_ok.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&[ep.clone()]).await;
            while !stop.load(Ordering::Relaxed) {
                let floor = counter_acked.load(Ordering::SeqCst);
                match c.get("counter", None).await {
                    Ok(r) => {
                        let v: i64 = r.kvs().first().map_or(0, |kv| kv.value_str().unwrap().parse().unwrap());
                        if v < floor {
                            eprintln!("stale read on {ep}: {v} < {floor}");
                            stale_reads.fetch_add(1, Ordering::SeqCst);
                        }
                        reads_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        c = connect(&[ep.clone()]).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    // Faults: kill -9 the leader and restart it, three times.
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = {
            let t = Instant::now();
            loop {
                if let Some(l) = cluster.leader() {
                    break l;
                }
                assert!(t.elapsed() < Duration::from_secs(20), "round {round}: no leader within 20 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        eprintln!("round {round}: killing leader {}", cluster.members[leader].name);
        cluster.members[leader].kill9();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.members[leader].spawn();
    }
    // Partition a follower (or the leader) away for a while, then heal.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let victim = cluster.leader().unwrap_or(0);
    eprintln!("partitioning {}", cluster.members[victim].name);
    cluster.partition(Some(victim));
    tokio::time::sleep(Duration::from_millis(3000)).await;
    cluster.partition(None);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().clone();
    eprintln!("acknowledged writes: {} (+{} counter), linearizable reads: {}", acked.len(), counter_acked.load(Ordering::SeqCst), reads_ok.load(Ordering::Relaxed));
    assert!(acked.len() > 50, "the load acknowledged only {} writes", acked.len());
    assert!(reads_ok.load(Ordering::Relaxed) > 50, "too few reads succeeded");
    assert_eq!(stale_reads.load(Ordering::SeqCst), 0, "linearizable reads returned stale values");

    // Every member, once caught up, holds every acknowledged write.
    for (i, m) in cluster.members.iter().enumerate() {
        let mut c = connect(&[m.endpoint()]).await;
        let t = Instant::now();
        loop {
            let r = c.get("w", Some(GetOptions::new().with_prefix())).await;
            let found: BTreeMap<String, (String, i64)> = match r {
                Ok(r) => r.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), (kv.value_str().unwrap().to_string(), kv.mod_revision()))).collect(),
                Err(_) => BTreeMap::new(),
            };
            let missing: Vec<_> = acked.iter().filter(|(k, v)| found.get(*k) != Some(v)).map(|(k, _)| k.clone()).collect();
            if missing.is_empty() {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "member {i} lacks {} acknowledged writes, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // And they agree on the revision.
    let revs: Vec<i64> = cluster
        .members
        .iter()
        .map(|m| {
            let o = etcdctl(&m.endpoint(), &["get", "counter", "-w", "json"], None);
            common::json(&String::from_utf8_lossy(&o.stdout))["header"]["revision"].as_i64().unwrap()
        })
        .collect();
    assert!(revs.windows(2).all(|w| w[0] == w[1]), "members disagree on the revision: {revs:?}");
}

#[test]
fn member_list_and_follower_writes_on_three_members() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3);
    let t = Instant::now();
    while c.leader().is_none() {
        assert!(t.elapsed() < Duration::from_secs(20), "no leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ml = common::json(&c.members[1].ok(&["member", "list", "-w", "json"]));
    assert_eq!(ml["members"].as_array().unwrap().len(), 3);
    // A write through any member is visible through every other (linearizable reads).
    for (i, m) in c.members.iter().enumerate() {
        m.ok(&["put", &format!("k{i}"), &format!("v{i}")]);
        for other in &c.members {
            assert_eq!(other.ok(&["get", &format!("k{i}"), "--print-value-only"]), format!("v{i}\n"));
        }
    }
    // Leases work through a follower (keep-alive and time-to-live are forwarded).
    let follower = (0..3).find(|i| Some(*i) != c.leader()).unwrap();
    let f = &c.members[follower];
    // Read-your-writes on a follower: a forwarded write is answered once the follower has
    // applied it, so a serializable read there, or a read at the returned revision, sees it.
    for i in 0..20 {
        let put = common::json(&f.ok(&["put", "ryw", &i.to_string(), "-w", "json"]));
        let rev = put["header"]["revision"].as_i64().unwrap().to_string();
        assert_eq!(f.ok(&["get", "ryw", "--consistency=s", "--print-value-only"]), format!("{i}\n"));
        assert_eq!(f.ok(&["get", "ryw", "--rev", &rev, "--print-value-only"]), format!("{i}\n"));
    }
    let out = f.ok(&["lease", "grant", "20"]);
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    f.ok(&["put", "leased", "x", "--lease", &id]);
    assert!(f.ok(&["lease", "keep-alive", "--once", &id]).contains("keepalived with TTL(20)"));
    assert!(f.ok(&["lease", "timetolive", &id, "--keys"]).contains("attached keys([leased])"));
    let st = common::json(&f.ok(&["endpoint", "status", "-w", "json"]));
    assert!(st[0]["Status"]["raftIndex"].as_u64().unwrap() > 3);
}

/// Waits until `f` holds, polling; fails the test with `what` after `secs`.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "{what} (waited {secs} s)");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn member_add_and_remove_at_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3);
    eventually(20, "no leader", || c.leader().is_some());
    c.members[0].ok(&["put", "before", "1"]);
    // Every member publishes its name and client URL.
    eventually(10, "members did not publish their client URLs", || {
        let ml = common::json(&c.members[0].ok(&["member", "list", "-w", "json"]));
        ml["members"].as_array().unwrap().iter().all(|m| m["clientURLs"].as_array().is_some_and(|u| !u.is_empty()) && m["name"] != "")
    });

    let new = c.add_member();
    // The new member catches up (serializable read on it) and takes writes.
    eventually(20, "the new member did not catch up", || c.members[new].ok(&["get", "before", "--consistency=s", "--print-value-only"]) == "1\n");
    c.members[new].ok(&["put", "after", "2"]);
    assert_eq!(c.members[1].ok(&["get", "after", "--print-value-only"]), "2\n");
    eventually(10, "the new member is not a published voter", || {
        let ml = common::json(&c.members[0].ok(&["member", "list", "-w", "json"]));
        let ms = ml["members"].as_array().unwrap();
        ms.len() == 4 && ms.iter().any(|m| m["name"] == "m3" && m["isLearner"] != true)
    });
    // Adding the same peer twice is refused.
    let peer = c.members[new].peer;
    let err = c.members[0].err(&["member", "add", "dup", &format!("--peer-urls=http://{peer}")]);
    assert!(err.contains("Peer URLs already exists"), "{err}");

    // Remove a member that is not the one we talk to; the cluster keeps working.
    let victim = c.member_id(1);
    c.members[0].ok(&["member", "remove", &format!("{victim:x}")]);
    eventually(10, "member list still shows the removed member", || {
        let ml = common::json(&c.members[0].ok(&["member", "list", "-w", "json"]));
        ml["members"].as_array().unwrap().len() == 3
    });
    c.members[1].kill9();
    c.members[new].ok(&["put", "after-remove", "3"]);
    assert_eq!(c.members[2].ok(&["get", "after-remove", "--print-value-only"]), "3\n");
    // Removing an unknown member is NotFound with etcd's message.
    assert!(c.members[0].err(&["member", "remove", "1234"]).contains("member not found"));
}

#[test]
fn leases_survive_a_leader_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3);
    let mut leader = None;
    eventually(20, "no leader", || {
        leader = c.leader();
        leader.is_some()
    });
    let leader = leader.unwrap();
    let other = (leader + 1) % 3;
    let out = c.members[other].ok(&["lease", "grant", "8"]);
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    c.members[other].ok(&["put", "held", "v", "--lease", &id]);
    // The leader dies; a new one takes over expiry duty with a fresh full TTL.
    c.members[leader].kill9();
    eventually(20, "no new leader", || c.leader().is_some_and(|l| l != leader));
    let ttl = c.members[other].ok(&["lease", "timetolive", &id, "--keys"]);
    assert!(ttl.contains("attached keys([held])"), "{ttl}");
    assert!(c.members[other].ok(&["lease", "keep-alive", "--once", &id]).contains("keepalived with TTL(8)"));
    assert_eq!(c.members[other].ok(&["get", "held", "--print-value-only"]), "v\n");
    // Without keep-alives it still expires, driven by the new leader.
    eventually(20, "the lease did not expire under the new leader", || c.members[other].ok(&["get", "held"]).is_empty());
    assert!(c.members[other].ok(&["lease", "timetolive", &id]).contains("already expired"));
}
