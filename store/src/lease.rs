//! Lease deadlines, kept by the member that drives expiry (the leader).
//!
//! The replicated state knows which leases exist and their TTL; only the leader knows
//! *when* they expire. A new leader (or a restarted single member) gives every lease a
//! full TTL from the moment it takes over, as etcd does, so a lease never expires early
//! because of a leader change.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// etcd's minimum TTL with default timing (1.5 × election timeout, rounded up).
pub const MIN_TTL: i64 = 2;

#[derive(Default)]
pub struct LeaseClock {
    deadlines: Mutex<HashMap<i64, (Instant, i64)>>,
}

impl LeaseClock {
    pub fn new() -> LeaseClock {
        LeaseClock::default()
    }

    /// Starts (or restarts) a lease's countdown of `ttl` seconds.
    pub fn renew(&self, id: i64, ttl: i64, now: Instant) {
        self.deadlines.lock().insert(id, (now + Duration::from_secs(ttl.max(0) as u64), ttl));
    }

    pub fn forget(&self, id: i64) {
        self.deadlines.lock().remove(&id);
    }

    /// Seconds left, rounded up, or None when the lease is unknown here.
    pub fn remaining(&self, id: i64, now: Instant) -> Option<i64> {
        self.deadlines.lock().get(&id).map(|(d, _)| {
            let left = d.saturating_duration_since(now);
            left.as_secs() as i64 + i64::from(left.subsec_nanos() > 0)
        })
    }

    /// Leases whose deadline has passed.
    pub fn expired(&self, now: Instant) -> Vec<i64> {
        self.deadlines.lock().iter().filter(|(_, (d, _))| *d <= now).map(|(id, _)| *id).collect()
    }

    /// Replaces every deadline with a full TTL from `now` (on taking over expiry duty).
    pub fn reset_all(&self, leases: impl Iterator<Item = (i64, i64)>, now: Instant) {
        let mut g = self.deadlines.lock();
        g.clear();
        for (id, ttl) in leases {
            g.insert(id, (now + Duration::from_secs(ttl.max(0) as u64), ttl));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines() {
        let c = LeaseClock::new();
        let t0 = Instant::now();
        c.renew(1, 5, t0);
        c.renew(2, 1, t0);
        assert_eq!(c.remaining(1, t0), Some(5));
        assert_eq!(c.remaining(1, t0 + Duration::from_millis(500)), Some(5));
        assert_eq!(c.expired(t0 + Duration::from_secs(2)), vec![2]);
        c.forget(2);
        assert!(c.expired(t0 + Duration::from_secs(2)).is_empty());
        assert_eq!(c.remaining(3, t0), None);
    }
}
