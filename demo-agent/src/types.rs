//! The agent's cache types: how each kind of cached data is fetched from the [`Upstream`].
//!
//! | type | data | blocking | background refresh |
//! |---|---|---|---|
//! | [`KvType`] | one key (absent is a value too) | yes | `--kv-refresh` (default on) |
//! | [`ListType`] | the keys under a prefix | yes | `--kv-refresh` (default on) |
//! | [`StatsType`] | the upstream's counters | no (polling) | yes, every `--stats-refresh` |
//!
//! A request whose `cached` flag is off names no entry (an empty key), so the cache passes it
//! straight to the type's fetch: uncached reads take the same path to the upstream as cached
//! ones, without coalescing or storing.

use std::sync::Arc;
use std::time::Duration;

use cache_core::{
    CacheRequest, CacheType, FetchOptions, FetchResult, RegisterOptions, RequestInfo,
};

use crate::upstream::accepting;
use crate::upstream::{KeyRead, ListRead, Query, ReadMode, Upstream, UpstreamError, UpstreamStats};

/// How one read is served: from the cache or not, blocking or not, and its `Cache-Control`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Serve from the cache (`?cached`); otherwise the read goes straight to the upstream.
    pub cached: bool,
    /// Wait for an index above this (`?index=`); 0 answers at once.
    pub min_index: u64,
    /// The longest to wait for that (`?wait=`), when blocking.
    pub wait: Option<Duration>,
    /// Whether the read may block upstream: set for `?index=` reads and for watches. In the
    /// simple (non-refresh) mode a non-blocking read never opens a blocking upstream query,
    /// so a revalidation answers at once.
    pub block: bool,
    /// `Cache-Control: must-revalidate`.
    pub must_revalidate: bool,
    /// `Cache-Control: stale-if-error=<seconds>`.
    pub stale_if_error: Option<Duration>,
    /// The upstream read mode (`?stale`, `?consistent`, default). Cached reads fetch in
    /// [`ReadMode::Stale`], as Consul's agent cache does: the cache is a local copy anyway.
    pub mode: ReadMode,
}

impl ReadOptions {
    /// A cached read that blocks on the entry's index forever: what a watch asks for.
    pub fn watch() -> Self {
        Self {
            cached: true,
            block: true,
            mode: ReadMode::Stale,
            ..Self::default()
        }
    }

    fn info<'a>(&self, key: &'a str) -> RequestInfo<'a> {
        let mut info =
            RequestInfo::new(if self.cached { key } else { "" }).min_index(self.min_index);
        if let Some(wait) = self.wait.filter(|_| self.min_index > 0) {
            info = info.timeout(wait);
        }
        if let Some(age) = self.stale_if_error {
            info = info.stale_if_error(age);
        }
        info.must_revalidate(self.must_revalidate)
    }

    /// The upstream query for a fetch: blocking on the entry's index when the type refreshes
    /// in the background or the read asked to block; at once otherwise.
    fn query(&self, refresh: bool, opts_min_index: u64, opts_timeout: Duration) -> Query {
        let query = if opts_min_index > 0 && (refresh || self.block) {
            // An uncached (pass-through) fetch is told the request's own wait as its timeout.
            Query::blocking(opts_min_index, opts_timeout)
        } else {
            Query::now()
        };
        query.with_mode(if self.cached {
            ReadMode::Stale
        } else {
            self.mode
        })
    }
}

/// Options shared by the blocking types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockingOptions {
    /// Keep entries fresh with a background blocking query (Consul's "background refresh
    /// caching"); off means "simple caching", where `Cache-Control` decides freshness.
    pub refresh: bool,
    /// The upstream blocking timeout of each fetch (the type's `query_timeout`).
    pub query_timeout: Duration,
}

impl BlockingOptions {
    /// The registration of a blocking type with these options.
    fn register_options(&self) -> RegisterOptions {
        RegisterOptions::new()
            .supports_blocking(true)
            .refresh(self.refresh)
            .query_timeout(self.query_timeout)
    }
}

// ===== KV =====

/// One key of the upstream, cached; a blocking type.
pub struct KvType {
    upstream: Arc<dyn Upstream>,
    options: BlockingOptions,
}

impl KvType {
    /// A KV type reading from `upstream`.
    pub fn new(upstream: Arc<dyn Upstream>, options: BlockingOptions) -> Self {
        Self { upstream, options }
    }
}

/// A read of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvRequest {
    /// The key.
    pub key: String,
    /// How to read it.
    pub read: ReadOptions,
}

impl CacheRequest for KvRequest {
    fn cache_info(&self) -> RequestInfo<'_> {
        self.read.info(&self.key)
    }
}

impl CacheType for KvType {
    type Request = KvRequest;
    /// The key's value (none if absent, so absence is cached and blocked on too) and index.
    type Value = Arc<KeyRead>;
    type Error = UpstreamError;

    fn register_options(&self) -> RegisterOptions {
        self.options.register_options()
    }

    /// Not an `async fn`: the future lives inside the entry's fetch task for the whole
    /// blocking query, so it keeps only what the read needs, not the whole options (with the
    /// last result), and the upstream's read in its box alone (see `upstream::accepting`).
    fn fetch(
        &self,
        opts: FetchOptions<Self::Value>,
        request: &KvRequest,
    ) -> impl Future<Output = Result<FetchResult<Self::Value>, UpstreamError>> + Send {
        let (min_index, timeout) = (opts.min_index, opts.timeout);
        let connected = opts.connected;
        async move {
            // The upstream calls `accepted()` once it holds the blocking query: the engine
            // then clears a failing entry's error and age at once (see
            // `upstream::with_accepted`; `accepting` keeps the signal in the read's box). The
            // query is no named local: the future would keep room for it.
            let read = accepting(connected, || {
                let query = request.read.query(self.options.refresh, min_index, timeout);
                self.upstream.get(&request.key, query)
            })
            .await?;
            let index = read.index;
            Ok(FetchResult::new(Arc::new(read), index))
        }
    }

    fn value_eq(&self, a: &Self::Value, b: &Self::Value) -> bool {
        a == b
    }
}

// ===== List =====

/// The keys under a prefix, cached; a blocking type.
pub struct ListType {
    upstream: Arc<dyn Upstream>,
    options: BlockingOptions,
}

impl ListType {
    /// A list type reading from `upstream`.
    pub fn new(upstream: Arc<dyn Upstream>, options: BlockingOptions) -> Self {
        Self { upstream, options }
    }
}

/// A listing of the keys under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    prefix: String,
    /// The entry key: the prefix behind a marker, so that the empty prefix (every key) still
    /// names an entry.
    entry_key: String,
    /// How to read it.
    pub read: ReadOptions,
}

impl ListRequest {
    /// A listing of `prefix` (every key when empty).
    pub fn new(prefix: impl Into<String>, read: ReadOptions) -> Self {
        let prefix = prefix.into();
        Self {
            entry_key: format!("prefix:{prefix}"),
            prefix,
            read,
        }
    }

    /// The prefix listed.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl CacheRequest for ListRequest {
    fn cache_info(&self) -> RequestInfo<'_> {
        self.read.info(&self.entry_key)
    }
}

impl CacheType for ListType {
    type Request = ListRequest;
    type Value = Arc<ListRead>;
    type Error = UpstreamError;

    fn register_options(&self) -> RegisterOptions {
        self.options.register_options()
    }

    /// Not an `async fn`, for the reason given at [`KvType`]'s.
    fn fetch(
        &self,
        opts: FetchOptions<Self::Value>,
        request: &ListRequest,
    ) -> impl Future<Output = Result<FetchResult<Self::Value>, UpstreamError>> + Send {
        let (min_index, timeout) = (opts.min_index, opts.timeout);
        let connected = opts.connected;
        async move {
            let read = accepting(connected, || {
                let query = request.read.query(self.options.refresh, min_index, timeout);
                self.upstream.list(&request.prefix, query)
            })
            .await?;
            let index = read.index;
            Ok(FetchResult::new(Arc::new(read), index))
        }
    }

    fn value_eq(&self, a: &Self::Value, b: &Self::Value) -> bool {
        a == b
    }
}

// ===== Stats =====

/// The upstream's counters: a non-blocking (polling) type refreshed on a timer, to show that
/// path of the cache.
pub struct StatsType {
    upstream: Arc<dyn Upstream>,
    refresh_every: Duration,
}

impl StatsType {
    /// A stats type polling `upstream` every `refresh_every`.
    pub fn new(upstream: Arc<dyn Upstream>, refresh_every: Duration) -> Self {
        Self {
            upstream,
            refresh_every,
        }
    }
}

/// A read of the upstream's counters (there is one entry).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsRequest;

impl CacheRequest for StatsRequest {
    fn cache_info(&self) -> RequestInfo<'_> {
        RequestInfo::new("upstream-stats")
    }
}

impl CacheType for StatsType {
    type Request = StatsRequest;
    type Value = Arc<UpstreamStats>;
    type Error = UpstreamError;

    fn register_options(&self) -> RegisterOptions {
        RegisterOptions::new()
            .refresh(true)
            .refresh_timer(self.refresh_every)
    }

    async fn fetch(
        &self,
        _opts: FetchOptions<Self::Value>,
        _request: &StatsRequest,
    ) -> Result<FetchResult<Self::Value>, UpstreamError> {
        let stats = self.upstream.stats().await?;
        let index = stats.index;
        Ok(FetchResult::new(Arc::new(stats), index))
    }

    fn value_eq(&self, a: &Self::Value, b: &Self::Value) -> bool {
        a == b
    }
}

/// A short, stable name for a cache type, for metric labels (`kv`, `kv_list`,
/// `upstream_stats`); other names pass through.
pub fn short_type_name(rust_name: &str) -> &str {
    match rust_name.rsplit("::").next().unwrap_or(rust_name) {
        "KvType" => "kv",
        "ListType" => "kv_list",
        "StatsType" => "upstream_stats",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{FaultSettings, Faults, MemoryUpstream};

    /// The fetch future lives inside the entry's fetch task for the whole blocking query (one
    /// per watched key): it holds the upstream's boxed read (with the accepted signal inside
    /// the tracker's box), not the options and the request (120 B with a task-local scope).
    #[test]
    fn a_fetch_future_is_small() {
        let upstream = MemoryUpstream::new(Faults::new(FaultSettings::default()));
        let options = BlockingOptions {
            refresh: true,
            query_timeout: Duration::from_secs(1),
        };
        let kv = KvType::new(upstream.clone(), options);
        let request = KvRequest {
            key: "k".into(),
            read: ReadOptions::watch(),
        };
        let fetch = kv.fetch(FetchOptions::new(), &request);
        assert!(
            std::mem::size_of_val(&fetch) <= 80,
            "{}",
            std::mem::size_of_val(&fetch)
        );
        let list = ListType::new(upstream, options);
        let request = ListRequest::new("p/", ReadOptions::watch());
        let fetch = list.fetch(FetchOptions::new(), &request);
        assert!(
            std::mem::size_of_val(&fetch) <= 80,
            "{}",
            std::mem::size_of_val(&fetch)
        );
    }
}
