//! The adversarial cases on smol (the shared source is
//! `cache-core/tests/real_runtime/adversary.rs` and `adversary_watch.rs`): the case is blocked
//! on from the test's thread, the cache's tasks run on smol's global executor (one thread
//! unless `SMOL_THREADS` says otherwise).

use std::sync::Arc;

use cache_core::{BoxFuture, SharedRuntime};
use cache_smol::SmolRuntime;

#[path = "../../cache-core/tests/real_runtime/harness.rs"]
mod harness;

#[macro_use]
#[path = "../../cache-core/tests/real_runtime/adversary.rs"]
mod adversary;

#[macro_use]
#[path = "../../cache-core/tests/real_runtime/adversary_watch.rs"]
mod adversary_watch;

fn harness(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
    smol::block_on(case(Arc::new(SmolRuntime::new())));
}

adversary_cases!(harness);
adversary_watch_cases!(harness);
