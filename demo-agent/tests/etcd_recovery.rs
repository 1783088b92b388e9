//! The agent through a real etcd outage: the single member is killed (SIGKILL) for 20 s and
//! restarted on the same data dir. While it is down the agent is alive but not ready; once
//! etcd answers, every cached read and every open watch holds etcd's current value within a
//! second (fetch chains that were sleeping out a backoff of several seconds retry as soon as
//! the agent's contact tracker sees etcd answer). The measured figure is printed.

mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/watchers.rs"]
mod watchers;

use std::time::{Duration, Instant};

use common::{TestAgent, header, x_index};
use demo_agent::KvCacheMode;
use etcd::EtcdCluster;
use reqwest::StatusCode;
use serde_json::{Value, json};
use watchers::{Watcher, wait_all};

/// How long etcd stays down.
const OUTAGE: Duration = Duration::from_secs(20);
/// The bound on "current after etcd is back". The goal is 1 s, measured from the moment etcd
/// answers its first request; the bound adds room for a loaded CI machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(3);
const KEYS: [&str; 3] = ["rc/a", "rc/b", "rc/c"];

async fn ready_status(t: &TestAgent) -> (StatusCode, Value) {
    let response = t.get("/v1/agent/ready").await;
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// Whether every cached read of `expected` (key, index, value) answers that value, fresh.
async fn reads_current(t: &TestAgent, expected: &[(&str, u64, &str)]) -> bool {
    for (key, index, value) in expected {
        let response = t.get(&format!("/v1/agent/kv/{key}?cached")).await;
        if response.status() != StatusCode::OK
            || x_index(&response) != *index
            || header(&response, "age") != "0"
        {
            return false;
        }
        let body: Value = response.json().await.unwrap();
        if body["value"] != *value {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn etcd_killed_for_20s_reads_and_watches_current_within_a_second() {
    if !etcd::available("etcd_killed_for_20s_reads_and_watches_current_within_a_second") {
        return;
    }
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut cluster = EtcdCluster::start(1).await;
        let t = etcd::start_agent(&cluster, KvCacheMode::Refresh).await;
        for key in KEYS {
            cluster.put(key, "v1").await;
            let response = t.get(&format!("/v1/agent/kv/{key}?cached")).await;
            assert_eq!(response.status(), StatusCode::OK);
        }
        let mut streams = Vec::new();
        for _ in 0..3 {
            streams.push(Watcher::open(&t, "key=rc/a&key=rc/b&prefix=rc/").await);
        }
        wait_all(&streams, "initial events", Duration::from_secs(10), |s| {
            s.last.len() == 3
        })
        .await;
        // Three KV entries and one listing, each with its blocking read open in etcd.
        t.wait_metric("demo_agent_upstream_blocking_queries", 4.0)
            .await;
        assert_eq!(ready_status(&t).await.0, StatusCode::OK);

        // ----- etcd dies for 20 s -----
        cluster.kill(0);
        let killed = Instant::now();
        // Alive, but not ready once etcd has been unreachable for --ready-grace (5 s).
        let body = common::eventually("not ready", || async {
            let (status, body) = ready_status(&t).await;
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some(body)
        })
        .await;
        assert!(
            killed.elapsed() >= Duration::from_secs(5),
            "not ready before the grace"
        );
        assert_eq!(body["reachable"], false, "{body}");
        assert!(
            body["upstream"].as_str().unwrap().starts_with("etcd "),
            "{body}"
        );
        assert!(body["entries_failing"].as_u64().unwrap() >= 1, "{body}");
        assert_eq!(t.get("/v1/agent/health").await.status(), StatusCode::OK);
        assert_eq!(t.metric("demo_agent_upstream_reachable").await, 0.0);
        // The refresh chains have failed repeatedly by now: their backoff is seconds long.
        let kv_errors = "demo_agent_cache_fetch_errors_total{type=\"kv\",fatal=\"false\"}";
        t.wait_metric(kv_errors, 12.0).await;
        let remaining = OUTAGE.saturating_sub(killed.elapsed());
        tokio::time::sleep(remaining).await;

        // ----- etcd restarts on its data dir; another client writes at once -----
        // `restart` returns once etcd answered its health check: its first request.
        cluster.restart(0).await;
        let answered = Instant::now();
        let mut expected = Vec::new();
        for key in KEYS {
            expected.push((key, cluster.put(key, "v2").await, "v2"));
        }
        let written = answered.elapsed();
        let last = expected.last().unwrap().1;
        let (a, b) = (expected[0].1, expected[1].1);
        wait_all(&streams, "current values", Duration::from_secs(10), |s| {
            s.last.get("key:rc/a") == Some(&(a, json!("v2")))
                && s.last.get("key:rc/b") == Some(&(b, json!("v2")))
                && s.last
                    .get("prefix:rc/")
                    .is_some_and(|(index, _)| *index == last)
        })
        .await;
        let watches_current = answered.elapsed();
        common::eventually("cached reads current", || async {
            reads_current(&t, &expected).await.then_some(())
        })
        .await;
        let reads_current_after = answered.elapsed();
        eprintln!(
            "etcd recovery: writes done {written:?}, watches current {watches_current:?}, \
             cached reads current {reads_current_after:?} after etcd answered its first \
             request (outage {:?})",
            answered - killed
        );
        assert!(
            reads_current_after < RECOVERY_BOUND,
            "current only {reads_current_after:?} after etcd was back"
        );
        for stream in &streams {
            let seen = stream.seen();
            assert!(seen.regressions.is_empty(), "{:?}", seen.regressions);
        }

        // Ready again, contact metrics back.
        let (status, body) = ready_status(&t).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["reachable"], true);
        assert!(body["last_outage_ms"].as_u64().unwrap() >= 15_000, "{body}");
        assert_eq!(t.metric("demo_agent_upstream_reachable").await, 1.0);
        assert!(t.metric("demo_agent_upstream_last_contact_seconds").await < 5.0);
        t.shutdown().await;
    })
    .await
    .expect("the test finishes within 2 minutes");
}
