//! Work queues: each key is queued at most once, is never processed by two workers at once,
//! and failed keys come back after an exponential backoff (5 ms doubling to 30 s), as
//! client-go's rate-limited queues.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
struct Inner {
    queue: VecDeque<String>,
    queued: HashSet<String>,
    processing: HashSet<String>,
    /// Added while being processed: queued again when done.
    dirty: HashSet<String>,
    failures: HashMap<String, u32>,
}

#[derive(Clone, Default)]
pub struct WorkQueue {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

impl WorkQueue {
    pub fn add(&self, key: &str) {
        let mut g = self.inner.lock();
        if g.processing.contains(key) {
            g.dirty.insert(key.to_string());
            return;
        }
        if g.queued.insert(key.to_string()) {
            g.queue.push_back(key.to_string());
            drop(g);
            self.notify.notify_one();
        }
    }

    /// The next key to work on (waits for one).
    pub async fn next(&self) -> String {
        loop {
            {
                let mut g = self.inner.lock();
                if let Some(k) = g.queue.pop_front() {
                    g.queued.remove(&k);
                    g.processing.insert(k.clone());
                    return k;
                }
            }
            self.notify.notified().await;
        }
    }

    /// Marks `key` done; `ok == false` re-queues it after a backoff.
    pub fn done(&self, key: &str, ok: bool) {
        let mut g = self.inner.lock();
        g.processing.remove(key);
        let dirty = g.dirty.remove(key);
        if ok {
            g.failures.remove(key);
        } else {
            let n = g.failures.entry(key.to_string()).or_insert(0);
            *n += 1;
            let delay = Duration::from_millis(5u64.saturating_mul(1 << (*n).min(13))).min(Duration::from_secs(30));
            let q = self.clone();
            let k = key.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                q.add(&k);
            });
        }
        drop(g);
        if dirty {
            self.add(key);
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_deduplicated_and_not_processed_twice() {
        let q = WorkQueue::default();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.len(), 2);
        let k = q.next().await;
        assert_eq!(k, "a");
        q.add("a"); // while processing: comes back once done
        assert_eq!(q.len(), 1);
        q.done("a", true);
        assert_eq!(q.next().await, "b");
        assert_eq!(q.next().await, "a");
        q.done("a", false);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(q.next().await, "a", "a failed key returns after its backoff");
    }
}
