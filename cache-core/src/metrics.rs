//! Counters per cache type (docs/contract.md#metrics), exposed as a plain snapshot.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A snapshot of the cache's counters, one row per registered type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// One row per registered type, in registration order.
    pub types: Vec<TypeMetrics>,
}

impl Metrics {
    /// The row of the type whose name is `name` (its Rust type name unless renamed).
    pub fn get(&self, name: &str) -> Option<&TypeMetrics> {
        self.types.iter().find(|t| t.name == name)
    }

    /// The sum of every row (named `"total"`).
    pub fn total(&self) -> TypeMetrics {
        let mut total = TypeMetrics {
            name: "total".to_owned(),
            ..TypeMetrics::default()
        };
        for t in &self.types {
            total.hits += t.hits;
            total.misses_new += t.misses_new;
            total.misses_blocking += t.misses_blocking;
            total.bypasses += t.bypasses;
            total.fetch_success += t.fetch_success;
            total.fetch_not_modified += t.fetch_not_modified;
            total.fetch_errors += t.fetch_errors;
            total.fetch_errors_fatal += t.fetch_errors_fatal;
            total.expirations += t.expirations;
            total.evictions_capacity += t.evictions_capacity;
            total.entries += t.entries;
            total.watches += t.watches;
            total.failing += t.failing;
        }
        total
    }
}

/// The counters of one cache type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TypeMetrics {
    /// The type's name.
    pub name: String,
    /// Gets answered from a valid entry on the first look.
    pub hits: u64,
    /// Gets that found no value and had to wait for a fetch.
    pub misses_new: u64,
    /// Gets that found a value but blocked for a newer index (or revalidated).
    pub misses_blocking: u64,
    /// Gets with an empty key, passed straight to fetch.
    pub bypasses: u64,
    /// Completed fetches without error (including not-modified ones).
    pub fetch_success: u64,
    /// Of `fetch_success`, those that answered "not modified".
    pub fetch_not_modified: u64,
    /// Fetches that failed (including panics).
    pub fetch_errors: u64,
    /// Of `fetch_errors`, those the type classified as fatal.
    pub fetch_errors_fatal: u64,
    /// Entries removed because their TTL ran out.
    pub expirations: u64,
    /// Entries removed to respect the capacity bound.
    pub evictions_capacity: u64,
    /// Entries currently held (gauge).
    pub entries: u64,
    /// Watches currently running (gauge).
    pub watches: u64,
    /// Entries whose last fetch failed, so their fetch chain is backing off (gauge).
    pub failing: u64,
}

/// Thread indices that own a stripe; threads with higher indices share the fallback stripes.
const OWNED: usize = 32;
const SHARED: usize = 8;

/// A hit counter that costs no locked instruction on the hit path: a thread whose index (see
/// [`thread_index`]: unique among live threads) is below [`OWNED`] owns a cache-line-padded
/// stripe and bumps it with a plain load and store (no other live thread writes it); other
/// threads share [`SHARED`] stripes with `fetch_add`. Readers sum the stripes.
#[derive(Debug)]
pub(crate) struct StripedCounter {
    owned: Box<[Padded; OWNED]>,
    shared: [Padded; SHARED],
}

impl Default for StripedCounter {
    fn default() -> Self {
        Self {
            owned: Box::new(std::array::from_fn(|_| Padded::default())),
            shared: Default::default(),
        }
    }
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

/// A thread's small index: unique among live threads, and given back when the thread exits,
/// so that indices stay below the number of threads alive at once (a bench or an
/// application spawning threads over and over keeps owning its stripes).
struct ThreadIndex(usize);

/// Indices of exited threads, for the next threads to take, smallest first (so that after a
/// burst of threads the next ones own counter stripes again).
static FREE_INDICES: Mutex<BinaryHeap<Reverse<usize>>> = Mutex::new(BinaryHeap::new());
static NEXT_THREAD_INDEX: AtomicUsize = AtomicUsize::new(0);

impl ThreadIndex {
    fn claim() -> Self {
        let free = FREE_INDICES.lock().unwrap_or_else(|p| p.into_inner()).pop();
        Self(free.map_or_else(
            || NEXT_THREAD_INDEX.fetch_add(1, Ordering::Relaxed),
            |i| i.0,
        ))
    }
}

impl Drop for ThreadIndex {
    fn drop(&mut self) {
        // The mutex orders this thread's last stripe writes before the next owner's first.
        FREE_INDICES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Reverse(self.0));
    }
}

thread_local! {
    static THREAD_INDEX: ThreadIndex = ThreadIndex::claim();
}

/// This thread's index (see [`ThreadIndex`]); `usize::MAX` while the thread is exiting.
#[inline]
pub(crate) fn thread_index() -> usize {
    THREAD_INDEX.try_with(|i| i.0).unwrap_or(usize::MAX)
}

impl StripedCounter {
    #[inline]
    pub(crate) fn incr(&self) {
        self.incr_as(thread_index());
    }

    /// [`StripedCounter::incr`] for a caller that has this thread's [`thread_index`] already.
    /// It must be this thread's: an owned stripe is written without a read-modify-write, so
    /// another thread's index could lose counts.
    #[inline]
    pub(crate) fn incr_as(&self, index: usize) {
        debug_assert_eq!(index, thread_index());
        match self.owned.get(index) {
            Some(stripe) => {
                // Only this thread writes its stripe: no read-modify-write needed.
                let n = stripe.0.load(Ordering::Relaxed);
                stripe.0.store(n + 1, Ordering::Relaxed);
            }
            None => {
                self.shared[index % SHARED]
                    .0
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn get(&self) -> u64 {
        self.owned
            .iter()
            .chain(&self.shared)
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// The live counters of one type.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: StripedCounter,
    /// Striped like `hits`: every get of a miss storm counts one, from every worker at once.
    pub(crate) misses_new: StripedCounter,
    pub(crate) misses_blocking: StripedCounter,
    pub(crate) bypasses: AtomicU64,
    pub(crate) fetch_success: AtomicU64,
    pub(crate) fetch_not_modified: AtomicU64,
    pub(crate) fetch_errors: AtomicU64,
    pub(crate) fetch_errors_fatal: AtomicU64,
    pub(crate) expirations: AtomicU64,
    pub(crate) evictions_capacity: AtomicU64,
    pub(crate) entries: AtomicU64,
    pub(crate) watches: AtomicU64,
    pub(crate) failing: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self, name: &str) -> TypeMetrics {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TypeMetrics {
            name: name.to_owned(),
            hits: self.hits.get(),
            misses_new: self.misses_new.get(),
            misses_blocking: self.misses_blocking.get(),
            bypasses: load(&self.bypasses),
            fetch_success: load(&self.fetch_success),
            fetch_not_modified: load(&self.fetch_not_modified),
            fetch_errors: load(&self.fetch_errors),
            fetch_errors_fatal: load(&self.fetch_errors_fatal),
            expirations: load(&self.expirations),
            evictions_capacity: load(&self.evictions_capacity),
            entries: load(&self.entries),
            watches: load(&self.watches),
            failing: load(&self.failing),
        }
    }
}
