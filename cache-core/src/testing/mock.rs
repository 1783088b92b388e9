//! A scriptable cache type and request for tests.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::cache_type::{
    CacheRequest, CacheType, FetchOptions, FetchResult, RegisterOptions, RequestInfo,
};
use crate::runtime::BoxFuture;

/// A request that owns its [`RequestInfo`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockRequest {
    info: RequestInfo<'static>,
}

impl MockRequest {
    /// A request for `key` with default options.
    pub fn new(key: &str) -> Self {
        Self {
            info: RequestInfo::new(key.to_owned()),
        }
    }

    /// Sets the min index.
    pub fn min_index(mut self, index: u64) -> Self {
        self.info.min_index = index;
        self
    }

    /// Sets the get timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.info.timeout = Some(timeout);
        self
    }

    /// Sets the max age.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.info.max_age = Some(max_age);
        self
    }

    /// Sets must-revalidate.
    pub fn must_revalidate(mut self) -> Self {
        self.info.must_revalidate = true;
        self
    }

    /// Sets stale-if-error.
    pub fn stale_if_error(mut self, age: Duration) -> Self {
        self.info.stale_if_error = Some(age);
        self
    }

    /// Sets the datacenter.
    pub fn datacenter(mut self, dc: &str) -> Self {
        self.info.datacenter = Cow::Owned(dc.to_owned());
        self
    }

    /// Sets the token.
    pub fn token(mut self, token: &str) -> Self {
        self.info.token = Cow::Owned(token.to_owned());
        self
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.info.key
    }
}

impl CacheRequest for MockRequest {
    fn cache_info(&self) -> RequestInfo<'_> {
        RequestInfo {
            key: Cow::Borrowed(&self.info.key),
            datacenter: Cow::Borrowed(&self.info.datacenter),
            token: Cow::Borrowed(&self.info.token),
            ..self.info.clone_options()
        }
    }
}

impl RequestInfo<'_> {
    fn clone_options(&self) -> RequestInfo<'static> {
        RequestInfo {
            key: Cow::Borrowed(""),
            datacenter: Cow::Borrowed(""),
            token: Cow::Borrowed(""),
            min_index: self.min_index,
            timeout: self.timeout,
            max_age: self.max_age,
            must_revalidate: self.must_revalidate,
            stale_if_error: self.stale_if_error,
        }
    }
}

/// The error a [`MockType`] fetch fails with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockError {
    /// The message.
    pub message: String,
    /// Whether the type classifies it as fatal.
    pub fatal: bool,
}

impl MockError {
    /// A non-fatal error.
    pub fn new(message: &str) -> Self {
        Self {
            message: message.to_owned(),
            fatal: false,
        }
    }

    /// A fatal error (stops background refresh).
    pub fn fatal(message: &str) -> Self {
        Self {
            message: message.to_owned(),
            fatal: true,
        }
    }
}

impl fmt::Display for MockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for MockError {}

type FetchFn<V> = dyn Fn(FetchOptions<V>, MockRequest) -> BoxFuture<'static, Result<FetchResult<V>, MockError>>
    + Send
    + Sync;

/// A cache type whose fetch is a closure; counts its calls.
pub struct MockType<V> {
    opts: RegisterOptions,
    eq: Option<fn(&V, &V) -> bool>,
    fetch: Box<FetchFn<V>>,
    calls: Arc<AtomicUsize>,
}

impl<V> fmt::Debug for MockType<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockType")
            .field("opts", &self.opts)
            .field("calls", &self.calls.load(Ordering::SeqCst))
            .finish()
    }
}

impl<V: Clone + Send + Sync + 'static> MockType<V> {
    /// A type with `opts` whose fetch runs `fetch`.
    pub fn new<F, Fut>(opts: RegisterOptions, fetch: F) -> Self
    where
        F: Fn(FetchOptions<V>, MockRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<FetchResult<V>, MockError>> + Send + 'static,
    {
        Self {
            opts,
            eq: None,
            fetch: Box::new(move |o, r| Box::pin(fetch(o, r))),
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Compares values with `==` (for polling watches), which is also the default
    /// `CacheType::value_eq`; kept so that tests can say so explicitly.
    pub fn compare_values(mut self) -> Self
    where
        V: PartialEq,
    {
        self.eq = Some(|a, b| a == b);
        self
    }

    /// A counter of fetch calls that stays readable after the type is registered.
    pub fn calls(&self) -> Arc<AtomicUsize> {
        self.calls.clone()
    }
}

impl<V: Clone + PartialEq + Send + Sync + 'static> CacheType for MockType<V> {
    type Request = MockRequest;
    type Value = V;
    type Error = MockError;

    fn register_options(&self) -> RegisterOptions {
        self.opts.clone()
    }

    fn fetch(
        &self,
        opts: FetchOptions<V>,
        request: &MockRequest,
    ) -> impl Future<Output = Result<FetchResult<V>, MockError>> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        (self.fetch)(opts, request.clone())
    }

    fn is_fatal(&self, error: &MockError) -> bool {
        error.fatal
    }

    fn value_eq(&self, a: &V, b: &V) -> bool {
        match self.eq {
            Some(eq) => eq(a, b),
            None => a == b,
        }
    }
}
