//! The soak check behind `cargo xtask soak` (issue 10): the engine under a long mixed load on a
//! real tokio runtime, sampled every few seconds, failing if memory, entries, watches or tasks
//! grow without bound.
//!
//! # The load
//!
//! One long-lived cache, `Cache::builder(..).max_entries(1000)` (default 72 h TTL), for the
//! whole run, with:
//!
//! - **churn**: about 10 000 new keys a second, one `get` each (a miss and a fetch that
//!   answers at once), plus re-reads of recent keys (hits);
//! - **failing keys**: about 2 000 new keys a second whose fetch fails (a bad token);
//! - **watches**: about 50 a second on a blocking type, on hot keys (the upstream changes every
//!   200 ms) and cold keys (never change; a blocking fetch waits the whole 10 min
//!   `query_timeout`), plus polled watches (`max_age` 500 ms) on the churn type. They end in
//!   every way a user ends them: handle and receiver dropped after a few events; receiver
//!   dropped after the first event, with the handle detached (the watch must end by itself,
//!   though its cold key's fetch blocks for 10 min); receiver dropped while the handle is kept
//!   (in a ring of 256 that drops the oldest); a `WatchStream` dropped;
//! - **blocking gets** on hot keys with a `min_index`, most of them dropped after 30 ms;
//! - **index resets**: every 7 s the upstream's index goes back to 1;
//! - **re-registrations**: every 15 s the churn and failing types are registered again, every
//!   30 s the blocking type.
//!
//! And a **side cycle** every 3 s: a new cache (cap 100) with its own upstream gets entries
//! and 100 watches whose sinks share one channel, then two tasks keep calling `notify`
//! (detaching the handles) while the main task calls `close()`; then the cache is dropped and
//! its upstream shut down (in-flight fetches may finish, contract: Lifecycle 6; the upstream
//! answers them, as a restarting server would). Every watch must end at close: the shared channel must
//! close (every sink dropped) within 5 s, else the cycle counts as **stuck**.
//!
//! # What is measured
//!
//! - **live bytes**: the counting allocator ([`crate::alloc`]), the whole process;
//! - **entries**: `Cache::len()` of the long-lived cache (its metrics' entry gauge alongside);
//! - **watches**: watch sinks the engine still holds, in every cache and store, old and new
//!   (each sink is wrapped in a counter that is decremented when the engine drops it), with
//!   the metrics' watch gauge alongside;
//! - **tasks**: the engine's spawned futures not yet finished, counted by a wrapping
//!   [`Runtime`] (tokio's own count of alive tasks, which includes the soak's consumers, is
//!   printed alongside), and its live timers; and, printed only, the upstream reads in
//!   progress (fetches the engine started that have not returned; an evicted entry's fetch is
//!   dropped at once, contract: Fetch 7).
//!
//! # The verdict
//!
//! The first third of the run is warm-up (rings and caps fill). A quantity **grows without
//! bound** if the median of its samples in the last third exceeds the median in the second third
//! by more than 10 % plus a fixed slack (8 MiB of live bytes, 200 entries, 64 watches,
//! 64 tasks). A bounded quantity that oscillates has the same median in both thirds; one that
//! grows linearly has a last-third median 1.67× its second-third one (for a start at zero), far
//! outside the tolerance at any rate that matters over a couple of minutes. Also failing: any
//! stuck side cycle, and after teardown (every load task stopped, every cache closed and
//! dropped, every upstream shut down) any engine task or timer still alive after 10 s.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cache_core::watch::{SinkClosed, TrySendError};
use cache_core::{
    BoxFuture, Cache, CacheRequest, CacheType, EventSink, FetchOptions, FetchResult,
    RegisterOptions, RequestInfo, Runtime, SharedRuntime, Timer, UpdateEvent,
};
use cache_tokio::TokioRuntime;
use futures::StreamExt;
use tokio::sync::watch;

/// How long and how hard to soak.
#[derive(Debug, Clone)]
pub struct Config {
    /// The length of the loaded phase.
    pub duration: Duration,
    /// Time between samples.
    pub interval: Duration,
    /// New churned keys per 10 ms tick.
    pub churn_per_tick: usize,
    /// New failing keys per 10 ms tick.
    pub failing_per_tick: usize,
    /// Time between two new watches.
    pub watch_every: Duration,
    /// Time between side cycles (a cache created, closed under `notify`, dropped).
    pub side_every: Duration,
    /// The capacity bound of the long-lived cache.
    pub max_entries: usize,
    /// Print a line per sample to stdout.
    pub print: bool,
}

impl Config {
    /// The real soak, `secs` seconds long, a sample every `secs / 24` (between 0.2 and 5 s).
    pub fn new(secs: u64) -> Self {
        let duration = Duration::from_secs(secs.max(1));
        Self {
            duration,
            interval: (duration / 24).clamp(Duration::from_millis(200), Duration::from_secs(5)),
            churn_per_tick: 100,
            failing_per_tick: 20,
            watch_every: Duration::from_millis(20),
            side_every: Duration::from_secs(3),
            max_entries: 1000,
            print: true,
        }
    }

    /// A short, light run that only proves the soak works (tests, debug builds).
    pub fn smoke() -> Self {
        Self {
            duration: Duration::from_millis(1000),
            interval: Duration::from_millis(200),
            churn_per_tick: 5,
            failing_per_tick: 2,
            watch_every: Duration::from_millis(20),
            side_every: Duration::from_millis(500),
            max_entries: 100,
            print: false,
        }
    }
}

// ===== Counting the engine's tasks and timers =====

/// Spawned and finished futures, and created and dropped timers, of a [`CountedRuntime`].
#[derive(Debug, Default)]
pub struct TaskCounts {
    spawned: AtomicU64,
    finished: AtomicU64,
    timers: AtomicI64,
}

impl TaskCounts {
    /// Futures spawned and not yet finished (or dropped).
    pub fn live_tasks(&self) -> i64 {
        self.spawned.load(Ordering::SeqCst) as i64 - self.finished.load(Ordering::SeqCst) as i64
    }

    /// Futures spawned so far.
    pub fn spawned(&self) -> u64 {
        self.spawned.load(Ordering::SeqCst)
    }

    /// Timers created and not yet dropped.
    pub fn live_timers(&self) -> i64 {
        self.timers.load(Ordering::SeqCst)
    }
}

/// A [`Runtime`] over tokio that counts the engine's spawned futures (finished when they
/// complete or are dropped) and its live timers.
#[derive(Debug)]
pub struct CountedRuntime {
    inner: TokioRuntime,
    counts: Arc<TaskCounts>,
}

impl CountedRuntime {
    /// Counts what the engine does on the tokio runtime behind `handle`.
    pub fn new(handle: tokio::runtime::Handle) -> Self {
        Self {
            inner: TokioRuntime::from_handle(handle),
            counts: Arc::default(),
        }
    }

    /// The counters.
    pub fn counts(&self) -> Arc<TaskCounts> {
        self.counts.clone()
    }
}

struct Finished(Arc<TaskCounts>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct TimerGone(Arc<TaskCounts>);

impl Drop for TimerGone {
    fn drop(&mut self) {
        self.0.timers.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct CountedTimer {
    inner: Pin<Box<dyn Timer>>,
    _gone: TimerGone,
}

impl Timer for CountedTimer {
    fn poll_elapsed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().inner.as_mut().poll_elapsed(cx)
    }

    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.get_mut().inner.as_mut().reset(deadline);
    }
}

impl Runtime for CountedRuntime {
    fn spawn(&self, future: BoxFuture<'static, ()>) {
        self.counts.spawned.fetch_add(1, Ordering::SeqCst);
        let finished = Finished(self.counts.clone());
        self.inner.spawn(Box::pin(async move {
            let _finished = finished;
            future.await;
        }));
    }

    fn timer(&self, deadline: Instant) -> Pin<Box<dyn Timer>> {
        self.counts.timers.fetch_add(1, Ordering::SeqCst);
        Box::pin(CountedTimer {
            inner: self.inner.timer(deadline),
            _gone: TimerGone(self.counts.clone()),
        })
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }
}

// ===== Counting the watch sinks the engine holds =====

/// Watch sinks alive (held by the engine or by a handle).
static SINKS: AtomicI64 = AtomicI64::new(0);

/// A sink that counts itself in [`SINKS`] while it exists.
struct CountedSink<S> {
    inner: S,
}

impl<S> CountedSink<S> {
    fn new(inner: S) -> Self {
        SINKS.fetch_add(1, Ordering::SeqCst);
        Self { inner }
    }
}

impl<S> Drop for CountedSink<S> {
    fn drop(&mut self) {
        SINKS.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<Ev, S: EventSink<Ev>> EventSink<Ev> for CountedSink<S> {
    fn try_send(&self, event: Ev) -> Result<(), TrySendError> {
        self.inner.try_send(event)
    }

    fn send(&self, event: Ev) -> BoxFuture<'static, Result<(), SinkClosed>> {
        self.inner.send(event)
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

// ===== The upstream and the cache types =====

/// The upstream's state: the index of the hot keys, and whether it is shut down.
#[derive(Debug, Clone, Copy)]
struct UpState {
    hot: u64,
    down: bool,
}

/// Reads in progress at every [`Upstream`] (blocking fetches waiting for a change).
static READS: AtomicI64 = AtomicI64::new(0);

/// Counts one read in [`READS`] while it exists.
struct Reading;

impl Reading {
    fn start() -> Self {
        READS.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        READS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A server answering blocking reads: keys starting with `hot/` are at the shared hot index,
/// every other key stays at index 1 forever.
#[derive(Debug)]
struct Upstream {
    state: watch::Sender<UpState>,
}

impl Upstream {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: watch::Sender::new(UpState {
                hot: 1,
                down: false,
            }),
        })
    }

    fn bump(&self) {
        self.state.send_modify(|s| s.hot += 1);
    }

    /// The index goes backwards (a server restored from a snapshot).
    fn reset(&self) {
        self.state.send_modify(|s| s.hot = 1);
    }

    fn hot_index(&self) -> u64 {
        self.state.borrow().hot
    }

    /// Every read from now on fails at once, and blocked reads return.
    fn shut_down(&self) {
        self.state.send_modify(|s| s.down = true);
    }

    async fn read(
        &self,
        key: &str,
        min_index: u64,
        timeout: Duration,
    ) -> Result<FetchResult<Arc<u64>>, SoakError> {
        let _reading = Reading::start();
        let mut rx = self.state.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let state = *rx.borrow_and_update();
            if state.down {
                return Err(SoakError::Down);
            }
            let index = if key.starts_with("hot/") {
                state.hot
            } else {
                1
            };
            if index != min_index || timeout.is_zero() {
                return Ok(FetchResult::new(Arc::new(index), index));
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Err(_) => return Ok(FetchResult::new(Arc::new(index), index)),
                Ok(Err(_)) => return Err(SoakError::Down),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// The soak types' fetch errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoakError {
    /// The failing type's answer.
    Refused,
    /// The upstream was shut down.
    Down,
}

impl std::fmt::Display for SoakError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SoakError::Refused => "refused (bad token)",
            SoakError::Down => "upstream shut down",
        })
    }
}

impl std::error::Error for SoakError {}

/// A soak request: a key, and the get's blocking options.
#[derive(Debug, Clone)]
struct Req {
    key: String,
    min_index: u64,
    timeout: Option<Duration>,
    max_age: Option<Duration>,
}

impl Req {
    fn key(key: String) -> Self {
        Self {
            key,
            min_index: 0,
            timeout: None,
            max_age: None,
        }
    }
}

impl CacheRequest for Req {
    fn cache_info(&self) -> RequestInfo<'_> {
        let mut info = RequestInfo::new(self.key.as_str()).min_index(self.min_index);
        if let Some(t) = self.timeout {
            info = info.timeout(t);
        }
        if let Some(a) = self.max_age {
            info = info.max_age(a);
        }
        info
    }
}

/// Non-blocking, answers at once; compares values, so a polled watch delivers real changes.
#[derive(Debug)]
struct Churn;

impl CacheType for Churn {
    type Request = Req;
    type Value = Arc<u64>;
    type Error = SoakError;

    async fn fetch(
        &self,
        _: FetchOptions<Arc<u64>>,
        _: &Req,
    ) -> Result<FetchResult<Arc<u64>>, SoakError> {
        Ok(FetchResult::new(Arc::new(1), 1))
    }

    fn value_eq(&self, a: &Arc<u64>, b: &Arc<u64>) -> bool {
        a == b
    }
}

/// Every fetch fails at once.
#[derive(Debug)]
struct Failing;

impl CacheType for Failing {
    type Request = Req;
    type Value = Arc<u64>;
    type Error = SoakError;

    async fn fetch(
        &self,
        _: FetchOptions<Arc<u64>>,
        _: &Req,
    ) -> Result<FetchResult<Arc<u64>>, SoakError> {
        Err(SoakError::Refused)
    }
}

/// A blocking type on an [`Upstream`], default options (10 min query timeout, 72 h TTL).
#[derive(Debug)]
struct Watched(Arc<Upstream>);

impl CacheType for Watched {
    type Request = Req;
    type Value = Arc<u64>;
    type Error = SoakError;

    fn register_options(&self) -> RegisterOptions {
        RegisterOptions::new().supports_blocking(true)
    }

    async fn fetch(
        &self,
        opts: FetchOptions<Arc<u64>>,
        req: &Req,
    ) -> Result<FetchResult<Arc<u64>>, SoakError> {
        self.0.read(&req.key, opts.min_index, opts.timeout).await
    }
}

type Event = UpdateEvent<u64, Arc<u64>, SoakError>;

// ===== Samples and the verdict =====

/// One sample of the quantities the soak watches.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    /// Live bytes of the whole process (counting allocator).
    pub live_bytes: f64,
    /// Resident set size, bytes (0 where unknown); printed, not judged (malloc keeps pages).
    pub rss: f64,
    /// `len()` of the long-lived cache.
    pub entries: f64,
    /// Its metrics' entry gauge (every registered type).
    pub entries_gauge: f64,
    /// Watch sinks alive, every cache and store.
    pub watches: f64,
    /// The long-lived cache's metrics' watch gauge.
    pub watches_gauge: f64,
    /// The engine's live spawned futures.
    pub tasks: f64,
    /// The engine's live timers.
    pub timers: f64,
    /// tokio's alive tasks (the engine's and the soak's own).
    pub tokio_tasks: f64,
    /// Upstream reads in progress (fetches the engine started and that have not returned).
    pub reads: f64,
}

/// A judged quantity: its name, how to read it from a sample, and its fixed slack.
type Judged = (&'static str, fn(&Sample) -> f64, f64);

/// The judged quantities.
const JUDGED: [Judged; 4] = [
    ("live bytes", |s| s.live_bytes, 8.0 * 1024.0 * 1024.0),
    ("entries", |s| s.entries, 200.0),
    ("watches", |s| s.watches, 64.0),
    ("tasks", |s| s.tasks, 64.0),
];

/// The relative tolerance between the second and the last third.
const TOLERANCE: f64 = 0.10;

/// Whether one quantity stayed bounded.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The quantity.
    pub quantity: &'static str,
    /// Mean over the second third of the run.
    pub second: f64,
    /// Mean over the last third.
    pub last: f64,
    /// The most the last third may reach.
    pub limit: f64,
}

impl Verdict {
    /// Whether it grew past the limit.
    pub fn grew(&self) -> bool {
        self.last > self.limit
    }
}

/// The means of `f` over the second and the last third of the run; `None` with fewer than two
/// samples in either.
pub fn thirds(samples: &[Sample], duration: Duration, f: fn(&Sample) -> f64) -> Option<(f64, f64)> {
    let v = judge_with(samples, duration, &[("", f, 0.0)])?;
    Some((v[0].second, v[0].last))
}

/// Judges every quantity over `samples` (taken over `duration`): mean of the last third
/// against the mean of the second third. `None` with fewer than two samples in a third.
pub fn judge(samples: &[Sample], duration: Duration) -> Option<Vec<Verdict>> {
    judge_with(samples, duration, &JUDGED)
}

fn judge_with(samples: &[Sample], duration: Duration, judged: &[Judged]) -> Option<Vec<Verdict>> {
    let third = duration.as_secs_f64() / 3.0;
    let in_range = |lo: f64, hi: f64| -> Vec<&Sample> {
        samples.iter().filter(|s| s.t >= lo && s.t < hi).collect()
    };
    let second = in_range(third, 2.0 * third);
    let last = in_range(2.0 * third, f64::INFINITY);
    if second.len() < 2 || last.len() < 2 {
        return None;
    }
    // The median, not the mean: one sample taken during a burst (a side cache holding a
    // thousand watches just before its close) is not growth, and a quantity that grows
    // linearly still has a last-third median about 1.67× its second-third one.
    let mean = |set: &[&Sample], f: fn(&Sample) -> f64| {
        let mut values: Vec<f64> = set.iter().map(|s| f(s)).collect();
        values.sort_by(f64::total_cmp);
        let mid = values.len() / 2;
        if values.len() % 2 == 1 {
            values[mid]
        } else {
            (values[mid - 1] + values[mid]) / 2.0
        }
    };
    Some(
        judged
            .iter()
            .map(|&(quantity, f, slack)| {
                let second = mean(&second, f);
                Verdict {
                    quantity,
                    second,
                    last: mean(&last, f),
                    limit: second.max(0.0) * (1.0 + TOLERANCE) + slack,
                }
            })
            .collect(),
    )
}

/// Operation counters of the load.
#[derive(Debug, Default)]
struct Ops {
    churned: AtomicU64,
    hits: AtomicU64,
    failing: AtomicU64,
    watches_opened: AtomicU64,
    watch_errors: AtomicU64,
    events: AtomicU64,
    blocking_gets: AtomicU64,
    resets: AtomicU64,
    reregistrations: AtomicU64,
    side_cycles: AtomicU64,
    side_refused: AtomicU64,
    stuck: AtomicU64,
}

/// What a soak saw.
#[derive(Debug)]
pub struct Report {
    /// The samples, in time order.
    pub samples: Vec<Sample>,
    /// One per judged quantity (`None`: too few samples to judge).
    pub verdicts: Option<Vec<Verdict>>,
    /// Side cycles whose watches did not all end within 5 s of `close()`.
    pub stuck_cycles: u64,
    /// Side cycles run.
    pub side_cycles: u64,
    /// Engine tasks and timers still alive 10 s after teardown.
    pub tasks_after_teardown: (i64, i64),
    /// Watch sinks still alive after teardown.
    pub sinks_after_teardown: i64,
    /// Live bytes after teardown minus before the first cache was built.
    pub bytes_after_teardown: f64,
    /// Engine futures spawned over the run.
    pub spawned: u64,
    /// Upstream reads in progress, mean over the second and the last third.
    pub reads: Option<(f64, f64)>,
}

impl Report {
    /// The failures, each a sentence naming its quantity; empty when the soak passed.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.verdicts {
            None => out.push("too few samples to judge growth (run longer)".to_owned()),
            Some(verdicts) => {
                for v in verdicts.iter().filter(|v| v.grew()) {
                    let mut line = format!(
                        "{} grows without bound: median {} over the last third against {} over \
                         the second third (limit {})",
                        v.quantity,
                        show(v.quantity, v.last),
                        show(v.quantity, v.second),
                        show(v.quantity, v.limit)
                    );
                    if let (true, Some((second, last))) = (v.quantity == "tasks", self.reads) {
                        line += &format!(
                            "; of them, fetches still reading from the upstream: {last:.0} \
                             against {second:.0}"
                        );
                    }
                    out.push(line);
                }
            }
        }
        if self.stuck_cycles > 0 {
            out.push(format!(
                "watches outlive close(): in {} of {} side cycles a watch was still open 5 s \
                 after close()",
                self.stuck_cycles, self.side_cycles
            ));
        }
        let (tasks, timers) = self.tasks_after_teardown;
        if tasks != 0 || timers != 0 {
            out.push(format!(
                "tasks outlive teardown: {tasks} engine tasks and {timers} timers still alive \
                 10 s after every cache was closed and dropped"
            ));
        }
        if self.sinks_after_teardown != 0 {
            out.push(format!(
                "watches outlive teardown: {} watch sinks still held after every cache was \
                 closed and dropped",
                self.sinks_after_teardown
            ));
        }
        out
    }
}

fn show(quantity: &str, x: f64) -> String {
    if quantity == "live bytes" {
        mib(x)
    } else {
        format!("{x:.0}")
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

// ===== The run =====

/// Runs the soak and returns what it saw; prints a line per sample when `config.print`.
pub fn run(config: &Config) -> Report {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::rt::cpus())
        .enable_all()
        .build()
        .expect("tokio runtime");
    let counted = Arc::new(CountedRuntime::new(rt.handle().clone()));
    let counts = counted.counts();
    let shared: SharedRuntime = counted.clone();
    let start_bytes = crate::alloc::live_bytes() as f64;
    let start_sinks = SINKS.load(Ordering::SeqCst);

    let ops = Arc::new(Ops::default());
    let stop = Arc::new(AtomicBool::new(false));
    let upstream = Upstream::new();
    let cache = Cache::builder(shared.clone())
        .max_entries(config.max_entries)
        .build();
    cache.register(Churn);
    cache.register(Failing);
    cache.register(Watched(upstream.clone()));

    let load = Load {
        cache: cache.clone(),
        upstream: upstream.clone(),
        shared: shared.clone(),
        ops: ops.clone(),
        stop: stop.clone(),
        config: config.clone(),
        ring: Arc::new(Mutex::new(std::collections::VecDeque::new())),
    };
    let tasks: Vec<tokio::task::JoinHandle<()>> = vec![
        rt.spawn(load.clone().churn()),
        rt.spawn(load.clone().failing()),
        rt.spawn(load.clone().watches()),
        rt.spawn(load.clone().upstream_changes()),
        rt.spawn(load.clone().blocking_gets()),
        rt.spawn(load.clone().reregister()),
        rt.spawn(load.clone().side_cycles()),
    ];

    if config.print {
        println!(
            "soak: {} s, a sample every {:.1} s; max_entries({}), ~{} new keys/s, ~{} failing \
             keys/s, a watch every {} ms, a side cache closed every {:.1} s",
            config.duration.as_secs(),
            config.interval.as_secs_f64(),
            config.max_entries,
            config.churn_per_tick * 100,
            config.failing_per_tick * 100,
            config.watch_every.as_millis(),
            config.side_every.as_secs_f64()
        );
        println!(
            "{:>6} {:>11} {:>9} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6} {:>6} {:>6} | {:>9} {:>8} {:>7} {:>5}",
            "t s",
            "live",
            "rss",
            "entries",
            "(gauge)",
            "watches",
            "(gauge)",
            "tasks",
            "timers",
            "tokio",
            "reads",
            "keys",
            "failing",
            "watched",
            "side"
        );
    }
    let began = Instant::now();
    let mut samples = Vec::new();
    let mut next = began + config.interval;
    while next <= began + config.duration + Duration::from_millis(1) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += config.interval;
        let totals = cache.metrics().total();
        let sample = Sample {
            t: began.elapsed().as_secs_f64(),
            live_bytes: crate::alloc::live_bytes() as f64 - start_bytes,
            rss: crate::alloc::rss_bytes().unwrap_or(0) as f64,
            entries: cache.len() as f64,
            entries_gauge: totals.entries as f64,
            watches: (SINKS.load(Ordering::SeqCst) - start_sinks) as f64,
            watches_gauge: totals.watches as f64,
            tasks: counts.live_tasks() as f64,
            timers: counts.live_timers() as f64,
            tokio_tasks: rt.metrics().num_alive_tasks() as f64,
            reads: READS.load(Ordering::SeqCst) as f64,
        };
        if config.print {
            let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
            println!(
                "{:>6.1} {:>11} {:>9} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6} {:>6} {:>6} | {:>9} {:>8} {:>7} {:>5}",
                sample.t,
                mib(sample.live_bytes),
                format!("{:.0} MiB", sample.rss / (1024.0 * 1024.0)),
                sample.entries,
                sample.entries_gauge,
                sample.watches,
                sample.watches_gauge,
                sample.tasks,
                sample.timers,
                sample.tokio_tasks,
                sample.reads,
                n(&ops.churned),
                n(&ops.failing),
                n(&ops.watches_opened),
                n(&ops.side_cycles),
            );
        }
        samples.push(sample);
    }

    // Teardown: stop the load, drop every handle, close and drop the cache, shut the
    // upstream down, and wait for the engine's tasks to end.
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for task in tasks {
            let _ = task.await;
        }
    });
    load.ring.lock().unwrap_or_else(|p| p.into_inner()).clear();
    drop(load);
    cache.close();
    drop(cache);
    upstream.shut_down();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (counts.live_tasks() != 0 || counts.live_timers() != 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let tasks_after = (counts.live_tasks(), counts.live_timers());
    let report = Report {
        verdicts: judge(&samples, config.duration),
        stuck_cycles: ops.stuck.load(Ordering::SeqCst),
        side_cycles: ops.side_cycles.load(Ordering::SeqCst),
        tasks_after_teardown: tasks_after,
        sinks_after_teardown: SINKS.load(Ordering::SeqCst) - start_sinks,
        bytes_after_teardown: crate::alloc::live_bytes() as f64 - start_bytes,
        spawned: counts.spawned(),
        reads: thirds(&samples, config.duration, |s| s.reads),
        samples,
    };
    if config.print {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        println!(
            "load: {} churned keys, {} hits, {} failing gets, {} watches opened ({} refused), \
             {} events, {} blocking gets, {} index resets, {} re-registrations, {} side cycles \
             ({} notify calls refused after close), {} engine futures spawned",
            n(&ops.churned),
            n(&ops.hits),
            n(&ops.failing),
            n(&ops.watches_opened),
            n(&ops.watch_errors),
            n(&ops.events),
            n(&ops.blocking_gets),
            n(&ops.resets),
            n(&ops.reregistrations),
            n(&ops.side_cycles),
            n(&ops.side_refused),
            report.spawned,
        );
        println!(
            "teardown: {} engine tasks, {} timers, {} watch sinks left; live bytes {} over the \
             start",
            tasks_after.0,
            tasks_after.1,
            report.sinks_after_teardown,
            mib(report.bytes_after_teardown)
        );
    }
    drop(rt);
    report
}

/// Everything a load task needs.
#[derive(Clone)]
struct Load {
    cache: Cache,
    upstream: Arc<Upstream>,
    shared: SharedRuntime,
    ops: Arc<Ops>,
    stop: Arc<AtomicBool>,
    config: Config,
    /// Handles kept while their receivers are gone; the oldest is dropped past 256.
    ring: Arc<Mutex<std::collections::VecDeque<cache_core::WatchHandle>>>,
}

const RING: usize = 256;
const HOT_KEYS: usize = 64;
const COLD_KEYS: usize = 512;
const POLLED_KEYS: usize = 64;

impl Load {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn ticker(period: Duration) -> tokio::time::Interval {
        let mut t = tokio::time::interval(period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    }

    /// New keys through the bound, and re-reads of recent ones.
    async fn churn(self) {
        let mut tick = Self::ticker(Duration::from_millis(10));
        let mut n = 0u64;
        while !self.stopped() {
            tick.tick().await;
            for _ in 0..self.config.churn_per_tick {
                let _ = self.cache.get::<Churn>(&Req::key(format!("c/{n}"))).await;
                n += 1;
            }
            for back in 1..=10u64.min(n) {
                if let Ok(r) = self
                    .cache
                    .get::<Churn>(&Req::key(format!("c/{}", n - back)))
                    .await
                {
                    if r.meta.hit {
                        self.ops.hits.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            self.ops
                .churned
                .fetch_add(self.config.churn_per_tick as u64, Ordering::Relaxed);
        }
    }

    /// New keys whose fetch fails.
    async fn failing(self) {
        let mut tick = Self::ticker(Duration::from_millis(10));
        let mut n = 0u64;
        while !self.stopped() {
            tick.tick().await;
            for _ in 0..self.config.failing_per_tick {
                let _ = self.cache.get::<Failing>(&Req::key(format!("f/{n}"))).await;
                n += 1;
            }
            self.ops
                .failing
                .fetch_add(self.config.failing_per_tick as u64, Ordering::Relaxed);
        }
    }

    /// Watches opened and ended in every way.
    async fn watches(self) {
        let mut tick = Self::ticker(self.config.watch_every);
        let mut n = 0u64;
        while !self.stopped() {
            tick.tick().await;
            n += 1;
            let hot = Req::key(format!("hot/{}", n as usize % HOT_KEYS));
            let cold = Req::key(format!("cold/{}", (n as usize * 7) % COLD_KEYS));
            match n % 6 {
                // Read up to 3 events, then drop receiver and handle.
                0 => self.open(hot, n, 3, End::Drop),
                // The first event read, then the receiver dropped while the watch waits for
                // a change that does not come; handle detached: the watch must end by itself.
                1 => self.open(cold, n, 1, End::Detach),
                // Receiver dropped at once, handle kept (in the ring).
                2 => self.open(hot, n, 0, End::Keep),
                // The first event read, then the receiver dropped; handle kept (in the ring).
                3 => self.open(cold, n, 1, End::Keep),
                // A polled watch on the churn type: two events, then receiver dropped.
                4 => {
                    let mut req = Req::key(format!("p/{}", n as usize % POLLED_KEYS));
                    req.max_age = Some(Duration::from_millis(500));
                    let (tx, rx) = async_channel::bounded::<Event>(1);
                    match self
                        .cache
                        .typed::<Churn>()
                        .map(|t| t.notify(req, n, CountedSink::new(tx)))
                    {
                        Some(Ok(handle)) => {
                            self.ops.watches_opened.fetch_add(1, Ordering::Relaxed);
                            handle.detach();
                            self.consume(rx, 2);
                        }
                        _ => {
                            self.ops.watch_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // A WatchStream: one event, then dropped.
                _ => match self.cache.typed::<Watched>().map(|t| t.watch(hot)) {
                    Some(Ok(mut stream)) => {
                        self.ops.watches_opened.fetch_add(1, Ordering::Relaxed);
                        let ops = self.ops.clone();
                        tokio::spawn(async move {
                            if let Ok(Some(_)) =
                                tokio::time::timeout(Duration::from_secs(2), stream.next()).await
                            {
                                ops.events.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                    _ => {
                        self.ops.watch_errors.fetch_add(1, Ordering::Relaxed);
                    }
                },
            }
        }
    }

    /// A watch on the blocking type with its own bounded(1) channel; a consumer task reads
    /// `events` events (at most 2 s each) and drops the receiver; the handle ends as `end`.
    fn open(&self, req: Req, id: u64, events: usize, end: End) {
        let (tx, rx) = async_channel::bounded::<Event>(1);
        let Some(typed) = self.cache.typed::<Watched>() else {
            return;
        };
        match typed.notify(req, id, CountedSink::new(tx)) {
            Ok(handle) => {
                self.ops.watches_opened.fetch_add(1, Ordering::Relaxed);
                match end {
                    End::Drop => {
                        let ops = self.ops.clone();
                        tokio::spawn(async move {
                            read_events(&ops, &rx, events).await;
                            drop(rx);
                            drop(handle);
                        });
                        return;
                    }
                    End::Detach => handle.detach(),
                    End::Keep => {
                        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
                        ring.push_back(handle);
                        if ring.len() > RING {
                            ring.pop_front();
                        }
                    }
                }
                self.consume(rx, events);
            }
            Err(_) => {
                self.ops.watch_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reads `events` events in a task, then drops the receiver.
    fn consume(&self, rx: async_channel::Receiver<Event>, events: usize) {
        if events == 0 {
            return;
        }
        let ops = self.ops.clone();
        tokio::spawn(async move {
            read_events(&ops, &rx, events).await;
        });
    }

    /// The upstream changes every 200 ms; every 7 s its index goes back to 1.
    async fn upstream_changes(self) {
        let mut tick = Self::ticker(Duration::from_millis(200));
        let mut n = 0u64;
        while !self.stopped() {
            tick.tick().await;
            n += 1;
            if n % 35 == 0 {
                self.upstream.reset();
                self.ops.resets.fetch_add(1, Ordering::Relaxed);
            } else {
                self.upstream.bump();
            }
        }
    }

    /// Blocking gets on hot keys at their current index, most dropped after 30 ms.
    async fn blocking_gets(self) {
        let mut tick = Self::ticker(Duration::from_millis(50));
        let mut n = 0usize;
        while !self.stopped() {
            tick.tick().await;
            n += 1;
            let req = Req {
                key: format!("hot/{}", n % HOT_KEYS),
                min_index: self.upstream.hot_index(),
                timeout: Some(Duration::from_secs(1)),
                max_age: None,
            };
            let cache = self.cache.clone();
            let ops = self.ops.clone();
            tokio::spawn(async move {
                let get = cache.get::<Watched>(&req);
                let _ = tokio::time::timeout(Duration::from_millis(30), get).await;
                ops.blocking_gets.fetch_add(1, Ordering::Relaxed);
            });
        }
    }

    /// Registers the types again: churn and failing every 15 s, the blocking type every 30 s.
    async fn reregister(self) {
        let mut tick = Self::ticker(Duration::from_millis(100));
        let mut n = 0u64;
        while !self.stopped() {
            tick.tick().await;
            n += 1;
            if n % 150 == 0 {
                self.cache.register(Churn);
                self.cache.register(Failing);
                self.ops.reregistrations.fetch_add(2, Ordering::Relaxed);
            }
            if n % 300 == 0 {
                self.cache.register(Watched(self.upstream.clone()));
                self.ops.reregistrations.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A cache created, used, closed while `notify` races it, and dropped, over and over.
    async fn side_cycles(self) {
        let mut tick = Self::ticker(self.config.side_every);
        tick.tick().await;
        while !self.stopped() {
            tick.tick().await;
            if self.stopped() {
                break;
            }
            self.side_cycle().await;
        }
    }

    async fn side_cycle(&self) {
        let upstream = Upstream::new();
        let cache = Cache::builder(self.shared.clone()).max_entries(100).build();
        let churn = cache.register(Churn);
        let watched = cache.register(Watched(upstream.clone()));
        for i in 0..200 {
            let _ = churn.get(&Req::key(format!("s/{i}"))).await;
        }
        // Every watch of this cache sends into one channel; it closes when every sink is
        // dropped, that is when every watch has ended.
        let (tx, rx) = async_channel::bounded::<Event>(16);
        let ended = tokio::spawn(async move {
            loop {
                match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return true,
                    Err(_) => return false,
                }
            }
        });
        let mut handles = Vec::new();
        for i in 0..100u64 {
            let key = if i % 2 == 0 { "hot" } else { "cold" };
            if let Ok(h) = watched.notify(
                Req::key(format!("{key}/{}", i % 10)),
                i,
                CountedSink::new(tx.clone()),
            ) {
                handles.push(h);
            }
        }
        upstream.bump();
        let racing = AtomicBool::new(true);
        let racing = Arc::new(racing);
        let mut notifiers = Vec::new();
        for t in 0..2u64 {
            let watched = watched.clone();
            let tx = tx.clone();
            let racing = racing.clone();
            let ops = self.ops.clone();
            notifiers.push(tokio::spawn(async move {
                let mut i = 0u64;
                while racing.load(Ordering::Relaxed) {
                    i += 1;
                    let req = Req::key(format!(
                        "{}/{}",
                        if i % 2 == 0 { "hot" } else { "cold" },
                        i % 20
                    ));
                    match watched.notify(
                        req,
                        1000 + t * 1_000_000 + i,
                        CountedSink::new(tx.clone()),
                    ) {
                        Ok(h) => h.detach(),
                        Err(_) => {
                            ops.side_refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if i % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        drop(tx);
        tokio::time::sleep(Duration::from_millis(20)).await;
        cache.close();
        tokio::time::sleep(Duration::from_millis(10)).await;
        racing.store(false, Ordering::Relaxed);
        for n in notifiers {
            let _ = n.await;
        }
        // Handles detached: only close may end these watches now.
        for h in handles {
            h.detach();
        }
        drop((churn, watched, cache));
        upstream.shut_down();
        let closed = tokio::time::timeout(Duration::from_secs(5), ended).await;
        if !matches!(closed, Ok(Ok(true))) {
            self.ops.stuck.fetch_add(1, Ordering::Relaxed);
        }
        self.ops.side_cycles.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a blocking-type watch's handle ends.
#[derive(Debug, Clone, Copy)]
enum End {
    /// Dropped with the receiver, after the events.
    Drop,
    /// Detached at once.
    Detach,
    /// Kept in the ring.
    Keep,
}

async fn read_events(ops: &Ops, rx: &async_channel::Receiver<Event>, events: usize) {
    for _ in 0..events {
        match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            Ok(Ok(_)) => {
                ops.events.fetch_add(1, Ordering::Relaxed);
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(f: impl Fn(f64) -> f64) -> Vec<Sample> {
        (1..=24)
            .map(|i| {
                let t = i as f64 * 5.0;
                let x = f(t);
                Sample {
                    t,
                    live_bytes: x * 1e6,
                    rss: 0.0,
                    entries: x,
                    entries_gauge: x,
                    watches: x,
                    watches_gauge: x,
                    tasks: x,
                    timers: 0.0,
                    tokio_tasks: 0.0,
                    reads: 0.0,
                }
            })
            .collect()
    }

    #[test]
    fn a_flat_or_sawtooth_series_passes_and_a_line_fails() {
        let d = Duration::from_secs(120);
        // Bounded, with an oscillation (a sawtooth of period 15 s) and a warm-up ramp.
        let flat = judge(&samples(|t| (t.min(30.0) * 30.0) + (t % 15.0) * 10.0), d).unwrap();
        assert!(flat.iter().all(|v| !v.grew()), "{flat:?}");
        // 10 per second, forever.
        let line = judge(&samples(|t| 1000.0 + t * 10.0), d).unwrap();
        assert!(line.iter().all(Verdict::grew), "{line:?}");
        // Too short to judge.
        assert!(judge(&samples(|t| t)[..3], d).is_none());
    }

    #[test]
    fn failures_name_the_quantity() {
        let report = Report {
            samples: Vec::new(),
            verdicts: Some(vec![Verdict {
                quantity: "entries",
                second: 1000.0,
                last: 5000.0,
                limit: 1300.0,
            }]),
            stuck_cycles: 1,
            side_cycles: 10,
            tasks_after_teardown: (0, 0),
            sinks_after_teardown: 0,
            bytes_after_teardown: 0.0,
            spawned: 0,
            reads: None,
        };
        let failures = report.failures();
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(failures[0].starts_with("entries grows without bound"));
        assert!(failures[1].contains("close()"));
    }
}
