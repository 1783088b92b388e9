//! Runtimes side by side: the hit path and the one-key watch fan-out on tokio (multi-thread and
//! current-thread), async-std and smol. Each baseline runs on the same runtime as ours: the
//! bare map read inside the same kind of task, and `tokio::sync::watch` receiver tasks (tokio's
//! watch channel is runtime-agnostic) spawned on that runtime.
//!
//! The hit is measured twice per runtime (issue 14: "1 thread, polled and in a task, on every
//! runtime"): awaited in one spawned task, and polled with a no-op waker on the calling
//! thread. The polled get still runs on the runtime's adapter (its clock), so it shows what
//! each adapter's `now` costs a hit.

use crate::Mode;
use crate::report::{Figure, Goal};
use crate::rt::{BenchRt, Flavor};
use crate::stats::{interleave, median};

use super::fanout;
use super::hit::{Variant, Warm};

/// Runs the scenario.
pub fn run(mode: Mode) -> Vec<Figure> {
    let entries = mode.pick(10_000, 10_000, 1_000);
    let ops = mode.pick(200_000, 50_000, 500);
    let hit_rounds = mode.pick(31, 5, 1);
    let watches = mode.pick(100_000, 20_000, 300);
    let fan_rounds = mode.pick(11, 5, 1);
    // Every runtime's hits first, then every runtime's fan-out: a fan-out's 100 000 watches
    // leave the heap fragmented, and a runtime measured after one would find its warm
    // entries scattered over more pages than the runtime measured first (the later runtimes'
    // hits, ours and the map's, ran up to 2× slower that way).
    let mut per_flavor: Vec<Vec<Figure>> = Flavor::ALL
        .into_iter()
        .map(|flavor| hit_figures(flavor, entries, ops, hit_rounds))
        .collect();
    for (flavor, figures) in Flavor::ALL.into_iter().zip(&mut per_flavor) {
        let rt = BenchRt::new(flavor);
        let f = fanout::measure(&rt, watches, 1, fan_rounds);
        figures.push(fanout::latency_figure(
            format!(
                "runtimes/{}/fanout {} watches",
                flavor.name(),
                crate::report::num(watches as f64)
            ),
            &f,
        ));
    }
    per_flavor.into_iter().flatten().collect()
}

/// The hit figures of one runtime: polled and in one task, each against the bare map.
fn hit_figures(flavor: Flavor, entries: usize, ops: usize, rounds: usize) -> Vec<Figure> {
    let rt = BenchRt::new(flavor);
    let name = flavor.name();
    let warm = Warm::new(&rt, entries, ops);
    let mut ours = || warm.time_tasks(&rt, 1, Variant::Ours);
    let mut map = || warm.time_tasks(&rt, 1, Variant::Map);
    let mut ours_poll = || warm.time_warm(Warm::ours_poll);
    let mut map_poll = || warm.time_warm(Warm::map_get);
    let s = interleave(
        rounds,
        &mut [&mut ours, &mut map, &mut ours_poll, &mut map_poll],
    );
    vec![
        Figure::new(
            format!("runtimes/{name}/hit, polled"),
            median(&s[2]),
            "ns/op",
        )
        .baseline("RwLock<HashMap> + Arc clone", median(&s[3]))
        .goal(Goal::RatioAtMost(1.2))
        .note(
            "get polled once with a no-op waker on the calling thread, on a cache built \
             with this runtime's adapter (its clock), 10 k warm entries, after one untimed read of each",
        ),
        Figure::new(
            format!("runtimes/{name}/hit, 1 task"),
            median(&s[0]),
            "ns/op",
        )
        .baseline("RwLock<HashMap> in the same task", median(&s[1]))
        .goal(Goal::RatioAtMost(1.2))
        .note(
            "`get(..).await` in a loop in one spawned task, 10 k warm entries, after one \
             untimed read of each",
        ),
    ]
}
