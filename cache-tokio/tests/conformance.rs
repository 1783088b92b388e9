//! The `cache-core` runtime conformance suite, run on both tokio schedulers, plus checks that
//! are specific to the tokio adapter (paused clock, use from threads outside the runtime).

use std::sync::Arc;

use cache_core::{BoxFuture, SharedRuntime};
use cache_tokio::TokioRuntime;

/// Every case on a multi-thread runtime with two workers.
mod multi_thread {
    use super::*;

    fn harness(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("failed to build a multi-thread tokio runtime");
        runtime.block_on(async { case(Arc::new(TokioRuntime::current())).await });
    }

    cache_core::conformance_tests!(harness);
}

/// Every case on a current-thread runtime, where the case and its spawned tasks share one thread.
mod current_thread {
    use super::*;

    fn harness(case: impl FnOnce(SharedRuntime) -> BoxFuture<'static, ()>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("failed to build a current-thread tokio runtime");
        runtime.block_on(async { case(Arc::new(TokioRuntime::current())).await });
    }

    cache_core::conformance_tests!(harness);
}

/// Behaviour the adapter promises beyond the shared suite.
mod adapter {
    use std::time::Duration;

    use cache_core::{Runtime, Sleep};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn now_follows_the_paused_clock() {
        let runtime = TokioRuntime::current();
        let start = runtime.now();
        // With the clock paused, tokio auto-advances to the deadline instead of waiting an hour.
        Sleep::after(&runtime, Duration::from_secs(3600)).await;
        assert_eq!(runtime.now() - start, Duration::from_secs(3600));
    }

    #[test]
    fn spawn_and_timer_work_from_a_thread_outside_the_runtime() {
        let tokio_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let runtime: SharedRuntime =
            Arc::new(TokioRuntime::from_handle(tokio_runtime.handle().clone()));
        let (tx, rx) = std::sync::mpsc::channel();
        let outside = runtime.clone();
        std::thread::spawn(move || {
            assert!(TokioRuntime::try_current().is_none());
            let sleep = Sleep::after(&*outside, Duration::from_millis(5));
            outside.spawn(Box::pin(async move {
                sleep.await;
                tx.send(()).unwrap();
            }));
        })
        .join()
        .unwrap();
        rx.recv_timeout(Duration::from_secs(30))
            .expect("task spawned from outside the runtime never finished");
    }

    #[test]
    fn try_current_is_none_outside_a_runtime() {
        assert!(TokioRuntime::try_current().is_none());
        let tokio_runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = tokio_runtime.enter();
        assert!(TokioRuntime::try_current().is_some());
    }
}
