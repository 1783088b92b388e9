//! `/v1/kv`: Consul's KV HTTP API (reads cached or straight to the upstream, blocking or
//! not; listings; writes passed through to the upstream), and `/v1/agent/kv`, the agent's
//! older `{"key","value","index"}` shape for curl users.
//!
//! # Consul's KV API
//!
//! - `GET /v1/kv/<key>`: `[{"LockIndex","Key","Flags","Value" (base64, null when empty),
//!   "CreateIndex","ModifyIndex"}]`; `?recurse` (every entry under the prefix), `?keys` with
//!   `?separator=` (ignored without `?keys`, as Consul ignores it: rs-consul sends one with
//!   `?recurse`), `?raw` (the bare value); as in Consul, `?keys` wins over `?recurse` and `?raw`
//!   applies to one key only; 404 with an empty body when absent. Reads carry
//!   `X-Consul-Index`, `X-Consul-KnownLeader`, `X-Consul-LastContact`,
//!   `X-Consul-Effective-Consistency`.
//! - `PUT /v1/kv/<key>`: the body is the value (any bytes, at most 512 KiB); `?flags=`,
//!   `?cas=`; answers `true`, or `false` for a compare-and-set mismatch.
//! - `DELETE /v1/kv/<key>`: `?recurse`, `?cas=`; answers `true` or `false`.
//!
//! # Blocking reads through an outage
//!
//! A blocking read (`?index=N`) whose upstream fetch fails does not answer early: it holds,
//! trying again every [`HOLD`], until the upstream answers (then it answers as usual) or its
//! wait ends. At the end of its wait it answers the last value if `Cache-Control:
//! stale-if-error` allows its age (`200`, `X-Cache: HIT`, `Age`, `Warning: 110 - "Response is
//! Stale"`), else `503` with `Retry-After`. A loop of blocking reads therefore makes about one
//! request per wait during an outage.
//!
//! # Read your writes
//!
//! A write through the agent that succeeded is remembered (key or prefix, and its index) until
//! a cached read has seen it: the next `?cached` read of that key (or of a prefix over it)
//! asks the cache for an index at or above the write's, and the write wakes every fetch chain
//! that was backing off (`retry_now`), so watches see it at once too.

use std::sync::Arc;
use std::time::Duration;

use super::consul::{self, ConsulQuery, DirEntry};
use super::response::JsonLine;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cache_core::{CacheType, GetError, GetOutcome, TypedCache};
use serde_json::json;

use super::error::ApiError;
use super::params::{self, CacheControl, Params};
use super::response::{APPLICATION_JSON, set_cache_headers, set_index_headers};
use super::state::AgentState;
use crate::config::KvCacheMode;
use crate::types::{KvRequest, ListRequest, ReadOptions};
use crate::upstream::{Entry, KeyRead, ListRead, RESERVED_PREFIX, ReadMode, UpstreamError};

/// How long a long-poll cut short by shutdown may take to read the data as it is.
const ANSWER_NOW_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a blocking read whose fetch failed waits before it tries again.
pub(crate) const HOLD: Duration = Duration::from_secs(1);

/// The longest a cached read waits for the agent's own write to reach the cache.
const READ_YOUR_WRITE_WAIT: Duration = Duration::from_secs(10);

/// The parameters `GET /v1/kv` takes (besides `dc`, `ns`, `partition`, `token`, `pretty`).
const GET_PARAMS: &[&str] = &[
    "recurse",
    "keys",
    "separator",
    "seperator",
    "raw",
    "cached",
    "stale",
    "consistent",
    "index",
    "wait",
];
/// The parameters `PUT /v1/kv` takes.
const PUT_PARAMS: &[&str] = &["flags", "cas"];
/// The parameters `DELETE /v1/kv` takes.
const DELETE_PARAMS: &[&str] = &["recurse", "cas"];

// ===== Consul handlers =====

/// `GET /v1/kv/{key}`.
pub(super) async fn consul_get(
    State(state): State<AgentState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    consul_read(&state, path_key(path)?, query.as_deref(), &headers).await
}

/// `GET /v1/kv` and `GET /v1/kv/`: the root (with `?recurse` or `?keys`).
pub(super) async fn consul_get_root(
    State(state): State<AgentState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    consul_read(&state, String::new(), query.as_deref(), &headers).await
}

/// `PUT /v1/kv/{key}`.
pub(super) async fn consul_put(
    State(state): State<AgentState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = path_key(path)?;
    let query = ConsulQuery::parse(query.as_deref(), PUT_PARAMS)?;
    check_key(&key)?;
    let flags = query.params().u64("flags")?.unwrap_or(0);
    let cas = query.params().u64("cas")?;
    let value = body_bytes(body)?;
    let written = state
        .inner
        .upstream
        .put(&key, value.to_vec(), flags, cas)
        .await;
    write_outcome(&state, &key, false, written, query.pretty())
}

/// `PUT /v1/kv` and `PUT /v1/kv/`: no key.
pub(super) async fn consul_put_root() -> ApiError {
    ApiError::bad_request("missing key name: use PUT /v1/kv/<key>")
}

/// `DELETE /v1/kv/{key}`.
pub(super) async fn consul_delete(
    State(state): State<AgentState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    consul_remove(&state, path_key(path)?, query.as_deref()).await
}

/// `DELETE /v1/kv` and `DELETE /v1/kv/`: only with `?recurse` (deletes every key).
pub(super) async fn consul_delete_root(
    State(state): State<AgentState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    consul_remove(&state, String::new(), query.as_deref()).await
}

async fn consul_remove(
    state: &AgentState,
    key: String,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    let query = ConsulQuery::parse(query, DELETE_PARAMS)?;
    let cas = query.params().u64("cas")?;
    let written = if query.flag("recurse") {
        if cas.is_some() {
            return Err(ApiError::bad_request(
                "?cas cannot be combined with ?recurse: a compare-and-set deletes one key",
            ));
        }
        params::validate_prefix(&key)?;
        check_reserved(&key)?;
        state.inner.upstream.delete_prefix(&key).await
    } else {
        check_key(&key)?;
        state.inner.upstream.delete(&key, cas).await
    };
    write_outcome(state, &key, query.flag("recurse"), written, query.pretty())
}

/// A write's answer: `true`, or `false` for a compare-and-set mismatch (Consul's `200 false`).
/// The write's index goes in `X-Consul-Index` (an extension: Consul sends none on writes).
fn write_outcome(
    state: &AgentState,
    key: &str,
    prefix: bool,
    written: Result<u64, UpstreamError>,
    pretty: bool,
) -> Result<Response, ApiError> {
    let (ok, index) = match written {
        Ok(index) => {
            state.inner.writes.record(key, prefix, index);
            // The upstream just answered: chains backing off may fetch now (and see it).
            state.inner.kv.retry_now();
            state.inner.list.retry_now();
            (true, index)
        }
        Err(UpstreamError::CasMismatch { current, .. }) => (false, current),
        Err(UpstreamError::Unsupported(what)) => {
            return Err(ApiError::bad_request(format!("not supported: {what}")));
        }
        Err(error) => return Ok(unavailable(error.into()).into_response()),
    };
    let mut response = json_response(&ok, pretty);
    response
        .headers_mut()
        .insert("x-consul-index", HeaderValue::from(index.max(1)));
    Ok(response)
}

/// The request body, or a 413 naming the limit.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body too large: the value limit is {} bytes (512 KiB)",
                    params::MAX_VALUE_BYTES
                ),
            )
        } else {
            ApiError::new(
                rejection.status(),
                format!("cannot read the request body: {}", rejection.body_text()),
            )
        }
    })
}

/// Checks a key for a single-key operation: present, within the limit, not reserved.
fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request(
            "missing key name: use /v1/kv/<key> (or ?recurse / ?keys on a prefix)",
        ));
    }
    params::validate_key(key)?;
    check_reserved(key)
}

/// Refuses keys under the agent's reserved prefix (where the etcd upstream keeps flags).
fn check_reserved(key: &str) -> Result<(), ApiError> {
    if key.starts_with(RESERVED_PREFIX) {
        return Err(ApiError::bad_request(format!(
            "keys under {RESERVED_PREFIX:?} are reserved by the agent"
        )));
    }
    Ok(())
}

/// What a Consul GET asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape<'a> {
    /// One entry (`raw`: its bare value).
    Key { raw: bool },
    /// `?recurse`: every entry under the prefix.
    Recurse,
    /// `?keys`: the key names under the prefix, cut at `separator`.
    Keys { separator: Option<&'a str> },
}

/// A Consul KV read (`GET /v1/kv/<key>`, and the root with `?recurse` or `?keys`).
pub(super) async fn consul_read(
    state: &AgentState,
    key: String,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let query = ConsulQuery::parse(query, GET_PARAMS)?;
    let mode = query.read_mode()?;
    let separator = query.get("separator").or_else(|| query.get("seperator"));
    // As Consul's KVSEndpoint: `?keys` wins over `?recurse`, and `?raw` applies to a single
    // key only (ignored with either).
    let shape = if query.flag("keys") {
        Shape::Keys { separator }
    } else if query.flag("recurse") {
        Shape::Recurse
    } else {
        Shape::Key {
            raw: query.flag("raw"),
        }
    };
    match shape {
        Shape::Key { .. } => check_key(&key)?,
        Shape::Recurse | Shape::Keys { .. } => {
            params::validate_prefix(&key)?;
            check_reserved(&key)?;
        }
    }
    let blocking = query.params().blocking()?;
    let cache_control = CacheControl::from_headers(headers)?;
    let mut read = ReadOptions {
        cached: query.flag("cached"),
        min_index: blocking.min_index,
        wait: blocking
            .is_blocking()
            .then(|| consul::jittered_wait(blocking.wait)),
        block: blocking.is_blocking(),
        must_revalidate: cache_control.must_revalidate,
        stale_if_error: cache_control.stale_if_error,
        mode,
    };
    let is_prefix = !matches!(shape, Shape::Key { .. });
    let written = if read.cached {
        state.inner.writes.floor(&key, is_prefix)
    } else {
        0
    };
    if written > 0 && read.min_index < written - 1 {
        // Read your writes: the cache must hold this agent's last write (index >= it).
        read.min_index = written - 1;
        read.wait = Some(read.wait.unwrap_or(READ_YOUR_WRITE_WAIT));
    }
    let cached = read.cached;
    let effective = if cached { ReadMode::Stale } else { mode };
    let pretty = query.pretty();
    let max_age = cache_control.max_age;
    let response = if is_prefix {
        let request = ListRequest::new(key.clone(), read);
        let held = read_holding(state, &state.inner.list, request, max_age).await;
        if written > 0 && held.outcome.error.is_none() && held.outcome.index >= written {
            state.inner.writes.seen(&key, true, held.outcome.index);
        }
        held.respond(cached, |list, index| {
            // A cached read reports the entry's index; a pass-through read its own.
            let index = if cached { index } else { list.index.max(1) };
            let mut response = match shape {
                Shape::Keys { separator } => {
                    let keys = consul::list_keys(&list.entries, &key, separator);
                    if keys.is_empty() && !key.is_empty() {
                        not_found()
                    } else {
                        json_response(&keys, pretty)
                    }
                }
                _ if list.entries.is_empty() => not_found(),
                _ => dir_entries_response(&list.entries, pretty),
            };
            consul::set_read_headers(response.headers_mut(), index, effective);
            response
        })
    } else {
        let raw = matches!(shape, Shape::Key { raw: true });
        // The key is needed after the read only to forget a write it has seen.
        let written_key = (written > 0).then(|| key.clone());
        let request = KvRequest { key, read };
        let held = read_holding(state, &state.inner.kv, request, max_age).await;
        if let Some(key) = written_key {
            if held.outcome.error.is_none() && held.outcome.index >= written {
                state.inner.writes.seen(&key, false, held.outcome.index);
            }
        }
        held.respond(cached, |read, index| {
            let index = if cached { index } else { read.index.max(1) };
            let mut response = match &read.entry {
                None => not_found(),
                Some(entry) if raw => raw_response(&entry.value),
                Some(entry) => dir_entries_response(std::slice::from_ref(entry), pretty),
            };
            consul::set_read_headers(response.headers_mut(), index, effective);
            response
        })
    };
    Ok(response)
}

/// A read's outcome after [`read_holding`], and whether its value was served stale.
struct Held<V> {
    outcome: ReadOutcome<V>,
    stale: bool,
}

impl<V> Held<V> {
    /// The response: `ok(value, index)` for a value, else the error (a 503 with
    /// `Retry-After`); cache headers on cached reads; the stale markers on a stale value.
    fn respond(self, cached: bool, ok: impl FnOnce(&V, u64) -> Response) -> Response {
        let Held { outcome, stale } = self;
        let mut response = match (outcome.error, &outcome.value) {
            (Some(error), _) => unavailable(error).into_response(),
            (None, None) => no_answer().into_response(),
            (None, Some(value)) => ok(value, outcome.index.max(1)),
        };
        if cached {
            set_cache_headers(response.headers_mut(), outcome.hit || stale, outcome.age);
        }
        if stale {
            response.headers_mut().insert(
                "warning",
                HeaderValue::from_static("110 - \"Response is Stale\""),
            );
        }
        response
    }
}

/// Reads through the cache like [`read_through`]; a blocking read whose fetch fails holds
/// and tries again every [`HOLD`] until the upstream answers or its wait ends, and then
/// applies `stale-if-error` itself (see the module docs).
async fn read_holding<T>(
    state: &AgentState,
    cache: &TypedCache<T>,
    mut request: T::Request,
    max_age: Option<Duration>,
) -> Held<T::Value>
where
    T: CacheType<Error = UpstreamError>,
    T::Request: ReadRequest,
{
    let read = request.read_mut();
    if !read.block {
        let started = tokio::time::Instant::now();
        let cached = read.cached;
        let outcome = read_through(state, cache, request, max_age).await;
        // A cached miss whose value predates this read: its fetch failed and stale-if-error
        // served the last value.
        let stale = cached
            && outcome.error.is_none()
            && !outcome.hit
            && outcome.value.is_some()
            && outcome.age > started.elapsed();
        return Held { outcome, stale };
    }
    let stale_if_error = read.stale_if_error.take();
    let deadline = tokio::time::Instant::now() + read.wait.unwrap_or(params::DEFAULT_WAIT);
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        request.read_mut().wait = Some(remaining.max(Duration::from_millis(1)));
        let outcome = read_through(state, cache, request.clone(), max_age).await;
        if outcome.error.is_none() {
            return Held {
                outcome,
                stale: false,
            };
        }
        let now = tokio::time::Instant::now();
        if now + HOLD >= deadline {
            tokio::time::sleep_until(deadline).await;
            return stale_or_error(outcome, stale_if_error);
        }
        tokio::select! {
            () = tokio::time::sleep(HOLD) => {}
            () = state.shutdown_started() => return stale_or_error(outcome, stale_if_error),
        }
    }
}

/// A failed read at the end of its wait: its last value when `stale-if-error` allows its
/// age, else the error.
fn stale_or_error<V>(mut outcome: ReadOutcome<V>, stale_if_error: Option<Duration>) -> Held<V> {
    let allowed = stale_if_error.is_some_and(|limit| outcome.age <= limit);
    if allowed && outcome.value.is_some() {
        outcome.error = None;
        return Held {
            outcome,
            stale: true,
        };
    }
    Held {
        outcome,
        stale: false,
    }
}

/// An upstream failure as a response: 503s carry `Retry-After`.
fn unavailable(error: ApiError) -> RetryAfter {
    RetryAfter(error)
}

/// An error response that adds `Retry-After` to a 503.
struct RetryAfter(ApiError);

impl IntoResponse for RetryAfter {
    fn into_response(self) -> Response {
        let status = self.0.status;
        let mut response = self.0.into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(HOLD.as_secs().max(1)));
        }
        response
    }
}

/// Consul's answer for an absent key or an empty listing: 404 with an empty body.
fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Body::empty()).into_response()
}

/// `?raw`: the value's bytes, with Consul's headers (a `text/plain` type a browser may not
/// sniff past, and a sandbox so that a stored page runs no script).
fn raw_response(value: &[u8]) -> Response {
    let mut response = Response::new(Body::from(value.to_vec()));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static("sandbox"),
    );
    response
}

/// How many headers a read's response carries at most (content type, four Consul headers,
/// `X-Cache`, `Age`, `Warning`).
const RESPONSE_HEADERS: usize = 8;

/// Entries in Consul's shape (`[DirEntry]`), indented for `?pretty`.
fn dir_entries_response(entries: &[Entry], pretty: bool) -> Response {
    if pretty {
        let entries: Vec<DirEntry<'_>> = entries.iter().map(DirEntry::from).collect();
        return json_response(&entries, pretty);
    }
    // About the size of the answer: fixed text, key, base64 value (4/3), indexes.
    let size: usize = entries
        .iter()
        .map(|entry| 128 + entry.key.len() + entry.value.len() / 3 * 4)
        .sum();
    let mut body = Vec::with_capacity(size + 4);
    consul::write_dir_entries(&mut body, entries);
    body.push(b'\n');
    json_body_response(body)
}

/// A JSON body, indented for `?pretty`.
fn json_response<T: serde::Serialize + ?Sized>(body: &T, pretty: bool) -> Response {
    let encoded = if pretty {
        serde_json::to_vec_pretty(body)
    } else {
        serde_json::to_vec(body)
    };
    match encoded {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            json_body_response(bytes)
        }
        Err(error) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the response: {error}"),
        )
        .into_response(),
    }
}

/// A response with an encoded JSON body.
fn json_body_response(body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    // Room for the read headers that follow, so the map is not grown again.
    headers.reserve(RESPONSE_HEADERS);
    headers.insert(CONTENT_TYPE, APPLICATION_JSON.clone());
    response
}

// ===== agent-shape handlers (/v1/agent/kv) =====

/// `GET /v1/agent/kv/{key}`.
pub(super) async fn get_key(
    State(state): State<AgentState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = path_key(path)?;
    let params = Params::parse(query.as_deref());
    if params.flag("recurse")? {
        params::validate_prefix(&key)?;
        return list(&state, key, &params, &headers).await;
    }
    params::validate_key(&key)?;
    let (read, max_age) = read_options(&params, &headers)?;
    let cached = read.cached;
    let request = KvRequest { key, read };
    let outcome = read_through(&state, &state.inner.kv, request.clone(), max_age).await;
    Ok(key_response(&request.key, outcome, cached))
}

/// `GET /v1/kv/?prefix=p` and `GET /v1/kv?prefix=p`.
pub(super) async fn list_root(
    State(state): State<AgentState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let prefix = params.get("prefix").unwrap_or("").to_owned();
    params::validate_prefix(&prefix)?;
    list(&state, prefix, &params, &headers).await
}

/// `PUT /v1/kv/{key}`: the body is the value (UTF-8 text).
pub(super) async fn put_key(
    State(state): State<AgentState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = path_key(path)?;
    params::validate_key(&key)?;
    let cas = Params::parse(query.as_deref()).u64("cas")?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "value is larger than the limit of {} bytes (512 KiB)",
                    params::MAX_VALUE_BYTES
                ),
            )
        } else {
            ApiError::new(
                rejection.status(),
                format!("cannot read the request body: {}", rejection.body_text()),
            )
        }
    })?;
    let value = String::from_utf8(body.to_vec())
        .map_err(|e| ApiError::bad_request(format!("value is not valid UTF-8: {e}")))?;
    let index = state
        .inner
        .upstream
        .put(&key, value.into_bytes(), 0, cas)
        .await?;
    Ok(write_response(index))
}

/// `DELETE /v1/kv/{key}`.
pub(super) async fn delete_key(
    State(state): State<AgentState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let key = path_key(path)?;
    params::validate_key(&key)?;
    let cas = Params::parse(query.as_deref()).u64("cas")?;
    let index = state.inner.upstream.delete(&key, cas).await?;
    Ok(write_response(index))
}

// ===== reading =====

/// A read request that carries [`ReadOptions`].
pub(crate) trait ReadRequest {
    /// The request's read options.
    fn read_mut(&mut self) -> &mut ReadOptions;
}

impl ReadRequest for KvRequest {
    fn read_mut(&mut self) -> &mut ReadOptions {
        &mut self.read
    }
}

impl ReadRequest for ListRequest {
    fn read_mut(&mut self) -> &mut ReadOptions {
        &mut self.read
    }
}

/// What a read answered, in the agent's terms.
pub(crate) struct ReadOutcome<V> {
    pub(crate) value: Option<V>,
    pub(crate) hit: bool,
    pub(crate) index: u64,
    pub(crate) age: Duration,
    pub(crate) error: Option<ApiError>,
}

impl<V> From<GetOutcome<V, UpstreamError>> for ReadOutcome<V> {
    fn from(outcome: GetOutcome<V, UpstreamError>) -> Self {
        Self {
            value: outcome.value,
            hit: outcome.meta.hit,
            index: outcome.meta.index,
            age: outcome.meta.age,
            error: outcome.error.map(get_error),
        }
    }
}

/// Maps a cache error to a response: the upstream's failure is a 503, anything else a 500.
pub(crate) fn get_error(error: GetError<UpstreamError>) -> ApiError {
    match error.fetch_error() {
        Some(upstream) => ApiError::from(upstream.clone()),
        None => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}

/// The read options of a request, and its `Cache-Control: max-age`.
fn read_options(
    params: &Params<'_>,
    headers: &HeaderMap,
) -> Result<(ReadOptions, Option<Duration>), ApiError> {
    let blocking = params.blocking()?;
    let cached = params.flag("cached")?;
    let cache_control = CacheControl::from_headers(headers)?;
    let read = ReadOptions {
        cached,
        min_index: blocking.min_index,
        wait: blocking.is_blocking().then_some(blocking.wait),
        block: blocking.is_blocking(),
        must_revalidate: cache_control.must_revalidate,
        stale_if_error: cache_control.stale_if_error,
        mode: crate::upstream::ReadMode::Default,
    };
    Ok((read, cache_control.max_age))
}

/// Reads through the cache (a pass-through fetch when `cached` is off).
///
/// `max-age` is applied here rather than handed to the cache: a stale hit is revalidated with
/// `must-revalidate`, which the cache answers at once when a blocking query on the entry is
/// open (the value is then current). Handing `max_age` to a blocking type would make the
/// revalidation join that blocking fetch and wait for the next change. In refresh mode
/// `max-age` is ignored, as Consul does for background-refresh types.
///
/// A blocking read is cut short when shutdown starts and answers with the data as it is.
pub(crate) async fn read_through<T>(
    state: &AgentState,
    cache: &TypedCache<T>,
    mut request: T::Request,
    max_age: Option<Duration>,
) -> ReadOutcome<T::Value>
where
    T: CacheType<Error = UpstreamError>,
    T::Request: ReadRequest,
{
    let blocking = request.read_mut().block;
    let mut outcome: ReadOutcome<T::Value> = if blocking {
        tokio::select! {
            outcome = cache.get_outcome(&request) => outcome.into(),
            () = state.shutdown_started() => answer_now(cache, request.clone()).await,
        }
    } else {
        cache.get_outcome(&request).await.into()
    };
    let simple = state.inner.kv_mode == KvCacheMode::Simple;
    let read = request.read_mut();
    let stale_if_error = read.stale_if_error;
    // A revalidation: a simple-mode, cached, non-blocking read that must check upstream.
    let mut revalidating = simple && read.cached && !read.block && read.must_revalidate;
    // Only a revalidation needs to know when it started (a clock read per request otherwise).
    let mut started = revalidating.then(tokio::time::Instant::now);
    if let Some(max_age) = max_age.filter(|_| simple && read.cached) {
        if outcome.error.is_none() && outcome.hit && outcome.age > max_age {
            read.must_revalidate = true;
            read.block = false;
            revalidating = true;
            started = Some(tokio::time::Instant::now());
            outcome = cache.get_outcome(&request).await.into();
        }
    }
    if revalidating
        && outcome.error.is_none()
        && !outcome.hit
        && outcome.value.is_some()
        && started.is_some_and(|started| outcome.age > started.elapsed())
    {
        // The value predates this read, so the fetch it waited for failed, yet the cache
        // answered with the old value and no error (after a failed must-revalidate fetch the
        // entry counts as current again). Apply stale-if-error here instead.
        if stale_if_error.is_none_or(|limit| outcome.age > limit) {
            outcome.error = Some(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "upstream unavailable: revalidating the cached value failed; it is {}s old \
                     (send Cache-Control: stale-if-error=<seconds> to accept it)",
                    outcome.age.as_secs()
                ),
            ));
        }
    }
    outcome
}

/// The data as it is, without blocking: how a long-poll ends at shutdown.
async fn answer_now<T>(cache: &TypedCache<T>, mut request: T::Request) -> ReadOutcome<T::Value>
where
    T: CacheType<Error = UpstreamError>,
    T::Request: ReadRequest,
{
    let read = request.read_mut();
    read.min_index = 0;
    read.wait = None;
    read.block = false;
    match tokio::time::timeout(ANSWER_NOW_TIMEOUT, cache.get_outcome(&request)).await {
        Ok(outcome) => outcome.into(),
        Err(_) => ReadOutcome {
            value: None,
            hit: false,
            index: 0,
            age: Duration::ZERO,
            error: Some(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is shutting down",
            )),
        },
    }
}

async fn list(
    state: &AgentState,
    prefix: String,
    params: &Params<'_>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (read, max_age) = read_options(params, headers)?;
    let cached = read.cached;
    let request = ListRequest::new(prefix, read);
    let outcome = read_through(state, &state.inner.list, request.clone(), max_age).await;
    Ok(list_response(request.prefix(), outcome, cached))
}

// ===== responses =====

fn path_key(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(key)| key).map_err(|rejection| {
        ApiError::bad_request(format!("invalid key: {}", rejection.body_text()))
    })
}

/// Adds the cache headers (when cached) to a response or an error.
fn with_cache_headers(mut response: Response, cached: bool, hit: bool, age: Duration) -> Response {
    if cached {
        set_cache_headers(response.headers_mut(), hit, age);
    }
    response
}

fn no_answer() -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "the upstream did not answer within the wait",
    )
}

fn key_response(key: &str, outcome: ReadOutcome<Arc<KeyRead>>, cached: bool) -> Response {
    let (hit, age) = (outcome.hit, outcome.age);
    let response = match (outcome.error, outcome.value) {
        (Some(error), _) => error.into_response(),
        (None, None) => no_answer().into_response(),
        (None, Some(read)) => {
            // A cached read reports the entry's index; a pass-through read its own.
            let index = if cached { outcome.index } else { read.index }.max(1);
            match read
                .entry
                .as_ref()
                .map(|e| String::from_utf8_lossy(&e.value))
            {
                Some(value) => {
                    let mut response =
                        JsonLine(json!({ "key": key, "value": value, "index": index }))
                            .into_response();
                    set_index_headers(response.headers_mut(), index);
                    response
                }
                None => ApiError::new(StatusCode::NOT_FOUND, format!("key {key:?} not found"))
                    .with_index(index)
                    .into_response(),
            }
        }
    };
    with_cache_headers(response, cached, hit, age)
}

fn list_response(prefix: &str, outcome: ReadOutcome<Arc<ListRead>>, cached: bool) -> Response {
    let (hit, age) = (outcome.hit, outcome.age);
    let response = match (outcome.error, outcome.value) {
        (Some(error), _) => error.into_response(),
        (None, None) => no_answer().into_response(),
        (None, Some(list)) => {
            let index = if cached { outcome.index } else { list.index }.max(1);
            let mut response =
                JsonLine(json!({ "prefix": prefix, "keys": list.entries.iter().map(|e| json!({"key": e.key, "value": String::from_utf8_lossy(&e.value)})).collect::<Vec<_>>(), "index": index }))
                    .into_response();
            set_index_headers(response.headers_mut(), index);
            response
        }
    };
    with_cache_headers(response, cached, hit, age)
}

fn write_response(index: u64) -> Response {
    let mut response = JsonLine(json!({ "index": index })).into_response();
    set_index_headers(response.headers_mut(), index);
    response
}
