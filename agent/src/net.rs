//! The pod network on one node (the CNI part): a bridge holding the node's pod range
//! gateway (`.1` of `spec.podCIDR`), and per pod a network namespace with a veth whose
//! other end is on the bridge. Pod traffic leaving the cluster range is masqueraded.
//!
//! Driven through iproute2's `ip` in batch mode (two processes per pod), which keeps the
//! agent free of a netlink implementation; a pod's network costs ~10 ms here.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// The node's pod network.
pub struct PodNetwork {
    /// Name of the bridge (`shoal0`).
    pub bridge: String,
    /// The cluster's pod range (not masqueraded), e.g. `10.0.0.0/8`.
    pub cluster_cidr: String,
    /// Routes installed to other nodes' pod ranges: node → (podCIDR, its address). Updates
    /// apply in arrival order under this lock.
    pub routes: tokio::sync::Mutex<std::collections::HashMap<String, (String, String)>>,
    /// This node's address (the VXLAN tunnel's local end).
    pub node_ip: String,
    /// This node's pod range, once known.
    pub own_cidr: tokio::sync::Mutex<Option<String>>,
    /// The service proxy, whose programs go onto every pod's host-side veth.
    pub proxy: Option<shoal_dataplane::ProxyHandle>,
}

/// Runs `ip [-n NS] -batch -` with `lines`; the error carries what `ip` said.
async fn ip_batch(netns: Option<&str>, lines: &str) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    if let Some(n) = netns {
        cmd.args(["-n", n]);
    }
    cmd.args(["-batch", "-"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("running ip: {e} (is iproute2 installed?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(lines.as_bytes()).await.map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", lines.lines().next().unwrap_or(""), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// The VXLAN device carrying pod traffic to nodes off this node's links.
const VXLAN: &str = "shoal.vx";

/// A node's VTEP MAC, derived from its address (locally administered).
fn vtep_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// Whether `peer` is on one of this node's links (its route has no gateway).
async fn on_link(peer: Ipv4Addr) -> bool {
    match Command::new("ip").args(["route", "get", &peer.to_string()]).output().await {
        Ok(o) if o.status.success() => !String::from_utf8_lossy(&o.stdout).contains(" via "),
        _ => false,
    }
}

/// Runs `nft -f -` with `rules`.
async fn nft(rules: &str) -> Result<(), String> {
    let mut child = Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().map_err(|e| format!("running nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(rules.as_bytes()).await.map_err(|e| e.to_string())?;
    }
    let o = child.wait_with_output().await.map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
    }
    Ok(())
}

/// The netns name of a pod (a file under /run/netns).
pub fn netns_name(uid: &str) -> String {
    format!("shoal-{}", uid.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect::<String>())
}

/// A host-side veth name (at most 15 bytes) stable for a pod.
fn veth_name(uid: &str) -> String {
    let h = uid.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3));
    format!("veth{:08x}", h as u32)
}

impl PodNetwork {
    /// Creates the bridge with the gateway address of `pod_cidr` (idempotent), turns on
    /// forwarding, and masquerades traffic from the pod range to outside the cluster range.
    pub async fn ensure_bridge(&self, pod_cidr: &str) -> Result<(), String> {
        let (net, len) = parse_cidr(pod_cidr).ok_or_else(|| format!("bad podCIDR {pod_cidr:?}"))?;
        let gw = Ipv4Addr::from(u32::from(net) + 1);
        // Not /sys/class/net: sysfs shows the namespace it was mounted in, not ours.
        let exists = Command::new("ip").args(["link", "show", "dev", &self.bridge]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().await.is_ok_and(|s| s.success());
        let mut batch = String::new();
        if !exists {
            batch.push_str(&format!("link add {} type bridge\n", self.bridge));
        }
        batch.push_str(&format!("addr replace {gw}/{len} dev {}\nlink set {} up\n", self.bridge, self.bridge));
        ip_batch(None, &batch).await?;
        tokio::fs::write("/proc/sys/net/ipv4/ip_forward", "1").await.map_err(|e| format!("enabling IPv4 forwarding: {e}"))?;
        self.masquerade(pod_cidr).await;
        Ok(())
    }

    /// nftables masquerade for pod traffic leaving the cluster range (best effort: a node
    /// without nft still runs pods, only without outbound NAT).
    async fn masquerade(&self, pod_cidr: &str) {
        let rules = format!(
            "table ip shoal-nat\ndelete table ip shoal-nat\ntable ip shoal-nat {{\n chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n  ip saddr {pod_cidr} ip daddr != {} masquerade\n }}\n}}\n",
            self.cluster_cidr
        );
        let child = Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn();
        let Ok(mut child) = child else {
            tracing::warn!("nft not found: pod traffic to outside the cluster is not masqueraded");
            return;
        };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(rules.as_bytes()).await;
        }
        match child.wait_with_output().await {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::warn!(error = %String::from_utf8_lossy(&o.stderr).trim(), "masquerade rule not installed"),
            Err(e) => tracing::warn!(error = %e, "masquerade rule not installed"),
        }
    }

    /// Forwards the node's `host_port`s to the pod (hostPort): an nftables map from
    /// (protocol, port) to (pod address, container port) consulted for traffic to any of
    /// the node's own addresses, arriving or sent locally.
    pub async fn add_host_ports(&self, ip: Ipv4Addr, ports: &[(String, u16, u16)]) -> Result<(), String> {
        if ports.is_empty() {
            return Ok(());
        }
        let mut rules = String::from("table ip shoal-hostport {\n map hostports { type inet_proto . inet_service : ipv4_addr . inet_service; }\n chain prerouting { type nat hook prerouting priority dstnat; policy accept; fib daddr type local dnat ip to meta l4proto . th dport map @hostports; }\n chain output { type nat hook output priority -100; policy accept; fib daddr type local dnat ip to meta l4proto . th dport map @hostports; }\n}\n");
        for (proto, hp, cp) in ports {
            rules.push_str(&format!("add element ip shoal-hostport hostports {{ {proto} . {hp} : {ip} . {cp} }}\n"));
        }
        nft(&rules).await.map_err(|e| format!("hostPort: {e}"))
    }

    /// Stops forwarding a pod's hostPorts.
    pub async fn remove_host_ports(&self, ports: &[(String, u16, u16)]) {
        for (proto, hp, _) in ports {
            let _ = nft(&format!("delete element ip shoal-hostport hostports {{ {proto} . {hp} }}\n")).await;
        }
    }

    /// Routes to other nodes' pod ranges: straight through the peer's address when it is
    /// on one of this node's links, else through a VXLAN device (`shoal.vx`, VNI 4242, UDP
    /// 8472) whose forwarding entries point at the peer. VTEP MAC addresses are derived from
    /// node addresses, so nothing but (podCIDR, address) needs exchanging. `full` replaces
    /// every route installed before.
    pub async fn set_peers(&self, peers: Vec<(String, String, String)>, full: bool) {
        let mut routes = self.routes.lock().await;
        let mut want: std::collections::HashMap<String, (String, String)> = if full { Default::default() } else { routes.clone() };
        for (name, cidr, ip) in peers {
            if cidr.is_empty() || ip.is_empty() {
                want.remove(&name);
            } else {
                want.insert(name, (cidr, ip));
            }
        }
        let mut ip_cmds = String::new();
        let mut fdb_cmds = String::new();
        for (name, (cidr, ip)) in routes.iter() {
            if want.get(name) != Some(&(cidr.clone(), ip.clone())) {
                tracing::debug!(node = %name, %cidr, "route removed");
                ip_cmds.push_str(&format!("route del {cidr}\n"));
                if let (Some((net, _)), Ok(peer)) = (parse_cidr(cidr), ip.parse::<Ipv4Addr>()) {
                    ip_cmds.push_str(&format!("neigh del {net} dev {VXLAN}\n"));
                    fdb_cmds.push_str(&format!("fdb del {} dev {VXLAN} dst {peer}\n", vtep_mac(peer)));
                }
            }
        }
        let mut vxlan_needed = false;
        for (name, (cidr, ip)) in &want {
            if routes.get(name) == Some(&(cidr.clone(), ip.clone())) {
                continue;
            }
            let (Some((net, _)), Ok(peer)) = (parse_cidr(cidr), ip.parse::<Ipv4Addr>()) else { continue };
            if on_link(peer).await {
                ip_cmds.push_str(&format!("route replace {cidr} via {peer}\n"));
            } else {
                vxlan_needed = true;
                ip_cmds.push_str(&format!("neigh replace {net} lladdr {} dev {VXLAN} nud permanent\n", vtep_mac(peer)));
                ip_cmds.push_str(&format!("route replace {cidr} via {net} dev {VXLAN} onlink\n"));
                fdb_cmds.push_str(&format!("fdb replace {} dev {VXLAN} dst {peer}\n", vtep_mac(peer)));
            }
        }
        if vxlan_needed {
            if let Err(e) = self.ensure_vxlan().await {
                tracing::warn!(error = %e, "the VXLAN device could not be set up: pods on nodes off this node's links are unreachable");
            }
        }
        for (tool, cmds) in [("ip", ip_cmds), ("bridge", fdb_cmds)] {
            if cmds.is_empty() {
                continue;
            }
            // -force: one bad peer must not keep the others from being routed.
            let mut cmd = Command::new(tool);
            cmd.args(["-force", "-batch", "-"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
            if let Ok(mut child) = cmd.spawn() {
                if let Some(mut stdin) = child.stdin.take() {
                    let _ = stdin.write_all(cmds.as_bytes()).await;
                }
                if let Ok(o) = child.wait_with_output().await {
                    let err = String::from_utf8_lossy(&o.stderr);
                    // Deleting what is not there is not worth a warning.
                    let err: Vec<&str> = err.lines().filter(|l| !l.contains("No such") && !l.contains("Cannot find") && !l.starts_with("Command failed")).collect();
                    if !err.is_empty() {
                        tracing::warn!(error = %err.join("; "), "some routes to other nodes' pods were not installed");
                    }
                }
            }
        }
        *routes = want;
    }

    /// The VXLAN device, with this node's derived VTEP MAC and (when known) `.0` of its pod
    /// range as its address.
    async fn ensure_vxlan(&self) -> Result<(), String> {
        let me: Ipv4Addr = self.node_ip.parse().map_err(|_| format!("node address {:?} is not IPv4", self.node_ip))?;
        let exists = Command::new("ip").args(["link", "show", "dev", VXLAN]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().await.is_ok_and(|s| s.success());
        let mut batch = String::new();
        if !exists {
            batch.push_str(&format!("link add {VXLAN} type vxlan id 4242 dstport 8472 local {me} nolearning\n"));
        }
        batch.push_str(&format!("link set {VXLAN} address {} up\n", vtep_mac(me)));
        if let Some((net, _)) = self.own_cidr.lock().await.as_deref().and_then(parse_cidr) {
            batch.push_str(&format!("addr replace {net}/32 dev {VXLAN}\n"));
        }
        ip_batch(None, &batch).await
    }

    /// Creates the pod's namespace and link; returns the namespace's path.
    pub async fn setup(&self, uid: &str, ip: Ipv4Addr, pod_cidr: &str) -> Result<PathBuf, String> {
        let (net, len) = parse_cidr(pod_cidr).ok_or_else(|| format!("bad podCIDR {pod_cidr:?}"))?;
        let gw = Ipv4Addr::from(u32::from(net) + 1);
        let ns = netns_name(uid);
        let veth = veth_name(uid);
        // A left-over of an earlier attempt goes first.
        let _ = self.teardown(uid).await;
        // hairpin mode on the bridge port: with br_netfilter (built in here), a pod's
        // packet to a service that is DNATed back to that same pod is bridged out of the
        // port it came in on, which a bridge port refuses without it (as kubelet's
        // --hairpin-mode=hairpin-veth; measured: 1 in 10 hairpin connections stalled)
        ip_batch(None, &format!("netns add {ns}\nlink add {veth} type veth peer name eth0 netns {ns}\nlink set {veth} master {} up\nlink set dev {veth} type bridge_slave hairpin on\n", self.bridge)).await?;
        ip_batch(Some(&ns), &format!("link set lo up\naddr add {ip}/{len} dev eth0\nlink set eth0 up\nroute add default via {gw} dev eth0\n")).await?;
        if let Some(proxy) = &self.proxy {
            // before the pod runs: its first packet to a service must be translated
            let proxy = proxy.clone();
            let name = veth.clone();
            tokio::task::spawn_blocking(move || proxy.attach(&name, Some(ip))).await.map_err(|e| e.to_string())?.map_err(|e| format!("attaching the service proxy to {veth}: {e}"))?;
        }
        Ok(PathBuf::from("/run/netns").join(ns))
    }

    /// Removes the pod's namespace (and with it both ends of its veth).
    pub async fn teardown(&self, uid: &str) -> Result<(), String> {
        let ns = netns_name(uid);
        if tokio::fs::metadata(format!("/run/netns/{ns}")).await.is_err() {
            return Ok(());
        }
        ip_batch(None, &format!("netns del {ns}\n")).await
    }
}

/// `10.0.3.0/24` → (10.0.3.0, 24), the address masked to the prefix.
pub fn parse_cidr(c: &str) -> Option<(Ipv4Addr, u32)> {
    let (ip, len) = c.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    if len > 32 {
        return None;
    }
    let mask = if len == 0 { 0 } else { !0u32 << (32 - len) };
    Some((Ipv4Addr::from(u32::from(ip) & mask), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limits() {
        let uid = "7f1c2b1e-8a3d-4e6f-9b2a-1c3d5e7f9a0b";
        assert!(veth_name(uid).len() <= 15);
        assert_eq!(veth_name(uid), veth_name(uid));
        assert_ne!(veth_name(uid), veth_name("other"));
        assert_eq!(netns_name("a/../b"), "shoal-ab");
        assert_eq!(parse_cidr("10.0.3.7/24"), Some(("10.0.3.0".parse().unwrap(), 24)));
        assert_eq!(parse_cidr("10.0.3.7/33"), None);
        assert_eq!(vtep_mac("192.168.77.11".parse().unwrap()), "0a:58:c0:a8:4d:0b");
    }
}
