//! The agent's own request layers, written as plain tower services so that a request that
//! answers at once (a cached hit) pays for no allocation and no timer in them:
//!
//! - [`LogServerErrors`]: every 5xx answer is logged at warn with its method, path, status
//!   and cause (the message of the [`ApiError`](super::error::ApiError) behind it, see
//!   [`ErrorCause`]);
//! - [`DebugTrace`]: tower-http's [`Trace`] (its spans and events are all at debug), used for
//!   a request only when debug is enabled (`tracing::level_enabled!`), so that it costs
//!   nothing otherwise;
//! - [`RequestTimeout`]: a request still unanswered after its timeout gets a 503 with an empty
//!   body. The timer is armed only when the inner service does not answer on its first poll;
//! - [`CatchPanic`]: a handler that panics (while called or polled) is answered by a panic
//!   handler instead of tearing down the connection.
//!
//! They need the inner future to be `Unpin` (every service of [`super::app`] below them has
//! one), so they poll it without boxing it.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, Response, StatusCode, Uri};
use tower::{Layer, Service};
use tower_http::trace::{
    DefaultOnFailure, HttpMakeClassifier, ResponseBody, ResponseFuture, Trace, TraceLayer,
};

use super::error::ErrorCause;

/// Logs every 5xx answer of the inner service at warn (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LogServerErrorsLayer;

impl<S> Layer<S> for LogServerErrorsLayer {
    type Service = LogServerErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LogServerErrors { inner }
    }
}

/// The service of [`LogServerErrorsLayer`].
#[derive(Debug, Clone)]
pub(crate) struct LogServerErrors<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for LogServerErrors<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Unpin,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = LogServerErrorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // Cheap: a standard method is an enum, and the URI's bytes are reference counted.
        let method = request.method().clone();
        let uri = request.uri().clone();
        LogServerErrorsFuture {
            inner: self.inner.call(request),
            method,
            uri,
        }
    }
}

/// The future of [`LogServerErrors`].
#[derive(Debug)]
pub(crate) struct LogServerErrorsFuture<F> {
    inner: F,
    method: Method,
    uri: Uri,
}

impl<F, ResBody, E> Future for LogServerErrorsFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let result = ready!(Pin::new(&mut this.inner).poll(cx));
        if let Ok(response) = &result {
            let status = response.status();
            if status.is_server_error() {
                let cause = response.extensions().get::<ErrorCause>().map_or(
                    "no cause recorded (the request timed out, or a layer answered)",
                    |cause| cause.0.as_str(),
                );
                tracing::warn!(
                    method = %this.method,
                    path = %this.uri.path(),
                    status = status.as_u16(),
                    %cause,
                    "request failed"
                );
            }
        }
        Poll::Ready(result)
    }
}

/// Answers 503 (empty body) to a request the inner service has not answered within the
/// timeout (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestTimeoutLayer {
    timeout: Duration,
}

impl RequestTimeoutLayer {
    /// A layer that gives every request `timeout`.
    pub(crate) fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service of [`RequestTimeoutLayer`].
#[derive(Debug, Clone)]
pub(crate) struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequestTimeout<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Unpin,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = RequestTimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        RequestTimeoutFuture {
            inner: self.inner.call(request),
            timeout: self.timeout,
            sleep: None,
        }
    }
}

/// The future of [`RequestTimeout`]: the timer starts at the first poll that finds the
/// answer not ready (the first poll follows the call at once).
#[derive(Debug)]
pub(crate) struct RequestTimeoutFuture<F> {
    inner: F,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F, ResBody, E> Future for RequestTimeoutFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>> + Unpin,
    ResBody: Default,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(result) = Pin::new(&mut this.inner).poll(cx) {
            return Poll::Ready(result);
        }
        let timeout = this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(sleep.as_mut().poll(cx));
        let mut response = Response::new(ResBody::default());
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Poll::Ready(Ok(response))
    }
}

/// tower-http's HTTP trace layer as the agent configures it (failures at debug too).
type HttpTrace<S> = Trace<S, HttpMakeClassifier>;

/// The trace layer of [`DebugTrace`]: tower-http's [`TraceLayer::new_for_http`], whose
/// spans and events are all at debug (failures too).
fn http_trace_layer() -> TraceLayer<HttpMakeClassifier> {
    TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG))
}

/// Traces requests with tower-http's [`Trace`] while debug is enabled (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DebugTraceLayer;

impl<S: Clone> Layer<S> for DebugTraceLayer {
    type Service = DebugTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DebugTrace {
            traced: http_trace_layer().layer(inner.clone()),
            plain: inner,
        }
    }
}

/// The service of [`DebugTraceLayer`]: the same inner service, with and without the trace.
#[derive(Debug, Clone)]
pub(crate) struct DebugTrace<S> {
    plain: S,
    traced: HttpTrace<S>,
}

/// The body of a traced response.
type TracedBody = ResponseBody<
    Body,
    tower_http::classify::NeverClassifyEos<tower_http::classify::ServerErrorsFailureClass>,
>;

impl<S> Service<Request<Body>> for DebugTrace<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: std::fmt::Display + 'static,
    S::Future: Unpin,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = DebugTraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both are the same service; the trace adds no readiness of its own.
        self.plain.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if tracing::level_enabled!(tracing::Level::DEBUG) {
            DebugTraceFuture::Traced(self.traced.call(request))
        } else {
            DebugTraceFuture::Plain(self.plain.call(request))
        }
    }
}

/// The future of [`DebugTrace`].
pub(crate) enum DebugTraceFuture<F> {
    /// Through tower-http's trace.
    Traced(ResponseFuture<F, tower_http::classify::ServerErrorsAsFailures>),
    /// Straight to the inner service.
    Plain(F),
}

impl<F, E> Future for DebugTraceFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>> + Unpin,
    E: std::fmt::Display + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            Self::Traced(future) => {
                let result: Result<Response<TracedBody>, E> = ready!(Pin::new(future).poll(cx));
                Poll::Ready(result.map(|response| response.map(Body::new)))
            }
            Self::Plain(future) => Pin::new(future).poll(cx),
        }
    }
}

/// What answers a panic: the panic's payload in, a response out.
pub(crate) type PanicHandler = fn(Box<dyn Any + Send + 'static>) -> Response<Body>;

/// Answers a request whose handler panicked with its [`PanicHandler`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct CatchPanicLayer {
    handler: PanicHandler,
}

impl CatchPanicLayer {
    /// A layer that answers panics with `handler`.
    pub(crate) fn new(handler: PanicHandler) -> Self {
        Self { handler }
    }
}

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CatchPanic {
            inner,
            handler: self.handler,
        }
    }
}

/// The service of [`CatchPanicLayer`].
#[derive(Debug, Clone)]
pub(crate) struct CatchPanic<S> {
    inner: S,
    handler: PanicHandler,
}

impl<S, ReqBody> Service<Request<ReqBody>> for CatchPanic<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>>,
    S::Future: Unpin,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let handler = self.handler;
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
            Ok(future) => CatchPanicFuture::Running { future, handler },
            Err(panic) => CatchPanicFuture::Panicked(Some(handler(panic))),
        }
    }
}

/// The future of [`CatchPanic`].
pub(crate) enum CatchPanicFuture<F> {
    /// The handler's future, polled inside `catch_unwind`.
    Running {
        /// The handler's future.
        future: F,
        /// What answers if it panics.
        handler: PanicHandler,
    },
    /// The call itself panicked: the answer (taken once).
    Panicked(Option<Response<Body>>),
}

impl<F, E> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            Self::Running { future, handler } => {
                match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(future).poll(cx))) {
                    Ok(poll) => poll,
                    Err(panic) => Poll::Ready(Ok(handler(panic))),
                }
            }
            Self::Panicked(answer) => match answer.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Polled again after it answered: there is nothing left to answer.
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use std::convert::Infallible;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_times_out_with_503_and_a_fast_one_does_not() {
        let slow = tower::service_fn(|_: Request<Body>| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok::<_, Infallible>(Response::new(Body::empty()))
            })
        });
        let response = RequestTimeoutLayer::new(Duration::from_secs(1))
            .layer(slow)
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let fast = tower::service_fn(|_: Request<Body>| {
            std::future::ready(Ok::<_, Infallible>(Response::new(Body::empty())))
        });
        let response = RequestTimeoutLayer::new(Duration::from_secs(1))
            .layer(fast)
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}
