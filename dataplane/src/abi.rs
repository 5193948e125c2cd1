//! The structs the BPF programs share with user space, mirrored from `bpf/lib/common.h`.
//!
//! Addresses and ports are stored in network byte order, as the programs read them from
//! packets; the constructors here take host values. `tests::abi_matches_the_programs_btf`
//! compares every size and member offset with the BTF that clang wrote into the object.
use std::net::Ipv4Addr;

/// IP protocol numbers the programs translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp = 6,
    Udp = 17,
}

impl Proto {
    pub fn parse(name: &str) -> Option<Proto> {
        match name {
            "TCP" | "tcp" => Some(Proto::Tcp),
            "UDP" | "udp" => Some(Proto::Udp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }

    fn from_u8(p: u8) -> Option<Proto> {
        match p {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }
}

pub fn be_addr(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

pub fn addr_of(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

pub const SVC_F_NODEPORT: u16 = 0x1;
pub const SVC_F_EXTERNAL: u16 = 0x2;
pub const SVC_F_LOCAL: u16 = 0x4;
pub const SVC_F_MAGLEV: u16 = 0x8;
/// Entries of one Maglev table (a prime) and how many tables `shoal_maglev` holds.
pub const MAGLEV_M: u32 = 1021;
pub const MAGLEV_TABLES: u32 = 512;
pub const BACKEND_F_TERMINATING: u8 = 0x1;
pub const BACKEND_F_NO_SLOT: u8 = 0x2;
pub const CT_FORWARD: u8 = 0;
pub const CT_REVERSE: u8 = 1;
pub const CT_POLICY: u8 = 2;
pub const CT_F_ESTABLISHED: u16 = 0x1;
pub const CT_F_CLOSING: u16 = 0x2;
pub const CT_F_HAIRPIN: u16 = 0x4;
pub const CT_F_SNAT: u16 = 0x8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
    pub slot: u16,
    pub pad2: u16,
}

impl SvcKey {
    pub fn new(addr: Ipv4Addr, port: u16, proto: Proto, slot: u16) -> SvcKey {
        SvcKey { addr: be_addr(addr), port: port.to_be(), proto: proto as u8, pad: 0, slot, pad2: 0 }
    }
    pub fn ip(&self) -> Ipv4Addr {
        addr_of(self.addr)
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
    pub fn protocol(&self) -> Option<Proto> {
        Proto::from_u8(self.proto)
    }
    /// The same frontend's entry for another slot.
    pub fn with_slot(self, slot: u16) -> SvcKey {
        SvcKey { slot, ..self }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcValue {
    pub backend_id: u32,
    pub svc_id: u32,
    pub count: u16,
    pub flags: u16,
    pub affinity_timeout: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

impl Backend {
    pub fn new(addr: Ipv4Addr, port: u16, proto: Proto, flags: u8) -> Backend {
        Backend { addr: be_addr(addr), port: port.to_be(), proto: proto as u8, flags }
    }
    pub fn ip(&self) -> Ipv4Addr {
        addr_of(self.addr)
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub expires: u64,
    pub nat_addr: u32,
    pub nat_port: u16,
    pub flags: u16,
    pub orig_addr: u32,
    pub orig_port: u16,
    pub pad: u16,
    pub backend_id: u32,
    pub svc_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub client: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub last_used: u32,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

/// Network policy (common.h): identities 0 and 1 are reserved.
pub const ID_ANY: u32 = 0;
pub const ID_WORLD: u32 = 1;
pub const IPC_F_HOST: u32 = 0x1;
pub const EP_F_INGRESS: u32 = 0x1;
pub const EP_F_EGRESS: u32 = 0x2;
pub const POL_INGRESS: u8 = 0;
pub const POL_EGRESS: u8 = 1;
/// Prefix lengths of a `policy_key`: subject, peer and direction; and the protocol; the
/// whole key with the port.
pub const POLICY_EXACT: u32 = 72;
pub const POLICY_PROTO: u32 = 80;
pub const POLICY_FULL: u32 = 96;

/// `struct ipcache_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
    pub flags: u32,
}

/// `struct endpoint`: a local pod's policy subject and isolation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointValue {
    pub subject: u32,
    pub flags: u32,
}

/// `struct sock_lb`: where a socket connected to a service was sent instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLb {
    pub svc_addr: u32,
    pub backend_addr: u32,
    pub svc_port: u16,
    pub backend_port: u16,
}

/// The bits of `struct policy_key` after its prefixlen (aya's `lpm_trie::Key` adds that).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyData {
    pub subject: u32,
    pub peer: u32,
    pub dir: u8,
    pub proto: u8,
    /// network byte order
    pub port: u16,
}

// SAFETY: all of these are #[repr(C)] plain integers with explicit padding fields, so every
// bit pattern is valid and there are no uninitialised bytes.
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for SvcValue {}
unsafe impl aya::Pod for Backend {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtEntry {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for AffinityValue {}
unsafe impl aya::Pod for IpcacheValue {}
unsafe impl aya::Pod for EndpointValue {}
unsafe impl aya::Pod for PolicyData {}
unsafe impl aya::Pod for SockLb {}

/// The programs' counters (`enum stat` in common.h), in order.
pub const STATS: &[&str] = &["translated", "reversed", "ct_created", "rejected", "no_slot", "ct_update_failed", "policy_denied", "policy_allowed", "sock_translated", "xdp_tx", "spoofed"];

/// Struct layouts as (C name, size, [(member, offset)]), for the BTF comparison.
pub fn layouts() -> Vec<(&'static str, usize, Vec<(&'static str, usize)>)> {
    use std::mem::{offset_of, size_of};
    macro_rules! layout {
        ($c:literal, $t:ty, $($m:ident),*) => {
            ($c, size_of::<$t>(), vec![$((stringify!($m), offset_of!($t, $m))),*])
        };
    }
    vec![
        layout!("svc_key", SvcKey, addr, port, proto, pad, slot, pad2),
        layout!("svc_value", SvcValue, backend_id, svc_id, count, flags, affinity_timeout),
        layout!("backend", Backend, addr, port, proto, flags),
        layout!("ct_key", CtKey, saddr, daddr, sport, dport, proto, dir, pad),
        layout!("ct_entry", CtEntry, expires, nat_addr, nat_port, flags, orig_addr, orig_port, pad, backend_id, svc_id),
        layout!("affinity_key", AffinityKey, svc_id, client),
        layout!("affinity_value", AffinityValue, backend_id, last_used, addr, port, pad),
        layout!("ipcache_value", IpcacheValue, identity, flags),
        layout!("endpoint", EndpointValue, subject, flags),
        layout!("sock_lb", SockLb, svc_addr, backend_addr, svc_port, backend_port),
        // the LPM keys: aya's Key puts a u32 prefix length before the data
        ("ipcache_key", 4 + size_of::<u32>(), vec![("prefixlen", 0), ("addr", 4)]),
        (
            "policy_key",
            4 + size_of::<PolicyData>(),
            vec![("prefixlen", 0), ("subject", 4 + offset_of!(PolicyData, subject)), ("peer", 4 + offset_of!(PolicyData, peer)), ("dir", 4 + offset_of!(PolicyData, dir)), ("proto", 4 + offset_of!(PolicyData, proto)), ("port", 4 + offset_of!(PolicyData, port))],
        ),
    ]
}
