//! A watch as its entry keeps it: a [`Record`] with the consumer's sink and the progress of
//! what it delivered, the rules of what is news (blocking and polled), and the short-lived task
//! that waits for room in a full sink and then catches up.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use event_listener::Event;
use futures::FutureExt;
use futures::future::{Either, select};

use super::handle::{WatchEnd, WatchHandle};
use super::sink::{EventSink, TrySendError, UpdateEvent};
use super::sweep::register_sweep;
use crate::cache_type::{CacheRequest, CacheType};
use crate::error::WatchError;
use crate::shared::Sweep;
use crate::store::{EntryHandle, Snapshot, Store, Watcher, contained};

/// A watch's mutable state: its sink and what it has delivered, under one lock, so that
/// offering a fetch to a watch takes a single lock.
struct Progress<V, S> {
    /// `None` once the watch is cancelled: dropping the sink is how its receiver learns.
    sink: Option<S>,
    last_index: u64,
    last_resets: u32,
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
    /// Index in the entry's watch list (see `Watcher::place`).
    place: AtomicUsize,
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
type Home<T> = (Weak<Store<T>>, Weak<EntryHandle<T>>);

static NEXT_WATCH_ID: AtomicU64 = AtomicU64::new(1);

impl<T, C, S> Record<T, C, S>
where
    T: CacheType,
    C: Clone + Send + Sync + 'static,
    S: EventSink<UpdateEvent<C, T::Value, T::Error>>,
{
    /// Whether the snapshot is news to this watch (contract: Watch 3–5), updating its progress
    /// if so.
    fn accept(
        &self,
        store: &Store<T>,
        progress: &mut Progress<T::Value, S>,
        snapshot: &Snapshot<T>,
    ) -> bool {
        let reset = snapshot.resets > progress.last_resets && snapshot.value.is_some();
        let news = if progress.last_index == 0 {
            // Before the first value everything is news, errors included.
            !(progress.delivered && snapshot.error.is_none() && snapshot.value.is_none())
        } else if reset || snapshot.meta.index > progress.last_index {
            true
        } else if self.polling && snapshot.error.is_none() {
            match (&progress.last_value, &snapshot.value) {
                (Some(old), Some(new)) => values_differ(&store.ty, old, new),
                (None, Some(_)) => true,
                _ => false,
            }
        } else {
            false
        };
        if !news {
            return false;
        }
        progress.delivered = true;
        progress.last_resets = snapshot.resets;
        progress.last_index = snapshot.meta.index;
        if snapshot.error.is_none() && progress.last_index < 1 {
            // The loop raises its index 0 → 1 only after a success.
            progress.last_index = 1;
        }
        if self.polling {
            progress.last_value.clone_from(&snapshot.value);
        }
        true
    }

    fn event(&self, snapshot: &Snapshot<T>) -> UpdateEvent<C, T::Value, T::Error> {
        UpdateEvent {
            correlation_id: self.correlation_id.clone(),
            result: snapshot.value.clone(),
            meta: snapshot.meta,
            error: snapshot.error.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress<T::Value, S>> {
        self.progress
            .lock()
            .unwrap_or_else(|progress| progress.into_inner())
    }

    /// Waits for room in the sink, sends, and catches up with the entry until the watch has
    /// delivered the latest index.
    async fn flush(
        self: Arc<Self>,
        store: Arc<Store<T>>,
        entry: Arc<EntryHandle<T>>,
        mut snapshot: Snapshot<T>,
    ) {
        loop {
            // The progress lock ends with this block: removing the watch takes it again.
            let send = {
                let progress = self.lock();
                let Some(sink) = progress.sink.as_ref() else {
                    return;
                };
                contained(|| sink.send(self.event(&snapshot)))
            };
            // A panicking sink counts as closed (contract: Fetch 9).
            let Some(send) = send else {
                store.remove_watcher(&entry, &*self);
                return;
            };
            let send = AssertUnwindSafe(send).catch_unwind();
            let cancelled = self.cancel_event.listen();
            if self.cancelled.load(Ordering::Acquire) {
                return;
            }
            match select(send, cancelled).await {
                Either::Left((Ok(Ok(())), _)) => {}
                Either::Left((Ok(Err(_)) | Err(_), _)) => {
                    store.remove_watcher(&entry, &*self);
                    return;
                }
                Either::Right(_) => return,
            }
            let latest = store.snapshot(&entry);
            let mut progress = self.lock();
            match latest {
                Some(latest) if std::mem::take(&mut progress.dirty) => {
                    // News arrived while we waited (a risen index, a reset, or — for a polled
                    // watch — a changed value at the same index): send the latest state.
                    // What is sent now is what the watch has seen. The entry may be ahead of
                    // the last offer (whose turn comes next, and will find nothing new): past
                    // a reset that offer has not made yet, the index is the lower one, else
                    // the watch would take the rises below its old high mark for old news.
                    progress.last_index = if latest.resets == progress.last_resets {
                        latest.meta.index.max(progress.last_index)
                    } else {
                        latest.meta.index
                    };
                    progress.last_resets = latest.resets;
                    if self.polling {
                        progress.last_value.clone_from(&latest.value);
                    }
                    drop(progress);
                    snapshot = latest;
                }
                _ => {
                    progress.pending = false;
                    progress.dirty = false;
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

    fn place(&self) -> &AtomicUsize {
        &self.place
    }

    fn max_age(&self) -> Option<Duration> {
        self.max_age
    }

    fn offer(&self, store: &Store<T>, entry: &Arc<EntryHandle<T>>, snapshot: &Snapshot<T>) -> bool {
        if self.cancelled.load(Ordering::Acquire) {
            return false;
        }
        let mut progress = self.lock();
        if !self.accept(store, &mut progress, snapshot) {
            return progress.sink.as_ref().is_some_and(|s| sink_open(s));
        }
        if progress.pending {
            // A flush task is waiting for room; it sends the latest when it gets some.
            progress.dirty = true;
            return true;
        }
        let Some(sink) = progress.sink.as_ref() else {
            return false;
        };
        // A panicking sink counts as closed: the watch ends, and the fetch chain that offers
        // (or the caller of `prepopulate`) goes on (contract: Fetch 9).
        match contained(|| sink.try_send(self.event(snapshot))) {
            Some(Ok(())) => true,
            Some(Err(TrySendError::Closed)) | None => false,
            Some(Err(TrySendError::Full)) => {
                progress.pending = true;
                drop(progress);
                if let (Some(store), Some(this)) = (store.this(), self.this.upgrade()) {
                    let rt = store.shared.rt.clone();
                    rt.spawn(Box::pin(this.flush(store, entry.clone(), snapshot.clone())));
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

/// Whether the sink's receiver is still there; a panic counts as gone.
fn sink_open<Ev, S: EventSink<Ev>>(sink: &S) -> bool {
    contained(|| !sink.is_closed()).unwrap_or(false)
}

/// Whether two values differ by the type's `value_eq` (`==` unless overridden); a panicking
/// comparison counts as a change, so the watch delivers rather than miss one.
fn values_differ<T: CacheType>(ty: &T, old: &T::Value, new: &T::Value) -> bool {
    contained(|| ty.value_eq(old, new)).is_none_or(|equal| !equal)
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
        let closed = self.lock().sink.as_ref().is_none_or(|s| !sink_open(s));
        if !closed {
            return true;
        }
        WatchEnd::stop(self);
        false
    }
}

impl<T, C, S> WatchEnd for Record<T, C, S>
where
    T: CacheType,
    C: Clone + Send + Sync + 'static,
    S: EventSink<UpdateEvent<C, T::Value, T::Error>>,
{
    fn ended(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    fn listen(&self) -> event_listener::EventListener {
        self.cancel_event.listen()
    }

    fn stop(&self) {
        // Out of its entry (and the counts) first, then the sink dropped: a consumer that
        // sees its channel close finds the watch gone from the counts too.
        if let Some((store, entry)) = self.home.get() {
            if let (Some(store), Some(entry)) = (store.upgrade(), entry.upgrade()) {
                store.remove_watcher(&entry, self);
            }
        }
        self.cancel();
    }
}

/// Starts a watch of `request` on `store` that pushes into `sink`: the body of
/// [`TypedCache::notify`](crate::TypedCache::notify).
pub(crate) fn start<T, C, S>(
    store: &Arc<Store<T>>,
    request: T::Request,
    correlation_id: C,
    sink: S,
) -> Result<WatchHandle, WatchError>
where
    T: CacheType,
    C: Clone + Send + Sync + 'static,
    S: EventSink<UpdateEvent<C, T::Value, T::Error>>,
{
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
        place: AtomicUsize::new(0),
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
    let entry = store.add_watcher(request, record.clone())?;
    let _ = record
        .home
        .set((Arc::downgrade(store), Arc::downgrade(&entry)));
    let sweepable: Arc<dyn Sweep> = record.clone();
    register_sweep(&store.shared, Arc::downgrade(&sweepable));
    Ok(WatchHandle {
        end: record,
        attached: true,
    })
}
