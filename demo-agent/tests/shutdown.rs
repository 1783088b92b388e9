//! End-to-end test of a clean shutdown: open long-polls answer at once, the server stops,
//! and nothing accepts connections afterwards. (Watch streams: see `watch.rs`.)

mod common;

use std::time::{Duration, Instant};

use common::{bounded, start_default, x_index};
use reqwest::StatusCode;

#[tokio::test]
async fn shutdown_answers_open_long_polls() {
    bounded(async {
        let t = start_default().await;
        let index = t.put("k", "v").await;
        // Warm the cache entry, so the cached long-poll counts as a blocking miss.
        assert_eq!(
            t.get("/v1/agent/kv/k?cached").await.status(),
            StatusCode::OK
        );

        // Two long-polls (cached and straight to the upstream) that would wait 5 minutes.
        let mut polls = Vec::new();
        for path in [
            format!("/v1/agent/kv/k?cached&index={index}&wait=5m"),
            format!("/v1/agent/kv/k?index={index}&wait=5m"),
        ] {
            let client = t.client.clone();
            let url = t.url(&path);
            polls.push(tokio::spawn(async move {
                client.get(url).send().await.unwrap()
            }));
        }
        t.wait_metric(
            "demo_agent_cache_misses_total{type=\"kv\",kind=\"blocking\"}",
            1.0,
        )
        .await;
        t.wait_metric(
            "demo_agent_upstream_reads_total{op=\"get\",blocking=\"true\"}",
            2.0,
        )
        .await;

        let url = t.url("/v1/agent/health");
        let client = t.client.clone();
        let started = Instant::now();
        t.shutdown().await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "prompt shutdown"
        );

        // The long-polls answered with the data as it was.
        for poll in polls {
            let response = poll.await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(x_index(&response), index);
        }
        // Nothing listens any more.
        assert!(client.get(url).send().await.is_err());
    })
    .await;
}
