//! TTL expiry: a store's queue of deadlines (one task, `CacheState::run_expiry`, serves the
//! queues of every store).
//!
//! Reads only store a timestamp in their entry. The queue holds a deadline per entry that may be
//! early; when it passes, the entry is asked for its real deadline (last read + TTL) and is
//! either rescheduled or evicted. So a hit never touches the queue, and no TTL is shortened.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Removals below this never trigger a compaction.
const COMPACT_MIN: usize = 64;

/// 16 bytes: the deadline as nanoseconds since the queue's epoch, not an `Instant` (16), and
/// a thin pointer to the entry, since the queue holds one item per cached entry (each store
/// has its own queue, so the target's type is known).
struct Item<E> {
    deadline: u64,
    target: Arc<E>,
}

impl<E> PartialEq for Item<E> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<E> Eq for Item<E> {}
impl<E> PartialOrd for Item<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Item<E> {
    // Reversed: the earliest deadline is the heap's maximum.
    fn cmp(&self, other: &Self) -> Ordering {
        other.deadline.cmp(&self.deadline)
    }
}

/// Deadlines of every entry of one store whose first fetch has completed.
///
/// An entry removed by other means than expiry (capacity, a new registration) stays in the
/// heap until its deadline; the queue counts such removals and, once they outnumber the live
/// entries, drops every item whose entry is gone. So the queue never holds more than about
/// twice the live entries, whatever the churn, and the memory of evicted entries returns soon.
pub(crate) struct ExpiryQueue<E> {
    /// Deadlines count nanoseconds from here (the cache's epoch).
    epoch: Instant,
    heap: Mutex<BinaryHeap<Item<E>>>,
    removed: AtomicUsize,
}

impl<E> ExpiryQueue<E> {
    pub(crate) fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            heap: Mutex::new(BinaryHeap::new()),
            removed: AtomicUsize::new(0),
        }
    }

    /// `at` as nanoseconds since the epoch; saturates (584 years later is never).
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BinaryHeap<Item<E>>> {
        self.heap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a deadline; returns whether it is now the queue's earliest (then the expiry task
    /// must look again).
    #[must_use]
    pub(crate) fn schedule(&self, deadline: Instant, target: Arc<E>) -> bool {
        let deadline = self.nanos(deadline);
        let mut heap = self.lock();
        let earlier = heap.peek().is_none_or(|top| deadline < top.deadline);
        heap.push(Item { deadline, target });
        earlier
    }

    pub(crate) fn pop_due(&self, now: Instant) -> Vec<Arc<E>> {
        let now = self.nanos(now);
        let mut heap = self.lock();
        let mut due = Vec::new();
        while heap.peek().is_some_and(|top| top.deadline <= now) {
            if let Some(item) = heap.pop() {
                due.push(item.target);
            }
        }
        due
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let deadline = self.lock().peek()?.deadline;
        // A deadline beyond what an `Instant` holds never comes.
        self.epoch
            .checked_add(std::time::Duration::from_nanos(deadline))
    }

    /// Counts an entry removed from its table; `live` entries remain. Returns whether the
    /// queue compacted (then the expiry task must look again: it may sleep on a deadline that
    /// is gone).
    #[must_use]
    pub(crate) fn removed(&self, live: usize, is_cached: impl Fn(&E) -> bool) -> bool {
        let removed = self.removed.fetch_add(1, AtomicOrdering::Relaxed) + 1;
        if removed > live.max(COMPACT_MIN) {
            self.compact(is_cached);
            return true;
        }
        false
    }

    /// Drops the items of entries that are no longer cached. The entries are asked outside
    /// the heap's lock (they take their table's lock, and a table lock may be held while
    /// scheduling), so items scheduled meanwhile are merged back afterwards.
    fn compact(&self, is_cached: impl Fn(&E) -> bool) {
        self.removed.store(0, AtomicOrdering::Relaxed);
        let items = std::mem::take(&mut *self.lock());
        let live: Vec<Item<E>> = items
            .into_vec()
            .into_iter()
            .filter(|item| is_cached(&item.target))
            .collect();
        self.lock().extend(live);
    }

    pub(crate) fn clear(&self) {
        let items = std::mem::take(&mut *self.lock());
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue holds an item per cached entry: bytes per entry are a benchmark goal.
    #[test]
    fn an_item_takes_16_bytes() {
        assert_eq!(std::mem::size_of::<Item<u64>>(), 16);
    }
}
