//! The tokio harnesses of the adversarial cases (`adversary_real_time.rs`,
//! `adversary_watch.rs`, whose shared cases are in `cache-core/tests/real_runtime/`): each case
//! on a fresh tokio runtime of one flavour. The shared macros arm the watchdog.

// Each test file is its own crate and runs the flavours it needs.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use cache_core::{BoxFuture, SharedRuntime};
use cache_tokio::TokioRuntime;

/// How a case is run.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Flavour {
    /// A current-thread runtime: the case and every task of the cache share one thread.
    CurrentThread,
    /// A 2-worker multi-thread runtime, the case blocked on from the test's thread.
    MultiThread,
    /// A 2-worker multi-thread runtime, the case spawned onto a worker.
    MultiWorker,
}

/// Runs `case` on a new runtime of `flavour`.
pub(crate) fn run(flavour: Flavour, case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
    let runtime = match flavour {
        Flavour::CurrentThread => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Flavour::MultiThread | Flavour::MultiWorker => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
    }
    .expect("failed to build a tokio runtime");
    runtime.block_on(async move {
        let rt: SharedRuntime = Arc::new(TokioRuntime::current());
        match flavour {
            Flavour::MultiWorker => {
                if let Err(e) = tokio::spawn(case(rt)).await {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
            _ => case(rt).await,
        }
    });
    // Background tasks of a starved or leaking cache must not hold the test up either.
    runtime.shutdown_timeout(Duration::from_secs(5));
}

/// One harness per flavour, in the shape the shared case macros call.
pub(crate) fn current_thread(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
    run(Flavour::CurrentThread, case);
}

pub(crate) fn multi_thread(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
    run(Flavour::MultiThread, case);
}

pub(crate) fn multi_worker(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
    run(Flavour::MultiWorker, case);
}
