//! `loadgen store`: closed-loop etcd v3 workloads against Shoal and a real etcd, side by
//! side in one run, with the servers' CPU time per operation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use shoal_proto::etcdserverpb::{
    compare, kv_client::KvClient, request_op, watch_client::WatchClient, watch_request, Compare, PutRequest,
    RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::procs::{self, Proc};

/// The workloads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Put a 256-byte (--value-size) value to a random key.
    Put,
    /// Linearizable get of a random existing key.
    Get,
    /// Serializable (member-local) get of a random existing key.
    GetSerializable,
    /// Compare-and-swap on mod revision, each client on its own key (the Kubernetes update).
    Txn,
    /// Watch fan-out: puts in lock step, latency until the last watcher has the event.
    Watch,
    /// Kubernetes-like mix: 60% get, 30% read-then-CAS update, 10% list of 50 keys.
    Mix,
    /// Write --recovery-keys keys, kill -9 the server, restart it: seconds until it
    /// serves a read again (with every key present).
    Recovery,
    /// Every scenario above in turn.
    All,
}

#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Workload to run.
    #[arg(long, value_enum, default_value_t = Scenario::Put)]
    pub scenario: Scenario,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// gRPC connections the clients share (HTTP/2 multiplexes the rest).
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Seconds each case runs.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Keys in the key space (written once before get/txn/mix cases).
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Watchers in the watch scenario.
    #[arg(long, default_value_t = 1_000)]
    pub watchers: usize,
    /// Watch streams the watchers are spread over.
    #[arg(long, default_value_t = 100)]
    pub streams: usize,
    /// Puts in lock step in the watch scenario.
    #[arg(long, default_value_t = 200)]
    pub puts: usize,
    /// Keys written before the kill in the recovery scenario.
    #[arg(long, default_value_t = 1_000_000)]
    pub recovery_keys: usize,
    /// Members of each cluster started here (1, 3 or 5).
    #[arg(long, default_value_t = 1)]
    pub members: usize,
    /// Systems to measure: `shoal`, `etcd`, or both (started here on loopback).
    #[arg(long, value_enum, default_value_t = Target::Both)]
    pub target: Target,
    /// Measure already running endpoints (host:port[,host:port...]) instead of starting servers;
    /// CPU time is then not reported.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The shoal binary to start (default: the one beside loadgen).
    #[arg(long)]
    pub shoal_bin: Option<std::path::PathBuf>,
    /// Extra arguments for `shoal server`, e.g. `--shoal-arg=--wal-io=std`.
    #[arg(long = "shoal-arg", allow_hyphen_values = true)]
    pub shoal_args: Vec<String>,
    /// The etcd binary to start.
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: String,
    /// Directory under which the servers' data directories are created.
    #[arg(long)]
    pub data_base: Option<std::path::PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Shoal,
    Etcd,
    Both,
}

/// One system's figures for one case.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub system: String,
    pub ops: u64,
    pub errors: u64,
    pub secs: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu_us_per_op: Option<f64>,
    pub lost: u64,
    pub duplicated: u64,
    pub recovery_s: Option<f64>,
}

impl Figures {
    fn ops_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

struct Target_ {
    name: String,
    /// Client endpoints, one per member.
    endpoints: Vec<String>,
    procs: Vec<Proc>,
}

impl Target_ {
    /// CPU seconds used by every server process of the system (None for an external endpoint).
    fn cpu(&self) -> Option<f64> {
        if self.procs.is_empty() {
            return None;
        }
        self.procs.iter().map(|p| procs::cpu_seconds(p.pid())).sum()
    }
}

/// `n` connections (at least one per member), spread over the members.
async fn channels(endpoints: &[String], n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::new();
    for i in 0..n.max(endpoints.len()).max(1) {
        let endpoint = &endpoints[i % endpoints.len()];
        let ch = Channel::from_shared(format!("http://{endpoint}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("while connecting to {endpoint}"))?;
        out.push(ch);
    }
    Ok(out)
}

fn key(i: usize) -> Bytes {
    Bytes::from(format!("/lg/k/{i:08}"))
}

/// Writes every key of the key space once (so gets find values).
async fn populate(chans: &[Channel], keys: usize, value: &Bytes) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..32 {
        let mut kv = KvClient::new(chans[c % chans.len()].clone());
        let next = next.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return anyhow::Ok(());
                }
                kv.put(PutRequest { key: key(i), value: value.clone(), ..Default::default() }).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn bar(len: u64, msg: String) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template("{msg:28} [{bar:30}] {pos}/{len} {elapsed}").expect("static template").progress_chars("=> "));
    pb.set_message(msg);
    pb
}

/// Runs one closed-loop case: `clients` tasks issue `scenario` operations for `duration`.
async fn closed_loop(t: &Target_, a: &StoreArgs, scenario: Scenario) -> anyhow::Result<Figures> {
    let chans = channels(&t.endpoints, a.conns).await?;
    let value = Bytes::from(vec![b'v'; a.value_size]);
    if matches!(scenario, Scenario::Get | Scenario::GetSerializable | Scenario::Mix) {
        populate(&chans, a.keys, &value).await?;
    }
    let stop = Instant::now() + Duration::from_secs(a.duration);
    let errors = Arc::new(AtomicU64::new(0));
    let cpu0 = t.cpu();
    let t0 = Instant::now();
    let pb = bar(a.duration, format!("{} {:?}", t.name, scenario));
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let mut kv = KvClient::new(chans[c % chans.len()].clone());
        let value = value.clone();
        let errors = errors.clone();
        let keys = a.keys.max(1);
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut rng = (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let own = Bytes::from(format!("/lg/txn/{c:06}"));
            let mut own_rev = 0i64;
            if scenario == Scenario::Txn {
                match kv.put(PutRequest { key: own.clone(), value: value.clone(), ..Default::default() }).await {
                    Ok(r) => own_rev = r.into_inner().header.map_or(0, |h| h.revision),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            while Instant::now() < stop {
                let s = Instant::now();
                let k = key((next() % keys as u64) as usize);
                let ok = match scenario {
                    Scenario::Put => kv.put(PutRequest { key: k, value: value.clone(), ..Default::default() }).await.is_ok(),
                    Scenario::Get | Scenario::GetSerializable => kv
                        .range(RangeRequest { key: k, serializable: scenario == Scenario::GetSerializable, ..Default::default() })
                        .await
                        .is_ok(),
                    Scenario::Txn => match kv.txn(cas(own.clone(), own_rev, value.clone())).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            if r.succeeded {
                                own_rev = r.header.map_or(0, |h| h.revision);
                            }
                            r.succeeded
                        }
                        Err(_) => false,
                    },
                    Scenario::Mix => {
                        let dice = next() % 10;
                        if dice < 6 {
                            kv.range(RangeRequest { key: k, ..Default::default() }).await.is_ok()
                        } else if dice < 9 {
                            // Read, then update guarded by the revision read (kube-apiserver's GuaranteedUpdate).
                            match kv.range(RangeRequest { key: k.clone(), ..Default::default() }).await {
                                Ok(r) => {
                                    let rev = r.into_inner().kvs.first().map_or(0, |kv| kv.mod_revision);
                                    kv.txn(cas(k, rev, value.clone())).await.is_ok()
                                }
                                Err(_) => false,
                            }
                        } else {
                            let start = key((next() % keys as u64) as usize);
                            kv.range(RangeRequest { key: start, range_end: Bytes::from_static(b"/lg/k0"), limit: 50, ..Default::default() })
                                .await
                                .is_ok()
                        }
                    }
                    Scenario::Watch | Scenario::Recovery | Scenario::All => unreachable!("not a closed-loop scenario"),
                };
                if ok {
                    lat.push(s.elapsed().as_micros().min(u32::MAX as u128) as u32);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    let ticker = {
        let pb = pb.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                pb.set_position(t0.elapsed().as_secs());
            }
        })
    };
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    let secs = t0.elapsed().as_secs_f64();
    ticker.abort();
    pb.finish_and_clear();
    let cpu = match (cpu0, t.cpu()) {
        (Some(a), Some(b)) if !lat.is_empty() => Some((b - a) * 1e6 / lat.len() as f64),
        _ => None,
    };
    lat.sort_unstable();
    Ok(Figures {
        system: t.name.clone(),
        ops: lat.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        secs,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        cpu_us_per_op: cpu,
        ..Default::default()
    })
}

fn cas(key: Bytes, rev: i64, value: Bytes) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Mod as i32,
            key: key.clone(),
            target_union: Some(compare::TargetUnion::ModRevision(rev)),
            ..Default::default()
        }],
        success: vec![RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key: key.clone(), value, ..Default::default() })) }],
        failure: vec![RequestOp { request: Some(request_op::Request::RequestRange(RangeRequest { key, ..Default::default() })) }],
    }
}

/// Watch fan-out: `watchers` watchers of one key over `streams` streams; `puts` puts in
/// lock step; latency = put sent → the last watcher received its event.
async fn watch_fanout(t: &Target_, a: &StoreArgs) -> anyhow::Result<Figures> {
    let chans = channels(&t.endpoints, a.conns).await?;
    let wkey = Bytes::from(format!("/lg/watch/{}", std::process::id()));
    let mut kv = KvClient::new(chans[0].clone());
    let base = kv.put(PutRequest { key: wkey.clone(), value: Bytes::from_static(b"start"), ..Default::default() }).await?.into_inner();
    let base_rev = base.header.map_or(0, |h| h.revision);
    let n = a.puts;
    let arrived: Arc<Vec<AtomicUsize>> = Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect());
    let notify = Arc::new(Notify::new());
    let dup = Arc::new(AtomicU64::new(0));
    let created = Arc::new(AtomicUsize::new(0));
    let streams = a.streams.max(1).min(a.watchers.max(1));
    let mut handles = Vec::new();
    let pb = bar(a.watchers as u64, format!("{} watchers", t.name));
    for s in 0..streams {
        let count = a.watchers / streams + usize::from(s < a.watchers % streams);
        let (tx, rx) = tokio::sync::mpsc::channel::<WatchRequest>(count + 1);
        for _ in 0..count {
            tx.send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest { key: wkey.clone(), start_revision: base_rev + 1, ..Default::default() })),
            })
            .await?;
        }
        let mut client = WatchClient::new(chans[s % chans.len()].clone()).max_decoding_message_size(64 << 20);
        let mut inbound = client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        let (arrived, notify, dup, created, pb) = (arrived.clone(), notify.clone(), dup.clone(), created.clone(), pb.clone());
        let watchers = a.watchers;
        handles.push(tokio::spawn(async move {
            let _keep_open = tx;
            let mut last: HashMap<i64, i64> = HashMap::new();
            while let Ok(Some(resp)) = inbound.message().await {
                if resp.created {
                    created.fetch_add(1, Ordering::Relaxed);
                    pb.inc(1);
                }
                for ev in resp.events {
                    let rev = ev.kv.map_or(0, |kv| kv.mod_revision);
                    let l = last.entry(resp.watch_id).or_insert(0);
                    if rev <= *l {
                        dup.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    *l = rev;
                    let i = (rev - base_rev - 1) as usize;
                    if i < arrived.len() && arrived[i].fetch_add(1, Ordering::AcqRel) + 1 == watchers {
                        notify.notify_waiters();
                    }
                }
            }
        }));
    }
    let t_create = Instant::now();
    while created.load(Ordering::Relaxed) < a.watchers {
        if t_create.elapsed() > Duration::from_secs(60) {
            bail!("only {} of {} watchers were created within 60 s", created.load(Ordering::Relaxed), a.watchers);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pb.finish_and_clear();
    let pb = bar(n as u64, format!("{} lock-step puts", t.name));
    let cpu0 = t.cpu();
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(n);
    let mut timeouts = 0;
    for i in 0..n {
        let s = Instant::now();
        let waiter = notify.notified();
        tokio::pin!(waiter);
        waiter.as_mut().enable();
        kv.put(PutRequest { key: wkey.clone(), value: Bytes::from(format!("v{i}")), ..Default::default() }).await?;
        let deadline = s + Duration::from_secs(5);
        while arrived[i].load(Ordering::Acquire) < a.watchers {
            if tokio::time::timeout_at(deadline.into(), waiter.as_mut()).await.is_err() {
                timeouts += 1;
                break;
            }
            waiter.set(notify.notified());
            waiter.as_mut().enable();
        }
        lat.push(s.elapsed().as_micros() as u32);
        pb.inc(1);
    }
    let secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    // Let stragglers arrive before counting losses.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = match (cpu0, t.cpu()) {
        (Some(a), Some(b)) => Some((b - a) * 1e6 / n.max(1) as f64),
        _ => None,
    };
    let received: u64 = arrived.iter().map(|c| c.load(Ordering::Relaxed) as u64).sum();
    for h in handles {
        h.abort();
    }
    lat.sort_unstable();
    Ok(Figures {
        system: t.name.clone(),
        ops: n as u64,
        errors: timeouts,
        secs,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        cpu_us_per_op: cpu,
        lost: (a.watchers as u64 * n as u64).saturating_sub(received),
        duplicated: dup.load(Ordering::Relaxed),
        recovery_s: None,
    })
}

/// Writes `recovery_keys` keys (txns of 100 puts), kills the server with SIGKILL,
/// restarts it on the same data and measures the time until a read succeeds.
async fn recovery(mut t: Target_, a: &StoreArgs) -> anyhow::Result<Figures> {
    let chans = channels(&t.endpoints, 4).await?;
    let value = Bytes::from(vec![b'r'; a.value_size]);
    let n = a.recovery_keys;
    let pb = bar(n as u64, format!("{} writing keys", t.name));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..8 {
        let mut kv = KvClient::new(chans[c % chans.len()].clone());
        let (next, value, pb) = (next.clone(), value.clone(), pb.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(100, Ordering::Relaxed);
                if start >= n {
                    return anyhow::Ok(());
                }
                let ops = (start..(start + 100).min(n))
                    .map(|i| RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key: key(i), value: value.clone(), ..Default::default() })) })
                    .collect();
                kv.txn(TxnRequest { compare: vec![], success: ops, failure: vec![] }).await?;
                pb.inc(100);
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    pb.finish_and_clear();
    drop(chans);
    let proc_ = t.procs.first_mut().expect("recovery runs on a server it started");
    let t0 = Instant::now();
    proc_.kill9_and_restart()?;
    let endpoint = t.endpoints[0].clone();
    // Ready = a linearizable read of the last key answers with its value.
    let last = key(n.saturating_sub(1));
    let secs = loop {
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("{} did not serve within 600 s after restart", t.name);
        }
        let attempt = async {
            let ch = Channel::from_shared(format!("http://{endpoint}"))?.connect().await?;
            let r = KvClient::new(ch).range(RangeRequest { key: last.clone(), ..Default::default() }).await?;
            anyhow::Ok(r.into_inner().kvs.len())
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(1)) => break t0.elapsed().as_secs_f64(),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let ch = channels(&t.endpoints[..1], 1).await?;
    let all = KvClient::new(ch[0].clone())
        .range(RangeRequest { key: Bytes::from_static(b"/lg/k/"), range_end: Bytes::from_static(b"/lg/k0"), count_only: true, ..Default::default() })
        .await?
        .into_inner();
    let lost = (n as u64).saturating_sub(all.count as u64);
    Ok(Figures { system: t.name.clone(), ops: n as u64, secs, recovery_s: Some(secs), lost, ..Default::default() })
}

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Put => "put",
        Scenario::Get => "get",
        Scenario::GetSerializable => "get-serializable",
        Scenario::Txn => "txn",
        Scenario::Watch => "watch",
        Scenario::Mix => "mix",
        Scenario::Recovery => "recovery",
        Scenario::All => "all",
    }
}

/// Runs the chosen scenarios; returns the JSON results (one object per scenario).
pub async fn run(a: StoreArgs) -> anyhow::Result<Value> {
    if a.clients == 0 || a.conns == 0 {
        bail!("--clients and --conns must be at least 1");
    }
    if !matches!(a.members, 1 | 3 | 5) {
        bail!("--members must be 1, 3 or 5, got {}", a.members);
    }
    if a.scenario == Scenario::Recovery && a.members != 1 {
        bail!("the recovery scenario runs on one member");
    }
    let scenarios: Vec<Scenario> = if a.scenario == Scenario::All {
        vec![Scenario::Put, Scenario::Get, Scenario::GetSerializable, Scenario::Txn, Scenario::Watch, Scenario::Mix]
    } else {
        vec![a.scenario]
    };
    let mut results = Vec::new();
    for sc in scenarios {
        let mut figs = Vec::new();
        let systems: Vec<&str> = match (&a.endpoint, a.target) {
            (Some(_), _) => vec!["endpoint"],
            (None, Target::Both) => vec!["shoal", "etcd"],
            (None, Target::Shoal) => vec!["shoal"],
            (None, Target::Etcd) => vec!["etcd"],
        };
        for sys in systems {
            // A fresh server per case, so cases do not inherit each other's data.
            if sc == Scenario::Recovery && sys == "endpoint" {
                bail!("the recovery scenario starts and kills its own servers; it cannot use --endpoint");
            }
            let t = match (sys, &a.endpoint) {
                ("endpoint", Some(e)) => Target_ { name: "endpoint".into(), endpoints: e.split(',').map(str::to_string).collect(), procs: vec![] },
                ("shoal", _) => {
                    let bin = a.shoal_bin.clone().unwrap_or_else(procs::default_shoal_bin);
                    let ps = procs::start_shoal(&bin, a.data_base.as_deref(), &a.shoal_args, a.members)?;
                    Target_ { name: "shoal".into(), endpoints: ps.iter().map(|p| p.endpoint.to_string()).collect(), procs: ps }
                }
                _ => {
                    let ps = procs::start_etcd(&a.etcd_bin, a.data_base.as_deref(), a.members)?;
                    Target_ { name: "etcd".into(), endpoints: ps.iter().map(|p| p.endpoint.to_string()).collect(), procs: ps }
                }
            };
            let f = match sc {
                Scenario::Watch => watch_fanout(&t, &a).await?,
                Scenario::Recovery => recovery(t, &a).await?,
                _ => closed_loop(&t, &a, sc).await?,
            };
            figs.push(f);
        }
        print_table(sc, &a, &figs);
        results.push(to_json(sc, &a, &figs));
    }
    Ok(if results.len() == 1 { results.pop().expect("one result") } else { json!({"scenario": "store/all", "results": results}) })
}

fn print_table(sc: Scenario, a: &StoreArgs, figs: &[Figures]) {
    if sc == Scenario::Recovery {
        println!("\nstore/recovery: {} keys of {} bytes written, kill -9, restart", a.recovery_keys, a.value_size);
        println!("{:<10} {:>12} {:>8}", "system", "recovery s", "lost");
        for f in figs {
            println!("{:<10} {:>12.3} {:>8}", f.system, f.recovery_s.unwrap_or(f64::NAN), f.lost);
        }
        return;
    }
    let what = if sc == Scenario::Watch {
        format!("{} member(s), {} watchers over {} streams, {} lock-step puts", a.members, a.watchers, a.streams, a.puts)
    } else {
        format!("{} member(s), {} clients over {} connections, {} s, {}-byte values", a.members, a.clients, a.conns.max(a.members), a.duration, a.value_size)
    };
    println!("\nstore/{}: {what}", scenario_name(sc));
    println!("{:<10} {:>12} {:>9} {:>9} {:>14} {:>8} {:>6} {:>6}", "system", "ops/s", "p50 ms", "p99 ms", "server µs/op", "errors", "lost", "dup");
    for f in figs {
        println!(
            "{:<10} {:>12.0} {:>9.2} {:>9.2} {:>14} {:>8} {:>6} {:>6}",
            f.system,
            f.ops_per_s(),
            f.p50_ms,
            f.p99_ms,
            f.cpu_us_per_op.map_or("-".into(), |c| format!("{c:.1}")),
            f.errors,
            f.lost,
            f.duplicated
        );
    }
    if let (Some(s), Some(e)) = (figs.iter().find(|f| f.system == "shoal"), figs.iter().find(|f| f.system == "etcd")) {
        let cpu = match (s.cpu_us_per_op, e.cpu_us_per_op) {
            (Some(s), Some(e)) if s > 0.0 => format!(", server CPU per op {:.2}× less", e / s),
            _ => String::new(),
        };
        if sc == Scenario::Watch {
            println!("ratio: shoal p50 is {:.2}× etcd's{cpu}", s.p50_ms / e.p50_ms.max(1e-9));
        } else {
            println!("ratio: shoal/etcd throughput {:.2}×{cpu}", s.ops_per_s() / e.ops_per_s().max(1e-9));
        }
    }
}

fn to_json(sc: Scenario, a: &StoreArgs, figs: &[Figures]) -> Value {
    let mut m = Map::new();
    m.insert("scenario".into(), json!(format!("store/{}", scenario_name(sc))));
    m.insert("members".into(), json!(a.members));
    if sc == Scenario::Recovery {
        m.insert("keys".into(), json!(a.recovery_keys));
        for f in figs {
            m.insert(format!("{}_recovery_s", f.system), json!(f.recovery_s));
            m.insert(format!("{}_lost", f.system), json!(f.lost));
        }
        if let Some(s) = figs.iter().find(|f| f.system == "shoal") {
            m.insert("recovery_s".into(), json!(s.recovery_s));
        }
        return Value::Object(m);
    }
    if sc == Scenario::Watch {
        m.insert("watchers".into(), json!(a.watchers));
        m.insert("streams".into(), json!(a.streams));
        m.insert("puts".into(), json!(a.puts));
    } else {
        m.insert("clients".into(), json!(a.clients));
        m.insert("conns".into(), json!(a.conns));
        m.insert("duration_s".into(), json!(a.duration));
    }
    for f in figs {
        let p = &f.system;
        m.insert(format!("{p}_ops_per_s"), json!((f.ops_per_s() * 10.0).round() / 10.0));
        m.insert(format!("{p}_p50_ms"), json!(f.p50_ms));
        m.insert(format!("{p}_p99_ms"), json!(f.p99_ms));
        m.insert(format!("{p}_errors"), json!(f.errors));
        if let Some(c) = f.cpu_us_per_op {
            m.insert(format!("{p}_server_cpu_us_per_op"), json!((c * 10.0).round() / 10.0));
        }
        if sc == Scenario::Watch {
            m.insert(format!("{p}_lost"), json!(f.lost));
            m.insert(format!("{p}_duplicated"), json!(f.duplicated));
        }
    }
    if let (Some(s), Some(e)) = (figs.iter().find(|f| f.system == "shoal"), figs.iter().find(|f| f.system == "etcd")) {
        let ratio = if sc == Scenario::Watch { e.p50_ms / s.p50_ms.max(1e-9) } else { s.ops_per_s() / e.ops_per_s().max(1e-9) };
        m.insert("ratio".into(), json!((ratio * 100.0).round() / 100.0));
        if let (Some(sc), Some(ec)) = (s.cpu_us_per_op, e.cpu_us_per_op) {
            m.insert("cpu_ratio".into(), json!((ec / sc.max(1e-9) * 100.0).round() / 100.0));
        }
        m.insert("lost".into(), json!(s.lost));
        m.insert("duplicated".into(), json!(s.duplicated));
    }
    Value::Object(m)
}
