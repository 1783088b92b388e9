//! `/v1/agent/*`: health, metrics, the upstream's stats (served by a polling cache type), and
//! the fault-injection switches.

use std::time::Duration;

use super::response::JsonLine;
use axum::extract::{RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::{ApiError, ErrorCause};
use super::params::Params;
use super::response::{set_cache_headers, set_index_headers};
use super::state::AgentState;
use crate::config::parse_rate;
use crate::duration::{GoDuration, parse_duration};
use crate::types::StatsRequest;
use crate::upstream::FaultSettings;

/// The longest simulated latency accepted at run time.
const MAX_LATENCY: Duration = Duration::from_secs(60);

/// `GET /v1/agent/health`: liveness. 200 while the process serves, whatever the upstream
/// does (a restart would not bring an unreachable upstream back).
pub(super) async fn health() -> JsonLine<serde_json::Value> {
    JsonLine(json!({ "status": "ok" }))
}

/// `GET /v1/agent/ready`: readiness. 503 once the upstream has failed (no answer) for longer
/// than `--ready-grace`, 200 again as soon as it answers; the body says why either way:
/// `{"status": "ready"|"upstream unreachable", "upstream", "reachable", "last_contact",
/// "down_since", "down_for", "entries_failing", ...}` (see `ContactState::to_json`).
pub(super) async fn ready(State(state): State<AgentState>) -> Response {
    let contact = state.inner.contact.state();
    let ready = contact
        .down_for
        .is_none_or(|down| down <= state.inner.ready_grace);
    let failing: u64 = state
        .cache()
        .metrics()
        .types
        .iter()
        .map(|t| t.failing)
        .sum();
    let mut body = contact.to_json();
    if let Some(object) = body.as_object_mut() {
        object.insert(
            "status".to_owned(),
            json!(if ready {
                "ready"
            } else {
                "upstream unreachable"
            }),
        );
        object.insert("entries_failing".to_owned(), json!(failing));
        object.insert(
            "ready_grace".to_owned(),
            json!(GoDuration(state.inner.ready_grace).to_string()),
        );
    }
    if ready {
        return JsonLine(body).into_response();
    }
    // The cause, for the 5xx log line.
    let cause = format!(
        "not ready: the upstream has not answered for {}: {}",
        GoDuration(Duration::from_millis(
            contact
                .down_for
                .map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
        )),
        contact.last_error.as_deref().unwrap_or("no error recorded")
    );
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, JsonLine(body)).into_response();
    response.extensions_mut().insert(ErrorCause(cause));
    response
}

/// `GET /v1/agent/metrics`: Prometheus text.
pub(super) async fn metrics(State(state): State<AgentState>) -> Response {
    let mut response = crate::metrics::render(&state).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// `GET /v1/agent/upstream/stats`: the upstream's counters through the polling cache type
/// (refreshed in the background every `--stats-refresh`), with `X-Cache` and `Age`.
pub(super) async fn stats(State(state): State<AgentState>) -> Response {
    let outcome = state.inner.stats.get_outcome(&StatsRequest).await;
    let mut response = match (outcome.error, outcome.value) {
        (Some(error), _) => ApiError::from(error).into_response(),
        (None, None) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no stats yet").into_response()
        }
        (None, Some(stats)) => {
            let mut response = JsonLine(&*stats).into_response();
            set_index_headers(response.headers_mut(), outcome.meta.index);
            response
        }
    };
    set_cache_headers(response.headers_mut(), outcome.meta.hit, outcome.meta.age);
    response
}

fn faults_json(state: &AgentState, settings: FaultSettings) -> JsonLine<serde_json::Value> {
    let kind = if state.inner.etcd.is_some() {
        "etcd"
    } else {
        "embedded"
    };
    JsonLine(json!({
        "kind": kind,
        "latency": GoDuration(settings.latency).to_string(),
        "fail_rate": settings.fail_rate,
        "fail": settings.fail,
    }))
}

/// `GET /v1/agent/upstream`: the fault settings in force.
pub(super) async fn get_faults(State(state): State<AgentState>) -> JsonLine<serde_json::Value> {
    faults_json(&state, state.faults().get())
}

/// `PUT /v1/agent/upstream?fail=true|false&fail_rate=0.2&latency=5ms`: changes the fault
/// settings (absent parameters keep their value) and returns them.
pub(super) async fn put_faults(
    State(state): State<AgentState>,
    RawQuery(query): RawQuery,
) -> Result<JsonLine<serde_json::Value>, ApiError> {
    let params = Params::parse(query.as_deref());
    let mut settings = state.faults().get();
    if let Some(fail) = params.get("fail") {
        settings.fail = match fail {
            "true" | "1" | "" => true,
            "false" | "0" => false,
            other => {
                return Err(ApiError::bad_request(format!(
                    "invalid fail {other:?}: use true or false"
                )));
            }
        };
    }
    if let Some(rate) = params.get("fail_rate") {
        settings.fail_rate = parse_rate(rate)
            .map_err(|e| ApiError::bad_request(format!("invalid fail_rate: {e}")))?;
    }
    if let Some(latency) = params.get("latency") {
        let latency = parse_duration(latency)
            .map_err(|e| ApiError::bad_request(format!("invalid latency: {e}")))?;
        if latency > MAX_LATENCY {
            return Err(ApiError::bad_request("invalid latency: at most 1m"));
        }
        settings.latency = latency;
    }
    state.faults().set(settings);
    tracing::info!(%settings, "upstream fault settings changed");
    Ok(faults_json(&state, settings))
}

/// `GET /v1/agent/debug/panic` (with `--debug-routes`): panics, to show that the agent
/// answers 500 and keeps serving.
pub(super) async fn panic() -> &'static str {
    panic!("deliberate panic from /v1/agent/debug/panic")
}
