//! Background `/v1/watch` listeners for the etcd tests: each reads its server-sent-events
//! stream in a task and records, per correlation id, the last index and value, every index
//! that went down, and any event carrying an error. The task ends (is aborted) on drop.
//!
//! Include it with `#[path = "common/watchers.rs"] mod watchers;` next to `mod common;`.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;

use crate::common::TestAgent;

/// What one watcher has seen so far.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Per correlation id: the last event's index and value.
    pub last: BTreeMap<String, (u64, Value)>,
    /// Events received.
    pub events: u64,
    /// `"id: a -> b"` for every event whose index was below the previous one of its id.
    pub regressions: Vec<String>,
    /// Events that carried an error.
    pub errors: Vec<String>,
    /// Whether the stream ended.
    pub ended: bool,
}

/// A watch stream read in the background.
pub struct Watcher {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    /// Opens `/v1/watch?{query}` on `t` (asserting a 200) and starts reading it.
    pub async fn open(t: &TestAgent, query: &str) -> Self {
        let response = t.get(&format!("/v1/watch?{query}")).await;
        assert_eq!(response.status(), StatusCode::OK, "watch {query}");
        Self::from_response(response)
    }

    /// Starts reading an event stream.
    pub fn from_response(response: reqwest::Response) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut body = response.bytes_stream();
                let mut buffer = Vec::<u8>::new();
                while let Some(Ok(chunk)) = body.next().await {
                    buffer.extend_from_slice(&chunk);
                    while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                        let frame: Vec<u8> = buffer.drain(..end + 2).collect();
                        let frame = String::from_utf8(frame).expect("UTF-8 events");
                        let data: String = frame
                            .lines()
                            .filter_map(|line| line.strip_prefix("data:"))
                            .map(str::trim_start)
                            .collect();
                        if data.is_empty() {
                            continue; // a keep-alive comment
                        }
                        let event: Value = serde_json::from_str(&data).expect("JSON event");
                        record(&seen, &event);
                    }
                }
                seen.lock().unwrap().ended = true;
            })
        };
        Self { seen, task }
    }

    /// A copy of what was seen so far.
    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    /// The last value seen for `id`.
    pub fn value(&self, id: &str) -> Option<Value> {
        self.seen
            .lock()
            .unwrap()
            .last
            .get(id)
            .map(|(_, v)| v.clone())
    }

    /// The last index seen for `id`.
    pub fn index(&self, id: &str) -> Option<u64> {
        self.seen.lock().unwrap().last.get(id).map(|(i, _)| *i)
    }
}

fn record(seen: &Mutex<Seen>, event: &Value) {
    let id = event["correlation_id"].as_str().unwrap_or("?").to_owned();
    let index = event["index"].as_u64().unwrap_or(0);
    let mut seen = seen.lock().unwrap();
    seen.events += 1;
    if !event["error"].is_null() {
        seen.errors.push(format!("{id}: {}", event["error"]));
        // An error event repeats the last good value; it does not move the index.
        return;
    }
    if let Some((previous, _)) = seen.last.get(&id) {
        if index < *previous {
            let line = format!("{id}: {previous} -> {index}");
            seen.regressions.push(line);
        }
    }
    seen.last.insert(id, (index, event["value"].clone()));
}

/// Waits until `done` holds for every watcher, polling every 20 ms; panics after `within`
/// naming `what` and the first watcher still behind. Returns how long it took.
pub async fn wait_all(
    watchers: &[Watcher],
    what: &str,
    within: Duration,
    done: impl Fn(&Seen) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let behind = watchers.iter().position(|w| !done(&w.seen()));
        match behind {
            None => return started.elapsed(),
            Some(i) => assert!(
                started.elapsed() < within,
                "{what}: watcher {i} still behind after {within:?}: {:?}",
                watchers[i].seen()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
