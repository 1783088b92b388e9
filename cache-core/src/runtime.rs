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
    /// with a seeded one so that jitter is reproducible. The cache clamps what it gets to
    /// `[0, 1]` and reads NaN as 0.
    fn jitter(&self) -> f64 {
        fastrand::f64()
    }

    /// A cheaper, coarser clock for the cache's hit path, which reads the time on every hit
    /// (to extend the entry's TTL and report its age).
    ///
    /// `None`, the default, makes the cache call [`Runtime::now`] on every hit: right for a
    /// virtual or paused clock, where every timing rule must stay exact. Adapters of real
    /// clocks return [`CoarseClock::system`], which costs a few nanoseconds where `now` costs
    /// about twenty, and is normally a tick off at most (more right after an idle spell):
    /// invisible next to TTLs of hours and ages of seconds. A hit on an entry younger than
    /// 250 ms reads the clock precisely ([`CoarseClock::read_precise`], else [`Runtime::now`]),
    /// since there a few milliseconds show in its age.
    fn coarse_clock(&self) -> Option<CoarseClock> {
        None
    }
}

/// A monotonic clock cheap enough to read on every cache hit; see [`Runtime::coarse_clock`].
///
/// It must run at the same rate as the runtime's [`Runtime::now`] (the same real clock, read
/// with less precision); the cache aligns the two once, when it is built.
#[derive(Debug, Clone, Copy)]
pub struct CoarseClock {
    source: Source,
    resolution: Duration,
}

/// Where a [`CoarseClock`] reads: the system's clock is called directly, so the hit path
/// inlines it; any other clock through its function pointer.
#[derive(Debug, Clone, Copy)]
enum Source {
    System,
    Custom(fn() -> u64),
}

impl CoarseClock {
    /// A clock that reads `read` (nanoseconds on any fixed origin) and lags the precise time
    /// by at most `resolution`.
    pub const fn new(read: fn() -> u64, resolution: Duration) -> Self {
        Self {
            source: Source::Custom(read),
            resolution,
        }
    }

    /// The system's coarse monotonic clock: on Linux `CLOCK_MONOTONIC_COARSE` (read from the
    /// vDSO without a system call; resolution one kernel tick, typically 1–4 ms); elsewhere the
    /// precise monotonic clock.
    pub fn system() -> Self {
        system_clock::clock()
    }

    /// The current reading, in nanoseconds on the clock's origin.
    #[inline]
    pub fn read(&self) -> u64 {
        match self.source {
            Source::System => system_clock::read(),
            Source::Custom(read) => read(),
        }
    }

    /// The same clock read precisely, on the same origin, where the clock knows how (the
    /// system's: `CLOCK_MONOTONIC` on Linux); `None` for a custom clock. The cache reads it on
    /// a hit of an entry younger than 250 ms, whose age a coarse reading's lag would show.
    #[inline]
    pub fn read_precise(&self) -> Option<u64> {
        match self.source {
            Source::System => Some(system_clock::read_precise()),
            Source::Custom(_) => None,
        }
    }

    /// How far a reading may lag the precise time.
    pub fn resolution(&self) -> Duration {
        self.resolution
    }
}

#[cfg(target_os = "linux")]
mod system_clock {
    use std::time::Duration;

    use super::CoarseClock;

    #[inline]
    pub(super) fn read() -> u64 {
        read_clock(libc::CLOCK_MONOTONIC_COARSE)
    }

    /// `CLOCK_MONOTONIC`: the clock `std::time::Instant` reads, on the coarse one's origin.
    #[inline]
    pub(super) fn read_precise() -> u64 {
        read_clock(libc::CLOCK_MONOTONIC)
    }

    #[inline]
    fn read_clock(clock: libc::clockid_t) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC and
        // CLOCK_MONOTONIC_COARSE always exist on Linux ≥ 2.6.32, and the call cannot fail
        // with a valid pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        (ts.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as u64)
    }

    pub(super) fn clock() -> CoarseClock {
        let mut res = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: as above.
        let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } == 0;
        let resolution = if ok {
            Duration::new(res.tv_sec as u64, res.tv_nsec as u32)
        } else {
            Duration::from_millis(10)
        };
        CoarseClock {
            source: super::Source::System,
            resolution,
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod system_clock {
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use super::CoarseClock;

    static ORIGIN: OnceLock<Instant> = OnceLock::new();

    #[allow(clippy::disallowed_methods)] // the real clock is the point of a real-time adapter
    #[inline]
    pub(super) fn read() -> u64 {
        let origin = *ORIGIN.get_or_init(Instant::now);
        u64::try_from(Instant::now().saturating_duration_since(origin).as_nanos())
            .unwrap_or(u64::MAX)
    }

    /// Here the "coarse" clock is the precise one already.
    #[inline]
    pub(super) fn read_precise() -> u64 {
        read()
    }

    pub(super) fn clock() -> CoarseClock {
        CoarseClock {
            source: super::Source::System,
            resolution: Duration::ZERO,
        }
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
