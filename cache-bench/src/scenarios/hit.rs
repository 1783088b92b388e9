//! Hit path: `get` of a warm entry on tokio, 1 and 2 threads, against a bare
//! `RwLock<HashMap<String, Arc<u64>>>` read + `Arc` clone, against moka's
//! `future::Cache::get`, and against a `DashMap` read + `Arc` clone (what users reach for when
//! one lock does not scale).
//!
//! Goals (issue 14): one thread, ≤ 1.2× the bare map; two threads, aggregate throughput
//! ≥ 1.8× our own one-thread throughput and ≥ DashMap's two-thread aggregate. Every variant,
//! one and two threads, takes its turn in the same interleaved rounds, so the scaling ratio
//! compares samples taken side by side.
//!
//! Two ways to drive the async gets, both reported:
//! - `poll`: the get future polled to completion with a no-op waker on plain threads (a hit is
//!   ready on the first poll), which is the cost of the lookup itself;
//! - `task`: `.await` in a loop inside tokio tasks on the multi-thread runtime, the way an
//!   application calls it.
//!
//! The bare map is synchronous, so it is called directly in both. Keys are visited in a fixed
//! pseudo-random order over 10 000 warm entries (16-byte keys, `Arc<u64>` values). Each thread
//! or task reads every key once, untimed, before its timed loop: the variants take turns, and
//! without it a sample would also time refilling the caches the previous variant evicted
//! (without the sweep, in quiet full runs: ours 59–62 ns against 47 in a steady loop, the map
//! 49–51 against 43; the structure that spans more lines pays more).
//! `many` measures hits spread over a million entries, where misses are the point.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use cache_core::{Cache, RequestInfo, Response, TypedCache};
use dashmap::DashMap;

use crate::Mode;
use crate::kv::{BenchType, Key};
use crate::report::{Figure, Goal, num};
use crate::rt::{BenchRt, Flavor};
use crate::stats::{interleave, key, median, poll_now, random_indices};

/// The same warm keys in our cache, in a bare map, and in moka.
pub struct Warm {
    /// The requests, by key number.
    pub keys: Vec<Key>,
    /// The access order: indices into `keys`.
    pub order: Vec<usize>,
    /// Ours.
    pub ours: TypedCache<BenchType>,
    /// The bare map.
    pub map: RwLock<HashMap<String, Arc<u64>>>,
    /// moka's async cache.
    pub moka: moka::future::Cache<String, Arc<u64>>,
    /// DashMap, the sharded concurrent map (may be left empty where it is not compared).
    pub dash: DashMap<String, Arc<u64>>,
}

/// Which of the structures a timed loop reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Our `TypedCache::get`.
    Ours,
    /// The bare `RwLock<HashMap>` + `Arc` clone.
    Map,
    /// moka's `future::Cache::get`.
    Moka,
    /// `DashMap::get` + `Arc` clone.
    Dash,
}

impl Variant {
    /// One polled read of this structure (the synchronous maps are called directly).
    fn poll_op(self) -> fn(&Warm, usize) {
        match self {
            Variant::Ours => Warm::ours_poll,
            Variant::Map => Warm::map_get,
            Variant::Moka => Warm::moka_poll,
            Variant::Dash => Warm::dash_get,
        }
    }

    /// Its name in `--profile-hit`'s output.
    fn name(self) -> &'static str {
        match self {
            Variant::Ours => "ours",
            Variant::Map => "map",
            Variant::Moka => "moka",
            Variant::Dash => "dash",
        }
    }
}

impl Warm {
    /// `entries` warm entries in each, on `rt`; `ops` random accesses per sample.
    pub fn new(rt: &BenchRt, entries: usize, ops: usize) -> Arc<Self> {
        let keys: Vec<Key> = (0..entries).map(|i| Key(key(i))).collect();
        let cache = Cache::new(rt.shared());
        let ours = cache.register(BenchType::new(rt.shared(), Duration::ZERO));
        let mut map = HashMap::new();
        let moka = moka::future::Cache::new(2 * entries as u64);
        let dash = DashMap::new();
        for (i, k) in keys.iter().enumerate() {
            ours.prepopulate(&RequestInfo::new(k.0.as_str()), Arc::new(i as u64), 1)
                .expect("non-empty key");
            map.insert(k.0.clone(), Arc::new(i as u64));
            dash.insert(k.0.clone(), Arc::new(i as u64));
        }
        rt.block_on(async {
            for (i, k) in keys.iter().enumerate() {
                moka.insert(k.0.clone(), Arc::new(i as u64)).await;
            }
            moka.run_pending_tasks().await;
        });
        let warm = Self {
            order: random_indices(entries, ops, 0x5EED),
            keys,
            ours,
            map: RwLock::new(map),
            moka,
            dash,
        };
        // Every key is a hit in each.
        for k in warm.keys.iter().step_by((entries / 100).max(1)) {
            assert!(poll_now(warm.ours.get(k)).expect("hit").meta.hit);
            assert!(poll_now(warm.moka.get(k.0.as_str())).is_some());
            assert!(warm.dash.get(k.0.as_str()).is_some());
        }
        Arc::new(warm)
    }

    /// One hit of ours, polled with a no-op waker. The value is taken out of the response, as
    /// a caller that wants the value does (`get(..).await?.value`); the baselines return the
    /// value alone.
    #[inline]
    pub fn ours_poll(&self, i: usize) {
        black_box(
            poll_now(self.ours.get(&self.keys[i]))
                .ok()
                .and_then(Response::into_value),
        );
    }

    /// One read of the bare map.
    #[inline]
    pub fn map_get(&self, i: usize) {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        black_box(map.get(self.keys[i].0.as_str()).cloned());
    }

    /// One moka get, polled with a no-op waker.
    #[inline]
    pub fn moka_poll(&self, i: usize) {
        black_box(poll_now(self.moka.get(self.keys[i].0.as_str())));
    }

    /// One DashMap read + `Arc` clone.
    #[inline]
    pub fn dash_get(&self, i: usize) {
        black_box(
            self.dash
                .get(self.keys[i].0.as_str())
                .map(|v| v.value().clone()),
        );
    }

    /// One untimed read of every key by `op`, in key order: what a timed loop of warm hits
    /// runs after, so that it times hits of entries in this core's caches, not the refill of
    /// lines the previous sample (another variant) evicted.
    pub fn sweep(&self, op: impl Fn(&Self, usize)) {
        for i in 0..self.keys.len() {
            op(self, i);
        }
    }

    /// [`Warm::sweep`], then [`Warm::time`]: ns per warm hit of `op` on this thread.
    pub fn time_warm(&self, op: impl Fn(&Self, usize)) -> f64 {
        self.sweep(&op);
        self.time(op)
    }

    /// ns per op of `op` over the access order, on this thread, as the caches are.
    pub fn time(&self, op: impl Fn(&Self, usize)) -> f64 {
        let start = Instant::now();
        for &i in &self.order {
            op(self, i);
        }
        start.elapsed().as_nanos() as f64 / self.order.len() as f64
    }

    /// ns per op, aggregate, of `threads` threads each running the access order at once,
    /// each after its own [`Warm::sweep`].
    pub fn time_threads(self: &Arc<Self>, threads: usize, op: fn(&Self, usize)) -> f64 {
        let barrier = Barrier::new(threads);
        let longest = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let barrier = &barrier;
                    let this = &**self;
                    s.spawn(move || {
                        this.sweep(op);
                        barrier.wait();
                        let start = Instant::now();
                        // Each thread starts at its own offset, so they do not walk in step.
                        let n = this.order.len();
                        for j in 0..n {
                            op(this, this.order[(j + t * n / threads) % n]);
                        }
                        start.elapsed()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("bench thread"))
                .max()
                .unwrap_or_default()
        });
        longest.as_nanos() as f64 / (threads * self.order.len()) as f64
    }

    /// ns per op, aggregate, of `tasks` tasks on `rt` each awaiting every get of the access
    /// order from `which` (the synchronous maps are called directly inside the task), each
    /// after a [`Warm::sweep`] on its worker.
    pub fn time_tasks(self: &Arc<Self>, rt: &BenchRt, tasks: usize, which: Variant) -> f64 {
        let joins: Vec<_> = (0..tasks)
            .map(|t| {
                let this = self.clone();
                rt.spawn_join(async move {
                    this.sweep(which.poll_op());
                    let n = this.order.len();
                    let start = Instant::now();
                    for j in 0..n {
                        let i = this.order[(j + t * n / tasks) % n];
                        match which {
                            Variant::Ours => {
                                black_box(
                                    this.ours
                                        .get(&this.keys[i])
                                        .await
                                        .ok()
                                        .and_then(Response::into_value),
                                );
                            }
                            Variant::Map => this.map_get(i),
                            Variant::Moka => {
                                black_box(this.moka.get(this.keys[i].0.as_str()).await);
                            }
                            Variant::Dash => this.dash_get(i),
                        }
                    }
                    start.elapsed()
                })
            })
            .collect();
        let longest = rt.block_on(async {
            let mut longest = Duration::ZERO;
            for join in joins {
                longest = longest.max(join.await);
            }
            longest
        });
        longest.as_nanos() as f64 / (tasks * self.order.len()) as f64
    }
}

/// Runs one polled hit loop alone, ours unless `CACHE_BENCH_PROFILE_VARIANT` names a baseline
/// (`map`, `dash`, `moka`), on `threads` threads for `duration`, for a profiler (`perf
/// record`, callgrind): nothing else runs in the profile. `CACHE_BENCH_PROFILE_ENTRIES` sets
/// the warm entries (10 000); `CACHE_BENCH_PROFILE_DRIVE=task` awaits the gets in tokio tasks
/// instead of polling them. Prints ns/op (aggregate for more than one thread) and hits/s.
pub fn profile(duration: Duration, threads: usize) {
    let rt = BenchRt::new(Flavor::TokioMulti);
    let entries = std::env::var("CACHE_BENCH_PROFILE_ENTRIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let warm = Warm::new(&rt, entries, 200_000);
    let variant = match std::env::var("CACHE_BENCH_PROFILE_VARIANT").as_deref() {
        Ok("map") => Variant::Map,
        Ok("dash") => Variant::Dash,
        Ok("moka") => Variant::Moka,
        _ => Variant::Ours,
    };
    let tasks = std::env::var("CACHE_BENCH_PROFILE_DRIVE").as_deref() == Ok("task");
    let op = variant.poll_op();
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < duration {
        samples.push(if tasks {
            warm.time_tasks(&rt, threads, variant)
        } else if threads <= 1 {
            warm.time_warm(op)
        } else {
            warm.time_threads(threads, op)
        });
    }
    let ns = median(&samples);
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "hit ({}), {threads} {}: {ns:.1} ns/op{} = {:.1} M hits/s (median of {}; \
         fastest {min:.1} ns/op)",
        variant.name(),
        if tasks {
            "task(s)"
        } else {
            "thread(s), polled"
        },
        if threads > 1 { " aggregate" } else { "" },
        1e3 / ns,
        samples.len()
    );
}

/// How the gets are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drive {
    /// Polled once with a no-op waker on plain threads.
    Poll,
    /// `.await` in a loop inside tokio tasks.
    Task,
}

const VARIANTS: [Variant; 4] = [Variant::Ours, Variant::Map, Variant::Moka, Variant::Dash];
const THREADS: [usize; 2] = [1, 2];

/// Runs the scenario.
pub fn run(mode: Mode) -> Vec<Figure> {
    let entries = mode.pick(10_000, 10_000, 1_000);
    let ops = mode.pick(200_000, 50_000, 500);
    let rounds = mode.pick(41, 7, 2);
    let rt = BenchRt::new(Flavor::TokioMulti);
    let warm = Warm::new(&rt, entries, ops);
    let mut figures = Vec::new();
    for drive in [Drive::Poll, Drive::Task] {
        // One interleave over every (threads, variant) pair, so that the 2-thread scaling
        // compares samples taken side by side.
        let mut runs: Vec<Box<dyn FnMut() -> f64 + '_>> = Vec::new();
        for threads in THREADS {
            for variant in VARIANTS {
                let warm = &warm;
                let rt = &rt;
                runs.push(match drive {
                    Drive::Poll => {
                        let op = variant.poll_op();
                        Box::new(move || warm.time_threads(threads, op))
                    }
                    Drive::Task => Box::new(move || warm.time_tasks(rt, threads, variant)),
                });
            }
        }
        let mut refs: Vec<&mut dyn FnMut() -> f64> = runs
            .iter_mut()
            .map(|r| &mut **r as &mut dyn FnMut() -> f64)
            .collect();
        let s = interleave(rounds, &mut refs);
        figures.extend(drive_figures(drive, &s));
    }
    figures
}

/// The figures of one way of driving the gets. `s` holds the ns/op samples of every
/// (threads, variant) pair, in the order of [`THREADS`] × [`VARIANTS`].
fn drive_figures(drive: Drive, s: &[Vec<f64>]) -> Vec<Figure> {
    let m = |threads: usize, variant: Variant| {
        let t = THREADS
            .iter()
            .position(|&n| n == threads)
            .expect("thread count");
        let v = VARIANTS
            .iter()
            .position(|&x| x == variant)
            .expect("variant");
        median(&s[t * VARIANTS.len() + v])
    };
    let (how, note) = match drive {
        Drive::Poll => (
            "poll",
            "get polled once with a no-op waker on plain threads (ready on first poll), \
             10 k warm entries, random order, after one untimed read of each",
        ),
        Drive::Task => (
            "tokio task",
            "`get(..).await` in a loop inside tokio task(s) on the multi-thread runtime \
             (2 workers), 10 k warm entries, random order, after one untimed read of each",
        ),
    };
    // Throughput, M hits/s, from ns/op (aggregate ns/op for 2 threads).
    let tput = |ns: f64| 1e3 / ns;
    let (o1, d1) = (m(1, Variant::Ours), m(1, Variant::Dash));
    let (o2, p2, d2) = (m(2, Variant::Ours), m(2, Variant::Map), m(2, Variant::Dash));
    vec![
        Figure::new(format!("hit/1 thread/{how} vs map"), o1, "ns/op")
            .baseline("RwLock<HashMap> + Arc clone", m(1, Variant::Map))
            .goal(Goal::RatioAtMost(1.2))
            .note(format!(
                "{note}; DashMap read + Arc clone: {} ns/op",
                num(d1)
            )),
        Figure::new(format!("hit/1 thread/{how} vs moka"), o1, "ns/op")
            .baseline("moka future::Cache::get", m(1, Variant::Moka))
            .goal(Goal::RatioAtMost(1.0)),
        Figure::new(format!("hit/2 threads/{how} vs map"), o2, "ns/op agg")
            .baseline("RwLock<HashMap> + Arc clone", p2)
            .note(
                "aggregate: wall time ÷ total hits of both threads; for context, the 2-thread \
                 goals are the throughput figures below",
            ),
        Figure::new(format!("hit/2 threads/{how} vs moka"), o2, "ns/op agg")
            .baseline("moka future::Cache::get", m(2, Variant::Moka))
            .goal(Goal::RatioAtMost(1.0)),
        Figure::new(
            format!("hit/2 threads/{how} vs DashMap"),
            tput(o2),
            "M hits/s",
        )
        .baseline("DashMap read + Arc clone, 2 threads", tput(d2))
        .goal(Goal::RatioAtLeast(1.0))
        .note(format!(
            "aggregate throughput of both threads; DashMap scales {:.2}× from 1 to 2 \
                 threads, the bare map {:.2}×",
            d1 / d2,
            m(1, Variant::Map) / p2
        )),
        Figure::new(format!("hit/2 threads/{how} scaling"), tput(o2), "M hits/s")
            .baseline("ours, 1 thread", tput(o1))
            .goal(Goal::RatioAtLeast(1.8))
            .note("aggregate throughput on 2 threads ÷ our own 1-thread throughput, same rounds"),
    ]
}
