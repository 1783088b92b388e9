//! End-to-end tests of upstream failures: injected outages, stale-if-error, fail-static
//! serving in refresh mode, and the fault-injection endpoint.

mod common;

use common::{bounded, expect_error, header, start_default, start_simple, x_index};
use demo_agent::Config;
use reqwest::StatusCode;
use serde_json::Value;

#[tokio::test]
async fn stale_if_error_serves_the_last_value_during_an_outage() {
    bounded(async {
        let t = start_simple().await;
        let index = t.put("k", "before").await;
        let warm = t.get("/v1/agent/kv/k?cached").await;
        assert_eq!(warm.status(), StatusCode::OK);

        t.set_fail(true).await;
        // Straight to the upstream: fails.
        expect_error(
            t.get("/v1/agent/kv/k").await,
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream unavailable",
        )
        .await;
        // Writes fail too.
        let write = t.put_body("/v1/agent/kv/k", "x").await;
        expect_error(write, StatusCode::SERVICE_UNAVAILABLE, "injected outage").await;

        // Revalidation without stale-if-error reports the failure.
        let strict = t
            .get_cache_control("/v1/agent/kv/k?cached", "max-age=0")
            .await;
        assert_eq!(header(&strict, "x-cache"), "MISS");
        expect_error(
            strict,
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream unavailable",
        )
        .await;

        // With stale-if-error the last value is served instead.
        let stale = t
            .get_cache_control("/v1/agent/kv/k?cached", "max-age=0, stale-if-error=60")
            .await;
        assert_eq!(stale.status(), StatusCode::OK);
        assert_eq!(x_index(&stale), index);
        let body: Value = stale.json().await.unwrap();
        assert_eq!(body["value"], "before");

        // must-revalidate behaves the same.
        for (cache_control, status) in [
            ("must-revalidate", StatusCode::SERVICE_UNAVAILABLE),
            ("must-revalidate, stale-if-error=60", StatusCode::OK),
        ] {
            let response = t
                .get_cache_control("/v1/agent/kv/k?cached", cache_control)
                .await;
            assert_eq!(response.status(), status, "{cache_control}");
        }

        // A plain cached read still hits.
        let hit = t.get("/v1/agent/kv/k?cached").await;
        assert_eq!(header(&hit, "x-cache"), "HIT");

        t.set_fail(false).await;
        let written = t.put("k", "after").await;
        let fresh = t
            .get_cache_control("/v1/agent/kv/k?cached", "max-age=0")
            .await;
        assert_eq!(x_index(&fresh), written);
        assert!(
            t.metric("demo_agent_upstream_injected_failures_total")
                .await
                >= 3.0,
            "failures are counted"
        );
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn refresh_mode_serves_cached_values_during_an_outage() {
    bounded(async {
        let t = start_default().await;
        let index = t.put("k", "before").await;
        assert_eq!(
            t.get("/v1/agent/kv/k?cached").await.status(),
            StatusCode::OK
        );
        // Wait for the background blocking query to be open, then cut the upstream.
        t.wait_metric("demo_agent_upstream_blocking_queries", 1.0)
            .await;
        t.set_fail(true).await;
        t.wait_metric(
            "demo_agent_cache_fetch_errors_total{type=\"kv\",fatal=\"false\"}",
            1.0,
        )
        .await;

        // Fail static: hits keep coming, and Age grows since contact was lost.
        common::eventually("Age >= 1 during the outage", || async {
            let response = t.get("/v1/agent/kv/k?cached").await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(header(&response, "x-cache"), "HIT");
            let age: u64 = header(&response, "age").parse().unwrap();
            (age >= 1).then_some(())
        })
        .await;

        // A blocking read makes a fetch attempt: the error, or with stale-if-error the value.
        let blocking = format!("/v1/agent/kv/k?cached&index={index}&wait=10s");
        expect_error(
            t.get(&blocking).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream unavailable",
        )
        .await;
        let stale = t.get_cache_control(&blocking, "stale-if-error=600").await;
        assert_eq!(stale.status(), StatusCode::OK);
        let body: Value = stale.json().await.unwrap();
        assert_eq!(body["value"], "before");

        // After the outage a blocking read catches up at once.
        t.set_fail(false).await;
        let written = t.put("k", "after").await;
        let response = t.get(&blocking).await;
        assert_eq!(x_index(&response), written);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn fail_rate_flag_and_runtime_switches() {
    bounded(async {
        let mut config = Config::for_tests();
        config.upstream_fail_rate = 1.0;
        let t = common::start(config).await;
        expect_error(
            t.get("/v1/agent/kv/k").await,
            StatusCode::SERVICE_UNAVAILABLE,
            "random failure",
        )
        .await;

        let settings: Value = t.get("/v1/agent/upstream").await.json().await.unwrap();
        assert_eq!(settings["fail_rate"], 1.0);
        assert_eq!(settings["fail"], false);

        let changed = t
            .put_no_body("/v1/agent/upstream?fail_rate=0&latency=1ms")
            .await;
        assert_eq!(changed.status(), StatusCode::OK);
        let settings: Value = changed.json().await.unwrap();
        assert_eq!(settings["fail_rate"], 0.0);
        assert_eq!(settings["latency"], "1ms");
        assert_eq!(
            t.get("/v1/agent/kv/k").await.status(),
            StatusCode::NOT_FOUND
        );

        for (query, needle) in [
            ("fail=maybe", "invalid fail"),
            ("fail_rate=2", "invalid fail_rate"),
            ("fail_rate=x", "invalid fail_rate"),
            ("latency=5", "invalid latency"),
            ("latency=2h", "at most 1m"),
        ] {
            let response = t.put_no_body(&format!("/v1/agent/upstream?{query}")).await;
            expect_error(response, StatusCode::BAD_REQUEST, needle).await;
        }
        t.shutdown().await;
    })
    .await;
}
