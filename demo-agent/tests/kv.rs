//! End-to-end tests of `/v1/kv` in Consul's shapes: reads (cached and not), blocking reads,
//! coalescing, cache headers, listings, compare-and-set, flags and binary values, read your
//! writes, holding blocking reads through an outage; and the polling stats endpoint.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{TestAgent, bounded, header, start_default, start_simple};
use demo_agent::{Config, KvCacheMode};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// `X-Consul-Index` as a number.
fn consul_index(response: &reqwest::Response) -> u64 {
    header(response, "x-consul-index")
        .parse()
        .expect("X-Consul-Index header")
}

/// A Consul PUT of `value` to `key`: expects `200 true` and returns the write's index.
async fn cput(t: &TestAgent, key: &str, value: &str) -> u64 {
    let response = t.put_body(&format!("/v1/kv/{key}"), value.to_owned()).await;
    assert_eq!(response.status(), StatusCode::OK, "PUT {key}");
    let index = consul_index(&response);
    assert_eq!(response.text().await.unwrap().trim(), "true");
    index
}

/// The value of the first entry of a Consul KV answer, decoded from base64 as text.
fn value_of(body: &Value) -> String {
    let entry = if body.is_array() { &body[0] } else { body };
    match entry["Value"].as_str() {
        Some(b64) => String::from_utf8(BASE64.decode(b64).unwrap()).unwrap(),
        None => String::new(),
    }
}

#[tokio::test]
async fn put_get_delete_round_trip() {
    bounded(async {
        let t = start_default().await;
        let written = cput(&t, "app/greeting", "hello").await;
        assert!(written >= 2);

        let response = t.get("/v1/kv/app/greeting").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(consul_index(&response), written);
        assert_eq!(header(&response, "x-consul-knownleader"), "true");
        assert_eq!(header(&response, "x-consul-lastcontact"), "0");
        assert_eq!(
            header(&response, "x-consul-effective-consistency"),
            "leader"
        );
        // An uncached read carries no cache headers.
        assert_eq!(header(&response, "x-cache"), "");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            json!([{"LockIndex": 0, "Key": "app/greeting", "Flags": 0, "Value": "aGVsbG8=",
                    "CreateIndex": written, "ModifyIndex": written}])
        );

        // ?raw: the bare bytes.
        let raw = t.get("/v1/kv/app/greeting?raw").await;
        assert_eq!(raw.status(), StatusCode::OK);
        assert_eq!(consul_index(&raw), written);
        assert_eq!(raw.text().await.unwrap(), "hello");

        // An update keeps CreateIndex; flags are stored and returned.
        let updated = t
            .put_body("/v1/kv/app/greeting?flags=18446744073709551615", "hi")
            .await;
        assert_eq!(updated.status(), StatusCode::OK);
        let updated_at = consul_index(&updated);
        let body: Value = t.get("/v1/kv/app/greeting").await.json().await.unwrap();
        assert_eq!(body[0]["Flags"], u64::MAX);
        assert_eq!(body[0]["CreateIndex"], written);
        assert_eq!(body[0]["ModifyIndex"], updated_at);

        let deleted = t.delete("/v1/kv/app/greeting").await;
        assert_eq!(deleted.status(), StatusCode::OK);
        let deleted_at = consul_index(&deleted);
        assert!(deleted_at > updated_at);
        assert_eq!(deleted.text().await.unwrap().trim(), "true");

        // A missing key is a 404 with an empty body that still carries the index.
        let response = t.get("/v1/kv/app/greeting").await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(consul_index(&response), deleted_at);
        assert_eq!(response.text().await.unwrap(), "");

        // A key never written is at index 1, never 0.
        let response = t.get("/v1/kv/never?cached").await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(consul_index(&response), 1);

        // An empty value reads back as null; keys may arrive percent-encoded.
        cput(&t, "dir/", "").await;
        let body: Value = t.get("/v1/kv/dir%2F").await.json().await.unwrap();
        assert_eq!(
            (&body[0]["Key"], &body[0]["Value"]),
            (&json!("dir/"), &Value::Null)
        );
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn binary_values_round_trip_byte_for_byte() {
    bounded(async {
        let t = start_default().await;
        let bytes: Vec<u8> = (0..=255).collect();
        let response = t.put_body("/v1/kv/bin?flags=7", bytes.clone()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let raw = t.get("/v1/kv/bin?raw").await;
        assert_eq!(header(&raw, "content-type"), "text/plain");
        assert_eq!(header(&raw, "content-security-policy"), "sandbox");
        assert_eq!(raw.bytes().await.unwrap().to_vec(), bytes);
        let body: Value = t.get("/v1/kv/bin?cached").await.json().await.unwrap();
        assert_eq!(
            BASE64.decode(body[0]["Value"].as_str().unwrap()).unwrap(),
            bytes
        );
        assert_eq!(body[0]["Flags"], 7);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn cached_reads_report_miss_hit_and_age() {
    bounded(async {
        let t = start_simple().await;
        cput(&t, "k", "v1").await;

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

        // Read your writes: a write through this agent is seen by the next cached read.
        let written = cput(&t, "k", "v2").await;
        let after = t.get("/v1/kv/k?cached").await;
        assert_eq!(header(&after, "x-cache"), "MISS");
        assert_eq!(consul_index(&after), written);
        let after: Value = after.json().await.unwrap();
        assert_eq!(value_of(&after), "v2");
        // Then the value ages again: hits, until max-age says it is too old.
        assert_eq!(header(&t.get("/v1/kv/k?cached").await, "x-cache"), "HIT");
        let fresh = t.get_cache_control("/v1/kv/k?cached", "max-age=0").await;
        assert_eq!(header(&fresh, "x-cache"), "MISS");
        let fresh: Value = fresh.json().await.unwrap();
        assert_eq!(value_of(&fresh), "v2");
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
        cput(&t, "k", "v1").await;
        let first = t.get("/v1/kv/k?cached").await;
        assert_eq!(header(&first, "x-cache"), "MISS");
        let second = t.get("/v1/kv/k?cached").await;
        assert_eq!(header(&second, "x-cache"), "HIT");
        assert_eq!(header(&second, "age"), "0");

        // The background blocking query picks up the write; reads stay hits.
        let written = cput(&t, "k", "v2").await;
        common::eventually("the cached value to follow the write", || async {
            let response = t.get("/v1/kv/k?cached").await;
            let hit = header(&response, "x-cache") == "HIT";
            let index = consul_index(&response);
            let body: Value = response.json().await.unwrap();
            (hit && index == written && value_of(&body) == "v2").then_some(())
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
        let index = cput(&t, "k", "v1").await;
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
        let written = cput(&t, "k", "v2").await;
        let response = reader.await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(25));
        assert_eq!(consul_index(&response), written);
        let body: Value = response.json().await.unwrap();
        assert_eq!(value_of(&body), "v2");
        t.shutdown().await;
    })
    .await;
}

async fn cached_blocking_read_wakes_on_write(mode: KvCacheMode) {
    let t = common::start_with_mode(mode).await;
    let index = cput(&t, "k", "v1").await;
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
    let written = cput(&t, "k", "v2").await;
    let response = reader.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-cache"), "MISS");
    assert_eq!(consul_index(&response), written);
    let body: Value = response.json().await.unwrap();
    assert_eq!(value_of(&body), "v2");
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
        let absent_at = consul_index(&response);
        let url = t.url(&format!("/v1/kv/later?cached&index={absent_at}&wait=30s"));
        let client = t.client.clone();
        let reader = tokio::spawn(async move { client.get(url).send().await.unwrap() });
        t.wait_metric(
            "demo_agent_cache_misses_total{type=\"kv\",kind=\"blocking\"}",
            1.0,
        )
        .await;
        let written = cput(&t, "later", "here").await;
        let response = reader.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(consul_index(&response), written);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn blocking_read_answers_at_its_wait_with_the_same_index() {
    bounded(async {
        let t = start_default().await;
        let index = cput(&t, "k", "v1").await;
        for path in [
            format!("/v1/kv/k?index={index}&wait=300ms"),
            format!("/v1/kv/k?cached&index={index}&wait=300ms"),
        ] {
            let started = Instant::now();
            let response = t.get(&path).await;
            assert!(started.elapsed() >= Duration::from_millis(250), "{path}");
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(consul_index(&response), index, "{path}");
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
        cput(&t, "hot", "value").await;
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
                assert_eq!(value_of(&body), "value");
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
async fn recurse_keys_and_blocking_listing() {
    bounded(async {
        let t = start_default().await;
        cput(&t, "app/a", "1").await;
        cput(&t, "other", "x").await;
        cput(&t, "app/sub/x", "3").await;
        let index = cput(&t, "app/b", "2").await;

        for path in [
            "/v1/kv/app/?recurse",
            "/v1/kv/app/?recurse=false",
            "/v1/kv/app/?recurse&cached",
            "/v1/kv/app/?recurse&stale",
            "/v1/kv/app/?recurse&consistent",
        ] {
            let response = t.get(path).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(consul_index(&response), index, "{path}");
            let body: Value = response.json().await.unwrap();
            let keys: Vec<&str> = body
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["Key"].as_str().unwrap())
                .collect();
            assert_eq!(keys, ["app/a", "app/b", "app/sub/x"], "{path}");
        }
        let consistency = |r: &reqwest::Response| header(r, "x-consul-effective-consistency");
        assert_eq!(
            consistency(&t.get("/v1/kv/app/?recurse&stale").await),
            "stale"
        );
        assert_eq!(
            consistency(&t.get("/v1/kv/app/?recurse&consistent").await),
            "consistent"
        );
        // Keys, with and without a separator; the root lists everything.
        let keys: Value = t.get("/v1/kv/app/?keys").await.json().await.unwrap();
        assert_eq!(keys, json!(["app/a", "app/b", "app/sub/x"]));
        let keys: Value = t
            .get("/v1/kv/app/?keys=True&separator=/")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(keys, json!(["app/a", "app/b", "app/sub/"]));
        let keys: Value = t
            .get("/v1/kv/?keys&separator=/")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(keys, json!(["app/", "other"]));
        // As Consul: `?keys` wins over `?recurse`, and `?raw` is ignored by either.
        for path in ["/v1/kv/app/?recurse&keys", "/v1/kv/app/?keys&raw"] {
            let keys: Value = t.get(path).await.json().await.unwrap();
            assert_eq!(keys, json!(["app/a", "app/b", "app/sub/x"]), "{path}");
        }
        let raw_recurse: Value = t.get("/v1/kv/app/?recurse&raw").await.json().await.unwrap();
        assert_eq!(raw_recurse.as_array().unwrap().len(), 3);
        // A path with `//` is redirected to its clean form, query kept, as Consul's Go mux
        // does: consul-kv reads the whole store as `GET /v1/kv//?recurse`.
        let no_redirects = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        for (path, location) in [
            ("/v1/kv//?recurse", "/v1/kv/?recurse"),
            ("/v1/kv/app//a", "/v1/kv/app/a"),
        ] {
            let moved = no_redirects.get(t.url(path)).send().await.unwrap();
            assert_eq!(moved.status(), StatusCode::MOVED_PERMANENTLY, "{path}");
            assert_eq!(header(&moved, "location"), location, "{path}");
        }
        let everything: Value = t.get("/v1/kv//?recurse").await.json().await.unwrap();
        assert_eq!(everything.as_array().unwrap().len(), 4, "followed");
        let all: Value = t.get("/v1/kv?recurse").await.json().await.unwrap();
        assert_eq!(all.as_array().unwrap().len(), 4);
        // Nothing under a prefix: 404, empty body.
        for path in ["/v1/kv/none/?recurse", "/v1/kv/none/?keys"] {
            let response = t.get(path).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(response.text().await.unwrap(), "", "{path}");
        }

        // A blocking listing wakes on a write under the prefix.
        let url = t.url(&format!(
            "/v1/kv/app/?recurse&cached&index={index}&wait=30s"
        ));
        let client = t.client.clone();
        let reader = tokio::spawn(async move { client.get(url).send().await.unwrap() });
        t.wait_metric(
            "demo_agent_cache_misses_total{type=\"kv_list\",kind=\"blocking\"}",
            1.0,
        )
        .await;
        let written = cput(&t, "app/c", "3").await;
        let response = reader.await.unwrap();
        assert_eq!(consul_index(&response), written);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body.as_array().unwrap().len(), 4);

        // A recursive delete removes the prefix, nothing else.
        let deleted = t.delete("/v1/kv/app/?recurse").await;
        assert_eq!(deleted.text().await.unwrap().trim(), "true");
        assert_eq!(
            t.get("/v1/kv/app/?recurse").await.status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(t.get("/v1/kv/other").await.status(), StatusCode::OK);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn compare_and_set_answers_true_or_false() {
    bounded(async {
        let t = start_default().await;
        let body = |r: reqwest::Response| async move { r.text().await.unwrap().trim().to_owned() };
        // cas=0: create only.
        let created = t.put_body("/v1/kv/lock?cas=0", "me").await;
        assert_eq!(created.status(), StatusCode::OK);
        let index = consul_index(&created);
        assert_eq!(body(created).await, "true");
        let again = t.put_body("/v1/kv/lock?cas=0", "you").await;
        assert_eq!(again.status(), StatusCode::OK);
        assert_eq!(body(again).await, "false");
        let stale = t
            .put_body(&format!("/v1/kv/lock?cas={}", index + 100), "you")
            .await;
        assert_eq!(body(stale).await, "false");
        let updated = t
            .put_body(&format!("/v1/kv/lock?cas={index}"), "still me")
            .await;
        let updated_at = consul_index(&updated);
        assert_eq!(body(updated).await, "true");
        let value: Value = t.get("/v1/kv/lock").await.json().await.unwrap();
        assert_eq!(value_of(&value), "still me");

        let wrong = t.delete(&format!("/v1/kv/lock?cas={index}")).await;
        assert_eq!(body(wrong).await, "false");
        assert_eq!(t.get("/v1/kv/lock").await.status(), StatusCode::OK);
        let deleted = t.delete(&format!("/v1/kv/lock?cas={updated_at}")).await;
        assert_eq!(body(deleted).await, "true");
        assert_eq!(t.get("/v1/kv/lock").await.status(), StatusCode::NOT_FOUND);
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
        let written = cput(&t, "k", "v").await;
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

        cput(&t, "k", "v").await;
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
