//! Consul's own watch tests (hashicorp/consul, `agent/cache/watch_test.go`) ported to this
//! crate's API and run on the virtual-time runtime, so every timing is exact and no test waits
//! on a real clock.
//!
//! Each test is named after its Go test. The Go mock type (`typ.Static(...).Once().WaitUntil(
//! trigger)`) becomes a [`Script`]: a queue of scripted answers, each optionally held until a
//! [`Gate`] opens; a step not marked `once` repeats, as a testify expectation without `Once`.
//! Go's `TestCacheNotifyChResult` (collect N events within 75 ms, compare as a multiset with the
//! age zeroed) is [`expect_events`]. Where the contract (SPEC.md §9, docs/contract.md#watch) is
//! stricter than the Go assertion, the test asserts both and says so.
//!
//! Go tests ported: `TestCacheNotify` (also in its first revision, and in the `Stream` form),
//! `TestCacheNotifyPolling`, `TestCacheWatch_ErrorBackoff`,
//! `TestCacheWatch_ErrorBackoffNonBlocking` (also in the `Stream` form), `Test_isEqual` (through
//! `CacheType::value_eq`, which is what a polled watch compares values with).

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_channel::{Receiver, Sender};
use cache_core::sim::SimRuntime;
use cache_core::testing::{MockError, MockRequest, MockType};
use cache_core::watch::UpdateEvent;
use cache_core::{Cache, CacheType, FetchOptions, FetchResult, GetError, RegisterOptions};
use futures::future::{Either, select};
use futures::{Stream, StreamExt};

mod support;
use support::within_real_time;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// How long Consul's `TestCacheNotifyChResult` waits for the events it expects.
const NOTIFY_WAIT: Duration = Duration::from_millis(75);

/// Every scenario runs under these seeds of the virtual-time runtime (its jitter).
const SEEDS: std::ops::RangeInclusive<u64> = 1..=16;

type Ev = UpdateEvent<&'static str, u64, MockError>;

// ===== The scripted type (Go: `TestType` / `TestTypeNonBlocking` with `Static(...)`) =====

/// A trigger channel of the Go test: a fetch held by it returns once it is opened (`close`d).
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

/// One scripted answer of the mock type.
#[derive(Clone)]
struct Step {
    answer: Result<(u64, u64), &'static str>,
    gate: Option<Receiver<()>>,
    once: bool,
}

impl Step {
    /// Answers `value` at `index` (Go: `Static(FetchResult{Value, Index}, nil)`), every time.
    fn ok(value: u64, index: u64) -> Self {
        Self {
            answer: Ok((value, index)),
            gate: None,
            once: false,
        }
    }

    /// Fails with `message` (Go: `Static(FetchResult{...}, errors.New(message))`), every
    /// time. Our fetch errors carry no index: Go's `Index: 5` next to an error is dropped by
    /// its cache too (a failed fetch never sets the entry's index there either).
    fn err(message: &'static str) -> Self {
        Self {
            answer: Err(message),
            gate: None,
            once: false,
        }
    }

    /// Go: `.Once()`.
    fn once(mut self) -> Self {
        self.once = true;
        self
    }

    /// Go: `.WaitUntil(trigger)`.
    fn after(mut self, gate: &Gate) -> Self {
        self.gate = Some(gate.wait.clone());
        self
    }
}

/// One call of the scripted fetch: the request's key, the min index it was handed, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    key: String,
    min_index: u64,
    at: Duration,
}

/// The scripted fetch: answers steps in order and logs every call.
struct Script {
    sim: SimRuntime,
    steps: Mutex<VecDeque<Step>>,
    calls: Mutex<Vec<Call>>,
}

impl Script {
    fn new(sim: &SimRuntime, steps: Vec<Step>) -> Arc<Self> {
        Arc::new(Self {
            sim: sim.clone(),
            steps: Mutex::new(steps.into()),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn next(&self, key: &str, min_index: u64) -> Step {
        self.calls.lock().unwrap().push(Call {
            key: key.to_owned(),
            min_index,
            at: self.sim.elapsed(),
        });
        let mut steps = self.steps.lock().unwrap();
        match steps.front() {
            Some(step) if step.once => steps.pop_front().unwrap(),
            Some(step) => step.clone(),
            // testify fails a test on a call nothing was scripted for; here it is an error
            // that the tests detect through the call count and the events.
            None => Step::err("unscripted fetch").once(),
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    fn min_indexes(&self) -> Vec<u64> {
        self.calls().iter().map(|c| c.min_index).collect()
    }

    /// The mock type (blocking or not, as `opts` says) that answers from this script.
    fn mock_type(self: &Arc<Self>, opts: RegisterOptions) -> MockType<u64> {
        let script = self.clone();
        MockType::new(opts, move |o: FetchOptions<u64>, req: MockRequest| {
            let step = script.next(req.key(), o.min_index);
            async move {
                if let Some(gate) = step.gate {
                    // Returns once the gate is closed.
                    let _ = gate.recv().await;
                }
                match step.answer {
                    Ok((value, index)) => Ok(FetchResult::new(value, index)),
                    Err(message) => Err(MockError::new(message)),
                }
            }
        })
        .compare_values()
    }
}

// ===== Events =====

/// An update event as Consul's helper compares it: age left out.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    id: &'static str,
    result: Option<u64>,
    hit: bool,
    index: u64,
    error: Option<String>,
}

fn error_text(e: &GetError<MockError>) -> String {
    e.fetch_error()
        .map_or_else(|| e.to_string(), |m| m.message.clone())
}

fn seen_as<C>(id: &'static str, ev: &UpdateEvent<C, u64, MockError>) -> Seen {
    Seen {
        id,
        result: ev.result,
        hit: ev.meta.hit,
        index: ev.meta.index,
        error: ev.error.as_ref().map(error_text),
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

fn failed(id: &'static str, result: Option<u64>, hit: bool, index: u64, error: &str) -> Seen {
    Seen {
        id,
        result,
        hit,
        index,
        error: Some(error.to_owned()),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum NoEvent {
    TimedOut,
    Closed,
}

/// The next event on `rx` within `within` of virtual time.
async fn next_event(sim: &SimRuntime, rx: &Receiver<Ev>, within: Duration) -> Result<Ev, NoEvent> {
    match select(Box::pin(rx.recv()), sim.sleep(within)).await {
        Either::Left((Ok(ev), _)) => Ok(ev),
        Either::Left((Err(_), _)) => Err(NoEvent::Closed),
        Either::Right(_) => Err(NoEvent::TimedOut),
    }
}

/// The next item of a watch stream within `within` of virtual time.
async fn next_item<S: Stream + Unpin>(
    sim: &SimRuntime,
    stream: &mut S,
    within: Duration,
) -> Result<S::Item, NoEvent> {
    match select(stream.next(), sim.sleep(within)).await {
        Either::Left((Some(ev), _)) => Ok(ev),
        Either::Left((None, _)) => Err(NoEvent::Closed),
        Either::Right(_) => Err(NoEvent::TimedOut),
    }
}

/// Go's `TestCacheNotifyChResult`: exactly the `expected` events (in any order, age ignored)
/// arrive within 75 ms. Returns the virtual time it took.
async fn expect_events(sim: &SimRuntime, rx: &Receiver<Ev>, mut expected: Vec<Seen>) -> Duration {
    let start = sim.elapsed();
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let left = NOTIFY_WAIT.saturating_sub(sim.elapsed() - start);
        match next_event(sim, rx, left).await {
            Ok(ev) => got.push(seen(&ev)),
            Err(why) => panic!("{why:?} while waiting for {expected:?}; got {got:?}"),
        }
    }
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    sim.elapsed() - start
}

/// Nothing arrives on `rx` for `period` (and the channel stays open).
async fn assert_quiet(sim: &SimRuntime, rx: &Receiver<Ev>, period: Duration) {
    match next_event(sim, rx, period).await {
        Err(NoEvent::TimedOut) => {}
        Ok(ev) => panic!("unexpected event {:?}", seen(&ev)),
        Err(NoEvent::Closed) => panic!("the channel closed"),
    }
}

/// Nothing arrives on `stream` for `period` (and the stream does not end).
async fn assert_stream_quiet<S>(sim: &SimRuntime, stream: &mut S, period: Duration)
where
    S: Stream<Item = UpdateEvent<(), u64, MockError>> + Unpin,
{
    match next_item(sim, stream, period).await {
        Err(NoEvent::TimedOut) => {}
        Ok(ev) => panic!("unexpected event {:?}", seen_as("", &ev)),
        Err(NoEvent::Closed) => panic!("the stream ended"),
    }
}

/// The next item of `stream`, with age left out, within Go's 75 ms.
async fn expect_item<S>(sim: &SimRuntime, stream: &mut S, expected: Seen)
where
    S: Stream<Item = UpdateEvent<(), u64, MockError>> + Unpin,
{
    match next_item(sim, stream, NOTIFY_WAIT).await {
        Ok(ev) => assert_eq!(seen_as("", &ev), expected),
        Err(why) => panic!("{why:?} while waiting for {expected:?}"),
    }
}

impl fmt::Display for NoEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

// ===== TestCacheNotify =====

/// Go `TestCacheNotify`: initial error, then risen indexes only; a 2nd watch hits; one fetch.
#[test]
fn cache_notify() {
    within_real_time("cache_notify", || {
        for seed in SEEDS {
            let sim = SimRuntime::new(seed);
            let cache = Cache::new(sim.handle());
            let gates: Vec<Gate> = (0..5).map(|_| Gate::new()).collect();
            let script = Script::new(
                &sim,
                vec![
                    // The servers are unreachable at first.
                    Step::err("no servers available").once(),
                    // Index 1 first (consul#6521: the watch must not have raised its index to 1
                    // after the error, or this value would never be delivered).
                    Step::ok(1, 1).after(&gates[0]).once(),
                    Step::ok(12, 5).after(&gates[1]).once(),
                    // The same index again: a blocking query that timed out.
                    Step::ok(12, 5).after(&gates[2]).once(),
                    Step::ok(42, 7).after(&gates[3]).once(),
                    Step::ok(42, 8).after(&gates[4]),
                ],
            );
            let typed =
                cache.register(script.mock_type(RegisterOptions::new().supports_blocking(true)));
            // Go uses an unbuffered channel; ours is the smallest bounded one.
            let (tx, rx) = async_channel::bounded(1);
            sim.block_on(async {
                let test = typed
                    .notify(MockRequest::new("hello"), "test", tx.clone())
                    .unwrap();
                let took = expect_events(
                    &sim,
                    &rx,
                    vec![failed("test", None, false, 0, "no servers available")],
                )
                .await;
                assert_eq!(took, Duration::ZERO, "the first result comes at once");
                assert_quiet(&sim, &rx, secs(1)).await;

                gates[0].open();
                let took = expect_events(&sim, &rx, vec![ok("test", 1, false, 1)]).await;
                assert_eq!(took, Duration::ZERO);

                gates[1].open();
                // Never hits: blocking waited for a new value.
                expect_events(&sim, &rx, vec![ok("test", 12, false, 5)]).await;

                // A second observer of the same request on the same channel.
                let test2 = typed
                    .notify(MockRequest::new("hello"), "test2", tx)
                    .unwrap();
                expect_events(&sim, &rx, vec![ok("test2", 12, true, 5)]).await;

                // The same value and index again (a timed-out blocking query): no event.
                gates[2].open();
                assert_quiet(&sim, &rx, secs(1)).await;

                gates[3].open();
                let took = expect_events(
                    &sim,
                    &rx,
                    vec![ok("test", 42, false, 7), ok("test2", 42, false, 7)],
                )
                .await;
                assert_eq!(took, Duration::ZERO);
                sim.sleep(ms(1)).await;
                // Two watches, one fetch stream: the five scripted answers and the open query.
                assert_eq!(script.count(), 6, "{:?}", script.calls());

                // Go: cancel(), then release the query that may still be open.
                drop(test);
                drop(test2);
                gates[4].open();
                sim.sleep(secs(600)).await;
                assert_eq!(
                    next_event(&sim, &rx, secs(1)).await.map(|e| seen(&e)),
                    Err(NoEvent::Closed),
                    "cancelling both watches dropped their sinks"
                );
                assert_eq!(script.count(), 6, "nothing fetches after the watches ended");
                // The query open at cancel finished and stored its answer.
                let now = typed.get(&MockRequest::new("hello")).await.unwrap();
                assert_eq!(
                    (now.value, now.meta.index, now.meta.hit),
                    (Some(42), 8, true)
                );
            });
            // Go: the fetch always gets the request it was given (a `*MockRequest`), and, for a
            // blocking type, the entry's index.
            assert!(script.calls().iter().all(|c| c.key == "hello"));
            assert_eq!(script.min_indexes(), vec![0, 0, 1, 5, 5, 7]);
            assert_eq!(cache.metrics().total().watches, 0);
        }
    });
}

/// Go `TestCacheNotify`, first revision (`notify_until`): index 4 first, risen ones, late hit.
#[test]
fn cache_notify_first_revision() {
    within_real_time("cache_notify_first_revision", || {
        for seed in SEEDS {
            let sim = SimRuntime::new(seed);
            let cache = Cache::new(sim.handle());
            let gates: Vec<Gate> = (0..4).map(|_| Gate::new()).collect();
            let script = Script::new(
                &sim,
                vec![
                    Step::ok(1, 4).once(),
                    Step::ok(12, 5).after(&gates[0]).once(),
                    Step::ok(12, 5).after(&gates[1]).once(),
                    Step::ok(42, 7).after(&gates[2]).once(),
                    Step::ok(42, 8).after(&gates[3]),
                ],
            );
            let typed =
                cache.register(script.mock_type(RegisterOptions::new().supports_blocking(true)));
            let (tx, rx) = async_channel::bounded(1);
            sim.block_on(async {
                // Go's context: one cancel signal for both watches (`notify_until`).
                let ctx = Gate::new();
                let cancelled = |ctx: &Gate| {
                    let done = ctx.wait.clone();
                    async move {
                        let _ = done.recv().await;
                    }
                };
                typed
                    .notify_until(
                        MockRequest::new("hello"),
                        "test",
                        tx.clone(),
                        cancelled(&ctx),
                    )
                    .unwrap();
                expect_events(&sim, &rx, vec![ok("test", 1, false, 4)]).await;
                assert_quiet(&sim, &rx, secs(1)).await;
                gates[0].open();
                expect_events(&sim, &rx, vec![ok("test", 12, false, 5)]).await;
                typed
                    .notify_until(MockRequest::new("hello"), "test2", tx, cancelled(&ctx))
                    .unwrap();
                expect_events(&sim, &rx, vec![ok("test2", 12, true, 5)]).await;
                gates[1].open();
                assert_quiet(&sim, &rx, secs(1)).await;
                gates[2].open();
                expect_events(
                    &sim,
                    &rx,
                    vec![ok("test", 42, false, 7), ok("test2", 42, false, 7)],
                )
                .await;
                sim.sleep(ms(1)).await;
                assert_eq!(script.count(), 5, "{:?}", script.calls());
                // Go: cancel(), then release the query that may still be open.
                ctx.open();
                gates[3].open();
                sim.sleep(secs(600)).await;
                assert_eq!(
                    next_event(&sim, &rx, secs(1)).await.map(|e| seen(&e)),
                    Err(NoEvent::Closed),
                    "cancelling the context ended both watches"
                );
                assert_eq!(script.count(), 5, "nothing fetches after the watches ended");
            });
            assert_eq!(script.min_indexes(), vec![0, 4, 5, 5, 7]);
            assert_eq!(cache.metrics().total().watches, 0);
        }
    });
}

/// Go `TestCacheNotify` in `Stream` form: the same events on two streams, one fetch stream.
#[test]
fn cache_notify_stream_form() {
    within_real_time("cache_notify_stream_form", || {
        for seed in SEEDS {
            let sim = SimRuntime::new(seed);
            let cache = Cache::new(sim.handle());
            let gates: Vec<Gate> = (0..5).map(|_| Gate::new()).collect();
            let script = Script::new(
                &sim,
                vec![
                    Step::err("no servers available").once(),
                    Step::ok(1, 1).after(&gates[0]).once(),
                    Step::ok(12, 5).after(&gates[1]).once(),
                    Step::ok(12, 5).after(&gates[2]).once(),
                    Step::ok(42, 7).after(&gates[3]).once(),
                    Step::ok(42, 8).after(&gates[4]),
                ],
            );
            let typed =
                cache.register(script.mock_type(RegisterOptions::new().supports_blocking(true)));
            sim.block_on(async {
                let mut test = typed.watch(MockRequest::new("hello")).unwrap();
                expect_item(
                    &sim,
                    &mut test,
                    failed("", None, false, 0, "no servers available"),
                )
                .await;
                assert_stream_quiet(&sim, &mut test, secs(1)).await;
                gates[0].open();
                expect_item(&sim, &mut test, ok("", 1, false, 1)).await;
                gates[1].open();
                expect_item(&sim, &mut test, ok("", 12, false, 5)).await;

                let mut test2 = typed.watch(MockRequest::new("hello")).unwrap();
                expect_item(&sim, &mut test2, ok("", 12, true, 5)).await;

                gates[2].open();
                assert_stream_quiet(&sim, &mut test, secs(1)).await;
                assert_stream_quiet(&sim, &mut test2, Duration::ZERO).await;

                gates[3].open();
                expect_item(&sim, &mut test, ok("", 42, false, 7)).await;
                expect_item(&sim, &mut test2, ok("", 42, false, 7)).await;
                sim.sleep(ms(1)).await;
                assert_eq!(script.count(), 6, "{:?}", script.calls());

                drop(test);
                drop(test2);
                gates[4].open();
                sim.sleep(secs(600)).await;
                assert_eq!(
                    script.count(),
                    6,
                    "nothing fetches after the streams are dropped"
                );
            });
            assert_eq!(script.min_indexes(), vec![0, 0, 1, 5, 5, 7]);
            assert_eq!(cache.metrics().total().watches, 0);
        }
    });
}

// ===== TestCacheNotifyPolling =====

/// Go `TestCacheNotifyPolling`: polls every max age (+ jitter), delivers changes; 2nd watch hits.
#[test]
fn cache_notify_polling() {
    within_real_time("cache_notify_polling", || {
        for seed in SEEDS {
            let sim = SimRuntime::new(seed);
            let cache = Cache::new(sim.handle());
            let script = Script::new(
                &sim,
                vec![
                    Step::ok(1, 1).once(),
                    Step::ok(12, 1).once(),
                    Step::ok(42, 1).once(),
                ],
            );
            let typed = cache.register(script.mock_type(RegisterOptions::new()));
            let request = MockRequest::new("hello").max_age(ms(100));
            let (tx, rx) = async_channel::bounded(1);
            sim.block_on(async {
                let _test = typed.notify(request.clone(), "test", tx.clone()).unwrap();
                expect_events(&sim, &rx, vec![ok("test", 1, false, 1)]).await;
                let first_at = sim.elapsed();

                // Not too early...
                assert_quiet(&sim, &rx, ms(50)).await;
                // ...and not too late.
                let ev = next_event(&sim, &rx, ms(100))
                    .await
                    .expect("didn't receive the notification");
                assert_eq!(seen(&ev), ok("test", 12, false, 1));
                assert!(ev.meta.age < ms(50), "age {:?}", ev.meta.age);
                // contract: Watch 4, exactly: the poll waits max_age less the value's
                // age, plus jitter of up to a tenth of max_age.
                let waited = sim.elapsed() - first_at;
                assert!(
                    (ms(100)..=ms(110)).contains(&waited),
                    "polled after {waited:?}"
                );

                // A second observer of the same request on the same channel.
                let _test2 = typed.notify(request, "test2", tx).unwrap();
                expect_events(&sim, &rx, vec![ok("test2", 12, true, 1)]).await;

                // The next poll, within 220 ms (110 ms in the test's first revision).
                let start = sim.elapsed();
                let mut events = Vec::new();
                while events.len() < 2 {
                    let left = ms(110).saturating_sub(sim.elapsed() - start);
                    match next_event(&sim, &rx, left).await {
                        Ok(ev) => events.push(ev),
                        Err(why) => panic!("UpdateEvent not received in time: {why}"),
                    }
                }
                assert_eq!(events[0].result, Some(42));
                assert!(!(events[0].meta.hit && events[1].meta.hit));
                assert_eq!(events[0].meta.index, 1);
                assert!(events[0].meta.age < ms(50), "age {:?}", events[0].meta.age);
                assert!(events[0].error.is_none());
                assert_eq!(events[1].result, Some(42));
                assert_eq!(events[1].meta.index, 1);
                assert!(events[1].meta.age < ms(100), "age {:?}", events[1].meta.age);
                assert!(events[1].error.is_none());
                let mut ids: Vec<_> = events.iter().map(|e| e.correlation_id).collect();
                ids.sort_unstable();
                assert_eq!(ids, ["test", "test2"], "one event per watch");
                // Three scripted answers, each `Once`: the two watches shared every poll.
                assert_eq!(script.count(), 3, "{:?}", script.calls());
            });
            assert!(
                script
                    .calls()
                    .iter()
                    .all(|c| c.key == "hello" && c.min_index == 0)
            );
        }
    });
}

// ===== TestCacheWatch_ErrorBackoff =====

/// Go `TestCacheWatch_ErrorBackoff`: a blocking watch failing after its first value backs off.
#[test]
fn cache_watch_error_backoff() {
    within_real_time("cache_watch_error_backoff", || {
        for seed in SEEDS {
            let sim = SimRuntime::new(seed);
            let cache = Cache::new(sim.handle());
            let script = Script::new(
                &sim,
                vec![Step::ok(1, 4).once(), Step::err("test fetch error")],
            );
            let typed =
                cache.register(script.mock_type(RegisterOptions::new().supports_blocking(true)));
            let (tx, rx) = async_channel::bounded(1);
            sim.block_on(async {
                let _test = typed.notify(MockRequest::new("hello"), "test", tx).unwrap();
                expect_events(&sim, &rx, vec![ok("test", 1, false, 4)]).await;
                let start = sim.elapsed();

                let mut num_errors = 0;
                loop {
                    let left = ms(500).saturating_sub(sim.elapsed() - start);
                    match next_event(&sim, &rx, left).await {
                        Ok(ev) => {
                            num_errors += 1;
                            assert!(ev.error.is_some(), "unexpected {:?}", seen(&ev));
                        }
                        Err(NoEvent::TimedOut) => break,
                        Err(NoEvent::Closed) => panic!("the channel closed"),
                    }
                }
                let retries = script.count() - 1;
                assert!(num_errors < 10, "num_errors: {num_errors}");
                assert!(retries < 10, "retries: {retries}");
                // Stricter, per contract: Watch 3: after a value was delivered, errors at
                // an unchanged index are retried, not delivered.
                assert_eq!(num_errors, 0);
                // Per contract: Backoff (the reference's policy): three immediate retries, then the fourth
                // failure waits 2 s plus jitter of up to 2 s.
                assert_eq!(retries, 4, "{:?}", script.calls());
                sim.sleep(secs(4)).await;
                let calls = script.calls();
                assert!(calls[1..=4].iter().all(|c| c.at == start));
                let pause = calls[5].at - calls[4].at;
                assert!((secs(2)..secs(4)).contains(&pause), "paused {pause:?}");
                // Retries block on the entry's index, which the errors never moved.
                assert!(calls[1..].iter().all(|c| c.min_index == 4));
            });
        }
    });
}

// ===== TestCacheWatch_ErrorBackoffNonBlocking =====

/// Go `TestCacheWatch_ErrorBackoffNonBlocking`: a failing polled watch backs off.
#[test]
fn cache_watch_error_backoff_non_blocking() {
    within_real_time("cache_watch_error_backoff_non_blocking", || {
        for seed in SEEDS {
            let sim = SimRuntime::new(seed);
            let cache = Cache::new(sim.handle());
            let script = Script::new(
                &sim,
                vec![Step::ok(1, 4).once(), Step::err("test fetch error")],
            );
            let typed = cache.register(script.mock_type(RegisterOptions::new()));
            let (tx, rx) = async_channel::bounded(1);
            sim.block_on(async {
                let _test = typed
                    .notify(MockRequest::new("hello").max_age(ms(100)), "test", tx)
                    .unwrap();
                expect_events(&sim, &rx, vec![ok("test", 1, false, 4)]).await;
                let start = sim.elapsed();

                // 100 + 500 ms: the first retry waits for max age plus jitter.
                let mut num_errors = 0;
                loop {
                    let left = ms(600).saturating_sub(sim.elapsed() - start);
                    match next_event(&sim, &rx, left).await {
                        Ok(ev) => {
                            num_errors += 1;
                            assert!(ev.error.is_some(), "unexpected {:?}", seen(&ev));
                        }
                        Err(NoEvent::TimedOut) => break,
                        Err(NoEvent::Closed) => panic!("the channel closed"),
                    }
                }
                let retries = script.count() - 1;
                assert!(num_errors < 10, "num_errors: {num_errors}");
                assert!(retries < 10, "retries: {retries}");
                // Stricter, per contract: Watch 4: a poll delivers when the index rose or
                // the value changed; a failed poll does neither.
                assert_eq!(num_errors, 0);
                // Contract Watch 4 and contract: Backoff: the first poll after max age (+ up to a tenth of
                // jitter), then, failing, three immediate retries, then a 2–4 s backoff.
                assert_eq!(retries, 4, "{:?}", script.calls());
                sim.sleep(secs(4)).await;
                let calls = script.calls();
                let first_poll = calls[1].at - start;
                assert!(
                    (ms(100)..=ms(110)).contains(&first_poll),
                    "polled after {first_poll:?}"
                );
                assert!(calls[2..=4].iter().all(|c| c.at == calls[1].at));
                let pause = calls[5].at - calls[4].at;
                assert!((secs(2)..secs(4)).contains(&pause), "paused {pause:?}");
            });
        }
    });
}

/// Go `TestCacheWatch_ErrorBackoffNonBlocking` in `Stream` form: same backoff, no error item.
#[test]
fn cache_watch_error_backoff_non_blocking_stream_form() {
    within_real_time("cache_watch_error_backoff_non_blocking_stream_form", || {
        for seed in SEEDS {
            let sim = SimRuntime::new(seed);
            let cache = Cache::new(sim.handle());
            let script = Script::new(
                &sim,
                vec![Step::ok(1, 4).once(), Step::err("test fetch error")],
            );
            let typed = cache.register(script.mock_type(RegisterOptions::new()));
            sim.block_on(async {
                let mut stream = typed
                    .watch(MockRequest::new("hello").max_age(ms(100)))
                    .unwrap();
                expect_item(&sim, &mut stream, ok("", 1, false, 4)).await;
                assert_stream_quiet(&sim, &mut stream, ms(600)).await;
                assert_eq!(script.count() - 1, 4, "{:?}", script.calls());
            });
        }
    });
}

// ===== Test_isEqual =====

/// A point in time (Go: `time.Time`).
#[derive(Debug, Clone, PartialEq)]
struct Timestamp {
    seconds: u64,
    nanos: u32,
}

/// A protobuf-like message: `wire` is the encoding a decoded message keeps, internal state
/// that makes a derived (Go: `reflect.DeepEqual`) comparison tell a message from its
/// round-tripped copy, while the two are equal as messages (Go: `proto.Equal`).
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

/// A non-blocking type answering its current value at index 1; `value_eq` left at the trait's
/// default.
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
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Ok(FetchResult::new(self.current.lock().unwrap().clone(), 1))
    }
}

/// The same for messages, with `value_eq` comparing them as messages (Go's `isEqual` calls
/// `proto.Equal` for protobuf values).
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
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Ok(FetchResult::new(self.current.lock().unwrap().clone(), 1))
    }

    fn value_eq(&self, a: &Message, b: &Message) -> bool {
        a.timestamp == b.timestamp
    }
}

/// Watches a polled type (max age 10 s) and, for each of `values`, sets it upstream and lets
/// at least one poll run. Returns the values delivered after each step (step 0: the initial
/// delivery).
fn deliveries<T, V>(
    make: impl FnOnce(Arc<Mutex<V>>, Arc<AtomicUsize>) -> T,
    initial: V,
    values: Vec<V>,
) -> Vec<Vec<V>>
where
    T: CacheType<Request = MockRequest, Value = V, Error = MockError>,
    V: Clone + PartialEq + Send + Sync + 'static,
{
    let sim = SimRuntime::new(8);
    let cache = Cache::new(sim.handle());
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
    sim.block_on(async {
        let _watch = typed
            .notify(MockRequest::new("hello").max_age(secs(10)), (), tx)
            .unwrap();
        sim.sleep(ms(1)).await;
        let mut steps = vec![drain(&rx)];
        for value in values {
            *current.lock().unwrap() = value;
            let before = fetches.load(Ordering::SeqCst);
            // A poll every 10–11 s.
            sim.sleep(secs(12)).await;
            assert!(fetches.load(Ordering::SeqCst) > before, "no poll ran");
            steps.push(drain(&rx));
        }
        steps
    })
}

/// Go `Test_isEqual`: a polled watch tells changed values from equal ones (`value_eq`).
#[test]
fn is_equal() {
    // Rows with Go `nil` values have no counterpart: a fetch without a value keeps the old
    // one, and a watch's first value is always delivered. Note: docs/contract.md (Watch 4)
    // says the default `value_eq` "compares nothing"; the trait's default is `==`, as Go's
    // `reflect.DeepEqual` and contract: Watch 4 ("the value changed"), which is what is asserted here.
    within_real_time("is_equal", || {
        // Sanity check, as Go's: a decoded copy is not equal field by field.
        assert_ne!(message(100, false), message(100, true));

        // {true, pb1, pb2} and {false, pb1, pb1+1s}: messages compared as messages.
        let steps = deliveries(
            |current, fetches| Proto { current, fetches },
            message(100, false),
            vec![message(100, true), message(101, false)],
        );
        assert_eq!(
            steps,
            vec![vec![message(100, false)], vec![], vec![message(101, false)]]
        );

        // {true, s1, s2} and {false, s1, s1+1s}: plain values, the default comparison (`==`,
        // Go's `reflect.DeepEqual`).
        let t = |seconds| Timestamp { seconds, nanos: 7 };
        let steps = deliveries(
            |current, fetches| Plain { current, fetches },
            t(100),
            vec![t(100), t(101)],
        );
        assert_eq!(steps, vec![vec![t(100)], vec![], vec![t(101)]]);

        // {true, &s1, &s2}: two distinct pointers to equal values are equal (DeepEqual follows
        // pointers; `Arc`'s `==` compares what it points to).
        let steps = deliveries(
            |current, fetches| Plain { current, fetches },
            Arc::new(t(100)),
            vec![Arc::new(t(100)), Arc::new(t(101))],
        );
        assert_eq!(
            steps,
            vec![vec![Arc::new(t(100))], vec![], vec![Arc::new(t(101))]]
        );
    });
}
