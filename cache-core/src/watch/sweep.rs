//! The sweep of dead receivers: one task per cache, while watches exist, checks every few
//! moments for sinks whose receiver went away while nothing was sent.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::future::select;

use crate::runtime::Sleep;
use crate::shared::{CacheState, Sweep};

/// How often watches are checked for a receiver that went away while nothing was sent.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Adds a watch to the cache's sweep list, starting the sweep task if it is not running.
///
/// A receiver dropped while its watch has nothing to send is noticed here within
/// [`SWEEP_INTERVAL`], so its record, sink and entry do not wait for the entry's next fetch
/// (a blocking query may stay open for minutes). One task per cache, only while watches exist.
pub(crate) fn register_sweep(shared: &Arc<CacheState>, watch: Weak<dyn Sweep>) {
    shared
        .sweep
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(watch);
    if !shared.sweeper_running.swap(true, Ordering::AcqRel) {
        shared
            .rt
            .spawn(Box::pin(run_sweeper(Arc::downgrade(shared))));
    }
}

async fn run_sweeper(shared: Weak<CacheState>) {
    let mut sleep: Option<Sleep> = None;
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        if strong.is_closed() {
            strong.sweeper_running.store(false, Ordering::Release);
            return;
        }
        let closed = strong.close_event.listen();
        // A clock too near the end of `Instant` (a user's runtime) has no next tick: the
        // sweep then waits for close alone.
        let Some(deadline) = strong.rt.now().checked_add(SWEEP_INTERVAL) else {
            drop(strong);
            closed.await;
            continue;
        };
        let timer = match sleep.as_mut() {
            Some(timer) => {
                timer.reset(deadline);
                timer
            }
            None => sleep.insert(Sleep::until(&*strong.rt, deadline)),
        };
        // Hold no strong reference while asleep: a dropped cache ends the task.
        drop(strong);
        select(closed, timer).await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let watches: Vec<Weak<dyn Sweep>> =
            std::mem::take(&mut *strong.sweep.lock().unwrap_or_else(|p| p.into_inner()));
        // Checked outside the list's lock: removing a watch takes its entry's locks.
        let live: Vec<Weak<dyn Sweep>> = watches
            .into_iter()
            .filter(|w| w.upgrade().is_some_and(|w| w.sweep()))
            .collect();
        let mut list = strong.sweep.lock().unwrap_or_else(|p| p.into_inner());
        list.extend(live);
        if list.is_empty() {
            strong.sweeper_running.store(false, Ordering::Release);
            return;
        }
    }
}
