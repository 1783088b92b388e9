//! The cache-wide state every store and background task holds ([`CacheState`]): the runtime,
//! the clock's origin, close, backoff policy, rate limit, capacity and the registry of stores
//! it enforces, the expiry queue and its task, and the list of watches the sweep checks.
//!
//! It knows stores only through [`ErasedStore`] and watches only through [`Sweep`], so it sits
//! below both in the module stack.

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use event_listener::Event;
use futures::future::{Either, select};

use crate::backoff::BackoffPolicy;
use crate::metrics::TypeMetrics;
use crate::ratelimit::RateLimit;
use crate::runtime::{CoarseClock, SharedRuntime, Sleep};

/// A runtime's coarse clock and its two origins, so that both its readings count nanoseconds
/// since the cache's `epoch`.
struct HitClock {
    clock: CoarseClock,
    /// The coarse reading at `epoch` less two ticks: hit-path times are not behind the precise
    /// time, even right after an idle spell.
    coarse_origin: u64,
    /// The precise reading just before `epoch`, if the clock has one.
    precise_origin: Option<u64>,
}

/// Cache-wide state shared by every store and background task.
pub(crate) struct CacheState {
    pub(crate) rt: SharedRuntime,
    /// The origin of the entries' last-read timestamps.
    pub(crate) epoch: Instant,
    /// The runtime's coarse clock, if it has one, aligned to `epoch`.
    hit_clock: Option<HitClock>,
    closed: AtomicBool,
    pub(crate) close_event: Event,
    pub(crate) backoff: BackoffPolicy,
    /// Notified when a store's queue gets a deadline earlier than all its others, or drops
    /// some (the expiry task then looks at every store's queue again).
    pub(crate) expiry_changed: Event,
    pub(crate) rate_limit: RwLock<RateLimit>,
    /// Notified when the rate limit is reloaded, so fetches waiting for a token re-check.
    pub(crate) limit_changed: Event,
    max_entries: Option<usize>,
    pub(crate) entries: AtomicUsize,
    /// Weak: stores hold the `CacheState`, and the registry in `Inner` keeps them alive.
    pub(crate) stores: RwLock<Vec<Weak<dyn ErasedStore>>>,
    /// Every watch, for the periodic check of receivers that went away (see `watch/sweep.rs`).
    pub(crate) sweep: Mutex<Vec<Weak<dyn Sweep>>>,
    pub(crate) sweeper_running: AtomicBool,
}

impl CacheState {
    pub(crate) fn new(
        rt: SharedRuntime,
        backoff: BackoffPolicy,
        rate_limit: RateLimit,
        max_entries: Option<usize>,
    ) -> Arc<Self> {
        let clock = rt.coarse_clock();
        // Read before `epoch`, so that precise times measured from it are never behind.
        let precise_origin = clock.and_then(|c| c.read_precise());
        let epoch = rt.now();
        let hit_clock = clock.map(|clock| {
            // Two ticks: right after an idle spell the coarse clock lags by more than one (up
            // to 7.6 ms measured with 4 ms ticks), and a stamp behind the precise time would
            // shorten a TTL.
            let lead = u64::try_from(clock.resolution().as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_mul(2);
            HitClock {
                clock,
                coarse_origin: clock.read().saturating_sub(lead),
                precise_origin,
            }
        });
        Arc::new(Self {
            rt,
            epoch,
            hit_clock,
            closed: AtomicBool::new(false),
            close_event: Event::new(),
            backoff,
            expiry_changed: Event::new(),
            rate_limit: RwLock::new(rate_limit),
            limit_changed: Event::new(),
            max_entries,
            entries: AtomicUsize::new(0),
            stores: RwLock::new(Vec::new()),
            sweep: Mutex::new(Vec::new()),
            sweeper_running: AtomicBool::new(false),
        })
    }

    /// The last-read stamp for a read at `now`: the coarse clock where the runtime has one
    /// (as a hit stamps), else `now` itself.
    #[inline]
    pub(crate) fn stamp_nanos(&self, now: Instant) -> u64 {
        self.coarse_nanos().unwrap_or_else(|| self.nanos(now))
    }

    /// The coarse clock's reading as nanoseconds since `epoch`, if the runtime has one: a few
    /// nanoseconds to read, and aligned to lead the precise time by up to three ticks (see
    /// `hit_clock`), which shows in an age of milliseconds (see `Store::hit_now`).
    #[inline]
    pub(crate) fn coarse_nanos(&self) -> Option<u64> {
        let hit = self.hit_clock.as_ref()?;
        Some(hit.clock.read().saturating_sub(hit.coarse_origin))
    }

    /// The precise time as nanoseconds since `epoch`: the coarse clock's precise reading where
    /// it has one (`CLOCK_MONOTONIC`: ~23 ns here, against ~31 for tokio's `now`), else the
    /// runtime's `now`.
    #[inline]
    pub(crate) fn precise_nanos(&self) -> u64 {
        self.hit_clock
            .as_ref()
            .and_then(|hit| {
                Some(
                    hit.clock
                        .read_precise()?
                        .saturating_sub(hit.precise_origin?),
                )
            })
            .unwrap_or_else(|| self.nanos(self.rt.now()))
    }

    /// `now` as nanoseconds since `epoch` (saturating), the form entries keep their times in.
    #[inline]
    pub(crate) fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn rate_limit(&self) -> RateLimit {
        *self.rate_limit.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new entry (under its table's lock).
    pub(crate) fn count_insert(&self) {
        self.entries.fetch_add(1, Ordering::Relaxed);
    }

    /// After an insert (counted by [`CacheState::count_insert`]): evicts least recently read
    /// entries until at most the capacity remain; `keep` (the new entry) is never the one.
    pub(crate) fn enforce_capacity(&self, keep: *const ()) {
        if let Some(max) = self.max_entries {
            self.evict_down_to(max, keep);
        }
    }

    /// After an entry stopped being held (its last waiting get left, or its last watch):
    /// evicts down to the capacity if inserts went past it while every candidate was held.
    /// Without this the cache would stay past its bound until the next insert. Not after
    /// close, which ends every watch at once and leaves the entries as they are (they no
    /// longer expire either, and no miss inserts one).
    pub(crate) fn enforce_capacity_on_release(&self) {
        if !self.is_closed() {
            self.enforce_capacity(std::ptr::null());
        }
    }

    /// Counts an entry removed from its table.
    pub(crate) fn on_remove(&self) {
        self.entries.fetch_sub(1, Ordering::Relaxed);
    }

    /// Evicts least recently read entries until at most `max` remain.
    fn evict_down_to(&self, max: usize, keep: *const ()) {
        while self.entries.load(Ordering::Relaxed) > max {
            let oldest = self
                .live_stores()
                .iter()
                .filter_map(|s| s.least_recently_read(keep))
                .min_by_key(|(read, _)| *read);
            match oldest {
                Some((_, victim)) => {
                    victim.evict();
                }
                None => break,
            }
        }
    }

    /// Closes the cache: stops background work and ends every watch. Idempotent.
    pub(crate) fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.close_event.notify(usize::MAX);
            for store in self.live_stores() {
                store.close_watches();
            }
        }
    }

    /// The stores still registered (taken out of the registry's lock, which eviction and
    /// closing must not hold while they call into a store).
    fn live_stores(&self) -> Vec<Arc<dyn ErasedStore>> {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        stores.iter().filter_map(Weak::upgrade).collect()
    }

    /// The expiry task: sleeps until the earliest deadline of any store, checks what is due,
    /// and stops when the cache closes.
    pub(crate) async fn run_expiry(self: Arc<Self>) {
        let shared = &self;
        let mut sleep: Option<Sleep> = None;
        // The deadline the timer fired for, last time round.
        let mut fired: Option<Instant> = None;
        loop {
            let earlier = shared.expiry_changed.listen();
            let closed = shared.close_event.listen();
            if shared.is_closed() {
                break;
            }
            let now = shared.rt.now();
            let mut any_due = false;
            let mut next: Option<Instant> = None;
            for store in shared.live_stores() {
                let (due, store_next) = store.expire_due(now);
                any_due |= due;
                next = match (next, store_next) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            // Fired before `now()` reached its deadline (timers that fire early): by how much.
            let early = fired
                .take()
                .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
            if any_due {
                continue;
            }
            let wake = select(earlier, closed);
            match next {
                Some(mut deadline) => {
                    // Arm that much later, so that the next firing finds the deadline due,
                    // rather than re-arm a timer that fires at once and spin until `now()`
                    // gets there (an entry never expires before its time by `now()`).
                    deadline = deadline.checked_add(early).unwrap_or(deadline);
                    let timer = match sleep.as_mut() {
                        Some(timer) => {
                            timer.reset(deadline);
                            timer
                        }
                        None => sleep.insert(Sleep::until(&*shared.rt, deadline)),
                    };
                    // A fired timer is re-armed by `reset` next time round.
                    if let Either::Right(_) = select(wake, timer).await {
                        fired = Some(deadline);
                    }
                }
                None => {
                    wake.await;
                }
            }
        }
        for store in shared.live_stores() {
            store.clear_expiry();
        }
    }
}

/// What the cache needs of a store without knowing its type.
pub(crate) trait ErasedStore: Send + Sync {
    fn metrics(&self) -> TypeMetrics;
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
    /// The `TypeId` of the cache type the store holds.
    fn cache_type_id(&self) -> TypeId;
    /// The least recently read entry other than `keep` (the one being inserted), as (last
    /// read, a handle that evicts it), for the capacity bound. Exact below [`EXACT_LRU_LIMIT`]
    /// entries; above it, the oldest in one random shard (sampled LRU, as Redis does), so an
    /// insert never scans a million entries, or in the next shards if every entry of that one
    /// is held.
    fn least_recently_read(&self, keep: *const ()) -> Option<(u64, Box<dyn EvictOne>)>;
    /// Ends every watch (the cache is closing).
    fn close_watches(&self);
    /// Removes every entry and ends every watch (the type was registered again).
    fn release_all(&self);
    /// See [`Store::retry_now`].
    fn retry_now(&self) -> usize;
    /// Checks the entries whose expiry deadline passed at `now`: evicts the expired, schedules
    /// the others again. Returns whether any was due, and the store's next deadline.
    fn expire_due(&self, now: Instant) -> (bool, Option<Instant>);
    /// Drops every expiry deadline (the cache closed).
    fn clear_expiry(&self);
}

/// One entry chosen for capacity eviction.
pub(crate) trait EvictOne {
    /// Evicts the entry; `false` if it was already gone.
    fn evict(&self) -> bool;
}

/// A watch the sweep can check.
pub(crate) trait Sweep: Send + Sync {
    /// Removes the watch if its receiver is gone; `false` once the watch has ended.
    fn sweep(&self) -> bool;
}
