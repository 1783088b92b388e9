//! The get path (docs/contract.md#get): the hit path, the slow path that joins or starts the
//! entry's fetch, timeouts, the one-attempt error rule and stale-if-error.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures::FutureExt;

use crate::cache_type::{CacheRequest, CacheType, FetchOptions, RequestInfo};
use crate::error::GetError;
use crate::fetch::into_result;
use crate::metrics::{bump, thread_index};
use crate::outcome::{GetOutcome, Response, ResultMeta};
use crate::runtime::{BoxFuture, Sleep};
use crate::store::{EntryHandle, EntryState, Slot, Stamp, Store};
use event_listener::EventListener;

// ===== impl Store: get =====

impl<T: CacheType> Store<T> {
    /// Whether the entry answers `info` without a fetch (contract: Get 2).
    fn is_valid(
        &self,
        state: &EntryState<T>,
        info: &RequestInfo<'_>,
        must_revalidate: bool,
        max_age: Option<Duration>,
        now: Instant,
    ) -> bool {
        self.is_valid_at(state, info, must_revalidate, max_age, self.nanos(now))
    }

    /// [`Store::is_valid`] with the time as nanoseconds since the epoch.
    fn is_valid_at(
        &self,
        state: &EntryState<T>,
        info: &RequestInfo<'_>,
        must_revalidate: bool,
        max_age: Option<Duration>,
        now_ns: u64,
    ) -> bool {
        if state.value.is_none() {
            return false;
        }
        if self.opts.supports_blocking && info.min_index > 0 && info.min_index >= state.index {
            return false;
        }
        if !self.opts.refresh {
            if let (Some(max_age), Some(fetched_at)) = (max_age, state.fetched_at) {
                if fetched_at.until(now_ns) > max_age {
                    return false;
                }
            }
            if must_revalidate {
                // An open fetch means the entry is current: the reference leaves it alone.
                return state.chain.is_fetching();
            }
        }
        true
    }

    /// The hit path: one read lock, no allocation, and the runtime's cheapest clock. A hit
    /// returns its value, and writes its index and age into `meta`: a value alone comes back
    /// in registers, where a struct of all three would be built on the stack and copied out
    /// with wide loads of narrow stores (a store-forwarding stall on every hit).
    #[inline]
    fn try_hit(&self, hash: u64, info: &RequestInfo<'_>, meta: &mut HitMeta) -> Option<T::Value> {
        let thread = thread_index();
        let value = self.read_key_as(thread, hash, info, |slot| {
            let state = slot.state();
            let since = self.age_since(state);
            let now_ns = self.hit_now(since);
            if !self.is_valid_at(state, info, info.must_revalidate, info.max_age, now_ns) {
                return None;
            }
            slot.touch(now_ns);
            meta.index = state.index;
            meta.age_ns = since.map_or(0, |t| t.nanos_until(now_ns));
            state.value.clone()
        })??;
        self.counters.hits.incr_as(thread);
        Some(value)
    }

    /// The time of a hit on an entry whose age counts from `since` (its fetch, or when a
    /// refresh type lost contact; see [`Store::age_since`]), as nanoseconds since the epoch:
    /// the runtime's coarse clock where it has one, unless that age is under
    /// [`EXACT_AGES_BELOW`]; then the precise clock, and on
    /// runtimes without a coarse clock [`Runtime::now`](crate::Runtime::now). A coarse reading
    /// moves in ticks and, right after an idle spell, lags (seen: unchanged across a 5 ms
    /// sleep), which an age of milliseconds shows (Consul's own tests sleep 5 ms and expect
    /// the age to have grown by as much) and one of seconds does not.
    #[inline]
    fn hit_now(&self, since: Option<Stamp>) -> u64 {
        match self.shared.coarse_nanos() {
            Some(coarse) if since.is_none_or(|t| t.nanos_until(coarse) >= EXACT_AGES_BELOW) => {
                coarse
            }
            _ => self.shared.precise_nanos(),
        }
    }

    /// A get for this type (docs/contract.md#get), answering in the form `R`: a
    /// [`GetResult`] for `TypedCache::get`, a [`GetOutcome`] for `TypedCache::get_outcome`.
    pub(crate) fn get<'a, R: Answer<T> + 'a>(
        &'a self,
        request: &'a T::Request,
    ) -> GetFuture<'a, T, R> {
        GetFuture::Start {
            store: self,
            request,
        }
    }

    /// A get's first step, at its future's first poll: a hit sets `future` to `Done` and
    /// answers at once, its answer built straight into the poll's result; a miss, or an empty
    /// key (which bypasses the cache), leaves the boxed waiting part in `future` and returns
    /// `Pending` for the caller to poll it.
    ///
    /// No `RequestInfo` is held across an await: its `Cow`s trip the compiler's higher-ranked
    /// `Send` check, and re-asking the request for it is cheap.
    #[inline(always)]
    fn begin<'a, R: Answer<T> + 'a>(
        &'a self,
        request: &'a T::Request,
        future: &mut GetFuture<'a, T, R>,
    ) -> Poll<R> {
        let info = request.cache_info();
        // Hashed before the empty-key check: one branch fewer on a hit; a bypass ignores it.
        let hash = self.hash(&info);
        let mut meta = HitMeta::default();
        if !info.key.is_empty() {
            if let Some(value) = self.try_hit(hash, &info, &mut meta) {
                *future = GetFuture::Done;
                return Poll::Ready(R::hit(
                    Some(value),
                    ResultMeta {
                        hit: true,
                        index: meta.index,
                        age: Duration::from_nanos(meta.age_ns),
                    },
                ));
            }
        }
        *future = GetFuture::Slow(self.miss(request, info.key.is_empty(), hash));
        Poll::Pending
    }

    /// The waiting part of a get that missed (or bypasses the cache, for an empty key).
    #[inline(never)]
    fn miss<'a, R: Answer<T> + 'a>(
        &'a self,
        request: &'a T::Request,
        bypass: bool,
        hash: u64,
    ) -> BoxFuture<'a, R> {
        if bypass {
            return Box::pin(self.bypass(request).map(R::from_outcome));
        }
        let start = self.shared.rt.now();
        Box::pin(self.get_slow(request, hash, start).map(R::from_outcome))
    }

    async fn bypass(&self, request: &T::Request) -> GetOutcome<T::Value, T::Error> {
        bump(&self.counters.bypasses);
        let mut opts = FetchOptions::new();
        {
            let info = request.cache_info();
            opts.min_index = info.min_index;
            opts.timeout = info.timeout.unwrap_or_default();
        }
        match into_result::<T>(self.fetch_contained(opts, request).await) {
            Ok(result) => GetOutcome {
                value: result.value,
                meta: ResultMeta::default(),
                error: None,
            },
            Err(error) => GetOutcome {
                value: None,
                meta: ResultMeta::default(),
                error: Some(error),
            },
        }
    }

    async fn get_slow(
        &self,
        request: &T::Request,
        hash: u64,
        start: Instant,
    ) -> GetOutcome<T::Value, T::Error> {
        if self.is_retired() {
            return GetOutcome {
                value: None,
                meta: ResultMeta::default(),
                error: Some(GetError::Replaced(self.name)),
            };
        }
        let (deadline, must_revalidate) = {
            let info = request.cache_info();
            // A timeout too long to represent means no timeout.
            let deadline = info
                .timeout
                .filter(|t| !t.is_zero())
                .and_then(|t| start.checked_add(t));
            (deadline, info.must_revalidate)
        };
        let mut seen = Seen {
            attempts: None,
            resets: None,
            first: true,
            attempted: false,
            must_revalidate,
        };
        let mut sleep: Option<Sleep> = None;
        let mut retry_at: Option<Instant> = None;
        let mut retry_sleep: Option<Sleep> = None;
        // Counts this get among the entry's waiters while it waits (see `EntryState::waiters`).
        let mut waiting = Waiting {
            store: self,
            entry: None,
            released: false,
        };
        loop {
            if self.is_retired() {
                return GetOutcome {
                    value: None,
                    meta: ResultMeta::default(),
                    error: Some(GetError::Replaced(self.name)),
                };
            }
            let listener =
                match self.wait_step(request, hash, &mut seen, &mut waiting, &mut retry_at) {
                    Ok(listener) => listener,
                    Err(outcome) => return outcome,
                };
            seen.first = false;
            if let Some(at) = retry_at {
                retry_sleep
                    .get_or_insert_with(|| Sleep::until(&*self.shared.rt, at))
                    .reset(at);
            }
            if let Some(deadline) = deadline {
                sleep.get_or_insert_with(|| Sleep::until(&*self.shared.rt, deadline));
            }
            let woken = Wake {
                listener,
                retry: retry_sleep.as_mut().filter(|_| retry_at.is_some()),
                deadline: sleep.as_mut(),
            }
            .await;
            match woken {
                Woken::Deadline => return self.timeout_outcome(hash, &request.cache_info()),
                // The retry is due even if `now()` is not quite at its time yet (a runtime
                // whose timers fire early would otherwise have the get re-arm a timer that
                // fires at once, and spin until its clock caught up).
                Woken::Retry => retry_at = retry_at.map(|_| start),
                Woken::Changed => {}
            }
            // The reference revalidates once: after a fetch, the entry counts as current.
            seen.must_revalidate = false;
        }
    }

    /// One look of a waiting get, under its entry's lock: its answer (`Err`), or the listener
    /// to await before looking again, after joining the fetch in flight or starting one.
    /// Out of `get_slow`, so that the request's info and the look's temporaries take no room
    /// in the get's future while it waits.
    fn wait_step(
        &self,
        request: &T::Request,
        hash: u64,
        seen: &mut Seen,
        waiting: &mut Waiting<'_, T>,
        retry_at: &mut Option<Instant>,
    ) -> Result<EventListener, GetOutcome<T::Value, T::Error>> {
        let now = self.shared.rt.now();
        let info = request.cache_info();
        // Under the read lock first: the answer (most wake-ups find it), or joining the
        // fetch in flight (every get of a miss storm but the first). Every get woken by
        // one fetch looks at once instead of queueing for the write lock.
        let joined = self.read_key(hash, &info, |slot| {
            if let Some(outcome) = self.look(slot, &info, now, seen) {
                waiting.leave(slot);
                return Err(outcome);
            }
            Ok(slot.state().chain.is_fetching().then(|| {
                if seen.first {
                    self.count_miss(slot.state());
                }
                // The fetch in flight is the attempt this get waits for: a retry time it
                // had set is moot (kept, already past, it would wake the get at once, again
                // and again, until that fetch completes).
                *retry_at = None;
                self.wait_on(slot, waiting, seen)
            }))
        });
        match joined {
            Some(Err(outcome)) => Err(outcome),
            Some(Ok(Some(listener))) => Ok(listener),
            // A closed cache starts nothing new, so a miss creates no entry that nothing
            // would ever fill or expire.
            None if self.shared.is_closed() => {
                if seen.first {
                    self.counters.misses_new.incr();
                }
                Err(GetOutcome {
                    value: None,
                    meta: ResultMeta::default(),
                    error: Some(GetError::Closed),
                })
            }
            _ => {
                let mut started = None;
                let step = self.with_entry(hash, &info, |slot| {
                    if let Some(outcome) = self.look(slot, &info, now, seen) {
                        waiting.leave(slot);
                        return Err(outcome);
                    }
                    if seen.first {
                        self.count_miss(slot.state());
                    }
                    if !slot.state().chain.is_fetching() && self.shared.is_closed() {
                        // A closed cache starts nothing new: answer at once with what there is.
                        waiting.leave(slot);
                        return Err(GetOutcome {
                            value: slot.state().value.clone(),
                            meta: self.meta(slot.state(), false, now),
                            error: Some(GetError::Closed),
                        });
                    }
                    if !slot.state().chain.is_fetching() {
                        let backoff = if seen.attempted {
                            slot.state()
                                .backoff()
                                .wait(&self.shared.backoff, self.shared.rt.jitter())
                        } else {
                            Duration::ZERO
                        };
                        match *retry_at {
                            Some(at) if now >= at => {
                                *retry_at = None;
                                started = self.start_fetch(slot, request.clone());
                            }
                            Some(_) => {}
                            None if backoff.is_zero() => {
                                started = self.start_fetch(slot, request.clone());
                            }
                            // A backoff too long to represent: wait for a fetch by someone else.
                            None => *retry_at = now.checked_add(backoff),
                        }
                    } else {
                        // As on the read path: the fetch in flight is the next attempt.
                        *retry_at = None;
                    }
                    Ok(self.wait_on(slot, waiting, seen))
                });
                // Spawned out of the table's lock (see `StartedChain`).
                if let Some(chain) = started {
                    chain.spawn(&*self.shared.rt);
                }
                step
            }
        }
    }

    fn count_miss(&self, state: &EntryState<T>) {
        if state.value.is_some() {
            self.counters.misses_blocking.incr();
        } else {
            self.counters.misses_new.incr();
        }
    }

    /// Makes a get wait for the entry's next completed fetch: notes the attempts it has seen,
    /// counts it among the entry's waiters, and listens. Under the table lock (read or
    /// write), so the completion, which takes the write lock, cannot slip in between.
    fn wait_on(
        &self,
        slot: &Slot<T>,
        waiting: &mut Waiting<'_, T>,
        seen: &mut Seen,
    ) -> EventListener {
        seen.attempts = Some(slot.state().attempts);
        if !waiting.counted_on(slot) {
            slot.state().waiters.fetch_add(1, Ordering::Relaxed);
            waiting.entry = Some(slot.handle().clone());
        }
        slot.handle().changed.listen()
    }

    /// A waiting get looks at its entry: its answer, or `None` to wait (again). Reads only
    /// (the last-read stamp is atomic), so a woken get can look under the read lock.
    fn look(
        &self,
        slot: &Slot<T>,
        info: &RequestInfo<'_>,
        now: Instant,
        seen: &mut Seen,
    ) -> Option<GetOutcome<T::Value, T::Error>> {
        // The hit path's clock where the runtime has a coarse one: a storm's gets, woken
        // together, stamp the entry once per tick instead of each writing its line.
        slot.touch(self.shared.stamp_nanos(now));
        let state = slot.state();
        let resets = *seen.resets.get_or_insert(state.resets);
        // An index that went backwards wakes a blocked get with the new value, whatever min
        // index it waited for (contract: Fetch 5).
        let reset = state.resets > resets && state.value.is_some();
        // The attempt this get waited for failed: its error comes first, even when the old
        // value would now count as valid (a failed revalidation is a failure). An error of a
        // later attempt (a background refresh that failed right after this get's fetch
        // succeeded) is not this get's: it answers from its own fetch.
        if let Some(attempts) = seen.attempts {
            if state.attempts != attempts {
                if let Some(error) = state.error().filter(|_| !state.failing_after(attempts)) {
                    return Some(self.error_outcome(state, info, error.clone(), now));
                }
                seen.attempted = true;
            }
        }
        // Once an attempt this get waited for has succeeded, its `max_age` is met: the value
        // is that fresh. On a real clock it is a few microseconds old by the time the woken
        // get looks, and a `max_age` below that would send the get to the server for ever.
        let max_age = info.max_age.filter(|_| !seen.attempted);
        if reset || self.is_valid(state, info, seen.must_revalidate, max_age, now) {
            if seen.first {
                self.counters.hits.incr();
            }
            return Some(GetOutcome {
                value: state.value.clone(),
                meta: self.meta(state, seen.first, now),
                error: None,
            });
        }
        None
    }

    /// The answer to a get whose one fetch attempt failed, honouring `stale_if_error`.
    fn error_outcome(
        &self,
        state: &EntryState<T>,
        info: &RequestInfo<'_>,
        error: GetError<T::Error>,
        now: Instant,
    ) -> GetOutcome<T::Value, T::Error> {
        let meta = self.meta(state, false, now);
        if let (Some(limit), Some(fetched_at), Some(value)) =
            (info.stale_if_error, state.fetched_at, &state.value)
        {
            if self.since(fetched_at, now) <= limit {
                return GetOutcome {
                    value: Some(value.clone()),
                    meta: ResultMeta {
                        age: self.since(fetched_at, now),
                        ..meta
                    },
                    error: None,
                };
            }
        }
        GetOutcome {
            value: state.value.clone(),
            meta,
            error: Some(error),
        }
    }

    fn timeout_outcome(&self, hash: u64, info: &RequestInfo<'_>) -> GetOutcome<T::Value, T::Error> {
        let now = self.shared.rt.now();
        self.read_key(hash, info, |slot| {
            // The end of a wait is a read (contract: Get 8): the TTL counts from here.
            slot.touch(self.shared.stamp_nanos(now));
            GetOutcome {
                value: slot.state().value.clone(),
                meta: self.meta(slot.state(), false, now),
                error: None,
            }
        })
        .unwrap_or(GetOutcome {
            value: None,
            meta: ResultMeta::default(),
            error: None,
        })
    }
}

/// What a waiting get has seen of its entry, across its looks.
struct Seen {
    /// The entry's completed attempts when the get last began waiting (`None`: not yet).
    attempts: Option<u32>,
    /// The entry's index resets at the get's first look.
    resets: Option<u32>,
    /// No look yet: the get counts as a hit or a miss once.
    first: bool,
    /// Set once an attempt this get waited for succeeded. Its `max_age` is met from then on;
    /// if the get still waits (a blocking fetch that saw no change, or one with no value),
    /// further attempts respect the entry's backoff, so a type answering index 0 or nothing
    /// at once cannot spin the get.
    attempted: bool,
    /// The request's `must_revalidate`, until the first fetch it waited for (the reference
    /// revalidates once).
    must_revalidate: bool,
}

/// What woke a waiting get.
enum Woken {
    /// The entry changed (a fetch completed, or it was evicted).
    Changed,
    /// The get's retry time came.
    Retry,
    /// The get's deadline (its `timeout`) passed.
    Deadline,
}

/// A waiting get's one await: its entry's next change, its deadline, or its retry time after
/// a backoff, whichever comes first (in that order when several are ready: an answer beats
/// the timeout, and the timeout beats another attempt). Three words, where nested `select`s
/// kept each branch's state.
struct Wake<'s> {
    listener: EventListener,
    retry: Option<&'s mut Sleep>,
    deadline: Option<&'s mut Sleep>,
}

impl Future for Wake<'_> {
    type Output = Woken;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Woken> {
        let this = self.get_mut();
        if Pin::new(&mut this.listener).poll(cx).is_ready() {
            return Poll::Ready(Woken::Changed);
        }
        if let Some(deadline) = this.deadline.as_deref_mut() {
            if Pin::new(deadline).poll(cx).is_ready() {
                return Poll::Ready(Woken::Deadline);
            }
        }
        if let Some(retry) = this.retry.as_deref_mut() {
            if Pin::new(retry).poll(cx).is_ready() {
                return Poll::Ready(Woken::Retry);
            }
        }
        Poll::Pending
    }
}

/// A get's place among its entry's waiters; leaving it (answer, timeout or cancellation)
/// counts the get out again.
struct Waiting<'a, T: CacheType> {
    store: &'a Store<T>,
    entry: Option<Arc<EntryHandle<T>>>,
    /// Whether leaving made the entry evictable (this get was its last waiter and it is not
    /// watched): capacity eviction may have had to keep it, so the bound is checked again.
    released: bool,
}

impl<T: CacheType> Waiting<'_, T> {
    /// Whether the get is counted among `slot`'s waiters.
    fn counted_on(&self, slot: &Slot<T>) -> bool {
        self.entry
            .as_ref()
            .is_some_and(|e| Arc::ptr_eq(e, slot.handle()))
    }

    /// Counts the get out of `slot`'s waiters, if it was counted there, under the lock the
    /// get already holds to read its answer: the woken gets of a miss storm then leave
    /// without a second lookup each.
    fn leave(&mut self, slot: &Slot<T>) {
        if self.counted_on(slot) {
            self.released = release(slot);
            // Not the entry's last reference: its table holds one.
            self.entry = None;
        }
    }
}

/// Counts a get out of `slot`'s waiters; whether that left the entry evictable (no waiter, no
/// watch).
fn release<T: CacheType>(slot: &Slot<T>) -> bool {
    slot.state().waiters.fetch_sub(1, Ordering::Relaxed);
    !slot.state().held()
}

impl<T: CacheType> Drop for Waiting<'_, T> {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            // A get dropped while it waits: the end of its wait is a read (contract: Get 8).
            let now = self.store.shared.stamp_nanos(self.store.shared.rt.now());
            self.released = self
                .store
                .read_slot(&entry, |slot| {
                    slot.touch(now);
                    release(slot)
                })
                .unwrap_or(false);
        }
        if self.released {
            // No lock held here: eviction takes table locks.
            self.store.shared.enforce_capacity_on_release();
        }
    }
}

/// What `TypedCache::get` answers.
pub(crate) type GetResult<T> =
    Result<Response<<T as CacheType>::Value>, GetError<<T as CacheType>::Error>>;

/// The form a get answers in: [`GetResult`] (`TypedCache::get`) or [`GetOutcome`]
/// (`TypedCache::get_outcome`).
pub(crate) trait Answer<T: CacheType>: Send + Sized {
    /// A hit's answer.
    fn hit(value: Option<T::Value>, meta: ResultMeta) -> Self;
    /// Any other answer, from the slow path's outcome.
    fn from_outcome(outcome: GetOutcome<T::Value, T::Error>) -> Self;
}

impl<T: CacheType> Answer<T> for GetOutcome<T::Value, T::Error> {
    #[inline]
    fn hit(value: Option<T::Value>, meta: ResultMeta) -> Self {
        GetOutcome {
            value,
            meta,
            error: None,
        }
    }

    fn from_outcome(outcome: GetOutcome<T::Value, T::Error>) -> Self {
        outcome
    }
}

impl<T: CacheType> Answer<T> for GetResult<T> {
    #[inline]
    fn hit(value: Option<T::Value>, meta: ResultMeta) -> Self {
        Ok(Response { value, meta })
    }

    fn from_outcome(outcome: GetOutcome<T::Value, T::Error>) -> Self {
        outcome.into_result()
    }
}

/// Below this age (nanoseconds) a hit reads the precise clock (see `Store::hit_now`). Above
/// it the coarse clock's lead (at most three ticks, 12 ms with 4 ms ticks) is under 5 % of the
/// age, and shrinking; below it are the ages real-time tests compare to what they slept
/// (Consul's, at most about 60 ms). Short, so that an entry is soon cheap to hit again after
/// each fetch.
const EXACT_AGES_BELOW: u64 = 250_000_000;

/// A hit's meta, as plain words: the entry's index and its age in nanoseconds.
#[derive(Default)]
struct HitMeta {
    index: u64,
    age_ns: u64,
}

/// The future of a get. Two pointers until its first poll, which looks the entry up (see
/// [`Store::begin`]): a hit answers at once, its answer written straight where the poller
/// wants it (no hit state is built first and then copied out through the future); a miss,
/// or a bypass for an empty key, boxes its waiting part.
pub(crate) enum GetFuture<'a, T: CacheType, R> {
    /// Not polled yet.
    Start {
        store: &'a Store<T>,
        request: &'a T::Request,
    },
    /// Waiting on a fetch.
    Slow(BoxFuture<'a, R>),
    /// Answered.
    Done,
}

// Nothing in a `GetFuture` is pinned structurally: the boxed future is pinned by its box.
impl<T: CacheType, R> Unpin for GetFuture<'_, T, R> {}

impl<'a, T: CacheType, R: Answer<T> + 'a> Future for GetFuture<'a, T, R> {
    type Output = R;

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let GetFuture::Start { store, request } = *this {
            if let Poll::Ready(answer) = store.begin(request, this) {
                return Poll::Ready(answer);
            }
        }
        match this {
            GetFuture::Slow(future) => {
                let answer = ready!(future.as_mut().poll(cx));
                *this = GetFuture::Done;
                Poll::Ready(answer)
            }
            _ => panic!("a get future polled after completion"),
        }
    }
}

#[cfg(test)]
mod size_tests {
    use crate::sim::SimRuntime;
    use crate::testing::{MockError, MockRequest, MockType};
    use crate::{Cache, RegisterOptions};

    /// Every get of a miss storm boxes this future while it waits (10 000 of them in the
    /// storm benchmark): this budget catches a local that starts living across the await.
    #[test]
    fn a_waiting_get_stays_small() {
        let sim = SimRuntime::new(1);
        let cache = Cache::new(sim.handle());
        let typed = cache.register(MockType::<std::sync::Arc<u64>>::new(
            RegisterOptions::default(),
            |_, _| async { Err(MockError::new("unused")) },
        ));
        let request = MockRequest::new("k");
        let waiting = typed.store.get_slow(&request, 0, sim.now());
        assert!(
            std::mem::size_of_val(&waiting) <= 224,
            "{}",
            std::mem::size_of_val(&waiting)
        );
    }
}
