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
/// returns), so their memory is not counted.
fn settle(rt: &BenchRt) {
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
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

    // Ours: bytes per entry at the cap, then after every key went through.
    let before = Snapshot::take();
    let cache = Cache::builder(rt.shared()).max_entries(cap).build();
    let ours = cache.register(BenchType::new(rt.shared(), Duration::ZERO));
    rt.block_on(async {
        for i in 0..cap {
            ours.get(&Key(key(i))).await.expect("fetch never fails");
        }
    });
    settle(&rt);
    let per_entry = grown(&before) / cap as f64;
    rt.block_on(async {
        for i in cap..keys {
            ours.get(&Key(key(i))).await.expect("fetch never fails");
        }
    });
    settle(&rt);
    let ours_bytes = grown(&before);
    let ours_len = cache.len();
    let evicted = cache.metrics().total().evictions_capacity;
    drop(ours);
    drop(cache);
    settle(&rt);

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

    // Failing keys through the same bound.
    let before = Snapshot::take();
    let cache = Cache::builder(rt.shared()).max_entries(cap).build();
    let bad = cache.register(Failing);
    rt.block_on(async {
        for i in 0..failing {
            let _ = bad.get(&Key(key(i))).await;
        }
    });
    settle(&rt);
    let bad_len = cache.len();
    let bad_bytes = grown(&before);
    let bad_evicted = cache.metrics().total().evictions_capacity;
    drop(bad);
    drop(cache);

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
