//! The real `etcdctl` (v3.4, Debian `etcd-client`) against a real `shoal server`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{b64, json, Server};

fn server(extra: &[&str]) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), "m1", extra);
    (dir, s)
}

#[test]
fn put_get_prefix_limit_rev_keys_only() {
    let (_d, s) = server(&[]);
    assert_eq!(s.ok(&["put", "/a/1", "one"]).trim(), "OK");
    s.ok(&["put", "/a/2", "two"]);
    s.ok(&["put", "/a/3", "three"]);
    s.ok(&["put", "/b/1", "other"]);
    s.ok(&["put", "/a/1", "uno"]);

    let g = json(&s.ok(&["get", "/a/1", "-w", "json"]));
    let kv = &g["kvs"][0];
    assert_eq!(b64(&kv["value"]), "uno");
    assert_eq!(kv["version"], 2);
    assert_eq!(kv["create_revision"], 2);
    assert_eq!(kv["mod_revision"], 6);
    assert_eq!(g["header"]["revision"], 6);

    assert_eq!(s.ok(&["get", "--prefix", "/a/", "--print-value-only"]), "uno\ntwo\nthree\n");
    let lim = json(&s.ok(&["get", "--prefix", "/a/", "--limit", "2", "-w", "json"]));
    assert_eq!(lim["kvs"].as_array().unwrap().len(), 2);
    assert_eq!(lim["more"], true);
    assert_eq!(lim["count"], 3);
    assert_eq!(s.ok(&["get", "--prefix", "/a/", "--keys-only"]), "/a/1\n\n/a/2\n\n/a/3\n\n");
    assert_eq!(s.ok(&["get", "--prefix", "/a/", "--sort-by=KEY", "--order=DESCEND", "--keys-only"]), "/a/3\n\n/a/2\n\n/a/1\n\n");
    // Historical read: at revision 2 /a/1 held its first value.
    assert_eq!(s.ok(&["get", "/a/1", "--rev", "2", "--print-value-only"]), "one\n");
    // A future revision is refused with etcd's message.
    assert!(s.err(&["get", "/a/1", "--rev", "100"]).contains("required revision is a future revision"));
    // prev-kv on put.
    assert_eq!(s.ok(&["put", "/a/2", "dos", "--prev-kv"]), "OK\n/a/2\ntwo\n");

    // Deletes: one key, then a prefix; the counts are etcdctl's output.
    assert_eq!(s.ok(&["del", "/b/1"]), "1\n");
    assert_eq!(s.ok(&["del", "/b/1"]), "0\n");
    assert_eq!(s.ok(&["del", "--prefix", "/a/"]), "3\n");
    assert_eq!(s.ok(&["get", "--prefix", "/"]), "");
    // History of a deleted key is still readable below the delete.
    assert_eq!(s.ok(&["get", "/b/1", "--rev", "5", "--print-value-only"]), "other\n");
}

#[test]
fn txn_compare_branches_as_kube_apiserver_uses_them() {
    let (_d, s) = server(&[]);
    s.ok(&["put", "k", "v1"]);
    let rev = json(&s.ok(&["get", "k", "-w", "json"]))["kvs"][0]["mod_revision"].as_i64().unwrap();

    let txn = |input: String| {
        let o = common::etcdctl(&s.endpoint(), &["txn"], Some(input.as_bytes()));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    // Update guarded by mod revision: succeeds with the current one...
    let out = txn(format!("mod(\"k\") = \"{rev}\"\n\nput k v2\n\nget k\n\n"));
    assert!(out.starts_with("SUCCESS"), "{out}");
    // ...and fails (running the failure branch) with the stale one.
    let out = txn(format!("mod(\"k\") = \"{rev}\"\n\nput k v3\n\nget k\n\n"));
    assert!(out.starts_with("FAILURE") && out.contains("v2"), "{out}");
    // Create-if-absent: create revision 0.
    let out = txn("create(\"new\") = \"0\"\n\nput new created\n\n\n".into());
    assert!(out.starts_with("SUCCESS"), "{out}");
    let out = txn("create(\"new\") = \"0\"\n\nput new again\n\n\n".into());
    assert!(out.starts_with("FAILURE"), "{out}");
    // Value and version compares.
    assert!(txn("value(\"k\") = \"v2\"\n\nput k v4\n\n\n".into()).starts_with("SUCCESS"));
    assert!(txn("version(\"k\") = \"3\"\n\nput k v5\n\n\n".into()).starts_with("SUCCESS"));
    assert_eq!(s.ok(&["get", "k", "--print-value-only"]), "v5\n");
    // The same key twice in one branch is refused and changes nothing.
    let o = common::etcdctl(&s.endpoint(), &["txn"], Some(b"\nput k a\nput k b\n\n\n"));
    assert!(String::from_utf8_lossy(&o.stderr).contains("duplicate key given in txn request"));
    assert_eq!(s.ok(&["get", "k", "--print-value-only"]), "v5\n");
}

/// Reads lines from a child's stdout on a thread, so the test can wait with a bound.
fn line_reader(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn collect(rx: &mpsc::Receiver<String>, n: usize, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => got.push(l),
            Err(_) => break,
        }
    }
    got
}

fn watch_cmd(s: &Server, args: &[&str]) -> std::process::Child {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &s.endpoint()])
        .arg("watch")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn watch_live_history_and_prev_kv() {
    let (_d, s) = server(&[]);
    let mut live = watch_cmd(&s, &["--prefix", "/w/", "--prev-kv"]);
    let rx = line_reader(&mut live);
    // Give the watch time to register before writing.
    std::thread::sleep(Duration::from_millis(500));
    s.ok(&["put", "/w/a", "1"]);
    s.ok(&["put", "/w/a", "2"]);
    s.ok(&["put", "/other", "x"]);
    s.ok(&["del", "/w/a"]);
    let lines = collect(&rx, 12, Duration::from_secs(10));
    let _ = live.kill();
    // etcdctl prints: TYPE, [prev key, prev value,] key, value per event.
    assert_eq!(
        lines,
        vec!["PUT", "/w/a", "1", "PUT", "/w/a", "1", "/w/a", "2", "DELETE", "/w/a", "2", "/w/a"],
        "live watch output"
    );

    // History: from revision 1, every event on the prefix, in order.
    let mut hist = watch_cmd(&s, &["--prefix", "/w/", "--rev", "1"]);
    let rx = line_reader(&mut hist);
    let lines = collect(&rx, 7, Duration::from_secs(10));
    let _ = hist.kill();
    assert_eq!(lines, vec!["PUT", "/w/a", "1", "PUT", "/w/a", "2", "DELETE"]);
}

#[test]
fn compaction_refuses_old_reads_and_watches() {
    let (_d, s) = server(&[]);
    for v in ["1", "2", "3"] {
        s.ok(&["put", "c", v]);
    }
    assert_eq!(s.ok(&["compaction", "3"]).trim(), "compacted revision 3");
    assert!(s.err(&["get", "c", "--rev", "2"]).contains("required revision has been compacted"));
    assert_eq!(s.ok(&["get", "c", "--rev", "3", "--print-value-only"]), "2\n");
    assert!(s.err(&["compaction", "2"]).contains("required revision has been compacted"));
    // A watch below the compaction revision is canceled with the compact revision.
    let mut w = watch_cmd(&s, &["c", "--rev", "2"]);
    let t = Instant::now();
    let status = loop {
        if let Some(st) = w.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "watch on a compacted revision did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut w.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success() || err.contains("compacted"), "status {status}, stderr {err}");
    assert!(err.contains("required revision has been compacted"), "{err}");
}

#[test]
fn leases_grant_attach_keepalive_revoke_and_expire() {
    let (_d, s) = server(&[]);
    let out = s.ok(&["lease", "grant", "30"]);
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    assert!(out.contains("granted with TTL(30s)"), "{out}");
    s.ok(&["put", "leased", "v", "--lease", &id]);
    let ttl = s.ok(&["lease", "timetolive", &id, "--keys"]);
    assert!(ttl.contains("granted with TTL(30s)") && ttl.contains("attached keys([leased])"), "{ttl}");
    assert!(s.ok(&["lease", "keep-alive", "--once", &id]).contains("keepalived with TTL(30)"));
    assert!(s.ok(&["lease", "list"]).contains(&id));
    s.ok(&["lease", "revoke", &id]);
    assert_eq!(s.ok(&["get", "leased"]), "");
    assert!(s.ok(&["lease", "timetolive", &id]).contains("already expired"));
    // A put on an unknown lease is refused.
    assert!(s.err(&["put", "x", "y", "--lease", &id]).contains("requested lease not found"));

    // Expiry: a 2 s lease deletes its key by itself.
    let out = s.ok(&["lease", "grant", "2"]);
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    s.ok(&["put", "ephemeral", "v", "--lease", &id]);
    assert_eq!(s.ok(&["get", "ephemeral", "--print-value-only"]), "v\n");
    let t = Instant::now();
    while !s.ok(&["get", "ephemeral"]).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(8), "lease did not expire within 8 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(t.elapsed() >= Duration::from_millis(1000), "lease expired too early");
}

#[test]
fn member_list_endpoint_status_health_and_snapshot() {
    let (d, s) = server(&[]);
    s.ok(&["put", "k", "v"]);
    let ml = json(&s.ok(&["member", "list", "-w", "json"]));
    let members = ml["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["name"], "m1");
    assert_eq!(members[0]["clientURLs"][0], format!("http://{}", s.etcd));
    let st = json(&s.ok(&["endpoint", "status", "-w", "json"]));
    let st = &st[0]["Status"];
    assert_eq!(st["leader"], st["header"]["member_id"]);
    assert!(st["raftIndex"].as_u64().unwrap() >= 1);
    assert!(st["dbSize"].as_i64().unwrap() > 0);
    // etcdctl 3.4 prints the health line on stderr.
    let h = s.etcdctl(&["endpoint", "health"]);
    assert!(h.status.success() && String::from_utf8_lossy(&h.stderr).contains("is healthy"), "{h:?}");
    // snapshot save produces a file etcdctl can inspect offline.
    let f = d.path().join("snap.db");
    s.ok(&["snapshot", "save", f.to_str().unwrap()]);
    let out = Command::new("etcdctl").env("ETCDCTL_API", "3").args(["snapshot", "status", f.to_str().unwrap(), "-w", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(status["revision"], 2);
    // etcdctl counts the entries of every bucket: the key plus the `meta` bucket's two.
    assert_eq!(status["totalKey"], 3);
    // Metrics endpoint.
    let body = http_get(s.metrics, "/metrics");
    assert!(body.contains("etcd_server_proposals_committed_total"), "{body}");
    assert!(http_get(s.metrics, "/health").contains("\"health\":\"true\""));
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

#[test]
fn oversized_request_rejected_and_nothing_written() {
    let (_d, s) = server(&[]);
    let big = vec![b'x'; 1_700_000];
    let o = common::etcdctl(&s.endpoint(), &["put", "big"], Some(&big));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("etcdserver: request is too large"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(s.ok(&["get", "big"]), "");
    // Just under the limit is fine.
    let ok = vec![b'y'; 1_000_000];
    let o = common::etcdctl(&s.endpoint(), &["put", "big"], Some(&ok));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn quota_raises_nospace_and_keeps_reads_working() {
    let (_d, s) = server(&["--quota-backend-bytes", "2000000"]);
    let val = vec![b'q'; 600_000];
    let mut failed = None;
    for i in 0..6 {
        let o = common::etcdctl(&s.endpoint(), &["put", &format!("q{i}")], Some(&val));
        if !o.status.success() {
            failed = Some(String::from_utf8_lossy(&o.stderr).to_string());
            break;
        }
    }
    let err = failed.expect("writes past the quota must fail");
    assert!(err.contains("database space exceeded"), "{err}");
    // Reads still work; the alarm is listed.
    assert!(s.ok(&["get", "q0", "--keys-only"]).contains("q0"));
    assert!(s.ok(&["alarm", "list"]).contains("alarm:NOSPACE"));
    // Even a small write is refused while the alarm is raised.
    assert!(s.err(&["put", "small", "v"]).contains("database space exceeded"));
    // Free space (delete + compact), disarm: writes work again.
    s.ok(&["del", "--prefix", "q"]);
    let rev = json(&s.ok(&["get", "x", "-w", "json"]))["header"]["revision"].as_i64().unwrap();
    s.ok(&["compaction", &rev.to_string()]);
    s.ok(&["defrag"]);
    s.ok(&["alarm", "disarm"]);
    assert_eq!(s.ok(&["alarm", "list"]), "");
    s.ok(&["put", "small", "v"]);
}

#[test]
fn kill9_restart_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), "m1", &["--snapshot-count", "20"]);
    // Enough writes for a snapshot plus a log tail after it.
    for chunk in 0..4 {
        let mut input = String::from("\n");
        for i in 0..40 {
            input.push_str(&format!("put key-{chunk}-{i} value-{chunk}-{i}\n"));
        }
        input.push_str("\n\n");
        let o = common::etcdctl(&s.endpoint(), &["txn"], Some(input.as_bytes()));
        assert!(o.status.success());
        for i in 0..10 {
            s.ok(&["put", &format!("single-{chunk}-{i}"), "v"]);
        }
    }
    let before = json(&s.ok(&["get", "", "--from-key", "-w", "json", "--keys-only"]));
    s.kill9();
    s.spawn();
    // Even a serializable read right after restart sees every write: the member re-applies
    // what it knows is committed before serving.
    let early = json(&s.ok(&["get", "", "--from-key", "-w", "json", "--keys-only", "--consistency=s"]));
    assert_eq!(early["count"], 200, "a serializable read right after restart went back in time");
    let after = json(&s.ok(&["get", "", "--from-key", "-w", "json", "--keys-only"]));
    assert_eq!(before["count"], 200);
    assert_eq!(after["count"], before["count"]);
    assert_eq!(after["kvs"], before["kvs"]);
    assert_eq!(after["header"]["revision"], before["header"]["revision"]);
    // Revisions continue, never reused.
    s.ok(&["put", "post-restart", "v"]);
    let r = json(&s.ok(&["get", "post-restart", "-w", "json"]))["kvs"][0]["mod_revision"].as_i64().unwrap();
    assert_eq!(r, before["header"]["revision"].as_i64().unwrap() + 1);
    assert!(s.log_text().contains("snapshot written"), "expected a snapshot; log:\n{}", s.log_text());
}

#[test]
fn cli_refuses_bad_flags_locked_dir_and_busy_port() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_shoal");
    // Unknown flag: clap's usage error, exit 2.
    let o = Command::new(bin).args(["server", "--no-such-flag"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    // Bad address.
    let o = Command::new(bin).args(["server", "--etcd-addr", "nonsense"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--etcd-addr"));
    // A second member on the same data dir is refused; so is a taken port.
    let s = Server::start(dir.path(), "m1", &[]);
    let o = Command::new(bin)
        .args(["server", "--name", "m1", "--metrics-addr", ""])
        .args(["--etcd-addr", &format!("127.0.0.1:{}", common::free_port())])
        .arg("--data-dir")
        .arg(&s.data_dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("locked by another process"), "{}", String::from_utf8_lossy(&o.stderr));
    let other = dir.path().join("other");
    let o = Command::new(bin)
        .args(["server", "--name", "x", "--etcd-addr", &s.etcd.to_string(), "--metrics-addr", ""])
        .arg("--data-dir")
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("port in use") && err.contains("Address already in use"), "{err}");
    // A data dir that is a file.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let o = Command::new(bin).args(["server", "--metrics-addr", ""]).arg("--data-dir").arg(&file).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("data directory"));
    // --initial-cluster must agree with --peer-addr and list this member.
    let o = Command::new(bin).args(["server", "--name", "a", "--initial-cluster", "a=127.0.0.1:1,b=127.0.0.1:2"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("but --peer-addr is"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(bin).args(["server", "--name", "c", "--initial-cluster", "a=127.0.0.1:1"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not contain this member"));
}
