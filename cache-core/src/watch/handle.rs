//! [`WatchHandle`]: what keeps a watch running; dropping it cancels the watch.

use std::fmt;
use std::sync::Arc;

/// The end of a watch as its handle sees it.
pub(crate) trait WatchEnd: Send + Sync {
    fn ended(&self) -> bool;
    fn listen(&self) -> event_listener::EventListener;
    /// Ends the watch: its sink is dropped and it leaves its entry. Idempotent.
    fn stop(&self);
}

/// Keeps a watch running; dropping it cancels the watch (Consul cancels with a context).
///
/// Cancelling removes the watch from its entry at once and leaves no task, timer or entry
/// reference behind; the shared fetch other callers rely on is never cancelled.
#[must_use = "dropping a WatchHandle cancels the watch"]
pub struct WatchHandle {
    pub(crate) end: Arc<dyn WatchEnd>,
    /// Whether dropping the handle stops the watch (not after `detach`).
    pub(crate) attached: bool,
}

impl fmt::Debug for WatchHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchHandle")
            .field("active", &self.is_active())
            .finish()
    }
}

impl WatchHandle {
    /// Cancels the watch now (the same as dropping the handle).
    pub fn cancel(self) {
        // Dropping does it.
    }

    /// Lets the watch run until its receiver is dropped or the cache closes, as Consul's
    /// `Notify` with a context that is never cancelled.
    pub fn detach(mut self) {
        self.attached = false;
    }

    /// Whether the watch is still running (not cancelled, receiver present, cache open).
    pub fn is_active(&self) -> bool {
        !self.end.ended()
    }

    /// Completes when the watch has ended, whatever ended it.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future has no effect on the watch.
    pub async fn ended(&self) {
        loop {
            let listener = self.end.listen();
            if self.end.ended() {
                return;
            }
            listener.await;
        }
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        if self.attached {
            self.end.stop();
        }
    }
}
