//! The engine pushed at its edges on a real runtime (tokio, 2 workers), every part with a hard
//! time bound and its own assertions:
//!
//! - **churn**: `max_entries` 64 against 4 000 keys from 8 tasks, one key in 7 failing, fetches
//!   that sleep so that gets join fetches in flight while capacity evicts;
//! - **expiry**: types with TTLs of 1 ms, zero, 50 ms and `Duration::MAX` read at once, each
//!   expiring on its own; a watched zero-TTL entry must not spin the expiry task (CPU time);
//! - **re-registration** of a type while gets and watches of it run, and a handle to a replaced
//!   registration used for gets and prepopulates (it must keep nothing);
//! - **close** racing notify, get and watch (no watch open once `close` returned);
//! - **watch fan-in**: 2 000 notify watches and 200 streams of one key, dropped in random order;
//! - **watch vs eviction**: watches added to entries that capacity is evicting (a watched
//!   entry must keep its entry);
//! - **slow consumers** (20 one-slot channels, 20 streams) of 300 changes, which must still end
//!   on the latest value;
//! - **extreme keys**: empty, 27/28/29 bytes split in every way between key, datacenter and
//!   token (around the inline limit of 28), and 1 MiB.
//!
//! After each part the cache is closed and dropped, and the bytes the program holds (the
//! counting allocator of `cache-bench`) must come back to where they were before it.
//!
//! `cargo run --release -p cache-bench --example adversary`

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache_bench::alloc;
use cache_core::testing::{MockError, MockRequest, MockServer, MockType};
use cache_core::{
    Cache, CacheError, CacheRequest, CacheType, FetchOptions, FetchResult, GetError,
    RegisterOptions, RequestInfo, SharedRuntime, WatchError,
};
use cache_tokio::TokioRuntime;
use futures::StreamExt;

/// Bytes a part may leave behind in the runtime's own pools (timer wheel, task slabs).
const MEMORY_SLACK: isize = 256 * 1024;

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

// ===== A probe cache type =====

/// A non-blocking cache type answering [`expected`] of its request; `ID` makes each
/// instantiation a type of its own, so several are registered at once.
struct Probe<const ID: u8> {
    ttl: Duration,
    /// How long each fetch sleeps (so that gets join fetches in flight).
    sleep: Duration,
    /// Keys whose [`expected`] value is divisible by this fail (0: none).
    fail_every: u64,
    calls: Arc<AtomicU64>,
}

impl<const ID: u8> Probe<ID> {
    fn new(ttl: Duration, sleep: Duration, fail_every: u64) -> Self {
        Self {
            ttl,
            sleep,
            fail_every,
            calls: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// The value every probe answers for (key, datacenter, token): an FNV-1a hash with
/// separators, so that the same bytes split differently give different values.
fn expected(info: &RequestInfo<'_>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [&info.key, &info.datacenter, &info.token] {
        for b in part.as_bytes().iter().chain([0xffu8].iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn fails(fail_every: u64, value: u64) -> bool {
    fail_every != 0 && value % fail_every == 0
}

impl<const ID: u8> CacheType for Probe<ID> {
    type Request = MockRequest;
    type Value = u64;
    type Error = MockError;

    fn register_options(&self) -> RegisterOptions {
        RegisterOptions::new().last_get_ttl(self.ttl)
    }

    fn fetch(
        &self,
        _opts: FetchOptions<u64>,
        request: &MockRequest,
    ) -> impl Future<Output = Result<FetchResult<u64>, MockError>> + Send {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let value = expected(&request.cache_info());
        let (sleep, fail_every) = (self.sleep, self.fail_every);
        async move {
            if !sleep.is_zero() {
                tokio::time::sleep(sleep).await;
            }
            if fails(fail_every, value) {
                Err(MockError::new("probe: failing key"))
            } else {
                Ok(FetchResult::new(value, 1))
            }
        }
    }
}

// ===== Helpers =====

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

fn runtime() -> SharedRuntime {
    Arc::new(TokioRuntime::current())
}

/// Runs a part with a hard time bound, then checks that its memory came back. With
/// `ADVERSARY_ONLY` set, only the parts whose name contains it run.
async fn part<F: Future<Output = String>>(name: &str, bound: Duration, body: F) {
    // The warm-up always runs: the other parts' memory baselines need the runtime's pools.
    if name != "warm-up" && std::env::var("ADVERSARY_ONLY").is_ok_and(|only| !name.contains(&only))
    {
        return;
    }
    let baseline = alloc::live_bytes();
    let started = Instant::now();
    let Ok(summary) = tokio::time::timeout(bound, body).await else {
        panic!("{name}: not done within {bound:?}");
    };
    let took = started.elapsed();
    let left = settle_memory(name, baseline).await;
    println!("{name:<14} ok in {took:>9.1?}  {summary}; {left:+} bytes left");
}

/// Waits (up to 5 s) for the live bytes to come back within the slack of `baseline`.
async fn settle_memory(name: &str, baseline: isize) -> isize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = alloc::live_bytes() - baseline;
        if left <= MEMORY_SLACK {
            return left;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {left} bytes still live after teardown"
        );
        tokio::time::sleep(ms(10)).await;
    }
}

/// User plus system CPU time of the process (from /proc; zero where there is none).
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // The kernel reports clock ticks of 1/100 s on every usual configuration.
    Duration::from_millis(ticks * 10)
}

/// Polls `cond` every millisecond until it holds, failing after `bound`.
async fn eventually(what: &str, bound: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {bound:?}");
        tokio::time::sleep(ms(1)).await;
    }
}

/// A task that reads the cache's entry count until `stop` is set, and returns the most it saw.
fn spawn_max_len(cache: &Cache, stop: &Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    let (cache, stop) = (cache.clone(), stop.clone());
    tokio::spawn(async move {
        let mut max = 0;
        while !stop.load(Ordering::Relaxed) {
            max = max.max(cache.len());
            tokio::task::yield_now().await;
        }
        max
    })
}

// ===== Parts =====

async fn churn() -> String {
    const MAX: usize = 64;
    const TASKS: usize = 8;
    const FAIL_EVERY: u64 = 7;
    let cache = Cache::builder(runtime()).max_entries(MAX).build();
    let probe = Probe::<1>::new(
        Duration::from_secs(3600),
        Duration::from_micros(300),
        FAIL_EVERY,
    );
    let calls = probe.calls.clone();
    let typed = cache.register(probe);
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = spawn_max_len(&cache, &stop);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let typed = typed.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9 + t as u64);
            let (mut ok, mut failed) = (0u64, 0u64);
            for _ in 0..2500 {
                // Half the gets on 40 hot keys (joins), half on 4 000 (churn).
                let k = if rng.next() % 2 == 0 {
                    rng.below(40)
                } else {
                    rng.below(4000)
                };
                let req = MockRequest::new(&format!("key-{k}"));
                let want = expected(&req.cache_info());
                match typed.get(&req).await {
                    Ok(got) => {
                        assert_eq!(got.value, Some(want), "churn: wrong value for {k}");
                        ok += 1;
                    }
                    Err(GetError::Fetch(_)) => {
                        assert!(fails(FAIL_EVERY, want), "churn: key {k} should not fail");
                        failed += 1;
                    }
                    Err(other) => panic!("churn: unexpected {other:?}"),
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for task in tasks {
        let (o, f) = task.await.expect("churn task");
        ok += o;
        failed += f;
    }
    stop.store(true, Ordering::Relaxed);
    let max_seen = monitor.await.expect("monitor");
    // Entries a get waits on are exempt: at most one per task on top of the bound.
    assert!(max_seen <= MAX + TASKS, "churn: {max_seen} entries at once");
    assert!(cache.len() <= MAX, "churn: {} entries at rest", cache.len());
    let m = cache.metrics().total();
    assert_eq!(m.entries, cache.len() as u64, "churn: {m:?}");
    assert!(m.failing <= m.entries, "churn: {m:?}");
    assert!(m.evictions_capacity > 1000, "churn: {m:?}");
    assert!(m.fetch_errors > 0 && failed > 0, "churn: {m:?}");
    let fetches = calls.load(Ordering::Relaxed);
    // A fetch whose entry is evicted while it runs is dropped uncounted.
    assert!(m.fetch_success + m.fetch_errors <= fetches, "churn: {m:?}");
    assert!(
        m.hits + m.misses_new + m.misses_blocking == ok + failed,
        "churn: {m:?}"
    );
    drop(typed);
    cache.close();
    format!(
        "{ok} ok, {failed} failed, {} hits, {fetches} fetches, {} evicted, at most {max_seen} \
         entries",
        m.hits, m.evictions_capacity
    )
}

async fn expiry() -> String {
    let cache = Cache::new(runtime());
    let one_ms = cache.register(Probe::<2>::new(ms(1), Duration::ZERO, 0));
    let zero = cache.register(Probe::<3>::new(Duration::ZERO, Duration::ZERO, 0));
    let never = cache.register(Probe::<4>::new(Duration::MAX, Duration::ZERO, 0));
    let fifty = cache.register(Probe::<5>::new(ms(50), Duration::from_micros(200), 0));
    let until = Instant::now() + ms(400);
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let (a, b, c, d) = (one_ms.clone(), zero.clone(), never.clone(), fifty.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(77 + t);
            let mut gets = 0u64;
            while Instant::now() < until {
                let req = MockRequest::new(&format!("e{}", rng.below(50)));
                let want = Some(expected(&req.cache_info()));
                assert_eq!(a.get(&req).await.expect("1 ms").value, want);
                assert_eq!(b.get(&req).await.expect("zero").value, want);
                assert_eq!(c.get(&req).await.expect("max").value, want);
                assert_eq!(d.get(&req).await.expect("50 ms").value, want);
                gets += 4;
            }
            gets
        }));
    }
    let mut gets = 0;
    for task in tasks {
        gets += task.await.expect("expiry task");
    }
    let row = |name: &str| {
        let m = cache.metrics();
        m.types
            .iter()
            .find(|t| t.name.contains(name))
            .cloned()
            .unwrap_or_else(|| panic!("no metrics row for {name}"))
    };
    let kept = row("Probe<4>").entries;
    eventually("short TTLs expire", Duration::from_secs(3), || {
        cache.len() as u64 == kept
    })
    .await;
    assert_eq!(kept, 50, "the Duration::MAX type keeps everything it read");
    let expired = cache.metrics().total().expirations;
    assert!(expired > 0);

    // A watched entry of the zero-TTL type: the expiry task must not spin on it.
    let (tx, rx) = async_channel::bounded(4);
    let watch = zero
        .notify(MockRequest::new("w").max_age(ms(100)), (), tx)
        .expect("watch");
    rx.recv().await.expect("first event");
    let before = cpu_time();
    let wall = Instant::now();
    tokio::time::sleep(ms(500)).await;
    let spent = cpu_time().saturating_sub(before);
    let wall = wall.elapsed();
    assert!(
        spent < wall / 2,
        "expiry: {spent:?} of CPU in {wall:?} while idle with a watched zero-TTL entry"
    );
    assert_eq!(cache.len() as u64, kept + 1, "the watched entry stays");
    drop(watch);
    eventually(
        "the unwatched entry expires",
        Duration::from_secs(3),
        || cache.len() as u64 == kept,
    )
    .await;
    drop((one_ms, zero, never, fifty));
    cache.close();
    format!("{gets} gets, {expired} expired, {spent:?} CPU while watched")
}

async fn reregistration() -> String {
    let rt = runtime();
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt, 0u64, 1);
    let opts = RegisterOptions::new().query_timeout(ms(50));
    let stale = cache.register(server.blocking_type(opts.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let replaced = Arc::new(AtomicU64::new(0));
    // The entry count never wraps below zero while stores are released under inserts.
    let monitor = spawn_max_len(&cache, &stop);
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let (cache, stop, replaced) = (cache.clone(), stop.clone(), replaced.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(5 + t);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A hit (or a refusal) is ready at once: let the other tasks run.
                tokio::task::yield_now().await;
                let typed = cache.typed::<MockType<u64>>().expect("registered");
                let req = MockRequest::new(&format!("r{}", rng.below(20))).timeout(ms(20));
                match typed.get(&req).await {
                    Ok(_) => n += 1,
                    Err(GetError::Replaced(_)) => {
                        replaced.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(other) => panic!("reregistration: get: {other:?}"),
                }
            }
            n
        }));
    }
    for t in 0..2u64 {
        let (cache, stop, replaced) = (cache.clone(), stop.clone(), replaced.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A hit (or a refusal) is ready at once: let the other tasks run.
                tokio::task::yield_now().await;
                let typed = cache.typed::<MockType<u64>>().expect("registered");
                match typed.watch(MockRequest::new(&format!("w{t}"))) {
                    Ok(mut stream) => {
                        // Ends when its registration is replaced.
                        while tokio::time::timeout(ms(100), stream.next())
                            .await
                            .ok()
                            .flatten()
                            .is_some()
                        {
                            n += 1;
                        }
                    }
                    Err(WatchError::Replaced(_)) => {
                        replaced.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(other) => panic!("reregistration: watch: {other:?}"),
                }
            }
            n
        }));
    }
    for i in 0..30u64 {
        tokio::time::sleep(ms(10)).await;
        server.set(i, i + 2);
        cache.register(server.blocking_type(opts.clone()));
    }
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for task in tasks {
        answered += task.await.expect("reregistration task");
    }
    let max_seen = monitor.await.expect("monitor");
    // A handle to a replaced registration keeps nothing, whatever is done through it.
    let before = alloc::live_bytes();
    for i in 0..2000u64 {
        stale
            .prepopulate(&RequestInfo::new(format!("p{i}")), i, 1)
            .expect("prepopulate");
        let got = stale.get(&MockRequest::new(&format!("p{i}"))).await;
        assert!(matches!(got, Err(GetError::Replaced(_))), "{got:?}");
    }
    let kept = alloc::live_bytes() - before;
    assert!(kept < 64 * 1024, "a stale handle kept {kept} bytes");
    drop(stale);
    let m = cache.metrics();
    assert_eq!(m.types.len(), 1, "only the last registration is listed");
    assert_eq!(m.total().entries, cache.len() as u64);
    assert!(cache.len() <= 22, "{} entries", cache.len());
    // A new registration is installed before the old one is released, so for a moment both
    // stores may hold entries (gets racing it reach the new store instead of being refused):
    // at most both stores' keys, never a count that wrapped.
    assert!(max_seen <= 44, "reregistration: {max_seen} entries at once");
    cache.close();
    format!(
        "{answered} answers, {} replaced",
        replaced.load(Ordering::Relaxed)
    )
}

async fn close_races() -> String {
    let mut rng = Rng(42);
    let (mut refused, mut handles_seen) = (0usize, 0usize);
    for round in 0..30u64 {
        let cache = Cache::new(runtime());
        let typed = cache.register(Probe::<6>::new(ms(1000), ms(1), 0));
        let handles = Arc::new(Mutex::new(Vec::new()));
        let closed_refusals = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for t in 0..6u64 {
            let (typed, handles, stop) = (typed.clone(), handles.clone(), stop.clone());
            let closed_refusals = closed_refusals.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let req = MockRequest::new(&format!("c{}", (i * 7 + t) % 16));
                    match t % 3 {
                        0 => match typed.get(&req).await {
                            Ok(_) | Err(GetError::Closed) => {}
                            Err(other) => panic!("close: get: {other:?}"),
                        },
                        1 => {
                            let (tx, rx) = async_channel::bounded(1);
                            match typed.notify(req.max_age(ms(5)), i, tx) {
                                Ok(handle) => handles.lock().unwrap().push((handle, rx)),
                                Err(WatchError::Closed) => {
                                    closed_refusals.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(other) => panic!("close: notify: {other:?}"),
                            }
                        }
                        _ => match typed.watch(req.max_age(ms(5))) {
                            // Every stream ends once the cache is closed.
                            Ok(mut stream) => while stream.next().await.is_some() {},
                            Err(WatchError::Closed) => {
                                closed_refusals.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(other) => panic!("close: watch: {other:?}"),
                        },
                    }
                    if i % 8 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_micros(rng.next() % 3000)).await;
        cache.close();
        // Once `close` returned, no watch is open, whatever raced it.
        let open = handles
            .lock()
            .unwrap()
            .iter()
            .filter(|(h, _)| h.is_active())
            .count();
        assert_eq!(open, 0, "close round {round}: {open} watches open");
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.expect("close task");
        }
        let handles = std::mem::take(&mut *handles.lock().unwrap());
        assert!(handles.iter().all(|(h, _)| !h.is_active()));
        handles_seen += handles.len();
        refused += closed_refusals.load(Ordering::Relaxed);
        assert_eq!(cache.metrics().total().watches, 0, "close round {round}");
        // Misses after close answer at once and leave nothing behind.
        let len = cache.len();
        for i in 0..100 {
            let miss = typed.get(&MockRequest::new(&format!("after-{i}"))).await;
            assert!(matches!(miss, Err(GetError::Closed)), "{miss:?}");
        }
        assert_eq!(
            cache.len(),
            len,
            "close round {round}: misses after close made entries"
        );
        drop(handles);
    }
    format!("30 rounds, {handles_seen} watches ended by close, {refused} refused after it")
}

async fn watch_fan_in() -> String {
    let rt = runtime();
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt, 1u64, 1);
    let typed = cache.register(
        server.blocking_type(
            RegisterOptions::new()
                .last_get_ttl(ms(100))
                .query_timeout(ms(200)),
        ),
    );
    let mut watches = Vec::new();
    for i in 0..2000u64 {
        let (tx, rx) = async_channel::bounded(2);
        let handle = typed
            .notify(MockRequest::new("hot"), i, tx)
            .expect("notify");
        watches.push((Some(handle), None, Some(rx)));
    }
    for _ in 0..200 {
        let stream = typed.watch(MockRequest::new("hot")).expect("watch");
        watches.push((None, Some(stream), None));
    }
    assert_eq!(cache.metrics().total().watches, 2200);
    let mut rng = Rng(2024);
    rng.shuffle(&mut watches);
    // Two tasks drop their halves in random order while the value changes.
    let second = watches.split_off(watches.len() / 2);
    let dropper = |mut list: Vec<_>, seed: u64| {
        tokio::spawn(async move {
            let mut rng = Rng(seed);
            while !list.is_empty() {
                let at = rng.below(list.len());
                // A receiver, handle or stream alone, in any order.
                let (handle, stream, rx): (Option<cache_core::WatchHandle>, Option<_>, Option<_>) =
                    list.swap_remove(at);
                if rng.next() % 2 == 0 {
                    drop(rx);
                    drop(handle);
                } else {
                    drop(handle);
                    drop(rx);
                }
                drop(stream);
                if list.len() % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let a = dropper(watches, 1);
    let b = dropper(second, 2);
    for i in 0..50u64 {
        server.set(i, i + 2);
        tokio::task::yield_now().await;
    }
    a.await.expect("dropper");
    b.await.expect("dropper");
    eventually("watch gauge back to 0", Duration::from_secs(3), || {
        cache.metrics().total().watches == 0
    })
    .await;
    eventually(
        "the unwatched entry expires",
        Duration::from_secs(3),
        || cache.is_empty(),
    )
    .await;
    drop(typed);
    cache.close();
    "2 200 watches of one key dropped in random order".to_owned()
}

async fn watch_vs_eviction() -> String {
    let cache = Cache::builder(runtime()).max_entries(4).build();
    let typed = cache.register(Probe::<8>::new(
        Duration::from_secs(3600),
        Duration::ZERO,
        0,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (typed, stop) = (typed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                typed
                    .get(&MockRequest::new(&format!("c{n}")))
                    .await
                    .expect("churn get");
                tokio::task::yield_now().await;
            }
            n
        })
    };
    let mut rng = Rng(99);
    let mut orphans = Vec::new();
    const ROUNDS: usize = 10_000;
    for i in 0..ROUNDS {
        let key = format!("w{i}");
        typed.get(&MockRequest::new(&key)).await.expect("get");
        for _ in 0..rng.below(4) {
            tokio::task::yield_now().await;
        }
        let (tx, _rx) = async_channel::bounded(1);
        let handle = typed
            .notify(
                MockRequest::new(&key).max_age(Duration::from_secs(3600)),
                (),
                tx,
            )
            .expect("notify");
        tokio::task::yield_now().await;
        let page = typed.entries(&cache_core::EntryQuery::new().prefix(key.clone()));
        let watched = page.entries.iter().any(|e| e.key == key && e.watchers > 0);
        if handle.is_active() && !watched {
            orphans.push(i);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let churned = churn.await.expect("churn");
    assert!(
        orphans.is_empty(),
        "watch vs eviction: {} of {ROUNDS} active watches lost their entry (first: {:?})",
        orphans.len(),
        orphans.first()
    );
    drop(typed);
    cache.close();
    format!("{ROUNDS} watches added under {churned} capacity evictions, none lost its entry")
}

async fn slow_consumers() -> String {
    const LAST: u64 = 300;
    const EACH: usize = 20;
    let rt = runtime();
    let cache = Cache::new(rt.clone());
    let server = MockServer::new(rt, 0u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new().query_timeout(ms(500))));
    // Channels of one slot and latest-wins streams, none read while the value changes.
    let mut channels = Vec::new();
    let mut streams = Vec::new();
    for i in 0..EACH {
        let (tx, rx) = async_channel::bounded(1);
        let handle = typed.notify(MockRequest::new("s"), i, tx).expect("notify");
        channels.push((handle, rx));
        streams.push(typed.watch(MockRequest::new("s")).expect("watch"));
    }
    // Each has seen the first value, so every one is registered before the changes.
    for (_, rx) in &channels {
        assert_eq!(rx.recv().await.expect("first").meta.index, 1);
    }
    for stream in &mut streams {
        assert_eq!(stream.next().await.expect("first").meta.index, 1);
    }
    for i in 1..=LAST {
        server.set(i, i + 1);
        if i % 10 == 0 {
            tokio::time::sleep(ms(1)).await;
        }
    }
    // Every consumer, read slowly now, ends on the latest value.
    let mut events = 0;
    for (_, rx) in &channels {
        loop {
            let event = rx.recv().await.expect("channel open");
            events += 1;
            if event.meta.index == LAST + 1 {
                assert_eq!(event.result, Some(LAST));
                break;
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
    }
    for stream in &mut streams {
        loop {
            let event = stream.next().await.expect("stream open");
            events += 1;
            if event.meta.index == LAST + 1 {
                assert_eq!(event.result, Some(LAST));
                break;
            }
        }
    }
    drop((streams, channels, typed));
    cache.close();
    format!(
        "{LAST} updates to {} slow consumers: {events} events to reach the latest",
        2 * EACH
    )
}

async fn extreme_keys() -> String {
    let cache = Cache::new(runtime());
    let typed = cache.register(Probe::<7>::new(
        Duration::from_secs(3600),
        Duration::ZERO,
        0,
    ));
    // The empty key bypasses the cache; it cannot be prepopulated.
    let empty = MockRequest::new("");
    let got = typed.get(&empty).await.expect("empty key");
    assert_eq!(got.value, Some(expected(&empty.cache_info())));
    assert!(cache.is_empty(), "an empty key is not cached");
    assert!(matches!(
        typed.prepopulate(&RequestInfo::new(""), 1, 1),
        Err(CacheError::EmptyKey)
    ));
    assert!(matches!(
        typed.watch(MockRequest::new("").max_age(ms(10))),
        Err(WatchError::EmptyKey)
    ));
    // Every split of 27, 28 and 29 bytes into key, datacenter and token (up to 3 bytes each).
    let text = "abcdefghijklmnopqrstuvwxyz0123456789";
    let mut requests = Vec::new();
    for total in [27usize, 28, 29] {
        for dc in 0..=3 {
            for token in 0..=3 {
                let k = total - dc - token;
                let mut req = MockRequest::new(&text[..k]);
                if dc > 0 {
                    req = req.datacenter(&text[k..k + dc]);
                }
                if token > 0 {
                    req = req.token(&text[k + dc..total]);
                }
                requests.push(req);
            }
        }
    }
    let big_key = "k".repeat(1 << 20);
    requests.push(MockRequest::new(&big_key));
    requests.push(MockRequest::new(&big_key).datacenter("dc1").token("secret"));
    drop(big_key);
    for round in 0..2 {
        for req in &requests {
            let got = typed.get(req).await.expect("extreme key");
            assert_eq!(got.value, Some(expected(&req.cache_info())));
            assert_eq!(got.meta.hit, round == 1, "hit on the second round only");
        }
    }
    assert_eq!(
        cache.len(),
        requests.len(),
        "one entry per distinct request"
    );
    typed
        .prepopulate(&requests[0].cache_info(), 5, 9)
        .expect("prepopulate");
    assert_eq!(
        typed.get(&requests[0]).await.expect("prepopulated").value,
        Some(5)
    );
    let n = requests.len();
    drop((requests, typed));
    cache.close();
    format!("{n} keys around the inline limit and 1 MiB")
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        // A warm-up, so that the runtime's pools exist before the first baseline.
        part("warm-up", Duration::from_secs(30), slow_consumers()).await;
        let start = alloc::live_bytes();
        part("churn", Duration::from_secs(60), churn()).await;
        part("expiry", Duration::from_secs(30), expiry()).await;
        part("reregistration", Duration::from_secs(30), reregistration()).await;
        part("close races", Duration::from_secs(60), close_races()).await;
        part("watch fan-in", Duration::from_secs(30), watch_fan_in()).await;
        part("slow consumers", Duration::from_secs(30), slow_consumers()).await;
        part(
            "watch/eviction",
            Duration::from_secs(60),
            watch_vs_eviction(),
        )
        .await;
        part("extreme keys", Duration::from_secs(30), extreme_keys()).await;
        let left = settle_memory("the whole run", start).await;
        println!("adversary: every part passed; {left:+} bytes left over the run");
    });
}
