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

use futures::future::{Either, select};

use super::{MockRequest, MockServer, MockType};
use crate::cache::Cache;
use crate::cache_type::{FetchResult, RegisterOptions};
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

/// Polls `cond` every few milliseconds until it holds, failing after a generous 10 s.
async fn eventually(rt: &SharedRuntime, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = rt.now() + Duration::from_secs(10);
    while !cond() {
        assert!(rt.now() < deadline, "timed out waiting until {what}");
        Sleep::after(&**rt, Duration::from_millis(5)).await;
    }
}

/// Receives one event, failing after a generous 10 s.
async fn recv<T>(rt: &SharedRuntime, rx: &async_channel::Receiver<T>) -> T {
    let timeout = Sleep::after(&**rt, Duration::from_secs(10));
    match select(Box::pin(rx.recv()), timeout).await {
        Either::Left((Ok(ev), _)) => ev,
        Either::Left((Err(_), _)) => panic!("channel closed"),
        Either::Right(_) => panic!("no event within 10 s"),
    }
}

/// A blocking get with a timeout returns the last value and no error when nothing changes.
pub async fn blocking_get_times_out_with_last_value(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 7u64, 3);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    typed.get(&MockRequest::new("k")).await.unwrap();
    let start = rt.now();
    let request = MockRequest::new("k")
        .min_index(3)
        .timeout(Duration::from_millis(50));
    let r = typed.get(&request).await.unwrap();
    let waited = rt.now() - start;
    assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(7), 3, false));
    assert!(waited >= Duration::from_millis(50), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    cache.close();
}

/// A blocking get wakes when the upstream changes.
pub async fn blocking_get_wakes_on_change(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    typed.get(&MockRequest::new("k")).await.unwrap();
    server.set_after(Duration::from_millis(20), 2, 4);
    let r = typed
        .get(
            &MockRequest::new("k")
                .min_index(3)
                .timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    assert_eq!((r.value, r.meta.index), (Some(2), 4));
    cache.close();
}

/// Concurrent gets from many tasks (and, on multi-threaded runtimes, threads) cause one fetch.
pub async fn single_flight_across_tasks(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let rt2 = rt.clone();
    let ty = MockType::new(RegisterOptions::new(), move |_, _| {
        let rt = rt2.clone();
        async move {
            Sleep::after(&*rt, Duration::from_millis(50)).await;
            Ok(FetchResult::new(42u64, 1))
        }
    });
    let calls = ty.calls();
    let typed = cache.register(ty);
    let (tx, rx) = async_channel::unbounded();
    for _ in 0..64 {
        let typed = typed.clone();
        let tx = tx.clone();
        rt.spawn(Box::pin(async move {
            let r = typed.get(&MockRequest::new("k")).await;
            let _ = tx.send(r.map(|r| r.value)).await;
        }));
    }
    for _ in 0..64 {
        assert_eq!(recv(&rt, &rx).await.unwrap(), Some(42));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    cache.close();
}

/// Background refresh keeps fetching without any get.
pub async fn background_refresh_runs(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(
        server.polling_type(
            RegisterOptions::new()
                .refresh(true)
                .refresh_timer(Duration::from_millis(10)),
        ),
    );
    typed.get(&MockRequest::new("k")).await.unwrap();
    server.set(2, 4);
    eventually(&rt, "refresh fetched the new value", || server.reads() >= 3).await;
    let r = typed.get(&MockRequest::new("k")).await.unwrap();
    assert!(r.meta.hit);
    assert_eq!(r.meta.index, 4);
    cache.close();
}

/// After close, background refresh stops (an in-flight fetch may still finish).
pub async fn close_stops_background_work(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(
        server.polling_type(
            RegisterOptions::new()
                .refresh(true)
                .refresh_timer(Duration::from_millis(5)),
        ),
    );
    typed.get(&MockRequest::new("k")).await.unwrap();
    eventually(&rt, "refresh ran", || server.reads() >= 3).await;
    cache.close();
    let reads = server.reads();
    Sleep::after(&*rt, Duration::from_millis(200)).await;
    assert!(server.reads() <= reads + 1, "refresh went on after close");
    assert!(typed.get(&MockRequest::new("k")).await.unwrap().meta.hit);
}

/// An entry not read for its TTL is evicted by the runtime's timers.
pub async fn expiry_evicts(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(
        server.polling_type(RegisterOptions::new().last_get_ttl(Duration::from_millis(30))),
    );
    typed.get(&MockRequest::new("k")).await.unwrap();
    assert_eq!(cache.len(), 1);
    eventually(&rt, "the entry expired", || cache.is_empty()).await;
    assert_eq!(cache.metrics().total().expirations, 1);
    cache.close();
}

/// A watch delivers the current value, then a change, on the runtime's tasks.
pub async fn watch_delivers_updates(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(8);
    let watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    let first = recv(&rt, &rx).await;
    assert_eq!((first.correlation_id, first.meta.index), ("k", 3));
    server.set(2, 4);
    let next = recv(&rt, &rx).await;
    assert_eq!((next.result, next.meta.index), (Some(2), 4));
    drop(watch);
    assert!(rx.is_closed());
    cache.close();
}

/// Many watches of one entry share one upstream fetch stream.
pub async fn watches_share_one_fetch_stream(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 0u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(1024);
    let watches: Vec<_> = (0..50)
        .map(|_| {
            typed
                .notify(MockRequest::new("k"), "k", tx.clone())
                .unwrap()
        })
        .collect();
    for _ in 0..50 {
        recv(&rt, &rx).await;
    }
    for index in 2..=4 {
        server.set(index, index);
        for _ in 0..50 {
            assert_eq!(recv(&rt, &rx).await.meta.index, index);
        }
    }
    // The first read plus one blocking read per change, and the one now open.
    eventually(&rt, "the next blocking read is open", || {
        server.reads() == 5
    })
    .await;
    drop(watches);
    cache.close();
}

/// Closing the cache ends every watch: the receivers see the channel close.
pub async fn close_ends_watches(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 0u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(8);
    let _watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    recv(&rt, &rx).await;
    cache.close();
    assert!(rx.is_closed());
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
            blocking_get_times_out_with_last_value,
            blocking_get_wakes_on_change,
            single_flight_across_tasks,
            background_refresh_runs,
            close_stops_background_work,
            expiry_evicts,
            watch_delivers_updates,
            watches_share_one_fetch_stream,
            close_ends_watches,
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
