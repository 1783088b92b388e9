//! A store's hash tables: [`SHARDS`] tables, each behind a reader-striped lock.
//!
//! A plain `RwLock` counts its readers in one word, so every read, from any core, writes the
//! same cache line, and two cores reading different keys of one shard pass that line back
//! and forth. Here each shard has one lock per *stripe*, and a thread reads under its own
//! stripe's lock only: readers on different cores write different lines, which stay in their
//! own caches. A writer takes the shard's lock in every stripe, in stripe order. The stripes
//! are stored stripe-major, so one thread's locks for all the shards sit in a few lines of
//! their own.
//!
//! Writers pay one lock per stripe; the stripe count follows the machine's parallelism, at
//! most [`MAX_STRIPES`].

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::HashTable;

use crate::metrics::thread_index;

/// Tables per store. Few enough that a thread's lock lines and the table headers stay in its
/// first-level cache beside the entries a hit reads (16 timed 1–3 ns a hit faster than 64);
/// enough that writers of different keys seldom meet (readers on different stripes write
/// different lines whatever the count). The price: a table's resize, under its write lock,
/// moves a sixteenth of the type's entries.
pub(crate) const SHARDS: usize = 16;

/// At most this many stripes, however many cores: a writer takes one lock per stripe.
pub(crate) const MAX_STRIPES: usize = 8;

/// The tables and their striped locks.
pub(crate) struct Shards<S> {
    tables: Box<[Table<S>]>,
    stripes: Box<[Stripe]>,
}

/// One shard's table; on its own line, since writers update its header.
#[repr(align(64))]
struct Table<S>(UnsafeCell<HashTable<S>>);

/// One stripe: a lock per shard, each on its own line, so that a writer of one shard leaves
/// the other shards' locks in their readers' caches, and two threads that share a stripe
/// contend only on the same shard.
struct Stripe([Lock; SHARDS]);

#[repr(align(64))]
struct Lock(RwLock<()>);

// SAFETY: a table is reached only through `ReadGuard` (holding its shard's lock in one
// stripe, shared) and `WriteGuard` (holding its shard's lock in every stripe, exclusive), so
// shared access never overlaps exclusive access, as with `RwLock<HashTable<S>>`, whose rules
// these are.
unsafe impl<S: Send + Sync> Sync for Shards<S> {}
// SAFETY: moving the shards moves the tables, nothing thread-bound.
unsafe impl<S: Send> Send for Shards<S> {}

/// The shard of a hash: its middle bits (hashbrown uses the low bits for buckets and the top 7
/// for tags).
#[inline]
pub(crate) fn shard_of(hash: u64) -> usize {
    ((hash >> 32) as usize) % SHARDS
}

/// The stripe count: the machine's parallelism, rounded up to a power of two, at most
/// [`MAX_STRIPES`]. A power of two keeps the stripe choice a mask.
fn stripe_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .next_power_of_two()
            .min(MAX_STRIPES)
    })
}

impl<S> Shards<S> {
    pub(crate) fn new() -> Self {
        Self {
            tables: (0..SHARDS)
                .map(|_| Table(UnsafeCell::new(HashTable::new())))
                .collect(),
            stripes: (0..stripe_count())
                .map(|_| Stripe(std::array::from_fn(|_| Lock(RwLock::new(())))))
                .collect(),
        }
    }

    /// Shared access to shard `shard`'s table, under this thread's stripe.
    #[inline]
    pub(crate) fn read(&self, shard: usize) -> ReadGuard<'_, S> {
        self.read_as(shard, thread_index())
    }

    /// [`Shards::read`] for a caller that has this thread's [`thread_index`] already (any
    /// index is sound; another thread's only adds contention).
    #[inline]
    pub(crate) fn read_as(&self, shard: usize, thread: usize) -> ReadGuard<'_, S> {
        debug_assert_eq!(thread, thread_index());
        let stripe = &self.stripes[thread & (self.stripes.len() - 1)];
        let lock = stripe.0[shard].0.read().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the shard's lock in one stripe is held shared for the guard's life, so no
        // `WriteGuard` of the shard exists meanwhile (see `Sync` above).
        let table = unsafe { &*self.tables[shard].0.get() };
        ReadGuard { table, _lock: lock }
    }

    /// Exclusive access to shard `shard`'s table, under every stripe.
    pub(crate) fn write(&self, shard: usize) -> WriteGuard<'_, S> {
        // Every stripe must be locked: `new` makes at most `MAX_STRIPES`.
        debug_assert!(self.stripes.len() <= MAX_STRIPES);
        let mut locks: [Option<RwLockWriteGuard<'_, ()>>; MAX_STRIPES] = Default::default();
        for (slot, stripe) in locks.iter_mut().zip(self.stripes.iter()) {
            *slot = Some(stripe.0[shard].0.write().unwrap_or_else(|p| p.into_inner()));
        }
        // SAFETY: the shard's lock is held exclusively in every stripe (`new` makes at most
        // `MAX_STRIPES` stripes, all of them zipped above) for the guard's life, so no other
        // guard of the shard exists meanwhile.
        let table = unsafe { &mut *self.tables[shard].0.get() };
        WriteGuard {
            table,
            _locks: locks,
        }
    }
}

/// Shared access to one shard's table.
pub(crate) struct ReadGuard<'a, S> {
    table: &'a HashTable<S>,
    _lock: RwLockReadGuard<'a, ()>,
}

impl<S> Deref for ReadGuard<'_, S> {
    type Target = HashTable<S>;

    #[inline]
    fn deref(&self) -> &HashTable<S> {
        self.table
    }
}

/// Exclusive access to one shard's table.
pub(crate) struct WriteGuard<'a, S> {
    table: &'a mut HashTable<S>,
    _locks: [Option<RwLockWriteGuard<'a, ()>>; MAX_STRIPES],
}

impl<S> Deref for WriteGuard<'_, S> {
    type Target = HashTable<S>;

    fn deref(&self) -> &HashTable<S> {
        self.table
    }
}

impl<S> DerefMut for WriteGuard<'_, S> {
    fn deref_mut(&mut self) -> &mut HashTable<S> {
        self.table
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// A writer excludes readers of its shard on every thread, whatever their stripes.
    #[test]
    fn a_writer_excludes_readers_of_every_stripe() {
        let shards = Arc::new(Shards::<u64>::new());
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (shards, stop) = (shards.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let table = shards.read(3);
                        // A writer keeps the table's length even at every release.
                        assert_eq!(table.len() % 2, 0);
                    }
                })
            })
            .collect();
        for i in 0..2_000u64 {
            let mut table = shards.write(3);
            table.insert_unique(i, i, |v| *v);
            std::thread::yield_now();
            table.insert_unique(i + 1_000_000, i, |v| *v);
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.join().expect("reader");
        }
        assert_eq!(shards.read(3).len(), 4_000);
        assert_eq!(shards.read(4).len(), 0);
    }
}
