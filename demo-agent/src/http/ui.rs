//! The web view: `GET /ui/` serves one page (HTML, CSS and a small vanilla script, embedded in
//! the binary at compile time: no build chain, nothing fetched from elsewhere) that polls
//! `GET /v1/agent/cache` once a second and draws the upstream, the cache types, a chart of the
//! last minutes and a paged table of entries. `GET /` sends a browser (`Accept: text/html`)
//! there; other clients keep getting JSON.

use axum::http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use super::error::ApiError;

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE_CSS: &str = include_str!("../ui/style.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // The assets change with the binary; a reload must not show an old page.
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui/`: the page.
pub(super) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/app.js`.
pub(super) async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /ui/style.css`.
pub(super) async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// `GET /ui`: to `/ui/`, so the page's relative links resolve.
pub(super) async fn ui_slash() -> Redirect {
    Redirect::permanent("/ui/")
}

/// Whether a request comes from a browser asking for a page.
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|media| {
            media
                .split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/html"))
        })
}

/// `GET /`: a browser goes to the web view; anything else gets the JSON 404 it always got,
/// naming where to look.
pub(super) async fn root(headers: HeaderMap) -> Response {
    if wants_html(&headers) {
        return Redirect::to("/ui/").into_response();
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no route for /: the API is under /v1/ (see the README's endpoint table); \
         the web view is /ui/",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_html_accept_header_is_a_browser() {
        let accept = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(ACCEPT, HeaderValue::from_static(value));
            wants_html(&headers)
        };
        assert!(accept(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ));
        assert!(accept("TEXT/HTML"));
        assert!(!accept("*/*"));
        assert!(!accept("application/json"));
        assert!(!wants_html(&HeaderMap::new()));
    }

    #[test]
    fn the_page_names_its_assets_and_they_are_embedded() {
        assert!(INDEX_HTML.contains("app.js") && INDEX_HTML.contains("style.css"));
        assert!(APP_JS.contains("/v1/agent/cache"));
        assert!(!INDEX_HTML.contains("://"), "no external resources");
    }
}
