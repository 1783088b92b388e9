//! Wiring: builds the upstream, the cache and its types, and the HTTP server; runs it until
//! shutdown.
//!
//! Shutdown order (Ctrl-C, SIGTERM, or [`RunningAgent::shutdown`]):
//! 1. stop accepting connections;
//! 2. tell open long-polls to answer now (with the data as it is, as if their wait had
//!    passed) and end `/v1/watch` streams;
//! 3. give those answers up to 2 s to be read from the cache (closing it first would fail
//!    them);
//! 4. close the cache (ends background refresh and watches) and the upstream (answers its
//!    open blocking reads, e.g. uncached long-polls);
//! 5. wait for in-flight responses to finish.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use cache_core::{Cache, RateLimit, SharedRuntime, TypedCache};
use cache_tokio::TokioRuntime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, KvCacheMode, UpstreamKind};
use crate::duration::GoDuration;
use crate::http;
use crate::types::{BlockingOptions, KvType, ListType, StatsType};
use crate::upstream::{
    ContactState, ContactTracker, EtcdSettings, EtcdUpstream, FaultSettings, Faults,
    MemoryUpstream, Upstream, UpstreamStats,
};

/// How long shutdown waits for in-flight responses before it gives up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown lets long-polls answer from the cache before it closes the cache.
const ANSWER_GRACE: Duration = Duration::from_secs(2);

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
    /// The embedded store, for its live counters on the metrics page.
    pub(crate) memory: Option<Arc<MemoryUpstream>>,
    /// The etcd upstream, for its live counters on the metrics page.
    pub(crate) etcd: Option<Arc<EtcdUpstream>>,
    pub(crate) faults: Arc<Faults>,
    pub(crate) kv_mode: KvCacheMode,
    /// Flips to `true` once shutdown starts.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// `/v1/watch` streams open now.
    pub(crate) sse_streams: AtomicU64,
    pub(crate) debug_routes: bool,
    /// Writes made through this agent that cached reads must see (read your writes).
    pub(crate) writes: crate::types::RecentWrites,
    /// The last minutes of the cache's counters, for the web view (`/v1/agent/cache`).
    pub(crate) history: http::cache_view::History,
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
                writes: crate::types::RecentWrites::default(),
                history: http::cache_view::History::new(),
            }),
        };
        http::cache_view::History::spawn_sampler(&state);
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
        let inner = &self.inner;
        inner
            .memory
            .as_ref()
            .map(|memory| memory.counters())
            .or_else(|| inner.etcd.as_ref().map(|etcd| etcd.counters()))
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

/// Why the agent did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A flag combination is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// The agent: [`Agent::start`] runs it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Agent;

impl Agent {
    /// Binds `config.listen`, builds the agent and serves it in a background task.
    ///
    /// # Errors
    ///
    /// [`StartError`] when the address cannot be bound or the configuration is invalid.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub async fn start(config: Config) -> Result<RunningAgent, StartError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let state = AgentState::new(&config, shutdown_rx.clone())?;
        let app = http::app(state.clone());
        let mut graceful = shutdown_rx;
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = graceful.wait_for(|stop| *stop).await;
                })
                .await
        });
        tracing::info!(
            %addr,
            upstream = %state.inner.contact.name(),
            kv_cache = %config.kv_cache,
            query_timeout = %GoDuration(config.query_timeout),
            ready_grace = %GoDuration(config.ready_grace),
            faults = %state.faults().get(),
            "agent listening"
        );
        // A first light call: says at once whether the upstream answers. Not fatal: the agent
        // serves (errors, then data) while the upstream comes and goes, and the contact
        // tracker probes until it answers.
        let contact = state.inner.contact.clone();
        tokio::spawn(async move {
            match contact.probe().await {
                Ok(stats) => tracing::info!(
                    upstream = %contact.name(),
                    index = stats.index,
                    keys = stats.keys,
                    "upstream reachable"
                ),
                Err(error) => tracing::warn!(
                    upstream = %contact.name(),
                    %error,
                    "upstream is not reachable yet; reads fail until it is"
                ),
            }
        });
        Ok(RunningAgent {
            addr,
            state,
            shutdown: ShutdownHandle {
                tx: Arc::new(shutdown_tx),
            },
            server,
        })
    }
}

/// A running agent: its address, a shutdown handle, and its server task.
#[derive(Debug)]
pub struct RunningAgent {
    addr: SocketAddr,
    state: AgentState,
    shutdown: ShutdownHandle,
    server: JoinHandle<io::Result<()>>,
}

impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState")
            .field("cache", &self.inner.cache)
            .field("kv_mode", &self.inner.kv_mode)
            .finish_non_exhaustive()
    }
}

impl RunningAgent {
    /// The address the agent listens on (with the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The agent's state (its cache and faults), for tests.
    pub fn state(&self) -> &AgentState {
        &self.state
    }

    /// A handle that starts shutdown from anywhere (a signal handler, a test).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Shuts down (see the module docs) and waits until the server has stopped.
    ///
    /// # Errors
    ///
    /// The server's I/O error, if it failed; a timeout error if in-flight responses did not
    /// finish within 30 s.
    pub async fn shutdown(self) -> io::Result<()> {
        self.shutdown.shutdown();
        self.wait().await
    }

    /// Waits until the server has stopped (after a [`ShutdownHandle::shutdown`]), closing the
    /// cache and upstream once shutdown has started.
    ///
    /// # Errors
    ///
    /// As [`RunningAgent::shutdown`].
    pub async fn wait(self) -> io::Result<()> {
        let mut shutdown = self.state.inner.shutdown.clone();
        let _ = shutdown.wait_for(|stop| *stop).await;
        // Cached long-polls answer from the cache now: let them, before it closes (a read of
        // a closed cache fails). Uncached long-polls wait for the upstream's close below.
        let mut server = self.server;
        let early = tokio::time::timeout(ANSWER_GRACE, &mut server).await.ok();
        // Now end background work and the upstream's open blocking reads.
        self.state.inner.cache.close();
        self.state.inner.upstream.close();
        let drained = match early {
            Some(done) => Ok(done),
            None => tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await,
        };
        match drained {
            Ok(Ok(result)) => result,
            Ok(Err(join_error)) => Err(io::Error::other(join_error)),
            Err(_) => {
                server.abort();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "in-flight responses did not finish within 30s",
                ))
            }
        }
        .inspect(|()| tracing::info!("agent stopped"))
    }
}

/// Starts an agent's shutdown; cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<bool>>,
}

impl ShutdownHandle {
    /// Starts shutdown. Idempotent.
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }
}
