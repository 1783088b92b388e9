//! Hit path: `get` of a warm entry on tokio, 1 and 2 threads, against a bare
//! `RwLock<HashMap<String, Arc<u64>>>` read + `Arc` clone and against moka's
//! `future::Cache::get`.
//!
//! Two ways to drive the async gets, both reported:
//! - `poll`: the get future polled to completion with a no-op waker on plain threads (a hit is
//!   ready on the first poll), which is the cost of the lookup itself;
//! - `task`: `.await` in a loop inside tokio tasks on the multi-thread runtime, the way an
//!   application calls it.
//!
//! The bare map is synchronous, so it is called directly in both. Keys are visited in a fixed
//! pseudo-random order over 10 000 warm entries (16-byte keys, `Arc<u64>` values).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use cache_core::{Cache, RequestInfo, TypedCache};

use crate::Mode;
use crate::kv::{BenchType, Key};
use crate::report::{Figure, Goal};
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
}

impl Warm {
    /// `entries` warm entries in each, on `rt`; `ops` random accesses per sample.
    pub fn new(rt: &BenchRt, entries: usize, ops: usize) -> Arc<Self> {
        let keys: Vec<Key> = (0..entries).map(|i| Key(key(i))).collect();
        let cache = Cache::new(rt.shared());
        let ours = cache.register(BenchType::new(rt.shared(), Duration::ZERO));
        let mut map = HashMap::new();
        let moka = moka::future::Cache::new(2 * entries as u64);
        for (i, k) in keys.iter().enumerate() {
            ours.prepopulate(&RequestInfo::new(k.0.as_str()), Arc::new(i as u64), 1)
                .expect("non-empty key");
            map.insert(k.0.clone(), Arc::new(i as u64));
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
        };
        // Every key is a hit in each.
        for k in warm.keys.iter().step_by((entries / 100).max(1)) {
            assert!(poll_now(warm.ours.get(k)).expect("hit").meta.hit);
            assert!(poll_now(warm.moka.get(k.0.as_str())).is_some());
        }
        Arc::new(warm)
    }

    /// One hit of ours, polled with a no-op waker.
    #[inline]
    pub fn ours_poll(&self, i: usize) {
        black_box(poll_now(self.ours.get(&self.keys[i])).ok());
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

    /// ns per op of `op` over the access order, on this thread.
    pub fn time(&self, op: impl Fn(&Self, usize)) -> f64 {
        let start = Instant::now();
        for &i in &self.order {
            op(self, i);
        }
        start.elapsed().as_nanos() as f64 / self.order.len() as f64
    }

    /// ns per op, aggregate, of `threads` threads each running the access order at once.
    pub fn time_threads(self: &Arc<Self>, threads: usize, op: fn(&Self, usize)) -> f64 {
        let barrier = Barrier::new(threads);
        let longest = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let barrier = &barrier;
                    let this = &**self;
                    s.spawn(move || {
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
    /// order (`which`: 0 ours, 1 bare map, 2 moka).
    pub fn time_tasks(self: &Arc<Self>, rt: &BenchRt, tasks: usize, which: u8) -> f64 {
        let joins: Vec<_> = (0..tasks)
            .map(|t| {
                let this = self.clone();
                rt.spawn_join(async move {
                    let n = this.order.len();
                    let start = Instant::now();
                    for j in 0..n {
                        let i = this.order[(j + t * n / tasks) % n];
                        match which {
                            0 => {
                                black_box(this.ours.get(&this.keys[i]).await.ok());
                            }
                            1 => this.map_get(i),
                            _ => {
                                black_box(this.moka.get(this.keys[i].0.as_str()).await);
                            }
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

/// Runs only our 1-thread hit loop (polled) for `duration`, for a profiler; prints ns/op.
pub fn profile(duration: Duration) {
    let rt = BenchRt::new(Flavor::TokioMulti);
    let warm = Warm::new(&rt, 10_000, 200_000);
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < duration {
        samples.push(warm.time(Warm::ours_poll));
    }
    println!(
        "our hit: {:.1} ns/op (median of {})",
        median(&samples),
        samples.len()
    );
}

/// Runs the scenario.
pub fn run(mode: Mode) -> Vec<Figure> {
    let entries = mode.pick(10_000, 10_000, 1_000);
    let ops = mode.pick(200_000, 50_000, 500);
    let rounds = mode.pick(21, 7, 2);
    let rt = BenchRt::new(Flavor::TokioMulti);
    let warm = Warm::new(&rt, entries, ops);
    let mut figures = Vec::new();

    for threads in [1, 2] {
        let label = if threads == 1 {
            "1 thread".to_owned()
        } else {
            format!("{threads} threads")
        };
        let unit = if threads == 1 { "ns/op" } else { "ns/op agg" };

        // poll
        let (w1, w2, w3) = (warm.clone(), warm.clone(), warm.clone());
        let mut ours = || w1.time_threads(threads, Warm::ours_poll);
        let mut map = || w2.time_threads(threads, Warm::map_get);
        let mut moka = || w3.time_threads(threads, Warm::moka_poll);
        let s = interleave(rounds, &mut [&mut ours, &mut map, &mut moka]);
        figures.extend(pair(
            format!("hit/{label}/poll"),
            unit,
            &s,
            "get polled once with a no-op waker on plain threads (ready on first poll), \
             10 k warm entries, random order",
        ));

        // tokio tasks
        let mut ours = || warm.time_tasks(&rt, threads, 0);
        let mut map = || warm.time_tasks(&rt, threads, 1);
        let mut moka = || warm.time_tasks(&rt, threads, 2);
        let s = interleave(rounds, &mut [&mut ours, &mut map, &mut moka]);
        figures.extend(pair(
            format!("hit/{label}/tokio task"),
            unit,
            &s,
            "`get(..).await` in a loop inside tokio task(s) on the multi-thread runtime \
             (2 workers), 10 k warm entries, random order",
        ));
    }
    figures
}

/// The two figures of a hit comparison: ours against the bare map (goal ≤ 1.2×) and against
/// moka (goal ≤ 1.0×). `s` holds the samples of ours, the map and moka.
pub fn pair(name: String, unit: &'static str, s: &[Vec<f64>], note: &str) -> Vec<Figure> {
    let (ours, map, moka) = (median(&s[0]), median(&s[1]), median(&s[2]));
    vec![
        Figure::new(format!("{name} vs map"), ours, unit)
            .baseline("RwLock<HashMap> + Arc clone", map)
            .goal(Goal::RatioAtMost(1.2))
            .note(note),
        Figure::new(format!("{name} vs moka"), ours, unit)
            .baseline("moka future::Cache::get", moka)
            .goal(Goal::RatioAtMost(1.0)),
    ]
}
