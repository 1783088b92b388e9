//! The embedded upstream: an in-process authoritative key-value store with one monotonically
//! increasing index per write (like a Raft index) that answers blocking queries.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::api::{
    Entry, KeyRead, ListRead, MAX_WAIT, OpCounters, Query, Upstream, UpstreamError, UpstreamStats,
    bump,
};
use super::contact::accepted;
use super::faults::Faults;

/// The index of an upstream that has seen no write: indexes are never 0.
const FIRST_INDEX: u64 = 1;

#[derive(Debug)]
struct Item {
    value: Vec<u8>,
    flags: u64,
    create_index: u64,
    modify_index: u64,
}

impl Item {
    fn entry(&self, key: &str) -> Entry {
        Entry {
            key: key.to_owned(),
            value: self.value.clone(),
            flags: self.flags,
            create_index: self.create_index,
            modify_index: self.modify_index,
        }
    }
}

#[derive(Debug)]
struct State {
    /// The index of the last write.
    index: u64,
    data: BTreeMap<String, Item>,
    /// The index at which each deleted key was deleted, so that "absent" has an index that
    /// rises on every change. Never pruned: the store is a demo, not a database.
    tombstones: BTreeMap<String, u64>,
}

impl State {
    fn key_index(&self, key: &str) -> u64 {
        self.data
            .get(key)
            .map(|item| item.modify_index)
            .or_else(|| self.tombstones.get(key).copied())
            .unwrap_or(FIRST_INDEX)
    }

    fn read_key(&self, key: &str) -> (KeyRead, u64) {
        let index = self.key_index(key);
        let read = KeyRead {
            entry: self.data.get(key).map(|item| item.entry(key)),
            index,
        };
        (read, index)
    }

    fn read_prefix(&self, prefix: &str) -> (ListRead, u64) {
        let mut index = FIRST_INDEX;
        let mut entries = Vec::new();
        for (key, item) in under_prefix(&self.data, prefix) {
            index = index.max(item.modify_index);
            entries.push(item.entry(key));
        }
        for (_, deleted_at) in under_prefix(&self.tombstones, prefix) {
            index = index.max(*deleted_at);
        }
        (ListRead { entries, index }, index)
    }

    /// The key's index for compare-and-set: 0 when it does not exist.
    fn cas_index(&self, key: &str) -> u64 {
        self.data.get(key).map_or(0, |item| item.modify_index)
    }
}

fn under_prefix<'a, V>(
    map: &'a BTreeMap<String, V>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
    map.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(key, _)| key.starts_with(prefix))
}

/// An in-process authoritative key-value store that answers blocking queries.
///
/// Every write (put, or delete of an existing key) takes the next index, starting at 2 (1 is
/// the index of the empty store). Blocked reads are woken on every write and re-check their
/// own key or prefix, so a write elsewhere does not answer them.
///
/// # Examples
///
/// ```
/// use demo_agent::upstream::{FaultSettings, Faults, MemoryUpstream, Query, Upstream};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let upstream = MemoryUpstream::new(Faults::new(FaultSettings::default()));
/// let index = upstream.put("greeting", b"hello".to_vec(), 0, None).await.unwrap();
/// let read = upstream.get("greeting", Query::now()).await.unwrap();
/// let entry = read.entry.unwrap();
/// assert_eq!((entry.value.as_slice(), read.index), (&b"hello"[..], index));
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryUpstream {
    state: Mutex<State>,
    /// Bumped after every write and on close; blocked reads wait for it to change.
    changed: watch::Sender<u64>,
    faults: Arc<Faults>,
    closed: AtomicBool,
    counters: OpCounters,
}

impl MemoryUpstream {
    /// An empty store (index 1) whose operations suffer `faults`.
    pub fn new(faults: Arc<Faults>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                index: FIRST_INDEX,
                data: BTreeMap::new(),
                tombstones: BTreeMap::new(),
            }),
            changed: watch::Sender::new(0),
            faults,
            closed: AtomicBool::new(false),
            counters: OpCounters::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed
            .send_modify(|version| *version = version.wrapping_add(1));
    }

    async fn before_operation(&self) -> Result<(), UpstreamError> {
        self.counters.before_operation(&self.faults).await
    }

    /// A read that blocks until `read`'s index is above `query.min_index`, `query.wait` has
    /// passed, an outage starts, or the store closes.
    async fn blocking_read<T>(
        &self,
        query: Query,
        blocking_counter: &AtomicU64,
        plain_counter: &AtomicU64,
        read: impl Fn(&State) -> (T, u64),
    ) -> Result<T, UpstreamError> {
        let wait = query.wait.min(MAX_WAIT);
        let block = query.min_index > 0 && !wait.is_zero();
        bump(if block {
            blocking_counter
        } else {
            plain_counter
        });
        self.before_operation().await?;
        // Subscribe before the first look, so a write between the look and the wait still
        // wakes this read (listen, re-check, then wait).
        let mut changed = self.changed.subscribe();
        let mut faults = self.faults.subscribe();
        if !block {
            return Ok(read(&self.lock()).0);
        }
        let _open = self.counters.open_blocking();
        // The read is held now: the caller's data is current (see `contact::accepted`).
        accepted();
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            let (result, index, behind) = {
                let state = self.lock();
                let (result, index) = read(&state);
                // The caller's index is from a future this store never reached: it saw
                // another (replaced) store. Answer at once with the lower index.
                (result, index, state.index < query.min_index)
            };
            if index > query.min_index || behind || self.closed.load(Ordering::Acquire) {
                return Ok(result);
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = faults.changed() => {
                    if self.faults.get().fail {
                        bump(&self.counters.injected_failures);
                        return Err(UpstreamError::Unavailable(
                            "injected outage ended an open blocking query".to_owned(),
                        ));
                    }
                }
                () = &mut deadline => return Ok(read(&self.lock()).0),
            }
        }
    }

    /// Applies one write under the lock. `apply` gets the next index and says whether it
    /// changed anything (if not, the key's current index answers). `cas` is checked first;
    /// `absent_ok`: a compare-and-set on an absent key succeeds (Consul's delete rule).
    fn write(
        &self,
        key: &str,
        cas: Option<u64>,
        absent_ok: bool,
        apply: impl FnOnce(&mut State, u64) -> bool,
    ) -> Result<u64, UpstreamError> {
        let index = {
            let mut state = self.lock();
            if let Some(expected) = cas {
                let current = state.cas_index(key);
                if current != expected && !(absent_ok && current == 0) {
                    return Err(UpstreamError::CasMismatch {
                        key: key.to_owned(),
                        expected,
                        current,
                    });
                }
            }
            let next = state.index + 1;
            if !apply(&mut state, next) {
                return Ok(state.key_index(key));
            }
            state.index = next;
            next
        };
        bump(&self.counters.writes);
        self.notify();
        Ok(index)
    }
}

impl Upstream for MemoryUpstream {
    fn get<'a>(
        &'a self,
        key: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<KeyRead, UpstreamError>> {
        self.blocking_read(
            query,
            &self.counters.key_reads_blocking,
            &self.counters.key_reads,
            move |state| state.read_key(key),
        )
        .boxed()
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<ListRead, UpstreamError>> {
        self.blocking_read(
            query,
            &self.counters.list_reads_blocking,
            &self.counters.list_reads,
            move |state| state.read_prefix(prefix),
        )
        .boxed()
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        async move {
            self.before_operation().await?;
            self.write(key, cas, false, |state, index| {
                state.tombstones.remove(key);
                let create_index = state.data.get(key).map_or(index, |old| old.create_index);
                state.data.insert(
                    key.to_owned(),
                    Item {
                        value,
                        flags,
                        create_index,
                        modify_index: index,
                    },
                );
                true
            })
        }
        .boxed()
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        cas: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        async move {
            self.before_operation().await?;
            self.write(key, cas, true, |state, index| {
                if state.data.remove(key).is_none() {
                    return false;
                }
                state.tombstones.insert(key.to_owned(), index);
                true
            })
        }
        .boxed()
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        async move {
            self.before_operation().await?;
            let index = {
                let mut state = self.lock();
                let doomed: Vec<String> = under_prefix(&state.data, prefix)
                    .map(|(key, _)| key.clone())
                    .collect();
                if doomed.is_empty() {
                    return Ok(state.index);
                }
                let index = state.index + 1;
                for key in doomed {
                    state.data.remove(&key);
                    state.tombstones.insert(key, index);
                }
                state.index = index;
                index
            };
            bump(&self.counters.writes);
            self.notify();
            Ok(index)
        }
        .boxed()
    }

    fn counters(&self) -> UpstreamStats {
        Self::counters(self)
    }

    fn stats(&self) -> BoxFuture<'_, Result<UpstreamStats, UpstreamError>> {
        async move {
            bump(&self.counters.stats_reads);
            self.before_operation().await?;
            Ok(self.counters())
        }
        .boxed()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify();
    }
}

impl MemoryUpstream {
    /// The counters right now, without latency or fault injection (for the metrics page).
    pub fn counters(&self) -> UpstreamStats {
        let (index, keys) = {
            let state = self.lock();
            (state.index, state.data.len() as u64)
        };
        self.counters.stats("embedded", index, keys)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::upstream::FaultSettings;

    fn store() -> Arc<MemoryUpstream> {
        MemoryUpstream::new(Faults::new(FaultSettings::default()))
    }

    #[tokio::test]
    async fn indexes_start_at_one_and_rise_per_write() {
        let up = store();
        let absent = up.get("a", Query::now()).await.unwrap();
        assert_eq!((absent.entry, absent.index), (None, 1));
        assert_eq!(up.put("a", b"1".to_vec(), 0, None).await.unwrap(), 2);
        assert_eq!(up.put("b", b"2".to_vec(), 0, None).await.unwrap(), 3);
        assert_eq!(up.get("a", Query::now()).await.unwrap().index, 2);
        assert_eq!(up.delete("a", None).await.unwrap(), 4);
        let deleted = up.get("a", Query::now()).await.unwrap();
        assert_eq!((deleted.entry, deleted.index), (None, 4));
        // Deleting an absent key changes nothing.
        assert_eq!(up.delete("zzz", None).await.unwrap(), 1);
        assert_eq!(up.counters().index, 4);
    }

    #[tokio::test]
    async fn prefix_index_covers_writes_and_deletes_under_it() {
        let up = store();
        up.put("app/x", b"1".to_vec(), 0, None).await.unwrap();
        up.put("other", b"2".to_vec(), 0, None).await.unwrap();
        up.put("app/y", b"3".to_vec(), 0, None).await.unwrap();
        let list = up.list("app/", Query::now()).await.unwrap();
        assert_eq!(list.index, 4);
        assert_eq!(
            list.entries
                .iter()
                .map(|kv| kv.key.as_str())
                .collect::<Vec<_>>(),
            ["app/x", "app/y"]
        );
        up.delete("app/y", None).await.unwrap();
        let list = up.list("app/", Query::now()).await.unwrap();
        assert_eq!((list.entries.len(), list.index), (1, 5));
        assert_eq!(up.list("", Query::now()).await.unwrap().entries.len(), 2);
    }

    #[tokio::test]
    async fn cas_checks_the_key_index() {
        let up = store();
        assert_eq!(up.put("a", b"1".to_vec(), 0, Some(0)).await.unwrap(), 2);
        let err = up.put("a", b"2".to_vec(), 0, Some(0)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::CasMismatch { current: 2, .. }));
        assert_eq!(up.put("a", b"2".to_vec(), 0, Some(2)).await.unwrap(), 3);
        assert!(up.delete("a", Some(2)).await.is_err());
        assert_eq!(up.delete("a", Some(3)).await.unwrap(), 4);
        // Consul's rule: a compare-and-set delete of an absent key succeeds, changing nothing.
        assert_eq!(up.delete("a", Some(3)).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn entries_carry_flags_bytes_and_create_index() {
        let up = store();
        let created = up.put("a", vec![0, 255, 1], 42, None).await.unwrap();
        let updated = up.put("a", b"x".to_vec(), 0, None).await.unwrap();
        let entry = up.get("a", Query::now()).await.unwrap().entry.unwrap();
        assert_eq!(
            (
                entry.value,
                entry.flags,
                entry.create_index,
                entry.modify_index
            ),
            (b"x".to_vec(), 0, created, updated)
        );
        up.put("a", vec![0xff], 7, None).await.unwrap();
        assert_eq!(
            up.get("a", Query::now())
                .await
                .unwrap()
                .entry
                .unwrap()
                .flags,
            7
        );
    }

    #[tokio::test]
    async fn delete_prefix_is_one_write() {
        let up = store();
        up.put("p/a", b"1".to_vec(), 0, None).await.unwrap();
        up.put("p/b/c", b"2".to_vec(), 0, None).await.unwrap();
        up.put("q", b"3".to_vec(), 0, None).await.unwrap();
        let index = up.delete_prefix("p/").await.unwrap();
        assert_eq!(index, 5);
        assert!(
            up.list("p/", Query::now())
                .await
                .unwrap()
                .entries
                .is_empty()
        );
        assert_eq!(up.get("p/a", Query::now()).await.unwrap().index, 5);
        assert_eq!(up.delete_prefix("nothing/").await.unwrap(), 5);
        assert_eq!(up.delete_prefix("").await.unwrap(), 6);
        assert!(up.list("", Query::now()).await.unwrap().entries.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_index_from_the_future_answers_at_once() {
        let up = store();
        up.put("a", b"1".to_vec(), 0, None).await.unwrap();
        let read = up
            .get("a", Query::blocking(1_000, Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(read.index, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn blocking_read_wakes_on_its_key_only() {
        let up = store();
        let index = up.put("a", b"1".to_vec(), 0, None).await.unwrap();
        let reader = {
            let up = up.clone();
            tokio::spawn(async move {
                up.get("a", Query::blocking(index, Duration::from_secs(60)))
                    .await
                    .unwrap()
            })
        };
        // The read is open once the gauge says so.
        while up.counters().blocking_open == 0 {
            tokio::task::yield_now().await;
        }
        up.put("b", b"other".to_vec(), 0, None).await.unwrap();
        tokio::task::yield_now().await;
        assert!(!reader.is_finished());
        let next = up.put("a", b"2".to_vec(), 0, None).await.unwrap();
        let read = reader.await.unwrap();
        let value = read.entry.map(|entry| entry.value);
        assert_eq!((value.as_deref(), read.index), (Some(&b"2"[..]), next));
    }

    #[tokio::test(start_paused = true)]
    async fn blocking_read_answers_at_its_wait() {
        let up = store();
        let read = up
            .get("a", Query::blocking(1, Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!(read.index, 1);
        assert_eq!(up.counters().key_reads_blocking, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn outage_fails_open_blocking_reads() {
        let faults = Faults::new(FaultSettings::default());
        let up = MemoryUpstream::new(faults.clone());
        let reader = {
            let up = up.clone();
            tokio::spawn(async move {
                up.get("a", Query::blocking(1, Duration::from_secs(60)))
                    .await
            })
        };
        while up.counters().blocking_open == 0 {
            tokio::task::yield_now().await;
        }
        faults.set(FaultSettings {
            fail: true,
            ..FaultSettings::default()
        });
        assert!(matches!(
            reader.await.unwrap(),
            Err(UpstreamError::Unavailable(_))
        ));
        assert!(up.put("a", b"1".to_vec(), 0, None).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn close_answers_open_blocking_reads() {
        let up = store();
        let reader = {
            let up = up.clone();
            tokio::spawn(async move {
                up.get("a", Query::blocking(1, Duration::from_secs(60)))
                    .await
            })
        };
        while up.counters().blocking_open == 0 {
            tokio::task::yield_now().await;
        }
        up.close();
        assert_eq!(reader.await.unwrap().unwrap().index, 1);
    }
}
