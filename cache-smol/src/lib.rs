//! smol adapter for `cache-core`: runs the cache's background work on smol 2.
//!
//! This is the supported path for users of async-std, which is discontinued upstream
//! (RUSTSEC-2025-0052) in favour of smol.
//!
//! - [`SmolRuntime`] implements [`cache_core::Runtime`]: spawn onto smol's global executor
//!   (tasks are detached: a smol `Task` would cancel its future when dropped), timers from
//!   `async-io` (re-exported as `smol::Timer`), and the system monotonic clock.
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
//! | smol | `cache-smol` (this crate) |
//! | async-std (discontinued upstream) | `cache-async-std`, or better, move to `cache-smol` |

#![warn(missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use cache_core::{BoxFuture, CoarseClock, Runtime, Timer};

/// A [`Runtime`] backed by smol's global executor.
///
/// The global executor runs spawned tasks on its own threads (one by default; set
/// `SMOL_THREADS` for more), so the application need not drive it.
#[non_exhaustive]
#[derive(Debug, Default, Clone, Copy)]
pub struct SmolRuntime;

// ===== impl SmolRuntime =====

impl SmolRuntime {
    /// The adapter; smol's global executor needs no configuration.
    pub fn new() -> Self {
        Self
    }
}

impl Runtime for SmolRuntime {
    fn spawn(&self, future: BoxFuture<'static, ()>) {
        // A smol `Task` cancels its future when dropped; `detach` lets it run to completion.
        smol::spawn(future).detach();
    }

    fn timer(&self, deadline: Instant) -> Pin<Box<dyn Timer>> {
        Box::pin(SmolTimer(smol::Timer::at(deadline)))
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn coarse_clock(&self) -> Option<CoarseClock> {
        // A real clock: hits may read the cheap coarse one.
        Some(CoarseClock::system())
    }
}

// ===== impl SmolTimer =====

/// A [`Timer`] over `smol::Timer` (that is, `async_io::Timer`); a local newtype because of the
/// orphan rule.
#[derive(Debug)]
struct SmolTimer(smol::Timer);

impl Timer for SmolTimer {
    fn poll_elapsed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // `smol::Timer` is `Unpin`, so no pin projection is needed.
        Pin::new(&mut self.get_mut().0).poll(cx).map(drop)
    }

    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.get_mut().0.set_at(deadline);
    }
}
