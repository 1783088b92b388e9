//! Adversarial cases for the watch API (`notify`, `notify_until`, the `Stream` form) on real
//! tokio runtimes. The cases are shared with the other adapters, in
//! `cache-core/tests/real_runtime/adversary_watch.rs`; here every one runs on a current-thread
//! runtime and on a 2-worker multi-thread runtime (the case blocked on from the test's
//! thread), each guarded by a watchdog that aborts the process if the case still runs after
//! 60 s.

mod support;

#[path = "../../cache-core/tests/real_runtime/harness.rs"]
mod harness;

#[macro_use]
#[path = "../../cache-core/tests/real_runtime/adversary_watch.rs"]
mod adversary_watch;

/// Every watch case on a current-thread runtime.
mod current_thread {
    use super::support::current_thread as harness;
    adversary_watch_cases!(harness);
}

/// Every watch case on a 2-worker multi-thread runtime, blocked on from the test's thread.
mod multi_thread {
    use super::support::multi_thread as harness;
    adversary_watch_cases!(harness);
}
