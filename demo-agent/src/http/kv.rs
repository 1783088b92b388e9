//! `/v1/kv`: reads (cached or straight to the upstream, blocking or not), listings, and
//! writes passed through to the upstream.

use std::sync::Arc;
use std::time::Duration;

use super::JsonLine;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cache_core::{CacheType, GetError, GetOutcome, TypedCache};
use serde_json::json;

use super::error::ApiError;
use super::params::{self, CacheControl, Params};
use super::{set_cache_headers, set_index_headers};
use crate::agent::AgentState;
use crate::config::KvCacheMode;
use crate::types::{KvRequest, ListRequest, ReadOptions};
use crate::upstream::{KeyRead, ListRead, UpstreamError};

/// How long a long-poll cut short by shutdown may take to read the data as it is.
const ANSWER_NOW_TIMEOUT: Duration = Duration::from_secs(5);

// ===== handlers =====

/// `GET /v1/kv/{key}`.
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
    let index = state.inner.upstream.put(&key, value, cas).await?;
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
    params: &Params,
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
    let mut started = tokio::time::Instant::now();
    if let Some(max_age) = max_age.filter(|_| simple && read.cached) {
        if outcome.error.is_none() && outcome.hit && outcome.age > max_age {
            read.must_revalidate = true;
            read.block = false;
            revalidating = true;
            started = tokio::time::Instant::now();
            outcome = cache.get_outcome(&request).await.into();
        }
    }
    if revalidating
        && outcome.error.is_none()
        && !outcome.hit
        && outcome.value.is_some()
        && outcome.age > started.elapsed()
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
    params: &Params,
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
            match &read.value {
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
                JsonLine(json!({ "prefix": prefix, "keys": list.keys, "index": index }))
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
