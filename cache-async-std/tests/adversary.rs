//! The adversarial cases on async-std (the shared source is
//! `cache-core/tests/real_runtime/adversary.rs` and `adversary_watch.rs`): the case is blocked
//! on from the test's thread, the cache's tasks run on async-std's global executor.

use std::sync::Arc;

use cache_async_std::AsyncStdRuntime;
use cache_core::{BoxFuture, SharedRuntime};

#[path = "../../cache-core/tests/real_runtime/harness.rs"]
mod harness;

#[macro_use]
#[path = "../../cache-core/tests/real_runtime/adversary.rs"]
mod adversary;

#[macro_use]
#[path = "../../cache-core/tests/real_runtime/adversary_watch.rs"]
mod adversary_watch;

fn harness(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
    async_std::task::block_on(case(Arc::new(AsyncStdRuntime::new())));
}

adversary_cases!(harness);
adversary_watch_cases!(harness);
