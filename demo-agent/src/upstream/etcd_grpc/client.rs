//! The gRPC client under the etcd upstream: one HTTP/2 connection (a tonic [`Channel`]) to the
//! member in use, fail-over to the next member, per-call timeouts, TLS, and authentication.
//!
//! Every unary call and the watch stream of the upstream travel on the connection to the
//! *current* member, so an agent holds one connection to etcd (two for a moment after a
//! fail-over, while the old one drains). A call that fails in a way another member could
//! answer (a transport error, a timeout — a frozen member —, `Unavailable`, no leader) marks
//! the member failed, which moves the client to the next one, and is retried there: reads on
//! every member in turn; writes only when the connection was never made (so a write is never
//! applied twice).
//!
//! With `--etcd-user`, the client authenticates once (`Auth/Authenticate`) and sends the token
//! as the `token` metadata of every call; an `Unauthenticated` answer (an expired token, a
//! restarted or replaced cluster) authenticates again and retries once. The password is kept
//! in memory only and never printed ([`Credentials`]'s `Debug` hides it).
//!
//! Every answer's header goes through [`ClusterIdentity::observe`], so a different cluster
//! behind the same endpoints is noticed on the first answer that comes from it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tonic::codec::ProstCodec;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use super::pb::{self, ResponseHeader};

/// A user name and password for etcd's authentication.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The etcd user.
    pub user: String,
    /// Its password (never printed).
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// PEM files for TLS: the CA that signed the members' certificates, and optionally a client
/// certificate and key (mutual TLS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s), PEM.
    pub ca: Vec<u8>,
    /// The client certificate chain and its private key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Which kind of call: a read may be retried anywhere, a write only if it was never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Read,
    Write,
}

/// Why a call to etcd failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EtcdError {
    /// The member did not answer in time.
    #[error("etcd {endpoint}: no answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    /// etcd (or the transport) answered with a gRPC status.
    #[error("etcd {endpoint}: {code:?}: {message}")]
    Status {
        endpoint: String,
        code: Code,
        message: String,
    },
    /// The revision asked for is compacted (or not reached yet).
    #[error("etcd {endpoint}: revision out of range: {message}")]
    OutOfRange { endpoint: String, message: String },
}

impl EtcdError {
    pub(crate) fn from_status(endpoint: &str, status: &Status) -> Self {
        let endpoint = endpoint.to_owned();
        let message = status.message().to_owned();
        match status.code() {
            Code::OutOfRange => Self::OutOfRange { endpoint, message },
            code => Self::Status {
                endpoint,
                code,
                message,
            },
        }
    }

    /// Whether another member (or this one later) may answer: the member failed, not the
    /// request.
    pub(crate) fn is_member_failure(&self) -> bool {
        match self {
            Self::Timeout { .. } => true,
            Self::OutOfRange { .. } => false,
            Self::Status { code, message, .. } => {
                matches!(
                    code,
                    Code::Unavailable
                        | Code::Unknown
                        | Code::Internal
                        | Code::Cancelled
                        | Code::DeadlineExceeded
                        | Code::ResourceExhausted
                        | Code::Aborted
                ) || message.contains("no leader")
            }
        }
    }

    /// Whether the request surely never reached etcd (the connection was not made).
    fn never_sent(&self) -> bool {
        match self {
            Self::Status { code, message, .. } => {
                *code == Code::Unavailable
                    && (message.contains("connect") || message.contains("Connection refused"))
            }
            _ => false,
        }
    }

    fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Self::Status {
                code: Code::Unauthenticated,
                ..
            }
        ) || matches!(self, Self::Status { message, .. } if message.contains("invalid auth token"))
    }
}

/// Responses that carry etcd's header.
pub(crate) trait HasHeader {
    fn header(&self) -> Option<&ResponseHeader>;
}

macro_rules! has_header {
    ($($t:ty),*) => {$(
        impl HasHeader for $t {
            fn header(&self) -> Option<&ResponseHeader> {
                self.header.as_ref()
            }
        }
    )*};
}
has_header!(
    pb::RangeResponse,
    pb::PutResponse,
    pb::DeleteRangeResponse,
    pb::TxnResponse,
    pb::AuthenticateResponse,
    pb::WatchResponse
);

/// The cluster the agent talks to, and how many times it changed.
#[derive(Debug, Default)]
pub(crate) struct ClusterIdentity {
    cluster_id: AtomicU64,
    epoch: AtomicU64,
    revision: AtomicU64,
}

impl ClusterIdentity {
    /// Takes in an answer's header; returns the epoch (how many times the cluster id has
    /// changed since the first answer) after it.
    pub(crate) fn observe(&self, header: Option<&ResponseHeader>) -> u64 {
        let Some(header) = header else {
            return self.epoch();
        };
        if header.cluster_id != 0 {
            let before = self.cluster_id.swap(header.cluster_id, Ordering::AcqRel);
            if before != 0 && before != header.cluster_id {
                let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
                // A new cluster's revisions start again: the highest seen restarts too.
                self.revision.store(0, Ordering::Release);
                tracing::warn!(
                    old = format_args!("{before:x}"),
                    new = format_args!("{:x}", header.cluster_id),
                    epoch,
                    "a different etcd cluster answers behind the same endpoints: every \
                     entry and watch is reset"
                );
            }
        }
        self.revision
            .fetch_max(revision(header.revision), Ordering::AcqRel);
        self.epoch()
    }

    /// How many times the cluster id changed.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The cluster id (0 before the first answer).
    pub(crate) fn cluster_id(&self) -> u64 {
        self.cluster_id.load(Ordering::Acquire)
    }

    /// The highest revision seen (of the current cluster).
    pub(crate) fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }
}

/// etcd's revisions are `int64` on the wire and never negative.
pub(crate) fn revision(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Counters of the client's traffic.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) request_errors: AtomicU64,
    pub(crate) failovers: AtomicU64,
    pub(crate) watch_streams: AtomicU64,
    pub(crate) watches: AtomicU64,
}

/// Unary calls in flight at most, per client. More wait for a turn before their timeout
/// starts, so that a burst (thousands of entries refreshing at once) is not mistaken for a
/// frozen member.
const MAX_IN_FLIGHT: usize = 256;

/// The member in use.
#[derive(Debug, Clone)]
pub(crate) struct Current {
    pub(crate) index: usize,
    pub(crate) channel: Channel,
    /// Bumped at every fail-over, so that a late failure report of an old member does not
    /// move the client again.
    pub(crate) generation: u64,
}

/// The gRPC client (see the module docs).
#[derive(Debug)]
pub(crate) struct Client {
    urls: Vec<String>,
    endpoints: Vec<Endpoint>,
    current: Mutex<Current>,
    timeout: Duration,
    credentials: Option<Credentials>,
    token: Mutex<Option<AsciiMetadataValue>>,
    in_flight: tokio::sync::Semaphore,
    pub(crate) identity: ClusterIdentity,
    pub(crate) counters: Counters,
}

/// Checks and normalises endpoint URLs: `http://host:port` or `https://host:port` (a bare
/// `host:port` is `http://`, or `https://` with TLS).
pub(crate) fn parse_endpoints(raw: &[String], tls: bool) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for entry in raw.iter().flat_map(|e| e.split(',')) {
        let entry = entry.trim().trim_end_matches('/');
        if entry.is_empty() {
            continue;
        }
        let url = if entry.contains("://") {
            entry.to_owned()
        } else if tls {
            format!("https://{entry}")
        } else {
            format!("http://{entry}")
        };
        let (scheme, rest) = url.split_once("://").unwrap_or(("", ""));
        if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains('/') {
            return Err(format!(
                "etcd endpoint {entry:?}: expected http://host:port or https://host:port"
            ));
        }
        if tls != (scheme == "https") {
            return Err(format!(
                "etcd endpoint {entry:?}: {} (TLS is {} by --etcd-cacert)",
                if tls {
                    "use https:// with TLS"
                } else {
                    "https:// needs --etcd-cacert"
                },
                if tls { "on" } else { "off" }
            ));
        }
        out.push(url);
    }
    if out.is_empty() {
        return Err("no etcd endpoint given (--etcd-endpoints)".to_owned());
    }
    Ok(out)
}

impl Client {
    /// A client for `urls` (already checked by [`parse_endpoints`]). Connects lazily.
    pub(crate) fn new(
        urls: Vec<String>,
        timeout: Duration,
        tls: Option<&TlsFiles>,
        credentials: Option<Credentials>,
    ) -> Result<Self, String> {
        let tls_config = tls.map(|files| {
            let mut config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&files.ca));
            if let Some((cert, key)) = &files.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            config
        });
        let endpoints = urls
            .iter()
            .map(|url| {
                let mut endpoint = Endpoint::from_shared(url.clone())
                    .map_err(|e| format!("etcd endpoint {url:?}: {e}"))?
                    .connect_timeout(timeout)
                    .tcp_nodelay(true);
                if let Some(config) = &tls_config {
                    endpoint = endpoint
                        .tls_config(config.clone())
                        .map_err(|e| format!("etcd endpoint {url:?}: TLS: {e}"))?;
                }
                Ok(endpoint)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let channel = endpoints[0].connect_lazy();
        Ok(Self {
            urls,
            endpoints,
            current: Mutex::new(Current {
                index: 0,
                channel,
                generation: 0,
            }),
            timeout,
            credentials,
            token: Mutex::new(None),
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
            identity: ClusterIdentity::default(),
            counters: Counters::default(),
        })
    }

    fn lock_current(&self) -> MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoints, in the order they are tried.
    pub(crate) fn endpoints(&self) -> &[String] {
        &self.urls
    }

    /// The per-call timeout.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The member in use now.
    pub(crate) fn current(&self) -> Current {
        self.lock_current().clone()
    }

    /// The URL of the member in use now.
    pub(crate) fn current_endpoint(&self) -> &str {
        &self.urls[self.lock_current().index]
    }

    /// The member of `generation` failed: move to the next one (once per generation).
    pub(crate) fn member_failed(&self, generation: u64) {
        let mut current = self.lock_current();
        if current.generation != generation {
            return;
        }
        let next = (current.index + 1) % self.endpoints.len();
        tracing::warn!(
            failed = %self.urls[current.index],
            next = %self.urls[next],
            "etcd member failed; moving to the next"
        );
        *current = Current {
            index: next,
            channel: self.endpoints[next].connect_lazy(),
            generation: generation + 1,
        };
        self.counters.failovers.fetch_add(1, Ordering::Relaxed);
    }

    /// The metadata every call carries: the auth token, when authentication is on.
    pub(crate) async fn metadata(&self, current: &Current) -> Result<MetadataMap, EtcdError> {
        let mut metadata = MetadataMap::new();
        let Some(credentials) = &self.credentials else {
            return Ok(metadata);
        };
        let cached = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let token = match cached {
            Some(token) => token,
            None => {
                let request = pb::AuthenticateRequest {
                    name: credentials.user.clone(),
                    password: credentials.password.clone(),
                };
                let answer: pb::AuthenticateResponse = self
                    .call_once(current, pb::path::AUTHENTICATE, request, MetadataMap::new())
                    .await?;
                let token = AsciiMetadataValue::try_from(answer.token.as_str()).map_err(|_| {
                    EtcdError::Status {
                        endpoint: self.urls[current.index].clone(),
                        code: Code::Unauthenticated,
                        message: "etcd answered an unusable auth token".to_owned(),
                    }
                })?;
                *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
                token
            }
        };
        metadata.insert("token", token);
        Ok(metadata)
    }

    /// Forgets the auth token (etcd refused it): the next call authenticates again.
    pub(crate) fn forget_token(&self) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// One attempt of a unary call on `current`, bounded by the timeout.
    async fn call_once<Req, Resp>(
        &self,
        current: &Current,
        path: &'static str,
        request: Req,
        metadata: MetadataMap,
    ) -> Result<Resp, EtcdError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + HasHeader + Send + 'static,
    {
        let endpoint = &self.urls[current.index];
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut grpc = tonic::client::Grpc::new(current.channel.clone());
        let mut request = tonic::Request::new(request);
        *request.metadata_mut() = metadata;
        let call = async {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("connect: {e}")))?;
            grpc.unary(
                request,
                PathAndQuery::from_static(path),
                ProstCodec::<Req, Resp>::default(),
            )
            .await
        };
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(EtcdError::from_status(endpoint, &status)),
            Err(_) => Err(EtcdError::Timeout {
                endpoint: endpoint.clone(),
                timeout: self.timeout,
            }),
        };
        match &result {
            Ok(answer) => {
                self.identity.observe(answer.header());
            }
            Err(_) => {
                self.counters.request_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// A unary call with fail-over (see the module docs). Boxed, so that the futures of its
    /// callers stay small while they wait on something else.
    pub(crate) fn unary<Req, Resp>(
        &self,
        call: Call,
        path: &'static str,
        request: Req,
    ) -> BoxFuture<'_, Result<Resp, EtcdError>>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + HasHeader + Send + 'static,
    {
        async move {
            let mut reauthenticated = false;
            let mut attempts = 0;
            // A turn among the calls in flight (the semaphore is never closed); each
            // attempt's timeout starts once it has one.
            let _turn = self.in_flight.acquire().await.ok();
            loop {
                let current = self.current();
                let result = match self.metadata(&current).await {
                    Ok(metadata) => {
                        self.call_once(&current, path, request.clone(), metadata)
                            .await
                    }
                    Err(error) => Err(error),
                };
                let error = match result {
                    Ok(answer) => return Ok(answer),
                    Err(error) => error,
                };
                if error.is_unauthenticated() && self.credentials.is_some() && !reauthenticated {
                    reauthenticated = true;
                    self.forget_token();
                    continue;
                }
                if !error.is_member_failure() {
                    return Err(error);
                }
                self.member_failed(current.generation);
                attempts += 1;
                let retry = match call {
                    Call::Read => true,
                    Call::Write => error.never_sent(),
                };
                if !retry || attempts >= self.endpoints.len() {
                    return Err(error);
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_normalised() {
        let parse = |raw: &[&str], tls| {
            parse_endpoints(
                &raw.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
                tls,
            )
        };
        assert_eq!(
            parse(&["http://a:1,b:2/"], false).unwrap(),
            ["http://a:1", "http://b:2"]
        );
        assert_eq!(parse(&["a:1"], true).unwrap(), ["https://a:1"]);
        assert!(parse(&["https://a:1"], false).is_err());
        assert!(parse(&["http://a:1"], true).is_err());
        assert!(parse(&["ftp://a:1"], false).is_err());
        assert!(parse(&["http://a:1/v3"], false).is_err());
        assert!(parse(&[""], false).is_err());
    }

    #[test]
    fn a_new_cluster_id_is_a_new_epoch() {
        let identity = ClusterIdentity::default();
        let header = |cluster_id, revision| ResponseHeader {
            cluster_id,
            member_id: 1,
            revision,
        };
        assert_eq!(identity.observe(Some(&header(7, 10))), 0);
        assert_eq!(identity.observe(Some(&header(7, 12))), 0);
        assert_eq!(identity.revision(), 12);
        assert_eq!(identity.observe(Some(&header(9, 2))), 1);
        assert_eq!((identity.cluster_id(), identity.revision()), (9, 2));
        assert_eq!(identity.observe(None), 1);
    }

    #[test]
    fn credentials_hide_the_password() {
        let credentials = Credentials {
            user: "root".to_owned(),
            password: "s3cret".to_owned(),
        };
        assert!(!format!("{credentials:?}").contains("s3cret"));
    }
}
