//! Helpers shared by test binaries (a `mod.rs` in a folder is not a test binary of its own).

use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on its own thread and fails if it has not finished within a generous real-time
/// bound: a livelocked virtual runtime never returns.
pub(crate) fn within_real_time(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the check panicked"),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after 20 s of real time (livelock)")
        }
    }
}
