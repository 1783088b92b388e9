//! The direct route for Consul's KV read, `GET /v1/kv/<key>`: the agent's hottest request
//! (a cached read answers from memory), served without the router's work per request (route
//! lookup, URL parameters, matched path, extractors that copy the query and the headers).
//!
//! [`KvReadShortcut`] sits below the layers of [`super::app`], around the router. A `GET`
//! whose path is `/v1/kv/` followed by a non-empty key that percent-decodes to UTF-8 goes to
//! the same handler code the router would run ([`super::kv::consul_read`]), with the same
//! answer; every other request goes to the router, which also answers the malformed keys
//! (with its rejection). After the handler, the `Content-Length` of a body of known size is
//! set as the router sets it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::header::CONTENT_LENGTH;
use axum::http::{Method, Response};
use axum::response::IntoResponse;
use tower::Service;

use super::params::percent_decode_utf8;
use super::response::number_value;
use super::state::AgentState;

/// The path prefix of Consul's KV API.
const KV_PREFIX: &str = "/v1/kv/";

/// The key of a `GET /v1/kv/<key>` path as the router's `{*key}` would extract it: `None`
/// when the path is another route's, or the key is empty or not UTF-8 once decoded (the
/// router answers those).
fn direct_key(method: &Method, path: &str) -> Option<String> {
    if method != Method::GET {
        return None;
    }
    let encoded = path.strip_prefix(KV_PREFIX)?;
    if encoded.is_empty() {
        return None;
    }
    percent_decode_utf8(encoded)
}

/// Serves `GET /v1/kv/<key>` itself and hands every other request to the router (see the
/// module docs).
#[derive(Clone)]
pub(crate) struct KvReadShortcut {
    state: AgentState,
    router: Router,
}

impl KvReadShortcut {
    /// Wraps `router`, which must serve `GET /v1/kv/{*key}` with [`super::kv::consul_get`].
    pub(crate) fn new(state: AgentState, router: Router) -> Self {
        Self { state, router }
    }
}

impl Service<Request> for KvReadShortcut {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ShortcutFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        <Router as Service<Request>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if let Some(redirect) = redirect_to_clean(&request) {
            return ShortcutFuture::Direct(Box::pin(std::future::ready(redirect)));
        }
        match direct_key(request.method(), request.uri().path()) {
            Some(key) => {
                let state = self.state.clone();
                ShortcutFuture::Direct(Box::pin(async move {
                    let mut response = super::kv::consul_read(
                        &state,
                        key,
                        request.uri().query(),
                        request.headers(),
                    )
                    .await
                    .into_response();
                    set_content_length(&mut response);
                    response
                }))
            }
            None => ShortcutFuture::Router(Box::new(self.router.call(request))),
        }
    }
}

/// The clean form of a request path, as Go's `http.ServeMux` (Consul's HTTP server) computes
/// it: repeated slashes, `.` and `..` segments removed, a trailing slash kept. `None` when
/// `path` is clean already: the usual case, told by one scan for `//` and `/.`.
fn clean_path(path: &str) -> Option<String> {
    let suspect = !path.starts_with('/')
        || path
            .as_bytes()
            .windows(2)
            .any(|pair| pair == b"//" || pair == b"/.");
    if !suspect {
        return None;
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut clean = String::with_capacity(path.len());
    for segment in &segments {
        clean.push('/');
        clean.push_str(segment);
    }
    if clean.is_empty() || path.ends_with('/') {
        clean.push('/');
    }
    (clean != path).then_some(clean)
}

/// A `301 Moved Permanently` to the clean form of the request's path, query kept, for a
/// path that is not clean (Consul's server mux answers so, and clients rely on it: consul-kv
/// reads the whole store as `GET /v1/kv//?recurse`). A key with `//` in it is thus not
/// reachable, as in Consul.
fn redirect_to_clean(request: &Request) -> Option<Response<Body>> {
    if request.method() == Method::CONNECT {
        return None;
    }
    let clean = clean_path(request.uri().path())?;
    let location = match request.uri().query() {
        Some(query) => format!("{clean}?{query}"),
        None => clean,
    };
    let location = axum::http::HeaderValue::try_from(location).ok()?;
    Some(
        Response::builder()
            .status(axum::http::StatusCode::MOVED_PERMANENTLY)
            .header(axum::http::header::LOCATION, location)
            .header(CONTENT_LENGTH, 0)
            .body(Body::empty())
            .expect("a valid response"),
    )
}

/// Sets `Content-Length` from a body of known size when the response has none, as the
/// router does for the routes it serves.
fn set_content_length(response: &mut Response<Body>) {
    if response.headers().contains_key(CONTENT_LENGTH) {
        return;
    }
    if let Some(size) = response.body().size_hint().exact() {
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, number_value(size));
    }
}

/// The future of [`KvReadShortcut`]: the direct read, or the router's answer. Both are boxed:
/// the layers above hold this future inline and move it as they return it, so it is kept
/// small.
pub(crate) enum ShortcutFuture {
    /// A `GET /v1/kv/<key>`, served directly.
    Direct(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
    /// Anything else, through the router.
    Router(Box<<Router as Service<Request>>::Future>),
}

impl Future for ShortcutFuture {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            Self::Direct(future) => future.as_mut().poll(cx).map(Ok),
            Self::Router(future) => Pin::new(&mut **future).poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Go's `cleanPath` on the paths clients send: clean ones untouched (`None`), the rest
    /// as Go's mux would redirect them.
    #[test]
    fn paths_clean_as_go_cleans_them() {
        for clean in [
            "/v1/kv/a",
            "/v1/kv/a/",
            "/v1/kv/.hidden",
            "/v1/kv/a.b/c..d",
            "/",
        ] {
            assert_eq!(clean_path(clean), None, "{clean}");
        }
        for (path, want) in [
            ("/v1/kv//", "/v1/kv/"),
            ("/v1/kv/a//b", "/v1/kv/a/b"),
            ("/v1/kv/./a", "/v1/kv/a"),
            ("/v1/kv/a/.", "/v1/kv/a"),
            ("/v1/kv/a/../b/", "/v1/kv/b/"),
            ("/v1/kv/a/..", "/v1/kv"),
            ("/../..", "/"),
            ("//", "/"),
        ] {
            assert_eq!(clean_path(path).as_deref(), Some(want), "{path}");
        }
    }

    #[test]
    fn only_gets_of_a_decodable_key_go_direct() {
        let get = Method::GET;
        assert_eq!(direct_key(&get, "/v1/kv/a").as_deref(), Some("a"));
        assert_eq!(direct_key(&get, "/v1/kv/a/b/").as_deref(), Some("a/b/"));
        assert_eq!(direct_key(&get, "/v1/kv//x").as_deref(), Some("/x"));
        assert_eq!(
            direct_key(&get, "/v1/kv/caf%C3%A9%20%2F%zz%").as_deref(),
            Some("café /%zz%")
        );
        assert_eq!(direct_key(&get, "/v1/kv/"), None);
        assert_eq!(direct_key(&get, "/v1/kv"), None);
        assert_eq!(direct_key(&get, "/v1/kvx"), None);
        assert_eq!(direct_key(&get, "/v1/agent/kv/a"), None);
        assert_eq!(direct_key(&get, "/v1/kv/%FF"), None);
        assert_eq!(direct_key(&Method::HEAD, "/v1/kv/a"), None);
        assert_eq!(direct_key(&Method::PUT, "/v1/kv/a"), None);
    }
}
