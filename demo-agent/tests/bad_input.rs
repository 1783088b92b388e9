//! End-to-end tests of bad input: every case answers a 4xx with a JSON `{"error": ...}` that
//! names the problem, and a panicking handler answers 500 without taking the agent down.

mod common;

use common::{bounded, expect_error, start, start_default};
use demo_agent::Config;
use reqwest::StatusCode;

#[tokio::test]
async fn bad_query_parameters() {
    bounded(async {
        let t = start_default().await;
        for (path, needle) in [
            (
                "/v1/kv/k?index=abc",
                "invalid index \"abc\": not a non-negative integer",
            ),
            ("/v1/kv/k?index=-1", "invalid index"),
            ("/v1/kv/k?index=1.5", "invalid index"),
            (
                "/v1/kv/k?index=18446744073709551616",
                "overflows a 64-bit unsigned integer",
            ),
            ("/v1/kv/k?index=", "empty"),
            ("/v1/kv/k?index=5&wait=10", "invalid wait"),
            ("/v1/kv/k?index=5&wait=soon", "invalid wait"),
            ("/v1/kv/k?index=5&wait=-1s", "negative"),
            ("/v1/kv/k?cached=maybe", "invalid cached"),
            ("/v1/kv/?prefix=p&index=x", "invalid index"),
            ("/v1/kv/k?recurse=sometimes", "invalid recurse"),
        ] {
            expect_error(t.get(path).await, StatusCode::BAD_REQUEST, needle).await;
        }
        let bad_cas = t.put_body("/v1/kv/k?cas=first", "v").await;
        expect_error(bad_cas, StatusCode::BAD_REQUEST, "invalid cas").await;
        let bad_cas = t.delete("/v1/kv/k?cas=99999999999999999999").await;
        expect_error(bad_cas, StatusCode::BAD_REQUEST, "overflows").await;
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn bad_cache_control() {
    bounded(async {
        let t = start_default().await;
        for value in [
            "max-age",
            "max-age=abc",
            "max-age=-5",
            "stale-if-error=1.5",
            "must-revalidate=yes",
        ] {
            let response = t.get_cache_control("/v1/kv/k?cached", value).await;
            expect_error(response, StatusCode::BAD_REQUEST, "invalid Cache-Control").await;
        }
        // Unknown directives are ignored.
        let response = t
            .get_cache_control("/v1/kv/k?cached", "private, max-age=5")
            .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn oversized_keys_and_values_and_non_utf8_values() {
    bounded(async {
        let t = start_default().await;
        let long_key = "k".repeat(513);
        expect_error(
            t.get(&format!("/v1/kv/{long_key}")).await,
            StatusCode::BAD_REQUEST,
            "key is 513 bytes; the limit is 512",
        )
        .await;
        let response = t.put_body(&format!("/v1/kv/{long_key}"), "v").await;
        expect_error(response, StatusCode::BAD_REQUEST, "the limit is 512").await;
        expect_error(
            t.get(&format!("/v1/kv/?prefix={long_key}")).await,
            StatusCode::BAD_REQUEST,
            "prefix is 513 bytes",
        )
        .await;
        // A key of exactly 512 bytes is fine.
        t.put(&"k".repeat(512), "v").await;

        let big = vec![b'x'; 512 * 1024 + 1];
        let response = t.put_body("/v1/kv/big", big).await;
        expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "512 KiB").await;
        // Exactly the limit is accepted.
        let response = t.put_body("/v1/kv/big", vec![b'x'; 512 * 1024]).await;
        assert_eq!(response.status(), StatusCode::OK);

        let response = t.put_body("/v1/kv/binary", vec![0xff, 0xfe, 0x00]).await;
        expect_error(response, StatusCode::BAD_REQUEST, "not valid UTF-8").await;
        // A path that is not UTF-8 once decoded.
        expect_error(
            t.get("/v1/kv/%FF").await,
            StatusCode::BAD_REQUEST,
            "invalid key",
        )
        .await;
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    bounded(async {
        let t = start_default().await;
        expect_error(
            t.get("/v1/nothing").await,
            StatusCode::NOT_FOUND,
            "no route for /v1/nothing",
        )
        .await;
        expect_error(t.get("/").await, StatusCode::NOT_FOUND, "no route").await;
        let response = t.client.post(t.url("/v1/kv/k")).send().await.unwrap();
        expect_error(
            response,
            StatusCode::METHOD_NOT_ALLOWED,
            "method POST is not allowed",
        )
        .await;
        let response = t.delete("/v1/agent/health").await;
        expect_error(response, StatusCode::METHOD_NOT_ALLOWED, "not allowed").await;
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn bad_watch_requests() {
    bounded(async {
        let t = start_default().await;
        expect_error(
            t.get("/v1/watch").await,
            StatusCode::BAD_REQUEST,
            "nothing to watch",
        )
        .await;
        expect_error(
            t.get(&format!("/v1/watch?key={}", "k".repeat(513))).await,
            StatusCode::BAD_REQUEST,
            "the limit is 512",
        )
        .await;
        expect_error(
            t.get("/v1/watch?key=").await,
            StatusCode::BAD_REQUEST,
            "missing key",
        )
        .await;
        let many: String = (0..65).map(|i| format!("key=k{i}&")).collect();
        expect_error(
            t.get(&format!("/v1/watch?{many}")).await,
            StatusCode::BAD_REQUEST,
            "at most 64",
        )
        .await;
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_panicking_handler_answers_500_and_the_agent_keeps_serving() {
    bounded(async {
        let mut config = Config::for_tests();
        config.debug_routes = true;
        let t = start(config).await;
        for _ in 0..3 {
            expect_error(
                t.get("/v1/agent/debug/panic").await,
                StatusCode::INTERNAL_SERVER_ERROR,
                "a handler panicked",
            )
            .await;
        }
        assert_eq!(t.get("/v1/agent/health").await.status(), StatusCode::OK);
        t.put("k", "still here").await;
        t.shutdown().await;
    })
    .await;
}
