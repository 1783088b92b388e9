//! The agent on real etcd processes that fail: a single member stopped and restarted on its
//! data dir, a member of a three-member cluster lost, and a cluster replaced by a fresh one
//! behind the same endpoint (its revision starts again at 1: an index reset).

mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/watchers.rs"]
mod watchers;

use std::time::{Duration, Instant};

use common::{TestAgent, bounded, expect_error, header, x_index};
use demo_agent::KvCacheMode;
use etcd::EtcdCluster;
use reqwest::StatusCode;
use serde_json::{Value, json};
use watchers::{Watcher, wait_all};

/// After etcd is back, the longest until every watcher has the latest values: the refresh
/// loop's backoff wait in force when etcd returns. The n-th failure in a row waits
/// 2^(n-3) s plus up to as much jitter; the outage below lasts 2-4 s, so a watched entry has
/// failed at most 5 times (4 at once, one after 2-4 s) and waits at most 8 s. Plus slack for
/// a loaded machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(20);

/// cache-core's default backoff: failures 1-3 retry at once, failure n > 3 waits at least
/// 2^(n-3) s. So within `elapsed` of the first failure an entry fails at most
/// 4 + floor(log2(elapsed/2 + 1)) times (the jitter only lengthens waits).
fn max_failures_per_entry(elapsed: Duration) -> u64 {
    let mut failures = 4;
    let mut at = 0.0;
    let mut wait = 2.0;
    loop {
        at += wait;
        if at > elapsed.as_secs_f64() {
            return failures;
        }
        failures += 1;
        wait *= 2.0;
    }
}

async fn age_of(t: &TestAgent, path: &str) -> (u64, Value) {
    let response = t.get(path).await;
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    assert_eq!(header(&response, "x-cache"), "HIT", "{path}");
    let age = header(&response, "age").parse().unwrap();
    let body: Value = response.json().await.unwrap();
    (age, body["value"].clone())
}

#[tokio::test]
async fn etcd_outage_serves_cached_values_backs_off_and_recovers() {
    if !etcd::available("etcd_outage_serves_cached_values_backs_off_and_recovers") {
        return;
    }
    bounded(async {
        let mut cluster = EtcdCluster::start(1).await;
        let t = etcd::start_agent(&cluster, KvCacheMode::Refresh).await;
        t.put("o/k1", "v1").await;
        t.put("o/k2", "v1").await;
        let stale_at = t.put("o/stale", "v1").await;
        for path in [
            "/v1/agent/kv/o/k1?cached",
            "/v1/agent/kv/o/k2?cached",
            "/v1/agent/kv/o/stale?cached",
        ] {
            assert_eq!(t.get(path).await.status(), StatusCode::OK);
        }
        assert_eq!(
            t.get("/v1/agent/kv/o/absent?cached").await.status(),
            StatusCode::NOT_FOUND
        );
        let mut watchers = Vec::new();
        for _ in 0..5 {
            watchers.push(Watcher::open(&t, "key=o/k1&key=o/k2&prefix=o/").await);
        }
        wait_all(&watchers, "initial events", Duration::from_secs(10), |s| {
            s.last.len() == 3
        })
        .await;
        // Four KV entries and one listing, each with its watch open in etcd.
        t.wait_metric("demo_agent_upstream_blocking_queries", 5.0)
            .await;
        let kv_errors = "demo_agent_cache_fetch_errors_total{type=\"kv\",fatal=\"false\"}";
        assert_eq!(t.metric(kv_errors).await, 0.0);

        // ----- etcd dies -----
        cluster.kill(0);
        let outage_started = Instant::now();

        // Uncached reads and writes fail with a clear 503 JSON error.
        let body = expect_error(
            t.get("/v1/agent/kv/o/k1").await,
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream unavailable",
        )
        .await;
        let message = body["error"].as_str().unwrap();
        assert!(
            message.contains("etcd") && message.contains(&cluster.endpoint(0)),
            "{message}"
        );
        expect_error(
            t.get("/v1/agent/kv/o/never-cached?cached").await,
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream unavailable",
        )
        .await;
        let write = t.put_body("/v1/agent/kv/o/k1", "lost").await;
        expect_error(
            write,
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream unavailable",
        )
        .await;

        // Cached reads keep answering, with Age growing from the first failed refresh.
        t.wait_metric(kv_errors, 3.0).await;
        let mut last_age = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while last_age < 2 {
            let (age, value) = age_of(&t, "/v1/agent/kv/o/k1?cached").await;
            assert_eq!(value, "v1");
            assert!(age >= last_age, "Age went down: {last_age} -> {age}");
            last_age = age;
            assert!(Instant::now() < deadline, "Age stayed at {age}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, value) = age_of(&t, "/v1/agent/kv/o/k2?cached").await;
        assert_eq!(value, "v1");

        // A blocking read makes a fetch attempt: its error, or with stale-if-error the value.
        // (On a key nobody watches: each such attempt also lengthens its entry's backoff.)
        let blocking = format!("/v1/agent/kv/o/stale?cached&index={stale_at}&wait=10s");
        expect_error(
            t.get(&blocking).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream unavailable",
        )
        .await;
        let stale = t.get_cache_control(&blocking, "stale-if-error=600").await;
        assert_eq!(stale.status(), StatusCode::OK);
        assert_eq!(x_index(&stale), stale_at);
        let body: Value = stale.json().await.unwrap();
        assert_eq!(body["value"], "v1");

        // Background refresh backs off: a bound on upstream attempts (each failed attempt is
        // one fetch error; the two blocking reads above made at most one each). Five KV
        // entries refresh: o/k1, o/k2, o/stale, o/absent and o/never-cached (an entry whose
        // first fetch failed keeps trying too).
        let elapsed = outage_started.elapsed();
        let failed = t.metric(kv_errors).await as u64;
        let entries = 5;
        let bound = entries * max_failures_per_entry(elapsed) + 2 + entries;
        eprintln!("outage: {failed} failed kv fetches in {elapsed:?} (bound {bound})");
        assert!(
            failed <= bound,
            "{failed} failed fetches in {elapsed:?}: more than backoff allows ({bound})"
        );
        let list_errors = "demo_agent_cache_fetch_errors_total{type=\"kv_list\",fatal=\"false\"}";
        let list_failed = t.metric(list_errors).await as u64;
        assert!(
            (1..=max_failures_per_entry(elapsed) + 1).contains(&list_failed),
            "{list_failed} failed listing fetches in {elapsed:?}"
        );

        // ----- etcd returns on the same data dir; others write meanwhile -----
        cluster.restart(0).await;
        let restarted = Instant::now();
        let n1 = cluster.put("o/k1", "v2").await;
        let n2 = cluster.put("o/k2", "v2").await;
        wait_all(
            &watchers,
            "latest values after the restart",
            RECOVERY_BOUND,
            |s| {
                s.last.get("key:o/k1") == Some(&(n1, json!("v2")))
                    && s.last.get("key:o/k2") == Some(&(n2, json!("v2")))
                    && s.last.get("prefix:o/").is_some_and(|(index, value)| {
                        *index == n2
                            && *value
                                == json!([
                                    {"key": "o/k1", "value": "v2"},
                                    {"key": "o/k2", "value": "v2"},
                                    {"key": "o/stale", "value": "v1"},
                                ])
                    })
            },
        )
        .await;
        eprintln!(
            "recovery: watchers current {:?} after etcd was back (outage {:?})",
            restarted.elapsed(),
            restarted - outage_started
        );
        // Age is 0 again once a refresh succeeded.
        common::eventually("Age back to 0", || async {
            let response = t.get("/v1/agent/kv/o/k1?cached").await;
            let fresh = header(&response, "x-cache") == "HIT"
                && header(&response, "age") == "0"
                && x_index(&response) == n1;
            let body: Value = response.json().await.unwrap();
            (fresh && body["value"] == "v2").then_some(())
        })
        .await;
        for w in &watchers {
            let seen = w.seen();
            assert!(seen.regressions.is_empty(), "{:?}", seen.regressions);
        }
        // Writes go through again.
        assert!(t.put("o/k1", "v3").await > n2);
        drop(watchers);
        t.shutdown().await;
    })
    .await;
}

/// Writes through the agent, retrying 503s (a leader election in progress) for up to 10 s.
async fn put_retrying(t: &TestAgent, key: &str, value: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = t
            .put_body(&format!("/v1/agent/kv/{key}"), value.to_owned())
            .await;
        if response.status() == StatusCode::OK {
            return x_index(&response);
        }
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "PUT {key} kept failing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn etcd_member_loss_keeps_reads_and_watches() {
    if !etcd::available("etcd_member_loss_keeps_reads_and_watches") {
        return;
    }
    bounded(async {
        let mut cluster = EtcdCluster::start(3).await;
        let t = etcd::start_agent(&cluster, KvCacheMode::Refresh).await;
        let etcd_upstream = t.agent.state().etcd().expect("an etcd agent").clone();
        assert_eq!(etcd_upstream.current_endpoint(), cluster.endpoint(0));
        t.put("f/a", "1").await;
        t.put("f/b", "1").await;
        for path in ["/v1/agent/kv/f/a?cached", "/v1/agent/kv/f/b?cached"] {
            assert_eq!(t.get(path).await.status(), StatusCode::OK);
        }
        let mut watchers = Vec::new();
        for _ in 0..3 {
            watchers.push(Watcher::open(&t, "key=f/a&key=f/b&prefix=f/").await);
        }
        wait_all(&watchers, "initial events", Duration::from_secs(10), |s| {
            s.last.len() == 3
        })
        .await;
        t.wait_metric("demo_agent_upstream_blocking_queries", 3.0)
            .await;

        // ----- the member the agent uses dies -----
        cluster.kill(0);
        let lost = Instant::now();
        let a2 = put_retrying(&t, "f/a", "2").await;
        let response = t.get("/v1/agent/kv/f/a").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(x_index(&response), a2);
        assert_ne!(etcd_upstream.current_endpoint(), cluster.endpoint(0));
        let took = wait_all(&watchers, "the write after the loss", Duration::from_secs(10), |s| {
            s.last.get("key:f/a") == Some(&(a2, json!("2")))
        })
        .await;
        eprintln!(
            "member loss: write accepted after {:?}, watchers had it {took:?} later",
            lost.elapsed() - took
        );

        // A write straight to another member reaches the watchers and the cached reads.
        let b3 = cluster.put_via(2, "f/b", "3").await;
        wait_all(&watchers, "a write via member 2", Duration::from_secs(10), |s| {
            s.last.get("key:f/b") == Some(&(b3, json!("3")))
                && s.last.get("prefix:f/").is_some_and(|(index, value)| {
                    *index == b3
                        && *value == json!([{"key": "f/a", "value": "2"}, {"key": "f/b", "value": "3"}])
                })
        })
        .await;
        common::eventually("current hits after the loss", || async {
            let response = t.get("/v1/agent/kv/f/b?cached").await;
            let current = header(&response, "x-cache") == "HIT"
                && header(&response, "age") == "0"
                && x_index(&response) == b3;
            current.then_some(())
        })
        .await;
        assert!(etcd_upstream.traffic().failovers >= 1);
        for w in &watchers {
            let seen = w.seen();
            assert!(seen.regressions.is_empty(), "{:?}", seen.regressions);
            assert!(seen.errors.is_empty(), "{:?}", seen.errors);
        }
        drop(watchers);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn etcd_replaced_cluster_resets_the_index() {
    if !etcd::available("etcd_replaced_cluster_resets_the_index") {
        return;
    }
    bounded(async {
        let mut old = EtcdCluster::start(1).await;
        let (client_port, peer_port) = old.ports(0);
        let t = etcd::start_agent(&old, KvCacheMode::Refresh).await;
        let mut high = 0;
        for i in 0..20 {
            high = t.put("r/k", &format!("old-{i}")).await;
        }
        assert_eq!(
            t.get("/v1/agent/kv/r/k?cached").await.status(),
            StatusCode::OK
        );
        let watcher = Watcher::open(&t, "key=r/k&prefix=r/").await;
        let watchers = [watcher];
        wait_all(&watchers, "initial events", Duration::from_secs(10), |s| {
            s.last
                .get("key:r/k")
                .is_some_and(|(index, _)| *index == high)
        })
        .await;

        // The cluster is replaced by a new one (revision 1) behind the same endpoint.
        old.kill(0);
        drop(old);
        let new = EtcdCluster::start_on_ports(client_port, peer_port).await;
        let low = new.put("r/k", "new").await;
        assert!(low < high);
        let took = wait_all(&watchers, "the reset", RECOVERY_BOUND, |s| {
            s.last.get("key:r/k") == Some(&(low, json!("new")))
        })
        .await;
        eprintln!("reset: watcher at the lower index {low} (from {high}) after {took:?}");
        let response = t.get("/v1/agent/kv/r/k?cached").await;
        assert_eq!(x_index(&response), low);
        // After the reset the entry blocks on the new, lower index: the next write arrives.
        let next = new.put("r/k", "newer").await;
        wait_all(
            &watchers,
            "the write after the reset",
            Duration::from_secs(10),
            |s| s.last.get("key:r/k") == Some(&(next, json!("newer"))),
        )
        .await;
        let seen = watchers[0].seen();
        assert!(
            seen.regressions
                .iter()
                .all(|r| r.starts_with("key:r/k") || r.starts_with("prefix:r/")),
            "{:?}",
            seen.regressions
        );
        drop(watchers);
        t.shutdown().await;
    })
    .await;
}
