//! The entry's side of watches: registering and removing records, and offering each completed
//! fetch to them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::cache_type::{CacheRequest, CacheType};
use crate::error::WatchError;
use crate::store::{EntryExtras, EntryHandle, EntryState, Snapshot, Store, Watcher, wake_all};

impl<T: CacheType> Store<T> {
    pub(crate) fn this(&self) -> Option<Arc<Self>> {
        self.this.upgrade()
    }

    pub(crate) fn snapshot_of(
        &self,
        state: &EntryState<T>,
        hit: bool,
        now: Instant,
    ) -> Snapshot<T> {
        Snapshot {
            value: state.value.clone(),
            error: state.error().cloned(),
            meta: self.meta(state, hit, now),
            resets: state.resets,
        }
    }

    /// The entry's current state as a watch event, if it is still cached.
    pub(crate) fn snapshot(&self, entry: &Arc<EntryHandle<T>>) -> Option<Snapshot<T>> {
        let now = self.shared.rt.now();
        self.read_slot(entry, |slot| self.snapshot_of(slot.state(), false, now))
    }

    /// Offers a fetch's outcome to every watch of the entry, dropping those whose receiver is
    /// gone.
    pub(crate) fn deliver(&self, entry: &Arc<EntryHandle<T>>, snapshot: &Snapshot<T>) {
        // Watches whose receiver is gone; no allocation unless there are some.
        let mut gone = Vec::new();
        let mut list = entry.extras();
        let mut at = 0;
        while at < list.len() {
            let keep = list.get(at).is_some_and(|w| w.offer(self, entry, snapshot));
            if keep {
                at += 1;
                continue;
            }
            let Some(watcher) = take_at(&mut list, at) else {
                break;
            };
            gone.push(watcher);
        }
        drop(list);
        // Their sinks (the consumer's) are dropped out of the watch list's lock.
        self.watchers_removed(entry, &gone);
    }

    /// Registers a watch on the entry of `request` and makes sure something keeps fetching it.
    ///
    /// The closed check is made under the table lock after the watch is on its entry, so a
    /// watch either sees the cache closed (and is not added) or is found by `close`.
    pub(crate) fn add_watcher(
        &self,
        request: T::Request,
        watcher: Arc<dyn Watcher<T>>,
    ) -> Result<Arc<EntryHandle<T>>, WatchError> {
        let now = self.shared.rt.now();
        let info = request.cache_info();
        let hash = self.hash(&info);
        let max_age = watcher.max_age();
        let mut started = None;
        let added = self.with_entry(hash, &info, |slot| {
            if self.shared.is_closed() {
                return Err(WatchError::Closed);
            }
            if self.is_retired() {
                return Err(WatchError::Replaced(self.name));
            }
            slot.touch(self.nanos(now));
            let mut list = slot.handle().extras();
            watcher.place().store(list.len(), Ordering::Relaxed);
            list.push(watcher.clone());
            drop(list);
            slot.state().watchers.fetch_add(1, Ordering::AcqRel);
            self.counters.watches.fetch_add(1, Ordering::Relaxed);
            let state = slot.state();
            let age = state.fetched_at.map(|t| self.since(t, now));
            let fresh =
                state.value.is_some() && max_age.is_none_or(|m| age.is_some_and(|a| a <= m));
            // The first delivery may be a cache hit.
            let initial = fresh.then(|| self.snapshot_of(state, true, now));
            if !state.chain.is_active() {
                // Nothing keeps this entry fetching: start the watch loop. A fresh polled
                // value is next fetched when it reaches max age (never, for a max age too
                // long to represent).
                let first_at = match (fresh, max_age, state.fetched_at) {
                    (true, Some(max_age), Some(at)) => Some(self.at(at).checked_add(max_age)),
                    _ => None,
                };
                started = self.start_chain(slot, request.clone(), first_at);
            }
            Ok((slot.handle().clone(), initial))
        });
        drop(info);
        // Spawned out of the table's lock (see `StartedChain`).
        if let Some(chain) = started {
            chain.spawn(&*self.shared.rt);
        }
        let (entry, initial) = added?;
        if let Some(snapshot) = initial {
            if !watcher.offer(self, &entry, &snapshot) {
                self.remove_watcher(&entry, &*watcher);
            }
        }
        Ok(entry)
    }

    /// Removes a watch from its entry (cancel, or receiver gone). Idempotent, and constant
    /// time: the watch knows its place in the list.
    pub(crate) fn remove_watcher(&self, entry: &Arc<EntryHandle<T>>, watcher: &dyn Watcher<T>) {
        let removed = {
            let mut list = entry.extras();
            let at = watcher.place().load(Ordering::Relaxed);
            list.get(at)
                .is_some_and(|w| w.id() == watcher.id())
                .then(|| take_at(&mut list, at))
                .flatten()
        };
        if let Some(watcher) = removed {
            self.watchers_removed(entry, std::slice::from_ref(&watcher));
        }
    }

    /// Ends watches already taken out of `entry`'s list: counts them out, then cancels them
    /// (drops their sinks), in that order on every path, so that a consumer that sees its
    /// channel close finds the watch gone from the counts too.
    pub(crate) fn watchers_removed(
        &self,
        entry: &Arc<EntryHandle<T>>,
        removed: &[Arc<dyn Watcher<T>>],
    ) {
        if removed.is_empty() {
            return;
        }
        self.count_out(entry, removed.len());
        for watcher in removed {
            watcher.cancel();
        }
    }

    fn count_out(&self, entry: &Arc<EntryHandle<T>>, n: usize) {
        self.counters.watches.fetch_sub(n as u64, Ordering::Relaxed);
        // The TTL counts again from the last watch.
        let now = self.nanos(self.shared.rt.now());
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let left = self.read_slot(entry, |slot| {
            slot.touch(now);
            let before = slot.state().watchers.fetch_sub(n, Ordering::AcqRel);
            (before.saturating_sub(n), slot.state().held())
        });
        if let Some((0, held)) = left {
            // Wake a chain that only ran for the watches, so that it stops now.
            wake_all(&entry.changed);
            if !held {
                // The entry may go now: capacity eviction may have had to keep it.
                self.shared.enforce_capacity_on_release();
            }
        }
    }
}

/// Takes the watch at `at` out of its entry's list (by swapping the last one into its place,
/// whose recorded place follows).
fn take_at<T: CacheType>(list: &mut EntryExtras<T>, at: usize) -> Option<Arc<dyn Watcher<T>>> {
    let taken = list.swap_remove(at)?;
    if let Some(moved) = list.get(at) {
        moved.place().store(at, Ordering::Relaxed);
    }
    Some(taken)
}
