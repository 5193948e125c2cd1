//! The service programs on crafted packets (BPF_PROG_TEST_RUN): translation, reverse
//! translation, conntrack, rejection, hairpin, affinity, backend removal; and the shared
//! structs' layout against the object's BTF. Needs root (CI runs as root).
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use shoal_dataplane::abi::{self, Proto, CT_FORWARD, CT_REVERSE};
use shoal_dataplane::{Config, Dataplane, Endpoint, Frontend, ServicePort, Table};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const CLIENT_MAC: [u8; 6] = [0x0a, 0x58, 10, 0, 0, 2];
const GW_MAC: [u8; 6] = [0x0a, 0x58, 10, 0, 0, 1];
const TCP: u8 = 6;
const UDP: u8 = 17;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const RST: u8 = 0x04;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A Dataplane whose maps are pinned in a directory of this test's own.
struct Loaded {
    dp: Option<Dataplane>,
    table: Table,
    pin_dir: PathBuf,
}

impl Loaded {
    fn new() -> Loaded {
        static N: AtomicU32 = AtomicU32::new(0);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/shoal-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        let dp = Dataplane::load(&Config { pin_dir: pin_dir.clone(), ..Config::default() }).expect("load (needs root)");
        Loaded { dp: Some(dp), table: Table::new(), pin_dir }
    }
    fn dp(&mut self) -> &mut Dataplane {
        self.dp.as_mut().unwrap()
    }
    fn service(&mut self, name: &str, vip: &str, port: u16, proto: Proto, backends: &[(&str, u16)], affinity: u32) {
        self.service_by(name, vip, port, proto, backends, affinity, false);
    }

    #[allow(clippy::too_many_arguments)]
    fn service_by(&mut self, name: &str, vip: &str, port: u16, proto: Proto, backends: &[(&str, u16)], affinity: u32, maglev: bool) {
        let want = ServicePort {
            proto,
            frontends: vec![Frontend { addr: ip(vip), port, flags: 0 }],
            endpoints: backends.iter().map(|(a, p)| Endpoint { addr: ip(a), port: *p, ready: true, serving: true, terminating: false }).collect(),
            affinity_timeout: affinity,
            external_local: false,
            maglev,
        };
        let dp = self.dp.as_mut().unwrap();
        self.table.sync(name, Some(&want), &mut dp.maps()).unwrap();
    }
    fn run(&mut self, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        self.dp().test_run(prog, pkt).expect("BPF_PROG_TEST_RUN")
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            let _ = dp.unpin();
        }
    }
}

fn checksum(data: &[u8], init: u32) -> u16 {
    let mut sum = init;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from_be_bytes([chunk[0], 0]) };
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for w in [u16::from_be_bytes([src[0], src[1]]), u16::from_be_bytes([src[2], src[3]]), u16::from_be_bytes([dst[0], dst[1]]), u16::from_be_bytes([dst[2], dst[3]]), proto as u16, len as u16] {
        sum += w as u32;
    }
    sum
}

/// An Ethernet + IPv4 + TCP/UDP packet with correct checksums.
fn packet(proto: u8, src: (&str, u16), dst: (&str, u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    let (s, d) = (ip(src.0).octets(), ip(dst.0).octets());
    let l4_len = if proto == TCP { 20 } else { 8 } + payload.len();
    let mut p = Vec::new();
    p.extend_from_slice(&GW_MAC);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4_len) as u16;
    p.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&s);
    p.extend_from_slice(&d);
    let c = checksum(&p[14..34], 0);
    p[24..26].copy_from_slice(&c.to_be_bytes());
    let l4 = p.len();
    p.extend_from_slice(&src.1.to_be_bytes());
    p.extend_from_slice(&dst.1.to_be_bytes());
    if proto == TCP {
        p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
    }
    p.extend_from_slice(payload);
    let c = checksum(&p[l4..], pseudo(s, d, proto, l4_len));
    let at = if proto == TCP { l4 + 16 } else { l4 + 6 };
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    p
}

/// The packet's addresses and ports, after checking both checksums.
fn tuple(p: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    assert_eq!(checksum(&p[14..34], 0), 0, "IP checksum");
    let (s, d) = (<[u8; 4]>::try_from(&p[26..30]).unwrap(), <[u8; 4]>::try_from(&p[30..34]).unwrap());
    let l4_len = u16::from_be_bytes([p[16], p[17]]) as usize - 20;
    assert_eq!(checksum(&p[34..34 + l4_len], pseudo(s, d, p[23], l4_len)), 0, "L4 checksum");
    let port = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
    ((Ipv4Addr::from(s), port(34)), (Ipv4Addr::from(d), port(36)))
}

#[test]
fn pinned_maps_match_the_layouts_the_loader_checks() {
    let l = Loaded::new();
    assert!(l.pin_dir.join("shoal_stats").exists());
    assert_eq!(shoal_dataplane::loader::stale_pins(&l.pin_dir), Vec::<&str>::new());
}

#[test]
fn abi_matches_the_programs_btf() {
    use object::{Object, ObjectSection};
    // both objects: each keeps only the types it uses
    let mut structs = HashMap::new();
    for o in [shoal_dataplane::loader::TC_SERVICE, shoal_dataplane::loader::SOCK_LB] {
        let obj = object::File::parse(o).unwrap();
        let btf = obj.section_by_name(".BTF").expect(".BTF section").data().unwrap();
        structs.extend(btf_structs(btf));
    }
    for (name, size, members) in abi::layouts() {
        let (c_size, c_members) = structs.get(name).unwrap_or_else(|| panic!("struct {name} not in the BTF"));
        assert_eq!(*c_size, size, "size of struct {name}");
        let c: Vec<(&str, usize)> = c_members.iter().map(|(n, o)| (n.as_str(), *o)).collect();
        assert_eq!(c, members, "members of struct {name}");
    }
}

/// Struct name -> (size, [(member, byte offset)]) from a raw BTF section.
fn btf_structs(btf: &[u8]) -> HashMap<String, (usize, Vec<(String, usize)>)> {
    let u32_at = |at: usize| u32::from_le_bytes(btf[at..at + 4].try_into().unwrap());
    assert_eq!(u16::from_le_bytes([btf[0], btf[1]]), 0xeb9f, "BTF magic");
    let hdr_len = u32_at(4) as usize;
    let (type_off, type_len, str_off) = (u32_at(8) as usize, u32_at(12) as usize, u32_at(16) as usize);
    let strings = &btf[hdr_len + str_off..];
    let name = |off: u32| {
        let s = &strings[off as usize..];
        String::from_utf8_lossy(&s[..s.iter().position(|b| *b == 0).unwrap()]).into_owned()
    };
    let mut out = HashMap::new();
    let (mut at, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
    while at < end {
        let (name_off, info, size) = (u32_at(at), u32_at(at + 4), u32_at(at + 8));
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,
            3 => 12,
            4 | 5 | 15 | 19 => vlen * 12,
            6 | 13 => vlen * 8,
            _ => 0,
        };
        if kind == 4 {
            let members = (0..vlen).map(|i| (name(u32_at(at + i * 12)), (u32_at(at + i * 12 + 8) & 0xff_ffff) as usize / 8)).collect();
            out.insert(name(name_off), (size as usize, members));
        }
        at += extra;
    }
    out
}

#[test]
fn a_flow_to_a_service_gets_a_backend_keeps_it_and_replies_come_from_the_service() {
    let mut l = Loaded::new();
    l.service("default/web:http", "10.96.0.10", 80, Proto::Tcp, &[("10.0.1.2", 8080), ("10.0.1.3", 8080)], 0);
    let syn = packet(TCP, ("10.0.0.2", 40000), ("10.96.0.10", 80), SYN, &[]);
    let (rc, out) = l.run("from_pod", &syn);
    assert_eq!(rc, TC_ACT_OK);
    let (src, backend) = tuple(&out);
    assert_eq!(src, (ip("10.0.0.2"), 40000));
    assert!([(ip("10.0.1.2"), 8080), (ip("10.0.1.3"), 8080)].contains(&backend), "{backend:?}");
    assert_eq!(&out[..12], &syn[..12], "Ethernet untouched: the node routes it");
    // the rest of the flow follows the entry
    for _ in 0..20 {
        let (_, out) = l.run("from_pod", &packet(TCP, ("10.0.0.2", 40000), ("10.96.0.10", 80), ACK, b"GET / HTTP/1.1\r\n\r\n"));
        assert_eq!(tuple(&out).1, backend);
    }
    // the backend's reply is rewritten on its way into the client pod
    let reply = packet(TCP, (&backend.0.to_string(), 8080), ("10.0.0.2", 40000), SYN | ACK, b"");
    let (rc, out) = l.run("to_pod", &reply);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(tuple(&out), ((ip("10.96.0.10"), 80), (ip("10.0.0.2"), 40000)));
    // traffic of no service passes untouched, both ways
    let other = packet(TCP, ("10.0.0.2", 40001), ("10.0.1.2", 8080), SYN, &[]);
    assert_eq!(l.run("from_pod", &other), (TC_ACT_OK, other.clone()));
    assert_eq!(l.run("to_pod", &other), (TC_ACT_OK, other));
    let ct = l.dp().conntrack();
    assert_eq!(ct.len(), 2, "{ct:?}");
    assert!(ct.iter().any(|(k, _)| k.dir == CT_FORWARD) && ct.iter().any(|(k, _)| k.dir == CT_REVERSE));
    let stats: HashMap<_, _> = l.dp().stats().into_iter().collect();
    assert_eq!((stats["ct_created"], stats["translated"], stats["reversed"]), (1, 21, 1));
}

#[test]
fn udp_is_translated_both_ways() {
    let mut l = Loaded::new();
    l.service("kube-system/dns:dns", "10.96.0.53", 53, Proto::Udp, &[("10.0.2.2", 5353)], 0);
    let (rc, out) = l.run("from_pod", &packet(UDP, ("10.0.0.2", 33000), ("10.96.0.53", 53), 0, b"query"));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(tuple(&out), ((ip("10.0.0.2"), 33000), (ip("10.0.2.2"), 5353)));
    let (_, out) = l.run("to_pod", &packet(UDP, ("10.0.2.2", 5353), ("10.0.0.2", 33000), 0, b"answer"));
    assert_eq!(tuple(&out), ((ip("10.96.0.53"), 53), (ip("10.0.0.2"), 33000)));
    // the same address and port over TCP is not the UDP service
    let tcp = packet(TCP, ("10.0.0.2", 33000), ("10.96.0.53", 53), SYN, &[]);
    assert_eq!(l.run("from_pod", &tcp), (TC_ACT_OK, tcp));
}

#[test]
fn a_service_without_endpoints_answers_port_unreachable() {
    let mut l = Loaded::new();
    l.service("default/empty:http", "10.96.0.99", 80, Proto::Tcp, &[], 0);
    let syn = packet(TCP, ("10.0.0.2", 40000), ("10.96.0.99", 80), SYN, &[0; 20]);
    let (rc, out) = l.run("from_pod", &syn);
    assert_eq!(rc, TC_ACT_REDIRECT, "sent back into the pod");
    assert_eq!(out.len(), 14 + 20 + 8 + 28);
    assert_eq!((&out[..6], &out[6..12]), (&CLIENT_MAC[..], &GW_MAC[..]));
    assert_eq!(checksum(&out[14..34], 0), 0, "IP checksum");
    assert_eq!((out[23], &out[26..30], &out[30..34]), (1, &[10, 96, 0, 99][..], &[10, 0, 0, 2][..]));
    assert_eq!((out[34], out[35]), (3, 3), "ICMP destination/port unreachable");
    assert_eq!(checksum(&out[34..], 0), 0, "ICMP checksum");
    assert_eq!(&out[42..70], &syn[14..42], "the offending header and ports");
    let stats: HashMap<_, _> = l.dp().stats().into_iter().collect();
    assert_eq!(stats["rejected"], 1);
    assert!(l.dp().conntrack().is_empty());
}

#[test]
fn a_pod_reaches_itself_through_its_service() {
    let mut l = Loaded::new();
    l.service("default/self:http", "10.96.0.20", 80, Proto::Tcp, &[("10.0.3.2", 8080)], 0);
    let (rc, out) = l.run("from_pod", &packet(TCP, ("10.0.3.2", 41000), ("10.96.0.20", 80), SYN, &[]));
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(tuple(&out), ((ip("169.254.42.1"), 41000), (ip("10.0.3.2"), 8080)));
    assert_eq!(&out[..6], &CLIENT_MAC, "bounced back into the pod");
    // the pod answers the hairpin address; that comes back as the service
    let (rc, out) = l.run("from_pod", &packet(TCP, ("10.0.3.2", 8080), ("169.254.42.1", 41000), SYN | ACK, &[]));
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(tuple(&out), ((ip("10.96.0.20"), 80), (ip("10.0.3.2"), 41000)));
}

#[test]
fn new_flows_spread_and_a_removed_backend_gets_no_packet() {
    let mut l = Loaded::new();
    let all = [("10.0.1.2", 8080), ("10.0.1.3", 8080), ("10.0.1.4", 8080)];
    l.service("default/web:http", "10.96.0.10", 80, Proto::Tcp, &all, 0);
    let mut per: HashMap<Ipv4Addr, u32> = HashMap::new();
    let mut flows = Vec::new();
    for port in 20000..20300u16 {
        let (_, out) = l.run("from_pod", &packet(TCP, ("10.0.0.2", port), ("10.96.0.10", 80), SYN, &[]));
        let backend = tuple(&out).1 .0;
        *per.entry(backend).or_default() += 1;
        flows.push((port, backend));
    }
    assert_eq!(per.len(), 3, "{per:?}");
    assert!(per.values().all(|n| *n >= 60), "300 flows over 3 backends: {per:?}");
    // a backend is added: every flow keeps its backend
    l.service("default/web:http", "10.96.0.10", 80, Proto::Tcp, &[all[0], all[1], all[2], ("10.0.1.5", 8080)], 0);
    for (port, backend) in &flows {
        let (_, out) = l.run("from_pod", &packet(TCP, ("10.0.0.2", *port), ("10.96.0.10", 80), ACK, &[]));
        assert_eq!(tuple(&out).1 .0, *backend);
    }
    // one is removed: its flows choose again among the others, the rest stay
    l.service("default/web:http", "10.96.0.10", 80, Proto::Tcp, &[all[0], all[2], ("10.0.1.5", 8080)], 0);
    for (port, backend) in &flows {
        let (_, out) = l.run("from_pod", &packet(TCP, ("10.0.0.2", *port), ("10.96.0.10", 80), ACK, &[]));
        let now = tuple(&out).1 .0;
        assert_ne!(now, ip("10.0.1.3"), "a packet went to the removed backend");
        if *backend != ip("10.0.1.3") {
            assert_eq!(now, *backend);
        }
    }
}

#[test]
fn client_ip_affinity_keeps_one_backend_per_client() {
    let mut l = Loaded::new();
    let all = [("10.0.1.2", 8080), ("10.0.1.3", 8080), ("10.0.1.4", 8080)];
    l.service("default/sticky:http", "10.96.0.30", 80, Proto::Tcp, &all, 10800);
    for client in ["10.0.0.2", "10.0.0.3"] {
        let first = tuple(&l.run("from_pod", &packet(TCP, (client, 30000), ("10.96.0.30", 80), SYN, &[])).1).1;
        for port in 30001..30050u16 {
            let (_, out) = l.run("from_pod", &packet(TCP, (client, port), ("10.96.0.30", 80), SYN, &[]));
            assert_eq!(tuple(&out).1, first, "client {client} port {port}");
        }
    }
}

#[test]
fn a_reset_closes_the_flow_and_a_new_syn_on_its_port_chooses_again() {
    let mut l = Loaded::new();
    l.service("default/web:http", "10.96.0.10", 80, Proto::Tcp, &[("10.0.1.2", 8080)], 0);
    let (_, out) = l.run("from_pod", &packet(TCP, ("10.0.0.2", 40000), ("10.96.0.10", 80), SYN, &[]));
    assert_eq!(tuple(&out).1, (ip("10.0.1.2"), 8080));
    let (_, out) = l.run("to_pod", &packet(TCP, ("10.0.1.2", 8080), ("10.0.0.2", 40000), RST | ACK, &[]));
    assert_eq!(tuple(&out).0, (ip("10.96.0.10"), 80));
    let closing = l.dp().conntrack().into_iter().filter(|(_, e)| e.flags & abi::CT_F_CLOSING != 0).count();
    assert_eq!(closing, 2, "both entries of the flow are closing");
    // a new SYN from the same port is a new flow, not the closed one
    let (_, out) = l.run("from_pod", &packet(TCP, ("10.0.0.2", 40000), ("10.96.0.10", 80), SYN, &[]));
    assert_eq!(tuple(&out).1, (ip("10.0.1.2"), 8080));
    let ct = l.dp().conntrack();
    let fwd = ct.iter().find(|(k, _)| k.dir == CT_FORWARD).unwrap().1;
    assert_eq!(fwd.flags & abi::CT_F_CLOSING, 0, "{fwd:?}");
    let stats: HashMap<_, _> = l.dp().stats().into_iter().collect();
    assert_eq!(stats["ct_created"], 2);
}

#[test]
fn packets_the_programs_do_not_handle_pass_untouched() {
    let mut l = Loaded::new();
    l.service("default/web:http", "10.96.0.10", 80, Proto::Tcp, &[("10.0.1.2", 8080)], 0);
    // a later fragment, and a header with options
    let mut frag = packet(UDP, ("10.0.0.2", 1), ("10.96.0.10", 80), 0, &[0; 16]);
    frag[20] = 0x00;
    frag[21] = 0x10;
    assert_eq!(l.run("from_pod", &frag), (TC_ACT_OK, frag.clone()));
    let mut opts = packet(TCP, ("10.0.0.2", 40000), ("10.96.0.10", 80), SYN, &[]);
    opts[14] = 0x46;
    assert_eq!(l.run("from_pod", &opts), (TC_ACT_OK, opts.clone()));
    // not IPv4 at all (ARP), and a truncated packet
    let mut arp = vec![0xff; 12];
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    assert_eq!(l.run("from_pod", &arp), (TC_ACT_OK, arp.clone()));
    let short = packet(TCP, ("10.0.0.2", 40000), ("10.96.0.10", 80), SYN, &[])[..40].to_vec();
    assert_eq!(l.run("from_pod", &short).0, TC_ACT_OK);
}

#[test]
fn maglev_sends_a_flow_to_the_same_backend_on_every_node() {
    let backends = [("10.0.1.2", 8080), ("10.0.1.3", 8080), ("10.0.1.4", 8080), ("10.0.1.5", 8080)];
    // two nodes: the second learned of the backends in another order (other ids)
    let mut a = Loaded::new();
    a.service("default/other:http", "10.96.0.99", 80, Proto::Tcp, &[("10.0.9.9", 1)], 0);
    a.service_by("default/web:http", "10.96.0.10", 80, Proto::Tcp, &backends, 0, true);
    let mut b = Loaded::new();
    let mut reversed = backends;
    reversed.reverse();
    b.service_by("default/web:http", "10.96.0.10", 80, Proto::Tcp, &reversed, 0, true);
    let mut per: HashMap<Ipv4Addr, u32> = HashMap::new();
    for port in 40000..40400u16 {
        let syn = packet(TCP, ("10.0.0.2", port), ("10.96.0.10", 80), SYN, &[]);
        let on_a = tuple(&a.run("from_pod", &syn).1).1;
        let on_b = tuple(&b.run("from_pod", &syn).1).1;
        assert_eq!(on_a, on_b, "flow from port {port}");
        *per.entry(on_a.0).or_default() += 1;
    }
    assert_eq!(per.len(), 4, "{per:?}");
    assert!(per.values().all(|n| *n >= 60), "400 flows over 4 backends: {per:?}");
}

#[test]
fn affinity_does_not_hold_a_client_on_a_backend_that_stopped_being_ready() {
    let mut l = Loaded::new();
    let all = [("10.0.1.2", 8080), ("10.0.1.3", 8080)];
    l.service("default/sticky:http", "10.96.0.30", 80, Proto::Tcp, &all, 10800);
    let first = tuple(&l.run("from_pod", &packet(TCP, ("10.0.0.2", 30000), ("10.96.0.30", 80), SYN, &[])).1).1;
    // that endpoint stops being ready: it keeps its backend entry (its flows go on) but
    // takes no new flow, affinity or not
    let want = ServicePort {
        proto: Proto::Tcp,
        frontends: vec![Frontend { addr: ip("10.96.0.30"), port: 80, flags: 0 }],
        endpoints: all.iter().map(|(a, p)| Endpoint { addr: ip(a), port: *p, ready: ip(a) != first.0, serving: ip(a) != first.0, terminating: false }).collect(),
        affinity_timeout: 10800,
        external_local: false,
        maglev: false,
    };
    let dp = l.dp.as_mut().unwrap();
    l.table.sync("default/sticky:http", Some(&want), &mut dp.maps()).unwrap();
    for port in 30001..30020u16 {
        let (_, out) = l.run("from_pod", &packet(TCP, ("10.0.0.2", port), ("10.96.0.30", 80), SYN, &[]));
        assert_ne!(tuple(&out).1, first, "port {port}");
    }
    // the established flow itself still reaches it
    let (_, out) = l.run("from_pod", &packet(TCP, ("10.0.0.2", 30000), ("10.96.0.30", 80), ACK, &[]));
    assert_eq!(tuple(&out).1, first);
}

/// Network policy in the programs: the maps as `Policies::sync` writes them for a web pod
/// (10.0.1.2, on this node) that admits only `role=client` pods on TCP 8080 and sends only
/// to 10.0.0.0/8 except 10.0.3.0/24, UDP 53.
#[test]
fn policy_judges_new_flows_and_lets_their_replies_through() {
    use serde_json::json;
    use shoal_dataplane::policy::Policies;
    let mut l = Loaded::new();
    let mut p = Policies::new("n1");
    p.set_host([ip("10.0.1.1")]);
    let pod = |name: &str, node: &str, ipa: &str, labels: serde_json::Value| json!({"metadata": {"name": name, "namespace": "default", "labels": labels}, "spec": {"nodeName": node}, "status": {"podIP": ipa}});
    p.hold("Namespace", "", "default", Some(&json!({"metadata": {"name": "default"}})));
    p.hold("Pod", "default", "web", Some(&pod("web", "n1", "10.0.1.2", json!({"app": "web"}))));
    p.hold("Pod", "default", "client", Some(&pod("client", "n2", "10.0.2.2", json!({"role": "client"}))));
    p.hold("Pod", "default", "other", Some(&pod("other", "n2", "10.0.2.3", json!({"role": "other"}))));
    p.hold("NetworkPolicy", "default", "web", Some(&json!({"spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"protocol": "TCP", "port": 8080}]}],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.3.0/24"]}}], "ports": [{"protocol": "UDP", "port": 53}]}]}})));
    let s = p.sync(l.dp().policy_maps());
    assert!(s.errors.is_empty() && s.writes > 0, "{s:?}");
    let shot = 2;
    // ingress: the client's SYN enters, the other pod's does not, nor the client's on
    // another port; a segment without SYN is not judged; the node always enters
    assert_eq!(l.run("to_pod", &packet(TCP, ("10.0.2.2", 40000), ("10.0.1.2", 8080), SYN, b"")).0, TC_ACT_OK);
    assert_eq!(l.run("to_pod", &packet(TCP, ("10.0.2.3", 40000), ("10.0.1.2", 8080), SYN, b"")).0, shot);
    assert_eq!(l.run("to_pod", &packet(TCP, ("10.0.2.2", 40000), ("10.0.1.2", 22), SYN, b"")).0, shot);
    assert_eq!(l.run("to_pod", &packet(TCP, ("10.0.2.3", 40000), ("10.0.1.2", 8080), ACK, b"")).0, TC_ACT_OK);
    assert_eq!(l.run("to_pod", &packet(TCP, ("10.0.1.1", 40000), ("10.0.1.2", 9999), SYN, b"")).0, TC_ACT_OK);
    // the pod's reply (SYN+ACK) leaves although egress allows no TCP
    assert_eq!(l.run("from_pod", &packet(TCP, ("10.0.1.2", 8080), ("10.0.2.2", 40000), SYN | ACK, b"")).0, TC_ACT_OK);
    assert_eq!(l.run("from_pod", &packet(TCP, ("10.0.1.2", 41000), ("10.0.2.2", 80), SYN, b"")).0, shot);
    // egress UDP 53 inside the block; not into the except; the reply of an allowed
    // query enters (ingress is isolated and allows no UDP) by its conntrack entry
    assert_eq!(l.run("from_pod", &packet(UDP, ("10.0.1.2", 5353), ("10.0.2.9", 53), 0, b"q")).0, TC_ACT_OK);
    assert_eq!(l.run("from_pod", &packet(UDP, ("10.0.1.2", 5353), ("10.0.3.9", 53), 0, b"q")).0, shot);
    assert_eq!(l.run("to_pod", &packet(UDP, ("10.0.2.9", 53), ("10.0.1.2", 5353), 0, b"a")).0, TC_ACT_OK);
    assert_eq!(l.run("to_pod", &packet(UDP, ("10.0.2.9", 54), ("10.0.1.2", 5353), 0, b"a")).0, shot);
    // through a service: judged against the backend it reaches
    l.service("dns", "10.96.0.10", 53, Proto::Udp, &[("10.0.3.7", 53)], 0);
    assert_eq!(l.run("from_pod", &packet(UDP, ("10.0.1.2", 6000), ("10.96.0.10", 53), 0, b"q")).0, shot);
    l.service("dns", "10.96.0.10", 53, Proto::Udp, &[("10.0.2.7", 53)], 0);
    assert_eq!(l.run("from_pod", &packet(UDP, ("10.0.1.2", 6001), ("10.96.0.10", 53), 0, b"q")).0, TC_ACT_OK);
    // ICMP errors (fragmentation needed) reach the isolated pod; an echo request does not
    let icmp = |ty: u8| {
        let mut p = packet(UDP, ("10.0.2.3", 1), ("10.0.1.2", 2), 0, &[0; 20]);
        p[23] = 1; // protocol ICMP
        p[34] = ty;
        p[35] = if ty == 3 { 4 } else { 0 };
        p
    };
    assert_eq!(l.run("to_pod", &icmp(3)).0, TC_ACT_OK);
    assert_eq!(l.run("to_pod", &icmp(8)).0, shot);
    // a pod no policy selects is not judged
    assert_eq!(l.run("to_pod", &packet(TCP, ("10.0.2.3", 40000), ("10.0.1.9", 22), SYN, b"")).0, TC_ACT_OK);
    let stats: HashMap<&str, u64> = l.dp().stats().into_iter().collect();
    assert_eq!(stats["policy_denied"], 7, "{stats:?}");
    // the policy goes: everything enters
    p.hold("NetworkPolicy", "default", "web", None);
    p.sync(l.dp().policy_maps());
    assert_eq!(l.run("to_pod", &packet(TCP, ("10.0.2.3", 40000), ("10.0.1.2", 22), SYN, b"")).0, TC_ACT_OK);
}
