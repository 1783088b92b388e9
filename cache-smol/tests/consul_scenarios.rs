//! Consul's cache and watch scenarios (`agent/cache/cache_test.go`, `watch_test.go`; the shared
//! source is `cache-core/tests/real_runtime/consul_scenarios.rs`) on smol: the scenario is
//! blocked on from the test's thread, the cache's tasks run on smol's global executor (one
//! thread unless `SMOL_THREADS` says otherwise).

use std::sync::Arc;

use cache_core::{BoxFuture, SharedRuntime};
use cache_smol::SmolRuntime;

#[macro_use]
#[path = "../../cache-core/tests/real_runtime/consul_scenarios.rs"]
mod scenarios;

fn harness(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
    smol::block_on(case(Arc::new(SmolRuntime::new())));
}

consul_scenarios!(harness);
