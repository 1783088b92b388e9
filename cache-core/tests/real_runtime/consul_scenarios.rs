//! Consul's cache and watch tests on real runtimes: the scenarios of `agent/cache/cache_test.go`
//! and `agent/cache/watch_test.go` (hashicorp/consul), whose virtual-time ports are
//! `cache-core/tests/consul_cache.rs` and `consul_watch.rs`, written once here against
//! `SharedRuntime` and run by every adapter crate (`cache-tokio`, `cache-async-std`,
//! `cache-smol`, each in `tests/consul_scenarios.rs`) with [`consul_scenarios!`].
//!
//! This file sits in a subfolder, so it is not a test target of its own: an adapter includes it
//! with `#[macro_use] #[path = "../../cache-core/tests/real_runtime/consul_scenarios.rs"] mod
//! scenarios;` and calls `consul_scenarios!(harness)`, where `harness` runs one
//! `FnOnce(SharedRuntime) -> BoxFuture<'static, ()>` to completion on a fresh runtime (the
//! conformance suite's harness shape). Every scenario runs under a [`Watchdog`] (a starved
//! runtime cannot fail by itself) and calls `Cache::close` at its end.
//!
//! Each scenario is named after its Go test (`cache_get_*`, `cache_notify*`, ...); a few more
//! (`index_reset_*`, `stale_if_error_*`, `close_*`) check the rest of Consul's get and watch
//! behaviour that those tests reach only in part. Real time changes what can be asserted:
//! Go's millisecond windows become 100–300 ms, an expected answer may take up to [`ANSWER`],
//! and timings are bounded on the side the contract promises (a timeout is not early, a rate
//! limit is respected, "at most N fetches"), never asserted exactly. Where the Go mock answers
//! at once for ever (a real-time hot loop), the port keeps that: a chain that does not yield
//! would starve a single-threaded runtime (contract: Refresh 6), which is what this file is
//! here to find. Where Go's backoff would take seconds, the cache gets a shorter backoff unit
//! and says so. Each scenario takes at most about 2 s; the whole file a few seconds per runtime.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use cache_core::testing::{MockError, MockRequest, MockServer, MockType};
use cache_core::watch::UpdateEvent;
use cache_core::{
    BackoffPolicy, Cache, CacheRequest, CacheType, EntryQuery, FetchOptions, FetchResult,
    FetchState, GetError, GetOutcome, RateLimit, RegisterOptions, RequestInfo, SharedRuntime,
    Sleep, TypedCache, WatchError,
};
use futures::future::{Either, select};
use futures::{Stream, StreamExt};

/// One `#[test]` per scenario, each run by `$harness` under a watchdog. `$harness` is called
/// with the scenario as `FnOnce(SharedRuntime) -> BoxFuture<'static, ()>`; the including
/// module must be named `scenarios`.
macro_rules! consul_scenarios {
    ($harness:path) => {
        consul_scenarios!(@cases $harness;
            cache_get_no_index,
            cache_get_init_error,
            cache_get_cached_errors_dont_stick,
            cache_get_blank_cache_key,
            cache_get_blocking_init_same_key,
            cache_get_blocking_init_diff_keys,
            cache_get_blocking_index,
            cache_get_cancellation,
            cache_get_blocking_index_timeout,
            cache_get_blocking_index_error,
            cache_get_empty_fetch_result,
            cache_get_periodic_refresh,
            cache_get_periodic_refresh_multiple,
            cache_get_periodic_refresh_error_backoff,
            cache_get_periodic_refresh_bad_rpc_zero_index_error_backoff,
            cache_get_no_index_sets_one,
            cache_get_fetch_timeout,
            cache_get_expire,
            cache_get_expire_reset_get,
            cache_get_expire_close,
            cache_get_expire_backgroud_refresh_cancel,
            cache_get_expire_backgroud_refresh,
            cache_get_expire_reset_get_no_change,
            cache_get_duplicate_key_different_type,
            cache_get_partition_dc,
            cache_get_partition_token,
            cache_get_refresh_age,
            cache_get_non_refresh_age,
            cache_get_non_blocking_type,
            cache_reload,
            cache_throttle,
            cache_expiry_loop_exits_when_stopped,
            cache_prepopulate,
            cache_refresh_life_cycle,
            cache_notify,
            cache_notify_first_revision,
            cache_notify_stream_form,
            cache_notify_polling,
            cache_watch_error_backoff,
            cache_watch_error_backoff_non_blocking,
            cache_watch_error_backoff_non_blocking_stream_form,
            is_equal,
            index_reset_wakes_blocked_gets_and_watches,
            stale_if_error_serves_a_recent_value,
            close_stops_fetches_and_watches,
        );
    };
    (@cases $harness:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let _watchdog = ::cache_core::testing::Watchdog::arm(concat!(
                    "consul scenario ",
                    module_path!(),
                    "::",
                    stringify!($case)
                ));
                $harness(|rt| ::std::boxed::Box::pin($crate::scenarios::$case(rt)));
            }
        )*
    };
}

// ===== Helpers =====

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How long "should block" windows last (Go: 50 ms).
const BLOCKS: Duration = Duration::from_millis(100);

/// How long an answer that is due may take on a loaded machine (Go: 50–75 ms).
const ANSWER: Duration = Duration::from_secs(2);

/// How long `eventually` polls a condition before failing.
const EVENTUALLY: Duration = Duration::from_secs(5);

fn req(key: &str) -> MockRequest {
    MockRequest::new(key)
}

/// Consul's `TestType`: a blocking type with every other option at its default.
fn test_type() -> RegisterOptions {
    RegisterOptions::new().supports_blocking(true)
}

async fn sleep(rt: &SharedRuntime, d: Duration) {
    Sleep::after(&**rt, d).await;
}

/// `fut`'s output if it completes within `d`.
async fn within<F: Future>(rt: &SharedRuntime, d: Duration, fut: F) -> Option<F::Output> {
    let fut = std::pin::pin!(fut);
    match select(fut, Sleep::after(&**rt, d)).await {
        Either::Left((out, _)) => Some(out),
        Either::Right(_) => None,
    }
}

/// Polls `cond` every few milliseconds until it holds, failing after [`EVENTUALLY`].
async fn eventually(rt: &SharedRuntime, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = rt.now() + EVENTUALLY;
    while !cond() {
        assert!(rt.now() < deadline, "timed out waiting until {what}");
        sleep(rt, ms(5)).await;
    }
}

/// A trigger channel of the Go test: a fetch held by it returns once it is opened (or dropped).
struct Gate {
    open: Sender<()>,
    wait: Receiver<()>,
}

impl Gate {
    fn new() -> Self {
        let (open, wait) = async_channel::bounded(1);
        Self { open, wait }
    }

    fn open(&self) {
        self.open.close();
    }
}

/// How long a scripted answer takes.
#[derive(Clone)]
enum Wait {
    Now,
    Gate(Receiver<()>),
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

    fn err(message: &str) -> Self {
        Self {
            value: None,
            index: 0,
            state: None,
            error: Some(MockError::new(message)),
            times: None,
            wait: Wait::Now,
        }
    }

    fn fatal(message: &str) -> Self {
        Self {
            error: Some(MockError::fatal(message)),
            ..Self::err(message)
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
        self.wait = Wait::Gate(gate.wait.clone());
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
    start: Instant,
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

    fn min_indexes(&self) -> Vec<u64> {
        self.calls().iter().map(|c| c.min_index).collect()
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
    rt: &SharedRuntime,
    opts: RegisterOptions,
    steps: Vec<Step<V>>,
) -> (MockType<V>, Arc<Script<V>>) {
    let script = Arc::new(Script {
        start: rt.now(),
        steps: Mutex::new(steps.into_iter().map(|s| (s, 0)).collect()),
        calls: Mutex::new(Vec::new()),
    });
    let (rt, s) = (rt.clone(), script.clone());
    let ty = MockType::new(opts, move |o, r: MockRequest| {
        let mut steps = s.steps.lock().unwrap();
        let found = steps
            .iter()
            .position(|(step, used)| step.times.is_none_or(|n| *used < n));
        s.calls.lock().unwrap().push(Call {
            at: rt.now() - s.start,
            key: r.key().to_owned(),
            min_index: o.min_index,
            timeout: o.timeout,
            last: o
                .last_result
                .as_ref()
                .map(|l| (l.index, state_of(&l.state))),
            step: found,
        });
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
        let rt = rt.clone();
        async move {
            let Some((value, index, state, error, wait)) = answer else {
                return Err(MockError::new("unexpected fetch call"));
            };
            match wait {
                Wait::Now => {}
                Wait::Gate(gate) => {
                    let _ = gate.recv().await;
                }
                Wait::For(d) => sleep(&rt, d).await,
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
    rt: &SharedRuntime,
    typed: &TypedCache<T>,
    request: MockRequest,
) -> Receiver<GetOutcome<T::Value, T::Error>>
where
    T: CacheType<Request = MockRequest>,
{
    let (tx, rx) = async_channel::bounded(1);
    let typed = typed.clone();
    rt.spawn(Box::pin(async move {
        let outcome = typed.get_outcome(&request).await;
        let _ = tx.send(outcome).await;
    }));
    rx
}

/// The outcome on `rx` if it arrives within `d`.
async fn answer_within<T>(rt: &SharedRuntime, rx: &Receiver<T>, d: Duration) -> Option<T> {
    within(rt, d, rx.recv())
        .await
        .map(|r| r.expect("the get task ended without an answer"))
}

/// Consul's `TestCacheGetChResult`: the get answered `expected` without error (within
/// [`ANSWER`]).
async fn expect_value<V: PartialEq + std::fmt::Debug>(
    rt: &SharedRuntime,
    rx: &Receiver<Outcome<V>>,
    expected: V,
) -> Outcome<V> {
    let outcome = answer_within(rt, rx, ANSWER)
        .await
        .expect("result not sent on channel in time");
    assert!(
        outcome.error.is_none(),
        "unexpected error: {:?}",
        outcome.error
    );
    assert_eq!(outcome.value, Some(expected));
    outcome
}

/// Awaits `fut`, failing if it takes longer than `limit`.
async fn bounded<F: Future>(rt: &SharedRuntime, limit: Duration, what: &str, fut: F) -> F::Output {
    within(rt, limit, fut)
        .await
        .unwrap_or_else(|| panic!("{what}: not done within {limit:?}"))
}

/// The type's only entry.
fn only_entry<T: CacheType>(typed: &TypedCache<T>) -> Option<cache_core::EntryInfo> {
    let page = typed.entries(&EntryQuery::new());
    assert!(page.entries.len() <= 1);
    page.entries.into_iter().next()
}

// ===== Get basics =====

/// Go `TestCacheGet_noIndex`: a get without an index fetches once, the next one is a hit.
pub(crate) async fn cache_get_no_index(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(&rt, test_type(), vec![Step::ok(42u64, 0).times(1)]);
    let typed = cache.register(ty);
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), true));
    sleep(&rt, ms(20)).await;
    script.assert_expectations();
    cache.close();
}

/// Go `TestCacheGet_initError`: a failed first fetch returns its error and no value; the next
/// get fetches again.
pub(crate) async fn cache_get_init_error(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted::<u64>(&rt, test_type(), vec![Step::err("error").times(2)]);
    let typed = cache.register(ty);
    for _ in 0..2 {
        let o = typed.get_outcome(&req("hello")).await;
        assert!(o.error.is_some());
        assert_eq!((o.value, o.meta.hit), (None, false));
    }
    sleep(&rt, ms(20)).await;
    script.assert_expectations();
    cache.close();
}

/// Go `TestCacheGet_cachedErrorsDontStick` (consul#4480): after an error then a success, a
/// blocking get whose fetches keep answering the same index keeps blocking instead of returning
/// the old error. Each "timed out" blocking fetch takes 50 ms (Go's answers at once once
/// triggered).
pub(crate) async fn cache_get_cached_errors_dont_stick(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(
        &rt,
        test_type(),
        vec![
            Step::err("initial error").once(),
            Step::ok(42u64, 123).once(),
            Step::ok(42u64, 123).after(ms(50)),
        ],
    );
    let typed = cache.register(ty);
    let o = typed.get_outcome(&req("hello")).await;
    assert!(o.error.is_some());
    assert_eq!((o.value, o.meta.hit), (None, false));
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));

    let rx = spawn_get(&rt, &typed, req("hello").min_index(123));
    let early = answer_within(&rt, &rx, ms(300)).await;
    assert!(
        early.is_none(),
        "result or error returned before an update happened: {early:?}"
    );
    script.assert_expectations();
    let calls = script.calls();
    assert!(
        calls[2..].iter().all(|c| c.min_index == 123),
        "blocking fetches are sent the entry's index: {calls:?}"
    );
    // ~300 ms of 50 ms "no change" answers: a handful, not a hot loop.
    assert!(calls.len() <= 2 + 8, "{} fetches", calls.len());
    cache.close();
}

/// Go `TestCacheGet_blankCacheKey`: an empty key bypasses the cache: every get fetches.
pub(crate) async fn cache_get_blank_cache_key(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(&rt, test_type(), vec![Step::ok(42u64, 0).times(2)]);
    let typed = cache.register(ty);
    for _ in 0..2 {
        let r = typed.get(&req("")).await.unwrap();
        assert_eq!((r.value, r.meta.hit), (Some(42), false));
    }
    sleep(&rt, ms(20)).await;
    script.assert_expectations();
    cache.close();
}

/// Go `TestCacheGet_blockingInitSameKey`: two gets of one key share the one initial fetch.
pub(crate) async fn cache_get_blocking_init_same_key(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let trigger = Gate::new();
    let (ty, script) = scripted(
        &rt,
        test_type(),
        vec![Step::ok(42u64, 0).gated(&trigger).times(1)],
    );
    let typed = cache.register(ty);
    let rx1 = spawn_get(&rt, &typed, req("hello"));
    let rx2 = spawn_get(&rt, &typed, req("hello"));
    assert!(
        answer_within(&rt, &rx1, BLOCKS).await.is_none(),
        "should block (1)"
    );
    assert!(rx2.try_recv().is_err(), "should block (2)");
    trigger.open();
    expect_value(&rt, &rx1, 42).await;
    expect_value(&rt, &rx2, 42).await;
    script.assert_expectations();
    cache.close();
}

/// Go `TestCacheGet_blockingInitDiffKeys`: gets of two keys block on their own fetches.
pub(crate) async fn cache_get_blocking_init_diff_keys(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let trigger = Gate::new();
    let (ty, script) = scripted(
        &rt,
        test_type(),
        vec![Step::ok(42u64, 0).gated(&trigger).times(2)],
    );
    let typed = cache.register(ty);
    let rx1 = spawn_get(&rt, &typed, req("hello"));
    let rx2 = spawn_get(&rt, &typed, req("goodbye"));
    assert!(
        answer_within(&rt, &rx1, BLOCKS).await.is_none(),
        "should block (1)"
    );
    assert!(rx2.try_recv().is_err(), "should block (2)");
    trigger.open();
    expect_value(&rt, &rx1, 42).await;
    expect_value(&rt, &rx2, 42).await;
    script.assert_expectations();
    let mut keys: Vec<String> = script.calls().into_iter().map(|c| c.key).collect();
    keys.sort();
    assert_eq!(keys, ["goodbye", "hello"]);
    cache.close();
}

/// Go `TestCacheGet_blockingIndex`: a get with a min index waits for a higher index.
pub(crate) async fn cache_get_blocking_index(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let trigger = Gate::new();
    let (ty, script) = scripted(
        &rt,
        test_type(),
        vec![
            Step::ok(1u64, 4).once(),
            Step::ok(12u64, 5).once(),
            Step::ok(42u64, 6).gated(&trigger),
        ],
    );
    let typed = cache.register(ty);
    let rx = spawn_get(&rt, &typed, req("hello").min_index(5));
    assert!(
        answer_within(&rt, &rx, BLOCKS).await.is_none(),
        "should block"
    );
    trigger.open();
    let o = expect_value(&rt, &rx, 42).await;
    assert_eq!(o.meta.index, 6);
    sleep(&rt, ms(20)).await;
    script.assert_expectations();
    assert_eq!(script.min_indexes(), [0, 4, 5], "{:?}", script.calls());
    cache.close();
}

/// Go `TestCacheGet_cancellation`: a blocking get still pending at its deadline is dropped
/// there (our cancellation, contract: Get 5) and returns at once.
pub(crate) async fn cache_get_cancellation(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(
        &rt,
        test_type(),
        vec![
            Step::ok(1u64, 4).after(ms(1)).once(),
            Step::ok(1u64, 4).forever(),
        ],
    );
    let typed = cache.register(ty);
    let request = req("hello").min_index(5);
    let start = rt.now();
    let answered = within(&rt, BLOCKS, typed.get(&request)).await;
    assert!(
        answered.is_none(),
        "the get answered before its deadline: {answered:?}"
    );
    assert!(rt.now() - start < ANSWER, "dropping the get returned late");
    eventually(&rt, "the second (blocking) fetch started", || {
        script.count() == 2
    })
    .await;
    sleep(&rt, ms(20)).await;
    assert_eq!(script.count(), 2, "{:?}", script.calls());
    cache.close();
}

/// Go `TestCacheGet_blockingIndexTimeout`: a blocking get with a timeout and no newer index
/// returns the last value at its timeout, without error.
pub(crate) async fn cache_get_blocking_index_timeout(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let trigger = Gate::new();
    let (ty, _script) = scripted(
        &rt,
        test_type(),
        vec![
            Step::ok(1u64, 4).once(),
            Step::ok(12u64, 5).once(),
            Step::ok(42u64, 6).gated(&trigger),
        ],
    );
    let typed = cache.register(ty);
    let start = rt.now();
    let timeout = ms(300);
    let rx = spawn_get(&rt, &typed, req("hello").min_index(5).timeout(timeout));
    assert!(
        answer_within(&rt, &rx, BLOCKS).await.is_none(),
        "should block"
    );
    let o = answer_within(&rt, &rx, timeout + ANSWER)
        .await
        .expect("should have returned");
    let took = rt.now() - start;
    assert!(o.error.is_none(), "{:?}", o.error);
    assert_eq!((o.value, o.meta.index), (Some(12), 5));
    assert!(took >= timeout, "answered before its timeout: {took:?}");
    drop(trigger);
    cache.close();
}

/// Go `TestCacheGet_blockingIndexError`: a blocking get whose fetch fails returns the error at
/// once (not at its 60 s timeout), after one attempt (contract: Get 4; Go: fewer than 10).
pub(crate) async fn cache_get_blocking_index_error(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(
        &rt,
        test_type(),
        vec![Step::ok(1u64, 4).once(), Step::err("test fetch error")],
    );
    let typed = cache.register(ty);
    let rx = spawn_get(&rt, &typed, req("hello"));
    expect_value(&rt, &rx, 1).await;
    let rx = spawn_get(
        &rt,
        &typed,
        req("hello").min_index(7).timeout(Duration::from_secs(60)),
    );
    let o = answer_within(&rt, &rx, ANSWER)
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
    sleep(&rt, ms(100)).await;
    let retries = script.used(1);
    assert_eq!(retries, 1, "contract: Get 4: one attempt");
    cache.close();
}

/// Go `TestCacheGet_emptyFetchResult`: a fetch answering no value keeps the previous value, but
/// its state is kept and handed to the next fetch; further attempts are backed off (contract:
/// Get 4, Fetch 4) where Go hot-loops.
pub(crate) async fn cache_get_empty_fetch_result(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(
        &rt,
        test_type(),
        vec![
            Step::ok(42u64, 1).state(31).times(1),
            Step::empty(0).state(32),
        ],
    );
    let typed = cache.register(ty);
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));

    let timeout = ms(200);
    let r = bounded(
        &rt,
        timeout + ANSWER,
        "second get",
        typed.get(&req("hello").min_index(1).timeout(timeout)),
    )
    .await
    .unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));
    let calls = script.calls();
    assert_eq!(
        calls[1].last,
        Some((1, Some(31))),
        "the second fetch gets the first state: {calls:?}"
    );
    // Three free retries, then a backoff of 2 s or more: at most 1 + 4 fetches by the
    // second get's timeout (one more if the machine stalled past the backoff).
    assert!(
        (2..=6).contains(&calls.len()),
        "{} fetches: {calls:?}",
        calls.len()
    );
    let before = calls.len();

    let r = bounded(
        &rt,
        timeout + ANSWER,
        "third get",
        typed.get(&req("hello").min_index(1).timeout(timeout)),
    )
    .await
    .unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));
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
    script.assert_expectations();
    cache.close();
}

// ===== Background refresh =====

/// Go `TestCacheGet_periodicRefresh`: a refresh type with a refresh timer (Go: 100 ms, here
/// 200 ms) serves the old value at once and the refreshed one after the timer.
pub(crate) async fn cache_get_periodic_refresh(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let never = Gate::new();
    let timer = ms(200);
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new()
            .refresh(true)
            .refresh_timer(timer)
            .query_timeout(Duration::from_secs(300)),
        vec![
            Step::ok(1u64, 4).once(),
            Step::ok(12u64, 5).once(),
            Step::ok(12u64, 5).gated(&never),
        ],
    );
    let typed = cache.register(ty);
    let rx = spawn_get(&rt, &typed, req("hello"));
    expect_value(&rt, &rx, 1).await;
    sleep(&rt, ms(5)).await;
    let rx = spawn_get(&rt, &typed, req("hello"));
    let o = expect_value(&rt, &rx, 1).await;
    assert!(o.meta.hit);
    eventually(&rt, "the refreshed value is served", || script.count() >= 2).await;
    let mut value = None;
    let deadline = rt.now() + ANSWER;
    while value != Some(12) {
        assert!(rt.now() < deadline, "the refreshed value was never served");
        value = typed.get(&req("hello")).await.unwrap().value;
        sleep(&rt, ms(5)).await;
    }
    eventually(&rt, "the third refresh started", || script.count() >= 3).await;
    let times: Vec<Duration> = script.calls().iter().map(|c| c.at).collect();
    assert_eq!(times.len(), 3, "the third fetch never answers: {times:?}");
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= timer - ms(5),
            "the refresh timer paces: {times:?}"
        );
    }
    drop(never);
    cache.close();
}

/// Go `TestCacheGet_periodicRefreshMultiple`: with a zero refresh timer each triggered refresh
/// result is served by the next get (1, 12, 24).
pub(crate) async fn cache_get_periodic_refresh_multiple(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let trigger = [Gate::new(), Gate::new(), Gate::new()];
    let (ty, _script) = scripted(
        &rt,
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
    let rx = spawn_get(&rt, &typed, req("hello"));
    expect_value(&rt, &rx, 1).await;
    sleep(&rt, ms(5)).await;
    let rx = spawn_get(&rt, &typed, req("hello"));
    expect_value(&rt, &rx, 1).await;
    for (gate, want) in trigger[..2].iter().zip([12u64, 24]) {
        gate.open();
        let deadline = rt.now() + ANSWER;
        loop {
            let r = typed.get(&req("hello")).await.unwrap();
            assert!(r.meta.hit, "a refresh type's hit");
            if r.value == Some(want) {
                break;
            }
            assert!(rt.now() < deadline, "{want} never served: {:?}", r.value);
            sleep(&rt, ms(5)).await;
        }
    }
    cache.close();
}

/// A cache whose backoff after the free retries waits `unit` (plus jitter) instead of Go's
/// 1 s unit, so a recovery after backoff fits a real-time scenario.
fn short_backoff(rt: &SharedRuntime, unit: Duration) -> Cache {
    Cache::builder(rt.clone())
        .backoff(BackoffPolicy::new().with_unit(unit))
        .build()
}

/// Go `TestCacheGet_periodicRefreshErrorBackoff`: a failing background refresh is backed off
/// (fewer than 10 attempts in 500 ms) and hits keep serving the last value.
pub(crate) async fn cache_get_periodic_refresh_error_backoff(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new()
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .query_timeout(Duration::from_secs(300)),
        vec![Step::ok(1u64, 4).once(), Step::err("test fetch error")],
    );
    let typed = cache.register(ty);
    let rx = spawn_get(&rt, &typed, req("hello"));
    expect_value(&rt, &rx, 1).await;
    sleep(&rt, ms(500)).await;
    let rx = spawn_get(&rt, &typed, req("hello"));
    let o = expect_value(&rt, &rx, 1).await;
    assert!(o.meta.hit);
    let retries = script.used(1);
    // Go: < 10. The default policy: three free retries, then 2 s or more.
    assert!((4..10).contains(&retries), "retries: {retries}");
    cache.close();
}

/// Go `TestCacheGet_periodicRefreshBadRPCZeroIndexErrorBackoff`: a refresh whose fetch keeps
/// answering index 0 is backed off like a failure; the value is still served.
pub(crate) async fn cache_get_periodic_refresh_bad_rpc_zero_index_error_backoff(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new()
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .query_timeout(Duration::from_secs(300)),
        vec![Step::ok(0u64, 0)],
    );
    let typed = cache.register(ty);
    let rx = spawn_get(&rt, &typed, req("hello"));
    expect_value(&rt, &rx, 0).await;
    sleep(&rt, ms(500)).await;
    let rx = spawn_get(&rt, &typed, req("hello"));
    expect_value(&rt, &rx, 0).await;
    let fetches = script.count();
    assert!((4..10).contains(&fetches), "{fetches} fetches, want < 10");
    cache.close();
}

/// Go `TestCacheGet_noIndexSetsOne`: the first fetch is sent min index 0, every background
/// refresh after it a min index above 0, for an RPC answering index 1 and one answering 0.
/// Go's mock answers at once, so with index 1 the refresh is a hot loop (each answer is "no
/// change"); kept so here: other tasks must still run, and `close` must end it.
pub(crate) async fn cache_get_no_index_sets_one(rt: SharedRuntime) {
    for index in [1, 0] {
        let cache = Cache::new(rt.clone());
        let count = Arc::new(AtomicUsize::new(0));
        let first = Arc::new(AtomicU64::new(u64::MAX));
        let later_zero = Arc::new(AtomicBool::new(false));
        let (c, f, z) = (count.clone(), first.clone(), later_zero.clone());
        let typed = cache.register(MockType::new(
            RegisterOptions::new()
                .supports_blocking(true)
                .refresh(true)
                .refresh_timer(Duration::ZERO)
                .query_timeout(Duration::from_secs(300)),
            move |o, _| {
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    f.store(o.min_index, Ordering::SeqCst);
                } else if o.min_index == 0 {
                    z.store(true, Ordering::SeqCst);
                }
                async move { Ok(FetchResult::new(0u64, index)) }
            },
        ));
        let rx = spawn_get(&rt, &typed, req("hello"));
        expect_value(&rt, &rx, 0).await;
        sleep(&rt, ms(100)).await;
        let n = count.load(Ordering::SeqCst);
        assert!(n >= 2, "rpc index {index}: background refresh ran: {n}");
        assert_eq!(first.load(Ordering::SeqCst), 0, "rpc index {index}");
        assert!(
            !later_zero.load(Ordering::SeqCst),
            "rpc index {index}: background refreshes send min index > 0"
        );
        if index == 0 {
            assert!(n < 10, "index 0 is backed off like a failure: {n}");
        }
        cache.close();
        let at_close = count.load(Ordering::SeqCst);
        sleep(&rt, ms(50)).await;
        let after = count.load(Ordering::SeqCst);
        assert!(
            after <= at_close + 1,
            "rpc index {index}: the refresh went on after close: {at_close} -> {after}"
        );
    }
}

/// Go `TestCacheGet_fetchTimeout`: the fetch of a blocking type is handed the query timeout.
pub(crate) async fn cache_get_fetch_timeout(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let timeout = Duration::from_secs(600);
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new()
            .query_timeout(timeout)
            .supports_blocking(true),
        vec![Step::ok(42u64, 0).times(1)],
    );
    let typed = cache.register(ty);
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));
    script.assert_expectations();
    assert_eq!(script.calls()[0].timeout, timeout);
    cache.close();
}

// ===== Expiry =====

/// Waits until the cache holds no entry (an eviction by TTL); returns when that was seen.
async fn until_evicted(rt: &SharedRuntime, cache: &Cache) -> Instant {
    eventually(rt, "the entry expired", || cache.is_empty()).await;
    rt.now()
}

/// Go `TestCacheGet_expire`: an entry not read for its TTL (Go: 400 ms, here 300 ms) is evicted
/// and the next get fetches again; a hit reports an age of at least the time slept.
pub(crate) async fn cache_get_expire(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let ttl = ms(300);
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new().last_get_ttl(ttl),
        vec![Step::ok(42u64, 0).times(2)],
    );
    let typed = cache.register(ty);
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));
    sleep(&rt, ms(20)).await;
    let r = typed.get(&req("hello")).await.unwrap();
    let last_read = rt.now();
    assert_eq!((r.value, r.meta.hit), (Some(42), true));
    assert!(r.meta.age >= ms(20), "age {:?}", r.meta.age);

    let evicted = until_evicted(&rt, &cache).await;
    assert!(
        evicted - last_read >= ttl,
        "expired {:?} after the last read",
        evicted - last_read
    );
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));
    sleep(&rt, ms(20)).await;
    script.assert_expectations();
    cache.close();
}

/// Go `TestCacheGet_expireResetGet`: every get resets the TTL (Go: 150 ms, here 400 ms), so
/// gets every 100 ms keep the entry past its TTL; then, unread, it is evicted.
pub(crate) async fn cache_get_expire_reset_get(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let ttl = ms(400);
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new().last_get_ttl(ttl),
        vec![Step::ok(42u64, 0).times(2)],
    );
    let typed = cache.register(ty);
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));
    let mut last_read = rt.now();
    for _ in 0..6 {
        sleep(&rt, ms(100)).await;
        let gap = rt.now() - last_read;
        let r = typed.get(&req("hello")).await.unwrap();
        last_read = rt.now();
        assert_eq!(r.value, Some(42));
        // A stall of the test's thread past the TTL would rightly expire it.
        if gap < ttl - ms(50) {
            assert!(r.meta.hit, "expired although read {gap:?} ago");
        }
    }
    let evicted = until_evicted(&rt, &cache).await;
    assert!(evicted - last_read >= ttl - ms(5));
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));
    sleep(&rt, ms(20)).await;
    script.assert_expectations();
    cache.close();
}

/// Cleanup-on-eviction state (Consul's `testCloser`): our cleanup is `Drop`.
struct Closer(Arc<AtomicBool>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Go `TestCacheGet_expireClose`: an expired entry's state is cleaned up (Go's `io.Closer`,
/// our `Drop`), not before its TTL.
pub(crate) async fn cache_get_expire_close(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let closed = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, n) = (closed.clone(), calls.clone());
    let ttl = ms(200);
    let typed = cache.register(MockType::new(
        RegisterOptions::new()
            .supports_blocking(true)
            .last_get_ttl(ttl),
        move |_, _| {
            n.fetch_add(1, Ordering::SeqCst);
            let state: FetchState = Arc::new(Closer(c.clone()));
            async move { Ok(FetchResult::new(42u64, 0).with_state(state)) }
        },
    ));
    let r = typed.get(&req("hello")).await.unwrap();
    let read = rt.now();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));
    assert!(!closed.load(Ordering::SeqCst));
    eventually(&rt, "the state was cleaned up", || {
        closed.load(Ordering::SeqCst)
    })
    .await;
    assert!(rt.now() - read >= ttl, "cleaned up before the TTL");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    cache.close();
}

/// State that cancels a fetch when cleaned up (Consul's `testCloser` with a `closeFn`).
struct CancelOnDrop(Sender<()>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Go `TestCacheGet_expireBackgroudRefreshCancel`: a blocking refresh whose open fetch ends
/// only when the entry's state is cleaned up: after the TTL the entry is gone and the next get
/// is a miss (the cancelled fetch did not put it back).
pub(crate) async fn cache_get_expire_backgroud_refresh_cancel(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let cancel = Gate::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (tx, rx, n) = (cancel.open.clone(), cancel.wait.clone(), calls.clone());
    let typed = cache.register(MockType::new(
        RegisterOptions::new()
            .last_get_ttl(ms(300))
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .supports_blocking(true),
        move |o, _| {
            n.fetch_add(1, Ordering::SeqCst);
            let last = o.last_result.and_then(|l| l.state);
            let state = last.unwrap_or_else(|| Arc::new(CancelOnDrop(tx.clone())) as FetchState);
            let wait = (o.min_index == 4).then(|| rx.clone());
            async move {
                if let Some(cancelled) = wait {
                    drop(state);
                    let _ = cancelled.recv().await;
                    return Err(MockError::new("context canceled"));
                }
                Ok(FetchResult::new(8u64, 4).with_state(state))
            }
        },
    ));
    drop(cancel);
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(8), 4, false));
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(8), 4, true));
    until_evicted(&rt, &cache).await;
    sleep(&rt, ms(20)).await;
    assert!(
        cache.is_empty(),
        "the cancelled fetch re-inserted the entry"
    );
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.index), (Some(8), 4));
    assert!(
        !r.meta.hit,
        "the fetch should not have re-populated the cache entry after it expired"
    );
    assert!(calls.load(Ordering::SeqCst) >= 2);
    cache.close();
}

/// Go `TestCacheGet_expireBackgroudRefresh`: a blocking refresh fetch that returns (same value,
/// same index) only after the entry expired does not re-insert it. Once released, Go's fetches
/// answer at once (a hot loop), as here.
pub(crate) async fn cache_get_expire_backgroud_refresh(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let ctrl = Gate::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, n) = (ctrl.wait.clone(), calls.clone());
    let typed = cache.register(MockType::new(
        RegisterOptions::new()
            .last_get_ttl(ms(300))
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .supports_blocking(true),
        move |o, _| {
            n.fetch_add(1, Ordering::SeqCst);
            let wait = (o.min_index == 4).then(|| c.clone());
            async move {
                if let Some(ctrl) = wait {
                    // "After a timeout with no change", when the test says so.
                    let _ = ctrl.recv().await;
                }
                Ok(FetchResult::new(8u64, 4))
            }
        },
    ));
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(8), 4, false));
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(8), 4, true));
    until_evicted(&rt, &cache).await;
    ctrl.open();
    sleep(&rt, ms(20)).await;
    assert!(cache.is_empty(), "the released fetch re-inserted the entry");
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.index), (Some(8), 4));
    assert!(
        !r.meta.hit,
        "the fetch should not have re-populated the cache entry after it expired"
    );
    // The new entry's refresh now answers at once, for ever: the runtime still runs us.
    let before = calls.load(Ordering::SeqCst);
    sleep(&rt, ms(20)).await;
    assert!(calls.load(Ordering::SeqCst) > before, "the refresh runs");
    cache.close();
}

/// Go `TestCacheGet_expireResetGetNoChange`: a blocking get that waits twice the TTL while the
/// server keeps answering "no change" quickly keeps its entry alive (contract: Get 8).
pub(crate) async fn cache_get_expire_reset_get_no_change(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let closed = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, n, rt2) = (closed.clone(), calls.clone(), rt.clone());
    let ttl = ms(200);
    let typed = cache.register(MockType::new(
        RegisterOptions::new()
            .last_get_ttl(ttl)
            .supports_blocking(true)
            .refresh(true),
        move |o, _| {
            n.fetch_add(1, Ordering::SeqCst);
            let last = o.last_result.and_then(|l| l.state);
            let state = last.unwrap_or_else(|| Arc::new(Closer(c.clone())) as FetchState);
            let rt = rt2.clone();
            async move {
                if o.min_index == 10 {
                    // A very fast "timeout" from the backend, shorter than the TTL.
                    sleep(&rt, ms(20)).await;
                }
                Ok(FetchResult::new(42u64, 10).with_state(state))
            }
        },
    ));
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(42), 10, false));
    let start = rt.now();
    let timeout = ttl * 3;
    let r = bounded(
        &rt,
        timeout + ANSWER,
        "blocking get",
        typed.get(&req("hello").min_index(10).timeout(timeout)),
    )
    .await
    .unwrap();
    assert_eq!((r.value, r.meta.index), (Some(42), 10));
    assert!(rt.now() - start >= timeout, "{:?}", rt.now() - start);
    assert!(
        !closed.load(Ordering::SeqCst),
        "cache entry should not have been evicted"
    );
    assert!(calls.load(Ordering::SeqCst) >= 2);
    cache.close();
}

// ===== Partitions =====

/// Go `TestCacheGet_duplicateKeyDifferentType`: one key in two types is two entries.
pub(crate) async fn cache_get_duplicate_key_different_type(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty1, script1) = scripted(&rt, test_type(), vec![Step::ok(100u64, 0)]);
    let (ty2, script2) = scripted(&rt, test_type(), vec![Step::ok(200i64, 0)]);
    let t1 = cache.register(ty1);
    let t2 = cache.register(ty2);
    let r = t1.get(&req("foo")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(100), false));
    let r = t2.get(&req("foo")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(200), false));
    let r = t1.get(&req("foo")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(100), true));
    sleep(&rt, ms(20)).await;
    assert_eq!((script1.count(), script2.count()), (1, 1));
    cache.close();
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
pub(crate) async fn cache_get_partition_dc(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let typed = cache.register(partition_type());
    let rx1 = spawn_get(&rt, &typed, req("hello").datacenter("dc1"));
    let rx2 = spawn_get(&rt, &typed, req("hello").datacenter("dc9"));
    expect_value(&rt, &rx1, "dc1".to_string()).await;
    expect_value(&rt, &rx2, "dc9".to_string()).await;
    cache.close();
}

/// Go `TestCacheGet_partitionToken`: one key with two ACL tokens is two entries.
pub(crate) async fn cache_get_partition_token(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let typed = cache.register(partition_type());
    let rx1 = spawn_get(&rt, &typed, req("hello").token(""));
    let rx2 = spawn_get(&rt, &typed, req("hello").token("foo"));
    expect_value(&rt, &rx1, String::new()).await;
    expect_value(&rt, &rx2, "foo".to_string()).await;
    cache.close();
}

// ===== Age =====

/// Go `TestCacheGet_refreshAge`: a refresh type reports age 0 while its background refresh is
/// healthy, a growing age since contact was lost while it fails, and 0 again once it recovers.
/// Go's mock answers at once (a hot loop, kept). The backoff unit is 20 ms instead of Go's 1 s
/// so that the recovery fits the scenario.
pub(crate) async fn cache_get_refresh_age(rt: SharedRuntime) {
    let cache = short_backoff(&rt, ms(20));
    let index = Arc::new(AtomicU64::new(0));
    let should_fail = Arc::new(AtomicBool::new(false));
    let (i, f) = (index.clone(), should_fail.clone());
    let typed = cache.register(MockType::new(
        RegisterOptions::new()
            .refresh(true)
            .refresh_timer(Duration::ZERO)
            .query_timeout(Duration::from_secs(300)),
        move |_, _| {
            let idx = i.load(Ordering::SeqCst);
            let fail = f.load(Ordering::SeqCst);
            async move {
                if fail {
                    return Err(MockError::new("test error"));
                }
                Ok(FetchResult::new(idx * 2, idx))
            }
        },
    ));
    index.store(4, Ordering::SeqCst);
    let rx = spawn_get(&rt, &typed, req("hello"));
    expect_value(&rt, &rx, 8).await;

    sleep(&rt, ms(5)).await;
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(8), true));
    assert_eq!(r.meta.age, Duration::ZERO, "background refresh is active");

    should_fail.store(true, Ordering::SeqCst);
    sleep(&rt, ms(50)).await;
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(8), true));
    assert!(r.meta.age > Duration::ZERO, "refresh is failing");
    let last_age = r.meta.age;

    sleep(&rt, ms(20)).await;
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(8), true));
    assert!(
        r.meta.age > last_age + ms(5),
        "age {:?} after {last_age:?}",
        r.meta.age
    );

    should_fail.store(false, Ordering::SeqCst);
    index.fetch_add(1, Ordering::SeqCst);
    let deadline = rt.now() + ANSWER;
    loop {
        sleep(&rt, ms(20)).await;
        let r = typed.get(&req("hello")).await.unwrap();
        assert!(r.meta.hit);
        if r.value == Some(10) {
            assert_eq!(r.meta.age, Duration::ZERO, "refresh is active again");
            break;
        }
        assert!(rt.now() < deadline, "no update observed");
    }
    cache.close();
}

/// Go `TestCacheGet_nonRefreshAge`: a non-refresh type reports the time since the value was
/// fetched; expiry and `max_age` make the next get fetch again, with a smaller age.
pub(crate) async fn cache_get_non_refresh_age(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let typed = cache.register(MockType::new(
        RegisterOptions::new().last_get_ttl(ms(200)),
        move |_, _| async move { Ok(FetchResult::new(8u64, 4)) },
    ));
    let rx = spawn_get(&rt, &typed, req("hello"));
    expect_value(&rt, &rx, 8).await;

    sleep(&rt, ms(30)).await;
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(8), true));
    assert!(r.meta.age >= ms(30), "age {:?}", r.meta.age);
    let last_age = r.meta.age;

    until_evicted(&rt, &cache).await;
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!(r.value, Some(8));
    assert!(!r.meta.hit, "expired");
    assert!(r.meta.age < last_age, "age {:?}", r.meta.age);

    sleep(&rt, ms(30)).await;
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(8), true));
    assert!(r.meta.age >= ms(30), "age {:?}", r.meta.age);
    let last_age = r.meta.age;

    let r = typed.get(&req("hello").max_age(ms(1))).await.unwrap();
    assert_eq!(r.value, Some(8));
    assert!(!r.meta.hit, "max_age exceeded");
    assert!(r.meta.age < last_age, "age {:?}", r.meta.age);
    cache.close();
}

/// Go `TestCacheGet_nonBlockingType`: a non-blocking type never blocks on a min index (a hit)
/// and is never sent one; `max_age` and `must_revalidate` make it fetch again.
pub(crate) async fn cache_get_non_blocking_type(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new(),
        vec![Step::ok(42u64, 1).once(), Step::ok(43u64, 2).times(2)],
    );
    let typed = cache.register(ty);
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), false));
    let r = typed.get(&req("hello")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), true));
    let r = bounded(
        &rt,
        ANSWER,
        "a non-blocking type does not block",
        typed.get(&req("hello").min_index(1).timeout(Duration::from_secs(600))),
    )
    .await
    .unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(42), true));

    sleep(&rt, ms(20)).await;
    let r = typed.get(&req("hello").max_age(ms(5))).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(43), false));
    let r = typed.get(&req("hello").must_revalidate()).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(43), false));
    sleep(&rt, ms(20)).await;
    script.assert_expectations();
    assert!(
        script.calls().iter().all(|c| c.min_index == 0),
        "{:?}",
        script.calls()
    );
    cache.close();
}

// ===== Rate limit =====

/// A blocking type whose n-th fetch answers index 41 + n at once; records fetch times.
fn stepping_type(rt: &SharedRuntime) -> (MockType<u64>, Arc<Mutex<Vec<Instant>>>) {
    let times = Arc::new(Mutex::new(Vec::new()));
    let (rt, t) = (rt.clone(), times.clone());
    let ty = MockType::new(test_type(), move |_, _| {
        let mut times = t.lock().unwrap();
        times.push(rt.now());
        let index = 41 + times.len() as u64;
        async move { Ok(FetchResult::new(index, index)) }
    });
    (ty, times)
}

/// Gets the key blocking on its current index, `n` times in a row; returns the fetch times.
async fn blocking_gets(
    typed: &TypedCache<MockType<u64>>,
    times: &Mutex<Vec<Instant>>,
    n: usize,
) -> Vec<Instant> {
    let before = times.lock().unwrap().len();
    for _ in 0..n {
        let index = typed.get(&req("hello1")).await.unwrap().meta.index;
        let r = typed.get(&req("hello1").min_index(index)).await.unwrap();
        assert_eq!(r.meta.index, index + 1);
    }
    times.lock().unwrap()[before..].to_vec()
}

/// Go `TestCacheReload`: reloading the rate limit applies to an existing entry, measured by the
/// pauses between the entry's fetches (rates scaled for real time).
pub(crate) async fn cache_reload(rt: SharedRuntime) {
    let cache = Cache::builder(rt.clone())
        .rate_limit(RateLimit::new(5.0, 1).unwrap())
        .build();
    let (ty, times) = stepping_type(&rt);
    let typed = cache.register(ty);
    let r = typed.get(&req("hello1").min_index(1)).await.unwrap();
    assert_eq!(r.meta.index, 42);
    let first = times.lock().unwrap()[0];

    // Rate 5/s, burst 1: the entry's next fetch waits 200 ms.
    let t = blocking_gets(&typed, &times, 1).await;
    assert!(t[0] - first >= ms(180), "waited {:?}", t[0] - first);

    // Only the rate changes (100/s): the next fetch waits 10 ms, not 200 ms.
    cache.set_rate_limit(RateLimit::new(100.0, 1).unwrap());
    let start = rt.now();
    let t = blocking_gets(&typed, &times, 1).await;
    assert!(t[0] - start < ms(150), "waited {:?}", t[0] - start);

    // The burst changes too (10/s, burst 4): after a rest, 4 fetches run without a wait, the
    // 5th waits for a token (100 ms).
    cache.set_rate_limit(RateLimit::new(10.0, 4).unwrap());
    sleep(&rt, ms(450)).await;
    let start = rt.now();
    let t = blocking_gets(&typed, &times, 5).await;
    assert!(
        t[3] - start < ms(250),
        "the burst was not applied: 4 fetches took {:?}",
        t[3] - start
    );
    assert!(
        t[4] - start >= ms(80),
        "the 5th fetch did not wait for a token: {:?}",
        t[4] - start
    );
    cache.close();
}

/// Go `TestCacheThrottle`: with a rate of 10/s and burst 1 per entry, a get blocking on index 5
/// through fetches answering 4, 5, 6 gets 6 after two 100 ms waits (not before 190 ms);
/// entries of two types have their own limiters, so both answer together.
pub(crate) async fn cache_throttle(rt: SharedRuntime) {
    let cache = Cache::builder(rt.clone())
        .rate_limit(RateLimit::new(10.0, 1).unwrap())
        .build();
    let (ty1, script1) = scripted(
        &rt,
        test_type(),
        vec![
            Step::ok(1u64, 4).once(),
            Step::ok(12u64, 5).once(),
            Step::ok(42u64, 6).once(),
        ],
    );
    let (ty2, script2) = scripted(
        &rt,
        test_type(),
        vec![
            Step::ok(1i64, 4).once(),
            Step::ok(12i64, 5).once(),
            Step::ok(43i64, 6).once(),
        ],
    );
    let t1 = cache.register(ty1);
    let t2 = cache.register(ty2);
    let start = rt.now();
    let rx1 = spawn_get(&rt, &t1, req("hello1").min_index(5));
    let rx2 = spawn_get(&rt, &t2, req("hello2").min_index(5));
    assert!(
        answer_within(&rt, &rx1, ms(180)).await.is_none(),
        "result1 should block"
    );
    assert!(rx2.try_recv().is_err(), "result2 should block");
    let o1 = answer_within(&rt, &rx1, ANSWER)
        .await
        .expect("shouldn't block that long (1)");
    let o2 = answer_within(&rt, &rx2, ANSWER)
        .await
        .expect("shouldn't block that long (2)");
    assert!(rt.now() - start >= ms(190), "{:?}", rt.now() - start);
    assert_eq!((o1.value, o2.value), (Some(42), Some(43)));
    assert!(o1.error.is_none() && o2.error.is_none());
    script1.assert_expectations();
    script2.assert_expectations();
    for at in [
        script1.calls().iter().map(|c| c.at).collect::<Vec<_>>(),
        script2.calls().iter().map(|c| c.at).collect(),
    ] {
        assert!(
            at[1] - at[0] >= ms(90) && at[2] - at[1] >= ms(90),
            "one token per 100 ms: {at:?}"
        );
    }
    cache.close();
}

// ===== Lifecycle =====

/// Go `TestCache_ExpiryLoop_ExitsWhenStopped`: after `close` an entry past its TTL is not
/// evicted, and reads still work (contract: Lifecycle 6).
pub(crate) async fn cache_expiry_loop_exits_when_stopped(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let ttl = ms(100);
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new().last_get_ttl(ttl),
        vec![Step::ok(1u64, 1).once()],
    );
    let typed = cache.register(ty);
    typed.get(&req("hello")).await.unwrap();
    cache.close();
    // A negative: nothing may happen for a few TTLs.
    sleep(&rt, ttl * 4).await;
    assert_eq!(cache.len(), 1, "no expiry after close");
    let r = typed.get(&req("hello")).await.unwrap();
    assert!(r.meta.hit, "no expiry after close");
    script.assert_expectations();
}

/// Go `TestCache_Prepopulate`: a prepopulated value is served by a get of the same partition
/// without fetching.
pub(crate) async fn cache_prepopulate(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(
        &rt,
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
    let r = typed
        .get(&req("v1").token("token").datacenter("dc1").min_index(1))
        .await
        .unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(17), true));
    sleep(&rt, ms(20)).await;
    assert_eq!(script.count(), 0, "{:?}", script.calls());
    cache.close();
}

/// Go `TestCache_RefreshLifeCycle`: a blocking refresh type keeps fetching after a value and
/// after a non-fatal error, which a waiting get receives; a fatal error reaches the waiting
/// get, stops the refresh and leaves the entry.
pub(crate) async fn cache_refresh_life_cycle(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let release2 = Gate::new();
    let release3 = Gate::new();
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new()
            .refresh(true)
            .supports_blocking(true)
            .refresh_timer(Duration::ZERO)
            .query_timeout(Duration::from_secs(600)),
        vec![
            Step::ok(true, 2).once(),
            Step::err("Permission denied: forced error")
                .once()
                .gated(&release2),
            Step::fatal("ACL not found").once().gated(&release3),
        ],
    );
    let typed = cache.register(ty);
    let fetching = || only_entry(&typed).map(|e| e.fetching);
    let request = |index: u64| req("v1").token("token").datacenter("dc1").min_index(index);
    let r = typed.get(&request(1)).await.unwrap();
    assert_eq!(r.value, Some(true));
    // A woken get sees the next fetch in flight, on any runtime (contract: Refresh 6).
    assert_eq!(fetching(), Some(true), "refreshing after the value");

    let rx = spawn_get(&rt, &typed, request(2));
    assert!(answer_within(&rt, &rx, BLOCKS).await.is_none());
    release2.open();
    let o = answer_within(&rt, &rx, ANSWER)
        .await
        .expect("blocking cache get never returned");
    let err = o.error.expect("permission denied");
    assert!(
        matches!(&err, GetError::Fetch(e) if e.message.starts_with("Permission denied")),
        "{err:?}"
    );
    eventually(&rt, "refreshing after the error", || {
        fetching() == Some(true) && script.count() == 3
    })
    .await;

    let rx = spawn_get(&rt, &typed, request(5));
    assert!(answer_within(&rt, &rx, BLOCKS).await.is_none());
    release3.open();
    let o = answer_within(&rt, &rx, ANSWER)
        .await
        .expect("blocking cache get never returned");
    let err = o.error.expect("ACL not found");
    assert!(
        matches!(&err, GetError::Fetch(e) if e.message == "ACL not found"),
        "{err:?}"
    );
    eventually(&rt, "the fatal error stopped the refresh", || {
        fetching() == Some(false)
    })
    .await;
    // A negative: nothing fetches again (Go's mock would fail a fourth call).
    sleep(&rt, ms(200)).await;
    assert_eq!(fetching(), Some(false), "the entry stays, idle");
    script.assert_expectations();
    cache.close();
}

// ===== Watch =====

type Ev = UpdateEvent<&'static str, u64, MockError>;

/// An update event as Consul's helper compares it: age left out.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    id: &'static str,
    result: Option<u64>,
    hit: bool,
    index: u64,
    error: Option<String>,
}

fn seen_as<C>(id: &'static str, ev: &UpdateEvent<C, u64, MockError>) -> Seen {
    Seen {
        id,
        result: ev.result,
        hit: ev.meta.hit,
        index: ev.meta.index,
        error: ev.error.as_ref().map(|e| {
            e.fetch_error()
                .map_or_else(|| e.to_string(), |m| m.message.clone())
        }),
    }
}

fn seen(ev: &Ev) -> Seen {
    seen_as(ev.correlation_id, ev)
}

fn ok(id: &'static str, result: u64, hit: bool, index: u64) -> Seen {
    Seen {
        id,
        result: Some(result),
        hit,
        index,
        error: None,
    }
}

fn failed(id: &'static str, result: Option<u64>, index: u64, error: &str) -> Seen {
    Seen {
        id,
        result,
        hit: false,
        index,
        error: Some(error.to_owned()),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum NoEvent {
    TimedOut,
    Closed,
}

/// The next event on `rx` within `d`.
async fn next_event(rt: &SharedRuntime, rx: &Receiver<Ev>, d: Duration) -> Result<Ev, NoEvent> {
    match within(rt, d, rx.recv()).await {
        Some(Ok(ev)) => Ok(ev),
        Some(Err(_)) => Err(NoEvent::Closed),
        None => Err(NoEvent::TimedOut),
    }
}

/// The next item of a watch stream within `d`.
async fn next_item<S: Stream + Unpin>(
    rt: &SharedRuntime,
    stream: &mut S,
    d: Duration,
) -> Result<S::Item, NoEvent> {
    match within(rt, d, stream.next()).await {
        Some(Some(ev)) => Ok(ev),
        Some(None) => Err(NoEvent::Closed),
        None => Err(NoEvent::TimedOut),
    }
}

/// Go's `TestCacheNotifyChResult`: exactly the `expected` events (in any order, age ignored)
/// arrive, within [`ANSWER`] (Go: 75 ms).
async fn expect_events(rt: &SharedRuntime, rx: &Receiver<Ev>, mut expected: Vec<Seen>) {
    let deadline = rt.now() + ANSWER;
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let left = deadline.saturating_duration_since(rt.now());
        match next_event(rt, rx, left).await {
            Ok(ev) => got.push(seen(&ev)),
            Err(why) => panic!("{why:?} while waiting for {expected:?}; got {got:?}"),
        }
    }
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
}

/// Nothing arrives on `rx` for `period` (and the channel stays open).
async fn assert_quiet(rt: &SharedRuntime, rx: &Receiver<Ev>, period: Duration) {
    match next_event(rt, rx, period).await {
        Err(NoEvent::TimedOut) => {}
        Ok(ev) => panic!("unexpected event {:?}", seen(&ev)),
        Err(NoEvent::Closed) => panic!("the channel closed"),
    }
}

type StreamEv = UpdateEvent<(), u64, MockError>;

/// Nothing arrives on `stream` for `period` (and the stream does not end).
async fn assert_stream_quiet<S>(rt: &SharedRuntime, stream: &mut S, period: Duration)
where
    S: Stream<Item = StreamEv> + Unpin,
{
    match next_item(rt, stream, period).await {
        Err(NoEvent::TimedOut) => {}
        Ok(ev) => panic!("unexpected event {:?}", seen_as("", &ev)),
        Err(NoEvent::Closed) => panic!("the stream ended"),
    }
}

/// The next item of `stream`, age left out, within [`ANSWER`].
async fn expect_item<S>(rt: &SharedRuntime, stream: &mut S, expected: Seen)
where
    S: Stream<Item = StreamEv> + Unpin,
{
    match next_item(rt, stream, ANSWER).await {
        Ok(ev) => assert_eq!(seen_as("", &ev), expected),
        Err(why) => panic!("{why:?} while waiting for {expected:?}"),
    }
}

/// Waits until the type's only entry holds `index` (a fetch in flight stored its answer).
async fn until_index<T: CacheType>(rt: &SharedRuntime, typed: &TypedCache<T>, index: u64) {
    eventually(rt, &format!("the entry holds index {index}"), || {
        only_entry(typed).is_some_and(|e| e.index == index)
    })
    .await;
}

/// The script of Go `TestCacheNotify` (also its `Stream` form).
fn notify_script(rt: &SharedRuntime, gates: &[Gate]) -> (MockType<u64>, Arc<Script<u64>>) {
    scripted(
        rt,
        test_type(),
        vec![
            // The servers are unreachable at first.
            Step::err("no servers available").once(),
            // Index 1 first (consul#6521).
            Step::ok(1, 1).gated(&gates[0]).once(),
            Step::ok(12, 5).gated(&gates[1]).once(),
            // The same index again: a blocking query that timed out.
            Step::ok(12, 5).gated(&gates[2]).once(),
            Step::ok(42, 7).gated(&gates[3]).once(),
            Step::ok(42, 8).gated(&gates[4]),
        ],
    )
}

/// Go `TestCacheNotify`: initial error, then risen indexes only; a 2nd watch hits; one fetch
/// stream for both.
pub(crate) async fn cache_notify(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let gates: Vec<Gate> = (0..5).map(|_| Gate::new()).collect();
    let (ty, script) = notify_script(&rt, &gates);
    let typed = cache.register(ty);
    let (tx, rx) = async_channel::bounded(1);
    let test = typed.notify(req("hello"), "test", tx.clone()).unwrap();
    expect_events(
        &rt,
        &rx,
        vec![failed("test", None, 0, "no servers available")],
    )
    .await;
    assert_quiet(&rt, &rx, ms(200)).await;

    gates[0].open();
    expect_events(&rt, &rx, vec![ok("test", 1, false, 1)]).await;
    gates[1].open();
    // Never hits: blocking waited for a new value.
    expect_events(&rt, &rx, vec![ok("test", 12, false, 5)]).await;

    // A second observer of the same request on the same channel.
    let test2 = typed.notify(req("hello"), "test2", tx).unwrap();
    expect_events(&rt, &rx, vec![ok("test2", 12, true, 5)]).await;

    // The same value and index again (a timed-out blocking query): no event.
    gates[2].open();
    assert_quiet(&rt, &rx, ms(200)).await;

    gates[3].open();
    expect_events(
        &rt,
        &rx,
        vec![ok("test", 42, false, 7), ok("test2", 42, false, 7)],
    )
    .await;
    eventually(&rt, "the next blocking fetch is open", || {
        script.count() == 6
    })
    .await;

    // Go: cancel(), then release the query that may still be open.
    drop(test);
    drop(test2);
    gates[4].open();
    assert_eq!(
        next_event(&rt, &rx, ANSWER).await.map(|e| seen(&e)),
        Err(NoEvent::Closed),
        "cancelling both watches dropped their sinks"
    );
    until_index(&rt, &typed, 8).await;
    sleep(&rt, ms(50)).await;
    assert_eq!(script.count(), 6, "nothing fetches after the watches ended");
    let now = typed.get(&req("hello")).await.unwrap();
    assert_eq!(
        (now.value, now.meta.index, now.meta.hit),
        (Some(42), 8, true)
    );
    assert!(script.calls().iter().all(|c| c.key == "hello"));
    assert_eq!(script.min_indexes(), [0, 0, 1, 5, 5, 7]);
    assert_eq!(cache.metrics().total().watches, 0);
    cache.close();
}

/// Go `TestCacheNotify`, first revision (`notify_until`): index 4 first, risen ones, late hit;
/// one cancel signal ends both watches.
pub(crate) async fn cache_notify_first_revision(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let gates: Vec<Gate> = (0..4).map(|_| Gate::new()).collect();
    let (ty, script) = scripted(
        &rt,
        test_type(),
        vec![
            Step::ok(1u64, 4).once(),
            Step::ok(12, 5).gated(&gates[0]).once(),
            Step::ok(12, 5).gated(&gates[1]).once(),
            Step::ok(42, 7).gated(&gates[2]).once(),
            Step::ok(42, 8).gated(&gates[3]),
        ],
    );
    let typed = cache.register(ty);
    let (tx, rx) = async_channel::bounded(1);
    let ctx = Gate::new();
    let cancelled = |ctx: &Gate| {
        let done = ctx.wait.clone();
        async move {
            let _ = done.recv().await;
        }
    };
    typed
        .notify_until(req("hello"), "test", tx.clone(), cancelled(&ctx))
        .unwrap();
    expect_events(&rt, &rx, vec![ok("test", 1, false, 4)]).await;
    assert_quiet(&rt, &rx, ms(200)).await;
    gates[0].open();
    expect_events(&rt, &rx, vec![ok("test", 12, false, 5)]).await;
    typed
        .notify_until(req("hello"), "test2", tx, cancelled(&ctx))
        .unwrap();
    expect_events(&rt, &rx, vec![ok("test2", 12, true, 5)]).await;
    gates[1].open();
    assert_quiet(&rt, &rx, ms(200)).await;
    gates[2].open();
    expect_events(
        &rt,
        &rx,
        vec![ok("test", 42, false, 7), ok("test2", 42, false, 7)],
    )
    .await;
    eventually(&rt, "the next blocking fetch is open", || {
        script.count() == 5
    })
    .await;
    // Go: cancel(), then release the query that may still be open: once the signal has
    // completed nothing more is delivered, even before the task waiting on it has run
    // (contract: Watch 8).
    ctx.open();
    gates[3].open();
    assert_eq!(
        next_event(&rt, &rx, ANSWER).await.map(|e| seen(&e)),
        Err(NoEvent::Closed),
        "cancelling the context ended both watches"
    );
    until_index(&rt, &typed, 8).await;
    eventually(&rt, "both watches are counted out", || {
        cache.metrics().total().watches == 0
    })
    .await;
    sleep(&rt, ms(50)).await;
    // The released query's completion may race the watches' removal (their task runs on
    // another thread, and the script answers index 8 at once from then on): until the chain
    // sees the entry unwatched it may fetch again at 8, delivering nothing (asserted above);
    // it stops after the fetch in flight (contract: Watch 8). Nothing fetches after that.
    let fetched = script.min_indexes();
    assert!(
        fetched.starts_with(&[0, 4, 5, 5, 7]) && fetched[5..].iter().all(|&i| i == 8),
        "{fetched:?}"
    );
    let settled = script.count();
    sleep(&rt, ms(100)).await;
    assert_eq!(
        script.count(),
        settled,
        "nothing fetches after the watches ended"
    );
    cache.close();
}

/// Go `TestCacheNotify` in `Stream` form: the same events on two streams, one fetch stream.
pub(crate) async fn cache_notify_stream_form(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let gates: Vec<Gate> = (0..5).map(|_| Gate::new()).collect();
    let (ty, script) = notify_script(&rt, &gates);
    let typed = cache.register(ty);
    let mut test = typed.watch(req("hello")).unwrap();
    expect_item(&rt, &mut test, failed("", None, 0, "no servers available")).await;
    assert_stream_quiet(&rt, &mut test, ms(200)).await;
    gates[0].open();
    expect_item(&rt, &mut test, ok("", 1, false, 1)).await;
    gates[1].open();
    expect_item(&rt, &mut test, ok("", 12, false, 5)).await;

    let mut test2 = typed.watch(req("hello")).unwrap();
    expect_item(&rt, &mut test2, ok("", 12, true, 5)).await;

    gates[2].open();
    assert_stream_quiet(&rt, &mut test, ms(200)).await;
    assert_stream_quiet(&rt, &mut test2, ms(1)).await;

    gates[3].open();
    expect_item(&rt, &mut test, ok("", 42, false, 7)).await;
    expect_item(&rt, &mut test2, ok("", 42, false, 7)).await;
    eventually(&rt, "the next blocking fetch is open", || {
        script.count() == 6
    })
    .await;

    drop(test);
    drop(test2);
    gates[4].open();
    until_index(&rt, &typed, 8).await;
    sleep(&rt, ms(50)).await;
    assert_eq!(
        script.count(),
        6,
        "nothing fetches after the streams are dropped"
    );
    assert_eq!(script.min_indexes(), [0, 0, 1, 5, 5, 7]);
    assert_eq!(cache.metrics().total().watches, 0);
    cache.close();
}

/// Go `TestCacheNotifyPolling`: a polled watch (max age Go: 100 ms, here 200 ms) polls every
/// max age (+ jitter) and delivers changes; a 2nd watch hits; both share the polls.
pub(crate) async fn cache_notify_polling(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let max_age = ms(200);
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new(),
        vec![
            Step::ok(1u64, 1).once(),
            Step::ok(12, 1).once(),
            Step::ok(42, 1).once(),
        ],
    );
    let typed = cache.register(ty);
    let request = req("hello").max_age(max_age);
    let (tx, rx) = async_channel::bounded(1);
    let _test = typed.notify(request.clone(), "test", tx.clone()).unwrap();
    expect_events(&rt, &rx, vec![ok("test", 1, false, 1)]).await;
    let first_at = rt.now();

    // Not too early...
    assert_quiet(&rt, &rx, max_age / 2).await;
    // ...and not too late.
    let ev = next_event(&rt, &rx, max_age + ANSWER)
        .await
        .expect("didn't receive the notification");
    assert_eq!(seen(&ev), ok("test", 12, false, 1));
    assert!(ev.meta.age < max_age, "age {:?}", ev.meta.age);
    // contract: Watch 4: the poll waits max_age less the value's age (it was fetched just
    // before the first event), plus jitter.
    let waited = rt.now() - first_at;
    assert!(waited >= max_age - ms(30), "polled after {waited:?}");

    // A second observer of the same request on the same channel.
    let _test2 = typed.notify(request, "test2", tx).unwrap();
    expect_events(&rt, &rx, vec![ok("test2", 12, true, 1)]).await;

    // The next poll.
    let deadline = rt.now() + max_age + ANSWER;
    let mut events = Vec::new();
    while events.len() < 2 {
        let left = deadline.saturating_duration_since(rt.now());
        match next_event(&rt, &rx, left).await {
            Ok(ev) => events.push(ev),
            Err(why) => panic!("UpdateEvent not received in time: {why:?}"),
        }
    }
    for ev in &events {
        assert_eq!((ev.result, ev.meta.index), (Some(42), 1));
        assert!(ev.error.is_none());
        assert!(ev.meta.age < max_age, "age {:?}", ev.meta.age);
    }
    assert!(!(events[0].meta.hit && events[1].meta.hit));
    let mut ids: Vec<_> = events.iter().map(|e| e.correlation_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["test", "test2"], "one event per watch");
    // Three scripted answers, each `Once`: the two watches shared every poll.
    assert_eq!(script.count(), 3, "{:?}", script.calls());
    assert!(
        script
            .calls()
            .iter()
            .all(|c| c.key == "hello" && c.min_index == 0)
    );
    cache.close();
}

/// Go `TestCacheWatch_ErrorBackoff`: a blocking watch failing after its first value backs off
/// (Go: fewer than 10 errors and retries in 500 ms); per contract: Watch 3, errors at an
/// unchanged index after a value are not delivered at all.
pub(crate) async fn cache_watch_error_backoff(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(
        &rt,
        test_type(),
        vec![Step::ok(1u64, 4).once(), Step::err("test fetch error")],
    );
    let typed = cache.register(ty);
    let (tx, rx) = async_channel::bounded(1);
    let _test = typed.notify(req("hello"), "test", tx).unwrap();
    expect_events(&rt, &rx, vec![ok("test", 1, false, 4)]).await;
    assert_quiet(&rt, &rx, ms(500)).await;
    let retries = script.count() - 1;
    assert!((4..10).contains(&retries), "retries: {retries}");
    // Retries block on the entry's index, which the errors never moved.
    assert!(script.calls()[1..].iter().all(|c| c.min_index == 4));
    cache.close();
}

/// Go `TestCacheWatch_ErrorBackoffNonBlocking`: a failing polled watch backs off (Go: fewer
/// than 10 errors and retries in 100 + 500 ms); per contract: Watch 4, a failed poll delivers
/// nothing.
pub(crate) async fn cache_watch_error_backoff_non_blocking(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new(),
        vec![Step::ok(1u64, 4).once(), Step::err("test fetch error")],
    );
    let typed = cache.register(ty);
    let (tx, rx) = async_channel::bounded(1);
    let _test = typed
        .notify(req("hello").max_age(ms(100)), "test", tx)
        .unwrap();
    expect_events(&rt, &rx, vec![ok("test", 1, false, 4)]).await;
    let start = rt.now();
    assert_quiet(&rt, &rx, ms(600)).await;
    let calls = script.calls();
    let retries = calls.len() - 1;
    assert!((4..10).contains(&retries), "retries: {retries}");
    // The first poll waits for max age (less the value's age).
    let first_poll = script.start + calls[1].at;
    assert!(
        first_poll + ms(30) >= start + ms(100),
        "polled {:?} after the first event",
        first_poll.saturating_duration_since(start)
    );
    cache.close();
}

/// Go `TestCacheWatch_ErrorBackoffNonBlocking` in `Stream` form: same backoff, no error item.
pub(crate) async fn cache_watch_error_backoff_non_blocking_stream_form(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let (ty, script) = scripted(
        &rt,
        RegisterOptions::new(),
        vec![Step::ok(1u64, 4).once(), Step::err("test fetch error")],
    );
    let typed = cache.register(ty);
    let mut stream = typed.watch(req("hello").max_age(ms(100))).unwrap();
    expect_item(&rt, &mut stream, ok("", 1, false, 4)).await;
    assert_stream_quiet(&rt, &mut stream, ms(600)).await;
    let retries = script.count() - 1;
    assert!((4..10).contains(&retries), "retries: {retries}");
    cache.close();
}

// ===== Test_isEqual =====

/// A point in time (Go: `time.Time`).
#[derive(Debug, Clone, PartialEq)]
struct Timestamp {
    seconds: u64,
    nanos: u32,
}

/// A protobuf-like message: `wire` is internal state that makes a derived comparison tell a
/// message from its round-tripped copy, while the two are equal as messages.
#[derive(Debug, Clone, PartialEq)]
struct Message {
    timestamp: Timestamp,
    wire: Option<Vec<u8>>,
}

fn message(seconds: u64, decoded: bool) -> Message {
    Message {
        timestamp: Timestamp { seconds, nanos: 7 },
        wire: decoded.then(|| seconds.to_le_bytes().to_vec()),
    }
}

/// A non-blocking type answering its current value at index 1; `value_eq` left at the default.
struct Plain<V> {
    current: Arc<Mutex<V>>,
    fetches: Arc<AtomicUsize>,
}

impl<V: Clone + PartialEq + Send + Sync + 'static> CacheType for Plain<V> {
    type Request = MockRequest;
    type Value = V;
    type Error = MockError;

    async fn fetch(
        &self,
        _: FetchOptions<V>,
        _: &MockRequest,
    ) -> Result<FetchResult<V>, MockError> {
        let value = self.current.lock().unwrap().clone();
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Ok(FetchResult::new(value, 1))
    }
}

/// The same for messages, with `value_eq` comparing them as messages (Go: `proto.Equal`).
struct Proto {
    current: Arc<Mutex<Message>>,
    fetches: Arc<AtomicUsize>,
}

impl CacheType for Proto {
    type Request = MockRequest;
    type Value = Message;
    type Error = MockError;

    async fn fetch(
        &self,
        _: FetchOptions<Message>,
        _: &MockRequest,
    ) -> Result<FetchResult<Message>, MockError> {
        let value = self.current.lock().unwrap().clone();
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Ok(FetchResult::new(value, 1))
    }

    fn value_eq(&self, a: &Message, b: &Message) -> bool {
        a.timestamp == b.timestamp
    }
}

/// Watches a polled type (max age 60 ms) and, for each of `values`, sets it upstream and waits
/// for two polls that read it. Returns the values delivered after each step (step 0: the
/// initial delivery).
async fn deliveries<T, V>(
    rt: &SharedRuntime,
    make: impl FnOnce(Arc<Mutex<V>>, Arc<AtomicUsize>) -> T,
    initial: V,
    values: Vec<V>,
) -> Vec<Vec<V>>
where
    T: CacheType<Request = MockRequest, Value = V, Error = MockError>,
    V: Clone + PartialEq + Send + Sync + 'static,
{
    let cache = Cache::new(rt.clone());
    let current = Arc::new(Mutex::new(initial));
    let fetches = Arc::new(AtomicUsize::new(0));
    let typed = cache.register(make(current.clone(), fetches.clone()));
    let (tx, rx) = async_channel::bounded(16);
    let drain = |rx: &Receiver<UpdateEvent<(), V, MockError>>| {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            assert!(ev.error.is_none());
            out.push(ev.result.expect("a value"));
        }
        out
    };
    let _watch = typed.notify(req("hello").max_age(ms(60)), (), tx).unwrap();
    let first = bounded(rt, ANSWER, "the first delivery", rx.recv())
        .await
        .unwrap();
    let mut steps = vec![[vec![first.result.unwrap()], drain(&rx)].concat()];
    for value in values {
        *current.lock().unwrap() = value;
        // A fetch counted after this read the new value; the one after it started only once
        // that one's result was offered to the watch.
        let before = fetches.load(Ordering::SeqCst);
        eventually(rt, "two polls ran", || {
            fetches.load(Ordering::SeqCst) >= before + 2
        })
        .await;
        steps.push(drain(&rx));
    }
    cache.close();
    steps
}

/// Go `Test_isEqual`: a polled watch tells changed values from equal ones (`value_eq`).
pub(crate) async fn is_equal(rt: SharedRuntime) {
    let steps = deliveries(
        &rt,
        |current, fetches| Proto { current, fetches },
        message(100, false),
        vec![message(100, true), message(101, false)],
    )
    .await;
    assert_eq!(
        steps,
        vec![vec![message(100, false)], vec![], vec![message(101, false)]]
    );

    let t = |seconds| Timestamp { seconds, nanos: 7 };
    let steps = deliveries(
        &rt,
        |current, fetches| Plain { current, fetches },
        t(100),
        vec![t(100), t(101)],
    )
    .await;
    assert_eq!(steps, vec![vec![t(100)], vec![], vec![t(101)]]);

    let steps = deliveries(
        &rt,
        |current, fetches| Plain { current, fetches },
        Arc::new(t(100)),
        vec![Arc::new(t(100)), Arc::new(t(101))],
    )
    .await;
    assert_eq!(
        steps,
        vec![vec![Arc::new(t(100))], vec![], vec![Arc::new(t(101))]]
    );
}

// ===== The rest of Consul's get and watch behaviour =====

/// Consul's cache on an index that went backwards (a server restore): a get blocked on the old
/// index and a watch both receive the lower index at once, and the next blocking fetch sends
/// it (contract: Fetch 5).
pub(crate) async fn index_reset_wakes_blocked_gets_and_watches(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 10);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let r = typed.get(&req("k")).await.unwrap();
    assert_eq!((r.value, r.meta.index), (Some(1), 10));
    let (tx, rx) = async_channel::bounded(4);
    let _watch = typed.notify(req("k"), "w", tx).unwrap();
    expect_events(&rt, &rx, vec![ok("w", 1, true, 10)]).await;
    let blocked = spawn_get(&rt, &typed, req("k").min_index(10).timeout(ms(30_000)));
    assert!(answer_within(&rt, &blocked, BLOCKS).await.is_none());

    server.set(2, 3);
    let o = answer_within(&rt, &blocked, ANSWER)
        .await
        .expect("the reset did not wake the blocked get");
    assert!(o.error.is_none(), "{:?}", o.error);
    assert_eq!((o.value, o.meta.index), (Some(2), 3));
    expect_events(&rt, &rx, vec![ok("w", 2, false, 3)]).await;

    // The watch's next blocking fetch waits on index 3: a write at 4 is delivered.
    server.set(3, 4);
    expect_events(&rt, &rx, vec![ok("w", 3, false, 4)]).await;
    cache.close();
}

/// Consul's `stale_if_error` (its `StaleIfError` cache-control): a revalidation that fails
/// answers the last value without error while it is at most that old, and the error once it is
/// older (contract: Get 6).
pub(crate) async fn stale_if_error_serves_a_recent_value(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 7u64, 2);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    let r = typed.get(&req("k")).await.unwrap();
    assert_eq!((r.value, r.meta.hit), (Some(7), false));
    server.set_error(Some(MockError::new("servers down")));
    sleep(&rt, ms(50)).await;

    let o = typed
        .get_outcome(
            &req("k")
                .must_revalidate()
                .stale_if_error(Duration::from_secs(60)),
        )
        .await;
    assert!(o.error.is_none(), "{:?}", o.error);
    assert_eq!(o.value, Some(7));
    assert!(o.meta.age >= ms(50), "age {:?}", o.meta.age);

    let o = typed
        .get_outcome(&req("k").must_revalidate().stale_if_error(ms(10)))
        .await;
    assert_eq!(
        o.error
            .as_ref()
            .and_then(|e| e.fetch_error())
            .unwrap()
            .message,
        "servers down"
    );
    assert_eq!(o.value, Some(7), "the last value comes with the error");
    assert!(server.reads() >= 3);
    cache.close();
}

/// Consul's `Close`: background work stops, open watches end, hits still work, a get that
/// would fetch answers `Closed` at once, and new watches are refused (contract: Lifecycle 6,
/// Get 9).
pub(crate) async fn close_stops_fetches_and_watches(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(server.blocking_type(RegisterOptions::new().refresh(true)));
    let r = typed.get(&req("k")).await.unwrap();
    assert_eq!((r.value, r.meta.index), (Some(1), 3));
    let (tx, rx) = async_channel::bounded(4);
    let _watch = typed.notify(req("k"), "w", tx).unwrap();
    expect_events(&rt, &rx, vec![ok("w", 1, true, 3)]).await;

    cache.close();
    assert_eq!(
        next_event(&rt, &rx, ANSWER).await.map(|e| seen(&e)),
        Err(NoEvent::Closed),
        "close ends every watch"
    );
    let r = typed.get(&req("k")).await.unwrap();
    assert!(r.meta.hit, "hits keep working");
    let o = bounded(
        &rt,
        ANSWER,
        "a miss after close",
        typed.get_outcome(&req("other")),
    )
    .await;
    assert!(matches!(o.error, Some(GetError::Closed)), "{:?}", o.error);
    let (tx, _rx) = async_channel::bounded::<Ev>(1);
    assert!(matches!(
        typed.notify(req("k"), "late", tx),
        Err(WatchError::Closed)
    ));
    // A negative: the blocking fetch open at close may finish, but no new fetch starts.
    let reads = server.reads();
    server.set(2, 4);
    sleep(&rt, ms(100)).await;
    assert!(
        server.reads() <= reads + 1,
        "the refresh went on after close"
    );
}
