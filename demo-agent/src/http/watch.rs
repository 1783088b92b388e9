//! `GET /v1/watch?key=a&key=b&prefix=c`: server-sent events multiplexing several watches on
//! one stream.
//!
//! Each watch is a `TypedCache::notify` of the KV or the list type into one channel (via
//! `map_sink` into one enum), told apart by its correlation id (`key:a`, `prefix:c`). Every
//! event is `event: update` with JSON data
//! `{"correlation_id": "key:a", "index": N, "value": ..., "error": null}`; a prefix watch's
//! value is its list of `{"key", "value"}`. The stream ends when the client leaves (the watch
//! handles are dropped with it) or the agent shuts down.

use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;

use super::error::ApiError;
use super::params::{self, MAX_WATCHES_PER_STREAM, Params};
use crate::agent::AgentState;

/// The events one stream's channel buffers before a slow client slows its own watches.
const CHANNEL_CAPACITY: usize = 64;
/// How often an idle stream sends a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// `GET /v1/watch`.
pub(super) async fn watch(
    State(state): State<AgentState>,
    RawQuery(query): RawQuery,
) -> Result<(), ApiError> {
    let params = Params::parse(query.as_deref());
    let keys: Vec<&str> = params.all("key").collect();
    let prefixes: Vec<&str> = params.all("prefix").collect();
    if keys.is_empty() && prefixes.is_empty() {
        return Err(ApiError::bad_request(
            "nothing to watch: add ?key=K and/or ?prefix=P (repeatable)",
        ));
    }
    if keys.len() + prefixes.len() > MAX_WATCHES_PER_STREAM {
        return Err(ApiError::bad_request(format!(
            "{} watches asked; at most {MAX_WATCHES_PER_STREAM} per stream",
            keys.len() + prefixes.len()
        )));
    }
    for key in &keys {
        params::validate_key(key)?;
    }
    for prefix in &prefixes {
        params::validate_prefix(prefix)?;
    }

    let _ = (state, CHANNEL_CAPACITY, KEEP_ALIVE);
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "watches need cache-core's watch API (not landed yet)",
    ))
}
