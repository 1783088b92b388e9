//! What every handler's response shares: the JSON body with a trailing newline, and the index
//! and cache headers.

use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// A JSON response body followed by a newline, so that `curl` output stays readable.
#[derive(Debug, Clone)]
pub struct JsonLine<T>(pub T);

impl<T: serde::Serialize> IntoResponse for JsonLine<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(mut body) => {
                body.push(b'\n');
                ([(CONTENT_TYPE, "application/json")], body).into_response()
            }
            Err(error) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the response: {error}"),
            )
                .into_response(),
        }
    }
}

/// Sets `X-Index` and `X-Consul-Index` (never 0).
pub(crate) fn set_index_headers(headers: &mut HeaderMap, index: u64) {
    let value = HeaderValue::from(index.max(1));
    headers.insert("x-index", value.clone());
    headers.insert("x-consul-index", value);
}

/// Sets `X-Cache: HIT|MISS` and, on hits, `Age` in whole seconds.
pub(crate) fn set_cache_headers(headers: &mut HeaderMap, hit: bool, age: Duration) {
    headers.insert(
        "x-cache",
        HeaderValue::from_static(if hit { "HIT" } else { "MISS" }),
    );
    if hit {
        headers.insert("age", HeaderValue::from(age.as_secs()));
    }
}
