//! The seam between the cache and an async runtime: spawn, deadline timers and the clock.
//!
//! The cache never calls a runtime directly. It holds an `Arc<dyn Runtime>` and asks it to spawn
//! background work, to arm timers and to tell the time. Adapter crates (`cache-tokio`,
//! `cache-async-std`, `cache-smol`) implement this trait in a few lines; the virtual-time
//! `sim::SimRuntime` (feature `test-util`) implements it for deterministic tests.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A boxed, `Send` future, the unit of work handed to [`Runtime::spawn`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the cache needs from an async runtime: spawn, timers, and the current time.
///
/// Implementations must be cheap to call from any thread, including from inside `Drop` and from
/// synchronous callbacks, and must never block the calling thread.
pub trait Runtime: Send + Sync + fmt::Debug + 'static {
    /// Runs `future` to completion in the background. The task is detached: nothing the cache
    /// holds can cancel it, so the future itself must watch for its own reasons to stop.
    fn spawn(&self, future: BoxFuture<'static, ()>);

    /// A timer that fires at `deadline`. Re-arm it with [`Timer::reset`] rather than allocating
    /// a new one in a loop.
    fn timer(&self, deadline: Instant) -> Pin<Box<dyn Timer>>;

    /// The current monotonic time. Adapters override it so paused or virtual clocks work.
    fn now(&self) -> Instant;

    /// A uniformly distributed number in `[0, 1)`, used for backoff jitter.
    ///
    /// The default draws from a thread-local generator; the virtual-time runtime overrides it
    /// with a seeded one so that jitter is reproducible.
    fn jitter(&self) -> f64 {
        fastrand::f64()
    }
}

/// A deadline timer created by [`Runtime::timer`].
pub trait Timer: Send + fmt::Debug {
    /// Polls the timer: `Ready` once its deadline has passed.
    fn poll_elapsed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()>;
    /// Moves the deadline, whether or not the timer has already fired.
    fn reset(self: Pin<&mut Self>, deadline: Instant);
}

/// A future that completes at a deadline; a nameable wrapper around a runtime [`Timer`].
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct Sleep {
    timer: Pin<Box<dyn Timer>>,
}

impl Sleep {
    /// A sleep that completes at `deadline`, on `runtime`'s timers.
    pub fn until(runtime: &dyn Runtime, deadline: Instant) -> Self {
        Self {
            timer: runtime.timer(deadline),
        }
    }

    /// A sleep that completes `duration` from now, by `runtime`'s clock. A duration too long
    /// to represent is cut to about a century.
    pub fn after(runtime: &dyn Runtime, duration: Duration) -> Self {
        let now = runtime.now();
        let deadline = now
            .checked_add(duration)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
            .unwrap_or(now);
        Self::until(runtime, deadline)
    }

    /// Re-arms the sleep for a new deadline without allocating.
    pub fn reset(&mut self, deadline: Instant) {
        self.timer.as_mut().reset(deadline);
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.timer.as_mut().poll_elapsed(cx)
    }
}

/// Shared runtime handle, as the cache stores it.
pub type SharedRuntime = Arc<dyn Runtime>;
