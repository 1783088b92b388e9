//! The contract's Watch rules (docs/contract.md#watch) on the virtual-time runtime: notify/watch
//! loops, sharing, lifecycle, slow consumers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_channel::{Receiver, TryRecvError};
use cache_core::sim::SimRuntime;
use cache_core::testing::{MockError, MockRequest, MockServer, MockType};
use cache_core::watch::UpdateEvent;
use cache_core::{BackoffPolicy, Cache, FetchResult, RegisterOptions, WatchError};
use futures::StreamExt;

type Event<V> = UpdateEvent<&'static str, V, MockError>;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Every event received so far, without waiting.
fn drain<V>(rx: &Receiver<Event<V>>) -> Vec<Event<V>> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        out.push(ev);
    }
    out
}

fn indexes<V>(events: &[Event<V>]) -> Vec<u64> {
    events.iter().map(|e| e.meta.index).collect()
}

#[test]
fn blocking_watch_delivers_first_value_then_each_change() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 10u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(16);
    let _watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    sim.block_on(async {
        let first = rx.recv().await.unwrap();
        assert_eq!(
            (first.correlation_id, first.result, first.meta.index),
            ("k", Some(10), 5)
        );
        assert!(first.error.is_none());
        sim.sleep(secs(1)).await;
        server.set(11, 6);
        sim.sleep(secs(1)).await;
        server.set(12, 9);
        sim.sleep(secs(1)).await;
        let events = drain(&rx);
        assert_eq!(indexes(&events), vec![6, 9]);
        assert_eq!(events[1].result, Some(12));
    });
}

#[test]
fn first_delivery_may_be_a_hit() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        let (tx, rx) = async_channel::bounded(4);
        let _watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
        let first = rx.try_recv().expect("delivered at once, from cache");
        assert!(first.meta.hit);
        assert_eq!(first.meta.index, 5);
    });
}

#[test]
fn same_index_timeout_delivers_nothing() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed =
        cache.register(server.blocking_type(RegisterOptions::new().query_timeout(secs(60))));
    let (tx, rx) = async_channel::bounded(16);
    let _watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    sim.block_on(async {
        sim.sleep(secs(600)).await;
        assert_eq!(
            indexes(&drain(&rx)),
            vec![5],
            "ten upstream timeouts, one event"
        );
    });
    assert_eq!(server.reads(), 11);
}

#[test]
fn errors_before_first_value_are_delivered_later_ones_are_not() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle())
        .backoff(BackoffPolicy::new().with_jitter(false))
        .build();
    let server = MockServer::new(sim.handle(), 1u64, 5);
    server.set_error(Some(MockError::new("down")));
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(64);
    let _watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    sim.block_on(async {
        let first = rx.recv().await.unwrap();
        assert_eq!(first.error.unwrap().fetch_error().unwrap().message, "down");
        assert_eq!((first.result, first.meta.index), (None, 0));
        sim.sleep(secs(10)).await;
        server.set_error(None);
        sim.sleep(secs(10)).await;
        let events = drain(&rx);
        let last = events.last().unwrap();
        assert!(last.error.is_none());
        assert_eq!((last.result, last.meta.index), (Some(1), 5));
        // Now a value was delivered: errors with an unchanged index are retried, not delivered.
        let reads = server.reads();
        server.set_error(Some(MockError::new("down again")));
        sim.sleep(secs(600)).await;
        assert!(drain(&rx).is_empty());
        let retries = server.reads() - reads;
        // With backoff (0,0,0,2,4,8,16,32,60,60…) ten minutes hold about 16 attempts, not a hot loop.
        assert!((10..=20).contains(&retries), "{retries} retries");
        server.set_error(None);
        server.set(2, 6);
        sim.sleep(secs(61)).await;
        assert_eq!(indexes(&drain(&rx)), vec![6]);
    });
}

#[test]
fn index_rises_from_zero_to_one_only_after_success() {
    // A type that answers index 0: the value is delivered once with index 1, and the
    // zero index is treated as a failure for backoff (no hot loop).
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let ty = MockType::new(
        RegisterOptions::new().supports_blocking(true),
        |_, _| async { Ok(FetchResult::new(7u8, 0)) },
    );
    let calls = ty.calls();
    let typed = cache.register(ty);
    let (tx, rx) = async_channel::bounded(64);
    let _watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    sim.block_on(async {
        sim.sleep(secs(120)).await;
        let events = drain(&rx);
        assert_eq!(indexes(&events), vec![1]);
    });
    assert!(calls.load(Ordering::SeqCst) < 20);
}

#[test]
fn index_reset_is_delivered_and_does_not_stall() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 100);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(16);
    let _watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    sim.block_on(async {
        sim.sleep(secs(1)).await;
        server.set(2, 7);
        sim.sleep(secs(1)).await;
        server.set(3, 8);
        sim.sleep(secs(1)).await;
        assert_eq!(indexes(&drain(&rx)), vec![100, 7, 8]);
    });
}

#[test]
fn many_watches_share_one_fetch_stream() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 0u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(100_000);
    let watches: Vec<_> = (0..1000)
        .map(|_| {
            typed
                .notify(MockRequest::new("k"), "k", tx.clone())
                .unwrap()
        })
        .collect();
    sim.block_on(async {
        for i in 2..=6 {
            sim.sleep(secs(1)).await;
            server.set(i, i);
        }
        sim.sleep(secs(1)).await;
    });
    assert_eq!(drain(&rx).len(), 1000 * 6);
    // One initial read, then one blocking read per change plus the one left open.
    assert_eq!(server.reads(), 7);
    assert_eq!(cache.metrics().total().watches, 1000);
    drop(watches);
    assert_eq!(cache.metrics().total().watches, 0);
}

#[test]
fn late_watcher_gets_current_value_at_once() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx1, rx1) = async_channel::bounded(16);
    let _w1 = typed.notify(MockRequest::new("k"), "first", tx1).unwrap();
    sim.block_on(async {
        sim.sleep(secs(1)).await;
        server.set(2, 6);
        sim.sleep(secs(1)).await;
        let (tx2, rx2) = async_channel::bounded(16);
        let _w2 = typed.notify(MockRequest::new("k"), "second", tx2).unwrap();
        let ev = rx2.try_recv().unwrap();
        assert_eq!(
            (ev.correlation_id, ev.meta.index, ev.meta.hit),
            ("second", 6, true)
        );
        server.set(3, 7);
        sim.sleep(secs(1)).await;
        assert_eq!(indexes(&drain(&rx1)), vec![5, 6, 7]);
        assert_eq!(indexes(&drain(&rx2)), vec![7]);
    });
    assert_eq!(
        server.reads(),
        4,
        "the late watcher joined the same fetch stream"
    );
}

#[test]
fn dropping_the_handle_stops_the_watch_and_leaves_nothing_running() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed =
        cache.register(server.blocking_type(RegisterOptions::new().query_timeout(secs(60))));
    let (tx, rx) = async_channel::bounded(16);
    let watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    sim.block_on(async {
        sim.sleep(secs(1)).await;
        assert_eq!(drain(&rx).len(), 1);
        drop(watch);
        assert!(rx.is_closed(), "the sink was dropped at once");
        // The open blocking fetch may finish; nothing starts after it.
        sim.sleep(secs(600)).await;
    });
    assert_eq!(server.reads(), 2);
    assert_eq!(
        sim.pending_timers(),
        1,
        "only the expiry timer of the cached entry remains"
    );
    assert_eq!(cache.metrics().total().watches, 0);
}

#[test]
fn dropping_the_receiver_ends_the_watch() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed =
        cache.register(server.blocking_type(RegisterOptions::new().query_timeout(secs(60))));
    let (tx, rx) = async_channel::bounded(16);
    let watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    sim.block_on(async {
        sim.sleep(secs(1)).await;
        drop(rx);
        sim.sleep(secs(600)).await;
    });
    assert!(!watch.is_active());
    assert_eq!(
        server.reads(),
        2,
        "the watch noticed at the next fetch and stopped"
    );
    assert_eq!(cache.metrics().total().watches, 0);
}

/// A blocking watch of "k" (server at index 5) through `notify_until` whose signal is
/// `stop`, on a sink of `cap` events.
struct UntilWatch {
    sim: SimRuntime,
    cache: Cache,
    server: Arc<MockServer<u64>>,
    typed: cache_core::TypedCache<MockType<u64>>,
    rx: Receiver<Event<u64>>,
    stop: futures::channel::oneshot::Sender<()>,
}

fn until_watch(cap: usize) -> UntilWatch {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(cap);
    let (stop, stopped) = futures::channel::oneshot::channel::<()>();
    typed
        .notify_until(MockRequest::new("k"), "k", tx, async move {
            let _ = stopped.await;
        })
        .unwrap();
    UntilWatch {
        sim,
        cache,
        server,
        typed,
        rx,
        stop,
    }
}

#[test]
fn cancel_signal_stops_the_watch() {
    let UntilWatch {
        sim,
        cache,
        server,
        typed: _typed,
        rx,
        stop,
    } = until_watch(16);
    sim.block_on(async {
        sim.sleep(secs(1)).await;
        assert_eq!(drain(&rx).len(), 1);
        stop.send(()).unwrap();
        sim.sleep(secs(1)).await;
        assert!(rx.is_closed());
        server.set(2, 6);
        sim.sleep(secs(1)).await;
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Closed);
    });
    assert_eq!(cache.metrics().total().watches, 0);
}

/// Once the `notify_until` signal has completed, nothing more is delivered, even before the
/// task waiting on it has run: a change stored at once after the signal (here a prepopulate,
/// which delivers in the caller) is not delivered (before: it was, until that task ran; seen
/// on async-std by the real-runtime Consul scenarios). Contract: Watch 8.
#[test]
fn nothing_is_delivered_after_the_cancel_signal_completed() {
    let UntilWatch {
        sim,
        cache,
        server: _server,
        typed,
        rx,
        stop,
    } = until_watch(16);
    sim.block_on(async {
        sim.sleep(secs(1)).await;
        assert_eq!(indexes(&drain(&rx)), [5]);
    });
    // No task runs between these two lines.
    stop.send(()).unwrap();
    typed
        .prepopulate(&cache_core::RequestInfo::new("k"), 2, 9)
        .unwrap();
    assert_eq!(drain(&rx).len(), 0, "delivered after the signal");
    sim.block_on(sim.sleep(secs(1)));
    assert_eq!(cache.metrics().total().watches, 0);
}

/// The same for an event waiting for room in a full sink: room that appears after the signal
/// does not let it through (the waiting send checks the signal before each poll). Contract:
/// Watch 8.
#[test]
fn an_event_waiting_for_room_is_not_delivered_after_the_cancel_signal() {
    let UntilWatch {
        sim,
        cache,
        server,
        typed: _typed,
        rx,
        stop,
    } = until_watch(1);
    sim.block_on(async {
        sim.sleep(secs(1)).await;
        // The sink holds index 5; the change to 6 waits for room.
        server.set(2, 6);
        sim.sleep(secs(1)).await;
    });
    stop.send(()).unwrap();
    let first: Event<u64> = rx.try_recv().unwrap();
    assert_eq!(first.meta.index, 5);
    sim.block_on(sim.sleep(secs(1)));
    let after: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|e| e.meta.index)
        .collect();
    assert!(after.is_empty(), "delivered after the signal: {after:?}");
    assert_eq!(cache.metrics().total().watches, 0);
}

#[test]
fn close_ends_every_watch() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(16);
    let _a = typed
        .notify(MockRequest::new("a"), "a", tx.clone())
        .unwrap();
    let _b = typed.notify(MockRequest::new("b"), "b", tx).unwrap();
    sim.block_on(async {
        sim.sleep(secs(1)).await;
        assert_eq!(drain(&rx).len(), 2);
        cache.close();
        assert!(rx.is_closed(), "every sink is dropped on close");
        assert!(matches!(
            typed.notify(MockRequest::new("c"), "c", async_channel::bounded(1).0),
            Err(WatchError::Closed)
        ));
    });
}

#[test]
fn slow_consumer_gets_buffer_plus_at_most_two_and_the_latest() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 0u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (slow_tx, slow_rx) = async_channel::bounded(1);
    let (fast_tx, fast_rx) = async_channel::bounded(100);
    let _slow = typed
        .notify(MockRequest::new("k"), "slow", slow_tx)
        .unwrap();
    let _fast = typed
        .notify(MockRequest::new("k"), "fast", fast_tx)
        .unwrap();
    sim.block_on(async {
        for i in 2..=20 {
            sim.sleep(secs(1)).await;
            server.set(i * 10, i);
        }
        sim.sleep(secs(1)).await;
        assert_eq!(drain(&fast_rx).len(), 20, "the fast consumer is not slowed");
        let mut got = Vec::new();
        loop {
            let next = futures::future::select(Box::pin(slow_rx.recv()), sim.sleep(secs(5))).await;
            match next {
                futures::future::Either::Left((Ok(ev), _)) => got.push(ev),
                _ => break,
            }
        }
        assert!(
            got.len() <= 3,
            "buffer of 1 plus at most two: {:?}",
            indexes(&got)
        );
        let last = got.last().unwrap();
        assert_eq!((last.meta.index, last.result), (20, Some(200)));
    });
}

#[test]
fn watched_entry_is_not_expired() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(
        server.blocking_type(
            RegisterOptions::new()
                .last_get_ttl(secs(3600))
                .query_timeout(secs(600)),
        ),
    );
    let (tx, _rx) = async_channel::bounded(16);
    let watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    sim.block_on(async {
        sim.sleep(secs(5 * 3600)).await;
        assert_eq!(cache.len(), 1);
        drop(watch);
        sim.sleep(secs(2 * 3600)).await;
        assert_eq!(cache.len(), 0, "expires once unwatched");
    });
}

#[test]
fn polling_watch_requires_max_age() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    let (tx, _rx) = async_channel::bounded::<Event<u64>>(1);
    let err = typed.notify(MockRequest::new("k"), "k", tx).unwrap_err();
    assert!(matches!(err, WatchError::MaxAgeRequired(_)));
    assert!(err.to_string().contains("max_age"));
    assert!(matches!(
        typed.notify(MockRequest::new(""), "k", async_channel::bounded(1).0),
        Err(WatchError::EmptyKey)
    ));
}

#[test]
fn polling_watch_polls_every_max_age_and_delivers_changes() {
    let sim = SimRuntime::new(3);
    let cache = Cache::new(sim.handle());
    let value = Arc::new(AtomicU64::new(1));
    let v = value.clone();
    let ty = MockType::new(RegisterOptions::new(), move |_, _| {
        let v = v.load(Ordering::SeqCst);
        async move { Ok(FetchResult::new(v, 1)) }
    })
    .compare_values();
    let calls = ty.calls();
    let typed = cache.register(ty);
    let (tx, rx) = async_channel::bounded(16);
    let _watch = typed
        .notify(MockRequest::new("k").max_age(secs(30)), "k", tx)
        .unwrap();
    sim.block_on(async {
        sim.sleep(secs(100)).await;
        // Polls at 0 and then every 30–33 s: 0, ~30, ~60, ~90.
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(drain(&rx).len(), 1, "same value, same index: one event");
        value.store(2, Ordering::SeqCst);
        sim.sleep(secs(40)).await;
        let events = drain(&rx);
        assert_eq!(events.len(), 1, "a changed value is delivered");
        assert_eq!(events[0].result, Some(2));
    });
}

#[test]
fn watch_stream_yields_updates() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), "a".to_string(), 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let mut stream = typed.watch(MockRequest::new("k")).unwrap();
    sim.block_on(async {
        let first = stream.next().await.unwrap();
        assert_eq!(first.result.as_deref(), Some("a"));
        server.set("b".into(), 2);
        let next = stream.next().await.unwrap();
        assert_eq!((next.result.as_deref(), next.meta.index), (Some("b"), 2));
    });
    drop(stream);
    assert_eq!(cache.metrics().total().watches, 0);
}

#[test]
fn refresh_type_watch_follows_background_refresh() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new().refresh(true)));
    let (tx, rx) = async_channel::bounded(16);
    let watch = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    sim.block_on(async {
        sim.sleep(secs(1)).await;
        server.set(2, 6);
        sim.sleep(secs(1)).await;
        assert_eq!(indexes(&drain(&rx)), vec![5, 6]);
        drop(watch);
        // Refresh goes on without the watch.
        server.set(3, 7);
        sim.sleep(secs(1)).await;
        assert_eq!(
            typed.get(&MockRequest::new("k")).await.unwrap().meta.index,
            7
        );
    });
    cache.close();
}

#[test]
fn prepopulate_is_delivered_to_watches_and_cache_notify_checks_registration() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(16);
    let _watch = cache
        .notify::<MockType<u64>, _, _>(MockRequest::new("k"), "k", tx)
        .unwrap();
    sim.block_on(async {
        sim.sleep(secs(1)).await;
        typed
            .prepopulate(&cache_core::RequestInfo::new("k"), 99, 50)
            .unwrap();
        let events = drain(&rx);
        assert_eq!(indexes(&events), vec![5, 50]);
        assert_eq!(events[1].result, Some(99));
    });
    let (tx, _rx) = async_channel::bounded::<Event<String>>(1);
    assert!(matches!(
        cache.notify::<MockType<String>, _, _>(MockRequest::new("k"), "k", tx),
        Err(WatchError::NotRegistered(_))
    ));
}

#[test]
fn watch_stream_slow_reader_gets_latest_and_ends_on_close() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 0u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let mut stream = typed.watch(MockRequest::new("k")).unwrap();
    sim.block_on(async {
        // Nobody reads while ten changes happen.
        for i in 2..=11 {
            sim.sleep(secs(1)).await;
            server.set(i * 10, i);
        }
        sim.sleep(secs(1)).await;
        let mut got = Vec::new();
        loop {
            let next = futures::future::select(stream.next(), sim.sleep(secs(5))).await;
            match next {
                futures::future::Either::Left((Some(ev), _)) => got.push(ev.meta.index),
                _ => break,
            }
        }
        assert!(got.len() <= 3, "one buffered plus at most two: {got:?}");
        assert_eq!(got.last(), Some(&11));
        cache.close();
        assert!(
            stream.next().await.is_none(),
            "the stream ends when the cache closes"
        );
    });
}
