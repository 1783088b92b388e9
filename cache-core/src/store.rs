//! One registered type's entries: the sharded tables, entry state, eviction and prepopulate.
//! The get path is in `get.rs`, the fetch chain (single-flight fetch, background refresh) in
//! `fetch.rs`, the entry side of watches in `watch/entry.rs`: each adds methods to [`Store`].
//!
//! Entries live in sharded tables. A table's lock guards the state of every entry in it, so a
//! hit takes one read lock and no other lock. An entry is one allocation, an [`EntryHandle`]
//! behind an `Arc`, whose state is reached only through its [`Slot`] in the table (under the
//! lock). Tasks hold the `Arc` while the lock is released and find the slot again by pointer,
//! so an entry evicted meanwhile is simply not found and never resurrected.

use std::any::{Any, TypeId};
use std::cell::UnsafeCell;
use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use event_listener::Event;

use crate::backoff::Backoff;
use crate::cache_type::{CacheType, FetchState, RegisterOptions, RequestInfo};
use crate::chain::ChainState;
use crate::error::GetError;
use crate::expiry::ExpiryQueue;
use crate::metrics::{Counters, TypeMetrics, bump, thread_index};
use crate::outcome::ResultMeta;
use crate::ratelimit::TokenBucket;
use crate::shards::{ReadGuard, SHARDS, Shards, WriteGuard, shard_of};
use crate::shared::{CacheState, ErasedStore, EvictOne};

/// Up to this many entries in a type, capacity eviction picks the exact least recently read.
pub(crate) const EXACT_LRU_LIMIT: u64 = 4096;
/// Above [`EXACT_LRU_LIMIT`], capacity eviction picks the least recently read of this many
/// shards' entries (a sixteenth of them), or of more shards if these have none that may go.
const SAMPLED_SHARDS: usize = 1;

/// The shortest pause before the expiry task looks at a held entry (watched, or waited on by a
/// get) again (see `Store::expiry_at`).
const WATCHED_RECHECK: Duration = Duration::from_secs(1);

// ===== Entry data =====

/// Keys up to this many bytes (key, datacenter and token together) live inside the entry's
/// slot, so a hit does not chase a pointer to compare them. 28 keeps the whole key in 32
/// bytes, and with it everything a hit reads in the slot's first cache line.
const INLINE_KEY: usize = 28;

/// The key of an entry within its type: the request key and its partition, concatenated;
/// inline when short, else on the heap. 32 bytes either way.
pub(crate) enum EntryKey {
    Inline {
        /// Bytes used in `bytes`; the key and datacenter lengths split them.
        len: u8,
        key_len: u8,
        dc_len: u8,
        bytes: [u8; INLINE_KEY],
    },
    Heap {
        key_len: u32,
        dc_len: u32,
        bytes: Box<[u8]>,
    },
}

impl EntryKey {
    fn new(key: &str, datacenter: &str, token: &str) -> Self {
        let total = key.len() + datacenter.len() + token.len();
        let parts = [key.as_bytes(), datacenter.as_bytes(), token.as_bytes()];
        if total <= INLINE_KEY {
            let mut bytes = [0u8; INLINE_KEY];
            let mut at = 0;
            for part in parts {
                bytes[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            // Each length is at most `INLINE_KEY`, so each fits a byte.
            Self::Inline {
                len: total as u8,
                key_len: key.len() as u8,
                dc_len: datacenter.len() as u8,
                bytes,
            }
        } else {
            Self::Heap {
                // Keys and partitions are far below 4 GiB; a longer one would only mis-hash.
                key_len: key.len() as u32,
                dc_len: datacenter.len() as u32,
                bytes: parts.concat().into_boxed_slice(),
            }
        }
    }

    /// All the bytes, and the key and datacenter lengths that split them.
    #[inline(always)]
    fn split(&self) -> (&[u8], usize, usize) {
        match self {
            Self::Inline {
                len,
                key_len,
                dc_len,
                bytes,
            } => (
                &bytes[..usize::from(*len)],
                usize::from(*key_len),
                usize::from(*dc_len),
            ),
            Self::Heap {
                key_len,
                dc_len,
                bytes,
            } => (bytes, *key_len as usize, *dc_len as usize),
        }
    }

    /// The key and the datacenter (never the token).
    pub(crate) fn parts(&self) -> (&str, &str) {
        let (bytes, k, d) = self.split();
        // Built from `&str`s split at their own lengths, so both halves are UTF-8.
        (
            std::str::from_utf8(&bytes[..k]).unwrap_or_default(),
            std::str::from_utf8(&bytes[k..k + d]).unwrap_or_default(),
        )
    }

    /// Key, datacenter and token bytes together, for ordering.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.split().0
    }

    #[inline(always)]
    pub(crate) fn matches(&self, key: &str, datacenter: &str, token: &str) -> bool {
        let (bytes, k, d) = self.split();
        if k != key.len() {
            return false;
        }
        if datacenter.is_empty() && token.is_empty() {
            // The common case: no partition, one comparison.
            return bytes.len() == k && bytes_eq(bytes, key.as_bytes());
        }
        d == datacenter.len()
            && bytes.len() == k + d + token.len()
            && bytes_eq(&bytes[..k], key.as_bytes())
            && bytes_eq(&bytes[k..k + d], datacenter.as_bytes())
            && bytes_eq(&bytes[k + d..], token.as_bytes())
    }
}

/// Equality of two byte strings, with short ones compared as a few overlapping machine words
/// instead of a call into libc's `memcmp`, which costs more than the rest of a hit for the few
/// bytes of a typical key (measured: a hit spent half its time there).
#[inline]
fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => word4(a, 0) == word4(b, 0) && word4(a, n - 4) == word4(b, n - 4),
        8..=16 => word8(a, 0) == word8(b, 0) && word8(a, n - 8) == word8(b, n - 8),
        17..=32 => {
            word8(a, 0) == word8(b, 0)
                && word8(a, 8) == word8(b, 8)
                && word8(a, n - 16) == word8(b, n - 16)
                && word8(a, n - 8) == word8(b, n - 8)
        }
        _ => a == b,
    }
}

/// The 4 bytes of `s` at `at` (the caller checked the bounds).
#[inline]
fn word4(s: &[u8], at: usize) -> u32 {
    s.get(at..at + 4)
        .and_then(|w| w.first_chunk::<4>())
        .map_or(0, |w| u32::from_ne_bytes(*w))
}

/// The 8 bytes of `s` at `at` (the caller checked the bounds).
#[inline]
fn word8(s: &[u8], at: usize) -> u64 {
    s.get(at..at + 8)
        .and_then(|w| w.first_chunk::<8>())
        .map_or(0, |w| u64::from_ne_bytes(*w))
}

/// A moment as nanoseconds since the cache's epoch, plus one: `Option<Stamp>` takes 8 bytes
/// where `Option<Instant>` takes 16, and an entry keeps three of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stamp(NonZeroU64);

impl Stamp {
    /// Time from the stamp to `now_ns` (nanoseconds since the epoch); zero if the stamp is
    /// later. Integer arithmetic: the hit path avoids `Instant` maths.
    pub(crate) fn until(self, now_ns: u64) -> Duration {
        Duration::from_nanos(self.nanos_until(now_ns))
    }

    /// [`Stamp::until`] in nanoseconds.
    #[inline]
    pub(crate) fn nanos_until(self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.0.get() - 1)
    }
}

/// An entry: one allocation, shared by its table and by every task that needs to find it
/// again (a fetch chain, a waiting get, a watch, the expiry queue). Such a task looks the
/// entry up in its table by pointer, so an entry evicted meanwhile is simply not found and
/// never resurrected.
///
/// `repr(C)`, hot fields first: a hit reads the key, the last-read time and the head of the
/// state (index, fetch time, value), 64 contiguous bytes.
#[repr(C)]
pub(crate) struct EntryHandle<T: CacheType> {
    /// A hit compares it in place, without another pointer chase.
    pub(crate) key: EntryKey,
    /// Nanoseconds since the cache's epoch of the last read; atomic, since hits hold only the
    /// table's read lock.
    pub(crate) last_read: AtomicU64,
    /// Reached only through the entry's [`Slot`] in its table, under the table's lock.
    state: StateCell<T>,
    /// Notified when a fetch for the entry completes, and when the entry is evicted or its
    /// refresh is replaced.
    pub(crate) changed: Event,
    /// The watch records, offered every completed fetch, and the waker of a chain waiting on
    /// a fetch in flight.
    pub(crate) extras: Mutex<EntryExtras<T>>,
}

/// The cell of an entry's state. Its `Send`/`Sync` are the `RwLock`'s rule, since the state
/// is only reached under its table's lock (see [`Slot`]); every other field of the entry
/// stays checked by the compiler.
struct StateCell<T: CacheType>(UnsafeCell<EntryState<T>>);

// SAFETY: the state is only reached through the entry's one `Slot`: shared while the slot's
// table is read-locked, exclusive while it is write-locked or the slot is out of its table.
// So, as for an `RwLock`, sharing the cell needs the state to be `Send + Sync`.
unsafe impl<T: CacheType> Sync for StateCell<T> where EntryState<T>: Send + Sync {}
// SAFETY: moving the cell between threads moves the state, nothing thread-bound.
unsafe impl<T: CacheType> Send for StateCell<T> where EntryState<T>: Send {}

impl<T: CacheType> EntryHandle<T> {
    pub(crate) fn extras(&self) -> std::sync::MutexGuard<'_, EntryExtras<T>> {
        self.extras.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes everything waiting on the entry: its gets and chain (through its event) and a
    /// chain waiting on the entry's fetch in flight.
    pub(crate) fn wake(&self) {
        wake_all(&self.changed);
        let chain = self.extras().take_chain();
        if let Some(waker) = chain {
            waker.wake();
        }
    }

    pub(crate) fn touch(&self, nanos: u64) {
        // A plain load first: a hot entry read by many threads is not written on every hit.
        if self.last_read.load(Ordering::Relaxed) < nanos {
            self.last_read.store(nanos, Ordering::Relaxed);
        }
    }
}

/// What an entry holds only while it is watched or a fetch of it is in flight: its watch
/// records, and the waker of its fetch chain waiting on that fetch (woken if the entry is
/// removed, so the fetch is dropped at once). No allocation otherwise: 8 bytes in the entry,
/// since most entries are neither; and one small box when they are, instead of an event list
/// and a listener for the chain.
pub(crate) struct EntryExtras<T: CacheType>(Option<Box<Extras<T>>>);

struct Extras<T: CacheType> {
    watchers: Vec<Arc<dyn Watcher<T>>>,
    chain: Option<Waker>,
}

impl<T: CacheType> EntryExtras<T> {
    pub(crate) fn new() -> Self {
        Self(None)
    }

    fn extras(&mut self) -> &mut Extras<T> {
        self.0.get_or_insert_with(|| {
            Box::new(Extras {
                watchers: Vec::new(),
                chain: None,
            })
        })
    }

    /// Frees the box once it holds nothing.
    fn trim(&mut self) {
        if self
            .0
            .as_ref()
            .is_some_and(|e| e.watchers.is_empty() && e.chain.is_none())
        {
            self.0 = None;
        }
    }

    /// The number of watches.
    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |e| e.watchers.len())
    }

    pub(crate) fn get(&self, at: usize) -> Option<&Arc<dyn Watcher<T>>> {
        self.0.as_ref()?.watchers.get(at)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<dyn Watcher<T>>> {
        self.0.iter().flat_map(|e| e.watchers.iter())
    }

    pub(crate) fn push(&mut self, watcher: Arc<dyn Watcher<T>>) {
        let watchers = &mut self.extras().watchers;
        // Room for one at first: most watched entries have a single watch.
        watchers.reserve_exact(1);
        watchers.push(watcher);
    }

    /// Takes the watch at `at` out (`at < len`), moving the last one into its place.
    pub(crate) fn swap_remove(&mut self, at: usize) -> Option<Arc<dyn Watcher<T>>> {
        let watchers = &mut self.0.as_mut()?.watchers;
        if at >= watchers.len() {
            return None;
        }
        let taken = watchers.swap_remove(at);
        if watchers.is_empty() {
            *watchers = Vec::new();
        }
        self.trim();
        Some(taken)
    }

    /// Every watch, leaving none.
    pub(crate) fn take(&mut self) -> Vec<Arc<dyn Watcher<T>>> {
        let Some(extras) = self.0.as_mut() else {
            return Vec::new();
        };
        let watchers = std::mem::take(&mut extras.watchers);
        self.trim();
        watchers
    }

    /// Registers the waker of the chain waiting on the entry's fetch. Returns whether it was
    /// registered already: then no removal has taken it to wake the chain since.
    pub(crate) fn set_chain(&mut self, waker: &Waker) -> bool {
        match &mut self.extras().chain {
            Some(known) if known.will_wake(waker) => true,
            slot => {
                *slot = Some(waker.clone());
                false
            }
        }
    }

    /// Forgets the chain's waker (its fetch is over).
    pub(crate) fn clear_chain(&mut self) {
        if let Some(extras) = self.0.as_mut() {
            extras.chain = None;
        }
        self.trim();
    }

    /// Takes the chain's waker, to wake it.
    fn take_chain(&mut self) -> Option<Waker> {
        let waker = self.0.as_mut()?.chain.take();
        self.trim();
        waker
    }
}

/// The mutable state of an entry, guarded by its table's lock.
///
/// `repr(C)`, hot fields first: with the slot's key and last-read time before it, what a hit
/// reads (index, fetch time, value) shares the slot's first cache line.
#[repr(C)]
pub(crate) struct EntryState<T: CacheType> {
    pub(crate) index: u64,
    pub(crate) fetched_at: Option<Stamp>,
    pub(crate) value: Option<T::Value>,
    /// The entry's fetch chain: idle, fetching or sleeping, and its generation.
    pub(crate) chain: ChainState,
    /// Completed fetch attempts. 32 bits keep the entry within its budget; it wraps (after
    /// four billion fetches of one entry), so it is only compared for change and by wrapping
    /// difference.
    pub(crate) attempts: u32,
    /// Times the index went backwards (server restore, compaction); four billion resets of one
    /// entry do not happen.
    pub(crate) resets: u32,
    /// Gets waiting on the entry. Such an entry is not evicted for capacity: its gets would
    /// only create it again and evict another one's (at worst each other's, forever). Atomic:
    /// a get leaving counts itself out under the read lock.
    pub(crate) waiters: AtomicU32,
    /// Active watches; an entry with watchers does not expire nor is evicted for capacity.
    /// In the state, where it fits beside `waiters`; atomic, since a watch
    /// leaving counts itself out under the read lock.
    pub(crate) watchers: AtomicU32,
    /// What a healthy entry does not need: allocated on the first error, fetch state or rate
    /// limit, and dropped again once everything in it is back to its default.
    cold: Option<Box<Cold<T>>>,
}

/// Runs the consumer's code (a callback, a sink, a `Drop`), `None` if it panicked: a panic
/// there stays there, whichever task or caller ran it (contract: Fetch 9).
pub(crate) fn contained<R>(f: impl FnOnce() -> R) -> Option<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok()
}

/// Drops `value`, containing a panic in its `Drop` (a fetch state's cleanup, a value).
pub(crate) fn drop_contained<V>(value: V) {
    contained(move || drop(value));
}

/// The attempt number after `attempt`: it wraps, skipping 0 (which means "no attempt yet").
pub(crate) fn next_attempt(attempt: u32) -> u32 {
    attempt.wrapping_add(1).max(1)
}

/// The rarely used part of an entry's state.
struct Cold<T: CacheType> {
    fetch_state: Option<FetchState>,
    error: Option<GetError<T::Error>>,
    lost_contact_at: Option<Stamp>,
    failing_since: Option<Stamp>,
    /// The attempt number (see `EntryState::attempts`) of the first failure of the current run
    /// of failures: a get that waited for an earlier attempt knows that one succeeded.
    failing_from_attempt: u32,
    backoff: Backoff,
    bucket: Option<TokenBucket>,
}

impl<T: CacheType> Default for Cold<T> {
    fn default() -> Self {
        Self {
            fetch_state: None,
            error: None,
            lost_contact_at: None,
            failing_since: None,
            failing_from_attempt: 0,
            backoff: Backoff::new(),
            bucket: None,
        }
    }
}

impl<T: CacheType> Cold<T> {
    fn is_default(&self) -> bool {
        self.fetch_state.is_none()
            && self.error.is_none()
            && self.lost_contact_at.is_none()
            && self.failing_since.is_none()
            && self.backoff.failures() == 0
            && self.bucket.is_none()
    }
}

impl<T: CacheType> EntryState<T> {
    fn new() -> Self {
        Self {
            value: None,
            index: 0,
            fetched_at: None,
            chain: ChainState::default(),
            attempts: 0,
            resets: 0,
            waiters: AtomicU32::new(0),
            watchers: AtomicU32::new(0),
            cold: None,
        }
    }

    /// Whether a watch is on the entry (then it neither expires nor is evicted for capacity).
    pub(crate) fn watched(&self) -> bool {
        self.watchers.load(Ordering::Acquire) > 0
    }

    /// Whether capacity eviction and expiry must leave the entry: it is watched, or gets are
    /// waiting on it (see `waiters`).
    pub(crate) fn held(&self) -> bool {
        self.watched() || self.waiters.load(Ordering::Relaxed) > 0
    }

    fn cold_mut(&mut self) -> &mut Cold<T> {
        self.cold.get_or_insert_with(Box::default)
    }

    /// Frees the cold part once nothing in it matters any more.
    pub(crate) fn trim(&mut self) {
        if self.cold.as_ref().is_some_and(|c| c.is_default()) {
            self.cold = None;
        }
    }

    pub(crate) fn error(&self) -> Option<&GetError<T::Error>> {
        self.cold.as_ref()?.error.as_ref()
    }

    /// Stores (or clears) the last fetch's error; returns how the number of failing entries
    /// changed (-1, 0 or 1), for the `failing` gauge.
    #[must_use]
    pub(crate) fn set_error(&mut self, error: Option<GetError<T::Error>>) -> i64 {
        let before = i64::from(self.error().is_some());
        match (error, self.cold.as_mut()) {
            (None, None) => {}
            (None, Some(cold)) => cold.error = None,
            (error, _) => {
                let attempts = self.attempts;
                let cold = self.cold_mut();
                if cold.error.is_none() {
                    cold.failing_from_attempt = attempts;
                }
                cold.error = error;
            }
        }
        i64::from(self.error().is_some()) - before
    }

    /// Whether the stored error comes from a run of failures that began after attempt `seen`
    /// was made: then attempt `seen + 1`, the one a get waited for, succeeded.
    pub(crate) fn failing_after(&self, seen: u32) -> bool {
        // A wrapping difference from the attempt after `seen` (the counter wraps and skips 0),
        // and a run of failures is never two billion attempts away from a get waiting on it.
        let waited_for = next_attempt(seen);
        self.cold.as_ref().is_some_and(|c| {
            c.error.is_some() && (c.failing_from_attempt.wrapping_sub(waited_for) as i32) > 0
        })
    }

    /// Whether the entry's expiry is scheduled: it is from its first completed fetch or
    /// prepopulated value on.
    pub(crate) fn expiry_scheduled(&self) -> bool {
        self.attempts > 0 || self.fetched_at.is_some()
    }

    /// The server accepted a blocking fetch: the entry is healthy as far as readers can tell.
    /// Clears the error, failing time and lost-contact time; backoff stays until the fetch
    /// completes. Returns the change of the failing gauge.
    #[must_use]
    pub(crate) fn connected(&mut self) -> i64 {
        let delta = self.set_error(None);
        if let Some(cold) = self.cold.as_mut() {
            cold.failing_since = None;
            cold.lost_contact_at = None;
        }
        self.trim();
        delta
    }

    pub(crate) fn fetch_state(&self) -> Option<&FetchState> {
        self.cold.as_ref()?.fetch_state.as_ref()
    }

    /// Replaces the fetch state, returning the old one for the caller to drop out of the
    /// table's lock (its cleanup is the consumer's code; see `drop_contained`).
    #[must_use]
    pub(crate) fn set_fetch_state(&mut self, state: Option<FetchState>) -> Option<FetchState> {
        match (state, self.cold.as_mut()) {
            (None, None) => None,
            (None, Some(cold)) => cold.fetch_state.take(),
            (state, _) => std::mem::replace(&mut self.cold_mut().fetch_state, state),
        }
    }

    pub(crate) fn lost_contact_at(&self) -> Option<Stamp> {
        self.cold.as_ref()?.lost_contact_at
    }

    pub(crate) fn clear_lost_contact(&mut self) {
        if let Some(cold) = self.cold.as_mut() {
            cold.lost_contact_at = None;
        }
    }

    pub(crate) fn failing_since(&self) -> Option<Stamp> {
        self.cold.as_ref()?.failing_since
    }

    pub(crate) fn backoff(&self) -> Backoff {
        self.cold.as_ref().map_or_else(Backoff::new, |c| c.backoff)
    }

    /// Records a fetch outcome for backoff, failure time and (refresh types) lost contact.
    pub(crate) fn record_outcome(&mut self, success: bool, now: Stamp, lose_contact: bool) {
        if success {
            if let Some(cold) = self.cold.as_mut() {
                cold.backoff.on_success();
                cold.failing_since = None;
            }
        } else {
            let cold = self.cold_mut();
            cold.backoff.on_failure();
            cold.failing_since.get_or_insert(now);
            if lose_contact {
                cold.lost_contact_at.get_or_insert(now);
            }
        }
    }

    pub(crate) fn bucket(&mut self) -> &mut TokenBucket {
        self.cold_mut()
            .bucket
            .get_or_insert_with(TokenBucket::default)
    }
}

/// An entry in its table: the table's own reference to it, and the only way to its state.
///
/// There is one `Slot` per entry (made with the entry, never cloned), and it lives in the
/// entry's table until it is taken out to be forgotten. So `&Slot` is only had under the
/// table's read lock (or from a slot taken out), and `&mut Slot` only under its write lock (or
/// owning the slot taken out), which is what makes [`Slot::state`] and [`Slot::state_mut`]
/// sound.
pub(crate) struct Slot<T: CacheType> {
    /// Private: a `Slot` is made only by [`Slot::new`], and its entry never replaced, which is
    /// what the soundness of [`Slot::state`] rests on.
    entry: Arc<EntryHandle<T>>,
}

impl<T: CacheType> Slot<T> {
    /// The entry (what a task keeps to find the slot again).
    pub(crate) fn handle(&self) -> &Arc<EntryHandle<T>> {
        &self.entry
    }

    fn new(key: EntryKey) -> Self {
        Self {
            entry: Arc::new(EntryHandle {
                key,
                last_read: AtomicU64::new(0),
                state: StateCell(UnsafeCell::new(EntryState::new())),
                changed: Event::new(),
                extras: Mutex::new(EntryExtras::new()),
            }),
        }
    }

    /// The entry's state, shared with the other readers of the table.
    #[inline(always)]
    pub(crate) fn state(&self) -> &EntryState<T> {
        // SAFETY: see the type's docs: a `&Slot` means the table is at least read-locked (or
        // the slot is out of it and ours), so nobody holds the state mutably.
        unsafe { &*self.entry.state.0.get() }
    }

    /// The entry's state, exclusively.
    pub(crate) fn state_mut(&mut self) -> &mut EntryState<T> {
        // SAFETY: see the type's docs: a `&mut Slot` means the table is write-locked (or the
        // slot is out of it and ours), so nobody else reaches the state.
        unsafe { &mut *self.entry.state.0.get() }
    }
}

impl<T: CacheType> std::ops::Deref for Slot<T> {
    type Target = EntryHandle<T>;

    fn deref(&self) -> &EntryHandle<T> {
        &self.entry
    }
}

impl<T: CacheType> Drop for Slot<T> {
    /// An entry out of its table drops its value and fetch state at once, even while tasks
    /// still hold the entry to find it gone. Their `Drop` is the consumer's code: a panic in
    /// it stays here, not in whoever evicted the entry (an unrelated get, the expiry task, a
    /// re-registration).
    fn drop(&mut self) {
        drop_contained(std::mem::replace(self.state_mut(), EntryState::new()));
    }
}

// ===== The entry's view of its watches =====

/// What the entry's fetch chain offers each watcher after a fetch.
pub(crate) struct Snapshot<T: CacheType> {
    pub(crate) value: Option<T::Value>,
    pub(crate) error: Option<GetError<T::Error>>,
    pub(crate) meta: ResultMeta,
    pub(crate) resets: u32,
}

impl<T: CacheType> Clone for Snapshot<T> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            error: self.error.clone(),
            meta: self.meta,
            resets: self.resets,
        }
    }
}

/// A watch as its entry sees it, with the consumer's types erased.
pub(crate) trait Watcher<T: CacheType>: Send + Sync {
    fn id(&self) -> u64;
    /// The watch's index in its entry's list, kept true under the list's lock, so removing
    /// one watch of many is not a search.
    fn place(&self) -> &AtomicUsize;
    /// The poll interval of a watch of a non-blocking type.
    fn max_age(&self) -> Option<Duration>;
    /// Offers a fetch's outcome. Returns `false` when the receiver is gone.
    fn offer(&self, store: &Store<T>, entry: &Arc<EntryHandle<T>>, snapshot: &Snapshot<T>) -> bool;
    /// Stops any task the watch runs and drops the sink.
    fn cancel(&self);
}

// ===== Store =====

/// The entries of one registered type.
pub(crate) struct Store<T: CacheType> {
    pub(crate) ty: T,
    pub(crate) opts: RegisterOptions,
    pub(crate) shared: Arc<CacheState>,
    pub(crate) name: &'static str,
    pub(crate) counters: Counters,
    tables: Shards<Slot<T>>,
    hasher: foldhash::fast::RandomState,
    pub(crate) this: Weak<Self>,
    /// The entries' expiry deadlines.
    expiry: ExpiryQueue<EntryHandle<T>>,
    /// Set when a newer registration of the type replaced this store (see `release_all`).
    retired: std::sync::atomic::AtomicBool,
}

struct Victim<T: CacheType> {
    store: Weak<Store<T>>,
    entry: Arc<EntryHandle<T>>,
}

impl<T: CacheType> EvictOne for Victim<T> {
    fn evict(&self) -> bool {
        self.store.upgrade().is_some_and(|store| {
            // Chosen under the read lock: a watch or a waiting get may have come since.
            let evicted = store.evict_if(&self.entry, |slot| !slot.state().held());
            if evicted {
                bump(&store.counters.evictions_capacity);
            }
            evicted
        })
    }
}

impl<T: CacheType> Store<T> {
    pub(crate) fn new(ty: T, shared: Arc<CacheState>) -> Arc<Self> {
        let opts = ty.register_options();
        let epoch = shared.epoch;
        Arc::new_cyclic(|this| Self {
            ty,
            opts,
            shared,
            name: std::any::type_name::<T>(),
            counters: Counters::default(),
            tables: Shards::new(),
            hasher: foldhash::fast::RandomState::default(),
            this: this.clone(),
            expiry: ExpiryQueue::new(epoch),
            retired: std::sync::atomic::AtomicBool::new(false),
        })
    }

    #[inline(always)]
    pub(crate) fn hash(&self, info: &RequestInfo<'_>) -> u64 {
        let (key, dc, token) = (&*info.key, &*info.datacenter, &*info.token);
        self.hash_parts(key.as_bytes(), dc.as_bytes(), token.as_bytes())
    }

    /// The hash of an entry, from its key: the same as [`Store::hash`] of the requests it
    /// answers. Not stored in the entry, which a lookup by pointer (a task finding its entry
    /// again) does not need on any hot path.
    pub(crate) fn entry_hash(&self, entry: &EntryHandle<T>) -> u64 {
        let (bytes, k, d) = entry.key.split();
        self.hash_parts(&bytes[..k], &bytes[k..k + d], &bytes[k + d..])
    }

    #[inline(always)]
    fn hash_parts(&self, key: &[u8], dc: &[u8], token: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(key);
        if !dc.is_empty() || !token.is_empty() {
            h.write(dc);
            h.write(token);
            // The lengths separate ("ab", "c") from ("a", "bc"); one write for all three.
            h.write_u64(
                key.len() as u64
                    ^ (dc.len() as u64).rotate_left(21)
                    ^ (token.len() as u64).rotate_left(42),
            );
        }
        h.finish()
    }

    #[inline]
    pub(crate) fn read(&self, hash: u64) -> ReadGuard<'_, Slot<T>> {
        self.tables.read(shard_of(hash))
    }

    pub(crate) fn write(&self, hash: u64) -> WriteGuard<'_, Slot<T>> {
        self.tables.write(shard_of(hash))
    }

    pub(crate) fn nanos(&self, now: Instant) -> u64 {
        self.shared.nanos(now)
    }

    pub(crate) fn instant(&self, nanos: u64) -> Instant {
        self.shared.epoch + Duration::from_nanos(nanos)
    }

    pub(crate) fn stamp(&self, now: Instant) -> Stamp {
        Stamp(NonZeroU64::new(self.nanos(now).saturating_add(1)).unwrap_or(NonZeroU64::MAX))
    }

    pub(crate) fn at(&self, stamp: Stamp) -> Instant {
        self.instant(stamp.0.get() - 1)
    }

    /// Time from `stamp` to `now` (zero if `stamp` is later).
    pub(crate) fn since(&self, stamp: Stamp, now: Instant) -> Duration {
        stamp.until(self.nanos(now))
    }

    /// Runs `f` on every slot, one shard's read lock at a time. `f` must not call back into
    /// the cache.
    pub(crate) fn for_each_slot(&self, mut f: impl FnMut(&Slot<T>)) {
        for shard in 0..SHARDS {
            for slot in self.tables.read(shard).iter() {
                f(slot);
            }
        }
    }

    /// Runs `f` on the state of `entry` if it is still in its table (not evicted).
    pub(crate) fn with_slot<R>(
        &self,
        entry: &Arc<EntryHandle<T>>,
        f: impl FnOnce(&mut Slot<T>) -> R,
    ) -> Option<R> {
        let hash = self.entry_hash(entry);
        let mut table = self.write(hash);
        table
            .find_mut(hash, |s| Arc::ptr_eq(&s.entry, entry))
            .map(f)
    }

    /// Runs `f` on the entry of `info` under the table's read lock, if it is cached: the
    /// lookup by key, as [`Store::read_slot`] is by handle.
    #[inline]
    pub(crate) fn read_key<R>(
        &self,
        hash: u64,
        info: &RequestInfo<'_>,
        f: impl FnOnce(&Slot<T>) -> R,
    ) -> Option<R> {
        self.read_key_as(thread_index(), hash, info, f)
    }

    /// [`Store::read_key`] for a caller that has this thread's [`thread_index`] already.
    #[inline]
    pub(crate) fn read_key_as<R>(
        &self,
        thread: usize,
        hash: u64,
        info: &RequestInfo<'_>,
        f: impl FnOnce(&Slot<T>) -> R,
    ) -> Option<R> {
        let table = self.tables.read_as(shard_of(hash), thread);
        let (key, dc, token) = (&*info.key, &*info.datacenter, &*info.token);
        table.find(hash, |s| s.key.matches(key, dc, token)).map(f)
    }

    /// Runs `f` on the slot of `entry` under the table's read lock, if it is still cached.
    pub(crate) fn read_slot<R>(
        &self,
        entry: &EntryHandle<T>,
        f: impl FnOnce(&Slot<T>) -> R,
    ) -> Option<R> {
        let hash = self.entry_hash(entry);
        let table = self.read(hash);
        table
            .find(hash, |s| std::ptr::eq(Arc::as_ptr(&s.entry), entry))
            .map(f)
    }

    /// Finds or creates the entry for `info`, then runs `f` on it under the table lock.
    pub(crate) fn with_entry<R>(
        &self,
        hash: u64,
        info: &RequestInfo<'_>,
        f: impl FnOnce(&mut Slot<T>) -> R,
    ) -> R {
        let (key, dc, token) = (&*info.key, &*info.datacenter, &*info.token);
        let mut table = self.write(hash);
        let entry = table.entry(
            hash,
            |s| s.key.matches(key, dc, token),
            |s| self.entry_hash(&s.entry),
        );
        let mut inserted = false;
        let mut occupied = entry.or_insert_with(|| {
            inserted = true;
            Slot::new(EntryKey::new(key, dc, token))
        });
        let result = f(occupied.get_mut());
        if inserted && self.is_retired() {
            // A newer registration released this store (which set `retired` before emptying
            // the tables): an entry created now would never be seen again. Take it back out
            // before anyone counts it; a chain `f` started finds it gone and stops.
            let slot = occupied.remove().0;
            drop(table);
            slot.entry.wake();
            return result;
        }
        let new_entry = inserted.then(|| Arc::as_ptr(&occupied.get().entry) as *const ());
        if new_entry.is_some() {
            // Counted under the table lock, so the entry's removal (which takes it) is always
            // counted after: the counts never dip below zero.
            self.counters.entries.fetch_add(1, Ordering::Relaxed);
            self.shared.count_insert();
        }
        drop(table);
        if let Some(new_entry) = new_entry {
            // Capacity is enforced without the lock: eviction takes other tables' locks.
            self.shared.enforce_capacity(new_entry);
        }
        result
    }

    pub(crate) fn meta(&self, state: &EntryState<T>, hit: bool, now: Instant) -> ResultMeta {
        self.meta_at(state, hit, self.nanos(now))
    }

    /// [`Store::meta`] with the time as nanoseconds since the epoch.
    pub(crate) fn meta_at(&self, state: &EntryState<T>, hit: bool, now_ns: u64) -> ResultMeta {
        ResultMeta {
            hit,
            index: state.index,
            age: self
                .age_since(state)
                .map_or(Duration::ZERO, |t| t.until(now_ns)),
        }
    }

    /// What an entry's age counts from: for refresh types the moment the refresh lost
    /// contact (none while healthy), for others the fetch of the value.
    #[inline]
    pub(crate) fn age_since(&self, state: &EntryState<T>) -> Option<Stamp> {
        if self.opts.refresh {
            state.lost_contact_at()
        } else {
            state.fetched_at
        }
    }

    /// Schedules the entry's first expiry check one TTL after `from` (none for a TTL too
    /// long to represent: such an entry never expires).
    pub(crate) fn schedule_expiry(&self, entry: &Arc<EntryHandle<T>>, from: Instant) {
        if let Some(deadline) = from.checked_add(self.opts.last_get_ttl) {
            if self.expiry.schedule(deadline, entry.clone()) {
                self.shared.expiry_changed.notify(1);
            }
        }
    }

    /// Called once the entry's scheduled deadline has passed: evicts the entry and returns
    /// `None`, or returns its real, later deadline.
    fn check_expiry(&self, entry: &EntryHandle<T>, now: Instant) -> Option<Instant> {
        if let Expiry::Keep(next) = self.read_slot(entry, |slot| self.expiry_at(slot, now))? {
            return next;
        }
        // Looked at under the read lock: a read or a watch may have come since, so the write
        // lock looks again, and keeps the entry's new deadline if it no longer expires.
        let mut kept = None;
        let expired = self.evict_if(entry, |slot| match self.expiry_at(slot, now) {
            Expiry::Now => true,
            Expiry::Keep(next) => {
                kept = next;
                false
            }
        });
        if expired {
            bump(&self.counters.expirations);
        }
        kept
    }

    /// What expiry does with the entry at `now`.
    fn expiry_at(&self, slot: &Slot<T>, now: Instant) -> Expiry {
        let ttl = self.opts.last_get_ttl;
        if slot.state().held() {
            // Watched entries stay alive while watched, and entries a get waits on while it
            // waits (a wait is a read, contract: Get 8; evicting the entry would drop the
            // blocking query it waits on, and the get would start another from index 0).
            // Looked at again a TTL later, but never sooner than `WATCHED_RECHECK`: with a TTL
            // of zero (or a few nanoseconds) the next look would be due at once, and the
            // expiry task would spin for as long as the watch or wait lasts. Such an entry may
            // outlive its last watch or waiting get by up to that much.
            return Expiry::Keep(now.checked_add(ttl.max(WATCHED_RECHECK)));
        }
        match self
            .instant(slot.last_read.load(Ordering::Relaxed))
            .checked_add(ttl)
        {
            Some(deadline) if deadline <= now => Expiry::Now,
            // A deadline too far to represent never comes.
            deadline => Expiry::Keep(deadline),
        }
    }

    /// Removes `entry` from its table if it is still there and `still` holds for it under the
    /// table's write lock (a choice made under the read lock is checked again there), and
    /// wakes everything waiting on it.
    pub(crate) fn evict_if(
        &self,
        entry: &EntryHandle<T>,
        still: impl FnOnce(&Slot<T>) -> bool,
    ) -> bool {
        let removed = {
            let hash = self.entry_hash(entry);
            let mut table = self.write(hash);
            match table.find_entry(hash, |s| std::ptr::eq(Arc::as_ptr(&s.entry), entry)) {
                Ok(occupied) if still(occupied.get()) => Some(occupied.remove().0),
                _ => None,
            }
        };
        let Some(slot) = removed else {
            return false;
        };
        self.forget(slot);
        true
    }

    /// The bookkeeping of a slot taken out of its table: counts, the failing gauge, and a
    /// wake-up for everything waiting on the entry. Dropping the slot drops the value and the
    /// fetch state (its cleanup), outside the table lock.
    fn forget(&self, slot: Slot<T>) {
        self.counters.entries.fetch_sub(1, Ordering::Relaxed);
        if slot.state().error().is_some() {
            self.adjust_failing(-1);
        }
        self.shared.on_remove();
        let entry = slot.entry.clone();
        drop(slot);
        entry.wake();
        // Once removals outnumber the live entries, the queue drops the items of removed ones,
        // so eviction frees memory soon.
        let live = self.counters.entries.load(Ordering::Relaxed) as usize;
        if self
            .expiry
            .removed(live, |e| self.read_slot(e, |_| ()).is_some())
        {
            self.shared.expiry_changed.notify(1);
        }
    }

    /// Adds `delta` to the `failing` gauge.
    pub(crate) fn adjust_failing(&self, delta: i64) {
        match delta {
            0 => {}
            d if d > 0 => {
                self.counters
                    .failing
                    .fetch_add(d.unsigned_abs(), Ordering::Relaxed);
            }
            d => {
                self.counters
                    .failing
                    .fetch_sub(d.unsigned_abs(), Ordering::Relaxed);
            }
        }
    }

    /// Wakes every fetch chain that is waiting out a backoff after failures, so that it
    /// fetches now (`Cache::retry_now`). The backoff state itself is left as it is.
    pub(crate) fn retry_now(&self) -> usize {
        let mut woken = Vec::new();
        for shard in 0..SHARDS {
            let mut table = self.tables.write(shard);
            for slot in table.iter_mut() {
                let state = slot.state_mut();
                let failures = state.backoff().failures();
                if state.chain.retry_now(failures) {
                    woken.push(slot.entry.clone());
                }
            }
        }
        for entry in &woken {
            wake_all(&entry.changed);
        }
        woken.len()
    }

    /// Removes every entry and ends every watch: the store was replaced by a new registration
    /// of its type, or the cache is closing down its registry.
    pub(crate) fn release_all(&self) {
        self.retired.store(true, Ordering::Release);
        self.close_watches();
        for shard in 0..SHARDS {
            let slots: Vec<Slot<T>> = self.tables.write(shard).drain().collect();
            for slot in slots {
                self.forget(slot);
            }
        }
        // Last: a fetch completing before its entry was drained may have scheduled one more
        // deadline, and no task serves a retired store's queue.
        self.expiry.clear();
    }

    /// Whether a newer registration of the type replaced this store.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    // ===== prepopulate =====

    pub(crate) fn prepopulate(&self, info: &RequestInfo<'_>, value: T::Value, index: u64) {
        let now = self.shared.rt.now();
        let hash = self.hash(info);
        let (entry, first, snapshot, old) = self.with_entry(hash, info, |slot| {
            let state = slot.state_mut();
            let first = !state.expiry_scheduled();
            let index = index.max(1);
            if state.value.is_some() && index < state.index {
                state.resets = state.resets.wrapping_add(1);
            }
            let old = state.value.replace(value);
            state.index = index;
            let failing = state.set_error(None);
            self.adjust_failing(failing);
            state.fetched_at = Some(self.stamp(now));
            state.clear_lost_contact();
            state.trim();
            slot.touch(self.nanos(now));
            // Contained: it clones the value, the consumer's code, under the lock.
            let snapshot = (slot.state().watched())
                .then(|| contained(|| self.snapshot_of(slot.state(), false, now)))
                .flatten();
            (slot.entry.clone(), first, snapshot, old)
        });
        // The value replaced is the consumer's: dropped out of the lock, contained (as a
        // fetch's result does).
        drop_contained(old);
        // A retired store took the entry straight back out (see `with_entry`), or is about
        // to drain it and then clear its queue: nothing serves that queue any more.
        if first && !self.is_retired() {
            self.schedule_expiry(&entry, now);
        }
        wake_all(&entry.changed);
        if let Some(snapshot) = snapshot {
            self.deliver(&entry, &snapshot);
        }
    }
}

impl<T: CacheType> ErasedStore for Store<T> {
    fn metrics(&self) -> TypeMetrics {
        self.counters.snapshot(self.name)
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }

    fn cache_type_id(&self) -> TypeId {
        TypeId::of::<T>()
    }

    fn least_recently_read(&self, keep: *const ()) -> Option<(u64, Box<dyn EvictOne>)> {
        let mut best: Option<(u64, Arc<EntryHandle<T>>)> = None;
        let exact = self.counters.entries.load(Ordering::Relaxed) <= EXACT_LRU_LIMIT;
        // Sampled: from a random shard on, the first `SAMPLED_SHARDS`, and further shards only
        // while none had an entry that may go (all watched or waited on), so that one such
        // shard never lets the cache grow past its bound while other shards could give.
        let start = if exact { 0 } else { fastrand::usize(..SHARDS) };
        for (looked, shard) in (0..SHARDS).map(|i| (i, (start + i) % SHARDS)) {
            if !exact && looked >= SAMPLED_SHARDS && best.is_some() {
                break;
            }
            let table = self.tables.read(shard);
            for slot in table.iter() {
                // Watched entries stay, so do entries gets are waiting on, and so does the
                // entry being inserted (or a get could evict its own entry). Entries without a
                // value count like the others: failing keys under churn must not grow the
                // cache past its bound. So the bound holds unless more entries than it are
                // watched or waited on at once.
                if slot.state().held() || std::ptr::eq(Arc::as_ptr(&slot.entry) as *const (), keep)
                {
                    continue;
                }
                let read = slot.last_read.load(Ordering::Relaxed);
                if best.as_ref().is_none_or(|(r, _)| read < *r) {
                    best = Some((read, slot.entry.clone()));
                }
            }
        }
        let (read, entry) = best?;
        Some((
            read,
            Box::new(Victim {
                store: self.this.clone(),
                entry,
            }),
        ))
    }

    fn release_all(&self) {
        Store::release_all(self);
    }

    fn retry_now(&self) -> usize {
        Store::retry_now(self)
    }

    fn expire_due(&self, now: Instant) -> (bool, Option<Instant>) {
        let due = self.expiry.pop_due(now);
        let any = !due.is_empty();
        for entry in due {
            if let Some(deadline) = self.check_expiry(&entry, now) {
                // Any earlier deadline is seen by the caller, which asks for the next one.
                let _ = self.expiry.schedule(deadline, entry);
            }
        }
        (any, self.expiry.next_deadline())
    }

    fn clear_expiry(&self) {
        self.expiry.clear();
    }

    fn close_watches(&self) {
        for shard in 0..SHARDS {
            let entries: Vec<Arc<EntryHandle<T>>> = self
                .tables
                .read(shard)
                .iter()
                .map(|slot| slot.entry.clone())
                .collect();
            for entry in entries {
                let list = entry.extras().take();
                self.watchers_removed(&entry, &list);
            }
        }
    }
}

/// [`Store::expiry_at`]'s verdict.
enum Expiry {
    /// Expired: evict it.
    Now,
    /// Look again then (`None`: never).
    Keep(Option<Instant>),
}

/// Wakes every listener of `event`. Checks first: notifying an event nobody ever listened to
/// would allocate its listener list, 72 bytes per entry for nothing. Listeners register under
/// the table lock (or before taking it) and re-check the state, so none is missed.
pub(crate) fn wake_all(event: &Event) {
    if event.total_listeners() > 0 {
        event.notify(usize::MAX);
    }
}

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> Arc<str> {
    if let Some(s) = panic.downcast_ref::<&str>() {
        Arc::from(*s)
    } else if let Some(s) = panic.downcast_ref::<String>() {
        Arc::from(s.as_str())
    } else {
        Arc::from("non-string panic payload")
    }
}

#[cfg(test)]
mod key_tests {
    use super::EntryKey;

    /// Keys of every length around the inline limit, with and without a partition, match
    /// exactly themselves: never a key whose parts are split elsewhere, and never a prefix.
    #[test]
    fn keys_match_only_themselves_on_both_sides_of_the_inline_limit() {
        let text = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH";
        let mut parts = Vec::new();
        for total in [0, 1, 7, 8, 9, 16, 17, 27, 28, 29, 30, 40] {
            for dc in 0..=total.min(3) {
                for token in 0..=(total - dc).min(2) {
                    let k = total - dc - token;
                    parts.push((&text[..k], &text[k..k + dc], &text[k + dc..total]));
                }
            }
        }
        for &(k, d, t) in &parts {
            let key = EntryKey::new(k, d, t);
            assert_eq!(key.parts(), (k, d));
            assert_eq!(key.bytes(), format!("{k}{d}{t}").as_bytes());
            for &(k2, d2, t2) in &parts {
                assert_eq!(
                    key.matches(k2, d2, t2),
                    (k, d, t) == (k2, d2, t2),
                    "{:?} against {:?}",
                    (k, d, t),
                    (k2, d2, t2)
                );
            }
            // The same lengths with one byte changed, at each end of each part.
            let joined = format!("{k}{d}{t}");
            for at in [
                0,
                k.len().saturating_sub(1),
                k.len() + d.len().saturating_sub(1),
                joined.len().saturating_sub(1),
            ] {
                if at >= joined.len() {
                    continue;
                }
                let mut other = joined.clone().into_bytes();
                other[at] = b'_';
                let other = String::from_utf8(other).unwrap();
                let (k2, rest) = other.split_at(k.len());
                let (d2, t2) = rest.split_at(d.len());
                assert!(!key.matches(k2, d2, t2), "{joined:?} against {other:?}");
            }
        }
    }
}

#[cfg(test)]
mod attempt_tests {
    use super::*;
    use crate::testing::MockType;

    /// Across the attempt counter's wrap (which skips 0), a get that saw attempt `u32::MAX`
    /// waited for attempt 1: its failure is its own, a run starting at attempt 2 is later.
    #[test]
    fn a_failure_is_placed_right_across_the_counters_wrap() {
        for (seen, failed_at, later) in [
            (u32::MAX, 1, false),
            (u32::MAX, 2, true),
            (5, 6, false),
            (5, 7, true),
            (5, 3, false),
        ] {
            let mut state = EntryState::<MockType<u64>>::new();
            state.attempts = failed_at;
            let _ = state.set_error(Some(GetError::Closed));
            assert_eq!(
                state.failing_after(seen),
                later,
                "seen {seen}, failing from {failed_at}"
            );
        }
        assert_eq!(next_attempt(u32::MAX), 1);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::testing::MockType;

    /// Bytes per entry are a benchmark goal (at most 2/3 of moka's); this budget catches a
    /// field that quietly grows the entry, its one allocation.
    #[test]
    fn an_entry_stays_within_budget() {
        type T = MockType<Arc<u64>>;
        assert!(
            std::mem::size_of::<EntryHandle<T>>() <= 120,
            "{}",
            std::mem::size_of::<EntryHandle<T>>()
        );
        assert_eq!(std::mem::size_of::<Slot<T>>(), 8);
        assert_eq!(std::mem::size_of::<Option<Stamp>>(), 8);
        assert_eq!(std::mem::size_of::<EntryKey>(), 32);
    }

    /// A hit reads the key, the last-read time, the index, the fetch time and the value: with
    /// a pointer-sized value they are 64 contiguous bytes of the entry.
    #[test]
    fn a_hit_reads_64_contiguous_bytes_of_its_entry() {
        type T = MockType<Arc<u64>>;
        let state = std::mem::offset_of!(EntryHandle<T>, state);
        let value_end = state
            + std::mem::offset_of!(EntryState<T>, value)
            + std::mem::size_of::<Option<Arc<u64>>>();
        assert_eq!(std::mem::offset_of!(EntryHandle<T>, key), 0);
        assert!(value_end <= 64, "the value ends at byte {value_end}");
        assert!(std::mem::offset_of!(EntryHandle<T>, last_read) < 64);
        assert!(state + std::mem::offset_of!(EntryState<T>, fetched_at) < 64);
    }
}
