//! Runs the real `demo-agent` binary: `--help`, a bad flag, port discovery from the
//! `listening on ADDR` line, a request, and a clean exit on SIGTERM with a long-poll and a watch open.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::sse::SseReader;
use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_demo-agent");

#[tokio::test]
async fn help_lists_the_flags() {
    let output = Command::new(BIN).arg("--help").output().await.unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--listen",
        "--upstream-latency",
        "--upstream-fail-rate",
        "--kv-cache",
        "--query-timeout",
        "--stats-refresh",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
}

#[tokio::test]
async fn a_bad_flag_is_refused() {
    let output = Command::new(BIN)
        .args(["--upstream-fail-rate", "3"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8(output.stderr).unwrap();
    assert!(text.contains("not in [0, 1]"), "{text}");
}

#[tokio::test]
async fn serves_and_exits_cleanly_on_sigterm() {
    common::bounded(async {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = stdout.next_line().await.unwrap().expect("a first line");
        let addr = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_owned();
        // The quick start follows, with working curl lines for this address.
        let quick_start = stdout.next_line().await.unwrap().unwrap();
        assert!(quick_start.contains("quick start"), "{quick_start}");
        let url = format!("http://{addr}");

        let client = reqwest::Client::new();
        let put = client
            .put(format!("{url}/v1/agent/kv/greeting"))
            .body("hello")
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::OK);
        let put_json: serde_json::Value = put.json().await.unwrap();
        let get = client
            .get(format!("{url}/v1/agent/kv/greeting?cached"))
            .send()
            .await
            .unwrap();
        assert_eq!(get.status(), StatusCode::OK);
        let body: serde_json::Value = get.json().await.unwrap();
        assert_eq!(body["value"], "hello");

        // A long-poll that would wait 5 minutes is open while the signal arrives.
        let index = put_index(&put_json);
        let poll = {
            let client = client.clone();
            let url = format!("{url}/v1/agent/kv/greeting?cached&index={index}&wait=5m");
            tokio::spawn(async move { client.get(url).send().await })
        };
        wait_for_blocking_miss(&client, &url).await;
        // And a watch stream.
        let watch = client
            .get(format!("{url}/v1/watch?key=greeting"))
            .send()
            .await
            .unwrap();
        let mut events = SseReader::new(watch);
        assert_eq!(events.next().await.unwrap().data["value"], "hello");

        let pid = child.id().expect("running").to_string();
        let kill = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(kill.success());
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("exits within 20s after SIGTERM")
            .unwrap();
        assert!(status.success(), "exit status {status}");
        let answered = poll.await.unwrap().expect("the long-poll was answered");
        assert_eq!(answered.status(), StatusCode::OK);
        assert!(events.next().await.is_none(), "the watch stream ended");
    })
    .await;
}

fn put_index(body: &serde_json::Value) -> u64 {
    body["index"].as_u64().expect("a write index")
}

/// Waits until the agent counts a blocking miss (the long-poll is open).
async fn wait_for_blocking_miss(client: &reqwest::Client, url: &str) {
    let sample = "demo_agent_cache_misses_total{type=\"kv\",kind=\"blocking\"} ";
    common::eventually("the long-poll to be open", || async {
        let text = client
            .get(format!("{url}/v1/agent/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let open = text
            .lines()
            .find_map(|line| line.strip_prefix(sample))
            .is_some_and(|v| v.trim() != "0");
        open.then_some(())
    })
    .await;
}
