//! Closing pods' TCP and UDP sockets that socket-level translation connected to a backend that is
//! gone, with the kernel's sock_diag netlink interface (`SOCK_DESTROY`, as `ss -K`; needs
//! CONFIG_INET_DIAG_DESTROY): the application sees ECONNABORTED at once instead of sending
//! to an address no backend holds. Only sockets whose cookie the programs recorded
//! (`shoal_sock_lb`) are touched, so a connection a pod made to that address itself, not
//! through a service, stays.
use std::collections::HashSet;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then the socket id.
const REQ_LEN: usize = 8 + ID_LEN;
/// `struct inet_diag_sockid`: sport, dport, src[4], dst[4], if, cookie[2].
const ID_LEN: usize = 48;
/// `struct inet_diag_msg` up to and including the id.
const MSG_MIN: usize = 4 + ID_LEN;

/// A socket as the dump reports it: its raw `inet_diag_sockid` (to name it in the destroy
/// request), destination and cookie.
struct Found {
    id: [u8; ID_LEN],
    dst: Ipv4Addr,
    dport: u16,
    cookie: u64,
}

fn request(kind: u16, flags: u16, proto: u8, id: Option<&[u8; ID_LEN]>) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    m.extend_from_slice(&[libc::AF_INET as u8, proto, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    match id {
        Some(id) => m.extend_from_slice(id),
        None => m.extend_from_slice(&[0u8; ID_LEN]),
    }
    m
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: sending a buffer we own; the kernel is the default destination of a netlink socket
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads netlink messages until DONE or an ERROR (an ack); calls `each` with every
/// payload. Returns the error code of an ERROR message (0: an ack).
fn receive(fd: &OwnedFd, mut each: impl FnMut(&[u8])) -> io::Result<i32> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: receiving into a buffer we own, at most its length
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut at = 0usize;
        let n = n as usize;
        while at + NLMSG_HDRLEN <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
            if len < NLMSG_HDRLEN || at + len > n {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a truncated netlink message"));
            }
            match kind {
                NLMSG_DONE => return Ok(0),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(buf[at + NLMSG_HDRLEN..at + NLMSG_HDRLEN + 4].try_into().expect("4 bytes"));
                    return Ok(code);
                }
                _ => each(&buf[at + NLMSG_HDRLEN..at + len]),
            }
            at += (len + 3) & !3;
        }
    }
}

/// Every IPv4 socket of protocol `proto` in the current network namespace.
fn dump(fd: &OwnedFd, proto: u8) -> io::Result<Vec<Found>> {
    send(fd, &request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, proto, None))?;
    let mut out = Vec::new();
    let code = receive(fd, |p| {
        if p.len() < MSG_MIN {
            return;
        }
        let id: [u8; ID_LEN] = p[4..4 + ID_LEN].try_into().expect("ID_LEN bytes");
        let dport = u16::from_be_bytes([id[2], id[3]]);
        let dst = Ipv4Addr::new(id[20], id[21], id[22], id[23]);
        let cookie = u64::from(u32::from_ne_bytes(id[40..44].try_into().expect("4 bytes"))) | (u64::from(u32::from_ne_bytes(id[44..48].try_into().expect("4 bytes"))) << 32);
        out.push(Found { id, dst, dport, cookie });
    })?;
    if code < 0 {
        return Err(io::Error::from_raw_os_error(-code));
    }
    Ok(out)
}

/// Destroys, in the network namespace at `netns`, the TCP sockets whose cookie is in
/// `cookies` and whose destination is one of `gone`. Runs on a thread of its own (setns
/// changes the calling thread's namespace). Returns how many were destroyed.
pub fn destroy_in(netns: &Path, gone: &HashSet<(Ipv4Addr, u16)>, cookies: &HashSet<u64>) -> io::Result<usize> {
    let netns = netns.to_path_buf();
    let (gone, cookies) = (gone.clone(), cookies.clone());
    std::thread::spawn(move || -> io::Result<usize> {
        let f = std::fs::File::open(&netns)?;
        // SAFETY: setns on a namespace fd we hold; changes only this thread
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = open()?;
        let mut destroyed = 0;
        // TCP connections, and UDP sockets connected to a backend (an unconnected one
        // chooses again with its next datagram)
        for proto in [libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8] {
            for s in dump(&fd, proto)?.into_iter().filter(|s| cookies.contains(&s.cookie) && gone.contains(&(s.dst, s.dport))) {
                send(&fd, &request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, proto, Some(&s.id)))?;
                match receive(&fd, |_| {})? {
                    0 => destroyed += 1,
                    // gone meanwhile
                    code if -code == libc::ENOENT => {}
                    code => return Err(io::Error::from_raw_os_error(-code)),
                }
            }
        }
        Ok(destroyed)
    })
    .join()
    .map_err(|_| io::Error::other("the sock_diag thread panicked"))?
}
