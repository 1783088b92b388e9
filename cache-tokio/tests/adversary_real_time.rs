//! Adversarial cases on real tokio runtimes: extreme values, fetches that answer (or fail) at
//! once, races, slow consumers, cancellation and churn — the defects that a deterministic
//! virtual-time runtime cannot show (a fetch there takes no time and the clock stands still
//! while a woken task looks).
//!
//! The runtime-independent cases are in `cache-core/tests/real_runtime/adversary.rs` (run on
//! async-std and smol too); here every one runs on three runtimes: a current-thread runtime, a
//! multi-thread runtime with the case blocked on from the test's own thread (so the cache's
//! tasks run in parallel with it on the workers), and a multi-thread runtime with the case
//! spawned onto a worker, each guarded by a watchdog that aborts the process if the case is
//! still running after 60 s. The cases that need tokio itself follow: its clock, and a cache
//! outliving its runtime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_core::testing::{MockError, MockRequest, MockType};
use cache_core::{Cache, FetchResult, GetError, RegisterOptions, SharedRuntime};
use cache_tokio::TokioRuntime;

mod support;

#[path = "../../cache-core/tests/real_runtime/harness.rs"]
mod harness;

#[macro_use]
#[path = "../../cache-core/tests/real_runtime/adversary.rs"]
mod adversary;

/// Every shared case on a current-thread runtime.
mod current_thread {
    use super::support::current_thread as harness;
    adversary_cases!(harness);
}

/// Every shared case on a 2-worker multi-thread runtime, blocked on from the test's thread.
mod multi_thread {
    use super::support::multi_thread as harness;
    adversary_cases!(harness);
}

/// Every shared case on a 2-worker multi-thread runtime, spawned onto a worker.
mod multi_worker {
    use super::support::multi_worker as harness;
    adversary_cases!(harness);
}

/// Sanity: the time source of these cases is the runtime's.
#[test]
fn runtime_clock_is_monotonic() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let rt: SharedRuntime = Arc::new(TokioRuntime::current());
        let a: Instant = rt.now();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(rt.now() > a);
    });
}

/// A cache that outlives the tokio runtime its adapter spawns on (kept in a static across
/// `#[tokio::test]`s, each with its own runtime): the runtime's shutdown drops the fetch task
/// in flight, and every later `spawn` drops its task at once. Gets must answer (with
/// `Abandoned`) instead of joining a fetch that never completes; hits keep working.
#[test]
fn a_cache_outliving_its_runtime_answers_instead_of_hanging() {
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = Cache::new(Arc::new(TokioRuntime::from_handle(first.handle().clone())));
    let typed = cache.register(MockType::new(RegisterOptions::new(), |_o, r| {
        let slow = r.key() == "slow";
        async move {
            if slow {
                std::future::pending::<()>().await;
            }
            Ok::<_, MockError>(FetchResult::new(7u64, 1))
        }
    }));
    first.block_on(async {
        let held = typed.clone();
        tokio::spawn(async move { held.get(&MockRequest::new("slow")).await });
        assert_eq!(
            typed.get(&MockRequest::new("fast")).await.unwrap().value,
            Some(7)
        );
    });
    // The shutdown drops the chain with the slow fetch in flight, and the waiting get.
    drop(first);

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let answer = |key: &'static str| {
            let typed = typed.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    typed.get_outcome(&MockRequest::new(key)),
                )
                .await
                .unwrap_or_else(|_| panic!("the get of {key} never answered"))
            }
        };
        let hit = answer("fast").await;
        assert_eq!(
            (hit.value, hit.meta.hit),
            (Some(7), true),
            "hits need no task"
        );
        for key in ["slow", "new"] {
            let got = answer(key).await;
            assert!(
                matches!(got.error, Some(GetError::Abandoned)),
                "{key}: {:?}",
                got.error
            );
        }
    });
}
