//! A read-only view of a type's entries for operators: [`TypedCache::entries`].
//!
//! [`TypedCache::entries`]: crate::TypedCache::entries

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::cache_type::CacheType;
use crate::chain::Chain;
use crate::store::{Slot, Store};

/// The most entries one [`EntryQuery`] returns, whatever its `limit`.
pub const MAX_PAGE: usize = 1000;

/// Which page of a type's entries to list, and in which order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryQuery {
    /// Only entries whose key starts with this (empty: all).
    pub prefix: String,
    /// The order of the listing.
    pub sort: EntrySort,
    /// Largest first.
    pub descending: bool,
    /// Entries to skip, in that order.
    pub offset: usize,
    /// Entries to return, at most [`MAX_PAGE`].
    pub limit: usize,
}

impl Default for EntryQuery {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            sort: EntrySort::Key,
            descending: false,
            offset: 0,
            limit: 100,
        }
    }
}

impl EntryQuery {
    /// The first 100 entries in key order.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only keys starting with `prefix`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sorted by `sort`, largest first if `descending`.
    pub fn sort(mut self, sort: EntrySort, descending: bool) -> Self {
        self.sort = sort;
        self.descending = descending;
        self
    }

    /// Skips `offset` entries and returns at most `limit` (capped at [`MAX_PAGE`]).
    pub fn page(mut self, offset: usize, limit: usize) -> Self {
        self.offset = offset;
        self.limit = limit;
        self
    }
}

/// The order of an entry listing; ties are broken by key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EntrySort {
    /// By key (then datacenter).
    #[default]
    Key,
    /// By index.
    Index,
    /// By time since the value was fetched (entries without a value count as oldest).
    Age,
    /// By time left before the entry expires (watched entries count as never).
    TtlLeft,
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryPage {
    /// Entries matching the prefix, on every page.
    pub total: usize,
    /// This page.
    pub entries: Vec<EntryInfo>,
}

/// What an operator sees of one entry. The partition's token is never shown.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryInfo {
    /// The request key.
    pub key: String,
    /// The datacenter partition (empty when none).
    pub datacenter: String,
    /// The entry's index (0 before its first value).
    pub index: u64,
    /// Whether the entry holds a value.
    pub has_value: bool,
    /// Time since the value was fetched.
    pub age: Option<Duration>,
    /// The last fetch's error, while the entry is failing.
    pub error: Option<String>,
    /// How long the entry has been failing.
    pub failing_for: Option<Duration>,
    /// Watches of the entry.
    pub watchers: usize,
    /// Its fetch chain is waiting out a backoff after failures.
    pub in_backoff: bool,
    /// A fetch is in flight.
    pub fetching: bool,
    /// Time left before the entry expires if nobody reads it; `None` while watched or before
    /// its first fetch completed.
    pub ttl_left: Option<Duration>,
}

/// A sort key: the column's value, then the key bytes for ties.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    value: u128,
    key: Vec<u8>,
}

/// An entry in the listing's heap, ordered by its rank in the listing's direction: "less"
/// is earlier in the listing, whichever way it is sorted.
struct Ranked {
    rank: Rank,
    descending: bool,
    info: EntryInfo,
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.rank == other.rank
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        listing_order(&self.rank, &other.rank, self.descending)
    }
}

/// How two ranks compare in the listing's direction: `Less` is earlier in the listing.
fn listing_order(a: &Rank, b: &Rank, descending: bool) -> CmpOrdering {
    let order = a.cmp(b);
    if descending { order.reverse() } else { order }
}

impl<T: CacheType> Store<T> {
    /// See [`crate::TypedCache::entries`].
    pub(crate) fn entries(&self, query: &EntryQuery) -> EntryPage {
        let now = self.shared.rt.now();
        let now_ns = self.nanos(now);
        let keep = query.offset.saturating_add(query.limit.min(MAX_PAGE));
        let limit = query.limit.min(MAX_PAGE);
        // The heap holds the first `keep` entries of the listing so far with the last of them
        // on top, so that an entry earlier than it replaces it.
        let mut heap: BinaryHeap<Ranked> = BinaryHeap::new();
        let mut total = 0;
        self.for_each_slot(|slot| {
            let (key, _) = slot.key.parts();
            if !key.as_bytes().starts_with(query.prefix.as_bytes()) {
                return;
            }
            total += 1;
            if keep == 0 {
                return;
            }
            let rank = self.rank(slot, query.sort, now_ns);
            let not_earlier = |last: &Ranked| {
                listing_order(&rank, &last.rank, query.descending) != CmpOrdering::Less
            };
            if heap.len() == keep && heap.peek().is_some_and(not_earlier) {
                return;
            }
            heap.push(Ranked {
                rank,
                descending: query.descending,
                info: self.info(slot, now_ns),
            });
            if heap.len() > keep {
                heap.pop();
            }
        });
        let ordered = heap.into_sorted_vec().into_iter().map(|ranked| ranked.info);
        EntryPage {
            total,
            entries: ordered.skip(query.offset).take(limit).collect(),
        }
    }

    fn rank(&self, slot: &Slot<T>, sort: EntrySort, now_ns: u64) -> Rank {
        let state = slot.state();
        let value = match sort {
            EntrySort::Key => 0,
            EntrySort::Index => u128::from(state.index),
            EntrySort::Age => state
                .fetched_at
                .map_or(u128::MAX, |t| t.until(now_ns).as_nanos()),
            EntrySort::TtlLeft => self
                .ttl_left(slot, now_ns)
                .map_or(u128::MAX, |d| d.as_nanos()),
        };
        Rank {
            value,
            key: slot.key.bytes().to_vec(),
        }
    }

    fn ttl_left(&self, slot: &Slot<T>, now_ns: u64) -> Option<Duration> {
        if !slot.state().expiry_scheduled() || slot.state().watched() {
            return None;
        }
        let last_read = slot.last_read.load(Ordering::Relaxed);
        let expires = Duration::from_nanos(last_read).saturating_add(self.opts.last_get_ttl);
        Some(expires.saturating_sub(Duration::from_nanos(now_ns)))
    }

    fn info(&self, slot: &Slot<T>, now_ns: u64) -> EntryInfo {
        let state = slot.state();
        let (key, datacenter) = slot.key.parts();
        EntryInfo {
            key: key.to_owned(),
            datacenter: datacenter.to_owned(),
            index: state.index,
            has_value: state.value.is_some(),
            age: state.fetched_at.map(|t| t.until(now_ns)),
            error: state.error().map(ToString::to_string),
            failing_for: state.failing_since().map(|t| t.until(now_ns)),
            watchers: slot.state().watchers.load(Ordering::Relaxed) as usize,
            in_backoff: matches!(state.chain.chain(), Chain::Sleeping { .. })
                && state.backoff().failures() > 0,
            fetching: state.chain.is_fetching(),
            ttl_left: self.ttl_left(slot, now_ns),
        }
    }
}
