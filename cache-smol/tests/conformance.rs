//! The `cache-core` runtime conformance suite, run on smol.

use std::sync::Arc;

use cache_core::{BoxFuture, SharedRuntime};
use cache_smol::SmolRuntime;

fn harness(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
    smol::block_on(case(Arc::new(SmolRuntime::new())));
}

cache_core::conformance_tests!(harness);
