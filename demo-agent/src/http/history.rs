//! The history the web view draws: one sample of every cache type's counters per
//! [`SAMPLE_EVERY`], the last [`HISTORY_LEN`] of them, recorded by a task the agent starts
//! (`AgentState`'s sampler) so that a page opened now still shows the last minutes.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use cache_core::{Metrics, TypeMetrics};
use tokio::time::Instant;

/// How often the sampler records the counters.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How many samples are kept: five minutes at one per second.
pub(crate) const HISTORY_LEN: usize = 300;
/// The counters of one type that the view turns into rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) fetches: u64,
    pub(crate) errors: u64,
}

impl Counts {
    pub(crate) fn of(t: &TypeMetrics) -> Self {
        Self {
            hits: t.hits,
            misses: t.misses_new + t.misses_blocking,
            fetches: t.fetch_success,
            errors: t.fetch_errors,
        }
    }

    pub(crate) fn since(self, base: Self) -> Self {
        Self {
            hits: self.hits.saturating_sub(base.hits),
            misses: self.misses.saturating_sub(base.misses),
            fetches: self.fetches.saturating_sub(base.fetches),
            errors: self.errors.saturating_sub(base.errors),
        }
    }

    pub(crate) fn add(self, other: Self) -> Self {
        Self {
            hits: self.hits + other.hits,
            misses: self.misses + other.misses,
            fetches: self.fetches + other.fetches,
            errors: self.errors + other.errors,
        }
    }
}

/// One sample: when, and every type's counters (in registration order).
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) at: Instant,
    pub(crate) types: Vec<(String, Counts)>,
}

impl Sample {
    pub(crate) fn of(metrics: &Metrics, at: Instant) -> Self {
        Self {
            at,
            types: metrics
                .types
                .iter()
                .map(|t| (t.name.clone(), Counts::of(t)))
                .collect(),
        }
    }

    pub(crate) fn counts(&self, name: &str) -> Counts {
        self.types
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    }

    pub(crate) fn total(&self) -> Counts {
        self.types
            .iter()
            .fold(Counts::default(), |sum, (_, c)| sum.add(*c))
    }
}

/// The last [`HISTORY_LEN`] samples of the cache's counters, one per [`SAMPLE_EVERY`], kept
/// by a task the agent starts with it.
#[derive(Debug, Default)]
pub(crate) struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// An empty history.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn record(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() == HISTORY_LEN {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub(crate) fn snapshot(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}
