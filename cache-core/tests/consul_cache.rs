//! Consul's own cache tests (`agent/cache/cache_test.go` in hashicorp/consul), ported to our
//! API and run on the virtual-time runtime, so every timing is exact and nothing sleeps on a
//! real clock.
//!
//! Each test is named after its Go test. Where the contract (SPEC.md, docs/contract.md) differs
//! from Consul on purpose, the test asserts the contract and says so. Where Consul's test relies
//! on a real-time hot loop (a mock answering at once, forever), the port gives the mock a small
//! virtual delay instead, since a loop that never lets virtual time move would never end; those
//! places say so too.
//!
//! All 34 tests of the file at hashicorp/consul b72a5d8 are ported (older versions lack the
//! three `expireBackgroudRefresh*`/`expireResetGetNoChange` ones). None is Go-only, but parts
//! of some are (`ReloadOptions`' "changed" flag, reading an entry's limiter or `Fetching` flag
//! under the cache's lock, type registration by name): the port checks the same thing
//! through behaviour, timing, `TypedCache::entries`, or distinct Rust types.
//!
//! `cache_get_refresh_age_immediate_fetches_yield` is no Go test: it is what a real-runtime
//! port of the Go tests whose mocks answer at once would run into (ignored: a finding).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_channel::Receiver;
use cache_core::sim::SimRuntime;
use cache_core::testing::{MockError, MockRequest, MockType};
use cache_core::{
    Cache, CacheRequest, CacheType, EntryQuery, FetchResult, FetchState, GetError, GetOutcome,
    RateLimit, RegisterOptions, RequestInfo, TypedCache,
};
use futures::future::{Either, select};

// ===== Helpers =====

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn req(key: &str) -> MockRequest {
    MockRequest::new(key)
}

/// Consul's `TestType`: a blocking type with every other option at its default.
fn test_type() -> RegisterOptions {
    RegisterOptions::new().supports_blocking(true)
}

/// Consul's `TestTypeNonBlocking`.
fn test_type_non_blocking() -> RegisterOptions {
    RegisterOptions::new()
}

/// A fetch loop that never lets virtual time move would hang the test; fail it instead.
const HOT_LOOP: usize = 10_000;

/// A gate a scripted fetch waits on until the test opens it (Consul's `WaitUntil(ch)` with a
/// channel the test closes).
#[derive(Clone)]
struct Gate {
    tx: async_channel::Sender<()>,
    rx: Receiver<()>,
}

impl Gate {
    fn new() -> Self {
        let (tx, rx) = async_channel::bounded(1);
        Self { tx, rx }
    }

    fn open(&self) {
        self.tx.close();
    }
}

/// How long a scripted answer takes.
#[derive(Clone)]
enum Wait {
    Now,
    Gate(Gate),
    For(Duration),
    Forever,
}

/// One scripted answer, in the manner of a testify expectation: the first step with calls left
/// answers; a step without `times` answers any number of calls.
struct Step<V> {
    value: Option<V>,
    index: u64,
    state: Option<i32>,
    error: Option<MockError>,
    times: Option<usize>,
    wait: Wait,
}

impl<V> Step<V> {
    fn ok(value: V, index: u64) -> Self {
        Self {
            value: Some(value),
            index,
            state: None,
            error: None,
            times: None,
            wait: Wait::Now,
        }
    }

    fn empty(index: u64) -> Self {
        Self {
            value: None,
            index,
            state: None,
            error: None,
            times: None,
            wait: Wait::Now,
        }
    }

    fn err(error: MockError) -> Self {
        Self {
            value: None,
            index: 0,
            state: None,
            error: Some(error),
            times: None,
            wait: Wait::Now,
        }
    }

    fn times(mut self, n: usize) -> Self {
        self.times = Some(n);
        self
    }

    fn once(self) -> Self {
        self.times(1)
    }

    fn state(mut self, state: i32) -> Self {
        self.state = Some(state);
        self
    }

    fn gated(mut self, gate: &Gate) -> Self {
        self.wait = Wait::Gate(gate.clone());
        self
    }

    fn after(mut self, delay: Duration) -> Self {
        self.wait = Wait::For(delay);
        self
    }

    fn forever(mut self) -> Self {
        self.wait = Wait::Forever;
        self
    }
}

/// What one fetch call was told.
#[derive(Debug, Clone, PartialEq)]
struct Call {
    at: Duration,
    key: String,
    min_index: u64,
    timeout: Duration,
    /// The index and (i32) state of `last_result`.
    last: Option<(u64, Option<i32>)>,
    /// The step that answered it (`None`: no step left, an unexpected call).
    step: Option<usize>,
}

struct Script<V> {
    steps: Mutex<Vec<(Step<V>, usize)>>,
    calls: Mutex<Vec<Call>>,
}

impl<V> Script<V> {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    /// Calls answered by step `i`.
    fn used(&self, i: usize) -> usize {
        self.steps.lock().unwrap()[i].1
    }

    /// Consul's `AssertExpectations`: every step with `times` was called exactly that often,
    /// every other step at least once, and no call found no step.
    fn assert_expectations(&self) {
        let calls = self.calls();
        assert!(
            calls.iter().all(|c| c.step.is_some()),
            "unexpected fetch calls: {calls:?}"
        );
        for (i, (step, used)) in self.steps.lock().unwrap().iter().enumerate() {
            match step.times {
                Some(n) => assert_eq!(*used, n, "step {i} called {used} times, want {n}"),
                None => assert!(*used >= 1, "step {i} never called"),
            }
        }
    }
}

fn state_of(state: &Option<FetchState>) -> Option<i32> {
    state
        .as_ref()
        .and_then(|s| s.downcast_ref::<i32>().copied())
}

/// A type with `opts` whose fetches answer `steps` in order.
fn scripted<V: Clone + PartialEq + Send + Sync + 'static>(
    sim: &SimRuntime,
    opts: RegisterOptions,
    steps: Vec<Step<V>>,
) -> (MockType<V>, Arc<Script<V>>) {
    let script = Arc::new(Script {
        steps: Mutex::new(steps.into_iter().map(|s| (s, 0)).collect()),
        calls: Mutex::new(Vec::new()),
    });
    let (sim, s) = (sim.clone(), script.clone());
    let ty = MockType::new(opts, move |o, r: MockRequest| {
        let mut steps = s.steps.lock().unwrap();
        let found = steps
            .iter()
            .position(|(step, used)| step.times.is_none_or(|n| *used < n));
        let mut calls = s.calls.lock().unwrap();
        assert!(calls.len() < HOT_LOOP, "hot loop: {} fetches", calls.len());
        calls.push(Call {
            at: sim.elapsed(),
            key: r.key().to_owned(),
            min_index: o.min_index,
            timeout: o.timeout,
            last: o
                .last_result
                .as_ref()
                .map(|l| (l.index, state_of(&l.state))),
            step: found,
        });
        drop(calls);
        let answer = found.map(|i| {
            steps[i].1 += 1;
            let step = &steps[i].0;
            (
                step.value.clone(),
                step.index,
                step.state,
                step.error.clone(),
                step.wait.clone(),
            )
        });
        drop(steps);
        let sim = sim.clone();
        async move {
            let Some((value, index, state, error, wait)) = answer else {
                return Err(MockError::new("unexpected fetch call"));
            };
            match wait {
                Wait::Now => {}
                Wait::Gate(gate) => {
                    let _ = gate.rx.recv().await;
                }
                Wait::For(d) => sim.sleep(d).await,
                Wait::Forever => futures::future::pending::<()>().await,
            }
            if let Some(error) = error {
                return Err(error);
            }
            let mut result = match value {
                Some(v) => FetchResult::new(v, index),
                None => FetchResult::none(index),
            };
            if let Some(state) = state {
                let state: FetchState = Arc::new(state);
                result = result.with_state(state);
            }
            Ok(result)
        }
    });
    (ty, script)
}

type Outcome<V> = GetOutcome<V, MockError>;

/// Consul's `TestCacheGetCh`: runs a get in its own task; its outcome arrives on the channel.
fn spawn_get<T>(
    sim: &SimRuntime,
    typed: &TypedCache<T>,
    request: MockRequest,
) -> Receiver<GetOutcome<T::Value, T::Error>>
where
    T: CacheType<Request = MockRequest>,
{
    let (tx, rx) = async_channel::bounded(1);
    let typed = typed.clone();
    sim.spawn_detached(async move {
        let outcome = typed.get_outcome(&request).await;
        let _ = tx.send(outcome).await;
    });
    rx
}

/// The outcome on `rx` if it arrives within `d` of virtual time.
async fn within<T>(sim: &SimRuntime, rx: &Receiver<T>, d: Duration) -> Option<T> {
    let recv = rx.recv();
    let sleep = sim.sleep(d);
    futures::pin_mut!(recv);
    futures::pin_mut!(sleep);
    match select(recv, sleep).await {
        Either::Left((Ok(v), _)) => Some(v),
        Either::Left((Err(_), _)) => panic!("the get task ended without an answer"),
        Either::Right(_) => None,
    }
}

/// Consul's `TestCacheGetChResult`: the get answered `expected` without error within 50 ms.
async fn expect_value<V: PartialEq + std::fmt::Debug>(
    sim: &SimRuntime,
    rx: &Receiver<Outcome<V>>,
    expected: V,
) -> Outcome<V> {
    let outcome = within(sim, rx, ms(50))
        .await
        .expect("result not sent on channel within 50 ms");
    assert!(
        outcome.error.is_none(),
        "unexpected error: {:?}",
        outcome.error
    );
    assert_eq!(outcome.value, Some(expected));
    outcome
}

// ===== Get basics =====

/// Go `TestCacheGet_noIndex`: a get without an index fetches once, the next one is a hit.
#[test]
fn cache_get_no_index() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(&sim, test_type(), vec![Step::ok(42u64, 0).times(1)]);
    let typed = cache.register(ty);
    sim.block_on(async {
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(r.meta.hit);
        sim.sleep(ms(20)).await;
    });
    script.assert_expectations();
}

/// Go `TestCacheGet_initError`: a failed first fetch returns its error and no value, and the
/// next get fetches again (errors are not cached as values).
#[test]
fn cache_get_init_error() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted::<u64>(
        &sim,
        test_type(),
        vec![Step::err(MockError::new("error")).times(2)],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        for _ in 0..2 {
            let o = typed.get_outcome(&req("hello")).await;
            assert!(o.error.is_some());
            assert_eq!(o.value, None);
            assert!(!o.meta.hit);
        }
        sim.sleep(ms(20)).await;
    });
    script.assert_expectations();
}

/// Go `TestCacheGet_cachedErrorsDontStick` (consul#4480): after an error then a success, a
/// blocking get whose fetches keep answering the same index keeps blocking instead of returning
/// the old error. Go's mock answers at once once its trigger closes (a real-time hot loop); here
/// each such "timed out" blocking fetch takes 50 ms of virtual time, the first ending when Go
/// closes the trigger.
#[test]
fn cache_get_cached_errors_dont_stick() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(
        &sim,
        test_type(),
        vec![
            Step::err(MockError::new("initial error")).once(),
            Step::ok(42u64, 123).once(),
            Step::ok(42u64, 123).after(ms(50)),
        ],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let o = typed.get_outcome(&req("hello")).await;
        assert!(o.error.is_some());
        assert_eq!(o.value, None);
        assert!(!o.meta.hit);

        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);

        let rx = spawn_get(&sim, &typed, req("hello").min_index(123));
        let early = within(&sim, &rx, ms(150)).await;
        assert!(
            early.is_none(),
            "result or error returned before an update happened: {early:?}"
        );
        sim.sleep(ms(20)).await;
    });
    script.assert_expectations();
    let calls = script.calls();
    assert!(
        calls[2..].iter().all(|c| c.min_index == 123),
        "blocking fetches are sent the entry's index: {calls:?}"
    );
}

/// Go `TestCacheGet_blankCacheKey`: an empty key bypasses the cache, so every get fetches and
/// none is a hit.
#[test]
fn cache_get_blank_cache_key() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(&sim, test_type(), vec![Step::ok(42u64, 0).times(2)]);
    let typed = cache.register(ty);
    sim.block_on(async {
        for _ in 0..2 {
            let r = typed.get(&req("")).await.unwrap();
            assert_eq!(r.value, Some(42));
            assert!(!r.meta.hit);
        }
        sim.sleep(ms(20)).await;
    });
    script.assert_expectations();
}

/// Go `TestCacheGet_blockingInitSameKey`: two gets of one key block on the one initial fetch
/// and both get its value.
#[test]
fn cache_get_blocking_init_same_key() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let trigger = Gate::new();
    let (ty, script) = scripted(
        &sim,
        test_type(),
        vec![Step::ok(42u64, 0).gated(&trigger).times(1)],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let rx1 = spawn_get(&sim, &typed, req("hello"));
        let rx2 = spawn_get(&sim, &typed, req("hello"));
        assert!(
            within(&sim, &rx1, ms(50)).await.is_none(),
            "should block (1)"
        );
        assert!(rx2.try_recv().is_err(), "should block (2)");
        trigger.open();
        expect_value(&sim, &rx1, 42).await;
        expect_value(&sim, &rx2, 42).await;
    });
    script.assert_expectations();
}

/// Go `TestCacheGet_blockingInitDiffKeys`: gets of two keys block on their own initial
/// fetches, each fetch sees its own key.
#[test]
fn cache_get_blocking_init_diff_keys() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let trigger = Gate::new();
    let (ty, script) = scripted(
        &sim,
        test_type(),
        vec![Step::ok(42u64, 0).gated(&trigger).times(2)],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let rx1 = spawn_get(&sim, &typed, req("hello"));
        let rx2 = spawn_get(&sim, &typed, req("goodbye"));
        assert!(
            within(&sim, &rx1, ms(50)).await.is_none(),
            "should block (1)"
        );
        assert!(rx2.try_recv().is_err(), "should block (2)");
        trigger.open();
        expect_value(&sim, &rx1, 42).await;
        expect_value(&sim, &rx2, 42).await;
    });
    script.assert_expectations();
    let mut keys: Vec<String> = script.calls().into_iter().map(|c| c.key).collect();
    keys.sort();
    assert_eq!(keys, ["goodbye", "hello"]);
}

/// Go `TestCacheGet_blockingIndex`: a get with a min index waits until the cache holds a
/// higher index (4, then 5, then 6 once triggered).
#[test]
fn cache_get_blocking_index() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let trigger = Gate::new();
    let (ty, script) = scripted(
        &sim,
        test_type(),
        vec![
            Step::ok(1u64, 4).once(),
            Step::ok(12u64, 5).once(),
            Step::ok(42u64, 6).gated(&trigger),
        ],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let rx = spawn_get(&sim, &typed, req("hello").min_index(5));
        assert!(within(&sim, &rx, ms(50)).await.is_none(), "should block");
        trigger.open();
        let o = expect_value(&sim, &rx, 42).await;
        assert_eq!(o.meta.index, 6);
    });
    script.assert_expectations();
    let sent: Vec<u64> = script.calls().iter().map(|c| c.min_index).collect();
    assert_eq!(sent, [0, 4, 5]);
}

/// Go `TestCacheGet_cancellation`: a blocking get whose context ends (50 ms) returns at once
/// without a value. Our cancellation is dropping the get's future (contract: Get 5): it must still be
/// pending at 50 ms, and dropping it there ends it.
#[test]
fn cache_get_cancellation() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    // Go's mock waits on a one-shot 1 ms timer: the first fetch answers at 1 ms, a second
    // one waits for ever.
    let (ty, script) = scripted(
        &sim,
        test_type(),
        vec![
            Step::ok(1u64, 4).after(ms(1)).once(),
            Step::ok(1u64, 4).forever(),
        ],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let request = req("hello").min_index(5);
        let get = typed.get(&request);
        let deadline = sim.sleep(ms(50));
        futures::pin_mut!(get);
        match select(get, deadline).await {
            Either::Left((r, _)) => panic!("the get answered before its deadline: {r:?}"),
            Either::Right(_) => {}
        }
        assert_eq!(sim.elapsed(), ms(50));
    });
    assert_eq!(script.count(), 2, "{:?}", script.calls());
}

/// Go `TestCacheGet_blockingIndexTimeout`: a blocking get with a 200 ms timeout and no newer
/// index returns the last value (12) at its timeout, without error.
#[test]
fn cache_get_blocking_index_timeout() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let trigger = Gate::new();
    let (ty, _script) = scripted(
        &sim,
        test_type(),
        vec![
            Step::ok(1u64, 4).once(),
            Step::ok(12u64, 5).once(),
            Step::ok(42u64, 6).gated(&trigger),
        ],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let rx = spawn_get(&sim, &typed, req("hello").min_index(5).timeout(ms(200)));
        assert!(within(&sim, &rx, ms(50)).await.is_none(), "should block");
        let o = within(&sim, &rx, ms(300))
            .await
            .expect("should have returned");
        assert!(o.error.is_none(), "{:?}", o.error);
        assert_eq!(o.value, Some(12));
        assert_eq!(o.meta.index, 5);
        assert_eq!(sim.elapsed(), ms(200), "exactly at the get's timeout");
    });
}

/// Go `TestCacheGet_blockingIndexError`: a blocking get whose fetch fails returns the error at
/// once (not at its 1 min timeout), and the failures are not retried in a loop (< 10). Our
/// contract: Get 4 makes it exactly one attempt.
#[test]
fn cache_get_blocking_index_error() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(
        &sim,
        test_type(),
        vec![
            Step::ok(1u64, 4).once(),
            Step::err(MockError::new("test fetch error")),
        ],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 1).await;

        let rx = spawn_get(
            &sim,
            &typed,
            req("hello").min_index(7).timeout(Duration::from_secs(60)),
        );
        let o = within(&sim, &rx, ms(50))
            .await
            .expect("should not block: the fetch failed");
        assert_eq!(
            o.error
                .as_ref()
                .and_then(|e| e.fetch_error())
                .unwrap()
                .message,
            "test fetch error"
        );
        sim.sleep(ms(100)).await;
    });
    let retries = script.used(1);
    assert!(retries < 10, "retries: {retries}");
    assert_eq!(retries, 1, "contract: Get 4: one attempt");
}

/// Go `TestCacheGet_emptyFetchResult`: a fetch answering no value keeps the previous value but
/// its state is kept and handed to the next fetch (31 first, then 32). Where Go hot-loops,
/// the SPEC's backoff is asserted instead (see inside).
#[test]
fn cache_get_empty_fetch_result() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(
        &sim,
        test_type(),
        vec![
            Step::ok(42u64, 1).state(31).times(1),
            Step::empty(0).state(32),
        ],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);

        let r = typed
            .get(&req("hello").min_index(1).timeout(ms(100)))
            .await
            .unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);
        let calls = script.calls();
        assert!(calls.len() >= 2, "{calls:?}");
        assert_eq!(
            calls[1].last,
            Some((1, Some(31))),
            "the second fetch gets the first state"
        );
        // Go's get re-fetches at once for its whole timeout (a hot loop paced only by its
        // test's channel); contract: Get 4 and Fetch 4 back a get's further attempts off after answers at
        // index 0: three free retries, then 2 s or more, so four fetches in 100 ms.
        assert_eq!(calls.len(), 5, "1 + 4 fetches by the second get: {calls:?}");
        let before = calls.len();

        let r = typed
            .get(&req("hello").min_index(1).timeout(ms(100)))
            .await
            .unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);
        let calls = script.calls();
        assert!(
            calls.len() > before,
            "the third get fetched (it did not hit): {calls:?}"
        );
        assert!(
            calls[before..]
                .iter()
                .all(|c| c.last == Some((1, Some(32)))),
            "fetches of the third get get the second state: {calls:?}"
        );
        assert_eq!(
            calls[before].at,
            ms(100),
            "a new get fetches at once: {calls:?}"
        );
        sim.sleep(ms(20)).await;
    });
    script.assert_expectations();
}

// ===== Background refresh =====

/// Go `TestCacheGet_periodicRefresh`: a refresh type with a 100 ms refresh timer serves the old
/// value at once and the refreshed one after the timer.
#[test]
fn cache_get_periodic_refresh() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let never = Gate::new();
    let (ty, script) = scripted(
        &sim,
        RegisterOptions::new()
            .refresh(true)
            .refresh_timer(ms(100))
            .query_timeout(Duration::from_secs(300)),
        vec![
            Step::ok(1u64, 4).once(),
            Step::ok(12u64, 5).once(),
            Step::ok(12u64, 5).gated(&never),
        ],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 1).await;
        sim.sleep(ms(5)).await;
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 1).await;
        sim.sleep(ms(200)).await;
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 12).await;
    });
    let times: Vec<Duration> = script.calls().iter().map(|c| c.at).collect();
    assert_eq!(times, [ms(0), ms(100), ms(200)], "the refresh timer paces");
    cache.close();
}

/// Go `TestCacheGet_periodicRefreshMultiple`: with a zero refresh timer each triggered
/// refresh result is served by the next get (1, 12, 24).
#[test]
fn cache_get_periodic_refresh_multiple() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let trigger = [Gate::new(), Gate::new(), Gate::new()];
    let (ty, _script) = scripted(
        &sim,
        RegisterOptions::new()
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .query_timeout(Duration::from_secs(300)),
        vec![
            Step::ok(1u64, 4).once(),
            Step::ok(12u64, 5).once().gated(&trigger[0]),
            Step::ok(24u64, 6).once().gated(&trigger[1]),
            Step::ok(42u64, 7).gated(&trigger[2]),
        ],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 1).await;
        sim.sleep(ms(5)).await;
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 1).await;

        trigger[0].open();
        sim.sleep(ms(100)).await;
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 12).await;

        trigger[1].open();
        sim.sleep(ms(100)).await;
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 24).await;
    });
    cache.close();
}

/// Go `TestCacheGet_periodicRefreshErrorBackoff`: a failing background refresh is backed off
/// (fewer than 10 attempts in 500 ms) and hits keep serving the last value. With contract: Backoff's
/// policy that is exactly 4 failed attempts (3 free retries, then 2 s or more).
#[test]
fn cache_get_periodic_refresh_error_backoff() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(
        &sim,
        RegisterOptions::new()
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .query_timeout(Duration::from_secs(300)),
        vec![
            Step::ok(1u64, 4).once(),
            Step::err(MockError::new("test fetch error")),
        ],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 1).await;
        sim.sleep(ms(500)).await;
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 1).await;
    });
    let retries = script.used(1);
    assert!(retries < 10, "retries: {retries}");
    assert_eq!(
        retries, 4,
        "contract: Backoff: three free retries, then >= 2 s"
    );
    cache.close();
}

/// Go `TestCacheGet_periodicRefreshBadRPCZeroIndexErrorBackoff`: a refresh whose fetch keeps
/// answering index 0 is backed off like a failure (fewer than 10 fetches in 500 ms), and the
/// value is still served.
#[test]
fn cache_get_periodic_refresh_bad_rpc_zero_index_error_backoff() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(
        &sim,
        RegisterOptions::new()
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .query_timeout(Duration::from_secs(300)),
        vec![Step::ok(0u64, 0)],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 0).await;
        sim.sleep(ms(500)).await;
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 0).await;
    });
    let retries = script.count();
    assert!(retries < 10, "{retries} retries, should be < 10");
    assert_eq!(
        retries, 4,
        "contract: Fetch 4 and Backoff: index 0 counts as a failure"
    );
    cache.close();
}

/// A blocking refresh type answering `(0, index)`; a fetch with a min index takes 10 ms (a
/// server answering "no change" quickly — Go's mock answers at once, a real-time hot loop).
/// Records the min index of every fetch.
fn no_index_type(sim: &SimRuntime, index: u64) -> (MockType<u64>, Arc<Mutex<Vec<u64>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (sim, s) = (sim.clone(), seen.clone());
    let ty = MockType::new(
        RegisterOptions::new()
            .supports_blocking(true)
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .query_timeout(Duration::from_secs(300)),
        move |o, _| {
            let mut seen = s.lock().unwrap();
            assert!(seen.len() < HOT_LOOP, "hot loop");
            seen.push(o.min_index);
            let sim = sim.clone();
            async move {
                if o.min_index > 0 {
                    sim.sleep(ms(10)).await;
                }
                Ok(FetchResult::new(0, index))
            }
        },
    );
    (ty, seen)
}

/// Go `TestCacheGet_noIndexSetsOne`: the first fetch is sent min index 0, every background
/// refresh after it a min index above 0, both for an RPC answering index 1 and for one
/// answering index 0. (In Go the second half reuses the first half's entry, so its mock is
/// never called; here it gets a fresh cache so the index-0 RPC is exercised.)
#[test]
fn cache_get_no_index_sets_one() {
    for index in [1, 0] {
        let sim = SimRuntime::new(1);
        let cache = Cache::new(sim.handle());
        let (ty, seen) = no_index_type(&sim, index);
        let typed = cache.register(ty);
        sim.block_on(async {
            let rx = spawn_get(&sim, &typed, req("hello"));
            expect_value(&sim, &rx, 0).await;
            sim.sleep(ms(100)).await;
        });
        let seen = seen.lock().unwrap().clone();
        assert!(
            seen.len() >= 2,
            "rpc index {index}: background refresh ran: {seen:?}"
        );
        assert_eq!(seen[0], 0, "rpc index {index}: {seen:?}");
        assert!(
            seen[1..].iter().all(|&m| m > 0),
            "rpc index {index}: background refreshes send min index > 0: {seen:?}"
        );
        cache.close();
    }
}

/// Go `TestCacheGet_fetchTimeout`: the fetch of a blocking type is handed the type's query
/// timeout.
#[test]
fn cache_get_fetch_timeout() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let timeout = Duration::from_secs(600);
    let (ty, script) = scripted(
        &sim,
        RegisterOptions::new()
            .query_timeout(timeout)
            .supports_blocking(true),
        vec![Step::ok(42u64, 0).times(1)],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);
    });
    script.assert_expectations();
    assert_eq!(script.calls()[0].timeout, timeout);
}

// ===== Expiry =====

/// Go `TestCacheGet_expire`: an entry not read for its TTL (400 ms) is evicted and the next
/// get fetches again; a hit reports an age of at least the time slept (exactly, here).
#[test]
fn cache_get_expire() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(
        &sim,
        RegisterOptions::new().last_get_ttl(ms(400)),
        vec![Step::ok(42u64, 0).times(2)],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);

        sim.sleep(ms(5)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(r.meta.hit);
        assert!(r.meta.age >= ms(5), "age {:?}", r.meta.age);
        assert_eq!(r.meta.age, ms(5));

        sim.sleep(ms(500)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);
        sim.sleep(ms(20)).await;
    });
    script.assert_expectations();
}

/// Go `TestCacheGet_expireResetGet`: every get resets the TTL (150 ms), so gets every 50 ms
/// keep the entry for 250 ms; 200 ms without a read evicts it.
#[test]
fn cache_get_expire_reset_get() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(
        &sim,
        RegisterOptions::new().last_get_ttl(ms(150)),
        vec![Step::ok(42u64, 0).times(2)],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);
        for _ in 0..5 {
            sim.sleep(ms(50)).await;
            let r = typed.get(&req("hello")).await.unwrap();
            assert_eq!(r.value, Some(42));
            assert!(r.meta.hit);
        }
        sim.sleep(ms(200)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);
        sim.sleep(ms(20)).await;
    });
    script.assert_expectations();
}

/// Cleanup-on-eviction state (Consul's `testCloser`): our cleanup is `Drop`.
struct Closer(Arc<AtomicBool>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Go `TestCacheGet_expireClose`: an expired entry's state is cleaned up (Go's `io.Closer`,
/// our `Drop`).
#[test]
fn cache_get_expire_close() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let closed = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, n) = (closed.clone(), calls.clone());
    let typed = cache.register(MockType::new(
        RegisterOptions::new()
            .supports_blocking(true)
            .last_get_ttl(ms(100)),
        move |_, _| {
            n.fetch_add(1, Ordering::SeqCst);
            let state: FetchState = Arc::new(Closer(c.clone()));
            async move { Ok(FetchResult::new(42u64, 0).with_state(state)) }
        },
    ));
    sim.block_on(async {
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);
        assert!(!closed.load(Ordering::SeqCst));
        sim.sleep(ms(200)).await;
        assert!(closed.load(Ordering::SeqCst), "state cleaned up on expiry");
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    cache.close();
}

/// State that cancels a context when cleaned up (Consul's `testCloser` with a `closeFn`).
struct CancelOnDrop(Gate);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// The state to return: the entry's own (Go returns one shared closer every time, and our
/// cleanup is `Drop`, which also runs when a state is replaced), or a new one from `make`.
fn keep_state(last: Option<FetchState>, make: impl FnOnce() -> FetchState) -> FetchState {
    last.unwrap_or_else(make)
}

/// Go `TestCacheGet_expireBackgroudRefreshCancel`: a blocking refresh type whose open fetch
/// ends only when the entry's state is cleaned up (eviction cancels it): after the TTL
/// (400 ms) the entry is gone and the next get is a miss — the cancelled fetch did not put it
/// back. (Our cache also drops an evicted entry's fetch in flight, contract: Fetch 7.)
#[test]
fn cache_get_expire_backgroud_refresh_cancel() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let cancel = Gate::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, n) = (cancel.clone(), calls.clone());
    let typed = cache.register(MockType::new(
        RegisterOptions::new()
            .last_get_ttl(ms(400))
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .supports_blocking(true),
        move |o, _| {
            assert!(n.fetch_add(1, Ordering::SeqCst) < HOT_LOOP, "hot loop");
            let last = o.last_result.and_then(|l| l.state);
            let state = keep_state(last, || Arc::new(CancelOnDrop(c.clone())));
            let wait = (o.min_index == 4).then(|| c.rx.clone());
            async move {
                if let Some(cancelled) = wait {
                    // Wait for a new value until the entry is evicted ("context canceled").
                    drop(state);
                    let _ = cancelled.recv().await;
                    return Err(MockError::new("context canceled"));
                }
                Ok(FetchResult::new(8u64, 4).with_state(state))
            }
        },
    ));
    sim.block_on(async {
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(8), 4, false));

        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(8), 4, true));

        sim.sleep(ms(500)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!((r.value, r.meta.index), (Some(8), 4));
        assert!(
            !r.meta.hit,
            "the fetch should not have re-populated the cache entry after it expired"
        );
        sim.sleep(ms(20)).await;
    });
    assert!(calls.load(Ordering::SeqCst) >= 2);
    cache.close();
}

/// Go `TestCacheGet_expireBackgroudRefresh`: a blocking refresh fetch that returns (same
/// value, same index) only after the entry expired does not re-insert it: the next get is a
/// miss. Go's released fetches then answer at once (a real-time hot loop); here each takes
/// 10 ms of virtual time.
#[test]
fn cache_get_expire_backgroud_refresh() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let ctrl = Gate::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, n, rt) = (ctrl.clone(), calls.clone(), sim.clone());
    let typed = cache.register(MockType::new(
        RegisterOptions::new()
            .last_get_ttl(ms(400))
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .supports_blocking(true),
        move |o, _| {
            assert!(n.fetch_add(1, Ordering::SeqCst) < HOT_LOOP, "hot loop");
            let wait = (o.min_index == 4).then(|| c.rx.clone());
            let rt = rt.clone();
            async move {
                if let Some(ctrl) = wait {
                    // Return "after a timeout with no change" when the test says so.
                    let _ = ctrl.recv().await;
                    rt.sleep(ms(10)).await;
                }
                Ok(FetchResult::new(8u64, 4))
            }
        },
    ));
    sim.block_on(async {
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(8), 4, false));

        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(8), 4, true));

        sim.sleep(ms(500)).await;
        ctrl.open();
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!((r.value, r.meta.index), (Some(8), 4));
        assert!(
            !r.meta.hit,
            "the fetch should not have re-populated the cache entry after it expired"
        );
        sim.sleep(ms(20)).await;
    });
    assert!(calls.load(Ordering::SeqCst) >= 2);
    cache.close();
}

/// Go `TestCacheGet_expireResetGetNoChange`: a blocking get that waits 300 ms (twice the
/// 150 ms TTL) while the server keeps answering "no change" every 10 ms keeps its entry alive:
/// the entry's state is never cleaned up (contract: Get 8: every look, waiting included, extends
/// the TTL).
#[test]
fn cache_get_expire_reset_get_no_change() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let closed = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, n, rt) = (closed.clone(), calls.clone(), sim.clone());
    let typed = cache.register(MockType::new(
        RegisterOptions::new()
            .last_get_ttl(ms(150))
            .supports_blocking(true)
            .refresh(true),
        move |o, _| {
            assert!(n.fetch_add(1, Ordering::SeqCst) < HOT_LOOP, "hot loop");
            let last = o.last_result.and_then(|l| l.state);
            let state = keep_state(last, || Arc::new(Closer(c.clone())));
            let rt = rt.clone();
            async move {
                if o.min_index == 10 {
                    // A very fast "timeout" from the backend, shorter than the TTL.
                    rt.sleep(ms(10)).await;
                }
                Ok(FetchResult::new(42u64, 10).with_state(state))
            }
        },
    ));
    sim.block_on(async {
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(42), 10, false));

        let start = sim.elapsed();
        let r = typed
            .get(&req("hello").min_index(10).timeout(ms(300)))
            .await
            .unwrap();
        assert_eq!((r.value, r.meta.index), (Some(42), 10));
        assert!(sim.elapsed() - start >= ms(300), "{:?}", sim.elapsed());
        assert!(
            !closed.load(Ordering::SeqCst),
            "cache entry should not have been evicted"
        );
        sim.sleep(ms(20)).await;
    });
    assert!(calls.load(Ordering::SeqCst) >= 2);
    cache.close();
}

// ===== Partitions =====

/// Go `TestCacheGet_duplicateKeyDifferentType`: one key in two types is two entries. (Types
/// are told apart by Rust type here, so the second one has another value type.)
#[test]
fn cache_get_duplicate_key_different_type() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty1, script1) = scripted(&sim, test_type(), vec![Step::ok(100u64, 0)]);
    let (ty2, script2) = scripted(&sim, test_type(), vec![Step::ok(200i64, 0)]);
    let t1 = cache.register(ty1);
    let t2 = cache.register(ty2);
    sim.block_on(async {
        let r = t1.get(&req("foo")).await.unwrap();
        assert_eq!(r.value, Some(100));
        assert!(!r.meta.hit);
        let r = t2.get(&req("foo")).await.unwrap();
        assert_eq!(r.value, Some(200));
        assert!(!r.meta.hit);
        let r = t1.get(&req("foo")).await.unwrap();
        assert_eq!(r.value, Some(100));
        assert!(r.meta.hit);
        sim.sleep(ms(20)).await;
    });
    script1.assert_expectations();
    script2.assert_expectations();
    assert_eq!((script1.count(), script2.count()), (1, 1));
}

/// Consul's `testPartitionType`: a blocking type whose value is the request's datacenter and
/// token.
fn partition_type() -> MockType<String> {
    MockType::new(test_type(), |_, r: MockRequest| {
        let info = r.cache_info();
        let v = format!("{}{}", info.datacenter, info.token);
        async move { Ok(FetchResult::new(v, 0)) }
    })
}

/// Go `TestCacheGet_partitionDC`: one key in two datacenters is two entries.
#[test]
fn cache_get_partition_dc() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let typed = cache.register(partition_type());
    sim.block_on(async {
        let rx1 = spawn_get(&sim, &typed, req("hello").datacenter("dc1"));
        let rx2 = spawn_get(&sim, &typed, req("hello").datacenter("dc9"));
        expect_value(&sim, &rx1, "dc1".to_string()).await;
        expect_value(&sim, &rx2, "dc9".to_string()).await;
    });
}

/// Go `TestCacheGet_partitionToken`: one key with two ACL tokens is two entries.
#[test]
fn cache_get_partition_token() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let typed = cache.register(partition_type());
    sim.block_on(async {
        let rx1 = spawn_get(&sim, &typed, req("hello").token(""));
        let rx2 = spawn_get(&sim, &typed, req("hello").token("foo"));
        expect_value(&sim, &rx1, String::new()).await;
        expect_value(&sim, &rx2, "foo".to_string()).await;
    });
}

// ===== Age =====

/// Go `TestCacheGet_refreshAge`: a refresh type reports age 0 while its background refresh is
/// healthy, a growing age since contact was lost while it fails, and 0 again once it recovers
/// (the new value 10 is then served). Go's mock answers at once (its "wait for a new value"
/// branch never runs for a non-blocking type, a real-time hot loop); here each successful
/// fetch takes 5 ms of virtual time.
#[test]
fn cache_get_refresh_age() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let index = Arc::new(AtomicU64::new(0));
    let should_fail = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (rt, i, f, n) = (
        sim.clone(),
        index.clone(),
        should_fail.clone(),
        calls.clone(),
    );
    let typed = cache.register(MockType::new(
        RegisterOptions::new()
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .query_timeout(Duration::from_secs(300)),
        move |_, _| {
            assert!(n.fetch_add(1, Ordering::SeqCst) < HOT_LOOP, "hot loop");
            let idx = i.load(Ordering::SeqCst);
            let fail = f.load(Ordering::SeqCst);
            let rt = rt.clone();
            async move {
                if fail {
                    return Err(MockError::new("test error"));
                }
                rt.sleep(ms(5)).await;
                Ok(FetchResult::new(idx * 2, idx))
            }
        },
    ));
    index.store(4, Ordering::SeqCst);
    sim.block_on(async {
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 8).await;

        sim.sleep(ms(2)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(8));
        assert!(r.meta.hit);
        assert_eq!(r.meta.age, Duration::ZERO, "background refresh is active");

        should_fail.store(true, Ordering::SeqCst);
        sim.sleep(ms(50)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(8));
        assert!(r.meta.hit);
        assert!(r.meta.age > Duration::ZERO, "refresh is failing");
        let last_age = r.meta.age;

        sim.sleep(ms(5)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(8));
        assert!(r.meta.hit);
        assert!(
            r.meta.age > last_age + ms(1),
            "age {:?} after {last_age:?}",
            r.meta.age
        );

        should_fail.store(false, Ordering::SeqCst);
        index.fetch_add(1, Ordering::SeqCst);
        let mut recovered = false;
        for _ in 0..50 {
            sim.sleep(ms(100)).await;
            let r = typed.get(&req("hello")).await.unwrap();
            assert!(r.meta.hit);
            if r.value == Some(10) {
                assert_eq!(r.meta.age, Duration::ZERO, "refresh is active again");
                recovered = true;
                break;
            }
        }
        assert!(recovered, "no update observed after {:?}", sim.elapsed());
    });
    cache.close();
}

/// Go `TestCacheGet_refreshAge`, `TestCacheGet_noIndexSetsOne` and
/// `TestCacheGet_expireBackgroudRefresh` with their mocks as written: a refresh fetch that
/// answers at once (a non-blocking type at index 4; a blocking type answering the same index
/// whatever min index it is sent), so the refresh runs back to back. Go
/// burns a core and the tests pass; on a single-threaded runtime our refresh chain must let
/// the runtime's other tasks (the test itself) run between such fetches, else a port of those
/// tests on `#[tokio::test]` never gets control back. Checks that a task on the same
/// runtime runs during 1000 back-to-back fetches (then the fetch slows down so the test ends).
#[test]
fn cache_get_refresh_age_immediate_fetches_yield() {
    for blocking in [false, true] {
        let sim = SimRuntime::new(1);
        let cache = Cache::new(sim.handle());
        let ticks = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (t, s, rt) = (ticks.clone(), seen.clone(), sim.clone());
        let typed = cache.register(MockType::new(
            RegisterOptions::new()
                .refresh(true)
                .supports_blocking(blocking)
                .refresh_timer(Duration::ZERO)
                .query_timeout(Duration::from_secs(300)),
            move |_, _| {
                let mut s = s.lock().unwrap();
                s.push(t.load(Ordering::SeqCst));
                let slow = s.len() > 1000;
                let rt = rt.clone();
                async move {
                    if slow {
                        rt.sleep(ms(5)).await;
                    }
                    Ok(FetchResult::new(8u64, if blocking { 1 } else { 4 }))
                }
            },
        ));
        // Another task of the runtime: it counts each time it runs, yielding in between.
        let t = ticks.clone();
        sim.spawn_detached(async move {
            while t.fetch_add(1, Ordering::SeqCst) < 5000 {
                let mut yielded = false;
                futures::future::poll_fn(|cx| {
                    if yielded {
                        std::task::Poll::Ready(())
                    } else {
                        yielded = true;
                        cx.waker().wake_by_ref();
                        std::task::Poll::Pending
                    }
                })
                .await;
            }
        });
        sim.block_on(async {
            let r = typed.get(&req("hello")).await.unwrap();
            assert_eq!(r.value, Some(8));
            sim.sleep(ms(2)).await;
        });
        let seen = seen.lock().unwrap().clone();
        assert!(
            seen.len() >= 1000,
            "blocking {blocking}: {} fetches",
            seen.len()
        );
        assert!(
            seen[999] - seen[0] >= 900,
            "blocking {blocking}: the other task ran {} times during 1000 back-to-back \
             refresh fetches, not between each",
            seen[999] - seen[0]
        );
        cache.close();
    }
}

/// Go `TestCacheGet_nonRefreshAge`: a non-refresh type reports the time since the value was
/// fetched; expiry and `max_age` make the next get fetch again, with a smaller age.
#[test]
fn cache_get_non_refresh_age() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let index = Arc::new(AtomicU64::new(0));
    let i = index.clone();
    let typed = cache.register(MockType::new(
        RegisterOptions::new().last_get_ttl(ms(100)),
        move |_, _| {
            let idx = i.load(Ordering::SeqCst);
            async move { Ok(FetchResult::new(idx * 2, idx)) }
        },
    ));
    index.store(4, Ordering::SeqCst);
    sim.block_on(async {
        let rx = spawn_get(&sim, &typed, req("hello"));
        expect_value(&sim, &rx, 8).await;

        sim.sleep(ms(5)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(8));
        assert!(r.meta.hit);
        assert!(r.meta.age >= ms(5), "age {:?}", r.meta.age);
        let last_age = r.meta.age;

        sim.sleep(ms(200)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(8));
        assert!(!r.meta.hit, "expired");
        assert!(r.meta.age < last_age, "age {:?}", r.meta.age);

        sim.sleep(ms(5)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(8));
        assert!(r.meta.hit);
        assert!(r.meta.age >= ms(5), "age {:?}", r.meta.age);
        let last_age = r.meta.age;

        let r = typed.get(&req("hello").max_age(ms(1))).await.unwrap();
        assert_eq!(r.value, Some(8));
        assert!(!r.meta.hit, "max_age exceeded");
        assert!(r.meta.age < last_age, "age {:?}", r.meta.age);
    });
}

/// Go `TestCacheGet_nonBlockingType`: a non-blocking type never blocks on a min index (a hit)
/// and is never sent one; `max_age` and `must_revalidate` make it fetch again.
#[test]
fn cache_get_non_blocking_type() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(
        &sim,
        test_type_non_blocking(),
        vec![Step::ok(42u64, 1).once(), Step::ok(43u64, 2).times(2)],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(!r.meta.hit);

        let r = typed.get(&req("hello")).await.unwrap();
        assert_eq!(r.value, Some(42));
        assert!(r.meta.hit);

        let r = typed
            .get(&req("hello").min_index(1).timeout(Duration::from_secs(600)))
            .await
            .unwrap();
        assert_eq!(r.value, Some(42));
        assert!(r.meta.hit);

        sim.sleep(ms(10)).await;
        let r = typed.get(&req("hello").max_age(ms(5))).await.unwrap();
        assert_eq!(r.value, Some(43));
        assert!(!r.meta.hit);

        let r = typed.get(&req("hello").must_revalidate()).await.unwrap();
        assert_eq!(r.value, Some(43));
        assert!(!r.meta.hit);
        sim.sleep(ms(20)).await;
    });
    script.assert_expectations();
    assert!(
        script.calls().iter().all(|c| c.min_index == 0),
        "{:?}",
        script.calls()
    );
}

// ===== Rate limit =====

/// A blocking type whose n-th fetch answers index 41 + n at once; records fetch times.
fn stepping_type(sim: &SimRuntime) -> (MockType<u64>, Arc<Mutex<Vec<Duration>>>) {
    let times = Arc::new(Mutex::new(Vec::new()));
    let (sim, t) = (sim.clone(), times.clone());
    let ty = MockType::new(test_type(), move |_, _| {
        let mut times = t.lock().unwrap();
        assert!(times.len() < HOT_LOOP, "hot loop");
        times.push(sim.elapsed());
        let index = 41 + times.len() as u64;
        async move { Ok(FetchResult::new(index, index)) }
    });
    (ty, times)
}

/// Gets `key` blocking on its current index, `n` times in a row; returns the fetch times.
async fn blocking_gets(
    typed: &TypedCache<MockType<u64>>,
    times: &Mutex<Vec<Duration>>,
    n: usize,
) -> Vec<Duration> {
    let before = times.lock().unwrap().len();
    for _ in 0..n {
        let index = typed.get(&req("hello1")).await.unwrap().meta.index;
        let r = typed.get(&req("hello1").min_index(index)).await.unwrap();
        assert_eq!(r.meta.index, index + 1);
    }
    times.lock().unwrap()[before..].to_vec()
}

fn close_to(a: Duration, b: Duration) -> bool {
    a.abs_diff(b) <= Duration::from_micros(1)
}

/// Go `TestCacheReload`: reloading the rate limit applies to an existing entry (Go reads the
/// entry's limiter; here its effect is measured: the pause between the entry's fetches, and
/// how many run back to back). Go's `ReloadOptions` also answers whether anything changed;
/// `set_rate_limit` has no such answer, so that part is not ported.
#[test]
fn cache_reload() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle())
        .rate_limit(RateLimit::new(1.0, 1).unwrap())
        .build();
    let (ty, times) = stepping_type(&sim);
    let typed = cache.register(ty);
    sim.block_on(async {
        let r = typed.get(&req("hello1").min_index(1)).await.unwrap();
        assert_eq!(r.meta.index, 42);

        // Rate 1/s, burst 1: the entry's next fetch waits a second.
        let t = blocking_gets(&typed, &times, 1).await;
        assert!(close_to(t[0], Duration::from_secs(1)), "{t:?}");

        // Only the rate changes (100/s): the next fetch waits 10 ms.
        cache.set_rate_limit(RateLimit::new(100.0, 1).unwrap());
        let start = sim.elapsed();
        let t = blocking_gets(&typed, &times, 1).await;
        assert!(close_to(t[0] - start, ms(10)), "{t:?} from {start:?}");

        // Only the burst changes (5): after a rest, 5 fetches run back to back, the 6th waits.
        cache.set_rate_limit(RateLimit::new(100.0, 5).unwrap());
        sim.sleep(Duration::from_secs(1)).await;
        let start = sim.elapsed();
        let t = blocking_gets(&typed, &times, 6).await;
        assert!(t[..5].iter().all(|&x| x == start), "{t:?} from {start:?}");
        assert!(close_to(t[5] - start, ms(10)), "{t:?} from {start:?}");

        // Both change (1000/s, burst 42).
        cache.set_rate_limit(RateLimit::new(1000.0, 42).unwrap());
        sim.sleep(Duration::from_secs(1)).await;
        let start = sim.elapsed();
        let t = blocking_gets(&typed, &times, 43).await;
        assert!(t[..42].iter().all(|&x| x == start), "{t:?} from {start:?}");
        assert!(close_to(t[42] - start, ms(1)), "{t:?} from {start:?}");
    });
}

/// Go `TestCacheThrottle`: with a rate of 10/s and burst 1 per entry, a get blocking on index 5
/// through fetches answering 4, 5, 6 gets 6 after two 100 ms waits (~200 ms, not before
/// 190 ms); entries of two types have their own limiters, so both answer together.
#[test]
fn cache_throttle() {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle())
        .rate_limit(RateLimit::new(10.0, 1).unwrap())
        .build();
    let (ty1, script1) = scripted(
        &sim,
        test_type(),
        vec![
            Step::ok(1u64, 4).once(),
            Step::ok(12u64, 5).once(),
            Step::ok(42u64, 6).once(),
        ],
    );
    let (ty2, script2) = scripted(
        &sim,
        test_type(),
        vec![
            Step::ok(1i64, 4).once(),
            Step::ok(12i64, 5).once(),
            Step::ok(43i64, 6).once(),
        ],
    );
    let t1 = cache.register(ty1);
    let t2 = cache.register(ty2);
    sim.block_on(async {
        let rx1 = spawn_get(&sim, &t1, req("hello1").min_index(5));
        let rx2 = spawn_get(&sim, &t2, req("hello2").min_index(5));
        assert!(
            within(&sim, &rx1, ms(190)).await.is_none(),
            "result1 should block"
        );
        assert!(rx2.try_recv().is_err(), "result2 should block");
        let o1 = within(&sim, &rx1, ms(30))
            .await
            .expect("shouldn't block that long (1)");
        // Both within 220 ms of the start (Go: 190 ms + 30 ms).
        let left = ms(220).saturating_sub(sim.elapsed());
        let o2 = within(&sim, &rx2, left)
            .await
            .expect("shouldn't block that long (2)");
        assert_eq!(sim.elapsed(), ms(200), "both answer after two 100 ms waits");
        assert_eq!(o1.value, Some(42));
        assert_eq!(o2.value, Some(43));
        assert!(o1.error.is_none() && o2.error.is_none());
    });
    script1.assert_expectations();
    script2.assert_expectations();
    for script_times in [
        script1.calls().iter().map(|c| c.at).collect::<Vec<_>>(),
        script2.calls().iter().map(|c| c.at).collect(),
    ] {
        assert_eq!(script_times.len(), 3);
        assert!(close_to(script_times[1], ms(100)), "{script_times:?}");
        assert!(close_to(script_times[2], ms(200)), "{script_times:?}");
    }
}

// ===== Lifecycle =====

/// Go `TestCache_ExpiryLoop_ExitsWhenStopped`: the expiry loop ends when the cache is stopped.
/// Go runs the loop on a bare struct; here the observable effect: after `close` no expiry
/// timer stays armed and an entry past its TTL is not evicted (contract: Lifecycle 6: reads still work).
#[test]
fn cache_expiry_loop_exits_when_stopped() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(
        &sim,
        RegisterOptions::new().last_get_ttl(ms(100)),
        vec![Step::ok(1u64, 1).once()],
    );
    let typed = cache.register(ty);
    sim.block_on(async {
        typed.get(&req("hello")).await.unwrap();
        // Let the expiry task run and arm its timer.
        sim.sleep(ms(1)).await;
    });
    assert!(
        sim.pending_timers() > 0,
        "the expiry loop waits for the TTL"
    );
    cache.close();
    sim.block_on(sim.sleep(ms(50)));
    assert_eq!(sim.pending_timers(), 0, "the expiry loop exited");
    sim.block_on(async {
        sim.sleep(ms(500)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert!(r.meta.hit, "no expiry after close");
    });
    assert_eq!(cache.len(), 1);
    script.assert_expectations();
}

/// Go `TestCache_Prepopulate`: a prepopulated value (dc1/token/v1, index 1) is served by a get
/// of the same partition without fetching (Go's type refreshes and does not block, so min
/// index 1 is no reason to fetch).
#[test]
fn cache_prepopulate() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let (ty, script) = scripted(
        &sim,
        RegisterOptions::new().refresh(true),
        vec![Step::ok(10u64, 5)],
    );
    let typed = cache.register(ty);
    typed
        .prepopulate(
            &RequestInfo::new("v1").datacenter("dc1").token("token"),
            17,
            1,
        )
        .unwrap();
    sim.block_on(async {
        let r = typed
            .get(&req("v1").token("token").datacenter("dc1").min_index(1))
            .await
            .unwrap();
        assert_eq!(r.value, Some(17));
    });
    assert_eq!(script.count(), 0, "{:?}", script.calls());
    cache.close();
}

/// Whether the type's one entry has a fetch in flight (Go reads `entry.Fetching` under the
/// cache's lock).
fn fetching(typed: &TypedCache<MockType<bool>>) -> Option<bool> {
    let page = typed.entries(&EntryQuery::new());
    assert!(page.entries.len() <= 1);
    page.entries.first().map(|e| e.fetching)
}

/// Go `TestCache_RefreshLifeCycle`: a blocking refresh type keeps fetching after a value and
/// after a (non-fatal) permission-denied error, which a waiting get receives; an "ACL not
/// found" error (fatal) reaches the waiting get, stops the refresh and leaves the entry.
#[test]
fn cache_refresh_life_cycle() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let release2 = Gate::new();
    let release3 = Gate::new();
    let (ty, script) = scripted(
        &sim,
        RegisterOptions::new()
            .refresh(true)
            .supports_blocking(true)
            .refresh_timer(Duration::ZERO)
            .query_timeout(Duration::from_secs(600)),
        vec![
            Step::ok(true, 2).once(),
            Step::err(MockError::new("Permission denied: forced error"))
                .once()
                .gated(&release2),
            Step::err(MockError::fatal("ACL not found"))
                .once()
                .gated(&release3),
        ],
    );
    let typed = cache.register(ty);
    let request = |index: u64| req("v1").token("token").datacenter("dc1").min_index(index);
    sim.block_on(async {
        let r = typed.get(&request(1)).await.unwrap();
        assert_eq!(r.value, Some(true));
        assert_eq!(fetching(&typed), Some(true), "refreshing after the value");

        let rx = spawn_get(&sim, &typed, request(2));
        assert!(within(&sim, &rx, ms(100)).await.is_none());
        release2.open();
        let o = within(&sim, &rx, ms(500))
            .await
            .expect("blocking cache get never returned");
        let err = o.error.expect("permission denied");
        assert!(
            matches!(&err, GetError::Fetch(e) if e.message.starts_with("Permission denied")),
            "{err:?}"
        );
        assert_eq!(fetching(&typed), Some(true), "refreshing after the error");

        let rx = spawn_get(&sim, &typed, request(5));
        assert!(within(&sim, &rx, ms(100)).await.is_none());
        release3.open();
        let o = within(&sim, &rx, ms(500))
            .await
            .expect("blocking cache get never returned");
        let err = o.error.expect("ACL not found");
        assert!(
            matches!(&err, GetError::Fetch(e) if e.message == "ACL not found"),
            "{err:?}"
        );
        assert_eq!(
            fetching(&typed),
            Some(false),
            "the fatal error stopped the refresh but kept the entry"
        );
        // And nothing fetches again (Go's mock would fail a fourth call).
        sim.sleep(Duration::from_secs(3600)).await;
        assert_eq!(fetching(&typed), Some(false));
    });
    script.assert_expectations();
    cache.close();
}
