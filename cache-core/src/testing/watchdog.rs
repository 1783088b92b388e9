//! A wall-clock bound for tests that could hang.

use std::fmt::Display;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Duration;

/// Aborts the process, naming `what`, if it is still alive a minute after [`Watchdog::arm`]:
/// a test whose runtime starves cannot fail by itself, and a hung test would hold CI until its
/// limit. Dropping the watchdog disarms it.
pub struct Watchdog {
    _armed: Sender<()>,
}

impl Watchdog {
    /// Starts the minute for `what` (a test's name, shown if it runs out).
    pub fn arm(what: impl Display + Send + 'static) -> Self {
        let (armed, wait) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            // Dropping the watchdog disconnects the channel and ends the wait.
            if let Err(RecvTimeoutError::Timeout) = wait.recv_timeout(Duration::from_secs(60)) {
                eprintln!("{what} still running after 60 s: hung, or its runtime starved");
                std::process::abort();
            }
        });
        Self { _armed: armed }
    }
}
