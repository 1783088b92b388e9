//! Fault injection for an upstream: simulated latency, a random failure rate, and an outage
//! switch that tests and users flip at run time (`PUT /v1/agent/upstream?fail=true`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// The fault settings in force.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultSettings {
    /// Added before every upstream operation.
    pub latency: Duration,
    /// The probability in `[0, 1]` that an operation fails.
    pub fail_rate: f64,
    /// An outage: every operation fails, and open blocking reads fail at once.
    pub fail: bool,
}

/// `latency=0s fail_rate=0 fail=false`, for log lines.
impl std::fmt::Display for FaultSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "latency={} fail_rate={} fail={}",
            crate::duration::GoDuration(self.latency),
            self.fail_rate,
            self.fail
        )
    }
}

/// Shared, live fault settings: changed at run time, observed by the upstream.
#[derive(Debug)]
pub struct Faults {
    settings: watch::Sender<FaultSettings>,
}

impl Faults {
    /// Faults with `settings` in force.
    pub fn new(settings: FaultSettings) -> Arc<Self> {
        Arc::new(Self {
            settings: watch::Sender::new(settings),
        })
    }

    /// The settings in force.
    pub fn get(&self) -> FaultSettings {
        *self.settings.borrow()
    }

    /// Replaces the settings; open blocking reads fail at once if an outage starts.
    pub fn set(&self, settings: FaultSettings) {
        self.settings.send_replace(settings);
    }

    /// A receiver that is told when the settings change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<FaultSettings> {
        self.settings.subscribe()
    }

    /// Waits out the simulated latency, then decides whether this operation fails.
    ///
    /// # Errors
    ///
    /// A description of the injected failure.
    pub(crate) async fn before_operation(&self) -> Result<(), String> {
        let latency = self.get().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let settings = self.get();
        if settings.fail {
            return Err("injected outage (PUT /v1/agent/upstream?fail=false ends it)".to_owned());
        }
        if settings.fail_rate > 0.0 && fastrand::f64() < settings.fail_rate {
            return Err(format!(
                "injected random failure (fail rate {})",
                settings.fail_rate
            ));
        }
        Ok(())
    }
}
