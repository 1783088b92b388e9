//! Regressions found by the adversarial program (`cache-bench/examples/adversary.rs`) and the
//! review of the one-allocation entry and per-store expiry queues (each says whether it failed
//! before a fix or guards an edge that held). Virtual time; a test that would hang on a defect
//! runs its simulation on a thread of its own and fails after a wall-clock bound instead.

use std::sync::mpsc;
use std::time::Duration;

use cache_core::Cache;
use cache_core::RegisterOptions;
use cache_core::sim::SimRuntime;
use cache_core::testing::{MockRequest, MockServer};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Runs `body` on a thread of its own and fails if it has not finished within `bound` of
/// wall-clock time (a spinning task would otherwise hang the test run).
fn within(bound: Duration, what: &str, body: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        body();
        let _ = done.send(());
    });
    match finished.recv_timeout(bound) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the body panicked"),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still running after {bound:?}"),
    }
}

/// A watched entry of a type whose TTL is zero (or a nanosecond) must not make the expiry
/// task re-check it in a loop: the watched entry's next check was "now + TTL", already due
/// when the task looked again, so the task spun without ever yielding (on a real runtime, one
/// worker at 100 % for as long as the watch lasted; on the virtual clock, a hang). Failed
/// before the fix (a watched entry is looked at again no sooner than a second later).
#[test]
fn a_watched_entry_with_a_zero_or_tiny_ttl_does_not_spin_the_expiry_task() {
    for ttl in [Duration::ZERO, Duration::from_nanos(1)] {
        within(secs(20), &format!("ttl {ttl:?}"), move || {
            let sim = SimRuntime::new(1);
            let cache = Cache::new(sim.handle());
            let server = MockServer::new(sim.handle(), 1u64, 1);
            let typed = cache.register(
                server.blocking_type(
                    RegisterOptions::new()
                        .last_get_ttl(ttl)
                        .query_timeout(secs(600)),
                ),
            );
            let (tx, rx) = async_channel::bounded(16);
            let watch = typed.notify(MockRequest::new("k"), (), tx).unwrap();
            sim.block_on(async {
                let first = rx.recv().await.unwrap();
                assert_eq!(first.meta.index, 1);
                sim.sleep(secs(10)).await;
                assert_eq!(cache.len(), 1, "a watched entry stays");
                drop(watch);
                // Looked at again within a second (the shortest pause for a watched entry).
                sim.sleep(Duration::from_millis(1010)).await;
                assert_eq!(cache.len(), 0, "and expires once unwatched");
            });
            cache.close();
        });
    }
}

/// Edge guard (held before any fix): gets of a type whose TTL is zero answer, each from its own
/// fetch, although the expiry task evicts their entry as soon as the fetch is stored.
#[test]
fn gets_of_a_zero_ttl_type_answer() {
    within(secs(20), "zero ttl gets", || {
        let sim = SimRuntime::new(1);
        let cache = Cache::new(sim.handle());
        let server = MockServer::new(sim.handle(), 7u64, 1);
        let typed = cache
            .register(server.polling_type(RegisterOptions::new().last_get_ttl(Duration::ZERO)));
        sim.block_on(async {
            for i in 0..100 {
                let got = typed.get(&MockRequest::new(&format!("k{}", i % 3))).await;
                assert_eq!(got.unwrap().value, Some(7));
            }
            sim.sleep(secs(1)).await;
            assert_eq!(cache.len(), 0);
        });
    });
}
