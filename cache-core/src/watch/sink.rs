//! Where watches push their events: [`EventSink`] (implemented for `async_channel::Sender`
//! and [`map_sink`]) and the event itself, [`UpdateEvent`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::error::GetError;
use crate::outcome::ResultMeta;
use crate::runtime::BoxFuture;
use crate::store::{contained, drop_contained};

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
    /// The error of the entry's last fetch, set only while that fetch failed (errors are state,
    /// not history). Before the first value every failed fetch is an event; after it, a failure
    /// at an unchanged index is retried, not delivered (contract: Watch 3, 5).
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
///
/// `try_send` and `is_closed` (and a [`map_sink`] conversion) run while the cache holds the
/// entry's watch list: they must hand the event on and return, never call back into the cache
/// (a watch or notify of the same entry from there would deadlock). A panic in any of them
/// (or in `send`) counts as a receiver gone: the watch ends, and the entry's other watches and
/// its fetches go on.
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

/// How many times a delivery looks at a cancel signal that the waiting task is polling (see
/// [`CancelSignal::fired`]).
const SIGNAL_LOOKS: u32 = 1_000;

/// The cancel signal of a [`TypedCache::notify_until`](crate::TypedCache::notify_until)
/// watch, shared by the task that waits for it and the watch's sink ([`UntilSink`]), which
/// looks at it before each delivery: once the signal has completed, no event is delivered,
/// even before that task has run (Consul checks its context before each callback).
///
/// The sink looks while the cache holds the entry's watch list, so it never blocks on the
/// signal's lock: when the task is polling the signal at that moment, the sink waits a little
/// for that poll (which sets `done` if the signal fired), then counts it as not fired (the
/// task, seeing it fire, ends the watch).
pub(crate) struct CancelSignal<F> {
    /// Set once the future has completed (or panicked): read without the lock.
    done: AtomicBool,
    state: Mutex<SignalState<F>>,
}

struct SignalState<F> {
    /// The caller's future, until it completes.
    future: Option<Pin<Box<F>>>,
    /// The waiting task's waker, used for every poll so that its wake-up stays registered
    /// (before the task's first poll, a poll from the sink uses a no-op waker; the task's
    /// first poll registers its own).
    waker: Option<Waker>,
}

impl<F: Future<Output = ()> + Send + 'static> CancelSignal<F> {
    pub(crate) fn new(future: F) -> Arc<Self> {
        Arc::new(Self {
            done: AtomicBool::new(false),
            state: Mutex::new(SignalState {
                future: Some(Box::pin(future)),
                waker: None,
            }),
        })
    }

    /// The waiting task's look: whether the signal has completed, polling it with the task's
    /// `waker` (kept for the sink's polls).
    pub(crate) fn poll_fired(&self, waker: &Waker) -> bool {
        if self.done.load(Ordering::Acquire) {
            return true;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            state.waker = Some(waker.clone());
        }
        self.poll_locked(state)
    }

    /// The sink's look before a delivery: whether the signal has completed, polling it once
    /// more. When the waiting task is polling it at that moment, the look waits for that poll
    /// (a future's poll is short: a spin, then yielding the thread), but never blocks on the
    /// lock: after [`SIGNAL_LOOKS`] tries it counts the signal as not fired.
    pub(crate) fn fired(&self) -> bool {
        for look in 0..SIGNAL_LOOKS {
            if self.done.load(Ordering::Acquire) {
                return true;
            }
            match self.state.try_lock() {
                Ok(state) => return self.poll_locked(state),
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    return self.poll_locked(p.into_inner());
                }
                Err(std::sync::TryLockError::WouldBlock) if look < 64 => std::hint::spin_loop(),
                Err(std::sync::TryLockError::WouldBlock) => std::thread::yield_now(),
            }
        }
        self.done.load(Ordering::Acquire)
    }

    /// Polls the future once under its lock. A panic counts as fired (the watch ends, as for a
    /// panicking sink); the finished future is dropped after the lock, contained.
    fn poll_locked(&self, mut state: std::sync::MutexGuard<'_, SignalState<F>>) -> bool {
        let waker = state.waker.clone().unwrap_or_else(|| Waker::noop().clone());
        let Some(future) = state.future.as_mut() else {
            return true;
        };
        let polled = contained(|| future.as_mut().poll(&mut Context::from_waker(&waker)));
        if let Some(Poll::Pending) = polled {
            return false;
        }
        let finished = state.future.take();
        self.done.store(true, Ordering::Release);
        drop(state);
        drop_contained(finished);
        true
    }
}

/// A sink that refuses every event once its watch's [`CancelSignal`] has completed.
pub(crate) struct UntilSink<S, F> {
    pub(crate) inner: S,
    pub(crate) signal: Arc<CancelSignal<F>>,
}

impl<Ev, S, F> EventSink<Ev> for UntilSink<S, F>
where
    Ev: Send + 'static,
    S: EventSink<Ev>,
    F: Future<Output = ()> + Send + 'static,
{
    fn try_send(&self, event: Ev) -> Result<(), TrySendError> {
        if self.signal.fired() {
            return Err(TrySendError::Closed);
        }
        self.inner.try_send(event)
    }

    fn send(&self, event: Ev) -> BoxFuture<'static, Result<(), SinkClosed>> {
        if self.signal.fired() {
            return Box::pin(std::future::ready(Err(SinkClosed)));
        }
        // A send waiting for room checks the signal before each poll: room that appears after
        // the signal does not let the event through.
        let mut send = self.inner.send(event);
        let signal = self.signal.clone();
        Box::pin(std::future::poll_fn(move |cx| {
            if signal.fired() {
                return Poll::Ready(Err(SinkClosed));
            }
            send.as_mut().poll(cx)
        }))
    }

    fn is_closed(&self) -> bool {
        self.signal.fired() || self.inner.is_closed()
    }
}
