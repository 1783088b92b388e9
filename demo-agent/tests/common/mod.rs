//! Helpers for the end-to-end tests: start an in-process agent on 127.0.0.1:0, talk HTTP to
//! it with reqwest, read its metrics, and wait for conditions with a deadline (never a bare
//! sleep).

#![allow(dead_code, unreachable_pub)]

pub mod sse;

use std::future::Future;
use std::time::{Duration, Instant};

use demo_agent::{Agent, Config, KvCacheMode, RunningAgent};
use reqwest::{Body, Client, Response, StatusCode};
use serde_json::Value;

/// The bound on every test's body.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a test body with a time bound.
pub async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .expect("test exceeded its time bound");
}

/// A running agent and a client for it.
pub struct TestAgent {
    pub agent: RunningAgent,
    pub url: String,
    pub client: Client,
}

/// An agent with `config`.
pub async fn start(config: Config) -> TestAgent {
    let agent = Agent::start(config).await.expect("agent starts");
    let url = agent.url();
    let client = Client::builder()
        .timeout(Duration::from_secs(45))
        .build()
        .unwrap();
    TestAgent { agent, url, client }
}

/// An agent with the test defaults (background-refresh KV caching).
pub async fn start_default() -> TestAgent {
    start(Config::for_tests()).await
}

/// The test defaults with the KV cache in `mode`.
pub fn config_with_mode(mode: KvCacheMode) -> Config {
    let mut config = Config::for_tests();
    config.kv_cache = mode;
    config
}

/// An agent whose KV cache is in `mode`.
pub async fn start_with_mode(mode: KvCacheMode) -> TestAgent {
    start(config_with_mode(mode)).await
}

/// An agent whose KV cache is in simple mode (Cache-Control decides freshness).
pub async fn start_simple() -> TestAgent {
    start_with_mode(KvCacheMode::Simple).await
}

impl TestAgent {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// A GET with a `Cache-Control` request header.
    pub async fn get_cache_control(&self, path: &str, cache_control: &str) -> Response {
        self.client
            .get(self.url(path))
            .header("Cache-Control", cache_control)
            .send()
            .await
            .unwrap()
    }

    /// A PUT of `body` to `path`, answered as it comes (see [`TestAgent::put`] for a checked
    /// KV write).
    pub async fn put_body(&self, path: &str, body: impl Into<Body>) -> Response {
        self.client
            .put(self.url(path))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// A PUT without a body (the settings endpoint takes its input from the query).
    pub async fn put_no_body(&self, path: &str) -> Response {
        self.client.put(self.url(path)).send().await.unwrap()
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.client.delete(self.url(path)).send().await.unwrap()
    }

    /// Writes `value` to `key` through the agent, expects 200, and returns the write's index.
    pub async fn put(&self, key: &str, value: &str) -> u64 {
        let response = self
            .put_body(&format!("/v1/agent/kv/{key}"), value.to_owned())
            .await;
        assert_eq!(response.status(), StatusCode::OK, "PUT {key}");
        let body: Value = response.json().await.unwrap();
        body["index"].as_u64().expect("write index")
    }

    pub async fn set_fail(&self, fail: bool) {
        let response = self
            .put_no_body(&format!("/v1/agent/upstream?fail={fail}"))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }

    pub async fn metrics(&self) -> String {
        self.get("/v1/agent/metrics").await.text().await.unwrap()
    }

    /// The value of one sample, e.g. `demo_agent_cache_hits_total{type="kv"}`; 0 if absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, sample)
    }

    /// Waits until `sample` reaches at least `at_least`.
    pub async fn wait_metric(&self, sample: &str, at_least: f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let value = self.metric(sample).await;
            if value >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{sample} stayed at {value}, expected >= {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn shutdown(self) {
        tokio::time::timeout(Duration::from_secs(20), self.agent.shutdown())
            .await
            .expect("shutdown within 20s")
            .expect("clean shutdown");
    }
}

pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// A header as a string ("" if absent).
pub fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The `X-Index` header as a number.
pub fn x_index(response: &Response) -> u64 {
    header(response, "x-index").parse().expect("X-Index header")
}

/// Asserts an error response: `status`, a JSON body with an `"error"` string containing
/// `needle`.
pub async fn expect_error(response: Response, status: StatusCode, needle: &str) -> Value {
    assert_eq!(response.status(), status, "status of {}", response.url());
    assert!(
        header(&response, "content-type").starts_with("application/json"),
        "JSON error body"
    );
    let body: Value = response.json().await.unwrap();
    let message = body["error"].as_str().expect("an \"error\" string");
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    body
}

/// Polls `probe` until it returns `Some`, for at most 20 s.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
