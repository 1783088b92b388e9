//! `GET /v1/watch`: server-sent events multiplexing several watches on one stream.

use axum::extract::State;
use axum::http::StatusCode;

use super::error::ApiError;
use crate::agent::AgentState;

/// `GET /v1/watch?key=a&key=b&prefix=c`.
pub(super) async fn watch(State(_state): State<AgentState>) -> ApiError {
    ApiError::new(StatusCode::NOT_IMPLEMENTED, "not yet")
}
