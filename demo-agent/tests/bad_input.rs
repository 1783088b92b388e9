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
            ("/v1/kv/p/?recurse&index=x", "invalid index"),
            ("/v1/kv/k?stale&consistent", "conflicting"),
            ("/v1/kv/k?cached&consistent", "?cached with ?consistent"),
            ("/v1/kv/", "missing key name"),
            ("/v1/kv/k?dc=dc2", "dc2"),
            ("/v1/kv/k?ns=team", "namespace"),
            ("/v1/kv/k?partition=p1", "partition"),
            ("/v1/kv/.demo-agent/flags/k", "reserved"),
        ] {
            expect_error(t.get(path).await, StatusCode::BAD_REQUEST, needle).await;
        }
        let bad_flags = t.put_body("/v1/kv/k?flags=-1", "v").await;
        expect_error(bad_flags, StatusCode::BAD_REQUEST, "invalid flags").await;
        let both = t.delete("/v1/kv/k?recurse&cas=1").await;
        expect_error(both, StatusCode::BAD_REQUEST, "?cas cannot be combined").await;
        let no_key = t.put_body("/v1/kv/", "v").await;
        expect_error(no_key, StatusCode::BAD_REQUEST, "missing key name").await;
        let bad_cas = t.put_body("/v1/kv/k?cas=first", "v").await;
        expect_error(bad_cas, StatusCode::BAD_REQUEST, "invalid cas").await;
        let bad_cas = t.delete("/v1/kv/k?cas=99999999999999999999").await;
        expect_error(bad_cas, StatusCode::BAD_REQUEST, "overflows").await;
        t.shutdown().await;
    })
    .await;
}

/// Every parameter that would change what a request does, and that the agent does not
/// implement, is a 400 naming it: never a 200 that ignored it.
#[tokio::test]
async fn unsupported_parameters_are_refused_by_name() {
    bounded(async {
        let t = start_default().await;
        t.put_body("/v1/kv/k", "v").await;
        let gets = [
            "acquire=abc",
            "release=abc",
            "filter=Key%20==%20k",
            "near=_agent",
            "node-meta=a:b",
            "peer=other",
            "bogus=1",
            "prefix=k",
            "flags=1",
            "cas=1",
        ];
        for query in gets {
            let name = query.split('=').next().unwrap();
            let response = t.get(&format!("/v1/kv/k?{query}")).await;
            expect_error(response, StatusCode::BAD_REQUEST, &format!("\"{name}\"")).await;
        }
        for query in [
            "acquire=abc",
            "release=abc",
            "recurse",
            "raw",
            "keys",
            "index=1",
            "bogus",
        ] {
            let name = query.split('=').next().unwrap();
            let response = t.put_body(&format!("/v1/kv/k?{query}"), "w").await;
            expect_error(response, StatusCode::BAD_REQUEST, &format!("\"{name}\"")).await;
        }
        for query in ["flags=1", "acquire=x", "keys", "bogus"] {
            let name = query.split('=').next().unwrap();
            let response = t.delete(&format!("/v1/kv/k?{query}")).await;
            expect_error(response, StatusCode::BAD_REQUEST, &format!("\"{name}\"")).await;
        }
        // Nothing above changed the key.
        let raw = t.get("/v1/kv/k?raw").await;
        assert_eq!(raw.text().await.unwrap(), "v");
        // Sessions are refused as a whole.
        for path in [
            "/v1/session/create",
            "/v1/session/list",
            "/v1/session/info/x",
        ] {
            let response = t.client.put(t.url(path)).send().await.unwrap();
            expect_error(response, StatusCode::BAD_REQUEST, "no sessions").await;
        }
        // So are transactions: a 400, not a 404 that python-consul2 reads as "done, nothing
        // found".
        let txn = t
            .client
            .put(t.url("/v1/txn"))
            .body(r#"[{"KV":{"Verb":"set","Key":"t","Value":"dg=="}}]"#)
            .send()
            .await
            .unwrap();
        expect_error(txn, StatusCode::BAD_REQUEST, "no transactions").await;
        assert_eq!(t.get("/v1/kv/t").await.status(), StatusCode::NOT_FOUND);
        // What a Consul client sends for this agent is accepted.
        let response = t
            .client
            .get(t.url("/v1/kv/k?dc=dc1&ns=default&partition=default&token=x&pretty"))
            .header("X-Consul-Token", "anything")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
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
            t.get(&format!("/v1/kv/{long_key}?recurse")).await,
            StatusCode::BAD_REQUEST,
            "prefix is 513 bytes",
        )
        .await;
        // A key of exactly 512 bytes is fine.
        let response = t
            .put_body(&format!("/v1/kv/{}", "k".repeat(512)), "v")
            .await;
        assert_eq!(response.status(), StatusCode::OK);

        let big = vec![b'x'; 512 * 1024 + 1];
        let response = t.put_body("/v1/kv/big", big).await;
        expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "512 KiB").await;
        // Exactly the limit is accepted.
        let response = t.put_body("/v1/kv/big", vec![b'x'; 512 * 1024]).await;
        assert_eq!(response.status(), StatusCode::OK);

        // Any bytes are a value on /v1/kv; the agent's own text shape still wants UTF-8.
        let response = t.put_body("/v1/kv/binary", vec![0xff, 0xfe, 0x00]).await;
        assert_eq!(response.status(), StatusCode::OK);
        let response = t
            .put_body("/v1/agent/kv/binary", vec![0xff, 0xfe, 0x00])
            .await;
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
