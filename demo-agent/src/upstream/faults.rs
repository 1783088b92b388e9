//! Fault injection for an upstream: simulated latency, a random failure rate, and an outage
//! switch that tests and users flip at run time (`PUT /v1/agent/upstream?fail=true`).

use std::sync::{Arc, Mutex};
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

/// Told the new settings on every change; returns whether it wants to hear more.
type Listener = Box<dyn Fn(&FaultSettings) -> bool + Send + Sync>;

/// Shared, live fault settings: changed at run time, observed by the upstream.
pub struct Faults {
    settings: watch::Sender<FaultSettings>,
    /// Called on every change, after the new settings are in force.
    listeners: Mutex<Vec<Listener>>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("settings", &self.get())
            .finish_non_exhaustive()
    }
}

impl Faults {
    /// Faults with `settings` in force.
    pub fn new(settings: FaultSettings) -> Arc<Self> {
        Arc::new(Self {
            settings: watch::Sender::new(settings),
            listeners: Mutex::default(),
        })
    }

    /// The settings in force.
    pub fn get(&self) -> FaultSettings {
        *self.settings.borrow()
    }

    /// Replaces the settings; open blocking reads fail at once if an outage starts.
    pub fn set(&self, settings: FaultSettings) {
        self.settings.send_replace(settings);
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        listeners.retain(|listener| listener(&settings));
    }

    /// Calls `listener` with the new settings on every [`Faults::set`] (synchronously, so keep
    /// it short) until it returns `false`. For waiters too many to each hold a receiver.
    pub(crate) fn on_change(
        &self,
        listener: impl Fn(&FaultSettings) -> bool + Send + Sync + 'static,
    ) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        listeners.push(Box::new(listener));
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
            // Boxed: the timer is rare, and the future of every upstream call embeds this one.
            Box::pin(tokio::time::sleep(latency)).await;
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
