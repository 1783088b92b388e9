//! Real Consul clients against the agent, on both upstreams: py-consul (PyPI `py-consul`)
//! runs `tests/clients/py_consul_test.py` the way its users call it (get, put with flags, cas,
//! delete, recurse, keys with a separator, raw, a blocking get woken by another client, an
//! index that goes backwards); the npm `consul` client runs `tests/clients/npm_consul_test.js`
//! (the same calls and its `watch`); on etcd, values also cross over to and from `etcdctl`.
//!
//! py-consul is found through `DEMO_AGENT_CLIENT_PYTHON` (a python with py-consul; `.ci/run`
//! makes a venv at `target/client-venv` and sets it), else `target/client-venv/bin/python`;
//! the npm client through `DEMO_AGENT_CLIENT_NODE_PATH` (a `node_modules` holding `consul`;
//! `.ci/run` installs it in `target/client-npm`), else `target/client-npm/node_modules`, with
//! `node` on `PATH`. Without them the tests print `SKIP` and pass, unless
//! `DEMO_AGENT_REQUIRE_CLIENTS` is set (CI), where a missing client fails them.

mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{TestAgent, bounded};
use demo_agent::KvCacheMode;
use etcd::EtcdCluster;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// The python with py-consul, if any: `$DEMO_AGENT_CLIENT_PYTHON`, else the venv `.ci/run`
/// makes (`target/client-venv`), if it can import `consul`.
fn client_python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidate = std::env::var_os("DEMO_AGENT_CLIENT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/client-venv/bin/python"));
    let works = std::process::Command::new(&candidate)
        .args(["-c", "import consul"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    works.then_some(candidate)
}

/// The `node_modules` holding the npm `consul` client, if `node` can load it from there:
/// `$DEMO_AGENT_CLIENT_NODE_PATH`, else the one `.ci/run` makes (`target/client-npm`).
fn client_node_path() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidate = std::env::var_os("DEMO_AGENT_CLIENT_NODE_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/client-npm/node_modules"));
    let works = std::process::Command::new("node")
        .args(["-e", "require('consul')"])
        .env("NODE_PATH", &candidate)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    works.then_some(candidate)
}

/// `found`, or a loud SKIP line naming `test` and `how` to get the client (a panic when
/// `DEMO_AGENT_REQUIRE_CLIENTS` is set).
fn required<T>(found: Option<T>, test: &str, client: &str, how: &str) -> Option<T> {
    if found.is_some() {
        return found;
    }
    if std::env::var_os("DEMO_AGENT_REQUIRE_CLIENTS").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!(
            "{test}: {client} is required (DEMO_AGENT_REQUIRE_CLIENTS is set) but missing: {how}"
        );
    }
    let line = format!("\nSKIP {test}: {client} not found; {how}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    None
}

/// Whether py-consul is available for `test` (see [`required`]).
fn py_consul(test: &str) -> Option<PathBuf> {
    let how = "create it with `python3 -m venv target/client-venv && \
               target/client-venv/bin/pip install py-consul==1.8.0` (what .ci/run does) or set \
               DEMO_AGENT_CLIENT_PYTHON=/path/to/python";
    required(client_python(), test, "a python with py-consul", how)
}

/// Whether the npm `consul` client is available for `test` (see [`required`]).
fn npm_consul(test: &str) -> Option<PathBuf> {
    let how = "install node and npm, then `npm install --prefix target/client-npm consul@2.0.1` \
               (what .ci/run does), or set DEMO_AGENT_CLIENT_NODE_PATH=/path/to/node_modules";
    required(
        client_node_path(),
        test,
        "node with the npm consul client",
        how,
    )
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// Runs the npm client's script against `t` and asserts it passed.
async fn run_npm(node_path: &Path, t: &TestAgent, upstream: &str) {
    let output = Command::new("node")
        .arg(script("npm_consul_test.js"))
        .args(["--url", &t.url, "--upstream", upstream])
        .env("NODE_PATH", node_path)
        .kill_on_drop(true)
        .output()
        .await
        .expect("start node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.trim_end().ends_with("ALL OK"),
        "npm consul script failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs the py-consul script against `t`. On etcd (`cluster` given) its `REPLACE` request
/// is answered by replacing the cluster with a fresh one (revision 1) behind the same
/// endpoint, holding `py/w = replaced`: an index reset. Returns the cluster in use at the end.
async fn run_script(
    python: &Path,
    t: &TestAgent,
    upstream: &str,
    mut cluster: Option<EtcdCluster>,
) -> Option<EtcdCluster> {
    let mut child = Command::new(python)
        .arg(script("py_consul_test.py"))
        .args(["--url", &t.url, "--upstream", upstream])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the py-consul script");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    let mut transcript = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line == "REPLACE" {
            let mut old = cluster.take().expect("an etcd cluster to replace");
            let (client_port, peer_port) = old.ports(0);
            old.kill(0);
            drop(old);
            let replacement = EtcdCluster::start_on_ports(client_port, peer_port).await;
            replacement.put("py/w", "replaced").await;
            cluster = Some(replacement);
            stdin.write_all(b"OK\n").await.unwrap();
            stdin.flush().await.unwrap();
        }
        transcript.push(line);
    }
    let status = child.wait().await.unwrap();
    let mut errors = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut errors)
        .await
        .unwrap();
    assert!(
        status.success() && transcript.last().map(String::as_str) == Some("ALL OK"),
        "py-consul script failed ({status}):\n{}\n{errors}",
        transcript.join("\n")
    );
    cluster
}

#[tokio::test]
async fn py_consul_against_the_embedded_store() {
    let Some(python) = py_consul("py_consul_against_the_embedded_store") else {
        return;
    };
    bounded(async {
        let t = common::start_default().await;
        run_script(&python, &t, "embedded", None).await;
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn py_consul_against_etcd() {
    if !etcd::available("py_consul_against_etcd") {
        return;
    }
    let Some(python) = py_consul("py_consul_against_etcd") else {
        return;
    };
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        let t = etcd::start_agent(&cluster, KvCacheMode::Refresh).await;
        let cluster = run_script(&python, &t, "etcd", Some(cluster)).await;
        t.shutdown().await;
        drop(cluster);
    })
    .await;
}

/// Values cross between the agent and `etcdctl` byte for byte; flags written through the
/// agent read back, and an `etcdctl put` over them resets them to 0.
#[tokio::test]
async fn etcd_values_cross_over_to_etcdctl() {
    if !etcd::available("etcd_values_cross_over_to_etcdctl")
        || !etcd::etcdctl_available("etcd_values_cross_over_to_etcdctl")
    {
        return;
    }
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        let t = etcd::start_agent(&cluster, KvCacheMode::Refresh).await;
        // Written with etcdctl: its own bytes, flags 0.
        cluster.etcdctl(&["put", "x/from-etcdctl", "plain text"]);
        let raw = t.get("/v1/kv/x/from-etcdctl?raw").await;
        assert_eq!(raw.status(), StatusCode::OK);
        assert_eq!(raw.text().await.unwrap(), "plain text");
        let body: Value = t.get("/v1/kv/x/from-etcdctl").await.json().await.unwrap();
        assert_eq!(body[0]["Flags"], 0);

        // Written through the agent (not UTF-8, with flags): etcdctl sees the bytes.
        let bytes = vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0xff];
        let put = t
            .put_body("/v1/kv/x/from-agent?flags=9", bytes.clone())
            .await;
        assert_eq!(put.status(), StatusCode::OK);
        let seen = cluster.etcdctl(&["get", "x/from-agent", "--print-value-only"]);
        assert_eq!(seen.strip_suffix(b"\n").unwrap_or(&seen), &bytes[..]);
        let body: Value = t.get("/v1/kv/x/from-agent").await.json().await.unwrap();
        assert_eq!(body[0]["Flags"], 9);
        // The flags' companion never shows in a listing.
        let keys: Value = t.get("/v1/kv/?keys").await.json().await.unwrap();
        assert_eq!(
            keys,
            serde_json::json!(["x/from-agent", "x/from-etcdctl"]),
            "{keys}"
        );
        // etcdctl overwrites the value: flags read 0 again.
        cluster.etcdctl(&["put", "x/from-agent", "over"]);
        common::eventually("the etcdctl write to show", || async {
            let body: Value = t.get("/v1/kv/x/from-agent").await.json().await.unwrap();
            (body[0]["Flags"] == 0).then_some(())
        })
        .await;
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn npm_consul_against_the_embedded_store() {
    let Some(node_path) = npm_consul("npm_consul_against_the_embedded_store") else {
        return;
    };
    bounded(async {
        let t = common::start_default().await;
        run_npm(&node_path, &t, "embedded").await;
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn npm_consul_against_etcd() {
    if !etcd::available("npm_consul_against_etcd") {
        return;
    }
    let Some(node_path) = npm_consul("npm_consul_against_etcd") else {
        return;
    };
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        let t = etcd::start_agent(&cluster, KvCacheMode::Refresh).await;
        run_npm(&node_path, &t, "etcd").await;
        t.shutdown().await;
        drop(cluster);
    })
    .await;
}

/// `X-Consul-Index` as a number.
fn consul_index(response: &reqwest::Response) -> u64 {
    common::header(response, "x-consul-index")
        .parse()
        .expect("X-Consul-Index")
}

/// Cached reads in Consul's shapes, one body on both upstreams: a miss then a hit, a cached
/// blocking get and a cached blocking listing woken by writes, and a write read back at once.
async fn cached_consul_reads(t: TestAgent) {
    let put = |key: &'static str, value: &'static str| {
        let t = &t;
        async move {
            let response = t.put_body(&format!("/v1/kv/{key}"), value).await;
            assert_eq!(response.status(), StatusCode::OK);
            consul_index(&response)
        }
    };
    let written = put("c/a", "1").await;
    let miss = t.get("/v1/kv/c/a?cached").await;
    assert_eq!(common::header(&miss, "x-cache"), "MISS");
    assert_eq!(consul_index(&miss), written);
    let hit = t.get("/v1/kv/c/a?cached").await;
    assert_eq!(common::header(&hit, "x-cache"), "HIT");
    let body: Value = hit.json().await.unwrap();
    assert_eq!(body[0]["ModifyIndex"], written);

    let key_read = {
        let client = t.client.clone();
        let url = t.url(&format!("/v1/kv/c/a?cached&index={written}&wait=20s"));
        tokio::spawn(async move { client.get(url).send().await.unwrap() })
    };
    let listing = t.get("/v1/kv/c/?recurse&cached").await;
    let listed_at = consul_index(&listing);
    let list_read = {
        let client = t.client.clone();
        let url = t.url(&format!("/v1/kv/c/?keys&cached&index={listed_at}&wait=20s"));
        tokio::spawn(async move { client.get(url).send().await.unwrap() })
    };
    t.wait_metric("demo_agent_upstream_blocking_queries", 2.0)
        .await;
    let second = put("c/a", "2").await;
    let response = key_read.await.unwrap();
    assert_eq!(consul_index(&response), second);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body[0]["Value"], "Mg==");
    let response = list_read.await.unwrap();
    assert!(consul_index(&response) >= second);
    let keys: Value = response.json().await.unwrap();
    assert_eq!(keys, serde_json::json!(["c/a"]));

    // Read your writes: the next cached read holds the write, whatever the refresh is doing.
    let third = put("c/b", "3").await;
    let response = t.get("/v1/kv/c/?recurse&cached").await;
    assert!(consul_index(&response) >= third);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body.as_array().unwrap().len(), 2, "{body}");
    t.shutdown().await;
}

#[tokio::test]
async fn cached_consul_reads_embedded() {
    bounded(async {
        cached_consul_reads(common::start_default().await).await;
    })
    .await;
}

#[tokio::test]
async fn cached_consul_reads_etcd() {
    if !etcd::available("cached_consul_reads_etcd") {
        return;
    }
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        cached_consul_reads(etcd::start_agent(&cluster, KvCacheMode::Refresh).await).await;
        drop(cluster);
    })
    .await;
}
