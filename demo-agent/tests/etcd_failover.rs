//! The agent on etcd members that stop answering and on a cluster replaced behind its
//! endpoint: a frozen member (SIGSTOP) is left within `--etcd-timeout` and nothing is lost
//! when it comes back; a new cluster whose revision is already above the agent's indexes
//! still resets every entry and watch (its cluster id differs).

mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/watchers.rs"]
mod watchers;

use std::time::{Duration, Instant};

use common::{TestAgent, bounded, header, x_index};
use demo_agent::KvCacheMode;
use etcd::EtcdCluster;
use reqwest::StatusCode;
use serde_json::json;
use watchers::{Watcher, wait_all};

/// A write through the agent, retried while the agent answers 503 (it is moving to another
/// member); its index.
async fn put_retrying(t: &TestAgent, key: &str, value: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = t
            .put_body(&format!("/v1/agent/kv/{key}"), value.to_owned())
            .await;
        if response.status() == StatusCode::OK {
            return x_index(&response);
        }
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "PUT {key} kept failing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn etcd_frozen_member_is_left_and_nothing_is_lost() {
    if !etcd::available("etcd_frozen_member_is_left_and_nothing_is_lost") {
        return;
    }
    bounded(async {
        let cluster = EtcdCluster::start(3).await;
        let config = etcd::etcd_config(cluster.endpoints(), KvCacheMode::Refresh);
        let timeout = config.etcd_timeout;
        let t = common::start(config).await;
        let up = t.agent.state().etcd().expect("an etcd agent").clone();
        assert_eq!(up.current_endpoint(), cluster.endpoint(0));
        t.put("z/a", "1").await;
        t.put("z/b", "1").await;
        let mut watchers = Vec::new();
        for _ in 0..3 {
            watchers.push(Watcher::open(&t, "key=z/a&key=z/b&prefix=z/").await);
        }
        wait_all(&watchers, "initial events", Duration::from_secs(10), |s| {
            s.last.len() == 3
        })
        .await;
        t.wait_metric("demo_agent_upstream_blocking_queries", 3.0)
            .await;

        // ----- the member the agent uses freezes: its sockets stay open, it says nothing -----
        cluster.freeze(0);
        let frozen = Instant::now();
        // The watch stream goes silent; its progress probe is not answered within the
        // timeout, so the agent moves to the next member (no write needed to notice).
        common::eventually("the agent leaving the frozen member", || async {
            (up.current_endpoint() != cluster.endpoint(0)).then_some(())
        })
        .await;
        let left_after = frozen.elapsed();
        eprintln!("frozen member: left after {left_after:?} (timeout {timeout:?})");
        assert!(
            left_after <= timeout + timeout / 2,
            "left the frozen member after {left_after:?}, timeout {timeout:?}"
        );
        // A write straight to another member (once the cluster has elected a new leader if
        // the frozen member led it) reaches every watcher.
        let b2 = cluster.put_via_retrying(2, "z/b", "2").await;
        let written = Instant::now();
        wait_all(&watchers, "a write during the freeze", Duration::from_secs(10), |s| {
            s.last.get("key:z/b") == Some(&(b2, json!("2")))
                && s.last.get("prefix:z/").is_some_and(|(index, _)| *index == b2)
        })
        .await;
        eprintln!(
            "frozen member: the cluster took a write {:?} after the freeze, watchers had it {:?} later",
            written - frozen,
            written.elapsed()
        );

        // Reads and writes through the agent carry on.
        let a2 = put_retrying(&t, "z/a", "2").await;
        let response = t.get("/v1/agent/kv/z/a").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(x_index(&response), a2);
        wait_all(&watchers, "a write through the agent", Duration::from_secs(10), |s| {
            s.last.get("key:z/a") == Some(&(a2, json!("2")))
        })
        .await;

        // ----- it thaws: nothing lost, and a write through it reaches everyone -----
        cluster.thaw(0);
        let a3 = cluster.put_via_retrying(0, "z/a", "3").await;
        let b4 = cluster.put_via_retrying(1, "z/b", "4").await;
        wait_all(&watchers, "writes after the thaw", Duration::from_secs(10), |s| {
            s.last.get("key:z/a") == Some(&(a3, json!("3")))
                && s.last.get("key:z/b") == Some(&(b4, json!("4")))
                && s.last.get("prefix:z/").is_some_and(|(index, value)| {
                    *index == b4
                        && *value
                            == json!([{"key": "z/a", "value": "3"}, {"key": "z/b", "value": "4"}])
                })
        })
        .await;
        for w in &watchers {
            let seen = w.seen();
            assert!(seen.regressions.is_empty(), "{:?}", seen.regressions);
            assert!(seen.errors.is_empty(), "{:?}", seen.errors);
        }
        let traffic = up.traffic();
        eprintln!("frozen member: {traffic:?}");
        assert!(traffic.failovers >= 1);
        drop(watchers);
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn etcd_replaced_cluster_above_the_old_revision_still_resets() {
    if !etcd::available("etcd_replaced_cluster_above_the_old_revision_still_resets") {
        return;
    }
    bounded(async {
        let mut old = EtcdCluster::start(1).await;
        let (client_port, peer_port) = old.ports(0);
        let t = etcd::start_agent(&old, KvCacheMode::Refresh).await;
        let mut high = 0;
        for i in 0..30 {
            high = t.put("r/k", &format!("old-{i}")).await;
        }
        assert_eq!(
            t.get("/v1/agent/kv/r/k?cached").await.status(),
            StatusCode::OK
        );
        let watchers = [Watcher::open(&t, "key=r/k&key=r/absent&prefix=r/").await];
        wait_all(&watchers, "initial events", Duration::from_secs(10), |s| {
            s.last
                .get("key:r/k")
                .is_some_and(|(index, _)| *index == high)
        })
        .await;
        let old_cluster = t.agent.state().etcd().expect("an etcd agent").cluster_id();

        // A new cluster behind the same endpoint, prepared out of the agent's sight: the key
        // is written early (its index is below the agent's), then unrelated writes carry the
        // revision above it. Comparing revisions alone would call the key unchanged (its
        // index is not above the agent's) and keep the old value forever.
        old.kill(0);
        drop(old);
        let aside = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let aside_port = aside.local_addr().unwrap().port();
        drop(aside);
        let mut new = EtcdCluster::start_on_ports(aside_port, peer_port).await;
        let low = new.put("r/k", "new").await;
        assert!(low < high);
        for i in 0..high + 10 {
            new.put(&format!("filler/{i}"), "x").await;
        }
        assert!(new.revision().await > high);
        new.restart_on_client_port(0, client_port).await;
        let took = wait_all(&watchers, "the reset", Duration::from_secs(30), |s| {
            s.last.get("key:r/k") == Some(&(low, json!("new")))
                && s.last
                    .get("prefix:r/")
                    .is_some_and(|(_, value)| *value == json!([{"key": "r/k", "value": "new"}]))
        })
        .await;
        eprintln!("replaced cluster: watcher had the new cluster's value after {took:?}");
        let up = t.agent.state().etcd().expect("an etcd agent");
        assert_ne!(up.cluster_id(), old_cluster);
        let response = t.get("/v1/agent/kv/r/k?cached").await;
        assert_eq!(x_index(&response), low);
        assert_eq!(header(&response, "x-cache"), "HIT");
        // Blocking on the new cluster's indexes: the next write arrives.
        let next = new.put("r/k", "newer").await;
        let absent = new.put("r/absent", "here").await;
        wait_all(
            &watchers,
            "writes after the reset",
            Duration::from_secs(10),
            |s| {
                s.last.get("key:r/k") == Some(&(next, json!("newer")))
                    && s.last.get("key:r/absent") == Some(&(absent, json!("here")))
            },
        )
        .await;
        drop(watchers);
        t.shutdown().await;
    })
    .await;
}
