//! The [`Cache`] handle: registration, get, prepopulate, close and metrics.

use std::any::TypeId;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, Weak};

use crate::backoff::BackoffPolicy;
use crate::cache_type::{CacheType, RequestInfo};
use crate::error::{CacheError, GetError};
use crate::inspect::{EntryPage, EntryQuery};
use crate::metrics::Metrics;
use crate::outcome::{GetOutcome, Response};
use crate::ratelimit::RateLimit;
use crate::runtime::SharedRuntime;
use crate::shared::{CacheState, ErasedStore};
use crate::store::Store;
use crate::watch::{
    self, CancelSignal, EventSink, UntilSink, UpdateEvent, WatchError, WatchHandle, WatchStream,
};

/// Builds a [`Cache`] with non-default cache-wide options.
#[derive(Debug)]
#[must_use]
pub struct CacheBuilder {
    rt: SharedRuntime,
    backoff: BackoffPolicy,
    rate_limit: RateLimit,
    max_entries: Option<usize>,
}

impl CacheBuilder {
    /// The backoff policy of background refresh and watches (default: the reference's).
    pub fn backoff(mut self, policy: BackoffPolicy) -> Self {
        self.backoff = policy;
        self
    }

    /// The per-entry fetch rate limit (default: unlimited, burst 2).
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = limit;
        self
    }

    /// Bounds the number of entries; the least recently read are evicted first (default: no
    /// bound). Entries with active watches are never evicted for capacity.
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = Some(max_entries);
        self
    }

    /// Builds the cache and starts its expiry task on the runtime.
    pub fn build(self) -> Cache {
        let state = CacheState::new(self.rt, self.backoff, self.rate_limit, self.max_entries);
        state.rt.spawn(Box::pin(Arc::clone(&state).run_expiry()));
        let shared = state;
        Cache {
            inner: Arc::new(Inner {
                shared,
                types: RwLock::new(HashMap::new()),
            }),
        }
    }
}

struct Inner {
    shared: Arc<CacheState>,
    types: RwLock<HashMap<TypeId, Arc<dyn ErasedStore>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// A Consul-style agent cache: typed entries kept fresh from an authoritative source.
///
/// Cheap to clone; clones share the entries. Dropping the last clone (and every
/// [`TypedCache`]) closes the cache.
///
/// # Examples
///
/// ```
/// use cache_core::{Cache, CacheRequest, CacheType, FetchOptions, FetchResult, RequestInfo};
/// use cache_core::sim::SimRuntime;
///
/// struct Greeting;
/// #[derive(Clone)]
/// struct Hello(String);
/// impl CacheRequest for Hello {
///     fn cache_info(&self) -> RequestInfo<'_> {
///         RequestInfo::new(self.0.as_str())
///     }
/// }
/// impl CacheType for Greeting {
///     type Request = Hello;
///     type Value = String;
///     type Error = std::io::Error;
///     async fn fetch(&self, _: FetchOptions<String>, req: &Hello) -> std::io::Result<FetchResult<String>> {
///         Ok(FetchResult::new(format!("hello, {}", req.0), 1))
///     }
/// }
///
/// let sim = SimRuntime::new(1);
/// let cache = Cache::new(sim.handle());
/// cache.register(Greeting);
/// sim.block_on(async {
///     let first = cache.get::<Greeting>(&Hello("world".into())).await.unwrap();
///     assert_eq!(first.value.as_deref(), Some("hello, world"));
///     assert!(!first.meta.hit);
///     let second = cache.get::<Greeting>(&Hello("world".into())).await.unwrap();
///     assert!(second.meta.hit);
/// });
/// ```
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("closed", &self.inner.shared.is_closed())
            .field(
                "entries",
                &self.inner.shared.entries.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// A cache with default options on `runtime`.
    pub fn new(runtime: SharedRuntime) -> Self {
        Self::builder(runtime).build()
    }

    /// A builder for a cache on `runtime`.
    pub fn builder(runtime: SharedRuntime) -> CacheBuilder {
        CacheBuilder {
            rt: runtime,
            backoff: BackoffPolicy::default(),
            rate_limit: RateLimit::default(),
            max_entries: None,
        }
    }

    /// Registers a cache type and returns its typed handle.
    ///
    /// Registering the same Rust type again replaces the registration: new gets use the new
    /// one, whose entries start empty. The replaced registration releases its entries at once
    /// (they no longer count against `max_entries`), its watches end, and handles still held
    /// to it answer [`GetError::Replaced`] / [`WatchError::Replaced`] from then on.
    pub fn register<T: CacheType>(&self, cache_type: T) -> TypedCache<T> {
        let store = Store::new(cache_type, Arc::clone(&self.inner.shared));
        let erased: Arc<dyn ErasedStore> = store.clone();
        let replaced = self
            .inner
            .types
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(TypeId::of::<T>(), erased.clone());
        if let Some(old) = replaced {
            old.release_all();
        }
        let mut stores = self
            .inner
            .shared
            .stores
            .write()
            .unwrap_or_else(|p| p.into_inner());
        stores.retain(|s| {
            s.upgrade()
                .is_some_and(|s| s.cache_type_id() != TypeId::of::<T>())
        });
        stores.push(Arc::downgrade(&erased));
        drop(stores);
        TypedCache {
            cache: self.clone(),
            store,
        }
    }

    /// The typed handle of a registered type; `None` if `T` was never registered.
    pub fn typed<T: CacheType>(&self) -> Option<TypedCache<T>> {
        let erased = self
            .inner
            .types
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&TypeId::of::<T>())?
            .clone();
        let store = erased.as_any().downcast::<Store<T>>().ok()?;
        Some(TypedCache {
            cache: self.clone(),
            store,
        })
    }

    /// Gets the value for `request` of type `T` (docs/contract.md#get). See [`TypedCache::get`].
    ///
    /// # Errors
    ///
    /// [`GetError::NotRegistered`] if `T` was never registered, else as [`TypedCache::get`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future never cancels the shared fetch.
    pub async fn get<T: CacheType>(
        &self,
        request: &T::Request,
    ) -> Result<Response<T::Value>, GetError<T::Error>> {
        match self.typed::<T>() {
            Some(typed) => typed.get(request).await,
            None => Err(GetError::NotRegistered(std::any::type_name::<T>())),
        }
    }

    /// Like [`Cache::get`], but returns the last good value alongside an error.
    pub async fn get_outcome<T: CacheType>(
        &self,
        request: &T::Request,
    ) -> GetOutcome<T::Value, T::Error> {
        match self.typed::<T>() {
            Some(typed) => typed.get_outcome(request).await,
            None => GetOutcome {
                value: None,
                meta: Default::default(),
                error: Some(GetError::NotRegistered(std::any::type_name::<T>())),
            },
        }
    }

    /// Stores a value for type `T` without fetching (Consul's `Prepopulate`).
    ///
    /// # Errors
    ///
    /// [`CacheError::NotRegistered`] if `T` was never registered; [`CacheError::EmptyKey`]
    /// for an empty key.
    pub fn prepopulate<T: CacheType>(
        &self,
        info: &RequestInfo<'_>,
        value: T::Value,
        index: u64,
    ) -> Result<(), CacheError> {
        match self.typed::<T>() {
            Some(typed) => typed.prepopulate(info, value, index),
            None => Err(CacheError::NotRegistered(std::any::type_name::<T>())),
        }
    }

    /// Watches `request` of type `T`; see [`TypedCache::notify`] (Consul's `Notify`).
    ///
    /// # Errors
    ///
    /// [`WatchError::NotRegistered`] if `T` was never registered, else as
    /// [`TypedCache::notify`].
    pub fn notify<T, C, S>(
        &self,
        request: T::Request,
        correlation_id: C,
        sink: S,
    ) -> Result<WatchHandle, WatchError>
    where
        T: CacheType,
        C: Clone + Send + Sync + 'static,
        S: EventSink<UpdateEvent<C, T::Value, T::Error>>,
    {
        match self.typed::<T>() {
            Some(typed) => typed.notify(request, correlation_id, sink),
            None => Err(WatchError::NotRegistered(std::any::type_name::<T>())),
        }
    }

    /// Changes the per-entry fetch rate limit; it applies to existing entries at once (a
    /// fetch waiting for a token re-computes its wait under the new limit).
    pub fn set_rate_limit(&self, limit: RateLimit) {
        *self
            .inner
            .shared
            .rate_limit
            .write()
            .unwrap_or_else(|p| p.into_inner()) = limit;
        self.inner.shared.limit_changed.notify(usize::MAX);
    }

    /// Makes every fetch chain (background refresh or watch) that is waiting out a backoff
    /// after failures retry now, in every registered type; returns how many were woken.
    ///
    /// Call it when the upstream is known to be reachable again (a probe answered, another
    /// request succeeded), so entries recover at once instead of at the end of a backoff that
    /// may have grown to a minute. The backoff state is untouched: if the retry fails too,
    /// the next wait is the one the failure count calls for.
    pub fn retry_now(&self) -> usize {
        let stores = self
            .inner
            .shared
            .stores
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        stores
            .iter()
            .filter_map(Weak::upgrade)
            .map(|s| s.retry_now())
            .sum()
    }

    /// Stops background work: refresh, expiry and watches. Idempotent. Reads keep working
    /// (entries no longer expire); in-flight fetches may finish but start nothing new.
    pub fn close(&self) {
        self.inner.shared.close();
    }

    /// Whether [`Cache::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.is_closed()
    }

    /// A snapshot of every type's counters.
    pub fn metrics(&self) -> Metrics {
        let stores = self
            .inner
            .shared
            .stores
            .read()
            .unwrap_or_else(|p| p.into_inner());
        Metrics {
            types: stores
                .iter()
                .filter_map(Weak::upgrade)
                .map(|s| s.metrics())
                .collect(),
        }
    }

    /// The number of entries across all types.
    pub fn len(&self) -> usize {
        self.inner.shared.entries.load(Ordering::Relaxed)
    }

    /// Whether the cache holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The typed handle of one registered type: get, prepopulate, notify and watch without naming
/// the type at each call, and without a registry lookup.
pub struct TypedCache<T: CacheType> {
    cache: Cache,
    pub(crate) store: Arc<Store<T>>,
}

impl<T: CacheType> Clone for TypedCache<T> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
            store: Arc::clone(&self.store),
        }
    }
}

impl<T: CacheType> fmt::Debug for TypedCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedCache")
            .field("type", &self.store.name)
            .field("options", &self.store.opts)
            .finish_non_exhaustive()
    }
}

impl<T: CacheType> TypedCache<T> {
    /// Gets the value for `request` (docs/contract.md#get): from a valid entry (a hit), or by
    /// joining or starting the entry's single in-flight fetch and waiting for it.
    ///
    /// A get makes one fetch attempt: if it fails, the error is returned (use
    /// [`TypedCache::get_outcome`] to also receive the last good value). With
    /// `RequestInfo::timeout`, a get that sees no change in time returns the last known value
    /// (possibly none) and no error, as a blocking query does.
    ///
    /// Like any future, the get does nothing until polled: the entry is looked up at the
    /// first poll (a hit answers there, without allocating), and the timeout counts from it.
    ///
    /// # Errors
    ///
    /// [`GetError::Fetch`] or [`GetError::Panicked`] when the fetch this get waited for failed
    /// and `stale_if_error` did not allow the last value.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future returns at once and never cancels the shared fetch, which runs in a
    /// task owned by the cache.
    pub fn get<'a>(
        &'a self,
        request: &'a T::Request,
    ) -> impl Future<Output = Result<Response<T::Value>, GetError<T::Error>>> + Send + 'a {
        // Not an `async fn`: two pointers until polled; a hit answers in its first poll.
        self.store.get(request)
    }

    /// Like [`TypedCache::get`], but returns value, meta and error together, so the last good
    /// value comes along with an error.
    ///
    /// # Cancel safety
    ///
    /// As [`TypedCache::get`].
    pub fn get_outcome<'a>(
        &'a self,
        request: &'a T::Request,
    ) -> impl Future<Output = GetOutcome<T::Value, T::Error>> + Send + 'a {
        self.store.get(request)
    }

    /// Stores a value without fetching (Consul's `Prepopulate`).
    ///
    /// # Errors
    ///
    /// [`CacheError::EmptyKey`] for an empty key.
    pub fn prepopulate(
        &self,
        info: &RequestInfo<'_>,
        value: T::Value,
        index: u64,
    ) -> Result<(), CacheError> {
        if info.key.is_empty() {
            return Err(CacheError::EmptyKey);
        }
        self.store.prepopulate(info, value, index);
        Ok(())
    }

    /// Makes every fetch chain of this type that is waiting out a backoff retry now; see
    /// [`Cache::retry_now`].
    pub fn retry_now(&self) -> usize {
        self.store.retry_now()
    }

    /// A page of this type's entries, for an operator's view: see [`EntryQuery`].
    ///
    /// The work is one pass over the entries with a bounded heap of `offset + limit`, so
    /// asking for one page of a million entries allocates one page.
    pub fn entries(&self, query: &EntryQuery) -> EntryPage {
        self.store.entries(query)
    }

    /// The cache this handle belongs to.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The options the type registered with.
    pub fn options(&self) -> &crate::cache_type::RegisterOptions {
        &self.store.opts
    }
}

// ===== Watches =====

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
        watch::start(&self.store, request, correlation_id, sink)
    }

    /// Like [`TypedCache::notify`], but the watch runs until `cancel` completes (a shutdown
    /// signal, a oneshot, a timer), or until its receiver is gone or the cache closes. Once
    /// `cancel` has completed, no further event is delivered: it is also polled before each
    /// delivery, while the cache holds the entry's watch list, so, like a sink's `try_send`,
    /// its `poll` must not call back into the cache.
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
        // The sink looks at the signal before each delivery too: once `cancel` has completed,
        // nothing more is delivered, even before the task below has run.
        let signal = CancelSignal::new(cancel);
        let sink = UntilSink {
            inner: sink,
            signal: signal.clone(),
        };
        let handle = self.notify(request, correlation_id, sink)?;
        self.store.shared.rt.spawn(Box::pin(async move {
            {
                let cancel = std::future::poll_fn(|cx| {
                    if signal.poll_fired(cx.waker()) {
                        std::task::Poll::Ready(())
                    } else {
                        std::task::Poll::Pending
                    }
                });
                let cancel = std::pin::pin!(cancel);
                let ended = std::pin::pin!(handle.ended());
                futures::future::select(cancel, ended).await;
            }
            drop(handle);
        }));
        Ok(())
    }

    /// The same watch as [`TypedCache::notify`], as a [`Stream`](futures::Stream) that holds at most one
    /// undelivered event (a slow reader then receives the latest).
    ///
    /// # Errors
    ///
    /// As [`TypedCache::notify`].
    pub fn watch(
        &self,
        request: T::Request,
    ) -> Result<WatchStream<T::Value, T::Error>, WatchError> {
        watch::start_stream(&self.store, request)
    }
}
