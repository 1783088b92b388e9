//! The entry's fetch chain as one state machine: its states ([`Chain`]), every transition as
//! a named method of [`ChainState`], and the pure decision of what the chain does after a
//! fetch ([`next_fetch`]).
//!
//! One task at a time owns an entry's fetching: the *chain*. A get that finds the entry
//! invalid and nothing fetching starts one; for refresh types, and for any entry with watches,
//! the same chain goes on fetching after each completed fetch, pausing for backoff, the
//! refresh timer or a polled watch's interval. Each start bumps the generation, so an older
//! chain that wakes up finds it no longer owns the entry and stops. A fetch due at once after
//! the last one is claimed (`Sleeping` → `Fetching`) by the completion itself, under the lock
//! the woken gets look under, so that they find it in flight (contract: Refresh 6).
//!
//! ```text
//!            start(now)                     fetch completes, next_fetch = Some(wait)
//!   Idle ───────────────► Fetching ─────────────────────────────────► Sleeping
//!    ▲  ◄──────────────────  │  ◄───────────── claim (due, or retry_now) ──┘
//!    │   fetch completes,    │                                            │
//!    │   next_fetch = None   │       start(later): Idle ──► Sleeping      │
//!    └──────────────────────────────────── stop (not needed any more) ────┘
//! ```
//!
//! Nothing here reads a clock or draws a random number: times and jitter are arguments, so
//! the decisions are table-tested below like the backoff and the token bucket.

use std::time::Duration;

use crate::backoff::{Backoff, BackoffPolicy, unit_jitter};

/// What an entry's fetch chain is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Chain {
    /// No chain: nothing fetches the entry until a get or a watch starts one.
    #[default]
    Idle,
    /// A fetch is in flight.
    Fetching,
    /// Waiting for the next fetch (backoff, refresh timer, poll interval). `retry_now`: asked
    /// to fetch at once (the upstream is back), whatever the wait.
    Sleeping {
        /// Set by [`ChainState::retry_now`]; the chain fetches when it next looks.
        retry_now: bool,
    },
}

/// An entry's chain, its generation and whether background refresh stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ChainState {
    chain: Chain,
    /// Bumped by every start; a chain whose generation is older stops. Compared for equality
    /// only, so wrapping is harmless.
    generation: u32,
    /// Background refresh stopped (a fatal error, or give-up) until a get starts a chain.
    refresh_stopped: bool,
}

impl ChainState {
    /// The chain's state.
    pub(crate) fn chain(&self) -> Chain {
        self.chain
    }

    /// A fetch is in flight.
    pub(crate) fn is_fetching(&self) -> bool {
        self.chain == Chain::Fetching
    }

    /// Something keeps the entry fetching: a fetch in flight or a chain waiting for its next.
    pub(crate) fn is_active(&self) -> bool {
        self.chain != Chain::Idle
    }

    /// Whether background refresh stopped (fatal error or give-up).
    pub(crate) fn refresh_stopped(&self) -> bool {
        self.refresh_stopped
    }

    /// Whether the chain of `generation` still owns the entry.
    pub(crate) fn owns(&self, generation: u32) -> bool {
        self.generation == generation
    }

    /// A new chain takes over: fetching now, or sleeping until its first fetch. Returns its
    /// generation and whether it replaced a sleeping chain (which must be woken to stop).
    pub(crate) fn start(&mut self, fetch_now: bool) -> (u32, bool) {
        let replaced = matches!(self.chain, Chain::Sleeping { .. });
        self.generation = self.generation.wrapping_add(1);
        self.refresh_stopped = false;
        self.chain = if fetch_now {
            Chain::Fetching
        } else {
            Chain::Sleeping { retry_now: false }
        };
        (self.generation, replaced)
    }

    /// The sleeping chain of `generation` claims its next fetch if its time is `due` or it was
    /// asked to retry now (called by the chain when it looks, and by a completion whose next
    /// fetch is due at once). Returns whether it now fetches.
    pub(crate) fn claim(&mut self, generation: u32, due: bool) -> bool {
        match self.chain {
            Chain::Sleeping { retry_now } if self.owns(generation) && (due || retry_now) => {
                self.chain = Chain::Fetching;
                true
            }
            _ => false,
        }
    }

    /// The chain of `generation` stops: nothing needs the entry fetched any more.
    pub(crate) fn stop(&mut self, generation: u32) {
        if self.owns(generation) {
            self.chain = Chain::Idle;
        }
    }

    /// The fetch of the owning chain completed: it sleeps until its next fetch, or ends.
    pub(crate) fn fetch_done(&mut self, next: Option<Duration>) {
        self.chain = match next {
            Some(_) => Chain::Sleeping { retry_now: false },
            None => Chain::Idle,
        };
    }

    /// Asks a chain sleeping after failures to fetch at once. Returns whether it was one.
    pub(crate) fn retry_now(&mut self, failures: u32) -> bool {
        match &mut self.chain {
            Chain::Sleeping { retry_now } if failures > 0 => {
                *retry_now = true;
                true
            }
            _ => false,
        }
    }

    /// Background refresh stops until a get starts a new chain.
    pub(crate) fn stop_refresh(&mut self) {
        self.refresh_stopped = true;
    }
}

/// What decides the chain's next step after a fetch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct After {
    /// The cache is closed.
    pub(crate) closed: bool,
    /// The type refreshes in the background.
    pub(crate) refresh: bool,
    /// Background refresh stopped for this entry.
    pub(crate) refresh_stopped: bool,
    /// The entry has watches.
    pub(crate) watched: bool,
    /// The type answers blocking queries.
    pub(crate) blocking: bool,
    /// Consecutive failed attempts (for backoff).
    pub(crate) backoff: Backoff,
    /// The type's pause between refreshes.
    pub(crate) refresh_timer: Duration,
    /// The shortest `max_age` of the entry's polled watches (zero: none).
    pub(crate) poll_every: Duration,
    /// The age of the entry's value.
    pub(crate) age: Duration,
    /// A uniform random number in `[0, 1)`, for the backoff's and the poll's jitter.
    pub(crate) jitter: f64,
}

/// Whether an entry still needs its chain: background refresh that has not stopped, or
/// watches; never after close.
pub(crate) fn needed(closed: bool, refreshing: bool, watched: bool) -> bool {
    !closed && (refreshing || watched)
}

/// The pause before the chain's next fetch, or `None` when the chain ends: refresh types
/// fetch again until refresh stops, any type while it is watched, nothing after close.
/// Waits saturate: a huge option means "never" rather than an overflow.
pub(crate) fn next_fetch(policy: &BackoffPolicy, after: &After) -> Option<Duration> {
    if !needed(
        after.closed,
        after.refresh && !after.refresh_stopped,
        after.watched,
    ) {
        return None;
    }
    let refreshing = after.refresh && !after.refresh_stopped;
    let backoff = after.backoff.wait(policy, after.jitter);
    if refreshing {
        return Some(backoff.saturating_add(after.refresh_timer));
    }
    if after.blocking || after.backoff.failures() > 0 {
        return Some(backoff);
    }
    // A polled watch: its max age less the value's age, plus up to a tenth of it of jitter.
    let jitter = Duration::try_from_secs_f64(
        after.poll_every.as_secs_f64() * unit_jitter(after.jitter) / 10.0,
    )
    .unwrap_or(Duration::MAX);
    Some(
        after
            .poll_every
            .saturating_sub(after.age)
            .saturating_add(jitter),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn failures(n: u32) -> Backoff {
        let mut b = Backoff::new();
        for _ in 0..n {
            b.on_failure();
        }
        b
    }

    fn base() -> After {
        After {
            closed: false,
            refresh: false,
            refresh_stopped: false,
            watched: false,
            blocking: true,
            backoff: Backoff::new(),
            refresh_timer: Duration::ZERO,
            poll_every: Duration::ZERO,
            age: Duration::ZERO,
            jitter: 0.0,
        }
    }

    #[test]
    fn next_fetch_decision_table() {
        let policy = BackoffPolicy::new();
        let cases: Vec<(&str, After, Option<Duration>)> = vec![
            ("not refreshed, not watched: ends", base(), None),
            (
                "closed ends even a watched refresh",
                After {
                    closed: true,
                    refresh: true,
                    watched: true,
                    ..base()
                },
                None,
            ),
            (
                "refresh: at once",
                After {
                    refresh: true,
                    ..base()
                },
                Some(Duration::ZERO),
            ),
            (
                "refresh: the timer",
                After {
                    refresh: true,
                    refresh_timer: secs(5),
                    ..base()
                },
                Some(secs(5)),
            ),
            (
                "refresh after 5 failures: 4 s backoff + timer",
                After {
                    refresh: true,
                    refresh_timer: secs(5),
                    backoff: failures(5),
                    ..base()
                },
                Some(secs(9)),
            ),
            (
                "refresh stopped, unwatched: ends",
                After {
                    refresh: true,
                    refresh_stopped: true,
                    ..base()
                },
                None,
            ),
            (
                "refresh stopped but watched: blocking watch loop",
                After {
                    refresh: true,
                    refresh_stopped: true,
                    watched: true,
                    ..base()
                },
                Some(Duration::ZERO),
            ),
            (
                "watched blocking type after 4 failures: 2 s",
                After {
                    watched: true,
                    backoff: failures(4),
                    ..base()
                },
                Some(secs(2)),
            ),
            (
                "polled watch: max age less age",
                After {
                    watched: true,
                    blocking: false,
                    poll_every: secs(10),
                    age: secs(3),
                    ..base()
                },
                Some(secs(7)),
            ),
            (
                "polled watch: jitter adds up to a tenth",
                After {
                    watched: true,
                    blocking: false,
                    poll_every: secs(10),
                    jitter: 0.5,
                    ..base()
                },
                Some(Duration::from_millis(10_500)),
            ),
            (
                "polled watch that fails: backoff, not the poll",
                After {
                    watched: true,
                    blocking: false,
                    poll_every: secs(10),
                    backoff: failures(5),
                    ..base()
                },
                Some(secs(4)),
            ),
            (
                "endless durations saturate",
                After {
                    refresh: true,
                    refresh_timer: Duration::MAX,
                    backoff: failures(9),
                    ..base()
                },
                Some(Duration::MAX),
            ),
            (
                "endless poll interval saturates",
                After {
                    watched: true,
                    blocking: false,
                    poll_every: Duration::MAX,
                    jitter: 0.9,
                    ..base()
                },
                Some(Duration::MAX),
            ),
        ];
        for (name, after, want) in cases {
            let policy = policy.with_jitter(false);
            assert_eq!(next_fetch(&policy, &after), want, "{name}");
        }
    }

    #[test]
    fn transitions() {
        let mut c = ChainState::default();
        assert_eq!(c.chain(), Chain::Idle);
        let (g1, replaced) = c.start(true);
        assert!(!replaced && c.is_fetching());
        c.fetch_done(Some(secs(1)));
        assert_eq!(c.chain(), Chain::Sleeping { retry_now: false });
        assert!(!c.claim(g1, false), "not due yet");
        assert!(!c.retry_now(0), "a healthy sleeper is left alone");
        assert!(c.retry_now(3));
        assert!(c.claim(g1, false), "retry now claims before the deadline");
        assert!(c.is_fetching());
        c.fetch_done(Some(secs(1)));
        // A get starts a newer chain: the sleeper is replaced and no longer owns the entry.
        let (g2, replaced) = c.start(true);
        assert!(replaced && g2 != g1);
        assert!(!c.claim(g1, true));
        c.stop(g1);
        assert!(c.is_fetching(), "an old chain's stop changes nothing");
        c.stop_refresh();
        assert!(c.refresh_stopped());
        c.fetch_done(None);
        assert_eq!(c.chain(), Chain::Idle);
        let (_, replaced) = c.start(false);
        assert!(!replaced && !c.refresh_stopped() && c.is_active() && !c.is_fetching());
    }
}
