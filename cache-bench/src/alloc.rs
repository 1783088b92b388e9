//! A counting global allocator (bytes requested and live, exact and deterministic) and the
//! process's resident set size from `/proc/self/status`.
//!
//! Byte counts are what the program asked for (`Layout::size`), not what malloc spends around
//! it; the RSS figures show the allocator's overhead too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};

static LIVE: AtomicIsize = AtomicIsize::new(0);

/// Allocation counts by exact size (the last slot counts every larger size), while tracking.
static SIZES: [AtomicUsize; 1025] = [const { AtomicUsize::new(0) }; 1025];
static TRACKING: AtomicBool = AtomicBool::new(false);

#[inline]
fn track(size: usize) {
    if TRACKING.load(Ordering::Relaxed) {
        SIZES[size.min(1024)].fetch_add(1, Ordering::Relaxed);
    }
}

/// The system allocator, counting live bytes.
#[derive(Debug)]
pub struct Counting;

// SAFETY: every method forwards to `System` with the same arguments; the counter is a side
// effect that never touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
            track(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
            track(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new
    }
}

/// Starts counting allocations by size (see [`sizes`]), from zero.
pub fn track_sizes(on: bool) {
    if on {
        for slot in &SIZES {
            slot.store(0, Ordering::Relaxed);
        }
    }
    TRACKING.store(on, Ordering::Relaxed);
}

/// The allocations made while tracking, as (size, count), most bytes first; the size 1024
/// stands for "1024 or more". A profile of where the bytes of a structure go.
pub fn sizes() -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = SIZES
        .iter()
        .enumerate()
        .map(|(size, n)| (size, n.load(Ordering::Relaxed)))
        .filter(|&(_, n)| n > 0)
        .collect();
    out.sort_by_key(|&(size, n)| std::cmp::Reverse(size * n));
    out
}

/// Bytes allocated and not yet freed, by the whole process.
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    /// glibc: returns free memory at the top of the heap and in free pages to the OS.
    fn malloc_trim(pad: usize) -> i32;
}

/// The resident set size in bytes, after asking malloc to return what it holds free, so that
/// consecutive measurements in one process do not reuse each other's freed pages unseen.
/// `None` where `/proc` is missing.
pub fn rss_bytes() -> Option<usize> {
    // SAFETY: `malloc_trim` takes no pointer and is thread-safe; the Rust `System` allocator
    // is glibc's malloc on Linux (the only platform with `/proc/self/status` anyway).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        malloc_trim(0);
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Live bytes and RSS at one moment, to subtract from a later one.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    live: isize,
    rss: Option<usize>,
}

impl Snapshot {
    /// Now.
    pub fn take() -> Self {
        let rss = rss_bytes();
        Self {
            live: live_bytes(),
            rss,
        }
    }

    /// Live bytes added since `self`, divided by `n`.
    pub fn live_per(&self, later: &Snapshot, n: usize) -> f64 {
        (later.live - self.live) as f64 / n as f64
    }

    /// RSS added since `self`, divided by `n` (0 where unknown).
    pub fn rss_per(&self, later: &Snapshot, n: usize) -> f64 {
        match (self.rss, later.rss) {
            (Some(a), Some(b)) => (b as f64 - a as f64) / n as f64,
            _ => 0.0,
        }
    }
}
