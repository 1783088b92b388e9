//! The authoritative store the agent caches: the [`Upstream`] trait, the embedded
//! implementation [`MemoryUpstream`], and [`EtcdUpstream`] for a real etcd cluster.
//!
//! The agent reads the upstream only through its cache types (see [`crate::types`]), the
//! path a real server would take; writes go straight through.
//!
//! Index rules every implementation follows (the embedded store's; [`EtcdUpstream`] uses etcd
//! revisions and differs where its docs say: an absent key's index is the revision it was
//! seen absent at, and a prefix's index is the revision of the read):
//! - An index is never 0: an upstream that has seen no write answers 1.
//! - A key's index is the index of its last write (put or delete). A key that was never
//!   written answers the upstream's first index, 1. So a client that read "absent at N" can
//!   block with `min_index = N` until the key appears.
//! - A prefix's index is the largest index of any write under it (or 1).
//! - Blocking reads (`min_index > 0`) answer once the index is above `min_index`, or when
//!   `wait` has passed (with the unchanged data), whichever comes first.

mod etcd;
mod faults;
mod memory;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;

pub use etcd::{EtcdSettings, EtcdTraffic, EtcdUpstream};
pub use faults::{FaultSettings, Faults};
pub use memory::MemoryUpstream;

/// The longest a blocking read may wait (Consul's cap).
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// How a read blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Query {
    /// Answer once the index is above this (0 = answer at once).
    pub min_index: u64,
    /// The longest to wait for that; zero answers at once. Capped at [`MAX_WAIT`].
    pub wait: Duration,
}

impl Query {
    /// A read that answers at once.
    pub const fn now() -> Self {
        Self {
            min_index: 0,
            wait: Duration::ZERO,
        }
    }

    /// A read that blocks until the index passes `min_index`, for at most `wait`.
    pub const fn blocking(min_index: u64, wait: Duration) -> Self {
        Self { min_index, wait }
    }
}

/// One key as read: its value (none if absent) and its index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRead {
    /// The value, or `None` when the key does not exist.
    pub value: Option<String>,
    /// The key's index (see the module docs); never 0.
    pub index: u64,
}

/// A key and its value, as listed under a prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyValue {
    /// The full key.
    pub key: String,
    /// Its value.
    pub value: String,
}

/// The keys under a prefix, sorted by key, and the prefix's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListRead {
    /// The keys under the prefix, in key order.
    pub keys: Vec<KeyValue>,
    /// The prefix's index (see the module docs); never 0.
    pub index: u64,
}

/// Counters of an upstream, for the stats endpoint and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UpstreamStats {
    /// The upstream's kind, e.g. `"embedded"`.
    pub kind: &'static str,
    /// The upstream's current (largest) index.
    pub index: u64,
    /// Keys currently stored.
    pub keys: u64,
    /// Single-key reads answered at once (`min_index` 0).
    pub key_reads: u64,
    /// Single-key reads that blocked on an index.
    pub key_reads_blocking: u64,
    /// Prefix reads answered at once.
    pub list_reads: u64,
    /// Prefix reads that blocked on an index.
    pub list_reads_blocking: u64,
    /// Stats reads (the polling cache type's fetches).
    pub stats_reads: u64,
    /// Writes (puts and deletes) applied.
    pub writes: u64,
    /// Operations failed by fault injection.
    pub injected_failures: u64,
    /// Blocking reads currently open.
    pub blocking_open: u64,
}

/// The operation counters every upstream keeps, read out as an [`UpstreamStats`].
#[derive(Debug, Default)]
struct OpCounters {
    key_reads: AtomicU64,
    key_reads_blocking: AtomicU64,
    list_reads: AtomicU64,
    list_reads_blocking: AtomicU64,
    stats_reads: AtomicU64,
    writes: AtomicU64,
    injected_failures: AtomicU64,
    blocking_open: AtomicU64,
}

impl OpCounters {
    /// Lets `faults` delay or fail an operation; an injected failure is counted.
    async fn before_operation(&self, faults: &Faults) -> Result<(), UpstreamError> {
        faults.before_operation().await.map_err(|reason| {
            bump(&self.injected_failures);
            UpstreamError::Unavailable(reason)
        })
    }

    /// Counts an open blocking read for as long as the guard lives (also when the read's
    /// future is dropped).
    fn open_blocking(&self) -> OpenGuard<'_> {
        self.blocking_open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(&self.blocking_open)
    }

    /// The counters right now, with the upstream's `kind`, `index` and key count.
    fn stats(&self, kind: &'static str, index: u64, keys: u64) -> UpstreamStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UpstreamStats {
            kind,
            index,
            keys,
            key_reads: load(&self.key_reads),
            key_reads_blocking: load(&self.key_reads_blocking),
            list_reads: load(&self.list_reads),
            list_reads_blocking: load(&self.list_reads_blocking),
            stats_reads: load(&self.stats_reads),
            writes: load(&self.writes),
            injected_failures: load(&self.injected_failures),
            blocking_open: load(&self.blocking_open),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Keeps [`OpCounters::blocking_open`] counted up while it lives.
struct OpenGuard<'a>(&'a AtomicU64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why an upstream operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The upstream could not be reached or refused to answer (including injected failures).
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// A compare-and-set write found the key at another index.
    #[error("cas mismatch: key {key:?} is at index {current}, not {expected}")]
    CasMismatch {
        /// The key written.
        key: String,
        /// The index the write expected (0 = "must not exist").
        expected: u64,
        /// The key's actual index (0 when it does not exist).
        current: u64,
    },
}

/// An authoritative key-value store that answers blocking queries.
///
/// Every method returns a boxed future so that the trait stays object-safe: the agent holds
/// an `Arc<dyn Upstream>` and does not care which store is behind it.
pub trait Upstream: Send + Sync + 'static {
    /// Reads one key. With `query.min_index > 0`, blocks until the key's index is above it or
    /// `query.wait` has passed.
    fn get<'a>(
        &'a self,
        key: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<KeyRead, UpstreamError>>;

    /// Lists the keys under `prefix` (every key for an empty prefix), blocking like
    /// [`Upstream::get`] on the prefix's index.
    fn list<'a>(
        &'a self,
        prefix: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<ListRead, UpstreamError>>;

    /// Writes `value` to `key` and returns the write's index. With `cas = Some(n)`, writes
    /// only if the key's index is `n` (`Some(0)`: only if the key does not exist).
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: String,
        cas: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>>;

    /// Deletes `key` and returns the delete's index. Deleting an absent key changes nothing
    /// and returns the key's current index. `cas` as for [`Upstream::put`].
    fn delete<'a>(
        &'a self,
        key: &'a str,
        cas: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>>;

    /// The upstream's counters; answers at once.
    fn stats(&self) -> BoxFuture<'_, Result<UpstreamStats, UpstreamError>>;

    /// Ends every open blocking read (it answers with the current data, as if its wait had
    /// passed) and makes later reads answer at once; writes keep working. Used at shutdown so
    /// that no long-poll holds the agent open. Idempotent.
    fn close(&self);
}
