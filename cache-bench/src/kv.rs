//! The cache type every cache-core scenario registers: string keys, `Arc<u64>` values (a hit
//! clones an `Arc`, as the baselines do), and a fetch that takes a set time and counts itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cache_core::{
    CacheRequest, CacheType, FetchOptions, FetchResult, RequestInfo, SharedRuntime, Sleep,
};

/// A request for one key; `cache_info` borrows the key, so a hit allocates nothing.
#[derive(Debug, Clone)]
pub struct Key(pub String);

impl CacheRequest for Key {
    fn cache_info(&self) -> RequestInfo<'_> {
        RequestInfo::new(self.0.as_str())
    }
}

/// The benchmark's cache type.
#[derive(Debug)]
pub struct BenchType {
    rt: SharedRuntime,
    delay: Duration,
    fetches: Arc<AtomicUsize>,
}

impl BenchType {
    /// A type whose fetch sleeps `delay` on `rt`'s timers (none for zero), then answers
    /// `Arc::new(1)`.
    pub fn new(rt: SharedRuntime, delay: Duration) -> Self {
        Self {
            rt,
            delay,
            fetches: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The fetch counter, readable after registration.
    pub fn fetches(&self) -> Arc<AtomicUsize> {
        self.fetches.clone()
    }
}

/// The type's (impossible) fetch error.
#[derive(Debug, Clone, Copy)]
pub struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl std::error::Error for Never {}

impl CacheType for BenchType {
    type Request = Key;
    type Value = Arc<u64>;
    type Error = Never;

    async fn fetch(
        &self,
        _opts: FetchOptions<Arc<u64>>,
        _request: &Key,
    ) -> Result<FetchResult<Arc<u64>>, Never> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            Sleep::after(&*self.rt, self.delay).await;
        }
        Ok(FetchResult::new(Arc::new(1), 1))
    }
}
