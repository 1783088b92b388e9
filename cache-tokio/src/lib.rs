//! Tokio adapter for `cache-core`: runs the cache's background work on a tokio runtime.
//!
//! - [`TokioRuntime`] implements [`cache_core::Runtime`] for both the current-thread and the
//!   multi-thread scheduler.
//! - Spawning goes through a held [`Handle`], so it works from any thread, including from `Drop`
//!   and from synchronous callbacks.
//! - Time is read from tokio's clock, so tests that pause it (`start_paused`) see virtual time.
//!
//! # Examples
//!
//! The quick start from the README (`examples/quickstart.rs`): a blocking cache type, one
//! miss, then a hit.
//!
#![doc = concat!("```\n", include_str!("../examples/quickstart.rs"), "```")]
//!
//! # Which crate do I need?
//!
//! | your application runs on | depend on |
//! |---|---|
//! | tokio | `cache-tokio` (this crate) |
//! | smol | `cache-smol` |
//! | async-std (discontinued upstream) | `cache-async-std`, or better, move to `cache-smol` |

#![warn(missing_docs)]

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use cache_core::{BoxFuture, CoarseClock, Runtime, Timer};
use tokio::runtime::Handle;

/// A [`Runtime`] backed by a tokio runtime, reached through its [`Handle`].
///
/// The tokio runtime must have its time driver enabled (`enable_time` or `enable_all`; the
/// `#[tokio::main]` and `#[tokio::test]` macros do this).
///
/// Hits read a cheap coarse clock ([`CoarseClock::system`]) unless the runtime's clock was
/// paused when the adapter was made (`#[tokio::test(start_paused = true)]`): then every read
/// follows tokio's paused clock exactly. A test that pauses the clock later should build its
/// adapter with [`TokioRuntime::with_exact_clock`].
#[derive(Debug, Clone)]
pub struct TokioRuntime {
    handle: Handle,
    exact_clock: bool,
}

// ===== impl TokioRuntime =====

impl TokioRuntime {
    /// The adapter for the tokio runtime the caller is running in.
    ///
    /// # Panics
    ///
    /// Panics if called outside the context of a tokio runtime. Use [`try_current`] to check,
    /// or [`from_handle`] to build one from a stored [`Handle`].
    ///
    /// [`try_current`]: Self::try_current
    /// [`from_handle`]: Self::from_handle
    #[track_caller]
    pub fn current() -> Self {
        Self::from_handle(Handle::current())
    }

    /// The adapter for the current tokio runtime, or `None` outside of one.
    pub fn try_current() -> Option<Self> {
        Handle::try_current().ok().map(Self::from_handle)
    }

    /// The adapter for the runtime behind `handle`; usable from threads outside that runtime.
    pub fn from_handle(handle: Handle) -> Self {
        let exact_clock = clock_is_paused(&handle);
        Self {
            handle,
            exact_clock,
        }
    }

    /// The same adapter, reading tokio's exact clock on every cache hit (for tests that pause
    /// the clock after building the cache).
    pub fn with_exact_clock(mut self) -> Self {
        self.exact_clock = true;
        self
    }

    /// The tokio handle this adapter spawns onto.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Runtime for TokioRuntime {
    fn spawn(&self, future: BoxFuture<'static, ()>) {
        // Dropping a tokio `JoinHandle` detaches the task, which is what the contract asks for.
        drop(self.handle.spawn(future));
    }

    fn timer(&self, deadline: Instant) -> Pin<Box<dyn Timer>> {
        // `Sleep` binds to the time driver of the current context when it is created; entering
        // the handle makes timers creatable from threads outside the runtime too.
        let _guard = self.handle.enter();
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
        Box::pin(TokioTimer { sleep })
    }

    fn now(&self) -> Instant {
        // tokio's clock, not `std`'s, so a paused clock is honoured.
        tokio::time::Instant::now().into_std()
    }

    fn coarse_clock(&self) -> Option<CoarseClock> {
        (!self.exact_clock).then(CoarseClock::system)
    }
}

/// Whether the clock of the runtime behind `handle` stands still (paused, as with
/// `start_paused`): real time passes, tokio's does not. A paused clock only moves when the
/// runtime is idle, never during this short spin.
fn clock_is_paused(handle: &Handle) -> bool {
    let _guard = handle.enter();
    let before = tokio::time::Instant::now();
    #[allow(clippy::disallowed_methods)] // real time, to compare tokio's clock against
    let spin = std::time::Instant::now();
    #[allow(clippy::disallowed_methods)]
    while spin.elapsed() < std::time::Duration::from_micros(20) {
        std::hint::spin_loop();
    }
    tokio::time::Instant::now() == before
}

// ===== impl TokioTimer =====

pin_project_lite::pin_project! {
    /// A [`Timer`] over `tokio::time::Sleep`; a local newtype because of the orphan rule, and
    /// pinned because `Sleep` is `!Unpin`.
    #[derive(Debug)]
    struct TokioTimer {
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl Timer for TokioTimer {
    fn poll_elapsed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        std::future::Future::poll(self.project().sleep, cx)
    }

    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.project()
            .sleep
            .reset(tokio::time::Instant::from_std(deadline));
    }
}
