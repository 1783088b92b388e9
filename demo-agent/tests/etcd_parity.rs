//! Parity: one test body (reads, writes, blocking reads, compare-and-set, server-sent-event
//! watches) run against the embedded store and against a real etcd, so the agent's HTTP API
//! behaves the same on both. Index assertions are relative (an index is whatever the write
//! answered), since the two stores number differently; see `upstream::EtcdUpstream`.

mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::time::{Duration, Instant};

use common::sse::SseReader;
use common::{TestAgent, bounded, expect_error, header, x_index};
use demo_agent::KvCacheMode;
use etcd::EtcdCluster;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// How long a read that must *not* wake is watched before it counts as still blocked.
const NOT_WOKEN: Duration = Duration::from_millis(400);

async fn open_watch(t: &TestAgent, query: &str) -> SseReader {
    let response = t.get(&format!("/v1/watch?{query}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    SseReader::new(response)
}

/// Spawns a GET of `path` and returns its handle.
fn spawn_get(t: &TestAgent, path: &str) -> tokio::task::JoinHandle<reqwest::Response> {
    let client = t.client.clone();
    let url = t.url(path);
    tokio::spawn(async move { client.get(url).send().await.unwrap() })
}

async fn value_of(response: reqwest::Response) -> Value {
    let body: Value = response.json().await.unwrap();
    body["value"].clone()
}

/// The shared body. `mode` is the agent's KV cache mode.
async fn parity(t: TestAgent, mode: KvCacheMode) {
    // ----- write, read (uncached and cached), delete -----
    let written = t.put("app/greeting", "hello").await;
    assert!(written >= 1);
    let response = t.get("/v1/agent/kv/app/greeting").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(x_index(&response), written);
    assert_eq!(header(&response, "x-cache"), "");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (
            body["key"].clone(),
            body["value"].clone(),
            body["index"].clone()
        ),
        (json!("app/greeting"), json!("hello"), json!(written))
    );
    let miss = t.get("/v1/agent/kv/app/greeting?cached").await;
    assert_eq!(header(&miss, "x-cache"), "MISS");
    assert_eq!(x_index(&miss), written);
    let hit = t.get("/v1/agent/kv/app/greeting?cached").await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert_eq!(x_index(&hit), written);
    assert_eq!(value_of(hit).await, "hello");

    let deleted = t.delete("/v1/agent/kv/app/greeting").await;
    assert_eq!(deleted.status(), StatusCode::OK);
    let deleted_at = x_index(&deleted);
    assert!(deleted_at > written);
    let response = t.get("/v1/agent/kv/app/greeting").await;
    assert_eq!(x_index(&response), deleted_at);
    let body = expect_error(response, StatusCode::NOT_FOUND, "not found").await;
    assert_eq!(body["index"], deleted_at);
    // Never written: a 404 that still carries an index (never 0) to block on.
    let response = t.get("/v1/agent/kv/never?cached").await;
    let never_at = x_index(&response);
    assert!(never_at >= 1);
    expect_error(response, StatusCode::NOT_FOUND, "not found").await;

    // ----- blocking reads wake on a write of their key -----
    let blocking_gets = "demo_agent_upstream_reads_total{op=\"get\",blocking=\"true\"}";
    let index = t.put("k", "v1").await;
    let before = t.metric(blocking_gets).await;
    let reader = spawn_get(&t, &format!("/v1/agent/kv/k?index={index}&wait=30s"));
    t.wait_metric(blocking_gets, before + 1.0).await;
    let written = t.put("k", "v2").await;
    let response = reader.await.unwrap();
    assert_eq!(x_index(&response), written);
    assert_eq!(value_of(response).await, "v2");

    // Cached: the blocking read joins the entry's fetch.
    assert_eq!(
        t.get("/v1/agent/kv/k?cached").await.status(),
        StatusCode::OK
    );
    let misses = "demo_agent_cache_misses_total{type=\"kv\",kind=\"blocking\"}";
    let before = t.metric(misses).await;
    let reader = spawn_get(
        &t,
        &format!("/v1/agent/kv/k?cached&index={written}&wait=30s"),
    );
    t.wait_metric(misses, before + 1.0).await;
    let next = t.put("k", "v3").await;
    let response = reader.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-cache"), "MISS");
    assert_eq!(x_index(&response), next);
    assert_eq!(value_of(response).await, "v3");

    // ----- an absent key blocks until it appears, not on other writes -----
    let response = t.get("/v1/agent/kv/later?cached").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let absent_at = x_index(&response);
    let uncached = spawn_get(
        &t,
        &format!("/v1/agent/kv/later?index={absent_at}&wait=30s"),
    );
    let cached = spawn_get(
        &t,
        &format!("/v1/agent/kv/later?cached&index={absent_at}&wait=30s"),
    );
    t.wait_metric(misses, before + 2.0).await;
    t.put("unrelated/1", "x").await;
    t.put("unrelated/2", "y").await;
    t.delete("/v1/agent/kv/unrelated/1").await;
    tokio::time::sleep(NOT_WOKEN).await;
    assert!(!uncached.is_finished(), "woken by writes to other keys");
    assert!(!cached.is_finished(), "woken by writes to other keys");
    let appeared = t.put("later", "here").await;
    for reader in [uncached, cached] {
        let response = reader.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(x_index(&response), appeared);
        assert_eq!(value_of(response).await, "here");
    }

    // ----- a blocking read answers at its wait with the unchanged index -----
    let index = t.put("still", "v").await;
    for path in [
        format!("/v1/agent/kv/still?index={index}&wait=300ms"),
        format!("/v1/agent/kv/still?cached&index={index}&wait=300ms"),
    ] {
        let started = Instant::now();
        let response = t.get(&path).await;
        assert!(started.elapsed() >= Duration::from_millis(250), "{path}");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(x_index(&response), index, "{path}");
    }
    t.put("unrelated/3", "z").await;
    let started = Instant::now();
    let response = t
        .get(&format!("/v1/agent/kv/never?index={never_at}&wait=300ms"))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(x_index(&response), never_at, "an absent key's index stays");
    expect_error(response, StatusCode::NOT_FOUND, "not found").await;

    // ----- listings -----
    t.put("list/a", "1").await;
    t.put("other", "x").await;
    let index = t.put("list/b", "2").await;
    for path in [
        "/v1/agent/kv/?prefix=list/",
        "/v1/agent/kv?prefix=list/",
        "/v1/agent/kv/list/?recurse",
        "/v1/agent/kv/?prefix=list/&cached",
    ] {
        let response = t.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(x_index(&response), index, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["prefix"], "list/", "{path}");
        assert_eq!(
            body["keys"],
            json!([{"key": "list/a", "value": "1"}, {"key": "list/b", "value": "2"}]),
            "{path}"
        );
    }
    let all: Value = t.get("/v1/agent/kv/").await.json().await.unwrap();
    let all_keys: Vec<&str> = all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| kv["key"].as_str().unwrap())
        .collect();
    assert!(all_keys.contains(&"list/a") && all_keys.contains(&"other"));
    // A blocking listing wakes on a write under its prefix, not elsewhere.
    let list_misses = "demo_agent_cache_misses_total{type=\"kv_list\",kind=\"blocking\"}";
    let before_list = t.metric(list_misses).await;
    let reader = spawn_get(
        &t,
        &format!("/v1/agent/kv/?prefix=list/&cached&index={index}&wait=30s"),
    );
    t.wait_metric(list_misses, before_list + 1.0).await;
    t.put("lists-are-elsewhere", "x").await;
    tokio::time::sleep(NOT_WOKEN).await;
    assert!(
        !reader.is_finished(),
        "a listing woken by a write outside its prefix"
    );
    let written = t.put("list/c", "3").await;
    let response = reader.await.unwrap();
    assert_eq!(x_index(&response), written);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["keys"].as_array().unwrap().len(), 3);

    // ----- compare-and-set -----
    let created = t.put_body("/v1/agent/kv/lock?cas=0", "me").await;
    assert_eq!(created.status(), StatusCode::OK);
    let lock_at = x_index(&created);
    let again = t.put_body("/v1/agent/kv/lock?cas=0", "you").await;
    let body = expect_error(again, StatusCode::CONFLICT, "cas mismatch").await;
    assert_eq!(body["index"], lock_at);
    let stale = t
        .put_body(&format!("/v1/agent/kv/lock?cas={}", lock_at + 100), "you")
        .await;
    expect_error(stale, StatusCode::CONFLICT, "cas mismatch").await;
    let updated = t
        .put_body(&format!("/v1/agent/kv/lock?cas={lock_at}"), "still me")
        .await;
    assert_eq!(updated.status(), StatusCode::OK);
    let updated_at = x_index(&updated);
    assert!(updated_at > lock_at);
    let wrong = t.delete(&format!("/v1/agent/kv/lock?cas={lock_at}")).await;
    expect_error(wrong, StatusCode::CONFLICT, "cas mismatch").await;
    let deleted = t
        .delete(&format!("/v1/agent/kv/lock?cas={updated_at}"))
        .await;
    assert_eq!(deleted.status(), StatusCode::OK);
    assert_eq!(
        t.get("/v1/agent/kv/lock").await.status(),
        StatusCode::NOT_FOUND
    );

    // ----- server-sent events: several keys and a prefix on one stream -----
    let a_index = t.put("w/a", "1").await;
    let mut events = open_watch(&t, "key=w/a&key=w/b&prefix=app/").await;
    let mut first = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let event = events.next().await.expect("an initial event");
        assert_eq!(event.event, "update");
        first.insert(
            event.data["correlation_id"].as_str().unwrap().to_owned(),
            event.data,
        );
    }
    assert_eq!(first["key:w/a"]["value"], "1");
    assert_eq!(first["key:w/a"]["index"], a_index);
    assert_eq!(first["key:w/a"]["error"], Value::Null);
    assert_eq!(first["key:w/b"]["value"], Value::Null);
    assert!(first["key:w/b"]["index"].as_u64().unwrap() >= 1);
    assert_eq!(first["prefix:app/"]["value"], json!([]));
    t.wait_metric("demo_agent_cache_watches{type=\"kv\"}", 2.0)
        .await;
    t.wait_metric("demo_agent_cache_watches{type=\"kv_list\"}", 1.0)
        .await;

    let b_index = t.put("w/b", "2").await;
    let event = events.next().await.unwrap();
    assert_eq!(event.data["correlation_id"], "key:w/b");
    assert_eq!(event.data["value"], "2");
    assert_eq!(event.data["index"], b_index);

    let x_at = t.put("app/x", "3").await;
    let event = events.next().await.unwrap();
    assert_eq!(event.data["correlation_id"], "prefix:app/");
    assert_eq!(event.data["value"], json!([{"key": "app/x", "value": "3"}]));
    assert_eq!(event.data["index"], x_at);

    // Writes nobody watches send nothing: the next event is the next watched write.
    t.put("elsewhere", "x").await;
    let gone = t.delete("/v1/agent/kv/w/a").await;
    let gone_at = x_index(&gone);
    let event = events.next().await.unwrap();
    assert_eq!(event.data["correlation_id"], "key:w/a");
    assert_eq!(event.data["value"], Value::Null);
    assert_eq!(event.data["index"], gone_at);

    drop(events);
    common::eventually("the watches to end", || async {
        let text = t.metrics().await;
        let kv = common::metric_value(&text, "demo_agent_cache_watches{type=\"kv\"}");
        let list = common::metric_value(&text, "demo_agent_cache_watches{type=\"kv_list\"}");
        let streams = common::metric_value(&text, "demo_agent_watch_streams");
        (kv == 0.0 && list == 0.0 && streams == 0.0).then_some(())
    })
    .await;

    // ----- simple mode only: a stale hit until Cache-Control asks for more -----
    if mode == KvCacheMode::Simple {
        t.put("s", "v1").await;
        assert_eq!(value_of(t.get("/v1/agent/kv/s?cached").await).await, "v1");
        t.put("s", "v2").await;
        assert_eq!(value_of(t.get("/v1/agent/kv/s?cached").await).await, "v1");
        let fresh = t
            .get_cache_control("/v1/agent/kv/s?cached", "max-age=0")
            .await;
        assert_eq!(header(&fresh, "x-cache"), "MISS");
        assert_eq!(value_of(fresh).await, "v2");
    }
    t.shutdown().await;
}

#[tokio::test]
async fn parity_embedded_refresh_mode() {
    bounded(async {
        let t = common::start_with_mode(KvCacheMode::Refresh).await;
        parity(t, KvCacheMode::Refresh).await;
    })
    .await;
}

#[tokio::test]
async fn parity_embedded_simple_mode() {
    bounded(async {
        let t = common::start_with_mode(KvCacheMode::Simple).await;
        parity(t, KvCacheMode::Simple).await;
    })
    .await;
}

#[tokio::test]
async fn parity_etcd_refresh_mode() {
    if !etcd::available("parity_etcd_refresh_mode") {
        return;
    }
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        let t = etcd::start_agent(&cluster, KvCacheMode::Refresh).await;
        parity(t, KvCacheMode::Refresh).await;
    })
    .await;
}

#[tokio::test]
async fn parity_etcd_simple_mode() {
    if !etcd::available("parity_etcd_simple_mode") {
        return;
    }
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        let t = etcd::start_agent(&cluster, KvCacheMode::Simple).await;
        parity(t, KvCacheMode::Simple).await;
    })
    .await;
}

/// What only a shared store shows: writes made by others (here, straight to etcd) reach the
/// agent's cached reads and watches, and the agent's writes land in etcd.
#[tokio::test]
async fn etcd_writes_by_others_reach_cached_reads_and_watches() {
    if !etcd::available("etcd_writes_by_others_reach_cached_reads_and_watches") {
        return;
    }
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        let t = etcd::start_agent(&cluster, KvCacheMode::Refresh).await;
        let index = t.put("shared/k", "from-agent").await;
        assert_eq!(
            cluster.get("shared/k").await,
            Some(("from-agent".to_owned(), index))
        );
        assert_eq!(
            t.get("/v1/agent/kv/shared/k?cached").await.status(),
            StatusCode::OK
        );
        let mut events = open_watch(&t, "key=shared/k&prefix=shared/").await;
        for _ in 0..2 {
            events.next().await.expect("an initial event");
        }
        t.wait_metric("demo_agent_cache_watches{type=\"kv\"}", 1.0)
            .await;
        let external = cluster.put("shared/k", "from-etcd").await;
        let mut seen = std::collections::BTreeMap::new();
        while seen.len() < 2 {
            let event = events.next().await.unwrap();
            seen.insert(
                event.data["correlation_id"].as_str().unwrap().to_owned(),
                event.data,
            );
        }
        assert_eq!(seen["key:shared/k"]["value"], "from-etcd");
        assert_eq!(seen["key:shared/k"]["index"], external);
        assert_eq!(
            seen["prefix:shared/"]["value"],
            json!([{"key": "shared/k", "value": "from-etcd"}])
        );
        // The refresh-mode entry followed the external write: a current hit.
        let hit = t.get("/v1/agent/kv/shared/k?cached").await;
        assert_eq!(header(&hit, "x-cache"), "HIT");
        assert_eq!(header(&hit, "age"), "0");
        assert_eq!(x_index(&hit), external);
        assert_eq!(value_of(hit).await, "from-etcd");
        drop(events);
        t.shutdown().await;
    })
    .await;
}
