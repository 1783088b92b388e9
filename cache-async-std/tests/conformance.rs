//! The `cache-core` runtime conformance suite, run on async-std.

use std::sync::Arc;

use cache_async_std::AsyncStdRuntime;
use cache_core::{BoxFuture, SharedRuntime};

fn harness(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
    async_std::task::block_on(case(Arc::new(AsyncStdRuntime::new())));
}

cache_core::conformance_tests!(harness);
