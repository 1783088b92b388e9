//! The agent's state: everything a request handler needs (the cache and its types, the
//! upstream behind its contact tracker, the fault switches, shutdown), built from the
//! configuration by [`AgentState::new`].
//!
//! It lives below the routes: `http/*` handlers take it as axum state, and `agent.rs` (the
//! wiring: bind, serve, shut down) builds it and hands it to [`super::app`].

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};
use std::time::Duration;

use cache_core::{Cache, RateLimit, SharedRuntime, TypedCache};
use cache_tokio::TokioRuntime;
use tokio::sync::watch;
use tokio::time::Instant;

use super::history::{History, SAMPLE_EVERY, Sample};
use crate::config::{Config, KvCacheMode, StartError, UpstreamKind};
use crate::types::{BlockingOptions, KvType, ListType, StatsType};
use crate::upstream::{
    ContactState, ContactTracker, EtcdSettings, EtcdUpstream, FaultSettings, Faults,
    MemoryUpstream, Upstream, UpstreamStats,
};

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AgentState {
    pub(crate) inner: Arc<StateInner>,
}

pub(crate) struct StateInner {
    pub(crate) cache: Cache,
    pub(crate) kv: TypedCache<KvType>,
    pub(crate) list: TypedCache<ListType>,
    pub(crate) stats: TypedCache<StatsType>,
    /// The upstream behind its contact tracker (every call goes through the tracker).
    pub(crate) upstream: Arc<dyn Upstream>,
    /// Whether the upstream answers: readiness, metrics, the "lost"/"back" log lines, and
    /// `Cache::retry_now` when contact comes back.
    pub(crate) contact: Arc<ContactTracker>,
    /// `/v1/agent/ready` answers 503 once the upstream has failed for longer than this.
    pub(crate) ready_grace: Duration,
    /// The embedded store as itself, for tests that write to it directly (counters come from
    /// the `Upstream` trait).
    pub(crate) memory: Option<Arc<MemoryUpstream>>,
    /// The etcd upstream as itself, for its endpoints and traffic figures.
    pub(crate) etcd: Option<Arc<EtcdUpstream>>,
    pub(crate) faults: Arc<Faults>,
    pub(crate) kv_mode: KvCacheMode,
    /// Flips to `true` once shutdown starts.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// `/v1/watch` streams open now.
    pub(crate) sse_streams: AtomicU64,
    pub(crate) debug_routes: bool,
    /// Writes made through this agent that cached reads must see (read your writes).
    pub(crate) writes: super::writes::RecentWrites,
    /// The last minutes of the cache's counters, for the web view (`/v1/agent/cache`).
    pub(crate) history: History,
}

impl AgentState {
    /// Builds the upstream, the cache and its types from `config`. Must run inside a tokio
    /// runtime (the cache spawns its background work on it).
    pub fn new(config: &Config, shutdown: watch::Receiver<bool>) -> Result<Self, StartError> {
        let faults = Faults::new(FaultSettings {
            latency: config.upstream_latency,
            fail_rate: config.upstream_fail_rate,
            fail: false,
        });
        let (upstream, memory, etcd): (Arc<dyn Upstream>, _, _) = match config.upstream {
            UpstreamKind::Embedded => {
                let memory = MemoryUpstream::new(faults.clone());
                (memory.clone(), Some(memory), None)
            }
            UpstreamKind::Etcd => {
                let settings = EtcdSettings::from_config(config).map_err(StartError::Config)?;
                let etcd =
                    EtcdUpstream::new(settings, faults.clone()).map_err(StartError::Config)?;
                (etcd.clone(), None, Some(etcd))
            }
        };
        let name = match config.upstream {
            UpstreamKind::Embedded => "embedded".to_owned(),
            UpstreamKind::Etcd => format!("etcd {}", config.etcd_endpoints.join(",")),
        };
        let contact = Arc::new(ContactTracker::new(upstream, name, Some(faults.clone())));
        let upstream: Arc<dyn Upstream> = contact.clone();
        let runtime: SharedRuntime = Arc::new(TokioRuntime::current());
        let mut builder = Cache::builder(runtime);
        if let Some(per_second) = config.rate_limit {
            let limit = RateLimit::new(per_second, config.rate_burst)
                .map_err(|e| StartError::Config(e.to_string()))?;
            builder = builder.rate_limit(limit);
        }
        if let Some(max) = config.max_entries {
            builder = builder.max_entries(max);
        }
        let cache = builder.build();
        let blocking = BlockingOptions {
            refresh: config.kv_cache == KvCacheMode::Refresh,
            query_timeout: config.query_timeout,
        };
        let kv = cache.register(KvType::new(upstream.clone(), blocking));
        let list = cache.register(ListType::new(upstream.clone(), blocking));
        let stats = cache.register(StatsType::new(upstream.clone(), config.stats_refresh));
        let state = Self {
            inner: Arc::new(StateInner {
                cache,
                kv,
                list,
                stats,
                upstream,
                contact,
                ready_grace: config.ready_grace,
                memory,
                etcd,
                faults,
                kv_mode: config.kv_cache,
                shutdown,
                sse_streams: AtomicU64::new(0),
                debug_routes: config.debug_routes,
                writes: super::writes::RecentWrites::default(),
                history: History::new(),
            }),
        };
        spawn_history_sampler(&state);
        // Contact is back: chains sleeping out a backoff retry now. A weak reference, so the
        // upstream (held by the cache's types) does not keep the cache alive.
        let weak = Arc::downgrade(&state.inner);
        state.inner.contact.on_contact_back(move || {
            if let Some(inner) = weak.upgrade() {
                let woken = inner.cache.retry_now();
                tracing::debug!(woken, "contact is back: backing-off fetches retry now");
            }
        });
        Ok(state)
    }

    /// The cache (for metrics and tests).
    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// Completes once shutdown has started (at once if the agent's shutdown handle is gone).
    pub fn shutdown_started(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut shutdown = self.inner.shutdown.clone();
        async move {
            // The guard `wait_for` returns is not `Send`; drop it here.
            let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
        }
    }

    /// The upstream's counters right now, without contacting it (for the metrics page).
    pub fn upstream_counters(&self) -> Option<UpstreamStats> {
        Some(self.inner.upstream.counters())
    }

    /// The embedded store, when the agent runs on it: tests write to it directly, as another
    /// client of the store would (bypassing the agent's cache).
    pub fn memory(&self) -> Option<&Arc<MemoryUpstream>> {
        self.inner.memory.as_ref()
    }

    /// The etcd upstream, when the agent runs on one (for its endpoints and traffic).
    pub fn etcd(&self) -> Option<&Arc<EtcdUpstream>> {
        self.inner.etcd.as_ref()
    }

    /// What is known about contact with the upstream right now (reachable, last contact,
    /// outage); see [`ContactState`].
    pub fn contact(&self) -> ContactState {
        self.inner.contact.state()
    }

    /// Whether the agent is ready to serve: not while the upstream has failed for longer
    /// than `--ready-grace`.
    pub fn ready(&self) -> bool {
        self.inner
            .contact
            .state()
            .down_for
            .is_none_or(|down| down <= self.inner.ready_grace)
    }

    /// The live fault settings of the upstream.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.inner.faults
    }
}

impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState")
            .field("cache", &self.inner.cache)
            .field("kv_mode", &self.inner.kv_mode)
            .finish_non_exhaustive()
    }
}

/// Starts the task that samples `state`'s cache every second. It holds the state weakly
/// and ends when the agent is gone, shuts down, or its cache is closed.
fn spawn_history_sampler(state: &AgentState) {
    let weak: Weak<StateInner> = Arc::downgrade(&state.inner);
    let stop = state.shutdown_started();
    tokio::spawn(async move {
        let sample = async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if inner.cache.is_closed() {
                    break;
                }
                let sample = Sample::of(&inner.cache.metrics(), Instant::now());
                inner.history.record(sample);
            }
        };
        tokio::select! {
            () = sample => {}
            () = stop => {}
        }
    });
}
