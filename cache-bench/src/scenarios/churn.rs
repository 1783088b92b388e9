//! Churn through a capacity bound (issue 10): does `max_entries` bound memory, not only the
//! entry count?
//!
//! - **Bytes after churn**: a cache built with `max_entries(1000)` (default 72 h TTL) gets
//!   1 000 000 distinct keys, one `get` each (a miss, then a fetch that answers at once). The
//!   figure is the counting allocator's live bytes of the whole cache afterwards (everything it
//!   allocated since before it was built). Baseline: moka `future::Cache` with capacity 1000
//!   fed the same keys; a bare bounded map (`HashMap` + FIFO eviction) is in the note. Goal:
//!   at most 2 × the cap × our bytes per entry, where bytes per entry is measured on the same
//!   cache when it first reaches the cap (fixed overhead included).
//! - **Failing keys**: 50 000 distinct keys whose fetch fails, through the same bound. Entries
//!   without a value must be evicted like the others: goal, at most the cap remain.
//!
//! Memory is deterministic, so each figure is measured once (no rounds).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use cache_core::{Cache, CacheType, FetchOptions, FetchResult};

use crate::Mode;
use crate::alloc::Snapshot;
use crate::kv::{BenchType, Key};
use crate::report::{Figure, Goal, num};
use crate::rt::{BenchRt, Flavor};
use crate::stats::key;

/// A type whose every fetch fails at once (a bad token, a missing key upstream).
#[derive(Debug)]
struct Failing;

/// The error of [`Failing`].
#[derive(Debug, Clone, Copy)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("refused")
    }
}

impl std::error::Error for Refused {}

impl CacheType for Failing {
    type Request = Key;
    type Value = Arc<u64>;
    type Error = Refused;

    async fn fetch(
        &self,
        _opts: FetchOptions<Arc<u64>>,
        _request: &Key,
    ) -> Result<FetchResult<Arc<u64>>, Refused> {
        Err(Refused)
    }
}

/// Live bytes added since `before`.
fn grown(before: &Snapshot) -> f64 {
    before.live_per(&Snapshot::take(), 1)
}

/// Lets the runtime finish the tasks the last gets left (fetch tasks end after their get
/// returns, a dropped cache's background task ends after it), so that no measurement sees
/// memory another one is still freeing: waits until live bytes hold still for 50 ms (at most
/// 5 s; in smoke mode, where other tests allocate in the same process, one 5 ms pause).
fn settle(rt: &BenchRt, mode: Mode) {
    let (most, step) = mode.pick((5_000, 50), (5_000, 50), (0, 5));
    let deadline = std::time::Instant::now() + Duration::from_millis(most);
    let mut last = crate::alloc::live_bytes();
    loop {
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(step)).await });
        let now = crate::alloc::live_bytes();
        if now == last || std::time::Instant::now() > deadline {
            return;
        }
        last = now;
    }
}

/// Gets every key of `range` through `typed`, `BATCH` at a time (concurrent misses, so the
/// fetch tasks' wake-ups overlap and a million keys take seconds, not a minute).
fn get_all<T>(rt: &BenchRt, typed: &cache_core::TypedCache<T>, range: std::ops::Range<usize>)
where
    T: CacheType<Request = Key>,
{
    const BATCH: usize = 256;
    rt.block_on(async {
        let mut at = range.start;
        while at < range.end {
            let end = (at + BATCH).min(range.end);
            let keys: Vec<Key> = (at..end).map(|i| Key(key(i))).collect();
            futures::future::join_all(keys.iter().map(|k| typed.get(k))).await;
            at = end;
        }
    });
}

/// Runs the scenario.
pub fn run(mode: Mode) -> Vec<Figure> {
    let cap = mode.pick(1_000, 1_000, 100);
    let keys = mode.pick(1_000_000, 200_000, 2_000);
    let failing = mode.pick(50_000, 20_000, 500);
    let rt = BenchRt::new(Flavor::TokioMulti);
    let big = |n: usize| {
        if n >= 1_000_000 && n % 1_000_000 == 0 {
            format!("{} M", n / 1_000_000)
        } else if n >= 1_000 && n % 1_000 == 0 {
            format!("{} k", n / 1_000)
        } else {
            n.to_string()
        }
    };

    // The baselines first, then ours: nothing is freed behind a measurement.
    // moka with the same capacity and keys.
    let before = Snapshot::take();
    let moka = moka::future::Cache::new(cap as u64);
    rt.block_on(async {
        for i in 0..keys {
            moka.insert(key(i), Arc::new(i as u64)).await;
        }
        moka.run_pending_tasks().await;
    });
    let moka_bytes = grown(&before);
    let moka_len = moka.entry_count();
    drop(moka);
    settle(&rt, mode);

    // A bare bounded map: HashMap plus a FIFO of its keys.
    let before = Snapshot::take();
    let mut map: HashMap<String, Arc<u64>> = HashMap::new();
    let mut fifo: VecDeque<String> = VecDeque::new();
    for i in 0..keys {
        let k = key(i);
        fifo.push_back(k.clone());
        map.insert(k, Arc::new(i as u64));
        if map.len() > cap {
            if let Some(old) = fifo.pop_front() {
                map.remove(&old);
            }
        }
    }
    let map_bytes = grown(&before);
    drop((map, fifo));
    settle(&rt, mode);

    // Ours: bytes per entry at the cap, then after every key went through.
    let before = Snapshot::take();
    let cache = Cache::builder(rt.shared()).max_entries(cap).build();
    let ours = cache.register(BenchType::new(rt.shared(), Duration::ZERO));
    get_all(&rt, &ours, 0..cap);
    settle(&rt, mode);
    let per_entry = grown(&before) / cap as f64;
    get_all(&rt, &ours, cap..keys);
    settle(&rt, mode);
    let ours_bytes = grown(&before);
    let ours_len = cache.len();
    let evicted = cache.metrics().total().evictions_capacity;
    drop(ours);
    drop(cache);
    settle(&rt, mode);

    // Failing keys through the same bound.
    let before = Snapshot::take();
    let cache = Cache::builder(rt.shared()).max_entries(cap).build();
    let bad = cache.register(Failing);
    get_all(&rt, &bad, 0..failing);
    settle(&rt, mode);
    let bad_len = cache.len();
    let bad_bytes = grown(&before);
    let bad_evicted = cache.metrics().total().evictions_capacity;
    drop(bad);
    drop(cache);
    settle(&rt, mode);

    vec![
        Figure::new(
            format!(
                "churn/live bytes after {} keys through max_entries({cap})",
                big(keys)
            ),
            ours_bytes / 1024.0,
            "KiB",
        )
        .baseline(
            format!("moka future::Cache, capacity {cap}"),
            moka_bytes / 1024.0,
        )
        .goal(Goal::AtMost(2.0 * cap as f64 * per_entry / 1024.0))
        .note(format!(
            "counting allocator, live bytes of the whole cache after every key got once \
             (default 72 h TTL); goal: 2 × cap × {} B/entry (ours at the cap, fixed overhead \
             included); entries left {ours_len}, capacity evictions {evicted}; moka entries \
             {moka_len}; bare HashMap + FIFO eviction: {} KiB",
            num(per_entry),
            num(map_bytes / 1024.0)
        )),
        Figure::new(
            format!(
                "churn/entries after {} failing keys through max_entries({cap})",
                big(failing)
            ),
            bad_len as f64,
            "entries",
        )
        .goal(Goal::AtMost(cap as f64))
        .note(format!(
            "every fetch fails at once; entries without a value count and are evicted like \
             the others; capacity evictions {bad_evicted}, live bytes {} KiB",
            num(bad_bytes / 1024.0)
        )),
    ]
}
