//! `EtcdUpstream` on its own, against a real etcd: the index rules, what wakes a blocking read
//! and what does not, close, and that a busy key keeps one watch.

mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::bounded;
use demo_agent::upstream::{
    EtcdSettings, EtcdUpstream, FaultSettings, Faults, KeyRead, ListRead, Query, Upstream,
};
use etcd::EtcdCluster;

/// How long a read that must not wake is given.
const QUIET: Duration = Duration::from_millis(300);

fn upstream(cluster: &EtcdCluster) -> Arc<EtcdUpstream> {
    EtcdUpstream::new(
        EtcdSettings::new(cluster.endpoints()),
        Faults::new(FaultSettings::default()),
    )
    .unwrap()
}

fn blocking(min_index: u64, wait: Duration) -> Query {
    Query::blocking(min_index, wait)
}

fn kv(key: &str, value: &str) -> (String, String) {
    (key.to_owned(), value.to_owned())
}

/// A read's value as text (none when absent).
fn value(read: &KeyRead) -> Option<String> {
    read.entry
        .as_ref()
        .map(|entry| String::from_utf8(entry.value.clone()).unwrap())
}

/// Runs `body` (bounded) on a fresh one-member cluster and an upstream on it; skips the test
/// when etcd is missing.
async fn with_upstream(test: &str, body: impl AsyncFnOnce(&EtcdCluster, Arc<EtcdUpstream>)) {
    if !etcd::available(test) {
        return;
    }
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        let up = upstream(&cluster);
        body(&cluster, up).await;
    })
    .await;
}

/// A listing as (key, value text) pairs.
fn pairs(list: &ListRead) -> Vec<(String, String)> {
    list.entries
        .iter()
        .map(|entry| {
            (
                entry.key.clone(),
                String::from_utf8(entry.value.clone()).unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn etcd_upstream_index_rules_and_blocking() {
    with_upstream(
        "etcd_upstream_index_rules_and_blocking",
        async |_cluster, up| {
            // An absent key's index is the revision it was read at; never 0.
            let absent = up.get("k", Query::now()).await.unwrap();
            assert_eq!((value(&absent), absent.index), (None, 1));
            let put = up
                .put("k", "v1".as_bytes().to_vec(), 0, None)
                .await
                .unwrap();
            assert_eq!(put, 2);
            let other = up
                .put("other", "x".as_bytes().to_vec(), 0, None)
                .await
                .unwrap();
            // A present key's index is its mod_revision, whatever else was written since.
            let read = up.get("k", Query::now()).await.unwrap();
            assert_eq!((value(&read).as_deref(), read.index), (Some("v1"), put));
            // A delete of an absent key changes nothing and answers the current revision.
            assert_eq!(up.delete("nothing", None).await.unwrap(), other);

            // A blocking read of an unchanged key answers at its wait with the key's index.
            let started = Instant::now();
            let read = up.get("k", blocking(put, QUIET)).await.unwrap();
            assert!(started.elapsed() >= QUIET);
            assert_eq!(read.index, put);
            // Its index asked for is behind the key's: at once.
            let read = up.get("k", blocking(put - 1, QUIET * 10)).await.unwrap();
            assert_eq!(read.index, put);

            // An absent key: writes elsewhere and a create-then-delete in between (same data) do
            // not wake it; it answers at its wait with the index it was asked for.
            let absent_at = up.get("later", Query::now()).await.unwrap().index;
            up.put("later", "brief".as_bytes().to_vec(), 0, None)
                .await
                .unwrap();
            up.delete("later", None).await.unwrap();
            let reader = {
                let up = up.clone();
                tokio::spawn(async move { up.get("later", blocking(absent_at, QUIET * 2)).await })
            };
            tokio::time::sleep(QUIET / 3).await;
            up.put("elsewhere", "x".as_bytes().to_vec(), 0, None)
                .await
                .unwrap();
            let read = reader.await.unwrap().unwrap();
            assert_eq!((value(&read), read.index), (None, absent_at));
            // ...and wakes when it appears, with the write's index.
            let reader = {
                let up = up.clone();
                tokio::spawn(async move {
                    up.get("later", blocking(absent_at, Duration::from_secs(20)))
                        .await
                })
            };
            tokio::time::sleep(QUIET).await;
            assert!(!reader.is_finished());
            let appeared = up
                .put("later", "here".as_bytes().to_vec(), 0, None)
                .await
                .unwrap();
            let read = reader.await.unwrap().unwrap();
            assert_eq!(
                (value(&read).as_deref(), read.index),
                (Some("here"), appeared)
            );

            // A key deleted after the index asked for: at once, absent, at the delete's revision.
            let gone = up.delete("later", None).await.unwrap();
            let read = up
                .get("later", blocking(appeared, Duration::from_secs(20)))
                .await
                .unwrap();
            assert_eq!((value(&read), read.index), (None, gone));
            // A delete while blocked: woken with the delete's revision.
            let k_now = up.get("k", Query::now()).await.unwrap().index;
            let reader = {
                let up = up.clone();
                tokio::spawn(
                    async move { up.get("k", blocking(k_now, Duration::from_secs(20))).await },
                )
            };
            tokio::time::sleep(QUIET).await;
            let deleted = up.delete("k", None).await.unwrap();
            let read = reader.await.unwrap().unwrap();
            assert_eq!((value(&read), read.index), (None, deleted));

            // A prefix: its index is the read's revision; a delete under it (seen in history)
            // answers at once; writes elsewhere do not wake it.
            up.put("p/a", "1".as_bytes().to_vec(), 0, None)
                .await
                .unwrap();
            let b = up
                .put("p/b", "2".as_bytes().to_vec(), 0, None)
                .await
                .unwrap();
            let list = up.list("p/", Query::now()).await.unwrap();
            assert_eq!(
                (pairs(&list), list.index),
                (vec![kv("p/a", "1"), kv("p/b", "2")], b)
            );
            let removed = up.delete("p/a", None).await.unwrap();
            let list = up
                .list("p/", blocking(b, Duration::from_secs(20)))
                .await
                .unwrap();
            assert_eq!((pairs(&list), list.index), (vec![kv("p/b", "2")], removed));
            up.put("q", "outside".as_bytes().to_vec(), 0, None)
                .await
                .unwrap();
            let started = Instant::now();
            let list = up.list("p/", blocking(removed, QUIET)).await.unwrap();
            assert!(started.elapsed() >= QUIET);
            assert_eq!(list.index, removed);
            // The empty prefix lists every key.
            let all = up.list("", Query::now()).await.unwrap();
            assert_eq!(all.entries.len(), 4, "{:?}", all.entries);

            // The counters the metrics page shows.
            let stats = up.stats().await.unwrap();
            assert_eq!((stats.kind, stats.keys), ("etcd", 4));
            assert!(stats.index >= removed);
            assert_eq!(stats.blocking_open, 0);
        },
    )
    .await;
}

#[tokio::test]
async fn etcd_upstream_close_answers_open_blocking_reads() {
    with_upstream(
        "etcd_upstream_close_answers_open_blocking_reads",
        async |_cluster, up| {
            let index = up.put("k", "v".as_bytes().to_vec(), 0, None).await.unwrap();
            let reader = {
                let up = up.clone();
                tokio::spawn(
                    async move { up.get("k", blocking(index, Duration::from_secs(60))).await },
                )
            };
            common::eventually("the read to block", || async {
                (up.counters().blocking_open == 1).then_some(())
            })
            .await;
            let started = Instant::now();
            up.close();
            let read = reader.await.unwrap().unwrap();
            assert!(started.elapsed() < Duration::from_secs(5));
            assert_eq!((value(&read).as_deref(), read.index), (Some("v"), index));
            // After close reads answer at once; writes still work.
            let read = up
                .get("k", blocking(index, Duration::from_secs(60)))
                .await
                .unwrap();
            assert_eq!(read.index, index);
            assert!(up.put("k", "w".as_bytes().to_vec(), 0, None).await.unwrap() > index);
        },
    )
    .await;
}

#[tokio::test]
async fn etcd_upstream_busy_key_keeps_one_watch_stream() {
    with_upstream(
        "etcd_upstream_busy_key_keeps_one_watch_stream",
        async |cluster, up| {
            let mut index = up
                .put("busy", "0".as_bytes().to_vec(), 0, None)
                .await
                .unwrap();
            // A refresh loop: block on the last index, again and again, while the key changes.
            let follower = {
                let up = up.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    loop {
                        let read = up
                            .get("busy", blocking(index, Duration::from_secs(20)))
                            .await
                            .unwrap();
                        index = read.index;
                        let value = value(&read).unwrap();
                        let done = value == "50";
                        seen.push(value);
                        if done {
                            return seen;
                        }
                    }
                })
            };
            for i in 1..=50 {
                cluster.put("busy", &i.to_string()).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let seen = follower.await.unwrap();
            assert_eq!(seen.last().map(String::as_str), Some("50"));
            let traffic = up.traffic();
            eprintln!("busy key: {} reads, {traffic:?}", seen.len());
            // Every watch of the upstream shares one stream: a busy key costs one etcd watch per
            // wake (a message on the stream), never a new stream or connection.
            assert_eq!(traffic.watch_streams, 1, "{traffic:?}");
            assert!(
                traffic.watches_opened <= seen.len() as u64 + 1,
                "{traffic:?}"
            );
            assert_eq!(traffic.watches_open, 0, "{traffic:?}");
        },
    )
    .await;
}

/// The watch hub ends each waiting read at its own deadline (the reads keep no timer): a short
/// wait registered after a long one answers at its wait, with the data it ranged (flags
/// included), while the long one stays open until the key changes.
#[tokio::test]
async fn etcd_upstream_waits_end_at_their_own_deadlines_with_their_data() {
    with_upstream(
        "etcd_upstream_waits_end_at_their_own_deadlines_with_their_data",
        async |_cluster, up| {
            let index = up
                .put("flagged", "v".as_bytes().to_vec(), 42, None)
                .await
                .unwrap();
            let created = up.get("flagged", Query::now()).await.unwrap();
            let long = {
                let up = up.clone();
                tokio::spawn(async move {
                    up.get("flagged", blocking(index, Duration::from_secs(60)))
                        .await
                })
            };
            common::eventually("the long read to block", || async {
                (up.counters().blocking_open == 1).then_some(())
            })
            .await;

            // A shorter wait registered later: its deadline comes first.
            let started = Instant::now();
            let read = up.get("flagged", blocking(index, QUIET)).await.unwrap();
            let took = started.elapsed();
            assert!(took >= QUIET && took < QUIET * 20, "{took:?}");
            assert_eq!(read, created);
            assert_eq!(read.entry.as_ref().map(|e| e.flags), Some(42));
            // An absent key answers its unchanged index at its wait too.
            let absent_at = up.get("nothing", Query::now()).await.unwrap().index;
            let started = Instant::now();
            let read = up.get("nothing", blocking(absent_at, QUIET)).await.unwrap();
            assert!(started.elapsed() >= QUIET);
            assert_eq!((read.entry, read.index), (None, absent_at));

            // The long read is still open, and a change answers it.
            assert!(!long.is_finished());
            let changed = up
                .put("flagged", "w".as_bytes().to_vec(), 0, None)
                .await
                .unwrap();
            let read = long.await.unwrap().unwrap();
            assert_eq!((value(&read).as_deref(), read.index), (Some("w"), changed));
            assert_eq!(up.traffic().watches_open, 0);
        },
    )
    .await;
}
