//! Adversarial cases on real runtimes: extreme values, fetches that answer (or fail) at once,
//! races, slow consumers, cancellation and churn — the defects that a deterministic
//! virtual-time runtime cannot show (a fetch there takes no time and the clock stands still
//! while a woken task looks). The watch API's cases are in `adversary_watch.rs` beside this
//! file.
//!
//! Written once against `SharedRuntime` and run by every adapter crate: `cache-tokio` in
//! `tests/adversary_real_time.rs` (a current-thread runtime, a 2-worker multi-thread runtime
//! with the case blocked on from the test's thread, and the same with the case spawned onto a
//! worker), `cache-async-std` and `cache-smol` in `tests/adversary.rs`. The cases that need
//! tokio itself (a cache outliving its runtime) stay in the tokio file.
//!
//! This file sits in a subfolder, so it is not a test target of its own: an adapter includes it
//! with `#[macro_use] #[path = "../../cache-core/tests/real_runtime/adversary.rs"] mod
//! adversary;` and calls `adversary_cases!(harness)`, where `harness` runs one
//! `FnOnce(SharedRuntime) -> BoxFuture<'static, ()>` to completion on a fresh runtime (the
//! shape of `consul_scenarios.rs`). Every case runs under a [`Watchdog`] that aborts the
//! process if it is still running after 60 s (a case that starves its runtime cannot fail by
//! itself). Tasks, sleeps and timeouts go through the cache's own `Runtime` (`Runtime::spawn`,
//! [`Sleep`]) and `futures`, never a runtime's API. Assertions are what must hold whatever the
//! timing: "returns by timeout + 5 s", "at most N fetches per get", "the other task ran".
//!
//! [`Watchdog`]: cache_core::testing::Watchdog

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use cache_core::testing::{MockError, MockRequest, MockServer, MockType};
use cache_core::watch::{EventSink, SinkClosed, TrySendError, UpdateEvent};
use cache_core::{
    BackoffPolicy, BoxFuture, Cache, CacheError, FetchResult, GetError, RateLimit, RegisterOptions,
    RequestInfo, SharedRuntime, Sleep, WatchError,
};
use futures::channel::oneshot;

/// One `#[test]` per case, each run by `$harness` under a watchdog. `$harness` is called with
/// the case as `FnOnce(SharedRuntime) -> BoxFuture<'static, ()>`; the including module must be
/// named `adversary`.
macro_rules! adversary_cases {
    ($harness:path) => {
        adversary_cases!(@cases $harness;
            capacity_bound_restored_once_nothing_is_held,
            tiny_ttl_blocked_get,
            get_timeout_extremes,
            tiny_timeout_while_fetch_in_flight,
            blocking_same_index_at_once_returns_at_timeout,
            concurrent_gets_same_index_at_once,
            blocking_index_zero_at_once_respects_backoff,
            max_index_prepopulated_then_reset,
            revalidation_extremes_answering_at_once,
            revalidation_extremes_failing_at_once,
            refresh_at_once_ignores_revalidation,
            tiny_ttl_tight_loop,
            polled_watch_tiny_max_age_sink,
            polled_watch_tiny_max_age_stream,
            blocking_watch_failing_forever,
            retry_now_during_backoff,
            slow_consumer_of_a_hot_stream,
            receiver_dropped_while_flush_waits,
            notify_until_timer_ends,
            capacity_tiny_bound_concurrent_gets,
            capacity_bound_with_failing_keys,
            cancellation_storm_then_close,
            reregister_while_gets_in_flight,
            reregister_churn,
            threads_hammer_get_prepopulate_close,
            prepopulate_extremes,
            rate_limit_extremes,
            option_extremes,
            polled_watch_huge_max_age,
            panicking_fetch_at_once,
        );
    };
    (@cases $harness:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let _watchdog = ::cache_core::testing::Watchdog::arm(concat!(
                    "adversary case ",
                    module_path!(),
                    "::",
                    stringify!($case)
                ));
                $harness(|rt| ::std::boxed::Box::pin($crate::adversary::$case(rt)));
            }
        )*
    };
}

// ===== Helpers =====
// The including crate declares the shared harness (`real_runtime/harness.rs`) as `harness`.
use crate::harness::{MARGIN, eventually, sleep, spawn, timeout, within, yield_now};

/// A task that counts 1 ms ticks: proof that the runtime runs tasks other than the cache's.
struct Ticker {
    ticks: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Ticker {
    fn start(rt: &SharedRuntime) -> Self {
        let ticks = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s, r) = (ticks.clone(), stop.clone(), rt.clone());
        rt.spawn(Box::pin(async move {
            while !s.load(Ordering::SeqCst) {
                sleep(&r, Duration::from_millis(1)).await;
                t.fetch_add(1, Ordering::SeqCst);
            }
        }));
        Self { ticks, stop }
    }

    fn ticks(&self) -> usize {
        self.ticks.load(Ordering::SeqCst)
    }

    /// Waits until the ticker has ticked a few more times (fails after 10 s).
    async fn ran(&self, rt: &SharedRuntime, what: &str) {
        let from = self.ticks();
        eventually(rt, &format!("another task ran ({what})"), || {
            self.ticks() >= from + 3
        })
        .await;
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

type Event = UpdateEvent<&'static str, u64, MockError>;

/// A small bounded channel implementing `EventSink`, whose state the cases inspect: `Tx` is
/// the sink, `Rx` the consumer; `Rx::recv` answers `None` once every `Tx` is gone and the
/// buffer is drained.
struct ChanState<T> {
    buf: VecDeque<T>,
    cap: usize,
    senders: usize,
    receiver_alive: bool,
    rx_waker: Option<Waker>,
    tx_wakers: Vec<Waker>,
}

struct Chan<T>(Mutex<ChanState<T>>);

impl<T> Chan<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, ChanState<T>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Tx<T>(Arc<Chan<T>>);
struct Rx<T>(Arc<Chan<T>>);

fn channel<T>(cap: usize) -> (Tx<T>, Rx<T>) {
    let chan = Arc::new(Chan(Mutex::new(ChanState {
        buf: VecDeque::new(),
        cap,
        senders: 1,
        receiver_alive: true,
        rx_waker: None,
        tx_wakers: Vec::new(),
    })));
    (Tx(chan.clone()), Rx(chan))
}

impl<T> Clone for Tx<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Self(self.0.clone())
    }
}

impl<T> Drop for Tx<T> {
    fn drop(&mut self) {
        let waker = {
            let mut st = self.0.lock();
            st.senders -= 1;
            if st.senders == 0 {
                st.rx_waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

fn offer<T>(chan: &Chan<T>, event: T) -> Result<(), (TrySendError, T)> {
    let waker = {
        let mut st = chan.lock();
        if !st.receiver_alive {
            return Err((TrySendError::Closed, event));
        }
        if st.buf.len() >= st.cap {
            return Err((TrySendError::Full, event));
        }
        st.buf.push_back(event);
        st.rx_waker.take()
    };
    if let Some(w) = waker {
        w.wake();
    }
    Ok(())
}

impl<T: Send + 'static> EventSink<T> for Tx<T> {
    fn try_send(&self, event: T) -> Result<(), TrySendError> {
        offer(&self.0, event).map_err(|(e, _)| e)
    }

    fn send(&self, event: T) -> BoxFuture<'static, Result<(), SinkClosed>> {
        let chan = self.0.clone();
        let mut event = Some(event);
        Box::pin(std::future::poll_fn(move |cx| {
            let Some(ev) = event.take() else {
                return Poll::Ready(Ok(()));
            };
            match offer(&chan, ev) {
                Ok(()) => Poll::Ready(Ok(())),
                Err((TrySendError::Closed, _)) => Poll::Ready(Err(SinkClosed)),
                Err((TrySendError::Full, back)) => {
                    let mut st = chan.lock();
                    st.tx_wakers.push(cx.waker().clone());
                    // Room may have appeared between the offer and the registration.
                    let room = st.buf.len() < st.cap || !st.receiver_alive;
                    drop(st);
                    event = Some(back);
                    if room {
                        cx.waker().wake_by_ref();
                    }
                    Poll::Pending
                }
            }
        }))
    }

    fn is_closed(&self) -> bool {
        !self.0.lock().receiver_alive
    }
}

impl<T> Rx<T> {
    async fn recv(&self) -> Option<T> {
        std::future::poll_fn(|cx| {
            let mut st = self.0.lock();
            if let Some(ev) = st.buf.pop_front() {
                let wakers = std::mem::take(&mut st.tx_wakers);
                drop(st);
                wakers.into_iter().for_each(Waker::wake);
                return Poll::Ready(Some(ev));
            }
            if st.senders == 0 {
                return Poll::Ready(None);
            }
            st.rx_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn try_recv(&self) -> Option<T> {
        let mut st = self.0.lock();
        let ev = st.buf.pop_front();
        let wakers = std::mem::take(&mut st.tx_wakers);
        drop(st);
        wakers.into_iter().for_each(Waker::wake);
        ev
    }

    fn drain(&self) -> Vec<T> {
        std::iter::from_fn(|| self.try_recv()).collect()
    }

    fn len(&self) -> usize {
        self.0.lock().buf.len()
    }

    /// Every sender is gone (the watch dropped its sink).
    fn is_closed(&self) -> bool {
        self.0.lock().senders == 0
    }

    /// Receives one event, failing after 10 s; `None` when the channel closed.
    async fn next(&self, rt: &SharedRuntime, what: &str) -> Option<T> {
        within(rt, Duration::from_secs(10), what, self.recv()).await
    }
}

impl<T> Drop for Rx<T> {
    fn drop(&mut self) {
        let wakers = {
            let mut st = self.0.lock();
            st.receiver_alive = false;
            st.buf.clear();
            std::mem::take(&mut st.tx_wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// A type whose fetch answers `value` at `index` at once, counting its calls.
fn at_once(opts: RegisterOptions, value: u64, index: u64) -> MockType<u64> {
    MockType::new(opts, move |_, _| async move {
        Ok(FetchResult::new(value, index))
    })
}

/// A type whose fetch answers at once: `value` at `index` while `failing` is false, else an
/// error.
fn toggled(opts: RegisterOptions, failing: &Arc<AtomicBool>, index: u64) -> MockType<u64> {
    let failing = failing.clone();
    MockType::new(opts, move |_, _| {
        let fail = failing.load(Ordering::SeqCst);
        async move {
            if fail {
                Err(MockError::new("down"))
            } else {
                Ok(FetchResult::new(7, index))
            }
        }
    })
}

/// A type whose fetch answers `value` at index 5 after `delay`.
fn slow(rt: &SharedRuntime, opts: RegisterOptions, delay: Duration) -> MockType<u64> {
    let rt = rt.clone();
    MockType::new(opts, move |_, _| {
        let rt = rt.clone();
        async move {
            sleep(&rt, delay).await;
            Ok(FetchResult::new(9, 5))
        }
    })
}

fn calls(c: &Arc<AtomicUsize>) -> usize {
    c.load(Ordering::SeqCst)
}

fn blocking() -> RegisterOptions {
    RegisterOptions::new().supports_blocking(true)
}

// ===== Get: timeouts and min index =====

/// Timeout 1 ns, 1 µs, zero ("no timeout") and huge on a blocked get; a timeout returns the
/// last value with no error by its deadline (contract: Get 5, Options 1).
pub(crate) async fn get_timeout_extremes(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 7u64, 3);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    typed.get(&MockRequest::new("k")).await.expect("first get");
    for tiny in [Duration::from_nanos(1), Duration::from_micros(1)] {
        let start = rt.now();
        let r = within(
            &rt,
            MARGIN,
            "a blocked get with a tiny timeout",
            typed.get(&MockRequest::new("k").min_index(3).timeout(tiny)),
        )
        .await
        .expect("a timeout is no error");
        assert_eq!((r.value, r.meta.index, r.meta.hit), (Some(7), 3, false));
        assert!(rt.now() - start < MARGIN);
    }
    // Zero means no timeout: the get waits for the change.
    server.set_after(Duration::from_millis(50), 8, 4);
    let r = within(
        &rt,
        MARGIN,
        "a blocked get with timeout zero",
        typed.get(&MockRequest::new("k").min_index(3).timeout(Duration::ZERO)),
    )
    .await
    .expect("get");
    assert_eq!(
        (r.value, r.meta.index),
        (Some(8), 4),
        "timeout zero timed out"
    );
    // Huge timeouts saturate (no panic) and mean no timeout.
    for (n, huge) in [Duration::MAX, Duration::from_secs(u64::MAX / 2)]
        .into_iter()
        .enumerate()
    {
        let next = 5 + n as u64;
        server.set_after(Duration::from_millis(30), next * 10, next);
        let r = within(
            &rt,
            MARGIN,
            "a blocked get with a huge timeout",
            typed.get(&MockRequest::new("k").min_index(next - 1).timeout(huge)),
        )
        .await
        .expect("get");
        assert_eq!(r.meta.index, next);
    }
    cache.close();
}

/// A get with a tiny timeout while a slow fetch is in flight returns at once with what there
/// is (nothing) and no error, and does not cancel the shared fetch (contract: Get 5).
pub(crate) async fn tiny_timeout_while_fetch_in_flight(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let ty = slow(&rt, RegisterOptions::new(), Duration::from_millis(300));
    let fetches = ty.calls();
    let typed = cache.register(ty);
    let waiter = {
        let typed = typed.clone();
        spawn(&rt, async move { typed.get(&MockRequest::new("k")).await })
    };
    eventually(&rt, "the fetch started", || calls(&fetches) == 1).await;
    for tiny in [Duration::from_nanos(1), Duration::from_micros(1)] {
        let start = rt.now();
        let r = typed
            .get(&MockRequest::new("k").timeout(tiny))
            .await
            .expect("a timeout is no error");
        assert_eq!(r.value, None);
        assert!(
            rt.now() - start < Duration::from_millis(250),
            "a {tiny:?} timeout waited {:?} for the fetch",
            rt.now() - start
        );
    }
    let r = within(&rt, MARGIN, "the first get", waiter)
        .await
        .unwrap()
        .expect("first get");
    assert_eq!(r.value, Some(9));
    assert_eq!(
        calls(&fetches),
        1,
        "the timed-out gets cancelled or repeated the fetch"
    );
    cache.close();
}

/// A blocking type whose server answers the same index at once (no long poll): a get at that
/// index, or at `u64::MAX`, returns at its timeout with the value and no error — not later,
/// and the runtime's other tasks keep running meanwhile (contract: Get 5, Refresh 6).
pub(crate) async fn blocking_same_index_at_once_returns_at_timeout(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let ty = at_once(blocking(), 1, 5);
    let fetches = ty.calls();
    let typed = cache.register(ty);
    typed.get(&MockRequest::new("k")).await.expect("first get");
    let ticker = Ticker::start(&rt);
    for min_index in [5, u64::MAX] {
        let timeout = Duration::from_millis(100);
        let before = calls(&fetches);
        let start = rt.now();
        let r = within(
            &rt,
            timeout + MARGIN,
            "a get whose blocking fetch answers the same index at once",
            typed.get(&MockRequest::new("k").min_index(min_index).timeout(timeout)),
        )
        .await
        .expect("a timeout is no error");
        let waited = rt.now() - start;
        assert_eq!((r.value, r.meta.index), (Some(1), 5));
        assert!(waited >= timeout, "returned early: {waited:?}");
        assert!(
            waited < timeout + MARGIN,
            "min_index {min_index}: returned {waited:?} after a {timeout:?} timeout"
        );
        eprintln!(
            "same index at once, min_index {min_index}: {} fetches in {waited:?}",
            calls(&fetches) - before
        );
        ticker
            .ran(&rt, "after a get looping on same-index answers")
            .await;
    }
    cache.close();
}

/// The same from many concurrent gets of one entry: all return by their timeout.
pub(crate) async fn concurrent_gets_same_index_at_once(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let typed = cache.register(at_once(blocking(), 1, 5));
    typed.get(&MockRequest::new("k")).await.expect("first get");
    let start = rt.now();
    let mut tasks = Vec::new();
    for n in 0..16u64 {
        let typed = typed.clone();
        tasks.push(spawn(&rt, async move {
            let t = Duration::from_millis(20 + 10 * (n % 4));
            typed
                .get(&MockRequest::new("k").min_index(5 + n % 2).timeout(t))
                .await
        }));
    }
    for task in tasks {
        let r = within(&rt, MARGIN, "concurrent blocked gets", task)
            .await
            .unwrap();
        assert_eq!(r.expect("no error").value, Some(1));
    }
    assert!(
        rt.now() - start < Duration::from_secs(2),
        "{:?}",
        rt.now() - start
    );
    cache.close();
}

/// A blocking type answering index 0 at once cannot spin a waiting get: attempts after the
/// first respect the backoff (contract: Get 4, Fetch 4).
pub(crate) async fn blocking_index_zero_at_once_respects_backoff(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let ty = at_once(blocking(), 1, 0);
    let fetches = ty.calls();
    let typed = cache.register(ty);
    let r = typed.get(&MockRequest::new("k")).await.expect("first get");
    assert_eq!(r.meta.index, 1, "index 0 is stored as 1");
    let before = calls(&fetches);
    let timeout = Duration::from_millis(500);
    let start = rt.now();
    let r = within(
        &rt,
        timeout + MARGIN,
        "a get on an index-0 server",
        typed.get(&MockRequest::new("k").min_index(1).timeout(timeout)),
    )
    .await
    .expect("no error");
    assert_eq!(r.value, Some(1));
    assert!(rt.now() - start < timeout + MARGIN);
    let n = calls(&fetches) - before;
    // Three free retries, then at least 2 s of backoff before each further one: a handful at
    // most (a loaded machine may have let seconds pass).
    let allowed = 6 + (rt.now() - start).as_secs() as usize / 2;
    assert!(
        n <= allowed,
        "{n} fetches in {timeout:?} against an index-0 server"
    );
    cache.close();
}

/// A prepopulated `u64::MAX` index, then a get at `u64::MAX`: the server's lower index is a
/// reset that wakes the get at once (contract: Fetch 5, Lifecycle 5).
pub(crate) async fn max_index_prepopulated_then_reset(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 5u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    typed
        .prepopulate(&RequestInfo::new("k"), 1, u64::MAX)
        .expect("prepopulate");
    let hit = typed
        .get(&MockRequest::new("k").min_index(u64::MAX - 1))
        .await
        .expect("get");
    assert!(hit.meta.hit);
    assert_eq!(hit.meta.index, u64::MAX);
    let start = rt.now();
    let r = within(
        &rt,
        MARGIN,
        "a get at u64::MAX",
        typed.get(
            &MockRequest::new("k")
                .min_index(u64::MAX)
                .timeout(Duration::from_secs(30)),
        ),
    )
    .await
    .expect("get");
    assert_eq!((r.value, r.meta.index), (Some(5), 5));
    assert!(rt.now() - start < MARGIN);
    cache.close();
}

// ===== Get: max_age, must_revalidate, stale_if_error =====

/// Zero, tiny and huge `max_age`, `must_revalidate` and `stale_if_error` on a fetch that
/// answers at once: each get makes at most one fetch and returns (contract: Get 2, 3, 6).
pub(crate) async fn revalidation_extremes_answering_at_once(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let ty = at_once(RegisterOptions::new(), 3, 4);
    let fetches = ty.calls();
    let typed = cache.register(ty);
    typed.get(&MockRequest::new("k")).await.expect("first get");
    let tiny = [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_micros(1),
    ];
    let mut requests = Vec::new();
    for d in tiny {
        requests.push(MockRequest::new("k").max_age(d));
        requests.push(MockRequest::new("k").max_age(d).must_revalidate());
        requests.push(MockRequest::new("k").max_age(d).stale_if_error(d));
        requests.push(
            MockRequest::new("k")
                .max_age(d)
                .stale_if_error(Duration::MAX),
        );
    }
    requests.push(MockRequest::new("k").must_revalidate());
    requests.push(
        MockRequest::new("k")
            .must_revalidate()
            .stale_if_error(Duration::ZERO),
    );
    for request in &requests {
        sleep(&rt, Duration::from_millis(1)).await;
        let before = calls(&fetches);
        let r = within(&rt, MARGIN, "a revalidating get", typed.get(request))
            .await
            .unwrap_or_else(|e| panic!("{request:?}: {e}"));
        assert!(!r.meta.hit, "{request:?} was a hit");
        assert_eq!(r.value, Some(3));
        assert_eq!(
            calls(&fetches) - before,
            1,
            "{request:?}: one fetch per get"
        );
    }
    for huge in [Duration::MAX, Duration::from_secs(u64::MAX)] {
        let before = calls(&fetches);
        let r = typed
            .get(&MockRequest::new("k").max_age(huge).stale_if_error(huge))
            .await
            .expect("get");
        assert!(r.meta.hit, "a huge max_age missed");
        assert_eq!(calls(&fetches), before);
    }
    cache.close();
}

/// The same on a fetch that fails at once: one attempt per get, then the error — or the
/// stale value when `stale_if_error` allows its age (contract: Get 4, 6).
pub(crate) async fn revalidation_extremes_failing_at_once(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let failing = Arc::new(AtomicBool::new(false));
    let ty = toggled(RegisterOptions::new(), &failing, 4);
    let fetches = ty.calls();
    let typed = cache.register(ty);
    typed.get(&MockRequest::new("k")).await.expect("first get");
    failing.store(true, Ordering::SeqCst);
    // Some real time, so that the value is surely older than 1 µs.
    sleep(&rt, Duration::from_millis(5)).await;
    let tiny = [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_micros(1),
    ];
    // (request, whether the stale value must be served)
    let mut requests = Vec::new();
    for d in tiny {
        requests.push((MockRequest::new("k").max_age(d), false));
        requests.push((MockRequest::new("k").max_age(d).must_revalidate(), false));
        requests.push((MockRequest::new("k").max_age(d).stale_if_error(d), false));
        requests.push((
            MockRequest::new("k")
                .max_age(d)
                .stale_if_error(Duration::MAX),
            true,
        ));
        requests.push((
            MockRequest::new("k")
                .max_age(d)
                .stale_if_error(Duration::from_secs(3600)),
            true,
        ));
    }
    requests.push((MockRequest::new("k").must_revalidate(), false));
    requests.push((
        MockRequest::new("k")
            .must_revalidate()
            .stale_if_error(Duration::MAX),
        true,
    ));
    for (request, stale) in &requests {
        let before = calls(&fetches);
        let start = rt.now();
        let out = within(
            &rt,
            MARGIN,
            "a get whose fetch fails",
            typed.get_outcome(request),
        )
        .await;
        assert!(
            rt.now() - start < Duration::from_secs(1),
            "{request:?}: took {:?} (spun on the error?)",
            rt.now() - start
        );
        let n = calls(&fetches) - before;
        assert_eq!(n, 1, "{request:?}: {n} fetch attempts for one get");
        assert_eq!(
            out.value,
            Some(7),
            "{request:?}: the last good value comes along"
        );
        assert!(!out.meta.hit);
        if *stale {
            assert!(
                out.error.is_none(),
                "{request:?}: stale_if_error did not serve"
            );
            assert!(
                out.meta.age >= Duration::from_millis(5),
                "{:?}",
                out.meta.age
            );
        } else {
            assert!(
                matches!(out.error, Some(GetError::Fetch(_))),
                "{request:?}: {:?}",
                out.error
            );
        }
    }
    // A huge max_age is a hit whatever the stored error.
    let r = typed
        .get(&MockRequest::new("k").max_age(Duration::MAX))
        .await
        .expect("a hit despite the stored error");
    assert!(r.meta.hit);
    cache.close();
}

/// A refresh type whose fetch answers at once ignores `max_age` and `must_revalidate`
/// (hits), and its back-to-back refreshes leave the runtime to other tasks (contract: Get 2,
/// Refresh 6).
pub(crate) async fn refresh_at_once_ignores_revalidation(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    for blocking in [false, true] {
        let opts = RegisterOptions::new()
            .refresh(true)
            .supports_blocking(blocking)
            .refresh_timer(Duration::ZERO);
        let ty = at_once(opts, 2, 6);
        let fetches = ty.calls();
        let typed = cache.register(ty);
        let ticker = Ticker::start(&rt);
        typed.get(&MockRequest::new("k")).await.expect("first get");
        let before = calls(&fetches);
        ticker.ran(&rt, "beside an at-once refresh").await;
        assert!(calls(&fetches) > before, "the refresh stopped");
        for request in [
            MockRequest::new("k").max_age(Duration::ZERO),
            MockRequest::new("k").max_age(Duration::from_nanos(1)),
            MockRequest::new("k").must_revalidate(),
        ] {
            let r = within(&rt, MARGIN, "a refresh-type get", typed.get(&request))
                .await
                .expect("get");
            assert!(r.meta.hit, "blocking {blocking}: {request:?} missed");
            assert_eq!(r.meta.age, Duration::ZERO);
        }
    }
    cache.close();
}

// ===== TTL =====

/// Entries with a 1 ns / 1 µs TTL hit in a tight loop: no panic, a bounded number of
/// fetches, and they expire once unread (contract: Lifecycle 1, Options 1).
pub(crate) async fn tiny_ttl_tight_loop(rt: SharedRuntime) {
    for ttl in [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_micros(1),
    ] {
        let cache = Cache::new(rt.clone());
        let ty = at_once(RegisterOptions::new().last_get_ttl(ttl), 1, 2);
        let fetches = ty.calls();
        let typed = cache.register(ty);
        let gets = 2_000;
        for n in 0..gets {
            let key = if n % 3 == 0 { "a" } else { "b" };
            let r = typed.get(&MockRequest::new(key)).await.expect("get");
            assert_eq!(r.value, Some(1));
            if n % 16 == 0 {
                yield_now().await;
            }
        }
        assert!(
            calls(&fetches) <= gets,
            "ttl {ttl:?}: {} fetches for {gets} gets",
            calls(&fetches)
        );
        eventually(&rt, "the tiny-TTL entries expired", || cache.is_empty()).await;
        assert!(cache.metrics().total().expirations >= 2);
        cache.close();
    }
}

/// A blocked get on an entry whose TTL (1 µs, or 50 ms) is shorter than its wait returns at
/// its timeout, and the entry does not expire under it meanwhile (contract: Get 8, a wait is
/// a read). Found here: expiry, unlike capacity eviction, ignored waiting gets, which dropped
/// the open blocking query; the woken get created the entry again, fetched at index 0 and
/// blocked again, so one blocked get hammered the upstream (47–67 reads in 300 ms at 1 µs).
pub(crate) async fn tiny_ttl_blocked_get(rt: SharedRuntime) {
    let mut report = Vec::new();
    for ttl in [Duration::from_micros(1), Duration::from_millis(50)] {
        let cache = Cache::new(rt.clone());
        let server = MockServer::new(rt.clone(), 7u64, 3);
        let typed = cache.register(server.blocking_type(RegisterOptions::new().last_get_ttl(ttl)));
        typed.get(&MockRequest::new("k")).await.expect("first get");
        let reads = server.reads();
        let timeout = Duration::from_millis(300);
        let start = rt.now();
        let r = within(
            &rt,
            timeout + MARGIN,
            "a blocked get on a tiny-TTL entry",
            typed.get(&MockRequest::new("k").min_index(3).timeout(timeout)),
        )
        .await
        .expect("no error");
        let waited = rt.now() - start;
        assert!(waited < timeout + MARGIN, "{waited:?}");
        assert_eq!(r.meta.index, 3);
        report.push((
            ttl,
            server.reads() - reads,
            cache.metrics().total().expirations,
        ));
        cache.close();
    }
    assert!(
        report.iter().all(|&(_, reads, _)| reads <= 2),
        "upstream reads during one 300 ms blocked get, per TTL (ttl, reads, expirations): \
         {report:?}"
    );
}

// ===== Watches =====

/// A polled watch with a 1 ns max_age (sink form): delivers, sees a change, never starves
/// the runtime, and ends at once when its handle is dropped (contract: Watch 4, 8).
pub(crate) async fn polled_watch_tiny_max_age_sink(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let ty = server.polling_type(RegisterOptions::new());
    let typed = cache.register(ty);
    let ticker = Ticker::start(&rt);
    let (tx, rx) = channel::<Event>(4);
    let watch = typed
        .notify(
            MockRequest::new("k").max_age(Duration::from_nanos(1)),
            "k",
            tx,
        )
        .expect("notify");
    let first = rx.next(&rt, "the first event").await.expect("an event");
    assert_eq!((first.result, first.meta.index), (Some(1), 3));
    ticker.ran(&rt, "beside a 1 ns polled watch").await;
    server.set(2, 4);
    let mut last = first;
    while last.result != Some(2) {
        last = rx.next(&rt, "the change").await.expect("an event");
    }
    assert_eq!(last.meta.index, 4);
    ticker.ran(&rt, "after the change").await;
    drop(watch);
    assert!(rx.is_closed(), "the sink outlived its dropped handle");
    let reads = server.reads();
    sleep(&rt, Duration::from_millis(30)).await;
    assert!(
        server.reads() <= reads + 1,
        "polling went on after the handle was dropped"
    );
    assert_eq!(cache.metrics().total().watches, 0);
    // And one ended by close.
    let (tx, rx) = channel::<Event>(4);
    let watch = typed
        .notify(
            MockRequest::new("k").max_age(Duration::from_nanos(1)),
            "k",
            tx,
        )
        .expect("notify");
    rx.next(&rt, "the first event").await.expect("an event");
    cache.close();
    assert!(rx.is_closed(), "close left the watch's sink open");
    assert!(!watch.is_active());
    let reads = server.reads();
    sleep(&rt, Duration::from_millis(30)).await;
    assert!(server.reads() <= reads + 1, "polling went on after close");
}

/// The `Stream` form of a 1 ns polled watch: it polls without starving the runtime, and
/// dropping it (or close) ends the polling (contract: Watch 7, 8). The stream is not read: an
/// unread stream must poll on regardless.
pub(crate) async fn polled_watch_tiny_max_age_stream(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    let ticker = Ticker::start(&rt);
    let stream = typed
        .watch(MockRequest::new("k").max_age(Duration::from_nanos(1)))
        .expect("watch");
    let reads = server.reads();
    eventually(&rt, "the stream's watch polls", || {
        server.reads() >= reads + 3
    })
    .await;
    ticker.ran(&rt, "beside a 1 ns polled stream").await;
    assert_eq!(cache.metrics().total().watches, 1);
    drop(stream);
    assert_eq!(cache.metrics().total().watches, 0);
    let reads = server.reads();
    sleep(&rt, Duration::from_millis(30)).await;
    assert!(
        server.reads() <= reads + 1,
        "polling went on after the stream was dropped"
    );
    let _stream = typed
        .watch(MockRequest::new("k").max_age(Duration::from_nanos(1)))
        .expect("watch");
    sleep(&rt, Duration::from_millis(10)).await;
    cache.close();
    assert_eq!(cache.metrics().total().watches, 0);
    let reads = server.reads();
    sleep(&rt, Duration::from_millis(30)).await;
    assert!(server.reads() <= reads + 1, "polling went on after close");
    assert!(matches!(
        typed.watch(MockRequest::new("k").max_age(Duration::from_nanos(1))),
        Err(WatchError::Closed)
    ));
}

/// A blocking watch whose fetch fails at once for ever: errors before the first value are
/// delivered, backoff bounds the fetches, the runtime is not starved, a slow consumer
/// (bounded(1), unread) holds at most its one event, and close ends it (contract: Watch 3, 7,
/// 8; Backoff 2).
pub(crate) async fn blocking_watch_failing_forever(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let failing = Arc::new(AtomicBool::new(true));
    let ty = toggled(blocking(), &failing, 3);
    let fetches = ty.calls();
    let typed = cache.register(ty);
    let ticker = Ticker::start(&rt);
    let (tx, rx) = channel::<Event>(8);
    let (slow_tx, slow_rx) = channel::<Event>(1);
    let _watch = typed
        .notify(MockRequest::new("k"), "k", tx)
        .expect("notify");
    let _slow = typed
        .notify(MockRequest::new("k"), "slow", slow_tx)
        .expect("notify");
    let started = rt.now();
    let first = rx.next(&rt, "the first error").await.expect("an event");
    assert!(first.error.is_some() && first.result.is_none());
    ticker.ran(&rt, "beside a watch failing at once").await;
    sleep(&rt, Duration::from_millis(300)).await;
    let n = calls(&fetches);
    // The first attempt and 3 free retries, then at least 2 s of backoff before each further
    // one (a loaded machine may have let seconds pass).
    let allowed = 5 + (rt.now() - started).as_secs() as usize / 2;
    assert!(n <= allowed, "{n} fetches in 300 ms of failures");
    assert!(slow_rx.len() <= 1);
    let events = 1 + rx.drain().len();
    assert!(events <= n, "{events} events for {n} fetches");
    cache.close();
    assert!(rx.is_closed(), "close left the watch open");
    assert!(slow_rx.is_closed(), "close left the slow watch open");
    sleep(&rt, Duration::from_millis(20)).await;
    assert!(calls(&fetches) <= n + 1, "fetching went on after close");
}

/// `retry_now` during a watch's backoff fetches at once, and the recovered value is
/// delivered long before the backoff would have ended (contract: Backoff 5).
pub(crate) async fn retry_now_during_backoff(rt: SharedRuntime) {
    let cache = Cache::builder(rt.clone())
        .backoff(BackoffPolicy::new().with_unit(Duration::from_secs(20)))
        .build();
    let failing = Arc::new(AtomicBool::new(true));
    let ty = toggled(blocking(), &failing, 3);
    let fetches = ty.calls();
    let typed = cache.register(ty);
    let (tx, rx) = channel::<Event>(64);
    let _watch = typed
        .notify(MockRequest::new("k"), "k", tx)
        .expect("notify");
    eventually(&rt, "the free retries ran", || calls(&fetches) >= 4).await;
    sleep(&rt, Duration::from_millis(20)).await;
    let n = calls(&fetches);
    assert_eq!(n, 4, "backoff of 40 s+ did not hold");
    assert_eq!(typed.retry_now(), 1);
    eventually(&rt, "retry_now fetched", || calls(&fetches) > n).await;
    // Again, now with the upstream back.
    failing.store(false, Ordering::SeqCst);
    eventually(&rt, "the failed retry is back in backoff", || {
        cache.retry_now() == 1
    })
    .await;
    let start = rt.now();
    loop {
        let ev = rx.next(&rt, "the recovered value").await.expect("an event");
        if ev.error.is_none() {
            assert_eq!((ev.result, ev.meta.index), (Some(7), 3));
            break;
        }
    }
    assert!(rt.now() - start < Duration::from_secs(5));
    // Nothing is in backoff any more.
    assert_eq!(cache.retry_now(), 0);
    cache.close();
}

/// A watched blocking type whose "server" answers at once with a new index every time (a
/// hot stream of changes) and a consumer that does not read: bounded memory (its channel
/// holds its capacity, nothing more), the runtime runs, and when drained it catches up and
/// goes on (contract: Watch 7, Refresh 6).
pub(crate) async fn slow_consumer_of_a_hot_stream(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let index = Arc::new(AtomicU64::new(1));
    let i = index.clone();
    let ty = MockType::new(blocking(), move |_, _| {
        let n = i.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok(FetchResult::new(n, n)) }
    });
    let typed = cache.register(ty);
    let ticker = Ticker::start(&rt);
    let (tx, rx) = channel::<Event>(1);
    let _watch = typed
        .notify(MockRequest::new("k"), "k", tx)
        .expect("notify");
    eventually(&rt, "the hot stream ran", || {
        index.load(Ordering::SeqCst) > 200
    })
    .await;
    ticker.ran(&rt, "beside a hot stream").await;
    assert!(rx.len() <= 1);
    // Drain for a while: events keep coming, with rising indexes.
    let mut last = 0;
    for _ in 0..20 {
        let ev = rx
            .next(&rt, "an event of the hot stream")
            .await
            .expect("an event");
        assert!(ev.meta.index > last, "{} after {last}", ev.meta.index);
        last = ev.meta.index;
    }
    cache.close();
    assert!(
        within(&rt, MARGIN, "the close", async {
            while rx.recv().await.is_some() {}
            true
        })
        .await
    );
}

/// A watch whose receiver is dropped while its flush task waits for room ends, and its
/// entry's chain stops (contract: Watch 8).
pub(crate) async fn receiver_dropped_while_flush_waits(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 0u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let (tx, rx) = channel::<Event>(1);
    let watch = typed
        .notify(MockRequest::new("k"), "k", tx)
        .expect("notify");
    eventually(&rt, "the first event is buffered", || rx.len() == 1).await;
    for v in 1..=3 {
        let reads = server.reads();
        server.set(v, v + 1);
        eventually(&rt, "the change was fetched", || server.reads() > reads).await;
    }
    drop(rx);
    within(&rt, MARGIN, "the watch ends", watch.ended()).await;
    eventually(&rt, "no watch is counted", || {
        cache.metrics().total().watches == 0
    })
    .await;
    cache.close();
}

/// `notify_until` with a timer as its cancel signal ends by itself.
pub(crate) async fn notify_until_timer_ends(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    let (tx, rx) = channel::<Event>(4);
    typed
        .notify_until(
            MockRequest::new("k").max_age(Duration::from_nanos(1)),
            "k",
            tx,
            Sleep::after(&*rt, Duration::from_millis(50)),
        )
        .expect("notify_until");
    rx.next(&rt, "the first event").await.expect("an event");
    within(&rt, MARGIN, "the watch ends at its signal", async {
        while rx.recv().await.is_some() {}
    })
    .await;
    assert_eq!(cache.metrics().total().watches, 0);
    cache.close();
}

// ===== Capacity =====

/// A capacity bound of 1 or 2 with many concurrent gets of different keys: no livelock,
/// every get answers, and the bound holds once nothing is held (contract: Lifecycle 4).
pub(crate) async fn capacity_tiny_bound_concurrent_gets(rt: SharedRuntime) {
    for bound in [1, 2] {
        let cache = Cache::builder(rt.clone()).max_entries(bound).build();
        let delay = Duration::from_millis(1);
        let fetch_rt = rt.clone();
        let ty = MockType::new(RegisterOptions::new(), move |_, req: MockRequest| {
            let v = req.key().len() as u64;
            let rt = fetch_rt.clone();
            async move {
                sleep(&rt, delay).await;
                Ok(FetchResult::new(v, 1))
            }
        });
        let fetches = ty.calls();
        let typed = cache.register(ty);
        let mut tasks = Vec::new();
        for t in 0..32 {
            let typed = typed.clone();
            tasks.push(spawn(&rt, async move {
                for round in 0..10 {
                    let key = "x".repeat(1 + (t * 7 + round) % 13);
                    let r = typed.get(&MockRequest::new(&key)).await.expect("get");
                    assert_eq!(r.value, Some(key.len() as u64));
                }
            }));
        }
        for task in tasks {
            within(
                &rt,
                Duration::from_secs(20),
                "gets under a tiny bound",
                task,
            )
            .await
            .unwrap();
        }
        eprintln!(
            "capacity {bound}: {} fetches for 320 gets, {} entries after",
            calls(&fetches),
            cache.len()
        );
        // One more insert, with nothing held any more, brings the count back to the bound.
        typed.get(&MockRequest::new("last")).await.expect("get");
        assert!(
            cache.len() <= bound,
            "bound {bound}: {} entries after an insert with nothing held",
            cache.len()
        );
        cache.close();
    }
}

/// Many concurrent gets of distinct keys under `max_entries(1)`: each waited-on entry is
/// kept while its get waits (Lifecycle 4), and once every get has answered the count is back
/// at the bound. Found here: nothing brought it back until the next insert (16 entries 200 ms
/// after the last get answered), for ever if none came.
pub(crate) async fn capacity_bound_restored_once_nothing_is_held(rt: SharedRuntime) {
    let cache = Cache::builder(rt.clone()).max_entries(1).build();
    let typed = cache.register(slow(&rt, RegisterOptions::new(), Duration::from_millis(20)));
    let mut tasks = Vec::new();
    for n in 0..16 {
        let typed = typed.clone();
        tasks.push(spawn(&rt, async move {
            typed.get(&MockRequest::new(&format!("k{n}"))).await
        }));
    }
    for task in tasks {
        within(&rt, MARGIN, "a get", task)
            .await
            .unwrap()
            .expect("get");
    }
    assert_eq!(cache.metrics().total().watches, 0);
    sleep(&rt, Duration::from_millis(200)).await;
    assert!(
        cache.len() <= 1,
        "max_entries 1: {} entries 200 ms after the last of 16 concurrent gets answered \
         (nothing watched or waited on)",
        cache.len()
    );
    cache.close();
}

/// The same with blocked gets (held entries) and failing keys: the count may exceed the
/// bound only while more entries than it are waited on.
pub(crate) async fn capacity_bound_with_failing_keys(rt: SharedRuntime) {
    let cache = Cache::builder(rt.clone()).max_entries(2).build();
    let failing = Arc::new(AtomicBool::new(true));
    let typed = cache.register(toggled(RegisterOptions::new(), &failing, 1));
    for n in 0..200 {
        let key = format!("k{n}");
        let out = typed.get_outcome(&MockRequest::new(&key)).await;
        assert!(out.error.is_some());
        assert!(
            cache.len() <= 2,
            "{} entries after {n} failing keys",
            cache.len()
        );
        if n % 16 == 0 {
            yield_now().await;
        }
    }
    cache.close();
}

// ===== Cancellation =====

/// Many get futures dropped mid-flight (same key and different keys), then close: the shared
/// fetches are not cancelled, later gets join or hit them, nothing hangs, and after close a get
/// that would start a fetch answers `Closed` at once (contract: Get 5, 9; Fetch 8).
pub(crate) async fn cancellation_storm_then_close(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let ty = slow(&rt, RegisterOptions::new(), Duration::from_millis(100));
    let fetches = ty.calls();
    let typed = cache.register(ty);
    let mut tasks = Vec::new();
    for n in 0..300 {
        let typed = typed.clone();
        let key = if n % 3 == 0 {
            "same".to_owned()
        } else {
            format!("k{}", n % 20)
        };
        tasks.push(spawn(&rt, async move {
            let _ = typed.get(&MockRequest::new(&key)).await;
        }));
    }
    // Also futures dropped by a timeout.
    for n in 0..100 {
        let key = format!("k{}", n % 20);
        let _ = timeout(
            &rt,
            Duration::from_micros(50),
            typed.get(&MockRequest::new(&key)),
        )
        .await;
    }
    sleep(&rt, Duration::from_millis(10)).await;
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    // 21 keys: one fetch each, not cancelled by the dropped gets.
    let r = within(
        &rt,
        MARGIN,
        "a get after the storm",
        typed.get(&MockRequest::new("same")),
    )
    .await
    .expect("get");
    assert_eq!(r.value, Some(9));
    assert_eq!(
        calls(&fetches),
        21,
        "dropped gets cancelled or repeated shared fetches"
    );
    eventually(&rt, "every storm key was fetched", || {
        typed.cache().metrics().total().fetch_success == 21
    })
    .await;
    cache.close();
    let start = rt.now();
    let out = typed.get_outcome(&MockRequest::new("never")).await;
    assert!(
        matches!(out.error, Some(GetError::Closed)),
        "{:?}",
        out.error
    );
    // At once, not at a timeout (the get sets none: it would wait for ever).
    assert!(rt.now() - start < MARGIN);
    let r = typed
        .get(&MockRequest::new("k3"))
        .await
        .expect("a hit after close");
    assert!(r.meta.hit);
}

/// Registering the same type again while gets wait on its entries: they answer `Replaced`
/// promptly; the new registration works (contract: Lifecycle 7).
pub(crate) async fn reregister_while_gets_in_flight(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let old = cache.register(server.blocking_type(RegisterOptions::new()));
    for n in 0..4 {
        old.get(&MockRequest::new(&format!("k{n}")))
            .await
            .expect("get");
    }
    let mut tasks = Vec::new();
    for n in 0..40 {
        let old = old.clone();
        tasks.push(spawn(&rt, async move {
            old.get(
                &MockRequest::new(&format!("k{}", n % 5))
                    .min_index(3)
                    .timeout(Duration::from_secs(30)),
            )
            .await
        }));
    }
    eventually(&rt, "the blocked reads are open", || server.reads() >= 9).await;
    let new = cache.register(server.blocking_type(RegisterOptions::new()));
    for task in tasks {
        let r = within(&rt, MARGIN, "a get of a replaced registration", task)
            .await
            .unwrap();
        assert!(matches!(r, Err(GetError::Replaced(_))), "{r:?}");
    }
    assert!(matches!(
        old.get(&MockRequest::new("k0")).await,
        Err(GetError::Replaced(_))
    ));
    let r = new
        .get(&MockRequest::new("k0"))
        .await
        .expect("new registration");
    assert!(!r.meta.hit);
    assert_eq!(cache.len(), 1);
    cache.close();
}

/// A registration replaced in a loop while gets churn on it from several tasks: nothing
/// hangs or panics, every get answers a value, `Replaced` or `Closed`.
pub(crate) async fn reregister_churn(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let cache = cache.clone();
        let stop = stop.clone();
        tasks.push(spawn(&rt, async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let Some(typed) = cache.typed::<MockType<u64>>() else {
                    yield_now().await;
                    continue;
                };
                let key = format!("k{}", (n + t) % 8);
                match typed.get(&MockRequest::new(&key)).await {
                    Ok(r) => assert_eq!(r.value, Some(9)),
                    Err(GetError::Replaced(_) | GetError::Closed) => {}
                    Err(e) => panic!("{e}"),
                }
                n += 1;
                yield_now().await;
            }
        }));
    }
    for _ in 0..50 {
        cache.register(slow(
            &rt,
            RegisterOptions::new(),
            Duration::from_micros(200),
        ));
        sleep(&rt, Duration::from_millis(1)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        within(&rt, MARGIN, "a churning get task", task)
            .await
            .unwrap();
    }
    assert!(cache.len() <= 8);
    cache.close();
}

// ===== Threads =====

/// Many OS threads hammer get / prepopulate / notify (each get blocked on from its thread with
/// `futures`' executor, the cache's tasks on the runtime) while one closes the cache midway:
/// no deadlock, no panic; once close has returned no watch is open (contract: Lifecycle 6).
pub(crate) async fn threads_hammer_get_prepopulate_close(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let typed = cache.register(slow(&rt, blocking(), Duration::from_micros(100)));
    let closed = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..4 {
        let typed = typed.clone();
        let closed = closed.clone();
        threads.push(std::thread::spawn(move || {
            let mut watches = Vec::new();
            for n in 0..300u64 {
                let key = format!("k{}", (n + t) % 10);
                match n % 4 {
                    0 => {
                        let _ = typed.prepopulate(&RequestInfo::new(key.as_str()), n, n + 1);
                    }
                    1 => {
                        let (tx, rx) = channel::<Event>(2);
                        match typed.notify(MockRequest::new(&key), "w", tx) {
                            Ok(w) => watches.push((w, rx)),
                            Err(WatchError::Closed) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    _ => {
                        let req = MockRequest::new(&key).timeout(Duration::from_millis(20));
                        let out = futures::executor::block_on(typed.get_outcome(&req));
                        match out.error {
                            None | Some(GetError::Closed) => {}
                            Some(e) => panic!("{e}"),
                        }
                    }
                }
                if n % 50 == 0 && watches.len() > 4 {
                    watches.clear();
                }
            }
            // A watch whose notify raced with close: closed once close has returned.
            if closed.load(Ordering::SeqCst) {
                for (w, rx) in &watches {
                    assert!(!w.is_active(), "a watch outlived close");
                    assert!(rx.is_closed(), "a watch's sink outlived close");
                }
            }
            watches.len()
        }));
    }
    let closer = {
        let cache = cache.clone();
        let closed = closed.clone();
        std::thread::spawn(move || {
            for _ in 0..2_000 {
                std::hint::spin_loop();
            }
            cache.close();
            closed.store(true, Ordering::SeqCst);
            cache.close();
        })
    };
    // Joined from a thread of its own, so that the runtime's threads stay free.
    let (done, joined) = oneshot::channel();
    std::thread::spawn(move || {
        let joined = std::panic::catch_unwind(AssertUnwindSafe(|| {
            closer.join().expect("the closer panicked");
            threads
                .into_iter()
                .map(|t| t.join().expect("a hammering thread panicked"))
                .sum::<usize>()
        }));
        let _ = done.send(joined);
    });
    if let Err(panic) = within(
        &rt,
        Duration::from_secs(30),
        "the hammering threads",
        joined,
    )
    .await
    .expect("the joining thread vanished")
    {
        std::panic::resume_unwind(panic);
    }
    assert!(cache.is_closed());
    assert_eq!(
        cache.metrics().total().watches,
        0,
        "watches left after close"
    );
    assert!(matches!(
        typed.notify(MockRequest::new("k"), "late", channel::<Event>(1).0),
        Err(WatchError::Closed)
    ));
}

/// `prepopulate` with extreme indexes (0, `u64::MAX`) and an empty key.
pub(crate) async fn prepopulate_extremes(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 5u64, 5);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    assert_eq!(
        typed.prepopulate(&RequestInfo::new(""), 1, 1),
        Err(CacheError::EmptyKey)
    );
    typed.prepopulate(&RequestInfo::new("k"), 1, 0).unwrap();
    let r = typed.get(&MockRequest::new("k")).await.unwrap();
    assert_eq!(
        (r.meta.index, r.meta.hit),
        (1, true),
        "index 0 is stored as 1"
    );
    // A watch then sees a jump to u64::MAX, and a reset back down.
    let (tx, rx) = channel::<Event>(8);
    let _w = typed.notify(MockRequest::new("k"), "k", tx).unwrap();
    let mut seen = Vec::new();
    seen.push(rx.next(&rt, "the current value").await.unwrap().meta.index);
    typed
        .prepopulate(&RequestInfo::new("k"), 2, u64::MAX)
        .unwrap();
    loop {
        let i = rx.next(&rt, "the max index").await.unwrap().meta.index;
        seen.push(i);
        if i == u64::MAX {
            break;
        }
    }
    typed.prepopulate(&RequestInfo::new("k"), 3, 2).unwrap();
    loop {
        let ev = rx.next(&rt, "the reset").await.unwrap();
        seen.push(ev.meta.index);
        if ev.meta.index < u64::MAX {
            break;
        }
    }
    assert!(seen.contains(&u64::MAX), "{seen:?}");
    cache.close();
}

// ===== Options at their extremes =====

/// Rate limits at their extremes: refused when invalid; a rate so low its wait cannot be
/// represented holds the entry's next fetch until the limit is reloaded — a get returns at
/// its timeout meanwhile — and the reload applies to that waiting fetch at once (contract:
/// Options 2, 4).
pub(crate) async fn rate_limit_extremes(rt: SharedRuntime) {
    for (rate, burst) in [
        (0.0, 1),
        (-1.0, 1),
        (f64::NAN, 1),
        (f64::INFINITY, 1),
        (1.0, 0),
    ] {
        assert!(
            matches!(
                RateLimit::new(rate, burst),
                Err(CacheError::InvalidRateLimit(_))
            ),
            "{rate} {burst}"
        );
    }
    let tiny = RateLimit::new(f64::MIN_POSITIVE, 1).unwrap();
    let cache = Cache::builder(rt.clone()).rate_limit(tiny).build();
    let ty = at_once(RegisterOptions::new(), 4, 4);
    let fetches = ty.calls();
    let typed = cache.register(ty);
    typed
        .get(&MockRequest::new("k"))
        .await
        .expect("the burst's token");
    let timeout = Duration::from_millis(100);
    let start = rt.now();
    let r = within(
        &rt,
        timeout + MARGIN,
        "a get whose fetch waits for a token for ever",
        typed.get(
            &MockRequest::new("k")
                .max_age(Duration::ZERO)
                .timeout(timeout),
        ),
    )
    .await
    .expect("a timeout is no error");
    assert_eq!(r.value, Some(4));
    assert!(rt.now() - start < timeout + MARGIN);
    assert_eq!(calls(&fetches), 1);
    // The reload frees the waiting fetch.
    cache.set_rate_limit(RateLimit::new(f64::MAX, u32::MAX).unwrap());
    eventually(&rt, "the reloaded limit let the fetch go", || {
        calls(&fetches) == 2
    })
    .await;
    for _ in 0..20 {
        within(
            &rt,
            MARGIN,
            "a get under a huge rate",
            typed.get(&MockRequest::new("k").max_age(Duration::ZERO)),
        )
        .await
        .expect("get");
    }
    cache.close();
}

/// Per-type durations at their extremes: `refresh_timer`, `query_timeout` and
/// `last_get_ttl` of `Duration::MAX` and a `refresh_give_up` of 1 ns, on fetches that answer
/// or fail at once: no panic, no spin, the runtime runs, close ends everything (contract:
/// Options 1, Refresh 3).
pub(crate) async fn option_extremes(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let ticker = Ticker::start(&rt);
    let opts = RegisterOptions::new()
        .refresh(true)
        .supports_blocking(true)
        .refresh_timer(Duration::MAX)
        .query_timeout(Duration::MAX)
        .last_get_ttl(Duration::MAX);
    let ty = at_once(opts, 1, 3);
    let fetches = ty.calls();
    let typed = cache.register(ty);
    typed.get(&MockRequest::new("k")).await.expect("get");
    sleep(&rt, Duration::from_millis(20)).await;
    assert_eq!(
        calls(&fetches),
        1,
        "a refresh_timer of Duration::MAX refreshed"
    );
    assert!(typed.get(&MockRequest::new("k")).await.unwrap().meta.hit);
    // A refresh that fails at once and gives up after 1 ns.
    let failing = Arc::new(AtomicBool::new(false));
    let opts = RegisterOptions::new()
        .refresh(true)
        .supports_blocking(true)
        .query_timeout(Duration::MAX)
        .refresh_give_up(Duration::from_nanos(1));
    let ty = toggled(opts, &failing, 3);
    let gave_up = ty.calls();
    let typed2 = cache.register(ty);
    typed2.get(&MockRequest::new("k")).await.expect("get");
    failing.store(true, Ordering::SeqCst);
    // The refresh now fails; with a 1 ns give-up it stops after at most a few failures.
    eventually(&rt, "the refresh failed", || {
        typed2.cache().metrics().total().fetch_errors >= 1
    })
    .await;
    let n = calls(&gave_up);
    sleep(&rt, Duration::from_millis(50)).await;
    assert!(calls(&gave_up) <= n + 1, "the refresh did not give up");
    let r = typed2
        .get(&MockRequest::new("k"))
        .await
        .expect("the last value");
    assert_eq!(r.value, Some(7));
    ticker.ran(&rt, "beside extreme options").await;
    cache.close();
}

/// A polled watch whose `max_age` is huge: the current value at once, then no polling, no
/// panic; ended by its handle (contract: Options 1, Watch 4).
pub(crate) async fn polled_watch_huge_max_age(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt.clone(), 1u64, 3);
    let typed = cache.register(server.polling_type(RegisterOptions::new()));
    for max_age in [Duration::MAX, Duration::from_secs(u64::MAX / 3)] {
        let (tx, rx) = channel::<Event>(4);
        let watch = typed
            .notify(MockRequest::new("k").max_age(max_age), "k", tx)
            .expect("notify");
        let ev = rx.next(&rt, "the current value").await.expect("an event");
        assert_eq!(ev.result, Some(1));
        let reads = server.reads();
        sleep(&rt, Duration::from_millis(20)).await;
        assert!(server.reads() <= reads, "a huge max_age polled");
        drop(watch);
        assert!(rx.is_closed());
    }
    cache.close();
}

/// A fetch that panics at once: gets answer `Panicked` after one attempt, a watch delivers
/// the error and backs off, and the entry works again once the fetch does (contract: Fetch 9).
pub(crate) async fn panicking_fetch_at_once(rt: SharedRuntime) {
    let cache = Cache::new(rt.clone());
    let panicking = Arc::new(AtomicBool::new(true));
    let p = panicking.clone();
    let ty = MockType::new(blocking(), move |_, _| {
        let panic = p.load(Ordering::SeqCst);
        async move {
            assert!(!panic, "upstream exploded");
            Ok(FetchResult::new(2u64, 2))
        }
    });
    let fetches = ty.calls();
    let typed = cache.register(ty);
    let start = rt.now();
    let r = typed
        .get(&MockRequest::new("k").timeout(Duration::from_secs(30)))
        .await;
    assert!(matches!(r, Err(GetError::Panicked(_))), "{r:?}");
    // After the one attempt, not at the 30 s timeout.
    assert!(rt.now() - start < MARGIN);
    assert_eq!(calls(&fetches), 1);
    let (tx, rx) = channel::<Event>(8);
    let _watch = typed
        .notify(MockRequest::new("w"), "w", tx)
        .expect("notify");
    let ev = rx
        .next(&rt, "the panic as an event")
        .await
        .expect("an event");
    assert!(matches!(ev.error, Some(GetError::Panicked(_))));
    sleep(&rt, Duration::from_millis(100)).await;
    assert!(
        calls(&fetches) <= 6,
        "{} fetches: no backoff on panics",
        calls(&fetches)
    );
    panicking.store(false, Ordering::SeqCst);
    let r = typed
        .get(&MockRequest::new("k"))
        .await
        .expect("works again");
    assert_eq!(r.value, Some(2));
    cache.close();
}
