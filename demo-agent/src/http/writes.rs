//! Read your writes: the writes made through this agent that a cached read may not have seen
//! yet (see `kv`'s module docs).
//!
//! The common read skips the lock: a cached read of one key that no pending record can cover
//! answers from two loads of counters that only writes change, so reads on different threads
//! do not contend (with only the lock, every cached read took it, and scanned every pending
//! record, as long as any write through the agent was still unseen).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// How many counters the key filter has (a power of two).
const FILTER_SLOTS: usize = 4096;

/// The writes made through this agent that a cached read may not have seen yet: key (or
/// prefix, for a recursive delete) and index. A cached read of a key, or of a prefix over
/// it, asks the cache for at least that index; once a read has seen it, it is forgotten.
/// Bounded: past [`RecentWrites::CAPACITY`] the oldest records go first (a read then only
/// misses the guarantee for a key written thousands of writes ago and never read since).
#[derive(Debug)]
pub(crate) struct RecentWrites {
    writes: Mutex<VecDeque<Write>>,
    /// Pending key records per hash of the key (see [`slot`]); changed under the lock.
    keys: Box<[AtomicU32]>,
    /// Pending prefix records (recursive deletes); changed under the lock.
    prefixes: AtomicUsize,
    /// Pending records of either kind; changed under the lock.
    pending: AtomicUsize,
}

impl Default for RecentWrites {
    fn default() -> Self {
        Self {
            writes: Mutex::default(),
            keys: (0..FILTER_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            prefixes: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
        }
    }
}

#[derive(Debug, Clone)]
struct Write {
    key: String,
    prefix: bool,
    index: u64,
}

impl Write {
    /// Whether a read of `key` (`prefix`: everything under it) covers this write.
    fn covers(&self, key: &str, prefix: bool) -> bool {
        match (self.prefix, prefix) {
            (false, false) => self.key == key,
            (false, true) => self.key.starts_with(key),
            (true, false) => key.starts_with(&self.key),
            (true, true) => key.starts_with(&self.key) || self.key.starts_with(key),
        }
    }
}

/// The filter slot of `key` (FNV-1a).
fn slot(key: &str) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in key.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // Only the low bits count (the slot count is a power of two).
    hash as usize & (FILTER_SLOTS - 1)
}

impl RecentWrites {
    /// The most records kept.
    pub(crate) const CAPACITY: usize = 4096;

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Write>> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `write` in (`up`) or out of the filters. Called under the lock.
    fn count(&self, write: &Write, up: bool) {
        if write.prefix {
            if up {
                self.prefixes.fetch_add(1, Ordering::Release);
            } else {
                self.prefixes.fetch_sub(1, Ordering::Release);
            }
        } else if let Some(counter) = self.keys.get(slot(&write.key)) {
            if up {
                counter.fetch_add(1, Ordering::Release);
            } else {
                counter.fetch_sub(1, Ordering::Release);
            }
        }
    }

    /// Removes the records `remove` picks, counting them out. Called under the lock.
    fn forget(&self, writes: &mut VecDeque<Write>, remove: impl Fn(&Write) -> bool) {
        writes.retain(|w| {
            let removed = remove(w);
            if removed {
                self.count(w, false);
            }
            !removed
        });
    }

    /// Remembers a successful write of `key` (`prefix`: a recursive delete) at `index`.
    pub(crate) fn record(&self, key: &str, prefix: bool, index: u64) {
        let mut writes = self.lock();
        self.forget(&mut writes, |w| w.prefix == prefix && w.key == key);
        if writes.len() >= Self::CAPACITY {
            if let Some(oldest) = writes.pop_front() {
                self.count(&oldest, false);
            }
        }
        let write = Write {
            key: key.to_owned(),
            prefix,
            index,
        };
        self.count(&write, true);
        writes.push_back(write);
        self.pending.store(writes.len(), Ordering::Release);
    }

    /// The highest index of a remembered write that a read of `key` covers (0: none).
    pub(crate) fn floor(&self, key: &str, prefix: bool) -> u64 {
        if self.pending.load(Ordering::Acquire) == 0 {
            return 0;
        }
        if !prefix
            && self.prefixes.load(Ordering::Acquire) == 0
            && self
                .keys
                .get(slot(key))
                .is_none_or(|counter| counter.load(Ordering::Acquire) == 0)
        {
            // No prefix record, and no key record that hashes like this key.
            return 0;
        }
        let writes = self.lock();
        writes
            .iter()
            .filter(|w| w.covers(key, prefix))
            .map(|w| w.index)
            .max()
            .unwrap_or(0)
    }

    /// A read of `key` saw index `index`: forget the writes it covers up to that index.
    pub(crate) fn seen(&self, key: &str, prefix: bool, index: u64) {
        if self.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut writes = self.lock();
        if !writes.is_empty() {
            self.forget(&mut writes, |w| {
                let covered = if prefix {
                    w.key.starts_with(key)
                } else {
                    !w.prefix && w.key == key
                };
                covered && w.index <= index
            });
            self.pending.store(writes.len(), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_writes_cover_keys_and_prefixes_until_seen() {
        let w = RecentWrites::default();
        assert_eq!(w.floor("a", false), 0);
        w.record("app/a", false, 5);
        w.record("app/", true, 7);
        assert_eq!(w.floor("app/a", false), 7);
        assert_eq!(w.floor("app/b", false), 7);
        assert_eq!(w.floor("other", false), 0);
        assert_eq!(w.floor("ap", true), 7);
        assert_eq!(w.floor("app/a/x", true), 7);
        // A read of the key forgets only the key's own write.
        w.seen("app/a", false, 7);
        assert_eq!(w.floor("app/a", false), 7);
        // A read of the prefix at or above both forgets both.
        w.seen("app/", true, 7);
        assert_eq!(w.floor("app/a", false), 0);
        assert_eq!(w.floor("", true), 0);
    }

    /// The filters count exactly the pending records, through replacement, eviction and
    /// forgetting, so that a read skips the lock only when nothing can cover it.
    #[test]
    fn filters_follow_the_records() {
        let w = RecentWrites::default();
        let check = |w: &RecentWrites| {
            let writes = w.lock();
            let prefixes = writes.iter().filter(|x| x.prefix).count();
            assert_eq!(w.prefixes.load(Ordering::Relaxed), prefixes);
            for (n, counter) in w.keys.iter().enumerate() {
                let keys = writes
                    .iter()
                    .filter(|x| !x.prefix && slot(&x.key) == n)
                    .count();
                assert_eq!(counter.load(Ordering::Relaxed) as usize, keys, "slot {n}");
            }
        };
        w.record("a", false, 1);
        w.record("a", false, 2);
        w.record("b/", true, 3);
        w.record("b/", true, 4);
        check(&w);
        assert_eq!(w.floor("a", false), 2);
        assert_eq!(w.floor("b/c", false), 4);
        assert_eq!(w.floor("c", false), 0);
        w.seen("a", false, 2);
        check(&w);
        assert_eq!(w.floor("a", false), 0);
        w.seen("b/", true, 4);
        check(&w);
        assert_eq!(w.floor("b/c", false), 0);
        for n in 0..RecentWrites::CAPACITY + 10 {
            w.record(&format!("k{n}"), n % 100 == 0, n as u64 + 1);
        }
        check(&w);
        assert_eq!(w.lock().len(), RecentWrites::CAPACITY);
        // The oldest went first.
        assert_eq!(w.floor("k5", false), 0);
        let last = RecentWrites::CAPACITY + 9;
        assert_eq!(w.floor(&format!("k{last}"), false), last as u64 + 1);
        w.seen("", true, u64::MAX);
        check(&w);
        assert_eq!(w.floor("k4000", false), 0);
    }
}
