//! The agent through an injected outage of the embedded store: readiness and the contact
//! metrics follow the upstream, errors are state (a success clears them, an error event says
//! since when), and fetch chains sleeping out a backoff retry as soon as the upstream answers
//! again. The etcd side (a real etcd killed and restarted) is `etcd_recovery.rs`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::sse::SseReader;
use common::{TestAgent, bounded, header};
use demo_agent::Config;
use demo_agent::upstream::Upstream;
use reqwest::StatusCode;
use serde_json::Value;

/// How long after the outage ends every read and watch must be current. The goal is 1 s; the
/// bound leaves room for a loaded CI machine (the measured figure is printed).
const RECOVERY_BOUND: Duration = Duration::from_secs(2);

async fn ready(t: &TestAgent) -> (StatusCode, Value) {
    let response = t.get("/v1/agent/ready").await;
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// Writes straight to the embedded store, as another client of the store would.
async fn write_upstream(t: &TestAgent, key: &str, value: &str) -> u64 {
    let memory = t.agent.state().memory().expect("embedded upstream");
    memory
        .put(key, value.as_bytes().to_vec(), 0, None)
        .await
        .expect("direct write")
}

/// The next event of `stream` for `id`, skipping others.
async fn next_for(stream: &mut SseReader, id: &str) -> Value {
    loop {
        let event = stream.next().await.expect("the stream stays open");
        if event.data["correlation_id"] == id {
            return event.data;
        }
    }
}

#[tokio::test]
async fn readiness_and_contact_follow_the_upstream() {
    bounded(async {
        let mut config = Config::for_tests();
        config.ready_grace = Duration::from_millis(1500);
        let t = common::start(config).await;
        let (status, body) = ready(&t).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "ready");
        assert_eq!(body["upstream"], "embedded");
        assert_eq!(body["reachable"], true);
        common::eventually("a first contact", || async {
            ready(&t).await.1["last_contact"]
                .as_str()
                .map(str::to_owned)
        })
        .await;

        t.put("k", "v1").await;
        assert_eq!(
            t.get("/v1/agent/kv/k?cached").await.status(),
            StatusCode::OK
        );
        t.wait_metric("demo_agent_upstream_blocking_queries", 1.0)
            .await;
        let cut = Instant::now();
        t.set_fail(true).await;

        // Not ready once the upstream has failed for the grace period; alive throughout.
        let body = common::eventually("not ready", || async {
            let (status, body) = ready(&t).await;
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some(body)
        })
        .await;
        assert!(
            cut.elapsed() >= Duration::from_millis(1500),
            "ready flipped before the grace"
        );
        assert_eq!(body["status"], "upstream unreachable");
        assert_eq!(body["reachable"], false);
        assert!(body["down_since"].is_string(), "{body}");
        assert!(
            body["last_error"]
                .as_str()
                .unwrap()
                .contains("injected outage"),
            "{body}"
        );
        assert!(body["entries_failing"].as_u64().unwrap() >= 1, "{body}");
        let health = t.get("/v1/agent/health").await;
        assert_eq!(health.status(), StatusCode::OK);
        assert_eq!(t.metric("demo_agent_upstream_reachable").await, 0.0);
        assert!(t.metric("demo_agent_upstream_down_seconds").await >= 1.5);
        assert!(
            t.metric("demo_agent_cache_failing{type=\"kv\"}").await >= 1.0,
            "the refreshing entry is in backoff"
        );

        // Ready again as soon as it answers (the probe runs when the fault settings change).
        t.set_fail(false).await;
        let back = Instant::now();
        common::eventually("ready again", || async {
            (ready(&t).await.0 == StatusCode::OK).then_some(())
        })
        .await;
        let took = back.elapsed();
        eprintln!("ready again {took:?} after the outage ended");
        assert!(took < RECOVERY_BOUND, "ready again only after {took:?}");
        let (_, body) = ready(&t).await;
        assert_eq!(body["reachable"], true);
        assert!(body["down_since"].is_null(), "{body}");
        assert_eq!(body["outages"], 1);
        assert!(body["last_outage_ms"].as_u64().unwrap() >= 1500, "{body}");
        assert_eq!(t.metric("demo_agent_upstream_reachable").await, 1.0);
        assert_eq!(t.metric("demo_agent_upstream_outages_total").await, 1.0);
        common::eventually("no entry failing", || async {
            (t.metric("demo_agent_cache_failing{type=\"kv\"}").await == 0.0).then_some(())
        })
        .await;
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn backing_off_reads_and_watches_are_current_within_a_second_of_recovery() {
    bounded(async {
        let t = common::start_default().await;
        for key in ["r/a", "r/b"] {
            t.put(key, "v1").await;
            assert_eq!(
                t.get(&format!("/v1/agent/kv/{key}?cached")).await.status(),
                StatusCode::OK
            );
        }
        let mut stream = SseReader::new(t.get("/v1/watch?key=r/a&prefix=r/").await);
        assert_eq!(next_for(&mut stream, "key:r/a").await["value"], "v1");
        // Two KV entries, the watched key (the same entry as r/a) and the listing.
        t.wait_metric("demo_agent_upstream_blocking_queries", 3.0)
            .await;

        // A long enough outage that every chain backs off for seconds: failures 1-3 retry
        // at once, then 1 s, 2 s, 4 s (plus jitter).
        t.set_fail(true).await;
        let kv_errors = "demo_agent_cache_fetch_errors_total{type=\"kv\",fatal=\"false\"}";
        t.wait_metric(kv_errors, 10.0).await;
        t.wait_metric("demo_agent_cache_failing{type=\"kv_list\"}", 1.0)
            .await;

        // A stream opened during the outage on a key never read: an error, and since when.
        let mut fresh = SseReader::new(t.get("/v1/watch?key=r/never").await);
        let event = next_for(&mut fresh, "key:r/never").await;
        assert!(
            event["error"]
                .as_str()
                .unwrap()
                .contains("upstream unavailable"),
            "{event}"
        );
        assert!(
            event["failing_since"].as_str().unwrap().ends_with('Z'),
            "{event}"
        );

        // ----- the upstream answers again; another client writes at once -----
        t.set_fail(false).await;
        let back = Instant::now();
        let a = write_upstream(&t, "r/a", "v2").await;
        let b = write_upstream(&t, "r/b", "v2").await;

        // The watch stream: the new values, without an error. (Events of one watch coalesce:
        // the latest state is what counts.)
        let mut latest = HashMap::new();
        let (key_event, list_event) = loop {
            let event = stream.next().await.expect("the stream stays open").data;
            let id = event["correlation_id"].as_str().unwrap().to_owned();
            latest.insert(id, event);
            if let (Some(key), Some(list)) = (latest.get("key:r/a"), latest.get("prefix:r/")) {
                if key["index"] == a && list["index"] == b {
                    break (key.clone(), list.clone());
                }
            }
        };
        let watch_took = back.elapsed();
        let event = key_event;
        assert_eq!(event["value"], "v2");
        assert!(
            event["error"].is_null() && event["failing_since"].is_null(),
            "{event}"
        );
        // The never-read key's stream: after the outage's error events, its value (absent)
        // without an error.
        let event = loop {
            let event = next_for(&mut fresh, "key:r/never").await;
            if event["error"].is_null() {
                break event;
            }
        };
        assert!(
            event["value"].is_null() && event["failing_since"].is_null(),
            "{event}"
        );

        // Cached reads: the new value, fresh (Age 0).
        for (key, index) in [("r/a", a), ("r/b", b)] {
            common::eventually("the cached read is current", || async {
                let response = t.get(&format!("/v1/agent/kv/{key}?cached")).await;
                let current = response.status() == StatusCode::OK
                    && common::x_index(&response) == index
                    && header(&response, "age") == "0";
                current.then_some(())
            })
            .await;
        }
        let list = list_event;
        let took = back.elapsed();
        assert!(list["error"].is_null(), "{list}");
        eprintln!(
            "recovery (embedded): watch current {watch_took:?}, every read and watch {took:?} \
             after the outage ended"
        );
        assert!(took < RECOVERY_BOUND, "current only after {took:?}");

        // A stream opened now reports no error: errors are state, not history.
        let mut late = SseReader::new(t.get("/v1/watch?key=r/b").await);
        let event = next_for(&mut late, "key:r/b").await;
        assert_eq!(event["value"], "v2");
        assert!(event["error"].is_null(), "{event}");
        t.shutdown().await;
    })
    .await;
}
