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
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::duration::GoDuration;
use crate::http;
use tower::ServiceExt as _;

pub use crate::config::StartError;
pub use crate::http::state::AgentState;

/// How long shutdown waits for in-flight responses before it gives up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown lets long-polls answer from the cache before it closes the cache.
const ANSWER_GRACE: Duration = Duration::from_secs(2);

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
        // The service without a router on top of it (`http::app` adds one for embedding).
        let server = tokio::spawn(serve(listener, http::service(state.clone()), shutdown_rx));
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

/// Serves `service` on `listener` until `shutdown` turns true, then waits for the open
/// connections to finish (each told to end gracefully: the response in progress completes,
/// an idle keep-alive connection closes).
///
/// What `axum::serve` with graceful shutdown does, minus the protocol sniffing: its
/// `hyper_util` auto builder reads 24 bytes first (to tell an HTTP/2 preface, which this agent
/// does not serve, from HTTP/1) and hands them back through a rewinding reader, so hyper's
/// read buffer, sized for 8 KiB, grew to 16 KiB on every connection's first request and kept
/// that for the connection's life. Served as HTTP/1 from the start it stays at 8 KiB: 8 KiB
/// less per open connection, which long-lived `/v1/watch` streams hold for hours.
async fn serve(
    listener: TcpListener,
    service: http::AgentService,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    // Every connection task holds a receiver; the sender's `closed` says they all ended.
    let (live_tx, live_rx) = watch::channel(());
    let builder = Arc::new(hyper::server::conn::http1::Builder::new());
    let mut stopping = shutdown.clone();
    let mut stopped = std::pin::pin!(async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    });
    loop {
        let stream = tokio::select! {
            stream = accept(&listener) => stream,
            () = &mut stopped => break,
        };
        let service = TowerToHyperService::new(service.clone().map_request(
            |request: hyper::Request<hyper::body::Incoming>| request.map(axum::body::Body::new),
        ));
        let (builder, mut shutdown, live) = (builder.clone(), shutdown.clone(), live_rx.clone());
        tokio::spawn(async move {
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let stop = async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            };
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::trace!(%error, "connection ended with an error");
            }
            drop(live);
        });
    }
    drop(listener);
    drop(live_rx);
    live_tx.closed().await;
    Ok(())
}

/// The next connection, as `axum::serve` accepts it: a connection's own failure is skipped;
/// any other error (e.g. out of file descriptors) is logged and accepting pauses for a second
/// (shutdown does not wait for that pause: this future is dropped).
async fn accept(listener: &TcpListener) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                ) => {}
            Err(error) => {
                tracing::error!("accept error: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
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
