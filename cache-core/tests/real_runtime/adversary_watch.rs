//! Adversarial cases for the watch API (`notify`, `notify_until`, the `Stream` form) on real
//! runtimes: slow and vanishing readers, hundreds of watches on one channel, index resets and
//! errors mid-delivery, churn, races with close, polled values that change without their
//! index, and sinks that misbehave (contract: Watch, Lifecycle 2, 6, 7; Fetch 5, 9).
//!
//! Written once against `SharedRuntime`, like `adversary.rs` beside it, and run by every
//! adapter crate: `cache-tokio` in `tests/adversary_watch.rs` (a current-thread runtime and a
//! 2-worker multi-thread runtime with the case blocked on from the test's thread),
//! `cache-async-std` and `cache-smol` in `tests/adversary.rs`. An adapter includes it with
//! `#[macro_use] #[path = "../../cache-core/tests/real_runtime/adversary_watch.rs"] mod
//! adversary_watch;` and calls `adversary_watch_cases!(harness)` (the harness shape of
//! `consul_scenarios.rs`). Every case runs under a [`Watchdog`] that aborts the process if it
//! still runs after 60 s; tasks, sleeps and timeouts go through the cache's own `Runtime` and
//! `futures`. Assertions are what must hold whatever the timing: "the last event carries the
//! latest index", "at most buffer + 2 events", "no index goes back except on a reset", "every
//! watch has ended once close has returned".
//!
//! [`Watchdog`]: cache_core::testing::Watchdog

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_core::testing::{MockError, MockRequest, MockServer, MockType};
use cache_core::watch::{EventSink, SinkClosed, TrySendError, UpdateEvent};
use cache_core::{
    BackoffPolicy, BoxFuture, Cache, CacheType, FetchOptions, FetchResult, RegisterOptions,
    RequestInfo, SharedRuntime, WatchError,
};
use futures::{Stream, StreamExt};

/// One `#[test]` per case, each run by `$harness` under a watchdog. `$harness` is called with
/// the case as `FnOnce(SharedRuntime) -> BoxFuture<'static, ()>`; the including module must be
/// named `adversary_watch`.
macro_rules! adversary_watch_cases {
    ($harness:path) => {
        adversary_watch_cases!(@cases $harness;
            stream_many_of_one_entry_then_close,
            stream_slow_reader_gets_latest,
            stream_dropped_mid_delivery,
            stream_ends_on_reregistration,
            many_watches_share_one_channel,
            slow_consumer_buffer_plus_two,
            index_resets_mid_delivery,
            racing_prepopulate_resets,
            errors_then_recovery,
            fatal_error_refresh_type_with_watches,
            churn_then_expiry,
            notify_racing_close,
            polled_value_eq,
            closed_and_full_sinks,
            panicking_sink,
            panicking_sink_on_prepopulate,
        );
    };
    (@cases $harness:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let _watchdog = ::cache_core::testing::Watchdog::arm(concat!(
                    "adversary watch case ",
                    module_path!(),
                    "::",
                    stringify!($case)
                ));
                $harness(|rt| ::std::boxed::Box::pin($crate::adversary_watch::$case(rt)));
            }
        )*
    };
}

// ===== Helpers =====

const LONG: Duration = Duration::from_secs(10);

type Ev = UpdateEvent<usize, u64, MockError>;
type Rx = async_channel::Receiver<Ev>;

// The including crate declares the shared harness (`real_runtime/harness.rs`) as `harness`.
use crate::harness::{MARGIN, eventually, sleep, spawn, timeout, within, yield_now};

/// The next event of a channel (`None` once it closed), failing after 10 s.
async fn recv<T>(rt: &SharedRuntime, rx: &async_channel::Receiver<T>, what: &str) -> Option<T> {
    within(rt, LONG, what, rx.recv()).await.ok()
}

/// The next item of a stream (`None` once it ended), failing after 10 s.
async fn next<S: Stream + Unpin>(rt: &SharedRuntime, s: &mut S, what: &str) -> Option<S::Item> {
    within(rt, LONG, what, s.next()).await
}

/// Nothing arrives on `s` for `quiet` (an "at most" check: it cannot fail by being slow).
async fn stays_quiet<S: Stream + Unpin>(rt: &SharedRuntime, s: &mut S, quiet: Duration) -> bool {
    timeout(rt, quiet, s.next()).await.is_none()
}

/// Reads `rx` until an event at `index` arrives; returns the events read. Fails on an index
/// that went backwards, on a closed channel, or after 10 s.
async fn read_until_index(rt: &SharedRuntime, rx: &Rx, index: u64, what: &str) -> Vec<Ev> {
    let mut seen: Vec<Ev> = Vec::new();
    loop {
        let ev = recv(rt, rx, what).await.expect("the channel closed");
        if let Some(prev) = seen.last() {
            assert!(
                ev.meta.index >= prev.meta.index,
                "{what}: index went back {} -> {} without a reset",
                prev.meta.index,
                ev.meta.index
            );
        }
        let done = ev.meta.index == index;
        seen.push(ev);
        if done {
            return seen;
        }
    }
}

/// A backoff that retries within a fraction of a second, so recovery is quick.
fn fast_backoff() -> BackoffPolicy {
    BackoffPolicy::new()
        .with_unit(Duration::from_millis(20))
        .with_max_wait(Duration::from_millis(200))
}

fn blocking() -> RegisterOptions {
    RegisterOptions::new().supports_blocking(true)
}

/// A blocking type answering at once with a new index every time (a hot stream of changes):
/// value = index.
fn hot(counter: &Arc<AtomicU64>) -> MockType<u64> {
    let c = counter.clone();
    MockType::new(blocking(), move |_, _| {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok(FetchResult::new(n, n)) }
    })
}

fn load(n: &AtomicUsize) -> usize {
    n.load(Ordering::SeqCst)
}

/// Waits until `calls` stops growing: no more than one call in a 50 ms window (a chain that
/// should have stopped fetches thousands of times there).
async fn fetching_stops(rt: &SharedRuntime, what: &str, calls: &AtomicUsize) {
    let deadline = rt.now() + LONG;
    loop {
        let before = load(calls);
        sleep(rt, Duration::from_millis(50)).await;
        if load(calls) <= before + 1 {
            return;
        }
        assert!(rt.now() < deadline, "{what}: fetching never stopped");
    }
}

/// A current value read back by a get (a hit once the entry holds one).
async fn entry_index(typed: &cache_core::TypedCache<MockType<u64>>, key: &str) -> u64 {
    typed
        .get(&MockRequest::new(key))
        .await
        .map(|r| r.meta.index)
        .unwrap_or(0)
}

// ===== The Stream form =====

/// A hundred streams of one entry: each gets the current value at once, every change of a
/// burst up to the latest with rising indexes, over one upstream fetch stream; close ends
/// every stream (`None`, and `None` again), and a watch after close is refused (contract:
/// Watch 1, 3, 6, 8; Lifecycle 6).
pub(crate) async fn stream_many_of_one_entry_then_close(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let mut first = typed.watch(MockRequest::new("k")).expect("watch");
    let ev = next(&rt, &mut first, "the first event")
        .await
        .expect("an event");
    assert_eq!((ev.result, ev.meta.index), (Some(1), 3));
    assert!(ev.error.is_none());
    let mut streams: Vec<_> = (0..100)
        .map(|_| typed.watch(MockRequest::new("k")).expect("watch"))
        .collect();
    for s in &mut streams {
        let ev = next(&rt, s, "the current value").await.expect("an event");
        assert_eq!((ev.result, ev.meta.index), (Some(1), 3));
    }
    assert_eq!(cache.metrics().total().watches, 101);
    streams.push(first);
    let reads = server.reads();
    for i in 4..=40 {
        server.set(i, i);
        yield_now().await;
    }
    for s in &mut streams {
        let mut last = 3;
        while last < 40 {
            let ev = next(&rt, s, "the burst").await.expect("an event");
            assert!(ev.meta.index > last, "{} after {last}", ev.meta.index);
            assert_eq!(ev.result, Some(ev.meta.index));
            assert!(ev.error.is_none());
            last = ev.meta.index;
        }
    }
    // 101 watches, one fetch stream: each read answers a change (37) or is the open one.
    let n = server.reads() - reads;
    assert!(
        n <= 37 + 2,
        "{n} upstream reads for 37 changes and 101 streams"
    );
    cache.close();
    assert_eq!(cache.metrics().total().watches, 0);
    for s in &mut streams {
        within(&rt, MARGIN, "the stream ends on close", async {
            let mut left = 0;
            while s.next().await.is_some() {
                left += 1;
                assert!(left <= 1, "events after close");
            }
        })
        .await;
        assert!(s.next().await.is_none(), "an ended stream came back");
    }
    assert!(matches!(
        typed.watch(MockRequest::new("k")),
        Err(WatchError::Closed)
    ));
}

/// A stream that is not read while 300 changes go by holds one event: once the entry has the
/// latest, the reader gets at most three events, the last one the latest, then nothing
/// (contract: Watch 7).
pub(crate) async fn stream_slow_reader_gets_latest(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 0u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let mut s = typed.watch(MockRequest::new("k")).expect("watch");
    for i in 2..=300 {
        server.set(i, i);
        if i % 10 == 0 {
            yield_now().await;
        }
    }
    within(&rt, LONG, "the entry has the latest", async {
        while entry_index(&typed, "k").await != 300 {
            sleep(&rt, Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut n = 0;
    let mut last = 0;
    while last != 300 {
        let ev = next(&rt, &mut s, "catching up").await.expect("an event");
        assert!(ev.meta.index >= last, "{} after {last}", ev.meta.index);
        assert_eq!(ev.result, Some(ev.meta.index));
        last = ev.meta.index;
        n += 1;
    }
    assert!(n <= 3, "{n} events to catch up: the stream holds one");
    assert!(stays_quiet(&rt, &mut s, Duration::from_millis(200)).await);
    cache.close();
}

/// Streams of a hot entry dropped mid-delivery: after reading a few events, while a task is
/// parked in `next()` (aborted), and on other threads. The survivor goes on, the watch count
/// follows at once, and once the last is dropped the chain stops (contract: Watch 8).
pub(crate) async fn stream_dropped_mid_delivery(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let counter = Arc::new(AtomicU64::new(0));
    let ty = hot(&counter);
    let calls = ty.calls();
    let typed = cache.register(ty);
    let mut keep = typed.watch(MockRequest::new("k")).expect("watch");
    next(&rt, &mut keep, "the first event")
        .await
        .expect("an event");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut s = typed.watch(MockRequest::new("k")).expect("watch");
        let task_rt = rt.clone();
        tasks.push(spawn(&rt, async move {
            let rt = task_rt;
            for _ in 0..i % 5 {
                next(&rt, &mut s, "a reader's event")
                    .await
                    .expect("an event");
            }
        }));
    }
    let mut parked = Vec::new();
    for _ in 0..10 {
        let mut s = typed.watch(MockRequest::new("k")).expect("watch");
        parked.push(spawn(&rt, async move { while s.next().await.is_some() {} }));
    }
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let s = typed.watch(MockRequest::new("k")).expect("watch");
            std::thread::spawn(move || drop(s))
        })
        .collect();
    for t in tasks {
        within(&rt, LONG, "a reader", t)
            .await
            .expect("a reader panicked");
    }
    yield_now().await;
    for t in &parked {
        t.abort();
    }
    for t in parked {
        let r = within(&rt, MARGIN, "an aborted reader", t).await;
        assert!(r.is_err(), "a parked reader ended");
    }
    eventually(&rt, "the threads dropped their streams", || {
        threads.iter().all(|t| t.is_finished())
    })
    .await;
    for t in threads {
        t.join().expect("a thread panicked");
    }
    assert_eq!(cache.metrics().total().watches, 1);
    let mut last = 0;
    for _ in 0..5 {
        let ev = next(&rt, &mut keep, "the survivor's events")
            .await
            .expect("an event");
        assert!(ev.meta.index > last);
        last = ev.meta.index;
    }
    drop(keep);
    assert_eq!(cache.metrics().total().watches, 0);
    fetching_stops(&rt, "no stream is left", &calls).await;
    cache.close();
}

/// A new registration of the type ends the old registration's streams and channel watches,
/// and the old handle refuses new ones (contract: Lifecycle 7, Watch 8).
pub(crate) async fn stream_ends_on_reregistration(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let mut s = typed.watch(MockRequest::new("k")).expect("watch");
    next(&rt, &mut s, "the first event")
        .await
        .expect("an event");
    let (tx, rx) = async_channel::bounded::<Ev>(8);
    let handle = typed.notify(MockRequest::new("k"), 0, tx).expect("notify");
    recv(&rt, &rx, "the first event").await.expect("an event");
    let typed2 = cache.register(server.blocking_type(RegisterOptions::new()));
    within(&rt, MARGIN, "the old stream ends", async {
        let mut left = 0;
        while s.next().await.is_some() {
            left += 1;
            assert!(left <= 1);
        }
    })
    .await;
    within(&rt, MARGIN, "the old channel closes", async {
        while rx.recv().await.is_ok() {}
    })
    .await;
    assert!(!handle.is_active());
    assert!(matches!(
        typed.watch(MockRequest::new("k")),
        Err(WatchError::Replaced(_))
    ));
    let (tx, _rx) = async_channel::bounded::<Ev>(8);
    assert!(matches!(
        typed.notify(MockRequest::new("k"), 0, tx),
        Err(WatchError::Replaced(_))
    ));
    let mut s2 = typed2.watch(MockRequest::new("k")).expect("watch");
    let ev = next(&rt, &mut s2, "the new registration's event")
        .await
        .expect("an event");
    assert_eq!((ev.result, ev.meta.index), (Some(1), 3));
    assert_eq!(cache.metrics().total().watches, 1);
    cache.close();
}

// ===== Many watches, one channel =====

/// 200 watches of one entry and 100 of 100 entries on one bounded(32) channel, told apart by
/// correlation id, read by one consumer: after a burst every watch ends at the latest index
/// and value, no watch ever sees its index go back, and dropping the handles ends them all
/// and closes the channel (contract: Watch 1, 3, 6, 7, 8).
pub(crate) async fn many_watches_share_one_channel(rt: SharedRuntime) {
    const ONE: usize = 200;
    const MANY: usize = 100;
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded::<Ev>(32);
    let last = Arc::new(Mutex::new(vec![(0u64, 0u64); ONE + MANY]));
    let broken = Arc::new(Mutex::new(Vec::<String>::new()));
    let consumer = {
        let (last, broken) = (last.clone(), broken.clone());
        spawn(&rt, async move {
            let mut events = 0usize;
            while let Ok(ev) = rx.recv().await {
                events += 1;
                let mut last = last.lock().unwrap();
                let (index, _) = last[ev.correlation_id];
                if ev.meta.index < index || ev.result != Some(ev.meta.index) || ev.error.is_some() {
                    broken.lock().unwrap().push(format!(
                        "watch {}: {:?} at {} after {index}",
                        ev.correlation_id, ev.result, ev.meta.index
                    ));
                }
                last[ev.correlation_id] = (ev.meta.index, ev.result.unwrap_or(0));
            }
            events
        })
    };
    let mut handles = Vec::new();
    for cid in 0..ONE {
        handles.push(
            typed
                .notify(MockRequest::new("hot"), cid, tx.clone())
                .expect("notify"),
        );
    }
    for i in 0..MANY {
        handles.push(
            typed
                .notify(MockRequest::new(&format!("k{i}")), ONE + i, tx.clone())
                .expect("notify"),
        );
    }
    drop(tx);
    for i in 2..=60 {
        server.set(i, i);
        yield_now().await;
    }
    eventually(&rt, "every watch has the latest", || {
        last.lock().unwrap().iter().all(|&l| l == (60, 60))
    })
    .await;
    let m = cache.metrics().total();
    assert_eq!(
        (m.watches, m.entries),
        ((ONE + MANY) as u64, MANY as u64 + 1)
    );
    drop(handles);
    assert_eq!(cache.metrics().total().watches, 0);
    let events = within(
        &rt,
        MARGIN,
        "the channel closes with the last watch",
        consumer,
    )
    .await
    .expect("the consumer panicked");
    assert!(events >= ONE + MANY);
    let broken = broken.lock().unwrap();
    assert!(
        broken.is_empty(),
        "{} bad events: {:?}",
        broken.len(),
        &broken[..broken.len().min(5)]
    );
    cache.close();
}

/// A slow consumer (bounded(4), unread) beside a fast one on the same entry: the fast one
/// sees the latest while the slow one is full; once drained the slow one gets its buffer plus
/// at most two more events, the last the latest, then nothing. Then the same for a polled
/// watch whose value changes at a constant index (contract: Watch 4, 7).
pub(crate) async fn slow_consumer_buffer_plus_two(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (slow_tx, slow_rx) = async_channel::bounded::<Ev>(4);
    let (fast_tx, fast_rx) = async_channel::bounded::<Ev>(1024);
    let _slow = typed
        .notify(MockRequest::new("k"), 0, slow_tx)
        .expect("notify");
    let _fast = typed
        .notify(MockRequest::new("k"), 1, fast_tx)
        .expect("notify");
    eventually(&rt, "the slow watch's first event", || !slow_rx.is_empty()).await;
    for i in 2..=200 {
        server.set(i, i);
        if i % 10 == 0 {
            yield_now().await;
        }
    }
    read_until_index(&rt, &fast_rx, 200, "the fast watch").await;
    assert!(slow_rx.len() <= 4);
    let caught_up = read_until_index(&rt, &slow_rx, 200, "the slow watch").await;
    assert!(
        caught_up.len() <= 4 + 2,
        "{} events to catch up with a buffer of 4: {:?}",
        caught_up.len(),
        caught_up.iter().map(|e| e.meta.index).collect::<Vec<_>>()
    );
    assert!(caught_up.iter().all(|e| e.result == Some(e.meta.index)));
    assert!(
        timeout(&rt, Duration::from_millis(200), slow_rx.recv())
            .await
            .is_none()
    );
    cache.close();

    // Polled: the value changes at index 3 every 3 ms, the watch polls every 20 ms.
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 0u64, 3);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    let req = MockRequest::new("p").max_age(Duration::from_millis(20));
    let (slow_tx, slow_rx) = async_channel::bounded::<Ev>(2);
    let (fast_tx, fast_rx) = async_channel::bounded::<Ev>(1024);
    let _slow = typed.notify(req.clone(), 0, slow_tx).expect("notify");
    let _fast = typed.notify(req, 1, fast_tx).expect("notify");
    eventually(&rt, "the slow watch's first event", || !slow_rx.is_empty()).await;
    for v in 1..=100 {
        server.set(v, 3);
        sleep(&rt, Duration::from_millis(3)).await;
    }
    within(
        &rt,
        LONG,
        "the fast polled watch sees the last value",
        async { while fast_rx.recv().await.expect("an event").result != Some(100) {} },
    )
    .await;
    let mut caught_up = Vec::new();
    within(
        &rt,
        LONG,
        "the slow polled watch sees the last value",
        async {
            loop {
                let ev = slow_rx.recv().await.expect("an event");
                let done = ev.result == Some(100);
                caught_up.push(ev.result);
                if done {
                    break;
                }
            }
        },
    )
    .await;
    assert!(
        caught_up.len() <= 2 + 2,
        "{} events to catch up with a buffer of 2: {caught_up:?}",
        caught_up.len()
    );
    assert!(
        timeout(&rt, Duration::from_millis(200), slow_rx.recv())
            .await
            .is_none()
    );
    cache.close();
}

// ===== Index resets =====

/// Storms of index resets (the server's index jumps to 1000+r, then back to 10+r) while a
/// slow channel (bounded(1)), a fast channel and a stream watch one entry, then a final reset
/// to 5 and rises to 7: every watch ends at (7, 7), a high index never comes back once a
/// higher one was seen, the slow ones catch up within buffer + 2, and every watch then sees
/// the rises to 8 and 9 (it did not keep an old high-water mark) (contract: Fetch 5, Watch 3,
/// 7).
pub(crate) async fn index_resets_mid_delivery(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (slow_tx, slow_rx) = async_channel::bounded::<Ev>(1);
    let (fast_tx, fast_rx) = async_channel::bounded::<Ev>(4096);
    let _slow = typed
        .notify(MockRequest::new("k"), 0, slow_tx)
        .expect("notify");
    let _fast = typed
        .notify(MockRequest::new("k"), 1, fast_tx)
        .expect("notify");
    let mut stream = typed.watch(MockRequest::new("k")).expect("watch");
    eventually(&rt, "the slow watch's first event", || !slow_rx.is_empty()).await;
    let mut top = 2u64;
    for round in 0..3u64 {
        for r in 0..40u64 {
            let high = 1000 * (round + 1) + r;
            server.set(high, high);
            yield_now().await;
            server.set(10 + r, 10 + r);
            yield_now().await;
        }
        // A final reset below every low, then rises.
        for i in [5, 6, 7] {
            server.set(i, i);
        }
        // The fast watch: ends at 7, a high never comes back.
        let mut highest = 0;
        within(&rt, LONG, "the fast watch ends at 7", async {
            loop {
                let ev = fast_rx.recv().await.expect("an event");
                assert_eq!(ev.result, Some(ev.meta.index));
                if ev.meta.index >= 1000 {
                    assert!(
                        ev.meta.index > highest,
                        "{} came back after {highest}",
                        ev.meta.index
                    );
                    highest = ev.meta.index;
                }
                if ev.meta.index == 7 && fast_rx.is_empty() {
                    break;
                }
            }
        })
        .await;
        let slow = within(&rt, LONG, "the slow watch ends at 7", async {
            let mut got = Vec::new();
            loop {
                let ev = slow_rx.recv().await.expect("an event");
                got.push(ev.meta.index);
                if ev.meta.index == 7 {
                    return got;
                }
            }
        })
        .await;
        assert!(slow.len() <= 1 + 2, "slow watch, round {round}: {slow:?}");
        let mut streamed = Vec::new();
        while streamed.last() != Some(&7) {
            let ev = next(&rt, &mut stream, "the stream ends at 7")
                .await
                .expect("an event");
            streamed.push(ev.meta.index);
        }
        assert!(
            streamed.len() <= 1 + 2,
            "stream, round {round}: {streamed:?}"
        );
        // After the reset every watch follows the lower index up again.
        for i in [8, 9] {
            server.set(i, i);
            let what = format!("round {round}: every watch sees {i} after the reset");
            read_until_index(&rt, &fast_rx, i, &what).await;
            read_until_index(&rt, &slow_rx, i, &what).await;
            while next(&rt, &mut stream, &what)
                .await
                .expect("an event")
                .meta
                .index
                != i
            {}
        }
        top = top.max(9);
    }
    assert_eq!(top, 9);
    cache.close();
}

/// Two threads prepopulating one watched entry at once, one with rising high indexes, one
/// with low ones (each a reset below the other's): once both are done, every watch's last
/// event carries the entry's index and value, and the next rise is delivered (contract:
/// Lifecycle 5, Fetch 5, Watch 7).
pub(crate) async fn racing_prepopulate_resets(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    // A blocking query that never answers: the values come from prepopulate alone.
    let ty = MockType::new(blocking(), |_, _| {
        std::future::pending::<Result<FetchResult<u64>, MockError>>()
    });
    let typed = cache.register(ty);
    typed
        .prepopulate(&RequestInfo::new("k"), 1, 1)
        .expect("prepopulate");
    let (tx, rx) = async_channel::bounded::<Ev>(1 << 16);
    let _watch = typed.notify(MockRequest::new("k"), 0, tx).expect("notify");
    let mut stream = typed.watch(MockRequest::new("k")).expect("watch");
    let mut stale = Vec::new();
    for round in 0..5u64 {
        let threads: Vec<_> = [1_000_000 * (round + 1), 2]
            .into_iter()
            .map(|base| {
                let typed = typed.clone();
                std::thread::spawn(move || {
                    let info = RequestInfo::new("k");
                    for r in 0..3000 {
                        typed
                            .prepopulate(&info, base + r, base + r)
                            .expect("prepopulate");
                    }
                })
            })
            .collect();
        eventually(&rt, "the prepopulating threads finish", || {
            threads.iter().all(|t| t.is_finished())
        })
        .await;
        for t in threads {
            t.join().expect("a prepopulating thread panicked");
        }
        let entry = entry_index(&typed, "k").await;
        let mut last = None;
        while let Ok(ev) = rx.try_recv() {
            last = Some(ev.meta.index);
        }
        let streamed = next(&rt, &mut stream, "the stream's event")
            .await
            .map(|e| e.meta.index);
        if last != Some(entry) || streamed != Some(entry) {
            stale.push(format!(
                "round {round}: entry at {entry}, channel's last event {last:?}, stream's {streamed:?}"
            ));
        }
        // The next rise is news to every watch.
        typed
            .prepopulate(&RequestInfo::new("k"), entry + 1, entry + 1)
            .expect("prepopulate");
        let got = rx.try_recv().ok().map(|e| e.meta.index);
        if got != Some(entry + 1) {
            stale.push(format!(
                "round {round}: the rise to {} was not delivered",
                entry + 1
            ));
        }
        while rx.try_recv().is_ok() {}
        while !stays_quiet(&rt, &mut stream, Duration::from_millis(1)).await {}
    }
    assert!(stale.is_empty(), "{stale:#?}");
    cache.close();
}

// ===== Errors =====

/// Errors before the first value are delivered; recovery delivers the value without error;
/// errors at an unchanged index after it are not delivered; a recovery at a new index is
/// delivered without error — for a channel, a stream, and a polled watch (contract: Watch 3,
/// 4, 5).
pub(crate) async fn errors_then_recovery(rt: SharedRuntime) {
    let cache = Cache::builder(rt.clone()).backoff(fast_backoff()).build();
    let server = MockServer::new(rt.clone(), 1u64, 5);
    server.set_error(Some(MockError::new("down")));
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded::<Ev>(64);
    let _watch = typed.notify(MockRequest::new("k"), 0, tx).expect("notify");
    let mut stream = typed.watch(MockRequest::new("k")).expect("watch");
    let ev = recv(&rt, &rx, "the first error").await.expect("an event");
    assert!(ev.error.is_some() && ev.result.is_none(), "{ev:?}");
    let ev = next(&rt, &mut stream, "the first error")
        .await
        .expect("an event");
    assert!(ev.error.is_some() && ev.result.is_none(), "{ev:?}");
    server.set_error(None);
    loop {
        let ev = recv(&rt, &rx, "the recovery").await.expect("an event");
        if ev.error.is_none() {
            assert_eq!((ev.result, ev.meta.index), (Some(1), 5));
            break;
        }
        assert!(ev.result.is_none(), "an error after a value: {ev:?}");
    }
    loop {
        let ev = next(&rt, &mut stream, "the recovery")
            .await
            .expect("an event");
        if ev.error.is_none() {
            assert_eq!((ev.result, ev.meta.index), (Some(1), 5));
            break;
        }
    }
    // Failing again at the same index: retried, not delivered.
    let reads = server.reads();
    server.set_error(Some(MockError::new("down again")));
    eventually(&rt, "the failures are retried", || {
        server.reads() >= reads + 4
    })
    .await;
    assert!(
        rx.is_empty(),
        "an error at an unchanged index was delivered: {:?}",
        rx.try_recv()
    );
    assert!(stays_quiet(&rt, &mut stream, Duration::from_millis(50)).await);
    // Recovery at a new index.
    server.set(2, 6);
    server.set_error(None);
    let ev = recv(&rt, &rx, "the new value").await.expect("an event");
    assert_eq!(
        (ev.result, ev.meta.index, ev.error.is_none()),
        (Some(2), 6, true)
    );
    let ev = next(&rt, &mut stream, "the new value")
        .await
        .expect("an event");
    assert_eq!(
        (ev.result, ev.meta.index, ev.error.is_none()),
        (Some(2), 6, true)
    );
    cache.close();

    // Polled.
    let cache = Cache::builder(rt.clone()).backoff(fast_backoff()).build();
    let server = MockServer::new(rt.clone(), 1u64, 5);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded::<Ev>(64);
    let _watch = typed
        .notify(
            MockRequest::new("p").max_age(Duration::from_millis(10)),
            0,
            tx,
        )
        .expect("notify");
    let ev = recv(&rt, &rx, "the polled value").await.expect("an event");
    assert_eq!((ev.result, ev.error.is_none()), (Some(1), true));
    let reads = server.reads();
    server.set_error(Some(MockError::new("down")));
    eventually(&rt, "the polled failures", || server.reads() >= reads + 4).await;
    assert!(
        rx.is_empty(),
        "a polled error after a value was delivered: {:?}",
        rx.try_recv()
    );
    server.set(2, 5);
    server.set_error(None);
    let ev = recv(&rt, &rx, "the polled recovery")
        .await
        .expect("an event");
    assert_eq!((ev.result, ev.error.is_none()), (Some(2), true), "{ev:?}");
    cache.close();
}

/// A refresh type whose fetch fails fatally while watched: no event at the unchanged index,
/// the watch keeps the chain going with backoff and sees the recovery; once the watch is gone
/// the fatal error stops the chain and the entry keeps its last value (contract: Refresh 3, 5;
/// Watch 3, 5).
pub(crate) async fn fatal_error_refresh_type_with_watches(rt: SharedRuntime) {
    let cache = Cache::builder(rt.clone()).backoff(fast_backoff()).build();
    let fatal = Arc::new(AtomicBool::new(false));
    let index = Arc::new(AtomicU64::new(3));
    let ty = {
        let (fatal, index) = (fatal.clone(), index.clone());
        MockType::new(
            blocking()
                .refresh(true)
                .refresh_timer(Duration::from_millis(10)),
            move |_, _| {
                let failing = fatal.load(Ordering::SeqCst);
                let i = index.load(Ordering::SeqCst);
                async move {
                    if failing {
                        Err(MockError::fatal("ACL not found"))
                    } else {
                        Ok(FetchResult::new(i, i))
                    }
                }
            },
        )
    };
    let calls = ty.calls();
    let typed = cache.register(ty);
    let (tx, rx) = async_channel::bounded::<Ev>(64);
    let watch = typed.notify(MockRequest::new("k"), 0, tx).expect("notify");
    let ev = recv(&rt, &rx, "the first value").await.expect("an event");
    assert_eq!((ev.result, ev.meta.index), (Some(3), 3));
    fatal.store(true, Ordering::SeqCst);
    eventually(&rt, "fatal errors", || {
        cache.metrics().total().fetch_errors_fatal >= 3
    })
    .await;
    assert!(
        rx.is_empty(),
        "a fatal error at an unchanged index was delivered: {:?}",
        rx.try_recv()
    );
    index.store(4, Ordering::SeqCst);
    fatal.store(false, Ordering::SeqCst);
    let ev = recv(
        &rt,
        &rx,
        "the recovery of a watched entry after a fatal error",
    )
    .await
    .expect("an event");
    assert_eq!(
        (ev.result, ev.meta.index, ev.error.is_none()),
        (Some(4), 4, true),
        "{ev:?}"
    );
    fatal.store(true, Ordering::SeqCst);
    let errors = cache.metrics().total().fetch_errors_fatal;
    eventually(&rt, "failing fatally again", || {
        cache.metrics().total().fetch_errors_fatal > errors
    })
    .await;
    drop(watch);
    assert_eq!(cache.metrics().total().watches, 0);
    fetching_stops(&rt, "the fatal error, unwatched", &calls).await;
    let r = typed.get(&MockRequest::new("k")).await.expect("a hit");
    assert_eq!(r.value, Some(4));
    assert_eq!(cache.len(), 1);
    cache.close();
}

// ===== Churn and races =====

/// Watches created and dropped in a tight loop — handle first, receiver first, detached,
/// streams, from two threads and a task — while the upstream changes every millisecond. The
/// watch count returns to 0 and every entry then expires by its 300 ms TTL (contract: Watch 8,
/// Lifecycle 2).
pub(crate) async fn churn_then_expiry(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 1);
    let typed = cache.register(
        server.blocking_type(RegisterOptions::new().last_get_ttl(Duration::from_millis(300))),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let changer = {
        let (server, stop, task_rt) = (server.clone(), stop.clone(), rt.clone());
        spawn(&rt, async move {
            let rt = task_rt;
            let mut i = 1;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                server.set(i, i);
                sleep(&rt, Duration::from_millis(1)).await;
            }
        })
    };
    let churn = |typed: cache_core::TypedCache<MockType<u64>>, seed: usize| {
        for it in 0..400 {
            let key = format!("k{}", (it + seed) % 5);
            match it % 5 {
                0 => {
                    let (tx, rx) = async_channel::bounded::<Ev>(2);
                    let h = typed
                        .notify(MockRequest::new(&key), it, tx)
                        .expect("notify");
                    drop(h);
                    drop(rx);
                }
                1 => {
                    let (tx, rx) = async_channel::bounded::<Ev>(2);
                    let h = typed
                        .notify(MockRequest::new(&key), it, tx)
                        .expect("notify");
                    drop(rx);
                    drop(h);
                }
                2 => {
                    let (tx, rx) = async_channel::bounded::<Ev>(1);
                    typed
                        .notify(MockRequest::new(&key), it, tx)
                        .expect("notify")
                        .detach();
                    drop(rx);
                }
                3 => drop(typed.watch(MockRequest::new(&key)).expect("watch")),
                _ => {
                    let s = typed.watch(MockRequest::new(&key)).expect("watch");
                    let (tx, rx) = async_channel::bounded::<Ev>(1);
                    let h = typed
                        .notify(MockRequest::new(&key), it, tx)
                        .expect("notify");
                    drop(s);
                    drop(rx);
                    drop(h);
                }
            }
        }
    };
    let threads: Vec<_> = (0..2)
        .map(|seed| {
            let typed = typed.clone();
            std::thread::spawn(move || churn(typed, seed))
        })
        .collect();
    // And from a task, awaiting an event now and then.
    for it in 0..100 {
        let (tx, rx) = async_channel::bounded::<Ev>(2);
        let h = typed
            .notify(MockRequest::new(&format!("k{}", it % 5)), it, tx)
            .expect("notify");
        if it % 10 == 0 {
            recv(&rt, &rx, "a churned watch's event")
                .await
                .expect("an event");
        }
        if it % 2 == 0 {
            drop(h);
            drop(rx);
        } else {
            drop(rx);
            drop(h);
        }
    }
    eventually(&rt, "the churning threads finish", || {
        threads.iter().all(|t| t.is_finished())
    })
    .await;
    for t in threads {
        t.join().expect("a churning thread panicked");
    }
    // Detached watches end at their next delivery or the sweep (about a second).
    eventually(&rt, "no watch is left", || {
        cache.metrics().total().watches == 0
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    within(&rt, MARGIN, "the changer stops", changer)
        .await
        .expect("the changer panicked");
    eventually(&rt, "every churned entry expires", || cache.is_empty()).await;
    assert!(cache.metrics().total().expirations >= 5);
    // The type still works.
    let (tx, rx) = async_channel::bounded::<Ev>(2);
    let _h = typed.notify(MockRequest::new("k0"), 0, tx).expect("notify");
    recv(&rt, &rx, "a new watch after the churn")
        .await
        .expect("an event");
    cache.close();
}

/// Threads calling `notify` and `watch` in a loop while another thread closes the cache:
/// once close has returned every watch is over (handle inactive, channel closed, stream
/// ended), a notify begun after close returned is refused, and the watch count is 0
/// (contract: Lifecycle 6, Watch 8).
pub(crate) async fn notify_racing_close(rt: SharedRuntime) {
    for round in 0..3 {
        let cache = Cache::new(rt.clone());
        let server = MockServer::new(rt.clone(), 1u64, 1);
        let typed = cache.register(server.blocking_type(RegisterOptions::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicUsize::new(0));
        type Kept = (
            Vec<(cache_core::WatchHandle, Rx)>,
            Vec<cache_core::WatchStream<u64, MockError>>,
            Vec<String>,
        );
        let threads: Vec<std::thread::JoinHandle<Kept>> = (0..3)
            .map(|t| {
                let (typed, closed, started) = (typed.clone(), closed.clone(), started.clone());
                std::thread::spawn(move || {
                    let (mut handles, mut streams, mut late) = (Vec::new(), Vec::new(), Vec::new());
                    for it in 0..20_000usize {
                        let after_close = closed.load(Ordering::SeqCst);
                        let key = format!("k{}", (it + t) % 7);
                        let r = if it % 3 == 0 {
                            typed.watch(MockRequest::new(&key)).map(|s| streams.push(s))
                        } else {
                            let (tx, rx) = async_channel::bounded::<Ev>(2);
                            typed
                                .notify(MockRequest::new(&key), it, tx)
                                .map(|h| handles.push((h, rx)))
                        };
                        started.fetch_add(1, Ordering::SeqCst);
                        match r {
                            Ok(()) if after_close => {
                                late.push(format!("thread {t}: a watch began after close"));
                            }
                            Ok(()) => {}
                            Err(WatchError::Closed) => break,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    (handles, streams, late)
                })
            })
            .collect();
        eventually(&rt, "the threads are watching", || load(&started) >= 150).await;
        let closer = {
            let (cache, closed) = (cache.clone(), closed.clone());
            std::thread::spawn(move || {
                cache.close();
                closed.store(true, Ordering::SeqCst);
            })
        };
        eventually(&rt, "the threads stop", || {
            closer.is_finished() && threads.iter().all(|t| t.is_finished())
        })
        .await;
        closer.join().expect("the closer panicked");
        let mut watches = 0;
        for t in threads {
            let (handles, mut streams, late) = t.join().expect("a watching thread panicked");
            assert!(late.is_empty(), "{late:?}");
            watches += handles.len() + streams.len();
            for (h, rx) in &handles {
                assert!(!h.is_active(), "round {round}: a watch outlived close");
                // Its sink was dropped: the channel closes once drained.
                while rx.try_recv().is_ok() {}
                assert!(rx.is_closed(), "round {round}: a channel outlived close");
            }
            for s in &mut streams {
                within(&rt, MARGIN, "a stream ends after close", async {
                    let mut left = 0;
                    while s.next().await.is_some() {
                        left += 1;
                        assert!(left <= 1);
                    }
                })
                .await;
            }
        }
        assert!(watches > 0);
        assert_eq!(cache.metrics().total().watches, 0, "round {round}");
    }
}

// ===== Polled watches and value_eq =====

/// A value with a timestamp that does not count as a change.
#[derive(Debug, Clone, PartialEq)]
struct Stamped {
    data: u64,
    stamp: u64,
}

/// A non-blocking type whose fetch answers `data` at `index`, stamping each answer; its
/// `value_eq` ignores the stamp (or panics, when told to).
struct StampedType {
    data: Arc<AtomicU64>,
    index: Arc<AtomicU64>,
    stamp: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
    eq_panics: Arc<AtomicBool>,
}

impl StampedType {
    fn new() -> Self {
        Self {
            data: Arc::new(AtomicU64::new(1)),
            index: Arc::new(AtomicU64::new(7)),
            stamp: Arc::new(AtomicU64::new(0)),
            calls: Arc::new(AtomicUsize::new(0)),
            eq_panics: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl CacheType for StampedType {
    type Request = MockRequest;
    type Value = Stamped;
    type Error = MockError;

    fn fetch(
        &self,
        _opts: FetchOptions<Stamped>,
        _request: &MockRequest,
    ) -> impl Future<Output = Result<FetchResult<Stamped>, MockError>> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let value = Stamped {
            data: self.data.load(Ordering::SeqCst),
            stamp: self.stamp.fetch_add(1, Ordering::SeqCst),
        };
        let index = self.index.load(Ordering::SeqCst);
        async move { Ok(FetchResult::new(value, index)) }
    }

    fn value_eq(&self, a: &Stamped, b: &Stamped) -> bool {
        assert!(!self.eq_panics.load(Ordering::SeqCst), "value_eq exploded");
        a.data == b.data
    }
}

type StampedEv = UpdateEvent<usize, Stamped, MockError>;

/// Polled watches (max_age 1 ns and huge) of values that change without their index: a
/// stamp-only change is no event, a data change is one, an index change is one; prepopulate
/// is judged the same way; a panicking `value_eq` counts as a change and poisons nothing; and
/// a type answering index 0 keeps its max_age cadence (contract: Watch 4, Fetch 4, 9;
/// Lifecycle 5).
pub(crate) async fn polled_value_eq(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let ty = StampedType::new();
    let (data, index, calls, eq_panics) = (
        ty.data.clone(),
        ty.index.clone(),
        ty.calls.clone(),
        ty.eq_panics.clone(),
    );
    let typed = cache.register(ty);

    // Tiny max_age: polls all the time, but stamps alone are no news.
    let (tx, rx) = async_channel::bounded::<StampedEv>(64);
    let tiny = typed
        .notify(
            MockRequest::new("t").max_age(Duration::from_nanos(1)),
            0,
            tx,
        )
        .expect("notify");
    let ev = recv(&rt, &rx, "the first polled value")
        .await
        .expect("an event");
    assert_eq!((ev.result.map(|v| v.data), ev.meta.index), (Some(1), 7));
    let from = load(&calls);
    eventually(&rt, "many polls", || load(&calls) >= from + 50).await;
    assert!(
        rx.is_empty(),
        "a stamp-only change was delivered: {:?}",
        rx.try_recv()
    );
    data.store(2, Ordering::SeqCst);
    let ev = recv(&rt, &rx, "the data change").await.expect("an event");
    assert_eq!(ev.result.map(|v| v.data), Some(2));
    let from = load(&calls);
    eventually(&rt, "more polls", || load(&calls) >= from + 20).await;
    assert!(
        rx.is_empty(),
        "one data change, several events: {:?}",
        rx.try_recv()
    );
    index.store(8, Ordering::SeqCst);
    let ev = recv(&rt, &rx, "the index change").await.expect("an event");
    assert_eq!((ev.result.map(|v| v.data), ev.meta.index), (Some(2), 8));
    drop(tiny);
    fetching_stops(&rt, "the tiny polled watch was dropped", &calls).await;

    // Huge max_age: no polling; prepopulate is delivered synchronously, judged by value_eq.
    let info = RequestInfo::new("h");
    typed
        .prepopulate(&info, Stamped { data: 1, stamp: 0 }, 8)
        .expect("prepopulate");
    let (tx, rx) = async_channel::bounded::<StampedEv>(64);
    let huge = typed
        .notify(MockRequest::new("h").max_age(Duration::MAX), 0, tx)
        .expect("notify");
    let ev = recv(&rt, &rx, "the prepopulated value")
        .await
        .expect("an event");
    assert_eq!((ev.result.map(|v| v.data), ev.meta.index), (Some(1), 8));
    let polls = load(&calls);
    typed
        .prepopulate(&info, Stamped { data: 1, stamp: 99 }, 8)
        .expect("prepopulate");
    assert!(rx.is_empty(), "a stamp-only prepopulate was delivered");
    typed
        .prepopulate(&info, Stamped { data: 3, stamp: 99 }, 8)
        .expect("prepopulate");
    assert_eq!(
        rx.try_recv().ok().and_then(|e| e.result).map(|v| v.data),
        Some(3)
    );
    // A panicking value_eq counts as a change, and poisons nothing.
    eq_panics.store(true, Ordering::SeqCst);
    typed
        .prepopulate(
            &info,
            Stamped {
                data: 3,
                stamp: 100,
            },
            8,
        )
        .expect("prepopulate");
    assert_eq!(
        rx.try_recv().ok().and_then(|e| e.result).map(|v| v.stamp),
        Some(100)
    );
    eq_panics.store(false, Ordering::SeqCst);
    typed
        .prepopulate(
            &info,
            Stamped {
                data: 4,
                stamp: 100,
            },
            8,
        )
        .expect("prepopulate");
    assert_eq!(
        rx.try_recv().ok().and_then(|e| e.result).map(|v| v.data),
        Some(4)
    );
    assert!(load(&calls) <= polls, "a huge max_age polled");
    drop(huge);
    cache.close();

    // Index 0 at every answer: the polled watch keeps its 100 ms cadence.
    let cache = Cache::new(rt.clone());
    let ty = StampedType::new();
    ty.index.store(0, Ordering::SeqCst);
    let (data, calls) = (ty.data.clone(), ty.calls.clone());
    let typed = cache.register(ty);
    let (tx, rx) = async_channel::bounded::<StampedEv>(64);
    let _w = typed
        .notify(
            MockRequest::new("z").max_age(Duration::from_millis(100)),
            0,
            tx,
        )
        .expect("notify");
    let ev = recv(&rt, &rx, "an index-0 polled value")
        .await
        .expect("an event");
    assert_eq!(ev.meta.index, 1, "a stored index is at least 1");
    let start = rt.now();
    let from = load(&calls);
    eventually(&rt, "index-0 polls go on", || load(&calls) >= from + 3).await;
    data.store(5, Ordering::SeqCst);
    let ev = recv(&rt, &rx, "an index-0 change").await.expect("an event");
    assert_eq!(ev.result.map(|v| v.data), Some(5));
    let elapsed = rt.now() - start;
    let n = load(&calls) - from;
    // One poll per 100 ms (+ jitter), a couple of spares for timer slack.
    let allowed = 3 + (elapsed.as_millis() / 100) as usize;
    assert!(n <= allowed, "{n} polls in {elapsed:?} at max_age 100 ms");
    cache.close();
}

// ===== Misbehaving sinks =====

/// A sink whose `try_send` and `send` panic on an event at index `from` or above.
struct PanicSink {
    from: u64,
    inner: async_channel::Sender<Ev>,
}

impl EventSink<Ev> for PanicSink {
    fn try_send(&self, event: Ev) -> Result<(), TrySendError> {
        assert!(event.meta.index < self.from, "sink exploded");
        EventSink::try_send(&self.inner, event)
    }

    fn send(&self, event: Ev) -> BoxFuture<'static, Result<(), SinkClosed>> {
        assert!(event.meta.index < self.from, "sink exploded");
        EventSink::send(&self.inner, event)
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

/// A sink that says its receiver is gone (but `is_closed` says it is not).
struct ClosedSink;

impl EventSink<Ev> for ClosedSink {
    fn try_send(&self, _event: Ev) -> Result<(), TrySendError> {
        Err(TrySendError::Closed)
    }

    fn send(&self, _event: Ev) -> BoxFuture<'static, Result<(), SinkClosed>> {
        Box::pin(async { Err(SinkClosed) })
    }

    fn is_closed(&self) -> bool {
        false
    }
}

/// A sink that is always full; its `send` never completes. Counts its calls and its live
/// `send` futures.
#[derive(Clone, Default)]
struct FullSink {
    tries: Arc<AtomicUsize>,
    sends: Arc<AtomicUsize>,
    live: Arc<AtomicUsize>,
}

struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl EventSink<Ev> for FullSink {
    fn try_send(&self, _event: Ev) -> Result<(), TrySendError> {
        self.tries.fetch_add(1, Ordering::SeqCst);
        Err(TrySendError::Full)
    }

    fn send(&self, _event: Ev) -> BoxFuture<'static, Result<(), SinkClosed>> {
        self.sends.fetch_add(1, Ordering::SeqCst);
        self.live.fetch_add(1, Ordering::SeqCst);
        let guard = LiveGuard(self.live.clone());
        Box::pin(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok(())
        })
    }

    fn is_closed(&self) -> bool {
        false
    }
}

/// A sink that panics in the chain's delivery: the watches before and after it on the entry
/// still get every change, gets still work, and close still ends everything (contract:
/// Fetch 9 — every user callback is contained).
pub(crate) async fn panicking_sink(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (a_tx, a_rx) = async_channel::bounded::<Ev>(64);
    let (p_tx, p_rx) = async_channel::bounded::<Ev>(64);
    let (b_tx, b_rx) = async_channel::bounded::<Ev>(64);
    let _a = typed
        .notify(MockRequest::new("k"), 0, a_tx)
        .expect("notify");
    let _p = typed
        .notify(
            MockRequest::new("k"),
            1,
            PanicSink {
                from: 5,
                inner: p_tx,
            },
        )
        .expect("notify");
    let _b = typed
        .notify(MockRequest::new("k"), 2, b_tx)
        .expect("notify");
    for rx in [&a_rx, &p_rx, &b_rx] {
        let ev = recv(&rt, rx, "the first event").await.expect("an event");
        assert_eq!(ev.meta.index, 3);
    }
    for i in [5, 6] {
        server.set(i, i);
        let what = format!("the watches beside a panicking sink see {i}");
        read_until_index(&rt, &a_rx, i, &what).await;
        read_until_index(&rt, &b_rx, i, &what).await;
    }
    // A watch that comes later follows the entry too.
    let (c_tx, c_rx) = async_channel::bounded::<Ev>(64);
    let _c = typed
        .notify(MockRequest::new("k"), 3, c_tx)
        .expect("notify");
    read_until_index(&rt, &c_rx, 6, "a later watch's current value").await;
    server.set(7, 7);
    read_until_index(&rt, &c_rx, 7, "a later watch sees a change").await;
    server.set_after(Duration::from_millis(20), 8, 8);
    let r = within(
        &rt,
        MARGIN,
        "a blocked get beside a panicking sink",
        typed.get(&MockRequest::new("k").min_index(7)),
    )
    .await
    .expect("a get");
    assert_eq!(r.meta.index, 8);
    cache.close();
    assert_eq!(cache.metrics().total().watches, 0);
}

/// A sink that panics on a prepopulated value: the panic stays out of the `prepopulate`
/// caller, and the watch after it on the entry still gets the value (contract: Fetch 9,
/// Lifecycle 5).
pub(crate) async fn panicking_sink_on_prepopulate(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (p_tx, p_rx) = async_channel::bounded::<Ev>(64);
    let (b_tx, b_rx) = async_channel::bounded::<Ev>(64);
    let _p = typed
        .notify(
            MockRequest::new("k"),
            1,
            PanicSink {
                from: 5,
                inner: p_tx,
            },
        )
        .expect("notify");
    let _b = typed
        .notify(MockRequest::new("k"), 2, b_tx)
        .expect("notify");
    for rx in [&p_rx, &b_rx] {
        recv(&rt, rx, "the first event").await.expect("an event");
    }
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        typed.prepopulate(&RequestInfo::new("k"), 9, 9)
    }));
    assert!(
        matches!(done, Ok(Ok(()))),
        "prepopulate panicked in its caller: a watch's sink exploded"
    );
    read_until_index(&rt, &b_rx, 9, "the watch after a panicking sink").await;
    cache.close();
}

/// A sink that answers `Closed` ends its watch at its first delivery (the initial value, or
/// the first change); one that is always full holds one waiting send, not one per change,
/// never slows the watch beside it, and its waiting send goes with its handle or with close
/// (contract: Watch 7, 8).
pub(crate) async fn closed_and_full_sinks(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    // Closed, before the entry has a value: ends at the first fetch.
    let early = typed
        .notify(MockRequest::new("k"), 0, ClosedSink)
        .expect("notify");
    within(&rt, MARGIN, "a closed sink's watch ends", early.ended()).await;
    // Closed, with a value: ends at the initial delivery.
    let late = typed
        .notify(MockRequest::new("k"), 0, ClosedSink)
        .expect("notify");
    within(&rt, MARGIN, "a closed sink's watch ends", late.ended()).await;
    assert_eq!(cache.metrics().total().watches, 0);

    let full = FullSink::default();
    let (tx, rx) = async_channel::bounded::<Ev>(1024);
    let _good = typed.notify(MockRequest::new("k"), 1, tx).expect("notify");
    let stuck = typed
        .notify(MockRequest::new("k"), 2, full.clone())
        .expect("notify");
    let detached = FullSink::default();
    typed
        .notify(MockRequest::new("k"), 3, detached.clone())
        .expect("notify")
        .detach();
    for i in 4..=50 {
        server.set(i, i);
        yield_now().await;
    }
    read_until_index(&rt, &rx, 50, "the watch beside full sinks").await;
    for sink in [&full, &detached] {
        assert!(
            load(&sink.tries) <= 1,
            "{} tries of a full sink",
            load(&sink.tries)
        );
        assert!(
            load(&sink.sends) <= 1,
            "{} sends to a full sink",
            load(&sink.sends)
        );
    }
    eventually(&rt, "a send waits", || load(&full.live) == 1).await;
    drop(stuck);
    eventually(&rt, "the dropped watch's send is gone", || {
        load(&full.live) == 0
    })
    .await;
    assert_eq!(cache.metrics().total().watches, 2);
    cache.close();
    eventually(&rt, "close ends the detached watch's send", || {
        load(&detached.live) == 0
    })
    .await;
    assert_eq!(cache.metrics().total().watches, 0);
}
