//! TTL expiry: the queue of deadlines (its task is `CacheState::run_expiry`).
//!
//! Reads only store a timestamp in their entry. The queue holds a deadline per entry that may be
//! early; when it passes, the entry is asked for its real deadline (last read + TTL) and is
//! either rescheduled or evicted. So a hit never touches the queue, and no TTL is shortened.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_listener::Event;

/// An entry the expiry queue can check.
pub(crate) trait Expirable: Send + Sync {
    /// Called once the scheduled deadline has passed: evicts the entry and returns `None`, or
    /// returns its real, later deadline.
    fn check_expiry(&self, now: Instant) -> Option<Instant>;
    /// Whether the entry is still in its table (not evicted by capacity, by a new
    /// registration of its type, or otherwise).
    fn is_cached(&self) -> bool;
}

/// Removals below this never trigger a compaction.
const COMPACT_MIN: usize = 64;

/// 24 bytes: the deadline as nanoseconds since the queue's epoch, not an `Instant` (16), since
/// the queue holds one item per cached entry.
struct Item {
    deadline: u64,
    target: Arc<dyn Expirable>,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    // Reversed: the earliest deadline is the heap's maximum.
    fn cmp(&self, other: &Self) -> Ordering {
        other.deadline.cmp(&self.deadline)
    }
}

#[derive(Default)]
struct Heap {
    items: BinaryHeap<Item>,
}

/// Deadlines of every entry whose first fetch has completed.
///
/// An entry removed by other means than expiry (capacity, a new registration) stays in the
/// heap until its deadline; the queue counts such removals and, once they outnumber the live
/// entries, drops every item whose entry is gone. So the queue never holds more than about
/// twice the live entries, whatever the churn, and the memory of evicted entries returns soon.
pub(crate) struct ExpiryQueue {
    /// Deadlines count nanoseconds from here (the cache's epoch).
    epoch: Instant,
    heap: Mutex<Heap>,
    /// Notified when a deadline earlier than every other is scheduled.
    pub(crate) earlier: Event,
    removed: AtomicUsize,
}

impl ExpiryQueue {
    pub(crate) fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            heap: Mutex::default(),
            earlier: Event::new(),
            removed: AtomicUsize::new(0),
        }
    }

    /// `at` as nanoseconds since the epoch; saturates (584 years later is never).
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    pub(crate) fn schedule(&self, deadline: Instant, target: Arc<dyn Expirable>) {
        let deadline = self.nanos(deadline);
        let mut heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        let earlier = heap.items.peek().is_none_or(|top| deadline < top.deadline);
        heap.items.push(Item { deadline, target });
        drop(heap);
        if earlier {
            self.earlier.notify(1);
        }
    }

    pub(crate) fn pop_due(&self, now: Instant) -> Vec<Arc<dyn Expirable>> {
        let now = self.nanos(now);
        let mut heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        while heap.items.peek().is_some_and(|top| top.deadline <= now) {
            if let Some(item) = heap.items.pop() {
                due.push(item.target);
            }
        }
        due
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = heap.items.peek()?.deadline;
        // A deadline beyond what an `Instant` holds never comes.
        self.epoch
            .checked_add(std::time::Duration::from_nanos(deadline))
    }

    /// Counts an entry removed from its table; `live` entries remain in the cache.
    pub(crate) fn removed(&self, live: usize) {
        let removed = self.removed.fetch_add(1, AtomicOrdering::Relaxed) + 1;
        if removed > live.max(COMPACT_MIN) {
            self.compact();
        }
    }

    /// Drops the items of entries that are no longer cached. The entries are asked outside
    /// the heap's lock (they take their table's lock, and a table lock may be held while
    /// scheduling), so items scheduled meanwhile are merged back afterwards.
    fn compact(&self) {
        self.removed.store(0, AtomicOrdering::Relaxed);
        let items = std::mem::take(&mut self.heap.lock().unwrap_or_else(|p| p.into_inner()).items);
        let live: Vec<Item> = items
            .into_vec()
            .into_iter()
            .filter(|item| item.target.is_cached())
            .collect();
        let mut heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        heap.items.extend(live);
        drop(heap);
        // The expiry task may have gone to sleep on an emptied heap.
        self.earlier.notify(1);
    }

    pub(crate) fn clear(&self) {
        let items = std::mem::take(&mut self.heap.lock().unwrap_or_else(|p| p.into_inner()).items);
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue holds an item per cached entry: bytes per entry are a benchmark goal.
    #[test]
    fn an_item_takes_24_bytes() {
        assert_eq!(std::mem::size_of::<Item>(), 24);
    }
}
