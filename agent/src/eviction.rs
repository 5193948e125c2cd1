//! Node pressure, as the kubelet's eviction manager sees it: hard thresholds
//! (`--eviction-hard memory.available<100Mi,nodefs.available<10%,pid.available<1000`), the
//! node's observed signals, the resulting MemoryPressure/DiskPressure/PIDPressure
//! conditions, and which pod goes first when memory runs short (BestEffort, then
//! Burstable, then Guaranteed; within a class the pod using most memory above its request).

use std::path::Path;

/// A threshold: an absolute amount or a percentage of capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Amount {
    Bytes(u64),
    Percent(f64),
}

impl Amount {
    fn bytes_of(self, capacity: u64) -> u64 {
        match self {
            Amount::Bytes(b) => b,
            Amount::Percent(p) => (capacity as f64 * p / 100.0) as u64,
        }
    }
}

/// Hard eviction thresholds (upstream's defaults: memory.available<100Mi,
/// nodefs.available<10%, pid.available<5%... Shoal leaves PIDs unchecked by default).
#[derive(Clone, Debug, PartialEq)]
pub struct Thresholds {
    pub memory_available: Option<Amount>,
    pub nodefs_available: Option<Amount>,
    pub pid_available: Option<Amount>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { memory_available: Some(Amount::Bytes(100 << 20)), nodefs_available: Some(Amount::Percent(10.0)), pid_available: None }
    }
}

impl Thresholds {
    /// Parses `--eviction-hard` (`signal<quantity` pairs separated by commas; `""` for none).
    pub fn parse(s: &str) -> Result<Thresholds, String> {
        let mut t = Thresholds { memory_available: None, nodefs_available: None, pid_available: None };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (signal, v) = part.split_once('<').ok_or_else(|| format!("eviction threshold {part:?} is not signal<quantity"))?;
            let amount = if let Some(p) = v.strip_suffix('%') {
                let p: f64 = p.parse().map_err(|_| format!("eviction threshold {part:?}: {v:?} is not a percentage"))?;
                if !(0.0..=100.0).contains(&p) {
                    return Err(format!("eviction threshold {part:?}: percentage must be between 0 and 100"));
                }
                Amount::Percent(p)
            } else {
                let m = shoal_client::quantity::parse(v).filter(|m| *m >= 0).ok_or_else(|| format!("eviction threshold {part:?}: {v:?} is not a quantity"))?;
                Amount::Bytes((m / 1000) as u64)
            };
            match signal {
                "memory.available" => t.memory_available = Some(amount),
                "nodefs.available" => t.nodefs_available = Some(amount),
                "pid.available" => t.pid_available = Some(amount),
                s => return Err(format!("unknown eviction signal {s:?} (memory.available, nodefs.available, pid.available)")),
            }
        }
        Ok(t)
    }
}

/// What the node has left.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observed {
    pub memory_available: u64,
    pub memory_capacity: u64,
    pub nodefs_available: u64,
    pub nodefs_capacity: u64,
    pub pids_available: u64,
    pub pids_capacity: u64,
}

impl Observed {
    /// Reads the node's signals (memory from /proc/meminfo, the filesystem holding
    /// `data_dir`, processes against pid_max).
    pub fn read(data_dir: &Path) -> Observed {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kb = |k: &str| meminfo.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0) * 1024;
        let (fs_avail, fs_cap) = match rustix::fs::statvfs(data_dir) {
            Ok(s) => (s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize),
            Err(_) => (0, 0),
        };
        let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(32768);
        let procs = std::fs::read_dir("/proc").map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit())).count() as u64).unwrap_or(0);
        Observed { memory_available: kb("MemAvailable:"), memory_capacity: kb("MemTotal:"), nodefs_available: fs_avail, nodefs_capacity: fs_cap, pids_available: pid_max.saturating_sub(procs), pids_capacity: pid_max }
    }
}

/// Which pressures the node is under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pressure {
    pub memory: bool,
    pub disk: bool,
    pub pid: bool,
}

/// The pressures `o` puts the node under, given `t`.
pub fn pressure(t: &Thresholds, o: &Observed) -> Pressure {
    let under = |th: Option<Amount>, avail: u64, cap: u64| th.is_some_and(|a| cap > 0 && avail < a.bytes_of(cap));
    Pressure {
        memory: under(t.memory_available, o.memory_available, o.memory_capacity),
        disk: under(t.nodefs_available, o.nodefs_available, o.nodefs_capacity),
        pid: under(t.pid_available, o.pids_available, o.pids_capacity),
    }
}

/// A pod as the eviction ranking sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub key: String,
    pub qos: String,
    pub memory_usage: u64,
    pub memory_request: u64,
}

/// The pod to evict first under memory pressure.
pub fn victim(pods: &[Candidate]) -> Option<&Candidate> {
    let class = |q: &str| match q {
        "BestEffort" => 0,
        "Burstable" => 1,
        _ => 2,
    };
    pods.iter().min_by_key(|p| (class(&p.qos), std::cmp::Reverse(p.memory_usage.saturating_sub(p.memory_request)), std::cmp::Reverse(p.memory_usage)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_and_judge() {
        let t = Thresholds::parse("memory.available<100Mi, nodefs.available<10%").unwrap();
        assert_eq!(t.memory_available, Some(Amount::Bytes(100 << 20)));
        assert_eq!(t.nodefs_available, Some(Amount::Percent(10.0)));
        assert!(Thresholds::parse("memory.free<1Gi").unwrap_err().contains("unknown eviction signal"));
        assert!(Thresholds::parse("memory.available<lots").is_err());
        assert!(Thresholds::parse("nodefs.available<120%").is_err());
        assert_eq!(Thresholds::parse("").unwrap().memory_available, None);
        let o = Observed { memory_available: 50 << 20, memory_capacity: 8 << 30, nodefs_available: 20, nodefs_capacity: 100, pids_available: 10, pids_capacity: 100 };
        assert_eq!(pressure(&t, &o), Pressure { memory: true, disk: false, pid: false });
        let o = Observed { nodefs_available: 5, ..o };
        assert!(pressure(&t, &o).disk);
    }

    #[test]
    fn best_effort_pods_go_first_then_the_largest_over_request() {
        let c = |k: &str, q: &str, u: u64, r: u64| Candidate { key: k.into(), qos: q.into(), memory_usage: u, memory_request: r };
        let pods = vec![c("g", "Guaranteed", 900, 100), c("b1", "Burstable", 500, 100), c("b2", "Burstable", 600, 500), c("be", "BestEffort", 10, 0)];
        assert_eq!(victim(&pods).unwrap().key, "be");
        assert_eq!(victim(&pods[..3]).unwrap().key, "b1", "most above its request");
        assert!(victim(&[]).is_none());
    }
}
