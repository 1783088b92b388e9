//! Adversarial probes of the user's own code that the engine calls (the type's callbacks, the
//! request, the value, the opaque fetch state, watch sinks) and of user-implemented runtimes
//! that misbehave (clocks, jitter, timers, spawn).
//!
//! Everything runs on the virtual-time runtime, wrapped in [`Adv`]: a `Runtime` that behaves
//! like a real adapter in one respect the bare simulation does not (a panicking spawned task
//! dies alone and is counted, as on tokio, instead of unwinding out of `block_on`), and that
//! can be told to misbehave. Each simulation runs on a thread of its own under a wall-clock
//! bound, so a hang or a spin fails the test instead of holding CI.
//!
//! Nine cases failed before their fixes (a fetch panicking before it returns its future, on
//! the chain and on a pass-through; a fetch state's `Drop` panicking on replacement, expiry,
//! capacity eviction and re-registration; a NaN jitter in backoff and in a polled watch; a
//! clock near the end of `Instant` in the watch sweeper); later, a chain task its runtime drops
//! unrun or a `Value::clone` panic unwinds (the entry stayed "fetching" for ever), and timers
//! that fire early (a spin until `now()` reached the deadline).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cache_core::runtime::{BoxFuture, Sleep, Timer};
use cache_core::sim::SimRuntime;
use cache_core::testing::{MockError, MockRequest, MockType};
use cache_core::{
    Cache, CacheRequest, CacheType, CoarseClock, Connected, FetchOptions, FetchResult, GetError,
    RateLimit, RegisterOptions, RequestInfo, Runtime,
};
use futures::FutureExt;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// ===== harness =====

/// Runs `f` on its own thread; fails if it panics or is still running after `limit` of real
/// time (a livelocked or spinning simulation never returns).
fn bounded<R: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the simulation panicked"),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after {limit:?} of real time (hang or spin)")
        }
    }
}

const LIMIT: Duration = Duration::from_secs(8);

/// A runtime on the simulation's clock that can be made to misbehave.
#[derive(Debug, Clone)]
struct Adv(Arc<AdvState>);

impl std::ops::Deref for Adv {
    type Target = AdvState;
    fn deref(&self) -> &AdvState {
        &self.0
    }
}

#[derive(Debug)]
struct AdvState {
    sim: SimRuntime,
    /// Panics of spawned tasks (each caught, so the task dies alone, as on tokio).
    task_panics: AtomicUsize,
    /// Spawned futures are dropped without being run (a runtime shutting down).
    drop_spawns: AtomicBool,
    spawns_dropped: AtomicUsize,
    /// `jitter()` answers this instead of a number in [0, 1).
    jitter: Mutex<Option<f64>>,
    /// Timers fire this much before their deadline (by `now()`).
    early: Mutex<Duration>,
    /// Timers fire this much after their deadline.
    late: Mutex<Duration>,
    coarse: Option<CoarseClock>,
}

impl Adv {
    fn new(seed: u64) -> Self {
        Self::with_coarse(seed, None)
    }

    fn with_coarse(seed: u64, coarse: Option<CoarseClock>) -> Self {
        Adv(Arc::new(AdvState {
            sim: SimRuntime::new(seed),
            task_panics: AtomicUsize::new(0),
            drop_spawns: AtomicBool::new(false),
            spawns_dropped: AtomicUsize::new(0),
            jitter: Mutex::new(None),
            early: Mutex::new(Duration::ZERO),
            late: Mutex::new(Duration::ZERO),
            coarse,
        }))
    }

    fn handle(&self) -> Arc<dyn Runtime> {
        Arc::new(self.clone())
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.sim.block_on(f)
    }

    fn sleep(&self, d: Duration) -> Sleep {
        self.sim.sleep(d)
    }

    fn panics(&self) -> usize {
        self.task_panics.load(Ordering::SeqCst)
    }

    /// Where the simulation's timer for `deadline` goes.
    fn skew(&self, deadline: Instant) -> Instant {
        let early = *self.early.lock().unwrap();
        let late = *self.late.lock().unwrap();
        let d = deadline.checked_sub(early).unwrap_or(deadline);
        d.checked_add(late).unwrap_or(d)
    }
}

#[derive(Debug)]
struct SkewTimer {
    rt: Adv,
    inner: Pin<Box<dyn Timer>>,
}

impl Timer for SkewTimer {
    fn poll_elapsed(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.as_mut().poll_elapsed(cx)
    }

    fn reset(mut self: Pin<&mut Self>, deadline: Instant) {
        let d = self.rt.skew(deadline);
        self.inner.as_mut().reset(d);
    }
}

impl Runtime for Adv {
    fn spawn(&self, future: BoxFuture<'static, ()>) {
        if self.drop_spawns.load(Ordering::SeqCst) {
            self.spawns_dropped.fetch_add(1, Ordering::SeqCst);
            drop(future);
            return;
        }
        let me = self.clone();
        Runtime::spawn(
            &self.sim,
            Box::pin(async move {
                if AssertUnwindSafe(future).catch_unwind().await.is_err() {
                    me.task_panics.fetch_add(1, Ordering::SeqCst);
                }
            }),
        );
    }

    fn timer(&self, deadline: Instant) -> Pin<Box<dyn Timer>> {
        Box::pin(SkewTimer {
            rt: self.clone(),
            inner: Runtime::timer(&self.sim, self.skew(deadline)),
        })
    }

    fn now(&self) -> Instant {
        self.sim.now()
    }

    fn jitter(&self) -> f64 {
        match *self.jitter.lock().unwrap() {
            Some(j) => j,
            None => Runtime::jitter(&self.sim),
        }
    }

    fn coarse_clock(&self) -> Option<CoarseClock> {
        self.coarse
    }
}

/// A type answering `counter` at index `counter` on every fetch.
fn counting(opts: RegisterOptions) -> (MockType<u64>, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    let ty = MockType::new(opts, move |_o, _r| {
        let v = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok(FetchResult::new(v, v)) }
    });
    (ty, n)
}

/// The same with `u32` values: a second Rust type to register beside a `MockType<u64>`.
fn counting32(opts: RegisterOptions) -> (MockType<u32>, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    let ty = MockType::new(opts, move |_o, _r| {
        let v = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok(FetchResult::new(v as u32, v)) }
    });
    (ty, n)
}

/// Polls `f` and returns its panic message, if it panicked.
async fn caught<F: Future>(f: F) -> Result<F::Output, String> {
    AssertUnwindSafe(f).catch_unwind().await.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    })
}

// ===== the type's callbacks =====

/// A fetch that panics while its future is polled: waiters get `Panicked`, the entry and the
/// others stay usable (contract: Fetch 9). Held.
#[test]
fn a_fetch_panicking_while_polled_is_contained() {
    bounded("panic while polled", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let typed = cache.register(MockType::new(RegisterOptions::new(), move |_o, r| {
            let call = n2.fetch_add(1, Ordering::SeqCst);
            async move {
                if r.key() == "bad" && call == 0 {
                    panic!("fetch panicked while polled");
                }
                Ok::<_, MockError>(FetchResult::new(7u64, 3))
            }
        }));
        rt.block_on(async {
            let err = typed.get(&MockRequest::new("bad")).await.unwrap_err();
            assert!(matches!(err, GetError::Panicked(_)), "{err:?}");
            let ok = typed.get(&MockRequest::new("bad")).await.unwrap();
            assert_eq!(ok.value, Some(7));
            assert_eq!(
                typed.get(&MockRequest::new("other")).await.unwrap().value,
                Some(7)
            );
        });
        assert_eq!(rt.panics(), 0, "no background task died");
    });
}

/// A type whose `fetch` panics when called, before it returns its future (a sync precondition
/// check, an `unwrap` while building the request). The engine calls `fetch()` outside the
/// `catch_unwind` that wraps the future it returns.
#[test]
fn a_fetch_panicking_before_returning_its_future_is_contained() {
    let (n, rt) = bounded("panic before future", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let typed = cache.register(MockType::new(RegisterOptions::new(), move |_o, r| {
            let call = n2.fetch_add(1, Ordering::SeqCst);
            if r.key() == "bad" && call == 0 {
                panic!("fetch panicked before returning its future");
            }
            async move { Ok::<_, MockError>(FetchResult::new(7u64, 3)) }
        }));
        let first = rt.block_on(caught(
            typed.get_outcome(&MockRequest::new("bad").timeout(secs(5))),
        ));
        let second = rt.block_on(caught(
            typed.get_outcome(&MockRequest::new("bad").timeout(secs(5))),
        ));
        let first = first.expect("the panic surfaced in the caller of get");
        assert!(
            matches!(first.error, Some(GetError::Panicked(_))),
            "waiter: value {:?}, error {:?} (after {:?} of virtual time)",
            first.value,
            first.error,
            rt.sim.elapsed()
        );
        let second = second.expect("second get");
        assert_eq!(second.value, Some(7), "the entry stays usable");
        (n.load(Ordering::SeqCst), rt)
    });
    assert_eq!(rt.panics(), 0, "a background task died ({n} fetch calls)");
}

/// The same for a pass-through get (empty key): contract Get 1 says its panic is contained as
/// for any fetch.
#[test]
fn a_pass_through_fetch_panicking_before_its_future_is_contained() {
    bounded("bypass panic before future", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let typed = cache.register(MockType::new(RegisterOptions::new(), |_o, _r| {
            if true {
                panic!("pass-through fetch panicked before returning its future");
            }
            async move { Ok::<_, MockError>(FetchResult::new(7u64, 3)) }
        }));
        let got = rt.block_on(caught(typed.get(&MockRequest::new(""))));
        match got {
            Ok(Err(GetError::Panicked(_))) => {}
            other => panic!("expected GetError::Panicked, got {other:?}"),
        }
    });
}

/// `is_fatal` panicking counts as "not fatal": the refresh goes on (contract: Fetch 9). Held.
#[test]
fn a_panicking_is_fatal_counts_as_not_fatal() {
    bounded("is_fatal", LIMIT, || {
        struct T(Arc<AtomicUsize>);
        impl CacheType for T {
            type Request = MockRequest;
            type Value = u64;
            type Error = MockError;
            fn register_options(&self) -> RegisterOptions {
                RegisterOptions::new().refresh(true).refresh_timer(secs(1))
            }
            async fn fetch(
                &self,
                _o: FetchOptions<u64>,
                _r: &MockRequest,
            ) -> Result<FetchResult<u64>, MockError> {
                let n = self.0.fetch_add(1, Ordering::SeqCst);
                if n == 0 {
                    Ok(FetchResult::new(1, 1))
                } else {
                    Err(MockError::fatal("down"))
                }
            }
            fn is_fatal(&self, _e: &MockError) -> bool {
                panic!("is_fatal panicked")
            }
        }
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let calls = Arc::new(AtomicUsize::new(0));
        let typed = cache.register(T(calls.clone()));
        rt.block_on(async {
            typed.get(&MockRequest::new("k")).await.unwrap();
            rt.sleep(secs(30)).await;
            assert_eq!(
                typed.get(&MockRequest::new("k")).await.unwrap().value,
                Some(1)
            );
        });
        assert!(calls.load(Ordering::SeqCst) > 4, "refresh went on");
        assert_eq!(cache.metrics().total().fetch_errors_fatal, 0);
        assert_eq!(rt.panics(), 0);
    });
}

/// `value_eq` panicking counts as "the values differ": the polled watch delivers and goes on.
/// Held.
#[test]
fn a_panicking_value_eq_counts_as_a_change() {
    bounded("value_eq", LIMIT, || {
        struct T;
        impl CacheType for T {
            type Request = MockRequest;
            type Value = u64;
            type Error = MockError;
            async fn fetch(
                &self,
                _o: FetchOptions<u64>,
                _r: &MockRequest,
            ) -> Result<FetchResult<u64>, MockError> {
                Ok(FetchResult::new(5, 1))
            }
            fn value_eq(&self, _a: &u64, _b: &u64) -> bool {
                panic!("value_eq panicked")
            }
        }
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let typed = cache.register(T);
        let (tx, rx) = async_channel::bounded(64);
        let _w = typed
            .notify(MockRequest::new("k").max_age(secs(10)), 1u8, tx)
            .unwrap();
        rt.block_on(async {
            rt.sleep(secs(60)).await;
        });
        let events = rx.len();
        assert!(events >= 3, "the watch kept delivering: {events}");
        assert_eq!(rt.panics(), 0);
    });
}

// ===== the request's cache_info =====

/// A request whose `cache_info` panics from its `n`th call on (0 = never).
#[derive(Clone)]
struct FlakyReq {
    key: &'static str,
    calls: Arc<AtomicUsize>,
    panic_from: usize,
    timeout: Option<Duration>,
}

impl CacheRequest for FlakyReq {
    fn cache_info(&self) -> RequestInfo<'_> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.panic_from != 0 && n >= self.panic_from {
            panic!("cache_info panicked (call {n})");
        }
        let mut info = RequestInfo::new(self.key);
        info.timeout = self.timeout;
        info
    }
}

struct FlakyType {
    opts: RegisterOptions,
    delay: Duration,
    rt: Adv,
}

impl CacheType for FlakyType {
    type Request = FlakyReq;
    type Value = u64;
    type Error = MockError;
    fn register_options(&self) -> RegisterOptions {
        self.opts.clone()
    }
    async fn fetch(
        &self,
        _o: FetchOptions<u64>,
        _r: &FlakyReq,
    ) -> Result<FetchResult<u64>, MockError> {
        self.rt.sleep(self.delay).await;
        Ok(FetchResult::new(9, 2))
    }
}

/// `cache_info` is called by the engine only on the caller's side (get, notify); a panic there
/// reaches that caller, and must leave nothing behind: the get is no longer counted as waiting
/// (so the entry expires and can be evicted), the fetch it started still completes for others,
/// no watch is half-registered. Held.
#[test]
fn a_panicking_cache_info_leaves_the_entry_usable() {
    bounded("cache_info", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::builder(rt.handle()).max_entries(1).build();
        let typed = cache.register(FlakyType {
            opts: RegisterOptions::new().last_get_ttl(secs(100)),
            delay: secs(10),
            rt: rt.clone(),
        });
        let req = |key, panic_from| FlakyReq {
            key,
            calls: Arc::new(AtomicUsize::new(0)),
            panic_from,
            timeout: None,
        };
        rt.block_on(async {
            // Panics at once (first look, hit path).
            assert!(caught(typed.get(&req("a", 1))).await.is_err());
            // Panics once it has started the fetch and waits on it (its 3rd call).
            let r = caught(typed.get(&req("a", 3))).await;
            assert!(r.is_err(), "{:?}", r.map(|r| r.map(|r| r.value)));
            // Others see the fetch complete.
            assert_eq!(typed.get(&req("a", 0)).await.unwrap().value, Some(9));
            // A watch whose request panics on its first (or second) look registers nothing.
            for from in [1, 2] {
                let (tx, _rx) =
                    async_channel::bounded::<cache_core::UpdateEvent<(), u64, MockError>>(4);
                let w = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    typed.notify(req("a", from), (), tx)
                }));
                let watches = cache.metrics().total().watches;
                match w {
                    Err(_) => assert_eq!(watches, 0, "half-registered watch"),
                    Ok(w) => {
                        eprintln!("notify called cache_info fewer than {from} times");
                        drop(w);
                    }
                }
            }
            rt.sleep(secs(2)).await;
            // Nothing holds "a": it is evicted for capacity by "b", and "b" expires.
            assert_eq!(typed.get(&req("b", 0)).await.unwrap().value, Some(9));
            assert_eq!(cache.len(), 1, "capacity restored");
            rt.sleep(secs(200)).await;
            assert_eq!(cache.len(), 0, "expired");
        });
        assert_eq!(rt.panics(), 0);
    });
}

// ===== the fetch state's Drop =====

/// Fetch state whose `Drop` panics once, if armed.
struct Bomb {
    armed: AtomicBool,
    dropped: Arc<AtomicUsize>,
}

impl Drop for Bomb {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("FetchState cleanup panicked");
        }
    }
}

/// A type whose first fetch of each key in `armed_keys` returns an armed [`Bomb`] as state.
fn bomb_type(
    opts: RegisterOptions,
    armed_keys: &'static [&'static str],
) -> (MockType<u64>, Arc<AtomicUsize>) {
    let dropped = Arc::new(AtomicUsize::new(0));
    let d2 = dropped.clone();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let n = Arc::new(AtomicU64::new(0));
    let ty = MockType::new(opts, move |_o, r| {
        let key = r.key().to_owned();
        let first = {
            let mut seen = seen.lock().unwrap();
            let first = !seen.contains(&key);
            seen.push(key.clone());
            first
        };
        let armed = first && armed_keys.contains(&key.as_str());
        let state = Arc::new(Bomb {
            armed: AtomicBool::new(armed),
            dropped: d2.clone(),
        });
        let v = n.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok::<_, MockError>(FetchResult::new(v, v).with_state(state)) }
    });
    (ty, dropped)
}

/// Replacing the state by the next fetch's: the old state's cleanup panics inside the chain,
/// where the result is being stored. The get waiting on that fetch must still be answered.
#[test]
fn a_state_panicking_on_replacement_does_not_lose_the_fetch() {
    let (got, later, panics) = bounded("state drop on replace", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let (ty, _dropped) = bomb_type(RegisterOptions::new(), &["k"]);
        let typed = cache.register(ty);
        rt.block_on(async {
            typed.get(&MockRequest::new("k")).await.unwrap();
            let req = MockRequest::new("k").must_revalidate().timeout(secs(5));
            let t0 = rt.sim.elapsed();
            let got = caught(typed.get_outcome(&req)).await;
            let got = got.map(|o| {
                (
                    o.value,
                    o.error.map(|e| e.to_string()),
                    rt.sim.elapsed() - t0,
                )
            });
            let later = caught(typed.get_outcome(&req)).await;
            let later = later.map(|o| (o.value, o.meta.hit));
            (got, later, rt.panics())
        })
    });
    assert_eq!(
        got,
        Ok((Some(2), None, Duration::ZERO)),
        "the get waiting on the replacing fetch: (value, error, virtual wait)"
    );
    assert_eq!(
        later,
        Ok((Some(3), false)),
        "a later revalidation: (value, hit)"
    );
    assert_eq!(panics, 0, "the fetch chain task died");
}

/// TTL eviction drops the state in the expiry task: its panic must not end expiry for the
/// whole cache.
#[test]
fn a_state_panicking_on_expiry_does_not_stop_expiry() {
    let (len, panics) = bounded("state drop on expiry", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let (ty, _dropped) = bomb_type(RegisterOptions::new().last_get_ttl(secs(10)), &["a"]);
        let typed = cache.register(ty);
        let (other, _) = counting32(RegisterOptions::new().last_get_ttl(secs(10)));
        let other = cache.register(other);
        rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
            rt.sleep(secs(5)).await;
            other.get(&MockRequest::new("b")).await.unwrap();
            rt.sleep(secs(60)).await;
        });
        (cache.len(), rt.panics())
    });
    assert_eq!(len, 0, "the other entry expired too ({panics} task panics)");
    assert_eq!(panics, 0, "the expiry task died");
}

/// Capacity eviction runs in the caller that inserts: the evicted entry's cleanup panic must
/// not surface in that unrelated caller.
#[test]
fn a_state_panicking_on_capacity_eviction_stays_out_of_the_inserting_caller() {
    let (got, len) = bounded("state drop on capacity", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::builder(rt.handle()).max_entries(1).build();
        let (ty, _dropped) = bomb_type(RegisterOptions::new(), &["a"]);
        let typed = cache.register(ty);
        rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
            let got = caught(typed.get(&MockRequest::new("b"))).await;
            (
                got.map(|r| r.map(|r| r.value).map_err(|e| e.to_string())),
                cache.len(),
            )
        })
    });
    assert_eq!(got, Ok(Ok(Some(2))), "the get of b");
    assert_eq!(len, 1);
}

/// Re-registration releases the old entries in the caller of `register`.
#[test]
fn a_state_panicking_on_re_registration_stays_out_of_register() {
    bounded("state drop on register", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let (ty, _dropped) = bomb_type(RegisterOptions::new(), &["a"]);
        let typed = cache.register(ty);
        rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
        });
        let (ty2, _) = bomb_type(RegisterOptions::new(), &[]);
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| cache.register(ty2)));
        let typed2 = r.expect("register panicked");
        rt.block_on(async {
            assert_eq!(
                typed2.get(&MockRequest::new("a")).await.unwrap().value,
                Some(1)
            );
        });
    });
}

/// Close leaves the entries (and their state) alone; the state is dropped with the last
/// handle. Whatever happens, the cache closes and nothing keeps running.
#[test]
fn a_state_panicking_on_close_and_drop() {
    bounded("state drop on close", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let (ty, dropped) = bomb_type(RegisterOptions::new(), &["a"]);
        let typed = cache.register(ty);
        rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
        });
        cache.close();
        assert_eq!(dropped.load(Ordering::SeqCst), 0, "close keeps entries");
        rt.block_on(async {
            assert!(typed.get(&MockRequest::new("a")).await.unwrap().meta.hit);
        });
        // The last handle's drop frees the state; its panic reaches whoever drops it.
        let r = std::panic::catch_unwind(AssertUnwindSafe(move || {
            drop(typed);
            drop(cache);
        }));
        eprintln!("dropping the last handle: panicked = {}", r.is_err());
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "state freed once");
        rt.block_on(rt.sleep(secs(10)));
        assert_eq!(rt.panics(), 0);
    });
}

// ===== the value's Drop =====

/// The callback a [`Hooked`] value runs when dropped.
type Hook = Arc<Mutex<Option<Arc<dyn Fn() + Send + Sync>>>>;

/// A value whose `Drop` runs a callback: the consumer's code, which may use the cache.
#[derive(Clone)]
struct Hooked(u64, Hook);

impl std::fmt::Debug for Hooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hooked({})", self.0)
    }
}

impl PartialEq for Hooked {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Drop for Hooked {
    fn drop(&mut self) {
        let hook = self.1.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook();
        }
    }
}

/// `prepopulate` replacing a value whose `Drop` reads the same entry: the old value is
/// dropped after the table's lock is released (before: under its write lock, and the read
/// in `Drop` deadlocked). Contract: Fetch 9.
#[test]
fn a_value_replaced_by_prepopulate_is_dropped_out_of_the_lock() {
    let read = bounded("prepopulate drop", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let typed = cache.register(MockType::new(RegisterOptions::new(), |_o, _r| async {
            Ok::<_, MockError>(FetchResult::new(Hooked(0, Arc::new(Mutex::new(None))), 1))
        }));
        let hook: Hook = Arc::new(Mutex::new(None));
        let info = RequestInfo::new("k");
        typed
            .prepopulate(&info, Hooked(1, hook.clone()), 1)
            .unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let (reader, seen2) = (typed.clone(), seen.clone());
        *hook.lock().unwrap() = Some(Arc::new(move || {
            let got = futures::FutureExt::now_or_never(reader.get(&MockRequest::new("k")));
            if let Some(Ok(r)) = got {
                seen2.store(r.value.map_or(0, |v| v.0), Ordering::SeqCst);
            }
        }) as Arc<dyn Fn() + Send + Sync>);
        typed
            .prepopulate(&info, Hooked(2, Arc::new(Mutex::new(None))), 2)
            .unwrap();
        seen.load(Ordering::SeqCst)
    });
    assert_eq!(read, 2, "the old value's Drop read the new value");
}

// ===== Connected =====

/// `Connected::notify` called after its fetch completed, after its entry was evicted, after
/// the cache was dropped, many times and from another thread: a no-op each time. Held.
#[test]
fn connected_signals_outliving_their_fetch_are_harmless() {
    bounded("connected", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::builder(rt.handle()).max_entries(1).build();
        let kept: Arc<Mutex<Vec<Connected>>> = Arc::default();
        let k2 = kept.clone();
        let n = Arc::new(AtomicU64::new(0));
        let typed = cache.register(MockType::new(
            RegisterOptions::new().supports_blocking(true),
            move |o: FetchOptions<u64>, _r| {
                for _ in 0..3 {
                    o.connected.notify();
                }
                k2.lock().unwrap().push(o.connected.clone());
                let v = n.fetch_add(1, Ordering::SeqCst) + 1;
                async move { Ok::<_, MockError>(FetchResult::new(v, v)) }
            },
        ));
        rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
            for c in kept.lock().unwrap().iter() {
                c.notify();
            }
            typed.get(&MockRequest::new("b")).await.unwrap(); // evicts "a"
            for c in kept.lock().unwrap().iter() {
                c.notify();
            }
        });
        let sigs = kept.lock().unwrap().clone();
        std::thread::scope(|s| {
            s.spawn(|| sigs.iter().for_each(Connected::notify));
        });
        drop(typed);
        drop(cache);
        sigs.iter().for_each(Connected::notify);
        assert_eq!(rt.panics(), 0);
    });
}

// ===== misbehaving runtimes: jitter =====

/// A refresh that keeps failing, under a runtime whose `jitter()` answers `j`: calls made in
/// ten virtual minutes, task panics.
fn failing_refresh_under_jitter(j: f64) -> (usize, usize) {
    let rt = Adv::new(1);
    *rt.jitter.lock().unwrap() = Some(j);
    let cache = Cache::new(rt.handle());
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let typed = cache.register(MockType::new(
        RegisterOptions::new().refresh(true),
        move |_o, _r| {
            let n = c2.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Ok(FetchResult::new(1u64, 1))
                } else {
                    Err(MockError::new("down"))
                }
            }
        },
    ));
    rt.block_on(async {
        typed.get(&MockRequest::new("k")).await.unwrap();
        rt.sleep(secs(600)).await;
        // Still answers from the cache.
        assert_eq!(
            typed.get(&MockRequest::new("k")).await.unwrap().value,
            Some(1)
        );
    });
    let out = (calls.load(Ordering::SeqCst), rt.panics());
    cache.close();
    out
}

/// Jitter outside [0, 1) but a number: clamped (the backoff waits at most twice its base).
/// Held.
#[test]
fn out_of_range_jitter_is_clamped() {
    for j in [
        1.0,
        7.5,
        -1.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::MAX,
        f64::MIN_POSITIVE,
    ] {
        let (calls, panics) = bounded(&format!("jitter {j}"), LIMIT, move || {
            failing_refresh_under_jitter(j)
        });
        assert_eq!(panics, 0, "jitter {j}");
        // 3 free retries, then 2, 4, 8, 16, 32, 60… s (doubled at most by jitter): 10 min
        // hold about 10–20 fetches.
        assert!(
            (8..=40).contains(&calls),
            "jitter {j}: {calls} fetches in 10 min"
        );
    }
}

/// A NaN jitter: `f64::clamp` keeps NaN, and `Duration::mul_f64(NaN)` panics.
#[test]
fn a_nan_jitter_does_not_panic() {
    let (calls, panics) = bounded("jitter NaN", LIMIT, || {
        failing_refresh_under_jitter(f64::NAN)
    });
    assert_eq!(panics, 0, "a background task died after {calls} fetches");
    assert!(calls >= 8, "{calls} fetches in 10 min");
}

/// A NaN jitter in a polled watch's interval: `Duration::try_from_secs_f64(NaN)` fails and
/// the engine reads the failure as "wait for ever".
#[test]
fn a_nan_jitter_does_not_stop_a_polled_watch() {
    let (calls, panics) = bounded("poll jitter NaN", LIMIT, || {
        let rt = Adv::new(1);
        *rt.jitter.lock().unwrap() = Some(f64::NAN);
        let cache = Cache::new(rt.handle());
        let (ty, n) = counting(RegisterOptions::new());
        let typed = cache.register(ty);
        let (tx, rx) = async_channel::bounded(64);
        let _w = typed
            .notify(MockRequest::new("k").max_age(secs(10)), (), tx)
            .unwrap();
        rt.block_on(rt.sleep(secs(100)));
        drop(rx);
        (n.load(Ordering::SeqCst), rt.panics())
    });
    assert_eq!(panics, 0);
    assert!(calls >= 5, "{calls} polls in 100 s with max_age 10 s");
}

// ===== misbehaving runtimes: the clock =====

/// How far past `from` an `Instant` can go.
fn headroom(from: Instant) -> Duration {
    let (mut lo, mut hi) = (0u64, u64::MAX);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if from.checked_add(Duration::from_secs(mid)).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Duration::from_secs(lo)
}

/// Exercises a cache (gets, refresh, blocking and polled watches, prepopulate, rate limit,
/// expiry, close) on `rt` for a while; panics if anything did.
fn exercise(rt: &Adv, cache: &Cache) {
    let (blocking, _) = counting(
        RegisterOptions::new()
            .supports_blocking(true)
            .refresh(true)
            .refresh_timer(secs(1))
            .last_get_ttl(secs(30)),
    );
    let blocking = cache.register(blocking);
    let (polled, _) = counting32(RegisterOptions::new().last_get_ttl(secs(30)));
    let polled = cache.register(polled);
    cache.set_rate_limit(cache_core::RateLimit::new(1.0, 1).unwrap());
    let (tx, rx) = async_channel::bounded(1024);
    let (tx2, rx2) = async_channel::bounded(1024);
    let _w1 = blocking.notify(MockRequest::new("w"), 1u8, tx).unwrap();
    let _w2 = cache
        .notify::<MockType<u32>, _, _>(MockRequest::new("p").max_age(secs(2)), 2u8, tx2)
        .unwrap();
    rt.block_on(async {
        blocking
            .get(&MockRequest::new("g").timeout(secs(5)))
            .await
            .unwrap();
        polled
            .get(
                &MockRequest::new("g")
                    .max_age(secs(1))
                    .stale_if_error(secs(9)),
            )
            .await
            .unwrap();
        polled.prepopulate(&RequestInfo::new("pre"), 5, 0).unwrap();
        for _ in 0..20 {
            let _ = blocking
                .get_outcome(&MockRequest::new("g").min_index(1).timeout(secs(3)))
                .await;
            let _ = polled
                .get_outcome(&MockRequest::new("h").max_age(Duration::from_nanos(1)))
                .await;
            rt.sleep(secs(1)).await;
        }
    });
    drop((rx, rx2));
    cache.close();
    let _ = cache.metrics();
}

/// A runtime whose clock starts, or lands, within a second of the largest `Instant`: no time
/// arithmetic may panic (contract: Options). (Virtual time cannot move past the limit, so timers there
/// fire at once: the point is only that nothing panics or spins.)
#[test]
fn a_clock_near_the_instant_limit_does_not_panic() {
    let panics = bounded("near Instant::MAX", LIMIT, || {
        let rt = Adv::new(1);
        let early = Cache::new(rt.handle());
        let room = headroom(rt.sim.now());
        let target = rt.sim.now() + room - Duration::from_millis(500);
        let handle = rt.handle();
        rt.block_on(Sleep::until(&*handle, target));
        assert!(rt.sim.now() >= target);
        // A cache whose epoch is near the limit, and one made earlier that jumps there.
        let late = Cache::new(rt.handle());
        exercise(&rt, &late);
        exercise(&rt, &early);
        rt.panics()
    });
    assert_eq!(panics, 0, "background tasks panicked");
}

/// A clock that jumps ten years ahead (a consistent jump: the virtual clock itself moves),
/// with entries live: nothing panics, the entries expire, the cache works on. Held.
#[test]
fn a_clock_jumping_years_ahead() {
    bounded("years ahead", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let (ty, _) = counting(RegisterOptions::new());
        let typed = cache.register(ty);
        rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
            rt.sleep(Duration::from_secs(10 * 365 * 24 * 3600)).await;
            assert_eq!(cache.len(), 0, "expired during the jump");
            assert!(!typed.get(&MockRequest::new("a")).await.unwrap().meta.hit);
            assert!(typed.get(&MockRequest::new("a")).await.unwrap().meta.hit);
        });
        exercise(&rt, &cache);
        assert_eq!(rt.panics(), 0);
    });
}

/// Past 584 years after the cache was built, its nanosecond stamps saturate. Unwatched
/// entries: every entry then expires as soon as the expiry task looks (its last read reads
/// as "584 years", a TTL before now): the cache still answers, from fetches. Held (describes
/// the behaviour).
#[test]
fn a_clock_past_the_stamps_range_degrades_to_fetching() {
    bounded("700 years", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let (ty, n) = counting(RegisterOptions::new());
        let typed = cache.register(ty);
        let hits = rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
            rt.sleep(Duration::from_secs(700 * 365 * 24 * 3600)).await;
            let mut hits = 0;
            for _ in 0..5 {
                hits += usize::from(typed.get(&MockRequest::new("a")).await.unwrap().meta.hit);
                rt.sleep(secs(1)).await;
            }
            hits
        });
        eprintln!(
            "700 years on: {hits} hits of 5 gets, {} fetches",
            n.load(Ordering::SeqCst)
        );
        assert_eq!(rt.panics(), 0);
    });
}

/// Timers that fire late (an overloaded runtime): things happen late, nothing breaks. Held.
#[test]
fn late_timers_only_delay() {
    bounded("late timers", LIMIT, || {
        let rt = Adv::new(1);
        *rt.late.lock().unwrap() = secs(3600);
        let cache = Cache::new(rt.handle());
        let (ty, _) = counting(RegisterOptions::new().supports_blocking(true));
        let typed = cache.register(ty);
        rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
        });
        exercise(&rt, &cache);
        assert_eq!(rt.panics(), 0);
    });
}

/// Timers that fire early (a runtime whose timers and `now()` disagree by a millisecond): the
/// engine must not re-arm a timer that fires at once and loop until `now()` reaches the
/// deadline (a busy spin on a real clock; for ever on a virtual one, which moves only when
/// every task is idle). The refresh chain's wait, a get's retry after backoff and the expiry
/// task each spun before (contract: Runtime 1).
#[test]
fn early_timers_do_not_spin() {
    bounded("early timers", Duration::from_secs(5), || {
        let rt = Adv::new(1);
        *rt.early.lock().unwrap() = Duration::from_millis(1);
        let cache = Cache::new(rt.handle());
        let (refreshed, refreshes) = counting(
            RegisterOptions::new()
                .refresh(true)
                .refresh_timer(secs(10))
                .last_get_ttl(secs(3600)),
        );
        let refreshed = cache.register(refreshed);
        // Answers index 0 at once: a blocking get for a newer index retries after backoff.
        let zero = cache.register(MockType::new(
            RegisterOptions::new().supports_blocking(true),
            |_o, _r| async { Ok::<_, MockError>(FetchResult::new(1i64, 0)) },
        ));
        let (expiring, _) = counting32(RegisterOptions::new().last_get_ttl(secs(10)));
        let expiring = cache.register(expiring);
        rt.block_on(async {
            refreshed.get(&MockRequest::new("a")).await.unwrap();
            let t0 = rt.sim.elapsed();
            let got = zero
                .get_outcome(&MockRequest::new("z").min_index(5).timeout(secs(20)))
                .await;
            assert!(got.value.is_some(), "{:?}", got.error);
            assert!(rt.sim.elapsed() - t0 >= secs(19), "held to its timeout");
            expiring.get(&MockRequest::new("e")).await.unwrap();
            assert_eq!(cache.len(), 3);
            rt.sleep(secs(60)).await;
            assert_eq!(cache.len(), 2, "the 10 s entry expired");
        });
        assert!(refreshes.load(Ordering::SeqCst) >= 5);
        assert_eq!(rt.panics(), 0);
    });
    // The per-entry rate limit's wait for a token, on a refresh with no timer.
    bounded("early timers, rate limit", Duration::from_secs(5), || {
        let rt = Adv::new(2);
        *rt.early.lock().unwrap() = Duration::from_millis(1);
        let cache = Cache::builder(rt.handle())
            .rate_limit(RateLimit::new(1.0, 1).unwrap())
            .build();
        let (ty, n) = counting(RegisterOptions::new().refresh(true));
        let typed = cache.register(ty);
        rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
            rt.sleep(secs(30)).await;
        });
        let n = n.load(Ordering::SeqCst);
        assert!(
            (20..=32).contains(&n),
            "{n} fetches in 30 s at 1 per second"
        );
        assert_eq!(rt.panics(), 0);
    });
}

/// Expiry stays on time across a re-registration, which empties the old store's queue while
/// the expiry timer is armed for its entry: that firing finds nothing due, and must not be
/// taken for an early timer that would push the next deadline back.
#[test]
fn expiry_stays_on_time_after_a_re_registration_empties_its_queue() {
    let len = bounded("expiry after re-registration", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let ttl = RegisterOptions::new().last_get_ttl(secs(10));
        let first = cache.register(counting32(ttl.clone()).0);
        rt.block_on(async {
            first.get(&MockRequest::new("a")).await.unwrap();
            rt.sleep(secs(5)).await;
            let second = cache.register(counting32(ttl).0);
            rt.sleep(secs(1)).await;
            second.get(&MockRequest::new("b")).await.unwrap();
            // "b" expires at 16 s; the timer armed for "a" (10 s) fires first, for nothing.
            rt.sleep(secs(11)).await;
            cache.len()
        })
    });
    assert_eq!(len, 0, "expired at 16 s");
}

static LAG_CLOCK: AtomicU64 = AtomicU64::new(0);
static LEAD_CLOCK: AtomicU64 = AtomicU64::new(0);

/// A `coarse_clock` stuck at its origin (it lags `now()` more and more): hits stamp the entry
/// with an old time, so a read entry expires one TTL after the clock stuck, however often it
/// is read. Degrades (the TTL measures from the stale reading); nothing panics or spins.
/// Held (as a description of the behaviour).
#[test]
fn a_lagging_coarse_clock_shortens_ttls_but_breaks_nothing() {
    bounded("lagging coarse clock", LIMIT, || {
        LAG_CLOCK.store(1_000_000_000, Ordering::SeqCst);
        let clock = CoarseClock::new(
            || LAG_CLOCK.load(Ordering::SeqCst),
            Duration::from_millis(4),
        );
        let rt = Adv::with_coarse(1, Some(clock));
        let cache = Cache::new(rt.handle());
        let (ty, n) = counting(RegisterOptions::new().last_get_ttl(secs(60)));
        let typed = cache.register(ty);
        let hits = rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
            let mut hits = 0;
            for _ in 0..100 {
                rt.sleep(secs(5)).await;
                let r = typed.get(&MockRequest::new("a")).await.unwrap();
                hits += usize::from(r.meta.hit);
            }
            hits
        });
        eprintln!(
            "lagging coarse clock: {hits} hits of 100 reads every 5 s (TTL 60 s), {} fetches",
            n.load(Ordering::SeqCst)
        );
        exercise(&rt, &cache);
        assert_eq!(rt.panics(), 0);
    });
}

/// A `coarse_clock` that leads `now()` by centuries: hit stamps saturate far ahead, so an entry
/// read once by a hit never expires (the TTL counts from a reading centuries ahead); ages read
/// on the coarse clock saturate. Nothing panics or spins. Held (describes the behaviour).
#[test]
fn a_leading_coarse_clock_breaks_nothing() {
    bounded("leading coarse clock", LIMIT, || {
        LEAD_CLOCK.store(0, Ordering::SeqCst);
        let clock = CoarseClock::new(
            || LEAD_CLOCK.load(Ordering::SeqCst),
            Duration::from_millis(4),
        );
        let rt = Adv::with_coarse(1, Some(clock));
        let cache = Cache::new(rt.handle());
        let (ty, _) = counting(RegisterOptions::new().last_get_ttl(secs(60)));
        let typed = cache.register(ty);
        let (age, len) = rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
            rt.sleep(secs(1)).await;
            LEAD_CLOCK.store(u64::MAX - 1, Ordering::SeqCst);
            let r = typed.get(&MockRequest::new("a")).await.unwrap();
            rt.sleep(secs(3600)).await;
            (r.meta.age, cache.len())
        });
        eprintln!("leading coarse clock: hit age {age:?}; entries after an hour unread: {len}");
        exercise(&rt, &cache);
        assert_eq!(rt.panics(), 0);
    });
}

// ===== misbehaving runtimes: spawn =====

/// A runtime that drops spawned futures without running them (a tokio runtime shutting down
/// drops its tasks; a cache kept in a static outlives the per-test runtimes that spawned its
/// fetches). A get whose fetch task was dropped answers at once with `Abandoned` (before: it
/// joined a fetch that never completed, for ever without a timeout), and once spawns work
/// again the entry fetches again (contract: Fetch 10).
#[test]
fn an_entry_recovers_after_its_chain_task_was_dropped() {
    let (first, second, dropped) = bounded("dropped spawns", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let (ty, _n) = counting(RegisterOptions::new());
        let typed = cache.register(ty);
        rt.drop_spawns.store(true, Ordering::SeqCst);
        let t0 = rt.sim.elapsed();
        // No timeout: before the fix this get never returned.
        let first = rt.block_on(typed.get_outcome(&MockRequest::new("a")));
        let waited = rt.sim.elapsed() - t0;
        rt.drop_spawns.store(false, Ordering::SeqCst);
        let second = rt.block_on(typed.get_outcome(&MockRequest::new("a").timeout(secs(5))));
        (
            (first.value, first.error.map(|e| e.to_string()), waited),
            (second.value, second.error.map(|e| e.to_string())),
            rt.spawns_dropped.load(Ordering::SeqCst),
        )
    });
    assert_eq!(
        first,
        (
            None,
            Some(GetError::<MockError>::Abandoned.to_string()),
            Duration::ZERO
        ),
        "the dropped fetch task's get answers at once, with its error"
    );
    assert!(dropped >= 1);
    assert_eq!(second, (Some(1), None), "once the runtime spawns again");
}

/// The same for a watch: its chain dropped unrun leaves the entry idle, not "fetching", so a
/// later get (spawns working again) fetches, and the watch hears of the value.
#[test]
fn a_watch_whose_chain_task_was_dropped_is_served_by_the_next_chain() {
    let (index, value) = bounded("dropped watch chain", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let (ty, _n) = counting(RegisterOptions::new().supports_blocking(true));
        let typed = cache.register(ty);
        let (tx, rx) = async_channel::bounded(4);
        rt.drop_spawns.store(true, Ordering::SeqCst);
        let _watch = typed.notify(MockRequest::new("w"), (), tx).unwrap();
        rt.drop_spawns.store(false, Ordering::SeqCst);
        rt.block_on(async {
            let got = typed
                .get_outcome(&MockRequest::new("w").timeout(secs(5)))
                .await;
            let event = rx.recv().await.unwrap();
            (event.meta.index, got.value)
        })
    });
    // The type answers every blocking fetch at once with the next index.
    assert!(index >= 1 && value.is_some(), "{index} {value:?}");
}

/// `Value::clone` is user code the fetch chain calls (the last result handed to the next
/// fetch). A panic there unwinds the chain's task: the get waiting on that chain answers with
/// `Abandoned` at once (before: the entry stayed "fetching" and the get waited for ever), and
/// the next get fetches again (contract: Fetch 10).
#[test]
fn a_value_clone_panicking_in_the_chain_answers_the_waiting_get() {
    static CLONE_PANICS: AtomicBool = AtomicBool::new(false);

    #[derive(Debug, PartialEq)]
    struct Touchy(u64);

    impl Clone for Touchy {
        fn clone(&self) -> Self {
            // Once: the get then answering from the entry clones it too.
            if CLONE_PANICS.swap(false, Ordering::SeqCst) {
                panic!("Value::clone panicked");
            }
            Touchy(self.0)
        }
    }

    let (first, second, panics) = bounded("value clone", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        let typed = cache.register(MockType::new(RegisterOptions::new(), move |_o, _r| {
            let v = n2.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok::<_, MockError>(FetchResult::new(Touchy(v), v)) }
        }));
        rt.block_on(async {
            assert_eq!(
                typed.get(&MockRequest::new("k")).await.unwrap().value,
                Some(Touchy(1))
            );
            // A revalidation: the chain hands the old value to the fetch, and its clone panics.
            CLONE_PANICS.store(true, Ordering::SeqCst);
            let first = typed
                .get_outcome(&MockRequest::new("k").must_revalidate())
                .await
                .error
                .map(|e| e.to_string());
            let second = typed
                .get(&MockRequest::new("k").must_revalidate())
                .await
                .unwrap()
                .value;
            (first, second, rt.panics())
        })
    });
    assert_eq!(
        first,
        Some(GetError::<MockError>::Abandoned.to_string()),
        "the waiting get answers"
    );
    assert_eq!(second, Some(Touchy(2)), "the entry fetches again");
    assert_eq!(
        panics, 1,
        "the chain's task died of the panic (the runtime saw it)"
    );
}

// ===== handles dropped while work is in flight =====

/// Every `Cache` and `TypedCache` handle dropped while a slow fetch, a waiting get (in a task
/// holding its own handle) and a watch are in flight: the cache closes once the last handle
/// goes, the watch ends, nothing is left running. Held.
#[test]
fn dropping_every_handle_mid_flight_closes_cleanly() {
    bounded("drop mid-flight", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let rt2 = rt.clone();
        let typed = cache.register(MockType::new(
            RegisterOptions::new().supports_blocking(true),
            move |o: FetchOptions<u64>, _r| {
                let rt = rt2.clone();
                async move {
                    rt.sleep(secs(10)).await;
                    Ok::<_, MockError>(FetchResult::new(o.min_index + 1, o.min_index + 1))
                }
            },
        ));
        let (tx, rx) = async_channel::bounded(8);
        let watch = typed.notify(MockRequest::new("w"), (), tx).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let (held, d2) = (typed.clone(), done.clone());
        rt.sim.spawn_detached(async move {
            let r = held.get(&MockRequest::new("g")).await.unwrap();
            assert_eq!(r.value, Some(1));
            d2.store(true, Ordering::SeqCst);
        });
        // A get polled once (it starts a fetch), then its future dropped.
        rt.block_on(async {
            let req = MockRequest::new("d");
            let mut g = std::pin::pin!(typed.get(&req));
            assert!(futures::poll!(g.as_mut()).is_pending());
        });
        drop(typed);
        drop(cache);
        rt.block_on(async {
            let first = rx.recv().await.unwrap();
            assert_eq!(first.meta.index, 1);
            rt.sleep(secs(30)).await;
        });
        assert!(done.load(Ordering::SeqCst), "the held get answered");
        // The last handle (the task's) is gone: the cache closed and ended the watch.
        assert!(rx.is_closed() || rx.try_recv().is_err());
        assert!(!watch.is_active(), "close ended the watch");
        drop(watch);
        rt.block_on(rt.sleep(secs(700)));
        assert_eq!(rt.sim.pending_timers(), 0, "nothing left armed");
        assert_eq!(rt.panics(), 0);
    });
}

/// A get future created before close and polled after it, and one made through a `Cache`
/// handle whose `TypedCache`s are all gone. Held.
#[test]
fn gets_polled_across_close_and_handle_drops() {
    bounded("get across close", LIMIT, || {
        let rt = Adv::new(1);
        let cache = Cache::new(rt.handle());
        let (ty, _) = counting(RegisterOptions::new());
        let typed = cache.register(ty);
        rt.block_on(async {
            typed.get(&MockRequest::new("a")).await.unwrap();
        });
        let req_a = MockRequest::new("a");
        let req_b = MockRequest::new("b");
        let hit = typed.get(&req_a);
        let miss = typed.get(&req_b);
        cache.close();
        let (hit, miss) = rt.block_on(async { (hit.await, miss.await) });
        assert!(hit.unwrap().meta.hit);
        assert!(
            matches!(miss, Err(GetError::Closed)),
            "{:?}",
            miss.map(|r| r.value)
        );
        let cache2 = typed.cache().clone();
        drop(typed);
        let r = rt.block_on(cache2.get::<MockType<u64>>(&req_a)).unwrap();
        assert!(r.meta.hit);
        drop(cache);
        drop(cache2);
        assert_eq!(rt.panics(), 0);
    });
}

// ===== fetches that never complete =====

/// A fetch that never completes (and one that returns `Pending` without registering a
/// waker): gets with a timeout answer at it; close returns and ends the watch; capacity
/// eviction drops the stuck fetch, after which the entry fetches again. Held.
#[test]
fn fetches_that_never_complete() {
    for no_waker in [false, true] {
        bounded(
            &format!("stuck fetch (no waker: {no_waker})"),
            LIMIT,
            move || {
                let rt = Adv::new(1);
                let cache = Cache::builder(rt.handle()).max_entries(1).build();
                let calls = Arc::new(AtomicUsize::new(0));
                let c2 = calls.clone();
                let dropped = Arc::new(AtomicUsize::new(0));
                let d2 = dropped.clone();
                struct Guard(Arc<AtomicUsize>);
                impl Drop for Guard {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let typed = cache.register(MockType::new(
                    RegisterOptions::new().last_get_ttl(secs(100)),
                    move |_o, _r| {
                        let n = c2.fetch_add(1, Ordering::SeqCst);
                        // Counts the drops of stuck fetches only.
                        let guard = (n == 0).then(|| Guard(d2.clone()));
                        async move {
                            let _guard = guard;
                            if n == 0 {
                                if no_waker {
                                    futures::future::poll_fn(|_cx| Poll::<()>::Pending).await;
                                } else {
                                    futures::future::pending::<()>().await;
                                }
                            }
                            Ok::<_, MockError>(FetchResult::new(3u64, 1))
                        }
                    },
                ));
                rt.block_on(async {
                    let r = typed
                        .get_outcome(&MockRequest::new("a").timeout(secs(5)))
                        .await;
                    assert_eq!((r.value, r.error.is_none()), (None, true));
                    // Joins the stuck fetch.
                    let r = typed
                        .get_outcome(&MockRequest::new("a").timeout(secs(5)))
                        .await;
                    assert_eq!(r.value, None);
                    assert_eq!(calls.load(Ordering::SeqCst), 1);
                    // A first fetch that never completes never starts the entry's TTL clock
                    // (contract: Lifecycle 1), so "a" stays; capacity eviction frees it, and its
                    // fetch, once nothing waits on it.
                    rt.sleep(secs(200)).await;
                    assert_eq!((cache.len(), dropped.load(Ordering::SeqCst)), (1, 0));
                    typed.get(&MockRequest::new("c")).await.unwrap();
                    rt.sleep(secs(1)).await;
                    assert_eq!(
                        (cache.len(), dropped.load(Ordering::SeqCst)),
                        (1, 1),
                        "a evicted, its stuck fetch dropped"
                    );
                    let r = typed
                        .get(&MockRequest::new("a").timeout(secs(5)))
                        .await
                        .unwrap();
                    assert_eq!(r.value, Some(3));
                    // Close with another stuck fetch in flight and a watch on it.
                    c2_reset(&calls);
                    let (tx, rx) =
                        async_channel::bounded::<cache_core::UpdateEvent<(), u64, MockError>>(4);
                    let _w = typed
                        .notify(MockRequest::new("b").max_age(secs(1)), (), tx)
                        .unwrap();
                    rt.sleep(secs(1)).await;
                    cache.close();
                    assert!(rx.recv().await.is_err(), "close ended the watch");
                    let r = typed
                        .get_outcome(&MockRequest::new("b").timeout(secs(5)))
                        .await;
                    assert_eq!(
                        (r.value, r.error.is_none()),
                        (None, true),
                        "joins, times out"
                    );
                });
                assert_eq!(rt.panics(), 0);
            },
        );
    }
}

fn c2_reset(calls: &AtomicUsize) {
    calls.store(0, Ordering::SeqCst);
}
