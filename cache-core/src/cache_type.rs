//! What a cache type implements: [`CacheType`], its requests, options and fetch results.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Opaque per-entry state a type keeps between fetches (contract: Fetch 2).
///
/// It is handed back to the next fetch in [`LastResult::state`] and dropped when the entry is
/// evicted, so cleanup belongs in its `Drop` impl.
pub type FetchState = Arc<dyn Any + Send + Sync>;

/// A kind of cached data with its own fetch logic (Consul's `cache.Type`).
///
/// # Examples
///
/// ```
/// use cache_core::{CacheRequest, CacheType, FetchOptions, FetchResult, RequestInfo};
///
/// /// Looks up a number's square "upstream".
/// struct Squares;
///
/// #[derive(Clone)]
/// struct Square(u64);
///
/// impl CacheRequest for Square {
///     fn cache_info(&self) -> RequestInfo<'_> {
///         RequestInfo::new(self.0.to_string())
///     }
/// }
///
/// impl CacheType for Squares {
///     type Request = Square;
///     type Value = u64;
///     type Error = std::io::Error;
///
///     async fn fetch(&self, _opts: FetchOptions<u64>, req: &Square) -> Result<FetchResult<u64>, std::io::Error> {
///         Ok(FetchResult::new(req.0 * req.0, 1))
///     }
/// }
/// ```
pub trait CacheType: Send + Sync + 'static {
    /// What callers ask for; it names its entry through [`CacheRequest::cache_info`].
    type Request: CacheRequest + Clone + Send + Sync + 'static;
    /// The cached value. Make it cheap to clone (an `Arc`, or a small value): every hit clones
    /// it. `PartialEq` lets a polled watch tell a changed value from an unchanged one (see
    /// [`CacheType::value_eq`]).
    type Value: Clone + PartialEq + Send + Sync + 'static;
    /// The error a fetch can fail with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Registration options for this type (docs/contract.md#options). Called once, at registration.
    fn register_options(&self) -> RegisterOptions {
        RegisterOptions::default()
    }

    /// Fetches the value for `request` from the authoritative source.
    ///
    /// For blocking types `opts.min_index` is the entry's index: answer once the data's index
    /// is above it, or at `opts.timeout` with the same index (a blocking query that saw no
    /// change). The future runs in a task owned by the cache, never by a caller: it is not
    /// cancelled when the get that started it is dropped.
    fn fetch(
        &self,
        opts: FetchOptions<Self::Value>,
        request: &Self::Request,
    ) -> impl Future<Output = Result<FetchResult<Self::Value>, Self::Error>> + Send;

    /// Whether `error` is fatal: a fatal error stops background refresh for the entry (the
    /// reference stops on "ACL token not found"). The entry stays until its TTL.
    fn is_fatal(&self, error: &Self::Error) -> bool {
        let _ = error;
        false
    }

    /// Whether two values are the same, for polling watches of non-blocking types, which
    /// deliver when the index rose or the value changed (Consul compares with
    /// `reflect.DeepEqual`). The default is `==`; override it when another notion of "same"
    /// fits better (a value with a timestamp that should not count, say). A panic here is
    /// contained: the watch delivers the new value.
    fn value_eq(&self, a: &Self::Value, b: &Self::Value) -> bool {
        a == b
    }
}

/// A request that names a cache entry (Consul's `cache.Request`).
pub trait CacheRequest {
    /// The request info: the entry key, its partition, and per-request options.
    fn cache_info(&self) -> RequestInfo<'_>;
}

/// Per-request information (docs/contract.md#terms).
///
/// Strings are borrowed where the request already holds them, so a cache hit allocates nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestInfo<'a> {
    /// The entry key within its type and partition. Empty means "do not cache": the request is
    /// passed straight to the type's fetch.
    pub key: Cow<'a, str>,
    /// Partition: entries of different datacenters never mix.
    pub datacenter: Cow<'a, str>,
    /// Partition: entries of different ACL tokens never mix.
    pub token: Cow<'a, str>,
    /// Blocking types: wait for an index strictly above this (0 = do not block).
    pub min_index: u64,
    /// Bounds the get itself; on timeout the get returns the last known value and no error.
    pub timeout: Option<Duration>,
    /// Non-refresh types: a value older than this is not served from cache.
    pub max_age: Option<Duration>,
    /// Non-refresh types: revalidate with the server unless a fetch is already in flight.
    pub must_revalidate: bool,
    /// Serve a value up to this old when the get's fetch attempt fails, instead of the error.
    pub stale_if_error: Option<Duration>,
}

impl<'a> RequestInfo<'a> {
    /// Request info for `key` with every option at its default.
    pub fn new(key: impl Into<Cow<'a, str>>) -> Self {
        Self {
            key: key.into(),
            ..Self::default()
        }
    }

    /// Sets the datacenter partition.
    pub fn datacenter(mut self, datacenter: impl Into<Cow<'a, str>>) -> Self {
        self.datacenter = datacenter.into();
        self
    }

    /// Sets the token partition.
    pub fn token(mut self, token: impl Into<Cow<'a, str>>) -> Self {
        self.token = token.into();
        self
    }

    /// Sets the minimum index to block on.
    #[doc(alias = "MinIndex")]
    pub fn min_index(mut self, min_index: u64) -> Self {
        self.min_index = min_index;
        self
    }

    /// Sets the get's own timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the maximum age of a cached value (non-refresh types).
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    /// Asks for revalidation (non-refresh types).
    pub fn must_revalidate(mut self, must_revalidate: bool) -> Self {
        self.must_revalidate = must_revalidate;
        self
    }

    /// Accepts a value up to `age` old when the fetch fails.
    pub fn stale_if_error(mut self, age: Duration) -> Self {
        self.stale_if_error = Some(age);
        self
    }
}

/// How a type is cached (docs/contract.md#options); returned by [`CacheType::register_options`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegisterOptions {
    /// Keep entries fresh in the background (default off).
    pub refresh: bool,
    /// The type answers blocking queries on an index (default off).
    pub supports_blocking: bool,
    /// Pause between background refreshes (default 0).
    pub refresh_timer: Duration,
    /// The upstream blocking timeout handed to fetch (default 10 min; blocking types only).
    pub query_timeout: Duration,
    /// Evict an entry not read for this long (default 72 h).
    pub last_get_ttl: Duration,
    /// Stop background refresh after it has failed continuously for this long (default: never).
    /// The last value keeps being served until its TTL ends or a get fetches again.
    pub refresh_give_up: Option<Duration>,
}

impl RegisterOptions {
    /// The defaults: no refresh, no blocking, 10 min query timeout, 72 h TTL.
    pub const fn new() -> Self {
        Self {
            refresh: false,
            supports_blocking: false,
            refresh_timer: Duration::ZERO,
            query_timeout: Duration::from_secs(600),
            last_get_ttl: Duration::from_secs(72 * 3600),
            refresh_give_up: None,
        }
    }

    /// Turns background refresh on or off.
    pub const fn refresh(mut self, refresh: bool) -> Self {
        self.refresh = refresh;
        self
    }

    /// Declares that the type supports blocking queries.
    pub const fn supports_blocking(mut self, supports_blocking: bool) -> Self {
        self.supports_blocking = supports_blocking;
        self
    }

    /// Sets the pause between background refreshes.
    pub const fn refresh_timer(mut self, refresh_timer: Duration) -> Self {
        self.refresh_timer = refresh_timer;
        self
    }

    /// Sets the upstream blocking timeout.
    pub const fn query_timeout(mut self, query_timeout: Duration) -> Self {
        self.query_timeout = query_timeout;
        self
    }

    /// Sets the time-to-live since the last read.
    pub const fn last_get_ttl(mut self, last_get_ttl: Duration) -> Self {
        self.last_get_ttl = last_get_ttl;
        self
    }

    /// Gives up background refresh after failing continuously for `after`.
    pub const fn refresh_give_up(mut self, after: Duration) -> Self {
        self.refresh_give_up = Some(after);
        self
    }
}

impl Default for RegisterOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// What a fetch is told (Consul's `FetchOptions`).
#[non_exhaustive]
pub struct FetchOptions<V> {
    /// Blocking types: the entry's index; answer once the data's index is above it. Zero for
    /// the first fetch and for non-blocking types.
    pub min_index: u64,
    /// Blocking types: the upstream blocking timeout (`query_timeout`). Zero otherwise.
    pub timeout: Duration,
    /// The entry's last result, when it holds a value.
    pub last_result: Option<LastResult<V>>,
    /// Tells the cache that the server accepted this fetch's blocking query (see
    /// [`Connected`]). A no-op for fetches the cache does not own (by hand, pass-through).
    pub connected: Connected,
}

impl<V> FetchOptions<V> {
    /// Options for a first, non-blocking fetch. Useful when calling a type's fetch by hand.
    pub fn new() -> Self {
        Self {
            min_index: 0,
            timeout: Duration::ZERO,
            last_result: None,
            connected: Connected::default(),
        }
    }
}

/// Lets a blocking fetch say "the server accepted my query and is now holding it": the
/// entry's data is current at its index, so the server is reachable again.
///
/// A blocking query that sees no change stays open for up to `query_timeout` (minutes). Until
/// it completes, the cache cannot tell an open query from a hung one, so an entry that was
/// failing keeps reporting its old error and its age. A fetch that knows better (the server
/// answered the query's first round trip) calls [`Connected::notify`]: the cache then clears
/// the entry's stored error, its failing time and its lost-contact time at once, so later
/// readers and watchers see a healthy entry with age zero. Backoff is left alone until the
/// fetch completes. Calling it more than once, or after the fetch completed, does nothing.
#[derive(Clone, Default)]
pub struct Connected(Option<Arc<dyn Fn() + Send + Sync>>);

impl Connected {
    /// A signal that runs `f` when notified (the cache builds these; tests may too).
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// Reports that the server accepted the query. Cheap; safe to call from any thread.
    pub fn notify(&self) {
        if let Some(f) = &self.0 {
            f();
        }
    }
}

impl fmt::Debug for Connected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connected")
            .field("active", &self.0.is_some())
            .finish()
    }
}

impl<V> Default for FetchOptions<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: fmt::Debug> fmt::Debug for FetchOptions<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchOptions")
            .field("min_index", &self.min_index)
            .field("timeout", &self.timeout)
            .field("last_result", &self.last_result)
            .finish()
    }
}

/// The entry's previous result, handed to the next fetch.
#[non_exhaustive]
pub struct LastResult<V> {
    /// The value last stored.
    pub value: V,
    /// Its index.
    pub index: u64,
    /// The opaque state the previous fetch returned.
    pub state: Option<FetchState>,
}

impl<V: fmt::Debug> fmt::Debug for LastResult<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LastResult")
            .field("value", &self.value)
            .field("index", &self.index)
            .field("state", &self.state.is_some())
            .finish()
    }
}

/// What a fetch returns (Consul's `FetchResult`).
#[non_exhaustive]
pub struct FetchResult<V> {
    /// The new value, or `None` for "no new value" (the entry keeps what it has).
    pub value: Option<V>,
    /// The data's index. Stored as at least 1; a 0 counts as a failed attempt for backoff.
    pub index: u64,
    /// Opaque state to keep with the entry.
    pub state: Option<FetchState>,
    /// Keep the old value but take the new index.
    pub not_modified: bool,
}

impl<V> FetchResult<V> {
    /// A new value at `index`.
    pub fn new(value: V, index: u64) -> Self {
        Self {
            value: Some(value),
            index,
            state: None,
            not_modified: false,
        }
    }

    /// No new value; the data is still at `index`.
    pub fn none(index: u64) -> Self {
        Self {
            value: None,
            index,
            state: None,
            not_modified: false,
        }
    }

    /// The value has not changed; the entry keeps its value and takes `index`.
    pub fn not_modified(index: u64) -> Self {
        Self {
            value: None,
            index,
            state: None,
            not_modified: true,
        }
    }

    /// Attaches opaque per-entry state.
    pub fn with_state(mut self, state: FetchState) -> Self {
        self.state = Some(state);
        self
    }
}

impl<V: fmt::Debug> fmt::Debug for FetchResult<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchResult")
            .field("value", &self.value)
            .field("index", &self.index)
            .field("state", &self.state.is_some())
            .field("not_modified", &self.not_modified)
            .finish()
    }
}
