//! The engine at its edges: capacity under churn, races with close, extreme durations and
//! rates, panicking callbacks, dead receivers, slow consumers — one regression test per defect
//! found by adversarial runs (each failed before its fix), on the virtual-time runtime unless a
//! real race needs real threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use cache_core::sim::SimRuntime;
use cache_core::testing::{MockError, MockRequest, MockServer, MockType};
use cache_core::{
    Cache, CacheRequest, CacheType, FetchOptions, FetchResult, GetError, RateLimit,
    RegisterOptions, WatchError,
};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// A non-blocking type whose every fetch fails.
fn failing_type() -> MockType<u64> {
    MockType::new(RegisterOptions::new(), |_o, _r| async {
        Err(MockError::new("bad token"))
    })
}

/// A non-blocking type answering `key.len()` at index 1.
fn echo_type() -> MockType<u64> {
    MockType::new(RegisterOptions::new(), |_o, r: MockRequest| async move {
        Ok(FetchResult::new(r.key().len() as u64, 1))
    })
}

#[test]
fn entries_without_a_value_are_evicted_for_capacity() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle()).max_entries(100).build();
    let typed = cache.register(failing_type());
    sim.block_on(async {
        for i in 0..1000 {
            let got = typed.get(&MockRequest::new(&format!("bad-{i}"))).await;
            assert!(matches!(got, Err(GetError::Fetch(_))));
        }
    });
    assert!(cache.len() <= 100, "{} entries", cache.len());
    let m = cache.metrics().total();
    assert!(m.evictions_capacity >= 900, "{m:?}");
    assert_eq!(m.entries, cache.len() as u64);
    // The failing gauge follows the entries that are still there.
    assert_eq!(m.failing, cache.len() as u64);
}

#[test]
fn a_miss_never_evicts_its_own_entry_at_capacity_one() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle()).max_entries(1).build();
    let typed = cache.register(echo_type());
    sim.block_on(async {
        for key in ["a", "bb", "ccc", "dddd"] {
            let got = typed.get(&MockRequest::new(key)).await.unwrap();
            assert_eq!(got.value, Some(key.len() as u64));
        }
    });
    assert_eq!(cache.len(), 1);
}

#[test]
fn re_registering_a_type_releases_the_old_entries() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle()).max_entries(1000).build();
    let old = cache.register(echo_type());
    sim.block_on(async {
        for i in 0..600 {
            old.get(&MockRequest::new(&format!("k{i}"))).await.unwrap();
        }
    });
    assert_eq!(cache.len(), 600);
    let new = cache.register(echo_type());
    assert_eq!(cache.len(), 0, "the replaced store's entries are released");
    sim.block_on(async {
        for i in 0..1000 {
            new.get(&MockRequest::new(&format!("k{i}"))).await.unwrap();
        }
        // The stale handle says so instead of growing phantom entries.
        let stale = old.get(&MockRequest::new("other")).await;
        assert!(matches!(stale, Err(GetError::Replaced(_))), "{stale:?}");
    });
    assert_eq!(cache.len(), 1000);
    assert_eq!(cache.metrics().total().evictions_capacity, 0);
    let (tx, _rx) = async_channel::bounded(1);
    let refused = old
        .notify(MockRequest::new("w").max_age(secs(1)), (), tx)
        .map(|_| ());
    assert!(matches!(refused, Err(WatchError::Replaced(_))));
}

#[test]
fn notify_racing_close_leaves_no_open_watch() {
    for round in 0..20 {
        let sim = SimRuntime::new(round);
        let cache = Cache::new(sim.handle());
        let server = MockServer::new(sim.handle(), 1u64, 1);
        let typed = cache.register(server.blocking_type(RegisterOptions::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicUsize::new(0));
        let spawn = |n: usize| {
            let typed = typed.clone();
            let stop = stop.clone();
            let started = started.clone();
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) || i < 50 {
                    let (tx, rx) = async_channel::bounded(4);
                    match typed.notify(MockRequest::new(&format!("k{n}-{}", i % 64)), i, tx) {
                        Ok(handle) => {
                            started.fetch_add(1, Ordering::Relaxed);
                            kept.push((handle, rx));
                        }
                        Err(e) => {
                            assert!(matches!(e, WatchError::Closed));
                            break;
                        }
                    }
                    i += 1;
                }
                kept
            })
        };
        let a = spawn(0);
        let b = spawn(1);
        // Close while both threads are registering watches.
        while started.load(Ordering::Relaxed) < 40 {
            std::hint::spin_loop();
        }
        cache.close();
        stop.store(true, Ordering::Relaxed);
        for kept in [a.join().unwrap(), b.join().unwrap()] {
            for (handle, rx) in kept {
                assert!(!handle.is_active(), "a watch stayed open after close");
                while rx.try_recv().is_ok() {}
                assert!(rx.is_closed(), "a receiver stayed open after close");
            }
        }
        let (tx, _rx) = async_channel::bounded(1);
        assert!(matches!(
            typed.notify(MockRequest::new("late"), 0, tx).map(|_| ()),
            Err(WatchError::Closed)
        ));
    }
}

#[test]
fn a_miss_after_close_answers_closed_at_once() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let typed = cache.register(echo_type());
    sim.block_on(async {
        typed.get(&MockRequest::new("cached")).await.unwrap();
        cache.close();
        // Reads of what is cached keep working.
        assert!(
            typed
                .get(&MockRequest::new("cached"))
                .await
                .unwrap()
                .meta
                .hit
        );
        let miss = typed.get(&MockRequest::new("new")).await;
        assert!(matches!(miss, Err(GetError::Closed)), "{miss:?}");
    });
}

#[test]
fn a_slow_consumer_of_a_polled_watch_ends_on_the_latest_value() {
    for trial in 0..5 {
        let sim = SimRuntime::new(trial);
        let cache = Cache::new(sim.handle());
        let server = MockServer::new(sim.handle(), 1u64, 7);
        let typed = cache.register(server.polling_type(RegisterOptions::new()).compare_values());
        let (tx, rx) = async_channel::bounded(1);
        let _w = typed
            .notify(MockRequest::new("k").max_age(secs(1)), "k", tx)
            .unwrap();
        sim.block_on(async {
            for v in 2..=10 {
                sim.sleep(secs(2)).await;
                // The index stays at 7: only the value tells the change.
                server.set(v, 7);
            }
            sim.sleep(secs(3)).await;
            let mut events = Vec::new();
            while let Ok(ev) = rx.try_recv() {
                events.push(ev);
                sim.sleep(ms(1)).await;
            }
            assert!(
                events.len() <= 3,
                "buffered + at most two more: {}",
                events.len()
            );
            assert_eq!(events.last().unwrap().result, Some(10));
        });
    }
}

#[test]
fn a_polled_watch_of_an_index_zero_type_keeps_its_cadence() {
    let sim = SimRuntime::new(3);
    let cache = Cache::new(sim.handle());
    let zero = MockType::new(RegisterOptions::new(), |_o, _r| async {
        Ok(FetchResult::new(5u64, 0))
    })
    .compare_values();
    let calls = zero.calls();
    let typed = cache.register(zero);
    let (tx, _rx) = async_channel::bounded(16);
    let _w = typed
        .notify(MockRequest::new("k").max_age(ms(100)), "k", tx)
        .unwrap();
    sim.block_on(async { sim.sleep(secs(15)).await });
    let n = calls.load(Ordering::SeqCst);
    // One poll per 100–110 ms: about 140, never the handful an index-0 backoff allows.
    assert!(n >= 120, "{n} fetches in 15 s");
}

#[test]
fn a_polled_watch_does_not_redeliver_an_unchanged_value_by_default() {
    let sim = SimRuntime::new(4);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 3u64, 5);
    // No `compare_values`: the type keeps the default `value_eq`.
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(64);
    let _w = typed
        .notify(MockRequest::new("k").max_age(secs(1)), "k", tx)
        .unwrap();
    sim.block_on(async {
        sim.sleep(secs(10)).await;
        assert_eq!(rx.len(), 1, "one event for one value");
        server.set(4, 6);
        sim.sleep(secs(3)).await;
        assert_eq!(rx.len(), 2, "a risen index is news");
    });
}

#[test]
fn extreme_durations_are_saturated_not_panics() {
    let sim = SimRuntime::new(5);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 1);
    let forever = RegisterOptions::new()
        .last_get_ttl(Duration::MAX)
        .refresh(true)
        .refresh_timer(Duration::MAX);
    let typed = cache.register(server.blocking_type(forever));
    sim.block_on(async {
        let first = typed
            .get(&MockRequest::new("k").timeout(Duration::MAX))
            .await
            .unwrap();
        assert_eq!(first.value, Some(1));
        // A blocking get with an endless timeout wakes on a change.
        server.set_after(secs(5), 2, 2);
        let next = typed
            .get(&MockRequest::new("k").min_index(1).timeout(Duration::MAX))
            .await
            .unwrap();
        assert_eq!(next.value, Some(2));
        typed
            .prepopulate(&MockRequest::new("p").cache_info(), 9, 3)
            .unwrap();
        assert!(typed.get(&MockRequest::new("p")).await.unwrap().meta.hit);
        sim.sleep(secs(1_000_000)).await;
        assert!(typed.get(&MockRequest::new("p")).await.unwrap().meta.hit);
    });

    // A polled watch with an endless max age: one delivery, then it ends cleanly.
    let polled = cache.register(server.polling_type(RegisterOptions::new()));
    let (tx, rx) = async_channel::bounded(4);
    let handle = polled
        .notify(MockRequest::new("w").max_age(Duration::MAX), "w", tx)
        .unwrap();
    sim.block_on(async {
        assert!(rx.recv().await.is_ok());
        drop(handle);
        assert!(
            rx.recv().await.is_err(),
            "the sender is dropped with the watch"
        );
    });
}

#[test]
fn a_tiny_rate_limit_waits_and_a_raised_one_applies_to_the_waiting_fetch() {
    let sim = SimRuntime::new(6);
    let cache = Cache::builder(sim.handle())
        .rate_limit(RateLimit::new(1e-20, 1).unwrap())
        .build();
    let server = MockServer::new(sim.handle(), 1u64, 1);
    let ty = server.blocking_type(RegisterOptions::new().refresh(true));
    let calls = ty.calls();
    let typed = cache.register(ty);
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        server.set(2, 2);
        sim.sleep(secs(3600)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one token, then practically never"
        );
        cache.set_rate_limit(RateLimit::new(10.0, 1).unwrap());
        sim.sleep(secs(1)).await;
        let got = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!(got.value, Some(2), "the raised limit let the refresh run");
    });
}

#[test]
fn the_rate_limit_holds_its_rate() {
    let sim = SimRuntime::new(7);
    let cache = Cache::builder(sim.handle())
        .rate_limit(RateLimit::new(50.0, 2).unwrap())
        .build();
    let counter = Arc::new(AtomicU64::new(0));
    let c = counter.clone();
    let ty = MockType::new(
        RegisterOptions::new().refresh(true).supports_blocking(true),
        move |_o, _r| {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok(FetchResult::new(n, n)) }
        },
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(10)).await;
    });
    let n = counter.load(Ordering::SeqCst);
    assert!((495..=505).contains(&n), "{n} fetches in 10 s at 50/s");
}

/// A type whose `is_fatal` or `value_eq` panics.
struct Panicky {
    server: Arc<MockServer<u64>>,
    fail: Arc<AtomicBool>,
}

impl CacheType for Panicky {
    type Request = MockRequest;
    type Value = u64;
    type Error = MockError;

    async fn fetch(
        &self,
        _opts: FetchOptions<u64>,
        _request: &MockRequest,
    ) -> Result<FetchResult<u64>, MockError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(MockError::new("down"));
        }
        self.server.read(0, Duration::ZERO).await
    }

    fn is_fatal(&self, _error: &MockError) -> bool {
        panic!("is_fatal panicked")
    }

    fn value_eq(&self, _a: &u64, _b: &u64) -> bool {
        panic!("value_eq panicked")
    }
}

#[test]
fn panicking_callbacks_are_contained() {
    let sim = SimRuntime::new(8);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 1);
    let fail = Arc::new(AtomicBool::new(true));
    let typed = cache.register(Panicky {
        server: server.clone(),
        fail: fail.clone(),
    });
    sim.block_on(async {
        let got = typed.get(&MockRequest::new("k").timeout(secs(5))).await;
        assert!(matches!(got, Err(GetError::Fetch(_))), "{got:?}");
        fail.store(false, Ordering::SeqCst);
        let got = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!(got.value, Some(1), "the entry stays usable");
    });
    // value_eq panics on every poll: the watch keeps delivering instead of dying.
    let (tx, rx) = async_channel::bounded(16);
    let _w = typed
        .notify(MockRequest::new("w").max_age(secs(1)), "w", tx)
        .unwrap();
    sim.block_on(async {
        sim.sleep(secs(1)).await;
        server.set(2, 1);
        sim.sleep(secs(3)).await;
        let mut last = None;
        while let Ok(ev) = rx.try_recv() {
            last = ev.result;
        }
        assert_eq!(last, Some(2));
    });
}

#[test]
fn dead_receivers_release_their_watch_while_the_fetch_is_open() {
    let sim = SimRuntime::new(9);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 1);
    let typed = cache.register(
        server.blocking_type(RegisterOptions::new().query_timeout(Duration::from_secs(600))),
    );
    let mut handles = Vec::new();
    for i in 0..100 {
        let (tx, rx) = async_channel::bounded(4);
        handles.push(typed.notify(MockRequest::new("k"), i, tx).unwrap());
        sim.block_on(async { rx.recv().await.unwrap() });
        drop(rx);
    }
    assert_eq!(cache.metrics().total().watches, 100);
    sim.block_on(async { sim.sleep(secs(3)).await });
    // The blocking fetch is still open (10 min), yet every record is gone.
    assert_eq!(cache.metrics().total().watches, 0);
    assert!(handles.iter().all(|h| !h.is_active()));
}

#[test]
fn a_get_answers_from_its_own_fetch_not_a_later_refresh_error() {
    for seed in 0..10 {
        let sim = SimRuntime::new(seed);
        let cache = Cache::new(sim.handle());
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let ty = MockType::new(RegisterOptions::new().refresh(true), move |_o, _r| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Ok(FetchResult::new(42u64, 3))
                } else {
                    Err(MockError::new("refresh failed"))
                }
            }
        });
        let typed = cache.register(ty);
        sim.block_on(async {
            let got = typed.get(&MockRequest::new("k")).await;
            assert_eq!(got.unwrap().value, Some(42), "seed {seed}");
            // Later readers get the value too: refresh errors are stored, not surfaced.
            let again = typed.get(&MockRequest::new("k")).await.unwrap();
            assert!(again.meta.hit);
        });
    }
}

#[test]
fn retry_now_wakes_chains_in_backoff() {
    let sim = SimRuntime::new(10);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 1);
    let ty = server.blocking_type(RegisterOptions::new().refresh(true));
    let calls = ty.calls();
    let typed = cache.register(ty);
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        server.set_error(Some(MockError::new("down")));
        server.set(2, 2);
        // Many failures: the backoff grows to about a minute.
        sim.sleep(secs(300)).await;
        assert!(cache.metrics().total().failing == 1);
        server.set_error(None);
        let before = calls.load(Ordering::SeqCst);
        assert_eq!(cache.retry_now(), 1);
        sim.sleep(ms(1)).await;
        assert!(calls.load(Ordering::SeqCst) > before);
        let got = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!((got.value, got.meta.age), (Some(2), Duration::ZERO));
        assert_eq!(cache.metrics().total().failing, 0);
    });
}

#[test]
fn connected_clears_error_and_age_while_the_query_stays_open() {
    let sim = SimRuntime::new(11);
    let cache = Cache::new(sim.handle());
    let down = Arc::new(AtomicBool::new(false));
    let d = down.clone();
    let rt = sim.handle();
    let ty = MockType::new(
        RegisterOptions::new().refresh(true).supports_blocking(true),
        move |o: FetchOptions<u64>, _r| {
            let down = d.load(Ordering::SeqCst);
            let rt = rt.clone();
            async move {
                if down {
                    return Err(MockError::new("down"));
                }
                if o.min_index == 0 {
                    return Ok(FetchResult::new(1, 1));
                }
                // The server accepted the query: it now blocks for ten minutes.
                o.connected.notify();
                cache_core::Sleep::after(&*rt, o.timeout).await;
                Ok(FetchResult::not_modified(o.min_index))
            }
        },
    );
    let typed = cache.register(ty);
    let (tx, rx) = async_channel::bounded(16);
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        // Ends the open query: the next ones fail.
        down.store(true, Ordering::SeqCst);
        sim.sleep(secs(700)).await;
        let failing = typed.get(&MockRequest::new("k")).await.unwrap();
        assert!(failing.meta.age > Duration::ZERO);
        down.store(false, Ordering::SeqCst);
        cache.retry_now();
        sim.sleep(ms(1)).await;
        let healthy = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!(healthy.meta.age, Duration::ZERO);
        let _w = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
        let first = rx.recv().await.unwrap();
        assert!(first.error.is_none(), "a new watcher sees no stale error");
    });
}

/// Watches of one entry leave in every way at once (handle cancelled, receiver dropped and
/// found by a delivery, receiver dropped and found by the sweep) in a scrambled order: each
/// watch removes itself by its recorded place in the entry's list, and every place stays
/// true, so exactly the live watches get the next change.
#[test]
fn many_watches_of_one_entry_leave_in_any_order() {
    let sim = SimRuntime::new(21);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 1);
    let typed = cache.register(
        server.blocking_type(RegisterOptions::new().query_timeout(Duration::from_secs(600))),
    );
    const N: u64 = 600;
    let mut watches = Vec::new();
    for i in 0..N {
        let (tx, rx) = async_channel::bounded(4);
        let handle = typed.notify(MockRequest::new("k"), i, tx).unwrap();
        sim.block_on(async { rx.recv().await.unwrap() });
        watches.push((i, Some(handle), Some(rx)));
    }
    // A scrambled order: multiples of a number coprime to N.
    for step in 0..N {
        let i = (step * 7 + 3) % N;
        let (_, handle, rx) = &mut watches[i as usize];
        match i % 4 {
            0 => drop(handle.take()),
            1 => drop(rx.take()),
            _ => {}
        }
        if step == N / 2 {
            // Halfway, one delivery finds some of the dropped receivers.
            server.set(2u64, 2);
            sim.block_on(async { sim.sleep(ms(10)).await });
        }
    }
    sim.block_on(async { sim.sleep(secs(3)).await });
    let live = watches.iter().filter(|(i, _, _)| i % 4 >= 2).count() as u64;
    assert_eq!(cache.metrics().total().watches, live);
    server.set(3u64, 3);
    sim.block_on(async { sim.sleep(ms(10)).await });
    for (i, handle, rx) in &watches {
        let Some(rx) = rx else { continue };
        let mut last = None;
        while let Ok(event) = rx.try_recv() {
            last = Some(event.result);
        }
        if i % 4 >= 2 {
            assert_eq!(last, Some(Some(3)), "watch {i} missed the change");
            assert!(handle.as_ref().is_some_and(|h| h.is_active()));
        } else {
            assert_eq!(
                last.flatten().filter(|v| *v == 3),
                None,
                "watch {i} was cancelled"
            );
        }
    }
}
