//! The JSON shapes of etcd's v3 gateway (`/v3/...`, verified on etcd 3.4.23), and the
//! conventions of its JSON mapping:
//!
//! - every int64 is a JSON string (`"revision":"12"`); numbers are accepted too;
//! - keys and values are base64 (standard alphabet, padded);
//! - fields holding their default value are left out: a missing key's range answers only
//!   `header`, a PUT event has no `type`, a failed transaction has no `succeeded`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

/// Encodes bytes as the gateway expects them.
pub(crate) fn b64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// The `range_end` that selects every key starting with `prefix`: the prefix with its last
/// byte incremented, after dropping trailing `0xff` bytes (etcd's `GetPrefixRangeEnd`). A
/// prefix of only `0xff` bytes, or the empty prefix, has no upper bound: `"\0"` means "to the
/// end of the keyspace".
pub(crate) fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            *end.last_mut().expect("not empty") = last + 1;
            return end;
        }
        end.pop();
    }
    vec![0]
}

// ===== requests =====

/// `POST /v3/kv/range`.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct RangeRequest {
    pub(crate) key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) range_end: Option<String>,
    /// Read the store as it was at this revision (fails once compacted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) revision: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) count_only: bool,
}

impl RangeRequest {
    /// One key (`range_end` none) or every key under a prefix.
    pub(crate) fn new(key: &[u8], range_end: Option<&[u8]>) -> Self {
        Self {
            key: b64(key),
            range_end: range_end.map(b64),
            ..Self::default()
        }
    }
}

/// `POST /v3/kv/put`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PutRequest {
    pub(crate) key: String,
    pub(crate) value: String,
}

/// `POST /v3/kv/deleterange`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeleteRangeRequest {
    pub(crate) key: String,
    /// Every key in `[key, range_end)` (a prefix's range end); none: only `key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) range_end: Option<String>,
}

/// `POST /v3/kv/txn`: if every compare holds, run `success`, else `failure`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TxnRequest {
    pub(crate) compare: Vec<Compare>,
    pub(crate) success: Vec<RequestOp>,
    pub(crate) failure: Vec<RequestOp>,
}

/// A transaction's condition on one key (`result` defaults to EQUAL).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Compare {
    pub(crate) key: String,
    /// `"CREATE"` (compare `create_revision`) or `"MOD"` (compare `mod_revision`).
    pub(crate) target: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) create_revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) mod_revision: Option<String>,
}

/// One operation of a transaction branch.
#[derive(Debug, Clone, Serialize)]
pub(crate) enum RequestOp {
    #[serde(rename = "request_range")]
    Range(RangeRequest),
    #[serde(rename = "request_put")]
    Put(PutRequest),
    #[serde(rename = "request_delete_range")]
    DeleteRange(DeleteRangeRequest),
}

/// `POST /v3/watch` body: `{"create_request": {...}}`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WatchRequest {
    pub(crate) create_request: WatchCreateRequest,
}

/// A watch of one key or a key range from `start_revision` (inclusive).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WatchCreateRequest {
    pub(crate) key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) range_end: Option<String>,
    pub(crate) start_revision: String,
}

// ===== responses =====

/// The header every answer carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct ResponseHeader {
    #[serde(default, deserialize_with = "int64")]
    pub(crate) cluster_id: u64,
    #[serde(default, deserialize_with = "int64")]
    pub(crate) member_id: u64,
    /// The store's revision when the answer was made.
    #[serde(default, deserialize_with = "int64")]
    pub(crate) revision: u64,
}

/// A key as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct KeyValue {
    #[serde(default, deserialize_with = "bytes")]
    pub(crate) key: Vec<u8>,
    #[serde(default, deserialize_with = "int64")]
    pub(crate) create_revision: u64,
    /// The revision of the key's last write (for a DELETE event: of the delete).
    #[serde(default, deserialize_with = "int64")]
    pub(crate) mod_revision: u64,
    #[serde(default, deserialize_with = "bytes")]
    pub(crate) value: Vec<u8>,
}

/// `range`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct RangeResponse {
    #[serde(default)]
    pub(crate) header: ResponseHeader,
    #[serde(default)]
    pub(crate) kvs: Vec<KeyValue>,
    #[serde(default, deserialize_with = "int64")]
    pub(crate) count: u64,
}

/// `put`'s answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct PutResponse {
    #[serde(default)]
    pub(crate) header: ResponseHeader,
}

/// `deleterange`'s answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct DeleteRangeResponse {
    #[serde(default)]
    pub(crate) header: ResponseHeader,
    #[serde(default, deserialize_with = "int64")]
    pub(crate) deleted: u64,
}

/// `txn`'s answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct TxnResponse {
    #[serde(default)]
    pub(crate) header: ResponseHeader,
    #[serde(default)]
    pub(crate) succeeded: bool,
    #[serde(default)]
    pub(crate) responses: Vec<ResponseOp>,
}

/// One operation's answer inside a transaction.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ResponseOp {
    #[serde(default)]
    pub(crate) response_range: Option<RangeResponse>,
}

/// One message of a watch stream: a `result`, or an `error` that ends the stream.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct WatchMessage {
    #[serde(default)]
    pub(crate) result: Option<WatchResponse>,
    #[serde(default)]
    pub(crate) error: Option<serde_json::Value>,
}

/// A watch stream's result: created, canceled (with `compact_revision` when the start
/// revision was compacted), or a batch of events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct WatchResponse {
    #[serde(default)]
    pub(crate) header: ResponseHeader,
    #[serde(default)]
    pub(crate) created: bool,
    #[serde(default)]
    pub(crate) canceled: bool,
    #[serde(default, deserialize_with = "int64")]
    pub(crate) compact_revision: u64,
    #[serde(default)]
    pub(crate) cancel_reason: String,
    #[serde(default)]
    pub(crate) events: Vec<Event>,
}

/// A change of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct Event {
    /// `PUT` (left out, the default) or `DELETE`.
    #[serde(rename = "type", default)]
    pub(crate) kind: EventKind,
    #[serde(default)]
    pub(crate) kv: KeyValue,
}

/// What an event did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(crate) enum EventKind {
    #[default]
    #[serde(rename = "PUT")]
    Put,
    #[serde(rename = "DELETE")]
    Delete,
}

/// The body of a failed unary call: `{"error": "...", "code": 11, "message": "..."}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct GatewayError {
    #[serde(default)]
    pub(crate) error: String,
    #[serde(default)]
    pub(crate) message: String,
    /// The gRPC status code (11 = OutOfRange: compacted or future revision; 14 = Unavailable).
    #[serde(default)]
    pub(crate) code: i32,
}

// ===== field decoders =====

/// An int64 sent as a JSON string (or, leniently, a number). Negative values, which etcd never
/// sends for revisions and counts, are refused.
fn int64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Number(u64),
        Text(String),
    }
    match Int::deserialize(deserializer)? {
        Int::Number(n) => Ok(n),
        Int::Text(text) => text
            .parse()
            .map_err(|_| de::Error::custom(format!("{text:?} is not an unsigned int64"))),
    }
}

/// Bytes sent as base64.
fn bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(deserializer)?;
    BASE64
        .decode(text.as_bytes())
        .map_err(|e| de::Error::custom(format!("invalid base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_ends() {
        for (prefix, end) in [
            (&b"app/"[..], &b"app0"[..]),
            (b"a", b"b"),
            (b"a\xff", b"b"),
            (b"a\xfe", b"a\xff"),
            (b"\xff\xff", b"\0"),
            (b"", b"\0"),
        ] {
            assert_eq!(prefix_range_end(prefix), end, "{prefix:?}");
        }
    }

    #[test]
    fn decodes_the_gateway_shapes() {
        // Verbatim answers of etcd 3.4.23.
        let present: RangeResponse = serde_json::from_str(
            r#"{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"2","raft_term":"2"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}"#,
        )
        .unwrap();
        assert_eq!(present.header.revision, 2);
        assert_eq!(present.kvs[0].key, b"foo");
        assert_eq!(present.kvs[0].value, b"bar");
        assert_eq!(present.kvs[0].mod_revision, 2);
        let missing: RangeResponse = serde_json::from_str(
            r#"{"header":{"cluster_id":"1","member_id":"2","revision":"7","raft_term":"2"}}"#,
        )
        .unwrap();
        assert_eq!((missing.header.revision, missing.kvs.len()), (7, 0));

        let events: WatchMessage = serde_json::from_str(
            r#"{"result":{"header":{"revision":"4"},"events":[{"kv":{"key":"Zm9v","create_revision":"4","mod_revision":"4","version":"1","value":"YmFyMg=="}},{"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"5"}}]}}"#,
        )
        .unwrap();
        let result = events.result.unwrap();
        assert_eq!(result.events[0].kind, EventKind::Put);
        assert_eq!(result.events[0].kv.value, b"bar2");
        assert_eq!(result.events[1].kind, EventKind::Delete);
        assert_eq!(result.events[1].kv.mod_revision, 5);
        assert!(result.events[1].kv.value.is_empty());

        let compacted: WatchMessage = serde_json::from_str(
            r#"{"result":{"header":{"cluster_id":"1","member_id":"2","raft_term":"2"},"canceled":true,"compact_revision":"3"}}"#,
        )
        .unwrap();
        let result = compacted.result.unwrap();
        assert!(result.canceled && !result.created);
        assert_eq!(result.compact_revision, 3);

        let error: GatewayError = serde_json::from_str(
            r#"{"error":"etcdserver: mvcc: required revision has been compacted","message":"etcdserver: mvcc: required revision has been compacted","code":11}"#,
        )
        .unwrap();
        assert_eq!(error.code, 11);

        let failed_txn: TxnResponse = serde_json::from_str(
            r#"{"header":{"revision":"4"},"responses":[{"response_range":{"header":{"revision":"4"},"kvs":[{"key":"Zm9v","mod_revision":"4","value":"eA=="}],"count":"1"}}]}"#,
        )
        .unwrap();
        assert!(!failed_txn.succeeded);
        let range = failed_txn.responses[0].response_range.as_ref().unwrap();
        assert_eq!(range.kvs[0].mod_revision, 4);

        assert!(serde_json::from_str::<ResponseHeader>(r#"{"revision":"-1"}"#).is_err());
        assert!(serde_json::from_str::<KeyValue>(r#"{"key":"not base64!"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<ResponseHeader>(r#"{"revision":9}"#)
                .unwrap()
                .revision,
            9
        );
    }

    #[test]
    fn encodes_requests_as_the_gateway_expects() {
        let txn = TxnRequest {
            compare: vec![Compare {
                key: b64(b"foo"),
                target: "MOD",
                create_revision: None,
                mod_revision: Some("4".to_owned()),
            }],
            success: vec![RequestOp::Put(PutRequest {
                key: b64(b"foo"),
                value: b64(b"x"),
            })],
            failure: vec![RequestOp::Range(RangeRequest::new(b"foo", None))],
        };
        assert_eq!(
            serde_json::to_string(&txn).unwrap(),
            r#"{"compare":[{"key":"Zm9v","target":"MOD","mod_revision":"4"}],"success":[{"request_put":{"key":"Zm9v","value":"eA=="}}],"failure":[{"request_range":{"key":"Zm9v"}}]}"#
        );
        let watch = WatchRequest {
            create_request: WatchCreateRequest {
                key: b64(b"app/"),
                range_end: Some(b64(&prefix_range_end(b"app/"))),
                start_revision: "12".to_owned(),
            },
        };
        assert_eq!(
            serde_json::to_string(&watch).unwrap(),
            r#"{"create_request":{"key":"YXBwLw==","range_end":"YXBwMA==","start_revision":"12"}}"#
        );
    }
}
