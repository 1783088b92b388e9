//! End-to-end tests of `/v1/kv`: reads (cached and not), blocking reads, coalescing, cache
//! headers, listings, compare-and-set; and the polling stats endpoint.

mod common;

use std::time::{Duration, Instant};

use common::{bounded, expect_error, header, start_default, start_simple, x_index};
use demo_agent::{Config, KvCacheMode};
use reqwest::StatusCode;
use serde_json::Value;

#[tokio::test]
async fn put_get_delete_round_trip() {
    bounded(async {
        let t = start_default().await;
        let written = t.put("app/greeting", "hello").await;
        assert!(written >= 2);

        let response = t.get("/v1/kv/app/greeting").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(x_index(&response), written);
        assert_eq!(header(&response, "x-consul-index"), written.to_string());
        // An uncached read carries no cache headers.
        assert_eq!(header(&response, "x-cache"), "");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["key"], "app/greeting");
        assert_eq!(body["value"], "hello");
        assert_eq!(body["index"], written);

        let deleted = t.delete("/v1/kv/app/greeting").await;
        assert_eq!(deleted.status(), StatusCode::OK);
        let deleted_at = x_index(&deleted);
        assert!(deleted_at > written);

        // A missing key is a 404 that still carries the index.
        let response = t.get("/v1/kv/app/greeting").await;
        assert_eq!(x_index(&response), deleted_at);
        let body = expect_error(response, StatusCode::NOT_FOUND, "not found").await;
        assert_eq!(body["index"], deleted_at);

        // A key never written is at index 1, never 0.
        let response = t.get("/v1/kv/never?cached").await;
        assert_eq!(x_index(&response), 1);
        expect_error(response, StatusCode::NOT_FOUND, "not found").await;
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn cached_reads_report_miss_hit_and_age() {
    bounded(async {
        let t = start_simple().await;
        t.put("k", "v1").await;

        let first = t.get("/v1/kv/k?cached").await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(header(&first, "x-cache"), "MISS");
        assert_eq!(header(&first, "age"), "");

        let second = t.get("/v1/kv/k?cached").await;
        assert_eq!(header(&second, "x-cache"), "HIT");
        let age: u64 = header(&second, "age").parse().unwrap();
        assert!(age <= 1, "a fresh hit is young: {age}");

        // Simple caching: the value ages until Cache-Control asks for a fresher one.
        common::eventually("Age >= 1", || async {
            let response = t.get("/v1/kv/k?cached").await;
            let age: u64 = header(&response, "age").parse().unwrap();
            (age >= 1).then_some(())
        })
        .await;

        // A write is not seen by a simple-mode hit...
        t.put("k", "v2").await;
        let stale: Value = t.get("/v1/kv/k?cached").await.json().await.unwrap();
        assert_eq!(stale["value"], "v1");
        // ...until max-age says the value is too old.
        let fresh = t.get_cache_control("/v1/kv/k?cached", "max-age=0").await;
        assert_eq!(header(&fresh, "x-cache"), "MISS");
        let fresh: Value = fresh.json().await.unwrap();
        assert_eq!(fresh["value"], "v2");
        // A generous max-age is served from the cache.
        let hit = t.get_cache_control("/v1/kv/k?cached", "max-age=3600").await;
        assert_eq!(header(&hit, "x-cache"), "HIT");
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn refresh_mode_keeps_cached_keys_current() {
    bounded(async {
        let t = start_default().await;
        t.put("k", "v1").await;
        let first = t.get("/v1/kv/k?cached").await;
        assert_eq!(header(&first, "x-cache"), "MISS");
        let second = t.get("/v1/kv/k?cached").await;
        assert_eq!(header(&second, "x-cache"), "HIT");
        assert_eq!(header(&second, "age"), "0");

        // The background blocking query picks up the write; reads stay hits.
        let written = t.put("k", "v2").await;
        common::eventually("the cached value to follow the write", || async {
            let response = t.get("/v1/kv/k?cached").await;
            let hit = header(&response, "x-cache") == "HIT";
            let index = x_index(&response);
            let body: Value = response.json().await.unwrap();
            (hit && index == written && body["value"] == "v2").then_some(())
        })
        .await;
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn uncached_blocking_read_wakes_on_write() {
    bounded(async {
        let t = start_default().await;
        let index = t.put("k", "v1").await;
        let url = t.url(&format!("/v1/kv/k?index={index}&wait=30s"));
        let client = t.client.clone();
        let started = Instant::now();
        let reader = tokio::spawn(async move { client.get(url).send().await.unwrap() });
        // Event-driven: write only once the blocking query is open upstream.
        t.wait_metric(
            "demo_agent_upstream_reads_total{op=\"get\",blocking=\"true\"}",
            1.0,
        )
        .await;
        t.wait_metric("demo_agent_upstream_blocking_queries", 1.0)
            .await;
        let written = t.put("k", "v2").await;
        let response = reader.await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(25));
        assert_eq!(x_index(&response), written);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["value"], "v2");
        t.shutdown().await;
    })
    .await;
}

async fn cached_blocking_read_wakes_on_write(mode: KvCacheMode) {
    let t = common::start_with_mode(mode).await;
    let index = t.put("k", "v1").await;
    // Warm the entry.
    assert_eq!(t.get("/v1/kv/k?cached").await.status(), StatusCode::OK);
    let url = t.url(&format!("/v1/kv/k?cached&index={index}&wait=30s"));
    let client = t.client.clone();
    let reader = tokio::spawn(async move { client.get(url).send().await.unwrap() });
    t.wait_metric(
        "demo_agent_cache_misses_total{type=\"kv\",kind=\"blocking\"}",
        1.0,
    )
    .await;
    let written = t.put("k", "v2").await;
    let response = reader.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-cache"), "MISS");
    assert_eq!(x_index(&response), written);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["value"], "v2");
    t.shutdown().await;
}

#[tokio::test]
async fn cached_blocking_read_wakes_on_write_refresh_mode() {
    bounded(cached_blocking_read_wakes_on_write(KvCacheMode::Refresh)).await;
}

#[tokio::test]
async fn cached_blocking_read_wakes_on_write_simple_mode() {
    bounded(cached_blocking_read_wakes_on_write(KvCacheMode::Simple)).await;
}

#[tokio::test]
async fn missing_key_can_be_blocked_on_until_it_appears() {
    bounded(async {
        let t = start_default().await;
        let response = t.get("/v1/kv/later?cached").await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let absent_at = x_index(&response);
        let url = t.url(&format!("/v1/kv/later?cached&index={absent_at}&wait=30s"));
        let client = t.client.clone();
        let reader = tokio::spawn(async move { client.get(url).send().await.unwrap() });
        t.wait_metric(
            "demo_agent_cache_misses_total{type=\"kv\",kind=\"blocking\"}",
            1.0,
        )
        .await;
        let written = t.put("later", "here").await;
        let response = reader.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(x_index(&response), written);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn blocking_read_answers_at_its_wait_with_the_same_index() {
    bounded(async {
        let t = start_default().await;
        let index = t.put("k", "v1").await;
        for path in [
            format!("/v1/kv/k?index={index}&wait=300ms"),
            format!("/v1/kv/k?cached&index={index}&wait=300ms"),
        ] {
            let started = Instant::now();
            let response = t.get(&path).await;
            assert!(started.elapsed() >= Duration::from_millis(250), "{path}");
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(x_index(&response), index, "{path}");
        }
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn concurrent_cached_reads_coalesce_into_one_upstream_read() {
    bounded(async {
        let mut config = Config::for_tests();
        // A slow upstream keeps the first fetch in flight while the others arrive.
        config.upstream_latency = Duration::from_millis(300);
        let t = common::start(config).await;
        t.put("hot", "value").await;
        let sample = "demo_agent_upstream_reads_total{op=\"get\",blocking=\"false\"}";
        assert_eq!(t.metric(sample).await, 0.0);

        let mut readers = Vec::new();
        for _ in 0..50 {
            let client = t.client.clone();
            let url = t.url("/v1/kv/hot?cached");
            readers.push(tokio::spawn(async move {
                let response = client.get(url).send().await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["value"], "value");
            }));
        }
        for reader in readers {
            reader.await.unwrap();
        }
        // Fifty reads, one upstream read (the refresh loop's later reads are blocking ones).
        assert_eq!(t.metric(sample).await, 1.0);
        let hits = t.metric("demo_agent_cache_hits_total{type=\"kv\"}").await;
        let misses = t
            .metric("demo_agent_cache_misses_total{type=\"kv\",kind=\"new\"}")
            .await;
        assert_eq!(hits + misses, 50.0);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn prefix_listing_and_blocking_listing() {
    bounded(async {
        let t = start_default().await;
        t.put("app/a", "1").await;
        t.put("other", "x").await;
        let index = t.put("app/b", "2").await;

        for path in [
            "/v1/kv/?prefix=app/",
            "/v1/kv?prefix=app/",
            "/v1/kv/app/?recurse",
            "/v1/kv/?prefix=app/&cached",
        ] {
            let response = t.get(path).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(x_index(&response), index, "{path}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["prefix"], "app/", "{path}");
            assert_eq!(
                body["keys"],
                serde_json::json!([{"key": "app/a", "value": "1"}, {"key": "app/b", "value": "2"}]),
                "{path}"
            );
        }
        let all: Value = t.get("/v1/kv/").await.json().await.unwrap();
        assert_eq!(all["keys"].as_array().unwrap().len(), 3);

        // A blocking listing wakes on a write under the prefix.
        let url = t.url(&format!(
            "/v1/kv/?prefix=app/&cached&index={index}&wait=30s"
        ));
        let client = t.client.clone();
        let reader = tokio::spawn(async move { client.get(url).send().await.unwrap() });
        t.wait_metric(
            "demo_agent_cache_misses_total{type=\"kv_list\",kind=\"blocking\"}",
            1.0,
        )
        .await;
        let written = t.put("app/c", "3").await;
        let response = reader.await.unwrap();
        assert_eq!(x_index(&response), written);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["keys"].as_array().unwrap().len(), 3);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn compare_and_set_writes() {
    bounded(async {
        let t = start_default().await;
        // cas=0: create only.
        let created = t.put_body("/v1/kv/lock?cas=0", "me").await;
        assert_eq!(created.status(), StatusCode::OK);
        let index = x_index(&created);
        let again = t.put_body("/v1/kv/lock?cas=0", "you").await;
        let body = expect_error(again, StatusCode::CONFLICT, "cas mismatch").await;
        assert_eq!(body["index"], index);
        let stale = t
            .put_body(&format!("/v1/kv/lock?cas={}", index + 100), "you")
            .await;
        expect_error(stale, StatusCode::CONFLICT, "cas mismatch").await;
        let updated = t
            .put_body(&format!("/v1/kv/lock?cas={index}"), "still me")
            .await;
        assert_eq!(updated.status(), StatusCode::OK);
        let updated_at = x_index(&updated);

        let wrong = t.delete(&format!("/v1/kv/lock?cas={index}")).await;
        expect_error(wrong, StatusCode::CONFLICT, "cas mismatch").await;
        let deleted = t.delete(&format!("/v1/kv/lock?cas={updated_at}")).await;
        assert_eq!(deleted.status(), StatusCode::OK);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn stats_are_served_by_a_polling_cache_type() {
    bounded(async {
        let mut config = Config::for_tests();
        config.stats_refresh = Duration::from_millis(50);
        let t = common::start(config).await;
        let first = t.get("/v1/agent/upstream/stats").await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(header(&first, "x-cache"), "MISS");
        let second = t.get("/v1/agent/upstream/stats").await;
        assert_eq!(header(&second, "x-cache"), "HIT");
        assert_eq!(header(&second, "age"), "0");
        let body: Value = second.json().await.unwrap();
        assert_eq!(body["kind"], "embedded");

        // The refresh timer picks up a write without any read asking for it.
        let written = t.put("k", "v").await;
        common::eventually("the stats to show the write", || async {
            let response = t.get("/v1/agent/upstream/stats").await;
            let hit = header(&response, "x-cache") == "HIT";
            let body: Value = response.json().await.unwrap();
            (hit && body["index"] == written && body["writes"] == 1).then_some(())
        })
        .await;
        let fetches = t
            .metric(
                "demo_agent_cache_fetches_total{type=\"upstream_stats\",not_modified=\"false\"}",
            )
            .await;
        assert!(fetches >= 2.0, "background polls: {fetches}");
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn health_and_metrics() {
    bounded(async {
        let t = start_default().await;
        let health = t.get("/v1/agent/health").await;
        assert_eq!(health.status(), StatusCode::OK);
        let body: Value = health.json().await.unwrap();
        assert_eq!(body, serde_json::json!({"status": "ok"}));

        t.put("k", "v").await;
        t.get("/v1/kv/k?cached").await;
        t.get("/v1/kv/k?cached").await;
        let text = t.metrics().await;
        for family in [
            "demo_agent_cache_hits_total{type=\"kv\"} 1",
            "demo_agent_cache_misses_total{type=\"kv\",kind=\"new\"} 1",
            "demo_agent_cache_entries{type=\"kv\"} 1",
            "demo_agent_cache_watches{type=\"kv\"} 0",
            "demo_agent_cache_fetch_errors_total{type=\"kv\",fatal=\"false\"} 0",
            "demo_agent_upstream_writes_total 1",
            "# EOF",
        ] {
            assert!(text.contains(family), "metrics lack {family:?}:\n{text}");
        }
        t.shutdown().await;
    })
    .await;
}
