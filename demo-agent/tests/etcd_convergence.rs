//! Convergence on a three-member etcd cluster shared by two agents (each talking to a
//! different member): thousands of writes through both agents while many server-sent-event
//! watchers listen; afterwards every watcher holds etcd's final value of every key, and no
//! watcher ever saw an index go down. And compaction while watches are open.

mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/watchers.rs"]
mod watchers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestAgent, bounded, x_index};
use demo_agent::KvCacheMode;
use etcd::EtcdCluster;
use reqwest::StatusCode;
use serde_json::{Value, json};
use watchers::{Watcher, wait_all};

/// Keys written; each writer task owns two.
const KEYS: usize = 8;
const WRITERS: usize = 4;
/// Writes per writer: 4 x 500 = 2 000 in all.
const WRITES_PER_WRITER: usize = 500;
/// Watchers per agent: 2 x 25 = 50 in all, each watching every key and the prefix.
const WATCHERS_PER_AGENT: usize = 25;
/// Once the writers stop, every watcher must hold the final values within this.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(10);

fn key(i: usize) -> String {
    format!("c/{i}")
}

#[tokio::test]
async fn etcd_two_agents_converge_after_2000_writes_with_50_watchers() {
    if !etcd::available("etcd_two_agents_converge_after_2000_writes_with_50_watchers") {
        return;
    }
    common::bounded(async {
        let cluster = EtcdCluster::start(3).await;
        let endpoints = cluster.endpoints();
        // Agent A prefers member 0, agent B member 1: writes and watches cross members.
        let a = common::start(etcd::etcd_config(endpoints.clone(), KvCacheMode::Refresh)).await;
        let mut rotated = endpoints.clone();
        rotated.rotate_left(1);
        let b = common::start(etcd::etcd_config(rotated, KvCacheMode::Refresh)).await;
        let agents = Arc::new([a, b]);

        let query = (0..KEYS)
            .map(|i| format!("key={}", key(i)))
            .chain(std::iter::once("prefix=c/".to_owned()))
            .collect::<Vec<_>>()
            .join("&");
        let mut watchers = Vec::new();
        for agent in agents.iter() {
            for _ in 0..WATCHERS_PER_AGENT {
                watchers.push(Watcher::open(agent, &query).await);
            }
        }
        wait_all(&watchers, "initial events", Duration::from_secs(20), |s| {
            s.last.len() == KEYS + 1
        })
        .await;

        let started = Instant::now();
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let agents = agents.clone();
            writers.push(tokio::spawn(async move {
                for i in 0..WRITES_PER_WRITER {
                    // Each key is written through both agents in turn.
                    let agent = &agents[(i / 2) % 2];
                    agent.put(&key(2 * w + i % 2), &format!("w{w}-{i}")).await;
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        let writing = started.elapsed();

        // The truth, read from etcd directly.
        let mut finals = Vec::new();
        for i in 0..KEYS {
            finals.push(cluster.get(&key(i)).await.expect("written"));
        }
        let final_list: Vec<Value> = cluster
            .list("c/")
            .await
            .into_iter()
            .map(|(key, value)| json!({"key": key, "value": value}))
            .collect();
        assert_eq!(final_list.len(), KEYS);
        let newest = finals.iter().map(|(_, rev)| *rev).max().unwrap();

        let took = wait_all(&watchers, "convergence", CONVERGENCE_BOUND, |s| {
            (0..KEYS).all(|i| {
                let (value, revision) = &finals[i];
                s.last.get(&format!("key:{}", key(i))) == Some(&(*revision, json!(value)))
            }) && s.last.get("prefix:c/").is_some_and(|(index, list)| {
                *index >= newest && *list == Value::Array(final_list.clone())
            })
        })
        .await;
        let events: u64 = watchers.iter().map(|w| w.seen().events).sum();
        eprintln!(
            "convergence: {} writes in {writing:?}; {} watchers got {events} events and held \
             the final values {took:?} after the last write",
            WRITERS * WRITES_PER_WRITER,
            watchers.len()
        );
        for (i, w) in watchers.iter().enumerate() {
            let seen = w.seen();
            assert!(
                seen.regressions.is_empty(),
                "watcher {i} saw an index go down: {:?}",
                seen.regressions
            );
            assert!(seen.errors.is_empty(), "watcher {i}: {:?}", seen.errors);
            assert!(!seen.ended, "watcher {i}'s stream ended");
        }
        drop(watchers);
        let [a, b] = Arc::into_inner(agents).expect("writers are done");
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

/// The data of a read, for comparisons.
async fn read(t: &TestAgent, path: &str) -> (StatusCode, u64, Value) {
    let response = t.get(path).await;
    let status = response.status();
    let index = x_index(&response);
    (status, index, response.json().await.unwrap())
}

#[tokio::test]
async fn etcd_compaction_during_watches_neither_stalls_nor_loses_values() {
    if !etcd::available("etcd_compaction_during_watches_neither_stalls_nor_loses_values") {
        return;
    }
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        let mut config = etcd::etcd_config(cluster.endpoints(), KvCacheMode::Refresh);
        // Short blocking queries: idle entries fetch again every second, so their refresh
        // crosses the compaction below.
        config.query_timeout = Duration::from_secs(1);
        let t = common::start(config).await;
        t.put("cp/a", "0").await;
        let (status, absent_at, _) = read(&t, "/v1/agent/kv/cp/absent?cached").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (_, list_at, _) = read(&t, "/v1/agent/kv/?prefix=cp/&cached").await;
        let watchers = [Watcher::open(&t, "key=cp/a&key=cp/absent&prefix=cp/").await];
        wait_all(&watchers, "initial events", Duration::from_secs(10), |s| {
            s.last.len() == 3
        })
        .await;

        // History grows, then is compacted while the watches are open.
        for i in 1..=10 {
            t.put("cp/a", &i.to_string()).await;
        }
        for i in 0..30 {
            t.put("elsewhere", &i.to_string()).await;
        }
        let compacted_at = cluster.revision().await;
        cluster.compact(compacted_at).await;

        // Reads whose index is now compacted history answer at once with the current data
        // and the current revision, instead of stalling until their wait ends.
        for (path, status, value) in [
            (
                format!("/v1/agent/kv/cp/absent?index={absent_at}&wait=20s"),
                StatusCode::NOT_FOUND,
                Value::Null,
            ),
            (
                format!("/v1/agent/kv/?prefix=cp/&index={list_at}&wait=20s"),
                StatusCode::OK,
                json!([{"key": "cp/a", "value": "10"}]),
            ),
        ] {
            let started = Instant::now();
            let (got_status, index, body) = read(&t, &path).await;
            assert!(started.elapsed() < Duration::from_secs(5), "{path} stalled");
            assert_eq!(got_status, status, "{path}");
            assert_eq!(index, compacted_at, "{path}");
            if status == StatusCode::OK {
                assert_eq!(body["keys"], value);
            }
        }
        // Writes after the compaction reach the watchers; nothing is lost.
        let a11 = t.put("cp/a", "11").await;
        let here = t.put("cp/absent", "here").await;
        let expected_list =
            json!([{"key": "cp/a", "value": "11"}, {"key": "cp/absent", "value": "here"}]);
        wait_all(
            &watchers,
            "writes after the compaction",
            Duration::from_secs(10),
            |s| {
                s.last.get("key:cp/a") == Some(&(a11, json!("11")))
                    && s.last.get("key:cp/absent") == Some(&(here, json!("here")))
                    && s.last
                        .get("prefix:cp/")
                        .is_some_and(|(index, list)| *index >= here && *list == expected_list)
            },
        )
        .await;

        // A second compaction, with every entry's watch open, and a write after it.
        cluster.compact(cluster.revision().await).await;
        // Let idle refreshes cross it (query timeout 1 s).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let a12 = t.put("cp/a", "12").await;
        wait_all(
            &watchers,
            "a write after the second compaction",
            Duration::from_secs(10),
            |s| s.last.get("key:cp/a") == Some(&(a12, json!("12"))),
        )
        .await;
        let kv_errors = "demo_agent_cache_fetch_errors_total{type=\"kv\",fatal=\"false\"}";
        let list_errors = "demo_agent_cache_fetch_errors_total{type=\"kv_list\",fatal=\"false\"}";
        assert_eq!(t.metric(kv_errors).await, 0.0, "compaction is not an error");
        assert_eq!(
            t.metric(list_errors).await,
            0.0,
            "compaction is not an error"
        );
        let seen = watchers[0].seen();
        assert!(seen.regressions.is_empty(), "{:?}", seen.regressions);
        assert!(seen.errors.is_empty(), "{:?}", seen.errors);
        drop(watchers);
        t.shutdown().await;
    })
    .await;
}
