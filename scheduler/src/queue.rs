//! The scheduling queue, as upstream's: an active queue ordered by priority then age, a
//! backoff queue (1 s doubling to 10 s per failed attempt), and the unschedulable pods,
//! which go back to the active queue only when the cluster changes in a way that could
//! help them (a node added or changed, a pod deleted) or after 5 minutes at the latest.
//! Workers are threads: `pop` blocks on a condition variable.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::model::PodInfo;

const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const MAX_UNSCHEDULABLE: Duration = Duration::from_secs(300);

#[derive(PartialEq, Eq)]
struct Ready {
    priority: i32,
    seq: u64,
    key: Arc<str>,
}

impl Ord for Ready {
    fn cmp(&self, o: &Self) -> Ordering {
        // Higher priority first, then first in first out.
        self.priority.cmp(&o.priority).then(o.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Ready {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

enum Place {
    Active,
    Backoff,
    Unschedulable(Instant),
    /// Popped by a worker; the newest version waits here until the worker reports back.
    InFlight,
}

struct Entry {
    pod: Arc<PodInfo>,
    attempts: u32,
    place: Place,
    /// Heap entries carry this; stale ones (older seq) are skipped.
    seq: u64,
    /// Deleted or bound while in flight: forget it when the worker reports back.
    gone: bool,
    /// `Inner::moves` when it was popped: a cluster change after that may have made it
    /// schedulable, so it must not be parked as unschedulable (upstream's move request
    /// cycle).
    popped_at_move: u64,
}

#[derive(Default)]
struct Inner {
    pods: HashMap<Arc<str>, Entry>,
    active: BinaryHeap<Ready>,
    backoff: BinaryHeap<Reverse<(Instant, u64, Arc<str>)>>,
    seq: u64,
    /// Counts the cluster changes that could help unschedulable pods.
    moves: u64,
    closed: bool,
}

/// Queue sizes, for metrics and `shoal admin scheduler queue`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub active: usize,
    pub backoff: usize,
    pub unschedulable: usize,
    pub in_flight: usize,
}

/// A pod handed to a worker.
pub struct Popped {
    pub key: Arc<str>,
    pub pod: Arc<PodInfo>,
    pub attempts: u32,
}

#[derive(Default)]
pub struct Queue {
    inner: Mutex<Inner>,
    cv: Condvar,
}

fn backoff_for(attempts: u32) -> Duration {
    INITIAL_BACKOFF.saturating_mul(1 << attempts.saturating_sub(1).min(4)).min(MAX_BACKOFF)
}

impl Inner {
    fn activate(&mut self, key: &Arc<str>) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(e) = self.pods.get_mut(key) {
            e.place = Place::Active;
            e.seq = seq;
            self.active.push(Ready { priority: e.pod.priority, seq, key: key.clone() });
        }
    }

    fn to_backoff(&mut self, key: &Arc<str>, until: Instant) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(e) = self.pods.get_mut(key) {
            e.place = Place::Backoff;
            e.seq = seq;
            self.backoff.push(Reverse((until, seq, key.clone())));
        }
    }

    /// Moves backoff entries whose time has come to the active queue.
    fn flush_backoff(&mut self, now: Instant) {
        while let Some(Reverse((at, seq, _))) = self.backoff.peek() {
            if *at > now {
                break;
            }
            let seq = *seq;
            let Some(Reverse((_, _, key))) = self.backoff.pop() else { break };
            if self.pods.get(&key).is_some_and(|e| e.seq == seq && matches!(e.place, Place::Backoff)) {
                self.activate(&key);
            }
        }
    }
}

impl Queue {
    /// A pending pod, new or changed. A pod already waiting keeps its place in line.
    pub fn add(&self, pod: PodInfo) {
        let key: Arc<str> = Arc::from(pod.key());
        let pod = Arc::new(pod);
        let mut q = self.inner.lock();
        match q.pods.get_mut(&key) {
            Some(e) => {
                e.pod = pod;
                e.gone = false;
                // A change may make an unschedulable pod schedulable.
                if let Place::Unschedulable(_) = e.place {
                    let attempts = e.attempts;
                    q.to_backoff(&key, Instant::now() + backoff_for(attempts));
                }
            }
            None => {
                q.pods.insert(key.clone(), Entry { pod, attempts: 0, place: Place::Active, seq: 0, gone: false, popped_at_move: 0 });
                q.activate(&key);
                self.cv.notify_one();
            }
        }
    }

    /// The pod was deleted or bound by someone else.
    pub fn remove(&self, key: &str) {
        let mut q = self.inner.lock();
        if let Some(e) = q.pods.get_mut(key) {
            if matches!(e.place, Place::InFlight) {
                e.gone = true;
            } else {
                q.pods.remove(key);
            }
        }
    }

    /// The next pod to schedule; waits up to `timeout`.
    pub fn pop(&self, timeout: Duration) -> Option<Popped> {
        let deadline = Instant::now() + timeout;
        let mut q = self.inner.lock();
        loop {
            if q.closed {
                return None;
            }
            let now = Instant::now();
            q.flush_backoff(now);
            while let Some(r) = q.active.pop() {
                let live = q.pods.get(&r.key).is_some_and(|e| e.seq == r.seq && matches!(e.place, Place::Active));
                if live {
                    let moves = q.moves;
                    let e = q.pods.get_mut(&r.key).expect("checked just above");
                    e.popped_at_move = moves;
                    e.place = Place::InFlight;
                    e.attempts += 1;
                    return Some(Popped { key: r.key, pod: e.pod.clone(), attempts: e.attempts });
                }
            }
            if now >= deadline {
                return None;
            }
            let next_backoff = q.backoff.peek().map(|Reverse((at, _, _))| *at);
            let wake = next_backoff.map_or(deadline, |b| b.min(deadline));
            self.cv.wait_until(&mut q, wake);
        }
    }

    /// The worker placed the pod (the binding is on its way): it leaves the queue.
    pub fn done(&self, key: &str) {
        self.inner.lock().pods.remove(key);
    }

    /// No node fits now: park the pod until the cluster changes (or, if it changed while
    /// the pod was being decided, back off and try again).
    pub fn unschedulable(&self, key: &Arc<str>) {
        let mut q = self.inner.lock();
        let moves = q.moves;
        let Some(e) = q.pods.get_mut(key) else { return };
        if e.gone {
            q.pods.remove(key);
            return;
        }
        if e.popped_at_move != moves {
            let until = Instant::now() + backoff_for(e.attempts);
            q.to_backoff(key, until);
            self.cv.notify_one();
            return;
        }
        e.place = Place::Unschedulable(Instant::now());
    }

    /// An error unrelated to fit (a failed binding): retry after the backoff.
    pub fn retry(&self, key: &Arc<str>) {
        let mut q = self.inner.lock();
        let Some(e) = q.pods.get(key) else { return };
        if e.gone {
            q.pods.remove(key);
            return;
        }
        let until = Instant::now() + backoff_for(e.attempts);
        q.to_backoff(key, until);
        self.cv.notify_one();
    }

    /// A pod already placed goes back to be scheduled again (its binding failed).
    pub fn requeue(&self, pod: Arc<PodInfo>, attempts: u32) {
        let key: Arc<str> = Arc::from(pod.key());
        let mut q = self.inner.lock();
        q.pods.entry(key.clone()).or_insert(Entry { pod, attempts, place: Place::InFlight, seq: 0, gone: false, popped_at_move: 0 });
        let until = Instant::now() + backoff_for(attempts);
        q.to_backoff(&key, until);
        self.cv.notify_one();
    }

    /// The cluster changed in a way that may let unschedulable pods fit: they go to the
    /// backoff queue (or the active queue when their backoff is over). Also releases pods
    /// parked longer than 5 minutes.
    pub fn cluster_changed(&self, could_help: bool) {
        let mut q = self.inner.lock();
        if could_help {
            q.moves += 1;
        }
        let now = Instant::now();
        let keys: Vec<(Arc<str>, u32)> = q
            .pods
            .iter()
            .filter(|(_, e)| matches!(e.place, Place::Unschedulable(since) if could_help || now.duration_since(since) > MAX_UNSCHEDULABLE))
            .map(|(k, e)| (k.clone(), e.attempts))
            .collect();
        let moved = !keys.is_empty();
        for (k, attempts) in keys {
            q.to_backoff(&k, now + backoff_for(attempts));
        }
        if moved {
            self.cv.notify_all();
        }
    }

    /// The waiting pod with this `namespace/name` key, if it is in the queue.
    pub fn get(&self, key: &str) -> Option<Arc<PodInfo>> {
        self.inner.lock().pods.get(key).map(|e| e.pod.clone())
    }

    pub fn stats(&self) -> Stats {
        let q = self.inner.lock();
        let mut s = Stats::default();
        for e in q.pods.values() {
            match e.place {
                Place::Active => s.active += 1,
                Place::Backoff => s.backoff += 1,
                Place::Unschedulable(_) => s.unschedulable += 1,
                Place::InFlight => s.in_flight += 1,
            }
        }
        s
    }

    /// Wakes every waiting worker and makes `pop` return None from now on.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Interner;
    use serde_json::json;

    fn pod(name: &str, priority: i64) -> PodInfo {
        PodInfo::from_value(&json!({"metadata": {"name": name, "namespace": "d", "uid": name}, "spec": {"priority": priority, "containers": []}}), &mut Interner::default())
    }

    #[test]
    fn priority_then_age() {
        let q = Queue::default();
        q.add(pod("low-1", 0));
        q.add(pod("high", 10));
        q.add(pod("low-2", 0));
        let order: Vec<String> = (0..3).map(|_| q.pop(Duration::ZERO).unwrap().key.to_string()).collect();
        assert_eq!(order, ["d/high", "d/low-1", "d/low-2"]);
        assert!(q.pop(Duration::ZERO).is_none());
    }

    #[test]
    fn unschedulable_pods_wait_for_a_cluster_change_then_back_off() {
        let q = Queue::default();
        q.add(pod("a", 0));
        let p = q.pop(Duration::ZERO).unwrap();
        q.unschedulable(&p.key);
        assert_eq!(q.stats(), Stats { unschedulable: 1, ..Stats::default() });
        q.cluster_changed(false);
        assert!(q.pop(Duration::ZERO).is_none(), "nothing changed that could help");
        q.cluster_changed(true);
        assert_eq!(q.stats().backoff, 1);
        assert!(q.pop(Duration::ZERO).is_none(), "still backing off");
        let again = q.pop(Duration::from_secs(3)).expect("out of backoff after 1 s");
        assert_eq!((again.key.as_ref(), again.attempts), ("d/a", 2));
        q.done(&again.key);
        assert_eq!(q.stats(), Stats::default());
    }

    #[test]
    fn deletions_while_in_flight_are_honoured() {
        let q = Queue::default();
        q.add(pod("a", 0));
        let p = q.pop(Duration::ZERO).unwrap();
        q.remove("d/a");
        q.unschedulable(&p.key);
        assert_eq!(q.stats(), Stats::default());
        // An update of a waiting pod keeps one entry.
        q.add(pod("b", 0));
        q.add(pod("b", 0));
        assert_eq!(q.stats().active, 1);
        assert!(q.pop(Duration::ZERO).is_some());
        assert!(q.pop(Duration::ZERO).is_none());
    }

    #[test]
    fn a_change_during_the_attempt_is_not_lost() {
        let q = Queue::default();
        q.add(pod("a", 0));
        let p = q.pop(Duration::ZERO).unwrap();
        q.cluster_changed(true); // e.g. a node was added while the pod was being decided
        q.unschedulable(&p.key);
        assert_eq!(q.stats().backoff, 1, "not parked: the change may have made it fit");
    }

    #[test]
    fn backoff_grows_to_ten_seconds() {
        assert_eq!(backoff_for(1), Duration::from_secs(1));
        assert_eq!(backoff_for(2), Duration::from_secs(2));
        assert_eq!(backoff_for(4), Duration::from_secs(8));
        assert_eq!(backoff_for(9), Duration::from_secs(10));
    }
}
