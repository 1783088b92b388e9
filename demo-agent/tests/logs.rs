//! The real binary's log lines on stderr: text without colour codes when stderr is not a
//! terminal, config printed with `Display`, one JSON object per line with `--log-format json`,
//! one line when the upstream is lost and one when it is back (with the outage's duration),
//! and every 5xx answer logged at warn with its method, path and cause.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_demo-agent");

/// A running binary, its URL, and every stderr line so far.
struct Running {
    _child: Child,
    url: String,
    lines: Arc<Mutex<Vec<String>>>,
}

async fn spawn(extra: &[&str]) -> Running {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--quiet"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = stdout.next_line().await.unwrap().expect("a first line");
    let addr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    Running {
        _child: child,
        url: format!("http://{addr}"),
        lines,
    }
}

impl Running {
    /// Waits for a stderr line matching `pred` and returns it.
    async fn line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        common::eventually(what, || async {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .find(|line| pred(line))
                .cloned()
        })
        .await
    }

    fn all(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// Cuts the upstream, makes one failing request, waits until the outage is announced, and
/// ends it.
async fn outage(agent: &Running) {
    let client = reqwest::Client::new();
    let cut = client
        .put(format!("{}/v1/agent/upstream?fail=true", agent.url))
        .send()
        .await
        .unwrap();
    assert_eq!(cut.status(), StatusCode::OK);
    let failed = client
        .get(format!("{}/v1/agent/kv/some/key", agent.url))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    agent
        .line("the upstream-lost line", |l| l.contains("upstream lost"))
        .await;
    let back = client
        .put(format!("{}/v1/agent/upstream?fail=false", agent.url))
        .send()
        .await
        .unwrap();
    assert_eq!(back.status(), StatusCode::OK);
}

#[tokio::test]
async fn text_logs_without_colour_display_config_outage_and_5xx_lines() {
    common::bounded(async {
        let agent = spawn(&[]).await;
        let listening = agent
            .line("the listening line", |l| l.contains("agent listening"))
            .await;
        for needle in ["upstream=embedded", "kv_cache=refresh", "faults=latency=0s"] {
            assert!(listening.contains(needle), "{needle} missing: {listening}");
        }
        outage(&agent).await;
        let back = agent
            .line("the upstream-back line", |l| l.contains("upstream is back"))
            .await;
        assert!(back.contains("outage="), "{back}");
        let failed = agent
            .line("the 5xx line", |l| l.contains("request failed"))
            .await;
        for needle in [
            "WARN",
            "method=GET",
            "path=/v1/agent/kv/some/key",
            "status=503",
            "injected outage",
        ] {
            assert!(failed.contains(needle), "{needle} missing: {failed}");
        }
        let all = agent.all();
        assert!(!all.contains('\u{1b}'), "colour codes on a pipe:\n{all}");
        for debug_print in ["Embedded", "FaultSettings", "Refresh"] {
            assert!(!all.contains(debug_print), "{debug_print} printed:\n{all}");
        }
    })
    .await;
}

#[tokio::test]
async fn json_logs_one_object_per_line() {
    common::bounded(async {
        let agent = spawn(&["--log-format", "json"]).await;
        outage(&agent).await;
        agent
            .line("the upstream-back line", |l| l.contains("upstream is back"))
            .await;
        let failed = agent
            .line("the 5xx line", |l| l.contains("request failed"))
            .await;
        let failed: Value = serde_json::from_str(&failed).unwrap();
        assert_eq!(failed["level"], "WARN", "{failed}");
        assert_eq!(failed["method"], "GET", "{failed}");
        assert_eq!(failed["path"], "/v1/agent/kv/some/key", "{failed}");
        assert_eq!(failed["status"], 503, "{failed}");
        assert!(
            failed["cause"]
                .as_str()
                .unwrap()
                .contains("injected outage"),
            "{failed}"
        );
        // Give the last lines a moment to arrive, then check every line.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for line in agent.lines.lock().unwrap().iter() {
            let object: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                object["timestamp"].is_string() && object["message"].is_string(),
                "{line}"
            );
        }
    })
    .await;
}
