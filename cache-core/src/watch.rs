//! Notify and watch: change notifications for many consumers (Consul's `Notify`; the rules are
//! in docs/contract.md#watch).
//!
//! A watch is not a task. It is a small record on its entry — a correlation id, a sink and the
//! index it last delivered — and the entry's one fetch chain (the same single-flight fetches
//! that gets join) offers every completed fetch to each record. So N watches of one entry
//! cause one upstream fetch stream, and an idle watch costs a few dozen bytes.
//!
//! A consumer that does not keep up only slows its own watch: when its sink is full the record
//! is marked pending and a short-lived task waits for room, then sends what the sink could not
//! take and, if the entry moved on meanwhile, the latest value. Nothing queues without bound.
//!
//! # Examples
//!
//! Two watches of different types on one channel, told apart by correlation id, with no
//! downcasting: [`map_sink`] wraps each type's events into the consumer's own enum.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use cache_core::{Cache, RegisterOptions};
//! use cache_core::sim::SimRuntime;
//! use cache_core::testing::{MockError, MockRequest, MockServer};
//! use cache_core::watch::{UpdateEvent, map_sink};
//!
//! enum Update {
//!     Name(UpdateEvent<&'static str, String, MockError>),
//!     Count(UpdateEvent<&'static str, u64, MockError>),
//! }
//!
//! let sim = SimRuntime::new(1);
//! let cache = Cache::new(sim.handle());
//! let names = MockServer::new(sim.handle(), "ada".to_string(), 1);
//! let counts = MockServer::new(sim.handle(), 10u64, 1);
//! let name_type = cache.register(names.blocking_type(RegisterOptions::new()));
//! let count_type = cache.register(counts.blocking_type(RegisterOptions::new()));
//!
//! let (tx, rx) = async_channel::bounded(16);
//! let _a = name_type.notify(MockRequest::new("name"), "name", map_sink(tx.clone(), Update::Name)).unwrap();
//! let _b = count_type.notify(MockRequest::new("count"), "count", map_sink(tx, Update::Count)).unwrap();
//!
//! sim.block_on(async {
//!     let mut next = async || match rx.recv().await.unwrap() {
//!         Update::Name(e) => format!("{}={}", e.correlation_id, e.result.unwrap()),
//!         Update::Count(e) => format!("{}={}", e.correlation_id, e.result.unwrap()),
//!     };
//!     let mut first = vec![next().await, next().await];
//!     first.sort();
//!     assert_eq!(first, ["count=10", "name=ada"]);
//!     counts.set(11, 2);
//!     assert_eq!(next().await, "count=11");
//! });
//! ```

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use event_listener::Event;
use futures::Stream;
use futures::future::{Either, select};

use crate::cache::{Shared, TypedCache};
use crate::cache_type::{CacheRequest, CacheType};
use crate::error::GetError;
use crate::get::ResultMeta;
use crate::runtime::{BoxFuture, Sleep};
use crate::store::{EntryShared, EntryState, Store, wake_all};

/// One change of a watched entry (Consul's `UpdateEvent`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UpdateEvent<C, V, E> {
    /// The caller's id for the watch, opaque to the cache.
    pub correlation_id: C,
    /// The value (with an error: the last good value, if any).
    pub result: Option<V>,
    /// Hit, index and age, as a get would report them.
    pub meta: ResultMeta,
    /// The fetch error, delivered only before the first value.
    pub error: Option<GetError<E>>,
}

/// Why a sink did not take an event at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError {
    /// No room now.
    #[error("the sink is full")]
    Full,
    /// The receiving side is gone.
    #[error("the sink's receiver is gone")]
    Closed,
}

/// The receiving side of a sink is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the sink's receiver is gone")]
pub struct SinkClosed;

/// Where a watch pushes its events: a bounded channel's sending side, supplied by the caller.
///
/// Implemented for [`async_channel::Sender`] (runtime-agnostic) and for [`map_sink`]. Events a
/// sink refuses are dropped: the watch always resends the latest state when room appears.
pub trait EventSink<Ev>: Send + Sync + 'static {
    /// Sends without waiting.
    ///
    /// # Errors
    ///
    /// [`TrySendError::Full`] when there is no room, [`TrySendError::Closed`] when the
    /// receiver is gone.
    fn try_send(&self, event: Ev) -> Result<(), TrySendError>;

    /// Waits for room and sends.
    fn send(&self, event: Ev) -> BoxFuture<'static, Result<(), SinkClosed>>;

    /// Whether the receiving side is gone.
    fn is_closed(&self) -> bool;
}

impl<Ev: Send + 'static> EventSink<Ev> for async_channel::Sender<Ev> {
    fn try_send(&self, event: Ev) -> Result<(), TrySendError> {
        async_channel::Sender::try_send(self, event).map_err(|e| match e {
            async_channel::TrySendError::Full(_) => TrySendError::Full,
            async_channel::TrySendError::Closed(_) => TrySendError::Closed,
        })
    }

    fn send(&self, event: Ev) -> BoxFuture<'static, Result<(), SinkClosed>> {
        let tx = self.clone();
        Box::pin(async move { tx.send(event).await.map_err(|_| SinkClosed) })
    }

    fn is_closed(&self) -> bool {
        async_channel::Sender::is_closed(self)
    }
}

/// A sink that converts each event with `f` before handing it to `sink`: the way to put
/// watches of different cache types on one channel of the consumer's own enum.
pub fn map_sink<A, B, S, F>(sink: S, f: F) -> MapSink<S, F>
where
    S: EventSink<B>,
    F: Fn(A) -> B + Send + Sync + 'static,
{
    MapSink { sink, f }
}

/// The sink returned by [`map_sink`].
#[derive(Clone)]
pub struct MapSink<S, F> {
    sink: S,
    f: F,
}

impl<S, F> fmt::Debug for MapSink<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapSink").finish_non_exhaustive()
    }
}

impl<A, B, S, F> EventSink<A> for MapSink<S, F>
where
    A: Send + 'static,
    S: EventSink<B>,
    F: Fn(A) -> B + Send + Sync + 'static,
{
    fn try_send(&self, event: A) -> Result<(), TrySendError> {
        self.sink.try_send((self.f)(event))
    }

    fn send(&self, event: A) -> BoxFuture<'static, Result<(), SinkClosed>> {
        self.sink.send((self.f)(event))
    }

    fn is_closed(&self) -> bool {
        self.sink.is_closed()
    }
}

/// Why a watch could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The type was never registered with this cache.
    #[error("cache type `{0}` is not registered")]
    NotRegistered(&'static str),
    /// A request with an empty key is not cached, so it cannot be watched.
    #[error("an empty key cannot be watched: it is not cached")]
    EmptyKey,
    /// Watching a non-blocking type polls, and the poll interval comes from `max_age`.
    #[error("watching non-blocking type `{0}` polls every max_age: set RequestInfo::max_age")]
    MaxAgeRequired(&'static str),
    /// The cache was closed.
    #[error("the cache is closed")]
    Closed,
    /// The handle belongs to a registration of the type that a newer one replaced.
    #[error("cache type `{0}` was registered again; this handle is stale")]
    Replaced(&'static str),
}

// ===== Watch records =====

/// What the entry's fetch chain offers each watcher after a fetch.
pub(crate) struct Snapshot<T: CacheType> {
    pub(crate) value: Option<T::Value>,
    pub(crate) error: Option<GetError<T::Error>>,
    pub(crate) meta: ResultMeta,
    pub(crate) resets: u64,
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
    /// The poll interval of a watch of a non-blocking type.
    fn max_age(&self) -> Option<Duration>;
    /// Offers a fetch's outcome. Returns `false` when the receiver is gone.
    fn offer(&self, store: &Store<T>, entry: &Arc<EntryShared<T>>, snap: &Snapshot<T>) -> bool;
    /// Stops any task the watch runs and drops the sink.
    fn cancel(&self);
}

/// A watch's mutable state: its sink and what it has delivered, under one lock, so that
/// offering a fetch to a watch takes a single lock.
struct Progress<V, S> {
    /// `None` once the watch is cancelled: dropping the sink is how its receiver learns.
    sink: Option<S>,
    last_index: u64,
    last_resets: u64,
    last_value: Option<V>,
    delivered: bool,
    /// A task is waiting for room in the sink.
    pending: bool,
    /// News arrived while `pending`: the waiting task sends the latest state after its event.
    dirty: bool,
}

struct Record<T: CacheType, C, S> {
    this: Weak<Self>,
    id: u64,
    correlation_id: C,
    max_age: Option<Duration>,
    polling: bool,
    progress: Mutex<Progress<T::Value, S>>,
    cancelled: AtomicBool,
    cancel_event: Event,
    /// The store and entry the watch is registered on, for the sweep of dead receivers.
    home: OnceLock<Home<T>>,
}

/// Where a watch is registered: its store and its entry.
type Home<T> = (Weak<Store<T>>, Weak<EntryShared<T>>);

static NEXT_WATCH_ID: AtomicU64 = AtomicU64::new(1);

impl<T, C, S> Record<T, C, S>
where
    T: CacheType,
    C: Clone + Send + Sync + 'static,
    S: EventSink<UpdateEvent<C, T::Value, T::Error>>,
{
    /// Whether the snapshot is news to this watch (contract: Watch 3–5), updating its progress if so.
    fn accept(&self, store: &Store<T>, p: &mut Progress<T::Value, S>, snap: &Snapshot<T>) -> bool {
        let reset = snap.resets > p.last_resets && snap.value.is_some();
        let news = if p.last_index == 0 {
            // Before the first value everything is news, errors included.
            !(p.delivered && snap.error.is_none() && snap.value.is_none())
        } else if reset || snap.meta.index > p.last_index {
            true
        } else if self.polling && snap.error.is_none() {
            match (&p.last_value, &snap.value) {
                // A type that cannot compare values (the default `value_eq`) leaves it to the
                // index, which did not rise.
                (Some(old), Some(new)) => values_differ(&store.ty, old, new).unwrap_or(false),
                (None, Some(_)) => true,
                _ => false,
            }
        } else {
            false
        };
        if !news {
            return false;
        }
        p.delivered = true;
        p.last_resets = snap.resets;
        p.last_index = snap.meta.index;
        if snap.error.is_none() && p.last_index < 1 {
            // The loop raises its index 0 → 1 only after a success.
            p.last_index = 1;
        }
        if self.polling {
            p.last_value.clone_from(&snap.value);
        }
        true
    }

    fn event(&self, snap: &Snapshot<T>) -> UpdateEvent<C, T::Value, T::Error> {
        UpdateEvent {
            correlation_id: self.correlation_id.clone(),
            result: snap.value.clone(),
            meta: snap.meta,
            error: snap.error.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress<T::Value, S>> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for room in the sink, sends, and catches up with the entry until the watch has
    /// delivered the latest index.
    async fn flush(
        self: Arc<Self>,
        store: Arc<Store<T>>,
        entry: Arc<EntryShared<T>>,
        mut snap: Snapshot<T>,
    ) {
        loop {
            let send = match self.lock().sink.as_ref() {
                Some(sink) => sink.send(self.event(&snap)),
                None => return,
            };
            let cancelled = self.cancel_event.listen();
            if self.cancelled.load(Ordering::Acquire) {
                return;
            }
            match select(send, cancelled).await {
                Either::Left((Ok(()), _)) => {}
                Either::Left((Err(_), _)) => {
                    store.remove_watcher(&entry, self.id);
                    return;
                }
                Either::Right(_) => return,
            }
            let latest = store.snapshot(&entry);
            let mut p = self.lock();
            match latest {
                Some(latest) if std::mem::take(&mut p.dirty) => {
                    // News arrived while we waited (a risen index, a reset, or — for a polled
                    // watch — a changed value at the same index): send the latest state.
                    p.last_index = latest.meta.index.max(p.last_index);
                    p.last_resets = latest.resets;
                    if self.polling {
                        p.last_value.clone_from(&latest.value);
                    }
                    drop(p);
                    snap = latest;
                }
                _ => {
                    p.pending = false;
                    p.dirty = false;
                    return;
                }
            }
        }
    }
}

impl<T, C, S> Watcher<T> for Record<T, C, S>
where
    T: CacheType,
    C: Clone + Send + Sync + 'static,
    S: EventSink<UpdateEvent<C, T::Value, T::Error>>,
{
    fn id(&self) -> u64 {
        self.id
    }

    fn max_age(&self) -> Option<Duration> {
        self.max_age
    }

    fn offer(&self, store: &Store<T>, entry: &Arc<EntryShared<T>>, snap: &Snapshot<T>) -> bool {
        if self.cancelled.load(Ordering::Acquire) {
            return false;
        }
        let mut p = self.lock();
        if !self.accept(store, &mut p, snap) {
            return p.sink.as_ref().is_some_and(|s| !s.is_closed());
        }
        if p.pending {
            // A flush task is waiting for room; it sends the latest when it gets some.
            p.dirty = true;
            return true;
        }
        let Some(sink) = p.sink.as_ref() else {
            return false;
        };
        match sink.try_send(self.event(snap)) {
            Ok(()) => true,
            Err(TrySendError::Closed) => false,
            Err(TrySendError::Full) => {
                p.pending = true;
                drop(p);
                if let (Some(store), Some(this)) = (store.this(), self.this.upgrade()) {
                    let rt = store.shared.rt.clone();
                    rt.spawn(Box::pin(this.flush(store, entry.clone(), snap.clone())));
                }
                true
            }
        }
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        // Not `wake_all`: listeners of this event check the flag without a shared lock.
        self.cancel_event.notify(usize::MAX);
        let sink = self.lock().sink.take();
        drop(sink);
    }
}

// ===== The sweep of dead receivers =====

/// How often watches are checked for a receiver that went away while nothing was sent.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A watch the sweep can check.
pub(crate) trait Sweep: Send + Sync {
    /// Removes the watch if its receiver is gone; `false` once the watch has ended.
    fn sweep(&self) -> bool;
}

impl<T, C, S> Sweep for Record<T, C, S>
where
    T: CacheType,
    C: Clone + Send + Sync + 'static,
    S: EventSink<UpdateEvent<C, T::Value, T::Error>>,
{
    fn sweep(&self) -> bool {
        if self.cancelled.load(Ordering::Acquire) {
            return false;
        }
        let closed = self.lock().sink.as_ref().is_none_or(|s| s.is_closed());
        if !closed {
            return true;
        }
        match self.home.get() {
            Some((store, entry)) => {
                if let (Some(store), Some(entry)) = (store.upgrade(), entry.upgrade()) {
                    store.remove_watcher(&entry, self.id);
                }
                self.cancel();
            }
            None => self.cancel(),
        }
        false
    }
}

/// Adds a watch to the cache's sweep list, starting the sweep task if it is not running.
///
/// A receiver dropped while its watch has nothing to send is noticed here within
/// [`SWEEP_INTERVAL`], so its record, sink and entry do not wait for the entry's next fetch
/// (a blocking query may stay open for minutes). One task per cache, only while watches exist.
fn register_sweep(shared: &Arc<Shared>, watch: Weak<dyn Sweep>) {
    shared
        .sweep
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(watch);
    if !shared.sweeper_running.swap(true, Ordering::AcqRel) {
        shared
            .rt
            .spawn(Box::pin(run_sweeper(Arc::downgrade(shared))));
    }
}

async fn run_sweeper(shared: Weak<Shared>) {
    let mut sleep: Option<Sleep> = None;
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        if strong.is_closed() {
            strong.sweeper_running.store(false, Ordering::Release);
            return;
        }
        let closed = strong.close_event.listen();
        let deadline = strong.rt.now() + SWEEP_INTERVAL;
        let timer = match sleep.as_mut() {
            Some(timer) => {
                timer.reset(deadline);
                timer
            }
            None => sleep.insert(Sleep::until(&*strong.rt, deadline)),
        };
        // Hold no strong reference while asleep: a dropped cache ends the task.
        drop(strong);
        select(closed, timer).await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let watches: Vec<Weak<dyn Sweep>> =
            std::mem::take(&mut *strong.sweep.lock().unwrap_or_else(|p| p.into_inner()));
        // Checked outside the list's lock: removing a watch takes its entry's locks.
        let live: Vec<Weak<dyn Sweep>> = watches
            .into_iter()
            .filter(|w| w.upgrade().is_some_and(|w| w.sweep()))
            .collect();
        let mut list = strong.sweep.lock().unwrap_or_else(|p| p.into_inner());
        list.extend(live);
        if list.is_empty() {
            strong.sweeper_running.store(false, Ordering::Release);
            return;
        }
    }
}

/// Whether two values differ by the type's `value_eq`; `None` when the type does not compare
/// values (it kept the default `value_eq`) or its `value_eq` panicked.
fn values_differ<T: CacheType>(ty: &T, old: &T::Value, new: &T::Value) -> Option<bool> {
    crate::cache_type::DEFAULT_VALUE_EQ.with(|used| used.set(false));
    let equal = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ty.value_eq(old, new)));
    let default = crate::cache_type::DEFAULT_VALUE_EQ.with(|used| used.replace(false));
    match equal {
        Ok(_) if default => None,
        Ok(equal) => Some(!equal),
        // A panicking comparison is contained; the watch delivers rather than miss a change.
        Err(_) => Some(true),
    }
}

// ===== Handles =====

/// The end of a watch as its handle sees it.
trait WatchEnd: Send + Sync {
    fn ended(&self) -> bool;
    fn listen(&self) -> event_listener::EventListener;
}

impl<T: CacheType, C: Send + Sync, S: Send> WatchEnd for Record<T, C, S> {
    fn ended(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    fn listen(&self) -> event_listener::EventListener {
        self.cancel_event.listen()
    }
}

/// Keeps a watch running; dropping it cancels the watch (Consul cancels with a context).
///
/// Cancelling removes the watch from its entry at once and leaves no task, timer or entry
/// reference behind; the shared fetch other callers rely on is never cancelled.
#[must_use = "dropping a WatchHandle cancels the watch"]
pub struct WatchHandle {
    cancel: Option<Box<dyn FnOnce() + Send + Sync>>,
    end: Arc<dyn WatchEnd>,
}

impl fmt::Debug for WatchHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchHandle")
            .field("active", &self.is_active())
            .finish()
    }
}

impl WatchHandle {
    /// Cancels the watch now (the same as dropping the handle).
    pub fn cancel(mut self) {
        if let Some(cancel) = self.cancel.take() {
            cancel();
        }
    }

    /// Lets the watch run until its receiver is dropped or the cache closes, as Consul's
    /// `Notify` with a context that is never cancelled.
    pub fn detach(mut self) {
        self.cancel = None;
    }

    /// Whether the watch is still running (not cancelled, receiver present, cache open).
    pub fn is_active(&self) -> bool {
        !self.end.ended()
    }

    /// Completes when the watch has ended, whatever ended it.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future has no effect on the watch.
    pub async fn ended(&self) {
        loop {
            let listener = self.end.listen();
            if self.end.ended() {
                return;
            }
            listener.await;
        }
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            cancel();
        }
    }
}

/// A watch as a [`Stream`] of update events (correlation id `()`). Dropping it cancels the
/// watch.
///
/// It holds at most one undelivered event in a single slot shared with its watch record, a
/// fraction of a channel's footprint; a reader that falls behind receives the latest state.
#[must_use = "streams do nothing unless polled"]
pub struct WatchStream<V, E> {
    slot: Arc<OneSlot<UpdateEvent<(), V, E>>>,
    _handle: WatchHandle,
}

impl<V, E> fmt::Debug for WatchStream<V, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}

impl<V, E> Stream for WatchStream<V, E> {
    type Item = UpdateEvent<(), V, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = self.slot.lock();
        if let Some(event) = state.event.take() {
            drop(state);
            // Room again: wake a flush waiting to send.
            wake_all(&self.slot.room);
            return Poll::Ready(Some(event));
        }
        if state.sender_gone {
            return Poll::Ready(None);
        }
        state.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<V, E> Drop for WatchStream<V, E> {
    fn drop(&mut self) {
        self.slot.lock().reader_gone = true;
        wake_all(&self.slot.room);
    }
}

/// A one-event channel between a watch record and its [`WatchStream`].
struct OneSlot<Ev> {
    state: Mutex<OneSlotState<Ev>>,
    /// Notified when the reader takes the event or goes away.
    room: Event,
}

struct OneSlotState<Ev> {
    event: Option<Ev>,
    reader: Option<std::task::Waker>,
    reader_gone: bool,
    sender_gone: bool,
}

impl<Ev> OneSlot<Ev> {
    fn new() -> Self {
        Self {
            state: Mutex::new(OneSlotState {
                event: None,
                reader: None,
                reader_gone: false,
                sender_gone: false,
            }),
            room: Event::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OneSlotState<Ev>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `event` in the slot, replacing an event the reader has not taken yet: a reader
    /// that falls behind receives the latest state, and the watch never waits for it.
    fn offer(&self, event: Ev) -> Result<(), (TrySendError, Ev)> {
        let mut state = self.lock();
        if state.reader_gone {
            return Err((TrySendError::Closed, event));
        }
        state.event = Some(event);
        let reader = state.reader.take();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
        Ok(())
    }
}

/// The sending side of a [`OneSlot`], owned by the watch record.
struct OneSlotSink<Ev>(Arc<OneSlot<Ev>>);

impl<Ev> Drop for OneSlotSink<Ev> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.sender_gone = true;
        let reader = state.reader.take();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

impl<Ev: Send + 'static> EventSink<Ev> for OneSlotSink<Ev> {
    fn try_send(&self, event: Ev) -> Result<(), TrySendError> {
        self.0.offer(event).map_err(|(error, _)| error)
    }

    fn send(&self, event: Ev) -> BoxFuture<'static, Result<(), SinkClosed>> {
        let slot = self.0.clone();
        Box::pin(async move {
            let mut event = event;
            loop {
                let room = slot.room.listen();
                match slot.offer(event) {
                    Ok(()) => return Ok(()),
                    Err((TrySendError::Closed, _)) => return Err(SinkClosed),
                    Err((TrySendError::Full, back)) => event = back,
                }
                room.await;
            }
        })
    }

    fn is_closed(&self) -> bool {
        self.0.lock().reader_gone
    }
}

// ===== TypedCache API =====

impl<T: CacheType> TypedCache<T> {
    /// Pushes an [`UpdateEvent`] into `sink` each time the result of `request` changes
    /// (Consul's `Cache.Notify`), until the returned handle is dropped, the sink's receiver is
    /// gone, or the cache closes.
    ///
    /// Blocking types deliver the current value at once (possibly a hit), then each risen (or
    /// reset) index; errors are delivered only before the first value, later ones are retried
    /// with backoff. Non-blocking types are polled every `max_age` of the request (required).
    /// Many watches of one entry share one upstream fetch stream.
    ///
    /// # Errors
    ///
    /// [`WatchError::EmptyKey`], [`WatchError::MaxAgeRequired`] for a non-blocking type
    /// without `max_age`, [`WatchError::Closed`] after [`Cache::close`](crate::Cache::close).
    #[doc(alias = "Notify")]
    pub fn notify<C, S>(
        &self,
        request: T::Request,
        correlation_id: C,
        sink: S,
    ) -> Result<WatchHandle, WatchError>
    where
        C: Clone + Send + Sync + 'static,
        S: EventSink<UpdateEvent<C, T::Value, T::Error>>,
    {
        let store = &self.store;
        if store.shared.is_closed() {
            return Err(WatchError::Closed);
        }
        let max_age = {
            let info = request.cache_info();
            if info.key.is_empty() {
                return Err(WatchError::EmptyKey);
            }
            if !store.opts.supports_blocking && info.max_age.is_none_or(|a| a.is_zero()) {
                return Err(WatchError::MaxAgeRequired(store.name));
            }
            info.max_age
        };
        let record = Arc::new_cyclic(|this| Record::<T, C, S> {
            this: this.clone(),
            id: NEXT_WATCH_ID.fetch_add(1, Ordering::Relaxed),
            correlation_id,
            max_age: if store.opts.supports_blocking {
                None
            } else {
                max_age
            },
            polling: !store.opts.supports_blocking,
            progress: Mutex::new(Progress {
                sink: Some(sink),
                last_index: 0,
                last_resets: 0,
                last_value: None,
                delivered: false,
                pending: false,
                dirty: false,
            }),
            cancelled: AtomicBool::new(false),
            cancel_event: Event::new(),
            home: OnceLock::new(),
        });
        let id = record.id;
        let entry = store.add_watcher(request, record.clone())?;
        let _ = record
            .home
            .set((Arc::downgrade(&self.store), Arc::downgrade(&entry)));
        let sweepable: Arc<dyn Sweep> = record.clone();
        register_sweep(&store.shared, Arc::downgrade(&sweepable));
        let weak_store: Weak<Store<T>> = Arc::downgrade(&self.store);
        let end: Arc<dyn WatchEnd> = record.clone();
        Ok(WatchHandle {
            cancel: Some(Box::new(move || {
                record.cancel();
                if let Some(store) = weak_store.upgrade() {
                    store.remove_watcher(&entry, id);
                }
            })),
            end,
        })
    }

    /// Like [`TypedCache::notify`], but the watch runs until `cancel` completes (a shutdown
    /// signal, a oneshot, a timer), or until its receiver is gone or the cache closes.
    ///
    /// # Errors
    ///
    /// As [`TypedCache::notify`].
    pub fn notify_until<C, S, F>(
        &self,
        request: T::Request,
        correlation_id: C,
        sink: S,
        cancel: F,
    ) -> Result<(), WatchError>
    where
        C: Clone + Send + Sync + 'static,
        S: EventSink<UpdateEvent<C, T::Value, T::Error>>,
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = self.notify(request, correlation_id, sink)?;
        self.store.shared.rt.spawn(Box::pin(async move {
            {
                let cancel = std::pin::pin!(cancel);
                let ended = std::pin::pin!(handle.ended());
                select(cancel, ended).await;
            }
            drop(handle);
        }));
        Ok(())
    }

    /// The same watch as [`TypedCache::notify`], as a [`Stream`] that holds at most one
    /// undelivered event (a slow reader then receives the latest).
    ///
    /// # Errors
    ///
    /// As [`TypedCache::notify`].
    pub fn watch(
        &self,
        request: T::Request,
    ) -> Result<WatchStream<T::Value, T::Error>, WatchError> {
        let slot = Arc::new(OneSlot::new());
        let handle = self.notify(request, (), OneSlotSink(slot.clone()))?;
        Ok(WatchStream {
            slot,
            _handle: handle,
        })
    }
}

// ===== impl Store: the entry side of watches =====

impl<T: CacheType> Store<T> {
    pub(crate) fn this(&self) -> Option<Arc<Self>> {
        self.this.upgrade()
    }

    pub(crate) fn snapshot_of(&self, st: &EntryState<T>, hit: bool, now: Instant) -> Snapshot<T> {
        Snapshot {
            value: st.value.clone(),
            error: st.error().cloned(),
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
    ///
    /// The closed check is made under the table lock after the watch is on its entry, so a
    /// watch either sees the cache closed (and is not added) or is found by `close`.
    pub(crate) fn add_watcher(
        &self,
        request: T::Request,
        watcher: Arc<dyn Watcher<T>>,
    ) -> Result<Arc<EntryShared<T>>, WatchError> {
        let now = self.shared.rt.now();
        let info = request.cache_info();
        let hash = self.hash(&info);
        let max_age = watcher.max_age();
        let added = self.with_entry(hash, &info, |slot| {
            if self.shared.is_closed() {
                return Err(WatchError::Closed);
            }
            if self.is_retired() {
                return Err(WatchError::Replaced(self.name));
            }
            slot.touch(self.nanos(now));
            slot.entry
                .watch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(watcher.clone());
            slot.entry.watchers.fetch_add(1, Ordering::AcqRel);
            self.counters.watches.fetch_add(1, Ordering::Relaxed);
            let st = &slot.st;
            let age = st.fetched_at.map(|t| self.since(t, now));
            let fresh = st.value.is_some() && max_age.is_none_or(|m| age.is_some_and(|a| a <= m));
            // The first delivery may be a cache hit.
            let initial = fresh.then(|| self.snapshot_of(st, true, now));
            if !st.fetching && !st.chain_sleeping {
                // Nothing keeps this entry fetching: start the watch loop. A fresh polled
                // value is next fetched when it reaches max age (never, for a max age too
                // long to represent).
                let first_at = match (fresh, max_age, st.fetched_at) {
                    (true, Some(max_age), Some(at)) => Some(self.at(at).checked_add(max_age)),
                    _ => None,
                };
                self.start_chain(slot, request.clone(), first_at);
            }
            Ok((slot.entry.clone(), initial))
        });
        drop(info);
        let (entry, initial) = added?;
        if let Some(snap) = initial {
            if !watcher.offer(self, &entry, &snap) {
                self.remove_watcher(&entry, watcher.id());
            }
        }
        Ok(entry)
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

    pub(crate) fn watchers_removed(&self, entry: &Arc<EntryShared<T>>, n: usize) {
        let left = entry.watchers.fetch_sub(n, Ordering::AcqRel) - n;
        self.counters.watches.fetch_sub(n as u64, Ordering::Relaxed);
        // The TTL counts again from the last watch.
        let now = self.nanos(self.shared.rt.now());
        self.read_slot(entry, |slot| slot.touch(now));
        if left == 0 {
            // Wake a chain that only ran for the watches, so that it stops now.
            wake_all(&entry.changed);
        }
    }
}
