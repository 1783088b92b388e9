//! The per-entry fetch rate limit: a pure token bucket (contract: Options 3).

use std::time::{Duration, Instant};

use crate::error::CacheError;

/// Cache-wide fetch rate limit applied to each entry separately.
///
/// The default is the reference's: unlimited rate, burst 2.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RateLimit {
    /// Fetches per second per entry; `None` means unlimited.
    pub per_second: Option<f64>,
    /// The bucket size: fetches that may run back to back.
    pub burst: u32,
}

impl RateLimit {
    /// No limit (burst 2, as the reference).
    pub const UNLIMITED: Self = Self {
        per_second: None,
        burst: 2,
    };

    /// At most `per_second` fetches per second per entry, with bursts of `burst`.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidRateLimit`] when the rate is not a positive finite number or the
    /// burst is zero.
    pub fn new(per_second: f64, burst: u32) -> Result<Self, CacheError> {
        if !per_second.is_finite() || per_second <= 0.0 {
            return Err(CacheError::InvalidRateLimit(
                "rate must be a positive, finite number of fetches per second",
            ));
        }
        if burst == 0 {
            return Err(CacheError::InvalidRateLimit("burst must be at least 1"));
        }
        Ok(Self {
            per_second: Some(per_second),
            burst,
        })
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::UNLIMITED
    }
}

/// One entry's bucket. Starts full.
///
/// A fetch that finds no token *reserves* one anyway (the bucket goes into debt) and waits
/// until the debt is paid; it does not ask again from scratch when it wakes. So a timer that
/// fires late costs no rate: the configured rate holds on average whatever the timer
/// granularity (the reference's limiter reserves the same way).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TokenBucket {
    /// Tokens spent below a full bucket, as of `at`; above `burst` while fetches wait for
    /// reserved tokens. A fresh bucket needs no clock.
    spent: f64,
    at: Option<Instant>,
}

impl TokenBucket {
    /// Takes a token at `now`, reserving one if none is available: returns how long the
    /// fetch must wait for it (`Duration::ZERO`: go now). A wait too long to represent is
    /// `Duration::MAX`.
    pub(crate) fn reserve(&mut self, now: Instant, limit: &RateLimit) -> Duration {
        let Some(rate) = limit.per_second else {
            return Duration::ZERO;
        };
        self.refill(now, rate);
        self.spent += 1.0;
        self.debt_wait(limit, rate)
    }

    /// How much longer a fetch that already reserved its token must wait at `now`, under
    /// `limit` (which may have been reloaded since the reservation).
    pub(crate) fn reserved_wait(&mut self, now: Instant, limit: &RateLimit) -> Duration {
        let Some(rate) = limit.per_second else {
            self.spent = 0.0;
            return Duration::ZERO;
        };
        self.refill(now, rate);
        self.debt_wait(limit, rate)
    }

    fn refill(&mut self, now: Instant, rate: f64) {
        let refilled = self.at.map_or(0.0, |at| {
            now.saturating_duration_since(at).as_secs_f64() * rate
        });
        self.spent = (self.spent - refilled).max(0.0);
        self.at = Some(now);
    }

    fn debt_wait(&self, limit: &RateLimit, rate: f64) -> Duration {
        let burst = f64::from(limit.burst.max(1));
        let debt = self.spent - burst;
        if debt <= 1e-9 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(debt / rate).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any fixed instant: the bucket only looks at differences.
    fn origin() -> Instant {
        crate::sim::SimRuntime::new(0).now()
    }

    #[test]
    fn unlimited_never_waits() {
        let mut b = TokenBucket::default();
        let t = origin();
        for _ in 0..1000 {
            assert_eq!(b.reserve(t, &RateLimit::UNLIMITED), Duration::ZERO);
        }
    }

    #[test]
    fn burst_then_rate() {
        let limit = RateLimit::new(2.0, 2).unwrap();
        let mut b = TokenBucket::default();
        let t = origin();
        assert_eq!(b.reserve(t, &limit), Duration::ZERO);
        assert_eq!(b.reserve(t, &limit), Duration::ZERO);
        let wait = b.reserve(t, &limit);
        assert_eq!(wait, Duration::from_millis(500));
        // The token is reserved: at its time, nothing more to wait.
        assert_eq!(b.reserved_wait(t + wait, &limit), Duration::ZERO);
        let t = t + wait;
        assert_eq!(b.reserve(t, &limit), Duration::from_millis(500));
        // A long pause refills up to the burst only.
        let t = t + Duration::from_secs(60);
        assert_eq!(b.reserve(t, &limit), Duration::ZERO);
        assert_eq!(b.reserve(t, &limit), Duration::ZERO);
        assert!(b.reserve(t, &limit) > Duration::ZERO);
    }

    #[test]
    fn late_wakeups_cost_no_rate() {
        // 1 000 fetches a second, each woken 0.4 ms late: over one second the bucket still
        // grants about a thousand (the lateness is credited to the next wait).
        let limit = RateLimit::new(1000.0, 2).unwrap();
        let mut b = TokenBucket::default();
        let mut t = origin();
        let end = t + Duration::from_secs(1);
        let mut granted = 0;
        while t < end {
            let wait = b.reserve(t, &limit);
            if !wait.is_zero() {
                t += wait + Duration::from_micros(400);
                assert_eq!(b.reserved_wait(t, &limit), Duration::ZERO);
            }
            granted += 1;
        }
        assert!((995..=1003).contains(&granted), "{granted}");
    }

    #[test]
    fn reloaded_limit_shortens_a_reserved_wait() {
        let slow = RateLimit::new(1e-20, 1).unwrap();
        let mut b = TokenBucket::default();
        let t = origin();
        assert_eq!(b.reserve(t, &slow), Duration::ZERO);
        // A rate this low means "practically never": saturated, never a panic.
        assert_eq!(b.reserve(t, &slow), Duration::MAX);
        let fast = RateLimit::new(10.0, 1).unwrap();
        assert_eq!(b.reserved_wait(t, &fast), Duration::from_millis(100));
        assert_eq!(b.reserved_wait(t, &RateLimit::UNLIMITED), Duration::ZERO);
    }

    #[test]
    fn unlimited_never_waits_after_reserving() {
        let mut b = TokenBucket::default();
        let t = origin();
        for _ in 0..1000 {
            assert_eq!(b.reserve(t, &RateLimit::UNLIMITED), Duration::ZERO);
        }
    }

    #[test]
    fn invalid_limits_are_refused() {
        assert!(RateLimit::new(0.0, 1).is_err());
        assert!(RateLimit::new(f64::NAN, 1).is_err());
        assert!(RateLimit::new(1.0, 0).is_err());
    }
}
