//! A scriptable upstream that answers blocking queries, on any runtime's timers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_listener::Event;
use futures::future::{Either, select};

use super::mock::{MockError, MockType};
use crate::cache_type::{FetchResult, RegisterOptions};
use crate::runtime::{SharedRuntime, Sleep};

struct State<V> {
    value: V,
    index: u64,
    error: Option<MockError>,
}

/// An authoritative store of one value with an index, answering blocking reads: a read with
/// `min_index` returns once the index is above it, or at its timeout with the same index.
pub struct MockServer<V> {
    rt: SharedRuntime,
    state: Mutex<State<V>>,
    changed: Event,
    reads: AtomicUsize,
}

impl<V: Clone + Send + Sync + 'static> MockServer<V> {
    /// A server holding `value` at `index`.
    pub fn new(rt: SharedRuntime, value: V, index: u64) -> Arc<Self> {
        Arc::new(Self {
            rt,
            state: Mutex::new(State {
                value,
                index,
                error: None,
            }),
            changed: Event::new(),
            reads: AtomicUsize::new(0),
        })
    }

    /// Writes a new value at `index`, waking blocked reads.
    pub fn set(&self, value: V, index: u64) {
        {
            let mut st = self.state.lock().unwrap();
            st.value = value;
            st.index = index;
        }
        self.changed.notify(usize::MAX);
    }

    /// Writes `value` at `index` after `delay`, from a task on the server's runtime.
    pub fn set_after(self: &Arc<Self>, delay: Duration, value: V, index: u64) {
        let server = self.clone();
        self.rt.spawn(Box::pin(async move {
            Sleep::after(&*server.rt, delay).await;
            server.set(value, index);
        }));
    }

    /// Makes every read fail with `error` (or succeed again with `None`), waking blocked reads.
    pub fn set_error(&self, error: Option<MockError>) {
        self.state.lock().unwrap().error = error;
        self.changed.notify(usize::MAX);
    }

    /// Reads served so far.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// The current index.
    pub fn index(&self) -> u64 {
        self.state.lock().unwrap().index
    }

    /// A blocking read.
    ///
    /// # Errors
    ///
    /// The injected error, if any.
    pub async fn read(
        &self,
        min_index: u64,
        timeout: Duration,
    ) -> Result<FetchResult<V>, MockError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let deadline = self.rt.now() + timeout;
        let mut sleep: Option<Sleep> = None;
        loop {
            let listener = self.changed.listen();
            {
                let st = self.state.lock().unwrap();
                if let Some(error) = &st.error {
                    return Err(error.clone());
                }
                if st.index != min_index || timeout.is_zero() || self.rt.now() >= deadline {
                    return Ok(FetchResult::new(st.value.clone(), st.index));
                }
            }
            let timer = sleep.get_or_insert_with(|| Sleep::until(&*self.rt, deadline));
            if let Either::Right(_) = select(listener, timer).await {
                let st = self.state.lock().unwrap();
                if let Some(error) = &st.error {
                    return Err(error.clone());
                }
                return Ok(FetchResult::new(st.value.clone(), st.index));
            }
        }
    }

    /// A blocking cache type (with `opts`, blocking forced on) reading from this server.
    pub fn blocking_type(self: &Arc<Self>, opts: RegisterOptions) -> MockType<V> {
        let server = self.clone();
        MockType::new(opts.supports_blocking(true), move |o, _req| {
            let server = server.clone();
            async move { server.read(o.min_index, o.timeout).await }
        })
    }

    /// A non-blocking cache type (with `opts`) reading from this server.
    pub fn polling_type(self: &Arc<Self>, opts: RegisterOptions) -> MockType<V> {
        let server = self.clone();
        MockType::new(opts.supports_blocking(false), move |_o, _req| {
            let server = server.clone();
            async move { server.read(0, Duration::ZERO).await }
        })
    }
}
