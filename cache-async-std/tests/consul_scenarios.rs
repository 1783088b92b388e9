//! Consul's cache and watch scenarios (`agent/cache/cache_test.go`, `watch_test.go`; the shared
//! source is `cache-core/tests/real_runtime/consul_scenarios.rs`) on async-std: the scenario is
//! blocked on from the test's thread, the cache's tasks run on async-std's global executor.

use std::sync::Arc;

use cache_async_std::AsyncStdRuntime;
use cache_core::{BoxFuture, SharedRuntime};

#[macro_use]
#[path = "../../cache-core/tests/real_runtime/consul_scenarios.rs"]
mod scenarios;

fn harness(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
    async_std::task::block_on(case(Arc::new(AsyncStdRuntime::new())));
}

consul_scenarios!(harness);
