//! Many entries: bytes per entry and hit cost with 1 000 000 warm entries, against moka with
//! the same keys and values (and a bare `HashMap` for context).
//!
//! Bytes per entry: the counting allocator's live bytes after inserting N entries minus
//! before, divided by N (keys are built beforehand; each structure stores its own copy of
//! every key and its own `Arc<u64>`). RSS per entry: the same over `VmRSS`, after
//! `malloc_trim`. Ours is built first, so it never reuses pages a baseline freed.
//!
//! Hit cost: one thread, get polled with a no-op waker, keys in a fixed random order, at 1 000
//! entries and at N entries. "Flat" is judged against the bare map's own growth, which is what
//! the memory hierarchy alone costs.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cache_core::{Cache, RequestInfo};

use super::hit::Warm;
use crate::Mode;
use crate::alloc::Snapshot;
use crate::kv::{BenchType, Key};
use crate::report::{Figure, Goal, num};
use crate::rt::{BenchRt, Flavor};
use crate::stats::{interleave, key, median, random_indices};

/// Runs the scenario.
pub fn run(mode: Mode) -> Vec<Figure> {
    let big = mode.pick(1_000_000, 200_000, 2_000);
    let small = mode.pick(1_000, 1_000, 100);
    let ops = mode.pick(200_000, 100_000, 500);
    let rounds = mode.pick(11, 5, 1);
    let rt = BenchRt::new(Flavor::TokioMulti);

    let keys: Vec<Key> = (0..big).map(|i| Key(key(i))).collect();
    let values: Vec<u64> = (0..big as u64).collect();

    // Ours first.
    let before = Snapshot::take();
    crate::alloc::track_sizes(true);
    let cache = Cache::new(rt.shared());
    let ours = cache.register(BenchType::new(rt.shared(), Duration::ZERO));
    for (k, v) in keys.iter().zip(&values) {
        ours.prepopulate(&RequestInfo::new(k.0.as_str()), Arc::new(*v), 1)
            .expect("non-empty key");
    }
    crate::alloc::track_sizes(false);
    let profile = crate::alloc::sizes()
        .into_iter()
        .map(|(size, n)| (size, n as f64 / big as f64))
        .filter(|&(_, per)| per >= 0.05)
        .take(8)
        .map(|(size, per)| format!("{size} B × {per:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    let after = Snapshot::take();
    let (ours_bytes, ours_rss) = (before.live_per(&after, big), before.rss_per(&after, big));

    let before = Snapshot::take();
    let mut map = HashMap::new();
    for (k, v) in keys.iter().zip(&values) {
        map.insert(k.0.clone(), Arc::new(*v));
    }
    let after = Snapshot::take();
    let (map_bytes, map_rss) = (before.live_per(&after, big), before.rss_per(&after, big));

    let before = Snapshot::take();
    let moka = moka::future::Cache::new(2 * big as u64);
    rt.block_on(async {
        for (k, v) in keys.iter().zip(&values) {
            moka.insert(k.0.clone(), Arc::new(*v)).await;
        }
        moka.run_pending_tasks().await;
    });
    let after = Snapshot::take();
    let (moka_bytes, moka_rss) = (before.live_per(&after, big), before.rss_per(&after, big));

    let large = Arc::new(Warm {
        order: random_indices(big, ops, 0xB16),
        keys,
        ours,
        map: RwLock::new(map),
        moka,
        dash: dashmap::DashMap::new(),
    });
    let little = Warm::new(&rt, small, ops);

    let mut s_ours = || little.time(Warm::ours_poll);
    let mut s_map = || little.time(Warm::map_get);
    let mut s_moka = || little.time(Warm::moka_poll);
    let mut l_ours = || large.time(Warm::ours_poll);
    let mut l_map = || large.time(Warm::map_get);
    let mut l_moka = || large.time(Warm::moka_poll);
    let s = interleave(
        rounds,
        &mut [
            &mut s_ours,
            &mut s_map,
            &mut s_moka,
            &mut l_ours,
            &mut l_map,
            &mut l_moka,
        ],
    );
    let m: Vec<f64> = s.iter().map(|v| median(v)).collect();
    let label = |n: usize| {
        if n >= 1_000_000 && n % 1_000_000 == 0 {
            format!("{} M", n / 1_000_000)
        } else if n >= 1_000 {
            format!("{} k", n / 1_000)
        } else {
            n.to_string()
        }
    };
    let (small_l, big_l) = (label(small), label(big));

    vec![
        Figure::new(
            format!("many/{big_l} bytes per entry"),
            ours_bytes,
            "B/entry",
        )
        .baseline("moka future::Cache", moka_bytes)
        .goal(Goal::AtMost(200.0))
        .note(format!(
            "counting allocator, live bytes after insert ÷ N (16 B keys, Arc<u64> values); \
                 goal (issue 14): ≤ 200 B, 2/3 of moka's; bare HashMap<String, Arc<u64>>: {} \
                 B/entry. Our allocations per entry (size × count, table growth included): \
                 {profile}",
            num(map_bytes)
        )),
        Figure::new(format!("many/{big_l} RSS per entry"), ours_rss, "B/entry")
            .baseline("moka future::Cache", moka_rss)
            .note(format!(
                "VmRSS delta ÷ N after malloc_trim; bare HashMap: {} B/entry",
                num(map_rss)
            )),
        Figure::new(format!("many/hit at {small_l}"), m[0], "ns/op")
            .baseline("moka future::Cache::get", m[2])
            .goal(Goal::RatioAtMost(1.0))
            .note(format!(
                "1 thread, polled with a no-op waker, random order; bare map {} ns",
                num(m[1])
            )),
        Figure::new(format!("many/hit at {big_l}"), m[3], "ns/op")
            .baseline("moka future::Cache::get", m[5])
            .goal(Goal::RatioAtMost(1.0))
            .note(format!(
                "1 thread, polled with a no-op waker, random order; bare map {} ns",
                num(m[4])
            )),
        Figure::new(
            format!("many/hit growth {small_l} → {big_l}"),
            m[3] / m[0],
            "×",
        )
        .baseline("bare map's growth", m[4] / m[1])
        .goal(Goal::RatioAtMost(1.2))
        .note(format!(
            "hit cost at {big_l} ÷ at {small_l}; flat means no worse than the memory \
             hierarchy makes a bare map (moka: {:.2}×)",
            m[5] / m[2]
        )),
    ]
}
