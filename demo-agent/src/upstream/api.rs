//! The contract every upstream implements: the [`Upstream`] trait, what it reads and writes
//! ([`Entry`], [`KeyRead`], [`ListRead`], [`Query`], [`ReadMode`]), its errors and counters,
//! and the shared operation counters the implementations keep. (The module docs of
//! `upstream` say which index rules every implementation follows.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;

use super::faults::Faults;

/// The longest a blocking read may wait: Consul's 10-minute cap on `?wait=` plus the largest
/// jitter Consul adds to it (a sixteenth). Implementations cap `Query::wait` at this.
pub const MAX_WAIT: Duration = Duration::from_millis(637_500);

/// The reserved key prefix under which the etcd upstream keeps each key's Consul flags (see
/// [`Upstream`], "Flags on etcd"). The agent refuses user keys under it on every upstream, so
/// that a key space moves between upstreams unchanged.
pub const RESERVED_PREFIX: &str = ".demo-agent/";

/// The companion key holding `key`'s flags on etcd: [`RESERVED_PREFIX`]`flags/<key>`.
pub fn flags_key(key: &str) -> String {
    format!("{RESERVED_PREFIX}flags/{key}")
}

/// How consistent a read must be: Consul's three read modes (`?stale`, default,
/// `?consistent`), mapped onto each upstream.
///
/// | mode | Consul | embedded store | etcd |
/// |---|---|---|---|
/// | [`ReadMode::Stale`] | any server, maybe behind | the one store (always current) | serializable range (the member's local copy, no quorum round) |
/// | [`ReadMode::Default`] | the leader, without a quorum check | the one store | linearizable range |
/// | [`ReadMode::Consistent`] | the leader, after a quorum check | the one store | linearizable range (etcd's reads already confirm leadership with a quorum) |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ReadMode {
    /// `?stale`: any member may answer from its local copy.
    Stale,
    /// No parameter: the leader's view.
    #[default]
    Default,
    /// `?consistent`: the leader's view, confirmed by a quorum.
    Consistent,
}

impl ReadMode {
    /// The value of Consul's `X-Consul-Effective-Consistency` header for this mode.
    pub fn consul_name(self) -> &'static str {
        match self {
            Self::Stale => "stale",
            Self::Default => "leader",
            Self::Consistent => "consistent",
        }
    }
}

/// How a read blocks, and how consistent it must be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Query {
    /// Answer once the index is above this (0 = answer at once).
    pub min_index: u64,
    /// The longest to wait for that; zero answers at once. Capped at [`MAX_WAIT`].
    pub wait: Duration,
    /// The read mode (see [`ReadMode`] for what each upstream must do).
    pub mode: ReadMode,
}

impl Query {
    /// A read that answers at once, in the default mode.
    pub const fn now() -> Self {
        Self {
            min_index: 0,
            wait: Duration::ZERO,
            mode: ReadMode::Default,
        }
    }

    /// A read that blocks until the index passes `min_index`, for at most `wait`, in the
    /// default mode.
    pub const fn blocking(min_index: u64, wait: Duration) -> Self {
        Self {
            min_index,
            wait,
            mode: ReadMode::Default,
        }
    }

    /// The same query in `mode`.
    #[must_use]
    pub const fn with_mode(mut self, mode: ReadMode) -> Self {
        self.mode = mode;
        self
    }
}

/// One stored key as Consul's KV API describes it (a `DirEntry`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    /// The full key.
    pub key: String,
    /// The value: any bytes, byte for byte as written (also by other clients of the store).
    pub value: Vec<u8>,
    /// The opaque 64-bit flags the writer attached (`?flags=`); 0 when none were written.
    pub flags: u64,
    /// The index at which the key was created (etcd: `create_revision`). Never 0.
    pub create_index: u64,
    /// The index of the key's last write (etcd: `mod_revision`). Never 0.
    pub modify_index: u64,
    // No lock index or session: sessions are refused, so they would always be 0 and none
    // (Consul's shape writes them so: `http::consul::DirEntry`), and every cached value
    // would carry 32 bytes for them.
}

/// One key as read: its entry (none if absent) and the read's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRead {
    /// The entry, or `None` when the key does not exist.
    pub entry: Option<Entry>,
    /// The key's index (see the module docs); never 0.
    pub index: u64,
}

/// The entries under a prefix, sorted by key, and the prefix's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRead {
    /// The entries under the prefix, in key order (byte order). Never a key under
    /// [`RESERVED_PREFIX`].
    pub entries: Vec<Entry>,
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
pub(super) struct OpCounters {
    pub(super) key_reads: AtomicU64,
    pub(super) key_reads_blocking: AtomicU64,
    pub(super) list_reads: AtomicU64,
    pub(super) list_reads_blocking: AtomicU64,
    pub(super) stats_reads: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) injected_failures: AtomicU64,
    pub(super) blocking_open: AtomicU64,
}

impl OpCounters {
    /// Lets `faults` delay or fail an operation; an injected failure is counted.
    pub(super) async fn before_operation(&self, faults: &Faults) -> Result<(), UpstreamError> {
        faults.before_operation().await.map_err(|reason| {
            bump(&self.injected_failures);
            UpstreamError::Unavailable(reason)
        })
    }

    /// Counts an open blocking read for as long as the guard lives (also when the read's
    /// future is dropped).
    pub(super) fn open_blocking(&self) -> OpenGuard<'_> {
        self.blocking_open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(&self.blocking_open)
    }

    /// The counters right now, with the upstream's `kind`, `index` and key count.
    pub(super) fn stats(&self, kind: &'static str, index: u64, keys: u64) -> UpstreamStats {
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

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Keeps [`OpCounters::blocking_open`] counted up while it lives.
pub(super) struct OpenGuard<'a>(&'a AtomicU64);

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
    /// A compare-and-set write found the key at another index. (The HTTP API answers it with
    /// Consul's `200 false`, not as an error.)
    #[error("cas mismatch: key {key:?} is at index {current}, not {expected}")]
    CasMismatch {
        /// The key written.
        key: String,
        /// The index the write expected (0 = "must not exist").
        expected: u64,
        /// The key's actual index (0 when it does not exist).
        current: u64,
    },
    /// This upstream cannot do what the request asks (named in the message); the request
    /// changed nothing. The HTTP API answers 400.
    #[error("not supported by this upstream: {0}")]
    Unsupported(String),
}

/// An authoritative key-value store that answers blocking queries, with Consul's KV data
/// model ([`Entry`]: bytes, flags, create/modify index).
///
/// Every method returns a boxed future so that the trait stays object-safe: the agent holds
/// an `Arc<dyn Upstream>` and does not care which store is behind it.
///
/// # Flags on etcd
///
/// etcd keys carry no flags. The etcd upstream stores a key's value at the key itself, byte
/// for byte (so `etcdctl get` shows what a Consul client sent, and a value written with
/// `etcdctl put` reads back as its own bytes with flags 0), and keeps non-zero flags in a
/// companion key, [`flags_key`]`(key)` = `.demo-agent/flags/<key>`, whose value is the flags
/// in decimal ASCII:
/// - a put writes the key and, in the same transaction, puts the companion (flags ≠ 0) or
///   deletes it (flags = 0), so both carry the same `mod_revision`; a compare-and-set put is
///   one transaction too (compare on the key, then both operations);
/// - a delete deletes the companion in the same transaction; a prefix delete also deletes
///   the companion prefix `.demo-agent/flags/<prefix>`;
/// - a read takes the companion at the same revision as the key (one transaction, or a range
///   at the key read's `header.revision`) and applies its flags **only if its `mod_revision`
///   equals the key's** (a key rewritten by `etcdctl put` afterwards has flags 0 again);
/// - listings never include keys under [`RESERVED_PREFIX`]; the agent refuses user keys under
///   it (400), so nothing else writes there. Watches and indexes follow the user key only.
pub trait Upstream: Send + Sync + 'static {
    /// Reads one key as `query.mode` asks. With `query.min_index > 0` and a non-zero
    /// `query.wait`, blocks until the key's index is above `min_index` or the wait has passed
    /// (then answers the unchanged data). An index lower than `min_index` (a restored or
    /// replaced store) answers at once, so that the caller resets.
    fn get<'a>(
        &'a self,
        key: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<KeyRead, UpstreamError>>;

    /// Lists the entries under `prefix` (every key for an empty prefix; a plain string
    /// prefix, `"a"` covers `"ab"`), blocking like [`Upstream::get`] on the prefix's index.
    fn list<'a>(
        &'a self,
        prefix: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<ListRead, UpstreamError>>;

    /// Writes `value` (any bytes) with `flags` to `key` and returns the write's index.
    /// A new key's `create_index` is the write's index; an existing key keeps its
    /// `create_index`; its flags become `flags` (0 clears them).
    /// With `cas = Some(n)`: writes only if the key's `modify_index` is `n`, or, for
    /// `n = 0`, only if the key does not exist; otherwise fails with
    /// [`UpstreamError::CasMismatch`] and changes nothing.
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>>;

    /// Deletes `key` and returns the delete's index. Deleting an absent key changes nothing
    /// and returns the key's current index. With `cas = Some(n)` (Consul's rule): deletes
    /// only if the key's `modify_index` is `n`; an absent key counts as deleted (success,
    /// nothing changes); a present key at another index fails with
    /// [`UpstreamError::CasMismatch`].
    fn delete<'a>(
        &'a self,
        key: &'a str,
        cas: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>>;

    /// Deletes every key under `prefix` (a plain string prefix; empty = every key) in one
    /// atomic step and returns its index (the current index when nothing matched).
    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, UpstreamError>>;

    /// The upstream's counters; answers at once.
    fn stats(&self) -> BoxFuture<'_, Result<UpstreamStats, UpstreamError>>;

    /// The upstream's own counters right now, without contacting it (for the metrics page and
    /// the web view); [`Upstream::stats`] is the same read made through the upstream.
    fn counters(&self) -> UpstreamStats;

    /// Ends every open blocking read (it answers with the current data, as if its wait had
    /// passed) and makes later reads answer at once; writes keep working. Used at shutdown so
    /// that no long-poll holds the agent open. Idempotent.
    fn close(&self);
}
