//! `/v1/kv` through an upstream outage (the embedded store's fault injection): blocking reads
//! hold instead of spinning and say why when they answer, and a write through the agent is
//! read back at once even while the entry's refresh chain is backing off.

mod common;

use std::time::{Duration, Instant};

use common::sse::SseReader;
use common::{TestAgent, bounded, header};
use reqwest::StatusCode;
use serde_json::Value;

fn consul_index(response: &reqwest::Response) -> u64 {
    header(response, "x-consul-index")
        .parse()
        .expect("X-Consul-Index")
}

async fn cput(t: &TestAgent, key: &str, value: &str) -> u64 {
    let response = t.put_body(&format!("/v1/kv/{key}"), value.to_owned()).await;
    assert_eq!(response.status(), StatusCode::OK, "PUT {key}");
    consul_index(&response)
}

/// What a Consul watch loop does: blocking reads one after another on the last index, for
/// `outage`; answers that carry a new index move it on. Returns the number of requests and
/// the last response's status and headers.
async fn watch_loop(
    t: &TestAgent,
    path: &str,
    cache_control: Option<&str>,
    mut index: u64,
    outage: Duration,
) -> (u32, Vec<(StatusCode, String, String, String, String)>) {
    let until = Instant::now() + outage;
    let mut requests = 0;
    let mut answers = Vec::new();
    while Instant::now() < until {
        let url = t.url(&format!("{path}&index={index}&wait=2s"));
        let mut request = t.client.get(url);
        if let Some(cc) = cache_control {
            request = request.header("Cache-Control", cc);
        }
        let response = request.send().await.unwrap();
        requests += 1;
        let status = response.status();
        if status == StatusCode::OK {
            index = index.max(consul_index(&response));
        }
        answers.push((
            status,
            header(&response, "retry-after"),
            header(&response, "x-cache"),
            header(&response, "warning"),
            header(&response, "age"),
        ));
    }
    (requests, answers)
}

/// A client loop of blocking reads (wait 2 s) during a 6 s outage makes about one request per
/// wait, not thousands: each read holds to the end of its wait, then answers 503 with
/// `Retry-After`, or, under `stale-if-error`, the last value marked stale. The same ratio
/// holds for a 30 s outage with the default waits (one request per 5 minutes).
#[tokio::test]
async fn blocking_reads_hold_through_an_outage() {
    bounded(async {
        let t = common::start_default().await;
        let index = cput(&t, "k", "v1").await;
        assert_eq!(t.get("/v1/kv/k?cached").await.status(), StatusCode::OK);
        t.set_fail(true).await;
        let outage = Duration::from_secs(6);
        let wait = Duration::from_secs(2);
        let most = u32::try_from(outage.as_secs() / wait.as_secs()).unwrap() + 2;
        for path in ["/v1/kv/k?cached", "/v1/kv/k?x=1"] {
            let path = path.replace("?x=1", "?");
            let (requests, answers) = watch_loop(&t, &path, None, index, outage).await;
            eprintln!("{path}: {requests} requests in {outage:?} of outage (wait {wait:?})");
            assert!(requests <= most, "{path}: {requests} requests: {answers:?}");
            for (status, retry_after, ..) in &answers {
                assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
                assert!(retry_after.parse::<u64>().is_ok(), "{path}: Retry-After");
            }
        }
        let (requests, answers) = watch_loop(
            &t,
            "/v1/kv/k?cached",
            Some("stale-if-error=600"),
            index,
            outage,
        )
        .await;
        assert!(requests <= most, "stale: {requests} requests: {answers:?}");
        for (status, _, cache, warning, age) in &answers {
            assert_eq!(*status, StatusCode::OK);
            assert_eq!(cache, "HIT");
            assert_eq!(warning, "110 - \"Response is Stale\"");
            assert!(age.parse::<u64>().is_ok(), "Age: {age:?}");
        }

        // A read that is holding answers as soon as the upstream is back and the key moves.
        let url = t.url(&format!("/v1/kv/k?cached&index={index}&wait=30s"));
        let client = t.client.clone();
        let started = Instant::now();
        let reader = tokio::spawn(async move { client.get(url).send().await.unwrap() });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        t.set_fail(false).await;
        let written = cput(&t, "k", "v2").await;
        let response = reader.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(consul_index(&response), written);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        t.shutdown().await;
    })
    .await;
}

/// Read your writes: a write through the agent is visible to the next cached read and to a
/// watch of the key at once, although the entry's refresh chain is in a long backoff.
#[tokio::test]
async fn a_write_is_read_back_while_the_refresh_chain_backs_off() {
    bounded(async {
        let t = common::start_default().await;
        cput(&t, "k", "v1").await;
        assert_eq!(t.get("/v1/kv/k?cached").await.status(), StatusCode::OK);
        let response = t.client.get(t.url("/v1/watch?key=k")).send().await.unwrap();
        let mut watch = SseReader::new(response);
        let first = watch.next().await.unwrap();
        assert_eq!(first.data["value"], "v1");

        // Six failures in a row: the chain now waits 8-16 s before its next attempt.
        t.set_fail(true).await;
        t.wait_metric(
            "demo_agent_cache_fetch_errors_total{type=\"kv\",fatal=\"false\"}",
            6.0,
        )
        .await;
        t.set_fail(false).await;
        let started = Instant::now();
        let written = cput(&t, "k", "v2").await;
        let response = t.get("/v1/kv/k?cached").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(consul_index(&response) >= written);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body[0]["Value"], "djI=", "{body}");
        loop {
            let event = watch.next().await.unwrap();
            if event.data["value"] == "v2" {
                assert!(event.data["index"].as_u64().unwrap() >= written);
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "read back after {:?}",
            started.elapsed()
        );

        // A delete too.
        let deleted = t.delete("/v1/kv/k").await;
        let deleted_at = consul_index(&deleted);
        let response = t.get("/v1/kv/k?cached").await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(consul_index(&response) >= deleted_at);
        t.shutdown().await;
    })
    .await;
}

/// Simple caching through an outage: a read that must revalidate serves the last value under
/// `stale-if-error`, marked stale (X-Cache: HIT, Age, Warning 110); without it, a 503 with
/// `Retry-After`.
#[tokio::test]
async fn stale_if_error_marks_the_value_stale() {
    bounded(async {
        let t = common::start_simple().await;
        let index = cput(&t, "k", "v1").await;
        assert_eq!(t.get("/v1/kv/k?cached").await.status(), StatusCode::OK);
        t.set_fail(true).await;
        let stale = t
            .get_cache_control("/v1/kv/k?cached", "max-age=0, stale-if-error=600")
            .await;
        assert_eq!(stale.status(), StatusCode::OK);
        assert_eq!(consul_index(&stale), index);
        assert_eq!(header(&stale, "x-cache"), "HIT");
        assert_eq!(header(&stale, "warning"), "110 - \"Response is Stale\"");
        assert!(header(&stale, "age").parse::<u64>().is_ok());
        let body: Value = stale.json().await.unwrap();
        assert_eq!(body[0]["Value"], "djE=");
        let strict = t.get_cache_control("/v1/kv/k?cached", "max-age=0").await;
        assert_eq!(strict.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(header(&strict, "retry-after").parse::<u64>().is_ok());
        t.set_fail(false).await;
        t.shutdown().await;
    })
    .await;
}
