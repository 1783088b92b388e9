//! Errors of the cache's operations.

use std::sync::Arc;

/// Why a get (or a watch event) carries no fresh value.
///
/// Cloneable: one failed fetch is reported to every caller that waited for it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GetError<E> {
    /// The type's fetch returned an error.
    #[error("fetch failed: {0}")]
    Fetch(#[source] Arc<E>),
    /// The type's fetch panicked; the cache contained the panic and the entry stays usable.
    #[error("fetch panicked: {0}")]
    Panicked(Arc<str>),
    /// The runtime dropped the cache's fetch task before the fetch completed (a runtime shut
    /// down while the cache lives on, or a fetch task that panicked outside the fetch, such as
    /// in the value's `Clone`). The entry stays usable: the next get starts a new fetch.
    #[error("the runtime dropped the fetch task before the fetch completed")]
    Abandoned,
    /// The type was never registered with this cache.
    #[error("cache type `{0}` is not registered")]
    NotRegistered(&'static str),
    /// The cache was closed, so the get could not start a fetch (hits keep working).
    #[error("the cache is closed")]
    Closed,
    /// The handle belongs to a registration of the type that a newer one replaced.
    #[error("cache type `{0}` was registered again; this handle is stale")]
    Replaced(&'static str),
}

impl<E> Clone for GetError<E> {
    fn clone(&self) -> Self {
        match self {
            Self::Fetch(e) => Self::Fetch(e.clone()),
            Self::Panicked(m) => Self::Panicked(m.clone()),
            Self::Abandoned => Self::Abandoned,
            Self::NotRegistered(n) => Self::NotRegistered(n),
            Self::Closed => Self::Closed,
            Self::Replaced(n) => Self::Replaced(n),
        }
    }
}

impl<E> GetError<E> {
    /// The type's own error, when the fetch failed with one.
    pub fn fetch_error(&self) -> Option<&E> {
        match self {
            Self::Fetch(e) => Some(e),
            _ => None,
        }
    }
}

/// Errors of the cache's non-get operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The type was never registered with this cache.
    #[error("cache type `{0}` is not registered")]
    NotRegistered(&'static str),
    /// A prepopulate was given an empty key, which names no entry.
    #[error("an empty key names no cache entry")]
    EmptyKey,
    /// A rate-limit setting is out of range.
    #[error("invalid rate limit: {0}")]
    InvalidRateLimit(&'static str),
}

/// Why a watch could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The type was never registered with this cache.
    #[error("cache type `{0}` is not registered")]
    NotRegistered(&'static str),
    /// A request with an empty key is not cached, so it cannot be watched.
    #[error("an empty key cannot be watched: it is not cached")]
    EmptyKey,
    /// Watching a non-blocking type polls, and the poll interval comes from `max_age`.
    #[error("watching non-blocking type `{0}` polls every max_age: set RequestInfo::max_age")]
    MaxAgeRequired(&'static str),
    /// The cache was closed.
    #[error("the cache is closed")]
    Closed,
    /// The handle belongs to a registration of the type that a newer one replaced.
    #[error("cache type `{0}` was registered again; this handle is stale")]
    Replaced(&'static str),
}
