//! Consul's cache and watch scenarios (`agent/cache/cache_test.go`, `watch_test.go`; the shared
//! source is `cache-core/tests/real_runtime/consul_scenarios.rs`) on real tokio runtimes: a
//! current-thread runtime, and a 2-worker multi-thread runtime with the scenario blocked on
//! from the test's thread.

use std::sync::Arc;
use std::time::Duration;

use cache_core::{BoxFuture, SharedRuntime};
use cache_tokio::TokioRuntime;

#[macro_use]
#[path = "../../cache-core/tests/real_runtime/consul_scenarios.rs"]
mod scenarios;

/// Runs `case` on `runtime`; background tasks left by a failing case cannot hold the test up.
fn run_on(
    runtime: tokio::runtime::Runtime,
    case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>,
) {
    runtime.block_on(async { case(Arc::new(TokioRuntime::current())).await });
    runtime.shutdown_timeout(Duration::from_secs(5));
}

/// Every scenario on a current-thread runtime: the scenario and the cache's tasks share one
/// thread.
mod current_thread {
    use super::*;

    fn harness(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("failed to build a current-thread tokio runtime");
        run_on(runtime, case);
    }

    consul_scenarios!(harness);
}

/// Every scenario on a multi-thread runtime with two workers.
mod multi_thread {
    use super::*;

    fn harness(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("failed to build a multi-thread tokio runtime");
        run_on(runtime, case);
    }

    consul_scenarios!(harness);
}
