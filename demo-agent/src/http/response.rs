//! What every handler's response shares: the JSON body with a trailing newline, and the index
//! and cache headers.

use std::time::Duration;

use axum::http::header::{AGE, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// `X-Index`.
pub(crate) static X_INDEX: HeaderName = HeaderName::from_static("x-index");
/// `X-Consul-Index`.
pub(crate) static X_CONSUL_INDEX: HeaderName = HeaderName::from_static("x-consul-index");
/// `X-Cache`.
pub(crate) static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// `application/json`.
pub(crate) static APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The decimal digits of 0 to 999, each written on three places (`000001002…999`).
const DIGITS: [u8; 3000] = {
    let mut digits = [0u8; 3000];
    let mut n = 0;
    while n < 1000 {
        digits[3 * n] = b'0' + (n / 100) as u8;
        digits[3 * n + 1] = b'0' + (n / 10 % 10) as u8;
        digits[3 * n + 2] = b'0' + (n % 10) as u8;
        n += 1;
    }
    digits
};

/// [`DIGITS`] as text.
static DIGITS_TEXT: &str = match std::str::from_utf8(&DIGITS) {
    Ok(text) => text,
    Err(_) => panic!("digits are ASCII"),
};

/// A header value holding `n` in decimal; below 1000 without allocating.
pub(crate) fn number_value(n: u64) -> HeaderValue {
    match usize::try_from(n) {
        Ok(small) if small < 1000 => {
            let skip = if small >= 100 {
                0
            } else if small >= 10 {
                1
            } else {
                2
            };
            let at = 3 * small;
            match DIGITS_TEXT.get(at + skip..at + 3) {
                Some(text) => HeaderValue::from_static(text),
                None => HeaderValue::from(n),
            }
        }
        _ => HeaderValue::from(n),
    }
}

/// A JSON response body followed by a newline, so that `curl` output stays readable.
#[derive(Debug, Clone)]
pub struct JsonLine<T>(pub T);

impl<T: serde::Serialize> IntoResponse for JsonLine<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(mut body) => {
                body.push(b'\n');
                ([(CONTENT_TYPE, APPLICATION_JSON.clone())], body).into_response()
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
    let value = number_value(index.max(1));
    headers.insert(X_INDEX.clone(), value.clone());
    headers.insert(X_CONSUL_INDEX.clone(), value);
}

/// Sets `X-Cache: HIT|MISS` and, on hits, `Age` in whole seconds.
pub(crate) fn set_cache_headers(headers: &mut HeaderMap, hit: bool, age: Duration) {
    headers.insert(
        X_CACHE.clone(),
        HeaderValue::from_static(if hit { "HIT" } else { "MISS" }),
    );
    if hit {
        headers.insert(AGE, number_value(age.as_secs()));
    }
}

#[cfg(test)]
mod tests {
    use super::number_value;

    #[test]
    fn number_values_are_decimal() {
        for n in [0, 1, 9, 10, 42, 99, 100, 101, 999, 1000, 123_456, u64::MAX] {
            assert_eq!(number_value(n).to_str().unwrap(), n.to_string());
        }
    }
}
