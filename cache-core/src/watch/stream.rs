//! [`WatchStream`]: a watch as a `Stream`, over a one-event slot that always holds the latest.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use event_listener::Event;
use futures::Stream;

use super::handle::WatchHandle;
use super::sink::{EventSink, SinkClosed, TrySendError, UpdateEvent};
use crate::cache_type::CacheType;
use crate::error::WatchError;
use crate::runtime::BoxFuture;
use crate::store::Store;
use crate::store::wake_all;

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

/// Starts a watch of `request` on `store` as a [`WatchStream`]: the body of
/// [`TypedCache::watch`](crate::TypedCache::watch).
pub(crate) fn start_stream<T: CacheType>(
    store: &Arc<Store<T>>,
    request: T::Request,
) -> Result<WatchStream<T::Value, T::Error>, WatchError> {
    let slot = Arc::new(OneSlot::new());
    let handle = super::record::start(store, request, (), OneSlotSink(slot.clone()))?;
    Ok(WatchStream {
        slot,
        _handle: handle,
    })
}
