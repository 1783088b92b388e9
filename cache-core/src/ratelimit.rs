//! The per-entry fetch rate limit: a pure token bucket (SPEC §3).

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
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TokenBucket {
    /// Tokens spent below a full bucket, as of `at` (so a fresh bucket needs no clock).
    spent: f64,
    at: Option<Instant>,
}

impl TokenBucket {
    /// Takes a token at `now`: `Duration::ZERO` when one was available, or how long to wait
    /// before asking again.
    pub(crate) fn acquire(&mut self, now: Instant, limit: &RateLimit) -> Duration {
        let Some(rate) = limit.per_second else {
            return Duration::ZERO;
        };
        let burst = f64::from(limit.burst.max(1));
        let refilled = self.at.map_or(0.0, |at| {
            now.saturating_duration_since(at).as_secs_f64() * rate
        });
        let spent = (self.spent - refilled).max(0.0).min(burst);
        if spent + 1.0 <= burst + 1e-9 {
            self.spent = spent + 1.0;
            self.at = Some(now);
            Duration::ZERO
        } else {
            self.spent = spent;
            self.at = Some(now);
            Duration::from_secs_f64((spent + 1.0 - burst) / rate)
        }
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
            assert_eq!(b.acquire(t, &RateLimit::UNLIMITED), Duration::ZERO);
        }
    }

    #[test]
    fn burst_then_rate() {
        let limit = RateLimit::new(2.0, 2).unwrap();
        let mut b = TokenBucket::default();
        let t = origin();
        assert_eq!(b.acquire(t, &limit), Duration::ZERO);
        assert_eq!(b.acquire(t, &limit), Duration::ZERO);
        let wait = b.acquire(t, &limit);
        assert_eq!(wait, Duration::from_millis(500));
        let t = t + wait;
        assert_eq!(b.acquire(t, &limit), Duration::ZERO);
        assert_eq!(b.acquire(t, &limit), Duration::from_millis(500));
        // A long pause refills up to the burst only.
        let t = t + Duration::from_secs(60);
        assert_eq!(b.acquire(t, &limit), Duration::ZERO);
        assert_eq!(b.acquire(t, &limit), Duration::ZERO);
        assert!(b.acquire(t, &limit) > Duration::ZERO);
    }

    #[test]
    fn invalid_limits_are_refused() {
        assert!(RateLimit::new(0.0, 1).is_err());
        assert!(RateLimit::new(f64::NAN, 1).is_err());
        assert!(RateLimit::new(1.0, 0).is_err());
    }
}
