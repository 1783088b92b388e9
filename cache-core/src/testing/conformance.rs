//! The runtime conformance suite: written once here, run by every adapter crate.
//!
//! Each case is an `async fn(SharedRuntime)` that uses real time with short durations and
//! generous margins. Adapter crates instantiate every case as a named `#[test]` with
//! [`conformance_tests!`](crate::conformance_tests).
//!
//! Not a stable API: it may change in any release.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::runtime::{SharedRuntime, Sleep};

/// A spawned task runs to completion even though nobody holds a handle to it.
pub async fn detached_spawn_runs(rt: SharedRuntime) {
    let (tx, rx) = futures::channel::oneshot::channel();
    rt.spawn(Box::pin(async move {
        let _ = tx.send(42u32);
    }));
    assert_eq!(rx.await.expect("spawned task was dropped"), 42);
}

/// A timer fires no earlier than its deadline, and `reset` moves it.
pub async fn timer_fires_and_resets(rt: SharedRuntime) {
    let start = rt.now();
    Sleep::after(&*rt, Duration::from_millis(20)).await;
    assert!(rt.now() - start >= Duration::from_millis(20));

    let start = rt.now();
    let mut sleep = Sleep::after(&*rt, Duration::from_secs(3600));
    sleep.reset(start + Duration::from_millis(10));
    sleep.await;
    let waited = rt.now() - start;
    assert!(waited >= Duration::from_millis(10), "{waited:?}");
    assert!(
        waited < Duration::from_secs(60),
        "reset was ignored: {waited:?}"
    );
}

/// Many spawned tasks all run, from many spawning threads' point of view.
pub async fn many_spawns_run(rt: SharedRuntime) {
    let counter = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = futures::channel::mpsc::unbounded();
    for _ in 0..100 {
        let counter = counter.clone();
        let tx = tx.clone();
        rt.spawn(Box::pin(async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = tx.unbounded_send(());
        }));
    }
    drop(tx);
    use futures::StreamExt;
    let mut n = 0;
    while rx.next().await.is_some() {
        n += 1;
    }
    assert_eq!(n, 100);
    assert_eq!(counter.load(Ordering::SeqCst), 100);
}

/// Instantiates every conformance case as a named `#[test]`.
///
/// `$harness` is a function `fn(impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>)` that
/// builds a runtime, constructs the adapter inside it, and blocks on the case.
///
/// ```text
/// fn harness(case: impl FnOnce(cache_core::SharedRuntime) -> cache_core::BoxFuture<'static, ()>) {
///     let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
///     rt.block_on(async { case(std::sync::Arc::new(cache_tokio::TokioRuntime::current())).await });
/// }
/// cache_core::conformance_tests!(harness);
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($harness:path) => {
        $crate::conformance_tests!(@cases $harness;
            detached_spawn_runs,
            timer_fires_and_resets,
            many_spawns_run,
        );
    };
    (@cases $harness:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $harness(|rt| ::std::boxed::Box::pin($crate::testing::conformance::$case(rt)));
            }
        )*
    };
}
