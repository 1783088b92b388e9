//! The etcd upstream: the agent's keys live in an etcd cluster (v3 API, through etcd's JSON
//! gateway; see ARCHITECTURE.md for why not gRPC), and blocking reads are etcd watches.
//!
//! # Index = etcd revision
//!
//! etcd numbers every change of the store with a cluster-wide revision. The index of an
//! answer is:
//! - a present key: its `mod_revision` (the revision of its last write);
//! - an absent key: the revision at which it was seen absent: the read's `header.revision`,
//!   or the revision of the delete a watch reported;
//! - a prefix: the read's `header.revision`.
//!
//! Writes answer the revision they created (`header.revision`); a delete of an absent key
//! changes nothing and answers the current revision.
//!
//! # Blocking reads
//!
//! A read with `min_index > 0` and a `wait` answers once the data changed after `min_index`,
//! else after `wait` with the unchanged data. It never wakes on writes to other keys:
//! 1. Range the key (or prefix) now, at revision `R`.
//! 2. Changed since `min_index`? A present key: `mod_revision > min_index`. An absent key or
//!    a prefix: compare with a range *at revision `min_index`* (etcd keeps the history until
//!    it is compacted). Changed: answer at once.
//! 3. Unchanged: watch the key (or prefix) from revision `R` on (events at `R` or below are
//!    ignored), so that no change between the read and the watch is missed. The first event
//!    answers (a key: from the event itself; a prefix: by ranging again). At the end of
//!    `wait` the unchanged data answers with the index it had: `mod_revision` for a present
//!    key, `min_index` otherwise, so an idle key's index does not creep up with unrelated
//!    writes.
//!
//! Watching from `R` rather than from `min_index + 1` sees the same changes, but does not
//! depend on etcd replaying history (a watch that starts in the past is served by a loop
//! that runs every 100 ms) and does not scan the history of a key that has been idle for long.
//! (Starting exactly at a compaction revision would even lose a delete made at it: etcd
//! accepts such a watch but has already dropped that tombstone.)
//!
//! A watch is cancelled by closing its connection, so a read that answered does not cancel
//! it: it *parks* the stream for two seconds, noting up to which revision it has read it. The
//! next blocking read of the same key (a refresh loop asks again at once) takes it over and
//! skips the events up to its own range's revision; the rest are exactly the changes after
//! that range. A busy key thus keeps one watch and one connection instead of one per change.
//!
//! Index resets (SPEC §5):
//! - **Compaction.** When the history needed to prove "unchanged since `min_index`" is
//!   compacted (step 2), or a watch's start revision was compacted before it was created,
//!   the read answers at once with the current data and the current revision: the index
//!   moves forward, so the cache and every watch take the latest value instead of stalling.
//! - **A store behind the caller.** When the store's revision is below `min_index` (etcd
//!   restored from an older snapshot, or a new cluster behind the same endpoints), the read
//!   answers at once with its lower index, which the cache treats as a reset.
//!
//! # Failures
//!
//! Every operation fails over between the configured endpoints (see the `client` module). An
//! open watch whose stream breaks (its member died) is re-established on the next endpoint
//! from step 1, so a blocking read survives the loss of a member; it fails only once every
//! endpoint has failed. The agent's fault injection (`--upstream-fail-rate`, the outage switch)
//! applies here as on the embedded store.

mod client;
mod decode;
mod proto;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

use self::client::{Call, Client, EtcdError, WatchStream};
use self::proto::{
    Compare, DeleteRangeRequest, EventKind, KeyValue, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, TxnRequest, TxnResponse, WatchCreateRequest, b64, prefix_range_end,
};
use super::{
    Entry, Faults, KeyRead, ListRead, MAX_WAIT, OpCounters, Query, RESERVED_PREFIX, Upstream,
    UpstreamError, UpstreamStats, bump,
};

/// How long a watch stream is kept for the next blocking read of its key after a read
/// answered (see `EtcdUpstream::park`).
const PARK_FOR: Duration = Duration::from_secs(2);

/// How often a blocking read starts over because its watch's start revision was compacted
/// before it answers with the unchanged data.
const MAX_COMPACTED: u32 = 3;

/// A watch stream open this long before it broke counts as having worked (see
/// `blocking_read`).
const STREAM_PROVED: Duration = Duration::from_secs(5);

/// The default per-request timeout of unary etcd calls.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach an etcd cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdSettings {
    /// Client URLs of the cluster's members (`http://host:port`), tried in order.
    pub endpoints: Vec<String>,
    /// How long one unary call (range, put, txn) may take on one endpoint before the next is
    /// tried. Watches are not bounded by it (only their opening is).
    pub request_timeout: Duration,
}

impl EtcdSettings {
    /// Settings for `endpoints` with the default request timeout.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Counters of the etcd client's traffic (see [`EtcdUpstream::traffic`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdTraffic {
    /// Requests sent (every attempt on every endpoint, watches included).
    pub requests: u64,
    /// Requests that failed.
    pub request_errors: u64,
    /// Times the client moved to another endpoint.
    pub failovers: u64,
    /// Watches opened (each on its own HTTP connection).
    pub watches_opened: u64,
}

/// What is read: one key, or every key under a prefix.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    Key(&'a str),
    Prefix(&'a str),
}

impl Target<'_> {
    fn key_bytes(&self) -> Vec<u8> {
        match self {
            // The empty prefix (every key) starts at the smallest key, "\0".
            Self::Prefix("") => vec![0],
            Self::Key(key) | Self::Prefix(key) => key.as_bytes().to_vec(),
        }
    }

    fn range_end(&self) -> Option<Vec<u8>> {
        match self {
            Self::Key(_) => None,
            Self::Prefix(prefix) => Some(prefix_range_end(prefix.as_bytes())),
        }
    }

    fn range_request(&self) -> RangeRequest {
        RangeRequest::new(&self.key_bytes(), self.range_end().as_deref())
    }

    fn is_key(&self) -> bool {
        matches!(self, Self::Key(_))
    }

    fn watch_key(&self) -> WatchKey {
        match self {
            Self::Key(key) => WatchKey::Key((*key).to_owned()),
            Self::Prefix(prefix) => WatchKey::Prefix((*prefix).to_owned()),
        }
    }
}

/// What woke a blocking read's watch loop.
enum Step {
    Batch(proto::WatchResponse),
    Broken(EtcdError),
    Deadline,
    Closed,
    FaultsChanged,
}

/// The key of a parked stream: what it watches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum WatchKey {
    Key(String),
    Prefix(String),
}

/// A watch stream kept between two blocking reads of one key or prefix.
#[derive(Debug)]
struct Parked {
    id: u64,
    stream: WatchStream,
    /// Every event up to this revision has been read from the stream.
    position: u64,
}

#[derive(Debug, Default)]
struct Parking {
    streams: Mutex<HashMap<WatchKey, Parked>>,
    next_id: AtomicU64,
}

impl Parking {
    fn lock(&self) -> MutexGuard<'_, HashMap<WatchKey, Parked>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a read answers: the keys found (at most one for a key) and the index.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    kvs: Vec<KeyValue>,
    index: u64,
}

impl Answer {
    /// The answer of a range made now (see the module docs for the index).
    fn of(target: Target<'_>, range: RangeResponse) -> Self {
        let index = match (target, range.kvs.first()) {
            (Target::Key(_), Some(kv)) => kv.mod_revision,
            _ => range.header.revision,
        };
        Self {
            kvs: range.kvs,
            index: index.max(1),
        }
    }

    fn into_key_read(self) -> KeyRead {
        KeyRead {
            entry: self.kvs.first().map(entry),
            index: self.index,
        }
    }

    fn into_list_read(self) -> ListRead {
        ListRead {
            entries: self
                .kvs
                .iter()
                .filter(|kv| !kv.key.starts_with(RESERVED_PREFIX.as_bytes()))
                .map(entry)
                .collect(),
            index: self.index,
        }
    }
}

/// An etcd key as a Consul entry. This (JSON gateway) client does not keep flags: they read
/// as 0, and a put with flags is refused (see `put`).
fn entry(kv: &KeyValue) -> Entry {
    Entry {
        // Keys written by others may be any bytes; the agent's keys are text.
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: kv.value.clone(),
        flags: 0,
        create_index: kv.create_revision.max(1),
        modify_index: kv.mod_revision.max(1),
        lock_index: 0,
        session: None,
    }
}

/// Completes once the upstream is closed. (The guard `wait_for` returns is not `Send`, so it
/// is dropped here, not held in the caller's future.)
async fn until_closed(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|closed| *closed).await;
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
    client: Client,
    faults: Arc<Faults>,
    closed: watch::Sender<bool>,
    is_closed: AtomicBool,
    counters: OpCounters,
    /// The highest revision seen in any answer.
    revision: AtomicU64,
    /// The key count of the last stats read.
    keys: AtomicU64,
    /// Watch streams kept between blocking reads (shared with their expiry tasks).
    parking: Arc<Parking>,
}

impl EtcdUpstream {
    /// An upstream for the cluster at `settings.endpoints`. Nothing is contacted yet.
    ///
    /// # Errors
    ///
    /// A message when an endpoint is not an `http://host:port` URL or none is given.
    pub fn new(settings: EtcdSettings, faults: Arc<Faults>) -> Result<Arc<Self>, String> {
        let endpoints = client::parse_endpoints(&settings.endpoints)?;
        let client = Client::new(endpoints, settings.request_timeout)?;
        Ok(Arc::new(Self {
            client,
            faults,
            closed: watch::Sender::new(false),
            is_closed: AtomicBool::new(false),
            counters: OpCounters::default(),
            revision: AtomicU64::new(0),
            keys: AtomicU64::new(0),
            parking: Arc::default(),
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

    /// The client's traffic so far.
    pub fn traffic(&self) -> EtcdTraffic {
        let c = &self.client.counters;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EtcdTraffic {
            requests: load(&c.requests),
            request_errors: load(&c.request_errors),
            failovers: load(&c.failovers),
            watches_opened: load(&c.watches),
        }
    }

    /// The counters right now, without contacting etcd (`index` is the highest revision seen,
    /// `keys` the count of the last stats read).
    pub fn counters(&self) -> UpstreamStats {
        self.counters.stats(
            "etcd",
            self.revision.load(Ordering::Relaxed).max(1),
            self.keys.load(Ordering::Relaxed),
        )
    }

    fn saw_revision(&self, revision: u64) {
        self.revision.fetch_max(revision, Ordering::Relaxed);
    }

    async fn before_operation(&self) -> Result<(), UpstreamError> {
        self.counters.before_operation(&self.faults).await
    }

    /// Ranges `target` now (`revision` none) or as it was at `revision`.
    async fn range(
        &self,
        target: Target<'_>,
        revision: Option<u64>,
    ) -> Result<RangeResponse, EtcdError> {
        let mut request = target.range_request();
        request.revision = revision.map(|r| r.to_string());
        let response: RangeResponse = self
            .client
            .unary(Call::Read, "/v3/kv/range", &request)
            .await?;
        self.saw_revision(response.header.revision);
        Ok(response)
    }

    /// Whether `target`, found as `now`, differs from what it was at `min_index` (an absent
    /// key or a prefix: history decides). A compacted (or not yet reached) `min_index` counts
    /// as changed: the caller then answers with the current data.
    async fn changed_since(
        &self,
        target: Target<'_>,
        min_index: u64,
        now: &RangeResponse,
    ) -> Result<bool, EtcdError> {
        if now.header.revision == min_index {
            return Ok(false);
        }
        let then = match self.range(target, Some(min_index)).await {
            Ok(then) => then,
            Err(EtcdError::OutOfRange { message, .. }) => {
                tracing::debug!(min_index, %message, "etcd history gone: answering the current data");
                return Ok(true);
            }
            Err(error) => return Err(error),
        };
        let identity = |kvs: &[KeyValue]| -> Vec<(Vec<u8>, u64)> {
            kvs.iter()
                .map(|kv| (kv.key.clone(), kv.mod_revision))
                .collect()
        };
        Ok(identity(&then.kvs) != identity(&now.kvs))
    }

    /// A read of `target`, blocking as `query` says (see the module docs).
    async fn read(&self, target: Target<'_>, query: Query) -> Result<Answer, UpstreamError> {
        let wait = query.wait.min(MAX_WAIT);
        let block = query.min_index > 0 && !wait.is_zero();
        let c = &self.counters;
        bump(match (target.is_key(), block) {
            (true, false) => &c.key_reads,
            (true, true) => &c.key_reads_blocking,
            (false, false) => &c.list_reads,
            (false, true) => &c.list_reads_blocking,
        });
        self.before_operation().await?;
        if !block || self.is_closed.load(Ordering::Acquire) {
            let range = self.range(target, None).await.map_err(unavailable)?;
            return Ok(Answer::of(target, range));
        }
        let _open = c.open_blocking();
        let deadline = Instant::now() + wait;
        self.blocking_read(target, query.min_index, deadline).await
    }

    async fn blocking_read(
        &self,
        target: Target<'_>,
        min_index: u64,
        deadline: Instant,
    ) -> Result<Answer, UpstreamError> {
        let mut closed = self.closed.subscribe();
        let mut faults = self.faults.subscribe();
        // Streams that broke soon after they were opened, in a row: each moves to the next
        // endpoint; after every endpoint twice the read fails (the cache's backoff takes
        // over). A stream that worked for a while and then ended (a member restarting, a
        // proxy closing idle connections) starts the count again.
        let mut broken = 0;
        let max_broken = 2 * self.client.endpoints().len();
        // Watches whose start was compacted before etcd created them (a compaction right
        // after the read): each time the read starts over.
        let mut compacted = 0;
        loop {
            let now = self.range(target, None).await.map_err(unavailable)?;
            let revision = now.header.revision;
            if revision < min_index {
                tracing::info!(
                    revision,
                    min_index,
                    "etcd's revision is below the index asked for (restored or replaced \
                     cluster): answering with the lower index"
                );
                return Ok(Answer::of(target, now));
            }
            let present = match target {
                Target::Key(_) => now.kvs.first().map(|kv| kv.mod_revision),
                Target::Prefix(_) => None,
            };
            let changed = match present {
                Some(mod_revision) => mod_revision > min_index,
                None => self
                    .changed_since(target, min_index, &now)
                    .await
                    .map_err(unavailable)?,
            };
            if changed {
                return Ok(Answer::of(target, now));
            }
            let unchanged = Answer {
                index: present.unwrap_or(min_index).max(1),
                kvs: now.kvs,
            };

            let mut stream = match self.unpark(target, revision) {
                Some(stream) => stream,
                None => {
                    let create = WatchCreateRequest {
                        key: b64(&target.key_bytes()),
                        range_end: target.range_end().map(|end| b64(&end)),
                        start_revision: revision.to_string(),
                    };
                    let opened = tokio::select! {
                        opened = self.client.watch(create) => opened,
                        () = tokio::time::sleep_until(deadline) => return Ok(unchanged),
                        () = until_closed(&mut closed) => return Ok(unchanged),
                    };
                    match opened {
                        Ok(stream) => stream,
                        // Compacted between the range and the watch: look again (a few times).
                        Err(EtcdError::WatchCompacted { .. }) if compacted < MAX_COMPACTED => {
                            compacted += 1;
                            continue;
                        }
                        Err(EtcdError::WatchCompacted { .. }) => return Ok(unchanged),
                        Err(error) => return Err(unavailable(error)),
                    }
                }
            };
            let watching_since = Instant::now();
            let error = loop {
                let step = tokio::select! {
                    result = stream.next() => match result {
                        Ok(result) => Step::Batch(result),
                        Err(error) => Step::Broken(error),
                    },
                    () = tokio::time::sleep_until(deadline) => Step::Deadline,
                    () = until_closed(&mut closed) => Step::Closed,
                    Ok(()) = faults.changed() => Step::FaultsChanged,
                };
                match step {
                    Step::Batch(result) if result.canceled => break stream.canceled(result),
                    Step::Batch(result) => {
                        self.saw_revision(result.header.revision);
                        let Some(event) = result
                            .events
                            .iter()
                            .rfind(|event| event.kv.mod_revision > revision)
                        else {
                            // Progress, or events up to the read's revision (a reused stream).
                            continue;
                        };
                        // Every event of this batch is consumed; later ones wait in the stream.
                        let consumed = result
                            .events
                            .iter()
                            .map(|event| event.kv.mod_revision)
                            .fold(revision, u64::max);
                        let answer = match target {
                            Target::Key(_) => Ok(Answer {
                                index: event.kv.mod_revision.max(1),
                                kvs: match event.kind {
                                    EventKind::Put => vec![event.kv.clone()],
                                    EventKind::Delete => Vec::new(),
                                },
                            }),
                            Target::Prefix(_) => self
                                .range(target, None)
                                .await
                                .map(|range| Answer::of(target, range))
                                .map_err(unavailable),
                        };
                        self.park(target, stream, consumed);
                        return answer;
                    }
                    Step::Broken(error) => break error,
                    Step::Deadline => {
                        self.park(target, stream, revision);
                        return Ok(unchanged);
                    }
                    Step::Closed => return Ok(unchanged),
                    Step::FaultsChanged => {
                        if self.faults.get().fail {
                            bump(&self.counters.injected_failures);
                            return Err(UpstreamError::Unavailable(
                                "injected outage ended an open blocking query".to_owned(),
                            ));
                        }
                    }
                }
            };
            if let EtcdError::WatchCompacted { .. } = error {
                if compacted < MAX_COMPACTED {
                    compacted += 1;
                    continue;
                }
                return Ok(unchanged);
            }
            if watching_since.elapsed() >= STREAM_PROVED {
                // It worked: re-establish it where the client is now (a dead member fails the
                // next range, which moves on by itself).
                broken = 0;
                tracing::info!(%error, "etcd watch ended; re-establishing it");
                continue;
            }
            broken += 1;
            tracing::warn!(%error, "etcd watch broke; re-establishing it");
            self.client.endpoint_failed(stream.endpoint_index());
            if broken >= max_broken {
                return Err(unavailable(error));
            }
        }
    }

    /// Takes the parked stream of `target`, if it can serve a read made at `revision`: it has
    /// delivered nothing beyond that revision, so every later event is still in it.
    fn unpark(&self, target: Target<'_>, revision: u64) -> Option<WatchStream> {
        let parked = self.parking.lock().remove(&target.watch_key())?;
        (parked.position <= revision).then_some(parked.stream)
    }

    /// Keeps `stream` (which has delivered every event up to `position`) for the next
    /// blocking read of `target`, for [`PARK_FOR`] at most.
    ///
    /// A refresh loop reads again right after its read answered; without parking, each answer
    /// would close its watch (the only way to cancel one over the gateway) and the next read
    /// open another: a new connection and etcd watcher per change of a busy key.
    fn park(&self, target: Target<'_>, stream: WatchStream, position: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.is_closed.load(Ordering::Acquire) {
            return;
        }
        let id = self.parking.next_id.fetch_add(1, Ordering::Relaxed);
        let key = target.watch_key();
        let replaced = self.parking.lock().insert(
            key.clone(),
            Parked {
                id,
                stream,
                position,
            },
        );
        drop(replaced);
        let parking = Arc::downgrade(&self.parking);
        runtime.spawn(async move {
            tokio::time::sleep(PARK_FOR).await;
            let Some(parking) = parking.upgrade() else {
                return;
            };
            let mut streams = parking.lock();
            if streams.get(&key).is_some_and(|parked| parked.id == id) {
                let expired = streams.remove(&key);
                drop(streams);
                drop(expired);
            }
        });
    }

    /// The index of `key` for compare-and-set: its `mod_revision`, 0 when absent.
    fn cas_current(txn: &TxnResponse) -> u64 {
        txn.responses
            .first()
            .and_then(|op| op.response_range.as_ref())
            .and_then(|range| range.kvs.first())
            .map_or(0, |kv| kv.mod_revision)
    }

    /// Runs `op` on `key` if its index is `expected` (0: if it does not exist).
    async fn cas_txn(&self, key: &str, expected: u64, op: RequestOp) -> Result<u64, UpstreamError> {
        let key_b64 = b64(key.as_bytes());
        let compare = if expected == 0 {
            Compare {
                key: key_b64.clone(),
                target: "CREATE",
                create_revision: Some("0".to_owned()),
                mod_revision: None,
            }
        } else {
            Compare {
                key: key_b64.clone(),
                target: "MOD",
                create_revision: None,
                mod_revision: Some(expected.to_string()),
            }
        };
        let txn = TxnRequest {
            compare: vec![compare],
            success: vec![op],
            failure: vec![RequestOp::Range(RangeRequest::new(key.as_bytes(), None))],
        };
        let answer: TxnResponse = self
            .client
            .unary(Call::Write, "/v3/kv/txn", &txn)
            .await
            .map_err(unavailable)?;
        self.saw_revision(answer.header.revision);
        if !answer.succeeded {
            return Err(UpstreamError::CasMismatch {
                key: key.to_owned(),
                expected,
                current: Self::cas_current(&answer),
            });
        }
        bump(&self.counters.writes);
        Ok(answer.header.revision.max(1))
    }
}

impl Upstream for EtcdUpstream {
    fn get<'a>(
        &'a self,
        key: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<KeyRead, UpstreamError>> {
        async move {
            self.read(Target::Key(key), query)
                .await
                .map(Answer::into_key_read)
        }
        .boxed()
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<ListRead, UpstreamError>> {
        async move {
            self.read(Target::Prefix(prefix), query)
                .await
                .map(Answer::into_list_read)
        }
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
            if flags != 0 {
                return Err(UpstreamError::Unsupported(
                    "flags (this etcd client stores none; write with flags=0)".to_owned(),
                ));
            }
            self.before_operation().await?;
            let put = PutRequest {
                key: b64(key.as_bytes()),
                value: b64(&value),
            };
            if let Some(expected) = cas {
                return self.cas_txn(key, expected, RequestOp::Put(put)).await;
            }
            let answer: PutResponse = self
                .client
                .unary(Call::Write, "/v3/kv/put", &put)
                .await
                .map_err(unavailable)?;
            self.saw_revision(answer.header.revision);
            bump(&self.counters.writes);
            Ok(answer.header.revision.max(1))
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
            let delete = DeleteRangeRequest {
                key: b64(key.as_bytes()),
                range_end: None,
            };
            if let Some(expected) = cas {
                return match self
                    .cas_txn(key, expected, RequestOp::DeleteRange(delete))
                    .await
                {
                    // Consul's rule: a compare-and-set delete of an absent key succeeds.
                    Err(UpstreamError::CasMismatch { current: 0, .. }) => {
                        Ok(self.revision.load(Ordering::Relaxed).max(1))
                    }
                    other => other,
                };
            }
            let answer: proto::DeleteRangeResponse = self
                .client
                .unary(Call::Write, "/v3/kv/deleterange", &delete)
                .await
                .map_err(unavailable)?;
            self.saw_revision(answer.header.revision);
            if answer.deleted > 0 {
                bump(&self.counters.writes);
            }
            // A delete of an absent key creates no revision: the current one is the key's.
            Ok(answer.header.revision.max(1))
        }
        .boxed()
    }

    fn delete_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        async move {
            self.before_operation().await?;
            let target = Target::Prefix(prefix);
            let delete = DeleteRangeRequest {
                key: b64(&target.key_bytes()),
                range_end: target.range_end().map(|end| b64(&end)),
            };
            let answer: proto::DeleteRangeResponse = self
                .client
                .unary(Call::Write, "/v3/kv/deleterange", &delete)
                .await
                .map_err(unavailable)?;
            self.saw_revision(answer.header.revision);
            if answer.deleted > 0 {
                bump(&self.counters.writes);
            }
            Ok(answer.header.revision.max(1))
        }
        .boxed()
    }

    fn stats(&self) -> BoxFuture<'_, Result<UpstreamStats, UpstreamError>> {
        async move {
            bump(&self.counters.stats_reads);
            self.before_operation().await?;
            let mut request = Target::Prefix("").range_request();
            request.count_only = true;
            let answer: RangeResponse = self
                .client
                .unary(Call::Read, "/v3/kv/range", &request)
                .await
                .map_err(unavailable)?;
            self.saw_revision(answer.header.revision);
            self.keys.store(answer.count, Ordering::Relaxed);
            Ok(self.counters())
        }
        .boxed()
    }

    fn close(&self) {
        self.is_closed.store(true, Ordering::Release);
        self.closed.send_replace(true);
        let parked = std::mem::take(&mut *self.parking.lock());
        drop(parked);
    }
}
