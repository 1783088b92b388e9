//! `GET /v1/watch?key=a&key=b&prefix=c`: server-sent events multiplexing several watches on
//! one stream.
//!
//! Each watch is a `TypedCache::notify` of the KV or the list type into one channel (via
//! `map_sink` into one enum), told apart by its correlation id (`key:a`, `prefix:c`; inside
//! the agent, the watch's position in the stream's list of ids, so that the cache keeps a
//! number per watch rather than a string). Every
//! event is `event: update` with JSON data
//! `{"correlation_id": "key:a", "index": N, "value": ..., "error": null, "failing_since": null}`;
//! `error` is set only while the watched entry's last fetch failed (a success clears it), and
//! then `failing_since` (RFC 3339) says since when it has been failing. A prefix watch's
//! value is its list of `{"key", "value"}`. The stream ends when the client leaves (the watch
//! handles are dropped with it) or the agent shuts down.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use cache_core::watch::{UpdateEvent, WatchError, WatchHandle, map_sink};
use futures::StreamExt;
use serde_json::json;

use super::error::ApiError;
use super::params::{self, MAX_WATCHES_PER_STREAM, Params};
use super::state::AgentState;
use crate::types::{KvRequest, ListRequest, ReadOptions};
use crate::upstream::rfc3339;
use crate::upstream::{KeyRead, ListRead, UpstreamError};

/// The events one stream's channel buffers before a slow client slows its own watches.
const CHANNEL_CAPACITY: usize = 64;
/// How often an idle stream sends a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// One event of any watched type, on the stream's one channel; the correlation id is the
/// watch's position in the stream's ids. One box (8 bytes): the channel's buffer holds
/// [`CHANNEL_CAPACITY`] of these per stream, mostly empty.
struct WatchEvent(Box<Update>);

/// What a [`WatchEvent`] carries.
enum Update {
    Key(UpdateEvent<u32, Arc<KeyRead>, UpstreamError>),
    Prefix(UpdateEvent<u32, Arc<ListRead>, UpstreamError>),
}

/// Keeps a stream's watches alive and counts the stream; dropping it (the client left, or
/// shutdown) cancels every watch.
struct StreamGuard {
    _handles: Vec<WatchHandle>,
    /// The correlation id of each watch, by position (the id the cache knows).
    ids: Ids,
    state: AgentState,
}

/// The query parameter naming a watched key, and the kind of its correlation id (`key:name`).
const KEY: &str = "key";
/// The query parameter naming a watched prefix, and the kind of its correlation id.
const PREFIX: &str = "prefix";

/// A stream's correlation ids, by position: one string with every id end to end, and where
/// each ends (a `Vec<String>` took 24 bytes per id besides the text).
struct Ids {
    text: String,
    ends: Vec<u32>,
}

impl Ids {
    /// Room for `count` ids of `len` bytes in all.
    fn with_capacity(count: usize, len: usize) -> Self {
        Self {
            text: String::with_capacity(len),
            ends: Vec::with_capacity(count),
        }
    }

    /// The length of the id `kind:name`.
    fn len_of(kind: &str, name: &str) -> usize {
        kind.len() + 1 + name.len()
    }

    /// Adds `kind:name` as the next id; its position.
    fn push(&mut self, kind: &str, name: &str) -> u32 {
        let position = self.ends.len() as u32;
        self.text.push_str(kind);
        self.text.push(':');
        self.text.push_str(name);
        self.ends.push(self.text.len() as u32);
        position
    }

    /// The id at `position` (empty if there is none).
    fn get(&self, position: u32) -> &str {
        let position = position as usize;
        let Some(&end) = self.ends.get(position) else {
            return "";
        };
        let start = position
            .checked_sub(1)
            .map_or(0, |before| self.ends[before] as usize);
        &self.text[start..end as usize]
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.state.inner.sse_streams.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!("watch stream closed");
    }
}

/// `GET /v1/watch`.
pub(super) async fn watch(
    State(state): State<AgentState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let keys: Vec<&str> = params.all(KEY).collect();
    let prefixes: Vec<&str> = params.all(PREFIX).collect();
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

    let (tx, rx) = async_channel::bounded(CHANNEL_CAPACITY);
    let watches = keys.len() + prefixes.len();
    let mut handles = Vec::with_capacity(watches);
    let ids_len = keys.iter().map(|k| Ids::len_of(KEY, k)).sum::<usize>()
        + prefixes
            .iter()
            .map(|p| Ids::len_of(PREFIX, p))
            .sum::<usize>();
    let mut ids = Ids::with_capacity(watches, ids_len);
    for key in keys {
        let request = KvRequest {
            key: key.to_owned(),
            read: ReadOptions::watch(),
        };
        let sink = map_sink(tx.clone(), |event| WatchEvent(Box::new(Update::Key(event))));
        let id = ids.push(KEY, key);
        handles.push(
            state
                .inner
                .kv
                .notify(request, id, sink)
                .map_err(watch_error)?,
        );
    }
    for prefix in prefixes {
        let request = ListRequest::new(prefix, ReadOptions::watch());
        let sink = map_sink(tx.clone(), |event| {
            WatchEvent(Box::new(Update::Prefix(event)))
        });
        let id = ids.push(PREFIX, prefix);
        handles.push(
            state
                .inner
                .list
                .notify(request, id, sink)
                .map_err(watch_error)?,
        );
    }
    // Only the watches hold senders now: when they all end, the stream ends.
    drop(tx);

    state.inner.sse_streams.fetch_add(1, Ordering::Relaxed);
    let guard = StreamGuard {
        _handles: handles,
        ids,
        state: state.clone(),
    };
    let failing = FailingSince::default();
    let events = futures::stream::unfold(
        (rx, guard, failing),
        |(rx, guard, mut failing)| async move {
            let event = rx.recv().await.ok()?;
            let event = sse_event(event, &mut failing, &guard);
            Some((Ok::<_, Infallible>(event), (rx, guard, failing)))
        },
    )
    .take_until(state.shutdown_started());
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

fn watch_error(error: WatchError) -> ApiError {
    match error {
        WatchError::Closed => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        ),
        other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

/// Since when each of a stream's watches has been failing (its events carried an error with
/// no success since), by the watch's position.
#[derive(Default)]
struct FailingSince(HashMap<u32, SystemTime>);

impl FailingSince {
    /// The `failing_since` of an event of watch `id`: `None` for a success (which ends the
    /// failure), else when the failure started: the first error this stream saw for the
    /// watch, or the start of the upstream's outage if that is earlier (a stream opened
    /// during an outage).
    fn update(&mut self, id: u32, failed: bool, state: &AgentState) -> Option<SystemTime> {
        if !failed {
            self.0.remove(&id);
            return None;
        }
        let since = *self.0.entry(id).or_insert_with(|| {
            let now = SystemTime::now();
            state.contact().down_since.map_or(now, |down| down.min(now))
        });
        Some(since)
    }
}

fn sse_event(event: WatchEvent, failing: &mut FailingSince, stream: &StreamGuard) -> Event {
    let event = *event.0;
    let (id, failed) = match &event {
        Update::Key(e) => (e.correlation_id, e.error.is_some()),
        Update::Prefix(e) => (e.correlation_id, e.error.is_some()),
    };
    let failing_since = failing.update(id, failed, &stream.state).map(rfc3339);
    let correlation_id = stream.ids.get(id);
    let mut data = match event {
        Update::Key(e) => json!({
            "correlation_id": correlation_id,
            "index": e.meta.index.max(1),
            "value": e.result.as_ref().and_then(|read| read.entry.as_ref()).map(|entry| String::from_utf8_lossy(&entry.value)),
            "error": e.error.map(|error| error.to_string()),
        }),
        Update::Prefix(e) => json!({
            "correlation_id": correlation_id,
            "index": e.meta.index.max(1),
            "value": e.result.as_ref().map(|list| list.entries.iter().map(|entry| json!({
                "key": entry.key,
                "value": String::from_utf8_lossy(&entry.value),
            })).collect::<Vec<_>>()),
            "error": e.error.map(|error| error.to_string()),
        }),
    };
    data["failing_since"] = json!(failing_since);
    Event::default().event("update").data(data.to_string())
}

#[cfg(test)]
mod tests {
    use super::Ids;

    #[test]
    fn ids_by_position() {
        let mut ids = Ids::with_capacity(3, 20);
        assert_eq!(ids.push("key", "a/b"), 0);
        assert_eq!(ids.push("prefix", ""), 1);
        assert_eq!(ids.push("key", "é"), 2);
        assert_eq!(
            [ids.get(0), ids.get(1), ids.get(2), ids.get(3)],
            ["key:a/b", "prefix:", "key:é", ""]
        );
        assert_eq!(ids.text.capacity(), 20);
    }
}
