//! async-std adapter for `cache-core`: runs the cache's background work on async-std.
//!
//! **async-std is discontinued upstream** (advisory
//! [RUSTSEC-2025-0052](https://rustsec.org/advisories/RUSTSEC-2025-0052)); its maintainers
//! recommend smol. This adapter stays deliberately thin so that it is cheap to keep, but new code
//! should use the `cache-smol` crate, which offers the same [`Runtime`] over smol and the same
//! `async-io` timers.
//!
//! - [`AsyncStdRuntime`] implements [`cache_core::Runtime`]: spawn with
//!   `async_std::task::spawn` (tasks are detached), timers from `async-io` (which async-std
//!   itself uses), and the system monotonic clock.
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
//! | tokio | `cache-tokio` |
//! | smol | `cache-smol` |
//! | async-std (discontinued upstream) | `cache-async-std` (this crate), or better, move to `cache-smol` |

#![warn(missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use cache_core::{BoxFuture, CoarseClock, Runtime, Timer};

/// A [`Runtime`] backed by async-std's global executor.
///
/// async-std is discontinued upstream (RUSTSEC-2025-0052); prefer `cache-smol`'s `SmolRuntime`.
#[non_exhaustive]
#[derive(Debug, Default, Clone, Copy)]
pub struct AsyncStdRuntime;

// ===== impl AsyncStdRuntime =====

impl AsyncStdRuntime {
    /// The adapter; async-std has one global executor, so there is nothing to configure.
    pub fn new() -> Self {
        Self
    }
}

impl Runtime for AsyncStdRuntime {
    fn spawn(&self, future: BoxFuture<'static, ()>) {
        // Dropping an async-std `JoinHandle` detaches the task, as the contract asks.
        drop(async_std::task::spawn(future));
    }

    fn timer(&self, deadline: Instant) -> Pin<Box<dyn Timer>> {
        Box::pin(AsyncIoTimer(async_io::Timer::at(deadline)))
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn coarse_clock(&self) -> Option<CoarseClock> {
        // A real clock: hits may read the cheap coarse one.
        Some(CoarseClock::system())
    }
}

// ===== impl AsyncIoTimer =====

/// A [`Timer`] over `async_io::Timer`; a local newtype because of the orphan rule.
#[derive(Debug)]
struct AsyncIoTimer(async_io::Timer);

impl Timer for AsyncIoTimer {
    fn poll_elapsed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // `async_io::Timer` is `Unpin`, so no pin projection is needed.
        Pin::new(&mut self.get_mut().0).poll(cx).map(drop)
    }

    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.get_mut().0.set_at(deadline);
    }
}
