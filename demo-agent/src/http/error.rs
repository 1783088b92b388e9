//! The agent's HTTP errors: every error is JSON `{"error": "..."}` with a status that says
//! whose fault it is (4xx: the request's, 5xx: the agent's or the upstream's).

use super::response::JsonLine;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use cache_core::GetError;

use crate::upstream::UpstreamError;

/// An error response: a status, a message naming the problem, and optionally the index the
/// answer is at (a 404 for a missing key still tells the client where to block from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The index of the data the answer reflects, sent as `X-Index` and `"index"`.
    pub index: Option<u64>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            index: None,
        }
    }

    /// A 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// Attaches the index of the data the answer reflects.
    pub fn with_index(mut self, index: u64) -> Self {
        self.index = Some(index);
        self
    }
}

/// A cache read's error: the upstream's failure maps as [`UpstreamError`] does (503, 409),
/// anything else (a panicked fetch, a closed cache) is a 500.
impl From<GetError<UpstreamError>> for ApiError {
    fn from(error: GetError<UpstreamError>) -> Self {
        match error.fetch_error() {
            Some(upstream) => Self::from(upstream.clone()),
            None => Self::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(error: UpstreamError) -> Self {
        match &error {
            UpstreamError::CasMismatch { current, .. } => {
                Self::new(StatusCode::CONFLICT, error.to_string()).with_index((*current).max(1))
            }
            _ => Self::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
        }
    }
}

/// The message of a 5xx [`ApiError`], kept in the response's extensions so that the log
/// layer can say why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorCause(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let cause = self
            .status
            .is_server_error()
            .then(|| ErrorCause(self.message.clone()));
        let body = match self.index {
            Some(index) => json!({ "error": self.message, "index": index }),
            None => json!({ "error": self.message }),
        };
        let mut response = (self.status, JsonLine(body)).into_response();
        if let Some(index) = self.index {
            super::response::set_index_headers(response.headers_mut(), index);
        }
        if let Some(cause) = cause {
            response.extensions_mut().insert(cause);
        }
        response
    }
}
