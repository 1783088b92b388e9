//! The contract's Backoff, Refresh and Lifecycle rules (docs/contract.md) on the virtual-time
//! runtime: background refresh, backoff, give-up, TTL expiry, capacity, rate limit, close.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_core::sim::SimRuntime;
use cache_core::testing::{MockError, MockRequest, MockServer, MockType};
use cache_core::{BackoffPolicy, Cache, FetchResult, RateLimit, RegisterOptions};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn no_jitter(sim: &SimRuntime) -> Cache {
    Cache::builder(sim.handle())
        .backoff(BackoffPolicy::new().with_jitter(false))
        .build()
}

/// A blocking type reading `server` that records the virtual time of every fetch.
fn recorded(
    sim: &SimRuntime,
    server: &Arc<MockServer<u64>>,
    opts: RegisterOptions,
) -> (MockType<u64>, Arc<Mutex<Vec<u64>>>) {
    let times = Arc::new(Mutex::new(Vec::new()));
    let (sim, server, t) = (sim.clone(), server.clone(), times.clone());
    let ty = MockType::new(opts.supports_blocking(true), move |o, _| {
        t.lock().unwrap().push(sim.elapsed().as_secs());
        let server = server.clone();
        async move { server.read(o.min_index, o.timeout).await }
    });
    (ty, times)
}

#[test]
fn refresh_backs_off_exponentially_on_errors() {
    let sim = SimRuntime::new(1);
    let cache = no_jitter(&sim);
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let (ty, times) = recorded(&sim, &server, RegisterOptions::new().refresh(true));
    let typed = cache.register(ty);
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(1)).await;
        server.set_error(Some(MockError::new("down")));
        sim.sleep(secs(200)).await;
    });
    // t=0 first fetch, t=0 refresh blocks until the error at t=1; failures 1..=3 retry at
    // once, then 2, 4, 8, 16, 32, 60 s.
    assert_eq!(
        *times.lock().unwrap(),
        vec![0, 0, 1, 1, 1, 3, 7, 15, 31, 63, 123, 183]
    );
    cache.close();
}

#[test]
fn backoff_jitter_stays_within_bounds() {
    let sim = SimRuntime::new(99);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let (ty, times) = recorded(&sim, &server, RegisterOptions::new().refresh(true));
    let typed = cache.register(ty);
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        server.set_error(Some(MockError::new("down")));
        sim.sleep(secs(1000)).await;
    });
    let times = times.lock().unwrap().clone();
    // Gaps after the 3 free retries: failure n waits [2^(n-3), 2^(n-2)) s, capped [60, 120).
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(&gaps[..4], &[0, 0, 0, 0]);
    for (i, gap) in gaps[4..].iter().enumerate() {
        let base = (1u64 << (i + 1)).min(60);
        assert!(
            (base..2 * base).contains(gap),
            "gap {gap} after failure {} not in [{base}, {})",
            i + 4,
            2 * base
        );
    }
    cache.close();
}

#[test]
fn refresh_age_tracks_lost_contact_and_resets_on_success() {
    let sim = SimRuntime::new(1);
    let cache = no_jitter(&sim);
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new().refresh(true)));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(10)).await;
        server.set_error(Some(MockError::new("down")));
        sim.sleep(secs(30)).await;
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert!(r.meta.hit, "errors during refresh are not surfaced to hits");
        assert_eq!(r.meta.age, secs(30));
        server.set_error(None);
        server.set(2, 6);
        // The next retry (backoff ≤ 60 s) succeeds and the age returns to zero.
        sim.sleep(secs(121)).await;
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!(
            (r.value, r.meta.index, r.meta.age),
            (Some(2), 6, Duration::ZERO)
        );
    });
    cache.close();
}

#[test]
fn refresh_keeps_value_current_in_background() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new().refresh(true)));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(5)).await;
        server.set(2, 9);
        sim.sleep(secs(1)).await;
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert!(r.meta.hit);
        assert_eq!((r.value, r.meta.index), (Some(2), 9));
    });
    cache.close();
}

#[test]
fn refresh_timer_spaces_non_blocking_refreshes() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(
        server.polling_type(RegisterOptions::new().refresh(true).refresh_timer(secs(30))),
    );
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(95)).await;
    });
    assert_eq!(server.reads(), 4, "t = 0, 30, 60, 90");
    cache.close();
}

#[test]
fn fatal_error_stops_refresh_and_entry_stays() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new().refresh(true)));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        server.set_error(Some(MockError::fatal("ACL not found")));
        sim.sleep(secs(3600)).await;
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!(r.value, Some(1));
    });
    assert_eq!(server.reads(), 2, "one fatal error, then no more refreshes");
    let m = cache.metrics().total();
    assert_eq!((m.fetch_errors, m.fetch_errors_fatal, m.entries), (1, 1, 1));
    cache.close();
}

#[test]
fn refresh_gives_up_after_configured_time_of_failure() {
    let sim = SimRuntime::new(1);
    let cache = no_jitter(&sim);
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(
        server.blocking_type(
            RegisterOptions::new()
                .refresh(true)
                .refresh_give_up(secs(100)),
        ),
    );
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        server.set_error(Some(MockError::new("down")));
        sim.sleep(secs(3600)).await;
        // The last value is still served, with its age growing.
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!((r.value, r.meta.age), (Some(1), secs(3600)));
    });
    // Failures at 0,0,0,0,2,6,14,30,62,122: the one at 122 s is past 100 s of failing.
    assert_eq!(server.reads(), 11);
}

#[test]
fn close_stops_refresh_and_reads_still_work() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(
        server.polling_type(
            RegisterOptions::new()
                .refresh(true)
                .refresh_timer(secs(10))
                .last_get_ttl(secs(60)),
        ),
    );
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(25)).await;
        cache.close();
        cache.close();
        let reads = server.reads();
        sim.sleep(secs(3600)).await;
        assert_eq!(server.reads(), reads, "nothing runs after close");
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert!(r.meta.hit, "entries no longer expire after close");
    });
    assert!(cache.is_closed());
    assert_eq!(sim.pending_timers(), 0, "close leaves no timer behind");
}

#[test]
fn ttl_from_last_read_evicts_and_stops_refresh() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(
        server.blocking_type(
            RegisterOptions::new()
                .refresh(true)
                .query_timeout(secs(600))
                .last_get_ttl(secs(3600)),
        ),
    );
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(3000)).await;
        // A read at 50 min moves the expiry to 110 min.
        assert!(typed.get(&MockRequest::new("k")).await.unwrap().meta.hit);
        sim.sleep(secs(3000)).await;
        assert_eq!(cache.len(), 1, "still alive at 100 min");
        sim.sleep(secs(601)).await;
        assert_eq!(cache.len(), 0, "expired at 110 min");
        let reads = server.reads();
        sim.sleep(secs(7200)).await;
        // The blocking refresh in flight at eviction may finish, but nothing new starts.
        assert!(server.reads() <= reads + 1);
    });
    assert_eq!(cache.metrics().total().expirations, 1);
    cache.close();
}

#[test]
fn default_ttl_is_72_hours() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(72 * 3600 - 1)).await;
        assert_eq!(cache.len(), 1);
        sim.sleep(secs(2)).await;
        assert_eq!(cache.len(), 0);
    });
}

/// Each registered type keeps its own expiry deadlines, and one task serves them all: an
/// entry of a type with a shorter TTL, read after a longer-lived entry of another type, still
/// expires exactly at its own time.
#[test]
fn each_type_expires_on_its_own_ttl() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let long = cache.register(MockType::new(
        RegisterOptions::new().last_get_ttl(secs(100)),
        |_, _| async { Ok(FetchResult::new(1u64, 1)) },
    ));
    let short = cache.register(MockType::new(
        RegisterOptions::new().last_get_ttl(secs(30)),
        |_, _| async { Ok(FetchResult::new(1u8, 1)) },
    ));
    sim.block_on(async {
        long.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(10)).await;
        // The expiry task sleeps towards 100 s; this entry is due at 40 s.
        short.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(29)).await;
        assert_eq!(cache.len(), 2, "both alive at 39 s");
        sim.sleep(secs(2)).await;
        assert_eq!(cache.len(), 1, "the short-lived entry expired at 40 s");
        assert!(long.get(&MockRequest::new("k")).await.unwrap().meta.hit);
        // Read at 41 s: the long-lived entry now expires at 141 s.
        sim.sleep(secs(99)).await;
        assert_eq!(cache.len(), 1, "alive at 140 s");
        sim.sleep(secs(2)).await;
        assert_eq!(cache.len(), 0, "expired at 141 s");
    });
    assert_eq!(cache.metrics().total().expirations, 2);
    cache.close();
    assert_eq!(sim.pending_timers(), 0, "close leaves no timer behind");
}

struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn expiry_drops_the_entry_state() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let dropped = Arc::new(AtomicBool::new(false));
    let d = dropped.clone();
    let typed = cache.register(MockType::new(
        RegisterOptions::new().last_get_ttl(secs(60)),
        move |_, _| {
            let state = Arc::new(DropFlag(d.clone()));
            async move { Ok(FetchResult::new(1u8, 1).with_state(state)) }
        },
    ));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(59)).await;
        assert!(!dropped.load(Ordering::SeqCst));
        sim.sleep(secs(2)).await;
    });
    assert!(
        dropped.load(Ordering::SeqCst),
        "eviction cleans up the state"
    );
}

#[test]
fn in_flight_fetch_never_resurrects_an_evicted_entry() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(
        server.blocking_type(
            RegisterOptions::new()
                .query_timeout(secs(7200))
                .last_get_ttl(secs(3600)),
        ),
    );
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        // Start a 2 h blocking fetch; the get itself gives up after 1 s.
        let r = typed
            .get(&MockRequest::new("k").min_index(5).timeout(secs(1)))
            .await
            .unwrap();
        assert_eq!(r.value, Some(1));
        sim.sleep(secs(3700)).await;
        assert_eq!(cache.len(), 0, "evicted while its fetch is in flight");
        server.set(2, 6);
        sim.sleep(secs(10)).await;
        assert_eq!(cache.len(), 0, "the completed fetch did not re-insert it");
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!((r.value, r.meta.hit), (Some(2), false));
    });
}

#[test]
fn newer_fetch_replaces_a_backing_off_refresh() {
    let sim = SimRuntime::new(1);
    let cache = no_jitter(&sim);
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let (ty, times) = recorded(&sim, &server, RegisterOptions::new().refresh(true));
    let typed = cache.register(ty);
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        server.set_error(Some(MockError::new("down")));
        // Failures at 0,0,0,0 then 2, 6, 14, 30: the chain sleeps until 62.
        sim.sleep(secs(40)).await;
        server.set_error(None);
        server.set(2, 6);
        // A blocking get finds the entry invalid and starts a new fetch chain at 40 s.
        let r = typed
            .get(&MockRequest::new("k").min_index(5))
            .await
            .unwrap();
        assert_eq!(r.meta.index, 6);
        sim.sleep(secs(100)).await;
    });
    let times = times.lock().unwrap().clone();
    // After 40 s: the get's fetch, then its refresh blocking from 40 s on; the replaced chain
    // never fetches at 62 s.
    assert_eq!(&times[times.len() - 2..], &[40, 40], "{times:?}");
    assert!(!times.contains(&62));
    cache.close();
}

#[test]
fn capacity_bound_evicts_least_recently_read() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle()).max_entries(2).build();
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    sim.block_on(async {
        typed.get(&MockRequest::new("a")).await.unwrap();
        sim.sleep(secs(1)).await;
        typed.get(&MockRequest::new("b")).await.unwrap();
        sim.sleep(secs(1)).await;
        assert!(typed.get(&MockRequest::new("a")).await.unwrap().meta.hit);
        sim.sleep(secs(1)).await;
        typed.get(&MockRequest::new("c")).await.unwrap();
        assert_eq!(cache.len(), 2);
        assert!(typed.get(&MockRequest::new("a")).await.unwrap().meta.hit);
        assert!(typed.get(&MockRequest::new("c")).await.unwrap().meta.hit);
        assert!(
            !typed.get(&MockRequest::new("b")).await.unwrap().meta.hit,
            "b was evicted"
        );
    });
    assert!(cache.metrics().total().evictions_capacity >= 1);
}

#[test]
fn rate_limit_bounds_fetches_and_reloads_at_run_time() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle())
        .rate_limit(RateLimit::new(1.0, 1).unwrap())
        .build();
    let server = MockServer::new(sim.handle(), 1u64, 5);
    // A refresh type with no pause would fetch in a hot loop; the limiter paces it.
    let typed = cache.register(server.polling_type(RegisterOptions::new().refresh(true)));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(10)).await;
        let at_10 = server.reads();
        assert!((10..=12).contains(&at_10), "about 1/s: {at_10}");
        cache.set_rate_limit(RateLimit::new(0.1, 1).unwrap());
        sim.sleep(secs(100)).await;
        let added = server.reads() - at_10;
        assert!(
            (9..=12).contains(&added),
            "about 1 per 10 s after reload: {added}"
        );
    });
    cache.close();
}

#[test]
fn zero_index_counts_as_failure_for_backoff() {
    let sim = SimRuntime::new(1);
    let cache = no_jitter(&sim);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let typed = cache.register(MockType::new(
        RegisterOptions::new().refresh(true).supports_blocking(true),
        move |_, _| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok(FetchResult::new(1u8, 0)) }
        },
    ));
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        sim.sleep(secs(100)).await;
    });
    // A well-behaved type would block; index 0 returns at once. Backoff: 0,0,0,0,2,6,14,30,62.
    assert_eq!(calls.load(Ordering::SeqCst), 9);
    cache.close();
}

#[test]
fn open_blocking_fetch_counts_as_connected_after_threshold() {
    // Refresh age: after an outage the age grows; once a blocking fetch has stayed open past
    // the 31 s "connected" threshold, the server is reachable and the age returns to zero even
    // though nothing changed.
    let sim = SimRuntime::new(1);
    let cache = no_jitter(&sim);
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(
        server.blocking_type(
            RegisterOptions::new()
                .refresh(true)
                .query_timeout(secs(600)),
        ),
    );
    sim.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        server.set_error(Some(MockError::new("down")));
        sim.sleep(secs(1)).await;
        server.set_error(None);
        // The retries after the recovery block (nothing changed); the age keeps growing until
        // the open fetch passes 31 s.
        sim.sleep(secs(20)).await;
        let age = typed.get(&MockRequest::new("k")).await.unwrap().meta.age;
        assert!(age >= secs(20), "{age:?}");
        sim.sleep(secs(40)).await;
        let r = typed.get(&MockRequest::new("k")).await.unwrap();
        assert_eq!(r.meta.age, Duration::ZERO);
    });
    cache.close();
}

#[test]
fn same_key_in_different_types_never_mixes() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let a = MockServer::new(sim.handle(), 1u64, 5);
    let b = MockServer::new(sim.handle(), "b".to_string(), 9);
    let ta = cache.register(a.polling_type(RegisterOptions::new()));
    let tb = cache.register(b.polling_type(RegisterOptions::new()));
    sim.block_on(async {
        assert_eq!(ta.get(&MockRequest::new("k")).await.unwrap().value, Some(1));
        assert_eq!(
            tb.get(&MockRequest::new("k"))
                .await
                .unwrap()
                .value
                .as_deref(),
            Some("b")
        );
        assert!(ta.get(&MockRequest::new("k")).await.unwrap().meta.hit);
    });
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.metrics().types.len(), 2);
}

#[test]
fn query_timeout_is_handed_to_blocking_fetches_only() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s1, s2) = (seen.clone(), seen.clone());
    let blocking = cache.register(MockType::new(
        RegisterOptions::new()
            .supports_blocking(true)
            .query_timeout(secs(77)),
        move |o, _| {
            s1.lock().unwrap().push(o.timeout);
            async { Ok(FetchResult::new(1u8, 1)) }
        },
    ));
    let polling = cache.register(MockType::new(RegisterOptions::new(), move |o, _| {
        s2.lock().unwrap().push(o.timeout);
        async { Ok(FetchResult::new(1u16, 1)) }
    }));
    sim.block_on(async {
        blocking.get(&MockRequest::new("k")).await.unwrap();
        polling.get(&MockRequest::new("k")).await.unwrap();
    });
    assert_eq!(*seen.lock().unwrap(), vec![secs(77), Duration::ZERO]);
}

#[test]
fn default_query_timeout_is_ten_minutes() {
    assert_eq!(RegisterOptions::default().query_timeout, secs(600));
    assert_eq!(RegisterOptions::default().last_get_ttl, secs(72 * 3600));
    assert!(!RegisterOptions::default().refresh);
    assert!(!RegisterOptions::default().supports_blocking);
    assert_eq!(RegisterOptions::default().refresh_timer, Duration::ZERO);
}

#[test]
fn large_capacity_bound_holds_with_sampled_eviction() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle()).max_entries(5000).build();
    let server = MockServer::new(sim.handle(), 1u64, 5);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    sim.block_on(async {
        for i in 0..6000 {
            typed
                .get(&MockRequest::new(&format!("k{i}")))
                .await
                .unwrap();
            sim.sleep(Duration::from_millis(1)).await;
        }
    });
    assert_eq!(cache.len(), 5000);
    assert_eq!(cache.metrics().total().evictions_capacity, 1000);
}
