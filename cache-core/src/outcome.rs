//! What a get answers: [`GetOutcome`] (value, meta and error together), [`Response`] (the
//! successful part) and [`ResultMeta`] (hit, index, age).

use std::time::Duration;

use crate::error::GetError;

/// What a get reports about the value it returns (Consul's `ResultMeta`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResultMeta {
    /// The value came from a valid entry on the first look.
    pub hit: bool,
    /// The entry's index.
    pub index: u64,
    /// Refresh types: zero while the background refresh is healthy, else the time since it
    /// first lost contact. Other types: the time since the value was fetched.
    pub age: Duration,
}

/// The full answer to a get: the value, its meta, and the error of the get's fetch attempt.
///
/// Unlike `Result`, it can carry the last good value alongside an error (Consul returns both).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GetOutcome<V, E> {
    /// The value: the fresh one, or the last good one when `error` is set (if any).
    pub value: Option<V>,
    /// Hit, index and age.
    pub meta: ResultMeta,
    /// The error of the fetch attempt this get waited for.
    pub error: Option<GetError<E>>,
}

impl<V, E> GetOutcome<V, E> {
    /// Splits the outcome into a `Result`, dropping the stale value that came with an error.
    ///
    /// # Errors
    ///
    /// The outcome's error, if it has one.
    pub fn into_result(self) -> Result<Response<V>, GetError<E>> {
        match self.error {
            Some(error) => Err(error),
            None => Ok(Response {
                value: self.value,
                meta: self.meta,
            }),
        }
    }
}

/// A successful get: the value (none only when a get timed out before any value existed, or a
/// pass-through fetch returned none) and its meta.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Response<V> {
    /// The value.
    pub value: Option<V>,
    /// Hit, index and age.
    pub meta: ResultMeta,
}

impl<V> Response<V> {
    /// The value, if any.
    pub fn into_value(self) -> Option<V> {
        self.value
    }
}
