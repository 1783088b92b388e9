//! The fetch chain (docs/contract.md: Fetch, Backoff, Refresh): one task per entry at a time
//! runs the single-flight fetch, stores its result, wakes waiters, offers it to watches, and —
//! for refresh types and watched entries — fetches again after backoff, the refresh timer or the
//! polling interval.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{Either, select};

use crate::cache_type::{CacheType, Connected, FetchOptions, FetchResult, FetchState, LastResult};
use crate::chain;
use crate::error::GetError;
use crate::metrics::bump;
use crate::runtime::{BoxFuture, Runtime, Sleep};
use crate::store::{
    EntryHandle, EntryState, Slot, Store, contained, drop_contained, next_attempt, panic_message,
    wake_all,
};

/// What a fetch attempt gave: its result, or the panic it raised.
pub(crate) type FetchOutcome<T> =
    std::thread::Result<Result<FetchResult<<T as CacheType>::Value>, <T as CacheType>::Error>>;

/// A fetch ready to start: its options, and whether to arm the "connected" timer.
type Ready<T> = (FetchOptions<<T as CacheType>::Value>, bool);

/// How long a refresh type's blocking fetch must stay open to count as connected again (the
/// reference's 31 s: yamux keepalives are every 30 s, so a blackholed connection has failed by
/// then).
const CONNECTED_THRESHOLD: Duration = Duration::from_secs(31);

impl<T: CacheType> Store<T> {
    /// Starts a fetch chain for the entry; the caller checked that none is in flight. The
    /// caller spawns it once the table's lock is released (see [`StartedChain`]).
    #[must_use = "a started chain runs only once spawned"]
    pub(crate) fn start_fetch(
        &self,
        slot: &mut Slot<T>,
        request: T::Request,
    ) -> Option<StartedChain<T>> {
        self.start_chain(slot, request, None)
    }

    /// Starts a fetch chain whose first fetch waits until `first_at` (`None`: runs now;
    /// `Some(None)`: until woken), replacing any chain sleeping between refreshes. The caller
    /// spawns it once the table's lock is released. `None`: the store is gone.
    #[must_use = "a started chain runs only once spawned"]
    pub(crate) fn start_chain(
        &self,
        slot: &mut Slot<T>,
        request: T::Request,
        first_at: Option<Option<Instant>>,
    ) -> Option<StartedChain<T>> {
        let this = self.this.upgrade()?;
        let (generation, replaced) = slot.state_mut().chain.start(first_at.is_none());
        let task = ChainTask {
            store: this,
            entry: slot.handle().clone(),
            generation,
            finished: false,
        };
        Some(StartedChain {
            // Woken with the spawn, so that it stops now, not at its next timer.
            replaced: replaced.then(|| slot.handle().clone()),
            task: Box::pin(task.run(request, first_at)),
        })
    }

    /// A chain's task ended before its chain did: dropped by its runtime (unrun, or with
    /// its fetch in flight), or unwound by a panic outside the fetch. Nothing will run the
    /// chain again, so it ends here, leaving the entry idle: a fetch in flight counts as a
    /// failed attempt ([`GetError::Abandoned`]), which the gets waiting for it answer, and the
    /// next get that needs a fetch, or the next watch, starts a new chain. A refresh type's
    /// entry keeps its value unrefreshed meanwhile, as after a fatal error. Not under the
    /// table's lock (see [`StartedChain`]).
    fn abandon(&self, entry: &Arc<EntryHandle<T>>, generation: u32) {
        // Contained: a runtime shutting down may panic on a clock read (tokio's, during
        // thread-local destruction); the chain ends whatever it does.
        let now = contained(|| self.shared.rt.now());
        let ended = self.with_slot(entry, |slot| {
            let chain = slot.state().chain;
            if !chain.owns(generation) || !chain.is_active() {
                return false;
            }
            slot.state_mut().chain.stop(generation);
            if let (true, Some(now)) = (chain.is_fetching(), now) {
                // Contained: storing the error drops the entry's previous one, the
                // consumer's value. The error replaces no value: no leftovers.
                contained(|| drop(self.apply(slot, Err(GetError::Abandoned), false, now)));
            }
            true
        });
        if ended == Some(true) {
            wake_all(&entry.changed);
        }
    }

    /// Whether the entry still needs its chain (see [`chain::needed`]).
    fn chain_needed(&self, slot: &Slot<T>) -> bool {
        chain::needed(
            self.shared.is_closed(),
            self.opts.refresh && !slot.state().chain.refresh_stopped(),
            slot.state().watched(),
        )
    }

    /// The pause before the chain's next fetch, or `None` when it ends: the pure decision of
    /// [`chain::next_fetch`] on this entry's state, with the runtime's jitter.
    fn next_fetch(&self, slot: &Slot<T>, now: Instant) -> Option<Duration> {
        let state = slot.state();
        let watched = state.watched();
        let poll_every = if watched && !self.opts.supports_blocking {
            slot.handle()
                .extras()
                .iter()
                .filter_map(|w| w.max_age())
                .min()
                .unwrap_or_default()
        } else {
            Duration::ZERO
        };
        let after = chain::After {
            closed: self.shared.is_closed(),
            refresh: self.opts.refresh,
            refresh_stopped: state.chain.refresh_stopped(),
            watched,
            blocking: self.opts.supports_blocking,
            backoff: state.backoff(),
            refresh_timer: self.opts.refresh_timer,
            poll_every,
            age: state
                .fetched_at
                .map_or(Duration::ZERO, |t| self.since(t, now)),
            jitter: self.shared.rt.jitter(),
        };
        chain::next_fetch(&self.shared.backoff, &after)
    }

    /// The signal a blocking fetch gives when the server accepted its query (see
    /// [`Connected`]): clears the entry's error and lost-contact time at once.
    fn connected_signal(&self, entry: &Arc<EntryHandle<T>>, generation: u32) -> Connected {
        let store = self.this.clone();
        let entry = entry.clone();
        Connected::new(move || {
            let Some(store) = store.upgrade() else {
                return;
            };
            let failing = store.with_slot(&entry, |slot| {
                if slot.state().chain.owns(generation) && slot.state().chain.is_fetching() {
                    slot.state_mut().connected()
                } else {
                    0
                }
            });
            store.adjust_failing(failing.unwrap_or(0));
        })
    }

    /// Waits until the chain's next fetch is due (`deadline`; `None`: until woken), waking
    /// early on eviction, replacement, close, or a request to retry now. Returns whether the
    /// chain claimed its fetch (`false`: it ends).
    #[allow(clippy::manual_async_fn)] // an `async fn` keeps its arguments twice
    fn wait_turn<'a>(
        &'a self,
        entry: &'a Arc<EntryHandle<T>>,
        generation: u32,
        deadline: Option<Instant>,
        sleep: &'a mut Option<Sleep>,
    ) -> impl Future<Output = bool> + 'a {
        async move {
            let rt = &self.shared.rt;
            // The timer fired: the fetch is due even if `now()` is not quite at the deadline
            // yet (a runtime whose timers fire early would otherwise re-arm a timer that fires
            // at once, and spin until its clock caught up).
            let mut fired = false;
            loop {
                // A chain due at once (a blocking refresh) claims without listening: an entry's
                // event allocates its listener list on the first listen, for good.
                if let Some(claimed) = self.claim_turn(entry, generation, deadline, fired) {
                    return claimed;
                }
                let changed = entry.changed.listen();
                let closed = self.shared.close_event.listen();
                // Listening, look again: a wake-up since the first look would be lost.
                if let Some(claimed) = self.claim_turn(entry, generation, deadline, fired) {
                    return claimed;
                }
                match deadline {
                    Some(deadline) => {
                        let timer = sleep.get_or_insert_with(|| Sleep::until(&**rt, deadline));
                        timer.reset(deadline);
                        fired = matches!(
                            select(select(changed, closed), timer).await,
                            Either::Right(_)
                        );
                    }
                    None => {
                        select(changed, closed).await;
                    }
                }
            }
        }
    }

    /// One look for [`Store::wait_turn`]: `Some(true)` when the chain claimed its fetch,
    /// `Some(false)` when it ends (evicted, replaced, or no longer needed), `None` to wait.
    fn claim_turn(
        &self,
        entry: &Arc<EntryHandle<T>>,
        generation: u32,
        deadline: Option<Instant>,
        fired: bool,
    ) -> Option<bool> {
        let mut woken = false;
        let claimed = self.with_slot(entry, |slot| {
            if !slot.state().chain.owns(generation) {
                return Some(false);
            }
            if !self.chain_needed(slot) {
                // A fetch claimed by `complete` that will not run: the gets that saw it in
                // flight and wait for it look again.
                woken = slot.state().chain.is_fetching();
                slot.state_mut().chain.stop(generation);
                return Some(false);
            }
            if slot.state().chain.is_fetching() {
                // Claimed by `complete` (due at once).
                return Some(true);
            }
            let due = fired || deadline.is_some_and(|d| self.shared.rt.now() >= d);
            slot.state_mut()
                .chain
                .claim(generation, due)
                .then_some(true)
        });
        if woken {
            wake_all(&entry.changed);
        }
        // Gone from its table: the chain ends.
        claimed.unwrap_or(Some(false))
    }

    /// The type's fetch, with a panic contained whether it comes while the future is polled or
    /// before `fetch` returns it (contract: Fetch 9): the chain's fetches and pass-throughs.
    pub(crate) fn fetch_contained<'a>(
        &'a self,
        opts: FetchOptions<T::Value>,
        request: &'a T::Request,
    ) -> impl Future<Output = FetchOutcome<T>> + 'a {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.ty.fetch(opts, request))) {
            Ok(fetch) => Either::Left(AssertUnwindSafe(fetch).catch_unwind()),
            Err(panic) => Either::Right(futures::future::ready(Err(panic))),
        }
    }

    /// One table lock per fetch: the ownership check, the per-entry rate limit (re-read each
    /// time so reloaded options apply) and the fetch options together. A fetch that must wait
    /// reserves its token first, so late timer wake-ups cost no rate. `None`: the entry was
    /// evicted or the chain replaced while waiting.
    #[allow(clippy::manual_async_fn)] // an `async fn` keeps its arguments twice
    fn reserve<'a>(
        &'a self,
        entry: &'a Arc<EntryHandle<T>>,
        generation: u32,
        sleep: &'a mut Option<Sleep>,
    ) -> impl Future<Output = Option<Ready<T>>> + 'a {
        async move {
            let rt = &self.shared.rt;
            let mut reserved = false;
            // The timer for the reserved token fired: the token is due even if `now()` is not
            // quite there yet (timers that fire early would otherwise spin here).
            let mut paid = false;
            loop {
                // Only the wait is kept across the await below, not the step or the limit.
                match self.reserve_step(entry, generation, rt.now(), &mut reserved, paid) {
                    Some(Ok(ready)) => return Some(ready),
                    Some(Err(_)) => {}
                    // Evicted or replaced while waiting.
                    _ => return None,
                }
                // Listen only to wait (an entry's event allocates its listener list on the
                // first listen), then look again: a wake-up since the first look would be lost.
                let limit_changed = self.shared.limit_changed.listen();
                let changed = entry.changed.listen();
                let now = rt.now();
                let wait = match self.reserve_step(entry, generation, now, &mut reserved, paid) {
                    Some(Ok(ready)) => return Some(ready),
                    Some(Err(wait)) => wait,
                    _ => return None,
                };
                // Re-check when the limit is reloaded or the entry is evicted; a wait too long to
                // represent lasts until one of those.
                let woken = select(limit_changed, changed);
                match now.checked_add(wait) {
                    Some(at) => {
                        let timer = sleep.get_or_insert_with(|| Sleep::until(&**rt, at));
                        timer.reset(at);
                        paid = matches!(select(woken, timer).await, Either::Right(_));
                    }
                    None => {
                        woken.await;
                    }
                }
            }
        }
    }

    /// One look at the entry for [`Store::reserve`]: the fetch options when the fetch may
    /// start, or the wait for its rate-limit token (reserved on the first look). `None`: the
    /// entry is gone or the chain no longer owns it.
    fn reserve_step(
        &self,
        entry: &Arc<EntryHandle<T>>,
        generation: u32,
        now: Instant,
        reserved: &mut bool,
        paid: bool,
    ) -> Option<Result<Ready<T>, Duration>> {
        let limit = self.shared.rate_limit();
        self.with_slot(entry, |slot| {
            if !slot.state().chain.owns(generation) {
                return None;
            }
            if limit.per_second.is_some() {
                let bucket = slot.state_mut().bucket();
                let wait = if *reserved {
                    bucket.reserved_wait(now, &limit)
                } else {
                    bucket.reserve(now, &limit)
                };
                *reserved = true;
                // The bucket is brought up to `now` either way, for the next reservation.
                if !wait.is_zero() && !paid {
                    return Some(Err(wait));
                }
            }
            Some(Ok(self.fetch_options(slot.state())))
        })
        .flatten()
    }

    /// Runs one fetch until it completes, or until its entry is removed (capacity, TTL, a new
    /// registration of the type): nothing could store its result then, so it is dropped
    /// (`None`), which frees whatever it holds upstream (a connection, a blocking query) at once
    /// instead of at the end of its query timeout.
    fn run_fetch<'a>(
        &'a self,
        entry: &'a Arc<EntryHandle<T>>,
        generation: u32,
        (mut opts, connected_timer): (FetchOptions<T::Value>, bool),
        request: &'a T::Request,
    ) -> impl Future<Output = Option<FetchOutcome<T>>> + 'a {
        // Built before the future: it holds the fetch, not the options that made it.
        if self.opts.supports_blocking {
            opts.connected = self.connected_signal(entry, generation);
        }
        let mut fetch = self.fetch_contained(opts, request);
        let mut threshold =
            connected_timer.then(|| Sleep::after(&*self.shared.rt, CONNECTED_THRESHOLD));
        async move {
            // Pinned where it was captured: `pin!` would move it into a second slot of this
            // future, and the captured one keeps its room for the future's whole life (the
            // chain's task holds this future for as long as the fetch runs, per entry).
            // SAFETY: `fetch` is owned by this future, which is pinned while it runs; it is not
            // moved after this, and is dropped in place with the future.
            let mut fetch = unsafe { Pin::new_unchecked(&mut fetch) };
            let mut removed = Removed { store: self, entry };
            loop {
                match threshold.as_mut() {
                    Some(timer) => {
                        match select(fetch.as_mut(), select(&mut removed, timer)).await {
                            Either::Left((result, _)) => return Some(result),
                            Either::Right((Either::Left(_), _)) => return None,
                            Either::Right((Either::Right(_), _)) => {
                                // A blocking fetch open this long means the server is reachable.
                                threshold = None;
                                self.with_slot(entry, |slot| slot.state_mut().clear_lost_contact());
                            }
                        }
                    }
                    None => {
                        return match select(fetch.as_mut(), &mut removed).await {
                            Either::Left((result, _)) => Some(result),
                            Either::Right(_) => None,
                        };
                    }
                }
            }
        }
    }

    /// Stores a fetch's outcome, wakes the entry's waiters and offers it to its watches.
    /// Returns when the chain fetches next (`None`: it ends).
    fn complete(
        &self,
        entry: &Arc<EntryHandle<T>>,
        generation: u32,
        result: FetchOutcome<T>,
    ) -> Option<Option<Instant>> {
        let now = self.shared.rt.now();
        // User code (`is_fatal`) runs before the table lock is taken, contained like fetch.
        let fatal = match &result {
            Ok(Err(error)) => contained(|| self.ty.is_fatal(error)).unwrap_or(false),
            _ => false,
        };
        let result = into_result::<T>(result);
        let next = self.with_slot(entry, |slot| {
            if !slot.state().chain.owns(generation) {
                // Replaced by a newer chain while in flight: the newer one owns the entry.
                return (None, None, None);
            }
            let leftovers = self.apply(slot, result, fatal, now);
            let wait = self.next_fetch(slot, now);
            slot.state_mut().chain.fetch_done(wait);
            if wait == Some(Duration::ZERO) {
                // Due at once: claimed here, under the lock the woken gets look under, so that
                // each of them finds the next fetch in flight on any runtime (contract:
                // Refresh 6); on a multi-thread one a get could otherwise look before the
                // chain's own claim.
                slot.state_mut().chain.claim(generation, true);
            }
            // Contained: it clones the value, the consumer's code, under the lock (a panic
            // there skips this delivery, and the result stays stored).
            let snapshot = (slot.state().watched())
                .then(|| contained(|| self.snapshot_of(slot.state(), false, now)))
                .flatten();
            (wait, snapshot, Some(leftovers))
        });
        // What the result replaced is dropped out of the lock: its `Drop` is the consumer's
        // code (a fetch state may hold a watch of this cache, whose end evicts for capacity).
        let next = next.map(|(wait, snapshot, leftovers)| {
            drop_contained(leftovers);
            (wait, snapshot)
        });
        wake_all(&entry.changed);
        let Some((wait, snapshot)) = next else {
            // Evicted during the fetch: never re-inserted.
            return None;
        };
        if let Some(snapshot) = snapshot {
            self.deliver(entry, &snapshot);
        }
        let wait = wait?;
        Some(now.checked_add(wait))
    }

    /// The options for the next fetch, and whether to arm the "connected" timer.
    fn fetch_options(&self, state: &EntryState<T>) -> (FetchOptions<T::Value>, bool) {
        let mut opts = FetchOptions::new();
        if self.opts.supports_blocking {
            opts.min_index = state.index;
            opts.timeout = self.opts.query_timeout;
        }
        opts.last_result = state.value.clone().map(|value| LastResult {
            value,
            index: state.index,
            state: state.fetch_state().cloned(),
        });
        let connected_timer = self.opts.refresh
            && state.index > 0
            && self.opts.supports_blocking
            && self.opts.query_timeout > CONNECTED_THRESHOLD
            && state.lost_contact_at().is_some();
        (opts, connected_timer)
    }

    /// Stores a fetch's outcome in the entry (contract: Fetch 3–6). `fatal`: the type classified
    /// the error as fatal (asked before the lock was taken).
    fn apply(
        &self,
        slot: &mut Slot<T>,
        result: Result<FetchResult<T::Value>, GetError<T::Error>>,
        fatal: bool,
        now: Instant,
    ) -> Leftovers<T> {
        let mut leftovers = Leftovers {
            value: None,
            state: None,
        };
        let state = slot.state_mut();
        let first = !state.expiry_scheduled();
        state.attempts = next_attempt(state.attempts);
        let success = match result {
            Ok(result) => {
                bump(&self.counters.fetch_success);
                if result.not_modified {
                    bump(&self.counters.fetch_not_modified);
                }
                let failing = state.set_error(None);
                self.adjust_failing(failing);
                let has_value =
                    result.value.is_some() || (result.not_modified && state.value.is_some());
                if has_value {
                    if let Some(value) = result.value {
                        leftovers.value = if !result.not_modified || state.value.is_none() {
                            state.value.replace(value)
                        } else {
                            Some(value)
                        };
                    }
                    let index = result.index.max(1);
                    if index < state.index {
                        state.resets = state.resets.wrapping_add(1);
                    }
                    state.index = index;
                    leftovers.state = state.set_fetch_state(result.state);
                    state.fetched_at = Some(self.stamp(now));
                } else if result.state.is_some() {
                    leftovers.state = state.set_fetch_state(result.state);
                }
                if self.opts.refresh {
                    state.clear_lost_contact();
                }
                // A zero index never blocks: for blocking and refresh fetches, count it as a
                // failure so backoff guards the loop. A polled watch keeps its max-age cadence
                // whatever the index.
                result.index > 0 || (!self.opts.supports_blocking && !self.opts.refresh)
            }
            Err(error) => {
                bump(&self.counters.fetch_errors);
                if fatal {
                    bump(&self.counters.fetch_errors_fatal);
                }
                let failing = state.set_error(Some(error));
                self.adjust_failing(failing);
                false
            }
        };
        let lose_contact = self.opts.refresh && state.error().is_some();
        state.record_outcome(success, self.stamp(now), lose_contact);
        state.trim();
        if first {
            // The TTL clock starts when the first fetch completes.
            slot.touch(self.nanos(now));
            self.schedule_expiry(slot.handle(), now);
        }
        let state = slot.state_mut();
        if self.opts.refresh && fatal {
            state.chain.stop_refresh();
        }
        if let (Some(give_up), Some(since)) = (self.opts.refresh_give_up, state.failing_since()) {
            if self.since(since, now) >= give_up {
                state.chain.stop_refresh();
            }
        }
        leftovers
    }
}

/// A fetch chain ready to run, returned by [`Store::start_chain`] under the table's lock and
/// spawned once it is released: a runtime may drop a task inside `spawn` (tokio's, shutting
/// down), or a woken one inside `wake`, and a dropped chain task's [`ChainTask`] takes that
/// lock to end its chain.
#[must_use = "a started chain runs only once spawned"]
pub(crate) struct StartedChain<T: CacheType> {
    task: BoxFuture<'static, ()>,
    /// The entry whose sleeping chain this one replaced, to wake so that the old one stops.
    replaced: Option<Arc<EntryHandle<T>>>,
}

impl<T: CacheType> StartedChain<T> {
    /// Wakes the chain it replaced, and hands itself to the runtime.
    pub(crate) fn spawn(self, rt: &dyn Runtime) {
        if let Some(entry) = self.replaced {
            wake_all(&entry.changed);
        }
        rt.spawn(self.task);
    }
}

/// What an entry's chain task owns: its store and entry, the chain's generation, and whether
/// the chain ended by itself. Dropped before that, it ends the chain ([`Store::abandon`]), so
/// an entry is never left "fetching" with no task to finish the fetch.
struct ChainTask<T: CacheType> {
    store: Arc<Store<T>>,
    entry: Arc<EntryHandle<T>>,
    generation: u32,
    finished: bool,
}

impl<T: CacheType> ChainTask<T> {
    /// One fetch after another for the entry, until nothing needs it any more: for refresh
    /// types until eviction, close, a fatal error or give-up; for any type while it is watched.
    /// A newer chain taking over (a get that found the entry invalid) also stops it.
    ///
    /// The task of every entry being fetched or refreshed, so its size is memory per entry:
    /// not an `async fn` (which would keep its arguments twice), and each stage is a future
    /// of its own, so the task holds only the stage it is in.
    #[allow(clippy::manual_async_fn)] // an `async fn` keeps its arguments twice
    fn run(
        mut self,
        request: T::Request,
        first_at: Option<Option<Instant>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        async move {
            let (store, entry, generation) = (&*self.store, &self.entry, self.generation);
            let mut sleep: Option<Sleep> = None;
            // `None`: fetch now; `Some(None)`: sleep until woken (a wait too long to represent).
            let mut next_at: Option<Option<Instant>> = first_at;
            'chain: loop {
                if let Some(deadline) = next_at {
                    if !store
                        .wait_turn(entry, generation, deadline, &mut sleep)
                        .await
                    {
                        break 'chain;
                    }
                }
                // The options go straight into the fetch: the task keeps no copy of them.
                let fetch = match store.reserve(entry, generation, &mut sleep).await {
                    Some(ready) => store.run_fetch(entry, generation, ready, &request),
                    None => break 'chain,
                };
                if next_at.is_some() {
                    // A fetch that answers at once, due again at once (a refresh with no
                    // timer, a blocking fetch answering the same index, the first failures'
                    // immediate retries), would otherwise loop inside one poll of this task and
                    // starve every other task of a single-threaded runtime: let them run
                    // between fetches (they see this one in flight already).
                    YieldNow(false).await;
                }
                let Some(result) = fetch.await else {
                    break 'chain;
                };
                match store.complete(entry, generation, result) {
                    Some(wait) => next_at = Some(wait),
                    None => break 'chain,
                }
            }
            self.finish();
        }
    }

    /// The chain ended by itself: nothing to abandon.
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl<T: CacheType> Drop for ChainTask<T> {
    fn drop(&mut self) {
        if !self.finished {
            // Contained: this may run while a panic unwinds the task.
            contained(|| self.store.abandon(&self.entry, self.generation));
        }
    }
}

/// A fetch's outcome with its failure as a get's error. A panic becomes its message; the
/// payload, the consumer's value, is dropped contained.
pub(crate) fn into_result<T: CacheType>(
    outcome: FetchOutcome<T>,
) -> Result<FetchResult<T::Value>, GetError<T::Error>> {
    match outcome {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(error)) => Err(GetError::Fetch(Arc::new(error))),
        Err(panic) => {
            let message = panic_message(&*panic);
            drop_contained(panic);
            Err(GetError::Panicked(message))
        }
    }
}

/// What storing a fetch's result replaced (or did not keep): dropped once the table's lock is
/// released.
struct Leftovers<T: CacheType> {
    value: Option<T::Value>,
    state: Option<FetchState>,
}

/// Pending once, waking its task at once: the runtime runs its other ready tasks first
/// (futures-lite's `yield_now`, which cache-core does not depend on).
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if std::mem::replace(&mut self.0, true) {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Ready once the entry is no longer in its table, for a chain waiting on the entry's fetch:
/// its waker is kept in the entry's extras (see `EntryHandle::wake`), which costs the entry
/// a few bytes instead of an event listener list and a listener.
struct Removed<'a, T: CacheType> {
    store: &'a Store<T>,
    entry: &'a Arc<EntryHandle<T>>,
}

impl<T: CacheType> Future for Removed<'_, T> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Still registered: no removal took the waker since the last look (the fetch woke the
        // task), so there is nothing to look at.
        if self.entry.extras().set_chain(cx.waker()) {
            return Poll::Pending;
        }
        // Registered first, then looked: a removal after the look wakes this waker.
        match self.store.read_slot(self.entry, |_| ()) {
            Some(()) => Poll::Pending,
            None => Poll::Ready(()),
        }
    }
}

impl<T: CacheType> Drop for Removed<'_, T> {
    fn drop(&mut self) {
        self.entry.extras().clear_chain();
    }
}
