//! Watch fan-out: 100 000 watches on one key, and 100 000 spread over 1 000 keys; one upstream
//! change → every watch delivered. Baseline: `tokio::sync::watch` with the same number of
//! receivers, each in its own task.
//!
//! What is measured, exactly:
//! - ours: each watch is `TypedCache::notify(request, (), tx)` with its own
//!   `async_channel::bounded(1)` sink, and one consumer task per watch loops on `rx.recv()`.
//!   The upstream is `MockServer` (a blocking query server) behind a blocking cache type; all
//!   keys read the same server, so one `server.set` changes every key at once. The clock starts
//!   just before `server.set` and stops when the last consumer has received its event, so it
//!   includes the blocked upstream read waking, the entry's fetch chain storing the value, and
//!   the offer to every watch record.
//! - baseline: one `tokio::sync::watch` channel per key with the same receivers per key, each
//!   receiver in a task looping on `changed()` + `borrow_and_update()`. The clock starts just
//!   before the `send`s and stops when the last receiver task has seen the change.
//! - Each consumer decrements one shared counter; the one that reaches zero takes the time.
//!   The median and p99 are over rounds (one change per round), after one warm-up round.
//! - Bytes per idle watch (one-key case): counting-allocator live bytes ÷ watches, for every
//!   watch on one shared channel (the cache's own cost), for a `TypedCache::watch` stream per
//!   watch (the cache's own per-watch channel), and, for context, (a) for the watch with its
//!   own `async_channel::bounded(1)` (its record, its `WatchHandle` and the channel, measured
//!   before any consumer task exists) and (b) with its consumer task parked on `recv()`; the
//!   baseline is a receiver parked in its task. RSS deltas (after `malloc_trim`) likewise.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cache_core::testing::{MockRequest, MockServer};
use cache_core::{Cache, RegisterOptions, SharedRuntime, Sleep, WatchHandle};
use futures::StreamExt;

use crate::Mode;
use crate::alloc::Snapshot;
use crate::report::{Figure, Goal, num};
use crate::rt::{BenchRt, Flavor};
use crate::stats::{median, p99};

/// Counts deliveries of a round and takes the time of the last.
struct Tally {
    remaining: AtomicUsize,
    alive: AtomicUsize,
    done: async_channel::Sender<Instant>,
}

impl Tally {
    fn new() -> (Arc<Self>, async_channel::Receiver<Instant>) {
        let (done, rx) = async_channel::unbounded();
        let tally = Arc::new(Self {
            remaining: AtomicUsize::new(0),
            alive: AtomicUsize::new(0),
            done,
        });
        (tally, rx)
    }

    fn delivered(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.done.try_send(Instant::now());
        }
    }
}

/// What one fan-out measurement found.
#[derive(Debug, Clone)]
pub struct Fanout {
    /// Ours: change → last delivered, ms, one sample per round.
    pub ours_ms: Vec<f64>,
    /// Baseline: send → last receiver task woken, ms, per round.
    pub base_ms: Vec<f64>,
    /// Ours: live bytes per idle watch whose sink is a clone of one shared sender (the
    /// cache's own cost: record, handle, its slot in the entry's list).
    pub shared_bytes: f64,
    /// Ours: RSS per idle watch on a shared channel.
    pub shared_rss: f64,
    /// Ours: live bytes per idle [`WatchStream`](cache_core::watch::WatchStream), the
    /// cache's own per-watch channel (a one-event slot shared with the record).
    pub stream_bytes: f64,
    /// Ours: RSS per idle `WatchStream`.
    pub stream_rss: f64,
    /// Ours: live bytes per idle watch (record, handle, its own bounded(1) channel).
    pub watch_bytes: f64,
    /// Ours: live bytes per idle watch with its consumer task.
    pub watch_task_bytes: f64,
    /// Baseline: live bytes per receiver parked in its task.
    pub base_bytes: f64,
    /// Ours: RSS per watch alone.
    pub watch_rss: f64,
    /// Ours: RSS per watch with its consumer task.
    pub watch_task_rss: f64,
    /// Baseline: RSS per receiver task.
    pub base_rss: f64,
    /// Ours: the allocations made while the watches were created, as (size in bytes, count
    /// per watch), most bytes first: where a watch's bytes go.
    pub watch_sizes: Vec<(usize, f64)>,
}

impl Fanout {
    /// The allocation profile of one watch, as text.
    pub fn watch_profile(&self) -> String {
        self.watch_sizes
            .iter()
            .take(8)
            .map(|(size, per)| format!("{size} B × {per:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Waits on `rt`'s timers until `cond` holds; panics after 120 s.
async fn until(rt: &SharedRuntime, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "fan-out: timed out waiting for {what}"
        );
        Sleep::after(&**rt, Duration::from_millis(1)).await;
    }
}

/// Sets up `watches` watches over `keys` keys on `rt`, ours and the baseline, and times
/// `rounds` changes of each, interleaved.
pub fn measure(rt: &BenchRt, watches: usize, keys: usize, rounds: usize) -> Fanout {
    let per_key = watches / keys;
    let watches = per_key * keys;
    let shared = rt.shared();

    // ----- ours -----
    let cache = Cache::new(shared.clone());
    let server = MockServer::new(shared.clone(), 0u64, 1);
    let typed = cache.register(server.blocking_type(RegisterOptions::new()));
    let requests: Vec<MockRequest> = (0..keys)
        .map(|k| MockRequest::new(&format!("fan/{k:06}")))
        .collect();
    let (ours_tally, ours_done) = Tally::new();
    let mut handles: Vec<WatchHandle> = Vec::with_capacity(watches);

    // The cache's own cost of a watch: every watch pushes into one shared channel, so no
    // per-watch channel is counted.
    let (shared_bytes, shared_rss) = {
        let (tx, rx) = async_channel::unbounded();
        let before = Snapshot::take();
        for request in &requests {
            for _ in 0..per_key {
                handles.push(
                    typed
                        .notify(request.clone(), (), tx.clone())
                        .expect("notify"),
                );
            }
        }
        rt.block_on(until(&shared, "the first events", || rx.len() == watches));
        while rx.try_recv().is_ok() {}
        let after = Snapshot::take();
        handles.clear();
        (
            before.live_per(&after, watches),
            before.rss_per(&after, watches),
        )
    };

    // A `WatchStream` per watch: the cache's own per-watch channel.
    let (stream_bytes, stream_rss) = {
        let before = Snapshot::take();
        let mut streams = Vec::with_capacity(watches);
        for request in &requests {
            for _ in 0..per_key {
                streams.push(typed.watch(request.clone()).expect("watch"));
            }
        }
        rt.block_on(async {
            for stream in &mut streams {
                stream.next().await.expect("first event");
            }
        });
        let after = Snapshot::take();
        drop(streams);
        (
            before.live_per(&after, watches),
            before.rss_per(&after, watches),
        )
    };

    let mut rxs = Vec::with_capacity(watches);
    let before = Snapshot::take();
    crate::alloc::track_sizes(true);
    for request in &requests {
        for _ in 0..per_key {
            let (tx, rx) = async_channel::bounded(1);
            handles.push(typed.notify(request.clone(), (), tx).expect("notify"));
            rxs.push(rx);
        }
    }
    rt.block_on(until(&shared, "the first events", || {
        rxs.iter().map(async_channel::Receiver::len).sum::<usize>() == watches
    }));
    crate::alloc::track_sizes(false);
    let watch_sizes = crate::alloc::sizes();
    for rx in &rxs {
        rx.try_recv().expect("first event");
    }
    let watches_only = Snapshot::take();
    for rx in rxs.drain(..) {
        let tally = ours_tally.clone();
        tally.alive.fetch_add(1, Ordering::Relaxed);
        rt.spawn(async move {
            while rx.recv().await.is_ok() {
                tally.delivered();
            }
            tally.alive.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let mut index = 1;
    let mut ours_round = || {
        index += 1;
        ours_tally.remaining.store(watches, Ordering::Release);
        let start = Instant::now();
        server.set(index, index);
        let last = rt.block_on(ours_done.recv()).expect("tally");
        (last - start).as_secs_f64() * 1e3
    };
    ours_round(); // warm-up: every consumer task has run and parked
    let with_tasks = Snapshot::take();

    // ----- baseline -----
    let (base_tally, base_done) = Tally::new();
    let senders: Vec<tokio::sync::watch::Sender<u64>> = (0..keys)
        .map(|_| tokio::sync::watch::channel(0).0)
        .collect();
    let base_before = Snapshot::take();
    for tx in &senders {
        for _ in 0..per_key {
            let mut rx = tx.subscribe();
            let tally = base_tally.clone();
            tally.alive.fetch_add(1, Ordering::Relaxed);
            rt.spawn(async move {
                while rx.changed().await.is_ok() {
                    std::hint::black_box(*rx.borrow_and_update());
                    tally.delivered();
                }
                tally.alive.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
    let mut value = 0;
    let mut base_round = || {
        value += 1;
        base_tally.remaining.store(watches, Ordering::Release);
        let start = Instant::now();
        for tx in &senders {
            tx.send_replace(value);
        }
        let last = rt.block_on(base_done.recv()).expect("tally");
        (last - start).as_secs_f64() * 1e3
    };
    base_round(); // warm-up
    let base_after = Snapshot::take();

    let s = crate::stats::interleave(rounds, &mut [&mut ours_round, &mut base_round]);

    // ----- teardown: every consumer task ends -----
    drop(handles);
    drop(senders);
    cache.close();
    rt.block_on(until(&shared, "the consumers to end", || {
        ours_tally.alive.load(Ordering::Relaxed) == 0
            && base_tally.alive.load(Ordering::Relaxed) == 0
    }));

    Fanout {
        ours_ms: s[0].clone(),
        base_ms: s[1].clone(),
        shared_bytes,
        shared_rss,
        stream_bytes,
        stream_rss,
        watch_bytes: before.live_per(&watches_only, watches),
        watch_task_bytes: before.live_per(&with_tasks, watches),
        base_bytes: base_before.live_per(&base_after, watches),
        watch_rss: before.rss_per(&watches_only, watches),
        watch_task_rss: before.rss_per(&with_tasks, watches),
        base_rss: base_before.rss_per(&base_after, watches),
        watch_sizes: watch_sizes
            .into_iter()
            .map(|(size, n)| (size, n as f64 / watches as f64))
            .filter(|&(_, per)| per >= 0.01)
            .collect(),
    }
}

/// The latency figure of a fan-out measurement.
pub fn latency_figure(name: String, f: &Fanout) -> Figure {
    Figure::new(name, median(&f.ours_ms), "ms")
        .p99(p99(&f.ours_ms), Some(p99(&f.base_ms)))
        .baseline("tokio::sync::watch receiver tasks", median(&f.base_ms))
        .goal(Goal::RatioAtMost(2.0))
}

/// Runs the scenario.
pub fn run(mode: Mode) -> Vec<Figure> {
    let watches = mode.pick(100_000, 20_000, 500);
    let keys = mode.pick(1_000, 200, 10);
    let rounds = mode.pick(21, 7, 2);
    let rt = BenchRt::new(Flavor::TokioMulti);
    let one = measure(&rt, watches, 1, rounds);
    let spread = measure(&rt, watches, keys, rounds);
    let w = crate::report::num(watches as f64);
    vec![
        latency_figure(format!("fanout/{w} watches, 1 key"), &one).note(
            "upstream change → last of the consumer tasks received its event (async_channel \
             bounded(1) per watch, one task per watch); baseline: send → last receiver task \
             woken; median and p99 over rounds; tokio multi-thread",
        ),
        latency_figure(format!("fanout/{w} watches, {keys} keys"), &spread).note(format!(
            "{} watches per key; one upstream change reaches every key",
            watches / keys
        )),
        Figure::new(
            "fanout/bytes per idle watch, shared channel",
            one.shared_bytes,
            "B/watch",
        )
        .baseline("tokio watch receiver + task", one.base_bytes)
        .goal(Goal::AtMost(512.0))
        .note(format!(
            "counting allocator ÷ watches; every watch's sink is a clone of one shared \
                 sender (Consul's model: one channel, many correlation ids), so this is the \
                 cache's own cost: record, WatchHandle, slot in the entry's list (RSS {} \
                 B/watch). Consul pays a goroutine, ≥ 2 KiB, per watch",
            num(one.shared_rss)
        )),
        Figure::new(
            "fanout/bytes per idle watch, own WatchStream",
            one.stream_bytes,
            "B/watch",
        )
        .baseline("tokio watch receiver + task", one.base_bytes)
        .goal(Goal::AtMost(512.0))
        .note(format!(
            "each watch with its own channel, the cache's `TypedCache::watch` stream (one \
                 event slot shared with the watch record), its first event read (RSS {} \
                 B/watch)",
            num(one.stream_rss)
        )),
        Figure::new(
            "fanout/bytes per idle watch, own channel",
            one.watch_bytes,
            "B/watch",
        )
        .baseline("tokio watch receiver + task", one.base_bytes)
        .note(format!(
            "for context: each watch with its own async_channel::bounded(1), a channel of the \
                 user's choosing, before any consumer task exists (RSS {} B/watch). \
                 Allocations per watch (size × count): {}",
            num(one.watch_rss),
            one.watch_profile()
        )),
        Figure::new(
            "fanout/bytes per idle watch + consumer task",
            one.watch_task_bytes,
            "B/watch",
        )
        .baseline("tokio watch receiver + task", one.base_bytes)
        .note(format!(
            "as above plus one tokio task parked in rx.recv(); RSS {} vs {} B/watch",
            num(one.watch_task_rss),
            num(one.base_rss)
        )),
    ]
}
