//! Miss storm: 10 000 tasks get one cold key at once; its fetch takes 10 ms. Exactly one fetch
//! may happen, and the last get should return soon after the fetch. Baseline: moka's
//! `future::Cache::get_with` with the same 10 ms init future.
//!
//! Timed from just before the first task is spawned until the last one has returned its value
//! (tasks on the tokio multi-thread runtime, one worker per CPU), with a new cold key each
//! round.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cache_core::Cache;

use crate::Mode;
use crate::kv::{BenchType, Key};
use crate::report::{Figure, Goal};
use crate::rt::{BenchRt, Flavor};
use crate::stats::{interleave, median, p99};

/// The fetch's latency.
pub const FETCH: Duration = Duration::from_millis(10);
/// The overhead we allow on top of the fetch for spawning, waking and joining 10 000 tasks.
pub const OVERHEAD: Duration = Duration::from_millis(10);

/// Runs the scenario.
pub fn run(mode: Mode) -> Vec<Figure> {
    let tasks = mode.pick(10_000, 10_000, 200);
    let rounds = mode.pick(21, 7, 2);
    let rt = BenchRt::new(Flavor::TokioMulti);
    let handle = rt.tokio().expect("tokio").handle().clone();

    let cache = Cache::new(rt.shared());
    let ty = BenchType::new(rt.shared(), FETCH);
    let ours_fetches = ty.fetches();
    let ours = cache.register(ty);
    let moka: moka::future::Cache<String, Arc<u64>> = moka::future::Cache::new(1_000);
    let moka_fetches = Arc::new(AtomicUsize::new(0));

    let round = AtomicUsize::new(0);
    let mut ours_counts = Vec::new();
    let mut moka_counts = Vec::new();

    let mut run_ours = || {
        let key = Key(format!(
            "storm/ours/{}",
            round.fetch_add(1, Ordering::Relaxed)
        ));
        let before = ours_fetches.load(Ordering::SeqCst);
        let elapsed = rt.block_on(async {
            let start = Instant::now();
            let joins: Vec<_> = (0..tasks)
                .map(|_| {
                    let ours = ours.clone();
                    let key = key.clone();
                    handle.spawn(async move { ours.get(&key).await.expect("get").value })
                })
                .collect();
            for join in joins {
                assert!(join.await.expect("task").is_some());
            }
            start.elapsed()
        });
        ours_counts.push((ours_fetches.load(Ordering::SeqCst) - before) as f64);
        elapsed.as_secs_f64() * 1e3
    };
    let mut run_moka = || {
        let key = format!("storm/moka/{}", round.fetch_add(1, Ordering::Relaxed));
        let before = moka_fetches.load(Ordering::SeqCst);
        let elapsed = rt.block_on(async {
            let start = Instant::now();
            let joins: Vec<_> = (0..tasks)
                .map(|_| {
                    let moka = moka.clone();
                    let key = key.clone();
                    let fetches = moka_fetches.clone();
                    handle.spawn(async move {
                        moka.get_with(key, async move {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(FETCH).await;
                            Arc::new(1u64)
                        })
                        .await
                    })
                })
                .collect();
            for join in joins {
                join.await.expect("task");
            }
            start.elapsed()
        });
        moka_counts.push((moka_fetches.load(Ordering::SeqCst) - before) as f64);
        elapsed.as_secs_f64() * 1e3
    };
    if std::env::var_os("CACHE_BENCH_STORM_PROFILE").is_some() {
        // For a profiler (callgrind): only our storms, no baseline, no report.
        for _ in 0..rounds {
            run_ours();
        }
        return Vec::new();
    }
    let s = interleave(rounds, &mut [&mut run_ours, &mut run_moka]);
    let max_ours = ours_counts.iter().copied().fold(0.0, f64::max);
    let max_moka = moka_counts.iter().copied().fold(0.0, f64::max);
    let limit = (FETCH + OVERHEAD).as_secs_f64() * 1e3;
    vec![
        Figure::new(
            format!("storm/{tasks} gets, one cold key"),
            median(&s[0]),
            "ms",
        )
        .p99(p99(&s[0]), Some(p99(&s[1])))
        .baseline("moka get_with", median(&s[1]))
        .goal(Goal::AtMost(limit))
        .note(format!(
            "spawn {tasks} tokio tasks → last value returned; fetch sleeps {} ms; goal: \
                 fetch + {} ms overhead",
            FETCH.as_millis(),
            OVERHEAD.as_millis()
        )),
        Figure::new(
            format!("storm/{tasks} gets, wall time vs moka"),
            median(&s[0]),
            "ms",
        )
        .baseline("moka get_with", median(&s[1]))
        .goal(Goal::RatioAtMost(0.8))
        .note("the same rounds as above; goal (issue 14): ≤ 0.8× moka get_with's wall time"),
        Figure::new(
            "storm/fetches per storm (max over rounds)",
            max_ours,
            "fetches",
        )
        .baseline("moka get_with", max_moka)
        .goal(Goal::Exactly(1.0)),
    ]
}
