//! Capacity bounds memory, not only the entry count: keys churned through `max_entries`
//! leave nothing behind (their own test binary, so the counting allocator sees only them).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use cache_core::sim::SimRuntime;
use cache_core::testing::{MockError, MockRequest, MockType};
use cache_core::{Cache, FetchResult, RegisterOptions};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn churn(cache_type: MockType<u64>, label: &str) {
    let sim = SimRuntime::new(1);
    let cache = Cache::builder(sim.handle()).max_entries(256).build();
    let typed = cache.register(cache_type);
    let mut next = 0u64;
    let mut run = |n: u64| {
        sim.block_on(async {
            for _ in 0..n {
                let _ = typed.get(&MockRequest::new(&format!("key-{next}"))).await;
                next += 1;
            }
        })
    };
    run(4_000);
    let warm = LIVE.load(Ordering::Relaxed);
    run(16_000);
    let after = LIVE.load(Ordering::Relaxed);
    assert!(cache.len() <= 256);
    // 16 000 more keys through a bound of 256: growth must not scale with the keys
    // (before the fix it was ~330 B per key ever created, 5 MB here).
    let growth = after - warm;
    assert!(
        growth < 256 * 1024,
        "{label}: live bytes grew by {growth} over 16 000 churned keys"
    );
}

#[test]
fn churned_keys_through_a_capacity_bound_free_their_memory() {
    churn(
        MockType::new(RegisterOptions::new(), |_o, _r| async {
            Ok(FetchResult::new(7u64, 1))
        }),
        "values",
    );
    churn(
        MockType::new(RegisterOptions::new(), |_o, _r| async {
            Err(MockError::new("bad token"))
        }),
        "failing keys",
    );
}
