//! The pure backoff state machine (docs/contract.md#backoff): fed outcomes, it answers how long
//! to wait.
//!
//! No clock, no runtime and no random source live here: the caller supplies jitter as a number
//! in `[0, 1)`, so tests are deterministic, and the same machine drives every fetch chain:
//! background refresh and watches.

use std::time::Duration;

/// How waits grow with consecutive failures.
///
/// The default is the reference's: the first 3 consecutive failures retry immediately; failure
/// `n > 3` waits `2^(n-3)` seconds capped at 60 s, plus uniform jitter in `[0, that wait)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackoffPolicy {
    /// Consecutive failures that retry without waiting.
    pub free_retries: u32,
    /// The unit of the exponential part: failure `free_retries + k` waits `unit * 2^k`.
    pub unit: Duration,
    /// The cap on the exponential part (jitter comes on top of it).
    pub max_wait: Duration,
    /// Whether to add uniform jitter in `[0, wait)` to a non-zero wait.
    pub jitter: bool,
}

/// A jitter as the fraction it stands for: clamped to `[0, 1]`, NaN as 0. Jitter comes from a
/// `Runtime`, user code, and `Duration` arithmetic panics on NaN or a negative factor.
pub(crate) fn unit_jitter(jitter: f64) -> f64 {
    if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    }
}

impl BackoffPolicy {
    /// The reference policy: 3 free retries, 1 s unit, 60 s cap, jitter on.
    pub const fn new() -> Self {
        Self {
            free_retries: 3,
            unit: Duration::from_secs(1),
            max_wait: Duration::from_secs(60),
            jitter: true,
        }
    }

    /// Sets the number of failures that retry immediately.
    pub const fn with_free_retries(mut self, free_retries: u32) -> Self {
        self.free_retries = free_retries;
        self
    }

    /// Sets the unit of the exponential part.
    pub const fn with_unit(mut self, unit: Duration) -> Self {
        self.unit = unit;
        self
    }

    /// Sets the cap on the exponential part.
    pub const fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Turns jitter on or off.
    pub const fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The wait before the next attempt after `failures` consecutive failures, without jitter.
    pub fn base_wait(&self, failures: u32) -> Duration {
        if failures <= self.free_retries {
            return Duration::ZERO;
        }
        let shift = failures - self.free_retries;
        let factor = 1u32.checked_shl(shift).unwrap_or(u32::MAX);
        self.unit
            .checked_mul(factor)
            .unwrap_or(self.max_wait)
            .min(self.max_wait)
    }

    /// The wait after `failures` consecutive failures, with `jitter` in `[0, 1)` adding up to
    /// one more base wait.
    pub fn wait(&self, failures: u32, jitter: f64) -> Duration {
        let base = self.base_wait(failures);
        if !self.jitter || base.is_zero() {
            return base;
        }
        let stagger = base.mul_f64(unit_jitter(jitter));
        base.saturating_add(stagger.min(base - Duration::from_nanos(1)))
    }
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts consecutive failures; the state half of the backoff machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// A machine with no failures recorded.
    pub const fn new() -> Self {
        Self { failures: 0 }
    }

    /// Records a success: the next wait is zero.
    pub fn on_success(&mut self) {
        self.failures = 0;
    }

    /// Records a failure (a successful fetch with index 0 counts as one).
    pub fn on_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    /// Records an outcome: `true` for success.
    pub fn on_outcome(&mut self, success: bool) {
        if success {
            self.on_success()
        } else {
            self.on_failure()
        }
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The wait before the next attempt under `policy`, with `jitter` in `[0, 1)`.
    pub fn wait(&self, policy: &BackoffPolicy, jitter: f64) -> Duration {
        policy.wait(self.failures, jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn reference_table() {
        let p = BackoffPolicy::default();
        let cases = [
            (0, secs(0)),
            (1, secs(0)),
            (3, secs(0)),
            (4, secs(2)),
            (5, secs(4)),
            (8, secs(32)),
            (9, secs(60)),
            (40, secs(60)),
            (u32::MAX, secs(60)),
        ];
        for (failures, expected) in cases {
            assert_eq!(p.base_wait(failures), expected, "failures={failures}");
        }
    }

    #[test]
    fn jitter_stays_below_one_more_base() {
        let p = BackoffPolicy::default();
        assert_eq!(p.wait(4, 0.0), secs(2));
        assert!(p.wait(4, 0.999_999) < secs(4));
        assert!(p.wait(4, 0.5) >= secs(2));
        assert_eq!(p.wait(9, 0.5), secs(90));
        assert!(p.wait(9, 1.0) < secs(120));
        assert_eq!(p.wait(2, 0.9), Duration::ZERO, "free retries get no jitter");
        assert_eq!(p.with_jitter(false).wait(4, 0.9), secs(2));
    }

    #[test]
    fn machine_counts_and_resets() {
        let p = BackoffPolicy::default();
        let mut b = Backoff::new();
        for _ in 0..4 {
            b.on_failure();
        }
        assert_eq!(b.failures(), 4);
        assert_eq!(b.wait(&p, 0.0), secs(2));
        b.on_outcome(true);
        assert_eq!(b.wait(&p, 0.0), Duration::ZERO);
    }

    #[test]
    fn custom_policy() {
        let p = BackoffPolicy::new()
            .with_free_retries(0)
            .with_unit(Duration::from_millis(10))
            .with_max_wait(Duration::from_millis(50))
            .with_jitter(false);
        assert_eq!(p.base_wait(1), Duration::from_millis(20));
        assert_eq!(p.base_wait(2), Duration::from_millis(40));
        assert_eq!(p.base_wait(3), Duration::from_millis(50));
    }
}
