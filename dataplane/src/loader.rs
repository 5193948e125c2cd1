//! Loading the service programs with aya, pinning their maps, attaching them to pod
//! interfaces, and the maps' user-space side.
//!
//! Maps are pinned by name in one bpffs directory (`/sys/fs/bpf/shoal` by default), so a
//! restarted agent finds its services, backends and conntrack entries where it left them
//! and established flows go on. Programs are attached with tc's netlink interface at a fixed
//! priority and handle: the filters outlive the agent, and attaching again replaces them in
//! one step (cls_bpf swaps the program under the same handle), which is how an upgrade
//! swaps programs without a gap.
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle};
use aya::programs::links::{CgroupAttachMode, FdLink};
use aya::programs::{CgroupSockAddr, Link, SchedClassifier, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};

use crate::abi::{addr_of, be_addr, Backend, CtEntry, CtKey, EndpointValue, IpcacheValue, PolicyData, SvcKey, SvcValue, STATS};
use crate::policy::{self, Prefix};
use crate::table;

/// The tc program object built from `bpf/tc_service.bpf.c`.
pub static TC_SERVICE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tc_service.o"));

/// The socket-level programs built from `bpf/sock_lb.bpf.c`.
pub static SOCK_LB: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb.o"));
const SOCK_PROGRAMS: [&str; 5] = ["sock_connect4", "sock_sendmsg4", "sock_recvmsg4", "sock_getpeername4", "sock_release"];

/// tc filter priority and handle of Shoal's programs on every pod interface.
const TC_PRIORITY: u16 = 1;
const PROGRAMS: [&str; 4] = ["from_pod", "to_pod", "from_net", "to_net"];
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);
const XDP_PROGRAM: &str = "xdp_net";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// How the programs are loaded.
#[derive(Clone, Debug)]
pub struct Config {
    /// bpffs directory the maps are pinned in.
    pub pin_dir: PathBuf,
    /// Source address of hairpin flows (a pod reaching itself through a service); None
    /// leaves hairpin flows untranslated (they then fail, as with kube-proxy without
    /// hairpin mode).
    pub hairpin_addr: Option<Ipv4Addr>,
    /// The node's address: traffic from outside to a NodePort, ExternalIP or LoadBalancer
    /// frontend leaves for its backend from it (None: such traffic is not translated).
    pub node_addr: Option<Ipv4Addr>,
}

impl Default for Config {
    fn default() -> Self {
        Config { pin_dir: PathBuf::from("/sys/fs/bpf/shoal"), hairpin_addr: Some(Ipv4Addr::new(169, 254, 42, 1)), node_addr: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the BPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error("BPF map {0}: {1}")]
    Map(&'static str, MapError),
    #[error("BPF map {0} is full ({1} entries): raise its size or remove services")]
    Full(&'static str, u32),
    #[error("attaching the service programs to {0}: {1}")]
    Attach(String, String),
    #[error("bpffs at {0}: {1}")]
    BpfFs(PathBuf, io::Error),
}

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    /// The services, backends and conntrack maps (listings read them as `Pinned` does).
    maps: Pinned,
    stats: PerCpuArray<MapData, u64>,
    maglev: Array<MapData, u32>,
    /// The frontend filter (`shoal_frontends`) and what sets its bits.
    frontends: FrontendFilter,
    backend_addrs: BackendAddrs,
    policy: PolicyMaps,
    /// The socket-level programs, when they loaded (else tc translates everything).
    sock: Option<Ebpf>,
    /// Whether the uplink's XDP program loaded.
    xdp_loaded: bool,
    pin_dir: PathBuf,
}

/// `shoal_frontends`: a bit per hash of a frontend address (common.h), set while some
/// master entry has an address with that hash.
struct FrontendFilter {
    words: Array<MapData, u64>,
    masters: std::collections::HashSet<SvcKey>,
    counts: std::collections::HashMap<u32, u32>,
}

/// The filter bit of an address as stored in the maps (`filter_bit` in common.h).
pub fn filter_bit(be_addr: u32) -> u32 {
    be_addr.wrapping_mul(0x9e37_79b1) >> 16
}

impl FrontendFilter {
    /// Counts a master entry about to be written; sets its bit first (the programs then
    /// look it up).
    fn add(&mut self, key: &SvcKey) -> Result<(), MapError> {
        if !self.masters.insert(*key) {
            return Ok(());
        }
        let bit = filter_bit(key.addr);
        let n = self.counts.entry(bit).or_insert(0);
        *n += 1;
        if *n == 1 {
            let w = self.words.get(&(bit / 64), 0)?;
            self.words.set(bit / 64, w | (1u64 << (bit % 64)), 0)?;
        }
        Ok(())
    }
    /// Uncounts a deleted master entry; clears its bit when no other has it.
    fn remove(&mut self, key: &SvcKey) -> Result<(), MapError> {
        if !self.masters.remove(key) {
            return Ok(());
        }
        let bit = filter_bit(key.addr);
        let n = self.counts.entry(bit).or_insert(1);
        *n -= 1;
        if *n == 0 {
            self.counts.remove(&bit);
            let w = self.words.get(&(bit / 64), 0)?;
            self.words.set(bit / 64, w & !(1u64 << (bit % 64)), 0)?;
        }
        Ok(())
    }
}

/// Which backend addresses (address, port) the backend entries name, with counts: an
/// address whose last entry goes is gone (sockets connected to it at connect() are
/// closed, see `sockdiag`).
#[derive(Default)]
struct BackendAddrs {
    of: std::collections::HashMap<u32, (u32, u16)>,
    count: std::collections::HashMap<(u32, u16), u32>,
    gone: std::collections::HashSet<(u32, u16)>,
}

impl BackendAddrs {
    fn set(&mut self, id: u32, to: Option<(u32, u16)>) {
        let old = match to {
            Some(a) => self.of.insert(id, a),
            None => self.of.remove(&id),
        };
        if old == to {
            return;
        }
        if let Some(a) = to {
            *self.count.entry(a).or_insert(0) += 1;
            self.gone.remove(&a);
        }
        if let Some(a) = old {
            let n = self.count.entry(a).or_insert(1);
            *n -= 1;
            if *n == 0 {
                self.count.remove(&a);
                self.gone.insert(a);
            }
        }
    }
}

/// The network policy maps (bpf/lib/policy.h), written by `policy::Policies::sync`.
pub struct PolicyMaps {
    ipcache: LpmTrie<MapData, u32, IpcacheValue>,
    endpoints: BpfHashMap<MapData, u32, EndpointValue>,
    rules: LpmTrie<MapData, PolicyData, u32>,
}

/// BPF_F_NO_COMMON_LRU, set on the LRU maps.
const NO_COMMON_LRU: u32 = 1 << 1;
/// BPF_F_NO_PREALLOC, which LPM tries need.
const NO_PREALLOC: u32 = 1;

/// Every map of the programs with its key and value sizes, flags and size, to find pins
/// of an older layout.
const MAPS: &[(&str, usize, usize, u32, u32)] = &[
    ("shoal_services", size_of::<SvcKey>(), size_of::<SvcValue>(), 0, 262144),
    ("shoal_backends", size_of::<u32>(), size_of::<Backend>(), 0, 262144),
    ("shoal_ct", size_of::<CtKey>(), size_of::<CtEntry>(), NO_COMMON_LRU, 524288),
    ("shoal_affinity", size_of::<crate::abi::AffinityKey>(), size_of::<crate::abi::AffinityValue>(), NO_COMMON_LRU, 65536),
    ("shoal_stats", size_of::<u32>(), size_of::<u64>(), 0, STATS.len() as u32),
    ("shoal_maglev", size_of::<u32>(), size_of::<u32>(), 0, crate::abi::MAGLEV_M * crate::abi::MAGLEV_TABLES),
    ("shoal_ipcache", size_of::<LpmKey<u32>>(), size_of::<IpcacheValue>(), NO_PREALLOC, 262144),
    ("shoal_endpoints", size_of::<u32>(), size_of::<EndpointValue>(), 0, 4096),
    ("shoal_policy", size_of::<LpmKey<PolicyData>>(), size_of::<u32>(), NO_PREALLOC, 262144),
    ("shoal_frontends", size_of::<u32>(), size_of::<u64>(), 0, 1024),
    ("shoal_natted", size_of::<u32>(), size_of::<u64>(), 0, 1024),
    ("shoal_sock_lb", size_of::<u64>(), size_of::<crate::abi::SockLb>(), 0, 262144),
    ("shoal_ifaddrs", size_of::<u32>(), size_of::<u32>(), 0, 4096),
];

impl Dataplane {
    /// Loads the programs, reusing maps pinned under `config.pin_dir` by an earlier run when
    /// their layout matches (a pin of another layout is replaced, with a warning).
    pub fn load(config: &Config) -> Result<Dataplane, Error> {
        ensure_bpffs(&config.pin_dir)?;
        for name in stale_pins(&config.pin_dir) {
            let pin = config.pin_dir.join(name);
            tracing::warn!(map = name, pin = %pin.display(), "pinned map has another layout (an older Shoal?); replacing it, its flows are lost");
            std::fs::remove_file(&pin).map_err(|e| Error::BpfFs(pin.clone(), e))?;
        }
        let hairpin = config.hairpin_addr.map(be_addr).unwrap_or(0);
        let node = config.node_addr.map(be_addr).unwrap_or(0);
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&config.pin_dir).override_global("HAIRPIN_ADDR", &hairpin, true).override_global("NODE_ADDR", &node, true).load(TC_SERVICE)?;
        for name in PROGRAMS {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).expect("program in object").try_into().map_err(|e| Error::Program(name, e))?;
            prog.load().map_err(|e| Error::Program(name, e))?;
        }
        // XDP on the uplink is a fast path beside from_net: without it tc does the work
        let xdp_loaded = match ebpf.program_mut(XDP_PROGRAM).map(<&mut Xdp>::try_from) {
            Some(Ok(x)) => x.load().map_err(|e| tracing::warn!(error = %e, "the uplink's XDP program did not load: tc translates traffic from outside alone")).is_ok(),
            _ => false,
        };
        let take = |ebpf: &mut Ebpf, name: &'static str| ebpf.take_map(name).unwrap_or_else(|| panic!("map {name} in object"));
        let services = BpfHashMap::try_from(take(&mut ebpf, "shoal_services")).map_err(|e| Error::Map("shoal_services", e))?;
        let backends = BpfHashMap::try_from(take(&mut ebpf, "shoal_backends")).map_err(|e| Error::Map("shoal_backends", e))?;
        let ct = BpfHashMap::try_from(take(&mut ebpf, "shoal_ct")).map_err(|e| Error::Map("shoal_ct", e))?;
        let maps = Pinned { services, backends, ct };
        let stats = PerCpuArray::try_from(take(&mut ebpf, "shoal_stats")).map_err(|e| Error::Map("shoal_stats", e))?;
        let maglev = Array::try_from(take(&mut ebpf, "shoal_maglev")).map_err(|e| Error::Map("shoal_maglev", e))?;
        // the filters from what the maps hold (an upgrade from a Shoal without them, or a
        // restart): every frontend's bit, and every backend's and reply entry's in natted
        let mut frontends = FrontendFilter { words: Array::try_from(take(&mut ebpf, "shoal_frontends")).map_err(|e| Error::Map("shoal_frontends", e))?, masters: Default::default(), counts: Default::default() };
        let mut want = vec![0u64; 1024];
        for (k, _) in maps.services().into_iter().filter(|(k, _)| k.slot == 0) {
            let bit = filter_bit(k.addr);
            want[(bit / 64) as usize] |= 1 << (bit % 64);
            frontends.masters.insert(k);
            *frontends.counts.entry(bit).or_insert(0) += 1;
        }
        for (i, w) in want.iter().enumerate() {
            frontends.words.set(i as u32, *w, 0).map_err(|e| Error::Map("shoal_frontends", e))?;
        }
        let mut natted: Array<MapData, u64> = Array::try_from(take(&mut ebpf, "shoal_natted")).map_err(|e| Error::Map("shoal_natted", e))?;
        let mut bits = vec![0u64; 1024];
        for addr in maps.backends().iter().map(|(_, b)| b.addr).chain(maps.conntrack().iter().filter(|(k, _)| k.dir == crate::abi::CT_REVERSE).map(|(k, _)| k.saddr)) {
            let bit = filter_bit(addr);
            bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        for (i, w) in bits.iter().enumerate().filter(|(_, w)| **w != 0) {
            // (the programs of an earlier run may set bits meanwhile: write only when a
            // bit is missing, and as seldom as possible)
            let cur = natted.get(&(i as u32), 0).unwrap_or(0);
            if cur & *w != *w {
                natted.set(i as u32, cur | *w, 0).map_err(|e| Error::Map("shoal_natted", e))?;
            }
        }
        let policy = PolicyMaps {
            ipcache: LpmTrie::try_from(take(&mut ebpf, "shoal_ipcache")).map_err(|e| Error::Map("shoal_ipcache", e))?,
            endpoints: BpfHashMap::try_from(take(&mut ebpf, "shoal_endpoints")).map_err(|e| Error::Map("shoal_endpoints", e))?,
            rules: LpmTrie::try_from(take(&mut ebpf, "shoal_policy")).map_err(|e| Error::Map("shoal_policy", e))?,
        };
        // the socket programs share the pinned maps (by name); failing to load them costs
        // speed, not function
        let sock = match EbpfLoader::new().default_map_pin_directory(&config.pin_dir).load(SOCK_LB) {
            Ok(mut sock) => {
                let mut ok = true;
                for name in SOCK_PROGRAMS {
                    let loaded = sock.program_mut(name).ok_or(aya::programs::ProgramError::NotLoaded).and_then(|p| match p {
                        aya::programs::Program::CgroupSock(p) => p.load(),
                        p => {
                            let p: &mut CgroupSockAddr = p.try_into()?;
                            p.load()
                        }
                    });
                    if let Err(e) = loaded {
                        tracing::warn!(program = name, error = %e, "socket-level translation is off: the tc programs translate every connection");
                        ok = false;
                    }
                }
                ok.then_some(sock)
            }
            Err(e) => {
                tracing::warn!(error = %e, "socket-level translation is off: the tc programs translate every connection");
                None
            }
        };
        let mut backend_addrs = BackendAddrs::default();
        for (id, b) in maps.backends() {
            backend_addrs.set(id, Some((b.addr, b.port)));
        }
        Ok(Dataplane { ebpf, maps, stats, maglev, frontends, backend_addrs, policy, sock, xdp_loaded, pin_dir: config.pin_dir.clone() })
    }

    /// Attaches `from_pod` (ingress) and `to_pod` (egress) to the host side of a pod's
    /// interface, replacing Shoal's filters if they are there already.
    pub fn attach(&mut self, ifname: &str) -> Result<(), Error> {
        self.attach_pair(ifname, "from_pod", "to_pod")
    }

    /// Attaches the programs to a pod's interface and records the pod's address: its
    /// packets with another source address are dropped (a pod must not pass for another).
    pub fn attach_pod(&mut self, ifname: &str, addr: Option<std::net::Ipv4Addr>) -> Result<(), Error> {
        self.attach(ifname)?;
        let Some(addr) = addr else { return Ok(()) };
        let name = std::ffi::CString::new(ifname).map_err(|e| Error::Attach(ifname.to_string(), e.to_string()))?;
        // SAFETY: a valid C string
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(Error::Attach(ifname.to_string(), io::Error::last_os_error().to_string()));
        }
        let map = self.ebpf.map_mut("shoal_ifaddrs").expect("map in object");
        let mut m: BpfHashMap<&mut MapData, u32, u32> = BpfHashMap::try_from(map).map_err(|e| Error::Map("shoal_ifaddrs", e))?;
        if m.insert(ifindex, be_addr(addr), 0).is_ok() {
            return Ok(());
        }
        // full: entries of interfaces that are gone (pods deleted) make room
        let gone: Vec<u32> = m.keys().filter_map(Result::ok).filter(|i| {
            let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
            // SAFETY: a buffer of IF_NAMESIZE bytes, as if_indextoname wants
            unsafe { libc::if_indextoname(*i, buf.as_mut_ptr()) }.is_null()
        }).collect();
        for i in gone {
            let _ = m.remove(&i);
        }
        m.insert(ifindex, be_addr(addr), 0).map_err(|e| map_err("shoal_ifaddrs", 4096, e))
    }

    /// Attaches `from_net` (ingress) and `to_net` (egress) to the node's uplink, for
    /// NodePort, ExternalIP and LoadBalancer traffic from outside the node.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<(), Error> {
        self.attach_pair(ifname, "from_net", "to_net")?;
        if self.xdp_loaded {
            if let Err(e) = self.attach_xdp(ifname) {
                tracing::warn!(interface = ifname, error = %e, "XDP on the uplink is off: tc translates traffic from outside alone");
            }
        }
        Ok(())
    }

    /// `xdp_net` on the uplink: native on a device with a driver, generic on a virtual one
    /// (a veth sends XDP_TX frames only to a peer that runs XDP itself). The link is
    /// pinned, so it outlives the agent; an earlier run's is replaced. Returns the mode.
    pub fn attach_xdp(&mut self, ifname: &str) -> Result<&'static str, Error> {
        let err = |e: &dyn std::fmt::Display| Error::Attach(ifname.to_string(), e.to_string());
        detach_xdp(&self.pin_dir).map_err(|e| err(&e))?;
        let physical = Path::new("/sys/class/net").join(ifname).join("device").exists();
        let (mode, name) = if physical { (XdpMode::Driver, "native") } else { (XdpMode::Skb, "generic") };
        let prog: &mut Xdp = self.ebpf.program_mut(XDP_PROGRAM).expect("program in object").try_into().map_err(|e| Error::Program(XDP_PROGRAM, e))?;
        let id = prog.attach(ifname, mode).map_err(|e| err(&e))?;
        let link: FdLink = prog.take_link(id).map_err(|e| Error::Program(XDP_PROGRAM, e))?.try_into().map_err(|e: aya::programs::links::LinkError| err(&e))?;
        link.pin(self.pin_dir.join(format!("link_{XDP_PROGRAM}"))).map_err(|e| err(&e))?;
        tracing::info!(interface = ifname, mode = name, "XDP on the uplink: traffic from outside to other nodes' backends turns around there");
        Ok(name)
    }

    fn attach_pair(&mut self, ifname: &str, ingress: &'static str, egress: &'static str) -> Result<(), Error> {
        let attach_err = |e: &dyn std::fmt::Display| Error::Attach(ifname.to_string(), e.to_string());
        if let Err(e) = tc::qdisc_add_clsact(ifname) {
            if !is_errno(&e, libc::EEXIST) {
                return Err(attach_err(&e));
            }
        }
        for (name, kind) in [(ingress, TcAttachType::Ingress), (egress, TcAttachType::Egress)] {
            let prog: &mut SchedClassifier = self.ebpf.program_mut(name).expect("program in object").try_into().map_err(|e| Error::Program(name, e))?;
            let options = TcAttachOptions::Netlink(NlOptions { priority: TC_PRIORITY, handle: TC_HANDLE, ..Default::default() });
            let id = match prog.attach_with_options(ifname, kind, options) {
                Ok(id) => id,
                Err(first) => {
                    // a filter from an earlier run (or an older program): replace it
                    let link = SchedClassifierLink::attached(ifname, kind, TC_PRIORITY, TC_HANDLE, None).map_err(|e| attach_err(&e))?;
                    prog.attach_to_link(link).map_err(|e| attach_err(&format!("{first}; replacing: {e}")))?
                }
            };
            // the filter stays when the agent exits: traffic keeps flowing across restarts
            std::mem::forget(prog.take_link(id).map_err(|e| Error::Program(name, e))?);
        }
        Ok(())
    }

    /// Attaches the socket-level programs to the cgroup holding the pods (v2 hierarchy):
    /// their TCP connects to ClusterIPs go straight to a backend. The links are pinned in
    /// the bpffs directory, so they outlive the agent; an earlier run's are replaced.
    /// Returns false when the programs did not load (tc translates everything then).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<bool, Error> {
        let Some(sock) = self.sock.as_mut() else { return Ok(false) };
        let attach_err = |e: &dyn std::fmt::Display| Error::Attach(cgroup.display().to_string(), e.to_string());
        std::fs::create_dir_all(cgroup).map_err(|e| attach_err(&e))?;
        let dir = std::fs::File::open(cgroup).map_err(|e| attach_err(&e))?;
        for name in SOCK_PROGRAMS {
            let pin = self.pin_dir.join(format!("link_{name}"));
            // the pin holds the earlier run's link: removing it detaches that program
            match std::fs::remove_file(&pin) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(attach_err(&e)),
                _ => {}
            }
            // (a bpf_link: always multi-attach, and the kernel wants no flags for it)
            let link: FdLink = match sock.program_mut(name).expect("program in object") {
                aya::programs::Program::CgroupSock(prog) => {
                    let id = prog.attach(&dir, CgroupAttachMode::Single).map_err(|e| attach_err(&e))?;
                    prog.take_link(id).map_err(|e| Error::Program(name, e))?.try_into().map_err(|e: aya::programs::links::LinkError| attach_err(&e))?
                }
                p => {
                    let prog: &mut CgroupSockAddr = p.try_into().map_err(|e| Error::Program(name, e))?;
                    let id = prog.attach(&dir, CgroupAttachMode::Single).map_err(|e| attach_err(&e))?;
                    prog.take_link(id).map_err(|e| Error::Program(name, e))?.try_into().map_err(|e: aya::programs::links::LinkError| attach_err(&e))?
                }
            };
            link.pin(&pin).map_err(|e| attach_err(&e))?;
        }
        Ok(true)
    }

    /// Backend addresses whose last entry went since the last call.
    pub fn take_gone_backends(&mut self) -> Vec<(std::net::Ipv4Addr, u16)> {
        std::mem::take(&mut self.backend_addrs.gone).into_iter().map(|(a, p)| (addr_of(a), u16::from_be(p))).collect()
    }

    /// Closes the TCP sockets socket-level translation connected to one of `gone`, in
    /// each network namespace of `netns` (the node's pods): their applications see the
    /// connection aborted instead of talking to an address no backend holds. Returns how
    /// many were closed.
    pub fn close_sockets_to(&mut self, gone: &[(std::net::Ipv4Addr, u16)], netns: &[PathBuf]) -> io::Result<usize> {
        let Some(sock) = self.sock.as_ref() else { return Ok(0) };
        if gone.is_empty() || !self.pin_dir.join("link_sock_connect4").exists() {
            return Ok(0);
        }
        let map = sock.map("shoal_sock_lb").ok_or_else(|| io::Error::other("no shoal_sock_lb map"))?;
        let map: BpfHashMap<&MapData, u64, crate::abi::SockLb> = BpfHashMap::try_from(map).map_err(io::Error::other)?;
        let gone_be: std::collections::HashSet<(u32, u16)> = gone.iter().map(|(a, p)| (be_addr(*a), p.to_be())).collect();
        let cookies: std::collections::HashSet<u64> = map.iter().filter_map(Result::ok).filter(|(_, v)| gone_be.contains(&(v.backend_addr, v.backend_port))).map(|(k, _)| k).collect();
        if cookies.is_empty() {
            return Ok(0);
        }
        let gone: std::collections::HashSet<(std::net::Ipv4Addr, u16)> = gone.iter().copied().collect();
        let mut closed = 0;
        for ns in netns {
            match crate::sockdiag::destroy_in(ns, &gone, &cookies) {
                Ok(n) => closed += n,
                Err(e) => tracing::warn!(netns = %ns.display(), error = %e, "closing sockets connected to a removed backend"),
            }
        }
        Ok(closed)
    }

    /// Removes Shoal's filters from an interface (a deleted interface loses them anyway).
    pub fn detach(&mut self, ifname: &str) -> Result<(), Error> {
        detach_filters(ifname)
    }

    /// The writer `table::Table::sync` uses.
    pub fn maps(&mut self) -> Maps<'_> {
        Maps { services: &mut self.maps.services, backends: &mut self.maps.backends, maglev: &mut self.maglev, frontends: &mut self.frontends, backend_addrs: &mut self.backend_addrs }
    }

    /// The writer `policy::Policies::sync` uses.
    pub fn policy_maps(&mut self) -> &mut PolicyMaps {
        &mut self.policy
    }

    /// Every service map entry (for restoring a table and for listings).
    pub fn services(&self) -> Vec<(SvcKey, SvcValue)> {
        self.maps.services()
    }

    pub fn backends(&self) -> Vec<(u32, Backend)> {
        self.maps.backends()
    }

    pub fn conntrack(&self) -> Vec<(CtKey, CtEntry)> {
        self.maps.conntrack()
    }

    /// A table rebuilt from the pinned maps, with stale backend entries deleted.
    pub fn restore_table(&mut self) -> Result<table::Table, Error> {
        let backends = self.backends();
        let table = table::Table::restore(self.services(), backends.iter().copied());
        for id in table.stale_backends(backends.iter().map(|(id, _)| *id)) {
            if self.maps.backends.remove(&id).is_ok() {
                self.backend_addrs.set(id, None);
            }
        }
        Ok(table)
    }

    /// The programs' counters summed over CPUs, by name.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        STATS.iter().enumerate().map(|(i, name)| (*name, self.stats.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0))).collect()
    }

    /// Runs a program once on a packet with BPF_PROG_TEST_RUN: the program's return code
    /// and the packet as it left. For tests of the programs on crafted packets.
    pub fn test_run(&self, program: &str, packet: &[u8]) -> io::Result<(u32, Vec<u8>)> {
        let prog: &SchedClassifier = self.ebpf.program(program).and_then(|p| p.try_into().ok()).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, program.to_string()))?;
        let fd = prog.fd().map_err(io::Error::other)?.as_fd().as_raw_fd();
        test_run(fd, packet)
    }

    /// Removes every pinned map and link (the tc programs stay attached until their
    /// interfaces go; the socket programs are detached).
    pub fn unpin(self) -> io::Result<()> {
        detach_cgroup_links(&self.pin_dir)?;
        detach_xdp(&self.pin_dir)?;
        for (name, _, _, _, _) in MAPS {
            match std::fs::remove_file(self.pin_dir.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        match std::fs::remove_dir(&self.pin_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Maps pinned in `dir` whose layout (key, value, flags, size) is not the programs' own:
/// an upgrade replaces them. Empty right after a load (tested: a wrong size in `MAPS`
/// would replace a map, and lose its flows, on every restart).
pub fn stale_pins(dir: &Path) -> Vec<&'static str> {
    MAPS.iter()
        .filter(|(name, ..)| dir.join(name).exists())
        .filter(|(name, key_size, value_size, flags, max)| {
            let info = MapData::from_pin(dir.join(name)).ok().and_then(|m| m.info().ok());
            info.is_none_or(|info| !(info.key_size() as usize == *key_size && info.value_size() as usize == *value_size && info.map_flags() == *flags && info.max_entries() == *max))
        })
        .map(|(name, ..)| *name)
        .collect()
}

/// The programs' counters from the pinned `shoal_stats` (summed over CPUs), by name.
pub fn pinned_stats(dir: &Path) -> Result<Vec<(&'static str, u64)>, Error> {
    let md = MapData::from_pin(dir.join("shoal_stats")).map_err(|e| Error::Map("shoal_stats", e))?;
    let map = aya::maps::Map::from_map_data(md).map_err(|e| Error::Map("shoal_stats", e))?;
    let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(map).map_err(|e| Error::Map("shoal_stats", e))?;
    Ok(STATS.iter().enumerate().map(|(i, name)| (*name, stats.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0))).collect())
}

/// The cgroup v2 hierarchy: `/sys/fs/cgroup` on a unified system, `/sys/fs/cgroup/unified`
/// on a hybrid one (v1 controllers beside it), None without one.
pub fn cgroup2_root() -> Option<PathBuf> {
    [Path::new("/sys/fs/cgroup"), Path::new("/sys/fs/cgroup/unified")].into_iter().find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.controllers").exists()).map(Path::to_path_buf)
}

/// Detaches the socket-level programs an agent attached (their links are pinned in
/// `pin_dir`): a node falling back to nftables must not translate with frozen maps.
pub fn detach_cgroup_links(pin_dir: &Path) -> io::Result<()> {
    for name in SOCK_PROGRAMS {
        match std::fs::remove_file(pin_dir.join(format!("link_{name}"))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Detaches the uplink's XDP program (its link is pinned in `pin_dir`).
pub fn detach_xdp(pin_dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(pin_dir.join(format!("link_{XDP_PROGRAM}"))) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes Shoal's tc filters from an interface, loaded or not (a node that falls back to
/// nftables must not keep translating with the maps of an earlier run).
pub fn detach_filters(ifname: &str) -> Result<(), Error> {
    for kind in [TcAttachType::Ingress, TcAttachType::Egress] {
        let link = SchedClassifierLink::attached(ifname, kind, TC_PRIORITY, TC_HANDLE, None).map_err(|e| Error::Attach(ifname.to_string(), e.to_string()))?;
        link.detach().map_err(|e| Error::Attach(ifname.to_string(), e.to_string()))?;
    }
    Ok(())
}

/// The maps an agent pinned, opened for listings (`shoal admin dataplane`, like `cilium
/// bpf lb list`): read straight from bpffs, so it works whether the agent runs or not.
pub struct Pinned {
    services: BpfHashMap<MapData, SvcKey, SvcValue>,
    backends: BpfHashMap<MapData, u32, Backend>,
    ct: BpfHashMap<MapData, CtKey, CtEntry>,
}

impl Pinned {
    pub fn open(dir: &Path) -> Result<Pinned, Error> {
        fn open<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &'static str) -> Result<BpfHashMap<MapData, K, V>, Error> {
            let md = MapData::from_pin(dir.join(name)).map_err(|e| Error::Map(name, e))?;
            let map = aya::maps::Map::from_map_data(md).map_err(|e| Error::Map(name, e))?;
            BpfHashMap::try_from(map).map_err(|e| Error::Map(name, e))
        }
        Ok(Pinned { services: open(dir, "shoal_services")?, backends: open(dir, "shoal_backends")?, ct: open(dir, "shoal_ct")? })
    }

    /// The network policy maps pinned in `dir`, for listings.
    pub fn open_policy(dir: &Path) -> Result<PolicyMaps, Error> {
        fn md(dir: &Path, name: &'static str) -> Result<aya::maps::Map, Error> {
            let md = MapData::from_pin(dir.join(name)).map_err(|e| Error::Map(name, e))?;
            aya::maps::Map::from_map_data(md).map_err(|e| Error::Map(name, e))
        }
        Ok(PolicyMaps {
            ipcache: LpmTrie::try_from(md(dir, "shoal_ipcache")?).map_err(|e| Error::Map("shoal_ipcache", e))?,
            endpoints: BpfHashMap::try_from(md(dir, "shoal_endpoints")?).map_err(|e| Error::Map("shoal_endpoints", e))?,
            rules: LpmTrie::try_from(md(dir, "shoal_policy")?).map_err(|e| Error::Map("shoal_policy", e))?,
        })
    }

    pub fn services(&self) -> Vec<(SvcKey, SvcValue)> {
        self.services.iter().filter_map(Result::ok).collect()
    }

    pub fn backends(&self) -> Vec<(u32, Backend)> {
        self.backends.iter().filter_map(Result::ok).collect()
    }

    pub fn conntrack(&self) -> Vec<(CtKey, CtEntry)> {
        self.ct.iter().filter_map(Result::ok).collect()
    }
}

/// The services and backends maps, written by `table::Table::sync`.
pub struct Maps<'a> {
    services: &'a mut BpfHashMap<MapData, SvcKey, SvcValue>,
    backends: &'a mut BpfHashMap<MapData, u32, Backend>,
    maglev: &'a mut Array<MapData, u32>,
    frontends: &'a mut FrontendFilter,
    backend_addrs: &'a mut BackendAddrs,
}

fn map_err(name: &'static str, max: u32, e: MapError) -> Error {
    if is_errno(&e, libc::E2BIG) || is_errno(&e, libc::ENOMEM) {
        Error::Full(name, max)
    } else {
        Error::Map(name, e)
    }
}

fn removed(name: &'static str, r: Result<(), MapError>) -> Result<(), Error> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
        other => other.map_err(|e| Error::Map(name, e)),
    }
}

impl table::Maps for Maps<'_> {
    type Error = Error;
    fn put_service(&mut self, key: &SvcKey, value: &SvcValue) -> Result<(), Error> {
        if key.slot == 0 {
            self.frontends.add(key).map_err(|e| Error::Map("shoal_frontends", e))?;
        }
        self.services.insert(key, value, 0).map_err(|e| map_err("shoal_services", 262144, e))
    }
    fn del_service(&mut self, key: &SvcKey) -> Result<(), Error> {
        removed("shoal_services", self.services.remove(key))?;
        if key.slot == 0 {
            self.frontends.remove(key).map_err(|e| Error::Map("shoal_frontends", e))?;
        }
        Ok(())
    }
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<(), Error> {
        self.backends.insert(id, backend, 0).map_err(|e| map_err("shoal_backends", 262144, e))?;
        self.backend_addrs.set(id, Some((backend.addr, backend.port)));
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<(), Error> {
        removed("shoal_backends", self.backends.remove(&id))?;
        self.backend_addrs.set(id, None);
        Ok(())
    }
    fn put_maglev(&mut self, index: u32, backend_id: u32) -> Result<(), Error> {
        self.maglev.set(index, backend_id, 0).map_err(|e| Error::Map("shoal_maglev", e))
    }
    fn maglev_full(&self) -> Error {
        Error::Full("shoal_maglev", crate::abi::MAGLEV_TABLES)
    }
}

impl PolicyMaps {
    /// What the maps hold: (ipcache, endpoints, rules), for `Policies::adopt`.
    pub fn read(&self) -> (Vec<(Prefix, IpcacheValue)>, Vec<(std::net::Ipv4Addr, EndpointValue)>, Vec<policy::RuleKey>) {
        let ipcache = self.ipcache.iter().filter_map(Result::ok).map(|(k, v)| (Prefix(u32::from(addr_of(k.data())), k.prefix_len() as u8), v)).collect();
        let endpoints = self.endpoints.iter().filter_map(Result::ok).map(|(k, v)| (addr_of(k), v)).collect();
        let rules = self.rules.iter().filter_map(Result::ok).map(|(k, _)| (k.prefix_len(), k.data())).collect();
        (ipcache, endpoints, rules)
    }
}

impl policy::Maps for PolicyMaps {
    type Error = Error;
    fn put_ipcache(&mut self, p: Prefix, v: IpcacheValue) -> Result<(), Error> {
        self.ipcache.insert(&LpmKey::new(u32::from(p.1), be_addr(p.addr())), v, 0).map_err(|e| map_err("shoal_ipcache", 262144, e))
    }
    fn del_ipcache(&mut self, p: Prefix) -> Result<(), Error> {
        removed("shoal_ipcache", self.ipcache.remove(&LpmKey::new(u32::from(p.1), be_addr(p.addr()))))
    }
    fn put_endpoint(&mut self, a: std::net::Ipv4Addr, v: EndpointValue) -> Result<(), Error> {
        self.endpoints.insert(be_addr(a), v, 0).map_err(|e| map_err("shoal_endpoints", 4096, e))
    }
    fn del_endpoint(&mut self, a: std::net::Ipv4Addr) -> Result<(), Error> {
        removed("shoal_endpoints", self.endpoints.remove(&be_addr(a)))
    }
    fn put_rule(&mut self, len: u32, k: PolicyData) -> Result<(), Error> {
        self.rules.insert(&LpmKey::new(len, k), 1u32, 0).map_err(|e| map_err("shoal_policy", 262144, e))
    }
    fn del_rule(&mut self, len: u32, k: PolicyData) -> Result<(), Error> {
        removed("shoal_policy", self.rules.remove(&LpmKey::new(len, k)))
    }
}

/// Whether an error (or one of its sources) is the OS error `errno`.
fn is_errno(e: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.raw_os_error() == Some(errno) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there, and creates `dir`.
fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    let root = Path::new("/sys/fs/bpf");
    let fs_err = |e: io::Error| Error::BpfFs(root.to_path_buf(), e);
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let path = std::ffi::CString::new("/sys/fs/bpf").unwrap();
    // SAFETY: a valid C string and a zeroed statfs to fill
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(fs_err(io::Error::last_os_error()));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        let fstype = std::ffi::CString::new("bpf").unwrap();
        // SAFETY: valid C strings; no data argument
        let rc = unsafe { libc::mount(fstype.as_ptr(), path.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(fs_err(io::Error::last_os_error()));
        }
        tracing::info!("mounted bpffs on /sys/fs/bpf");
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::BpfFs(dir.to_path_buf(), e))
}

/// BPF_PROG_TEST_RUN on a program fd.
fn test_run(fd: i32, packet: &[u8]) -> io::Result<(u32, Vec<u8>)> {
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        pad: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestAttr { prog_fd: fd as u32, data_size_in: packet.len() as u32, data_size_out: out.len() as u32, data_in: packet.as_ptr() as u64, data_out: out.as_mut_ptr() as u64, repeat: 1, ..Default::default() };
    // SAFETY: attr points at a bpf_attr-compatible struct whose buffers outlive the call
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &mut attr as *mut TestAttr, size_of::<TestAttr>()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out))
}
