//! The HTTP API (JSON, modelled on Consul's agent): routes, shared response headers, and the
//! layers around every handler.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/kv/{key}` | Consul's KV read: `?recurse`, `?keys&separator=`, `?raw`, `?cached`, `?index=&wait=`, `?stale`/`?consistent` (see `kv`) |
//! | `PUT /v1/kv/{key}` | Consul's KV write: the body is the value; `?flags=N`, `?cas=N`; `true`/`false` |
//! | `DELETE /v1/kv/{key}` | Consul's KV delete: `?recurse`, `?cas=N`; `true`/`false` |
//! | `GET /v1/status/leader`, `/v1/status/peers`, `/v1/agent/self` | the probes Consul clients call first |
//! | `/v1/session/*`, `/v1/txn` | 400: sessions and transactions are not implemented |
//! | a path with `//`, `/./` or `/../` | 301 to the cleaned path, as Consul's Go server mux does |
//! | `GET`/`PUT`/`DELETE /v1/agent/kv/{key}`, `GET /v1/agent/kv/?prefix=p` | the agent's own text shape `{"key","value","index"}` |
//! | `GET /v1/watch?key=a&prefix=c` | server-sent events, several watches on one stream |
//! | `GET /v1/agent/metrics` | Prometheus text |
//! | `GET /v1/agent/health` | liveness: `{"status":"ok"}` while the process serves |
//! | `GET /v1/agent/ready` | readiness: 503 once the upstream has failed for `--ready-grace` |
//! | `GET /v1/agent/upstream/stats` | upstream counters, via a polling cache type |
//! | `GET`/`PUT /v1/agent/upstream` | fault injection: `?fail=`, `?fail_rate=`, `?latency=` |
//! | `GET /v1/agent/cache` | the web view's JSON: upstream, types, history, one page of entries |
//! | `GET /ui/` | the web view (`GET /` redirects a browser there) |
//!
//! There is no compression layer (a compressing layer buffers server-sent events, tower-http
//! #420; if one is added, exclude `/v1/watch`), and the request timeout (11 min) exceeds the
//! longest wait (10 min).

mod agent_routes;
pub mod cache_view;
pub mod consul;
pub mod error;
mod history;
mod kv;
mod kv_direct;
mod layers;
pub mod params;
pub mod response;
pub mod state;
mod status;
mod ui;
mod watch;
mod writes;

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tower::{Service, ServiceBuilder};

use crate::upstream::MAX_WAIT;
use error::ApiError;
pub use response::JsonLine;
use state::AgentState;

/// The request timeout: above the longest blocking wait, so no long-poll is cut short.
pub const REQUEST_TIMEOUT: Duration = MAX_WAIT.saturating_add(Duration::from_secs(60));

/// Every route, with its handler, and the fallbacks.
fn routes(state: AgentState) -> Router {
    let mut router = Router::new()
        .route(
            "/v1/kv",
            get(kv::consul_get_root)
                .put(kv::consul_put_root)
                .delete(kv::consul_delete_root),
        )
        .route(
            "/v1/kv/",
            get(kv::consul_get_root)
                .put(kv::consul_put_root)
                .delete(kv::consul_delete_root),
        )
        .route(
            "/v1/kv/{*key}",
            get(kv::consul_get)
                .put(kv::consul_put)
                .delete(kv::consul_delete),
        )
        .route("/v1/agent/kv", get(kv::list_root))
        .route("/v1/agent/kv/", get(kv::list_root))
        .route(
            "/v1/agent/kv/{*key}",
            get(kv::get_key).put(kv::put_key).delete(kv::delete_key),
        )
        .route("/v1/status/leader", get(status::leader))
        .route("/v1/status/peers", get(status::peers))
        .route("/v1/agent/self", get(status::agent_self))
        .route("/v1/session", any(status::session))
        .route("/v1/session/{*rest}", any(status::session))
        .route("/v1/txn", any(status::txn))
        .route("/v1/watch", get(watch::watch))
        .route("/v1/agent/metrics", get(agent_routes::metrics))
        .route("/v1/agent/health", get(agent_routes::health))
        .route("/v1/agent/ready", get(agent_routes::ready))
        .route(
            "/v1/agent/upstream",
            get(agent_routes::get_faults).put(agent_routes::put_faults),
        )
        .route("/v1/agent/upstream/stats", get(agent_routes::stats))
        .route("/v1/agent/cache", get(cache_view::cache_view))
        .route("/", get(ui::root))
        .route("/ui", get(ui::ui_slash))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::app_js))
        .route("/ui/style.css", get(ui::style_css));
    if state.inner.debug_routes {
        router = router.route("/v1/agent/debug/panic", get(agent_routes::panic));
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Only handlers that read a body look at this limit; `GET /v1/kv/<key>`, served
        // beside the router, reads none.
        .layer(DefaultBodyLimit::max(params::MAX_VALUE_BYTES))
        .with_state(state)
}

/// The agent's router with every route and layer, ready to serve (or to nest in another
/// router). [`service`] is the same without the router's own layer on top: what the agent
/// serves.
pub fn app(state: AgentState) -> Router {
    Router::new().fallback_service(service(state))
}

/// The agent's HTTP service: every route of [`app`] and its layers, for `axum::serve` (through
/// `axum::ServiceExt::into_make_service`) or any tower server.
pub fn service(state: AgentState) -> AgentService {
    let router = routes(state.clone());
    // The layers wrap the routes once. (`Router::layer` wraps every route on its own: each
    // layer a boxed service that is cloned, with everything inside it, on every request.)
    // Outermost first.
    let stack = ServiceBuilder::new()
        // 5xx answers are logged with method, path and cause (including timeouts and panics).
        .layer(layers::LogServerErrorsLayer)
        .layer(layers::DebugTraceLayer)
        .layer(layers::RequestTimeoutLayer::new(REQUEST_TIMEOUT))
        .layer(layers::CatchPanicLayer::new(panic_response))
        .service(kv_direct::KvReadShortcut::new(state, router));
    AgentService { stack }
}

/// The layers of [`service`], outermost first, around the routes.
type Stack = layers::LogServerErrors<
    layers::DebugTrace<layers::RequestTimeout<layers::CatchPanic<kv_direct::KvReadShortcut>>>,
>;

/// The agent's HTTP service (see [`service`]); cheap to clone.
#[derive(Clone)]
pub struct AgentService {
    stack: Stack,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService").finish_non_exhaustive()
    }
}

impl Service<Request> for AgentService {
    type Response = Response;
    type Error = Infallible;
    type Future = AgentFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        AgentFuture {
            inner: self.stack.call(request),
        }
    }
}

/// The answer of [`AgentService`] to one request, on its way.
pub struct AgentFuture {
    inner: <Stack as Service<Request>>::Future,
}

impl std::fmt::Debug for AgentFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentFuture").finish_non_exhaustive()
    }
}

impl Future for AgentFuture {
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    tracing::error!(%message, "a handler panicked; the agent keeps serving");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("internal error: a handler panicked: {message}"),
    )
    .into_response()
}
