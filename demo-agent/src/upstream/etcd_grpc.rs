//! The etcd upstream: the agent's keys live in an etcd cluster, read and written through
//! etcd's v3 gRPC API; blocking reads are etcd watches, all of them multiplexed on one watch
//! stream over one HTTP/2 connection (see ARCHITECTURE.md for the choice of client).
//!
//! Modules: `pb` (the protobuf messages, declared by hand: no `protoc`), `client` (the
//! connection, fail-over, TLS, auth, cluster identity), `watch` (the shared watch stream),
//! `decide` (the blocking read's decisions, pure and unit-tested).
//!
//! # Index = etcd revision
//!
//! - a present key: its `mod_revision` (the revision of its last write);
//! - an absent key: the revision at which it was seen absent (the read's header revision, or
//!   the revision of the delete a watch reported);
//! - a prefix: the read's header revision.
//!
//! Writes answer the revision they created; a delete of an absent key changes nothing and
//! answers the current revision.
//!
//! # Data model (Consul entries on etcd)
//!
//! A key's value is stored at the key, byte for byte; non-zero flags live in the companion
//! key [`flags_key`](super::flags_key), written and deleted in the same transaction as the
//! key and read in the same transaction, applied only when the companion's `mod_revision`
//! equals the key's (see [`Upstream`]'s "Flags on etcd"). `create_index` is the key's
//! `create_revision`. [`ReadMode::Stale`] reads are serializable ranges (the member's local
//! copy); the other modes are linearizable.
//!
//! # Blocking reads
//!
//! A read with `min_index > 0` and a `wait` answers once the data changed after `min_index`,
//! else after `wait` with the unchanged data; writes to other keys never wake it:
//! 1. range the key (or prefix) now, at revision `R`;
//! 2. decide ([`decide::after_range`]): changed (a present key: `mod_revision > min_index`;
//!    an absent key or a prefix: compared with a range at revision `min_index`), answer;
//! 3. unchanged: register a watch from `R + 1` on the shared stream; its first events answer
//!    (a delete from the event, anything else by ranging again, for the flags), or the wait
//!    ends and the unchanged data answers with its old index.
//!
//! Index resets (contract: Fetch 5): compacted history answers the current data at the current
//! revision; a store whose revision is below `min_index` answers its lower index; and a
//! **different cluster** behind the endpoints (a new cluster id in any answer's header)
//! answers index 1 to every open blocking read and to the first blocking read of every key
//! afterwards, whatever the new cluster's revision, so that every entry and watch resets.
//!
//! # Failures
//!
//! The client fails over between members (a call that times out — a frozen member — moves
//! on too); the watch stream moves with it and re-creates its watches from their own start
//! revisions, so open reads survive a member's loss or freeze. The agent's fault injection
//! (`--upstream-fail-rate`, the outage switch) applies here as on the embedded store.

mod client;
mod decide;
mod pb;
mod watch;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::time::Instant;

use self::client::{Call, Client, EtcdError, revision};
pub use self::client::{Credentials, TlsFiles};
use self::decide::{Answer, Kind, Next, Step};
use self::pb::{
    Compare, CompareResult, CompareTarget, DeleteRangeRequest, KeyValue, PutRequest, RangeRequest,
    RangeResponse, RequestOp, TxnRequest, TxnResponse, compare::TargetUnion, prefix_range_end,
    request_op::Request, response_op::Response,
};
use self::watch::{Fired, WatchHub};
use super::api::{
    Entry, KeyRead, ListRead, MAX_WAIT, OpCounters, Query, RESERVED_PREFIX, ReadMode, Upstream,
    UpstreamError, UpstreamStats, bump, flags_key,
};
use super::contact::accepted;
use super::faults::Faults;

/// How often a blocking read starts over because its watch's start revision was compacted
/// (or etcd cancelled the watch) before it answers with the unchanged data.
const MAX_RESTARTS: u32 = 3;

/// The default per-call timeout.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach an etcd cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdSettings {
    /// Client URLs of the cluster's members (`http://host:port`, or `https://` with TLS),
    /// tried in order.
    pub endpoints: Vec<String>,
    /// How long one call (or a silent watch stream) may take on one member before the next
    /// member is tried.
    pub request_timeout: Duration,
    /// TLS: the CA and optional client certificate (PEM contents). `None`: plain HTTP/2.
    pub tls: Option<TlsFiles>,
    /// etcd authentication (user and password). `None`: no authentication.
    pub credentials: Option<Credentials>,
}

impl EtcdSettings {
    /// Settings for `endpoints` with the default request timeout, no TLS, no auth.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            tls: None,
            credentials: None,
        }
    }
}

impl EtcdSettings {
    /// The settings the agent's flags describe: endpoints, timeout, TLS files (read now) and
    /// credentials (the password from `--etcd-password-file`, else the
    /// `DEMO_AGENT_ETCD_PASSWORD` environment variable).
    ///
    /// # Errors
    ///
    /// A message naming a file that cannot be read, or a user without a password.
    pub fn from_config(config: &crate::Config) -> Result<Self, String> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
        };
        let tls = match &config.etcd_cacert {
            None => None,
            Some(ca) => Some(TlsFiles {
                ca: read(ca, "--etcd-cacert")?,
                identity: match (&config.etcd_cert, &config.etcd_key) {
                    (Some(cert), Some(key)) => {
                        Some((read(cert, "--etcd-cert")?, read(key, "--etcd-key")?))
                    }
                    _ => None,
                },
            }),
        };
        let credentials = match &config.etcd_user {
            None => None,
            Some(user) => {
                let password = match &config.etcd_password_file {
                    Some(path) => String::from_utf8(read(path, "--etcd-password-file")?)
                        .map_err(|_| "--etcd-password-file: not UTF-8".to_owned())?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                    None => std::env::var(PASSWORD_ENV).map_err(|_| {
                        format!(
                            "--etcd-user {user:?} needs a password: --etcd-password-file or \
                             {PASSWORD_ENV}"
                        )
                    })?,
                };
                Some(Credentials {
                    user: user.clone(),
                    password,
                })
            }
        };
        Ok(Self {
            endpoints: config.etcd_endpoints.clone(),
            request_timeout: config.etcd_timeout,
            tls,
            credentials,
        })
    }
}

/// The environment variable holding the etcd password when no password file is given.
pub(crate) const PASSWORD_ENV: &str = "DEMO_AGENT_ETCD_PASSWORD";

/// Counters of the etcd client's traffic (see [`EtcdUpstream::traffic`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdTraffic {
    /// Unary calls sent (every attempt on every member).
    pub requests: u64,
    /// Calls that failed.
    pub request_errors: u64,
    /// Times the client moved to another member.
    pub failovers: u64,
    /// Watch streams opened (one at a time carries every watch).
    pub watch_streams: u64,
    /// Watches registered (one per blocking read that waited).
    pub watches_opened: u64,
    /// Watches open now.
    pub watches_open: u64,
}

/// What is read: one key, or every key under a prefix.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    Key(&'a str),
    Prefix(&'a str),
}

impl Target<'_> {
    fn kind(&self) -> Kind {
        match self {
            Self::Key(_) => Kind::Key,
            Self::Prefix(_) => Kind::Prefix,
        }
    }

    /// The range's start and end (end empty: one key).
    fn range(&self) -> (Vec<u8>, Vec<u8>) {
        match self {
            Self::Key(key) => (key.as_bytes().to_vec(), Vec::new()),
            // The empty prefix (every key) starts at the smallest key, "\0".
            Self::Prefix("") => (vec![0], vec![0]),
            Self::Prefix(prefix) => (
                prefix.as_bytes().to_vec(),
                prefix_range_end(prefix.as_bytes()),
            ),
        }
    }

    /// The range of the flags companions of the target's keys.
    fn companion_range(&self) -> (Vec<u8>, Vec<u8>) {
        match self {
            Self::Key(key) => (flags_key(key).into_bytes(), Vec::new()),
            Self::Prefix(prefix) => {
                let start = flags_key(prefix).into_bytes();
                let end = prefix_range_end(&start);
                (start, end)
            }
        }
    }

    fn memo_key(&self) -> (bool, String) {
        match self {
            Self::Key(key) => (true, (*key).to_owned()),
            Self::Prefix(prefix) => (false, (*prefix).to_owned()),
        }
    }
}

fn range_request(range: (Vec<u8>, Vec<u8>), revision: u64, mode: ReadMode) -> RangeRequest {
    RangeRequest {
        key: range.0,
        range_end: range.1,
        revision: i64::try_from(revision).unwrap_or(i64::MAX),
        serializable: mode == ReadMode::Stale,
        ..Default::default()
    }
}

fn op(request: Request) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
}

fn is_reserved(kv: &KeyValue) -> bool {
    kv.key.starts_with(RESERVED_PREFIX.as_bytes())
}

/// A target read now: its user keys, their flags companions and the revision.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    kvs: Vec<KeyValue>,
    companions: Vec<KeyValue>,
    revision: u64,
}

impl Snapshot {
    /// The answer of this snapshot with the index its data gives.
    fn found_now(self, kind: Kind) -> Found {
        let index = decide::index_of(kind, &self.kvs, self.revision);
        self.found(index)
    }

    /// The answer of this snapshot with `index`.
    fn found(self, index: u64) -> Found {
        Found {
            answer: Answer {
                kvs: self.kvs,
                index,
            },
            companions: self.companions,
        }
    }
}

/// A read's answer with the companions its entries take their flags from.
#[derive(Debug)]
struct Found {
    answer: Answer,
    companions: Vec<KeyValue>,
}

/// The flags of `kv`: those of its companion written with it (same `mod_revision`), else 0.
fn flags_of(kv: &KeyValue, companions: &[KeyValue]) -> u64 {
    let companion_key = flags_key(&String::from_utf8_lossy(&kv.key));
    companions
        .iter()
        .find(|c| c.key == companion_key.as_bytes() && c.mod_revision == kv.mod_revision)
        .and_then(|c| std::str::from_utf8(&c.value).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

/// What a waiting blocking read keeps to answer if nothing changes. One key keeps only what
/// its entry needs (its key is the read's own, its flags resolved), not the ranged
/// `KeyValue`s with their companions (56 bytes in the read's future plus 100 on the heap, per
/// watched key); a prefix keeps its snapshot, boxed.
enum Kept {
    /// The key is absent.
    Absent,
    /// The key's value, revisions and flags.
    Key {
        value: Box<[u8]>,
        create_revision: i64,
        mod_revision: i64,
        flags: u64,
    },
    /// The snapshot of a prefix (or of a key that ranged to several keys, never expected).
    Snapshot(Box<Snapshot>),
}

impl Kept {
    fn new(target: Target<'_>, mut now: Snapshot) -> Self {
        match (target, now.kvs.len()) {
            (Target::Key(_), 0) => Self::Absent,
            (Target::Key(_), 1) => {
                let flags = flags_of(&now.kvs[0], &now.companions);
                let kv = now.kvs.swap_remove(0);
                Self::Key {
                    value: kv.value.into_boxed_slice(),
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    flags,
                }
            }
            _ => {
                now.kvs.shrink_to_fit();
                now.companions.shrink_to_fit();
                Self::Snapshot(Box::new(now))
            }
        }
    }

    /// The answer of the kept data with `index`, as [`Snapshot::found`] would have made it.
    fn found(self, target: Target<'_>, index: u64) -> Found {
        match self {
            Self::Snapshot(now) => now.found(index),
            Self::Absent => Snapshot::default().found(index),
            Self::Key {
                value,
                create_revision,
                mod_revision,
                flags,
            } => {
                let (key, _) = target.range();
                let companions = if flags == 0 {
                    Vec::new()
                } else {
                    vec![KeyValue {
                        key: target.companion_range().0,
                        value: flags.to_string().into_bytes(),
                        mod_revision,
                        ..KeyValue::default()
                    }]
                };
                let kv = KeyValue {
                    key,
                    value: value.into_vec(),
                    create_revision,
                    mod_revision,
                    ..KeyValue::default()
                };
                Found {
                    answer: Answer {
                        kvs: vec![kv],
                        index,
                    },
                    companions,
                }
            }
        }
    }
}

/// What the first step of a blocking read's round decided ([`EtcdUpstream::prepare`]).
enum Prepared {
    /// The data answers the read now.
    Answer(Found),
    /// Nothing changed yet: watch from revision `from`; `kept` answers with
    /// `unchanged_index` if nothing changes.
    Watch {
        kept: Kept,
        from: u64,
        unchanged_index: u64,
    },
}

impl Found {
    fn entries(self) -> impl Iterator<Item = Entry> {
        let companions = self.companions;
        self.answer.kvs.into_iter().map(move |kv| {
            let flags = flags_of(&kv, &companions);
            Entry {
                // Keys written by others may be any bytes; the agent's keys are text.
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                value: kv.value,
                flags,
                create_index: revision(kv.create_revision).max(1),
                modify_index: revision(kv.mod_revision).max(1),
            }
        })
    }
}

/// Keys answered since the cluster changed (see [`EtcdUpstream::must_reset`]).
#[derive(Debug, Default)]
struct Answered {
    epoch: u64,
    targets: HashSet<(bool, String)>,
}

fn unavailable(error: EtcdError) -> UpstreamError {
    UpstreamError::Unavailable(error.to_string())
}

/// An [`Upstream`] backed by an etcd cluster.
///
/// # Examples
///
/// ```no_run
/// use demo_agent::upstream::{EtcdSettings, EtcdUpstream, FaultSettings, Faults, Query, Upstream};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let settings = EtcdSettings::new(vec!["http://127.0.0.1:2379".to_owned()]);
/// let etcd = EtcdUpstream::new(settings, Faults::new(FaultSettings::default()))?;
/// let index = etcd.put("greeting", b"hello".to_vec(), 0, None).await?;
/// let read = etcd.get("greeting", Query::now()).await?;
/// let value = read.entry.map(|entry| entry.value);
/// assert_eq!((value.as_deref(), read.index), (Some(&b"hello"[..]), index));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct EtcdUpstream {
    client: Arc<Client>,
    hub: WatchHub,
    faults: Arc<Faults>,
    is_closed: AtomicBool,
    counters: OpCounters,
    /// The key count of the last stats read.
    keys: AtomicU64,
    /// Targets answered since the last cluster change (empty until one happens).
    answered: Mutex<Answered>,
}

impl EtcdUpstream {
    /// An upstream for the cluster at `settings.endpoints`. Nothing is contacted yet.
    ///
    /// # Errors
    ///
    /// A message when an endpoint is not an `http(s)://host:port` URL (https exactly when TLS
    /// is configured), none is given, or the TLS material is unusable.
    pub fn new(settings: EtcdSettings, faults: Arc<Faults>) -> Result<Arc<Self>, String> {
        let endpoints = client::parse_endpoints(&settings.endpoints, settings.tls.is_some())?;
        let client = Arc::new(Client::new(
            endpoints,
            settings.request_timeout,
            settings.tls.as_ref(),
            settings.credentials,
        )?);
        let hub = WatchHub::new(Arc::clone(&client));
        // An outage ends every open blocking read at once (see `blocking_read`).
        let outage = hub.outage_switch();
        faults.on_change(move |settings| !settings.fail || outage());
        Ok(Arc::new(Self {
            hub,
            client,
            faults,
            is_closed: AtomicBool::new(false),
            counters: OpCounters::default(),
            keys: AtomicU64::new(0),
            answered: Mutex::default(),
        }))
    }

    /// The endpoints, in the order they are tried.
    pub fn endpoints(&self) -> &[String] {
        self.client.endpoints()
    }

    /// The endpoint in use now.
    pub fn current_endpoint(&self) -> &str {
        self.client.current_endpoint()
    }

    /// The id of the cluster answering (0 before its first answer).
    pub fn cluster_id(&self) -> u64 {
        self.client.identity.cluster_id()
    }

    /// The client's traffic so far.
    pub fn traffic(&self) -> EtcdTraffic {
        let c = &self.client.counters;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EtcdTraffic {
            requests: load(&c.requests),
            request_errors: load(&c.request_errors),
            failovers: load(&c.failovers),
            watch_streams: load(&c.watch_streams),
            watches_opened: load(&c.watches),
            watches_open: self.hub.open() as u64,
        }
    }

    /// The counters right now, without contacting etcd (`index` is the highest revision seen,
    /// `keys` the count of the last stats read).
    pub fn counters(&self) -> UpstreamStats {
        self.counters.stats(
            "etcd",
            self.client.identity.revision().max(1),
            self.keys.load(Ordering::Relaxed),
        )
    }

    async fn before_operation(&self) -> Result<(), UpstreamError> {
        self.counters.before_operation(&self.faults).await
    }

    /// `target` now: its keys and their flags companions, in one transaction (one revision).
    async fn snapshot(&self, target: Target<'_>, mode: ReadMode) -> Result<Snapshot, EtcdError> {
        let txn = TxnRequest {
            compare: Vec::new(),
            success: vec![
                op(Request::Range(range_request(target.range(), 0, mode))),
                op(Request::Range(range_request(
                    target.companion_range(),
                    0,
                    mode,
                ))),
            ],
            failure: Vec::new(),
        };
        let answer: TxnResponse = self.client.unary(Call::Read, pb::path::TXN, txn).await?;
        let revision = revision(answer.header.map_or(0, |h| h.revision));
        let mut ranges = answer.responses.into_iter().map(|op| match op.response {
            Some(Response::Range(range)) => range.kvs,
            _ => Vec::new(),
        });
        let mut kvs = ranges.next().unwrap_or_default();
        kvs.retain(|kv| !is_reserved(kv));
        Ok(Snapshot {
            kvs,
            companions: ranges.next().unwrap_or_default(),
            revision,
        })
    }

    /// The user keys of `target` as they were at `revision`; `None` when that history is
    /// compacted (or not reached).
    async fn history(
        &self,
        target: Target<'_>,
        at: u64,
    ) -> Result<Option<Vec<KeyValue>>, EtcdError> {
        let request = range_request(target.range(), at, ReadMode::Default);
        match self
            .client
            .unary::<_, RangeResponse>(Call::Read, pb::path::RANGE, request)
            .await
        {
            Ok(mut range) => {
                range.kvs.retain(|kv| !is_reserved(kv));
                Ok(Some(range.kvs))
            }
            Err(EtcdError::OutOfRange { message, .. }) => {
                tracing::debug!(at, %message, "etcd history gone: answering the current data");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Whether a blocking read of `target` at `min_index` must answer a reset: the cluster
    /// changed since the agent started and `target` has not been answered by the new one
    /// (its `min_index` is from the old cluster).
    fn must_reset(&self, target: Target<'_>, min_index: u64) -> bool {
        let epoch = self.client.identity.epoch();
        if epoch == 0 || min_index <= 1 {
            return false;
        }
        let answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        answered.epoch != epoch || !answered.targets.contains(&target.memo_key())
    }

    /// Notes that `target` was answered by the current cluster (only after a change).
    fn note_answered(&self, target: Target<'_>) {
        let epoch = self.client.identity.epoch();
        if epoch == 0 {
            return;
        }
        let mut answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        if answered.epoch != epoch {
            answered.epoch = epoch;
            answered.targets.clear();
        }
        answered.targets.insert(target.memo_key());
    }

    /// A read of `target`, blocking as `query` says (see the module docs).
    ///
    /// The future of a blocking read lives as long as the read waits (one per watched entry),
    /// so it keeps little across that wait: the data to answer if nothing changes ([`Kept`])
    /// and the watch. The deadline, the upstream's close and an injected outage reach it
    /// through the watch hub ([`Fired`]), so it holds no timer; the calls before and after the
    /// wait are boxed futures of their own, freed once they answer, and what they answer is
    /// moved out of temporaries, not named locals (a future keeps room for a named local until
    /// its scope ends, moved or not). One `async move` block rather than nested `async fn`s,
    /// each of which would store its arguments twice.
    fn read<'a>(
        &'a self,
        target: Target<'a>,
        query: Query,
    ) -> impl Future<Output = Result<Found, UpstreamError>> + Send + 'a {
        let wait = query.wait.min(MAX_WAIT);
        let block = query.min_index > 0 && !wait.is_zero();
        let c = &self.counters;
        bump(match (target.kind(), block) {
            (Kind::Key, false) => &c.key_reads,
            (Kind::Key, true) => &c.key_reads_blocking,
            (Kind::Prefix, false) => &c.list_reads,
            (Kind::Prefix, true) => &c.list_reads_blocking,
        });
        async move {
            // Boxed, as every call before the wait (see above).
            Box::pin(self.before_operation()).await?;
            if !block || self.is_closed.load(Ordering::Acquire) {
                let now = Box::pin(self.snapshot(target, query.mode))
                    .await
                    .map_err(unavailable)?;
                let reset = query.min_index > 0 && self.must_reset(target, query.min_index);
                self.note_answered(target);
                return Ok(if reset {
                    now.found(1)
                } else {
                    now.found_now(target.kind())
                });
            }
            let _open = self.counters.open_blocking();
            let deadline = Instant::now() + wait;
            let epoch = self.client.identity.epoch();
            let mut restarts = 0;
            let mut reset = false;
            let found = loop {
                // The range and its decisions run in a boxed future of their own: their
                // state takes room only while they run, not in this future during the wait.
                // (No named locals for what is moved out before the wait: the future would
                // keep room for them.)
                let round = self.prepare(target, query.min_index, query.mode, epoch, reset);
                let (kept, from, unchanged_index) = match Box::pin(round).await? {
                    Prepared::Answer(found) => break found,
                    Prepared::Watch {
                        kept,
                        from,
                        unchanged_index,
                    } => (kept, from, unchanged_index),
                };
                // The range answered and the watch starts right after it: the caller's data
                // is current (see `contact::accepted`).
                accepted();
                let mut watch = {
                    let (key, range_end) = target.range();
                    self.hub.watch(key, range_end, from, deadline)
                };
                // The read is held now: the caller's data is current (see
                // `contact::accepted`).
                accepted();
                // An outage that started before the watch was registered (the hub fires the
                // watches open when one starts). The hub fires the watch when the wait passes
                // too (`Fired::Expired`).
                let outcome = match if self.faults.get().fail {
                    Fired::Outage
                } else {
                    watch.outcome().await
                } {
                    // The wait passed, or the upstream closed: the unchanged data answers.
                    Fired::Expired | Fired::Closed => break kept.found(target, unchanged_index),
                    Fired::Outage => {
                        bump(&self.counters.injected_failures);
                        return Err(UpstreamError::Unavailable(
                            "injected outage ended an open blocking query".to_owned(),
                        ));
                    }
                    Fired::Etcd(outcome) => outcome,
                };
                drop(watch);
                match decide::after_watch(target.kind(), outcome) {
                    Next::Answer(answer) => {
                        break Found {
                            answer,
                            companions: Vec::new(),
                        };
                    }
                    // Below, once the decision is gone (so it takes no room across the call).
                    Next::RangeAgain => {}
                    Next::Reset => {
                        reset = true;
                        continue;
                    }
                    Next::Restart if restarts < MAX_RESTARTS => {
                        restarts += 1;
                        continue;
                    }
                    Next::Restart => break kept.found(target, unchanged_index),
                    Next::Fail(error) => return Err(unavailable(error)),
                }
                drop(kept);
                let now = Box::pin(self.snapshot(target, query.mode))
                    .await
                    .map_err(unavailable)?;
                break now.found_now(target.kind());
            };
            self.note_answered(target);
            Ok(found)
        }
    }

    /// The first step of a blocking read's round: range `target` now and decide (see
    /// [`decide::after_range`], [`decide::after_history`]) whether the data already answers
    /// the read or a watch must wait for a change, keeping then what answers if none comes.
    /// `reset`: a watch answered a cluster change (`Next::Reset`); a reset answers at once.
    async fn prepare(
        &self,
        target: Target<'_>,
        min_index: u64,
        mode: ReadMode,
        epoch: u64,
        reset: bool,
    ) -> Result<Prepared, UpstreamError> {
        let now = self.snapshot(target, mode).await.map_err(unavailable)?;
        let reset =
            reset || self.client.identity.epoch() != epoch || self.must_reset(target, min_index);
        let kind = target.kind();
        let mut step = decide::after_range(kind, min_index, &now.kvs, now.revision, reset);
        if step == Step::CompareHistory {
            let then = self.history(target, min_index).await.map_err(unavailable)?;
            step = decide::after_history(kind, min_index, then.as_deref(), &now.kvs, now.revision);
        }
        Ok(match step {
            Step::Answer { index } => Prepared::Answer(now.found(index)),
            Step::Watch {
                from,
                unchanged_index,
            } => Prepared::Watch {
                kept: Kept::new(target, now),
                from,
                unchanged_index,
            },
            // `after_history` never asks for history again.
            Step::CompareHistory => Prepared::Answer(now.found(min_index.max(1))),
        })
    }

    /// A transaction of `ops`, guarded by `compare` (none: always), with `failure` ops.
    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<RequestOp>,
        failure: Vec<RequestOp>,
    ) -> Result<TxnResponse, UpstreamError> {
        let txn = TxnRequest {
            compare,
            success,
            failure,
        };
        self.client
            .unary(Call::Write, pb::path::TXN, txn)
            .await
            .map_err(unavailable)
    }

    /// The compare of a compare-and-set on `key` at `expected` (0: the key must not exist).
    fn cas_compare(key: &str, expected: u64) -> Compare {
        let expected_i64 = i64::try_from(expected).unwrap_or(i64::MAX);
        let (target, union) = if expected == 0 {
            (CompareTarget::Create, TargetUnion::CreateRevision(0))
        } else {
            (CompareTarget::Mod, TargetUnion::ModRevision(expected_i64))
        };
        Compare {
            result: CompareResult::Equal as i32,
            target: target as i32,
            key: key.as_bytes().to_vec(),
            target_union: Some(union),
            range_end: Vec::new(),
        }
    }

    /// The `mod_revision` of the key a failed compare-and-set ranged (0: absent).
    fn cas_current(answer: &TxnResponse) -> u64 {
        answer
            .responses
            .first()
            .and_then(|op| match &op.response {
                Some(Response::Range(range)) => range.kvs.first(),
                _ => None,
            })
            .map_or(0, |kv| revision(kv.mod_revision))
    }

    fn header_revision(answer: &TxnResponse) -> u64 {
        revision(answer.header.map_or(0, |h| h.revision)).max(1)
    }

    fn deleted(answer: &TxnResponse) -> i64 {
        match answer.responses.first().and_then(|op| op.response.as_ref()) {
            Some(Response::DeleteRange(delete)) => delete.deleted,
            _ => 0,
        }
    }
}

fn delete_op(range: (Vec<u8>, Vec<u8>)) -> RequestOp {
    op(Request::DeleteRange(DeleteRangeRequest {
        key: range.0,
        range_end: range.1,
    }))
}

impl Upstream for EtcdUpstream {
    fn get<'a>(
        &'a self,
        key: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<KeyRead, UpstreamError>> {
        // `map`, not an async block around the read: the read's future is the whole state.
        self.read(Target::Key(key), query)
            .map(|found| {
                let found = found?;
                let index = found.answer.index;
                Ok(KeyRead {
                    entry: found.entries().next(),
                    index,
                })
            })
            .boxed()
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<ListRead, UpstreamError>> {
        self.read(Target::Prefix(prefix), query)
            .map(|found| {
                let found = found?;
                let index = found.answer.index;
                Ok(ListRead {
                    entries: found.entries().collect(),
                    index,
                })
            })
            .boxed()
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        async move {
            self.before_operation().await?;
            let target = Target::Key(key);
            let put = op(Request::Put(PutRequest {
                key: key.as_bytes().to_vec(),
                value,
            }));
            let companion = if flags == 0 {
                delete_op(target.companion_range())
            } else {
                op(Request::Put(PutRequest {
                    key: flags_key(key).into_bytes(),
                    value: flags.to_string().into_bytes(),
                }))
            };
            let (compare, failure) = match cas {
                Some(expected) => (
                    vec![Self::cas_compare(key, expected)],
                    vec![op(Request::Range(range_request(
                        target.range(),
                        0,
                        ReadMode::Default,
                    )))],
                ),
                None => (Vec::new(), Vec::new()),
            };
            let answer = self.txn(compare, vec![put, companion], failure).await?;
            if !answer.succeeded {
                return Err(UpstreamError::CasMismatch {
                    key: key.to_owned(),
                    expected: cas.unwrap_or(0),
                    current: Self::cas_current(&answer),
                });
            }
            bump(&self.counters.writes);
            Ok(Self::header_revision(&answer))
        }
        .boxed()
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        cas: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        async move {
            self.before_operation().await?;
            let target = Target::Key(key);
            let ops = vec![
                delete_op(target.range()),
                delete_op(target.companion_range()),
            ];
            let (compare, failure) = match cas {
                Some(expected) => (
                    vec![Self::cas_compare(key, expected)],
                    vec![op(Request::Range(range_request(
                        target.range(),
                        0,
                        ReadMode::Default,
                    )))],
                ),
                None => (Vec::new(), Vec::new()),
            };
            let answer = self.txn(compare, ops, failure).await?;
            if !answer.succeeded {
                let current = Self::cas_current(&answer);
                // Consul's rule: a compare-and-set delete of an absent key succeeds.
                if current == 0 {
                    return Ok(Self::header_revision(&answer));
                }
                return Err(UpstreamError::CasMismatch {
                    key: key.to_owned(),
                    expected: cas.unwrap_or(0),
                    current,
                });
            }
            if Self::deleted(&answer) > 0 {
                bump(&self.counters.writes);
            }
            // A delete of an absent key creates no revision: the current one is the key's.
            Ok(Self::header_revision(&answer))
        }
        .boxed()
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        async move {
            self.before_operation().await?;
            let target = Target::Prefix(prefix);
            let ops = vec![
                delete_op(target.range()),
                delete_op(target.companion_range()),
            ];
            let answer = self.txn(Vec::new(), ops, Vec::new()).await?;
            if Self::deleted(&answer) > 0 {
                bump(&self.counters.writes);
            }
            Ok(Self::header_revision(&answer))
        }
        .boxed()
    }

    fn counters(&self) -> UpstreamStats {
        Self::counters(self)
    }

    fn stats(&self) -> BoxFuture<'_, Result<UpstreamStats, UpstreamError>> {
        async move {
            bump(&self.counters.stats_reads);
            self.before_operation().await?;
            let count = |target: Target<'_>| {
                op(Request::Range(RangeRequest {
                    count_only: true,
                    ..range_request(target.range(), 0, ReadMode::Default)
                }))
            };
            let txn = TxnRequest {
                compare: Vec::new(),
                success: vec![
                    count(Target::Prefix("")),
                    count(Target::Prefix(RESERVED_PREFIX)),
                ],
                failure: Vec::new(),
            };
            let answer: TxnResponse = self
                .client
                .unary(Call::Read, pb::path::TXN, txn)
                .await
                .map_err(unavailable)?;
            let counts: Vec<u64> = answer
                .responses
                .iter()
                .map(|op| match &op.response {
                    Some(Response::Range(range)) => revision(range.count),
                    _ => 0,
                })
                .collect();
            let keys = counts.first().copied().unwrap_or(0)
                - counts
                    .get(1)
                    .copied()
                    .unwrap_or(0)
                    .min(counts.first().copied().unwrap_or(0));
            self.keys.store(keys, Ordering::Relaxed);
            Ok(self.counters())
        }
        .boxed()
    }

    fn close(&self) {
        self.is_closed.store(true, Ordering::Release);
        self.hub.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::FaultSettings;

    /// A blocking read's future lives as long as the read waits: one per watched key. Keep it
    /// small (it was 1 256 B in two boxes before the watch hub took over close and outage,
    /// 384 B before it took over the deadline and the calls were boxed).
    #[tokio::test]
    async fn a_blocking_read_is_one_small_future() {
        let etcd = EtcdUpstream::new(
            EtcdSettings::new(vec!["http://127.0.0.1:1".to_owned()]),
            Faults::new(FaultSettings::default()),
        )
        .expect("an upstream");
        let read = etcd.get("k", Query::blocking(5, Duration::from_secs(1)));
        let size = std::mem::size_of_val(&*read);
        assert!(size <= 192, "the blocking read's future takes {size} B");
    }
}
