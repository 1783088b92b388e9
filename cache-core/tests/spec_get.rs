//! The contract's Get and Fetch rules (docs/contract.md) on the virtual-time runtime: hit/miss,
//! single-flight, blocking, errors, indexes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use cache_core::sim::SimRuntime;
use cache_core::testing::{MockError, MockRequest, MockServer, MockType};
use cache_core::{Cache, FetchResult, GetError, RegisterOptions};
use futures::future::join_all;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A non-blocking type whose n-th fetch returns value n at index n.
fn counting(opts: RegisterOptions) -> MockType<u64> {
    let n = Arc::new(AtomicU64::new(0));
    MockType::new(opts, move |_, _| {
        let v = n.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok(FetchResult::new(v, v)) }
    })
}

#[test]
fn miss_then_hit() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let ty = counting(RegisterOptions::new());
    let calls = ty.calls();
    let typed = cache.register(ty);
    sim.block_on(async {
        let r = typed.get(&MockRequest::new("a")).await.unwrap();
        assert_eq!(r.value, Some(1));
        assert!(!r.meta.hit);
        assert_eq!(r.meta.index, 1);
        let r = typed.get(&MockRequest::new("a")).await.unwrap();
        assert_eq!(r.value, Some(1));
        assert!(r.meta.hit);
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let m = cache.metrics().total();
    assert_eq!(
        (m.hits, m.misses_new, m.fetch_success, m.entries),
        (1, 1, 1, 1)
    );
}

#[test]
fn get_through_cache_handle_and_unregistered_type() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    sim.block_on(async {
        let err = cache
            .get::<MockType<u64>>(&MockRequest::new("a"))
            .await
            .unwrap_err();
        assert!(matches!(err, GetError::NotRegistered(_)));
        cache.register(counting(RegisterOptions::new()));
        let r = cache
            .get::<MockType<u64>>(&MockRequest::new("a"))
            .await
            .unwrap();
        assert_eq!(r.value, Some(1));
    });
}

#[test]
fn empty_key_bypasses_the_cache() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let ty = counting(RegisterOptions::new());
    let calls = ty.calls();
    let typed = cache.register(ty);
    sim.block_on(async {
        for expected in 1..=3 {
            let r = typed.get(&MockRequest::new("")).await.unwrap();
            assert_eq!(r.value, Some(expected));
            assert_eq!(r.meta, Default::default());
        }
    });
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(cache.len(), 0);
    assert_eq!(cache.metrics().total().bypasses, 3);
}

#[test]
fn single_flight_across_many_gets() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let rt = sim.clone();
    let ty = MockType::new(RegisterOptions::new(), move |_, _| {
        let rt = rt.clone();
        async move {
            rt.sleep(Duration::from_millis(10)).await;
            Ok(FetchResult::new(7u64, 3))
        }
    });
    let calls = ty.calls();
    let typed = cache.register(ty);
    sim.block_on(async {
        let req = MockRequest::new("k");
        let results = join_all((0..1000).map(|_| typed.get(&req))).await;
        for r in results {
            let r = r.unwrap();
            assert_eq!(r.value, Some(7));
            assert!(!r.meta.hit, "a get that waited is never a hit");
        }
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(sim.elapsed(), Duration::from_millis(10));
}

#[test]
fn blocking_get_waits_for_newer_index() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), "v1", 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    sim.block_on(async {
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!((r.value, r.meta.index), (Some("v1"), 5));
        // A write arrives 30 s later.
        server.set_after(secs(30), "v2", 9);
        let r = typed
            .get(&MockRequest::new("k").min_index(5))
            .await
            .unwrap();
        assert_eq!((r.value, r.meta.index), (Some("v2"), 9));
        assert!(!r.meta.hit);
        // A lower min index is served from cache.
        let r = typed
            .get(&MockRequest::new("k").min_index(8))
            .await
            .unwrap();
        assert!(r.meta.hit);
    });
    assert_eq!(sim.elapsed(), secs(30));
}

#[test]
fn blocking_get_timeout_returns_last_value_without_error() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), "v1", 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        let r = typed
            .get(&MockRequest::new("k").min_index(5).timeout(secs(60)))
            .await
            .unwrap();
        assert_eq!((r.value, r.meta.index), (Some("v1"), 5));
        assert!(!r.meta.hit);
    });
    assert_eq!(sim.elapsed(), secs(60));
}

#[test]
fn timeout_with_no_value_returns_none_and_no_error() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let rt = sim.clone();
    let typed = cache.register(MockType::new(RegisterOptions::new(), move |_, _| {
        let rt = rt.clone();
        async move {
            rt.sleep(secs(3600)).await;
            Ok(FetchResult::new(1u64, 1))
        }
    }));
    sim.block_on(async {
        let r = typed
            .get(&MockRequest::new("k").timeout(secs(1)))
            .await
            .unwrap();
        assert_eq!(r.value, None);
        assert_eq!(r.meta.index, 0);
    });
}

#[test]
fn blocking_query_timeout_upstream_keeps_waiting_until_change() {
    // The upstream times out every 10 s with the same index; the get keeps blocking.
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed =
        cache.register(server.blocking_type(RegisterOptions::new().query_timeout(secs(10))));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        server.set_after(secs(35), 2, 6);
        let r = typed
            .get(&MockRequest::new("k").min_index(5))
            .await
            .unwrap();
        assert_eq!((r.value, r.meta.index), (Some(2), 6));
    });
    assert_eq!(sim.elapsed(), secs(35));
    // First read, then reads at 0, 10, 20, 30 s (the last one wakes at 35 s).
    assert_eq!(server.reads(), 5);
}

#[test]
fn one_attempt_error_then_return_with_last_value() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), "v1", 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        server.set_error(Some(MockError::new("boom")));
        let outcome = typed.get_outcome(&MockRequest::new("k").min_index(5)).await;
        let err = outcome.error.expect("the attempt's error");
        assert_eq!(err.fetch_error().unwrap().message, "boom");
        assert_eq!(outcome.value, Some("v1"), "last good value alongside");
        assert_eq!(outcome.meta.index, 5);
        // A plain get still finds a valid value: a newer error never hides it.
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert!(r.meta.hit);
        assert_eq!(r.value, Some("v1"));
    });
    // One attempt only (plus the first read): the get did not spin on the error.
    assert_eq!(server.reads(), 2);
    assert_eq!(cache.metrics().total().fetch_errors, 1);
}

#[test]
fn stale_error_never_resurfaces() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let n = Arc::new(AtomicUsize::new(0));
    let typed = cache.register(MockType::new(RegisterOptions::new(), move |_, _| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            if i == 0 {
                Err(MockError::new("first fails"))
            } else {
                Ok(FetchResult::new("ok", 2))
            }
        }
    }));
    sim.block_on(async {
        let err = typed.get(&MockRequest::new("k")).await.unwrap_err();
        assert!(matches!(err, GetError::Fetch(_)));
        // The stored error is older than this get: it fetches again and succeeds.
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!(r.value, Some("ok"));
    });
}

#[test]
fn index_floor_is_one_and_zero_index_is_stored_as_one() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let typed = cache.register(MockType::new(RegisterOptions::new(), |_, _| async {
        Ok(FetchResult::new(1u8, 0))
    }));
    sim.block_on(async {
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!(r.meta.index, 1);
    });
}

#[test]
fn fetch_receives_entry_index_and_last_result() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let typed = cache.register(MockType::new(
        RegisterOptions::new()
            .supports_blocking(true)
            .query_timeout(secs(42)),
        move |o, _| {
            seen2.lock().unwrap().push((
                o.min_index,
                o.timeout,
                o.last_result.as_ref().map(|l| (l.value, l.index)),
            ));
            let next = o.min_index + 10;
            async move { Ok(FetchResult::new(next, next)) }
        },
    ));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        // The caller asks for min index 3, but the fetch is sent the entry's own index (10).
        let r = typed
            .get(&MockRequest::new("k").min_index(10))
            .await
            .unwrap();
        assert_eq!(r.meta.index, 20);
    });
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(0, secs(42), None), (10, secs(42), Some((10, 10)))]
    );
}

#[test]
fn index_going_backwards_wakes_blocked_get() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), "old", 100);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        server.set_after(secs(5), "restored", 7);
        let r = typed
            .get(&MockRequest::new("k").min_index(100))
            .await
            .unwrap();
        assert_eq!((r.value, r.meta.index), (Some("restored"), 7));
        // The next blocking get sends the new, lower index and blocks on it.
        server.set_after(secs(5), "next", 8);
        let r = typed
            .get(&MockRequest::new("k").min_index(7))
            .await
            .unwrap();
        assert_eq!((r.value, r.meta.index), (Some("next"), 8));
    });
}

#[test]
fn index_above_entry_but_not_above_min_index_keeps_waiting() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), "a", 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        server.set_after(secs(1), "b", 8);
        server.set_after(secs(2), "c", 12);
        let r = typed
            .get(&MockRequest::new("k").min_index(10))
            .await
            .unwrap();
        assert_eq!((r.value, r.meta.index), (Some("c"), 12));
    });
    assert_eq!(sim.elapsed(), secs(2));
}

#[test]
fn partitions_never_mix() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let typed = cache.register(MockType::new(RegisterOptions::new(), |_, req| {
        let v = req.key().to_string();
        async move { Ok(FetchResult::new(v, 1)) }
    }));
    let calls = typed.cache().metrics();
    drop(calls);
    sim.block_on(async {
        let a = MockRequest::new("k").datacenter("dc1").token("t1");
        let b = MockRequest::new("k").datacenter("dc2").token("t1");
        let c = MockRequest::new("k").datacenter("dc1").token("t2");
        let d = MockRequest::new("kdc1").token("t1");
        for req in [&a, &b, &c, &d] {
            assert!(!typed.get(req).await.unwrap().meta.hit);
        }
        for req in [&a, &b, &c, &d] {
            assert!(typed.get(req).await.unwrap().meta.hit);
        }
    });
    assert_eq!(cache.len(), 4);
}

#[test]
fn max_age_and_must_revalidate_for_non_refresh_types() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let ty = counting(RegisterOptions::new());
    let calls = ty.calls();
    let typed = cache.register(ty);
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(30)).await;
        let r = typed
            .get(&MockRequest::new("k").max_age(secs(60)))
            .await
            .unwrap();
        assert!(r.meta.hit);
        assert_eq!(r.meta.age, secs(30));
        let r = typed
            .get(&MockRequest::new("k").max_age(secs(10)))
            .await
            .unwrap();
        assert!(!r.meta.hit);
        assert_eq!((r.value, r.meta.age), (Some(2), Duration::ZERO));
        let r = typed
            .get(&MockRequest::new("k").must_revalidate())
            .await
            .unwrap();
        assert!(!r.meta.hit);
        assert_eq!(r.value, Some(3));
    });
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[test]
fn must_revalidate_with_fetch_in_flight_is_served() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), "v".to_string(), 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let t2 = typed.clone();
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        // Keep a blocking query open. (String values: a `&'static str` value trips rustc's
        // higher-ranked `Send` check of spawned futures.)
        sim.spawn_detached(async move {
            let req = MockRequest::new("k").min_index(5);
            let _ = t2.get(&req).await;
        });
        sim.sleep(secs(1)).await;
        let r = typed
            .get(&MockRequest::new("k").must_revalidate())
            .await
            .unwrap();
        assert!(
            r.meta.hit,
            "an open blocking query means the entry is current"
        );
    });
}

#[test]
fn refresh_types_ignore_max_age_and_must_revalidate() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), "v", 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new().refresh(true)));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(3600)).await;
        let r = typed
            .get(&MockRequest::new("k").max_age(secs(1)).must_revalidate())
            .await
            .unwrap();
        assert!(r.meta.hit);
        assert_eq!(r.meta.age, Duration::ZERO, "healthy refresh: age zero");
        cache.close();
    });
}

#[test]
fn panicking_fetch_is_contained() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let n = Arc::new(AtomicUsize::new(0));
    let typed = cache.register(MockType::new(RegisterOptions::new(), move |_, _| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            if i == 0 {
                panic!("upstream exploded");
            }
            Ok(FetchResult::new(5u8, 1))
        }
    }));
    sim.block_on(async {
        let req = MockRequest::new("k");
        let results = join_all((0..3).map(|_| typed.get(&req))).await;
        for r in results {
            match r {
                Err(GetError::Panicked(msg)) => assert!(msg.contains("exploded")),
                other => panic!("expected a contained panic, got {other:?}"),
            }
        }
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!(r.value, Some(5));
    });
}

#[test]
fn cancelled_get_does_not_cancel_shared_fetch() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let rt = sim.clone();
    let ty = MockType::new(RegisterOptions::new(), move |_, _| {
        let rt = rt.clone();
        async move {
            rt.sleep(secs(10)).await;
            Ok(FetchResult::new(1u8, 1))
        }
    });
    let calls = ty.calls();
    let typed = cache.register(ty);
    sim.block_on(async {
        // Start a get and drop it after 1 s.
        let req = MockRequest::new("k");
        let get = typed.get(&req);
        let timeout = sim.sleep(secs(1));
        futures::pin_mut!(get);
        match futures::future::select(get, timeout).await {
            futures::future::Either::Right(_) => {}
            futures::future::Either::Left(_) => panic!("fetch should still be running"),
        }
        // A second get joins the same fetch, which completes at 10 s.
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!(r.value, Some(1));
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(sim.elapsed(), secs(10));
}

#[test]
fn stale_if_error_serves_young_enough_value() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), "v", 5);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(30)).await;
        server.set_error(Some(MockError::new("down")));
        let r = typed
            .get(
                &MockRequest::new("k")
                    .max_age(secs(10))
                    .stale_if_error(secs(60)),
            )
            .await
            .unwrap();
        assert_eq!((r.value, r.meta.age), (Some("v"), secs(30)));
        let err = typed
            .get(
                &MockRequest::new("k")
                    .max_age(secs(10))
                    .stale_if_error(secs(20)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, GetError::Fetch(_)));
    });
}

#[test]
fn prepopulate_stores_without_fetching() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let ty = counting(RegisterOptions::new());
    let calls = ty.calls();
    let typed = cache.register(ty);
    sim.block_on(async {
        let info = cache_core::RequestInfo::new("k");
        typed.prepopulate(&info, 99, 0).unwrap();
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(99), 1, true));
        assert!(
            typed
                .prepopulate(&cache_core::RequestInfo::new(""), 1, 1)
                .is_err()
        );
        assert!(
            cache
                .prepopulate::<MockType<String>>(&info, String::new(), 1)
                .is_err()
        );
    });
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn not_modified_keeps_value_and_takes_index() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let typed = cache.register(MockType::new(
        RegisterOptions::new().supports_blocking(true),
        |o, _| async move {
            if o.last_result.is_some() {
                Ok(FetchResult::not_modified(o.min_index + 1))
            } else {
                Ok(FetchResult::new("first", 1))
            }
        },
    ));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        let r = typed
            .get(&MockRequest::new("k").min_index(1))
            .await
            .unwrap();
        assert_eq!((r.value, r.meta.index), (Some("first"), 2));
    });
    let m = cache.metrics().total();
    assert_eq!((m.fetch_success, m.fetch_not_modified), (2, 1));
}

#[test]
fn empty_fetch_results_do_not_spin_a_blocking_get() {
    // The reference's "empty fetch result" case: after a value, the type answers no value and
    // index 0. A blocking get keeps the last value, returns it at its timeout with no error,
    // and the zero index backs the retries off instead of spinning.
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let n = Arc::new(AtomicUsize::new(0));
    let ty = MockType::new(
        RegisterOptions::new().supports_blocking(true),
        move |o, _| {
            let i = n.fetch_add(1, Ordering::SeqCst);
            let state = o.last_result.and_then(|l| l.state);
            async move {
                if i == 0 {
                    let state: cache_core::FetchState = Arc::new(31u32);
                    Ok(FetchResult::new(42u64, 1).with_state(state))
                } else {
                    assert!(state.is_some(), "the entry's state is handed back");
                    Ok(FetchResult::none(0))
                }
            }
        },
    );
    let calls = ty.calls();
    let typed = cache.register(ty);
    sim.block_on(async {
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!(r.value, Some(42));
        let r = typed
            .get(&MockRequest::new("k").min_index(1).timeout(secs(10)))
            .await
            .unwrap();
        assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(42), 1, false));
    });
    assert_eq!(sim.elapsed(), secs(10));
    // 1 + three immediate retries + retries at 2 s and 6 s (backoff), within the 10 s.
    assert!(
        calls.load(Ordering::SeqCst) <= 8,
        "{}",
        calls.load(Ordering::SeqCst)
    );
}

#[test]
fn failed_revalidation_returns_the_error_or_the_stale_value() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), "v", 5);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(30)).await;
        server.set_error(Some(MockError::new("down")));
        let outcome = typed
            .get_outcome(&MockRequest::new("k").must_revalidate())
            .await;
        assert!(outcome.error.is_some(), "the revalidation failed");
        assert_eq!(outcome.value, Some("v"), "with the last value alongside");
        let r = typed
            .get(
                &MockRequest::new("k")
                    .must_revalidate()
                    .stale_if_error(secs(60)),
            )
            .await
            .unwrap();
        assert_eq!((r.value, r.meta.age), (Some("v"), secs(30)));
        // A plain get still finds the value valid.
        assert!(typed.get(&MockRequest::new("k")).await.unwrap().meta.hit);
    });
}
