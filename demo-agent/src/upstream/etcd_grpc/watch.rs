//! Every etcd watch of the upstream on ONE gRPC watch stream (etcd multiplexes watches on a
//! stream by watch id), on the client's one connection.
//!
//! A blocking read registers a one-shot watch ([`WatchHub::watch`]): a key or range and the
//! revision to start from. The hub sends the create request on the stream (or opens the
//! stream, spawning its task, when there is none) and hands the watch's first answer —
//! events, a cancellation (compaction), a cluster change — to the read, then cancels the etcd
//! watch. Dropping the [`Watch`] cancels it too. The hub also ends every open watch when the
//! upstream closes ([`Fired::Closed`]) or an injected outage starts ([`Fired::Outage`]), so a
//! waiting read needs no signal of its own for those.
//!
//! A watch also carries its reader's deadline: one task of the hub (running while any watch
//! is open) fires the watches whose deadline passed with [`Fired::Expired`], so a waiting read
//! keeps no timer of its own (a tokio `Sleep` is 112 bytes, one per watched key).
//!
//! Memory per open watch: one map entry (the key and range end in one allocation, the start
//! revision, the deadline and the reader's waker) and one entry in the set of deadlines; a fired watch's
//! outcome waits in a second map until its reader takes it.
//!
//! # Invariants
//!
//! - A watch fires at most once, with the first batch of its events (all of them after its
//!   start revision, so no change after the read that registered it is missed).
//! - A broken stream (member killed, or frozen: no answer to a progress request within the
//!   client's timeout) moves the client to the next member and re-creates every open watch
//!   there from its own start revision: reads waiting on it notice nothing. Only when every
//!   member fails twice in a row without the stream ever answering do the watches fail.
//! - A header from another cluster (see `ClusterIdentity`) fires every open watch with
//!   [`Outcome::ClusterChanged`]: their start revisions belong to the old cluster.
//! - Watches are created with `hasleader=true` metadata (clientv3's `WithRequireLeader`): a
//!   member cut off from its leader cancels them, which counts as a broken stream.

use std::collections::{BTreeSet, HashMap};
use std::pin::pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Poll, Waker};
use std::time::Duration;

use futures::channel::mpsc;
use tokio::time::Instant;
use tonic::codec::ProstCodec;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::AsciiMetadataValue;

use tonic::{Code, Status};

use super::client::{Client, Current, EtcdError, revision};
use super::pb::{self, WatchRequest, watch_request::RequestUnion};

/// A stream open this long (or that answered) before it broke counts as having worked: the
/// count of failures in a row starts again.
const STREAM_PROVED: Duration = Duration::from_secs(5);

/// How long a stream without watches stays open for the next one (a refresh loop registers
/// its next watch right after the last one fired).
const LINGER: Duration = Duration::from_secs(30);

/// How a watch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Changes after the start revision (the first batch etcd sent).
    Events(Vec<pb::Event>),
    /// etcd cancelled the watch: its start revision is compacted (`compact_revision > 0`), or
    /// another reason.
    Canceled {
        compact_revision: u64,
        reason: String,
    },
    /// Another cluster answers behind the endpoints.
    ClusterChanged,
    /// No member could carry the watch.
    Failed(EtcdError),
}

/// How a [`Watch`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fired {
    /// etcd's answer (or the hub's, when no member could carry it).
    Etcd(Outcome),
    /// The upstream closed ([`WatchHub::close`]).
    Closed,
    /// An injected outage started ([`WatchHub::outage`]).
    Outage,
    /// The watch's deadline passed (given to [`WatchHub::watch`]).
    Expired,
}

/// An open watch: what to (re-)create on etcd, and whom to wake when it fires.
#[derive(Debug)]
struct Registered {
    /// The key, then the range end (empty for one key): one allocation.
    range: Box<[u8]>,
    /// Where the key ends in `range`.
    key_len: u32,
    start_revision: i64,
    /// When the reader stops waiting, in nanoseconds since the hub's `epoch`.
    deadline: u64,
    /// The reader's waker, once it has polled.
    waker: Option<Waker>,
}

impl Registered {
    fn create(&self, id: i64) -> WatchRequest {
        WatchRequest {
            request_union: Some(RequestUnion::Create(pb::WatchCreateRequest {
                key: self.range[..self.key_len as usize].to_vec(),
                range_end: self.range[self.key_len as usize..].to_vec(),
                start_revision: self.start_revision,
                watch_id: id,
            })),
        }
    }
}

fn cancel(id: i64) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::Cancel(pb::WatchCancelRequest {
            watch_id: id,
        })),
    }
}

#[derive(Debug, Default)]
struct State {
    watches: HashMap<i64, Registered>,
    /// Fired watches whose readers have not taken the outcome yet.
    fired: HashMap<i64, Fired>,
    /// The upstream closed: new watches fire at once with [`Fired::Closed`].
    closed: bool,
    /// The request side of the open stream, if any.
    stream: Option<mpsc::UnboundedSender<WatchRequest>>,
    /// Whether the stream's task runs (it ends when no watch is left).
    running: bool,
    /// The open watches' deadlines (nanoseconds since the hub's `epoch`) with their ids,
    /// earliest first.
    deadlines: BTreeSet<(u64, i64)>,
    /// Whether the deadline task runs (it ends when no deadline is left).
    timing: bool,
}

impl State {
    /// Forgets open watch `id` (and its deadline); `None` if it is not open. The last
    /// deadline gone wakes the deadline task, which ends (it holds the hub).
    fn remove(&mut self, id: i64, moved: &tokio::sync::Notify) -> Option<Registered> {
        let watch = self.watches.remove(&id)?;
        self.deadlines.remove(&(watch.deadline, id));
        if self.deadlines.is_empty() {
            moved.notify_one();
        }
        Some(watch)
    }
}

#[derive(Debug)]
struct Shared {
    client: Arc<Client>,
    state: Mutex<State>,
    next_id: AtomicI64,
    /// The origin of the deadlines.
    epoch: Instant,
    /// Wakes the deadline task: an earlier deadline than it sleeps for, or none left.
    deadlines_moved: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fires (and forgets) watch `id` with `outcome`; cancels it on etcd if the stream is open
    /// and `cancel_on_etcd` (etcd already dropped a watch it cancelled itself).
    fn fire(&self, state: &mut State, id: i64, outcome: Fired, cancel_on_etcd: bool) {
        if let Some(watch) = state.remove(id, &self.deadlines_moved) {
            state.fired.insert(id, outcome);
            if let Some(waker) = watch.waker {
                waker.wake();
            }
            if let (true, Some(stream)) = (cancel_on_etcd, &state.stream) {
                let _ = stream.unbounded_send(cancel(id));
            }
        }
    }

    fn fire_all(&self, state: &mut State, outcome: &Fired) {
        let state = &mut *state;
        state.fired.reserve(state.watches.len());
        for (id, watch) in state.watches.drain() {
            state.fired.insert(id, outcome.clone());
            if let Some(waker) = watch.waker {
                waker.wake();
            }
            if let Some(stream) = &state.stream {
                let _ = stream.unbounded_send(cancel(id));
            }
        }
        state.watches.shrink_to_fit();
        state.deadlines.clear();
        self.deadlines_moved.notify_one();
    }

    /// `at` in nanoseconds since the hub's epoch (0 before it).
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The shared watch stream (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct WatchHub {
    shared: Arc<Shared>,
}

/// One open watch; dropping it cancels it.
#[derive(Debug)]
pub(crate) struct Watch {
    id: i64,
    hub: Weak<Shared>,
}

impl Watch {
    /// How the watch ended (waits until it does).
    pub(crate) fn outcome(&mut self) -> impl Future<Output = Fired> + '_ {
        let gone = || {
            Fired::Etcd(Outcome::Canceled {
                compact_revision: 0,
                reason: "watch hub closed".to_owned(),
            })
        };
        std::future::poll_fn(move |cx| {
            let Some(hub) = self.hub.upgrade() else {
                return Poll::Ready(gone());
            };
            let mut state = hub.lock();
            if let Some(fired) = state.fired.remove(&self.id) {
                return Poll::Ready(fired);
            }
            match state.watches.get_mut(&self.id) {
                Some(watch) => {
                    if !watch
                        .waker
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        watch.waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                None => Poll::Ready(gone()),
            }
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        let mut state = hub.lock();
        if state.remove(self.id, &hub.deadlines_moved).is_some() {
            if let Some(stream) = &state.stream {
                let _ = stream.unbounded_send(cancel(self.id));
            }
        } else {
            state.fired.remove(&self.id);
        }
    }
}

impl WatchHub {
    pub(crate) fn new(client: Arc<Client>) -> Self {
        Self {
            shared: Arc::new(Shared {
                client,
                state: Mutex::default(),
                next_id: AtomicI64::new(1),
                epoch: Instant::now(),
                deadlines_moved: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Open watches right now.
    pub(crate) fn open(&self) -> usize {
        self.shared.lock().watches.len()
    }

    /// Ends every open watch with [`Fired::Closed`], and every later one at once.
    pub(crate) fn close(&self) {
        let mut state = self.shared.lock();
        state.closed = true;
        self.shared.fire_all(&mut state, &Fired::Closed);
    }

    /// Ends every open watch with [`Fired::Outage`] (an injected outage started).
    pub(crate) fn outage(&self) {
        let mut state = self.shared.lock();
        self.shared.fire_all(&mut state, &Fired::Outage);
    }

    /// A handle that calls [`WatchHub::outage`] while the hub exists (for a fault listener that
    /// must not keep the hub alive); `false` once it is gone.
    pub(crate) fn outage_switch(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let hub = Arc::downgrade(&self.shared);
        move || match hub.upgrade() {
            Some(shared) => {
                WatchHub { shared }.outage();
                true
            }
            None => false,
        }
    }

    /// Watches `key` (to `range_end`, empty for one key) from `start_revision` on, until
    /// `deadline` at the latest ([`Fired::Expired`]).
    pub(crate) fn watch(
        &self,
        key: Vec<u8>,
        range_end: Vec<u8>,
        start_revision: u64,
        deadline: Instant,
    ) -> Watch {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let key_len = u32::try_from(key.len()).expect("a key shorter than 4 GiB");
        let mut range = key;
        range.extend_from_slice(&range_end);
        let registered = Registered {
            range: range.into_boxed_slice(),
            key_len,
            start_revision: i64::try_from(start_revision).unwrap_or(i64::MAX),
            deadline: self.shared.nanos(deadline),
            waker: None,
        };
        let watch = Watch {
            id,
            hub: Arc::downgrade(&self.shared),
        };
        let mut state = self.shared.lock();
        if state.closed {
            state.fired.insert(id, Fired::Closed);
            return watch;
        }
        self.shared
            .client
            .counters
            .watches
            .fetch_add(1, Ordering::Relaxed);
        if let Some(stream) = &state.stream {
            let _ = stream.unbounded_send(registered.create(id));
        }
        let earliest = state
            .deadlines
            .first()
            .is_none_or(|&(first, _)| registered.deadline < first);
        state.deadlines.insert((registered.deadline, id));
        state.watches.insert(id, registered);
        if !state.timing {
            state.timing = true;
            tokio::spawn(expire(Arc::clone(&self.shared)));
        } else if earliest {
            self.shared.deadlines_moved.notify_one();
        }
        if !state.running {
            state.running = true;
            drop(state);
            tokio::spawn(run(Arc::clone(&self.shared)));
        }
        watch
    }
}

/// The deadline task: fires the watches whose deadline passed, sleeps until the next one,
/// ends when none is left (`timing` is false then).
async fn expire(shared: Arc<Shared>) {
    loop {
        let mut moved = pin!(shared.deadlines_moved.notified());
        moved.as_mut().enable();
        let next = {
            let mut state = shared.lock();
            let now = shared.nanos(Instant::now());
            while let Some(&(at, id)) = state.deadlines.first() {
                if at > now {
                    break;
                }
                shared.fire(&mut state, id, Fired::Expired, true);
            }
            match state.deadlines.first() {
                Some(&(at, _)) => at,
                None => {
                    state.timing = false;
                    return;
                }
            }
        };
        let at = shared.epoch + Duration::from_nanos(next);
        tokio::select! {
            () = tokio::time::sleep_until(at) => {}
            () = moved => {}
        }
    }
}

/// Why a stream ended.
enum End {
    /// No watch left: the task has ended (`running` is false).
    Idle,
    /// The member failed (or the stream broke).
    Broken(EtcdError),
}

/// The stream's task: opens the stream, re-opens it after breaks, ends when no watch is left.
async fn run(shared: Arc<Shared>) {
    let client = Arc::clone(&shared.client);
    let mut failures: u32 = 0;
    loop {
        let current = client.current();
        let opened_at = Instant::now();
        let (end, answered) = stream_once(&shared, &client, &current).await;
        let error = match end {
            End::Idle => return,
            End::Broken(error) => error,
        };
        if answered || opened_at.elapsed() >= STREAM_PROVED {
            failures = 0;
        }
        failures += 1;
        if error.is_member_failure() {
            client.member_failed(current.generation);
        } else {
            client.forget_token();
        }
        {
            let mut state = shared.lock();
            state.stream = None;
            if state.watches.is_empty() {
                state.running = false;
                return;
            }
            tracing::warn!(%error, failures, watches = state.watches.len(), "etcd watch stream broke; re-creating its watches");
            if failures as usize > 2 * client.endpoints().len() {
                shared.fire_all(&mut state, &Fired::Etcd(Outcome::Failed(error)));
                state.running = false;
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50) * failures).await;
    }
}

/// Opens one stream on `current`, creates every open watch on it and serves it until it
/// breaks or no watch is left. Also says whether etcd answered anything on it.
async fn stream_once(shared: &Shared, client: &Client, current: &Current) -> (End, bool) {
    let endpoint = client.endpoints()[current.index].clone();
    let timeout = client.timeout();
    let mut metadata = match client.metadata(current).await {
        Ok(metadata) => metadata,
        Err(error) => return (End::Broken(error), false),
    };
    metadata.insert("hasleader", AsciiMetadataValue::from_static("true"));
    let (tx, rx) = mpsc::unbounded();
    {
        let mut state = shared.lock();
        if state.watches.is_empty() {
            state.running = false;
            return (End::Idle, false);
        }
        for (id, watch) in &state.watches {
            let _ = tx.unbounded_send(watch.create(*id));
        }
        state.stream = Some(tx);
    }
    let mut request = tonic::Request::new(rx);
    *request.metadata_mut() = metadata;
    let mut grpc = tonic::client::Grpc::new(current.channel.clone());
    let open = async {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("connect: {e}")))?;
        grpc.streaming(
            request,
            PathAndQuery::from_static(pb::path::WATCH),
            ProstCodec::<WatchRequest, pb::WatchResponse>::default(),
        )
        .await
    };
    let timed_out = || EtcdError::Timeout {
        endpoint: endpoint.clone(),
        timeout,
    };
    let mut stream = match tokio::time::timeout(timeout, open).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            return (
                End::Broken(EtcdError::from_status(&endpoint, &status)),
                false,
            );
        }
        Err(_) => return (End::Broken(timed_out()), false),
    };
    client
        .counters
        .watch_streams
        .fetch_add(1, Ordering::Relaxed);
    let mut answered = false;
    let mut probing = false;
    let mut idle_since: Option<Instant> = None;
    loop {
        // Silence for half the timeout: ask for progress (any answer proves the member
        // alive); silence for the other half too: the member is frozen or cut off.
        let next = tokio::time::timeout(timeout / 2, stream.message()).await;
        let idle = {
            let mut state = shared.lock();
            if !state.watches.is_empty() {
                idle_since = None;
                false
            } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= LINGER {
                state.stream = None;
                state.running = false;
                return (End::Idle, answered);
            } else {
                true
            }
        };
        match next {
            Ok(Ok(Some(response))) => {
                answered = true;
                probing = false;
                if let Some(error) = handle(shared, client, &endpoint, response) {
                    return (End::Broken(error), answered);
                }
            }
            Ok(Ok(None)) => {
                let error = EtcdError::Status {
                    endpoint: endpoint.clone(),
                    code: Code::Unavailable,
                    message: "watch stream ended".to_owned(),
                };
                return (End::Broken(error), answered);
            }
            Ok(Err(status)) => {
                return (
                    End::Broken(EtcdError::from_status(&endpoint, &status)),
                    answered,
                );
            }
            Err(_) if probing => return (End::Broken(timed_out()), answered),
            // No watch to keep alive: nothing to probe.
            Err(_) if idle => {}
            Err(_) => {
                probing = true;
                let progress = WatchRequest {
                    request_union: Some(RequestUnion::Progress(pb::WatchProgressRequest {})),
                };
                if let Some(stream) = &shared.lock().stream {
                    let _ = stream.unbounded_send(progress);
                }
            }
        }
    }
}

/// Hands one answer of the stream to its watch. An error ends the stream.
fn handle(
    shared: &Shared,
    client: &Client,
    endpoint: &str,
    response: pb::WatchResponse,
) -> Option<EtcdError> {
    let before = client.identity.epoch();
    let epoch = client.identity.observe(response.header.as_ref());
    let mut state = shared.lock();
    if epoch != before {
        shared.fire_all(&mut state, &Fired::Etcd(Outcome::ClusterChanged));
        return None;
    }
    let id = response.watch_id;
    if response.canceled {
        if response.cancel_reason.contains("no leader") {
            return Some(EtcdError::Status {
                endpoint: endpoint.to_owned(),
                code: Code::Unavailable,
                message: response.cancel_reason,
            });
        }
        let outcome = Outcome::Canceled {
            compact_revision: revision(response.compact_revision),
            reason: response.cancel_reason,
        };
        shared.fire(&mut state, id, Fired::Etcd(outcome), false);
    } else if !response.events.is_empty() {
        shared.fire(
            &mut state,
            id,
            Fired::Etcd(Outcome::Events(response.events)),
            true,
        );
    }
    None
}
