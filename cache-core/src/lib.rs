//! Runtime-agnostic engine of a Consul-style agent cache.
//!
//! Typed entries are kept fresh from an authoritative server by blocking (long-poll,
//! index-based) queries, with single-flight fetches, background refresh, TTL expiry, backoff
//! with jitter, and change notifications — the agent cache of HashiCorp Consul, for every
//! async runtime.
//!
//! - [`CacheType`]: what a kind of cached data implements (its fetch and options).
//! - [`Cache`] / [`TypedCache`]: get, prepopulate, close, metrics.
//! - [`Runtime`]: the seam to an async runtime; pick one by depending on `cache-tokio`,
//!   `cache-async-std` or `cache-smol`.
//! - [`backoff`]: the pure backoff state machine.
//! - `sim` (feature `test-util`): a deterministic virtual-time runtime for tests.
//!
//! # Examples
//!
//! A blocking type whose "server" is a counter; the virtual-time runtime makes the example
//! deterministic (with an adapter crate, pass its runtime instead).
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::time::Duration;
//! use cache_core::{Cache, CacheRequest, CacheType, FetchOptions, FetchResult, RegisterOptions, RequestInfo};
//! use cache_core::sim::SimRuntime;
//!
//! struct Counter(Arc<AtomicU64>);
//!
//! #[derive(Clone)]
//! struct Read { min_index: u64 }
//!
//! impl CacheRequest for Read {
//!     fn cache_info(&self) -> RequestInfo<'_> {
//!         RequestInfo::new("counter").min_index(self.min_index).timeout(Duration::from_secs(5))
//!     }
//! }
//!
//! impl CacheType for Counter {
//!     type Request = Read;
//!     type Value = u64;
//!     type Error = std::io::Error;
//!
//!     fn register_options(&self) -> RegisterOptions {
//!         RegisterOptions::new().supports_blocking(true)
//!     }
//!
//!     async fn fetch(&self, _opts: FetchOptions<u64>, _req: &Read) -> std::io::Result<FetchResult<u64>> {
//!         let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
//!         Ok(FetchResult::new(n * 10, n))
//!     }
//! }
//!
//! let sim = SimRuntime::new(1);
//! let cache = Cache::new(sim.handle());
//! let counter = cache.register(Counter(Arc::new(AtomicU64::new(0))));
//! sim.block_on(async {
//!     let first = counter.get(&Read { min_index: 0 }).await.unwrap();
//!     assert_eq!((first.value, first.meta.index), (Some(10), 1));
//!     // Blocking on index 1 waits for a newer value.
//!     let next = counter.get(&Read { min_index: 1 }).await.unwrap();
//!     assert_eq!((next.value, next.meta.index), (Some(20), 2));
//! });
//! ```
#![warn(missing_docs)]

pub mod backoff;
mod cache;
mod cache_type;
mod chain;
mod error;
mod expiry;
mod fetch;
mod get;
mod inspect;
mod metrics;
mod outcome;
mod ratelimit;
pub mod runtime;
mod shards;
mod shared;
#[cfg(feature = "test-util")]
pub mod sim;
mod store;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod watch;

pub use backoff::{Backoff, BackoffPolicy};
pub use cache::{Cache, CacheBuilder, TypedCache};
pub use cache_type::{
    CacheRequest, CacheType, Connected, FetchOptions, FetchResult, FetchState, LastResult,
    RegisterOptions, RequestInfo,
};
pub use error::{CacheError, GetError};
pub use inspect::{EntryInfo, EntryPage, EntryQuery, EntrySort, MAX_PAGE};
pub use metrics::{Metrics, TypeMetrics};
pub use outcome::{GetOutcome, Response, ResultMeta};
pub use ratelimit::RateLimit;
pub use runtime::{BoxFuture, CoarseClock, Runtime, SharedRuntime, Sleep, Timer};
pub use watch::{EventSink, UpdateEvent, WatchError, WatchHandle, WatchStream};
