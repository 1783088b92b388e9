//! A small client for etcd's v3 JSON gateway over plain HTTP/1.1 (reqwest without TLS), with
//! fail-over between the members of a cluster.
//!
//! Fail-over: the client talks to one endpoint (the first listed, at first) until a call to it
//! fails in a way that says "this member is gone" (connection refused or reset, a timeout, a
//! 5xx answer); it then tries the next endpoint and stays there. Reads and watches are retried
//! on the next endpoint; writes only when the request was never sent (connection refused), so
//! a write that may have been applied is never applied twice. A call fails once every
//! endpoint has been tried.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::decode::JsonStream;
use super::proto::{GatewayError, WatchCreateRequest, WatchMessage, WatchRequest, WatchResponse};

/// The gRPC status code etcd answers for "compacted" and "future revision" reads.
const OUT_OF_RANGE: i32 = 11;

/// How long connecting to one endpoint may take (loopback or a LAN: a member that does not
/// accept within this is treated as down).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// TCP keep-alive on every connection, so that a watch stream to a host that vanished fails
/// instead of hanging (a killed member closes its sockets at once; a dead host does not).
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum EtcdError {
    /// The endpoint could not be reached, or the connection broke.
    #[error("etcd {endpoint}: {message}")]
    Transport {
        /// The endpoint's URL.
        endpoint: String,
        /// What happened.
        message: String,
        /// Whether the request may have reached the server (false: refused before sending).
        sent: bool,
    },
    /// The member answered with an error status.
    #[error("etcd {endpoint} answered {status}: {message}")]
    Server {
        /// The endpoint's URL.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// etcd's message.
        message: String,
    },
    /// The revision asked for is no longer (compacted) or not yet (future) in the store.
    #[error("etcd {endpoint}: {message}")]
    OutOfRange {
        /// The endpoint's URL.
        endpoint: String,
        /// etcd's message.
        message: String,
    },
    /// A watch's start revision has been compacted.
    #[error(
        "etcd {endpoint}: watch start revision compacted (compact revision {compact_revision})"
    )]
    WatchCompacted {
        /// The endpoint's URL.
        endpoint: String,
        /// The oldest revision still available.
        compact_revision: u64,
    },
    /// The answer did not have the expected shape.
    #[error("etcd {endpoint}: unexpected answer: {message}")]
    Protocol {
        /// The endpoint's URL.
        endpoint: String,
        /// What was wrong.
        message: String,
    },
}

impl EtcdError {
    /// Whether another member may answer a read that failed this way.
    fn retry_read(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::Protocol { .. } => true,
            Self::Server { status, .. } => *status >= 500,
            Self::OutOfRange { .. } | Self::WatchCompacted { .. } => false,
        }
    }

    /// Whether a write that failed this way certainly did not happen, so that another member
    /// may be asked.
    fn retry_write(&self) -> bool {
        matches!(self, Self::Transport { sent: false, .. })
    }
}

/// Whether a call reads (retried anywhere) or writes (retried only if never sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Read,
    Write,
}

/// Counters of the client's traffic.
#[derive(Debug, Default)]
pub(crate) struct ClientCounters {
    /// Requests sent (every attempt, on every endpoint).
    pub(crate) requests: AtomicU64,
    /// Requests that failed.
    pub(crate) request_errors: AtomicU64,
    /// Times the client moved to another endpoint.
    pub(crate) failovers: AtomicU64,
    /// Watches opened (confirmed by etcd).
    pub(crate) watches: AtomicU64,
}

/// An etcd gateway client for a list of endpoints of one cluster.
#[derive(Debug)]
pub(crate) struct Client {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// The endpoint in use.
    current: AtomicUsize,
    request_timeout: Duration,
    pub(crate) counters: ClientCounters,
}

/// Checks and normalises endpoint URLs: `http://host:port`, no path, no TLS.
pub(crate) fn parse_endpoints(endpoints: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for raw in endpoints.iter().flat_map(|e| e.split(',')) {
        let endpoint = raw.trim().trim_end_matches('/');
        if endpoint.is_empty() {
            continue;
        }
        let Some(authority) = endpoint.strip_prefix("http://") else {
            return Err(if endpoint.starts_with("https://") {
                format!(
                    "etcd endpoint {endpoint:?}: https is not supported (the agent speaks plain \
                     HTTP to etcd's gateway; put it on a trusted network or loopback)"
                )
            } else {
                format!("etcd endpoint {endpoint:?} must look like http://host:port")
            });
        };
        if authority.is_empty() || authority.contains('/') {
            return Err(format!(
                "etcd endpoint {endpoint:?} must look like http://host:port (no path)"
            ));
        }
        if !out.iter().any(|e| e == endpoint) {
            out.push(endpoint.to_owned());
        }
    }
    if out.is_empty() {
        return Err("no etcd endpoint given (--etcd-endpoints http://127.0.0.1:2379)".to_owned());
    }
    Ok(out)
}

impl Client {
    /// A client for `endpoints` (already checked by [`parse_endpoints`]); every unary call
    /// gives up on an endpoint after `request_timeout`.
    pub(crate) fn new(endpoints: Vec<String>, request_timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(TCP_KEEPALIVE)
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            http,
            endpoints,
            current: AtomicUsize::new(0),
            request_timeout,
            counters: ClientCounters::default(),
        })
    }

    /// The endpoints, in order.
    pub(crate) fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The endpoint in use.
    pub(crate) fn current_endpoint(&self) -> &str {
        &self.endpoints[self.current.load(Ordering::Relaxed) % self.endpoints.len()]
    }

    /// The order to try endpoints in: the one in use first.
    fn order(&self) -> impl Iterator<Item = usize> + use<> {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        (0..n).map(move |step| (first + step) % n)
    }

    /// Moves to endpoint `to` (after `from` failed), unless another call already moved on.
    fn fail_over(&self, from: usize, to: usize) {
        if from != to
            && self
                .current
                .compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.counters.failovers.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                from = %self.endpoints[from],
                to = %self.endpoints[to],
                "etcd: failing over to another endpoint"
            );
        }
    }

    /// Reports that a stream from endpoint `index` broke, so the next call tries the next one.
    pub(crate) fn endpoint_failed(&self, index: usize) {
        self.fail_over(index, (index + 1) % self.endpoints.len());
    }

    /// `POST path` with a JSON body; the answer decoded as `R`. Tries each endpoint in turn
    /// as [`Call`] allows.
    pub(crate) async fn unary<B, R>(&self, call: Call, path: &str, body: &B) -> Result<R, EtcdError>
    where
        B: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let mut tried = None;
        let mut last_error = None;
        for index in self.order() {
            if let Some(previous) = tried {
                self.fail_over(previous, index);
            }
            tried = Some(index);
            match self.unary_at(index, path, body).await {
                Ok(answer) => return Ok(answer),
                Err(error) => {
                    let retry = match call {
                        Call::Read => error.retry_read(),
                        Call::Write => error.retry_write(),
                    };
                    if !retry {
                        return Err(error);
                    }
                    tracing::debug!(%error, "etcd call failed; trying the next endpoint");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("at least one endpoint"))
    }

    async fn unary_at<B, R>(&self, index: usize, path: &str, body: &B) -> Result<R, EtcdError>
    where
        B: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let endpoint = &self.endpoints[index];
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let result = async {
            let response = self
                .http
                .post(format!("{endpoint}{path}"))
                .json(body)
                .timeout(self.request_timeout)
                .send()
                .await
                .map_err(|e| transport(endpoint, &e))?;
            let status = response.status();
            let bytes = response
                .bytes()
                .await
                .map_err(|e| transport(endpoint, &e))?;
            if !status.is_success() {
                return Err(server_error(endpoint, status, &bytes));
            }
            serde_json::from_slice(&bytes).map_err(|e| EtcdError::Protocol {
                endpoint: endpoint.clone(),
                message: e.to_string(),
            })
        }
        .await;
        if result.is_err() {
            self.counters.request_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Opens a watch and waits for etcd to confirm it (`created`), trying each endpoint in
    /// turn. Dropping the returned stream closes the connection, which cancels the watch.
    pub(crate) async fn watch(&self, create: WatchCreateRequest) -> Result<WatchStream, EtcdError> {
        let body = WatchRequest {
            create_request: create,
        };
        let mut tried = None;
        let mut last_error = None;
        for index in self.order() {
            if let Some(previous) = tried {
                self.fail_over(previous, index);
            }
            tried = Some(index);
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match self.watch_at(index, &body).await {
                Ok(stream) => {
                    self.counters.watches.fetch_add(1, Ordering::Relaxed);
                    return Ok(stream);
                }
                Err(error) => {
                    self.counters.request_errors.fetch_add(1, Ordering::Relaxed);
                    if !error.retry_read() {
                        return Err(error);
                    }
                    tracing::debug!(%error, "etcd watch failed; trying the next endpoint");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("at least one endpoint"))
    }

    async fn watch_at(&self, index: usize, body: &WatchRequest) -> Result<WatchStream, EtcdError> {
        let endpoint = &self.endpoints[index];
        let opened = async {
            let response = self
                .http
                .post(format!("{endpoint}/v3/watch"))
                // gRPC metadata through the gateway: `hasleader` is what clientv3's
                // `WithRequireLeader` sends. A member cut off from the leader then cancels the
                // watch instead of keeping it silently open.
                .header("grpc-metadata-hasleader", "true")
                .json(body)
                .send()
                .await
                .map_err(|e| transport(endpoint, &e))?;
            let status = response.status();
            if !status.is_success() {
                let bytes = response.bytes().await.unwrap_or_default();
                return Err(server_error(endpoint, status, &bytes));
            }
            let mut stream = WatchStream {
                body: Box::pin(response.bytes_stream()),
                decoder: JsonStream::default(),
                endpoint: endpoint.clone(),
                endpoint_index: index,
            };
            let first = stream.next().await?;
            if first.created && !first.canceled {
                Ok(stream)
            } else {
                Err(stream.canceled(first))
            }
        };
        // Only opening is bounded by the request timeout: the stream itself lives as long as
        // its reader wants.
        match tokio::time::timeout(self.request_timeout, opened).await {
            Ok(result) => result,
            Err(_) => Err(EtcdError::Transport {
                endpoint: endpoint.clone(),
                message: format!("no watch confirmation within {:?}", self.request_timeout),
                sent: true,
            }),
        }
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// An open watch: the results etcd streams for it.
pub(crate) struct WatchStream {
    body: ByteStream,
    decoder: JsonStream,
    endpoint: String,
    endpoint_index: usize,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl WatchStream {
    /// The index of the endpoint the stream comes from.
    pub(crate) fn endpoint_index(&self) -> usize {
        self.endpoint_index
    }

    /// The next result.
    ///
    /// # Errors
    ///
    /// A broken or ended stream is a [`EtcdError::Transport`]; an `{"error": ...}` message a
    /// [`EtcdError::Server`]; undecodable bytes a [`EtcdError::Protocol`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: bytes read before a cancellation stay buffered for the next call.
    pub(crate) async fn next(&mut self) -> Result<WatchResponse, EtcdError> {
        loop {
            let message = self
                .decoder
                .next::<WatchMessage>()
                .map_err(|e| EtcdError::Protocol {
                    endpoint: self.endpoint.clone(),
                    message: e.to_string(),
                })?;
            if let Some(message) = message {
                if let Some(error) = message.error {
                    return Err(EtcdError::Server {
                        endpoint: self.endpoint.clone(),
                        status: 503,
                        message: error_message(&error),
                    });
                }
                if let Some(result) = message.result {
                    return Ok(result);
                }
                continue;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.decoder.push(&chunk),
                Some(Err(error)) => return Err(transport(&self.endpoint, &error)),
                None => {
                    return Err(EtcdError::Transport {
                        endpoint: self.endpoint.clone(),
                        message: "the watch stream ended".to_owned(),
                        sent: true,
                    });
                }
            }
        }
    }

    /// The error for a canceled watch.
    pub(crate) fn canceled(&self, result: WatchResponse) -> EtcdError {
        if result.compact_revision > 0 {
            EtcdError::WatchCompacted {
                endpoint: self.endpoint.clone(),
                compact_revision: result.compact_revision,
            }
        } else {
            EtcdError::Server {
                endpoint: self.endpoint.clone(),
                status: 503,
                message: if result.cancel_reason.is_empty() {
                    "the watch was canceled".to_owned()
                } else {
                    format!("the watch was canceled: {}", result.cancel_reason)
                },
            }
        }
    }
}

fn transport(endpoint: &str, error: &reqwest::Error) -> EtcdError {
    let mut message = if error.is_connect() {
        "cannot connect".to_owned()
    } else if error.is_timeout() {
        "timed out".to_owned()
    } else {
        "connection failed".to_owned()
    };
    // reqwest's own message is generic; the cause (e.g. "Connection refused") is the useful part.
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    EtcdError::Transport {
        endpoint: endpoint.to_owned(),
        message,
        sent: !error.is_connect(),
    }
}

fn server_error(endpoint: &str, status: StatusCode, body: &[u8]) -> EtcdError {
    let parsed: Option<GatewayError> = serde_json::from_slice(body).ok();
    let message = match &parsed {
        Some(e) if !e.message.is_empty() => e.message.clone(),
        Some(e) if !e.error.is_empty() => e.error.clone(),
        _ => String::from_utf8_lossy(body)
            .trim()
            .chars()
            .take(200)
            .collect(),
    };
    if parsed.is_some_and(|e| e.code == OUT_OF_RANGE) {
        return EtcdError::OutOfRange {
            endpoint: endpoint.to_owned(),
            message,
        };
    }
    EtcdError::Server {
        endpoint: endpoint.to_owned(),
        status: status.as_u16(),
        message,
    }
}

/// The message of a stream's `{"error": ...}` (an object with `message`, or a string).
fn error_message(error: &serde_json::Value) -> String {
    error
        .get("message")
        .and_then(|m| m.as_str())
        .or_else(|| error.as_str())
        .map_or_else(|| error.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_normalised() {
        let parse = |list: &[&str]| {
            parse_endpoints(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        };
        assert_eq!(
            parse(&[
                "http://127.0.0.1:2379/",
                "http://127.0.0.1:22379,http://127.0.0.1:32379"
            ])
            .unwrap(),
            [
                "http://127.0.0.1:2379",
                "http://127.0.0.1:22379",
                "http://127.0.0.1:32379"
            ]
        );
        assert_eq!(
            parse(&["http://a:1", " http://a:1 ", ""]).unwrap(),
            ["http://a:1"]
        );
        for (bad, needle) in [
            (&["https://a:1"][..], "https is not supported"),
            (&["a:1"], "http://host:port"),
            (&["http://a:1/v3"], "no path"),
            (&["http://"], "http://host:port"),
            (&[""], "no etcd endpoint"),
            (&[], "no etcd endpoint"),
        ] {
            let error = parse(bad).unwrap_err();
            assert!(error.contains(needle), "{bad:?}: {error}");
        }
    }

    #[test]
    fn errors_say_whether_to_retry_elsewhere() {
        let refused = EtcdError::Transport {
            endpoint: "e".into(),
            message: "cannot connect".into(),
            sent: false,
        };
        let reset = EtcdError::Transport {
            endpoint: "e".into(),
            message: "connection failed".into(),
            sent: true,
        };
        let unavailable = server_error(
            "e",
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error":"etcdserver: no leader","code":14,"message":"etcdserver: no leader"}"#,
        );
        let compacted = server_error(
            "e",
            StatusCode::BAD_REQUEST,
            br#"{"error":"etcdserver: mvcc: required revision has been compacted","message":"etcdserver: mvcc: required revision has been compacted","code":11}"#,
        );
        assert!(matches!(compacted, EtcdError::OutOfRange { .. }));
        assert!(compacted.to_string().contains("compacted"));
        assert!(refused.retry_read() && refused.retry_write());
        assert!(reset.retry_read() && !reset.retry_write());
        assert!(unavailable.retry_read() && !unavailable.retry_write());
        assert!(unavailable.to_string().contains("no leader"));
        assert!(!compacted.retry_read() && !compacted.retry_write());
        let garbage = server_error("e", StatusCode::BAD_GATEWAY, b"<html>oops</html>");
        assert!(garbage.to_string().contains("<html>oops</html>"));
    }

    #[test]
    fn stream_errors_name_their_message() {
        let error: serde_json::Value = serde_json::from_str(
            r#"{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}"#,
        )
        .unwrap();
        assert_eq!(error_message(&error), "etcdserver: no leader");
        assert_eq!(error_message(&serde_json::json!("plain")), "plain");
    }
}
