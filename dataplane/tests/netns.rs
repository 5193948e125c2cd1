//! Real traffic through the service programs: a client pod and backend pods, each a network
//! namespace with a veth into a node namespace (the test thread's own), the programs on the
//! node side of every veth, TCP and UDP servers in the backends. Needs root.
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use shoal_dataplane::abi::Proto;
use shoal_dataplane::nft::Nft;
use shoal_dataplane::{Config, Dataplane, Endpoint, Frontend, ServicePort, Table};

/// Which proxy programs the node.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Bpf,
    Nftables,
}

const VIP: &str = "10.96.0.10";
/// The node's address on its uplink, and an outside client's.
const NODE: &str = "192.168.50.1";
const OUTSIDE: &str = "192.168.50.2";
/// Another node on the uplink's LAN.
const NODE2: &str = "192.168.50.3";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Enters the network namespace named `ns` (this thread only).
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    // SAFETY: setns on a namespace fd changes only this thread's network namespace
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// The node (this thread's new namespace) and its pods.
struct Node {
    prefix: String,
    pods: Vec<String>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    pin_dir: PathBuf,
    dp: Option<Dataplane>,
    table: Table,
    nft: Option<Nft>,
}

impl Node {
    fn new() -> Node {
        Node::with(Mode::Bpf)
    }

    fn with(mode: Mode) -> Node {
        static N: AtomicU32 = AtomicU32::new(0);
        // SAFETY: unshare(CLONE_NEWNET) changes only the calling thread's namespace
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        sh(&["ip", "link", "set", "lo", "up"]);
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        // a default route, as a real node has (traffic to a service without endpoints is
        // routed before nftables rejects it in the forward hook)
        // (this kernel has no dummy device: a veth pair with nothing behind it)
        sh(&["ip", "link", "add", "gw0", "type", "veth", "peer", "name", "gw1"]);
        sh(&["ip", "link", "set", "gw0", "up"]);
        sh(&["ip", "route", "add", "default", "dev", "gw0"]);
        let prefix = format!("shoal-dp-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{prefix}"));
        let (dp, nft) = match mode {
            Mode::Bpf => (Some(Dataplane::load(&Config { pin_dir: pin_dir.clone(), node_addr: NODE.parse().ok(), ..Config::default() }).expect("load (needs root)")), None),
            Mode::Nftables => (None, Some(Nft::new("shoal-proxy").unwrap())),
        };
        Node { prefix, pods: Vec::new(), stop: Arc::new(AtomicBool::new(false)), servers: Vec::new(), pin_dir, dp, table: Table::new(), nft }
    }

    /// Pod number `i` (1..): namespace, veth `pod<i>` on the node, address 10.0.<i>.2/24,
    /// the programs attached. Returns its address.
    fn pod(&mut self, i: u8) -> Ipv4Addr {
        let ns = format!("{}-{i}", self.prefix);
        sh(&["ip", "netns", "add", &ns]);
        self.pods.push(ns.clone());
        let host = format!("pod{i}");
        sh(&["ip", "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        sh(&["ip", "addr", "add", &format!("10.0.{i}.1/24"), "dev", &host]);
        sh(&["ip", "link", "set", &host, "up"]);
        for cmd in [vec!["link", "set", "lo", "up"], vec!["addr", "add", &format!("10.0.{i}.2/24"), "dev", "eth0"], vec!["link", "set", "eth0", "up"], vec!["route", "add", "default", "via", &format!("10.0.{i}.1")]] {
            let mut args = vec!["ip", "-n", &ns];
            args.extend(cmd.iter().map(|s| &**s));
            sh(&args);
        }
        if let Some(dp) = self.dp.as_mut() {
            dp.attach_pod(&host, Some(Ipv4Addr::new(10, 0, i, 2))).unwrap();
        }
        Ipv4Addr::new(10, 0, i, 2)
    }

    /// The world outside the node: a namespace `<prefix>-out` at OUTSIDE, linked to the
    /// node's uplink `up0` (NODE) with the uplink programs on it.
    fn outside(&mut self) {
        let ns = format!("{}-out", self.prefix);
        sh(&["ip", "netns", "add", &ns]);
        self.pods.push(ns.clone());
        sh(&["ip", "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        sh(&["ip", "addr", "add", &format!("{NODE}/24"), "dev", "up0"]);
        sh(&["ip", "link", "set", "up0", "up"]);
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{OUTSIDE}/24"), "dev", "eth0"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        self.dp.as_mut().unwrap().attach_uplink("up0").unwrap();
    }

    /// The uplink on a LAN (a bridge in `<prefix>-lan`) with the outside client (OUTSIDE, in
    /// `<prefix>-out`) and another node (NODE2, in `<prefix>-9`, as pod 9 for `serve`) on
    /// it; the uplink programs, tc and XDP, on up0.
    fn lan(&mut self) {
        let (lan, out, other) = (format!("{}-lan", self.prefix), format!("{}-out", self.prefix), format!("{}-9", self.prefix));
        for ns in [&lan, &out, &other] {
            sh(&["ip", "netns", "add", ns]);
            self.pods.push(ns.clone());
        }
        sh(&["ip", "-n", &lan, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &lan, "link", "set", "br0", "up"]);
        sh(&["ip", "link", "add", "up0", "type", "veth", "peer", "name", "n1", "netns", &lan]);
        sh(&["ip", "addr", "add", &format!("{NODE}/24"), "dev", "up0"]);
        sh(&["ip", "link", "set", "up0", "up"]);
        for (port, ns, addr) in [("n1", None, None), ("c1", Some(&out), Some(OUTSIDE)), ("n2", Some(&other), Some(NODE2))] {
            if let (Some(ns), Some(addr)) = (ns, addr) {
                sh(&["ip", "-n", &lan, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns]);
                sh(&["ip", "-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
                sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
                sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            }
            sh(&["ip", "-n", &lan, "link", "set", port, "master", "br0"]);
            sh(&["ip", "-n", &lan, "link", "set", port, "up"]);
        }
        self.dp.as_mut().unwrap().attach_uplink("up0").unwrap();
    }

    /// Runs `f` in the outside namespace.
    fn from_outside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = format!("{}-out", self.prefix);
        std::thread::spawn(move || {
            enter(&ns);
            f()
        })
        .join()
        .unwrap()
    }

    /// TCP and UDP servers in pod `i` that answer every line or datagram with `name`
    /// (and a line `peer` with `name` and the address the connection came from).
    fn serve(&mut self, i: u8, name: &str) {
        let ns = format!("{}-{i}", self.prefix);
        let (stop, name) = (self.stop.clone(), name.to_string());
        let (tx, rx) = std::sync::mpsc::channel();
        self.servers.push(std::thread::spawn(move || {
            enter(&ns);
            let tcp = TcpListener::bind("0.0.0.0:8080").unwrap();
            tcp.set_nonblocking(true).unwrap();
            let udp = UdpSocket::bind("0.0.0.0:5353").unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((conn, peer)) => {
                        let name = name.clone();
                        std::thread::spawn(move || answer_lines(conn, &name, peer.ip()));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(name.as_bytes(), from);
                }
            }
        }));
        rx.recv().unwrap();
    }

    fn service(&mut self, name: &str, proto: Proto, port: u16, backends: &[(Ipv4Addr, bool)], affinity: u32) {
        let target = if proto == Proto::Tcp { 8080 } else { 5353 };
        let want = ServicePort {
            proto,
            frontends: vec![Frontend { addr: VIP.parse().unwrap(), port, flags: 0 }],
            endpoints: backends.iter().map(|(addr, ready)| Endpoint { addr: *addr, port: target, ready: *ready, serving: *ready, terminating: false }).collect(),
            affinity_timeout: affinity,
            external_local: false,
            maglev: false,
        };
        if let Some(nft) = self.nft.as_mut() {
            nft.sync(name, Some(&want));
            nft.commit().unwrap();
            return;
        }
        let dp = self.dp.as_mut().unwrap();
        self.table.sync(name, Some(&want), &mut dp.maps()).unwrap();
    }

    /// Runs `f` in pod `i`'s namespace, on a thread of its own.
    fn in_pod<T: Send + 'static>(&self, i: u8, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = format!("{}-{i}", self.prefix);
        std::thread::spawn(move || {
            enter(&ns);
            f()
        })
        .join()
        .unwrap()
    }

    /// Simulates an agent restart: the programs and maps are dropped (the pins and the tc
    /// filters stay) and loaded again; the table is rebuilt from the pinned maps.
    fn restart(&mut self) {
        drop(self.dp.take());
        let mut dp = Dataplane::load(&Config { pin_dir: self.pin_dir.clone(), node_addr: NODE.parse().ok(), ..Config::default() }).unwrap();
        for i in 1..=self.pods.len() {
            dp.attach(&format!("pod{i}")).unwrap();
        }
        self.table = dp.restore_table().unwrap();
        self.dp = Some(dp);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        if let Some(dp) = self.dp.take() {
            let _ = dp.unpin();
        }
        if let Some(nft) = self.nft.take() {
            let _ = nft.remove();
        }
        for ns in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn answer_lines(conn: TcpStream, name: &str, peer: std::net::IpAddr) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = conn.try_clone().unwrap();
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let answer = if line == "peer" { format!("{name} {peer}\n") } else { format!("{name}\n") };
        if w.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// One request on a new connection to the service: who answered.
fn ask_tcp(port: u16) -> std::io::Result<String> {
    ask_at(&format!("{VIP}:{port}"), "who")
}

/// One line to `addr` on a new connection; the answer.
fn ask_at(addr: &str, line: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    c.set_read_timeout(Some(Duration::from_secs(3)))?;
    c.write_all(format!("{line}\n").as_bytes())?;
    let mut s = String::new();
    BufReader::new(&mut c).read_line(&mut s)?;
    Ok(s.trim().to_string())
}

fn ask_udp(port: u16) -> std::io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(format!("{VIP}:{port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.send(b"who")?;
    let mut buf = [0u8; 64];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn tally(answers: Vec<String>) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for a in answers {
        *m.entry(a).or_insert(0) += 1;
    }
    m
}

#[test]
fn tcp_and_udp_reach_every_backend_and_a_removed_backend_gets_no_new_flow() {
    spread_and_removal(Mode::Bpf);
}

#[test]
fn nftables_mode_reaches_every_backend_and_a_removed_backend_gets_no_new_flow() {
    spread_and_removal(Mode::Nftables);
}

fn spread_and_removal(mode: Mode) {
    let mut node = Node::with(mode);
    node.pod(1);
    let backends: Vec<Ipv4Addr> = (2..=4).map(|i| node.pod(i)).collect();
    for (i, name) in [(2, "b2"), (3, "b3"), (4, "b4")] {
        node.serve(i, name);
    }
    let all: Vec<(Ipv4Addr, bool)> = backends.iter().map(|b| (*b, true)).collect();
    node.service("default/web:http", Proto::Tcp, 80, &all, 0);
    node.service("default/web:dns", Proto::Udp, 53, &all, 0);
    let (tcp, udp) = node.in_pod(1, || ((0..60).map(|_| ask_tcp(80).unwrap()).collect::<Vec<_>>(), (0..60).map(|_| ask_udp(53).unwrap()).collect::<Vec<_>>()));
    for (what, t) in [("tcp", tally(tcp)), ("udp", tally(udp))] {
        assert_eq!(t.len(), 3, "{what}: {t:?}");
        assert!(t.values().all(|n| *n >= 8), "{what}: 60 flows over 3 backends: {t:?}");
    }
    // b3 stops being ready: new flows go to the two others only
    node.service("default/web:http", Proto::Tcp, 80, &[(backends[0], true), (backends[1], false), (backends[2], true)], 0);
    let t = tally(node.in_pod(1, || (0..40).map(|_| ask_tcp(80).unwrap()).collect()));
    assert_eq!(t.keys().cloned().collect::<Vec<_>>(), vec!["b2", "b4"], "{t:?}");
}

#[test]
fn a_flow_keeps_its_backend_while_backends_change_and_across_a_restart() {
    let mut node = Node::new();
    node.pod(1);
    let backends: Vec<Ipv4Addr> = (2..=5).map(|i| node.pod(i)).collect();
    for (i, name) in [(2, "b2"), (3, "b3"), (4, "b4"), (5, "b5")] {
        node.serve(i, name);
    }
    node.service("default/web:http", Proto::Tcp, 80, &[(backends[0], true), (backends[1], true)], 0);
    // an open connection from the client pod, driven from here through a channel
    let (to_client, from_test) = std::sync::mpsc::channel::<()>();
    let (to_test, answers) = std::sync::mpsc::channel::<String>();
    let ns = format!("{}-1", node.prefix);
    let client = std::thread::spawn(move || {
        enter(&ns);
        let mut c = TcpStream::connect(format!("{VIP}:80")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        while from_test.recv().is_ok() {
            c.write_all(b"again\n").unwrap();
            let mut s = String::new();
            r.read_line(&mut s).unwrap();
            to_test.send(s.trim().to_string()).unwrap();
        }
    });
    let ask = || {
        to_client.send(()).unwrap();
        answers.recv_timeout(Duration::from_secs(10)).expect("the open connection answers")
    };
    let first = ask();
    // backends added: the flow stays
    node.service("default/web:http", Proto::Tcp, 80, &[(backends[0], true), (backends[1], true), (backends[2], true), (backends[3], true)], 0);
    assert_eq!(ask(), first);
    // the agent restarts: pinned maps and filters carry the flow, the table comes back
    node.restart();
    assert_eq!(ask(), first);
    let writes = {
        let want_all: Vec<(Ipv4Addr, bool)> = backends.iter().map(|b| (*b, true)).collect();
        let dp = node.dp.as_mut().unwrap();
        let want = ServicePort {
            proto: Proto::Tcp,
            frontends: vec![Frontend { addr: VIP.parse().unwrap(), port: 80, flags: 0 }],
            endpoints: want_all.iter().map(|(a, r)| Endpoint { addr: *a, port: 8080, ready: *r, serving: *r, terminating: false }).collect(),
            affinity_timeout: 0,
            external_local: false,
            maglev: false,
        };
        node.table.sync("default/web:http", Some(&want), &mut dp.maps()).unwrap()
    };
    assert_eq!(writes.total(), 0, "the restored table matches the maps");
    assert_eq!(ask(), first);
    drop(to_client);
    client.join().unwrap();
    // and new connections still spread
    let t = tally(node.in_pod(1, || (0..40).map(|_| ask_tcp(80).unwrap()).collect()));
    assert!(t.len() >= 3, "{t:?}");
}

#[test]
fn no_endpoints_is_refused_affinity_sticks_and_a_pod_reaches_itself() {
    refused_hairpin_transfer(Mode::Bpf);
}

#[test]
fn nftables_mode_refuses_without_endpoints_and_a_pod_reaches_itself() {
    refused_hairpin_transfer(Mode::Nftables);
}

fn refused_hairpin_transfer(mode: Mode) {
    let mut node = Node::with(mode);
    node.pod(1);
    let b2 = node.pod(2);
    let b3 = node.pod(3);
    node.serve(2, "b2");
    node.serve(3, "b3");
    node.service("default/none:http", Proto::Tcp, 81, &[], 0);
    node.service("default/none:dns", Proto::Udp, 54, &[], 0);
    let (tcp, udp) = node.in_pod(1, || (ask_tcp(81).unwrap_err().kind(), ask_udp(54).unwrap_err().kind()));
    assert_eq!(tcp, ErrorKind::ConnectionRefused);
    assert_eq!(udp, ErrorKind::ConnectionRefused);
    // ClientIP affinity: every connection of the client goes to one backend (BPF only)
    if mode == Mode::Bpf {
        node.service("default/sticky:http", Proto::Tcp, 82, &[(b2, true), (b3, true)], 10800);
        let t = tally(node.in_pod(1, || (0..30).map(|_| ask_tcp(82).unwrap()).collect()));
        assert_eq!(t.len(), 1, "{t:?}");
    }
    // hairpin: b2 reaches itself through a service whose only backend it is
    node.service("default/self:http", Proto::Tcp, 83, &[(b2, true)], 0);
    let answers: Vec<String> = node.in_pod(2, || (0..5).map(|_| ask_tcp(83).unwrap()).collect());
    assert_eq!(answers, vec!["b2"; 5]);
    // bytes move both ways on a larger transfer too (checksums stay right)
    node.service("default/web:http", Proto::Tcp, 80, &[(b3, true)], 0);
    let n = node.in_pod(1, || {
        let mut c = TcpStream::connect(format!("{VIP}:80")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let lines = "x".repeat(1000) + "\n";
        for _ in 0..200 {
            c.write_all(lines.as_bytes()).unwrap();
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s.lines().filter(|l| *l == "b3").count()
    });
    assert_eq!(n, 200);
}

#[test]
fn a_node_port_answers_from_outside_the_node() {
    let mut node = Node::new();
    let b2 = node.pod(2);
    let b3 = node.pod(3);
    node.serve(2, "b2");
    node.serve(3, "b3");
    node.outside();
    let node_port = |node: &mut Node, local: bool| {
        let want = ServicePort {
            proto: Proto::Tcp,
            frontends: vec![Frontend { addr: VIP.parse().unwrap(), port: 80, flags: 0 }, Frontend { addr: NODE.parse().unwrap(), port: 30080, flags: shoal_dataplane::abi::SVC_F_NODEPORT }],
            endpoints: [b2, b3].iter().map(|a| Endpoint { addr: *a, port: 8080, ready: true, serving: true, terminating: false }).collect(),
            affinity_timeout: 0,
            external_local: local,
            maglev: false,
        };
        let dp = node.dp.as_mut().unwrap();
        node.table.sync("default/np:80/TCP", Some(&want), &mut dp.maps()).unwrap();
    };
    // externalTrafficPolicy Cluster: the backends see the node's address, as with kube-proxy
    node_port(&mut node, false);
    let answers: Vec<String> = node.from_outside(|| (0..30).map(|_| ask_at(&format!("{NODE}:30080"), "peer").unwrap()).collect());
    let t = tally(answers.iter().map(|a| a.split(' ').next().unwrap().to_string()).collect());
    assert_eq!(t.len(), 2, "{answers:?}");
    assert!(answers.iter().all(|a| a.ends_with(&format!(" {NODE}"))), "{answers:?}");
    // Local: the client's own address arrives
    node_port(&mut node, true);
    let answers: Vec<String> = node.from_outside(|| (0..10).map(|_| ask_at(&format!("{NODE}:30080"), "peer").unwrap()).collect());
    assert!(answers.iter().all(|a| a.ends_with(&format!(" {OUTSIDE}"))), "{answers:?}");
    // the ClusterIP is not a way in from outside (no route, and not translated there)
    let from_outside = node.from_outside(|| ask_at(&format!("{VIP}:80"), "who").is_err());
    assert!(from_outside);
    // and pods still reach the same service by its ClusterIP and by the NodePort
    node.pod(1);
    let inside: Vec<String> = node.in_pod(1, || vec![ask_tcp(80).unwrap(), ask_at(&format!("{NODE}:30080"), "who").unwrap()]);
    assert!(inside.iter().all(|a| a == "b2" || a == "b3"), "{inside:?}");
}

/// TCP connects to a ClusterIP from a process in the pods' cgroup go straight to a backend
/// (socket-level translation): no conntrack entry, getpeername() still says the service,
/// a pod reaches itself, and a backend taken out gets no new connection.
#[test]
fn socket_level_translation_connects_pods_straight_to_backends() {
    let mut node = Node::new();
    node.pod(1);
    let backends: Vec<Ipv4Addr> = (2..=3).map(|i| node.pod(i)).collect();
    node.serve(2, "b2");
    node.serve(3, "b3");
    node.service("default/web:http", Proto::Tcp, 80, &[(backends[0], true), (backends[1], true)], 0);
    let root = shoal_dataplane::loader::cgroup2_root().expect("a cgroup v2 hierarchy");
    let cgroup = root.join(&node.prefix);
    assert!(node.dp.as_mut().unwrap().attach_cgroup(&cgroup).unwrap(), "the socket programs did not load");
    // a process in the cgroup, in pod `i`: n connections, each "<answer> <peer>"
    let run = |node: &Node, i: u8, n: u32| -> Vec<String> {
        let script = format!("import socket\nfor _ in range({n}):\n    s = socket.create_connection(('{VIP}', 80), timeout=3)\n    s.sendall(b'peer\\n')\n    print(s.recv(100).decode().split()[0], s.getpeername()[0])\n    s.close()\n");
        let cmd = format!("echo $$ > {}/cgroup.procs && exec ip netns exec {}-{i} python3 -c \"$0\"", cgroup.display(), node.prefix);
        let out = Command::new("sh").args(["-c", &cmd, &script]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
    };
    let before: std::collections::HashMap<&str, u64> = node.dp.as_ref().unwrap().stats().into_iter().collect();
    let answers = run(&node, 1, 30);
    assert_eq!(answers.len(), 30);
    assert!(answers.iter().all(|a| a.ends_with(&format!(" {VIP}"))), "getpeername gives the service: {answers:?}");
    let t = tally(answers.iter().map(|a| a.split(' ').next().unwrap().to_string()).collect());
    assert!(t.len() == 2 && t.values().all(|n| *n >= 5), "{t:?}");
    let after: std::collections::HashMap<&str, u64> = node.dp.as_ref().unwrap().stats().into_iter().collect();
    assert_eq!(after["sock_translated"] - before["sock_translated"], 30, "{after:?}");
    assert_eq!(after["ct_created"], before["ct_created"], "no conntrack entry for a connection made at connect(): {after:?}");
    // UDP too: a connected socket and sendto() on an unconnected one, each answer seen
    // as coming from the service (resolvers check that), no conntrack entry
    node.service("default/web:dns", Proto::Udp, 53, &[(backends[0], true), (backends[1], true)], 0);
    let before_udp: std::collections::HashMap<&str, u64> = node.dp.as_ref().unwrap().stats().into_iter().collect();
    let udp = format!("import socket\nfor _ in range(10):\n    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    c.settimeout(3)\n    c.connect(('{VIP}', 53))\n    c.send(b'who')\n    d, a = c.recvfrom(100)\n    print('connected', d.decode(), a[0], a[1], c.getpeername()[0])\n    c.close()\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nu.settimeout(3)\nfor _ in range(10):\n    u.sendto(b'who', ('{VIP}', 53))\n    d, a = u.recvfrom(100)\n    print('unconnected', d.decode(), a[0], a[1])\n");
    let cmd = format!("echo $$ > {}/cgroup.procs && exec ip netns exec {}-1 python3 -c \"$0\"", cgroup.display(), node.prefix);
    let out = Command::new("sh").args(["-c", &cmd, &udp]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 20, "{lines:?}");
    for l in &lines {
        let f: Vec<&str> = l.split(' ').collect();
        assert!(f[1] == "b2" || f[1] == "b3", "{l}");
        assert_eq!((f[2], f[3]), (VIP, "53"), "the answer comes from the service: {l}");
        if f[0] == "connected" {
            assert_eq!(f[4], VIP, "{l}");
        }
    }
    // an unconnected socket keeps its backend for the service (as conntrack keeps a flow)
    let unconnected: std::collections::BTreeSet<&str> = lines.iter().filter(|l| l.starts_with("unconnected")).map(|l| l.split(' ').nth(1).unwrap()).collect();
    assert_eq!(unconnected.len(), 1, "{lines:?}");
    let after_udp: std::collections::HashMap<&str, u64> = node.dp.as_ref().unwrap().stats().into_iter().collect();
    assert!(after_udp["sock_translated"] - before_udp["sock_translated"] >= 20, "{after_udp:?}");
    assert_eq!(after_udp["ct_created"], before_udp["ct_created"], "{after_udp:?}");
    // a backend reaches its own service (directly to itself)
    assert_eq!(run(&node, 2, 10).len(), 10);
    // b3 out: new connections go to b2 only
    node.service("default/web:http", Proto::Tcp, 80, &[(backends[0], true)], 0);
    assert!(run(&node, 1, 10).iter().all(|a| a.starts_with("b2 ")));
    // a connection held open to b2, then b2 goes (b3 back): the node closes the socket
    node.service("default/web:http", Proto::Tcp, 80, &[(backends[0], true)], 0);
    let _ = node.dp.as_mut().unwrap().take_gone_backends();
    let script = format!("import socket, sys\ns = socket.create_connection(('{VIP}', 80), timeout=5)\ns.sendall(b'peer\\n')\nprint(s.recv(100).decode().split()[0], flush=True)\nsys.stdin.readline()\ntry:\n    s.sendall(b'peer\\n')\n    print('answer', s.recv(100).decode().strip(), flush=True)\nexcept OSError as e:\n    print(type(e).__name__, flush=True)\n");
    let cmd = format!("echo $$ > {}/cgroup.procs && exec ip netns exec {}-1 python3 -c \"$0\"", cgroup.display(), node.prefix);
    let mut held = Command::new("sh").args(["-c", &cmd, &script]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(held.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "b2");
    node.service("default/web:http", Proto::Tcp, 80, &[(backends[1], true)], 0);
    let dp = node.dp.as_mut().unwrap();
    let gone = dp.take_gone_backends();
    assert_eq!(gone, vec![(backends[0], 8080)]);
    let netns: Vec<PathBuf> = (1..=3).map(|i| PathBuf::from(format!("/run/netns/{}-{i}", node.prefix))).collect();
    assert_eq!(dp.close_sockets_to(&gone, &netns).unwrap(), 1, "the held connection, and only it");
    held.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let outcome = lines.next().unwrap().unwrap();
    assert!(outcome.contains("ConnectionAborted") || outcome.contains("ConnectionReset") || outcome.contains("BrokenPipe"), "the socket to the removed backend was closed: {outcome}");
    let _ = held.wait();
    node.service("default/web:http", Proto::Tcp, 80, &[(backends[0], true)], 0);
    // detached (the pins go): tc translates again, conntrack and all
    shoal_dataplane::loader::detach_cgroup_links(&node.pin_dir).unwrap();
    assert!(run(&node, 1, 3).iter().all(|a| a == &format!("b2 {VIP}")));
    let last: std::collections::HashMap<&str, u64> = node.dp.as_ref().unwrap().stats().into_iter().collect();
    assert!(last["sock_translated"] >= after["sock_translated"] + 21 + 20, "{last:?}");
    assert!(last["ct_created"] >= after["ct_created"] + 3);
    let _ = std::fs::remove_dir(&cgroup);
}

/// A NodePort whose backend is on another node: XDP on the uplink turns the client's
/// packets around towards that node (source translated to this node) and the replies back
/// to the client, without the stack.
#[test]
fn xdp_turns_node_port_traffic_for_another_node_around_on_the_uplink() {
    let mut node = Node::new();
    node.lan();
    node.serve(9, "n2");
    let want = ServicePort {
        proto: Proto::Tcp,
        frontends: vec![Frontend { addr: NODE.parse().unwrap(), port: 30080, flags: shoal_dataplane::abi::SVC_F_NODEPORT }],
        endpoints: vec![Endpoint { addr: NODE2.parse().unwrap(), port: 8080, ready: true, serving: true, terminating: false }],
        affinity_timeout: 0,
        external_local: false,
        maglev: false,
    };
    let dp = node.dp.as_mut().unwrap();
    node.table.sync("default/np:80/TCP", Some(&want), &mut dp.maps()).unwrap();
    let before: std::collections::HashMap<&str, u64> = node.dp.as_ref().unwrap().stats().into_iter().collect();
    let answers: Vec<String> = node.from_outside(|| (0..20).map(|_| ask_at(&format!("{NODE}:30080"), "peer").unwrap()).collect());
    assert!(answers.iter().all(|a| a == &format!("n2 {NODE}")), "the other node answers, seeing this node's address: {answers:?}");
    let after: std::collections::HashMap<&str, u64> = node.dp.as_ref().unwrap().stats().into_iter().collect();
    // each connection: SYN, ACK, data, FIN... both ways
    assert!(after["xdp_tx"] - before["xdp_tx"] >= 20 * 4, "{after:?}");
    assert!(after["translated"] - before["translated"] < 20, "tc did not carry these flows: {after:?}");
}

/// A pod's packets with a source address other than its own are dropped where they leave
/// it (network policy finds a pod by its address: no pod may pass for another).
#[test]
fn a_pod_cannot_send_with_another_source_address() {
    let mut node = Node::new();
    node.pod(1);
    let b2 = node.pod(2);
    node.serve(2, "b2");
    let ns = format!("{}-1", node.prefix);
    sh(&["ip", "-n", &ns, "addr", "add", "10.0.1.77/24", "dev", "eth0"]);
    let (own, forged) = node.in_pod(1, move || {
        let own = ask_at(&format!("{b2}:8080"), "who").ok();
        // bound to the extra address: the SYN leaves with it
        let s = socket2_connect("10.0.1.77", &format!("{b2}:8080"));
        (own, s)
    });
    assert_eq!(own.as_deref(), Some("b2"));
    assert!(forged.is_err(), "a connection from a forged source went through: {forged:?}");
    let stats: std::collections::HashMap<&str, u64> = node.dp.as_ref().unwrap().stats().into_iter().collect();
    assert!(stats["spoofed"] >= 1, "{stats:?}");
}

/// A TCP connection from `local` (bound first) to `to`, 1 s at most.
fn socket2_connect(local: &str, to: &str) -> std::io::Result<()> {
    let local: std::net::SocketAddrV4 = format!("{local}:0").parse().unwrap();
    let to: std::net::SocketAddrV4 = to.parse().unwrap();
    // SAFETY: plain socket calls on a socket this function owns and closes
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        let sa = |a: std::net::SocketAddrV4| libc::sockaddr_in { sin_family: libc::AF_INET as u16, sin_port: a.port().to_be(), sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) }, sin_zero: [0; 8] };
        let (l, t) = (sa(local), sa(to));
        let len = size_of::<libc::sockaddr_in>() as u32;
        if libc::bind(fd, &l as *const _ as *const libc::sockaddr, len) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        libc::connect(fd, &t as *const _ as *const libc::sockaddr, len);
        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        let n = libc::poll(&mut pfd, 1, 1000);
        let mut err: i32 = 0;
        let mut elen = size_of::<i32>() as u32;
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, &mut err as *mut _ as *mut libc::c_void, &mut elen);
        libc::close(fd);
        if n == 1 && err == 0 {
            Ok(())
        } else if n == 0 {
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))
        } else {
            Err(std::io::Error::from_raw_os_error(err))
        }
    }
}
