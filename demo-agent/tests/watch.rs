//! End-to-end tests of `/v1/watch`: one server-sent-events stream multiplexing watches of
//! several keys and a prefix, ended cleanly when the client leaves.

mod common;

use std::collections::BTreeMap;

use common::sse::SseReader;
use common::{TestAgent, bounded, header, start_default, start_simple};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn open(t: &TestAgent, query: &str) -> SseReader {
    let response = t.get(&format!("/v1/watch?{query}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    // Not compressed: events must flow as they happen.
    assert_eq!(header(&response, "content-encoding"), "");
    SseReader::new(response)
}

async fn watch_several_keys_and_a_prefix(t: TestAgent) {
    let a_index = t.put("a", "1").await;
    let mut events = open(&t, "key=a&key=b&prefix=app/").await;

    // The first event of each watch is the current state, absent keys included.
    let mut first = BTreeMap::new();
    for _ in 0..3 {
        let event = events.next().await.expect("an initial event");
        assert_eq!(event.event, "update");
        first.insert(
            event.data["correlation_id"].as_str().unwrap().to_owned(),
            event.data,
        );
    }
    assert_eq!(first["key:a"]["value"], "1");
    assert_eq!(first["key:a"]["index"], a_index);
    assert_eq!(first["key:a"]["error"], Value::Null);
    assert_eq!(first["key:b"]["value"], Value::Null);
    assert_eq!(first["key:b"]["index"], 1);
    assert_eq!(first["prefix:app/"]["value"], json!([]));

    t.wait_metric("demo_agent_cache_watches{type=\"kv\"}", 2.0)
        .await;
    t.wait_metric("demo_agent_cache_watches{type=\"kv_list\"}", 1.0)
        .await;
    assert_eq!(t.metric("demo_agent_watch_streams").await, 1.0);

    let b_index = t.put("b", "2").await;
    let event = events.next().await.unwrap();
    assert_eq!(event.data["correlation_id"], "key:b");
    assert_eq!(event.data["value"], "2");
    assert_eq!(event.data["index"], b_index);

    let x_index = t.put("app/x", "3").await;
    let event = events.next().await.unwrap();
    assert_eq!(event.data["correlation_id"], "prefix:app/");
    assert_eq!(event.data["value"], json!([{"key": "app/x", "value": "3"}]));
    assert_eq!(event.data["index"], x_index);

    // A write nobody watches sends nothing: the next event is the next watched write.
    t.put("elsewhere", "x").await;
    t.delete("/v1/kv/a").await;
    let event = events.next().await.unwrap();
    assert_eq!(event.data["correlation_id"], "key:a");
    assert_eq!(event.data["value"], Value::Null);

    // The client leaves: its watches end and nothing is left running.
    drop(events);
    common::eventually("the watches to end", || async {
        let text = t.metrics().await;
        let kv = common::metric_value(&text, "demo_agent_cache_watches{type=\"kv\"}");
        let list = common::metric_value(&text, "demo_agent_cache_watches{type=\"kv_list\"}");
        let streams = common::metric_value(&text, "demo_agent_watch_streams");
        (kv == 0.0 && list == 0.0 && streams == 0.0).then_some(())
    })
    .await;
    t.shutdown().await;
}

#[tokio::test]
async fn watch_several_keys_and_a_prefix_refresh_mode() {
    bounded(async { watch_several_keys_and_a_prefix(start_default().await).await }).await;
}

#[tokio::test]
async fn watch_several_keys_and_a_prefix_simple_mode() {
    bounded(async { watch_several_keys_and_a_prefix(start_simple().await).await }).await;
}

#[tokio::test]
async fn watches_share_one_upstream_query_per_key() {
    bounded(async {
        let t = start_default().await;
        t.put("shared", "v").await;
        let mut streams = Vec::new();
        for _ in 0..5 {
            let mut events = open(&t, "key=shared").await;
            assert_eq!(events.next().await.unwrap().data["value"], "v");
            streams.push(events);
        }
        t.wait_metric("demo_agent_cache_watches{type=\"kv\"}", 5.0)
            .await;
        t.wait_metric("demo_agent_upstream_blocking_queries", 1.0)
            .await;
        // Five watchers of one key: one open blocking query upstream.
        assert_eq!(t.metric("demo_agent_upstream_blocking_queries").await, 1.0);
        let written = t.put("shared", "w").await;
        for events in &mut streams {
            let event = events.next().await.unwrap();
            assert_eq!(
                (event.data["value"].clone(), event.data["index"].clone()),
                (json!("w"), json!(written))
            );
        }
        drop(streams);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_watch_streams() {
    bounded(async {
        let t = start_default().await;
        t.put("k", "v").await;
        let mut events = open(&t, "key=k&prefix=").await;
        for _ in 0..2 {
            events.next().await.expect("an initial event");
        }
        let started = std::time::Instant::now();
        t.shutdown().await;
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "prompt shutdown"
        );
        assert!(events.next().await.is_none(), "the stream ended");
    })
    .await;
}
