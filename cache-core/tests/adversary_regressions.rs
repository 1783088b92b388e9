//! Regressions found by the adversarial program (`cache-bench/examples/adversary.rs`) and the
//! review of the one-allocation entry and per-store expiry queues (each says whether it failed
//! before a fix or guards an edge that held). Virtual time; a test that would hang on a defect
//! runs its simulation on a thread of its own and fails after a wall-clock bound instead.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cache_core::runtime::Sleep;
use cache_core::sim::SimRuntime;
use cache_core::testing::{MockError, MockRequest, MockServer, MockType};
use cache_core::{
    Cache, EntryQuery, FetchResult, GetError, RegisterOptions, RequestInfo, TypedCache,
    UpdateEvent, WatchHandle,
};

mod support;

use support::within_real_time;

/// Counts the bytes each thread holds (tests run in parallel; a simulation runs on its test's
/// thread).
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator and only counts, in a thread-local without a
// destructor (so counting never allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|live| live.set(live.get() + layout.size() as isize));
        // SAFETY: same layout, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|live| live.set(live.get() - layout.size() as isize));
        // SAFETY: allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes allocated and not freed by this thread so far.
fn live_bytes() -> isize {
    LIVE.with(Cell::get)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The fixed type most tests here register: every fetch answers 1 at index 1.
fn one() -> MockType<u64> {
    MockType::new(RegisterOptions::new(), |_o, _r| async {
        Ok(FetchResult::new(1u64, 1))
    })
}

/// Prepopulates `key` (value 1, index 1) and watches it (a polled watch with an hour's max
/// age, so the watch itself fetches nothing soon): the watch and its receiver.
fn prepopulate_watched(
    typed: &TypedCache<MockType<u64>>,
    key: &str,
) -> (
    WatchHandle,
    async_channel::Receiver<UpdateEvent<(), u64, MockError>>,
) {
    typed.prepopulate(&RequestInfo::new(key), 1, 1).unwrap();
    let (tx, rx) = async_channel::bounded(1);
    let handle = typed
        .notify(MockRequest::new(key).max_age(secs(3600)), (), tx)
        .unwrap();
    (handle, rx)
}

/// A watched entry of a type whose TTL is zero (or a nanosecond) must not make the expiry
/// task re-check it in a loop: the watched entry's next check was "now + TTL", already due
/// when the task looked again, so the task spun without ever yielding (on a real runtime, one
/// worker at 100 % for as long as the watch lasted; on the virtual clock, a hang). Failed
/// before the fix (a watched entry is looked at again no sooner than a second later).
#[test]
fn a_watched_entry_with_a_zero_or_tiny_ttl_does_not_spin_the_expiry_task() {
    for ttl in [Duration::ZERO, Duration::from_nanos(1)] {
        within_real_time(&format!("ttl {ttl:?}"), move || {
            let sim = SimRuntime::new(1);
            let cache = Cache::new(sim.handle());
            let server = MockServer::new(sim.handle(), 1u64, 1);
            let typed = cache.register(
                server.blocking_type(
                    RegisterOptions::new()
                        .last_get_ttl(ttl)
                        .query_timeout(secs(600)),
                ),
            );
            let (tx, rx) = async_channel::bounded(16);
            let watch = typed.notify(MockRequest::new("k"), (), tx).unwrap();
            sim.block_on(async {
                let first = rx.recv().await.unwrap();
                assert_eq!(first.meta.index, 1);
                sim.sleep(secs(10)).await;
                assert_eq!(cache.len(), 1, "a watched entry stays");
                drop(watch);
                // Looked at again within a second (the shortest pause for a watched entry).
                sim.sleep(Duration::from_millis(1010)).await;
                assert_eq!(cache.len(), 0, "and expires once unwatched");
            });
            cache.close();
        });
    }
}

/// Edge guard (held before any fix): gets of a type whose TTL is zero answer, each from its own
/// fetch, although the expiry task evicts their entry as soon as the fetch is stored.
#[test]
fn gets_of_a_zero_ttl_type_answer() {
    within_real_time("zero ttl gets", || {
        let sim = SimRuntime::new(1);
        let cache = Cache::new(sim.handle());
        let server = MockServer::new(sim.handle(), 7u64, 1);
        let typed = cache
            .register(server.polling_type(RegisterOptions::new().last_get_ttl(Duration::ZERO)));
        sim.block_on(async {
            for i in 0..100 {
                let got = typed.get(&MockRequest::new(&format!("k{}", i % 3))).await;
                assert_eq!(got.unwrap().value, Some(7));
            }
            sim.sleep(secs(1)).await;
            assert_eq!(cache.len(), 0);
        });
    });
}

/// A handle to a replaced registration keeps no entry, and prepopulating through it must keep
/// nothing either. It kept an expiry item (and with it the entry's allocation and key) per
/// call: the entry was taken back out of the retired store, but its expiry was scheduled all
/// the same, in the retired store's queue, which no task serves any more. So a stale handle
/// prepopulating in a loop grew memory without bound, for as long as it was held.
#[test]
fn prepopulating_through_a_replaced_registration_keeps_nothing() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let old = cache.register(one());
    let _new = cache.register(one());
    old.prepopulate(&RequestInfo::new("warm-up"), 0, 1).unwrap();
    sim.block_on(sim.sleep(secs(1)));
    let before = live_bytes();
    for i in 0..1000u64 {
        old.prepopulate(&RequestInfo::new(format!("key-{i}")), i, 1)
            .unwrap();
    }
    // Well past the default TTL of 72 hours.
    sim.block_on(sim.sleep(secs(100 * 3600)));
    assert_eq!(cache.len(), 0);
    let kept = live_bytes() - before;
    assert!(
        kept < 16 * 1024,
        "1000 prepopulates through a replaced registration kept {kept} bytes"
    );
}

/// A miss after close answers `Closed` at once (Get 9) and must leave nothing behind. It
/// created an empty entry per key, which no fetch would ever fill and no expiry remove (the
/// expiry task ends with the cache), so gets of distinct keys after close grew the cache
/// without bound. Failed before the fix.
#[test]
fn misses_after_close_create_no_entries() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let typed = cache.register(one());
    sim.block_on(async {
        typed.get(&MockRequest::new("cached")).await.unwrap();
    });
    cache.close();
    sim.block_on(async {
        for i in 0..1000 {
            let miss = typed.get(&MockRequest::new(&format!("k{i}"))).await;
            assert!(matches!(miss, Err(GetError::Closed)), "{miss:?}");
        }
        assert!(
            typed
                .get(&MockRequest::new("cached"))
                .await
                .unwrap()
                .meta
                .hit
        );
    });
    assert_eq!(cache.len(), 1, "misses after close created entries");
    let m = cache.metrics().total();
    assert_eq!((m.misses_new, m.hits), (1001, 1), "{m:?}");
}

/// A watched entry is never evicted for capacity (Lifecycle 4), also when the watch arrives
/// while an insert is evicting: the eviction chose its victim under the table's read lock and
/// removed it later under the write lock without looking again, so a watch added in between
/// lost its entry and stayed open without ever hearing from it again (found by the adversary
/// program, about 1 watch in 3 000 under churn). Real threads (a race of two inserts and a
/// watch), no task needs to run: prepopulates insert, and the listing shows the watch.
#[test]
fn a_watch_added_while_capacity_evicts_keeps_its_entry() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle()).max_entries(2).build();
    let typed = cache.register(one());
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (typed, stop) = (typed.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                typed
                    .prepopulate(&RequestInfo::new(format!("c{n}")), n, 1)
                    .unwrap();
            }
        })
    };
    let mut lost = 0;
    for i in 0..20_000 {
        let key = format!("w{i}");
        let (handle, _rx) = prepopulate_watched(&typed, &key);
        let page = typed.entries(&EntryQuery::new().prefix(key.clone()));
        let watched = page.entries.iter().any(|e| e.key == key && e.watchers > 0);
        if handle.is_active() && !watched {
            lost += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    assert_eq!(
        lost, 0,
        "active watches whose entry was evicted for capacity"
    );
}

/// Above 4 096 entries in a type, capacity eviction samples one shard of sixteen. When every
/// entry there is held (watched), it must look at further shards rather than let the cache
/// grow past its bound while other shards hold an entry that may go. Here one entry of 5 000
/// may go, so a random shard holds it one time in sixteen: sampling alone broke the bound on
/// nearly every insert (checked by removing the fallback).
#[test]
fn a_sampled_eviction_looks_past_shards_where_every_entry_is_held() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle()).max_entries(5_000).build();
    let typed = cache.register(one());
    let mut watches = Vec::new();
    for i in 0..4_999 {
        watches.push(prepopulate_watched(&typed, &format!("w{i}")));
    }
    typed.prepopulate(&RequestInfo::new("free"), 1, 1).unwrap();
    assert_eq!(cache.len(), 5_000);
    for i in 0..32 {
        typed
            .prepopulate(&RequestInfo::new(format!("new{i}")), 1, 1)
            .unwrap();
        assert_eq!(cache.len(), 5_000, "after insert {i}");
    }
    assert!(watches.iter().all(|(handle, _)| handle.is_active()));
}

/// A get waiting out its backoff (its own fetch answered index 0, which counts as a failure)
/// that then finds another get's fetch in flight must wait for that fetch. It kept its retry
/// time, already past once the fetch had started, so its wait was ready at once, again and
/// again: it spun for as long as the other fetch ran (on a real runtime, a worker at 100 %;
/// on the virtual clock, a hang), and its timeout, looked at after the retry, never fired.
/// Found by review; failed (hung) before the fix.
#[test]
fn a_get_past_its_retry_time_waits_for_a_fetch_in_flight_instead_of_spinning() {
    within_real_time("retry vs a fetch in flight", || {
        let sim = SimRuntime::new(1);
        let cache = Cache::new(sim.handle());
        let rt = sim.handle();
        let origin = sim.now();
        let ty = MockType::new(
            RegisterOptions::new().supports_blocking(true),
            move |_o, _r| {
                let rt = rt.clone();
                async move {
                    // At first the server answers index 0 at once (the first get fetches
                    // again until its backoff starts); from 50 ms on, a fetch blocks for a
                    // minute, as a blocking query does.
                    if rt.now() - origin < Duration::from_millis(50) {
                        return Ok(FetchResult::new(1u64, 0));
                    }
                    Sleep::after(&*rt, secs(60)).await;
                    Ok(FetchResult::new(2u64, 7))
                }
            },
        );
        let calls = ty.calls();
        let typed = cache.register(ty);
        sim.block_on(async {
            let start = sim.now();
            let waiting = MockRequest::new("k").min_index(1).timeout(secs(600));
            let late = MockRequest::new("k").min_index(1).timeout(secs(600));
            let (first, second) = futures::join!(typed.get(&waiting), async {
                // Starts the second fetch while the first get waits out its backoff.
                sim.sleep(Duration::from_millis(100)).await;
                typed.get(&late).await
            });
            for got in [first, second] {
                let got = got.unwrap();
                assert_eq!((got.value, got.meta.index), (Some(2), 7));
            }
            assert_eq!(sim.now() - start, secs(60) + Duration::from_millis(100));
            // The first get's fetches at once, then the one blocking fetch both waited for.
            let calls = calls.load(Ordering::SeqCst);
            assert!((2..=8).contains(&calls), "{calls} fetches");
        });
        cache.close();
    });
}

/// Concurrent misses of distinct keys under `max_entries(1)`: each entry is kept while its get
/// waits on it, so the count goes past the bound; once every get has answered it must come
/// back to the bound by itself, and likewise when a watch that held an entry ends. Failed
/// before the fix (found on real runtimes by `cache-tokio/tests/adversary_real_time.rs`): it
/// stayed at 4 until the next insert.
#[test]
fn the_bound_comes_back_once_the_gets_that_held_entries_answer() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle()).max_entries(1).build();
    let rt = sim.clone();
    let typed = cache.register(MockType::new(RegisterOptions::new(), move |_o, _r| {
        let rt = rt.clone();
        async move {
            rt.sleep(Duration::from_millis(10)).await;
            Ok(FetchResult::new(1u64, 1))
        }
    }));
    let requests = ["a", "b", "c", "d"].map(MockRequest::new);
    sim.block_on(async {
        let gets = requests.iter().map(|r| typed.get(r));
        for got in futures::future::join_all(gets).await {
            assert_eq!(got.unwrap().value, Some(1));
        }
    });
    assert_eq!(cache.len(), 1);
    // And once a watch that held an entry ends.
    let (first, _rx1) = prepopulate_watched(&typed, "w1");
    let (_second, _rx2) = prepopulate_watched(&typed, "w2");
    assert_eq!(cache.len(), 2, "both watched");
    drop(first);
    sim.block_on(sim.sleep(Duration::from_millis(1)));
    assert_eq!(cache.len(), 1);
    cache.close();
}

/// A blocking get whose wait outlasts its entry's TTL keeps the entry (a wait is a read), so
/// its one blocking query stays open. Failed before the fix: the entry expired under the get,
/// which dropped the query; the woken get created the entry again, fetched from index 0 and
/// blocked again, every TTL (here 15 upstream reads in the get's 300 ms instead of 1).
#[test]
fn an_entry_a_get_waits_on_does_not_expire_under_it() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(
        server.blocking_type(
            RegisterOptions::new()
                .last_get_ttl(Duration::from_millis(40))
                .query_timeout(secs(600)),
        ),
    );
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        let reads = server.reads();
        let waited = typed
            .get(
                &MockRequest::new("k")
                    .min_index(5)
                    .timeout(Duration::from_millis(300)),
            )
            .await
            .unwrap();
        assert_eq!((waited.value, waited.meta.index), (Some(1), 5));
        assert_eq!(
            server.reads(),
            reads + 1,
            "one blocking query for the whole wait"
        );
        assert_eq!(cache.len(), 1, "kept while waited on");
        // Unread from the timeout on, it expires (looked at again within a second).
        Sleep::after(&*sim.handle(), Duration::from_millis(1_100)).await;
        assert_eq!(cache.len(), 0);
    });
    cache.close();
}

/// A sink is the consumer's code, and a panic in it is contained like any callback's
/// (contract: Fetch 9): the panicking watch ends, the others on the entry go on receiving, the
/// fetch chain goes on fetching, and `prepopulate` does not panic in its caller. Failed before
/// the fix (found by `cache-tokio/tests/adversary_watch.rs`): the panic unwound through the
/// fetch chain, which died with it, so no watch of the entry heard of a change again; and
/// `prepopulate` panicked.
#[test]
fn a_panicking_sink_ends_its_own_watch_only() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 3);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (before_tx, before) = async_channel::bounded(16);
    let (panicky_tx, _panicky_rx) = async_channel::bounded(16);
    let (after_tx, after) = async_channel::bounded(16);
    let panicky = cache_core::watch::map_sink(panicky_tx, |e: UpdateEvent<(), u64, MockError>| {
        assert!(e.meta.index < 5, "a sink that panics from index 5 on");
        e
    });
    let _b = typed.notify(MockRequest::new("k"), (), before_tx).unwrap();
    let _p = typed.notify(MockRequest::new("k"), (), panicky).unwrap();
    let _a = typed.notify(MockRequest::new("k"), (), after_tx).unwrap();
    let indexes = |rx: &async_channel::Receiver<UpdateEvent<(), u64, MockError>>| {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.meta.index)
            .collect::<Vec<_>>()
    };
    sim.block_on(sim.sleep(Duration::from_millis(1)));
    assert_eq!((indexes(&before), indexes(&after)), (vec![3], vec![3]));
    server.set(5, 5);
    sim.block_on(sim.sleep(Duration::from_millis(1)));
    assert_eq!((indexes(&before), indexes(&after)), (vec![5], vec![5]));
    assert_eq!(
        cache.metrics().total().watches,
        2,
        "the panicking watch ended"
    );
    server.set(6, 6);
    sim.block_on(sim.sleep(Duration::from_millis(1)));
    assert_eq!((indexes(&before), indexes(&after)), (vec![6], vec![6]));
    // And through prepopulate, on the caller's thread.
    let (panicky_tx, _panicky_rx) = async_channel::bounded(16);
    let panicky = cache_core::watch::map_sink(panicky_tx, |e: UpdateEvent<(), u64, MockError>| {
        assert!(e.meta.index < 9, "a sink that panics from index 9 on");
        e
    });
    let _p = typed.notify(MockRequest::new("k"), (), panicky).unwrap();
    sim.block_on(sim.sleep(Duration::from_millis(1)));
    typed.prepopulate(&RequestInfo::new("k"), 9, 9).unwrap();
    assert_eq!((indexes(&before), indexes(&after)), (vec![9], vec![9]));
    cache.close();
}

/// A sink that is always full and whose `send` panics: the watch's catch-up task, which waits
/// for room, meets the panic and ends the watch. Failed before the fix (found in review): it
/// removed the watch while still holding the watch's own lock, which removing takes again, so
/// the task deadlocked (and with it the entry's watch list).
#[test]
fn a_sink_panicking_in_send_ends_its_watch_without_deadlock() {
    struct FullThenPanics;
    impl cache_core::EventSink<UpdateEvent<(), u64, MockError>> for FullThenPanics {
        fn try_send(
            &self,
            _: UpdateEvent<(), u64, MockError>,
        ) -> Result<(), cache_core::watch::TrySendError> {
            Err(cache_core::watch::TrySendError::Full)
        }
        fn send(
            &self,
            _: UpdateEvent<(), u64, MockError>,
        ) -> cache_core::BoxFuture<'static, Result<(), cache_core::watch::SinkClosed>> {
            panic!("a sink whose send panics")
        }
        fn is_closed(&self) -> bool {
            false
        }
    }
    within_real_time("a panicking send", || {
        let sim = SimRuntime::new(1);
        let cache = Cache::new(sim.handle());
        let typed = cache.register(one());
        typed.prepopulate(&RequestInfo::new("k"), 1, 1).unwrap();
        let _watch = typed
            .notify(
                MockRequest::new("k").max_age(secs(3600)),
                (),
                FullThenPanics,
            )
            .unwrap();
        sim.block_on(sim.sleep(Duration::from_millis(1)));
        assert_eq!(cache.metrics().total().watches, 0, "the watch ended");
        // The entry's watch list is free: another watch comes and goes.
        let (tx, rx) = async_channel::bounded(1);
        let other = typed.notify(MockRequest::new("k").max_age(secs(3600)), (), tx);
        assert!(other.is_ok());
        sim.block_on(sim.sleep(Duration::from_millis(1)));
        assert_eq!(rx.try_recv().map(|e| e.meta.index).ok(), Some(1));
        cache.close();
    });
}
