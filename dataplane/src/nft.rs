//! The nftables service proxy: the fallback where the BPF programs cannot be loaded, and
//! `--proxy-mode nftables`.
//!
//! One table, `ip shoal-proxy`, laid out as kube-proxy's nftables mode: a verdict map from
//! (address, protocol, port) to a chain per service port, which picks an endpoint chain
//! with `numgen random`; the endpoint chain marks hairpin traffic (a pod reaching itself)
//! for masquerade and DNATs. Frontends without endpoints sit in a second map whose verdict
//! rejects in the filter hooks (ICMP port unreachable, as the BPF programs and kube-proxy
//! do). The kernel's conntrack keeps flows on their endpoint and reverses replies. Each
//! batch of changes is one `nft -f -` transaction (atomic); a service port's change
//! rewrites only its own chains and map elements.
//!
//! Not here (BPF only): ClientIP affinity, externalTrafficPolicy Local's source keeping,
//! NodePorts from outside (pod traffic only), and removed endpoints' flows are not cut.
use std::collections::HashMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::abi::Proto;
use crate::table::{slot_endpoints, ServicePort};

const HAIRPIN_MARK: u32 = 0x4000;

/// What one service port holds in the table.
struct Installed {
    id: u32,
    /// (address, protocol, port, had endpoints) of each frontend element.
    elements: Vec<(Ipv4Addr, Proto, u16, bool)>,
    endpoint_chains: usize,
}

/// The nftables table and what each service port put in it.
pub struct Nft {
    table: String,
    ports: HashMap<String, Installed>,
    next_id: u32,
    free: Vec<u32>,
    /// Commands of the current batch.
    script: String,
    /// Which port's element each frontend is (and in which map): two Services may name
    /// the same address and port; the later one takes it.
    owners: HashMap<(Ipv4Addr, Proto, u16), (String, bool)>,
}

fn proto(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// The table of NetworkPolicy in nftables mode (`policy::Policies::nft_script`).
pub const POLICY_TABLE: &str = "shoal-policy";

/// Runs an nft script as one transaction.
pub fn run(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().map_err(|e| format!("running nft: {e} (apt-get install nftables)"))?;
    child.stdin.take().expect("piped").write_all(script.as_bytes()).map_err(|e| format!("writing to nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("waiting for nft: {e}"))?;
    if !out.status.success() {
        return Err(format!("nft: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

impl Nft {
    /// Creates the table (replacing one left by an earlier run: the first full sync fills
    /// it again).
    pub fn new(table: &str) -> Result<Nft, String> {
        let mut nft = Nft::fresh(table);
        nft.commit()?;
        Ok(nft)
    }

    /// As `new`, with the table's creation queued in the batch instead of run: a rebuild
    /// and its services then apply in one transaction.
    pub fn fresh(table: &str) -> Nft {
        let t = table;
        let base = format!(
            "table ip {t}\ndelete table ip {t}\ntable ip {t} {{
  map services {{ type ipv4_addr . inet_proto . inet_service : verdict; }}
  map no-endpoints {{ type ipv4_addr . inet_proto . inet_service : verdict; }}
  chain prerouting {{ type nat hook prerouting priority -100; policy accept; ip daddr . meta l4proto . th dport vmap @services; }}
  chain output {{ type nat hook output priority -100; policy accept; ip daddr . meta l4proto . th dport vmap @services; }}
  chain postrouting {{ type nat hook postrouting priority 100; policy accept; meta mark & {HAIRPIN_MARK:#x} == {HAIRPIN_MARK:#x} masquerade; }}
  chain reject-chain {{ reject with icmp type port-unreachable; }}
  chain filter-forward {{ type filter hook forward priority 0; policy accept; ip daddr . meta l4proto . th dport vmap @no-endpoints; }}
  chain filter-output {{ type filter hook output priority 0; policy accept; ip daddr . meta l4proto . th dport vmap @no-endpoints; }}
  chain filter-input {{ type filter hook input priority 0; policy accept; ip daddr . meta l4proto . th dport vmap @no-endpoints; }}
}}\n"
        );
        Nft { table: table.to_string(), ports: HashMap::new(), next_id: 0, free: Vec::new(), script: base, owners: HashMap::new() }
    }

    pub fn table_name(&self) -> &str {
        &self.table
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// Queues the commands that make the table hold `want` for the port `name` (None:
    /// remove it); `commit` applies the batch.
    pub fn sync(&mut self, name: &str, want: Option<&ServicePort>) {
        let t = self.table.clone();
        let s = &mut self.script;
        let cur = self.ports.remove(name);
        // frontends that go (or change map) lose their elements first
        let mut new_elements: Vec<(Ipv4Addr, Proto, u16, bool)> = match want {
            Some(w) => {
                let has = !slot_endpoints(&w.endpoints).is_empty();
                w.frontends.iter().map(|f| (f.addr, w.proto, f.port, has)).collect()
            }
            None => vec![],
        };
        new_elements.sort();
        new_elements.dedup();
        let map_of = |has: bool| if has { "services" } else { "no-endpoints" };
        if let Some(c) = &cur {
            for e in c.elements.iter().filter(|e| !new_elements.contains(e)) {
                // an element another port took over is that port's now
                if self.owners.get(&(e.0, e.1, e.2)).is_some_and(|(o, _)| o != name) {
                    continue;
                }
                self.owners.remove(&(e.0, e.1, e.2));
                s.push_str(&format!("delete element ip {t} {} {{ {} . {} . {} }}\n", map_of(e.3), e.0, proto(e.1), e.2));
            }
        }
        let Some(want) = want else {
            if let Some(c) = cur {
                s.push_str(&format!("flush chain ip {t} svc_{id}\ndelete chain ip {t} svc_{id}\n", id = c.id));
                for i in 0..c.endpoint_chains {
                    s.push_str(&format!("flush chain ip {t} ep_{id}_{i}\ndelete chain ip {t} ep_{id}_{i}\n", id = c.id));
                }
                self.free.push(c.id);
            }
            return;
        };
        let id = cur.as_ref().map(|c| c.id).unwrap_or_else(|| {
            self.free.pop().unwrap_or_else(|| {
                self.next_id += 1;
                self.next_id
            })
        });
        let eps = slot_endpoints(&want.endpoints);
        let p = proto(want.proto);
        s.push_str(&format!("add chain ip {t} svc_{id}\nflush chain ip {t} svc_{id}\n"));
        for (i, e) in eps.iter().enumerate() {
            s.push_str(&format!("add chain ip {t} ep_{id}_{i}\nflush chain ip {t} ep_{id}_{i}\n"));
            s.push_str(&format!("add rule ip {t} ep_{id}_{i} ip saddr {a} meta mark set meta mark | {HAIRPIN_MARK:#x}\n", a = e.addr));
            s.push_str(&format!("add rule ip {t} ep_{id}_{i} meta l4proto {p} dnat to {}:{}\n", e.addr, e.port));
        }
        if !eps.is_empty() {
            let arms: Vec<String> = (0..eps.len()).map(|i| format!("{i} : goto ep_{id}_{i}")).collect();
            s.push_str(&format!("add rule ip {t} svc_{id} numgen random mod {} vmap {{ {} }}\n", eps.len(), arms.join(", ")));
        }
        let old_chains = cur.as_ref().map_or(0, |c| c.endpoint_chains);
        for i in eps.len()..old_chains {
            s.push_str(&format!("flush chain ip {t} ep_{id}_{i}\ndelete chain ip {t} ep_{id}_{i}\n"));
        }
        let old_elements = cur.map(|c| c.elements).unwrap_or_default();
        let to_add: Vec<(Ipv4Addr, Proto, u16, bool)> = new_elements.iter().filter(|e| !old_elements.contains(e) || self.owners.get(&(e.0, e.1, e.2)).is_some_and(|(o, _)| o != name)).copied().collect();
        for e in &to_add {
            // taking a frontend over from another port: its element goes first (the
            // kernel refuses a second element with the same key)
            if let Some((other, has)) = self.owners.get(&(e.0, e.1, e.2)).filter(|(o, _)| o != name) {
                tracing::warn!(frontend = %format!("{}:{}/{}", e.0, e.2, proto(e.1)), from = %other, to = name, "two services name the same frontend; the later one takes it");
                s.push_str(&format!("delete element ip {t} {} {{ {} . {} . {} }}\n", map_of(*has), e.0, proto(e.1), e.2));
            }
            self.owners.insert((e.0, e.1, e.2), (name.to_string(), e.3));
            if e.3 {
                s.push_str(&format!("add element ip {t} services {{ {} . {} . {} : goto svc_{id} }}\n", e.0, p, e.2));
            } else {
                s.push_str(&format!("add element ip {t} no-endpoints {{ {} . {} . {} : goto reject-chain }}\n", e.0, p, e.2));
            }
        }
        self.ports.insert(name.to_string(), Installed { id, elements: new_elements, endpoint_chains: eps.len() });
    }

    /// Applies the queued commands as one transaction. On failure nothing of the batch
    /// applies; the table is rebuilt from what is wanted on the next full sync.
    pub fn commit(&mut self) -> Result<(), String> {
        if self.script.is_empty() {
            return Ok(());
        }
        let script = std::mem::take(&mut self.script);
        run(&script)
    }

    /// Removes the table.
    pub fn remove(self) -> Result<(), String> {
        run(&format!("delete table ip {}\n", self.table))
    }
}
