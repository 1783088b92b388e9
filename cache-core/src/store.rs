//! One registered type's entries and the engine that keeps them: get, single-flight fetch,
//! background refresh and eviction (SPEC §4–§8).
//!
//! Entries live in sharded tables. A table's lock guards the state of every entry in it, so a
//! hit takes one read lock and no other lock. The parts of an entry that tasks hold on to while
//! the table lock is released (its key, its wake-up event, its last-read time) live in an
//! [`EntryShared`] behind an `Arc`; a task finds the entry's state again by pointer, so an entry
//! evicted meanwhile is simply not found and never resurrected.

use std::any::Any;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use event_listener::Event;
use futures::FutureExt;
use futures::future::{Either, select};
use hashbrown::HashTable;

use crate::backoff::Backoff;
use crate::cache::Shared;
use crate::cache_type::{
    CacheRequest, CacheType, FetchOptions, FetchResult, FetchState, LastResult, RegisterOptions,
    RequestInfo,
};
use crate::error::GetError;
use crate::expiry::Expirable;
use crate::metrics::{Counters, TypeMetrics, bump};
use crate::ratelimit::TokenBucket;
use crate::runtime::{BoxFuture, Sleep};
use crate::watch::{Snapshot, Watcher};

/// How long a refresh type's blocking fetch must stay open to count as connected again (the
/// reference's 31 s: yamux keepalives are every 30 s, so a blackholed connection has failed by
/// then).
const CONNECTED_THRESHOLD: Duration = Duration::from_secs(31);

const SHARDS: usize = 64;

/// Up to this many entries in a type, capacity eviction picks the exact least recently read.
pub(crate) const EXACT_LRU_LIMIT: u64 = 4096;
const SAMPLED_SHARDS: usize = 4;

/// What a get reports about the value it returns (Consul's `ResultMeta`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResultMeta {
    /// The value came from a valid entry on the first look.
    pub hit: bool,
    /// The entry's index.
    pub index: u64,
    /// Refresh types: zero while the background refresh is healthy, else the time since it
    /// first lost contact. Other types: the time since the value was fetched.
    pub age: Duration,
}

/// The full answer to a get: the value, its meta, and the error of the get's fetch attempt.
///
/// Unlike `Result`, it can carry the last good value alongside an error (Consul returns both).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GetOutcome<V, E> {
    /// The value: the fresh one, or the last good one when `error` is set (if any).
    pub value: Option<V>,
    /// Hit, index and age.
    pub meta: ResultMeta,
    /// The error of the fetch attempt this get waited for.
    pub error: Option<GetError<E>>,
}

impl<V, E> GetOutcome<V, E> {
    /// Splits the outcome into a `Result`, dropping the stale value that came with an error.
    ///
    /// # Errors
    ///
    /// The outcome's error, if it has one.
    pub fn into_result(self) -> Result<Response<V>, GetError<E>> {
        match self.error {
            Some(error) => Err(error),
            None => Ok(Response {
                value: self.value,
                meta: self.meta,
            }),
        }
    }
}

/// A successful get: the value (none only when a get timed out before any value existed, or a
/// pass-through fetch returned none) and its meta.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Response<V> {
    /// The value.
    pub value: Option<V>,
    /// Hit, index and age.
    pub meta: ResultMeta,
}

impl<V> Response<V> {
    /// The value, if any.
    pub fn into_value(self) -> Option<V> {
        self.value
    }
}

// ===== Entry data =====

/// The key of an entry within its type: the request key and its partition, in one allocation.
struct EntryKey {
    buf: Box<str>,
    key_len: usize,
    dc_len: usize,
}

impl EntryKey {
    fn new(key: &str, datacenter: &str, token: &str) -> Self {
        let mut buf = String::with_capacity(key.len() + datacenter.len() + token.len());
        buf.push_str(key);
        buf.push_str(datacenter);
        buf.push_str(token);
        Self {
            buf: buf.into_boxed_str(),
            key_len: key.len(),
            dc_len: datacenter.len(),
        }
    }

    fn matches(&self, key: &str, datacenter: &str, token: &str) -> bool {
        self.key_len == key.len()
            && self.dc_len == datacenter.len()
            && self.buf.len() == key.len() + datacenter.len() + token.len()
            && self.buf.as_bytes()[..self.key_len] == *key.as_bytes()
            && self.buf.as_bytes()[self.key_len..self.key_len + self.dc_len]
                == *datacenter.as_bytes()
            && self.buf.as_bytes()[self.key_len + self.dc_len..] == *token.as_bytes()
    }
}

/// The parts of an entry that outlive a table lock.
pub(crate) struct EntryShared<T: CacheType> {
    hash: u64,
    key: EntryKey,
    /// Notified when a fetch for the entry completes, and when the entry is evicted or its
    /// refresh is replaced.
    pub(crate) changed: Event,
    /// Nanoseconds since the cache's epoch of the last read.
    last_read: AtomicU64,
    /// Active watches; an entry with watchers does not expire.
    pub(crate) watchers: AtomicUsize,
    /// The watch records, offered every completed fetch.
    watch: Mutex<Vec<Arc<dyn Watcher<T>>>>,
}

impl<T: CacheType> EntryShared<T> {
    fn touch(&self, nanos: u64) {
        // A plain load first: a hot entry read by many threads is not written on every hit.
        if self.last_read.load(Ordering::Relaxed) < nanos {
            self.last_read.fetch_max(nanos, Ordering::Relaxed);
        }
    }
}

/// The mutable state of an entry, guarded by its table's lock.
pub(crate) struct EntryState<T: CacheType> {
    pub(crate) value: Option<T::Value>,
    pub(crate) index: u64,
    fetch_state: Option<FetchState>,
    pub(crate) error: Option<GetError<T::Error>>,
    pub(crate) fetched_at: Option<Instant>,
    lost_contact_at: Option<Instant>,
    pub(crate) fetching: bool,
    /// Bumped whenever a new fetch chain takes over the entry; an older chain stops.
    generation: u64,
    /// Completed fetch attempts.
    pub(crate) attempts: u64,
    /// Times the index went backwards (server restore, compaction).
    pub(crate) resets: u64,
    expiry_scheduled: bool,
    chain_sleeping: bool,
    /// Background refresh stopped (fatal error or give-up) until a get fetches again.
    refresh_stopped: bool,
    backoff: Backoff,
    failing_since: Option<Instant>,
    bucket: TokenBucket,
}

impl<T: CacheType> EntryState<T> {
    fn new() -> Self {
        Self {
            value: None,
            index: 0,
            fetch_state: None,
            error: None,
            fetched_at: None,
            lost_contact_at: None,
            fetching: false,
            generation: 0,
            attempts: 0,
            resets: 0,
            expiry_scheduled: false,
            chain_sleeping: false,
            refresh_stopped: false,
            backoff: Backoff::new(),
            failing_since: None,
            bucket: TokenBucket::default(),
        }
    }
}

pub(crate) struct Slot<T: CacheType> {
    pub(crate) entry: Arc<EntryShared<T>>,
    pub(crate) st: EntryState<T>,
}

#[repr(align(128))]
struct Shard<T: CacheType> {
    table: RwLock<HashTable<Box<Slot<T>>>>,
}

// ===== Store =====

/// The entries of one registered type.
pub(crate) struct Store<T: CacheType> {
    pub(crate) ty: T,
    pub(crate) opts: RegisterOptions,
    pub(crate) shared: Arc<Shared>,
    pub(crate) name: &'static str,
    pub(crate) counters: Counters,
    shards: Box<[Shard<T>]>,
    hasher: foldhash::fast::RandomState,
    this: Weak<Self>,
}

/// What the cache needs of a store without knowing its type.
pub(crate) trait ErasedStore: Send + Sync {
    fn metrics(&self) -> TypeMetrics;
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
    /// The least recently read entry, as (last read, its eviction), for the capacity bound.
    /// Exact below [`EXACT_LRU_LIMIT`] entries; above it, the oldest of a few random shards
    /// (sampled LRU, as Redis does), so an insert never scans a million entries.
    fn oldest(&self) -> Option<(u64, Arc<dyn Fn() -> bool + Send + Sync>)>;
    /// Ends every watch (the cache is closing).
    fn close_watches(&self);
}

impl<T: CacheType> Store<T> {
    pub(crate) fn new(ty: T, shared: Arc<Shared>) -> Arc<Self> {
        let opts = ty.register_options();
        Arc::new_cyclic(|this| Self {
            ty,
            opts,
            shared,
            name: std::any::type_name::<T>(),
            counters: Counters::default(),
            shards: (0..SHARDS)
                .map(|_| Shard {
                    table: RwLock::new(HashTable::new()),
                })
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
            this: this.clone(),
        })
    }

    fn hash(&self, info: &RequestInfo<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        for part in [&*info.key, &*info.datacenter, &*info.token] {
            h.write(part.as_bytes());
            h.write_usize(part.len());
        }
        h.finish()
    }

    fn shard(&self, hash: u64) -> &Shard<T> {
        // Middle bits: hashbrown uses the low bits for buckets and the top 7 for tags.
        &self.shards[((hash >> 32) as usize) % SHARDS]
    }

    fn read(&self, hash: u64) -> RwLockReadGuard<'_, HashTable<Box<Slot<T>>>> {
        self.shard(hash)
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, hash: u64) -> RwLockWriteGuard<'_, HashTable<Box<Slot<T>>>> {
        self.shard(hash)
            .table
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.shared.epoch).as_nanos())
            .unwrap_or(u64::MAX)
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.shared.epoch + Duration::from_nanos(nanos)
    }

    /// Runs `f` on the state of `entry` if it is still in its table (not evicted).
    pub(crate) fn with_slot<R>(
        &self,
        entry: &Arc<EntryShared<T>>,
        f: impl FnOnce(&mut Slot<T>) -> R,
    ) -> Option<R> {
        let mut table = self.write(entry.hash);
        table
            .find_mut(entry.hash, |s| Arc::ptr_eq(&s.entry, entry))
            .map(|slot| f(slot))
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
            |s| s.entry.key.matches(key, dc, token),
            |s| s.entry.hash,
        );
        let mut inserted = false;
        let mut occupied = entry.or_insert_with(|| {
            inserted = true;
            Box::new(Slot {
                entry: Arc::new(EntryShared {
                    hash,
                    key: EntryKey::new(key, dc, token),
                    changed: Event::new(),
                    last_read: AtomicU64::new(0),
                    watchers: AtomicUsize::new(0),
                    watch: Mutex::new(Vec::new()),
                }),
                st: EntryState::new(),
            })
        });
        let result = f(occupied.get_mut());
        drop(table);
        if inserted {
            self.counters.entries.fetch_add(1, Ordering::Relaxed);
            self.shared.on_insert();
        }
        result
    }

    /// Whether the entry answers `info` without a fetch (SPEC §4.2).
    fn is_valid(
        &self,
        st: &EntryState<T>,
        info: &RequestInfo<'_>,
        must_revalidate: bool,
        now: Instant,
    ) -> bool {
        if st.value.is_none() {
            return false;
        }
        if self.opts.supports_blocking && info.min_index > 0 && info.min_index >= st.index {
            return false;
        }
        if !self.opts.refresh {
            if let (Some(max_age), Some(fetched_at)) = (info.max_age, st.fetched_at) {
                if now.saturating_duration_since(fetched_at) > max_age {
                    return false;
                }
            }
            if must_revalidate {
                // An open fetch means the entry is current: the reference leaves it alone.
                return st.fetching;
            }
        }
        true
    }

    pub(crate) fn meta(&self, st: &EntryState<T>, hit: bool, now: Instant) -> ResultMeta {
        let since = if self.opts.refresh {
            st.lost_contact_at
        } else {
            st.fetched_at
        };
        ResultMeta {
            hit,
            index: st.index,
            age: since.map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
        }
    }

    // ===== get =====

    /// The hit path: one read lock, no allocation.
    fn try_hit(
        &self,
        hash: u64,
        info: &RequestInfo<'_>,
        now: Instant,
    ) -> Option<GetOutcome<T::Value, T::Error>> {
        let table = self.read(hash);
        let (key, dc, token) = (&*info.key, &*info.datacenter, &*info.token);
        let slot = table.find(hash, |s| s.entry.key.matches(key, dc, token))?;
        if !self.is_valid(&slot.st, info, info.must_revalidate, now) {
            return None;
        }
        slot.entry.touch(self.nanos(now));
        let outcome = GetOutcome {
            value: slot.st.value.clone(),
            meta: self.meta(&slot.st, true, now),
            error: None,
        };
        drop(table);
        self.counters.hits.incr();
        Some(outcome)
    }

    /// `Cache::get` for this type (SPEC §4).
    ///
    /// A hit is answered without allocating; a miss boxes the waiting part. No `RequestInfo`
    /// is held across an await: its `Cow`s trip the compiler's higher-ranked `Send` check, and
    /// re-asking the request for it is cheap.
    pub(crate) fn get<'a>(&'a self, request: &'a T::Request) -> GetFuture<'a, T> {
        let start = self.shared.rt.now();
        let info = request.cache_info();
        if info.key.is_empty() {
            return GetFuture::Slow(Box::pin(self.bypass(request)));
        }
        let hash = self.hash(&info);
        if let Some(hit) = self.try_hit(hash, &info, start) {
            return GetFuture::Ready(Some(hit));
        }
        GetFuture::Slow(Box::pin(self.get_slow(request, hash, start)))
    }

    async fn bypass(&self, request: &T::Request) -> GetOutcome<T::Value, T::Error> {
        bump(&self.counters.bypasses);
        let mut opts = FetchOptions::new();
        {
            let info = request.cache_info();
            opts.min_index = info.min_index;
            opts.timeout = info.timeout.unwrap_or_default();
        }
        let result = AssertUnwindSafe(self.ty.fetch(opts, request))
            .catch_unwind()
            .await;
        match result {
            Ok(Ok(result)) => GetOutcome {
                value: result.value,
                meta: ResultMeta::default(),
                error: None,
            },
            Ok(Err(error)) => GetOutcome {
                value: None,
                meta: ResultMeta::default(),
                error: Some(GetError::Fetch(Arc::new(error))),
            },
            Err(panic) => GetOutcome {
                value: None,
                meta: ResultMeta::default(),
                error: Some(GetError::Panicked(panic_message(&*panic))),
            },
        }
    }

    async fn get_slow(
        &self,
        request: &T::Request,
        hash: u64,
        start: Instant,
    ) -> GetOutcome<T::Value, T::Error> {
        let (deadline, mut must_revalidate) = {
            let info = request.cache_info();
            let deadline = info.timeout.filter(|t| !t.is_zero()).map(|t| start + t);
            (deadline, info.must_revalidate)
        };
        let mut sleep: Option<Sleep> = None;
        let mut first = true;
        let mut seen_attempts: Option<u64> = None;
        let mut seen_resets: Option<u64> = None;
        // Set once an attempt this get waited for succeeded without satisfying it (a blocking
        // fetch that saw no change, or one with no value): further attempts respect the entry's
        // backoff, so a type answering index 0 or nothing at once cannot spin the get.
        let mut attempted = false;
        let mut retry_at: Option<Instant> = None;
        let mut retry_sleep: Option<Sleep> = None;
        loop {
            let now = self.shared.rt.now();
            let info = request.cache_info();
            let step = self.with_entry(hash, &info, |slot| {
                slot.entry.touch(self.nanos(now));
                let st = &slot.st;
                let resets = *seen_resets.get_or_insert(st.resets);
                // An index that went backwards wakes a blocked get with the new value,
                // whatever min index it waited for (SPEC §9, index reset).
                let reset = st.resets > resets && st.value.is_some();
                // The attempt this get waited for failed: its error comes first, even when the
                // old value would now count as valid (a failed revalidation is a failure).
                if let Some(seen) = seen_attempts {
                    if st.attempts > seen {
                        if let Some(error) = &st.error {
                            return Err(self.error_outcome(st, &info, error.clone(), now));
                        }
                        attempted = true;
                    }
                }
                if reset || self.is_valid(st, &info, must_revalidate, now) {
                    if first {
                        self.counters.hits.incr();
                    }
                    return Err(GetOutcome {
                        value: st.value.clone(),
                        meta: self.meta(st, first, now),
                        error: None,
                    });
                }
                if first {
                    if st.value.is_some() {
                        bump(&self.counters.misses_blocking);
                    } else {
                        bump(&self.counters.misses_new);
                    }
                }
                if !slot.st.fetching {
                    let backoff = if attempted {
                        slot.st
                            .backoff
                            .wait(&self.shared.backoff, self.shared.rt.jitter())
                    } else {
                        Duration::ZERO
                    };
                    match retry_at {
                        Some(at) if now >= at => {
                            retry_at = None;
                            self.start_fetch(slot, request.clone());
                        }
                        Some(_) => {}
                        None if backoff.is_zero() => self.start_fetch(slot, request.clone()),
                        None => retry_at = Some(now + backoff),
                    }
                }
                seen_attempts = Some(slot.st.attempts);
                Ok(slot.entry.changed.listen())
            });
            drop(info);
            first = false;
            let listener = match step {
                Ok(listener) => listener,
                Err(outcome) => return outcome,
            };
            let woken = match retry_at {
                Some(at) => {
                    let retry =
                        retry_sleep.get_or_insert_with(|| Sleep::until(&*self.shared.rt, at));
                    retry.reset(at);
                    Either::Left(select(listener, retry).map(|_| ()))
                }
                None => Either::Right(listener),
            };
            match deadline {
                None => {
                    woken.await;
                }
                Some(deadline) => {
                    let timer =
                        sleep.get_or_insert_with(|| Sleep::until(&*self.shared.rt, deadline));
                    if let Either::Right(_) = select(woken, timer).await {
                        return self.timeout_outcome(hash, &request.cache_info());
                    }
                }
            }
            // The reference revalidates once: after a fetch, the entry counts as current.
            must_revalidate = false;
        }
    }

    /// The answer to a get whose one fetch attempt failed, honouring `stale_if_error`.
    fn error_outcome(
        &self,
        st: &EntryState<T>,
        info: &RequestInfo<'_>,
        error: GetError<T::Error>,
        now: Instant,
    ) -> GetOutcome<T::Value, T::Error> {
        let meta = self.meta(st, false, now);
        if let (Some(limit), Some(fetched_at), Some(value)) =
            (info.stale_if_error, st.fetched_at, &st.value)
        {
            if now.saturating_duration_since(fetched_at) <= limit {
                return GetOutcome {
                    value: Some(value.clone()),
                    meta: ResultMeta {
                        age: now.saturating_duration_since(fetched_at),
                        ..meta
                    },
                    error: None,
                };
            }
        }
        GetOutcome {
            value: st.value.clone(),
            meta,
            error: Some(error),
        }
    }

    fn timeout_outcome(&self, hash: u64, info: &RequestInfo<'_>) -> GetOutcome<T::Value, T::Error> {
        let now = self.shared.rt.now();
        let table = self.read(hash);
        let (key, dc, token) = (&*info.key, &*info.datacenter, &*info.token);
        match table.find(hash, |s| s.entry.key.matches(key, dc, token)) {
            Some(slot) => GetOutcome {
                value: slot.st.value.clone(),
                meta: self.meta(&slot.st, false, now),
                error: None,
            },
            None => GetOutcome {
                value: None,
                meta: ResultMeta::default(),
                error: None,
            },
        }
    }

    // ===== fetch =====

    /// Starts a fetch chain for the entry; the caller checked that none is in flight.
    pub(crate) fn start_fetch(&self, slot: &mut Slot<T>, request: T::Request) {
        self.start_chain(slot, request, None);
    }

    /// Starts a fetch chain whose first fetch waits until `first_at` (or runs now), replacing
    /// any chain sleeping between refreshes.
    fn start_chain(&self, slot: &mut Slot<T>, request: T::Request, first_at: Option<Instant>) {
        let Some(this) = self.this.upgrade() else {
            return;
        };
        let st = &mut slot.st;
        st.generation += 1;
        st.refresh_stopped = false;
        if std::mem::take(&mut st.chain_sleeping) {
            // Wake the replaced chain so that it stops now, not at its next timer.
            slot.entry.changed.notify(usize::MAX);
        }
        match first_at {
            None => st.fetching = true,
            Some(_) => st.chain_sleeping = true,
        }
        let chain = this.fetch_chain(slot.entry.clone(), st.generation, request, first_at);
        self.shared.rt.spawn(Box::pin(chain));
    }

    /// Whether a chain should keep fetching after a completed fetch: refresh types until
    /// refresh stops, and any type while it has watchers.
    fn chain_continues(&self, slot: &Slot<T>) -> bool {
        if self.shared.is_closed() {
            return false;
        }
        (self.opts.refresh && !slot.st.refresh_stopped)
            || slot.entry.watchers.load(Ordering::Acquire) > 0
    }

    /// The pause before a chain's next fetch.
    fn next_wait(&self, slot: &Slot<T>, now: Instant) -> Duration {
        let st = &slot.st;
        let backoff = st
            .backoff
            .wait(&self.shared.backoff, self.shared.rt.jitter());
        if self.opts.refresh && !st.refresh_stopped {
            return backoff + self.opts.refresh_timer;
        }
        if self.opts.supports_blocking || st.backoff.failures() > 0 {
            return backoff;
        }
        // Polling watches: wait `max_age - age`, plus up to a tenth of max_age of jitter.
        let max_age = slot
            .entry
            .watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|w| w.max_age())
            .min()
            .unwrap_or_default();
        let age = st
            .fetched_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        max_age.saturating_sub(age) + max_age.mul_f64(self.shared.rt.jitter() / 10.0)
    }

    /// One fetch after another for an entry, until nothing needs it any more: for refresh types
    /// until eviction, close, a fatal error or give-up; for any type while it is watched. A
    /// newer chain taking over (a get that found the entry invalid) also stops it.
    async fn fetch_chain(
        self: Arc<Self>,
        entry: Arc<EntryShared<T>>,
        generation: u64,
        request: T::Request,
        first_at: Option<Instant>,
    ) {
        let rt = self.shared.rt.clone();
        let mut sleep: Option<Sleep> = None;
        let mut next_at = first_at;
        loop {
            if let Some(deadline) = next_at {
                // Wait for the next fetch; wake early on eviction, replacement or close.
                loop {
                    let changed = entry.changed.listen();
                    let closed = self.shared.close_event.listen();
                    let claimed = self.with_slot(&entry, |slot| {
                        if slot.st.generation != generation || !self.chain_continues(slot) {
                            if slot.st.generation == generation {
                                slot.st.chain_sleeping = false;
                            }
                            return Some(false);
                        }
                        if rt.now() >= deadline {
                            slot.st.chain_sleeping = false;
                            slot.st.fetching = true;
                            return Some(true);
                        }
                        None
                    });
                    match claimed {
                        None | Some(Some(false)) => return,
                        Some(Some(true)) => break,
                        Some(None) => {}
                    }
                    let timer = sleep.get_or_insert_with(|| Sleep::until(&*rt, deadline));
                    timer.reset(deadline);
                    select(select(changed, closed), timer).await;
                }
            }

            // The per-entry rate limit, re-read each time so reloaded options apply.
            loop {
                let limit = self.shared.rate_limit();
                let now = rt.now();
                let wait = self.with_slot(&entry, |slot| {
                    (slot.st.generation == generation).then(|| slot.st.bucket.acquire(now, &limit))
                });
                let Some(Some(wait)) = wait else {
                    return;
                };
                if wait.is_zero() {
                    break;
                }
                let timer = sleep.get_or_insert_with(|| Sleep::until(&*rt, now));
                timer.reset(now + wait);
                timer.await;
            }

            let Some(Some((opts, connected_timer))) = self.with_slot(&entry, |slot| {
                let st = &slot.st;
                (st.generation == generation).then(|| self.fetch_options(st))
            }) else {
                return;
            };

            let fetch = AssertUnwindSafe(self.ty.fetch(opts, &request)).catch_unwind();
            let result = if connected_timer {
                let mut fetch = std::pin::pin!(fetch);
                let threshold = Sleep::after(&*rt, CONNECTED_THRESHOLD);
                match select(fetch.as_mut(), threshold).await {
                    Either::Left((result, _)) => result,
                    Either::Right(((), _)) => {
                        // A blocking fetch open this long means the server is reachable.
                        self.with_slot(&entry, |slot| slot.st.lost_contact_at = None);
                        fetch.await
                    }
                }
            } else {
                fetch.await
            };

            let now = rt.now();
            let next = self.with_slot(&entry, |slot| {
                if slot.st.generation != generation {
                    // Replaced by a newer chain while in flight: the newer one owns the entry.
                    return (None, None);
                }
                self.apply(slot, result, now);
                let snapshot = (slot.entry.watchers.load(Ordering::Acquire) > 0)
                    .then(|| self.snapshot_of(&slot.st, false, now));
                let wait = self
                    .chain_continues(slot)
                    .then(|| self.next_wait(slot, now));
                slot.st.chain_sleeping = wait.is_some();
                (wait, snapshot)
            });
            entry.changed.notify(usize::MAX);
            let Some((wait, snapshot)) = next else {
                // Evicted during the fetch: never re-inserted.
                return;
            };
            if let Some(snapshot) = snapshot {
                self.deliver(&entry, &snapshot);
            }
            let Some(wait) = wait else {
                return;
            };
            next_at = Some(now + wait);
        }
    }

    /// The options for the next fetch, and whether to arm the "connected" timer.
    fn fetch_options(&self, st: &EntryState<T>) -> (FetchOptions<T::Value>, bool) {
        let mut opts = FetchOptions::new();
        if self.opts.supports_blocking {
            opts.min_index = st.index;
            opts.timeout = self.opts.query_timeout;
        }
        opts.last_result = st.value.clone().map(|value| LastResult {
            value,
            index: st.index,
            state: st.fetch_state.clone(),
        });
        let connected_timer = self.opts.refresh
            && st.index > 0
            && self.opts.supports_blocking
            && self.opts.query_timeout > CONNECTED_THRESHOLD
            && st.lost_contact_at.is_some();
        (opts, connected_timer)
    }

    /// Stores a fetch's outcome in the entry (SPEC §5).
    fn apply(
        &self,
        slot: &mut Slot<T>,
        result: std::thread::Result<Result<FetchResult<T::Value>, T::Error>>,
        now: Instant,
    ) {
        let st = &mut slot.st;
        st.fetching = false;
        st.attempts += 1;
        let mut fatal = false;
        let success = match result {
            Ok(Ok(result)) => {
                bump(&self.counters.fetch_success);
                if result.not_modified {
                    bump(&self.counters.fetch_not_modified);
                }
                st.error = None;
                let has_value =
                    result.value.is_some() || (result.not_modified && st.value.is_some());
                if has_value {
                    if let Some(value) = result.value {
                        if !result.not_modified || st.value.is_none() {
                            st.value = Some(value);
                        }
                    }
                    let index = result.index.max(1);
                    if index < st.index {
                        st.resets += 1;
                    }
                    st.index = index;
                    st.fetch_state = result.state;
                    st.fetched_at = Some(now);
                } else if result.state.is_some() {
                    st.fetch_state = result.state;
                }
                if self.opts.refresh {
                    st.lost_contact_at = None;
                }
                // A zero index never blocks: count it as a failure so backoff guards the loop.
                result.index > 0
            }
            Ok(Err(error)) => {
                fatal = self.ty.is_fatal(&error);
                bump(&self.counters.fetch_errors);
                if fatal {
                    bump(&self.counters.fetch_errors_fatal);
                }
                st.error = Some(GetError::Fetch(Arc::new(error)));
                false
            }
            Err(panic) => {
                bump(&self.counters.fetch_errors);
                st.error = Some(GetError::Panicked(panic_message(&*panic)));
                false
            }
        };
        st.backoff.on_outcome(success);
        if success {
            st.failing_since = None;
        } else {
            st.failing_since.get_or_insert(now);
            if self.opts.refresh && st.error.is_some() {
                st.lost_contact_at.get_or_insert(now);
            }
        }
        if !st.expiry_scheduled {
            // The TTL clock starts when the first fetch completes.
            st.expiry_scheduled = true;
            slot.entry.touch(self.nanos(now));
            self.schedule_expiry(&slot.entry, now + self.opts.last_get_ttl);
        }
        let st = &mut slot.st;
        if self.opts.refresh && fatal {
            st.refresh_stopped = true;
        }
        if let (Some(give_up), Some(since)) = (self.opts.refresh_give_up, st.failing_since) {
            if now.saturating_duration_since(since) >= give_up {
                st.refresh_stopped = true;
            }
        }
    }

    fn schedule_expiry(&self, entry: &Arc<EntryShared<T>>, deadline: Instant) {
        let target = Arc::new(ExpiryRef {
            store: self.this.clone(),
            entry: entry.clone(),
        });
        self.shared.expiry.schedule(deadline, target);
    }

    /// Removes `entry` from its table (if it is still there) and wakes everything waiting on it.
    pub(crate) fn evict(&self, entry: &Arc<EntryShared<T>>) -> bool {
        let removed = {
            let mut table = self.write(entry.hash);
            match table.find_entry(entry.hash, |s| Arc::ptr_eq(&s.entry, entry)) {
                Ok(occupied) => Some(occupied.remove().0),
                Err(_) => None,
            }
        };
        let Some(slot) = removed else {
            return false;
        };
        self.counters.entries.fetch_sub(1, Ordering::Relaxed);
        self.shared.on_remove();
        // Dropping the slot drops the value and the fetch state (its cleanup), outside the lock.
        drop(slot);
        entry.changed.notify(usize::MAX);
        true
    }

    // ===== prepopulate =====

    pub(crate) fn prepopulate(&self, info: &RequestInfo<'_>, value: T::Value, index: u64) {
        let now = self.shared.rt.now();
        let hash = self.hash(info);
        let (entry, first, snapshot) = self.with_entry(hash, info, |slot| {
            let st = &mut slot.st;
            let index = index.max(1);
            if st.value.is_some() && index < st.index {
                st.resets += 1;
            }
            st.value = Some(value);
            st.index = index;
            st.error = None;
            st.fetched_at = Some(now);
            st.lost_contact_at = None;
            slot.entry.touch(self.nanos(now));
            let first = !std::mem::replace(&mut st.expiry_scheduled, true);
            let snapshot = (slot.entry.watchers.load(Ordering::Acquire) > 0)
                .then(|| self.snapshot_of(&slot.st, false, now));
            (slot.entry.clone(), first, snapshot)
        });
        if first {
            self.schedule_expiry(&entry, now + self.opts.last_get_ttl);
        }
        entry.changed.notify(usize::MAX);
        if let Some(snapshot) = snapshot {
            self.deliver(&entry, &snapshot);
        }
    }

    // ===== watches =====

    pub(crate) fn this(&self) -> Option<Arc<Self>> {
        self.this.upgrade()
    }

    pub(crate) fn snapshot_of(&self, st: &EntryState<T>, hit: bool, now: Instant) -> Snapshot<T> {
        Snapshot {
            value: st.value.clone(),
            error: st.error.clone(),
            meta: self.meta(st, hit, now),
            resets: st.resets,
        }
    }

    /// The entry's current state as a watch event, if it is still cached.
    pub(crate) fn snapshot(&self, entry: &Arc<EntryShared<T>>) -> Option<Snapshot<T>> {
        let now = self.shared.rt.now();
        let table = self.read(entry.hash);
        let slot = table.find(entry.hash, |s| Arc::ptr_eq(&s.entry, entry))?;
        Some(self.snapshot_of(&slot.st, false, now))
    }

    /// Offers a fetch's outcome to every watch of the entry, dropping those whose receiver is
    /// gone.
    pub(crate) fn deliver(&self, entry: &Arc<EntryShared<T>>, snap: &Snapshot<T>) {
        let mut removed = 0;
        entry
            .watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|watcher| {
                let keep = watcher.offer(self, entry, snap);
                if !keep {
                    watcher.cancel();
                    removed += 1;
                }
                keep
            });
        if removed > 0 {
            self.watchers_removed(entry, removed);
        }
    }

    /// Registers a watch on the entry of `request` and makes sure something keeps fetching it.
    pub(crate) fn add_watcher(
        &self,
        request: T::Request,
        watcher: Arc<dyn Watcher<T>>,
    ) -> Arc<EntryShared<T>> {
        let now = self.shared.rt.now();
        let info = request.cache_info();
        let hash = self.hash(&info);
        let max_age = watcher.max_age();
        let (entry, initial) = self.with_entry(hash, &info, |slot| {
            slot.entry.touch(self.nanos(now));
            slot.entry
                .watch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(watcher.clone());
            slot.entry.watchers.fetch_add(1, Ordering::AcqRel);
            let st = &slot.st;
            let age = st.fetched_at.map(|t| now.saturating_duration_since(t));
            let fresh = st.value.is_some() && max_age.is_none_or(|m| age.is_some_and(|a| a <= m));
            // The first delivery may be a cache hit.
            let initial = fresh.then(|| self.snapshot_of(st, true, now));
            if !st.fetching && !st.chain_sleeping {
                // Nothing keeps this entry fetching: start the watch loop. A fresh polled
                // value is next fetched when it reaches max age.
                let first_at = match (fresh, max_age, st.fetched_at) {
                    (true, Some(max_age), Some(at)) => Some(at + max_age),
                    _ => None,
                };
                self.start_chain(slot, request.clone(), first_at);
            }
            (slot.entry.clone(), initial)
        });
        drop(info);
        if let Some(snap) = initial {
            if !watcher.offer(self, &entry, &snap) {
                self.remove_watcher(&entry, watcher.id());
            }
        }
        entry
    }

    /// Removes a watch from its entry (cancel, or receiver gone). Idempotent.
    pub(crate) fn remove_watcher(&self, entry: &Arc<EntryShared<T>>, id: u64) {
        let removed = {
            let mut list = entry.watch.lock().unwrap_or_else(|p| p.into_inner());
            list.iter()
                .position(|w| w.id() == id)
                .map(|pos| list.swap_remove(pos))
        };
        if let Some(watcher) = removed {
            watcher.cancel();
            self.watchers_removed(entry, 1);
        }
    }

    fn watchers_removed(&self, entry: &Arc<EntryShared<T>>, n: usize) {
        let left = entry.watchers.fetch_sub(n, Ordering::AcqRel) - n;
        self.counters.watches.fetch_sub(n as u64, Ordering::Relaxed);
        // The TTL counts again from the last watch.
        entry.touch(self.nanos(self.shared.rt.now()));
        if left == 0 {
            // Wake a chain that only ran for the watches, so that it stops now.
            entry.changed.notify(usize::MAX);
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

    fn oldest(&self) -> Option<(u64, Arc<dyn Fn() -> bool + Send + Sync>)> {
        let mut best: Option<(u64, Arc<EntryShared<T>>)> = None;
        let sampled: Vec<&Shard<T>> =
            if self.counters.entries.load(Ordering::Relaxed) <= EXACT_LRU_LIMIT {
                self.shards.iter().collect()
            } else {
                let start = fastrand::usize(..SHARDS);
                (0..SAMPLED_SHARDS)
                    .map(|i| &self.shards[(start + i * (SHARDS / SAMPLED_SHARDS)) % SHARDS])
                    .collect()
            };
        for shard in sampled {
            let table = shard.table.read().unwrap_or_else(|p| p.into_inner());
            for slot in table.iter() {
                // Watched entries stay; so do entries still waiting for their first value
                // (the one being inserted among them), or a get could evict its own entry.
                if slot.entry.watchers.load(Ordering::Relaxed) > 0 || slot.st.value.is_none() {
                    continue;
                }
                let read = slot.entry.last_read.load(Ordering::Relaxed);
                if best.as_ref().is_none_or(|(r, _)| read < *r) {
                    best = Some((read, slot.entry.clone()));
                }
            }
        }
        let (read, entry) = best?;
        let store = self.this.clone();
        Some((
            read,
            Arc::new(move || {
                store.upgrade().is_some_and(|store| {
                    let evicted = store.evict(&entry);
                    if evicted {
                        bump(&store.counters.evictions_capacity);
                    }
                    evicted
                })
            }),
        ))
    }

    fn close_watches(&self) {
        for shard in self.shards.iter() {
            let entries: Vec<Arc<EntryShared<T>>> = {
                let table = shard.table.read().unwrap_or_else(|p| p.into_inner());
                table.iter().map(|slot| slot.entry.clone()).collect()
            };
            for entry in entries {
                let list =
                    std::mem::take(&mut *entry.watch.lock().unwrap_or_else(|p| p.into_inner()));
                if !list.is_empty() {
                    for watcher in &list {
                        watcher.cancel();
                    }
                    self.watchers_removed(&entry, list.len());
                }
            }
        }
    }
}

struct ExpiryRef<T: CacheType> {
    store: Weak<Store<T>>,
    entry: Arc<EntryShared<T>>,
}

impl<T: CacheType> Expirable for ExpiryRef<T> {
    fn check_expiry(&self, now: Instant) -> Option<Instant> {
        let store = self.store.upgrade()?;
        let ttl = store.opts.last_get_ttl;
        if self.entry.watchers.load(Ordering::Relaxed) > 0 {
            // Watched entries stay alive while watched.
            return Some(now + ttl);
        }
        let deadline = store.instant(self.entry.last_read.load(Ordering::Relaxed)) + ttl;
        if deadline > now {
            return Some(deadline);
        }
        if store.evict(&self.entry) {
            bump(&store.counters.expirations);
        }
        None
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> Arc<str> {
    if let Some(s) = panic.downcast_ref::<&str>() {
        Arc::from(*s)
    } else if let Some(s) = panic.downcast_ref::<String>() {
        Arc::from(s.as_str())
    } else {
        Arc::from("non-string panic payload")
    }
}

/// The future of a get: ready at once on a hit, boxed while waiting on a miss.
pub(crate) enum GetFuture<'a, T: CacheType> {
    Ready(Option<GetOutcome<T::Value, T::Error>>),
    Slow(BoxFuture<'a, GetOutcome<T::Value, T::Error>>),
}

// Nothing in a `GetFuture` is pinned structurally: the outcome is moved out, the boxed future
// is pinned by its box.
impl<T: CacheType> Unpin for GetFuture<'_, T> {}

impl<T: CacheType> Future for GetFuture<'_, T> {
    type Output = GetOutcome<T::Value, T::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            GetFuture::Ready(outcome) => {
                Poll::Ready(outcome.take().expect("polled after completion"))
            }
            GetFuture::Slow(future) => future.as_mut().poll(cx),
        }
    }
}
