//! A real Rust Consul client against the agent: Roblox's `rs-consul` (crates.io), called the
//! way its users call it, on the embedded upstream. Covered: `create_or_update_key` with flags
//! and the index it reads from `X-Consul-Index`; `read_key` of one key (value, flags, create and
//! modify index, the response's index) and of a missing key (the crate's not-found: a 404 in
//! `UnexpectedResponseCode`); a recursive listing, with and without a separator; `delete_key`;
//! compare-and-set puts that win and lose; the blocking `create_or_update_key_sync` (ureq); and
//! blocking reads (`index` + `wait`) of a key and of a prefix woken by a write from another
//! client, and one that ends at its wait.
//!
//! rs-consul always sends `recurse=<bool>` on reads and deletes, and Consul takes `recurse`
//! by its presence: `read_key` lists every key under the name and `delete_key` deletes the
//! tree. The agent does what Consul does, and the tests assert it. rs-consul offers no `?keys`
//! call (see `consul_clients.rs` for clients that do). Only the embedded upstream and the
//! default cache mode: rs-consul never asks for `?cached`, so the mode is not on its path.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestAgent, bounded};
use rs_consul::{
    Config, Consul, ConsulError, CreateOrUpdateKeyRequest, DeleteKeyRequest, ReadKeyRequest,
    ReadKeyResponse, ResponseMeta,
};

/// An rs-consul client for the agent `t`, configured as its README shows.
fn client(t: &TestAgent) -> Consul {
    Consul::new(Config {
        address: t.url.clone(),
        token: None,
        ..Default::default()
    })
}

/// `create_or_update_key` of a UTF-8 `value` with `flags` and an optional `cas`: whether it was
/// written, and the index the crate read from `X-Consul-Index`.
async fn put(consul: &Consul, key: &str, value: &str, flags: u64, cas: Option<i64>) -> (bool, u64) {
    let request = CreateOrUpdateKeyRequest {
        key,
        flags,
        check_and_set: cas,
        ..Default::default()
    };
    consul
        .create_or_update_key(request, value.as_bytes().to_vec())
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"))
}

/// `read_key` of `key` (rs-consul's single-key read; Consul lists the keys it prefixes).
async fn read(
    consul: &Consul,
    key: &str,
) -> Result<ResponseMeta<Vec<ReadKeyResponse>>, ConsulError> {
    consul
        .read_key(ReadKeyRequest {
            key,
            ..Default::default()
        })
        .await
}

/// Asserts that `result` is rs-consul's not-found: `UnexpectedResponseCode(404, _)`.
fn assert_not_found<T: std::fmt::Debug>(result: Result<T, ConsulError>, what: &str) {
    match result {
        Err(ConsulError::UnexpectedResponseCode(status, _)) => {
            assert_eq!(status.as_u16(), 404, "{what}: status");
        }
        other => panic!("{what}: expected a 404, got {other:?}"),
    }
}

/// The `(key, value)` pairs of a read, in its order.
fn pairs(entries: &[ReadKeyResponse]) -> Vec<(&str, Option<&str>)> {
    entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_deref()))
        .collect()
}

#[tokio::test]
async fn put_then_get_one_key_with_flags_and_indexes() {
    bounded(async {
        let t = common::start_default().await;
        let consul = client(&t);

        let (written, created_at) = put(&consul, "rs/app/config", "hello", 42, None).await;
        assert!(written);
        assert!(created_at > 0, "X-Consul-Index on the write");

        let read_back = read(&consul, "rs/app/config").await.unwrap();
        assert_eq!(read_back.index, created_at, "X-Consul-Index of the read");
        let [entry] = read_back.response.as_slice() else {
            panic!("one entry: {:?}", read_back.response);
        };
        assert_eq!(entry.key, "rs/app/config");
        assert_eq!(entry.value.as_deref(), Some("hello"));
        assert_eq!(entry.flags, 42);
        assert_eq!(entry.create_index, created_at as i64);
        assert_eq!(entry.modify_index, created_at as i64);
        assert_eq!(entry.lock_index, 0);
        assert_eq!(entry.session, None);

        // An update keeps CreateIndex, moves ModifyIndex, and replaces the flags (0 here: the
        // crate leaves `flags=` out, as Consul does a write without flags).
        let (_, updated_at) = put(&consul, "rs/app/config", "hello again", 0, None).await;
        assert!(updated_at > created_at);
        let read_back = read(&consul, "rs/app/config").await.unwrap();
        let entry = &read_back.response[0];
        assert_eq!(entry.value.as_deref(), Some("hello again"));
        assert_eq!(entry.flags, 0);
        assert_eq!(entry.create_index, created_at as i64);
        assert_eq!(entry.modify_index, updated_at as i64);
        assert_eq!(read_back.index, updated_at);

        // An empty value reads back as Consul's `"Value": null`.
        put(&consul, "rs/empty", "", 7, None).await;
        let read_back = read(&consul, "rs/empty").await.unwrap();
        assert_eq!(pairs(&read_back.response), [("rs/empty", None)]);
        assert_eq!(read_back.response[0].flags, 7);

        // Unicode crosses both ways.
        put(&consul, "rs/unicode", "grüße, 世界", 0, None).await;
        let read_back = read(&consul, "rs/unicode").await.unwrap();
        assert_eq!(read_back.response[0].value.as_deref(), Some("grüße, 世界"));

        // rs-consul sends `recurse=false`, which Consul reads as `recurse`: a key that prefixes
        // another lists both (sorted), as against Consul.
        put(&consul, "rs/app/config-extra", "x", 0, None).await;
        let read_back = read(&consul, "rs/app/config").await.unwrap();
        assert_eq!(
            pairs(&read_back.response),
            [
                ("rs/app/config", Some("hello again")),
                ("rs/app/config-extra", Some("x")),
            ]
        );
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_missing_key_is_the_crates_not_found() {
    bounded(async {
        let t = common::start_default().await;
        let consul = client(&t);
        assert_not_found(read(&consul, "rs/nothing").await, "never written");
        put(&consul, "rs/gone", "v", 0, None).await;
        assert!(read(&consul, "rs/gone").await.is_ok());
        assert!(
            consul
                .delete_key(DeleteKeyRequest {
                    key: "rs/gone",
                    ..Default::default()
                })
                .await
                .unwrap()
        );
        assert_not_found(read(&consul, "rs/gone").await, "deleted");
        // An empty prefix is a 404 too (Consul's empty list).
        let listing = consul
            .read_key(ReadKeyRequest {
                key: "rs/none/",
                recurse: true,
                ..Default::default()
            })
            .await;
        assert_not_found(listing, "an empty prefix");
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn recursive_listing_and_delete() {
    bounded(async {
        let t = common::start_default().await;
        let consul = client(&t);
        put(&consul, "rs/r/1", "one", 1, None).await;
        put(&consul, "rs/r/2", "two", 2, None).await;
        let (_, last) = put(&consul, "rs/r/sub/3", "three", 3, None).await;
        put(&consul, "rs/other", "not listed", 0, None).await;

        let listing = consul
            .read_key(ReadKeyRequest {
                key: "rs/r/",
                recurse: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            pairs(&listing.response),
            [
                ("rs/r/1", Some("one")),
                ("rs/r/2", Some("two")),
                ("rs/r/sub/3", Some("three")),
            ]
        );
        let flags: Vec<u64> = listing.response.iter().map(|e| e.flags).collect();
        assert_eq!(flags, [1, 2, 3]);
        assert!(
            listing.index >= last,
            "the listing's index covers its last write"
        );

        // The crate's `separator` goes out without `?keys`, where Consul ignores it: the
        // same listing.
        let with_separator = consul
            .read_key(ReadKeyRequest {
                key: "rs/r/",
                recurse: true,
                separator: "/",
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(with_separator.response, listing.response);

        // delete_key sends `recurse=false`, which Consul reads as `recurse`: the key and every
        // key it prefixes go.
        put(&consul, "rs/d/a", "a", 0, None).await;
        put(&consul, "rs/d/ab", "ab", 0, None).await;
        put(&consul, "rs/d/b", "b", 0, None).await;
        let deleted = consul
            .delete_key(DeleteKeyRequest {
                key: "rs/d/a",
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(deleted);
        assert_not_found(read(&consul, "rs/d/a").await, "rs/d/a after delete_key");
        assert_eq!(
            pairs(&read(&consul, "rs/d/b").await.unwrap().response),
            [("rs/d/b", Some("b"))]
        );

        // A recursive delete of the prefix.
        let deleted = consul
            .delete_key(DeleteKeyRequest {
                key: "rs/r/",
                recurse: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(deleted);
        let listing = consul
            .read_key(ReadKeyRequest {
                key: "rs/r/",
                recurse: true,
                ..Default::default()
            })
            .await;
        assert_not_found(listing, "the deleted prefix");
        assert!(read(&consul, "rs/other").await.is_ok());
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn compare_and_set() {
    bounded(async {
        let t = common::start_default().await;
        let consul = client(&t);

        // cas=0: create only if absent.
        let (created, created_at) = put(&consul, "rs/cas", "first", 0, Some(0)).await;
        assert!(created);
        let (again, _) = put(&consul, "rs/cas", "second", 0, Some(0)).await;
        assert!(!again, "cas=0 on an existing key");

        // A stale index loses and leaves the value alone.
        let (stale, _) = put(&consul, "rs/cas", "stale", 0, Some(created_at as i64 + 100)).await;
        assert!(!stale, "cas with a wrong index");
        let entry = read(&consul, "rs/cas").await.unwrap().response.remove(0);
        assert_eq!(entry.value.as_deref(), Some("first"));
        assert_eq!(entry.modify_index, created_at as i64);

        // The current ModifyIndex wins, with flags.
        let (won, won_at) = put(&consul, "rs/cas", "won", 5, Some(entry.modify_index)).await;
        assert!(won);
        let entry = read(&consul, "rs/cas").await.unwrap().response.remove(0);
        assert_eq!(entry.value.as_deref(), Some("won"));
        assert_eq!(entry.flags, 5);
        assert_eq!(entry.modify_index, won_at as i64);
        // The index it replaced no longer does.
        let (late, _) = put(&consul, "rs/cas", "late", 0, Some(created_at as i64)).await;
        assert!(!late);

        // The crate's compare-and-set delete sends `recurse=false&cas=N`, which Consul refuses
        // as conflicting flags (400); so does the agent, and the key stays.
        let refused = consul
            .delete_key(DeleteKeyRequest {
                key: "rs/cas",
                check_and_set: won_at as u32,
                ..Default::default()
            })
            .await;
        match refused {
            Err(ConsulError::UnexpectedResponseCode(status, _)) => assert_eq!(status.as_u16(), 400),
            other => panic!("expected a 400 for recurse with cas, got {other:?}"),
        }
        let entry = read(&consul, "rs/cas").await.unwrap().response.remove(0);
        assert_eq!(entry.value.as_deref(), Some("won"));
        t.shutdown().await;
    })
    .await;
}

/// `create_or_update_key_sync` (the crate's blocking put, on ureq) from a blocking thread.
#[tokio::test]
async fn the_blocking_put() {
    bounded(async {
        let t = common::start_default().await;
        let consul = Arc::new(client(&t));
        let sync_put = |key: &'static str, value: &'static str, flags: u64, cas: Option<i64>| {
            let consul = Arc::clone(&consul);
            tokio::task::spawn_blocking(move || {
                let request = CreateOrUpdateKeyRequest {
                    key,
                    flags,
                    check_and_set: cas,
                    ..Default::default()
                };
                consul.create_or_update_key_sync(request, value.as_bytes().to_vec())
            })
        };
        assert!(
            sync_put("rs/sync", "from ureq", 9, None)
                .await
                .unwrap()
                .unwrap()
        );
        let entry = read(&consul, "rs/sync").await.unwrap().response.remove(0);
        assert_eq!(entry.value.as_deref(), Some("from ureq"));
        assert_eq!(entry.flags, 9);
        // A lost compare-and-set is `false`, not an error.
        let lost = sync_put("rs/sync", "no", 0, Some(0))
            .await
            .unwrap()
            .unwrap();
        assert!(!lost);
        t.shutdown().await;
    })
    .await;
}

/// Waits until the upstream holds `n` blocking reads open (the event a write must follow).
async fn blocking_reads_open(t: &TestAgent, n: f64) {
    t.wait_metric("demo_agent_upstream_blocking_queries", n)
        .await;
}

#[tokio::test]
async fn blocking_reads_wake_on_another_clients_write() {
    bounded(async {
        let t = common::start_default().await;
        let reader = Arc::new(client(&t));
        let writer = client(&t);
        let (_, first) = put(&writer, "rs/w/key", "v1", 0, None).await;
        put(&writer, "rs/w/list/a", "a", 0, None).await;

        let at = read(&reader, "rs/w/key").await.unwrap().index;
        assert_eq!(at, first);
        let key_read = {
            let reader = Arc::clone(&reader);
            tokio::spawn(async move {
                let started = Instant::now();
                let read = reader
                    .read_key(ReadKeyRequest {
                        key: "rs/w/key",
                        index: Some(at),
                        wait: Duration::from_secs(30),
                        ..Default::default()
                    })
                    .await;
                (read, started.elapsed())
            })
        };
        let list_at = reader
            .read_key(ReadKeyRequest {
                key: "rs/w/list/",
                recurse: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .index;
        let list_read = {
            let reader = Arc::clone(&reader);
            tokio::spawn(async move {
                reader
                    .read_key(ReadKeyRequest {
                        key: "rs/w/list/",
                        recurse: true,
                        index: Some(list_at),
                        wait: Duration::from_secs(30),
                        ..Default::default()
                    })
                    .await
            })
        };
        blocking_reads_open(&t, 2.0).await;

        let (_, second) = put(&writer, "rs/w/key", "v2", 0, None).await;
        let (read, took) = key_read.await.unwrap();
        let read = read.unwrap();
        assert!(
            took < Duration::from_secs(25),
            "woken by the write, not its wait"
        );
        assert_eq!(read.index, second);
        assert_eq!(pairs(&read.response), [("rs/w/key", Some("v2"))]);
        assert_eq!(read.response[0].modify_index, second as i64);

        // The listing does not move for a key outside it; a new key under it wakes it.
        let (_, third) = put(&writer, "rs/w/list/b", "b", 0, None).await;
        let listing = list_read.await.unwrap().unwrap();
        assert!(listing.index >= third);
        assert_eq!(
            pairs(&listing.response),
            [("rs/w/list/a", Some("a")), ("rs/w/list/b", Some("b"))]
        );
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_blocking_read_with_nothing_new_answers_at_its_wait() {
    bounded(async {
        let t = common::start_default().await;
        let consul = client(&t);
        let (_, at) = put(&consul, "rs/quiet", "same", 0, None).await;
        let started = Instant::now();
        let read = consul
            .read_key(ReadKeyRequest {
                key: "rs/quiet",
                index: Some(at),
                wait: Duration::from_secs(1),
                ..Default::default()
            })
            .await
            .unwrap();
        let took = started.elapsed();
        // Consul answers at the wait (plus up to wait/16 of jitter) with the same index.
        assert!(
            took >= Duration::from_millis(900),
            "answered after {took:?}"
        );
        assert!(took < Duration::from_secs(20), "answered after {took:?}");
        assert_eq!(read.index, at);
        assert_eq!(pairs(&read.response), [("rs/quiet", Some("same"))]);
        t.shutdown().await;
    })
    .await;
}
