//! Upstream contact tracking: is the upstream answering, since when not, and "it is back".
//!
//! [`ContactTracker`] is an [`Upstream`] decorator: every call goes through it to the real
//! upstream, and its outcome is recorded (an answer, including a compare-and-set mismatch, is
//! contact; [`UpstreamError::Unavailable`] is a failure). A blocking read also counts as
//! contact as soon as the upstream has *accepted* it (see [`accepted`]), not only when it
//! completes minutes later.
//!
//! States, as [`ContactState`] reports them:
//! - **failing** from the first failure with no success since (`down_since`); while failing, a
//!   probe task makes a light call ([`Upstream::stats`]) every [`PROBE_INTERVAL`] (and at once
//!   when the fault-injection settings change), so recovery is noticed even when nothing else
//!   calls the upstream;
//! - **unreachable** (`reachable: false`) once it has been failing for [`LOST_AFTER`]: one
//!   warning line is logged then (a single failed call among successes, e.g. under
//!   `--upstream-fail-rate`, is not an outage);
//! - **back** at the first success: one info line with the outage's duration (if it was
//!   logged as lost), and the [`ContactTracker::on_contact_back`] callback runs (the agent
//!   calls `Cache::retry_now` there, so fetch chains sleeping out a backoff retry at once).
//!
//! An idle agent learns about an outage only when it next calls the upstream (a cached entry's
//! background refresh does, continuously).
//!
//! # Blocking reads accepted
//!
//! A blocking read that sees no change stays open for minutes, yet once the upstream has
//! accepted it, the reader's data is known to be current. Upstreams tell that by calling
//! [`accepted`] at that moment (inside the read's future); a caller that wants to know runs
//! the read inside [`with_accepted`] with a [`Connected`] signal (the cache types pass the
//! engine's `FetchOptions::connected`). No signature of [`Upstream`] changes for it: the
//! signal travels in a task-local, so an upstream that never calls [`accepted`] only loses
//! the early notice.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cache_core::Connected;
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::api::{KeyRead, ListRead, Query, Upstream, UpstreamError, UpstreamStats};
use super::faults::Faults;
use crate::duration::GoDuration;

/// How often the probe task calls the upstream while it is failing.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// The longest one probe may take before it counts as a failure.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the upstream must fail without a success to count as unreachable (and be logged).
pub const LOST_AFTER: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// The caller's signal, set by [`with_accepted`].
    static ACCEPTED: Connected;
    /// The contact tracker around the call, set by [`ContactTracker`] (a separate slot, so
    /// that the tracker needs no signal of its own per call).
    static CONTACT: Arc<Shared>;
    /// A signal offered by [`accepting`] to the tracker whose call it makes.
    static OFFERED: std::cell::Cell<Option<Connected>>;
}

/// Runs `future` (an upstream read) with `signal` notified when the upstream accepts the
/// read's blocking query (see the module docs).
pub fn with_accepted<F: Future>(signal: Connected, future: F) -> impl Future<Output = F::Output> {
    ACCEPTED.scope(signal, future)
}

/// [`with_accepted`] around the read that `call` makes, in the read's own box when `call` goes
/// through a [`ContactTracker`]: the tracker takes the signal into its future (already boxed)
/// and sets it around each poll, so the caller keeps the read's box alone (16 bytes, not a
/// task-local scope of 48). Any other upstream's read is wrapped in [`with_accepted`], boxed.
pub(crate) fn accepting<'a, T: 'a>(
    signal: Connected,
    call: impl FnOnce() -> BoxFuture<'a, T>,
) -> BoxFuture<'a, T> {
    let (read, left) = OFFERED.sync_scope(std::cell::Cell::new(Some(signal)), || {
        let read = call();
        (read, OFFERED.with(std::cell::Cell::take))
    });
    match left {
        None => read,
        Some(signal) => Box::pin(with_accepted(signal, read)),
    }
}

/// Called by an upstream, inside a blocking read's future, once the upstream has accepted the
/// query (checked the index and is now waiting for a change): the caller's data is current.
/// Does nothing outside [`with_accepted`] (and a [`ContactTracker`]); cheap; may be called
/// more than once.
pub fn accepted() {
    let _ = CONTACT.try_with(|shared| shared.record_success());
    let _ = ACCEPTED.try_with(Connected::notify);
}

/// What is known about contact with the upstream right now.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ContactState {
    /// The upstream, as configured (e.g. `embedded`, `etcd http://127.0.0.1:2379`).
    pub upstream: String,
    /// False once the upstream has failed for [`LOST_AFTER`] without a success.
    pub reachable: bool,
    /// When the upstream last answered (`None`: never yet).
    pub last_contact: Option<SystemTime>,
    /// How long ago that was.
    pub since_last_contact: Option<Duration>,
    /// The first failure with no success since (`None` while the upstream answers).
    pub down_since: Option<SystemTime>,
    /// How long the current failure has lasted.
    pub down_for: Option<Duration>,
    /// The last failure's message, while failing.
    pub last_error: Option<String>,
    /// The duration of the last outage that ended (one that lasted at least [`LOST_AFTER`]).
    pub last_outage: Option<Duration>,
    /// Outages (failures lasting at least [`LOST_AFTER`]) since the agent started.
    pub outages: u64,
}

impl ContactState {
    /// JSON for the agent's endpoints: times as RFC 3339 (UTC), durations as Go durations
    /// (`1.250s`), plus `*_ms` numbers for programs.
    pub fn to_json(&self) -> Value {
        json!({
            "upstream": self.upstream,
            "reachable": self.reachable,
            "last_contact": self.last_contact.map(rfc3339),
            "since_last_contact": self.since_last_contact.map(go),
            "since_last_contact_ms": self.since_last_contact.map(millis),
            "down_since": self.down_since.map(rfc3339),
            "down_for": self.down_for.map(go),
            "down_for_ms": self.down_for.map(millis),
            "last_error": self.last_error,
            "last_outage": self.last_outage.map(go),
            "last_outage_ms": self.last_outage.map(millis),
            "outages": self.outages,
        })
    }
}

fn go(d: Duration) -> String {
    GoDuration(Duration::from_millis(millis(d))).to_string()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Formats `t` as RFC 3339 in UTC with milliseconds, e.g. `2026-12-03T21:07:38.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The mutable part of the tracker's state.
#[derive(Debug, Default)]
struct Failing {
    /// The first failure with no success since.
    since: Option<Instant>,
    /// The outage was announced (logged, counted, `reachable: false`).
    lost: bool,
    last_error: Option<String>,
    last_outage: Option<Duration>,
    /// A probe task is running.
    probing: bool,
}

type Callback = Box<dyn Fn() + Send + Sync>;

struct Shared {
    name: String,
    epoch: Instant,
    epoch_wall: SystemTime,
    /// Nanoseconds from `epoch` to the last contact, plus one (0: never).
    last_contact: AtomicU64,
    /// Fast path of `failing.since.is_some()`.
    is_failing: AtomicBool,
    failing: Mutex<Failing>,
    outages: AtomicU64,
    closed: AtomicBool,
    on_back: OnceLock<Callback>,
    faults: Option<Arc<Faults>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Failing> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wall(&self, at: Instant) -> SystemTime {
        self.epoch_wall + at.saturating_duration_since(self.epoch)
    }

    fn record_success(&self) {
        let now = Instant::now();
        let nanos = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX - 1);
        self.last_contact.fetch_max(nanos + 1, Ordering::AcqRel);
        if !self.is_failing.load(Ordering::Acquire) {
            return;
        }
        let (outage, lost) = {
            let mut failing = self.lock();
            let Some(since) = failing.since.take() else {
                return;
            };
            self.is_failing.store(false, Ordering::Release);
            let outage = now.saturating_duration_since(since);
            let lost = std::mem::take(&mut failing.lost);
            if lost {
                failing.last_outage = Some(outage);
            }
            failing.last_error = None;
            (outage, lost)
        };
        if lost {
            tracing::info!(
                upstream = %self.name,
                outage = %go(outage),
                "upstream is back"
            );
        } else {
            tracing::debug!(upstream = %self.name, after = %go(outage), "upstream answers again");
        }
        if let Some(on_back) = self.on_back.get() {
            on_back();
        }
    }

    /// Records a failed call; returns whether a probe task must be started.
    fn record_failure(&self, error: &str) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let mut failing = self.lock();
        failing.last_error = Some(error.to_owned());
        if failing.since.is_none() {
            failing.since = Some(Instant::now());
            self.is_failing.store(true, Ordering::Release);
            tracing::debug!(upstream = %self.name, %error, "upstream call failed");
        }
        !std::mem::replace(&mut failing.probing, true)
    }

    /// Announces the outage once it has lasted [`LOST_AFTER`]; returns whether the upstream
    /// is still failing (the probe task ends when it is not).
    fn check_lost(&self) -> bool {
        let mut failing = self.lock();
        let Some(since) = failing.since else {
            failing.probing = false;
            return false;
        };
        if self.closed.load(Ordering::Acquire) {
            failing.probing = false;
            return false;
        }
        if !failing.lost && since.elapsed() >= LOST_AFTER {
            failing.lost = true;
            self.outages.fetch_add(1, Ordering::Relaxed);
            let error = failing.last_error.clone().unwrap_or_default();
            drop(failing);
            tracing::warn!(
                upstream = %self.name,
                %error,
                "upstream lost: calls fail; probing every {}",
                go(PROBE_INTERVAL)
            );
        }
        true
    }
}

/// An [`Upstream`] that records whether the upstream it wraps answers (see the module docs).
/// Cheap to share; [`ContactTracker::state`] reads the state at any time.
pub struct ContactTracker {
    inner: Arc<dyn Upstream>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ContactTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContactTracker")
            .field("upstream", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl ContactTracker {
    /// Wraps `inner`, named `name` in logs and [`ContactState::upstream`]. With `faults`, the
    /// probe also runs as soon as the fault settings change (an injected outage ended).
    pub fn new(
        inner: Arc<dyn Upstream>,
        name: impl Into<String>,
        faults: Option<Arc<Faults>>,
    ) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared {
                name: name.into(),
                epoch: Instant::now(),
                epoch_wall: SystemTime::now(),
                last_contact: AtomicU64::new(0),
                is_failing: AtomicBool::new(false),
                failing: Mutex::new(Failing::default()),
                outages: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                on_back: OnceLock::new(),
                faults,
            }),
        }
    }

    /// Sets what runs each time contact comes back after failures (once; later calls are
    /// ignored). Runs on the task whose call succeeded: keep it short.
    pub fn on_contact_back(&self, callback: impl Fn() + Send + Sync + 'static) {
        let _ = self.shared.on_back.set(Box::new(callback));
    }

    /// The upstream's name as given to [`ContactTracker::new`].
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The state right now.
    pub fn state(&self) -> ContactState {
        let shared = &self.shared;
        let now = Instant::now();
        let last = shared.last_contact.load(Ordering::Acquire);
        let last_contact = (last > 0).then(|| shared.epoch + Duration::from_nanos(last - 1));
        let failing = shared.lock();
        let down_for = failing
            .since
            .map(|since| now.saturating_duration_since(since));
        ContactState {
            upstream: shared.name.clone(),
            reachable: down_for.is_none_or(|d| d < LOST_AFTER),
            last_contact: last_contact.map(|at| shared.wall(at)),
            since_last_contact: last_contact.map(|at| now.saturating_duration_since(at)),
            down_since: failing.since.map(|at| shared.wall(at)),
            down_for,
            last_error: failing.last_error.clone(),
            last_outage: failing.last_outage,
            outages: shared.outages.load(Ordering::Relaxed),
        }
    }

    /// Checks the upstream now with a light call (its stats), recording the outcome. The
    /// agent calls it at start.
    ///
    /// # Errors
    ///
    /// The call's error (also when it took longer than [`PROBE_TIMEOUT`]).
    pub async fn probe(&self) -> Result<UpstreamStats, UpstreamError> {
        let result = tokio::time::timeout(PROBE_TIMEOUT, self.inner.stats())
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Unavailable(format!(
                    "no answer within {}",
                    go(PROBE_TIMEOUT)
                )))
            });
        self.observe(&result);
        result
    }

    fn observe<T>(&self, result: &Result<T, UpstreamError>) {
        match result {
            Err(UpstreamError::Unavailable(error)) => {
                if self.shared.record_failure(error) {
                    self.spawn_probe();
                }
            }
            // Any answer, including a refusal (a cas mismatch), is contact.
            _ => self.shared.record_success(),
        }
    }

    fn spawn_probe(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.shared.lock().probing = false;
            return;
        };
        let (shared, inner) = (self.shared.clone(), self.inner.clone());
        runtime.spawn(async move {
            let mut faults = shared.faults.as_ref().map(|f| f.subscribe());
            loop {
                let settings_changed = async {
                    match faults.as_mut() {
                        Some(faults) => {
                            if faults.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = tokio::time::sleep(PROBE_INTERVAL) => {}
                    () = settings_changed => {}
                }
                if !shared.check_lost() {
                    return;
                }
                let result = tokio::time::timeout(PROBE_TIMEOUT, inner.stats())
                    .await
                    .unwrap_or_else(|_| {
                        Err(UpstreamError::Unavailable(format!(
                            "probe: no answer within {}",
                            go(PROBE_TIMEOUT)
                        )))
                    });
                match result {
                    Err(UpstreamError::Unavailable(error)) => {
                        shared.record_failure(&error);
                    }
                    _ => shared.record_success(),
                }
            }
        });
    }

    /// Runs one upstream call, recording its outcome; blocking reads also report when the
    /// upstream accepted them (see [`accepted`]).
    fn track<'a, T: Send + 'a>(
        &'a self,
        call: BoxFuture<'a, Result<T, UpstreamError>>,
    ) -> BoxFuture<'a, Result<T, UpstreamError>> {
        Box::pin(Tracked {
            call,
            tracker: self,
            accepted: OFFERED.try_with(std::cell::Cell::take).ok().flatten(),
        })
    }
}

/// One upstream call through the tracker: 40 bytes (a blocking read lives as long as it waits,
/// one per watched key; a task-local scope and an `async` block around the call took 80, and
/// the caller's [`with_accepted`] scope 48 more).
struct Tracked<'a, T> {
    call: BoxFuture<'a, Result<T, UpstreamError>>,
    tracker: &'a ContactTracker,
    /// The caller's signal, taken from [`accepting`].
    accepted: Option<Connected>,
}

impl<T> Future for Tracked<'_, T> {
    type Output = Result<T, UpstreamError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        // The tracker is visible to `accepted` while the call runs (the caller's
        // `with_accepted` scope too: `accepted` tells both).
        let shared = self.tracker.shared.clone();
        let this = &mut *self;
        let polled = CONTACT.sync_scope(shared, || match &this.accepted {
            Some(signal) => ACCEPTED.sync_scope(signal.clone(), || this.call.as_mut().poll(cx)),
            None => this.call.as_mut().poll(cx),
        });
        if let std::task::Poll::Ready(result) = &polled {
            self.tracker.observe(result);
        }
        polled
    }
}

impl Upstream for ContactTracker {
    fn get<'a>(
        &'a self,
        key: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<KeyRead, UpstreamError>> {
        self.track(self.inner.get(key, query))
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        query: Query,
    ) -> BoxFuture<'a, Result<ListRead, UpstreamError>> {
        self.track(self.inner.list(prefix, query))
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        self.track(self.inner.put(key, value, flags, cas))
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        cas: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        self.track(self.inner.delete(key, cas))
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        self.track(self.inner.delete_prefix(prefix))
    }

    fn stats(&self) -> BoxFuture<'_, Result<UpstreamStats, UpstreamError>> {
        self.track(self.inner.stats())
    }

    fn counters(&self) -> UpstreamStats {
        self.inner.counters()
    }

    fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.inner.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{FaultSettings, MemoryUpstream};

    /// `accepting` reaches the caller's signal whether the read goes through a tracker (which
    /// takes the signal into its box) or not (then wrapped in `with_accepted`), and the
    /// tracker records the contact.
    #[tokio::test(start_paused = true)]
    async fn accepting_reaches_the_signal_with_or_without_a_tracker() {
        let memory = MemoryUpstream::new(Faults::new(FaultSettings::default()));
        let index = memory.put("k", b"v".to_vec(), 0, None).await.unwrap();
        let tracker = ContactTracker::new(memory.clone(), "memory", None);
        let wait = Query::blocking(index, Duration::from_millis(50));
        let signal = |count: &Arc<AtomicU64>| {
            let count = count.clone();
            Connected::new(move || {
                count.fetch_add(1, Ordering::Relaxed);
            })
        };

        let direct = Arc::new(AtomicU64::new(0));
        let read = accepting(signal(&direct), || memory.get("k", wait)).await;
        assert_eq!(read.unwrap().index, index);
        assert_eq!(direct.load(Ordering::Relaxed), 1);

        let tracked = Arc::new(AtomicU64::new(0));
        assert_eq!(tracker.state().last_contact, None);
        let read = accepting(signal(&tracked), || tracker.get("k", wait)).await;
        assert_eq!(read.unwrap().index, index);
        assert_eq!(tracked.load(Ordering::Relaxed), 1);
        assert!(tracker.state().last_contact.is_some());
        // Nothing is left offered for a later call.
        assert!(OFFERED.try_with(|_| ()).is_err());
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_332_058_123);
        assert_eq!(rfc3339(t), "2026-12-03T21:07:38.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
